"""Checks, at load, that a model sidecar's panels and calibration fit its tensors.

Why: the weights are hash-checked, but the sidecar is not (metrics and recalibrations are written
into it after training). Read unchecked, a damaged or hand-edited sidecar says wrong things
confidently: a class missing from a panel lines every score up with its neighbour's class, a
zero temperature makes every confidence NaN, and a threshold that is not a number switches its
reliability check off without a word. Such a model is refused (ValueError; `core.checkpoint`
turns it into a ModelLoadError naming the file) rather than half-used.
"""
from __future__ import annotations

import math

import torch

from core.panels import Panel

# calibration field -> (lowest, highest) allowed; the bounds are inclusive
PANEL_FIT_RANGES = {
    "temperature": (1e-6, math.inf),  # divides the scores: 0 gives NaN confidences
    "distance_slope": (-math.inf, math.inf),
    "distance_reference": (-math.inf, math.inf),
    "min_confidence": (0.0, 1.0),
    "min_agreement": (0.0, 1.0),
    "out_of_scope_threshold": (-math.inf, math.inf),
}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _check_number(value, where: str, low: float, high: float, finite: bool = True) -> None:
    if not _is_number(value) or (finite and math.isinf(value)) or not low <= value <= high:
        raise ValueError(f"{where} is {value!r}; a number from {low:g} to {high:g} is expected")


def check_panels(panels: dict[str, Panel], prototypes: dict[str, torch.Tensor]) -> None:
    """Every panel has its sentence prototypes, one row per class: the scores are read by position."""
    for name, panel in panels.items():
        bank = prototypes.get(name)
        if bank is None:
            raise ValueError(f"panel {name!r} has no sentence prototypes (bank.{name}) in the weights")
        if bank.ndim != 2 or bank.shape[0] != len(panel.classes):
            raise ValueError(f"panel {name!r} names {len(panel.classes)} classes but its prototypes have "
                             f"shape {tuple(bank.shape)}: the scores would belong to other classes")


def check_attribute_phrases(sidecar: dict, attribute_prototypes: dict[str, torch.Tensor]) -> None:
    """Every attribute's phrases match its prototype rows (values are read by position too)."""
    phrases = sidecar.get("attribute_phrases") or {}
    if attribute_prototypes and not isinstance(phrases, dict):
        raise ValueError("'attribute_phrases' is not an object")
    for name, bank in attribute_prototypes.items():
        values = phrases.get(name)
        if not isinstance(values, dict) or len(values) != bank.shape[0]:
            raise ValueError(f"attribute {name!r} has {bank.shape[0]} prototype rows but its phrases are {values!r}")


def _check_panel_fit(name: str, fit) -> None:
    where = f"calibration of panel {name!r}"
    if not isinstance(fit, dict):
        raise ValueError(f"{where} is not an object")
    if not isinstance(fit.get("degenerate", False), bool):
        raise ValueError(f"{where}: degenerate is {fit['degenerate']!r}; true or false is expected")
    if fit.get("degenerate"):  # never read (core.reliability.panel_fit): its numbers may be anything
        return
    for field, (low, high) in PANEL_FIT_RANGES.items():
        if field in fit:
            # an out-of-scope threshold may be infinite (nothing refused), no other field
            _check_number(fit[field], f"{where}: {field}", low, high, finite=field != "out_of_scope_threshold")
    if "neighbours" in fit and (type(fit["neighbours"]) is not int or fit["neighbours"] < 1):
        raise ValueError(f"{where}: neighbours is {fit['neighbours']!r}; a whole number of at least 1 is expected")
    band = fit.get("typicality")
    if band is not None and (not isinstance(band, dict) or not _is_number(band.get("threshold"))):
        raise ValueError(f"{where}: typicality is {band!r}; an object with a numeric threshold is expected")


def check_calibration(sidecar: dict) -> None:
    """The calibration's shape and numbers: objects where objects are read, numbers in range."""
    calibration = sidecar.get("calibration")
    if calibration is None:
        return
    if not isinstance(calibration, dict):
        raise ValueError("'calibration' is not an object")
    fits = calibration.get("panels") or {}
    if not isinstance(fits, dict):
        raise ValueError("'calibration.panels' is not an object")
    for name, fit in fits.items():
        _check_panel_fit(name, fit)
    thresholds = calibration.get("attributes") or {}
    if not isinstance(thresholds, dict):
        raise ValueError("'calibration.attributes' is not an object")
    for name, threshold in thresholds.items():
        if threshold is not None:  # None: no confidence reached the target on val, never stated
            _check_number(threshold, f"phrase threshold of {name!r}", 0.0, 1.0)


def check_sidecar(sidecar: dict, panels: dict[str, Panel], prototypes: dict[str, torch.Tensor],
                  attribute_prototypes: dict[str, torch.Tensor]) -> None:
    """All of the above; raises ValueError naming the first problem found."""
    check_panels(panels, prototypes)
    check_attribute_phrases(sidecar, attribute_prototypes)
    check_calibration(sidecar)
