"""The atlas gallery index as it lies on disk: its dataclasses, reading and atomic writing.

One folder per (model weights, gallery sources) under the cache folder holds:

* ``manifest.json`` - format, model sha256, the name of the matrix file, time and statistics
  of the last update, one entry per embedded file in matrix row order (path, key, size,
  mtime_ns, label, source, verified, name, expert_labels, sha256, max_side), and the refused
  files (path -> key, reason, and the loader limits that refused it);
* ``embeddings-<token>.npy`` - float16 (N, D) unit rows.

Each update writes a new matrix file, then the manifest, both via a temp file and
``os.replace``; the manifest is the commit point, so a reader (or a crash) sees the old
index or the new one, never a mix.

Formats: 1 (until the loader limits were recorded) had no ``max_side`` per entry nor limits
per refusal, and ``expert_labels`` only in its last days. It is still read: entries become
items decoded at 512 px, refusals carry no limits, so `core.gallery` retries those refusals
and re-embeds only what 512 px decoded differently; unchanged small files keep their rows.
Format 2 adds the two fields, and its number keeps a format-1 reader (which would fail on the
new fields) from reading it: that reader sees an empty index and rebuilds its own.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from core.atomic import atomic_write, atomic_write_text
from core.gallery_sources import Source
from core.imageio import MAX_SIDE

FORMAT = 2
MANIFEST = "manifest.json"
FORMAT1_MAX_SIDE = 512  # the decode bound of format-1 indexes (the index's own, before Describe's)


@dataclass(frozen=True)
class GalleryItem(Source):
    """A gallery image as indexed: its source plus what its embedding was made from."""
    sha256: str = ""  # of the file's bytes when it was embedded
    max_side: int = MAX_SIDE  # decode bound its embedding was made under: another one means other pixels


@dataclass(frozen=True)
class Hit:
    """One result of an atlas query."""
    item: GalleryItem  # the gallery image
    similarity: float  # cosine similarity with the query, in [-1, 1]
    row: int  # row of the item in the index


@dataclass(frozen=True)
class GalleryIndex:
    """Embeddings of the gallery images, one row per item, and the images that could not be indexed."""
    items: tuple[GalleryItem, ...]  # one per matrix row
    embeddings: torch.Tensor  # (N, D) float32 unit rows
    weights_sha256: str  # what embedded them: ModelBundle.embedding_id (the weights' sha256, +viewsN for more views)
    skipped: dict[str, dict] = field(default_factory=dict)  # path -> {"key", "reason", "limits"}
    updated_at: float | None = None  # time.time() of the last write; None: never indexed
    stats: dict[str, int] = field(default_factory=dict)  # last update: embedded, reused, removed, refused, pending

    def __len__(self) -> int:
        return len(self.items)

    def row_of_content(self, sha256: str) -> int | None:
        """The first row embedded from a file with these bytes (an upload that is already in
        the gallery), or None."""
        return next((row for row, item in enumerate(self.items) if sha256 and item.sha256 == sha256), None)

    def nearest(self, query: torch.Tensor, k: int, exclude: int | None = None) -> list[Hit]:
        """The k images most similar to the (D,) unit `query`, best first; `exclude` drops a row
        (the query image itself when it comes from the gallery) and every copy of its bytes. One
        hit per distinct image: a reviewed case that is also a gallery file is shown once, as
        the copy with an expert-verified label where there is one."""
        if not self.items or k <= 0:
            return []
        scores = self.embeddings @ query.detach().float().reshape(-1)
        if exclude is not None:
            excluded = self.items[exclude].sha256
            scores[[r for r, item in enumerate(self.items) if item.sha256 == excluded]] = -float("inf")
        hits: dict[str, Hit] = {}
        for value, row in zip(*[t.tolist() for t in torch.sort(scores, descending=True)]):
            if value == -float("inf") or (len(hits) == k and self.items[row].sha256 not in hits):
                break
            item, kept = self.items[row], hits.get(self.items[row].sha256)
            if shown_instead(item, kept.item if kept else None):
                hits[item.sha256] = Hit(item, float(value), row)
        return list(hits.values())


def shown_instead(item: GalleryItem, kept: GalleryItem | None) -> bool:
    """Whether `item` is shown rather than `kept`, an earlier copy of the same bytes (None: none
    yet): the first copy, unless a later one carries an expert-verified label."""
    return kept is None or (item.verified and not kept.verified)


def distinct_items(items) -> list[GalleryItem]:
    """One item per distinct image (by content), in order, as `GalleryIndex.nearest` shows them."""
    chosen: dict[str, GalleryItem] = {}
    for item in items:
        if shown_instead(item, chosen.get(item.sha256)):
            chosen[item.sha256] = item
    return list(chosen.values())


def empty_index(weights_sha256: str = "") -> GalleryIndex:
    """An index with nothing in it."""
    return GalleryIndex((), torch.zeros(0, 0), weights_sha256)


def manifest_stamp(folder: Path | str) -> str:
    """Identity of the manifest file ('' when absent): changes with every committed update,
    since each is a new file renamed into place (a new inode even within one clock tick)."""
    try:
        info = (Path(folder) / MANIFEST).stat()
    except OSError:
        return ""
    return f"{info.st_ino}:{info.st_mtime_ns}:{info.st_size}"


def load_index(folder: Path | str, weights_sha256: str | None = None) -> GalleryIndex:
    """The index stored in `folder`; empty when there is none, when it is unreadable or
    inconsistent (a malformed entry included), or when it was made by another model than
    `weights_sha256`. Never raises for what the folder holds."""
    for _ in range(3):  # a concurrent update may delete the matrix between our two reads
        try:
            manifest = json.loads((Path(folder) / MANIFEST).read_text())
            parts = _from_manifest(manifest, weights_sha256)
            if parts is None:
                return empty_index(weights_sha256 or "")
            matrix = np.load(Path(folder) / manifest["matrix"], allow_pickle=False)
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return empty_index(weights_sha256 or "")
        items, skipped, updated_at, stats = parts
        if matrix.ndim != 2 or matrix.shape[0] != len(items):
            return empty_index(weights_sha256 or "")
        return GalleryIndex(items, torch.from_numpy(matrix.astype(np.float32)), manifest["weights_sha256"],
                            skipped, updated_at, stats)
    return empty_index(weights_sha256 or "")


def _from_manifest(manifest: dict, weights_sha256: str | None) -> tuple | None:
    """(items, skipped, updated_at, stats) of a manifest; None when it is of another format or
    model. Raises ValueError / TypeError / KeyError for anything malformed."""
    if not isinstance(manifest, dict):
        raise TypeError("the manifest is not a JSON object")
    version = manifest.get("format")
    if version not in (1, FORMAT) or (weights_sha256 is not None and manifest.get("weights_sha256") != weights_sha256):
        return None
    items = tuple(_item(entry, version) for entry in manifest["items"])
    skipped, stats = manifest.get("skipped", {}), manifest.get("stats", {})
    if not (isinstance(skipped, dict) and isinstance(stats, dict) and isinstance(manifest["weights_sha256"], str)
            and all(isinstance(e, dict) and isinstance(e.get("reason"), str) for e in skipped.values())):
        raise TypeError("malformed manifest")
    updated_at = manifest.get("updated_at")
    if updated_at is not None and not isinstance(updated_at, (int, float)):
        raise TypeError("malformed manifest: updated_at")
    return items, skipped, updated_at, stats


# types of an entry's fields: the page reads them without checking (a path must be a str, ...)
_FIELD_TYPES = {"path": str, "key": str, "size": int, "mtime_ns": int, "label": (str, type(None)), "source": str,
                "verified": bool, "name": str, "sha256": str, "max_side": int}


def _item(entry: dict, version: int) -> GalleryItem:
    """One manifest entry as an item (TypeError / ValueError when it is not one: an unknown or
    missing field, a field of the wrong type, expert labels that are not pairs)."""
    if not isinstance(entry, dict):
        raise TypeError("an item entry is not a JSON object")
    if version == 1:  # decoded at 512 px then; the field did not exist
        entry = {**entry, "max_side": FORMAT1_MAX_SIDE}
    item = GalleryItem(**entry)  # Source.__post_init__ refuses expert labels that are not pairs
    if not all(isinstance(getattr(item, name), kind) for name, kind in _FIELD_TYPES.items()):
        raise TypeError("an item entry has a field of the wrong type")
    return item


def write_index(folder: Path, index: GalleryIndex, matrix_changed: bool) -> None:
    """Matrix (when changed) then manifest, each atomically; then remove stale matrices. The
    caller holds the folder's lock (`core.gallery`)."""
    folder.mkdir(parents=True, exist_ok=True)
    current = _current_matrix(folder)
    if matrix_changed or current is None:
        current = f"embeddings-{uuid.uuid4().hex[:12]}.npy"
        data = index.embeddings.numpy().astype(np.float16)
        atomic_write(folder / current, lambda handle: np.save(handle, data, allow_pickle=False))
    manifest = {"format": FORMAT, "weights_sha256": index.weights_sha256, "matrix": current,
                "updated_at": index.updated_at, "stats": index.stats,
                "items": [asdict(item) for item in index.items], "skipped": index.skipped}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest))
    for stale in folder.glob("embeddings-*.npy"):
        if stale.name != current:
            stale.unlink(missing_ok=True)


def _current_matrix(folder: Path) -> str | None:
    try:
        name = json.loads((folder / MANIFEST).read_text())["matrix"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and (folder / name).is_file() else None
