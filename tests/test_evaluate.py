"""The evaluation CLI on folder trees and CSVs the tests write: what an outside evaluator may hand it."""
from __future__ import annotations

import csv
import json
import os

import pytest

from core.data import class_key_for_folder, scan_class_folders
from core.panels import load_attribute_phrases
from tests.conftest import draw_cell, save_calibrated_tiny, write_class_tree
from training.evaluate import main as evaluate_main
from training.metrics import classification_summary


def run_evaluate(tiny_model_path, data, tmp_path, *extra) -> tuple[int, dict | None]:
    out = tmp_path / "metrics.json"
    code = evaluate_main(["--checkpoint", str(tiny_model_path), "--data", str(data), "--json", str(out), *extra])
    return code, (json.loads(out.read_text()) if out.is_file() else None)


def test_folder_names_are_matched_up_to_case_spaces_and_hyphens(tiny_model_path, tmp_path):
    tree = write_class_tree(tmp_path / "site", {"Neutrophil": 3, "lymphocyte": 2, "smudge": 2})
    code, metrics = run_evaluate(tiny_model_path, tree, tmp_path)
    assert code == 0 and metrics["panel"] == "blood_cells"
    assert metrics["folders_matched"] == {"Neutrophil": "neutrophil"}
    assert metrics["n"] == 5 and metrics["per_class"]["neutrophil"]["support"] == 3
    assert metrics["unknown"] == {"n": 2, "folders": ["smudge"], "flagged_rate": metrics["unknown"]["flagged_rate"]}
    # the abstentions among the known cells, by the check that refused them
    assert sum(metrics["abstain_kinds"].values()) == round(metrics["abstain_rate"] * metrics["n"])
    refusing = save_calibrated_tiny(tmp_path / "refusing" / "m.safetensors", out_of_scope_threshold=-1.0)
    code, metrics = run_evaluate(refusing, tree, tmp_path)
    assert code == 0 and metrics["abstain_kinds"] == {"out_of_scope": 5} and metrics["abstain_rate"] == 1.0
    keys = {"early_pre_b", "pro_b", "ig"}
    assert [class_key_for_folder(f, keys) for f in ("Early Pre-B", " PRO_B ", "IG", "Pro B cells")] == [
        "early_pre_b", "pro_b", "ig", "Pro B cells"]


def test_macro_f1_with_predicted_classes_counts_wrong_names_of_absent_classes():
    summary = classification_summary(["a", "a", "b"], ["a", "c", "b"], [0.9, 0.8, 0.7], [False] * 3, ["a", "b", "c"])
    assert summary["macro_f1"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-4)  # classes with images only
    assert summary["macro_f1_with_predicted"] == pytest.approx((2 / 3 + 1 + 0) / 3, abs=1e-4)


def test_json_to_a_folder_is_refused_before_the_run(tiny_model_path, tmp_path, capsys):
    tree = write_class_tree(tmp_path / "site", {"neutrophil": 1})
    code = evaluate_main(["--checkpoint", str(tiny_model_path), "--data", str(tree), "--json", str(tmp_path)])
    assert code == 2 and "is a folder" in capsys.readouterr().err


def _attribute_csv(tmp_path, rows: list[dict]) -> str:
    path = tmp_path / "attributes.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def test_attribute_csv_blank_cells_are_not_scored_and_bad_csvs_are_refused(tiny_model_path, tmp_path, capsys):
    tree = write_class_tree(tmp_path / "site", {"neutrophil": 4})
    phrases = load_attribute_phrases()
    rows = [{"path": f"neutrophil/neutrophil_{i}.png", **{k: list(v)[0] for k, v in phrases.items()}}
            for i in range(4)]
    for row in rows[::2]:
        row["cell_shape"] = ""  # not annotated for these two cells
    code, metrics = run_evaluate(tiny_model_path, tree, tmp_path, "--attributes", _attribute_csv(tmp_path, rows))
    assert code == 0
    assert metrics["attributes"]["per_attribute"]["cell_shape"]["n"] == 2
    assert metrics["attributes"]["per_attribute"]["cell_size"]["n"] == 4
    # a CSV beside a larger set (WBCAtt's paths are relative to its own folder): only the --data images count
    subset = tmp_path / "subset" / "neutrophil"  # two of the four, linked as evaluation subsets often are
    subset.mkdir(parents=True)
    for i in range(2):
        (subset / f"neutrophil_{i}.png").symlink_to(tree / "neutrophil" / f"neutrophil_{i}.png")
    beside = [dict(row, path=f"site/{row['path']}") for row in rows]
    code, metrics = run_evaluate(tiny_model_path, subset.parent, tmp_path, "--attributes",
                                 _attribute_csv(tmp_path, beside))
    assert code == 0 and metrics["n"] == 2 and metrics["attributes"]["per_attribute"]["cell_size"]["n"] == 2
    assert [r["reason"] for r in metrics["attributes"]["skipped_rows"]] == ["not among the --data images"] * 2
    for row in rows:
        row["path"] = "elsewhere/" + row["path"]
    code, _ = run_evaluate(tiny_model_path, tree, tmp_path, "--attributes", _attribute_csv(tmp_path, rows))
    assert code == 2 and "none of its 4 image paths exists" in capsys.readouterr().err
    no_path = [{k: v for k, v in row.items() if k != "path"} for row in rows]
    code, _ = run_evaluate(tiny_model_path, tree, tmp_path, "--attributes", _attribute_csv(tmp_path, no_path))
    assert code == 2 and "no 'path' column" in capsys.readouterr().err


