"""Calibrated confidence and honest abstention.

Questions answered in this order for every image:
1. Is the panel validated at all? A panel whose classes the model never saw an image of
   (the originating study's leukaemia sentences) always abstains, and says why.
2. Is the image out of scope for the panel? Score: cosine distance in embedding space to the
   nearest centroid of the training images of the panel's classes. A photo, a blank, or a
   cell of another panel (a B-ALL smear under ``blood_cells``) lies far from all of them.
   When the nearest centroid overall belongs to another panel's class, the reason says so.
3. Is the best match weak? Calibrated probability (temperature fitted on val) below a
   threshold chosen on val for a target accuracy of the answered cases.
All thresholds live in the model sidecar ("calibration", per panel); `training.calibrate`
writes them on val at a stated coverage.
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


def centroid_similarities(bundle: ModelBundle, embedding: torch.Tensor) -> dict[str, float]:
    """Cosine similarity to every training-class centroid."""
    if not bundle.centroids:
        return {}
    keys = list(bundle.centroids)
    sims = torch.stack([bundle.centroids[k] for k in keys]) @ embedding
    return dict(zip(keys, sims.tolist()))


def out_of_scope_score(similarities: dict[str, float], panel_keys: list[str]) -> float:
    """Cosine distance to the nearest centroid of the panel's classes: high for images
    unlike any cell of the panel (other panels' cells, photos, blanks). Infinite when the
    model saw no image of any class of the panel."""
    inside = [similarities[k] for k in panel_keys if k in similarities]
    return 1 - max(inside) if inside else math.inf


def abstention_decision(bundle: ModelBundle, embedding: torch.Tensor, panel: str,
                        probabilities: list[float]) -> Decision:
    """Whether to abstain, and why (see the module docstring for the order of checks)."""
    calibration = _calibration(bundle).get("panels", {}).get(panel, {})
    spec = bundle.panels[panel]
    similarities = centroid_similarities(bundle, embedding)
    score = out_of_scope_score(similarities, spec.keys) if similarities else 0.0
    if not spec.validated:
        return Decision(True, f"The panel '{spec.title}' is not validated: no images of its classes were "
                              "available, so the model cannot vouch for any of its sentences.", score)
    if score > calibration.get("out_of_scope_threshold", math.inf):
        nearest = max(similarities, key=similarities.get)
        if nearest not in spec.keys:
            owner = next((p.title for p in bundle.panels.values() if nearest in p.keys), "another panel")
            return Decision(True, f"The image looks most like '{nearest}' ({owner}), which is outside the "
                                  f"chosen panel '{spec.title}'.", score)
        return Decision(True, "This image does not look like the blood-cell images the model was trained on "
                              f"(out-of-scope score {score:.2f} above {calibration['out_of_scope_threshold']:.2f}).",
                        score)
    min_confidence = calibration.get("min_confidence", 0.0)
    if max(probabilities) < min_confidence:
        ranked = sorted(zip(probabilities, spec.keys), reverse=True)[:2]
        return Decision(True, f"The best match is too weak or ambiguous: {ranked[0][1]} {ranked[0][0]:.0%} "
                              f"vs {ranked[1][1]} {ranked[1][0]:.0%} (needs {min_confidence:.0%}).", score)
    return Decision(False, None, score)


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
    return float(log_t.detach().exp())


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
