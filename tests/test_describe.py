import json
import subprocess
import sys

import pytest

from core.describe import describe, describe_batch, main as describe_main
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
    assert not lines[1]["ok"] and "broken.jpg" in lines[1]["error"]
    assert "Traceback" not in proc.stderr
