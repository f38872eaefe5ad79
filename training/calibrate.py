"""Fit calibration and abstention thresholds on val and store them in the model sidecar.

    python -m training.calibrate --checkpoint PATH (--train DIR... | --keep-centroids) --val DIR...
        [--attributes CSV]

* class centroids of the training images in embedding space and the inverse of their shared
  within-class covariance, Ledoit-Wolf shrunk (out-of-scope score, see core.reliability);
* per panel: a temperature that grows with the out-of-scope score above its val median (NLL on
  val; core.reliability.image_temperatures, a slope of 0 when a constant fits best) and the
  lowest confidence whose answered cases reach --target-accuracy while answering at least
  --min-coverage;
* per panel, an out-of-scope threshold: the distance to the panel's nearest class centroid
  below which --ood-coverage of the panel's val images fall, and the band of the most atypical
  answered images below it (core.typicality);
* per panel, unless --neighbours is 0: the neighbour check (core.neighbours): an answer stands only
  when --min-agreement of its K nearest training cells are of the class named; every --train image
  is kept in the weights file as a reference cell, and the confidence threshold is fitted on the
  answers that pass this check;
* with --attributes (a WBCAtt val CSV), per attribute the lowest phrase confidence whose
  phrases reach --attribute-target-accuracy (training.calibrate_attributes).
Honesty: val is split in two seeded halves; everything is fitted on one half and the
numbers stored under "calibration.report" are measured on the other half. A panel whose fit
is degenerate (a temperature outside SANE_TEMPERATURE, or fewer than MIN_VAL_PER_CLASS val
images of a class) is stored with "degenerate": true and its reasons, and a warning says so.
Each --val folder holds one panel's classes: the panel --panel names (one per folder, in order),
else the one its class folders fit, by training.evaluate's rule (`core.panels.infer_panel`). A tie
between panels, a folder no panel holds, a class folder outside the panel, two folders of one
panel, a missing folder, --train folders holding no class of a --val panel, or a model that does
not load is one line on stderr and exit status 2, before any image is embedded and with nothing
written. Class folders are read as training and evaluation read them ("Neutrophil" is neutrophil).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from core.checkpoint import ModelLoadError, load_bundle, save_bundle, update_sidecar
from core.data import LabelledImage
from core.model import VIEW_COUNTS
from core.morphology import DEFAULT_PHRASE_THRESHOLD
from core.neighbours import DEFAULT_NEIGHBOURS, reaches
from core.reliability import image_temperatures, out_of_scope_scores
from core.typicality import fit_typicality
from training.attribute_eval import read_attribute_rows
from training.calibrate_attributes import calibrate_attributes
from training.calibrate_inputs import centroid_source, val_panels
from training.calibration_fit import (confidence_threshold_for_accuracy, expected_calibration_error,
                                      fit_distance_temperature, fit_temperature)
from training.cli import non_negative_int, positive_int, run_main, share
from training.evaluation_utils import seeded_halves
from training.reference_cells import embed_items, fit_training_cells


# A fit outside these is flagged, not stored silently. Logits are cosine x the learned scale
# (up to 100), and a trained model's val temperature lies near 1; one far outside means the
# fitting half carried almost no signal (a handful of images, or a model at chance).
SANE_TEMPERATURE = (0.05, 20.0)
MIN_VAL_PER_CLASS = 20  # val images of each class (half fit, half measure the report)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    centroids = p.add_mutually_exclusive_group(required=True)
    centroids.add_argument("--train", nargs="+", default=None, help="training folders (for class centroids)")
    centroids.add_argument("--keep-centroids", action="store_true",
                           help="reuse the model's stored class centroids (and covariance) instead of --train: "
                                "refits the temperature and thresholds alone, and the weights file keeps its bytes "
                                "and sha256")
    p.add_argument("--val", nargs="+", required=True, help="validation folders (one panel each)")
    p.add_argument("--panel", nargs="+", default=None, metavar="NAME",
                   help="panel of each --val folder, in order (default: inferred from its class folders, "
                        "as training.evaluate does; a tie is refused)")
    p.add_argument("--target-accuracy", type=share, default=0.99)
    p.add_argument("--min-coverage", type=share, default=0.90)
    p.add_argument("--ood-coverage", type=share, default=0.99, help="share of val images accepted as in scope")
    p.add_argument("--per-class", type=positive_int, default=400, help="training images per class for centroids")
    p.add_argument("--neighbours", type=non_negative_int, default=DEFAULT_NEIGHBOURS,
                   help="K of the neighbour check (core.neighbours): with --train every training image is kept "
                        "as a reference cell; 0 keeps none and fits no check")
    p.add_argument("--min-agreement", type=share, default=0.9,
                   help="share of the K nearest training cells that must be of the class named")
    p.add_argument("--cache-dir", default="runs/cache")
    p.add_argument("--attributes", default=None,
                   help="WBCAtt val CSV: also fit the morphology phrases' confidence thresholds")
    p.add_argument("--attribute-target-accuracy", type=share, default=0.95,
                   help="accuracy the phrases stated without '(?)' must reach")
    p.add_argument("--views", type=int, choices=VIEW_COUNTS, default=None,
                   help="embed each image as the mean of this many turned copies (core.model.encode_views), "
                        "in calibration and afterwards in describing (default: the model's current number)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def choose_views(bundle, args) -> int:
    """--views, else the model's; refused (ValueError) when it differs from the views the stored
    centroids (--keep-centroids) or phrase thresholds (no --attributes) were embedded with."""
    views = args.views or bundle.views
    if args.keep_centroids and views != bundle.views:
        raise ValueError(f"--views {views}: the stored centroids were embedded with {bundle.views} view(s); "
                         "recompute them with --train")
    if views != bundle.views and not args.attributes and (bundle.sidecar.get("calibration") or {}).get("attributes"):
        raise ValueError(f"--views {views}: the stored phrase thresholds were fitted on {bundle.views}-view "
                         "embeddings; refit them with --attributes PBC/attributes_val.csv")
    return views


def calibrate_panel(bundle, embeddings, labels, panel, fit, held_out, args) -> dict:
    """Temperature (and its growth with the out-of-scope score), out-of-scope and confidence
    thresholds fitted on the `fit` rows and measured on the `held_out` rows."""
    keys = bundle.panels[panel].keys
    target = torch.tensor([keys.index(label) for label in labels])
    logits = embeddings @ bundle.prototypes[panel].t() * float(bundle.model.scale().detach())
    scores = out_of_scope_scores(bundle, embeddings, keys)
    reference = float(torch.quantile(scores[fit], 0.5))
    temperature, slope = fit_distance_temperature(logits[fit], target[fit], scores[fit], reference)
    fitted = {"temperature": temperature, "distance_slope": slope, "distance_reference": reference}
    probs = torch.softmax(logits / image_temperatures(fitted, scores)[:, None], dim=-1)
    confidence, predicted = probs.max(dim=-1)
    correct = predicted == target
    constant = torch.softmax(logits / fit_temperature(logits[fit], target[fit]), dim=-1).max(dim=-1).values
    ood_threshold = float(torch.quantile(scores[fit], args.ood_coverage))
    in_scope = scores <= ood_threshold
    agrees = neighbours_agree(bundle, embeddings, [keys[int(p)] for p in predicted], panel, args)
    passes = in_scope if agrees is None else in_scope & agrees  # what the confidence threshold may answer
    fit_in = fit[passes[fit]]
    # the confidence threshold must keep min_coverage of *all* images, after the out-of-scope cut
    needed = min(1.0, args.min_coverage * len(fit) / max(1, len(fit_in)))
    # none of the fitting half passes the checks (a model at chance): answer nothing, flagged degenerate
    threshold = confidence_threshold_for_accuracy(confidence[fit_in], correct[fit_in], args.target_accuracy,
                                                  needed) if len(fit_in) else 1.0
    raw_conf = torch.softmax(logits, dim=-1).max(dim=-1).values
    answered_all = passes & (confidence >= threshold)
    answered = answered_all[held_out]

    def ece(values: torch.Tensor) -> float:
        return round(expected_calibration_error(values[held_out], correct[held_out]), 4)

    check = {} if agrees is None else {"neighbours": args.neighbours, "min_agreement": args.min_agreement}
    refusals = {} if agrees is None else {
        "neighbour_refusal_rate": round(1 - float(agrees[held_out].float().mean()), 4)}
    return {"temperature": round(temperature, 4), "distance_slope": slope, "distance_reference": round(reference, 4),
            "min_confidence": round(threshold, 4), "out_of_scope_threshold": round(ood_threshold, 4), **check,
            "typicality": fit_typicality(scores, correct, answered_all, fit, held_out),
            "report": {"n_held_out": int(len(held_out)), "n_fit_passing_checks": int(len(fit_in)),
                       "ece_before": ece(raw_conf), "ece_after": ece(confidence),
                       "ece_constant_temperature": ece(constant),
                       "accuracy": round(float(correct[held_out].float().mean()), 4),
                       "coverage": round(float(answered.float().mean()), 4),
                       "out_of_scope_rate": round(1 - float(in_scope[held_out].float().mean()), 4), **refusals,
                       "accuracy_answered": round(float(correct[held_out][answered].float().mean()), 4)}}


def neighbours_agree(bundle, embeddings, predicted: list[str], panel: str, args) -> torch.Tensor | None:
    """(N,) bool: whether at least --min-agreement of each image's --neighbours nearest reference
    cells are of its predicted class, the test core.reliability applies; None when the check is off
    or the model stores no reference cell of the panel's classes."""
    index = bundle.reference_index(panel)
    if not args.neighbours or not len(index):
        return None
    return reaches(index.agreement(embeddings, predicted, args.neighbours), args.min_agreement)


