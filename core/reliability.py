"""Calibrated confidence and honest abstention.

Questions answered in this order for every image:
0. Is there an optical image at all? A blank frame (no contrast) or pixel noise (neighbouring
   pixels uncorrelated, which no microscope image at this sampling is) is refused before
   the model is asked; see `content_problems`. So is a strip longer than 3:1, whose centre
   square (all the model reads) is a sliver of it; see `framing_problem`.
1. Is the panel validated at all? A panel whose classes the model never saw an image of
   (the originating study's leukaemia sentences) always abstains, and says why.
2. Is the image out of scope for the panel? Score: Mahalanobis distance in embedding space to
   the nearest centroid of the training images of the panel's classes, with the shared
   within-class covariance of those images (Lee et al. 2018; falls back to cosine distance
   for a model calibrated without it). A photo, a blank, or a cell of another panel (a
   B-ALL smear under ``blood_cells``) lies far from all of them. Mahalanobis rather than
   cosine because the classes spread unevenly: directions in which training cells never
   vary are the ones where odd images stand out.
   When the nearest centroid overall belongs to another panel's class, the reason says so.
3. Is the best match weak? Calibrated probability below a threshold chosen on val for a target
   accuracy of the answered cases. The temperature is fitted on val and grows with the
   out-of-scope score above its median there (`image_temperatures`): a temperature fitted on
   the home lab's cells alone leaves another lab's answers as confident as home answers
   (BCCD: mean confidence 0.81, accuracy 0.46), and the home cells themselves are
   overconfident where they are least typical, which is what lets the fit find the slope.
4. Do the training cells nearest the image agree? Of its K nearest training cells of the
   panel's classes, the share of the class it would name must reach the panel's
   `min_agreement` (core.neighbours); a calibration without one skips this check.
All thresholds live in the model sidecar ("calibration", per panel); `training.calibrate`
writes them on val at a stated coverage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.checkpoint import ModelBundle
from core.neighbours import DEFAULT_NEIGHBOURS, NeighbourVote, reaches
from core.stain import stain_problem, stain_share


@dataclass(frozen=True)
class Decision:
    """Whether to give a sentence or abstain, and which check decided it."""
    abstained: bool  # True when the model should not give a sentence
    reason: str | None  # the reason, in words a hematologist reads
    out_of_scope_score: float  # distance to the nearest training-class centroid of the panel
    kind: str | None = None  # which check refused it: one of ABSTAIN_KINDS, None when answered


# Which check made the model abstain, in the order they run (module docstring). For "content"
# and "out_of_scope" the panel's scores describe nothing (the image is no cell of the panel),
# so a viewer should not show them as a confidence; for "weak" they are the point.
ABSTAIN_KINDS = ("content", "not_validated", "out_of_scope", "weak", "neighbours")


def _class_name(bundle: ModelBundle, key: str) -> str:
    """Display name of a class key, from the first panel that has it (the key itself otherwise)."""
    for panel in bundle.panels.values():
        if key in panel.keys:
            return panel.cell_class(key).name
    return key


def panel_fit(sidecar: dict, panel: str) -> dict:
    """The panel's temperature, thresholds and bands from a sidecar; {} when none were fitted or the
    fit was flagged degenerate (too little val data: its temperature and thresholds are noise)."""
    fitted = ((sidecar.get("calibration") or {}).get("panels") or {}).get(panel) or {}
    return {} if fitted.get("degenerate", False) else fitted


def _fitted(bundle: ModelBundle, panel: str) -> dict:
    return panel_fit(bundle.sidecar, panel)


def is_calibrated(bundle: ModelBundle, panel: str) -> bool:
    """Whether `training.calibrate` fitted this panel's temperature and thresholds on enough val
    data (a fit flagged degenerate counts as none, and is not applied). Without it, confidences
    are raw softmax and the model abstains only on blank or noise images."""
    return bool(_fitted(bundle, panel))


def panel_logits(bundle: ModelBundle, embedding: torch.Tensor, panel: str) -> torch.Tensor:
    """Uncalibrated logits: cosine to each class prototype times the learned scale."""
    return (bundle.prototypes[panel] @ embedding) * float(bundle.model.scale().detach())


def image_temperatures(calibration: dict, scores: torch.Tensor) -> torch.Tensor:
    """(N,) temperatures for images with out-of-scope `scores` (N,): the panel's 'temperature'
    times 1 + 'distance_slope' x the score's excess over 'distance_reference' (the median score of
    the val cells it was fitted on). Without a slope (older sidecars, or a fit that chose 0) every
    image gets the constant temperature, and so does every image when the slope is not a positive
    number or the reference is not finite; a score that is not finite adds nothing."""
    temperature = float(calibration.get("temperature", 1.0))
    slope, reference = float(calibration.get("distance_slope", 0.0)), float(calibration.get("distance_reference", 0.0))
    if not (math.isfinite(slope) and slope > 0 and math.isfinite(reference)):
        # a hand-edited or damaged sidecar: a negative slope would turn the ranking upside down
        return torch.full(scores.shape, temperature)
    excess = (scores - reference).clamp_min(0)
    excess = torch.where(torch.isfinite(excess), excess, torch.zeros_like(excess))
    return temperature * (1 + slope * excess)


def panel_out_of_scope_score(bundle: ModelBundle, embedding: torch.Tensor, panel: str) -> float:
    """The out-of-scope score of one embedding (D,) for the panel (`out_of_scope_scores`); 0.0 for
    a model without class centroids."""
    if not bundle.centroids:
        return 0.0
    return float(out_of_scope_scores(bundle, embedding[None], bundle.panels[panel].keys)[0])


def panel_probabilities(bundle: ModelBundle, embedding: torch.Tensor, panel: str,
                        score: float | None = None) -> list[float]:
    """Calibrated class probabilities within the panel (temperature from `image_temperatures`);
    `score` is the image's `panel_out_of_scope_score` when the caller has it already."""
    calibration = _fitted(bundle, panel)
    temperature = float(calibration.get("temperature", 1.0))
    if calibration.get("distance_slope") and bundle.centroids:
        score = panel_out_of_scope_score(bundle, embedding, panel) if score is None else score
        temperature = float(image_temperatures(calibration, torch.tensor([score]))[0])
    return torch.softmax(panel_logits(bundle, embedding, panel) / temperature, dim=-1).tolist()


