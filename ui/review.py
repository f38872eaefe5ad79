"""Feedback review helpers: filters over the feedback table and re-opening a stored case."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from core.imageio import ImageRejected, LoadedImage, load_image_bytes
from core.panels import Panel, load_panels
from core.store import VERDICTS, ImageRecord, feedback_table, store_error_message
from core.store_queries import ABSTAINED_LABEL
from core.typicality import typicality_band
from ui.feedback import render_history
from ui.resources import Store
from ui.widgets import (VERDICT_LABELS, framed, md_escape, remember_choice, restore_widget,
                        percent, select_by_identity, table_confidence, when)


TABLE_COLUMNS = ["feedback_id", "created_at", "reviewer", "verdict", "model_class", "expert_class",
                 "confidence", "panel", "abstained", "atypical", "sentence", "corrected_sentence", "comment",
                 "original_name", "model_id", "calibration_id", "prediction_id", "image_id"]

# Long hashes and database ids: what a reviewer rarely reads and what pushed the table past the screen
# width; the table hides them unless asked, the CSV export always has them.
IDENTIFIER_COLUMNS = ("model_id", "calibration_id", "prediction_id", "image_id")
SHOW_IDENTIFIERS = "Show record identifiers"


def table_columns(show_identifiers: bool) -> list[str]:
    """The feedback table's columns in display order, the identifier columns only when asked for."""
    return [c for c in TABLE_COLUMNS if show_identifiers or c not in IDENTIFIER_COLUMNS]


def load_rows(store: Store, names: dict[str, str] | None = None,
              panel_titles: dict[str, str] | None = None) -> list[dict] | None:
    """Filter widgets (reviewer, verdict, panel, class, model) and the matching feedback rows;
    None (after a warning) when the database cannot be read. `names` shows class keys as a
    hematologist reads them (see `ui.widgets.class_names`), `panel_titles` panel keys by title;
    verdicts are named as the feedback buttons name them."""
    try:
        with store.reading() as s:
            everything = feedback_table(s)
            classes = sorted({r["model_class"] for r in everything if r["model_class"]})
            columns = st.columns(5)
            chosen = {
                "reviewer": _filter(columns[0], "Reviewer", {r["reviewer"] for r in everything}, "review_reviewer"),
                "verdict": _filter(columns[1], "Verdict", set(VERDICTS), "review_verdict", VERDICT_LABELS),
                "panel": _filter(columns[2], "Panel", {r["panel"] for r in everything}, "review_panel", panel_titles),
                "class_key": _filter(columns[3], "Model class", set(classes), "review_class",
                                     dict(zip(classes, shown_labels(classes, names)))),
                "model_id": _filter(columns[4], "Model", {r["model_id"] for r in everything}, "review_model"),
            }
            return feedback_table(s, **chosen)
    except SQLAlchemyError as error:
        st.warning(store_error_message(error, "the configured database"))
        return None


def _filter(column, label: str, values: set[str], key: str, labels: dict[str, str] | None = None) -> str | None:
    # the value stays the key (what the query filters on); only its label is shown, and a key
    # without one (a panel or class of another model) is shown as it is
    def shown(value: str) -> str:
        return (labels or {}).get(value, value)
    options = sorted(values, key=shown)
    chosen = column.selectbox(label, options, index=None, placeholder="All", key=restore_widget(key, options),
                              format_func=shown)
    remember_choice(key, chosen)  # a filter that reset silently on the way back would widen the table and CSV
    return chosen


def shown_class(key, names: dict[str, str] | None):
    """A class key as the page shows it: its display name, or the key itself when no panel names it
    (a class of another model) and empty values as they are."""
    if not key or not isinstance(key, str):
        return key
    return (names or {}).get(key, key)


