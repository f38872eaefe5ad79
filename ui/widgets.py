"""Reusable display pieces: plain-text safety, charts, history tables, panel choice.

User-supplied strings (file names, reviewer names, comments) are never rendered as HTML and
never as live Markdown: they go through `md_escape` or into `st.text` / `st.dataframe`.
"""
from __future__ import annotations

import hashlib
import math
import string
from datetime import datetime

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from PIL import Image, ImageOps

from core.checkpoint import ModelBundle
from core.describe import Description, default_panel
from core.panels import Panel
from core.reliability import is_calibrated

_MD_SPECIAL = frozenset(string.punctuation)
VERDICT_BUTTONS = (("agree", "Agree"), ("disagree", "Disagree"), ("unsure", "Unsure"))
VERDICT_LABELS = dict(VERDICT_BUTTONS)  # "agree" -> "Agree": tables say it as the buttons do

DISCLAIMER = ("A teaching and review aid for blood-cell morphology, not a diagnostic device. "
              "Every sentence must be checked by a qualified person.")


def md_escape(text: object) -> str:
    """`text` with every ASCII punctuation character backslash-escaped, so Markdown
    elements (st.success, st.caption ...) show it literally: no links, images, emphasis,
    colour directives or HTML. Newlines become spaces."""
    out = []
    for char in " ".join(str(text).split()):
        out.append("\\" + char if char in _MD_SPECIAL else char)
    return "".join(out)


def percent(probability: float) -> str:
    """A confidence as a whole percentage, never "100%" nor "0%": a calibrated 0.997 is not
    certainty, and rounding it up would read as if the model could not be wrong."""
    if probability >= 0.995:
        return ">99%"
    if 0 < probability < 0.005:
        return "<1%"
    return f"{probability:.0%}"


def table_confidence(probability: float) -> float:
    """A confidence for a table column shown to 3 decimals: truncated and at most 0.999, since
    0.9996 rounded to "1.000" would read as certainty (see `percent`)."""
    return min(math.floor(probability * 1000) / 1000, 0.999)


def when(value: datetime | None) -> str:
    """A UTC timestamp as 'YYYY-MM-DD HH:MM UTC' ('' for None)."""
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else ""


def model_sidebar(bundle: ModelBundle) -> None:
    """Model identity in the sidebar, so every screenshot says which model spoke."""
    st.sidebar.caption(f"Model: {md_escape(bundle.model_id)}")
    st.sidebar.caption(f"Weights sha256: {bundle.weights_sha256[:12]}")
    # a recalibration keeps the weights; this is the id stored with each answer (Feedback review)
    views = f" · each image seen in {bundle.views} turns" if bundle.views > 1 else ""
    st.sidebar.caption(f"Calibration: {bundle.calibration_id or 'none (raw confidences)'}{views}")
    st.sidebar.caption(DISCLAIMER)


def kept_choice(key: str, options: list, default):
    """The option chosen in this session under `key` when it is still one of `options`, else
    `default`. Streamlit drops a widget's state when another page runs, so a choice coming back
    from Model card would be reset; `remember_choice` keeps it under a plain session key."""
    kept = st.session_state.get(f"{key}_kept")
    return kept if kept in options else default


def remember_choice(key: str, value) -> None:
    """Keep a widget's current value under a plain session key (read by `kept_choice`)."""
    st.session_state[f"{key}_kept"] = value


def restore_widget(key: str, options=None, default=None) -> str:
    """Before drawing the widget `key`: put back the value it had when this session last drew it
    (kept by `remember_choice` after each draw), or `default` the first time. Streamlit drops a
    widget's state in a run of another page, so filters and queries would silently reset on the
    way back. A kept value that is no longer one of `options` is dropped. Pass the widget no
    value or index of its own: Streamlit warns when both set it. Returns `key`."""
    kept = st.session_state.get(f"{key}_kept", default)
    if key not in st.session_state and kept is not None and (options is None or kept in options):
        st.session_state[key] = kept
    return key


def panel_select(bundle: ModelBundle, key: str, validated_only: bool = False) -> Panel:
    """Select box of the model's panels (default: first validated; the panel chosen earlier in
    the session, when coming back from another page); warns when the chosen panel is not
    validated. `validated_only` leaves unvalidated panels out (the quiz: no labelled images)."""
    names = [n for n in bundle.panels if bundle.panels[n].validated or not validated_only] or list(bundle.panels)
    choice = kept_choice(key, names, default_panel(bundle))
    name = st.selectbox("Panel of sentences", names, index=names.index(choice), key=key,
                        format_func=lambda n: bundle.panels[n].title,
                        help="The set of sentences the image is compared with.")
    remember_choice(key, name)
    panel = bundle.panels[name]
    if not panel.validated:
        st.warning(panel.warning or "This panel is not validated: its scores are not evidence of anything.")
    return panel


