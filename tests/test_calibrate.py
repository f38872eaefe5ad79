"""Calibration CLI: temperature, abstention and out-of-scope thresholds per panel, and the
morphology phrases' confidence thresholds, all written into the model sidecar."""
from __future__ import annotations

import csv
import json

import torch
import torch.nn.functional as F

from conftest import draw_cell, make_tiny_bundle, tiny_calibration_inputs, write_class_tree
from core.checkpoint import load_bundle, save_bundle
from core.panels import load_attribute_phrases
from training import calibrate
from training.calibrate_attributes import calibrate_attributes


def _rows_and_embeddings(bundle, n: int = 200):
    """Half the cells sit on their true value's prototype (confident and right), half are
    random embeddings with random truths (unsure and mostly wrong)."""
    generator = torch.Generator().manual_seed(1)
    phrases = bundle.sidecar["attribute_phrases"]
    rows, embeddings = [], []
    for i in range(n):
        truths = {name: int(torch.randint(len(values), (1,), generator=generator)) for name, values in phrases.items()}
        rows.append({name: list(phrases[name])[k] for name, k in truths.items()})
        if i % 2 == 0:  # one attribute decides the embedding; the others are noise for it
            embeddings.append(bundle.attribute_prototypes["granularity"][truths["granularity"]])
        else:
            embeddings.append(F.normalize(torch.randn(bundle.model.config.embed_dim, generator=generator), dim=-1))
    for row in rows[::10]:
        row["granularity"] = "sometimes"  # outside the vocabulary: neither fitted nor counted
    del rows[1]["cell_size"]  # a short row: not annotated, not a crash
    return rows, torch.stack(embeddings)


def test_attribute_thresholds_keep_stated_phrases_accurate():
    bundle = make_tiny_bundle()
    rows, embeddings = _rows_and_embeddings(bundle)
    thresholds, report = calibrate_attributes(bundle, embeddings, rows, target_accuracy=0.95)
    assert set(thresholds) == set(bundle.attribute_prototypes)
    granularity = report["per_attribute"]["granularity"]
    # the confident half is stated, the unsure half is marked uncertain
    assert 0.3 < granularity["certain_share"] < 0.8
    assert granularity["accuracy_certain"] >= 0.9 > granularity["accuracy"]
    assert report["n_held_out"] == 100 and report["target_accuracy"] == 0.95
    assert report["per_attribute"]["cell_shape"]["n"] == 100  # every held-out cell annotated
    assert 80 <= granularity["n"] <= 90  # the 20 unknown values are left out of both halves
    assert report["skipped"] == []
    stored = thresholds["granularity"]  # the report describes the stored (rounded) threshold
    assert stored == round(stored, 4)


def test_attribute_without_annotations_is_skipped_not_guessed():
    bundle = make_tiny_bundle()
    rows, embeddings = _rows_and_embeddings(bundle, n=40)
    for row in rows:
        row["nucleus_shape"] = "unheard-of"
    thresholds, report = calibrate_attributes(bundle, embeddings, rows, target_accuracy=0.95)
    assert "nucleus_shape" not in thresholds and report["skipped"] == ["nucleus_shape"]