def degenerate_reasons(result: dict, counts: dict[str, int]) -> list[str]:
    """Why a panel's fitted calibration should not be trusted (empty when nothing is wrong);
    `counts` holds the val images of each of the panel's classes."""
    reasons = []
    low, high = SANE_TEMPERATURE
    temperature = result["temperature"]
    if not low <= temperature <= high:
        effect = ("flattens every answer to about 1/K (all classes alike)" if temperature > high
                  else "pushes every confidence to 0 or 1")
        reasons.append(f"temperature {temperature:g} outside [{low:g}, {high:g}] {effect}")
    unusable = [k for k in ("distance_reference", "out_of_scope_threshold") if not math.isfinite(result.get(k, 0.0))]
    if unusable:  # e.g. no centroid of any val class: every score infinite
        reasons.append(f"{' and '.join(unusable)} not a finite number")
    if (result.get("report") or {}).get("n_fit_passing_checks") == 0:
        reasons.append("no val image of the fitting half passed the out-of-scope and neighbour checks")
    few = {key: n for key, n in counts.items() if n < MIN_VAL_PER_CLASS}
    if few:
        listed = ", ".join(f"{key} {n}" for key, n in few.items())
        reasons.append(f"fewer than {MIN_VAL_PER_CLASS} val images of {listed}")
    return reasons


