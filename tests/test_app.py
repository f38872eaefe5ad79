"""AppTest for every page, with the tiny random model, a temporary SQLite store and sample
images drawn by the tests. Nothing downloads; each test takes a few seconds on CPU."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import hashlib
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from core.checkpoint import load_bundle
from core.store import ImageRecord, PredictionRecord, feedback_table
from tests.conftest import cell_png_bytes

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
REVIEW_PAGE = "pages/1_Feedback_review.py"
CARD_PAGE = "pages/2_Model_card.py"


def png_bytes(kind: int = 0, seed: int = 0) -> bytes:
    return cell_png_bytes(96, kind=kind, seed=seed)


def run_app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    assert not at.exception, at.exception
    return at


def choose_sample(at: AppTest, name: str = "cell_0.png") -> AppTest:
    at.radio(key="describe_source").set_value("samples").run()
    at.selectbox(key="describe_sample").select(name).run()
    assert not at.exception, at.exception
    return at


def picker(at: AppTest, label: str = "Open a case"):
    """The case picker (its key changes with its labels, see ui.widgets.select_by_identity)."""
    found = [w for w in at.selectbox if w.label == label]
    assert len(found) == 1, [w.label for w in at.selectbox]
    return found[0]


def feedback_widget(kind: str, at: AppTest, name: str):
    """The open case's feedback widget `name` (its key carries the case's prediction id)."""
    found = [w for w in getattr(at, kind) if (w.key or "").startswith(f"describe_fb_{name}_")]
    assert len(found) == 1, [w.key for w in getattr(at, kind)]
    return found[0]


def described_text(at: AppTest) -> str:
    """The sentence (success box) or the Uncertain state (warning box) of the open case."""
    shown = [e.value for e in at.success] + [e.value for e in at.warning]
    hits = [v for v in shown if "Uncertain" in v or ":" in v and "Verified" not in v]
    assert hits, f"no sentence or Uncertain state shown: {shown}"
    return hits[0]


def frame_with(at: AppTest, column: str):
    """The first dataframe that has `column` (keys of plain dataframes are not exposed)."""
    for element in at.dataframe:
        if column in element.value.columns:
            return element.value
    raise AssertionError(f"no dataframe with column {column!r}")


def count(sessionmaker, model) -> int:
    with sessionmaker() as s:
        return s.query(model).count()


def set_reviewer(at: AppTest, name: str) -> AppTest:
    at.sidebar.text_input(key="sidebar_reviewer").input(name).run()
    assert not at.exception, at.exception
    return at


def test_describe_page_runs_without_images(app_env):
    at = run_app()
    assert at.title[0].value == "Describe blood-cell images"
    assert any("Upload images or choose a sample" in i.value for i in at.info)
    assert not at.warning  # the store is available and the default panel is validated


def test_unvalidated_panel_shows_warning(app_env):
    at = run_app()
    at.selectbox(key="describe_panel").select("leukemia").run()
    assert any("Not validated" in w.value for w in at.warning)


def test_unvalidated_panel_shows_no_confidence_in_table_or_picker(app_env):
    at = run_app()
    at.selectbox(key="describe_panel").select("leukemia").run()
    files = [("a.png", png_bytes(0, 1), "image/png"), ("b.png", png_bytes(1, 2), "image/png")]
    at.file_uploader(key="describe_upload").set_value(files).run()
    assert not at.exception, at.exception
    assert at.dataframe[0].value["confidence"].isna().all()
    assert not any("%" in option for option in picker(at).options)


def test_sample_is_described_and_recorded_once(app_env):
    at = choose_sample(run_app())
    text = described_text(at)
    assert "Uncertain" in text or any(s in text for s in ("Basophil", "Eosinophil", "Lymphocyte", "Monocyte",
                                                          "Neutrophil", "Platelet", "Erythroblast", "granulocyte"))
    assert len(at.session_state["describe_heatmaps"]) == 1
    assert count(app_env.sessionmaker, PredictionRecord) == 1
    # Moving the opacity slider re-blends: no new prediction, no new Grad-CAM.
    at.slider(key="describe_opacity").set_value(0.8).run()
    assert not at.exception
    assert count(app_env.sessionmaker, PredictionRecord) == 1
    assert len(at.session_state["describe_heatmaps"]) == 1
    assert list(app_env.uploads.rglob("*.png")), "the image copy was stored"


def test_upload_several_with_one_refused(app_env):
    at = run_app()
    files = [("a.png", png_bytes(0, 1), "image/png"), ("b.png", png_bytes(1, 2), "image/png"),
             ("broken.png", b"this is not an image", "image/png")]
    at.file_uploader(key="describe_upload").set_value(files).run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "broken" in errors[0]
    assert len(at.dataframe) >= 1  # the results table
    frame = at.dataframe[0].value
    assert sorted(frame["file"]) == ["a.png", "b.png"]
    confidence = list(frame["confidence"])
    abstained = list(frame["abstained"])
    assert [(not a, c) for a, c in zip(abstained, confidence)] == sorted(zip([not a for a in abstained], confidence))
    assert count(app_env.sessionmaker, ImageRecord) == 2  # nothing stored for the refused file
    assert count(app_env.sessionmaker, PredictionRecord) == 2
    picker(at).select_index(1).run()
    assert not at.exception, at.exception


def test_agree_writes_exactly_one_feedback_row(app_env):
    at = choose_sample(run_app())
    assert feedback_widget("button", at, "agree").disabled  # no reviewer yet
    set_reviewer(at, "Dr Test")
    feedback_widget("button", at, "agree").click().run()
    assert not at.exception, at.exception
    with app_env.sessionmaker() as s:
        rows = feedback_table(s)
    assert len(rows) == 1
    assert rows[0]["verdict"] == "agree" and rows[0]["reviewer"] == "Dr Test"
    assert any("Verified by Dr Test" in s.value for s in at.success)
    at.run()  # a plain rerun writes nothing more
    with app_env.sessionmaker() as s:
        assert len(feedback_table(s)) == 1


def test_disagree_with_correction_and_markdown_name(app_env):
    at = choose_sample(run_app())
    set_reviewer(at, "[Dr](http://x) *B*")
    feedback_widget("selectbox", at, "class").select("monocyte")
    feedback_widget("text_area", at, "comment").input("nucleus looks folded")
    feedback_widget("button", at, "disagree").click().run()
    assert not at.exception, at.exception
    with app_env.sessionmaker() as s:
        rows = feedback_table(s)
    assert [(r["verdict"], r["corrected_class"], r["comment"]) for r in rows] == [
        ("disagree", "monocyte", "nucleus looks folded")]
    assert not [s.value for s in at.success if "Verified by" in s.value]  # a disagreement is not shown in green
    verified = [w.value for w in at.warning if "Verified by" in w.value]
    assert verified and "\\[Dr\\]\\(http" in verified[0]  # escaped: shown literally, never a link


def test_store_unavailable_still_describes(app_env, tmp_path, monkeypatch):
    monkeypatch.setenv("HEMASCRIBE_DB_URL", f"sqlite:///{tmp_path}")  # a folder: cannot be opened
    st.cache_resource.clear()
    at = choose_sample(run_app())
    assert any("feedback cannot be saved" in w.value for w in at.warning)
    described_text(at)
    assert not at.button  # no feedback buttons without a store


def test_missing_model_is_reported(app_env, tmp_path, monkeypatch):
    monkeypatch.setenv("HEMASCRIBE_MODEL", str(tmp_path / "nothing.safetensors"))
    at = run_app()
    assert any("cannot be loaded" in e.value for e in at.error)


def test_unusable_setting_stops_the_app_with_one_message(app_env, monkeypatch):
    monkeypatch.setenv("HEMASCRIBE_MAX_UPLOAD_MB", "fifty")
    at = run_app()
    assert [e.value for e in at.error] == [
        "HemaScribe cannot start: HEMASCRIBE_MAX_UPLOAD_MB must be a positive number, not 'fifty' (default 50). "
        "Correct the environment variable and restart the app."]


def test_feedback_review_page(app_env):
    at = choose_sample(run_app())
    set_reviewer(at, "Dr Review")
    feedback_widget("button", at, "agree").click().run()
    at.switch_page(REVIEW_PAGE).run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Feedback review"
    assert at.sidebar.text_input(key="sidebar_reviewer").value == "Dr Review"  # survived the switch
    table = frame_with(at, "feedback_id")
    assert list(table["reviewer"]) == ["Dr Review"] and list(table["verdict"]) == ["Agree"]
    from core.panels import load_panels
    from ui.widgets import class_names
    names = class_names(load_panels())
    assert table["model_class"][0] in names.values()  # 'Immature granulocyte', not 'ig'
    assert at.selectbox(key="review_class").options == [table["model_class"][0]]
    # the other filters name what they filter as the page's buttons and panel picker do, not by key
    assert at.selectbox(key="review_verdict").options == ["Agree", "Disagree", "Unsure"]
    assert at.selectbox(key="review_panel").options == [load_panels()["blood_cells"].title]
    # record identifiers (hashes, database ids) are hidden until asked for; the data keeps them for the CSV
    table_element = next(e for e in at.dataframe if "feedback_id" in e.value.columns)
    assert "calibration_id" not in table_element.proto.column_order and "sentence" in table_element.proto.column_order
    at.toggle(key="review_ids").set_value(True).run()
    table_element = next(e for e in at.dataframe if "feedback_id" in e.value.columns)
    assert "calibration_id" in table_element.proto.column_order
    assert any(m.label.startswith("Agreement") and m.value == "100%" for m in at.metric)
    assert not any("These figures pool" in c.value for c in at.caption)  # one model, one panel
    assert list(frame_with(at, "answers")["answers"]) == ["not marked"]  # the tiny model has no band
    assert list(frame_with(at, "model class")["agreement_rate"]) == [100.0]
    at = choose_sample(at.switch_page("app.py").run())
    at.selectbox(key="describe_panel").select("b_all").run()
    feedback_widget("button", at, "agree").click().run()
    at.switch_page(REVIEW_PAGE).run()
    assert any("These figures pool 1 model(s) and 2 panel(s)" in c.value for c in at.caption)
    at.selectbox(key="review_model").select("tiny-test-random").run()  # the model filter
    assert len(frame_with(at, "feedback_id")) == 2
    at.selectbox(key="review_model").set_value(None).run()
    at.selectbox(key="review_verdict").select("disagree").run()
    assert not at.exception
    assert len(frame_with(at, "feedback_id")) == 0
    at.selectbox(key="review_verdict").set_value(None).run()
    # filters and the identifier toggle survive a visit to another page (a silent reset widens the CSV)
    at.selectbox(key="review_panel").select_index(0).run()
    at.toggle(key="review_ids").set_value(True).run()
    panel = at.selectbox(key="review_panel").value
    at.switch_page(CARD_PAGE).run()
    at.switch_page(REVIEW_PAGE).run()
    assert at.selectbox(key="review_panel").value == panel and at.toggle(key="review_ids").value is True
    assert len(frame_with(at, "feedback_id")) == 1
    at.selectbox(key="review_panel").set_value(None).run()
    assert all(" - Agree by Dr " in option for option in picker(at, "Re-open a case").options)  # as the buttons say it
    picker(at, "Re-open a case").select_index(0).run()
    assert not at.exception, at.exception
    assert not any("missing" in w.value for w in at.warning)
    assert any(", panel Normal peripheral blood cells" in c.value or ", panel B-cell acute" in c.value
               for c in at.caption)  # the panel by its title


def test_a_verdict_shows_on_the_panel_it_was_given_on_only(app_env):
    at = choose_sample(run_app())
    set_reviewer(at, "Dr Panel")
    feedback_widget("button", at, "agree").click().run()
    assert any("Verified by Dr Panel" in m.value and "agrees" in m.value for m in at.success)
    at.selectbox(key="describe_panel").select("b_all").run()
    assert not at.exception, at.exception
    assert not any("Verified by" in m.value for m in [*at.success, *at.warning])  # said of another answer
    assert any(c.value == "Not verified by an expert yet." for c in at.caption)


def test_verdicts_on_gan_drawings_are_listed_but_not_counted(app_env):
    (app_env.samples / "synthetic_neutrophil_0.png").write_bytes(png_bytes(kind=1, seed=5))
    at = choose_sample(run_app(), "synthetic_neutrophil_0.png")
    set_reviewer(at, "Dr Synth")
    feedback_widget("button", at, "agree").click().run()
    at.switch_page(REVIEW_PAGE).run()
    assert not at.exception, at.exception
    assert list(frame_with(at, "feedback_id")["reviewer"]) == ["Dr Synth"]  # listed
    assert any(m.label.startswith("Agreement") and m.value == "n/a" for m in at.metric)  # not counted
    assert any("1 feedback row on the GAN's synthetic sample images is listed" in c.value for c in at.caption)


def test_feedback_review_page_empty(app_env):
    at = AppTest.from_file(APP, default_timeout=180)
    at.switch_page(REVIEW_PAGE).run()
    assert not at.exception, at.exception
    assert any(m.value == "n/a" for m in at.metric)


def test_model_card_page(app_env):
    at = AppTest.from_file(APP, default_timeout=180)
    at.switch_page(CARD_PAGE).run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Model card"
    assert any("not measured" in i.value for i in at.info)
    assert any("tiny-test-random" in t.value for t in at.text)
    licences = frame_with(at, "licence")
    assert {"CC BY 4.0", "MIT", "research use"} <= set(licences["licence"])
    panels = frame_with(at, "validated")
    assert dict(zip(panels["panel"], panels["validated"]))["leukemia"] == "no"
    assert any(s.value.startswith("Rare classes") for s in at.subheader)
    assert any(i.value.startswith("Morphology attributes: not measured") for i in at.info)


def test_model_card_targets_say_which_are_met():
    from ui.model_card import targets_frame

    sidecar = {"metrics": {"pbc_val": {"accuracy": 0.958, "macro_f1": 0.952, "ece": 0.009, "abstain_rate": 0.092,
                                       "accuracy_answered": 0.984, "attributes": {"mean_accuracy": 0.95},
                                       "intervals": {"accuracy": [0.9484, 0.9671],
                                                     "accuracy_answered": [0.978, 0.991]}},
                           "bccd_wbc_other_lab": {"accuracy": 0.446, "abstain_rate": 0.92}},
               "reliability": {"blood_cells": {"out_of_scope": {"photos": {"auroc": 0.999}, "blank": {"auroc": 0.94}}}}}
    frame = targets_frame(SimpleNamespace(sidecar=sidecar)).set_index("target")
    assert frame.loc["PBC accuracy (8 cell types)", "met"] == "NO"  # 0.97 is above the interval
    assert frame.loc["PBC accuracy (8 cell types)", "95 % interval (bootstrap)"] == "0.948 - 0.967"
    assert frame.loc["PBC macro-F1", "95 % interval (bootstrap)"] == ""  # an evaluation without intervals
    assert frame.loc["PBC calibration error (ECE)", "met"] == "yes"
    assert frame.loc["B-ALL accuracy", "met"] == "not measured"
    row = frame.loc["PBC accuracy of the answered cases, at coverage"]
    assert row["this model (val)"] == "0.984 at 0.908" and row["met"] == "NO (within the interval)"
    assert frame.loc["Out-of-scope AUROC, worst of all sets and panels", "this model (val)"] == "0.940"
    assert frame.loc["Morphology: mean attribute accuracy", "met"] == "yes"
    bccd = "Another lab's white cells (BCCD, not val), accuracy"
    assert frame.loc[bccd, "this model (val)"] == "0.446 (all cells)"
    sidecar["metrics"]["bccd_wbc_other_lab"]["accuracy_answered"] = 0.654
    other = targets_frame(SimpleNamespace(sidecar=sidecar)).set_index("target")
    assert other.loc[bccd, "this model (val)"].endswith("; answers 8%, 65% right")
    assert set(targets_frame(SimpleNamespace(sidecar={}))["met"]) == {"not measured"}
    # the page shows every column, "met" right after the target's name (a NO must not sit off-screen)
    from ui.model_card import TARGET_COLUMN_ORDER
    assert set(TARGET_COLUMN_ORDER) == set(frame.reset_index().columns) and TARGET_COLUMN_ORDER[1] == "met"


def test_attribute_comparison_puts_wbcatt_baseline_beside_ours():
    from tests.conftest import make_tiny_bundle
    from ui.model_card import WBCATT_BASELINE, attribute_comparison_frame

    bundle = make_tiny_bundle(seed=0)
    assert attribute_comparison_frame(bundle) is None  # nothing measured: nothing claimed
    bundle.sidecar["metrics"] = {"pbc_val": {"accuracy": 0.9, "attributes": {
        "n": 12, "mean_accuracy": 0.876, "mean_macro_f1": 0.8, "per_attribute": {},
        "mean_certain_share": 0.7, "mean_accuracy_certain": 0.95}}}
    frame = attribute_comparison_frame(bundle)
    assert list(frame["mean accuracy"]) == [0.876, WBCATT_BASELINE["mean accuracy"]]
    assert frame["stated share"][0] == 0.7 and frame["accuracy of stated phrases (val, half used for fitting)"][0] == 0.95
    assert "12 cells" in frame["split"][0] and "ResNet-50" in frame["model"][1]


def test_new_model_file_is_picked_up_without_restart(app_env, tmp_path, monkeypatch):
    from core.checkpoint import save_bundle
    from tests.conftest import make_tiny_bundle

    path = tmp_path / "model" / "live.safetensors"
    save_bundle(make_tiny_bundle(seed=0), path)
    monkeypatch.setenv("HEMASCRIBE_MODEL", str(path))
    at = run_app()
    before = [c.value for c in at.sidebar.caption if "Weights sha256" in c.value]
    save_bundle(make_tiny_bundle(seed=1), path)  # training publishes a new model in place
    at.run()
    after = [c.value for c in at.sidebar.caption if "Weights sha256" in c.value]
    assert before and after and before != after


def test_a_recalibration_is_picked_up_and_named_in_the_sidebar(app_env, tmp_path, monkeypatch):
    from core.checkpoint import update_sidecar
    from tests.conftest import save_calibrated_tiny

    path = save_calibrated_tiny(tmp_path / "model" / "calibrated.safetensors")
    monkeypatch.setenv("HEMASCRIBE_MODEL", str(path))
    st.cache_resource.clear()
    at = choose_sample(run_app())
    first_id = load_bundle(path).calibration_id
    before = [c.value for c in at.sidebar.caption if c.value.startswith("Calibration:")]
    calibration = load_bundle(path).sidecar["calibration"]
    calibration["panels"]["blood_cells"]["temperature"] = 2.0
    update_sidecar(path, {"calibration": calibration})  # what calibrate --keep-centroids does: weights untouched
    at.run()
    after = [c.value for c in at.sidebar.caption if c.value.startswith("Calibration:")]
    assert len(before) == 1 and "none" not in before[0]
    assert after == [f"Calibration: {load_bundle(path).calibration_id}"] and after != before
    # the open case is described again under the new calibration: feedback attaches to what is shown
    with app_env.sessionmaker() as s:
        recorded = [p.calibration_id for p in s.query(PredictionRecord).order_by(PredictionRecord.id)]
    assert recorded == [first_id, load_bundle(path).calibration_id]
    calibration["views"] = 4  # a calibration fitted on 4-view embeddings (training.calibrate --views 4)
    update_sidecar(path, {"calibration": calibration})
    at.run()
    assert [c.value for c in at.sidebar.caption if c.value.startswith("Calibration:")] == [
        f"Calibration: {load_bundle(path).calibration_id} · each image seen in 4 turns"]


def test_open_case_survives_fewer_uploads(app_env):
    at = run_app()
    files = [(f"c{i}.png", png_bytes(i % 2, 10 + i), "image/png") for i in range(3)]
    at.file_uploader(key="describe_upload").set_value(files).run()
    picker(at).select_index(2).run()
    at.file_uploader(key="describe_upload").set_value(files[:2]).run()
    assert not at.exception, at.exception
    box = picker(at)
    assert len(box.options) == 2 and box.value is not None
    assert box.options[box.index].split(" - ")[0].split(". ", 1)[1] == at.text[0].value  # label = case shown


def test_feedback_fields_belong_to_their_case_and_survive_a_refused_click(app_env):
    at = run_app()
    files = [("a.png", png_bytes(0, 1), "image/png"), ("b.png", png_bytes(1, 2), "image/png")]
    at.file_uploader(key="describe_upload").set_value(files).run()
    set_reviewer(at, "Dr Carry")
    first = at.text[0].value
    feedback_widget("selectbox", at, "class").select("monocyte")
    feedback_widget("text_area", at, "comment").input("typed for the first")
    feedback_widget("button", at, "agree").click().run()  # a class contradicts "agree": refused
    assert any("Not saved" in e.value for e in at.error)
    assert feedback_widget("selectbox", at, "class").value == "monocyte"  # what was typed is kept
    assert feedback_widget("text_area", at, "comment").value == "typed for the first"
    feedback_widget("button", at, "disagree").click().run()
    assert not at.exception, at.exception
    assert any("Saved: Disagree" in s.value for s in at.success)
    assert feedback_widget("selectbox", at, "class").value is None  # a saved form comes back empty
    box = picker(at)
    box.select_index(1 - box.index).run()
    assert at.text[0].value != first
    assert feedback_widget("selectbox", at, "class").value is None  # nothing carried over
    assert feedback_widget("text_area", at, "comment").value == ""
    feedback_widget("button", at, "agree").click().run()
    assert not at.exception, at.exception
    with app_env.sessionmaker() as s:
        rows = feedback_table(s)
    second = "b.png" if first == "a.png" else "a.png"
    assert sorted((r["original_name"], r["verdict"], r["corrected_class"], r["comment"]) for r in rows) == sorted(
        [(first, "disagree", "monocyte", "typed for the first"), (second, "agree", None, None)])


def test_unsent_feedback_text_survives_opening_another_case(app_env):
    """What a reviewer typed for a case and did not send yet is still there after looking at
    another case (Streamlit drops the state of widgets a run does not draw), and only there."""
    at = run_app()
    files = [("a.png", png_bytes(0, 1), "image/png"), ("b.png", png_bytes(1, 2), "image/png")]
    at.file_uploader(key="describe_upload").set_value(files).run()
    set_reviewer(at, "Dr Draft")
    first = at.text[0].value
    feedback_widget("selectbox", at, "class").select("monocyte").run()
    feedback_widget("text_input", at, "sentence").input("a folded nucleus").run()
    feedback_widget("text_area", at, "comment").input("typed, not sent").run()
    box = picker(at)
    box.select_index(1 - box.index).run()
    assert at.text[0].value != first
    assert feedback_widget("text_area", at, "comment").value == ""  # the other case's own empty form
    assert feedback_widget("selectbox", at, "class").value is None
    box = picker(at)
    box.select_index(1 - box.index).run()
    assert at.text[0].value == first
    assert feedback_widget("selectbox", at, "class").value == "monocyte"
    assert feedback_widget("text_input", at, "sentence").value == "a folded nucleus"
    assert feedback_widget("text_area", at, "comment").value == "typed, not sent"
    feedback_widget("button", at, "disagree").click().run()
    assert not at.exception, at.exception
    with app_env.sessionmaker() as s:
        rows = feedback_table(s)
    assert [(r["original_name"], r["verdict"], r["corrected_class"], r["corrected_sentence"], r["comment"])
            for r in rows] == [(first, "disagree", "monocyte", "a folded nucleus", "typed, not sent")]


def test_open_case_stays_the_same_image_when_the_panel_changes(app_env):
    at = run_app()
    files = [(f"c{i}.png", png_bytes(i % 2, 20 + i), "image/png") for i in range(3)]
    at.file_uploader(key="describe_upload").set_value(files).run()
    picker(at).select_index(2).run()
    shown = at.text[0].value
    at.selectbox(key="describe_panel").select("b_all").run()
    assert not at.exception, at.exception
    box = picker(at)
    assert at.text[0].value == shown and f" {shown} - " in box.options[box.index]
    at.slider(key="describe_opacity").set_value(0.7).run()  # any later click keeps the same case open
    box = picker(at)
    assert at.text[0].value == shown and f" {shown} - " in box.options[box.index]


def test_panel_round_trips_record_each_image_once_per_panel(app_env):
    at = run_app()
    files = [("a.png", png_bytes(0, 1), "image/png"), ("b.png", png_bytes(1, 2), "image/png")]
    at.file_uploader(key="describe_upload").set_value(files).run()
    assert count(app_env.sessionmaker, PredictionRecord) == 2
    for _ in range(2):
        at.selectbox(key="describe_panel").select("b_all").run()
        at.selectbox(key="describe_panel").select("blood_cells").run()
    assert not at.exception, at.exception
    assert count(app_env.sessionmaker, PredictionRecord) == 4  # two images x two panels, not 2 + 4 x 2
    at.file_uploader(key="describe_upload").set_value(files[:1]).run()  # an image removed: its cases go
    assert sorted(key[0] for key in at.session_state["describe_cases"]) == [hashlib.sha256(files[0][1]).hexdigest()] * 2


def test_blank_image_gets_no_closest_sentence_confidence_or_chart(app_env):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (235, 205, 210)).save(buffer, format="PNG")
    at = run_app()
    at.file_uploader(key="describe_upload").set_value([("blank.png", buffer.getvalue(), "image/png")]).run()
    assert not at.exception, at.exception
    assert "blank" in described_text(at)
    assert not at.metric and not at.get("plotly_chart")
    captions = [c.value for c in at.caption]
    assert not any("Closest sentence" in c for c in captions)
    assert any("No confidence and no scores" in c for c in captions)
    assert any(c.startswith("The model gave no sentence for this image: Agree means") for c in captions)


def review_two_samples() -> AppTest:
    """Agree on cell_0.png, Unsure on cell_1.png, then the Feedback review page."""
    at = set_reviewer(choose_sample(run_app(), "cell_0.png"), "Dr R")
    feedback_widget("button", at, "agree").click().run()
    at.selectbox(key="describe_sample").select("cell_1.png").run()
    feedback_widget("button", at, "unsure").click().run()
    at.switch_page(REVIEW_PAGE).run()
    return at


def test_reopened_case_is_not_swapped_by_a_filter(app_env):
    at = review_two_samples()
    opener = picker(at, "Re-open a case")
    opener.select_index(next(i for i, o in enumerate(opener.options) if " - Agree by " in o)).run()
    assert "cell_0.png" in [t.value for t in at.text]
    at.selectbox(key="review_verdict").select("unsure").run()
    assert not at.exception, at.exception
    assert picker(at, "Re-open a case").value is None  # the agree row is filtered out: nothing open
    assert not {"cell_0.png", "cell_1.png"} & {t.value for t in at.text}


def test_identical_uploads_are_described_once_and_said_so(app_env):
    at = run_app()
    same = png_bytes(0, 5)
    files = [("copyA.png", same, "image/png"), ("copyB.png", same, "image/png"), ("other.png", png_bytes(1, 6), "image/png")]
    at.file_uploader(key="describe_upload").set_value(files).run()
    assert not at.exception, at.exception
    assert any("same bytes as an earlier file: copyB" in c.value for c in at.caption)
    assert count(app_env.sessionmaker, PredictionRecord) == 2


@pytest.mark.parametrize("answer, has_phrases", [("lymphocyte", True), ("platelet", False)])
def test_morphology_sentence_only_for_a_white_cell(app_env, tmp_path, monkeypatch, answer, has_phrases):
    import io

    from PIL import Image

    from core.checkpoint import save_bundle
    from core.describe import embed_images
    from tests.conftest import make_tiny_bundle

    bundle = make_tiny_bundle()
    sample = Image.open(io.BytesIO((app_env.samples / "cell_0.png").read_bytes())).convert("RGB")
    embedding = embed_images(bundle, [sample])[0][0]
    keys = bundle.panels["blood_cells"].keys
    prototypes = -embedding.repeat(len(keys), 1)  # every class points away from this image but one
    prototypes[keys.index(answer)] = embedding
    bundle.prototypes["blood_cells"] = prototypes
    save_bundle(bundle, tmp_path / "answers.safetensors")
    monkeypatch.setenv("HEMASCRIBE_MODEL", str(tmp_path / "answers.safetensors"))
    st.cache_resource.clear()
    at = choose_sample(run_app())
    assert described_text(at).startswith(bundle.panels["blood_cells"].cell_class(answer).name)  # answered
    assert any(m.value.startswith("Morphology: ") for m in at.markdown) == has_phrases
    assert any("No morphology phrases for" in c.value for c in at.caption) == (not has_phrases)


def test_synthetic_samples_are_said_to_be_synthetic(app_env):
    at = choose_sample(run_app())
    assert not any("drawn by this project's GAN" in c.value for c in at.caption)  # real-looking names: no claim
    (app_env.samples / "synthetic_monocyte_0.png").write_bytes(png_bytes(1, 9))
    at.run()
    assert any("drawn by this project's GAN" in c.value for c in at.caption)


def test_a_pick_survives_another_reviewer_adding_a_row_meanwhile(app_env):
    from core.store import add_feedback

    at = review_two_samples()
    box = picker(at, "Re-open a case")
    wanted = next(i for i, o in enumerate(box.options) if "cell_0.png" in o)
    with app_env.sessionmaker.begin() as s:  # another session writes between render and click
        prediction_id = feedback_table(s)[0]["prediction_id"]
        add_feedback(s, s.get(PredictionRecord, prediction_id), verdict="agree", reviewer="Dr Other")
    box.select_index(wanted).run()  # this run renders new labels (a third row) and must keep the pick
    assert not at.exception, at.exception
    assert "cell_0.png" in [t.value for t in at.text]
    box = picker(at, "Re-open a case")
    assert "cell_0.png" in box.options[box.index]


def test_review_table_shows_no_confidence_for_abstentions():
    from ui.review import rows_frame

    rows = [{"feedback_id": 1, "created_at": None, "confidence": 0.795, "abstained": True},
            {"feedback_id": 2, "created_at": None, "confidence": 0.91, "abstained": False},
            {"feedback_id": 3, "created_at": None, "confidence": 0.99976, "abstained": False, "panel": "b_all"}]
    frame = rows_frame(rows, panel_titles={"b_all": "B-ALL subtypes"})
    assert frame["confidence"].isna().tolist() == [True, False, False] and frame["confidence"][1] == 0.91
    assert frame["confidence"][2] == 0.999  # truncated and capped: never "1.000", which reads as certainty
    assert frame["panel"].tolist()[2] == "B-ALL subtypes"  # by title, as the Panel filter names it


def test_review_names_classes_as_a_hematologist_reads_them():
    from core.panels import load_panels
    from ui.review import per_class_rows, rows_frame
    from ui.widgets import class_names

    names = class_names(load_panels())
    assert names["ig"] == load_panels()["blood_cells"].cell_class("ig").name != "ig"
    rows = [{"feedback_id": 1, "created_at": None, "confidence": 0.9, "abstained": False,
             "model_class": "ig", "expert_class": "neutrophil"},
            {"feedback_id": 2, "created_at": None, "confidence": 0.9, "abstained": True,
             "model_class": None, "expert_class": "a_class_of_another_model"}]
    frame = rows_frame(rows, names)
    assert frame["model_class"].tolist() == [names["ig"], "(abstained)"]  # as the per-class table says
    assert frame["expert_class"].tolist() == [names["neutrophil"], "a_class_of_another_model"]
    summary = {"per_class": {"ig": {"agreement_rate": 0.5}, "(abstained)": {"agreement_rate": None}}}
    assert [r["model class"] for r in per_class_rows(summary, names)] == [names["ig"], "(abstained)"]
    from ui.review import shown_labels
    assert shown_labels(["ig", "other"], names) == [names["ig"], "other"]
    twice = {"a": "Blast", "b": "Blast", "c": "Cell"}  # a sidecar's panels may name two classes alike
    assert shown_labels(["a", "b", "c"], twice) == ["Blast (a)", "Blast (b)", "Cell"]


def test_case_morphology_is_computed_once_per_case(tiny_bundle, monkeypatch):
    import ui.cases as cases
    from core.imageio import load_image_bytes

    calls = []
    monkeypatch.setattr(cases, "describe_morphology", lambda bundle, image: calls.append(image) or ("s", []))
    case = cases.Case("0" * 64, "a.png", load_image_bytes(png_bytes(), "a.png"))
    assert cases.case_morphology(tiny_bundle, case) == cases.case_morphology(tiny_bundle, case) == ("s", [])
    assert len(calls) == 1  # the summary and the Grad-CAM picker share one computation


def test_pages_show_a_long_narrow_strip_padded_to_a_square():
    """A 16 x 1024 upload was drawn 260 x 16,640 px on the Describe page (browser test)."""
    from PIL import Image

    from ui.widgets import framed

    strip = framed(Image.new("RGB", (16, 1024), (120, 40, 160)))
    assert strip.size == (1024, 1024) and strip.getpixel((0, 0)) == (255, 255, 255)
    assert strip.getpixel((512, 512)) == (120, 40, 160)
    field = Image.new("RGB", (1920, 1080))
    assert framed(field) is field  # a camera field (16:9) is shown as it is


def test_folder_and_expert_labels_are_shown_by_class_name():
    """The atlas read "pro_b (folder label)" next to "Pro-B ALL (expert-verified ...)"."""
    from core.panels import load_panels
    from ui.widgets import label_name

    panels = load_panels()
    assert label_name(panels, "pro_b") == "Pro-B ALL" and label_name(panels, "Neutrophils") == "Neutrophil"
    assert label_name(panels, "smudge cells") == "smudge cells"  # names no class: shown as it is


def test_a_strip_is_not_called_a_cell_imaged_another_way(app_env):
    """Under the strip reason the page added "It may still be one, imaged in a way the model has
    not learned": true of an unrecognised cell, not of a squeezed image (review)."""
    import io

    from tests.conftest import draw_cell

    buffer = io.BytesIO()
    draw_cell(size=128).resize((16, 1024)).save(buffer, format="PNG")
    at = run_app()
    at.file_uploader(key="describe_upload").set_value([("strip.png", buffer.getvalue(), "image/png")]).run()
    assert not at.exception, at.exception
    texts = [m.value for m in [*at.warning, *at.caption, *at.markdown]]
    assert any("times longer than wide" in t for t in texts)
    assert not any("It may still be one" in t for t in texts)
    assert any("the model did not describe this image (reason above)" in t for t in texts)


