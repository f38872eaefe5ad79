"""Atlas gallery: image embeddings of the gallery, cached on disk, searched by text or image.

The index on disk (its manifest, matrix and formats) is `core.gallery_index`; this module keeps
it up to date and searches it. A new model has a new weights sha256, hence a new cache folder:
embeddings of another model are never mixed in.

Updates are incremental: a file whose path and key are unchanged keeps its row (its labels
are refreshed: an expert may have reviewed the case since); new or changed files are
embedded in batches; files gone from the sources are dropped. A file that cannot be read
or decoded is counted and remembered with its key and the loader limits that refused it, so
it is retried when it changes or when those limits do, not on every update. Each row
records the decode bound (max_side) it was embedded under; a row made under another bound is
kept when its file decodes to the same pixels now, and embedded again otherwise.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

import torch
from PIL import Image

from core.checkpoint import ModelBundle
from core.describe import embed_checked, embed_images
from core.gallery_index import GalleryIndex, GalleryItem, Hit, load_index, write_index
from core.gallery_sources import Source
from core.imageio import MAX_SIDE, MIN_SIDE, ImageRejected, load_image_path
from core.reliability import MAX_DESCRIBED_ASPECT, framing_problem
from core.upload_checks import check_dimensions, upload_limits

BATCH = 32  # images per forward pass: bounded memory, and the progress bar moves
COMMIT_EVERY = 1024  # new images embedded between two writes of the index
LOCK_FILE = ".lock"
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def cache_folder(cache_dir: Path | str, embedding_id: str, *sources: Path | str | None) -> Path:
    """``<cache_dir>/<model sha[:16]>[+viewsN]-<hash of the source folders>``: a new model, the same
    weights embedding with more views (`ModelBundle.embedding_id`), or another gallery folder gets
    its own cache instead of overwriting this one."""
    where = hashlib.sha256(json.dumps([str(Path(s).resolve()) if s else "" for s in sources]).encode())
    sha, _, views = (embedding_id or "unsaved").partition("+")
    return Path(cache_dir) / f"{sha[:16]}{'+' + views if views else ''}-{where.hexdigest()[:10]}"


def load_limits() -> dict:
    """The limits the index loads files under: the Describe page's (decode bound, smallest side,
    the file size and pixel count of the settings, and the longest strip it describes). Recorded
    with each refusal, so a file refused under other limits (an older version's 512 px bound
    refused strips over 32:1 that Describe loads; a raised HEMASCRIBE_MAX_UPLOAD_MB) is tried
    again."""
    try:
        max_bytes, max_pixels = upload_limits(None, None)
    except ImageRejected:  # unreadable settings: every load is refused, and retried once they are fixed
        max_bytes = max_pixels = None
    return {"max_side": MAX_SIDE, "min_side": MIN_SIDE, "max_bytes": max_bytes, "max_pixels": max_pixels,
            "max_aspect": MAX_DESCRIBED_ASPECT}


def update_index(bundle: ModelBundle, folder: Path | str, sources: list[Source],
                 progress: Callable[[int, int], None] | None = None, batch_size: int = BATCH,
                 commit_every: int = COMMIT_EVERY, embed: bool = True) -> GalleryIndex:
    """Bring the index in `folder` in line with `sources`: embed new or changed files, drop
    removed ones, refresh labels; write it atomically and return it. `progress(done, total)`
    is called after each batch. Unreadable images are skipped and counted, never raised.
    Work is committed every `commit_every` new files, so an interrupted first indexing of a
    large folder (the user leaves the page) resumes where it stopped. `embed=False` applies
    only what needs no embedding (labels, removals): a file waiting to be embedded keeps its
    old row or refusal, relabelled, until an update that embeds."""
    folder = Path(folder)
    with _folder_lock(folder):
        old = load_index(folder, bundle.embedding_id)
        plan = _plan(old, sources)
        kept, skipped, todo = plan.kept, plan.skipped, plan.todo
        if not embed:  # in old row order: the matrix is rewritten only when a row left
            kept, skipped, todo = sorted(kept + plan.held, key=lambda pair: pair[0]), plan.all_skipped, []
        rows = [row for row, _ in kept]
        stats = {"embedded": 0, "reused": len(rows), "removed": len(old.items) - len(rows), "refused": 0,
                 "pending": len(todo)}  # pending > 0 on disk: an update was interrupted
        index = GalleryIndex(tuple(item for _, item in kept),
                             old.embeddings[rows] if rows else torch.zeros(0, _dim(bundle)),
                             bundle.embedding_id, skipped, time.time(), dict(stats))
        if not todo:
            if index.items == old.items and index.skipped == old.skipped and old.updated_at is not None:
                return replace(old, stats=stats)  # nothing changed: nothing written
            write_index(folder, index, matrix_changed=rows != list(range(len(old.items))))
            return index
        for start in range(0, len(todo), commit_every):
            report = None if progress is None else (lambda done, _n, s=start: progress(s + done, len(todo)))
            new_items, new_rows, refused = _embed_sources(bundle, todo[start:start + commit_every], report, batch_size)
            stats["embedded"] += len(new_items)
            stats["refused"] += len(refused)
            stats["pending"] = max(0, len(todo) - start - commit_every)
            index = GalleryIndex(index.items + tuple(new_items), torch.cat([index.embeddings, new_rows]),
                                 bundle.embedding_id, {**index.skipped, **refused}, time.time(), dict(stats))
            write_index(folder, index, matrix_changed=True)
        return index


def pending_work(index: GalleryIndex, sources: list[Source]) -> tuple[int, int]:
    """(files `update_index` would embed: new, changed, or refused or embedded under other
    loader limits; changes it would apply without embedding: rows relabelled (an expert's new
    verdict, an index written before labels were kept per panel) or re-tagged, and rows and
    refusals of files no longer listed). (0, 0) when the index is up to date. Stat only, plus
    one image header per row made under another decode bound."""
    plan = _plan(index, sources)
    rows = plan.kept + plan.held
    refreshed = sum(item != index.items[row] for row, item in rows)
    gone = len(index.items) - len(rows) + len(index.skipped) - len(plan.all_skipped)
    return len(plan.todo), refreshed + gone


@dataclass
class _Plan:
    """What an update does with the index it found, given the sources listed now."""
    kept: list[tuple[int, GalleryItem]] = field(default_factory=list)  # (old row, item with labels of now)
    todo: list[Source] = field(default_factory=list)  # to embed: new, changed, or loaded under other limits
    skipped: dict[str, dict] = field(default_factory=dict)  # refusals that still hold: same file, same limits
    held: list[tuple[int, GalleryItem]] = field(default_factory=list)  # old rows of files in todo, relabelled
    held_skipped: dict[str, dict] = field(default_factory=dict)  # old refusals of files in todo

    @property
    def all_skipped(self) -> dict[str, dict]:
        """The refusals an update that embeds nothing keeps (those of waiting files too)."""
        return {**self.skipped, **self.held_skipped}


def _plan(old: GalleryIndex, sources: list[Source]) -> _Plan:
    """Sort `sources` against the `old` index: rows kept, files to embed, refusals kept."""
    previous = {item.path: row for row, item in enumerate(old.items)}
    limits, plan, seen = load_limits(), _Plan(), set()
    for src in sources:
        if src.path in seen:
            continue  # e.g. the gallery folder holds the upload folder: one row per file
        seen.add(src.path)
        row, refusal = previous.get(src.path), old.skipped.get(src.path)
        kept = None if row is None else _kept_item(old.items[row], src, limits)
        if kept is not None:
            plan.kept.append((row, kept))
        elif refusal is not None and refusal.get("key") == src.key and refusal.get("limits") == limits:
            plan.skipped[src.path] = refusal  # the same file refused under the same limits: not retried
        else:
            plan.todo.append(src)
            if row is not None:  # searchable as it was, with today's labels, until embedded again
                plan.held.append((row, _relabelled(old.items[row], src)))
            elif refusal is not None:
                plan.held_skipped[src.path] = refusal
    return plan


def _kept_item(item: GalleryItem, src: Source, limits: dict) -> GalleryItem | None:
    """`item` with the labels of `src` now, or None when its file must be embedded again: it
    changed, or it was decoded under another bound and would not decode to the same pixels now.

    Rows of older indexes were decoded at 512 px. One whose file is at most 512 px on its longer
    side decoded to the very pixels it decodes to now, so it is kept (one header read, then it is
    re-tagged and never read again). A larger one was shrunk to 512 px before the model's own
    resize: its embedding is close to, not the same as, the one Describe computes for that file
    and the one a gallery query of it computes, so it is embedded again (an upgrade re-embeds the
    large files only, typically a few; folders of cell crops are far under 512 px)."""
    if item.key != src.key:
        return None
    if item.max_side != MAX_SIDE and not _decodes_alike(src.path, item.max_side, limits):
        return None
    return GalleryItem(**asdict(src), sha256=item.sha256, max_side=MAX_SIDE)


def _decodes_alike(path: str, max_side_then: int, limits: dict) -> bool:
    """Whether a file decoded under the bound `max_side_then` decodes to the same pixels under
    `limits`: no bound shrinks it and the limits still accept it. Reads the header only; a file
    whose header cannot be read is embedded again, and the loader then says why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's bomb warning: the loader judges the pixel count
            with Image.open(path) as image:
                width, height = image.size
        check_dimensions("", width, height, limits["max_pixels"], limits["min_side"], limits["max_side"])
        if framing_problem((width, height)):  # indexed by an older version; refused now
            return False
    except Exception:  # noqa: BLE001  (any failure means: let the loader decide)
        return False
    return max(width, height) <= min(max_side_then, limits["max_side"])


