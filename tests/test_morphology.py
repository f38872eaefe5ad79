import csv
import json

import torch

from core.morphology import AttributePrediction, compose_sentence, predict_attributes
from core.panels import ATTRIBUTES_FILE, load_attribute_phrases
from tests.conftest import draw_cell, make_tiny_bundle
from training.attribute_eval import evaluate_attributes
from training.dataset import attribute_targets, read_attribute_table
from core.data import LabelledImage


def _pred(values, uncertain=()):
    phrases = load_attribute_phrases()
    return [AttributePrediction(k, v, phrases[k][v][0], 0.9, k not in uncertain) for k, v in values.items()]


def test_compose_eosinophil_like_sentence_and_uncertain_marks():
    sentence = compose_sentence(_pred({
        "cell_size": "big", "cell_shape": "round", "nucleus_shape": "segmented-bilobed", "chromatin_density": "densely",
        "nuclear_cytoplasmic_ratio": "low", "cytoplasm_texture": "clear", "cytoplasm_colour": "light blue",
        "granule_type": "round", "granule_colour": "red", "granularity": "yes", "cytoplasm_vacuole": "no"},
        uncertain=("granule_colour",)))
    assert sentence == ("Large round cell with a bilobed nucleus, dense chromatin and a low N:C ratio; "
                        "clear light-blue cytoplasm with round red (?) granules.")


def test_compose_agranular_vacuolated():
    sentence = compose_sentence(_pred({"cell_size": "big", "nucleus_shape": "unsegmented-indented",
                                       "cytoplasm_texture": "frosted", "cytoplasm_colour": "blue",
                                       "granule_type": "nil", "granule_colour": "nil", "cytoplasm_vacuole": "yes"}))
    assert sentence.startswith("Large cell with an indented nucleus;")
    assert sentence.endswith("; frosted blue cytoplasm without granules, with vacuoles.")  # not "without ... and vacuoles"
    granular = compose_sentence(_pred({"cytoplasm_texture": "clear", "cytoplasm_colour": "light blue",
                                       "granule_type": "small", "granule_colour": "pink", "cytoplasm_vacuole": "yes"}))
    assert granular.endswith("cytoplasm with small pink granules and vacuoles."), granular


def test_predict_attributes_covers_every_attribute_with_confidences():
    bundle = make_tiny_bundle()
    embedding = bundle.model.encode_image(torch.rand(1, 3, 32, 32))[0].detach()
    predictions = predict_attributes(bundle, embedding, min_confidence=0.5)
    assert {p.attribute for p in predictions} == set(load_attribute_phrases())
    assert all(0 < p.confidence <= 1 and p.certain == (p.confidence >= 0.5) for p in predictions)


def test_attribute_parsing_and_evaluation_on_a_tiny_csv(tmp_path):
    phrases = json.loads(ATTRIBUTES_FILE.read_text())
    columns = [k for k in phrases if not k.startswith("_")]
    rows = []
    for i in range(4):
        path = f"val/neutrophil/n{i}.png"
        (tmp_path / "val" / "neutrophil").mkdir(parents=True, exist_ok=True)
        draw_cell(seed=i).save(tmp_path / path)
        rows.append({"img_name": f"n{i}.png", "label": "Neutrophil", "path": path,
                     **{c: list(phrases[c])[i % len(phrases[c])] for c in columns}})
    rows[0]["cell_size"] = "gigantic"  # outside the vocabulary: ignored, not a crash
    csv_path = tmp_path / "attributes_val.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    vocabulary = {k: list(v) for k, v in load_attribute_phrases().items()}
    table = read_attribute_table([(csv_path, tmp_path)])
    items = [LabelledImage((tmp_path / r["path"]).resolve(), "neutrophil") for r in rows]
    targets = attribute_targets(items, table, vocabulary)
    assert targets.shape == (4, len(vocabulary)) and targets[0, 0] == -1 and targets[1, 0] == 1
    report = evaluate_attributes(make_tiny_bundle(), str(csv_path), str(tmp_path))
    assert report["n"] == 4 and set(report["per_attribute"]) == set(vocabulary)
    assert 0 <= report["mean_accuracy"] <= 1 and 0 <= report["mean_macro_f1"] <= 1
    for row in report["per_attribute"].values():
        assert 0 <= row["certain_share"] <= 1
        assert row["accuracy_certain"] is None if row["certain_share"] == 0 else 0 <= row["accuracy_certain"] <= 1


def test_calibrated_thresholds_decide_which_phrases_are_stated():
    bundle = make_tiny_bundle()
    bundle.sidecar["calibration"] = {"attributes": {"cell_size": 0.0, "cell_shape": None}}
    embedding = torch.nn.functional.normalize(torch.randn(bundle.model.config.embed_dim), dim=-1)
    predictions = {p.attribute: p for p in predict_attributes(bundle, embedding)}
    assert predictions["cell_size"].certain and not predictions["cell_shape"].certain  # None: never stated
    # an attribute without a calibrated threshold keeps the default 0.6
    assert predictions["granularity"].certain == (predictions["granularity"].confidence >= 0.6)


def test_describe_morphology_gives_a_sentence_for_an_image():
    from core.morphology import describe_morphology

    sentence, predictions = describe_morphology(make_tiny_bundle(), draw_cell())
    assert sentence.endswith(".") and "cell" in sentence and len(predictions) == len(load_attribute_phrases())


def test_stated_phrase_accuracy_reads_the_calibration_report():
    from core.morphology import stated_phrase_accuracy

    assert stated_phrase_accuracy({}) is None  # not calibrated: nothing claimed
    report = {"per_attribute": {"cell_size": {"accuracy_certain": 0.9}, "cell_shape": {"accuracy_certain": None},
                                "granularity": {"accuracy_certain": 1.0}}}
    assert abs(stated_phrase_accuracy({"calibration": {"attributes_report": report}}) - 0.95) < 1e-9


def test_colour_phrases_are_never_certain_on_an_image_without_colour():
    from core.morphology import COLOUR_ATTRIBUTES, describe_morphology, is_colourless

    bundle = make_tiny_bundle()
    bundle.sidecar["calibration"] = {"attributes": {name: 0.0 for name in load_attribute_phrases()}}  # all certain
    colour, grey = draw_cell(), draw_cell().convert("L")
    assert not is_colourless(colour) and is_colourless(grey) and is_colourless(grey.convert("RGB"))
    _, on_colour = describe_morphology(bundle, colour)
    sentence, on_grey = describe_morphology(bundle, grey.convert("RGB"))
    assert all(p.certain for p in on_colour)
    assert {p.attribute for p in on_grey if not p.certain} == set(COLOUR_ATTRIBUTES)
    assert "(?)" in sentence


def test_morphology_is_only_for_the_white_cells_wbcatt_annotates():
    from core.morphology import has_morphology

    assert all(has_morphology(k) for k in ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"))
    assert not any(has_morphology(k) for k in ("platelet", "erythroblast", "ig", "pro_b", None))


def test_a_nil_phrase_reads_on_its_own_as_a_label():
    from core.morphology import AttributePrediction

    assert AttributePrediction("granule_type", "nil", "no", 0.9, True).label == "no granules"
    assert AttributePrediction("granule_colour", "nil", "no", 0.9, True).label == "no granule colour"
    assert AttributePrediction("granule_type", "round", "round", 0.9, True).label == "round"
