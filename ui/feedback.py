"""Expert feedback on one described case: Agree / Disagree / Unsure, each click one
transaction appending one feedback row; then who verified it and the image's history."""
from __future__ import annotations

import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

from core.panels import Panel
from core.store import PredictionRecord, add_feedback, image_history, latest_verification, store_error_message
from ui.cases import Case
from ui.resources import Store
from ui.widgets import class_name, history_frame, md_escape, verification_text

VERDICT_BUTTONS = (("agree", "Agree"), ("disagree", "Disagree"), ("unsure", "Unsure"))
FORM_GENERATION = "describe_fb_generation_"  # + prediction id: how many feedbacks this session saved
SAVED_MESSAGE = "describe_fb_saved_"  # + prediction id: the confirmation shown after the rerun


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


def _form_suffix(prediction_id: int) -> str:
    """Widget-key suffix of one case's form: its own fields (nothing typed for one case can be
    sent with another), renewed after each saved click so the saved form comes back empty."""
    return f"{prediction_id}_{st.session_state.get(f'{FORM_GENERATION}{prediction_id}', 0)}"


def _form(panel: Panel, case: Case, reviewer: str) -> tuple[str | None, dict]:
    """The feedback form; returns (clicked verdict or None, its fields). Not cleared on submit:
    a refused click keeps what the reviewer typed."""
    suffix = _form_suffix(case.prediction_id)
    with st.form(f"describe_feedback_{suffix}", clear_on_submit=False, border=True):
        st.caption("If you disagree, say what the cell is (a class of the panel, or your own sentence). "
                   "What you type is sent with the button you click; opening another case first discards it.")
        corrected = st.selectbox("Correct class (for Disagree)", panel.keys, index=None, placeholder="-",
                                 format_func=lambda k: panel.cell_class(k).name, key=f"describe_fb_class_{suffix}")
        sentence = st.text_input("Or a corrected sentence (for Disagree)", key=f"describe_fb_sentence_{suffix}",
                                 max_chars=1000)
        comment = st.text_area("Comment (optional)", key=f"describe_fb_comment_{suffix}", max_chars=5000, height=80)
        clicked = None
        for column, (verdict, label) in zip(st.columns(len(VERDICT_BUTTONS)), VERDICT_BUTTONS):
            if column.form_submit_button(label, key=f"describe_fb_{verdict}_{suffix}", disabled=not reviewer,
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
            generation = f"{FORM_GENERATION}{case.prediction_id}"
            st.session_state[generation] = st.session_state.get(generation, 0) + 1  # next run: an empty form
            st.session_state[f"{SAVED_MESSAGE}{case.prediction_id}"] = f"Saved: {verdict} by {md_escape(reviewer)}."
            st.rerun()
    render_history(store, case.sha256, case.image_id, panel.name, case.description.weights_sha256, panel)


def render_history(store: Store, sha256: str, image_id: int | None, panel_name: str, weights_sha256: str,
                   panel: Panel | None = None) -> None:
    """'Verified by X at T' (the latest agree/disagree on the image's predictions by this panel
    and these model weights: the description being shown, not another model's or panel's) and
    the image's whole history in an expander. `panel` names the classes (raw keys without it)."""
    try:
        with store.sessionmaker() as s:
            verification = (latest_verification(s, image_id, panel_name, weights_sha256)
                            if image_id is not None else None)
            events = image_history(s, sha256)
    except SQLAlchemyError as error:
        st.warning(store_error_message(error, "the configured database"))
        return
    text = verification_text(verification, (lambda key: class_name(panel, key)) if panel else str)
    if text:  # green only when the expert agrees: a disagreement is no success
        (st.success if verification["verdict"] == "agree" else st.warning)(text)
    else:
        st.caption("Not verified by an expert yet.")
    with st.expander(f"History of this image ({len(events)} event{'s' if len(events) != 1 else ''})"):
        st.dataframe(history_frame(events), hide_index=True)
