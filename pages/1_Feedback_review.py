"""Feedback review: every expert opinion, agreement with the model, confusion, CSV export."""
import streamlit as st

from core.gallery_sources import synthetic_hashes
from core.store import agreement_summary, expert_confusion, latest_opinions, rows_to_csv
from ui import resources, review, widgets

st.set_page_config(page_title="HemaScribe - Feedback review", page_icon="🔬", layout="wide")

bundle = resources.get_bundle()  # optional here: reviewing needs only the database
resources.reviewer_sidebar()
if bundle is not None:
    widgets.model_sidebar(bundle)

st.title("Feedback review")
st.caption("Expert opinions are append-only: a second opinion is a new row, nothing is overwritten.")
store = resources.store_or_warn()
if not store.available:
    st.stop()

panels = review.naming_panels(bundle)
names = widgets.class_names(panels)
titles = {key: panel.title for key, panel in panels.items()}
rows = review.load_rows(store, names, titles)
if rows is None:
    st.stop()

# Verdicts on the GAN's sample drawings are listed, but they are no evidence about the model
drawn = synthetic_hashes(resources.settings().samples_dir)
real = [row for row in rows if row["sha256"] not in drawn]
counted = latest_opinions(real)  # a verdict clicked twice, or changed, counts once: the latest
summary = agreement_summary(counted)
rate = summary["agreement_rate"]
c1, c2, c3, c4 = st.columns(4)
c1.metric("Verdicts counted", summary["n_feedback"])
c2.metric("Agreement with its sentences (agree / decided)", "n/a" if rate is None else f"{rate:.0%}")
c3.metric("Disagree", summary["n_disagree"])
c4.metric("Unsure (not counted)", summary["n_unsure"])
if summary["n_on_abstentions"]:
    st.caption(f"Agreement counts the cases the model answered; the {summary['n_on_abstentions']} verdict(s) on "
               "cases it left Uncertain are in the '(abstained)' row of the per-class table.")
if pooled := review.pooling_note(counted):
    st.caption(pooled)
if len(counted) < len(real):
    n_replaced = len(real) - len(counted)
    st.caption(f"{n_replaced} earlier verdict{'s' if n_replaced != 1 else ''} of a reviewer on a description the same "
               "reviewer judged again later (a repeated click or a changed mind) "
               f"{'are' if n_replaced != 1 else 'is'} listed below; only the latest counts in these figures.")
if len(real) < len(rows):
    n_drawn = len(rows) - len(real)
    st.caption(f"{n_drawn} feedback row{'s' if n_drawn != 1 else ''} on the GAN's synthetic sample images "
               f"{'are' if n_drawn != 1 else 'is'} listed below but not counted in these figures, the per-class "
               "agreement or the expert-versus-model matrix.")

st.subheader("Feedback")
show_ids = st.toggle(review.SHOW_IDENTIFIERS, key=widgets.restore_widget("review_ids"),
                     help="The model, calibration, prediction and image of each row; the CSV always has them.")
widgets.remember_choice("review_ids", show_ids)
st.dataframe(review.rows_frame(rows, names, titles), hide_index=True, key="review_table",
             column_order=review.table_columns(show_ids), column_config={
    "confidence": st.column_config.NumberColumn("confidence", format="%.3f"),  # 0.9997 read "1"
    "atypical": st.column_config.CheckboxColumn("atypical", help="Ticked: the answer was marked atypical; unticked: "
                                                "typical; empty: not marked (an abstention, a model without the "
                                                "band, or a case stored before the mark was recorded).")})
st.download_button("Download CSV", rows_to_csv(rows), file_name="hemascribe_feedback.csv", mime="text/csv",
                   key="review_csv", disabled=not rows)

left, right = st.columns(2)
with left:
    st.subheader("Agreement per model class")
    if per_class := review.per_class_rows(summary, names):
        st.dataframe(per_class, hide_index=True, key="review_per_class", column_config={
            "agreement_rate": st.column_config.NumberColumn("agreement rate", format="%.0f%%")})
    else:
        st.caption("No feedback matches the filters.")
with right:
    st.subheader("Expert versus model")
    labels, matrix = expert_confusion(counted)
    if labels:
        st.plotly_chart(widgets.confusion_figure(review.shown_labels(labels, names), matrix), key="review_confusion")
    else:
        st.caption("No case has both an expert class and a model class yet.")

st.subheader("Agreement on answers marked atypical")
st.caption("An answer is marked atypical when its image lies in the model's atypical band: less typical of the "
           "training lab's cells than most of those it answers there. Answers of a model without that band, and "
           "cases stored before the mark was recorded, count as 'not marked'.")
if typicality := review.typicality_rows(summary):
    st.dataframe(typicality, hide_index=True, key="review_typicality", column_config={
        "agreement_rate": st.column_config.NumberColumn("agreement rate", format="%.0f%%")})
    if note := review.home_band_note(bundle, counted):
        st.caption(note)
else:
    st.caption("No verdict on an answered case matches the filters.")

st.subheader("Re-open a case")
if rows:
    review.reopen_case(store, resources.settings().upload_dir, rows, panels)
else:
    st.caption("Nothing to re-open.")
