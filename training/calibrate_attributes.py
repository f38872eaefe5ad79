"""Per-attribute confidence thresholds for the morphology sentence, fitted on val.

A phrase whose confidence is below its attribute's threshold is shown marked "(?)" instead
of being stated (core.morphology). Each threshold is the lowest confidence whose phrases reach
the target accuracy on the fit half of a WBCAtt CSV; there is no coverage floor, because
a phrase the model cannot see (e.g. nucleus shape at 96 px) should be marked uncertain
rather than guessed. Everything is measured on the other, held-out half."""
from __future__ import annotations

from pathlib import Path

import torch

from core.checkpoint import ModelBundle
from core.data import LabelledImage
from core.reliability import confidence_threshold_for_accuracy
from training.attribute_eval import read_attribute_rows


def attribute_confidences(bundle: ModelBundle, embeddings: torch.Tensor, rows: list[dict],
                          name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(confidence, correct, annotated) per row for one attribute; `annotated` is False where the
    CSV value lies outside the model's vocabulary (such rows neither fit nor count)."""
    values = list(bundle.sidecar["attribute_phrases"][name])
    scale = float(bundle.model.scale().detach())
    probs = torch.softmax(embeddings @ bundle.attribute_prototypes[name].t() * scale, dim=-1)
    confidence, predicted = probs.max(dim=-1)
    truth = torch.tensor([values.index(r[name].strip()) if r[name].strip() in values else -1 for r in rows])
    return confidence, predicted == truth, truth >= 0


def calibrate_attributes(bundle: ModelBundle, embeddings: torch.Tensor, rows: list[dict],
                         target_accuracy: float, seed: int = 0) -> tuple[dict[str, float], dict]:
    """({attribute: min confidence}, report measured on the held-out half of `rows`)."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    is_fit = torch.zeros(len(rows), dtype=torch.bool)
    is_fit[order[: len(rows) // 2]] = True
    thresholds, report = {}, {}
    for name in bundle.attribute_prototypes:
        confidence, correct, annotated = attribute_confidences(bundle, embeddings, rows, name)
        fit, held_out = annotated & is_fit, annotated & ~is_fit
        if not fit.any() or not held_out.any():
            continue
        threshold = confidence_threshold_for_accuracy(confidence[fit], correct[fit], target_accuracy, 0.0)
        certain = confidence[held_out] >= threshold
        thresholds[name] = round(threshold, 4)
        report[name] = {"accuracy": round(float(correct[held_out].float().mean()), 4),
                        "certain_share": round(float(certain.float().mean()), 4),
                        "accuracy_certain": round(float(correct[held_out][certain].float().mean()), 4)
                        if certain.any() else None}
    return thresholds, {"target_accuracy": target_accuracy, "n_held_out": int((~is_fit).sum()),
                        "per_attribute": report}


def attribute_items(csv_path: str, data_root: str) -> tuple[list[LabelledImage], list[dict]]:
    """Images of a WBCAtt CSV as labelled items (label: the CSV's cell type) with their rows."""
    rows = read_attribute_rows(csv_path, data_root)
    return [LabelledImage(Path(r["path"]), r.get("label", "")) for r in rows], rows
