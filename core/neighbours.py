"""Agreement with the nearest training cells: a second, checkable reason to trust an answer.

The model names the class whose sentence the image matches best. That match can be right for
the wrong reason: an image can lie nearest one sentence while the training cells around it in
embedding space are of another type (a band neutrophil among metamyelocytes). So, for every
answer, the model looks up the K training cells of the panel's classes whose embeddings lie
nearest the image's ("reference cells": every training image, embedded by `training.calibrate`)
and counts how many are of the class it is about to name. A count under the panel's
`min_agreement` share (fitted with the thresholds, `training.calibrate --min-agreement`) makes it
abstain with kind "neighbours"; the count itself is shown with every answer, a fact a
hematologist can weigh ("24 of the 25 most similar training cells are neutrophils").

Why a vote of neighbours and not a sharper temperature: on v18's PBC val the confidence alone
ranks its errors too late (0.988 accuracy at 0.90 coverage); the share of agreeing neighbours
catches errors the sentence match is sure of, and on the other lab's cells (BCCD) it refused more
of the wrong answers than the right ones (README, "Measured numbers").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# K: 25 nearest training cells. Session 17 compared 15, 25 and 50 on v18 (PBC val, BCCD); 25 kept
# as many answers as 15 with fewer wrong on the other lab, and 50 was no better.
DEFAULT_NEIGHBOURS = 25


@dataclass(frozen=True)
class NeighbourVote:
    """What the K training cells nearest an image are: class key -> how many of them."""
    k: int
    counts: dict[str, int]

    def agreeing(self, class_key: str) -> int:
        """How many of the K nearest training cells are of `class_key`."""
        return self.counts.get(class_key, 0)

    def share(self, class_key: str) -> float:
        """The share of the K nearest training cells that are of `class_key`."""
        return self.agreeing(class_key) / self.k if self.k else 0.0


def reaches(share, min_agreement: float):
    """Whether an agreement share (a float, or a tensor of them) reaches `min_agreement`: the one
    test both describing and calibration apply. Shares are n / K, so 23 / 25 must count as 0.92."""
    return share >= min_agreement - 1e-9


def reference_tensors(references: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The references as stored in a weights file: half precision (the ranking of cosine
    similarities barely moves, and the file stays under the 30 MB the repository allows)."""
    return {f"reference.{key}": value.to(torch.float16).contiguous() for key, value in references.items()}


def references_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """class key -> (n, D) float32 unit-norm embeddings of its training images, from a weights file."""
    return {k[len("reference."):]: v.float() for k, v in tensors.items() if k.startswith("reference.")}


class ReferenceIndex:
    """The reference cells of one panel's classes, stacked once for fast look-ups."""

    def __init__(self, references: dict[str, torch.Tensor], panel_keys: list[str]):
        keys = [key for key in panel_keys if key in references and len(references[key])]
        self.keys = keys
        self.embeddings = torch.cat([references[key] for key in keys]) if keys else torch.zeros(0, 0)
        self.labels = torch.cat([torch.full((len(references[key]),), i) for i, key in enumerate(keys)]) \
            if keys else torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def votes(self, embeddings: torch.Tensor, k: int) -> list[NeighbourVote]:
        """One NeighbourVote per row of `embeddings` (N, D): the classes of its k nearest
        reference cells by cosine similarity (k is cut to the number of references)."""
        k = min(k, len(self))
        if k == 0:
            return [NeighbourVote(0, {}) for _ in range(len(embeddings))]
        nearest = (embeddings.to(self.embeddings.dtype) @ self.embeddings.t()).topk(k, dim=-1).indices
        counts = torch.zeros(len(embeddings), len(self.keys), dtype=torch.long)
        counts.scatter_add_(1, self.labels[nearest], torch.ones_like(nearest))
        return [NeighbourVote(k, {key: int(n) for key, n in zip(self.keys, row) if n})
                for row in counts.tolist()]

    def agreement(self, embeddings: torch.Tensor, predicted: list[str], k: int) -> torch.Tensor:
        """(N,) share of each row's k nearest reference cells that are of its `predicted` class."""
        return torch.tensor([vote.share(key) for vote, key in zip(self.votes(embeddings, k), predicted)])
