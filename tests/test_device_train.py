"""training.device_train: variants side by side, the hopeless one stopped, the best packed."""
import json
import subprocess
import sys
import tarfile

from core.settings import PROJECT_ROOT
from tests.conftest import write_class_tree
from tests.test_training import ENV
from training import device_train


def test_projection_waits_for_two_measured_epochs_and_skips_the_first():
    assert device_train.projected_end([{"seconds": 9.0}] * 2, 10, now=5.0) is None
    done = [{"seconds": 30.0}, {"seconds": 2.0}, {"seconds": 4.0}]
    assert device_train.projected_end(done, 10, now=5.0) == 5.0 + 7 * 3.0 + device_train.EXPORT_SECONDS
    # after a stop, only the epochs from `since` on count
    done = [{"seconds": 30.0}, {"seconds": 9.0}, {"seconds": 9.0}, {"seconds": 6.0}, {"seconds": 4.0}, {"seconds": 4.0}]
    assert device_train.projected_end(done, 10, now=5.0, since=4) == 5.0 + 4 * 4.0 + device_train.EXPORT_SECONDS
    assert device_train.projected_end(done, 10, now=5.0, since=5) is None
    assert device_train.requested_epochs(["--epochs", "4", "--seed", "1", "--epochs", "6"]) == 6
    assert device_train.requested_epochs([]) == 12


def test_a_plan_runs_side_by_side_stops_what_cannot_finish_and_packs_the_best(tmp_path):
    tree = write_class_tree(tmp_path / "cells", {"neutrophil": 8, "lymphocyte": 8})
    common = ["--data", str(tree), "--val", str(tree), "--config", "tiny-test", "--batch-size", "8",
              "--val-every", "1000", "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"common": common, "variants": {"short": ["--epochs", "2"],
                                                               "endless": ["--epochs", "100000"]}}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "training.device_train", "--plan", str(plan), "--out", str(out),
                           "--deadline", "240", "--poll", "1"], capture_output=True, text=True, cwd=PROJECT_ROOT,
                          env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {row["variant"]: row for row in json.loads((out / "summary.json").read_text())["variants"]}
    assert rows["short"]["exported"] and rows["short"]["rank"] == 1 and len(rows["short"]["val"]) == 1
    assert rows["short"]["score"] is not None
    assert not rows["endless"]["exported"] and rows["endless"]["end"].startswith("stopped")
    with tarfile.open(out / "best.tar") as tar:
        assert {"short/model.safetensors", "short/model.json", "short/metrics.jsonl"} <= set(tar.getnames())


def test_a_bad_plan_or_a_used_out_folder_is_one_line(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    for bad in ({"variants": {}}, {"common": [], "variants": {"a": ["--epochs", 40]}}, []):
        plan.write_text(json.dumps(bad))
        assert device_train.main(["--plan", str(plan), "--out", str(tmp_path / "o"), "--deadline", "10"]) == 2
        assert "expected" in capsys.readouterr().err
    plan.write_text(json.dumps({"common": [], "variants": {"a": ["--epochs", "1"]}}))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "best.tar.part00").write_bytes(b"old")
    assert device_train.main(["--plan", str(plan), "--out", str(tmp_path / "used"), "--deadline", "10"]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_a_line_being_written_is_not_read_as_an_epoch(tmp_path):
    from training.checkpointing import read_metrics

    assert read_metrics(tmp_path) == []  # before the first epoch
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "seconds": 2.0}\n{"epoch": 2, "seco')
    assert read_metrics(tmp_path) == [{"epoch": 1, "seconds": 2.0}]
