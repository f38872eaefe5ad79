"""Which images make up an epoch: the balancing modes of ``--balance``.

* ``none``: every image once, shuffled;
* ``oversample``: classes drawn with equal probability (minority images repeat);
* ``panel_oversample``: classes drawn with equal probability within their panel, each panel in
  proportion to its images: a small panel of a few classes (B-ALL: 4 classes, 17 % of the images)
  takes its share of the epoch, not a third of it as under ``oversample`` with 12 classes;
* ``reweight``: every image once, but the loss of each image weighted by the inverse of its
  class frequency (returned by `class_weights`);
* ``gan``: real images once plus synthetic ones for minority classes (the synthetic images
  are appended to the dataset by the caller; the cap on their share per batch is enforced
  here).
Under DDP every rank takes a disjoint, equally long slice of the same permutation
(`rank_epoch_indices`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from core.panels import Panel

BALANCE_MODES = ("none", "reweight", "oversample", "panel_oversample", "gan")


def class_groups(classes: list[str], panels: Mapping[str, Panel]) -> torch.Tensor:
    """(n_classes,) the index of each class's panel, panels in name order (a class of two
    panels belongs to the first): the groups ``panel_oversample`` balances within."""
    names = sorted(panels)
    return torch.tensor([next(i for i, name in enumerate(names) if key in panels[name].keys) for key in classes])


def class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights per class, normalised to mean 1 over the images."""
    counts = torch.bincount(labels, minlength=n_classes).float().clamp(min=1)
    weights = counts.sum() / (n_classes * counts)
    return weights / weights[labels].mean()


def epoch_length(n_real: int, n_synthetic: int, mode: str, max_synthetic_share: float = 0.5) -> int:
    """How many images `epoch_indices` draws per epoch: every image, except that ``gan`` caps
    the synthetic ones at `max_synthetic_share` of the epoch."""
    if mode == "gan" and n_synthetic:
        return n_real + min(n_synthetic, int(n_real * max_synthetic_share / (1 - max_synthetic_share)))
    return n_real + n_synthetic


def epoch_indices(labels: torch.Tensor, mode: str, generator: torch.Generator,
                  synthetic: torch.Tensor | None = None, max_synthetic_share: float = 0.5,
                  groups: torch.Tensor | None = None) -> torch.Tensor:
    """Image indices for one epoch (before sharding); `groups` (see `class_groups`) for
    ``panel_oversample``."""
    n = labels.shape[0]
    if mode in ("oversample", "panel_oversample"):
        return torch.multinomial(draw_weights(labels, mode, groups), n, replacement=True, generator=generator)
    if mode == "gan" and synthetic is not None and synthetic.any():
        real = torch.nonzero(~synthetic).squeeze(1)
        fake = torch.nonzero(synthetic).squeeze(1)
        cap = int(len(real) * max_synthetic_share / (1 - max_synthetic_share))
        fake = fake[torch.randperm(len(fake), generator=generator)[:cap]]
        chosen = torch.cat([real, fake])
        return chosen[torch.randperm(len(chosen), generator=generator)]
    return torch.randperm(n, generator=generator)


def draw_weights(labels: torch.Tensor, mode: str, groups: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) each image's chance to be drawn (unnormalised): 1 / its class count under
    ``oversample``; under ``panel_oversample`` that, times its panel's images over its panel's
    classes with images, so every panel draws its share of the images and its classes equally."""
    n_classes = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=n_classes).float()
    per_class = 1.0 / counts.clamp(min=1)
    if mode == "panel_oversample":
        if groups is None:
            raise ValueError("panel_oversample needs the classes' panels (groups)")
        groups = groups[:n_classes]
        for group in groups.unique():
            members = (groups == group) & (counts > 0)
            per_class[members] *= counts[members].sum() / members.sum()
    return per_class[labels]


def shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank's slice; every rank gets the same count so DDP steps stay in lockstep."""
    per_rank = len(indices) // world_size
    return indices[rank * per_rank:(rank + 1) * per_rank]


def rank_epoch_indices(labels: torch.Tensor, mode: str, generator: torch.Generator, rank: int, world_size: int,
                       seed: int, epoch: int, synthetic: torch.Tensor | None = None,
                       groups: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's images for `epoch`. With one process the training generator draws the order,
    as it always has (the shipped model's command still trains it bit for bit). Under DDP the
    ranks' training generators differ (seed + rank: each rank augments differently), so their
    permutations would differ and the slices overlap, some images seen twice and others never;
    the order is drawn instead from a generator seeded by `seed` and `epoch` alone, the same on
    every rank and nothing to checkpoint."""
    if world_size == 1:
        return epoch_indices(labels, mode, generator, synthetic, groups=groups)
    order = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return shard(epoch_indices(labels, mode, order, synthetic, groups=groups), rank, world_size)
