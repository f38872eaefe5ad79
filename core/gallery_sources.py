"""What the atlas gallery holds: image files of a folder the user points to, plus the stored
copies of cases reviewed in the feedback store.

Listing is cheap (stat only, no decoding), so it runs on every re-index; `core.gallery`
then embeds only the files whose key changed. Keys:

* folder files: ``"<size>:<mtime_ns>"`` - reading 20,000 files to hash them on every
  re-index would cost minutes; size and mtime change whenever a file is replaced.
* reviewed cases: ``"sha256:<hex>"`` - their copies are content-addressed already.

Labels: a file in ``<gallery>/<class>/...`` carries its parent folder's name (a folder label,
as given by whoever assembled the folder); a reviewed case carries the class an expert
vouched for (agree: the model's class; disagree: the corrected class), marked ``verified``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

# one list for the atlas and the evaluation scan: a .jfif, .jpe or .dib file that evaluation
# counts must not be missing from the gallery (this module had its own, shorter copy)
from core.data import IMAGE_SUFFIXES
from core.store import FeedbackRecord, ImageRecord, PredictionRecord
from core.store_queries import DECIDED, expert_class

FOLDER, REVIEWED = "folder", "reviewed"


@dataclass(frozen=True)
class Source:
    path: str  # absolute path of the image file
    key: str  # change detector: "<size>:<mtime_ns>" or "sha256:<hex>"
    size: int  # bytes, from stat()
    mtime_ns: int  # modification time, from stat()
    label: str | None  # class folder name or expert-verified class; None when unknown
    source: str  # FOLDER or REVIEWED
    verified: bool  # True: the label is an expert's verdict from the feedback store
    name: str  # display name: path inside the gallery folder, or the original upload name


def scan_folder(root: Path | str) -> list[Source]:
    """Every image file under `root` (recursive, hidden files and folders skipped, symlinked
    folders not followed), sorted by path. A file directly in a sub-folder of `root` is
    labelled with that folder's name; files at the top level have no label."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(folder)
        label = None if here == root else here.name
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = here / name
            try:
                info = path.stat()
            except OSError:
                continue  # vanished or unreadable between listing and stat: not in the gallery
            found.append(Source(str(path.resolve()), f"{info.st_size}:{info.st_mtime_ns}", info.st_size,
                                info.st_mtime_ns, label, FOLDER, False, path.relative_to(root).as_posix()))
    return sorted(found, key=lambda s: s.path)


def reviewed_sources(s: Session, upload_dir: Path | str, exclude: frozenset[str] = frozenset()) -> list[Source]:
    """Stored copies of every image that has at least one feedback row, labelled with the
    class of its latest agree/disagree (None when only 'unsure' or an uncorrected
    disagree exists). Copies missing on disk, or pointing outside `upload_dir`, and images
    whose sha256 is in `exclude` (see `synthetic_hashes`) are left out."""
    upload_dir = Path(upload_dir).resolve()
    reviewed = s.execute(select(ImageRecord).where(
        ImageRecord.id.in_(select(FeedbackRecord.image_id).distinct())).order_by(ImageRecord.id)).scalars().all()
    labels = _latest_expert_classes(s)
    out = []
    for image in reviewed:
        if image.sha256 in exclude:
            continue
        path = (upload_dir / image.stored_path).resolve()
        if not path.is_relative_to(upload_dir) or not path.is_file():
            continue
        info = path.stat()
        label = labels.get(image.id)
        out.append(Source(str(path), f"sha256:{image.sha256}", info.st_size, info.st_mtime_ns, label,
                          REVIEWED, label is not None, image.original_name or path.name))
    return out


def _latest_expert_classes(s: Session) -> dict[int, str | None]:
    """image id -> expert class of its latest decided verdict (one query for all images)."""
    F, P = FeedbackRecord, PredictionRecord
    rows = s.execute(select(F.image_id, F.verdict, P.class_key, F.corrected_class)
                     .join(P, F.prediction_id == P.id).where(F.verdict.in_(DECIDED))
                     .order_by(F.created_at, F.id))
    latest: dict[int, str | None] = {}
    for image_id, verdict, model_class, corrected in rows:
        if model_class is None and corrected is None:
            continue  # a verdict on an abstention (e.g. on another panel) says nothing of the class
        latest[image_id] = expert_class(verdict, model_class, corrected)  # later rows overwrite
    return latest


def list_sources(gallery_dir: Path | str | None, upload_dir: Path | str, session: Session | None = None,
                 exclude: frozenset[str] = frozenset()) -> list[Source]:
    """The folder's images then the reviewed cases (when a session is given), less `exclude`d ones."""
    sources = scan_folder(gallery_dir) if gallery_dir else []
    if session is not None:
        sources += reviewed_sources(session, upload_dir, exclude)
    return sources


def synthetic_hashes(samples_dir: Path | str) -> frozenset[str]:
    """sha256 of the sample images drawn by the project's GAN (files named ``synthetic_*``):
    an expert's Agree on a drawn image must not make it an expert-verified cell of the atlas
    or the quiz. A handful of small files, hashed on each call."""
    folder = Path(samples_dir)
    if not folder.is_dir():
        return frozenset()
    hashes = set()
    for path in folder.glob("synthetic_*"):
        try:
            hashes.add(hashlib.sha256(path.read_bytes()).hexdigest())
        except OSError:  # unreadable: it cannot have been uploaded from here either
            continue
    return frozenset(hashes)