@pytest.mark.parametrize("threshold, n_files, warned", [(-1e9, 6, True), (1e9, 6, False), (-1e9, 1, False)])
def test_a_batch_refused_as_out_of_scope_is_said_to_look_like_another_lab(app_env, tmp_path, monkeypatch,
                                                                           threshold, n_files, warned):
    from tests.conftest import save_calibrated_tiny

    model = save_calibrated_tiny(tmp_path / "shift.safetensors", out_of_scope_threshold=threshold)
    monkeypatch.setenv("HEMASCRIBE_MODEL", str(model))
    st.cache_resource.clear()
    at = run_app()
    files = [(f"c{i}.png", png_bytes(i % 3, i), "image/png") for i in range(n_files)]  # one: too few to tell
    at.file_uploader(key="describe_upload").set_value(files).run()
    assert not at.exception, at.exception
    notices = [w.value for w in at.warning if "unlike the training lab" in w.value]
    assert len(notices) == int(warned)
    if warned:
        assert "6 of these 6 images were not recognised" in notices[0]


@pytest.mark.parametrize("threshold, flagged", [(-1e9, True), (1e9, False)])
def test_an_atypical_answer_says_how_often_such_answers_were_right(app_env, tmp_path, monkeypatch, threshold,
                                                                   flagged):
    from tests.conftest import save_calibrated_tiny

    model = save_calibrated_tiny(tmp_path / "typical.safetensors", band_threshold=threshold)
    monkeypatch.setenv("HEMASCRIBE_MODEL", str(model))
    st.cache_resource.clear()
    at = run_app()
    files = [("a.png", png_bytes(0, 1), "image/png"), ("b.png", png_bytes(1, 2), "image/png")]
    at.file_uploader(key="describe_upload").set_value(files).run()
    assert not at.exception, at.exception
    notes = [w.value for w in at.warning if w.value.startswith("**Atypical image.**")]
    assert len(notes) == int(flagged)  # the open case only
    if flagged:
        assert "right 94% of the time (90 of 96), against 98% for the more typical ones" in notes[0]
        assert picker(at).options[0].endswith(", atypical")
    assert list(frame_with(at, "atypical")["atypical"]) == [flagged, flagged]


