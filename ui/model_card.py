"""Model card content: what the sidecar says, the data sets and their licences, the
intended use. Static facts live here as data so the page only lays them out."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from core.checkpoint import ModelBundle
from core.settings import PROJECT_ROOT
from ui.widgets import class_names

DATASETS = [
    {"data set": "PBC (normal peripheral blood cells, 8 types)", "licence": "CC BY 4.0",
     "role": "training, validation, test",
     "source": "Acevedo et al. 2020, Data in Brief; Hospital Clinic of Barcelona"},
    {"data set": "WBCAtt (white-cell morphology attributes)", "licence": "MIT",
     "role": "morphology attribute phrases", "source": "Tsutsui et al. 2023, NeurIPS Datasets and Benchmarks"},
    {"data set": "B-ALL (acute lymphoblastic leukaemia subtypes)", "licence": "research use",
     "role": "training, validation, test", "source": "Ghaderzadeh, Aria et al. 2022; Taleqani Hospital, Tehran"},
    {"data set": "BCCD (blood cell count and detection)", "licence": "MIT",
     "role": "checking only (another site); never trained on", "source": "BCCD dataset (Shenggan)"},
]

INTENDED_USE = (
    "HemaScribe is a **teaching and review aid** for peripheral blood-cell morphology. It suggests a "
    "sentence from a fixed, expert-written bank for an image of a single cell, shows how sure it is, says "
    "*Uncertain* when it should not answer, and records expert feedback.")
LIMITS = [
    "It is **not a diagnostic device** and has no regulatory clearance; never use it to decide on a patient's care.",
    "It describes one cell per image, chosen from the sentences of a panel; it cannot say anything outside them.",
    "It was trained on images from few hospitals: other stains, scanners and zooms lower its accuracy "
    "(measured on BCCD, an image set from another site). When an upload of several images has many refused "
    "as unlike any trained cell, the Describe page says the batch looks like another lab's and that its "
    "answers deserve less trust (how often it warns on home-lab and other-lab batches is measured by "
    "`python -m training.site_shift_report`; README). An answer less typical than 9 in 10 of the training "
    "lab's answered cells is marked atypical, with how often such answers were right at home.",
    "Panels marked *not validated* were never trained or tested on images of their classes.",
    "Grad-CAM overlays show where the image raised a sentence's score; they are not proof of reasoning.",
]

# The WBCAtt authors' own attribute-prediction baseline, as their repository states it
# (apple2373/wbcatt, submission/README.md: the released ResNet-50 checkpoint "should give acc: 94.09,
# f1_macro: 91.27"); both are means over the 11 attributes, the same definition as ours.
WBCATT_BASELINE = {"model": "WBCAtt baseline: ResNet-50, ImageNet-pretrained, 224 px (Tsutsui et al. 2023)",
                   "split": "WBCAtt test", "mean accuracy": 0.9409, "mean macro-F1": 0.9127}

RELIABILITY_DIAGRAMS = [PROJECT_ROOT / "docs" / "reliability_diagram.png",
                        PROJECT_ROOT / "assets" / "model" / "reliability_diagram.png"]


RISK_COVERAGE_PLOTS = [PROJECT_ROOT / "assets" / "model" / "risk_coverage.png"]


def out_of_scope_frame(bundle) -> pd.DataFrame | None:
    """One row per (panel, out-of-scope set): AUROC and flagged rate, from the sidecar's
    reliability report; None when the report was not run for this model."""
    report = bundle.sidecar.get("reliability")
    if not report:
        return None
    rows = [{"panel": panel, "out-of-scope set": kind, "n": v["n"], "AUROC": v["auroc"], "flagged": v["flagged_rate"]}
            for panel, section in report.items() for kind, v in section.get("out_of_scope", {}).items()]
    return pd.DataFrame(rows)


GAN_ABLATION_REPORT = PROJECT_ROOT / "docs" / "gan_ablation.md"


def ablation_summary(report: Path = GAN_ABLATION_REPORT) -> tuple[str, str] | None:
    """(results table, verdict line) of the GAN balancing ablation report that
    ``training.gan_ablation`` wrote, or None when it has not been run."""
    if not report.is_file():
        return None
    lines = report.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| mode |")), None)
    verdict = next((line for line in lines if line.startswith("Verdict:")), "")
    if start is None:
        return None
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return "\n".join(table), verdict


def attribute_comparison_frame(bundle: ModelBundle) -> pd.DataFrame | None:
    """Our mean attribute accuracy and macro-F1 beside the WBCAtt paper's baseline; None when
    the sidecar holds no attribute evaluation."""
    attributes = next((m["attributes"] for m in bundle.sidecar.get("metrics", {}).values()
                       if isinstance(m, dict) and m.get("attributes")), None)
    if not attributes or "mean_accuracy" not in attributes:
        return None
    ours = {"model": f"HemaScribe {bundle.model_id} (no pretrained weights, {bundle.model.config.image_size} px)",
            "split": f"WBCAtt val ({attributes.get('n', '?')} cells)",
            "mean accuracy": attributes["mean_accuracy"], "mean macro-F1": attributes.get("mean_macro_f1"),
            # phrases stated without "(?)": their share and accuracy (thresholds from training.calibrate,
            # fitted on half of this val set: partly in-sample, the held-out figure is in the README)
            "stated share": attributes.get("mean_certain_share"),
            "accuracy of stated phrases (val, half used for fitting)": attributes.get("mean_accuracy_certain")}
    return pd.DataFrame([ours, WBCATT_BASELINE])


def targets_frame(bundle: ModelBundle) -> pd.DataFrame:
    """The project's targets (issues 2, 5, 6) beside this model's val measurements from the
    sidecar: one row each, 'met' yes / NO / not measured. The other lab has no target: its row
    says how far the model falls there."""
    metrics, reliability = bundle.sidecar.get("metrics", {}), bundle.sidecar.get("reliability", {})
    pbc, ball = metrics.get("pbc_val") or {}, metrics.get("b_all_val") or {}
    attributes = pbc.get("attributes") or {}
    answered = pbc.get("accuracy_answered"), 1 - pbc["abstain_rate"] if "abstain_rate" in pbc else None
    aurocs = [v["auroc"] for panel in reliability.values() for v in panel.get("out_of_scope", {}).values()]
    rows = [
        _target("PBC accuracy (8 cell types)", ">= 0.97", pbc.get("accuracy"), lambda v: v >= 0.97,
                interval=_interval(pbc, "accuracy")),
        _target("PBC macro-F1", ">= 0.96", pbc.get("macro_f1"), lambda v: v >= 0.96,
                interval=_interval(pbc, "macro_f1")),
        _target("B-ALL accuracy", ">= 0.97", ball.get("accuracy"), lambda v: v >= 0.97,
                interval=_interval(ball, "accuracy")),
        _target("PBC calibration error (ECE)", "<= 0.03", pbc.get("ece"), lambda v: v <= 0.03),
        _target("PBC accuracy of the answered cases, at coverage", ">= 0.99 at >= 0.90",
                None if None in answered else answered, lambda v: v[0] >= 0.99 and v[1] >= 0.90,
                lambda v: f"{v[0]:.3f} at {v[1]:.3f}", _interval(pbc, "accuracy_answered"),
                at_upper=lambda high: (high, answered[1])),
        _target("Out-of-scope AUROC, worst of all sets and panels", ">= 0.95", min(aurocs) if aurocs else None,
                lambda v: v >= 0.95),
        _target("Morphology: mean attribute accuracy", "> 0.941 (WBCAtt baseline)", attributes.get("mean_accuracy"),
                lambda v: v > WBCATT_BASELINE["mean accuracy"]),
    ]
    other = metrics.get("bccd_wbc_other_lab") or {}
    if other:
        rows.append({"target": "Another lab's white cells (BCCD, not val), accuracy",
                     "goal": "no target: the gap to close",
                     "this model (val)": _other_lab_summary(other),
                     INTERVAL_COLUMN: _spread(_interval(other, "accuracy")), "met": "-"})
    return pd.DataFrame(rows)


INTERVAL_COLUMN = "95 % interval (bootstrap)"
TARGET_COLUMN_ORDER = ("target", "met", "this model (val)", "goal", INTERVAL_COLUMN)


def _interval(metrics: dict, name: str) -> list | None:
    """[low, high] of `name` from an evaluation's bootstrap intervals, or None."""
    return (metrics.get("intervals") or {}).get(name)


