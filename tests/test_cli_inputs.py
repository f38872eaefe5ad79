"""Bad input to the training and measuring commands: one line and a non-zero exit, never a
traceback, and nothing stored lost (runs, GANs, other panels' calibrations)."""
from __future__ import annotations

import json
import shutil

import pytest

from core.checkpoint import ModelLoadError, load_bundle, save_bundle, sidecar_path
from tests.conftest import make_tiny_bundle, write_class_tree
from training import calibrate, cli


def _one_line_exit(capsys, main, status: int = 2) -> str:
    """`cli.run_main(main)` exits with `status` and one error line on stderr (progress bars aside),
    no traceback; the line."""
    assert cli.run_main(main) == status
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("kind, text", [(cli.positive_int, "0"), (cli.positive_int, "-1"), (cli.positive_int, "x"),
                                        (cli.non_negative_int, "-1"), (cli.positive_float, "nan"),
                                        (cli.positive_float, "-1e-3"), (cli.share, "2"), (cli.share, "0"),
                                        (cli.decay, "5"), (cli.decay, "1")])
def test_impossible_numbers_are_refused_at_parse_time(kind, text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        kind(text)


def test_possible_numbers_pass():
    assert (cli.positive_int("3"), cli.non_negative_int("0"), cli.share("1"), cli.decay("0")) == (3, 0, 1.0, 0.0)


def test_run_main_turns_failures_into_one_line(capsys, monkeypatch):
    def missing():
        open("/nonexistent/file.csv")

    assert "No such file" in _one_line_exit(capsys, missing, 2)

    def bug():
        raise ZeroDivisionError("division by zero")

    assert "a bug" in _one_line_exit(capsys, bug, 1)
    monkeypatch.setenv(cli.DEBUG_VARIABLE, "1")
    with pytest.raises(ZeroDivisionError):
        cli.run_main(bug)


@pytest.mark.parametrize("sidecar, expected", [([], "JSON object"), ({"panels": {}}, "'config'"),
                                               ({"panels": "x"}, "'panels'")])
def test_a_malformed_sidecar_is_a_load_error(tmp_path, sidecar, expected):
    model = tmp_path / "model.safetensors"
    save_bundle(make_tiny_bundle(), model)
    good = json.loads(sidecar_path(model).read_text())
    if isinstance(sidecar, dict):
        sidecar = {**good, **sidecar}
        if "config" not in sidecar or expected == "'config'":
            sidecar.pop("config")
    sidecar_path(model).write_text(json.dumps(sidecar))
    with pytest.raises(ModelLoadError, match=expected):
        load_bundle(model)


def _calibrated_on_both_panels(tmp_path):
    """(model, the blood_cells val folder, cache arguments) of a tiny model calibrated on both panels."""
    model = tmp_path / "model.safetensors"
    save_bundle(make_tiny_bundle(), model)
    blood = write_class_tree(tmp_path / "blood", {"neutrophil": 3, "basophil": 3}, size=48)
    b_all = write_class_tree(tmp_path / "b_all", {"pre_b": 3, "benign": 3}, size=48)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert calibrate.main(["--checkpoint", str(model), "--train", str(blood), str(b_all),
                           "--val", str(blood), str(b_all), *cache]) == 0
    return model, blood, cache


def test_calibrating_one_panel_keeps_the_others(tmp_path, capsys):
    """--val of one panel replaced the whole calibration: b_all became uncalibrated unnoticed."""
    model, blood, cache = _calibrated_on_both_panels(tmp_path)
    before = load_bundle(model).sidecar["calibration"]["panels"]["b_all"]
    assert calibrate.main(["--checkpoint", str(model), "--keep-centroids", "--val", str(blood), *cache]) == 0
    assert "panel b_all has no --val folder here; its earlier calibration is kept" in capsys.readouterr().err
    assert load_bundle(model).sidecar["calibration"]["panels"]["b_all"] == before
    # new centroids would invalidate b_all's thresholds: refused, nothing written
    sidecar = load_bundle(model).sidecar
    assert calibrate.main(["--checkpoint", str(model), "--train", str(blood), "--val", str(blood), *cache]) == 2
    assert "b_all" in capsys.readouterr().err and load_bundle(model).sidecar == sidecar


def test_training_refuses_an_empty_val_folder_and_a_damaged_csv(tmp_path, capsys):
    from training import train

    data = write_class_tree(tmp_path / "data", {"neutrophil": 4, "basophil": 4}, size=40)
    empty = tmp_path / "empty"
    (empty / "neutrophil").mkdir(parents=True)
    common = ["--data", str(data), "--config", "tiny-test", "--batch-size", "4", "--epochs", "1",
              "--cache-dir", str(tmp_path / "cache")]
    assert train.main([*common, "--val", str(empty), "--out", str(tmp_path / "a")]) == 2
    assert "no images of the trained classes" in capsys.readouterr().err
    latin = tmp_path / "attributes.csv"
    latin.write_bytes("path,cell_size\nneutrophil/caf\xe9.png,big\n".encode("latin-1"))
    err = _one_line_exit(capsys, lambda: train.main([*common, "--attributes", str(latin),
                                                     "--out", str(tmp_path / "b")]))
    assert "attributes.csv: not a UTF-8 text file" in err
    with pytest.raises(SystemExit):  # argparse: usage and status 2
        train.main([*common, "--epochs", "0", "--out", str(tmp_path / "c")])


def test_a_damaged_training_image_is_named(tmp_path, capsys):
    from training import train

    data = write_class_tree(tmp_path / "data", {"neutrophil": 4, "basophil": 4}, size=40)
    damaged = data / "basophil" / "damaged.png"
    shutil.copy(next((data / "basophil").glob("*.png")), damaged)
    damaged.write_bytes(damaged.read_bytes()[:60])  # the header survives, the pixels do not
    argv = ["--data", str(data), "--config", "tiny-test", "--batch-size", "4", "--epochs", "1",
            "--out", str(tmp_path / "run"), "--cache-dir", ""]
    err = _one_line_exit(capsys, lambda: train.main(argv))
    assert "damaged.png: cannot be decoded" in err


def test_benchmark_and_evaluate_refuse_what_they_cannot_measure(tmp_path, capsys):
    from training import benchmark, evaluate

    model = tmp_path / "model.safetensors"
    save_bundle(make_tiny_bundle(), model)
    (tmp_path / "empty" / "neutrophil").mkdir(parents=True)
    err = _one_line_exit(capsys, lambda: benchmark.main(["--model", str(model), "--images", str(tmp_path / "empty"),
                                                         "--runs", "1"]))
    assert "no loadable image" in err
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(model), "--data", str(tmp_path / "empty"), "--record", ""])