def centroid_similarities(bundle: ModelBundle, embedding: torch.Tensor) -> dict[str, float]:
    """Cosine similarity to every training-class centroid."""
    if not bundle.centroids:
        return {}
    keys = list(bundle.centroids)
    sims = torch.stack([bundle.centroids[k] for k in keys]) @ embedding
    return dict(zip(keys, sims.tolist()))


# Fixed from what an optical image is, not fitted to any out-of-scope set: every real val image
# here (PBC, B-ALL, BCCD) has a luminance std >= 0.055 and a neighbour correlation >= 0.86.
MIN_CONTRAST = 0.01  # luminance std, images in [0, 1]
MIN_NEIGHBOUR_CORRELATION = 0.5


# The model reads the centre square of an image (core.preprocess.square_resize). Camera fields
# are at most 16:9 (1.8) and cell crops near square; past 3:1 the square is under a third of the
# image, a sliver rather than a cell: "a strip" is said instead of a confident sentence about it.
MAX_DESCRIBED_ASPECT = 3.0


def framing_problem(size: tuple[int, int]) -> str | None:
    """Why an image of `size` (width, height, as described) gives no basis for a description
    from its centre square (a long narrow strip), or None."""
    width, height = size
    side, long_side = min(width, height), max(width, height)
    # one pixel of slack on the short side: downscaling a large upload rounds it down, so a
    # 3000 x 1000 file arrives as 1024 x 341, just past 3:1
    if long_side <= MAX_DESCRIBED_ASPECT * (side + 1):
        return None
    ratio = long_side / side
    # the ratio, not pixel sizes (a large upload's are after its downscaling); never "3.0"
    shown = f"{ratio:.1f}" if ratio >= MAX_DESCRIBED_ASPECT + 0.05 else f"{ratio:.2f}"
    return (f"The image is {shown} times longer than wide: the model reads only its centre square, "
            f"{side / long_side:.0%} of it, too small a part to describe. Crop the image around one cell.")