def test_the_review_page_splits_agreement_by_the_atypical_mark(app_env, tmp_path, monkeypatch):
    from tests.conftest import save_calibrated_tiny

    model = save_calibrated_tiny(tmp_path / "typical.safetensors", band_threshold=-1e9)  # every answer marked
    monkeypatch.setenv("HEMASCRIBE_MODEL", str(model))
    st.cache_resource.clear()
    at = set_reviewer(choose_sample(run_app()), "Dr Band")
    feedback_widget("button", at, "disagree").click().run()
    at.switch_page(REVIEW_PAGE).run()
    assert not at.exception, at.exception
    split = frame_with(at, "answers")
    assert list(split["answers"]) == ["atypical"] and list(split["n_disagree"]) == [1]
    assert list(split["agreement_rate"]) == [0.0]  # in percent, shown whole like the page's other figures
    assert any("answers marked atypical were right 94% of the time (96 answers) and the others 98%" in c.value
               for c in at.caption)
    with app_env.sessionmaker() as s:
        stored = s.query(PredictionRecord).one()
    assert stored.atypical is True and stored.out_of_scope_score is not None
    assert stored.calibration_id == load_bundle(model).calibration_id is not None


def test_the_expert_versus_model_colour_scale_starts_at_zero_and_spans_at_least_one():
    from ui.widgets import confusion_figure

    assert (confusion_figure(["ig"], [[1]]).data[0].zmin, confusion_figure(["ig"], [[1]]).data[0].zmax) == (0, 1)
    assert confusion_figure(["a", "b"], [[5, 0], [1, 2]]).data[0].zmax == 5


