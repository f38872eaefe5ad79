"""Model card: which model this is, how it was trained and measured, what it is for."""
import streamlit as st

from ui import model_card, resources, widgets

st.set_page_config(page_title="HemaScribe - Model card", page_icon="🔬", layout="wide")

bundle = resources.require_bundle()
resources.reviewer_sidebar()
widgets.model_sidebar(bundle)
sidecar = bundle.sidecar
training = model_card.training_info(bundle)

st.title("Model card")
st.subheader("Intended use")
st.markdown(model_card.INTENDED_USE)
st.markdown("\n".join(f"- {line}" for line in model_card.LIMITS))

st.subheader("Targets and how this model measures up")
# "met" comes second so that a NO is seen without scrolling sideways, whatever the window's width
st.dataframe(model_card.targets_frame(bundle), hide_index=True, key="card_targets",
             column_order=model_card.TARGET_COLUMN_ORDER,
             column_config={"target": st.column_config.TextColumn(width="medium"),
                            "met": st.column_config.TextColumn(width="medium"),
                            "this model (val)": st.column_config.TextColumn(width="medium")})
st.caption("Measured on the validation splits with the evaluation command; rows marked NO are targets this model "
           "does not reach. The accuracy of the answered cases is over all of val at the shipped thresholds; the "
           "calibration table below gives it again on the half of val not used to fit them. The 95 % interval "
           "(bootstrap over val images) is how far the value moves with the draw of images alone; where a "
           "target lies inside it (\"NO (within the interval)\"), val cannot tell whether the model meets it. Cells "
           "of one patient are not independent, so the true spread is wider. The BCCD row is a check on another "
           "lab's cells, not val: accuracy over all its cells (the top class, also where the model refused), then "
           "the share it answers and how many of those answers were right.")

st.subheader("Identity")
st.text(f"Model id:        {bundle.model_id}\nWeights sha256:  {bundle.weights_sha256 or 'not recorded'}")
st.caption("The weights' sha256 is checked at every load; a changed file is refused.")
st.markdown("**Training command**")
st.code(training.get("command", "not recorded"), language="bash")
started_from = training.get("init_from")
if isinstance(started_from, dict):  # a continued run: say from which weights, not just which file name
    st.caption(f"Continued from the weights of model {started_from.get('model_id', 'not recorded')} (sha256 "
               f"{str(started_from.get('weights_sha256', 'not recorded'))[:16]}…), which the command's "
               "--init-from named; its own training command is in that model's sidecar.")

st.subheader("Training data")
counts = model_card.data_counts_frame(bundle)
if counts is None:
    st.caption("Data counts: not recorded in the model file.")
else:
    st.dataframe(counts, hide_index=True, key="card_counts")

st.subheader("Validation metrics")
metrics = sidecar.get("metrics", {})
if metrics:
    st.dataframe(model_card.flat_metrics(metrics), hide_index=True, key="card_metrics")
else:
    st.info("Validation metrics: not measured for this model.")
if training.get("final_epoch_metrics"):
    with st.expander("Last training epoch (not a held-out measurement)"):
        st.dataframe(model_card.flat_metrics(training["final_epoch_metrics"]), hide_index=True)

st.subheader("Morphology attributes beside the WBCAtt baseline")
widgets.table_or_info(
    model_card.attribute_comparison_frame(bundle), key="card_attributes",
    missing="Morphology attributes: not measured for this model (python -m training.evaluate --attributes CSV).",
    caption="Mean over the 11 WBCAtt attributes of each attribute's accuracy and macro-F1. The baseline number is "
            "the one the WBCAtt authors publish for their released model, on their test split.")

st.subheader("Calibration and abstention")
calibration = sidecar.get("calibration")
if calibration:
    st.dataframe(model_card.flat_metrics(calibration), hide_index=True, key="card_calibration")
    st.caption("Temperature and thresholds are fitted on one seeded half of val; 'ece_before' / 'ece_after' are "
               "measured on the other half, so a model that was already calibrated can come out slightly worse "
               "(the temperature fitted on one half over-corrects the other a little). An image's temperature is "
               "'temperature' x (1 + 'distance_slope' x how far its out-of-scope score lies above "
               "'distance_reference', the median on val): answers on images unlike the training lab's are "
               "less confident; 'ece_constant_temperature' is the held-out ECE without that growth. "
               "'typicality' is the band of "
               "the most atypical tenth of answered val cells (out-of-scope score above its threshold): answers in "
               "it are marked atypical, with 'accuracy_above' (their accuracy on the held-out half) beside them. "
               "'neighbours' and 'min_agreement': an answer stands only when at least that share of the K training "
               "cells most similar to the image (rounded up: 0.9 of 25 is 23) are of the class it names "
               "('neighbour_refusal_rate': the held-out share refused by this check); 'min_confidence' is fitted "
               "on the answers that pass it. 'views': each image is embedded as the mean of that many turned "
               "copies of it, and every threshold here was fitted on embeddings made so (the Grad-CAM overlay "
               "explains the upright copy).")
else:
    st.info("Not calibrated: confidences are the raw softmax and no abstention thresholds are set.")
diagram = model_card.first_existing(model_card.RELIABILITY_DIAGRAMS)
if diagram is not None:
    st.image(str(diagram), caption="Reliability diagram (validation)")

st.subheader("Out-of-scope detection")
widgets.table_or_info(
    model_card.out_of_scope_frame(bundle), key="card_ood",
    missing="The reliability report (python -m training.reliability_report) has not been run for this model.",
    caption="AUROC of the out-of-scope score: the panel's val images against each set; 'flagged' is the share the "
            "model refused to describe. None of these sets was used to fit anything.")
curve = model_card.first_existing(model_card.RISK_COVERAGE_PLOTS)
if curve is not None:
    st.image(str(curve), caption="Risk-coverage on val: error rate of the answered cases as the model answers fewer")

st.subheader("Panels")
st.dataframe(model_card.panels_frame(bundle), hide_index=True, key="card_panels")

st.subheader("Data sets and licences")
st.dataframe(model_card.DATASETS, hide_index=True, key="card_datasets")

st.subheader("Rare classes: balancing and GAN images")
st.markdown(f"This model was trained with class balancing **{training.get('balance', 'not recorded')}**.")
ablation = model_card.ablation_summary()
if ablation is None:
    st.info("The balancing ablation (python -m training.gan_ablation) has not been run.")
else:
    table, verdict = ablation
    st.caption("Rare-class stress test: basophils and lymphocytes cut in the training split, each balancing mode "
               "trained with the same short schedule, measured on the full val split (mean ± std over seeds).")
    st.markdown(table)
    st.markdown(verdict)

grid = model_card.first_existing(model_card.gan_grid_paths(resources.settings().samples_dir))
if grid is not None:
    st.subheader("Synthetic samples")
    st.image(str(grid), caption="SYNTHETIC images generated by a GAN: not real patient cells, never used as evidence.")