def _neighbour_correlation(luminance: torch.Tensor) -> torch.Tensor:
    """(B,) mean Pearson correlation of horizontally and vertically adjacent pixels."""
    def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.flatten(1), b.flatten(1)
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)
    return 0.5 * (correlation(luminance[:, :, 1:], luminance[:, :, :-1]) +
                  correlation(luminance[:, 1:, :], luminance[:, :-1, :]))


def content_problems(images: torch.Tensor) -> list[str | None]:
    """For each model input of (B, 3, S, S) in [0, 1]: why it cannot be a stained smear image
    (blank, pixel noise, or no stain colour), or None."""
    luminance = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    contrast = luminance.flatten(1).std(dim=1)
    neighbours = _neighbour_correlation(luminance)
    problems = []
    for c, n, stain in zip(contrast.tolist(), neighbours.tolist(), stain_share(images).tolist()):
        if c < MIN_CONTRAST:
            problems.append("The image is blank (no contrast): there is no cell to describe.")
        elif n < MIN_NEIGHBOUR_CORRELATION:
            problems.append("The image looks like random pixel noise, not a microscope image "
                            f"(neighbouring pixels correlate {n:.2f}; microscope images > {MIN_NEIGHBOUR_CORRELATION}).")
        else:
            problems.append(stain_problem(stain))  # core.stain: a document or photo has no stain
    return problems


def out_of_scope_scores(bundle: ModelBundle, embeddings: torch.Tensor, panel_keys: list[str]) -> torch.Tensor:
    """(N,) out-of-scope scores of (N, D) embeddings for a panel: Mahalanobis distance to the
    nearest of the panel's class centroids when the bundle has a precision matrix, cosine
    distance otherwise; infinite when the model saw no image of any class of the panel."""
    keys = [k for k in panel_keys if k in bundle.centroids]
    if not keys:
        return torch.full((embeddings.shape[0],), math.inf)
    centroids = torch.stack([bundle.centroids[k] for k in keys]).to(embeddings.dtype)
    if bundle.ood_precision is None:
        return 1 - (embeddings @ centroids.t()).max(dim=-1).values
    diff = embeddings[:, None, :] - centroids[None]
    squared = torch.einsum("nkd,de,nke->nk", diff, bundle.ood_precision.to(embeddings.dtype), diff)
    return squared.clamp_min(0).min(dim=-1).values.sqrt()


def _other_panel_hint(bundle: ModelBundle, embedding: torch.Tensor, panel: str) -> str:
    """" The image fits panel X: choose it." when the nearest training class belongs to another
    calibrated panel and that panel would take the image in scope; else "". Only then: another
    lab's normal neutrophil can lie nearest to B-ALL hematogones while far from them too, and a
    hint to switch to the leukaemia panel would read as a finding."""
    similarities = centroid_similarities(bundle, embedding)
    if not similarities:
        return ""
    nearest = max(similarities, key=similarities.get)
    owner = next((p for p in bundle.panels.values() if nearest in p.keys), None)
    if owner is None or owner.name == panel:
        return ""
    threshold = _fitted(bundle, owner.name).get("out_of_scope_threshold")
    if threshold is None or panel_out_of_scope_score(bundle, embedding, owner.name) > threshold:
        return ""
    return (f" It does fit the panel '{owner.title}' (nearest type: {_class_name(bundle, nearest)}): if the image "
            "belongs there, choose that panel.")


def _out_of_scope_detail(bundle: ModelBundle, score: float, threshold: float) -> str:
    # in words first (a reader cannot weigh a bare distance), the numbers after for whoever checks
    kept = ((bundle.sidecar.get("calibration") or {}).get("out_of_scope") or {}).get("coverage_on_val")
    words = (f": it lies further from every cell type it knows than {kept:.0%} of the training lab's own "
             "cells do" if isinstance(kept, (int, float)) and 0 < kept <= 1 else "")
    return f"{words} (out-of-scope score {score:.1f}, limit {threshold:.1f})"