def _spread(interval: list | None) -> str:
    """"low - high", or "" where no interval was measured (older evaluations, or no such metric)."""
    return f"{interval[0]:.3f} - {interval[1]:.3f}" if interval else ""


def _other_lab_summary(other: dict) -> str:
    """Accuracy over every image, and how much the model answered and got right of that: the two
    numbers a reader of the Describe page's other-lab warning meets."""
    text = f"{other['accuracy']:.3f} (all cells)"
    if other.get("abstain_rate") is not None and other.get("accuracy_answered") is not None:
        answered, right = 1 - other["abstain_rate"], other["accuracy_answered"]
        text += f"; answers {answered:.0%}, {right:.0%} right"
    return text


def _target(name: str, goal: str, value, met, shown=lambda v: f"{v:.3f}", interval=None,
            at_upper=lambda high: high) -> dict:
    """One row of the targets table; `interval` ([low, high]) shows how far val sampling alone
    moves the value, and a target missed by the value but reached at the interval's top
    (`at_upper(high)` is the value there) is marked so: val cannot tell whether it is met."""
    spread = _spread(interval)
    if value is None:
        verdict, shown_value = "not measured", "not measured"
    elif met(value):
        verdict, shown_value = "yes", shown(value)
    else:
        inside = interval is not None and met(at_upper(interval[1]))
        verdict, shown_value = ("NO (within the interval)" if inside else "NO"), shown(value)
    return {"target": name, "goal": goal, "this model (val)": shown_value, INTERVAL_COLUMN: spread, "met": verdict}


