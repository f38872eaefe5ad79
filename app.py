"""HemaScribe: describe blood-cell microscopy images in sentences.

    streamlit run app.py

This file only lists the pages (st.navigation), so the sidebar names each as a hematologist would
("Describe", not the file name); every page is a thin script in ``pages/`` over ``ui/`` and ``core/``.
"""
import streamlit as st

PAGES = [("pages/0_Describe.py", "Describe"), ("pages/1_Feedback_review.py", "Feedback review"),
         ("pages/2_Model_card.py", "Model card"), ("pages/3_Atlas_search.py", "Atlas search"),
         ("pages/4_Teaching_quiz.py", "Teaching quiz")]

st.set_page_config(page_title="HemaScribe", page_icon="🔬", layout="wide")
st.navigation([st.Page(path, title=title, default=index == 0) for index, (path, title) in enumerate(PAGES)]).run()
