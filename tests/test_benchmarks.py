"""The benchmark CLIs: their p95 rule, a refused model, and the import time beside the load time."""
from __future__ import annotations

import json
import shutil

import pytest

import training.bench_app as bench_app
import training.bench_gallery as bench_gallery
import training.benchmark as benchmark
from core.checkpoint import sidecar_path
from training.bench_common import nearest_rank


def test_p95_is_the_nearest_rank_in_every_benchmark():
    fifty = [float(i) for i in range(50, 0, -1)]  # unsorted on purpose
    assert nearest_rank(fifty) == 48.0  # ceil(47.5): the old sorted[int(0.95 n) - 1] gave the 47th
    assert nearest_rank(list(range(1, 21))) == 19 and nearest_rank([7.0]) == 7.0
    assert bench_gallery._stats(fifty)["p95"] == 48.0
    runs = [{"total": t / 1000, "describe": 0.0} for t in range(1, 21)]
    assert bench_app.summarise(runs)["p95_ms"] == 19.0  # a measured run, not an interpolated 19.05


@pytest.fixture
def tampered_model(tiny_model_path, tmp_path):
    """A copy of the tiny model whose weights no longer match the sha256 in its sidecar."""
    path = tmp_path / "tampered.safetensors"
    shutil.copy(tiny_model_path, path)
    shutil.copy(sidecar_path(tiny_model_path), sidecar_path(path))
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("main", [benchmark.main, bench_gallery.main, bench_app.main])
def test_a_tampered_model_is_refused_with_one_line_and_exit_2(main, tampered_model, capsys):
    code = main(["--model", str(tampered_model)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "does not match" in err and "Traceback" not in err


@pytest.mark.parametrize("main", [benchmark.main, bench_gallery.main, bench_app.main])
def test_an_unusable_setting_is_refused_with_one_line(main, tiny_model_path, monkeypatch, capsys):
    monkeypatch.setenv("HEMASCRIBE_MAX_PIXELS", "lots")
    monkeypatch.delenv("HEMASCRIBE_MODEL", raising=False)
    for args in ([], ["--model", str(tiny_model_path)]):  # the setting matters with --model too
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and len(err.splitlines()) == 1 and "HEMASCRIBE_MAX_PIXELS" in err


def test_import_time_is_printed_beside_the_model_load(tiny_model_path, tmp_path, capsys, monkeypatch):
    bench_app.main(["--model", str(tiny_model_path), "--runs", "1", "--threads", "1"])
    text = capsys.readouterr().out
    assert "imports " in text and "model load " in text and "nearest rank" in text
    monkeypatch.setattr(benchmark, "_images", lambda folder, n: bench_app_images(2))
    assert benchmark.main(["--model", str(tiny_model_path), "--runs", "2", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    keys = list(report)
    assert keys.index("model_load_seconds") == keys.index("import_seconds") + 1
    assert report["cold_start_seconds (imports + model load)"] == pytest.approx(
        report["import_seconds"] + report["model_load_seconds"], abs=0.02)
    assert "nearest rank" in report["p95_rule"]


def bench_app_images(n: int):
    """A few small drawn cells (the benchmark's own 64 random images would slow the test)."""
    from tests.conftest import draw_cell

    return [draw_cell(64, seed=i) for i in range(n)]
