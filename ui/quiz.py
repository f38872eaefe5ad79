"""Teaching quiz: a random gallery cell, the learner's description, then the reveal (expert
label, the model's sentences and scores, Grad-CAM, morphology) and a running session score.

All state is per session, in plain `st.session_state` keys prefixed ``quiz_``. The draw is
seeded per session and round, so a rerun (any widget change) never swaps the cell. Only
cells whose label names a class of the chosen panel are scored; without labelled cells the
quiz still runs, for practice, and says the answers are not scored. A written answer that uses
no morphology word the model knows, or says what the cell is not (core.vocabulary), is refused,
unscored, and can be rewritten; short forms ("mono", "PMN", "eos") are written out first.
"""
from __future__ import annotations

import random
import secrets
from dataclasses import dataclass

import streamlit as st
from PIL import Image

from core.checkpoint import ModelBundle
from core.describe import describe
from core.explain import class_heatmap, overlay
from core.gallery import encode_query
from core.gallery_sources import REVIEWED, Source
from core.imageio import ImageRejected, load_image_path
from core.morphology import describe_morphology, has_morphology
from core.panels import Panel, load_attribute_phrases
from core.reliability import framing_problem
from core.typicality import atypical_note, typicality_band
from core.vocabulary import (EXAMPLES, expand_abbreviations, morphology_vocabulary, morphology_words, negated_classes,
                             ungrounded_terms)
from ui import resources
from ui.widgets import (confidence_shown, framed, label_name, md_escape, neighbour_caption, panel_calibrated,
                        percent, score_chart, scores_meaningless)

SEED, ROUND, SCORE = "quiz_seed", "quiz_round", "quiz_score"
CELL, ANSWER, REVEAL = "quiz_cell", "quiz_answer", "quiz_reveal"
LAST_MODE = "quiz_last_mode"
TRIES = 5  # unreadable files drawn in a row before giving up on this round
NO_MORPHOLOGY = (f"Your description uses no morphology word the model knows (e.g. {', '.join(EXAMPLES)}); "
                 "rephrase it or choose a sentence.")
UNGROUNDED = ("The model was not trained on the word(s) {words}, so it cannot grade this answer: describe what "
              "you see in the panel's words (e.g. nucleus, granules, lobed, cytoplasm) or choose a sentence.")
NEGATED = ("Your answer says what the cell is not ({words}); the quiz scores what it is. Describe what you "
           "see or choose a sentence.")
PLACEHOLDER = "e.g. a large cell with a kidney-shaped nucleus"  # passes the vocabulary check (tests/test_quiz_text.py)


@dataclass(frozen=True)
class QuizCell:
    """The cell shown in one quiz round and the label it is scored against."""
    source: Source  # the gallery file
    image: Image.Image  # decoded RGB image
    expert_class: str | None  # panel class the label names; None: not scored
    panel: str  # panel the cell was drawn for
    round: int  # session round it belongs to


def init_state() -> dict:
    """Session seed, round and score (created on first visit); returns the score."""
    state = st.session_state
    state.setdefault(SEED, secrets.randbelow(2**31))
    state.setdefault(ROUND, 0)
    state.setdefault(SCORE, {"correct": 0, "attempted": 0})
    return state[SCORE]


def pick_cell(panel: Panel, sources: list[Source], rng: random.Random, round_: int) -> QuizCell | None:
    """A random readable cell, from the labelled ones when there are any."""
    # label_for: a reviewed case answers this panel's question only with a verdict given on it
    labelled = [s for s in sources if panel.key_for_label(s.label_for(panel.name))]
    pool = labelled or sources
    for source in rng.sample(pool, min(len(pool), TRIES)):
        try:
            image = load_image_path(source.path).image
        except ImageRejected:
            continue
        if framing_problem(image.size):  # a strip: the reveal could only say it is no cell
            continue
        return QuizCell(source, image, panel.key_for_label(source.label_for(panel.name)), panel.name, round_)
    return None


def current_cell(panel: Panel) -> QuizCell | None:
    """This round's cell, drawn on first use (seeded by session and round)."""
    state = st.session_state
    cell = state.get(CELL)
    if cell is not None and cell.round == state[ROUND] and cell.panel == panel.name:
        return cell
    if cell is not None and cell.round == state[ROUND] and state.get(REVEAL) is not None:
        # answered, then the panel changed: the next round, or coming back to this panel would
        # draw the same cell again (same seed and round) and let it be answered and scored twice
        state[ROUND] += 1
    state[ANSWER] = state[REVEAL] = None
    rng = random.Random(f"{state[SEED]}:{state[ROUND]}")
    state[CELL] = pick_cell(panel, resources.gallery_sources(), rng, state[ROUND])
    return state[CELL]


