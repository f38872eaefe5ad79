"""MixStyle (Zhou et al., ICLR 2021): mix feature "style" between images during training.

Why: early CNN feature statistics (each channel's mean and standard deviation over the
image) carry the stain, illumination and camera of a site far more than the cell's shape.
Swapping part of those statistics between two images of a batch, while keeping each image's
normalised content and label, tells the tower that a neutrophil is a neutrophil under
another image's style. Our batches mix PBC (Barcelona, CellaVision) and B-ALL (Tehran, Zeiss
camera) images, so many mixes are between two real sites.

Training only: the hooks change nothing in eval mode and add no weights, so a model trained
with MixStyle loads and runs exactly like one without it.

Measured (run v8, `--mixstyle 0.5` on the default recipe): PBC val 0.932, B-ALL 0.965, BCCD
0.437 against 0.953 / 0.980 / 0.411 without it; slower learning at home and no real gain on
the other lab, so it is off by default.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def mix_style(features: torch.Tensor, generator: torch.Generator, alpha: float = 0.1) -> torch.Tensor:
    """Mix each image's channel statistics with those of a random other image of the batch.

    features: (B, C, H, W). Mixing weights come from Beta(alpha, alpha) per image; the
    statistics are detached (as in the paper) so gradients flow through the content only.
    """
    b = features.shape[0]
    if b < 2:
        return features
    x = features.float()  # statistics in fp32 even under bf16 autocast
    mean = x.mean(dim=(2, 3), keepdim=True).detach()
    std = (x.var(dim=(2, 3), keepdim=True) + 1e-6).sqrt().detach()
    normalised = (x - mean) / std
    # Beta(alpha, alpha) draws from torch's global RNG, which the training script seeds
    weight = torch.distributions.Beta(alpha, alpha).sample((b,)).to(features).view(b, 1, 1, 1)
    partner = torch.randperm(b, generator=generator).to(features.device)
    mixed_mean = weight * mean + (1 - weight) * mean[partner]
    mixed_std = weight * std + (1 - weight) * std[partner]
    return (normalised * mixed_std + mixed_mean).to(features.dtype)


class MixStyleHooks:
    """Forward hooks on named trunk stages (e.g. regnet's "s1", "s2") that apply `mix_style`
    to a batch with probability `p` while the stage is in training mode."""

    def __init__(self, trunk: nn.Module, stages: list[str], p: float, alpha: float, generator: torch.Generator):
        self.p, self.alpha, self.generator = p, alpha, generator
        self.handles = [trunk.get_submodule(name).register_forward_hook(self._hook) for name in stages]

    @classmethod
    def on_feature_stages(cls, trunk: nn.Module, indices: list[int], p: float, alpha: float,
                          generator: torch.Generator) -> "MixStyleHooks":
        """Hooks on timm `feature_info` stages by index (0 is the stem): portable across trunks,
        e.g. [1, 2] is regnet's s1, s2 and resnet's layer1, layer2 (the paper's choice)."""
        info = trunk.feature_info
        bad = [i for i in indices if not -len(info) <= i < len(info)]
        if bad:
            raise ValueError(f"MixStyle stages {bad} do not exist: this trunk has stages 0..{len(info) - 1}")
        return cls(trunk, [info[i]["module"] for i in indices], p, alpha, generator)

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor):
        if not module.training or float(torch.rand(1, generator=self.generator)) >= self.p:
            return None  # None keeps the stage's own output
        return mix_style(output, self.generator, self.alpha)

    def remove(self) -> None:
        """Detach every hook (the model is then exactly as built)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
