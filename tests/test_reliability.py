import math

import torch

from core.describe import describe, describe_batch
from core.reliability import out_of_scope_scores
from training.calibration_fit import confidence_threshold_for_accuracy, expected_calibration_error, fit_temperature
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
    # no coverage asked (a morphology phrase) and even the most confident answer is wrong: state nothing
    threshold = confidence_threshold_for_accuracy(conf, torch.tensor([0] + [1] * 99), 0.995, 0.0)
    assert threshold == float("inf") and not (conf >= threshold).any()


def _centroid_bundle(precision=None):
    from types import SimpleNamespace
    centroids = {"neutrophil": torch.tensor([1.0, 0.0]), "pro_b": torch.tensor([0.0, 1.0])}
    return SimpleNamespace(centroids=centroids, ood_precision=precision)


def test_out_of_scope_score_uses_panel_centroids_only():
    point = torch.tensor([[0.6, 0.8]])
    cosine = out_of_scope_scores(_centroid_bundle(), point, ["neutrophil", "lymphocyte"])
    assert math.isclose(float(cosine[0]), 0.4, abs_tol=1e-6)  # pro_b is nearer but in another panel
    assert float(out_of_scope_scores(_centroid_bundle(), point, ["aml"])[0]) == math.inf


def test_mahalanobis_score_weighs_directions_by_training_spread():
    # training cells vary a lot along x, hardly along y: a step in y is far more unusual
    precision = torch.diag(torch.tensor([1.0, 100.0]))
    bundle = _centroid_bundle(precision)
    along_x = torch.tensor([[1.5, 0.0]])
    along_y = torch.tensor([[1.0, 0.5]])
    x_score, y_score = (float(out_of_scope_scores(bundle, p, ["neutrophil"])[0]) for p in (along_x, along_y))
    assert math.isclose(x_score, 0.5, abs_tol=1e-6) and math.isclose(y_score, 5.0, abs_tol=1e-5)
    identity = out_of_scope_scores(_centroid_bundle(torch.eye(2)), along_y, ["neutrophil"])
    assert math.isclose(float(identity[0]), 0.5, abs_tol=1e-6)  # identity precision: Euclidean


def test_abstains_with_reasons():
    bundle = make_tiny_bundle()
    image = draw_cell()
    assert describe(bundle, image, "leukemia").abstain_kind == "not_validated"  # always
    bundle.sidecar["calibration"] = {"panels": {"blood_cells": {"out_of_scope_threshold": -1.0}}}
    result = describe(bundle, image, "blood_cells")
    assert result.abstained and result.class_key is None and result.sentence is None
    assert "panel" in result.abstain_reason or "does not look like" in result.abstain_reason
    assert result.abstain_kind == "out_of_scope"
    bundle.sidecar["calibration"] = {"panels": {"blood_cells": {"min_confidence": 1.01}}}
    result = describe(bundle, image, "blood_cells")
    assert result.abstained and "too weak" in result.abstain_reason and result.abstain_kind == "weak"
    names = [c.name for c in bundle.panels["blood_cells"].classes]
    assert any(f"{name} " in result.abstain_reason for name in names)  # display names, not keys like 'ig'
    bundle.sidecar["calibration"] = {"panels": {"blood_cells": {"min_confidence": 0.0, "temperature": 1.0}}}
    answered = describe(bundle, image, "blood_cells")
    assert not answered.abstained and answered.abstain_kind is None


def test_blank_and_noise_images_are_refused_before_the_model_answers(tiny_bundle):
    import numpy as np
    from PIL import Image

    from core.preprocess import to_model_input
    from core.reliability import content_problems

    rng = np.random.default_rng(0)
    blank = Image.new("RGB", (128, 128), (235, 205, 210))
    noise = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    problems = content_problems(to_model_input([blank, noise, draw_cell(size=128)], 64))
    assert "blank" in problems[0] and "noise" in problems[1] and problems[2] is None
    tiny_bundle.sidecar["calibration"] = {"panels": {"blood_cells": {"min_confidence": 0.0}}}
    results = [describe(tiny_bundle, image, "blood_cells") for image in (blank, noise)]
    assert all(r.abstained and r.class_key is None and r.out_of_scope_score == math.inf for r in results)
    assert "blank" in results[0].abstain_reason and "noise" in results[1].abstain_reason
    assert [r.abstain_kind for r in results] == ["content", "content"]