def next_cell() -> None:
    """Button callback: a new round."""
    st.session_state[ROUND] = st.session_state.get(ROUND, 0) + 1
    st.session_state[CELL] = st.session_state[ANSWER] = st.session_state[REVEAL] = None


def answer_form(panel: Panel) -> tuple[str, str | None]:
    """Choose a sentence of the panel or write one; returns (mode, class key or text). Drawn only
    until the round is answered: then the reveal shows the answer that was scored (a locked text
    box could show another text than the one sent with the click)."""
    modes = ["choose", "write"]
    # the radio is not drawn while a round is revealed, so its state is dropped: the last mode
    # is kept in a plain key, and a learner who writes keeps writing in the next round
    mode = st.radio("Your answer", modes, horizontal=True, key="quiz_mode",
                    index=modes.index(st.session_state.get(LAST_MODE, "choose")),
                    format_func={"choose": "Choose a sentence", "write": "Write your own description"}.get)
    st.session_state[LAST_MODE] = mode
    round_ = st.session_state[ROUND]
    if mode == "choose":
        key = st.selectbox("Which sentence describes this cell?", panel.keys, index=None,
                           format_func=lambda k: panel.cell_class(k).sentence, key=f"quiz_choice_{panel.name}_{round_}",
                           placeholder="Choose a sentence")
        return mode, key
    text = st.text_area("Describe the cell in your own words", key=f"quiz_text_{round_}", max_chars=500,
                        placeholder=PLACEHOLDER)
    return mode, (text or "").strip() or None


def answer_problem(bundle: ModelBundle, text: str) -> str | None:
    """Why a written answer cannot be scored, or None. Any text lands on some class, so an
    answer is scored only when it uses a morphology word of the model's vocabulary (its panels'
    sentences and the attribute phrases it was trained with; the shipped ones for an older
    sidecar), no standard term the model was not trained on ("myeloblast"), and does not say
    what the cell is not ("not a neutrophil" lands on neutrophil)."""
    phrases = bundle.sidecar.get("attribute_phrases") or load_attribute_phrases()
    terms = ungrounded_terms(text)
    if terms:  # whatever else the answer says, such a word steers its nearest sentence by chance
        return UNGROUNDED.format(words=", ".join(terms))
    if not morphology_words(expand_abbreviations(text), morphology_vocabulary(bundle.panels, phrases)):
        return NO_MORPHOLOGY
    negated = negated_classes(text, bundle.panels)
    if negated:
        return NEGATED.format(words=", ".join(negated))
    return None


def check_answer(bundle: ModelBundle, panel: Panel, cell: QuizCell, mode: str, value: str) -> dict:
    """Score one answer and add it to the session score. Free text (abbreviations written out,
    `core.vocabulary.expand_abbreviations`; the caller refuses it first when `answer_problem`
    says so) is matched to the nearest class of the panel: its prototype is the mean text
    embedding of the class's sentences (core.bank), so this is the nearest panel sentence in the
    model's space."""
    similarity = None
    if mode == "write":
        similarities = bundle.prototypes[panel.name] @ encode_query(bundle, expand_abbreviations(value))
        best = int(similarities.argmax())
        chosen, similarity = panel.keys[best], float(similarities[best])
    else:
        chosen = value
    scored = cell.expert_class is not None
    correct = scored and chosen == cell.expert_class
    if scored:
        score = dict(st.session_state[SCORE])
        score["attempted"] += 1
        score["correct"] += int(correct)
        st.session_state[SCORE] = score
    return {"round": cell.round, "mode": mode, "text": value if mode == "write" else None, "chosen": chosen,
            "similarity": similarity, "scored": scored, "correct": correct}


def reveal_data(bundle: ModelBundle, panel: Panel, cell: QuizCell) -> dict:
    """Model description, Grad-CAM of its top sentence and the morphology sentence,
    computed once per round (reruns reuse them)."""
    cached = st.session_state.get(REVEAL)
    if cached is not None and cached["round"] == cell.round:
        return cached
    description = describe(bundle, cell.image, panel.name)
    top = description.class_key or description.best_class
    heatmap = class_heatmap(bundle, cell.image, panel.name, top)
    morphology = None
    if has_morphology(description.class_key):  # white cells the model answered for only
        morphology = describe_morphology(bundle, cell.image)[0] or None
    data = {"round": cell.round, "description": description, "top": top, "heatmap": heatmap,
            "morphology": morphology}
    st.session_state[REVEAL] = data
    return data


def _label_line(panels: dict[str, Panel], panel: Panel, cell: QuizCell) -> str:
    label = cell.source.label_for(cell.panel)
    if label is None:
        return "**Expert label:** none for this cell."
    where = "expert-verified in the feedback store" if cell.source.source == REVIEWED else "gallery folder label"
    if cell.expert_class is None:
        return (f"**Label:** {md_escape(label_name(panels, label))} ({where}; not a class of "
                "this panel, so not scored).")
    cell_class = panel.cell_class(cell.expert_class)
    return f"**Expert label:** {md_escape(cell_class.name)} ({where}).  \n{md_escape(cell_class.sentence)}"