def first_existing(paths: list[Path]) -> Path | None:
    """The first path that is a file, or None."""
    return next((p for p in paths if p.is_file()), None)


def gan_grid_paths(samples_dir: Path) -> list[Path]:
    """Where a synthetic (GAN) sample grid may lie: the configured and the shipped sample folder."""
    return [Path(samples_dir) / "gan_grid.png", PROJECT_ROOT / "assets" / "samples" / "gan_grid.png"]


def panels_frame(bundle: ModelBundle) -> pd.DataFrame:
    """One row per panel: title, validated yes/no, classes, warning, source."""
    return pd.DataFrame([{
        "panel": p.name, "validated": "yes" if p.validated else "no", "warning": p.warning, "title": p.title,
        "classes": ", ".join(c.name for c in p.classes), "source": p.source,
    } for p in bundle.panels.values()])


def training_info(bundle: ModelBundle) -> dict:
    """The sidecar's training block ({} when absent)."""
    training = bundle.sidecar.get("training")
    return training if isinstance(training, dict) else {}


def data_counts_frame(bundle: ModelBundle) -> pd.DataFrame | None:
    """Training images per class (its key, the data's folder name, and its display name), or None
    when the sidecar does not say."""
    counts = training_info(bundle).get("data_counts") or bundle.sidecar.get("data_counts")
    if not counts:
        return None
    names = class_names(bundle.panels)
    frame = pd.DataFrame([(key, names.get(key, ""), n) for key, n in sorted(counts.items())],
                         columns=["class", "name", "training images"])
    total = {"class": "total", "name": "", "training images": frame["training images"].sum()}
    return pd.concat([frame, pd.DataFrame([total])])


def flat_metrics(metrics: dict, prefix: str = "") -> pd.DataFrame:
    """Nested metrics dict -> two columns (metric, value), nested keys joined by '.'; values that
    were not measured (None, empty lists) are left out."""
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if value is None or value == []:
            continue
        if isinstance(value, dict):
            rows.extend(flat_metrics(value, name + ".").to_dict("records"))
        else:
            rows.append({"metric": name, "value": str(round(value, 4) if isinstance(value, float) else value)})
    return pd.DataFrame(rows, columns=["metric", "value"])
