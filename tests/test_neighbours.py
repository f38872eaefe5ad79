"""The neighbour check (core.neighbours): votes, storage in the weights file, abstention, calibration."""
import torch
import torch.nn.functional as F

from core.checkpoint import load_bundle, save_bundle
from core.describe import describe, embed_images
from core.neighbours import NeighbourVote, ReferenceIndex
from tests.conftest import draw_cell, make_tiny_bundle, tiny_calibration_inputs
from training import calibrate


def _unit(*values):
    return F.normalize(torch.tensor(values, dtype=torch.float32), dim=-1)


def test_votes_count_the_classes_of_the_nearest_reference_cells():
    references = {"a": torch.stack([_unit(1.0, 0.0), _unit(0.9, 0.1), _unit(0.8, 0.2)]),
                  "b": torch.stack([_unit(0.0, 1.0), _unit(0.1, 0.9)]),
                  "c": torch.stack([_unit(-1.0, 0.0)])}
    index = ReferenceIndex(references, ["a", "b"])  # the panel's classes only: c is never a neighbour
    assert len(index) == 5
    near_a, near_b = index.votes(torch.stack([_unit(1.0, 0.05), _unit(0.05, 1.0)]), 3)
    assert near_a == NeighbourVote(3, {"a": 3}) and near_b.counts == {"b": 2, "a": 1}
    assert near_b.share("b") == 2 / 3 and near_b.agreeing("c") == 0
    assert index.votes(_unit(0.0, 1.0)[None], 50)[0].k == 5  # K is cut to the references there are
    assert index.agreement(torch.stack([_unit(1.0, 0.0)]), ["b"], 3).tolist() == [0.0]
    assert len(ReferenceIndex(references, ["x"])) == 0 and ReferenceIndex({}, ["a"]).votes(_unit(1.0, 0.0)[None], 3)[0].k == 0


def test_reference_cells_survive_a_save_and_load_in_half_precision(tmp_path):
    bundle = make_tiny_bundle()
    dim = bundle.model.config.embed_dim
    references = {"neutrophil": F.normalize(torch.randn(7, dim), dim=-1),
                  "lymphocyte": F.normalize(torch.randn(3, dim), dim=-1)}
    bundle.set_references(references)
    save_bundle(bundle, tmp_path / "m.safetensors")
    loaded = load_bundle(tmp_path / "m.safetensors")  # the sha256 check covers them too
    assert set(loaded.references) == set(references)
    assert all(loaded.references[k].dtype == torch.float32 for k in references)
    assert torch.allclose(loaded.references["neutrophil"], references["neutrophil"], atol=1e-3)
    assert len(loaded.reference_index("blood_cells")) == 10 and len(loaded.reference_index("b_all")) == 0


def _calibrated_with_references(label_of_every_reference: str, min_agreement=0.9):
    bundle = make_tiny_bundle()
    image = draw_cell(size=96)
    embedding = embed_images(bundle, [image])[0][0]
    # 30 reference cells right around the image, all of one class: its 25 nearest are that class
    near = F.normalize(embedding[None] + 0.01 * torch.randn(30, embedding.shape[0]), dim=-1)
    bundle.set_references({label_of_every_reference: near})
    bundle.sidecar["calibration"] = {"panels": {"blood_cells": {
        "min_confidence": 0.0, "temperature": 1.0, "neighbours": 25, "min_agreement": min_agreement}}}
    return bundle, image