def shown_labels(keys: list[str], names: dict[str, str] | None) -> list[str]:
    """Axis labels for class keys: display names, with the key added to any name two keys share (a
    chart merges equal labels, which would add one class's counts to another's)."""
    shown = [shown_class(key, names) for key in keys]
    repeated = {label for label in shown if shown.count(label) > 1}
    return [f"{label} ({key})" if label in repeated else label for label, key in zip(shown, keys)]


def rows_frame(rows: list[dict], names: dict[str, str] | None = None,
               panel_titles: dict[str, str] | None = None) -> pd.DataFrame:
    """feedback_table rows as a display table (times as text, classes, verdicts and panels by
    name as the filters show them, fixed column order)."""
    frame = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    frame["created_at"] = [when(v) for v in frame["created_at"]]
    frame["panel"] = [(panel_titles or {}).get(v, v) for v in frame["panel"]]
    # the model names no class when it abstained: said as the per-class table below says it, not "None"
    frame["model_class"] = [shown_class(v, names) if isinstance(v, str) and v else ABSTAINED_LABEL
                            for v in frame["model_class"]]
    frame["expert_class"] = [shown_class(v, names) for v in frame["expert_class"]]
    frame["verdict"] = [VERDICT_LABELS.get(v, v) for v in frame["verdict"]]  # as the buttons and the filter say it
    # An abstention's top score may belong to an image that is no cell at all, or to a panel
    # that was never validated: not a confidence, so not shown as one (the CSV keeps it).
    frame["confidence"] = [table_confidence(c) if not abstained and c == c else None  # c == c: not NaN
                           for c, abstained in zip(frame["confidence"].astype(float), frame["abstained"].astype(bool))]
    return frame


def pooling_note(rows: list[dict]) -> str | None:
    """A caption when the rows' agreement figures pool several models or panels (agreement with
    one model on one panel is what means something), or one model's answers under several
    calibrations (which cases it answered may differ); None when they do not."""
    models, panels = len({row["model_id"] for row in rows}), len({row["panel"] for row in rows})
    if models <= 1 and panels <= 1:
        calibrations = {row.get("calibration_id") for row in rows} - {None}
        if len(calibrations) <= 1:
            return None
        return (f"These figures pool the answers of {len(calibrations)} calibrations of one model (column "
                f"calibration_id, shown with '{SHOW_IDENTIFIERS}'): its sentences are the same, but which cases it answered and with what confidence "
                "may differ between them.")
    return (f"These figures pool {models} model(s) and {panels} panel(s); filter by model and panel to compare "
            "like with like.")


FEW_VERDICTS = 20  # decided verdicts below which an agreement rate is called rough


def typicality_rows(summary: dict) -> list[dict]:
    """agreement_summary's split by the atypical mark as display rows (typical first); the rate in
    percent, as the page's other figures."""
    return [{"answers": label, **figures, "agreement_rate": as_percent(figures["agreement_rate"])}
            for label, figures in summary["by_typicality"].items()]


def per_class_rows(summary: dict, names: dict[str, str] | None = None) -> list[dict]:
    """agreement_summary's per-class figures as display rows (classes by name), the rate in percent."""
    return [{"model class": shown_class(key, names), **figures, "agreement_rate": as_percent(figures["agreement_rate"])}
            for key, figures in summary["per_class"].items()]


def as_percent(rate: float | None) -> float | None:
    """A 0-1 rate in percent, for a '%.0f%%' column (the page shows whole percents throughout)."""
    return None if rate is None else 100 * rate


