"""How typical an answered image is of the training lab's images, and what that says of its answer.

The out-of-scope score (distance to the nearest training-class centroid, `core.reliability`) refuses
the images far from every cell type. Below that threshold it still carries information: for the
default model of sessions 11-16 (v18, as recalibrated in session 13), the most atypical tenth of its
answers on PBC val were right 94 % of the time against 99 % for the rest, and 63 of the 64 cells it
answered from another lab (BCCD) lay in that band, right 76 % of the time (`training.site_shift_report`;
c18 with the neighbour check, the default in session 17: 52 of 53, right 87 %; c20 at one view, the
default in sessions 18-19: 52 of 52, right 85 %; c20 at four views, the default since session 20:
38 of 38, right 79 %). A
confidence fitted at home cannot say all of this; a note on the answer can. `training.calibrate` fits the
band on one half of val (the score above which the most atypical `ATYPICAL_SHARE` of the answered
cells lie) and measures the accuracy above and below it on the other half; the app and the describe
CLI show the note for answers above it, with that accuracy and how many answers it rests on.
"""
from __future__ import annotations

import torch

from core.reliability import panel_fit

ATYPICAL_SHARE = 0.10  # the most atypical tenth of the home lab's answered val cells
MIN_HELD_OUT_ABOVE = 10  # fewer answered held-out cells in the band: its accuracy is not stated


def fit_typicality(scores: torch.Tensor, correct: torch.Tensor, answered: torch.Tensor, fit: torch.Tensor,
                   held_out: torch.Tensor, share: float = ATYPICAL_SHARE) -> dict | None:
    """The band's threshold, fitted on the answered `fit` rows, and the accuracy of the answered
    `held_out` rows above and below it; None when too few answered rows to fit or to measure."""
    fit_scores = scores[fit][answered[fit]]
    if len(fit_scores) < 2 / share:  # else the quantile is the top score or one below it: no band
        return None
    threshold = float(torch.quantile(fit_scores.float(), 1 - share))
    kept = held_out[answered[held_out]]
    above = scores[kept] > threshold
    if int(above.sum()) < MIN_HELD_OUT_ABOVE or int((~above).sum()) < MIN_HELD_OUT_ABOVE:
        return None
    right = correct[kept].float()
    return {"threshold": round(threshold, 4), "share": share,
            "n_held_out_above": int(above.sum()), "accuracy_above": round(float(right[above].mean()), 4),
            "n_held_out_below": int((~above).sum()), "accuracy_below": round(float(right[~above].mean()), 4)}


def typicality_band(sidecar: dict, panel: str) -> dict | None:
    """The panel's fitted band from the sidecar's calibration, or None (not fitted, or a degenerate fit)."""
    return panel_fit(sidecar, panel).get("typicality") or None


def is_atypical(out_of_scope_score: float, abstained: bool, band: dict | None) -> bool | None:
    """True for an answer in the atypical band; None where the question does not apply (an
    abstention, or no band fitted)."""
    if abstained or band is None:
        return None
    return out_of_scope_score > band["threshold"]


def atypical_note(band: dict) -> str:
    """What an answer in the band means, with the accuracies measured on held-out home val cells
    and the number of answers the first rests on (a small band's accuracy is rough)."""
    n_above = band["n_held_out_above"]
    right = round(band["accuracy_above"] * n_above)
    return (f"Less typical than {round(10 * (1 - band['share']))} in 10 of the training lab's cells the model "
            f"answers. On the training lab's held-out cells, answers this atypical were right "
            f"{band['accuracy_above']:.0%} of the time ({right} of {n_above}), against "
            f"{band['accuracy_below']:.0%} for the more typical ones; on another lab's images it can be far lower, "
            f"whatever the confidence says.")