def panel_calibrated(bundle: ModelBundle, panel: Panel) -> bool:
    """Whether the panel's probabilities were calibrated on val (never for a panel without images)."""
    return panel.validated and is_calibrated(bundle, panel.name)  # a degenerate fit counts as none


def confidence_label(bundle: ModelBundle, panel: Panel) -> str:
    """What the top probability may be called for this panel."""
    if not panel.validated:
        return "Score, not a confidence (panel not validated)"
    return "Calibrated confidence" if panel_calibrated(bundle, panel) else "Confidence (not calibrated)"


def scores_meaningless(description: Description) -> bool:
    """True when the image was refused as no cell of the panel (blank, noise, out of scope):
    its panel scores then describe nothing and are not shown as a confidence."""
    return description.abstain_kind in ("content", "out_of_scope")


def confidence_shown(description: Description) -> bool:
    """True when the top probability may be shown as a confidence: the image is a cell of the
    panel and the panel was validated (an unvalidated panel's numbers are only scores)."""
    return description.panel_validated and not scores_meaningless(description)


def neighbour_caption(panel: Panel, description: Description) -> str | None:
    """The types of the training cells most similar to the image (core.neighbours), as a caption;
    None for a model that keeps no reference cells."""
    vote = description.neighbours
    if not vote or not vote["k"]:
        return None
    ranked = sorted(vote["counts"].items(), key=lambda kv: -kv[1])
    listed = ", ".join(f"{class_name(panel, key)} {n}" for key, n in ranked)
    return f"Of the {vote['k']} most similar training cells: {listed}."


def class_names(panels: dict[str, Panel]) -> dict[str, str]:
    """Class key -> display name over all panels ('ig' -> 'Immature granulocyte'), for tables that
    mix panels (the review page, the model card's training data); a CSV export keeps the keys."""
    return {cell_class.key: cell_class.name for panel in panels.values() for cell_class in panel.classes}


def class_name(panel: Panel, key: str | None, missing: str = "Uncertain") -> str:
    """The class's display name ('Immature granulocyte', not 'ig'); `missing` for None, the key
    itself for a key the panel does not hold."""
    if not key:
        return missing
    return panel.cell_class(key).name if key in panel.keys else key


def select_by_identity(label: str, options: list, key: str, format_func, *, placeholder: str | None = None,
                       allow_none: bool = False, container=st):
    """A select box whose values are identities (an image hash, a row id), not positions: when the
    options change order, shrink or are relabelled (another panel, a filter, a new upload), the same
    item stays chosen, or the first / none when it is gone, so the label always names what the page
    shows. The browser sends the choice back as its *label*; a label that changed would match no
    option and Streamlit would silently pick another. So the widget is keyed by its labels (a new
    widget whenever any label changes) and the choice itself is kept under a plain session key."""
    labels = [str(format_func(option)) for option in options]
    version = hashlib.sha1("\n".join(labels).encode()).hexdigest()[:12]
    chosen = st.session_state.get(f"{key}_chosen")
    index = options.index(chosen) if chosen in options else (None if allow_none or not options else 0)
    widget = f"{key}_{version}"

    def remember() -> None:  # runs before the script, so a pick survives labels changing in that run
        st.session_state[f"{key}_chosen"] = st.session_state.get(widget)

    value = container.selectbox(label, options, key=widget, format_func=format_func, placeholder=placeholder,
                                index=index, on_change=remember)
    st.session_state[f"{key}_chosen"] = value
    return value


def score_chart(description: Description, panel: Panel, calibrated: bool = True) -> go.Figure:
    """Horizontal bars: probability of every sentence of the panel (the sentence itself in
    the hover), the described class highlighted; the axis says whether it is calibrated."""
    keys = sorted(panel.keys, key=lambda k: description.scores.get(k, 0.0))
    chosen = description.class_key or description.best_class
    names = [panel.cell_class(k).name for k in keys]
    colours = ["#c0392b" if k == chosen else "#7f8c8d" for k in keys]
    scores = [description.scores.get(k, 0.0) for k in keys]
    # labels by `percent`: a bar never reads "100%" (certainty) nor "0%"
    figure = go.Figure(go.Bar(
        x=scores, y=names, orientation="h", text=[percent(s) for s in scores],
        marker_color=colours, customdata=[panel.cell_class(k).sentence for k in keys],
        hovertemplate="%{customdata}<br>probability %{text}<extra></extra>",
        texttemplate="%{text}", textposition="outside"))
    axis_title = "calibrated probability" if calibrated else "probability (not calibrated)"
    if not panel.validated:
        axis_title = "score (panel not validated: not a probability of being right)"
    figure.update_layout(xaxis={"range": [0, 1.1], "tickformat": ".0%", "title": axis_title},
                         height=max(220, 34 * len(keys) + 80), margin={"l": 10, "r": 10, "t": 30, "b": 10},
                         title="Score of every sentence of the panel")
    return figure