def flag_degenerate(panel: str, result: dict, counts: dict[str, int]) -> None:
    """Record in `result` whether the fit is degenerate, and warn on stderr in words for a user."""
    reasons = degenerate_reasons(result, counts)
    result["degenerate"] = bool(reasons)
    if reasons:
        result["degenerate_reasons"] = reasons
        print(f"warning: the calibration of panel {panel} is degenerate ({'; '.join(reasons)}): its temperature "
              f"and min_confidence {result['min_confidence']} are stored but not trustworthy, so the confidences "
              "the app shows and its choice to answer or abstain rest on noise; calibrate on a val set with "
              f"at least {MIN_VAL_PER_CLASS} images of every class", file=sys.stderr)


def phrase_thresholds(bundle, rows: list[dict], args, previous: dict) -> dict:
    """{"attributes": thresholds, "attributes_report": ...} fitted on the WBCAtt `rows`; without
    rows, the ones of the `previous` calibration (recalibrating the panels alone keeps them)."""
    if not rows:
        return {k: previous[k] for k in ("attributes", "attributes_report") if k in previous}
    items = [LabelledImage(Path(r["path"]), r.get("label", "")) for r in rows]
    thresholds, report = calibrate_attributes(bundle, embed_items(bundle, items, args.cache_dir), rows,
                                              args.attribute_target_accuracy, args.seed)
    print("attributes", json.dumps(thresholds), json.dumps(report), flush=True)
    if report["skipped"]:
        print(f"warning: no threshold for {', '.join(report['skipped'])} (too few annotated cells); "
              f"those phrases keep the default {DEFAULT_PHRASE_THRESHOLD}", file=sys.stderr)
    return {"attributes": thresholds, "attributes_report": report}


