"""Which images make up an epoch: the balancing modes of ``--balance``.

* ``none``: every image once, shuffled;
* ``oversample``: classes drawn with equal probability (minority images repeat);
* ``reweight``: every image once, but the loss of each image weighted by the inverse of its
  class frequency (returned by `class_weights`);
* ``gan``: real images once plus synthetic ones for minority classes (the synthetic images
  are appended to the dataset by the caller; the cap on their share per batch is enforced
  here).
Under DDP every rank takes a disjoint, equally long slice of the same permutation
(`rank_epoch_indices`).
"""
from __future__ import annotations

import torch

BALANCE_MODES = ("none", "reweight", "oversample", "gan")


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
                  synthetic: torch.Tensor | None = None, max_synthetic_share: float = 0.5) -> torch.Tensor:
    """Image indices for one epoch (before sharding)."""
    n = labels.shape[0]
    if mode == "oversample":
        n_classes = int(labels.max()) + 1
        per_image = (1.0 / torch.bincount(labels, minlength=n_classes).float())[labels]
        return torch.multinomial(per_image, n, replacement=True, generator=generator)
    if mode == "gan" and synthetic is not None and synthetic.any():
        real = torch.nonzero(~synthetic).squeeze(1)
        fake = torch.nonzero(synthetic).squeeze(1)
        cap = int(len(real) * max_synthetic_share / (1 - max_synthetic_share))
        fake = fake[torch.randperm(len(fake), generator=generator)[:cap]]
        chosen = torch.cat([real, fake])
        return chosen[torch.randperm(len(chosen), generator=generator)]
    return torch.randperm(n, generator=generator)


def shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank's slice; every rank gets the same count so DDP steps stay in lockstep."""
    per_rank = len(indices) // world_size
    return indices[rank * per_rank:(rank + 1) * per_rank]


def rank_epoch_indices(labels: torch.Tensor, mode: str, generator: torch.Generator, rank: int, world_size: int,
                       seed: int, epoch: int, synthetic: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's images for `epoch`. With one process the training generator draws the order,
    as it always has (the shipped model's command still trains it bit for bit). Under DDP the
    ranks' training generators differ (seed + rank: each rank augments differently), so their
    permutations would differ and the slices overlap, some images seen twice and others never;
    the order is drawn instead from a generator seeded by `seed` and `epoch` alone, the same on
    every rank and nothing to checkpoint."""
    if world_size == 1:
        return epoch_indices(labels, mode, generator, synthetic)
    order = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return shard(epoch_indices(labels, mode, order, synthetic), rank, world_size)