def _relabelled(item: GalleryItem, src: Source) -> GalleryItem:
    """An old row of a file waiting to be embedded again, with the labels it has now."""
    return replace(item, label=src.label, source=src.source, verified=src.verified, name=src.name,
                   expert_labels=src.expert_labels)


def save_index(folder: Path | str, index: GalleryIndex) -> None:
    """Write `index` to `folder` atomically (update_index does this itself; for tools that
    build an index another way, such as the benchmark)."""
    with _folder_lock(Path(folder)):
        write_index(Path(folder), index, matrix_changed=True)


def _dim(bundle: ModelBundle) -> int:
    return bundle.model.config.embed_dim


def _embed_sources(bundle: ModelBundle, todo: list[Source], progress, batch_size: int):
    """Embed `todo` in batches: (items, (n, D) embeddings, {path: refusal})."""
    items, chunks, refused, limits = [], [], {}, load_limits()
    for start in range(0, len(todo), batch_size):
        images, batch_items = [], []
        for src in todo[start:start + batch_size]:
            try:
                # the Describe page's loader with its own limits: a smaller max_side would also
                # refuse narrow strips Describe accepts (the long-and-narrow limit is max_side /
                # min_side), and the embedding is the one Describe computes for this file
                loaded = load_image_path(src.path, max_side=MAX_SIDE, min_side=MIN_SIDE)
            except ImageRejected as error:
                refused[src.path] = {"key": src.key, "reason": str(error), "limits": limits}
                continue
            strip = framing_problem(loaded.image.size)
            if strip:  # Describe would not describe it: no search hit, quiz cell or query of it either
                refused[src.path] = {"key": src.key, "reason": f"{Path(src.path).name}: {strip}", "limits": limits}
                continue
            images.append(loaded.image)
            batch_items.append(GalleryItem(**asdict(src), sha256=loaded.sha256, max_side=MAX_SIDE))
        if images:
            # nor one its content check refuses (a blank, a document: no stain colour)
            embeddings, problems = embed_checked(bundle, images)
            for item, problem in zip(batch_items, problems):
                if problem:
                    refused[item.path] = {"key": item.key, "reason": f"{Path(item.path).name}: {problem}",
                                          "limits": limits}
            kept = [row for row, problem in enumerate(problems) if problem is None]
            chunks.append(embeddings[kept].float())
            items += [batch_items[row] for row in kept]
        if progress is not None:
            progress(min(start + batch_size, len(todo)), len(todo))
    return items, (torch.cat(chunks) if chunks else torch.zeros(0, _dim(bundle))), refused


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    # Two sessions re-indexing the same gallery at once would embed everything twice; the
    # second waits, then finds the first one's work on disk and only reuses it. Two server
    # processes sharing the cache could also delete each other's new matrix between its write
    # and its manifest's: an advisory lock on a file in the folder keeps them apart too.
    with _locks_guard:
        lock = _locks.setdefault(str(folder.resolve()), threading.Lock())
    with lock:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / LOCK_FILE, "a") as handle:
            if fcntl is not None:  # POSIX; elsewhere one process per cache folder
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield  # closing the file releases its lock


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