def _verdict(panel: Panel, answer: dict) -> None:
    sentence = md_escape(panel.cell_class(answer["chosen"]).sentence)
    if not answer["scored"]:
        st.info("This cell has no expert label in this panel: your answer is not scored.")
    elif answer["correct"]:
        st.success("Correct.")
    else:
        st.error("Not this time.")
    if answer["text"] is not None:
        st.markdown(f"**You wrote:** {md_escape(answer['text'])}  \n**Nearest panel sentence:** {sentence} "
                    f"(similarity {answer['similarity']:.2f})")
    else:
        st.markdown(f"**Your answer:** {sentence}")


def render_reveal(bundle: ModelBundle, panel: Panel, cell: QuizCell, answer: dict) -> None:
    """Verdict, expert label, the model's sentences and scores, Grad-CAM and morphology."""
    _verdict(panel, answer)
    st.markdown(_label_line(bundle.panels, panel, cell))
    with st.spinner("The model is looking at the cell..."):
        data = reveal_data(bundle, panel, cell)
    d = data["description"]
    ranked = sorted(d.scores.items(), key=lambda kv: -kv[1])[:3]
    if d.abstained:
        st.warning("**Model: Uncertain.** Reason: " + md_escape(d.abstain_reason or "not stated"))
    else:
        st.markdown(f"**Model:** {md_escape(d.sentence)} ({percent(d.confidence)} confidence)")
        if d.atypical:  # a teaching point too: when to doubt it
            st.caption("**Atypical image.** " + atypical_note(typicality_band(bundle.sidecar, panel.name)))
    if confidence_shown(d):
        st.caption("Model's top sentences: " + "; ".join(
            f"{md_escape(panel.cell_class(k).name)} {percent(p)}" for k, p in ranked))
        if caption := neighbour_caption(panel, d):  # a second opinion to weigh: the cells the model has seen like it
            st.caption(caption)
    elif not scores_meaningless(d):  # an unvalidated panel: an order, not probabilities
        st.caption("Closest sentences of this not-validated panel (scores are not confidences): "
                   + "; ".join(md_escape(panel.cell_class(k).name) for k, _ in ranked))
    if data["morphology"]:
        st.markdown("**Morphology (model):** " + md_escape(data["morphology"]))
        st.caption("Phrases marked (?) are below the model's confidence threshold for that attribute.")
    left, right = st.columns(2)
    if scores_meaningless(d):  # no cell of this panel: nothing to show where it was seen
        left.image(framed(cell.image), caption="The cell")
    else:
        left.image(framed(overlay(cell.image, data["heatmap"])),
                   caption=f"Grad-CAM for: {panel.cell_class(data['top']).name}")
        right.plotly_chart(score_chart(d, panel, panel_calibrated(bundle, panel)), key="quiz_scores")
    st.caption("File: " + md_escape(cell.source.name) + ". Grad-CAM is an aid to inspection, not proof of "
               "what the model reasoned.")


def play_round(bundle: ModelBundle, panel: Panel, cell: QuizCell) -> None:
    """The cell, the answer form and its check button, the reveal once answered, and the
    Next cell button. An answer is scored once: the reveal replaces the form after checking. A
    refused written answer leaves the form open, to be rewritten."""
    show_cell(cell)
    answer = st.session_state.get(ANSWER)
    if answer is None:
        _ask(bundle, panel, cell)
    else:
        render_reveal(bundle, panel, cell, answer)
    st.button("Next cell", key="quiz_next", on_click=next_cell)


def _ask(bundle: ModelBundle, panel: Panel, cell: QuizCell) -> None:
    """The answer form and its check button; a scored answer starts the reveal at once."""
    mode, value = answer_form(panel)
    # Not disabled while empty: typed text only reaches the server with the click itself.
    if st.button("Check my answer", key="quiz_check", type="primary"):
        if value is None:
            st.warning("Choose a sentence or write a description first.")
        elif mode == "write" and (problem := answer_problem(bundle, value)):
            st.warning(problem)  # unscored; the form stays open to rewrite it
        else:
            with st.spinner("Checking..."):
                st.session_state[ANSWER] = check_answer(bundle, panel, cell, mode, value)
            st.rerun()  # the reveal replaces the form at once: an edit after checking would be ignored


def score_text() -> str:
    """'correct / attempted' of this session."""
    score = st.session_state.get(SCORE, {"correct": 0, "attempted": 0})
    return f"{score['correct']} / {score['attempted']}"


def show_cell(cell: QuizCell) -> None:
    """The whole image; its file name stays hidden until the reveal, since file and folder
    names often give the answer away."""
    st.image(framed(cell.image), caption="Which description fits this cell?", width=320)
