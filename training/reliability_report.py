"""Reliability report: calibration, risk-coverage and out-of-scope detection, measured.

    python -m training.reliability_report --checkpoint MODEL --pbc-val PBC/val --ball-val B_ALL/val \
        [--md docs/reliability.md] [--plots assets/model]

Writes a Markdown report, a reliability diagram and risk-coverage plot (shown on the model
card), and a summary into the model sidecar ("reliability"). The out-of-scope score is the one
the app and the evaluation CLI use (core.reliability.out_of_scope_scores); none of the
out-of-scope sets below was used to fit anything.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from core.checkpoint import load_bundle, update_sidecar
from core.data import scan_class_folders
from core.describe import describe_batch
from training.cli import run_main
from training.evaluate import match_folders
from training.ood_sets import blank_images, natural_photos, noise_images, text_images
from training.reliability_plots import reliability_diagram, risk_coverage_plot


def load_folder(bundle, folder: str, panel: str, limit: int = 0):
    """Images and class keys of a folder of the panel's class folders (at most `limit` a class
    when > 0), named and decoded as the evaluation CLI does ("Neutrophil" is neutrophil; the
    upload loader); a ValueError for a folder that is no class of the panel (it would count as
    a wrong answer in every figure)."""
    from core.imageio import load_image_path

    if not Path(folder).is_dir():
        raise ValueError(f"{folder}: not a folder (expected a val folder with a sub-folder per class)")
    items, _ = match_folders(bundle, scan_class_folders(folder))
    if not items:
        raise ValueError(f"{folder}: no images in its class folders")
    strays = sorted({i.label for i in items} - set(bundle.panels[panel].keys))
    if strays:
        raise ValueError(f"{folder}: {', '.join(strays)} are not classes of panel {panel}")
    if limit:
        items = items[:: max(1, len(items) // limit)]
    return [load_image_path(str(i.path)).image for i in items], [i.label for i in items]


def describe_all(bundle, images, panel, batch=128) -> list:
    """Descriptions of all images under `panel`, batch by batch (one forward pass each)."""
    return [d for start in range(0, len(images), batch) for d in describe_batch(bundle, images[start:start + batch], panel)]


def scores_for(descriptions) -> tuple[np.ndarray, np.ndarray]:
    """(out-of-scope scores, abstained flags): the score is the one describe computed with
    core.reliability.out_of_scope_scores, the same rule the app and evaluation CLI use."""
    return (np.array([d.out_of_scope_score for d in descriptions]),
            np.array([d.abstained for d in descriptions]))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """AUROC of telling out-of-scope (positive, higher score) from in-scope images."""
    labels = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    scores = np.r_[in_scores, out_scores]
    finite = scores[np.isfinite(scores)]
    # refused images (blank, noise) score +inf: rank them above every finite score
    top = (finite.max() + 1.0) if finite.size else 1.0
    return float(roc_auc_score(labels, np.nan_to_num(scores, posinf=top)))


def panel_section(bundle, panel, val, other, synthetic) -> dict:
    """OOD AUROC and flagged rates for one panel; risk-coverage on its val images."""
    images, labels = val
    descriptions = describe_all(bundle, images, panel)
    in_scores, in_abstained = scores_for(descriptions)
    right = np.array([not d.abstained and d.best_class == y for d, y in zip(descriptions, labels)])
    answered = int((~in_abstained).sum())
    result = {"n_val": len(images), "val_abstain_rate": round(float(in_abstained.mean()), 4),
              "val_accuracy_answered": round(float(right.sum() / answered), 4) if answered else None, "kinds": {}}
    for kind, ood_images in [("natural photos", synthetic["natural"]), (other[0], other[1]),
                             ("blank, noise and text", synthetic["blank"] + synthetic["noise"] + synthetic["text"])]:
        scores, abstained = scores_for(describe_all(bundle, ood_images, panel))
        result["kinds"][kind] = {"n": len(ood_images), "auroc": round(auroc(in_scores, scores), 4),
                                 "flagged_rate": round(float(abstained.mean()), 4)}
    result["curve"] = risk_coverage(descriptions, labels)
    return result


def risk_coverage(descriptions, labels) -> dict:
    """Error rate of the most confident answers at each coverage (abstention by confidence)."""
    confidence = np.array([d.confidence for d in descriptions])
    correct = np.array([d.best_class == y for d, y in zip(descriptions, labels)])
    order = np.argsort(-confidence)
    cumulative = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    coverages = np.arange(1, len(order) + 1) / len(order)
    points = {f"{c:.2f}": round(float(1 - cumulative[max(0, int(np.ceil(c * len(order))) - 1)]), 4)
              for c in (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)}
    return {"risk_at_coverage": points, "coverage": coverages.tolist()[::10], "risk": (1 - cumulative).tolist()[::10],
            "confidence": confidence.tolist(), "correct": correct.astype(int).tolist()}


def write_markdown(path: Path, report: dict, args) -> None:
    """The report as Markdown (docs/reliability.md), with the command that made it."""
    lines = ["# Reliability report", "", f"Model `{report['model_id']}`. Command:", "",
             f"    python -m training.reliability_report --checkpoint {args.checkpoint} --pbc-val {args.pbc_val} "
             f"--ball-val {args.ball_val}", "",
             "Out-of-scope score: " + report["calibration"].get("out_of_scope", {}).get(
                 "score", "cosine distance to the nearest training-class centroid of the chosen panel") + "; blank "
             "and pixel-noise images are refused before scoring (score +inf, see core.reliability).",
             "AUROC: in-scope = the panel's val images; out-of-scope = each set below (never used for fitting).",
             "flagged = share the app would not describe as a known class (same rule as the evaluation CLI).", ""]
    for panel, section in report["panels"].items():
        lines += [f"## Panel `{panel}` (val n={section['n_val']}, abstain rate on val {section['val_abstain_rate']}, "
                  f"accuracy of the answered {section.get('val_accuracy_answered')})", "",
                  "| out-of-scope set | n | AUROC | flagged |", "|---|---|---|---|"]
        lines += [f"| {kind} | {v['n']} | {v['auroc']:.3f} | {v['flagged_rate']:.3f} |" for kind, v in section["kinds"].items()]
        lines += ["", "Risk (error rate) of the most confident answers at each coverage, on val, ranked by "
                  "confidence alone (the shipped rule also applies the out-of-scope and neighbour checks: its "
                  "operating point is in the heading):", "",
                  "| coverage | " + " | ".join(section["curve"]["risk_at_coverage"]) + " |",
                  "|---" * (1 + len(section["curve"]["risk_at_coverage"])) + "|",
                  "| risk | " + " | ".join(f"{v:.4f}" for v in section["curve"]["risk_at_coverage"].values()) + " |", ""]
    lines += ["Calibration (fitted on one half of val, measured on the other half):", "", "```json",
              json.dumps({p: v.get("report") for p, v in report["calibration"].get("panels", {}).items()}, indent=2),
              "```", "", "![reliability diagram](../assets/model/reliability_diagram.png)",
              "![risk-coverage](../assets/model/risk_coverage.png)", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


@torch.no_grad()  # in-process callers (tests) keep their grad mode
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--pbc-val", required=True)
    p.add_argument("--ball-val", required=True)
    p.add_argument("--md", default="docs/reliability.md")
    p.add_argument("--plots", default="assets/model")
    args = p.parse_args(argv)
    bundle = load_bundle(args.checkpoint)
    pbc, ball = load_folder(bundle, args.pbc_val, "blood_cells"), load_folder(bundle, args.ball_val, "b_all")
    synthetic = {"natural": natural_photos(), "blank": blank_images(), "noise": noise_images(), "text": text_images()}
    report = {"model_id": bundle.model_id, "calibration": bundle.sidecar.get("calibration", {}), "panels": {
        "blood_cells": panel_section(bundle, "blood_cells", pbc, ("B-ALL smear fields (other data set)", ball[0]), synthetic),
        "b_all": panel_section(bundle, "b_all", ball, ("PBC single cells (other data set)", pbc[0]), synthetic)}}
    reliability_diagram(report["panels"]["blood_cells"]["curve"], bundle, Path(args.plots) / "reliability_diagram.png")
    risk_coverage_plot(report["panels"], Path(args.plots) / "risk_coverage.png")
    write_markdown(Path(args.md), report, args)
    summary = {panel: {"val_abstain_rate": s["val_abstain_rate"], "risk_at_coverage": s["curve"]["risk_at_coverage"],
                       "out_of_scope": s["kinds"]} for panel, s in report["panels"].items()}
    update_sidecar(args.checkpoint, {"reliability": summary})
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