def test_scan_follows_linked_folders_once_and_skips_hidden_ones(tmp_path):
    cls = tmp_path / "data" / "neutrophil"
    (cls / ".thumbnails").mkdir(parents=True)
    draw_cell().save(cls / "a.png")
    draw_cell().save(cls / ".thumbnails" / "a_small.png")  # a viewer's cache, not a cell
    draw_cell().save(cls / "b.jfif", format="JPEG")
    linked = tmp_path / "elsewhere"
    linked.mkdir()
    draw_cell().save(linked / "c.png")
    os.symlink(linked, cls / "linked")
    os.symlink(cls, linked / "loop")  # a cycle must not be walked forever
    other = tmp_path / "data" / "lymphocyte"
    other.mkdir()
    draw_cell().save(other / "l.png")
    os.symlink(other, cls / "sibling")  # into another class: its images keep their own label
    os.symlink(tmp_path / "data", cls / "up")  # up to the data folder: nothing is read twice
    items = scan_class_folders(tmp_path / "data")
    assert sorted((item.label, item.path.name) for item in items) == [
        ("lymphocyte", "l.png"), ("neutrophil", "a.png"), ("neutrophil", "b.jfif"), ("neutrophil", "c.png")]


def test_a_class_linked_inside_another_keeps_both_classes_files(tmp_path):
    (tmp_path / "data" / "A" / "inner").mkdir(parents=True)
    draw_cell().save(tmp_path / "data" / "A" / "a.png")
    draw_cell().save(tmp_path / "data" / "A" / "inner" / "i.png")
    os.symlink(tmp_path / "data" / "A" / "inner", tmp_path / "data" / "B")
    items = scan_class_folders(tmp_path / "data")
    assert sorted((item.label, item.path.name) for item in items) == [("A", "a.png"), ("B", "i.png")]


def test_an_alias_class_folder_adds_no_class_and_no_second_label(tmp_path):
    (tmp_path / "data" / "neutrophil").mkdir(parents=True)
    draw_cell().save(tmp_path / "data" / "neutrophil" / "n.png")
    os.symlink(tmp_path / "data" / "neutrophil", tmp_path / "data" / "Neutrophils")  # sorts first
    outside = tmp_path / "export"
    (outside / "cells").mkdir(parents=True)
    draw_cell().save(outside / "cells" / "m.png")
    os.symlink(outside / "cells", tmp_path / "data" / "monocyte")  # a class that is only a link stays
    items = scan_class_folders(tmp_path / "data")
    assert sorted((item.label, item.path.name) for item in items) == [("monocyte", "m.png"), ("neutrophil", "n.png")]


def test_refused_files_are_listed_in_the_printed_table_without_json(tiny_model_path, tmp_path, capsys):
    tree = write_class_tree(tmp_path / "site", {"neutrophil": 2})
    for i in range(7):
        (tree / "neutrophil" / f"broken_{i}.png").write_bytes(b"not an image")
    code = evaluate_main(["--checkpoint", str(tiny_model_path), "--data", str(tree)])
    out = capsys.readouterr().out
    assert code == 0 and "see JSON" not in out
    assert "refused files: 7" in out and "broken_0.png: " in out and "broken_4.png: " in out
    assert "broken_5.png" not in out and "... and 2 more (pass --json OUT to list all)" in out


