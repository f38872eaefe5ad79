"""Expert feedback on one described case: Agree / Disagree / Unsure, each click one
transaction appending one feedback row; then who verified it and the image's history."""
from __future__ import annotations

import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

from core.panels import Panel
from core.store import PredictionRecord, add_feedback, image_history, latest_verification, store_error_message
from ui.cases import Case
from ui.resources import Store
from ui.widgets import VERDICT_BUTTONS, VERDICT_LABELS, class_name, history_frame, md_escape, verification_text

FORM_GENERATION = "describe_fb_generation_"  # + prediction id: how many feedbacks this session saved
SAVED_MESSAGE = "describe_fb_saved_"  # + prediction id: the confirmation shown after the rerun
DRAFT = "describe_fb_draft_"  # + image, panel, model: the fields as last typed, kept while another case is open


def save_feedback(store: Store, prediction_id: int, verdict: str, reviewer: str, *,
                  corrected_class: str | None = None, corrected_sentence: str | None = None,
                  comment: str | None = None) -> int:
    """Append one feedback row in its own transaction; returns its id.
    Raises ValueError (invalid input, message readable) or SQLAlchemyError."""
    with store.sessionmaker.begin() as s:
        prediction = s.get(PredictionRecord, prediction_id)
        if prediction is None:
            raise ValueError("this prediction is no longer in the database")
        return add_feedback(s, prediction, verdict=verdict, reviewer=reviewer, corrected_class=corrected_class,
                            corrected_sentence=corrected_sentence, comment=comment).id


def saved_message(verdict: str, reviewer: str, fields: dict, abstained: bool = False) -> str:
    """The confirmation after a saved click; a disagreement without a correction says so, since
    it records only that the answer was wrong (or, on an abstention, that the model should have
    answered)."""
    corrected = fields.get("corrected_class") or (fields.get("corrected_sentence") or "").strip()
    meaning = "the model should have answered" if abstained else "the answer is wrong"
    note = f" (no correction given: recorded as '{meaning}')" if verdict == "disagree" and not corrected else ""
    return f"Saved: {VERDICT_LABELS.get(verdict, verdict)} by {md_escape(reviewer)}{note}."


def _form_suffix(prediction_id: int) -> str:
    """Widget-key suffix of one case's form: its own fields (nothing typed for one case can be
    sent with another), renewed after each saved click so the saved form comes back empty."""
    return f"{prediction_id}_{st.session_state.get(f'{FORM_GENERATION}{prediction_id}', 0)}"


def _draft_key(panel: Panel, case: Case) -> str:
    """Session key of a case's unsent fields: the image, panel and model rather than the
    prediction, because an image opened again after its input was closed (another sample
    picked, the upload cleared) is described and recorded anew, and the draft is still its."""
    return f"{DRAFT}{case.sha256}_{panel.name}_{case.description.weights_sha256}"


def _keep_draft(draft_key: str, widget_key: str, field: str) -> None:
    """on_change: copy a field into a plain session key. Streamlit drops a widget's state in a run
    that does not draw it, so without this, opening another case would discard what was typed."""
    st.session_state.setdefault(draft_key, {})[field] = st.session_state[widget_key]


def _field_key(draft_key: str, suffix: str, field: str) -> str:
    """The widget key of one field, re-filled from its draft when the case is opened again."""
    key = f"describe_fb_{field}_{suffix}"
    draft = st.session_state.get(draft_key, {})
    if key not in st.session_state and field in draft:
        st.session_state[key] = draft[field]
    return key