def abstention_decision(bundle: ModelBundle, embedding: torch.Tensor, panel: str,
                        probabilities: list[float], content_problem: str | None = None,
                        score: float | None = None, vote: NeighbourVote | None = None) -> Decision:
    """Whether to abstain, and why (see the module docstring for the order of checks);
    `content_problem` comes from `content_problems` on the model input, `score` is the image's
    `panel_out_of_scope_score` when the caller has it already, `vote` its `panel_neighbour_votes`
    entry (looked up here when not given)."""
    if content_problem:
        return Decision(True, content_problem, math.inf, "content")
    calibration = _fitted(bundle, panel)
    spec = bundle.panels[panel]
    score = panel_out_of_scope_score(bundle, embedding, panel) if score is None else score
    if not spec.validated:
        return Decision(True, f"The panel '{spec.title}' is not validated: no images of its classes were "
                              "available, so the model cannot vouch for any of its sentences.", score, "not_validated")
    if score > calibration.get("out_of_scope_threshold", math.inf):
        reason = ("This image does not look like the blood-cell images the model was trained on"
                  f"{_out_of_scope_detail(bundle, score, calibration['out_of_scope_threshold'])}.")
        return Decision(True, reason + _other_panel_hint(bundle, embedding, panel), score, "out_of_scope")
    min_confidence = calibration.get("min_confidence", 0.0)
    neighbours = _neighbour_decision(bundle, embedding, panel, probabilities, score, vote)
    if max(probabilities) < min_confidence:
        ranked = sorted(zip(probabilities, (c.name for c in spec.classes)), reverse=True)[:2]
        # when the neighbours disagree too, say so: a reader should not take the runner-up for the answer
        also = f" Also: {neighbours.reason[0].lower()}{neighbours.reason[1:]}" if neighbours.abstained else ""
        return Decision(True, f"The best match is too weak or ambiguous: {ranked[0][1]} {ranked[0][0]:.0%} "
                              f"vs {ranked[1][1]} {ranked[1][0]:.0%} (needs {min_confidence:.0%}).{also}",
                        score, "weak")
    return neighbours


def panel_neighbour_votes(bundle: ModelBundle, embeddings: torch.Tensor, panel: str) -> list[NeighbourVote | None]:
    """The classes of the training cells nearest each embedding of (N, D), in one look-up; K as the
    panel's calibration says (core.neighbours.DEFAULT_NEIGHBOURS when it names none); None for each
    when the model stores no reference cells of the panel's classes."""
    index = bundle.reference_index(panel)
    if not len(index):
        return [None] * len(embeddings)
    k = _fitted(bundle, panel).get("neighbours", DEFAULT_NEIGHBOURS)
    return index.votes(embeddings, k if type(k) is int and k > 0 else DEFAULT_NEIGHBOURS)


def _neighbour_decision(bundle: ModelBundle, embedding: torch.Tensor, panel: str, probabilities: list[float],
                        score: float, vote: NeighbourVote | None) -> Decision:
    """Check 4 of the module docstring, on an answer the other checks let through."""
    min_agreement = _fitted(bundle, panel).get("min_agreement")
    vote = vote if vote is not None else panel_neighbour_votes(bundle, embedding[None], panel)[0]
    if type(min_agreement) not in (int, float) or not 0 <= min_agreement <= 1 or vote is None or not vote.k:
        # no check fitted, or a hand-edited share (2, NaN, true) that would refuse every answer or none
        return Decision(False, None, score)
    spec = bundle.panels[panel]
    best = spec.classes[max(range(len(probabilities)), key=probabilities.__getitem__)]
    needed = math.ceil(min_agreement * vote.k - 1e-9)
    if reaches(vote.share(best.key), min_agreement):
        return Decision(False, None, score)
    others = ", ".join(f"{_class_name(bundle, key)} ({n})" for key, n in
                       sorted(vote.counts.items(), key=lambda item: -item[1]) if key != best.key)
    return Decision(True, f"The best match is {best.name}, but only {vote.agreeing(best.key)} of the {vote.k} "
                          f"most similar training cells are of that type (at least {needed} needed). "
                          f"The others are {others}.", score, "neighbours")
