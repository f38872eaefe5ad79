"""Per-attribute confidence thresholds for the morphology sentence, fitted on val.

A phrase whose confidence is below its attribute's threshold is shown marked "(?)" instead
of being stated (core.morphology). Each threshold is the lowest confidence whose phrases reach
the target accuracy on the fit half of a WBCAtt CSV; there is no coverage floor, because
a phrase the model cannot see (e.g. nucleus shape at 96 px) should be marked uncertain
rather than guessed. Everything is measured on the other, held-out half."""
from __future__ import annotations

import math

import torch

from core.checkpoint import ModelBundle
from core.morphology import attribute_probabilities
from training.calibration_fit import confidence_threshold_for_accuracy
from training.dataset import annotated_value
from training.evaluation_utils import seeded_halves


def attribute_confidences(bundle: ModelBundle, embeddings: torch.Tensor, rows: list[dict],
                          name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(confidence, correct, annotated) per row for one attribute; `annotated` is False where the
    CSV value lies outside the model's vocabulary (such rows neither fit nor count)."""
    values = list(bundle.sidecar["attribute_phrases"][name])
    confidence, predicted = attribute_probabilities(bundle, name, embeddings).max(dim=-1)
    given = [annotated_value(r, name) for r in rows]
    truth = torch.tensor([values.index(v) if v in values else -1 for v in given])
    return confidence, predicted == truth, truth >= 0


def calibrate_attributes(bundle: ModelBundle, embeddings: torch.Tensor, rows: list[dict],
                         target_accuracy: float, seed: int = 0) -> tuple[dict[str, float | None], dict]:
    """({attribute: min confidence, or None: never stated}, report measured on the held-out half of
    `rows`). Attributes without annotated rows in both halves get no threshold and are listed
    under "skipped"."""
    is_fit = torch.zeros(len(rows), dtype=torch.bool)
    is_fit[seeded_halves(len(rows), seed)[0]] = True
    thresholds, report, skipped = {}, {}, []
    for name in bundle.attribute_prototypes:
        confidence, correct, annotated = attribute_confidences(bundle, embeddings, rows, name)
        fit, held_out = annotated & is_fit, annotated & ~is_fit
        if not fit.any() or not held_out.any():
            skipped.append(name)
            continue
        # round first: the report must describe the threshold that is stored
        threshold = round(confidence_threshold_for_accuracy(confidence[fit], correct[fit], target_accuracy, 0.0), 4)
        certain = confidence[held_out] >= threshold
        # infinite (no confidence reached the target on the fitting half): stored as null, "never stated"
        thresholds[name] = None if math.isinf(threshold) else threshold
        report[name] = {"n": int(held_out.sum()), "accuracy": round(float(correct[held_out].float().mean()), 4),
                        "certain_share": round(float(certain.float().mean()), 4),
                        "accuracy_certain": round(float(correct[held_out][certain].float().mean()), 4)
                        if certain.any() else None}
    return thresholds, {"target_accuracy": target_accuracy, "n_held_out": int((~is_fit).sum()),
                        "per_attribute": report, "skipped": skipped}
