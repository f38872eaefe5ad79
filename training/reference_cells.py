"""What training.calibrate keeps of the training images: class centroids with the precision
matrix of the out-of-scope score (core.reliability), and the reference cells of the neighbour
check (core.neighbours), all from one embedding pass over the --train folders."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf

from training.dataset import decode_images
from training.evaluation_utils import embed_uint8


def embed_items(bundle, items, cache_dir) -> torch.Tensor:
    """Unit-norm embeddings of labelled image files, decoded (and cached) as in training."""
    return embed_uint8(bundle.model, decode_images(items, bundle.model.config.image_size, Path(cache_dir)),
                       views=bundle.views)


def centroid_sample(items, per_class: int, seed: int) -> list[int]:
    """Indices into `items` of a seeded sample of at most `per_class` images of each class."""
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for label in sorted({i.label for i in items}):
        group = [j for j, item in enumerate(items) if item.label == label]
        picks.extend(group[int(k)] for k in torch.randperm(len(group), generator=generator)[:per_class])
    return picks


def class_centroids(embeddings: torch.Tensor, labels: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Mean embedding per class and the precision matrix of the residuals around them (shrinkage
    chosen by Ledoit-Wolf, not tuned)."""
    centroids = {label: F.normalize(embeddings[[j for j, x in enumerate(labels) if x == label]].mean(0), dim=-1)
                 for label in sorted(set(labels))}
    residuals = embeddings - torch.stack([centroids[label] for label in labels])
    covariance = LedoitWolf(assume_centered=True).fit(residuals.double().numpy()).covariance_
    return centroids, torch.linalg.inv(torch.from_numpy(covariance)).float()


def fit_training_cells(bundle, items, args) -> None:
    """Set the bundle's centroids and precision (from a seeded sample of --per-class images of each
    class) and, unless --neighbours is 0, its reference cells: every training image's embedding.
    Only the images needed are embedded."""
    sample = centroid_sample(items, args.per_class, args.seed)
    needed = range(len(items)) if args.neighbours else sample
    embedded = dict(zip(needed, embed_items(bundle, [items[j] for j in needed], args.cache_dir)))
    bundle.centroids, bundle.ood_precision = class_centroids(torch.stack([embedded[j] for j in sample]),
                                                             [items[j].label for j in sample])
    references = {}
    if args.neighbours:
        for label in sorted({i.label for i in items}):
            references[label] = torch.stack([embedded[j] for j, item in enumerate(items) if item.label == label])
    bundle.set_references(references)