def test_an_export_path_that_cannot_be_written_is_refused_before_training(tmp_path, capsys):
    from training import train

    data = write_class_tree(tmp_path / "data", {"neutrophil": 4, "basophil": 4}, size=40)
    (tmp_path / "afile.txt").write_text("x")
    common = ["--data", str(data), "--config", "tiny-test", "--batch-size", "4", "--epochs", "1",
              "--out", str(tmp_path / "run"), "--cache-dir", ""]
    for export, expected in ((tmp_path / "afile.txt" / "m.safetensors", "is a file"), (tmp_path, "a folder")):
        assert train.main([*common, "--export", str(export)]) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_resume_and_overwrite_exclude_each_other_and_overwrite_starts_clean(tmp_path):
    from training import train, train_gan

    with pytest.raises(SystemExit):  # argparse: one or the other
        train.parse_args(["--data", "x", "--resume", "--overwrite"])
    data = write_class_tree(tmp_path / "data", {"basophil": 5, "lymphocyte": 5}, size=40)
    run = tmp_path / "gan"
    common = ["--data", str(data), "--out", str(run), "--size", "32", "--batch-size", "4", "--g-channels", "8",
              "--d-channels", "8", "--cache-dir", "", "--log-every", "1", "--checkpoint-every", "2"]
    assert train_gan.main([*common, "--steps", "2"]) == 0
    assert train_gan.main([*common, "--steps", "1", "--overwrite"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1] and json.loads((run / "gan.json").read_text())["step"] == 1


def test_a_kept_panel_needs_the_seed_and_targets_it_was_fitted_with(tmp_path, capsys):
    model, blood, cache = _calibrated_on_both_panels(tmp_path)
    sidecar = load_bundle(model).sidecar
    assert calibrate.main(["--checkpoint", str(model), "--keep-centroids", "--val", str(blood), "--seed", "3",
                           *cache]) == 2
    assert "--seed" in capsys.readouterr().err and load_bundle(model).sidecar == sidecar


def test_record_names_are_checked_and_a_replacement_is_said(tmp_path, capsys):
    from training import evaluate

    with pytest.raises(SystemExit):
        evaluate.parse_args(["--checkpoint", "m", "--data", "d", "--record", "pbc.val"])
    model = tmp_path / "model.safetensors"
    save_bundle(make_tiny_bundle(), model)
    for _ in range(2):
        evaluate.record_in_sidecar(str(model), "pbc_val", {"n": 4, "accuracy": 0.5}, "cmd")
    assert "metrics.pbc_val recorded earlier (n=4, accuracy 0.5) is replaced" in capsys.readouterr().err


def test_resuming_a_run_does_not_need_its_init_from_file_any_more(tmp_path):
    """A run continued from its own checkpoint reads that checkpoint's weights, not --init-from's:
    the file it started from may since have been replaced (the default model is)."""
    from argparse import Namespace

    from training.run_inputs import UsageError, check_paths

    data = write_class_tree(tmp_path / "data", {"neutrophil": 1}, size=32)
    args = Namespace(data=[str(data)], val=[], synthetic=[], attributes=[], export="", sentence_features="",
                     init_from=str(tmp_path / "gone.safetensors"), out=str(tmp_path / "run"), resume=True,
                     overwrite=False)
    with pytest.raises(UsageError, match="--init-from"):
        check_paths(args)  # nothing to resume yet: the starting weights are needed
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"checkpoint")
    check_paths(args)
    with pytest.raises(UsageError, match="--init-from"):
        check_paths(Namespace(**{**vars(args), "resume": False, "overwrite": True}))