def _form(panel: Panel, case: Case, reviewer: str) -> tuple[str | None, dict]:
    """The feedback fields and buttons; returns (clicked verdict or None, the fields). Plain
    widgets, not an st.form: a form sends nothing until a button is clicked, so text typed for a
    case would be lost when another case is opened. A refused click keeps what was typed."""
    suffix, draft = _form_suffix(case.prediction_id), _draft_key(panel, case)
    keys = {field: _field_key(draft, suffix, field) for field in ("class", "sentence", "comment")}
    with st.container(border=True):
        if case.description is not None and case.description.abstained:  # else Agree reads as "agree with what?"
            st.caption("The model gave no sentence for this image: Agree means it was right not to answer; "
                       "Disagree says it should have answered, and with a class or a sentence, what the cell is.")
        st.caption("Disagree alone records that the answer is wrong; add a class of the panel or your own "
                   "sentence to say what the cell is. What you type is sent with the button you click, and kept "
                   "for this case until then.")
        corrected = st.selectbox("Correct class (for Disagree)", panel.keys, index=None, placeholder="-",
                                 format_func=lambda k: panel.cell_class(k).name, key=keys["class"],
                                 on_change=_keep_draft, args=(draft, keys["class"], "class"))
        sentence = st.text_input("Or a corrected sentence (for Disagree)", key=keys["sentence"],
                                 max_chars=1000, on_change=_keep_draft, args=(draft, keys["sentence"], "sentence"))
        comment = st.text_area("Comment (optional)", key=keys["comment"], max_chars=5000,
                               height=80, on_change=_keep_draft, args=(draft, keys["comment"], "comment"))
        clicked = None
        for column, (verdict, label) in zip(st.columns(len(VERDICT_BUTTONS)), VERDICT_BUTTONS):
            if column.button(label, key=f"describe_fb_{verdict}_{suffix}", disabled=not reviewer,
                             type="primary" if verdict == "agree" else "secondary"):
                clicked = verdict
    return clicked, {"corrected_class": corrected, "corrected_sentence": sentence, "comment": comment}


def render_feedback(store: Store, panel: Panel, case: Case, reviewer: str) -> None:
    """Feedback buttons (when the case is recorded and a reviewer is named), then the
    verification line and the image's history."""
    st.subheader("Expert feedback")
    if not store.available:
        st.info("Feedback cannot be saved: the feedback database is unavailable.")
        return
    if case.prediction_id is None:
        st.info("This case was not recorded, so feedback cannot be attached to it.")
        return
    if not reviewer:
        st.info("Enter your name in the sidebar (Reviewer name) to record feedback.")
    saved = st.session_state.pop(f"{SAVED_MESSAGE}{case.prediction_id}", None)
    if saved:
        st.success(saved)
    verdict, fields = _form(panel, case, reviewer)
    if verdict is not None:
        try:
            save_feedback(store, case.prediction_id, verdict, reviewer, **fields)
        except ValueError as error:
            st.error(f"Not saved: {md_escape(error)}.")
        except SQLAlchemyError as error:
            st.error(store_error_message(error, "the configured database"))
        else:
            st.session_state.pop(_draft_key(panel, case), None)
            generation = f"{FORM_GENERATION}{case.prediction_id}"
            st.session_state[generation] = st.session_state.get(generation, 0) + 1  # next run: an empty form
            st.session_state[f"{SAVED_MESSAGE}{case.prediction_id}"] = saved_message(
                verdict, reviewer, fields, case.description is not None and case.description.abstained)
            st.rerun()
    answer = (case.description.class_key, case.description.abstained)
    render_history(store, case.sha256, case.image_id, panel.name, case.description.weights_sha256, answer, panel)


def render_history(store: Store, sha256: str, image_id: int | None, panel_name: str, weights_sha256: str,
                   answer: tuple[str | None, bool], panel: Panel | None = None) -> None:
    """'Verified by X at T' (the latest agree/disagree on the image's predictions by this panel
    and these model weights that gave this `answer`, (class key, abstained): the description
    being shown, not another model's, panel's or calibration's) and the image's whole history
    in an expander. `panel` names the classes (raw keys without it)."""
    try:
        with store.reading() as s:
            verification = (latest_verification(s, image_id, panel_name, weights_sha256, answer)
                            if image_id is not None else None)
            events = image_history(s, sha256)
    except SQLAlchemyError as error:
        st.warning(store_error_message(error, "the configured database"))
        return
    name = (lambda key: class_name(panel, key)) if panel else str  # a key of another panel stays a key
    text = verification_text(verification, name)
    if text:  # green only when the expert agrees: a disagreement is no success
        (st.success if verification["verdict"] == "agree" else st.warning)(text)
    else:
        st.caption("Not verified by an expert yet.")
    with st.expander(f"History of this image ({len(events)} event{'s' if len(events) != 1 else ''})"):
        st.dataframe(history_frame(events, name), hide_index=True)