def test_one_models_answers_under_two_calibrations_are_said_to_be_pooled():
    from ui.review import pooling_note

    rows = [{"model_id": "m", "panel": "blood_cells", "calibration_id": c} for c in ("aaa", "aaa", None)]
    assert pooling_note(rows) is None  # one calibration (and rows stored before the id was)
    assert "2 calibrations of one model" in pooling_note(rows + [{**rows[0], "calibration_id": "bbb"}])


def test_the_home_band_note_speaks_only_of_the_loaded_models_answers():
    from tests.conftest import BAND
    from ui.review import home_band_note

    bundle = SimpleNamespace(model_id="m1", sidecar={"calibration": {"panels": {"blood_cells": {"typicality": BAND}}}},
                             panels={"blood_cells": SimpleNamespace(title="Blood cells (PBC)")}, calibration_id="c1")
    rows = [{"panel": "blood_cells", "model_id": "m1", "model_class": "neutrophil", "calibration_id": "c1"}]
    assert home_band_note(bundle, rows).startswith("Panel Blood cells (PBC): on the training lab's held-out cells, "
                                                   "answers marked atypical were right 94% of the time (96 answers)")
    assert home_band_note(bundle, rows + [{**rows[0], "calibration_id": None}]) is not None  # stored before the id
    assert home_band_note(bundle, rows + [{**rows[0], "calibration_id": "c0"}]) is None  # marked under another band
    assert home_band_note(bundle, rows + [{**rows[0], "model_id": "m0"}]) is None  # another model's answers
    assert home_band_note(bundle, rows + [{**rows[0], "panel": "b_all"}]) is None  # pooled panels
    assert home_band_note(bundle, [{**rows[0], "panel": "b_all"}]) is None  # no band for that panel
    # a verdict on an Uncertain case is not in the split, so it does not hide the note
    assert home_band_note(bundle, rows + [{"panel": "b_all", "model_id": "m0", "model_class": None}]) is not None
    assert home_band_note(None, rows) is None


