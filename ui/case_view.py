"""The Describe page's result views: the batch table, the case picker and one open case
(sentence or Uncertain state, scores chart, Grad-CAM overlay with an opacity slider)."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from core.checkpoint import ModelBundle
from core.describe import Description
from core.morphology import (
    DEFAULT_PHRASE_THRESHOLD, has_morphology, is_colourless, stated_phrase_accuracy,
)
from core.explain import overlay
from core.panels import Panel
from core.preprocess import square_resize
from core.site_shift import batch_shift, home_out_of_scope_rate, shift_message
from core.typicality import atypical_note, typicality_band
from ui.cases import ATTRIBUTE_TARGET, Case, cached_heatmap, case_morphology
from ui.widgets import (
    class_name, confidence_label, confidence_shown, framed, md_escape, neighbour_caption, panel_calibrated,
    percent, score_chart, scores_meaningless, select_by_identity, table_confidence,
)


def doubtful_first(cases: list[Case]) -> list[Case]:
    """Described cases: refused as no cell of the panel first, then other abstentions, then the
    answers marked atypical (`core.typicality`), then the rest; by confidence ascending within
    each group."""
    described = [c for c in cases if c.description is not None]
    return sorted(described, key=lambda c: (not scores_meaningless(c.description), not c.description.abstained,
                                            not c.description.atypical, c.description.confidence))


def _answer_confidence(d: Description) -> float | None:
    """The confidence column: for answers only. An abstention's top probability is how close its
    best match came, not a confidence in anything the page says: it gets its own column."""
    return table_confidence(d.confidence) if confidence_shown(d) and not d.abstained else None


def _best_match(panel: Panel, d: Description) -> str:
    """'Monocyte (78%)' for an abstention whose scores mean something; '' otherwise."""
    return f"{class_name(panel, d.best_class)} ({percent(d.confidence)})" if d.abstained and confidence_shown(d) else ""


SIMILAR_COLUMN = "similar training cells of its type"


def _agreeing(d: Description) -> str:
    """'24 of 25': the nearest training cells of the class named (or best matched, when the scores
    mean something); '' where the model keeps no reference cells or the scores mean nothing."""
    if not d.neighbours or not d.neighbours["k"] or not confidence_shown(d):
        return ""
    return f"{d.neighbours['counts'].get(d.best_class, 0)} of {d.neighbours['k']}"


def results_table(panel: Panel, cases: list[Case]) -> None:
    """One row per described image: file, class, sentence, confidence (of an answer, where it is
    one), the best match of an abstention, how many of the nearest training cells agree
    (`core.neighbours`), abstained, and whether an answer is atypical of the training images
    (`core.typicality`; blank where not fitted)."""
    frame = pd.DataFrame([{
        "file": c.file_name, "class": class_name(panel, c.description.class_key, "(uncertain)"),
        SIMILAR_COLUMN: _agreeing(c.description), "sentence": c.label,
        "confidence": _answer_confidence(c.description), "best match if uncertain": _best_match(panel, c.description),
        "abstained": c.description.abstained, "atypical": c.description.atypical,
    } for c in cases])
    st.dataframe(frame, hide_index=True, key="describe_results", column_config={
        SIMILAR_COLUMN: st.column_config.TextColumn(SIMILAR_COLUMN, help=(
            "Of the training cells most similar to the image, how many are of the type named (for an uncertain "
            "image, of its best match); an answer needs about nine in ten.")),
        "confidence": st.column_config.ProgressColumn("confidence", format="%.3f", min_value=0.0, max_value=1.0),
        "sentence": st.column_config.TextColumn("sentence", width="large")})


def warn_if_another_lab(bundle: ModelBundle, panel: Panel, cases: list[Case]) -> None:
    """A warning above the results when the batch's out-of-scope refusals are improbable for the
    training lab's images (`core.site_shift`): its answers then deserve less trust than their
    confidence says."""
    notice = batch_shift([c.description.abstain_kind for c in cases if c.description is not None],
                         home_out_of_scope_rate(bundle.sidecar, panel.name))
    if notice is not None:
        st.warning("**These images look unlike the training lab's.** "
                   + shift_message(notice, bundle.sidecar, panel.name))


def pick_case(panel: Panel, cases: list[Case]) -> Case:
    """Select box to open one case (the most doubtful first); the choice is the image itself,
    so it stays open when another panel reorders the list."""
    by_sha = {c.sha256: (i, c) for i, c in enumerate(cases)}

    def label(sha: str) -> str:
        i, c = by_sha[sha]
        d = c.description
        # an abstention's percentage is its best match's, not how uncertain it is: say so
        score = (f" (best match {percent(d.confidence)})" if d.abstained else f" ({percent(d.confidence)})") \
            if confidence_shown(d) else ""
        flag = ", atypical" if d.atypical else ""
        return f"{i + 1}. {c.file_name} - {class_name(panel, d.class_key)}{score}{flag}"

    chosen = select_by_identity("Open a case", list(by_sha), "describe_open_case", label)
    return by_sha.get(chosen, (0, cases[0]))[1]


def _render_morphology(bundle: ModelBundle, panel: Panel, case: Case) -> None:
    """The WBCAtt morphology sentence of a described white cell; "(?)" marks phrases below their
    confidence threshold."""
    if not bundle.attribute_prototypes or panel.name != "blood_cells":
        return
    class_key = case.description.class_key
    if not has_morphology(class_key):
        st.caption(f"No morphology phrases for {md_escape(panel.cell_class(class_key).name.lower())}s: "
                   "they were learned from the five mature white-cell types only (WBCAtt).")
        return
    sentence, predictions = case_morphology(bundle, case)
    if not sentence:
        return
    st.write("Morphology: " + md_escape(sentence))
    accuracy = stated_phrase_accuracy(bundle.sidecar)
    st.caption('Phrases marked "(?)" are below their attribute\'s confidence threshold. ' + (
        f"Phrases stated without it were right {accuracy:.0%} of the time on held-out val cells "
        "(mean over the attributes)."
        if accuracy is not None
        else f"This model's thresholds were not calibrated (default {DEFAULT_PHRASE_THRESHOLD})."))
    with st.expander("Morphology phrases and their confidence"):
        st.dataframe([{"attribute": p.attribute, "phrase": p.label, "confidence": round(p.confidence, 3),
                       "shown as certain": p.certain} for p in predictions], hide_index=True)


def render_summary(bundle: ModelBundle, panel: Panel, case: Case) -> None:
    """Image, sentence (or the Uncertain state and its reason), confidence and notes."""
    d = case.description
    st.subheader("Case")
    st.text(case.file_name)
    left, right = st.columns([1, 2])
    left.image(framed(case.loaded.image), width=260)
    with right:
        if d.abstained:
            st.warning("**Uncertain**: the model gives no sentence for this image.  \nReason: "
                       + md_escape(d.abstain_reason or "not stated"))
            if not scores_meaningless(d):
                # small print, not a headline number: a refused answer's probability is not a claim
                st.caption(f"Closest sentence, not asserted: {md_escape(panel.cell_class(d.best_class).name)}; "
                           f"{confidence_label(bundle, panel).lower()}: {percent(d.confidence)}.")
        else:
            st.success(md_escape(d.sentence))
            _render_morphology(bundle, panel, case)
        if scores_meaningless(d):
            # for a blank frame, noise or a strip the reason above says it all; only an image the
            # model does not recognise may still be a cell
            if d.abstain_kind == "out_of_scope":
                st.caption("No confidence and no scores are shown: the model does not recognise the image as a "
                           "cell of this panel, so they would mean nothing. It may still be one, imaged in a way "
                           "the model has not learned (another lab's stain, scanner or zoom).")
            else:  # blank, noise or a strip: refused before any reading as a cell
                st.caption("No confidence and no scores are shown: the model did not describe this image (reason "
                           "above), so they would mean nothing.")
        else:
            if not d.abstained:  # an abstention's probability is in the small print above
                st.metric(confidence_label(bundle, panel), percent(d.confidence))
            if caption := neighbour_caption(panel, d):
                st.caption(caption)
            if d.atypical:
                st.warning("**Atypical image.** " + atypical_note(typicality_band(bundle.sidecar, panel.name)))
        if not d.panel_validated:
            st.caption("This panel is not validated: the sentence and the scores are not evidence of anything.")
        for note in case.loaded.notes:
            st.caption("Note: " + md_escape(note))
        if not d.abstained and is_colourless(case.loaded.image):
            st.caption("Without colour in the image, any colour the sentence names comes from the class "
                       "description, not from this image; colour phrases are marked (?).")
        if case.store_error:
            st.warning(case.store_error)
        timings = ", ".join(f"{k} {v:.0f} ms" for k, v in case.timings_ms.items())
        st.caption(f"Model {md_escape(d.model_id)}; {timings}")
    if not scores_meaningless(d):
        st.plotly_chart(score_chart(d, panel, panel_calibrated(bundle, panel)), key="describe_scores")


def render_explanation(bundle: ModelBundle, panel: Panel, case: Case, heatmaps: dict) -> None:
    """Grad-CAM overlay for a chosen sentence of the panel; the opacity slider only
    re-blends the cached heatmap."""
    d = case.description
    st.subheader("Where the image supports a sentence (Grad-CAM)")
    if scores_meaningless(d):
        # the reason itself: a squeezed strip or a blank frame is not "no cell of this panel"
        st.caption("No Grad-CAM: the model did not describe this image. " + md_escape(d.abstain_reason or ""))
        return
    keys = list(panel.keys)
    default = keys.index(d.class_key or d.best_class)
    labels = {k: panel.cell_class(k).sentence for k in keys}
    if panel.name == "blood_cells" and has_morphology(d.class_key):  # morphology phrases can be explained too
        for p in case_morphology(bundle, case)[1]:
            target = f"{ATTRIBUTE_TARGET}{p.attribute}={p.value}"
            keys.append(target)
            labels[target] = f"Morphology, {p.attribute.replace('_', ' ')}: {p.label} ({percent(p.confidence)})"
    # One radio per (panel, image): its choice must not carry over to another case.
    class_key = st.radio("Sentence or phrase to explain", keys, index=default,
                         key=f"describe_explain_{panel.name}_{case.sha256[:16]}", format_func=labels.get)
    opacity = st.slider("Heatmap opacity", 0.0, 1.0, 0.5, 0.05, key="describe_opacity")
    with st.spinner("Computing Grad-CAM..."):
        heatmap = cached_heatmap(bundle, case, panel.name, class_key, heatmaps)
    left, right = st.columns(2)
    left.image(square_resize(case.loaded.image, 256), caption="Model input (centre crop)")
    right.image(framed(overlay(case.loaded.image, heatmap, opacity)), caption="Grad-CAM overlay")
    st.caption("Warm colours mark regions that raise the similarity with this sentence. Grad-CAM is an aid "
               "to inspection, not proof of what the model reasoned.")
