"""Atlas search: find gallery images by a free-text description or by a similar image."""
import streamlit as st

from ui import atlas, resources, widgets

st.set_page_config(page_title="HemaScribe - Atlas search", page_icon="🔬", layout="wide")

bundle = resources.require_bundle()
resources.reviewer_sidebar()
widgets.model_sidebar(bundle)

st.title("Atlas search")
st.caption("Find cells in the gallery folder and among reviewed cases by a description in your own words, "
           "or by an image. Labels marked expert-verified come from a reviewer's verdict on the panel named; "
           "folder labels are the names of the gallery's sub-folders.")
index = atlas.gallery_section(bundle)
if index is None:
    st.stop()
atlas.text_search(bundle, index)
atlas.image_search(bundle, index)
