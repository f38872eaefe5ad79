import json
import os
import subprocess
import sys

import pytest

from core.describe import describe, describe_batch
from core.settings import PROJECT_ROOT
from tests.conftest import draw_cell


def test_describe_returns_every_score(tiny_bundle, cell_image):
    result = describe(tiny_bundle, cell_image, "blood_cells")
    keys = tiny_bundle.panels["blood_cells"].keys
    assert set(result.scores) == set(keys) and set(result.similarities) == set(keys)
    assert abs(sum(result.scores.values()) - 1) < 1e-4
    assert result.best_class in keys
    assert 0 <= result.confidence <= 1
    if result.abstained:
        assert result.abstain_reason and result.class_key is None and result.sentence is None
    else:
        assert result.sentence == tiny_bundle.panels["blood_cells"].cell_class(result.class_key).sentence
    assert {"preprocess", "embed", "score"} <= set(result.timings_ms)


def test_unknown_panel_is_a_clear_error(tiny_bundle, cell_image):
    with pytest.raises(ValueError, match="Unknown panel"):
        describe(tiny_bundle, cell_image, "nope")


def test_batch_matches_single(tiny_bundle):
    images = [draw_cell(seed=i) for i in range(3)]
    batch = describe_batch(tiny_bundle, images, "b_all")
    single = describe(tiny_bundle, images[1], "b_all")
    assert batch[1].best_class == single.best_class
    assert abs(batch[1].confidence - single.confidence) < 1e-4


def test_describe_api_treats_a_pil_image_as_the_loader_treats_its_file(tiny_bundle):
    """The API takes any PIL image: what it describes must be what the file loader would give
    (alpha over white, EXIF orientation), and what the loader refuses it refuses too."""
    import io

    import numpy as np
    from PIL import Image

    from core.imageio import ImageRejected, load_image_bytes

    rgba = np.dstack([np.asarray(draw_cell(seed=4)), np.full((96, 96), 255, np.uint8)])
    rgba[:40, :, 3] = 0  # a transparent band
    image = Image.fromarray(rgba)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    from_file = describe(tiny_bundle, load_image_bytes(buffer.getvalue(), "x.png").image, "blood_cells")
    from_pil = describe(tiny_bundle, image, "blood_cells")
    assert from_pil.scores == pytest.approx(from_file.scores, abs=1e-5)
    assert "transparent areas composited over a white background" in from_pil.notes

    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned; displayed upright after a 270-degree turn
    buffer = io.BytesIO()
    draw_cell(seed=5).rotate(90, expand=True).save(buffer, "JPEG", exif=exif)
    opened = Image.open(io.BytesIO(buffer.getvalue()))
    from_file = describe(tiny_bundle, load_image_bytes(buffer.getvalue(), "r.jpg").image, "blood_cells")
    assert describe(tiny_bundle, opened, "blood_cells").scores == pytest.approx(from_file.scores, abs=1e-5)

    with pytest.raises(ImageRejected, match="at least 16 pixels"):
        describe(tiny_bundle, Image.new("RGB", (10, 10)), "blood_cells")
    with pytest.raises(ImageRejected, match="too long and narrow"):
        describe_batch(tiny_bundle, [draw_cell(seed=1), Image.new("RGB", (16, 3000))], "blood_cells")


def test_unvalidated_panel_is_flagged(tiny_bundle, cell_image):
    assert describe(tiny_bundle, cell_image, "leukemia").panel_validated is False


def test_describe_cli_good_and_broken_file(tiny_model_path, tmp_path):
    good = tmp_path / "cell.png"
    draw_cell().save(good)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg at all")
    proc = subprocess.run([sys.executable, "-m", "core.describe", str(good), str(broken), "--json",
                           "--model", str(tiny_model_path)], capture_output=True, text=True, cwd=PROJECT_ROOT,
                          timeout=120)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 1  # one file refused
    assert lines[0]["ok"] and lines[0]["panel"] == "blood_cells" and set(lines[0]["scores"])
    assert lines[0]["calibrated"] is False  # a freshly trained model: raw softmax, no abstention thresholds
    assert lines[0]["calibration_id"] is None and lines[0]["model_id"]
    assert not lines[1]["ok"] and "broken.jpg" in lines[1]["error"]
    assert "Traceback" not in proc.stderr


def test_describe_cli_into_a_closed_pipe_and_with_an_empty_panel_name(tiny_model_path, tmp_path):
    good = tmp_path / "cell.png"
    draw_cell().save(good)
    # 400 JSON records (about 240 KB) overflow the pipe's buffer, so the writer meets the closed end
    command = [sys.executable, "-m", "core.describe", *[str(good)] * 400, "--json", "--model", str(tiny_model_path)]
    reader = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=PROJECT_ROOT)
    first = reader.stdout.readline()  # like `| head -1`: read one record, then leave
    reader.stdout.close()
    _, stderr = reader.communicate(timeout=300)
    assert json.loads(first)["file"] == str(good) and reader.returncode == 141 and b"Traceback" not in stderr
    proc = subprocess.run(command[:4] + ["--panel", "", "--model", str(tiny_model_path)], capture_output=True,
                          text=True, cwd=PROJECT_ROOT, timeout=120)
    assert proc.returncode == 2 and "unknown panel ''" in proc.stderr  # not silently the default panel


