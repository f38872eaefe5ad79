"""Fitting calibration on val: temperatures, the confidence threshold for a target accuracy, and
the expected calibration error that reports them. Fitting is training work (training.calibrate);
what the fitted numbers mean at describe time lives in core.reliability."""
from __future__ import annotations

import math

import torch

from core.reliability import image_temperatures


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


# slopes tried by fit_distance_temperature, per unit of out-of-scope score (home val scores of
# v18 spread over about 3-15 units): 0 keeps a constant temperature when that fits best
DISTANCE_SLOPES = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def fit_distance_temperature(logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
                             reference: float) -> tuple[float, float]:
    """(temperature, distance_slope) minimising the negative log-likelihood of `labels` under
    `image_temperatures`: for each slope of DISTANCE_SLOPES the temperature is fitted by
    `fit_temperature`, and the pair with the lowest NLL wins (a near tie keeps the smaller slope)."""
    calibration = {"temperature": 1.0, "distance_reference": reference}
    best = None
    for slope in DISTANCE_SLOPES:
        scaled = logits / image_temperatures({**calibration, "distance_slope": slope}, scores)[:, None]
        temperature = fit_temperature(scaled, labels)
        nll = float(torch.nn.functional.cross_entropy(scaled / temperature, labels))
        if best is None or nll < best[0] - 1e-6:
            best = (nll, temperature, slope)
    return best[1], best[2]


def confidence_threshold_for_accuracy(confidences: torch.Tensor, correct: torch.Tensor,
                                      target_accuracy: float, min_coverage: float) -> float:
    """Lowest confidence threshold whose answered cases reach `target_accuracy`; if none
    keeps `min_coverage`, the threshold at exactly `min_coverage` (coverage wins: say so).
    With `min_coverage` 0 and no answers that reach the target, infinity: answer nothing
    (a morphology phrase the model cannot see is marked uncertain, not stated)."""
    order = torch.argsort(confidences, descending=True)
    running = torch.cumsum(correct[order].float(), 0) / torch.arange(1, len(order) + 1)
    ok = torch.nonzero(running >= target_accuracy).squeeze(1)
    n_accurate = int(ok.max()) + 1 if len(ok) else 0  # most answers that keep the accuracy
    if n_accurate == 0 and min_coverage <= 0:
        return math.inf
    n_answered = max(n_accurate, max(1, int(math.ceil(min_coverage * len(order)))))
    return float(confidences[order][n_answered - 1])