def home_band_note(bundle, rows: list[dict]) -> str | None:
    """What the atypical mark meant on the training lab's held-out cells, when the answered rows
    (those the split counts) are all the loaded model's answers on one panel (None otherwise, or
    when it has no band for the panel): the figures the experts' agreement here can be held against."""
    answered = [row for row in rows if row["model_class"]]
    panels, models = {row["panel"] for row in answered}, {row["model_id"] for row in answered}
    if bundle is None or len(panels) != 1 or models != {bundle.model_id}:
        return None  # another model's band says nothing of these answers
    if {row.get("calibration_id") for row in answered} - {bundle.calibration_id, None}:
        return None  # marked under another calibration's band
    panel = next(iter(panels))
    band = typicality_band(bundle.sidecar, panel)
    if band is None:
        return None
    title = bundle.panels[panel].title if panel in bundle.panels else panel
    return (f"Panel {title}: on the training lab's held-out cells, answers marked atypical were right "
            f"{band['accuracy_above']:.0%} of the time ({band['n_held_out_above']} answers) and the others "
            f"{band['accuracy_below']:.0%}. Agreement here far below those says the model does not suit these "
            "slides; typical answers that experts often reject say the mark misses what differs here. A rate "
            f"resting on fewer than {FEW_VERDICTS} decided verdicts is rough: a few more can move it a lot.")


def stored_image(store: Store, upload_dir: Path, sha256: str) -> LoadedImage | str:
    """The stored copy of an image, decoded safely; or a sentence saying why not."""
    with store.reading() as s:
        record = s.scalar(select(ImageRecord).where(ImageRecord.sha256 == sha256))
    if record is None:
        return "This image is not in the database."
    root = Path(upload_dir).resolve()
    path = (root / record.stored_path).resolve()
    if not path.is_relative_to(root):  # stored paths come from hashes; never follow anything else
        return "The stored path of this image is outside the upload folder; not shown."
    try:
        return load_image_bytes(path.read_bytes(), path.name)
    except OSError:
        return f"The stored copy {md_escape(record.stored_path)} is missing from the upload folder."
    except ImageRejected as error:
        return f"The stored copy cannot be shown: {md_escape(error)}"


def reopen_case(store: Store, upload_dir: Path, rows: list[dict], panels: dict[str, Panel]) -> None:
    """Pick a feedback row; show its stored image, what the model said and the history.
    `panels` name the classes (the loaded model's, see `naming_panels`)."""
    by_id = {r["feedback_id"]: r for r in rows}

    def label(feedback_id: int) -> str:
        r = by_id[feedback_id]
        verdict = VERDICT_LABELS.get(r["verdict"], r["verdict"])  # as the buttons and the table name it
        return f"#{r['feedback_id']} {r['original_name']} - {verdict} by {r['reviewer']} ({when(r['created_at'])})"

    # The value is the feedback row's id: a filter that reorders or drops rows cannot swap the case.
    chosen = select_by_identity("Re-open a case", list(by_id), "review_open", label,
                                placeholder="Choose a feedback row", allow_none=True)
    if chosen is None:
        return
    row = by_id[chosen]
    image = stored_image(store, upload_dir, row["sha256"])
    left, right = st.columns([1, 2])
    if isinstance(image, str):
        left.warning(image)
    else:
        left.image(framed(image.image), width=260)
    with right:
        st.text(row["original_name"])
        st.markdown("Model said: " + md_escape(row["sentence"]))
        # An abstention's top score may belong to an image that is no cell at all: not shown as a confidence.
        detail = "" if row["abstained"] else f", confidence {percent(row['confidence'])}"
        detail += ", marked atypical" if row.get("atypical") else ""
        panel = panels[row["panel"]].title if row["panel"] in panels else row["panel"]
        st.caption(f"Model {md_escape(row['model_id'])}, panel {md_escape(panel)}{detail}")
    # the verification of this row's description (its panel and model weights), as the Describe
    # page shows it: a verdict on an older model's answer would read as agreeing with this one
    render_history(store, row["sha256"], row["image_id"], row["panel"], row["weights_sha256"],
                   (row["model_class"], row["abstained"]), panels.get(row["panel"]))


def naming_panels(bundle) -> dict[str, Panel]:
    """The panels that name a re-opened case's classes: the loaded model's (its sidecar may
    name classes the shipped panels lack), completed by the shipped ones for panels it lacks
    (a case stored under another model); the shipped ones alone when no model loads."""
    shipped = load_panels()
    return shipped if bundle is None else {**shipped, **bundle.panels}
