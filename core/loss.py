"""Contrastive losses for the dual encoder.

Why label-aware targets: thousands of images share one class sentence, so a batch holds many
true image-text pairs besides the diagonal. Plain InfoNCE (CLIP) would treat an image of a
neutrophil and another image's neutrophil sentence as a negative pair and push them apart.
We instead give each row a *soft target* spread uniformly over every positive in the batch
(a multi-positive, "supervised" contrastive target), in both directions:

* image -> text: each image against the distinct sentences present in the batch;
* text -> image: each sentence against the images of the batch, its target spread over all
  images of its class.

The sentences of a batch are de-duplicated by class (one sampled paraphrase per class), so
the image -> text direction is an ordinary cross-entropy over the classes present, and the
text -> image direction is the multi-positive part.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_cross_entropy(logits: torch.Tensor, positives: torch.Tensor,
                              row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of `logits` (rows) against a uniform target over the True entries of
    the boolean matrix `positives` (same shape). Rows without positives are ignored;
    `row_weights` (optional) weights each row's loss (class re-weighting)."""
    positives = positives.float()
    counts = positives.sum(dim=1)
    keep = counts > 0
    if not keep.any():
        return logits.sum() * 0.0
    target = positives[keep] / counts[keep, None]
    per_row = -(target * F.log_softmax(logits[keep], dim=1)).sum(dim=1)
    if row_weights is None:
        return per_row.mean()
    weights = row_weights[keep]
    return (per_row * weights).sum() / weights.sum()


def bidirectional_contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    image_groups: torch.Tensor,
    text_groups: torch.Tensor,
    logit_scale: torch.Tensor,
    image_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Label-aware CLIP loss in both directions.

    image_emb: (N, D) unit-norm; text_emb: (M, D) unit-norm; image_groups (N,) and
    text_groups (M,) are integer group ids (class ids): pair (i, j) is positive when the ids
    match. `image_weights` (N,) optionally re-weights images (``--balance reweight``) in the
    image -> text direction. Returns the mean of both directions under "loss" and each direction apart.
    """
    logits = logit_scale * image_emb @ text_emb.t()
    positives = image_groups[:, None] == text_groups[None, :]
    image_to_text = soft_target_cross_entropy(logits, positives, image_weights)
    text_to_image = soft_target_cross_entropy(logits.t(), positives.t())
    return {
        "loss": 0.5 * (image_to_text + text_to_image),
        "image_to_text": image_to_text,
        "text_to_image": text_to_image,
    }


def attribute_matching_loss(
    image_emb: torch.Tensor,
    phrase_emb: torch.Tensor,
    attribute_slices: list[slice],
    attribute_targets: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy of each image against the candidate phrases of every attribute.

    phrase_emb stacks the phrases of all attributes; attribute_slices[a] selects the rows of
    attribute a; attribute_targets (N, A) holds the value index per image, -1 when unknown
    (images without WBCAtt annotations). This teaches the image side to match morphology
    phrases, the text side (projection) to separate them.
    """
    logits = logit_scale * image_emb @ phrase_emb.t()
    losses = []
    for a, cols in enumerate(attribute_slices):
        target = attribute_targets[:, a]
        known = target >= 0
        if known.any():
            losses.append(F.cross_entropy(logits[known, cols], target[known]))
    if not losses:
        return logits.sum() * 0.0
    return torch.stack(losses).mean()
