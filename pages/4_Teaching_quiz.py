"""Teaching quiz: describe a random gallery cell, then compare with the expert label and the model."""
import streamlit as st

from ui import quiz, resources, widgets

st.set_page_config(page_title="HemaScribe - Teaching quiz", page_icon="🔬", layout="wide")

bundle = resources.require_bundle()
resources.reviewer_sidebar()
widgets.model_sidebar(bundle)

st.title("Teaching quiz")
st.caption("A random cell from the gallery: choose or write its description, then see the expert label "
           "and what the model says. " + widgets.DISCLAIMER)
quiz.init_state()
score_box = st.empty()  # filled last, so it already counts an answer checked in this run
panel = widgets.panel_select(bundle, key="quiz_panel", validated_only=True)  # unvalidated: no labelled cells
cell = quiz.current_cell(panel)
if cell is None:
    st.info("No gallery images to quiz on: set `HEMASCRIBE_GALLERY_DIR` to a folder of cell images (sub-folders "
            "named after a class, e.g. neutrophil/, give the answers), or review cases on the Describe page.")
    st.stop()
quiz.play_round(bundle, panel, cell)
score_box.metric("Session score (correct / attempted)", quiz.score_text())