def test_a_long_narrow_strip_is_not_described_from_its_centre_square(tiny_bundle):
    """A cell squeezed into 16 x 1024 px was described from a 16 px centre square at 92 %
    (browser test, default model); past 3:1 the model says why it will not describe it."""
    from core.reliability import MAX_DESCRIBED_ASPECT, framing_problem

    cell = draw_cell(size=128)
    tiny_bundle.sidecar["calibration"] = {"panels": {"blood_cells": {"min_confidence": 0.0}}}
    strip, wide_field = cell.resize((16, 1024)), cell.resize((1920, 1080))
    results = describe_batch(tiny_bundle, [strip, wide_field, cell], "blood_cells")
    assert results[0].abstained and results[0].abstain_kind == "content" and results[0].class_key is None
    assert "64.0 times longer than wide: the model reads only its centre square, 2% of it" in results[0].abstain_reason
    assert "3.2 times longer" in framing_problem((320, 100))  # not "3 times": the limit is 3
    assert "Crop the image around one cell" in results[0].abstain_reason
    assert results[1].abstain_kind != "content" and results[2].abstain_kind != "content"  # 16:9 and square pass
    assert "3.04 times longer" in framing_problem((304, 100))  # never "3.0"
    # an exact 3:1 file downscaled by the loader (3000 x 1000 -> 1024 x 341) is still described
    assert [framing_problem(size) for size in [(300, 100), (1024, 341), (303, 100)]] == [None, None, None]
    assert MAX_DESCRIBED_ASPECT == 3.0


def test_another_panel_is_suggested_only_when_the_image_fits_it():
    from core.describe import embed_images

    bundle = make_tiny_bundle()
    image = draw_cell()
    embedding = embed_images(bundle, [image])[0][0]
    bundle.centroids = {key: -embedding for key in bundle.centroids}
    bundle.centroids["benign"] = embedding  # a B-ALL type is the nearest; the panel chosen is blood_cells
    plain = "This image does not look like the blood-cell images the model was trained on"
    for b_all_fit, hinted in (({}, False), ({"out_of_scope_threshold": 1e9}, True),
                              ({"out_of_scope_threshold": -1.0}, False)):
        bundle.sidecar["calibration"] = {"panels": {"blood_cells": {"out_of_scope_threshold": -1.0},
                                                    "b_all": b_all_fit}}
        reason = describe(bundle, image, "blood_cells").abstain_reason
        assert reason.startswith(plain) and "looks most like" not in reason
        assert ("It does fit the panel" in reason and "(nearest type: Benign (hematogones))" in reason) == hinted


def test_a_picture_without_stain_colour_is_refused_before_any_sentence(tiny_bundle):
    from PIL import Image, ImageDraw

    from core.describe import describe
    from core.preprocess import to_model_input
    from core.reliability import content_problems
    from core.stain import MIN_STAIN_SHARE, stain_share
    from tests.conftest import draw_cell

    document = Image.new("RGB", (200, 200), "white")
    for line in range(6):
        ImageDraw.Draw(document).text((10, 10 + 30 * line), "Patient report: CBC normal", fill="black")
    cell, grey = draw_cell(), draw_cell().convert("L").convert("RGB")
    shares = stain_share(to_model_input([cell, grey, document], 96)).tolist()
    assert shares[0] > 20 * MIN_STAIN_SHARE and shares[1] == 0 and shares[2] == 0
    problems = content_problems(to_model_input([cell, grey, document], 96))
    assert problems[0] is None and all(p.startswith("No stained cell is visible") for p in problems[1:])
    refused = describe(tiny_bundle, document, "b_all")
    assert refused.abstained and refused.abstain_kind == "content" and refused.class_key is None


def test_the_reliability_report_reads_class_folders_as_the_evaluation_does(tiny_bundle, tmp_path):
    import pytest

    from tests.conftest import write_class_tree
    from training.reliability_report import load_folder

    tree = write_class_tree(tmp_path / "val", {"Neutrophil": 2, "monocyte": 1})
    images, labels = load_folder(tiny_bundle, str(tree), "blood_cells")
    assert len(images) == 3 and sorted(labels) == ["monocyte", "neutrophil", "neutrophil"]
    write_class_tree(tree, {"pro_b": 1})  # a B-ALL class in the PBC val folder would count as wrong
    with pytest.raises(ValueError, match="pro_b are not classes of panel blood_cells"):
        load_folder(tiny_bundle, str(tree), "blood_cells")
