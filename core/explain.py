"""Grad-CAM: where the image supports a chosen sentence.

Follows pytorch-grad-cam's design: the model is wrapped as image -> embedding, and the
*target* is a tiny callable turning the embedding into the scalar to explain (here: cosine
similarity with the sentence's prototype). Hooks are registered per call inside a ``with``
block and released on exit, because the cached model is shared by every app session.
Grad-CAM needs gradients, so it must never run under ``torch.no_grad``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from core.checkpoint import ModelBundle
from core.preprocess import square_resize, to_model_input


class ImageToEmbedding(nn.Module):
    """The image tower as pytorch-grad-cam expects a model: images -> (B, D) embeddings."""

    def __init__(self, bundle: ModelBundle):
        super().__init__()
        self.model = bundle.model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class SentenceSimilarityTarget:
    """Target callable: cosine similarity of an embedding with one sentence prototype."""

    def __init__(self, prototype: torch.Tensor):
        self.prototype = prototype.detach()

    def __call__(self, embedding: torch.Tensor) -> torch.Tensor:
        return (embedding * self.prototype.to(embedding)).sum()


# Trunk stage Grad-CAM reads, counted from the end of timm's feature_info (-1: the last stage).
# Measured with `python -m training.gradcam_check` on 200 PBC val cells (v5 model, 96 px): the
# last stage (s4, 3 x 3 grid) put 0.27 of its map inside the central disc where PBC centres the
# cell, no better than a uniform map (0.28); s3 0.39, s2 (12 x 12) 0.51, s1 0.55. s2's map also
# depends most on the sentence (correlation with the runner-up sentence's map 0.08; s1 0.19).
# Re-measured on the v9 model: s4 0.29, s3 0.41, s2 0.56, s1 0.55 (correlations 0.13, 0.16, 0.14, 0.23).
# v12: s4 0.24, s3 0.48, s2 0.56, s1 0.58 (correlations 0.38, 0.42, 0.28, 0.34): s1 marginally more
# central, s2 still most dependent on the sentence, so s2 stayed. v18 (the default since session 11):
# s4 0.24, s3 0.49, s2 0.52, s1 0.55 (correlations 0.40, 0.45, 0.39, 0.36): s1 (24 x 24 at 96 px) now
# leads on both, by small margins, so the maps come from s1. c18 (the default in session 17): s4
# 0.22, s3 0.46, s2 0.51, s1 0.53 (correlations 0.38, 0.38, 0.32, 0.25): s1 still leads on both.
# c20 (since session 18): s4 0.21, s3 0.46, s2 0.50, s1 0.51 (correlations 0.40, 0.25, 0.30, 0.30):
# s1 still the most central; s3 less tied to the runner-up but less on the cell, so s1 stays.
CAM_STAGE = -4


def target_layers(bundle: ModelBundle, stage: int = CAM_STAGE) -> list[nn.Module]:
    """The trunk stage Grad-CAM hooks (default CAM_STAGE), as pytorch-grad-cam's target list."""
    trunk = bundle.model.visual.trunk
    stage = max(stage, -len(trunk.feature_info))  # a shallower trunk: its first stage
    return [trunk.get_submodule(trunk.feature_info[stage]["module"])]


def gradcam_heatmap(bundle: ModelBundle, image: Image.Image, prototype: torch.Tensor,
                    stage: int = CAM_STAGE) -> np.ndarray:
    """(S, S) heatmap in [0, 1] at the model's input size for `prototype` (a (D,) tensor:
    a class prototype or an attribute phrase embedding), read at trunk `stage`."""
    from pytorch_grad_cam import GradCAM

    size = bundle.model.config.image_size
    batch = to_model_input([image], size)
    heatmap = None  # pytorch-grad-cam's __exit__ swallows an IndexError raised inside the block
    with bundle.lock, torch.enable_grad(), GradCAM(model=ImageToEmbedding(bundle), target_layers=target_layers(bundle, stage)) as cam:
        try:
            heatmap = cam(input_tensor=batch, targets=[SentenceSimilarityTarget(prototype)])
        finally:  # its backward pass leaves gradients on the model every session shares: drop them
            bundle.model.zero_grad(set_to_none=True)
    if heatmap is None:
        raise RuntimeError("Grad-CAM produced no heatmap (its computation failed inside the hook block)")
    return np.nan_to_num(heatmap[0]).clip(0, 1)


def class_heatmap(bundle: ModelBundle, image: Image.Image, panel: str, class_key: str) -> np.ndarray:
    """Grad-CAM heatmap for one class sentence of a panel."""
    index = bundle.panels[panel].keys.index(class_key)
    return gradcam_heatmap(bundle, image, bundle.prototypes[panel][index])


def overlay(image: Image.Image, heatmap: np.ndarray, opacity: float = 0.5, size: int = 256) -> Image.Image:
    """The heatmap (jet colours) blended over the square-resized image; `opacity` in [0, 1]
    is the heatmap's weight. Cheap, so an opacity slider never recomputes Grad-CAM."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    base = np.asarray(square_resize(image, size), dtype=np.float32) / 255
    cam = np.asarray(Image.fromarray((heatmap * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR),
                     dtype=np.float32) / 255
    opacity = float(np.clip(opacity, 0.0, 1.0))
    return Image.fromarray(show_cam_on_image(base, cam, use_rgb=True, image_weight=1 - opacity))


def attribute_heatmap(bundle: ModelBundle, image: Image.Image, attribute: str, value: str) -> np.ndarray:
    """Grad-CAM heatmap for one morphology phrase (a WBCAtt attribute value)."""
    values = list(bundle.sidecar["attribute_phrases"][attribute])
    return gradcam_heatmap(bundle, image, bundle.attribute_prototypes[attribute][values.index(value)])