def test_an_answer_its_nearest_training_cells_disagree_with_abstains_and_says_so():
    bundle, image = _calibrated_with_references("lymphocyte")
    best = describe(bundle, image, "blood_cells").best_class
    other = "platelet" if best == "lymphocyte" else "lymphocyte"
    bundle, image = _calibrated_with_references(other)
    result = describe(bundle, image, "blood_cells")
    assert result.abstained and result.abstain_kind == "neighbours" and result.class_key is None
    assert result.neighbours == {"k": 25, "counts": {other: 25}}
    name = bundle.panels["blood_cells"].cell_class(other).name
    assert "only 0 of the 25 most similar training cells" in result.abstain_reason
    assert f"at least 23 needed). The others are {name} (25)." in result.abstain_reason
    # a weak match whose neighbours disagree too says both, the confidence check first
    bundle.sidecar["calibration"]["panels"]["blood_cells"]["min_confidence"] = 1.01
    weak = describe(bundle, image, "blood_cells")
    assert weak.abstain_kind == "weak" and "too weak" in weak.abstain_reason
    assert "Also: the best match is" in weak.abstain_reason and f"The others are {name} (25)." in weak.abstain_reason
    # the same image, its neighbours of the class it matches: answered, with the vote
    bundle, image = _calibrated_with_references(best)
    answered = describe(bundle, image, "blood_cells")
    assert not answered.abstained and answered.class_key == best and answered.neighbours["counts"] == {best: 25}
    # a calibration without min_agreement, or with a damaged one, reports the vote and checks nothing
    for damaged in (None, float("nan"), 2, True, "0.9"):
        bundle, image = _calibrated_with_references(other, damaged)
        if damaged is None:
            del bundle.sidecar["calibration"]["panels"]["blood_cells"]["min_agreement"]
        assert not describe(bundle, image, "blood_cells").abstained


def test_min_agreement_enters_the_calibration_id_only_where_it_is_stored():
    bundle, _ = _calibrated_with_references("lymphocyte")
    with_check = bundle.calibration_id
    fit = bundle.sidecar["calibration"]["panels"]["blood_cells"]
    fit["min_agreement"] = 0.8
    assert bundle.calibration_id != with_check
    del fit["min_agreement"], fit["neighbours"]
    plain = make_tiny_bundle()
    plain.sidecar["calibration"] = {"panels": {"blood_cells": {"min_confidence": 0.0, "temperature": 1.0}}}
    assert bundle.calibration_id == plain.calibration_id  # earlier calibrations keep their ids


def test_calibrate_keeps_every_training_image_as_a_reference_cell_unless_told_not_to(tmp_path, capsys):
    model, train, val = tiny_calibration_inputs(tmp_path, 3, 4)
    keys = list(make_tiny_bundle().panels["blood_cells"].keys)
    common = ["--checkpoint", str(model), "--val", str(val), "--cache-dir", str(tmp_path / "cache")]
    assert calibrate.main([*common, "--train", str(train), "--neighbours", "5", "--min-agreement", "0.6"]) == 0
    bundle = load_bundle(model)
    assert {k: len(v) for k, v in bundle.references.items()} == {k: 3 for k in keys}
    fit = bundle.sidecar["calibration"]["panels"]["blood_cells"]
    assert fit["neighbours"] == 5 and fit["min_agreement"] == 0.6
    assert 0 <= fit["report"]["neighbour_refusal_rate"] <= 1
    assert calibrate.main([*common, "--train", str(train), "--neighbours", "0"]) == 0
    bundle = load_bundle(model)
    assert bundle.references == {} and "min_agreement" not in bundle.sidecar["calibration"]["panels"]["blood_cells"]
    # stored centroids but no reference cells: the thresholds are refitted, the check is not, and it says so
    assert calibrate.main([*common, "--keep-centroids"]) == 0
    assert "no reference cells" in capsys.readouterr().err


def test_the_describe_page_shows_the_vote_with_the_answer():
    from ui.case_view import _agreeing
    from ui.widgets import neighbour_caption

    bundle, image = _calibrated_with_references("lymphocyte")
    result = describe(bundle, image, "blood_cells")
    panel = bundle.panels["blood_cells"]
    assert neighbour_caption(panel, result) == "Of the 25 most similar training cells: Lymphocyte 25."
    assert _agreeing(result) == ("25 of 25" if result.best_class == "lymphocyte" else "0 of 25")
    plain = describe(make_tiny_bundle(), image, "blood_cells")  # no reference cells: nothing to show
    assert plain.neighbours is None and neighbour_caption(panel, plain) is None and _agreeing(plain) == ""
