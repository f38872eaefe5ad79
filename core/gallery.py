"""Atlas gallery: image embeddings of the gallery, cached on disk, searched by text or image.

On disk, one folder per (model weights, gallery sources) under the cache folder:

* ``manifest.json`` - format, model sha256, one entry per embedded file (path, size, mtime,
  key, sha256, label, source, verified) in matrix row order, refused files with their
  reason, and the name of the matrix file;
* ``embeddings-<token>.npy`` - float16 (N, D) unit rows.

Each update writes a new matrix file, then the manifest, both via a temp file and
``os.replace``; the manifest is the commit point, so a reader (or a crash) sees the old
index or the new one, never a mix. A new model has a new weights sha256, hence a new
folder: embeddings of another model are never mixed in.

Updates are incremental: a file whose path and key are unchanged keeps its row (its label
is refreshed: an expert may have reviewed the case since); new or changed files are
embedded in batches; files gone from the sources are dropped. A file that cannot be read
or decoded is counted and remembered with its key, so it is not retried until it changes.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from core.checkpoint import ModelBundle
from core.describe import embed_images
from core.gallery_sources import Source
from core.imageio import ImageRejected, load_image_path

FORMAT = 1
MANIFEST = "manifest.json"
BATCH = 32  # images per forward pass: bounded memory, and the progress bar moves
COMMIT_EVERY = 1024  # new images embedded between two writes of the index
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass(frozen=True)
class GalleryItem(Source):
    sha256: str = ""  # of the file's bytes when it was embedded


@dataclass(frozen=True)
class Hit:
    item: GalleryItem  # the gallery image
    similarity: float  # cosine similarity with the query, in [-1, 1]
    row: int  # row of the item in the index


@dataclass(frozen=True)
class GalleryIndex:
    items: tuple[GalleryItem, ...]  # one per matrix row
    embeddings: torch.Tensor  # (N, D) float32 unit rows
    weights_sha256: str  # the model that embedded them
    skipped: dict[str, dict] = field(default_factory=dict)  # path -> {"key", "reason"}
    updated_at: float | None = None  # time.time() of the last write; None: never indexed
    stats: dict[str, int] = field(default_factory=dict)  # last update: embedded, reused, removed, refused, pending

    def __len__(self) -> int:
        return len(self.items)

    def nearest(self, query: torch.Tensor, k: int, exclude: int | None = None) -> list[Hit]:
        """The k rows most similar to the (D,) unit `query`, best first; `exclude` drops a row
        (the query image itself when it comes from the gallery)."""
        if not self.items or k <= 0:
            return []
        scores = self.embeddings @ query.detach().float().reshape(-1)
        if exclude is not None:
            scores[exclude] = -float("inf")
        top = torch.topk(scores, min(k, len(self.items) - (exclude is not None)))
        return [Hit(self.items[r], float(v), r) for v, r in zip(top.values.tolist(), top.indices.tolist())]


def cache_folder(cache_dir: Path | str, weights_sha256: str, *sources: Path | str | None) -> Path:
    """``<cache_dir>/<model sha[:16]>-<hash of the source folders>``: a new model, or another
    gallery folder, gets its own cache instead of overwriting this one."""
    where = hashlib.sha256(json.dumps([str(Path(s).resolve()) if s else "" for s in sources]).encode())
    return Path(cache_dir) / f"{(weights_sha256 or 'unsaved')[:16]}-{where.hexdigest()[:10]}"


def manifest_stamp(folder: Path | str) -> str:
    """Identity of the manifest file ('' when absent): changes with every committed update,
    since each is a new file renamed into place (a new inode even within one clock tick)."""
    try:
        info = (Path(folder) / MANIFEST).stat()
    except OSError:
        return ""
    return f"{info.st_ino}:{info.st_mtime_ns}:{info.st_size}"


def empty_index(weights_sha256: str = "") -> GalleryIndex:
    """An index with nothing in it."""
    return GalleryIndex((), torch.zeros(0, 0), weights_sha256)


def load_index(folder: Path | str, weights_sha256: str | None = None) -> GalleryIndex:
    """The index stored in `folder`; empty when there is none, when it is unreadable or
    inconsistent, or when it was made by another model than `weights_sha256`."""
    for _ in range(3):  # a concurrent update may delete the matrix between our two reads
        try:
            manifest = json.loads((Path(folder) / MANIFEST).read_text())
            if manifest.get("format") != FORMAT or (weights_sha256 is not None
                                                   and manifest.get("weights_sha256") != weights_sha256):
                return empty_index(weights_sha256 or "")
            matrix = np.load(Path(folder) / manifest["matrix"], allow_pickle=False)
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            return empty_index(weights_sha256 or "")
        items = tuple(GalleryItem(**entry) for entry in manifest["items"])
        if matrix.ndim != 2 or matrix.shape[0] != len(items):
            return empty_index(weights_sha256 or "")
        return GalleryIndex(items, torch.from_numpy(matrix.astype(np.float32)), manifest["weights_sha256"],
                            manifest.get("skipped", {}), manifest.get("updated_at"), manifest.get("stats", {}))
    return empty_index(weights_sha256 or "")


def update_index(bundle: ModelBundle, folder: Path | str, sources: list[Source],
                 progress: Callable[[int, int], None] | None = None, batch_size: int = BATCH,
                 commit_every: int = COMMIT_EVERY) -> GalleryIndex:
    """Bring the index in `folder` in line with `sources`: embed new or changed files, drop
    removed ones, refresh labels; write it atomically and return it. `progress(done, total)`
    is called after each batch. Unreadable images are skipped and counted, never raised.
    Work is committed every `commit_every` new files, so an interrupted first indexing of a
    large folder (the user leaves the page) resumes where it stopped."""
    folder = Path(folder)
    with _folder_lock(folder):
        old = load_index(folder, bundle.weights_sha256)
        rows, items, todo, skipped = _plan(old, sources)
        stats = {"embedded": 0, "reused": len(rows), "removed": len(old.items) - len(rows), "refused": 0,
                 "pending": len(todo)}  # pending > 0 on disk: an update was interrupted
        index = GalleryIndex(tuple(items), old.embeddings[rows] if rows else torch.zeros(0, _dim(bundle)),
                             bundle.weights_sha256, skipped, time.time(), dict(stats))
        if not todo:
            if index.items == old.items and index.skipped == old.skipped and old.updated_at is not None:
                return replace(old, stats=stats)  # nothing changed: nothing written
            _write(folder, index, matrix_changed=rows != list(range(len(old.items))))
            return index
        for start in range(0, len(todo), commit_every):
            report = None if progress is None else (lambda done, _n, s=start: progress(s + done, len(todo)))
            new_items, new_rows, refused = _embed_sources(bundle, todo[start:start + commit_every], report, batch_size)
            stats["embedded"] += len(new_items)
            stats["refused"] += len(refused)
            stats["pending"] = max(0, len(todo) - start - commit_every)
            index = GalleryIndex(index.items + tuple(new_items), torch.cat([index.embeddings, new_rows]),
                                 bundle.weights_sha256, {**index.skipped, **refused}, time.time(), dict(stats))
            _write(folder, index, matrix_changed=True)
        return index


def stale_count(index: GalleryIndex, sources: list[Source]) -> int:
    """How many of `sources` `update_index` would embed (new or changed) or relabel (an expert's
    new verdict on an indexed case), plus indexed files no longer listed: 0 when the index is up
    to date. Stat-only, nothing decoded."""
    listed = {src.path for src in sources}
    rows, items, todo, _ = _plan(index, sources)
    relabelled = sum(_labels(item) != _labels(index.items[row]) for row, item in zip(rows, items))
    return len(todo) + relabelled + sum(item.path not in listed for item in index.items)


def _labels(item: Source) -> tuple:
    return item.label, item.verified, item.expert_labels


def _plan(old: GalleryIndex, sources: list[Source]) -> tuple[list[int], list[GalleryItem], list[Source], dict]:
    """(old rows kept, their refreshed items, sources to embed, refusals still valid)."""
    previous = {item.path: row for row, item in enumerate(old.items)}
    rows, items, todo, skipped, seen = [], [], [], {}, set()
    for src in sources:
        if src.path in seen:
            continue  # e.g. the gallery folder holds the upload folder: one row per file
        seen.add(src.path)
        row = previous.get(src.path)
        if row is not None and old.items[row].key == src.key:
            rows.append(row)  # unchanged file: keep its row, take the label from the source now
            items.append(GalleryItem(**asdict(src), sha256=old.items[row].sha256))
        elif old.skipped.get(src.path, {}).get("key") == src.key:
            skipped[src.path] = old.skipped[src.path]  # still the same broken file: not retried
        else:
            todo.append(src)
    return rows, items, todo, skipped


def save_index(folder: Path | str, index: GalleryIndex) -> None:
    """Write `index` to `folder` atomically (update_index does this itself; for tools that
    build an index another way, such as the benchmark)."""
    with _folder_lock(Path(folder)):
        _write(Path(folder), index, matrix_changed=True)


def _dim(bundle: ModelBundle) -> int:
    return bundle.model.config.embed_dim


def _embed_sources(bundle: ModelBundle, todo: list[Source], progress, batch_size: int):
    """Embed `todo` in batches: (items, (n, D) embeddings, {path: refusal})."""
    items, chunks, refused = [], [], {}
    for start in range(0, len(todo), batch_size):
        images, batch_items = [], []
        for src in todo[start:start + batch_size]:
            try:
                # the Describe page's loader with its own limits: a smaller max_side would also
                # refuse narrow strips Describe accepts (the long-and-narrow limit is max_side /
                # min_side), and the embedding is the one Describe computes for this file
                loaded = load_image_path(src.path)
            except ImageRejected as error:
                refused[src.path] = {"key": src.key, "reason": str(error)}
                continue
            images.append(loaded.image)
            batch_items.append(GalleryItem(**asdict(src), sha256=loaded.sha256))
        if images:
            embeddings, _ = embed_images(bundle, images)
            chunks.append(embeddings.float())
            items += batch_items
        if progress is not None:
            progress(min(start + batch_size, len(todo)), len(todo))
    return items, (torch.cat(chunks) if chunks else torch.zeros(0, _dim(bundle))), refused


def _folder_lock(folder: Path) -> threading.Lock:
    # Two sessions re-indexing the same gallery at once would embed everything twice; the
    # second waits, then finds the first one's work on disk and only reuses it.
    with _locks_guard:
        return _locks.setdefault(str(folder.resolve()), threading.Lock())


def _atomic_write(path: Path, write: Callable) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write(folder: Path, index: GalleryIndex, matrix_changed: bool) -> None:
    """Matrix (when changed) then manifest, each atomically; then remove stale matrices."""
    folder.mkdir(parents=True, exist_ok=True)
    current = _current_matrix(folder)
    if matrix_changed or current is None:
        current = f"embeddings-{uuid.uuid4().hex[:12]}.npy"
        data = index.embeddings.numpy().astype(np.float16)
        _atomic_write(folder / current, lambda handle: np.save(handle, data, allow_pickle=False))
    manifest = {"format": FORMAT, "weights_sha256": index.weights_sha256, "matrix": current,
                "updated_at": index.updated_at, "stats": index.stats,
                "items": [asdict(item) for item in index.items], "skipped": index.skipped}
    _atomic_write(folder / MANIFEST, lambda handle: handle.write(json.dumps(manifest).encode()))
    for stale in folder.glob("embeddings-*.npy"):
        if stale.name != current:
            stale.unlink(missing_ok=True)


def _current_matrix(folder: Path) -> str | None:
    try:
        name = json.loads((folder / MANIFEST).read_text())["matrix"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if (folder / name).is_file() else None


@torch.no_grad()
def encode_query(bundle: ModelBundle, text: str) -> torch.Tensor:
    """(D,) unit embedding of a free-text query (the frozen text tower + projection)."""
    with bundle.lock:  # the text model loads lazily on first use: load it once
        return bundle.model.encode_text([text])[0]


def search_text(bundle: ModelBundle, index: GalleryIndex, query: str, k: int = 12) -> list[Hit]:
    """Gallery images closest to a free-text description, best first."""
    if not query.strip() or not len(index):
        return []
    return index.nearest(encode_query(bundle, query.strip()), k)


def search_image(bundle: ModelBundle, index: GalleryIndex, image: Image.Image, k: int = 12,
                 exclude: int | None = None) -> list[Hit]:
    """Nearest gallery neighbours of an image, best first (`exclude`: a row to leave out)."""
    if not len(index):
        return []
    embedding, _ = embed_images(bundle, [image])
    return index.nearest(embedding[0], k, exclude)
