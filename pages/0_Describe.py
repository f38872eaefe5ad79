"""Describe: upload or pick blood-cell images and get sentences, scores, Grad-CAM and feedback
buttons (the landing page; `app.py` lists the pages)."""
import streamlit as st

from ui import case_view, cases, feedback, resources, widgets

st.set_page_config(page_title="HemaScribe - Describe", page_icon="🔬", layout="wide")

bundle = resources.require_bundle()
reviewer = resources.reviewer_sidebar()
widgets.model_sidebar(bundle)

st.title("Describe blood-cell images")
st.caption(widgets.DISCLAIMER)
store = resources.store_or_warn()
settings = resources.settings()

panel = widgets.panel_select(bundle, key="describe_panel")
inputs = cases.pick_inputs(settings)
if not inputs:
    st.info("Upload images or choose a sample to get a description.")
    st.stop()

progress = st.progress(0.0, text="Describing...") if len(inputs) > 1 else None
described = cases.describe_inputs(
    bundle, inputs, panel.name, store, settings.upload_dir, st.session_state.setdefault("describe_cases", {}),
    progress=(lambda done: progress.progress(done, text="Describing...")) if progress else None,
    keep=cases.kept_hashes())
if progress is not None:
    progress.empty()

for refused in (c for c in described if c.error):
    st.error(widgets.md_escape(refused.error))  # the message names the file
repeats = cases.repeated_names(inputs)
if repeats:
    st.caption("Shown once, with the same bytes as an earlier file: " + ", ".join(map(widgets.md_escape, repeats)))

ordered = case_view.doubtful_first(described)
if not ordered:
    st.stop()
case_view.warn_if_another_lab(bundle, panel, ordered)
if len(ordered) > 1:
    st.subheader(f"{len(ordered)} images described (most doubtful first)")
    case_view.results_table(panel, ordered)
    case = case_view.pick_case(panel, ordered)
else:
    case = ordered[0]

case_view.render_summary(bundle, panel, case)
case_view.render_explanation(bundle, panel, case, st.session_state.setdefault("describe_heatmaps", {}))
feedback.render_feedback(store, panel, case, reviewer)