def panels_left_out(bundle, val_sets, same_embeddings: bool, args) -> dict:
    """The earlier calibrations of panels without a --val folder in this run, to keep. They stay
    valid only when the centroids and the views are unchanged (--keep-centroids), and they are
    recorded under this run's seed and targets, so those must be the earlier run's too (the
    typicality band re-splits val by the seed). Otherwise the run is refused (ValueError) instead
    of dropping them, which left a calibrated panel uncalibrated without a word."""
    earlier = bundle.sidecar.get("calibration") or {}
    refitted = {panel for _, panel in val_sets}
    left_out = {name: fit for name, fit in (earlier.get("panels") or {}).items() if name not in refitted}
    if not left_out:
        return {}
    names = ", ".join(sorted(left_out))
    if not same_embeddings:
        raise ValueError(f"panel(s) {names} were calibrated before and have no --val folder here; new "
                         "centroids or views would invalidate their thresholds: add their val folders")
    settings = {"seed": args.seed, "target_accuracy": args.target_accuracy, "min_coverage": args.min_coverage}
    differing = [f"--{k.replace('_', '-')}" for k, v in settings.items() if earlier.get(k) not in (None, v)]
    if differing:
        raise ValueError(f"panel(s) {names} were calibrated with another {', '.join(differing)} and have no --val "
                         "folder here: add their val folders, or use the earlier values")
    for name in sorted(left_out):
        print(f"note: panel {name} has no --val folder here; its earlier calibration is kept", file=sys.stderr)
    return dict(left_out)


@torch.no_grad()  # in-process callers (tests) keep their grad mode
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        attribute_rows = read_attribute_rows(args.attributes, str(Path(args.attributes).parent)) if args.attributes else []
        if args.attributes and not attribute_rows:
            raise ValueError(f"{args.attributes} lists no image")
    except ValueError as error:  # no path column, or no listed image found: nothing to fit
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        bundle = load_bundle(args.checkpoint)
        views = choose_views(bundle, args)
        val_sets = val_panels(bundle, args)
        training_images = centroid_source(bundle, args, val_sets)
        kept_panels = panels_left_out(bundle, val_sets, training_images is None and views == bundle.views, args)
    except (ModelLoadError, ValueError, FileNotFoundError) as error:  # one line, nothing written
        print(f"error: {error}", file=sys.stderr)
        return 2
    previous = bundle.sidecar.get("calibration", {})
    bundle.sidecar["calibration"] = dict(previous, views=views)  # every embedding below is made this way
    if training_images is not None:
        fit_training_cells(bundle, training_images, args)
    elif args.neighbours and not bundle.references:
        print("note: this model stores no reference cells, so no neighbour check is fitted; calibrate with "
              "--train to add them", file=sys.stderr)
    calibration = {"panels": kept_panels,  # the panels fitted below are added to those kept
                   "method": " ".join(__doc__.split("\n\n")[1].split()), "seed": args.seed,  # halves
                   "command": " ".join(["python -m training.calibrate", *(sys.argv[1:] if argv is None else argv)]),
                   "target_accuracy": args.target_accuracy, "min_coverage": args.min_coverage, "views": views}
    for items, panel in val_sets:
        embeddings = embed_items(bundle, items, args.cache_dir)
        fit, held_out = seeded_halves(len(items), args.seed)
        result = calibrate_panel(bundle, embeddings, [i.label for i in items], panel, fit, held_out, args)
        flag_degenerate(panel, result, {key: sum(i.label == key for i in items) for key in bundle.panels[panel].keys})
        calibration["panels"][panel] = result
        print(panel, json.dumps(result), flush=True)
    calibration["out_of_scope"] = {"score": "Mahalanobis distance (shared within-class covariance, Ledoit-Wolf) "
                                            "to the nearest training centroid of the panel's classes",
                                   "coverage_on_val": args.ood_coverage}
    calibration.update(phrase_thresholds(bundle, attribute_rows, args, previous))
    if training_images is None:  # the stored centroids: the weights file is left as it is
        update_sidecar(args.checkpoint, {"calibration": calibration})
        return 0
    bundle.sidecar["calibration"] = calibration
    save_bundle(bundle, args.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