def test_one_file_failing_inside_the_model_costs_not_the_rest_of_the_batch(tiny_model_path, tmp_path, capsys,
                                                                          monkeypatch):
    import core.describe

    good = tmp_path / "cell.png"
    draw_cell().save(good)
    real, calls = core.describe.describe, []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug met on one image")
        return real(*args, **kwargs)

    monkeypatch.setattr(core.describe, "describe", fails_once)
    status = core.describe.main([str(good), str(good), "--json", "--model", str(tiny_model_path)])
    first, second = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 1 and not first["ok"] and second["ok"]
    assert first["error"] == "could not be described (RuntimeError: a bug met on one image)"


@pytest.mark.parametrize("variable, value", [("MAX_UPLOAD_MB", "abc"), ("MAX_PIXELS", "-5"), ("TORCH_THREADS", "0")])
def test_unusable_setting_is_one_clear_line_not_a_traceback(tmp_path, monkeypatch, variable, value):
    from core.imageio import ImageRejected, load_image_bytes

    monkeypatch.setenv(f"HEMASCRIBE_{variable}", value)
    with pytest.raises(ImageRejected, match=f"HEMASCRIBE_{variable} must be a positive"):
        load_image_bytes(b"\x89PNG\r\n\x1a\n", "x.png")
    good = tmp_path / "cell.png"
    draw_cell().save(good)
    proc = subprocess.run([sys.executable, "-m", "core.describe", str(good)], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, timeout=120, env={**os.environ, f"HEMASCRIBE_{variable}": value})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"HEMASCRIBE_{variable} must be a positive" in proc.stderr and repr(value) in proc.stderr


def test_calibration_counts_only_when_fitted_and_not_degenerate():
    from types import SimpleNamespace

    from core.reliability import is_calibrated

    fitted = {"calibration": {"panels": {"blood_cells": {"temperature": 0.9},
                                         "b_all": {"temperature": 24434.0, "degenerate": True}}}}
    bundle = SimpleNamespace(sidecar=fitted)
    assert is_calibrated(bundle, "blood_cells")
    assert not is_calibrated(bundle, "b_all") and not is_calibrated(bundle, "leukemia")
    assert not is_calibrated(SimpleNamespace(sidecar={}), "blood_cells")


def test_a_degenerate_fit_is_not_applied(tiny_bundle, cell_image):
    import dataclasses

    from core.describe import embed_images
    from core.reliability import panel_probabilities

    embedding = embed_images(tiny_bundle, [cell_image])[0][0]
    raw = panel_probabilities(tiny_bundle, embedding, "blood_cells")
    fit = {"temperature": 24434.0, "min_confidence": 0.99, "out_of_scope_threshold": -1.0}
    for degenerate, expect_raw in ((True, True), (False, False)):
        sidecar = {**tiny_bundle.sidecar, "calibration": {"panels": {"blood_cells": {**fit, "degenerate": degenerate}}}}
        bundle = dataclasses.replace(tiny_bundle, sidecar=sidecar)
        probabilities = panel_probabilities(bundle, embedding, "blood_cells")
        assert (probabilities == pytest.approx(raw)) == expect_raw
        # the degenerate thresholds would refuse everything as out of scope; not applied, they refuse nothing
        assert (describe(bundle, cell_image, "blood_cells").abstain_kind == "out_of_scope") == (not degenerate)


@pytest.mark.parametrize("threshold, noted", [(-1e9, True), (1e9, False)])
def test_describe_cli_notes_a_batch_that_looks_like_another_lab_on_stderr(tmp_path, capsys, threshold, noted):
    from core.describe import main
    from tests.conftest import save_calibrated_tiny

    save_calibrated_tiny(tmp_path / "m.safetensors", out_of_scope_threshold=threshold)
    files = []
    for i in range(5):
        draw_cell(64, kind=i % 3, seed=i).save(tmp_path / f"c{i}.png")
        files.append(str(tmp_path / f"c{i}.png"))
    assert main([*files, "--model", str(tmp_path / "m.safetensors"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 5 and all(json.loads(line)["ok"] for line in out.splitlines())
    from core.checkpoint import load_bundle
    live = load_bundle(tmp_path / "m.safetensors").calibration_id
    assert {json.loads(line)["calibration_id"] for line in out.splitlines()} == {live} != {None}
    assert ("note: 5 of these 5 images were not recognised" in err) == noted


def test_an_answer_on_an_uncalibrated_panel_carries_no_calibration_id(tmp_path):
    from core.checkpoint import load_bundle
    from tests.conftest import save_calibrated_tiny

    bundle = load_bundle(save_calibrated_tiny(tmp_path / "m.safetensors"))  # blood_cells calibrated only
    assert describe(bundle, draw_cell(), "blood_cells").calibration_id == bundle.calibration_id is not None
    assert describe(bundle, draw_cell(), "b_all").calibration_id is None
