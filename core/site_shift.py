"""Does a batch of images look like another lab's? A check over the per-image out-of-scope flags.

One image refused as out of scope says little: the threshold (`training.calibrate`) lets about 1
in 100 of the training lab's own val cells be refused that way. Many refusals in one upload say
more: if the images were like the training lab's, the number refused would follow
Binomial(n, home rate), and a count that this distribution makes improbable (one-sided tail
below `ALPHA`) means the batch is most likely from another lab, stain, scanner or zoom. That
matters for the images the model *does* answer: on another lab's white cells (BCCD) the default
model refused most and was right on only about three quarters of the rest, while each answer still
carried a confidence near 0.9 (lowered by the distance-aware temperature, but fitted at home).
Per-image confidence cannot show all of that; the batch can.

Only images that reached the out-of-scope check count: a blank frame, noise or a strip (refused
by the content check) and a panel that is not validated say nothing about the lab.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from core.reliability import panel_fit

ALPHA = 1e-3  # under the binomial model at the home rate: a false alarm on at most 1 in 1,000 batches
MIN_IMAGES = 5  # fewer images cannot make a count improbable enough to warn on


@dataclass(frozen=True)
class ShiftNotice:
    """A batch whose out-of-scope count is improbable for the training lab's images."""
    flagged: int  # images refused as out of scope
    read: int  # images that reached the out-of-scope check
    home_rate: float  # share of the training lab's val cells refused that way
    tail_probability: float  # P(X >= flagged) for X ~ Binomial(read, home_rate)


def home_out_of_scope_rate(sidecar: dict, panel: str) -> float | None:
    """The share of the training lab's val cells the out-of-scope threshold refuses: the larger of
    its nominal rate (1 - the coverage it was fitted at, on one half of val) and the rate measured
    on the other half (`training.calibrate`'s report; B-ALL's is about twice the nominal 0.01);
    None when the panel has no fitted, non-degenerate threshold."""
    fitted = panel_fit(sidecar, panel)
    coverage = ((sidecar.get("calibration") or {}).get("out_of_scope") or {}).get("coverage_on_val")
    if fitted.get("out_of_scope_threshold") is None or coverage is None:
        return None
    measured = (fitted.get("report") or {}).get("out_of_scope_rate", 0.0)
    return max(1.0 - float(coverage), float(measured), 1e-4)  # a zero rate would make one refusal "impossible"


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (binomial coefficients of large
    batches do not fit in a float)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


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


def shift_message(notice: ShiftNotice, sidecar: dict, panel: str) -> str:
    """What a reviewer should know about such a batch, with the other-lab numbers the model's
    own evaluation measured on `panel` (sidecar metrics), where it has them."""
    text = (f"{notice.flagged} of these {notice.read} images were not recognised as cells of this panel, against "
            f"about {notice.home_rate:.1%} of the training lab's own cells. Most likely the batch comes from another "
            f"lab, stain, scanner or zoom; it may also hold cells this panel does not cover (abnormal cells, or "
            f"another panel's cell types: check the panel chosen). The confidences were fitted on the training lab: on "
            f"images like these, the sentences the model does give are less reliable than they say.")
    metrics = sidecar.get("metrics") or {}
    other, home = metrics.get("bccd_wbc_other_lab") or {}, metrics.get("pbc_val") or {}
    measured_here = other.get("panel") == panel == home.get("panel")  # BCCD is white cells: blood_cells only
    if measured_here and other.get("accuracy_answered") is not None and home.get("accuracy_answered") is not None:
        text += (f" Measured on another lab's white cells (BCCD): {other['accuracy_answered']:.0%} of the answers "
                 f"were right, against {home['accuracy_answered']:.0%} at home. Check each sentence against the "
                 f"slide.")
    return text