def test_atypical_answers_are_listed_right_after_the_abstentions():
    from dataclasses import replace

    from core.describe import describe
    from core.typicality import is_atypical
    from tests.conftest import BAND, draw_cell, make_tiny_bundle
    from ui.case_view import doubtful_first
    from ui.cases import Case

    base = describe(make_tiny_bundle(), draw_cell(), "blood_cells")

    def case(name, **changes):
        return Case(sha256=name, file_name=name, description=replace(base, **changes))

    def cases(band):  # the flags core.describe sets with and without a fitted band
        return [case("typical", abstained=False, abstain_kind=None, confidence=0.6,
                     atypical=is_atypical(1.0, False, band)),
                case("atypical", abstained=False, abstain_kind=None, confidence=0.99,
                     atypical=is_atypical(9.0, False, band)),
                case("weak", abstained=True, abstain_kind="weak", confidence=0.5,
                     atypical=is_atypical(1.0, True, band))]

    assert [c.file_name for c in doubtful_first(cases(BAND))] == ["weak", "atypical", "typical"]
    assert [c.file_name for c in doubtful_first(cases(None))] == ["weak", "typical", "atypical"]


def test_uploads_panel_and_source_survive_a_visit_to_another_page(app_env):
    """Streamlit empties widgets that another page's run did not draw: the batch, its panel and
    its cases must still be there on coming back, and nothing is described or recorded again."""
    at = run_app()
    at.selectbox(key="describe_panel").select("b_all").run()
    files = [("a.png", png_bytes(0, 1), "image/png"), ("b.png", png_bytes(1, 2), "image/png")]
    at.file_uploader(key="describe_upload").set_value(files).run()
    recorded = count(app_env.sessionmaker, PredictionRecord)
    at.switch_page(CARD_PAGE).run()
    at.switch_page("app.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="describe_panel").value == "b_all"
    assert sorted(at.dataframe[0].value["file"]) == ["a.png", "b.png"]
    assert any("uploaded earlier in this session" in c.value for c in at.caption)
    assert count(app_env.sessionmaker, PredictionRecord) == recorded
    at.button(key="describe_clear_kept").click().run()
    assert any("Upload images or choose a sample" in i.value for i in at.info)
    # a sample chosen before the visit is open again after it
    at = choose_sample(at)
    at.switch_page(CARD_PAGE).run()
    at.switch_page("app.py").run()
    assert at.radio(key="describe_source").value == "samples"
    assert at.selectbox(key="describe_sample").value == "cell_0.png"


def test_flipping_between_uploads_and_samples_records_nothing_again(app_env):
    at = run_app()
    files = [("a.png", png_bytes(0, 1), "image/png"), ("b.png", png_bytes(1, 2), "image/png")]
    at.file_uploader(key="describe_upload").set_value(files).run()
    at = choose_sample(at)
    recorded = count(app_env.sessionmaker, PredictionRecord)
    at.radio(key="describe_source").set_value("upload").run()
    assert sorted(at.dataframe[0].value["file"]) == ["a.png", "b.png"]
    at.radio(key="describe_source").set_value("samples").run()
    assert not at.exception, at.exception
    assert count(app_env.sessionmaker, PredictionRecord) == recorded


def test_results_table_gives_an_abstention_no_confidence(tiny_bundle, cell_image):
    """The confidence column is for answers; an abstention's top probability is its best match."""
    from dataclasses import replace

    from core.describe import describe
    from ui.case_view import _answer_confidence, _best_match

    panel = tiny_bundle.panels["blood_cells"]
    answer = replace(describe(tiny_bundle, cell_image, "blood_cells"), abstained=False, abstain_kind=None)
    doubt = replace(answer, abstained=True, abstain_kind="weak")
    assert _answer_confidence(answer) is not None and _best_match(panel, answer) == ""
    assert _answer_confidence(doubt) is None
    assert _best_match(panel, doubt).startswith(panel.cell_class(doubt.best_class).name + " (")


def test_bare_disagreement_is_confirmed_as_such():
    from ui.feedback import saved_message

    assert "no correction given" in saved_message("disagree", "Dr A", {"corrected_class": None,
                                                                       "corrected_sentence": " "})
    assert "no correction" not in saved_message("disagree", "Dr A", {"corrected_class": "monocyte"})
    assert saved_message("agree", "Dr *A*", {}) == "Saved: Agree by Dr \\*A\\*."
    assert "the model should have answered" in saved_message("disagree", "Dr A", {}, abstained=True)


def test_image_history_names_classes_hides_abstention_confidence_and_folds_repeats():
    from datetime import datetime, timezone

    from ui.widgets import history_frame

    def prediction(minute, class_key, abstained=False):
        return {"kind": "prediction", "created_at": datetime(2026, 12, 1, 4, minute, tzinfo=timezone.utc),
                "model_id": "m1", "panel": "blood_cells", "class_key": class_key, "abstained": abstained,
                "sentence": "s" if class_key else None, "confidence": 0.82}

    verdict = {"kind": "feedback", "created_at": datetime(2026, 12, 1, 4, 9, tzinfo=timezone.utc),
               "reviewer": "Dr H", "verdict": "disagree", "expert_class": "ig", "corrected_sentence": None,
               "comment": "a metamyelocyte"}
    events = [prediction(1, None, True), prediction(2, None, True), prediction(3, None, True), verdict,
              prediction(10, "ig"), prediction(11, None, True)]
    frame = history_frame(events, {"ig": "Immature granulocyte"}.get)
    assert frame["event"].tolist() == ["model (the same answer 3 times; the time is the last one's)", "expert",
                                       "model", "model"]
    assert frame["when"][0] == "2026-12-01 04:03 UTC"
    assert frame["verdict"].tolist() == ["", "Disagree", "", ""]  # as the buttons and the review table say it
    assert frame["class"].tolist() == ["(uncertain)", "Immature granulocyte", "Immature granulocyte", "(uncertain)"]
    assert frame["confidence"].isna().tolist() == [True, True, False, True]  # no confidence for abstentions


def test_an_abstention_gives_its_best_match_probability_in_small_print_only(app_env, monkeypatch):
    """A refused answer's probability is no claim: not a headline number (browser check, session 18)."""
    from dataclasses import replace

    import ui.cases as cases

    real = cases.describe_batch

    def doubtful(bundle, images, panel=None):
        return [replace(d, abstained=True, abstain_kind="weak", abstain_reason="Too weak a match.", class_key=None,
                        sentence=None) for d in real(bundle, images, panel)]

    monkeypatch.setattr(cases, "describe_batch", doubtful)
    at = choose_sample(run_app())
    assert not [m.label for m in at.metric if "onfidence" in m.label]
    small_print = [c.value for c in at.caption if c.value.startswith("Closest sentence, not asserted: ")]
    assert len(small_print) == 1 and small_print[0].endswith("%.") and "; confidence (not calibrated): " in small_print[0]


def test_the_model_card_names_the_classes_it_counts():
    from types import SimpleNamespace

    from core.panels import load_panels
    from ui.model_card import data_counts_frame

    bundle = SimpleNamespace(panels=load_panels(),
                             sidecar={"training": {"data_counts": {"ig": 3, "pro_b": 2, "unheard_of": 1}}})
    frame = data_counts_frame(bundle)
    assert frame["name"].tolist() == ["Immature granulocyte", "Pro-B ALL", "", ""]
    assert frame["training images"].tolist() == [3, 2, 1, 6]