def _write_attribute_csv(root, n: int = 6):
    phrases = load_attribute_phrases()
    (root / "val" / "neutrophil").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = f"val/neutrophil/a{i}.png"
        draw_cell(seed=i).save(root / path)
        rows.append({"label": "Neutrophil", "path": path, **{k: list(v)[i % len(v)] for k, v in phrases.items()}})
    with open(root / "attributes_val.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "attributes_val.csv"


def test_calibrate_cli_writes_every_threshold_into_the_sidecar(tmp_path):
    model, train, val = tiny_calibration_inputs(tmp_path, 3, 4)
    csv_path = _write_attribute_csv(tmp_path)
    assert calibrate.main(["--checkpoint", str(model), "--train", str(train), "--val", str(val),
                           "--attributes", str(csv_path), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert torch.is_grad_enabled()  # called in-process, the CLI leaves the caller's grad mode alone
    calibration = load_bundle(model).sidecar["calibration"]
    panel = calibration["panels"]["blood_cells"]
    assert panel["temperature"] > 0 and 0 <= panel["min_confidence"] <= 1
    assert panel["report"]["n_held_out"] == 16 and "typicality" in panel  # None: too few answers to fit a band
    from core.site_shift import home_out_of_scope_rate
    held_out_rate = panel["report"]["out_of_scope_rate"]  # a share of the 16 held-out images
    assert 0 <= held_out_rate <= 1 and round(held_out_rate * 16, 3) == round(held_out_rate * 16)
    assert home_out_of_scope_rate({"calibration": calibration}, "blood_cells") is None  # 4 images a class: degenerate
    trusted = {**calibration, "panels": {"blood_cells": {**panel, "degenerate": False}}}
    assert home_out_of_scope_rate({"calibration": trusted}, "blood_cells") == max(0.01, held_out_rate)
    assert set(calibration["attributes"]) == set(load_attribute_phrases())
    # None where no confidence reached the target on the fitting half: that phrase is never stated
    assert all(t is None or 0 < t <= 1 for t in calibration["attributes"].values())
    never = [name for name, t in calibration["attributes"].items() if t is None]
    assert all(calibration["attributes_report"]["per_attribute"][name]["certain_share"] == 0 for name in never)
    json.dumps(calibration)  # the sidecar stays plain JSON
    # recalibrating the panels alone keeps the phrase thresholds
    assert calibrate.main(["--checkpoint", str(model), "--train", str(train), "--val", str(val),
                           "--cache-dir", str(tmp_path / "cache")]) == 0
    assert load_bundle(model).sidecar["calibration"]["attributes"] == calibration["attributes"]


def test_calibrate_cli_refuses_an_attribute_csv_without_images(tmp_path, capsys):
    model = tmp_path / "model.safetensors"
    save_bundle(make_tiny_bundle(), model)
    before = load_bundle(model).sidecar
    empty = tmp_path / "attributes_val.csv"
    empty.write_text("label,path,cell_size\nNeutrophil,val/missing.png,big\n")
    tree = write_class_tree(tmp_path / "tree", {"neutrophil": 2}, size=48)
    assert calibrate.main(["--checkpoint", str(model), "--train", str(tree), "--val", str(tree),
                           "--attributes", str(empty), "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "none of its 1 image paths exists" in capsys.readouterr().err
    assert load_bundle(model).sidecar == before  # nothing written


def test_a_degenerate_fit_is_flagged_in_the_sidecar_and_on_stderr(tmp_path, capsys):
    """A tiny val set stored temperature 24434 and min_confidence 0.125 without a word."""
    model, train, val = tiny_calibration_inputs(tmp_path, 2, 3)
    keys = list(make_tiny_bundle().panels["blood_cells"].keys)
    assert calibrate.main(["--checkpoint", str(model), "--train", str(train), "--val", str(val),
                           "--cache-dir", str(tmp_path / "cache")]) == 0
    panel = load_bundle(model).sidecar["calibration"]["panels"]["blood_cells"]
    assert panel["degenerate"] is True
    assert any(f"fewer than 20 val images of {keys[0]} 3" in reason for reason in panel["degenerate_reasons"])
    err = capsys.readouterr().err
    assert "calibration of panel blood_cells is degenerate" in err and "not trustworthy" in err


def test_degenerate_reasons_name_a_runaway_temperature_and_pass_a_sane_fit():
    reasons = calibrate.degenerate_reasons({"temperature": 24434.0}, {"neutrophil": 50})
    assert len(reasons) == 1 and "temperature 24434 outside [0.05, 20]" in reasons[0] and "1/K" in reasons[0]
    assert "0 or 1" in calibrate.degenerate_reasons({"temperature": 0.01}, {"neutrophil": 50})[0]
    assert calibrate.degenerate_reasons({"temperature": 1.3}, {"neutrophil": 20, "lymphocyte": 41}) == []


def test_calibrate_refuses_a_tie_between_panels_until_panel_names_one(tmp_path, capsys):
    """The rule of training.evaluate: the old one silently took the smaller panel (b_all here), and
    the fit then failed with a traceback after the centroids' pass."""
    model = tmp_path / "model.safetensors"
    save_bundle(make_tiny_bundle(), model)
    before = load_bundle(model).sidecar
    tied = write_class_tree(tmp_path / "tied", {"neutrophil": 2, "basophil": 2, "pre_b": 2, "benign": 2}, size=48)
    common = ["--checkpoint", str(model), "--train", str(tied), "--cache-dir", str(tmp_path / "cache")]
    assert calibrate.main([*common, "--val", str(tied)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"class folders of {tied} fit panels blood_cells and b_all equally" in err
    assert "--panel" in err
    assert not (tmp_path / "cache").exists()  # refused before any image was decoded
    # --panel picks the panel; a folder of another panel's classes is still one line, not a traceback
    assert calibrate.main([*common, "--val", str(tied), "--panel", "blood_cells"]) == 2
    assert "benign, pre_b of" in capsys.readouterr().err
    assert calibrate.main([*common, "--val", str(tied), str(tied), "--panel", "blood_cells"]) == 2
    assert "one per --val folder" in capsys.readouterr().err
    assert calibrate.main([*common, "--val", str(tied), "--panel", "blood"]) == 2
    assert "Unknown panel 'blood'" in capsys.readouterr().err
    assert load_bundle(model).sidecar == before  # nothing written
    blood = write_class_tree(tmp_path / "blood", {"neutrophil": 4, "basophil": 4}, size=48)
    assert calibrate.main([*common, "--val", str(blood), "--panel", "blood_cells"]) == 0
    assert list(load_bundle(model).sidecar["calibration"]["panels"]) == ["blood_cells"]


def test_calibrate_refuses_two_val_folders_of_one_panel(tmp_path, capsys):
    """A panel holds one calibration: the second folder's fit used to replace the first's silently."""
    model = tmp_path / "model.safetensors"
    save_bundle(make_tiny_bundle(), model)
    first = write_class_tree(tmp_path / "a", {"neutrophil": 2, "basophil": 2}, size=48)
    second = write_class_tree(tmp_path / "b", {"lymphocyte": 2, "monocyte": 2}, size=48)
    args = ["--checkpoint", str(model), "--train", str(first), "--cache-dir", str(tmp_path / "cache"),
            "--val", str(first), str(second)]
    assert calibrate.main(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"{first} and {second} are both panel blood_cells" in err
    assert not (tmp_path / "cache").exists()  # refused before any image was decoded


def test_calibrate_reads_class_folders_as_training_and_evaluation_do(tmp_path, capsys):
    """"Neutrophil" is neutrophil, in --val and in --train (it used to be refused as no panel's
    class, and in --train to end in a traceback after the centroids' pass)."""
    model = tmp_path / "model.safetensors"
    save_bundle(make_tiny_bundle(), model)
    train = write_class_tree(tmp_path / "train", {"Neutrophil": 3, "Basophil": 3}, size=48)
    val = write_class_tree(tmp_path / "val", {"Neutrophil": 4, "Basophil": 4}, size=48)
    assert calibrate.main(["--checkpoint", str(model), "--train", str(train), "--val", str(val),
                           "--cache-dir", str(tmp_path / "cache")]) == 0
    bundle = load_bundle(model)
    assert list(bundle.sidecar["calibration"]["panels"]) == ["blood_cells"]
    assert set(bundle.centroids) == {"neutrophil", "basophil"}


def test_calibrate_input_mistakes_are_one_line_before_any_image_is_decoded(tmp_path, capsys):
    model = tmp_path / "model.safetensors"
    save_bundle(make_tiny_bundle(), model)
    before = load_bundle(model).sidecar
    blood = write_class_tree(tmp_path / "blood", {"neutrophil": 2, "basophil": 2}, size=48)
    b_all = write_class_tree(tmp_path / "b_all", {"pre_b": 2, "benign": 2}, size=48)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    cases = {"Data folder not found": ["--train", str(tmp_path / "nowhere"), "--val", str(blood)],
             "not found": ["--train", str(blood), "--val", str(tmp_path / "nowhere")],
             "--train holds no class folder of panel blood_cells": ["--train", str(b_all), "--val", str(blood)]}
    for expected, args in cases.items():
        assert calibrate.main(["--checkpoint", str(model), *args, *cache]) == 2, expected
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and expected in err, err
    assert calibrate.main(["--checkpoint", str(tmp_path / "missing.safetensors"), "--train", str(blood),
                           "--val", str(blood), *cache]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert not (tmp_path / "cache").exists() and load_bundle(model).sidecar == before


def test_val_images_identical_to_training_images_are_named(tmp_path, capsys):
    from core.data import LabelledImage
    from training.calibrate_inputs import warn_shared_images

    files = {}
    for name, data in {"t1.png": b"same bytes", "t2.png": b"other bytes", "v1.png": b"same bytes",
                       "v2.png": b"diff bytes"}.items():  # v2 has t2's size but not its bytes
        files[name] = tmp_path / name
        files[name].write_bytes(data)
    training = [LabelledImage(files["t1.png"], "a"), LabelledImage(files["t2.png"], "a")]
    val_sets = [([LabelledImage(files["v1.png"], "a"), LabelledImage(files["v2.png"], "a")], "blood_cells")]
    assert warn_shared_images(training, val_sets) == [str(files["v1.png"])]
    assert "1 --val image(s) are byte-identical to --train images" in capsys.readouterr().err
    assert warn_shared_images(training[1:], val_sets) == []