@pytest.mark.parametrize("layout", ["no_folders", "empty_folders"])
@pytest.mark.parametrize("panel", [[], ["--panel", "blood_cells"]])
def test_a_data_folder_without_images_is_refused(tiny_model_path, tmp_path, capsys, layout, panel):
    data = tmp_path / "site"
    data.mkdir()
    if layout == "empty_folders":
        (data / "neutrophil").mkdir()
        (data / "monocyte").mkdir()
        (data / "monocyte" / "notes.txt").write_text("not an image")
    code, metrics = run_evaluate(tiny_model_path, data, tmp_path, *panel)
    err = capsys.readouterr().err
    assert code == 2 and metrics is None
    assert f"no images found under {data} (expected one sub-folder per class" in err and len(err.splitlines()) == 1


def test_a_data_folder_whose_images_all_fail_is_refused_with_the_first_reason(tiny_model_path, tmp_path, capsys):
    data = tmp_path / "site"
    (data / "neutrophil").mkdir(parents=True)
    (data / "neutrophil" / "a.png").write_bytes(b"not a png")
    (data / "neutrophil" / "b.jpg").write_bytes(b"")
    code, metrics = run_evaluate(tiny_model_path, data, tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and metrics is None and len(err.splitlines()) == 1
    assert "none of the 2 images under" in err and "could be read" in err


def test_mixed_panels_the_panel_holding_most_folders_wins_and_a_tie_is_refused(tiny_model_path, tmp_path, capsys):
    tied = write_class_tree(tmp_path / "tied", {"neutrophil": 1, "basophil": 1, "Pre-B": 1, "benign": 1})
    code, metrics = run_evaluate(tiny_model_path, tied, tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and metrics is None and len(err.splitlines()) == 1
    assert "b_all" in err and "blood_cells" in err and "--panel" in err
    code, metrics = run_evaluate(tiny_model_path, tied, tmp_path, "--panel", "blood_cells")
    assert code == 0 and metrics["unknown"]["folders"] == ["benign", "pre_b"]
    most = write_class_tree(tmp_path / "most", {"neutrophil": 1, "basophil": 1, "monocyte": 1, "pre_b": 1})
    code, metrics = run_evaluate(tiny_model_path, most, tmp_path)
    assert code == 0 and metrics["panel"] == "blood_cells" and metrics["unknown"]["folders"] == ["pre_b"]
    only = write_class_tree(tmp_path / "only", {"Early Pre-B": 1, "pro_b": 1})  # all in one panel
    code, metrics = run_evaluate(tiny_model_path, only, tmp_path)
    assert code == 0 and metrics["panel"] == "b_all" and metrics["unknown"]["n"] == 0


def test_attribute_rows_skipped_and_unknown_values_are_reported_not_dropped(tiny_model_path, tmp_path, capsys):
    tree = write_class_tree(tmp_path / "site", {"neutrophil": 4})
    phrases = load_attribute_phrases()
    rows = [{"path": f"neutrophil/neutrophil_{i}.png", **{k: list(v)[0] for k, v in phrases.items()}}
            for i in range(5)]  # the fifth image does not exist
    rows[1]["granule_colour"] = "green"  # not a value of granule_colour
    code, metrics = run_evaluate(tiny_model_path, tree, tmp_path, "--attributes", _attribute_csv(tmp_path, rows))
    out = capsys.readouterr().out
    attributes = metrics["attributes"]
    assert code == 0 and attributes["n"] == 4
    assert attributes["skipped_rows"] == [{"line": 6, "path": "neutrophil/neutrophil_4.png",
                                           "reason": "image file not found"}]
    granule = attributes["per_attribute"]["granule_colour"]
    assert granule["n"] == 3 and granule["unknown_values"] == {"green": 1}  # not scored as wrong
    assert attributes["per_attribute"]["cell_size"]["unknown_values"] == {}
    assert "skipped CSV rows: 1 (image file not found: 1)" in out and "line 6: neutrophil/neutrophil_4.png" in out
    assert "values the model does not know: 'green' x1" in out


def test_attribute_csvs_with_nothing_to_score_are_refused(tiny_model_path, tmp_path, capsys):
    tree = write_class_tree(tmp_path / "site", {"neutrophil": 2})
    header_only = tmp_path / "header.csv"
    header_only.write_text("path," + ",".join(load_attribute_phrases()) + "\n")
    code, metrics = run_evaluate(tiny_model_path, tree, tmp_path, "--attributes", str(header_only))
    assert code == 2 and metrics is None and "no data rows" in capsys.readouterr().err
    no_attributes = _attribute_csv(tmp_path, [{"path": "neutrophil/neutrophil_0.png", "label": "neutrophil"}])
    code, metrics = run_evaluate(tiny_model_path, tree, tmp_path, "--attributes", no_attributes)
    assert code == 2 and metrics is None and "none of the WBCAtt attribute columns" in capsys.readouterr().err
    blank = _attribute_csv(tmp_path, [{"path": "neutrophil/neutrophil_0.png", "cell_size": "gigantic"}])
    code, metrics = run_evaluate(tiny_model_path, tree, tmp_path, "--attributes", blank)
    assert code == 2 and metrics is None and "nothing to score" in capsys.readouterr().err


def test_json_under_a_file_or_an_unwritable_folder_is_refused_before_the_run(tiny_model_path, tmp_path, capsys,
                                                                            monkeypatch):
    import training.evaluate as evaluate_module

    tree = write_class_tree(tmp_path / "site", {"neutrophil": 1})
    (tmp_path / "cell.jpg").write_bytes(b"a file, not a folder")
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: pytest.fail("the run started"))
    for target in (tmp_path / "cell.jpg" / "out.json", tmp_path / "cell.jpg" / "deeper" / "out.json"):
        code = evaluate_main(["--checkpoint", str(tiny_model_path), "--data", str(tree), "--json", str(target)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.splitlines()) == 1 and "cell.jpg is a file" in err
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    monkeypatch.setattr(evaluate_module.os, "access", lambda *a: False)  # as for a user without rights (root has all)
    code = evaluate_main(["--checkpoint", str(tiny_model_path), "--data", str(tree),
                          "--json", str(readonly / "new" / "out.json")])
    assert code == 2 and "cannot be written" in capsys.readouterr().err
    assert not (readonly / "new").exists()


def test_bootstrap_intervals_match_the_binomial_spread_and_repeat_exactly():
    from training.metrics import bootstrap_intervals

    labels = ["a", "b"] * 200
    predicted = [y if i % 10 else ("b" if y == "a" else "a") for i, y in enumerate(labels)]  # 360 of 400 right
    intervals = bootstrap_intervals(labels, predicted, [False] * 400, ["a", "b"])
    low, high = intervals["accuracy"]
    # normal approximation: 0.9 +- 1.96 * sqrt(0.9 * 0.1 / 400) = 0.871 .. 0.929
    assert abs(low - 0.871) < 0.01 and abs(high - 0.929) < 0.01
    assert low < 0.9 < high and intervals["macro_f1"][0] < 0.9 < intervals["macro_f1"][1]
    assert intervals == bootstrap_intervals(labels, predicted, [False] * 400, ["a", "b"])  # seeded
    wider = bootstrap_intervals(labels[:40], predicted[:40], [False] * 40, ["a", "b"])["accuracy"]
    assert wider[1] - wider[0] > 2 * (high - low)  # 10x fewer images: about 3x the width


def test_bootstrap_intervals_of_perfect_abstaining_and_tiny_sets():
    from training.metrics import bootstrap_intervals

    perfect = bootstrap_intervals(["a", "b", "c"] * 10, ["a", "b", "c"] * 10, [False] * 30, ["a", "b", "c"])
    assert perfect["accuracy"] == [1.0, 1.0] and perfect["macro_f1"] == [1.0, 1.0]
    silent = bootstrap_intervals(["a", "b"] * 5, ["a", "a"] * 5, [True] * 10, ["a", "b"])
    assert silent["accuracy_answered"] is None and silent["accuracy"][0] < 0.5 < silent["accuracy"][1]
    assert bootstrap_intervals(["a"], ["a"], [False], ["a"]) is None
    summary = classification_summary(["a", "b"] * 5, ["a", "a"] * 5, [0.9] * 10, [False] * 10, ["a", "b"])
    assert summary["intervals"]["accuracy"][0] <= summary["accuracy"] <= summary["intervals"]["accuracy"][1]


def test_bootstrap_intervals_in_several_chunks_and_unknown_names_never_match():
    from training.metrics import bootstrap_intervals

    labels = ["a", "b", "c"] * 400  # 1200 images x 2000 resamples: split into chunks
    predicted = [y if i % 5 else "a" for i, y in enumerate(labels)]
    intervals = bootstrap_intervals(labels, predicted, [False] * 1200, ["a", "b", "c"], resamples=2000)
    summary = classification_summary(labels, predicted, [0.9] * 1200, [False] * 1200, ["a", "b", "c"])
    for name in ("accuracy", "macro_f1"):
        low, high = intervals[name]
        assert low < summary[name] < high and high - low < 0.06
    unknown = bootstrap_intervals(["x", "y"] * 5, ["z", "w"] * 5, [False] * 10, ["a"])
    assert unknown["accuracy"] == [0.0, 0.0]  # names outside the panel are not "right" for matching
