import math

import torch

from core.describe import describe
from core.reliability import (confidence_threshold_for_accuracy, expected_calibration_error, fit_temperature,
                              out_of_scope_score)
from tests.conftest import draw_cell, make_tiny_bundle


def test_ece_zero_when_confidence_matches_accuracy_and_large_when_overconfident():
    conf = torch.full((100,), 0.8)
    correct = torch.tensor([1] * 80 + [0] * 20)
    assert expected_calibration_error(conf, correct) < 1e-6
    assert expected_calibration_error(torch.full((100,), 0.99), correct) > 0.15


def test_fit_temperature_softens_overconfident_logits():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (400,))
    logits = torch.randn(400, 4) * 0.5
    logits[torch.arange(400), labels] += 1.0
    logits *= 8  # far too sharp for 70% accuracy
    temperature = fit_temperature(logits, labels)
    assert temperature > 2
    before = expected_calibration_error(torch.softmax(logits, -1).max(-1).values, logits.argmax(-1) == labels)
    after = expected_calibration_error(torch.softmax(logits / temperature, -1).max(-1).values, logits.argmax(-1) == labels)
    assert after < before


def test_confidence_threshold_reaches_target_or_keeps_coverage():
    conf = torch.linspace(1, 0, 100)
    correct = torch.tensor([1] * 90 + [0] * 10)  # the 10 least confident are wrong
    threshold = confidence_threshold_for_accuracy(conf, correct, 0.99, 0.5)
    answered = conf >= threshold
    assert correct[answered].float().mean() >= 0.99 and answered.float().mean() >= 0.9
    # an impossible target: coverage wins
    threshold = confidence_threshold_for_accuracy(conf, torch.zeros(100), 0.99, 0.8)
    assert (conf >= threshold).float().mean() >= 0.8


def test_out_of_scope_score_uses_panel_centroids_only():
    sims = {"neutrophil": 0.9, "pro_b": 0.99}
    assert math.isclose(out_of_scope_score(sims, ["neutrophil", "lymphocyte"]), 0.1, abs_tol=1e-9)
    assert out_of_scope_score(sims, ["aml"]) == math.inf


def test_abstains_with_reasons():
    bundle = make_tiny_bundle()
    image = draw_cell()
    assert describe(bundle, image, "leukemia").abstained  # not validated, always
    bundle.sidecar["calibration"] = {"panels": {"blood_cells": {"out_of_scope_threshold": -1.0}}}
    result = describe(bundle, image, "blood_cells")
    assert result.abstained and result.class_key is None and result.sentence is None
    assert "panel" in result.abstain_reason or "does not look like" in result.abstain_reason
    bundle.sidecar["calibration"] = {"panels": {"blood_cells": {"min_confidence": 1.01}}}
    result = describe(bundle, image, "blood_cells")
    assert result.abstained and "too weak" in result.abstain_reason
    bundle.sidecar["calibration"] = {"panels": {"blood_cells": {"min_confidence": 0.0, "temperature": 1.0}}}
    assert not describe(bundle, image, "blood_cells").abstained
