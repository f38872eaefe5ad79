"""The temperature that grows with the out-of-scope score (core.reliability.image_temperatures):
fitted from home val alone, applied by describe, refitted on a shipped model without touching
its weights (training.calibrate --keep-centroids)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.checkpoint import file_sha256, load_bundle, save_bundle
from core.reliability import image_temperatures, panel_probabilities
from tests.conftest import make_tiny_bundle, write_class_tree
from training import calibrate
from training.calibration_fit import fit_distance_temperature


def test_image_temperatures_grow_above_the_reference_only():
    fit = {"temperature": 0.5, "distance_slope": 0.1, "distance_reference": 4.0}
    temperatures = image_temperatures(fit, torch.tensor([1.0, 4.0, 14.0, math.inf, math.nan]))
    assert torch.allclose(temperatures, torch.tensor([0.5, 0.5, 1.0, 0.5, 0.5]))
    assert torch.equal(image_temperatures({"temperature": 0.8}, torch.tensor([1.0, 50.0])), torch.tensor([0.8, 0.8]))
    for damaged in ({"distance_slope": -0.5}, {"distance_slope": math.nan}, {"distance_reference": math.nan}):
        fit = {"temperature": 0.8, "distance_slope": 0.1, "distance_reference": 4.0, **damaged}
        assert torch.equal(image_temperatures(fit, torch.tensor([1.0, 50.0])), torch.tensor([0.8, 0.8]))


def _cases(overconfident_far: bool, n: int = 2000):
    """Four-class logits of one sharpness: near cells (score 1-5) are right 95 % of the time; far
    cells (score 10-20) too, or, when `overconfident_far`, only 50 %."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (n,), generator=generator)
    far = torch.arange(n) % 2 == 1
    scores = torch.where(far, 10 + 10 * torch.rand(n, generator=generator), 1 + 4 * torch.rand(n, generator=generator))
    right_share = torch.where(far & overconfident_far, 0.5, 0.95)
    right = torch.rand(n, generator=generator) < right_share
    shown = torch.where(right, labels, (labels + 1 + torch.randint(0, 3, (n,), generator=generator)) % 4)
    logits = torch.zeros(n, 4)
    logits[torch.arange(n), shown] = 4.0
    return logits, labels, scores


def test_the_fit_finds_a_slope_only_where_far_cells_are_overconfident():
    logits, labels, scores = _cases(overconfident_far=True)
    temperature, slope = fit_distance_temperature(logits, labels, scores, reference=float(scores.median()))
    assert slope > 0
    calibrated = {"temperature": temperature, "distance_slope": slope, "distance_reference": float(scores.median())}
    confidence = torch.softmax(logits / image_temperatures(calibrated, scores)[:, None], -1).max(-1).values
    far = scores > 10
    assert confidence[far].mean() < confidence[~far].mean() - 0.2  # far answers are no longer as sure
    _, slope = fit_distance_temperature(*_cases(overconfident_far=False), reference=5.0)
    assert slope == 0.0


def test_describe_softens_an_image_far_from_every_training_cell():
    bundle = make_tiny_bundle()
    keys = bundle.panels["blood_cells"].keys
    near = bundle.centroids[keys[0]]
    far = F.normalize(-near, dim=-1)  # cosine distance 2 from that centroid
    bundle.sidecar["calibration"] = {"panels": {"blood_cells": {"temperature": 1.0, "degenerate": False}}}
    constant = [max(panel_probabilities(bundle, e, "blood_cells")) for e in (near, far)]
    bundle.sidecar["calibration"]["panels"]["blood_cells"].update(distance_slope=5.0, distance_reference=0.0)
    grown = [max(panel_probabilities(bundle, e, "blood_cells")) for e in (near, far)]
    assert grown[1] < constant[1]  # the far image: flatter
    assert grown[0] >= grown[1]


def test_keep_centroids_refits_the_sidecar_and_leaves_the_weights_alone(tmp_path, capsys):
    model = tmp_path / "model.safetensors"
    save_bundle(make_tiny_bundle(), model)
    keys = list(make_tiny_bundle().panels["blood_cells"].keys)
    val = write_class_tree(tmp_path / "val", {k: 4 for k in keys}, size=48)
    before = file_sha256(model)
    assert calibrate.main(["--checkpoint", str(model), "--keep-centroids", "--val", str(val),
                           "--cache-dir", str(tmp_path / "cache")]) == 0
    assert file_sha256(model) == before
    fit = load_bundle(model).sidecar["calibration"]["panels"]["blood_cells"]  # loads: the sha256 still matches
    assert {"temperature", "distance_slope", "distance_reference", "min_confidence"} <= set(fit)
    assert "ece_constant_temperature" in fit["report"]
    recalibrated = load_bundle(model)
    assert "--keep-centroids" in recalibrated.sidecar["calibration"]["command"]
    assert make_tiny_bundle().calibration_id is None and len(recalibrated.calibration_id) == 12
    changed = load_bundle(model)
    changed.sidecar["calibration"]["panels"]["blood_cells"]["temperature"] += 0.1
    assert changed.calibration_id != recalibrated.calibration_id  # stored answers can tell them apart
    rerun = load_bundle(model)
    rerun.sidecar["calibration"].update(command="python -m training.calibrate --cache-dir elsewhere", method="m")
    rerun.sidecar["calibration"]["panels"]["blood_cells"]["report"] = {"ece_after": 0.5}
    assert rerun.calibration_id == recalibrated.calibration_id  # same numbers, same id
    capsys.readouterr()
    for centroids in ([], ["--train", str(val), "--keep-centroids"]):  # neither, or both
        with pytest.raises(SystemExit) as stop:
            calibrate.main(["--checkpoint", str(model), "--val", str(val), *centroids])
        assert stop.value.code == 2 and "--keep-centroids" in capsys.readouterr().err
    other_panel = make_tiny_bundle()
    other_panel.centroids = {k: v for k, v in other_panel.centroids.items() if k not in keys}
    save_bundle(other_panel, model)
    before = file_sha256(model), model.with_suffix(".json").read_text()
    assert calibrate.main(["--checkpoint", str(model), "--keep-centroids", "--val", str(val)]) == 2
    assert "stored centroids hold no class of panel blood_cells" in capsys.readouterr().err
    assert (file_sha256(model), model.with_suffix(".json").read_text()) == before  # nothing written
    bare = make_tiny_bundle()
    bare.centroids = {}
    save_bundle(bare, model)
    assert calibrate.main(["--checkpoint", str(model), "--keep-centroids", "--val", str(val)]) == 2
    assert "stores no class centroids" in capsys.readouterr().err
