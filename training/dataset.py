"""Training data held in memory as uint8 tensors, decoded once and cached on disk.

With 2 CPU cores, decoding and augmenting JPEGs per step in worker processes would steal
the cores the model trains on; decoding once (about 30 s for PBC + B-ALL) and augmenting
whole batches as tensors (`training.augment`) is several times faster.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from core.atomic import atomic_write
from core.data import LabelledImage
from core.preprocess import to_uint8_array


@dataclass
class TensorDataset:
    """Decoded training images as uint8 tensors with their labels and attributes."""
    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) class index into `classes`
    attributes: torch.Tensor  # (N, A) attribute value index, -1 when not annotated
    classes: list[str]  # class keys, index = label
    items: list[LabelledImage]  # source files, same order


def training_cache_size(config) -> int:
    """Side of the square each training image is decoded to: 12.5 % above the model's input,
    so the augmentation's zoom and shifts crop from real pixels, not padding."""
    return int(config.image_size * 1.125)


def _cache_key(items: list[LabelledImage], size: int) -> str:
    digest = hashlib.sha256(str(size).encode())
    for item in items:
        digest.update(f"{item.path}\t{item.path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def decode_images(items: list[LabelledImage], size: int, cache_dir: Path | None) -> torch.Tensor:
    """(N, 3, size, size) uint8; reuses ``cache_dir/<hash>.npy`` when the same files were
    decoded before."""
    cache = cache_dir / f"images_{_cache_key(items, size)}.npy" if cache_dir else None
    if cache and cache.is_file():
        return torch.from_numpy(np.load(cache))
    array = np.empty((len(items), 3, size, size), dtype=np.uint8)
    for i, item in enumerate(tqdm(items, desc=f"decode {size}px", unit="img", mininterval=5)):
        try:
            with Image.open(item.path) as image:
                array[i] = to_uint8_array(image, size)
        except (OSError, ValueError, SyntaxError) as error:  # Pillow's ways of failing on a damaged file
            raise ValueError(f"{item.path}: cannot be decoded ({' '.join(str(error).split())}); remove or "
                             "replace it") from error
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # DDP ranks decode the same files and may finish together: each writes its own temp file
        atomic_write(cache, lambda handle: np.save(handle, array))
    return torch.from_numpy(array)


def annotated_value(row: dict[str, str | None], name: str) -> str:
    """The CSV cell of attribute `name`, stripped; "" (not annotated) when the column is missing
    or the row is short (csv.DictReader gives None there)."""
    return (row.get(name) or "").strip()


def read_path_csv(csv_path: Path | str) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a WBCAtt-style CSV, each row with its CSV line number under `_line`.
    ValueError naming the file when it is missing, a folder, not UTF-8, not a CSV, or has no
    'path' column (the image path of each row)."""
    if not Path(csv_path).is_file():
        raise ValueError(f"{csv_path}: {'a folder' if Path(csv_path).is_dir() else 'no such file'} "
                         "(expected a WBCAtt CSV file)")
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            if "path" not in columns:
                raise ValueError(f"{csv_path}: no 'path' column (the image path of each row)")
            return list(columns), [dict(row, _line=reader.line_num) for row in reader]
    except UnicodeDecodeError as error:  # a ValueError whose message names no file
        raise ValueError(f"{csv_path}: not a UTF-8 text file ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise ValueError(f"{csv_path}: not a readable CSV ({error})") from None


def read_attribute_table(csv_paths: list[tuple[Path, Path]]) -> dict[Path, dict[str, str]]:
    """{absolute image path: {attribute: value}} from WBCAtt CSVs given as (csv, root)."""
    table = {}
    for csv_path, root in csv_paths:
        for row in read_path_csv(csv_path)[1]:
            table[(Path(root) / row["path"]).resolve()] = row
    return table


def attribute_targets(items: list[LabelledImage], table: dict[Path, dict[str, str]],
                      vocabulary: dict[str, list[str]]) -> torch.Tensor:
    """(N, A) value indices in `vocabulary` order; -1 for images without annotations or
    values outside the vocabulary."""
    names = list(vocabulary)
    targets = torch.full((len(items), len(names)), -1, dtype=torch.long)
    for i, item in enumerate(items):
        row = table.get(item.path)
        if row is None:
            continue
        for a, name in enumerate(names):
            value = annotated_value(row, name)
            if value in vocabulary[name]:
                targets[i, a] = vocabulary[name].index(value)
    return targets


def build_dataset(items: list[LabelledImage], classes: list[str], size: int,
                  attribute_table: dict, vocabulary: dict[str, list[str]],
                  cache_dir: Path | None) -> TensorDataset:
    """Decode `items` and attach labels (indices into `classes`) and attribute targets."""
    labels = torch.tensor([classes.index(item.label) for item in items], dtype=torch.long)
    return TensorDataset(decode_images(items, size, cache_dir), labels,
                         attribute_targets(items, attribute_table, vocabulary), classes, items)
