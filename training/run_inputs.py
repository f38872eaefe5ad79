"""What `training.train` reads, checked before any work.

A mistake there is a `UsageError`: ``training.train`` prints its message as one line on
stderr and exits with status 2, never with a traceback.
"""
from __future__ import annotations


class UsageError(Exception):
    """A mistake in the command line or the data layout; the message says what to change."""


def check_batch_size(n_images: int, batch_size: int, world: int, folders: list[str]) -> None:
    """Refuse a batch larger than the training images of one process. Refused rather than
    shrunk: the contrastive loss takes its negatives from the batch, so the batch size is a
    choice of objective, and a silently smaller batch would train another one than asked; a
    last partial batch is dropped every epoch for the same reason (and keeps DDP ranks in
    lockstep). With more images than that, every epoch has at least one full step."""
    per_process = n_images // world
    if n_images == 0:
        raise UsageError(f"--data {' '.join(folders)}: no images found (expected DATA/<class>/<image files>)")
    if batch_size < 1 or batch_size > per_process:
        where = f" per process ({n_images} in all, {world} processes)" if world > 1 else ""
        raise UsageError(f"--batch-size {batch_size}: the training set has {per_process} images{where}, so no "
                         f"training step would run; use --batch-size {max(1, per_process)} or less")