def confusion_figure(labels: list[str], matrix: list[list[int]]) -> go.Figure:
    """Expert (rows) versus model (columns) counts as an annotated heatmap."""
    figure = go.Figure(go.Heatmap(z=matrix, x=labels, y=labels, colorscale="Blues", zmin=0,
                                  zmax=max([1, *(max(row) for row in matrix)]), text=matrix,
                                  texttemplate="%{text}", hovertemplate="expert %{y}<br>model %{x}<br>%{z} cases"
                                  "<extra></extra>"))
    figure.update_layout(xaxis_title="model class", yaxis_title="expert class", yaxis_autorange="reversed",
                         height=max(300, 45 * len(labels) + 120), margin={"t": 30})
    return figure


def history_frame(events: list[dict], name=str) -> pd.DataFrame:
    """image_history events as a plain table (oldest first). `name` turns a class key into what the
    page shows ("Immature granulocyte", not "ig"). An abstention shows no confidence (its top score
    may belong to no cell at all), and the same answer given again (the image uploaded again to the
    same model) is one row saying how often, so an expert's rows do not drown among repeats."""
    rows, last_answer = [], None
    for e in events:
        if e["kind"] == "prediction":
            answer = (e["model_id"], e["panel"], e["class_key"], e["sentence"], e["confidence"], e["abstained"])
            if answer == last_answer:  # a repeat of the row just above: count it there
                rows[-1]["repeats"] += 1
                rows[-1]["when"] = when(e["created_at"])
                continue
            last_answer = answer
            rows.append({"when": when(e["created_at"]), "event": "model", "who": e["model_id"], "verdict": "",
                         "class": name(e["class_key"]) if e["class_key"] else "(uncertain)", "text": e["sentence"],
                         "confidence": None if e["abstained"] else round(e["confidence"], 3),
                         "panel": e["panel"], "repeats": 1})
        else:
            last_answer = None
            rows.append({"when": when(e["created_at"]), "event": "expert", "who": e["reviewer"],
                         "verdict": VERDICT_LABELS.get(e["verdict"], e["verdict"]),
                         "class": name(e["expert_class"]) if e["expert_class"] else "",
                         "text": " / ".join(t for t in (e["corrected_sentence"], e["comment"]) if t),
                         "confidence": None, "panel": "", "repeats": 1})
    for row in rows:
        repeats = row.pop("repeats")
        if repeats > 1:
            row["event"] = f"model (the same answer {repeats} times; the time is the last one's)"
    return pd.DataFrame(rows, columns=["when", "event", "who", "verdict", "class", "text", "confidence", "panel"])


def verification_text(verification: dict | None, name=str) -> str | None:
    """'Verified by X at T: ...' for a latest_verification() result (Markdown-escaped); `name`
    turns a class key into what the page shows (e.g. `class_name` of the panel)."""
    if not verification:
        return None
    head = f"Verified by {md_escape(verification['reviewer'])} at {when(verification['created_at'])}"
    if verification["verdict"] == "agree":
        return f"{head}: agrees with the model."
    text = f"{head}: disagrees with the model"
    if verification.get("expert_class"):
        text += f"; expert class {md_escape(name(verification['expert_class']))}"
    if verification.get("corrected_sentence"):  # e.g. the class is right but the sentence is not
        text += f"; the expert's sentence: \u201c{md_escape(verification['corrected_sentence'])}\u201d"
    return text + "."


def table_or_info(frame: pd.DataFrame | None, key: str, missing: str, caption: str) -> None:
    """A measured table with its caption, or an info box saying it was not measured."""
    if frame is None:
        st.info(missing)
        return
    st.caption(caption)
    st.dataframe(frame, hide_index=True, key=key)


MAX_SHOWN_ASPECT = 2.0  # wider or taller images are shown padded to a square


def framed(image: Image.Image) -> Image.Image:
    """The image as the pages show it: a long narrow strip padded with white to a square, so a
    16 x 1024 upload neither towers 16,000 px down the page at a fixed width nor shrinks to a
    line; other images unchanged."""
    width, height = image.size
    if max(width, height) <= MAX_SHOWN_ASPECT * min(width, height):
        return image
    return ImageOps.pad(image.convert("RGB"), (max(width, height),) * 2, color="white")


def label_name(panels: dict[str, Panel], label: str) -> str:
    """A folder or expert label as a class name ("pro_b" -> "Pro-B ALL"), from the first panel
    with a class it names (`Panel.key_for_label`); the label itself when none has one."""
    for panel in panels.values():
        key = panel.key_for_label(label)
        if key is not None:
            return panel.cell_class(key).name
    return label
