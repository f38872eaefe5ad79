"""DiffAugment (Zhao et al., NeurIPS 2020) for training a GAN on a few hundred images.

With little data the discriminator memorises the real images and its gradients stop
teaching the generator. Augmenting *both* real and generated images with the same random
family of transforms before every discriminator call, and doing it differentiably so that
the generator's gradient flows back through the augmentation, keeps the discriminator from
memorising without the generator learning to produce augmented-looking images (augmenting
the real images only would leak the transforms into the generated ones).

Policy: colour (brightness, saturation, contrast), translation (1/8 of the side, zero
padding) and cutout (a square of half the side). Images are in [-1, 1], (B, 3, H, W).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")


def _uniform(b: int, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(b, 1, 1, 1, generator=generator).to(device)


def colour(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random brightness shift, saturation and contrast scaling per image."""
    b = x.shape[0]
    x = x + (_uniform(b, generator, x.device) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(b, generator, x.device) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(b, generator, x.device) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by up to `ratio` of its side, filling with zeros (gather, so the
    gradient reaches every source pixel that stays visible)."""
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (b, 1, 1), generator=generator).to(x.device)
    dx = torch.randint(-sw, sw + 1, (b, 1, 1), generator=generator).to(x.device)
    batch, rows, cols = torch.meshgrid(torch.arange(b, device=x.device), torch.arange(h, device=x.device),
                                       torch.arange(w, device=x.device), indexing="ij")
    rows = torch.clamp(rows + dy + 1, 0, h + 1)  # +1: index into the zero-padded image
    cols = torch.clamp(cols + dx + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    return padded[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def cutout(x: torch.Tensor, ratio: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero a random square of `ratio` times the side in each image (a multiplicative mask,
    so the gradient outside the square is untouched)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), generator=generator).to(x.device) - ch // 2
    left = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), generator=generator).to(x.device) - cw // 2
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def diff_augment(x: torch.Tensor, policy: tuple[str, ...] = POLICIES,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the policies in order; shape and dtype are kept."""
    unknown = set(policy) - set(POLICIES)
    if unknown:
        raise ValueError(f"Unknown DiffAugment policies {sorted(unknown)}; known: {POLICIES}")
    for name in policy:
        if name == "color":
            x = colour(x, generator)
        elif name == "translation":
            x = translation(x, generator=generator)
        else:
            x = cutout(x, generator=generator)
    return x
