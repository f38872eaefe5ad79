"""The atypical-answer band (core.typicality) and the command that adds it to a calibrated model."""
from __future__ import annotations

import json

import pytest
import torch

from core.typicality import atypical_note, fit_typicality, is_atypical, typicality_band
from tests.conftest import BAND, make_tiny_bundle, save_calibrated_tiny, write_class_tree



def test_band_is_fitted_on_one_half_and_measured_on_the_other():
    n = 1000
    scores = torch.arange(n, dtype=torch.float32)  # the score rises with the index ...
    correct = scores < 900  # ... and every error lies in the top tenth
    answered = torch.ones(n, dtype=torch.bool)
    answered[::50] = False  # abstentions neither fit nor count
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    band = fit_typicality(scores, correct, answered, order[:500], order[500:])
    assert 860 < band["threshold"] < 940  # about the 90th percentile of the fit half's answered scores
    assert band["accuracy_below"] > 0.97 and band["accuracy_above"] < 0.3
    held_answered = int(answered[order[500:]].sum())
    assert band["n_held_out_above"] + band["n_held_out_below"] == held_answered


def test_no_band_from_too_few_answers():
    generator = torch.Generator().manual_seed(0)
    scores, correct = torch.rand(400, generator=generator), torch.ones(400, dtype=torch.bool)
    answered = torch.ones(400, dtype=torch.bool)
    order = torch.randperm(400, generator=generator)
    assert fit_typicality(scores, correct, answered, order[:200], order[200:]) is not None
    assert fit_typicality(scores, correct, answered, order[:19], order[200:]) is None  # 19 fit answers: < 20
    assert fit_typicality(scores, correct, answered, order[:200], order[200:240]) is None  # ~4 held out above


def test_atypical_only_for_answers_above_a_fitted_band():
    assert is_atypical(9.0, False, BAND) is True and is_atypical(7.0, False, BAND) is False
    assert is_atypical(9.0, True, BAND) is None  # an abstention has no answer to qualify
    assert is_atypical(9.0, False, None) is None
    sidecar = {"calibration": {"panels": {"blood_cells": {"typicality": BAND}, "b_all": {"typicality": BAND,
                                                                                          "degenerate": True}}}}
    assert typicality_band(sidecar, "blood_cells") == BAND
    assert typicality_band(sidecar, "b_all") is None and typicality_band({}, "blood_cells") is None
    note = atypical_note(BAND)
    assert note.startswith("Less typical than 9 in 10 of the training lab's cells the model answers.")
    assert "right 94% of the time (90 of 96), against 98% for the more typical ones" in note


def test_typicality_command_adds_the_band_and_leaves_the_weights(tmp_path, capsys):
    from core.checkpoint import load_bundle
    from training.typicality import main

    path = save_calibrated_tiny(tmp_path / "tiny.safetensors")
    weights = path.read_bytes()
    keys = make_tiny_bundle().panels["blood_cells"].keys
    val = write_class_tree(tmp_path / "val", {k: 30 for k in keys}, size=40)
    assert main(["--checkpoint", str(path), "--val", str(val)]) == 0
    band = load_bundle(path).sidecar["calibration"]["panels"]["blood_cells"]["typicality"]
    assert band["n_held_out_above"] + band["n_held_out_below"] == 120  # every held-out image answered
    assert path.read_bytes() == weights and json.loads(capsys.readouterr().out.split(" ", 1)[1]) == band


def test_typicality_command_uses_the_calibration_seed_and_refuses_another(tmp_path, capsys):
    from core.checkpoint import load_bundle
    from training.typicality import main

    keys = make_tiny_bundle().panels["blood_cells"].keys
    val = write_class_tree(tmp_path / "val", {k: 30 for k in keys}, size=40)
    bands = []
    for seed in (0, 5):
        path = save_calibrated_tiny(tmp_path / str(seed) / "tiny.safetensors", seed=seed)
        assert main(["--checkpoint", str(path), "--val", str(val)]) == 0  # the recorded seed's halves
        bands.append(load_bundle(path).sidecar["calibration"]["panels"]["blood_cells"]["typicality"])
    assert bands[0] != bands[1]
    sidecar = path.with_suffix(".json").read_text()
    assert main(["--checkpoint", str(path), "--val", str(val), "--seed", "0"]) == 2
    assert "calibrated with seed 5" in capsys.readouterr().err and path.with_suffix(".json").read_text() == sidecar


def test_typicality_command_refuses_an_uncalibrated_panel(tmp_path, capsys):
    from core.checkpoint import update_sidecar
    from training.typicality import main

    path = save_calibrated_tiny(tmp_path / "tiny.safetensors")
    update_sidecar(path, {"calibration": {}})  # as exported by training, before training.calibrate
    sidecar = path.with_suffix(".json").read_text()
    keys = make_tiny_bundle().panels["blood_cells"].keys
    val = write_class_tree(tmp_path / "val", {k: 3 for k in keys}, size=40)
    assert main(["--checkpoint", str(path), "--val", str(val)]) == 2
    assert "no fitted, non-degenerate calibration" in capsys.readouterr().err
    assert path.with_suffix(".json").read_text() == sidecar  # nothing written


@pytest.mark.parametrize("threshold, flagged", [(-1e9, True), (1e9, False)])
def test_describe_cli_marks_atypical_answers(tmp_path, capsys, threshold, flagged):
    from core.describe import main
    from tests.conftest import draw_cell

    path = save_calibrated_tiny(tmp_path / "tiny.safetensors", band_threshold=threshold)
    draw_cell(64).save(tmp_path / "cell.png")
    assert main([str(tmp_path / "cell.png"), "--model", str(path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert not record["abstained"] and record["atypical"] is flagged
    assert record["atypical_accuracy"] == (0.9375 if flagged else None)
    assert main([str(tmp_path / "cell.png"), "--model", str(path)]) == 0
    assert ("ATYPICAL image: answers like it were right 94%" in capsys.readouterr().out) == flagged
