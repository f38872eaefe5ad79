"""Calibrated confidence and honest abstention.

Three questions, answered in this order for every image:
1. Is it out of scope: far from every cell type the model was trained on (blank, noise,
   text, a photo of a cat)? Score: cosine distance to the nearest class centroid of the
   training images in embedding space. Threshold set on val at a stated coverage.
2. Is it a cell type outside the chosen panel? If the nearest centroid belongs to a class the
   panel does not hold (a B-ALL smear field under ``blood_cells``), say so.
3. Is the best match weak? Calibrated probability (temperature fitted on val) below a
   threshold chosen on val for a target accuracy of the answered cases.
All thresholds live in the model sidecar ("calibration"); `training.calibrate` writes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.checkpoint import ModelBundle


@dataclass(frozen=True)
class Decision:
    abstained: bool  # True when the model should not give a sentence
    reason: str | None  # the reason, in words a hematologist reads
    out_of_scope_score: float  # distance to the nearest training-class centroid


def _calibration(bundle: ModelBundle) -> dict:
    return bundle.sidecar.get("calibration", {})


def panel_logits(bundle: ModelBundle, embedding: torch.Tensor, panel: str) -> torch.Tensor:
    """Uncalibrated logits: cosine to each class prototype times the learned scale."""
    return (bundle.prototypes[panel] @ embedding) * float(bundle.model.scale().detach())


def panel_probabilities(bundle: ModelBundle, embedding: torch.Tensor, panel: str) -> list[float]:
    """Temperature-calibrated class probabilities within the panel."""
    temperature = _calibration(bundle).get("panels", {}).get(panel, {}).get("temperature", 1.0)
    return torch.softmax(panel_logits(bundle, embedding, panel) / temperature, dim=-1).tolist()


def nearest_centroid(bundle: ModelBundle, embedding: torch.Tensor) -> tuple[str | None, float]:
    """(class key, cosine distance) of the closest training-class centroid."""
    if not bundle.centroids:
        return None, 0.0
    keys = list(bundle.centroids)
    sims = torch.stack([bundle.centroids[k] for k in keys]) @ embedding
    best = int(sims.argmax())
    return keys[best], float(1 - sims[best])


def abstention_decision(bundle: ModelBundle, embedding: torch.Tensor, panel: str,
                        probabilities: list[float]) -> Decision:
    """Whether to abstain, and why (see the module docstring for the order of checks)."""
    calibration = _calibration(bundle)
    spec = bundle.panels[panel]
    nearest, distance = nearest_centroid(bundle, embedding)
    ood_threshold = calibration.get("out_of_scope", {}).get("threshold", math.inf)
    if distance > ood_threshold:
        return Decision(True, "This image does not look like any blood-cell image the model was trained on "
                              f"(out-of-scope score {distance:.2f} > {ood_threshold:.2f}).", distance)
    if nearest is not None and nearest not in spec.keys:
        owner = next((p.title for p in bundle.panels.values() if nearest in p.keys), "another panel")
        return Decision(True, f"The cell looks most like '{nearest}' ({owner}), which is outside the "
                              f"chosen panel '{spec.title}'.", distance)
    min_confidence = calibration.get("panels", {}).get(panel, {}).get("min_confidence", 0.0)
    top = max(probabilities)
    if top < min_confidence:
        ranked = sorted(zip(probabilities, spec.keys), reverse=True)[:2]
        return Decision(True, f"The best match is too weak or ambiguous: {ranked[0][1]} {ranked[0][0]:.0%} "
                              f"vs {ranked[1][1]} {ranked[1][0]:.0%} (needs {min_confidence:.0%}).", distance)
    return Decision(False, None, distance)


def expected_calibration_error(confidences: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width bins over the top-class confidence."""
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidences > lo) & (confidences <= hi)
        if inside.any():
            ece += inside.float().mean() * (confidences[inside].mean() - correct[inside].float().mean()).abs()
    return float(ece)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature minimising the negative log-likelihood of `labels` (LBFGS on log T)."""
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.exp())


def confidence_threshold_for_accuracy(confidences: torch.Tensor, correct: torch.Tensor,
                                      target_accuracy: float, min_coverage: float) -> float:
    """Lowest confidence threshold whose answered cases reach `target_accuracy`; if none
    keeps `min_coverage`, the threshold at exactly `min_coverage` (coverage wins: say so)."""
    order = torch.argsort(confidences, descending=True)
    running = torch.cumsum(correct[order].float(), 0) / torch.arange(1, len(order) + 1)
    ok = torch.nonzero(running >= target_accuracy).squeeze(1)
    n_accurate = int(ok.max()) + 1 if len(ok) else 0  # most answers that keep the accuracy
    n_answered = max(n_accurate, max(1, int(math.ceil(min_coverage * len(order)))))
    return float(confidences[order][n_answered - 1])
