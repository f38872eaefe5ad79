"""Does a batch of images look like another lab's? A check over the per-image out-of-scope flags.

One image refused as out of scope says little: the threshold (`training.calibrate`) lets about 1
in 100 of the training lab's own val cells be refused that way. Many refusals in one upload say
more: if the images were like the training lab's, the number refused would follow
Binomial(n, home rate), and a count that this distribution makes improbable (one-sided tail
below `ALPHA`) means the batch is most likely from another lab, stain, scanner or zoom. That
matters for the images the model *does* answer: on another lab's white cells (BCCD) the default
model refused most and was right on only about two thirds of the rest, while each answer still
carried a confidence fitted at home. Per-image confidence cannot show that; the batch can.

Only images that reached the out-of-scope check count: a blank frame, noise or a strip (refused
by the content check) and a panel that is not validated say nothing about the lab.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

ALPHA = 1e-3  # a false alarm on about 1 in 1,000 home batches at most (binomial model)
MIN_IMAGES = 5  # fewer images cannot make a count improbable enough to warn on


@dataclass(frozen=True)
class ShiftNotice:
    """A batch whose out-of-scope count is improbable for the training lab's images."""
    flagged: int  # images refused as out of scope
    read: int  # images that reached the out-of-scope check
    home_rate: float  # share of the training lab's val cells refused that way
    tail_probability: float  # P(X >= flagged) for X ~ Binomial(read, home_rate)


def home_out_of_scope_rate(sidecar: dict, panel: str) -> float | None:
    """The share of the training lab's val cells the out-of-scope threshold refuses (1 - the
    coverage it was fitted at), or None when the panel has no fitted, non-degenerate threshold."""
    calibration = sidecar.get("calibration") or {}
    fitted = (calibration.get("panels") or {}).get(panel) or {}
    coverage = (calibration.get("out_of_scope") or {}).get("coverage_on_val")
    if fitted.get("degenerate") or fitted.get("out_of_scope_threshold") is None or coverage is None:
        return None
    return max(1.0 - float(coverage), 1e-4)  # a zero rate would make any single refusal "impossible"


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact."""
    if k <= 0:
        return 1.0
    return min(1.0, sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def batch_shift(abstain_kinds: Iterable[str | None], home_rate: float | None, alpha: float = ALPHA,
                min_images: int = MIN_IMAGES) -> ShiftNotice | None:
    """A ShiftNotice when the out-of-scope refusals among `abstain_kinds` (one per described
    image: `Description.abstain_kind`, None when answered) are improbable at `home_rate`; else None."""
    if home_rate is None:
        return None
    read = [kind for kind in abstain_kinds if kind not in ("content", "not_validated")]
    flagged = sum(kind == "out_of_scope" for kind in read)
    if len(read) < min_images or flagged == 0:
        return None
    tail = binomial_tail(flagged, len(read), home_rate)
    return ShiftNotice(flagged, len(read), home_rate, tail) if tail < alpha else None


def shift_message(notice: ShiftNotice, sidecar: dict) -> str:
    """What a reviewer should know about such a batch, with the other-lab numbers the model's
    own evaluation measured (sidecar metrics), where it has them."""
    text = (f"{notice.flagged} of these {notice.read} images were not recognised as cells of this panel; about "
            f"{notice.home_rate:.0%} of the training lab's cells are refused that way, so this batch most likely "
            f"comes from another lab, stain, scanner or zoom. The confidences were fitted on the training lab: on "
            f"images like these, the sentences the model does give are less reliable than they say.")
    metrics = sidecar.get("metrics") or {}
    other, home = metrics.get("bccd_wbc_other_lab") or {}, metrics.get("pbc_val") or {}
    if other.get("accuracy_answered") is not None and home.get("accuracy_answered") is not None:
        text += (f" Measured on another lab's white cells (BCCD): {other['accuracy_answered']:.0%} of the answers "
                 f"were right, against {home['accuracy_answered']:.0%} at home. Check each sentence against the "
                 f"slide.")
    return text
