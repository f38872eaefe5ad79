"""What the atlas gallery holds: image files of a folder the user points to, plus the stored
copies of cases reviewed in the feedback store.

Listing is cheap (stat only, no decoding), so it runs on every re-index; `core.gallery`
then embeds only the files whose key changed. Keys:

* folder files: ``"<size>:<mtime_ns>"`` - reading 20,000 files to hash them on every
  re-index would cost minutes; size and mtime change whenever a file is replaced.
* reviewed cases: ``"sha256:<hex>"`` - their copies are content-addressed already.

Labels: a file in ``<gallery>/<class>/...`` carries its parent folder's name (a folder label,
as given by whoever assembled the folder, whatever the panel); a reviewed case carries expert
labels, one per panel (the rule: `_expert_labels`), and no folder label.
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
    """An image the atlas can index (a gallery file or a reviewed case) and how to tell it changed."""
    path: str  # absolute path of the image file
    key: str  # change detector: "<size>:<mtime_ns>" or "sha256:<hex>"
    size: int  # bytes, from stat()
    mtime_ns: int  # modification time, from stat()
    label: str | None  # class folder name; None when unknown, and for a reviewed case (see expert_labels)
    source: str  # FOLDER or REVIEWED
    verified: bool  # True: the case has an expert's label on at least one panel
    name: str  # display name: path inside the gallery folder, or the original upload name
    # ((panel, expert class), ...) sorted by panel; reviewed cases only (see `_expert_labels`)
    expert_labels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # the index manifest (JSON) hands the pairs back as lists: keep them tuples, so an
        # unchanged item read back compares equal to the one listed now
        object.__setattr__(self, "expert_labels", tuple((str(p), str(c)) for p, c in self.expert_labels))

    def label_for(self, panel: str) -> str | None:
        """The label that answers `panel`'s question: a reviewed case's expert class on that panel
        (a verdict on another panel answers another question), a folder file's folder label."""
        return dict(self.expert_labels).get(panel) if self.source == REVIEWED else self.label


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
    """Stored copies of every image that has at least one feedback row, with its expert labels
    per panel (`Source.expert_labels`; none when only 'unsure' or uncorrected disagreements exist).
    Copies missing on disk, or pointing outside `upload_dir`, and images whose sha256 is in
    `exclude` (see `synthetic_hashes`) are left out."""
    upload_dir = Path(upload_dir).resolve()
    reviewed = s.execute(select(ImageRecord).where(
        ImageRecord.id.in_(select(FeedbackRecord.image_id).distinct())).order_by(ImageRecord.id)).scalars().all()
    labels = _expert_labels(s)
    out = []
    for image in reviewed:
        if image.sha256 in exclude:
            continue
        path = (upload_dir / image.stored_path).resolve()
        if not path.is_relative_to(upload_dir) or not path.is_file():
            continue
        info = path.stat()
        per_panel = tuple(sorted(labels.get(image.id, {}).items()))
        out.append(Source(str(path), f"sha256:{image.sha256}", info.st_size, info.st_mtime_ns, None, REVIEWED,
                          bool(per_panel), image.original_name or path.name, per_panel))
    return out


def _expert_labels(s: Session) -> dict[int, dict[str, str]]:
    """image id -> {panel: expert class}, one query for all images.

    A panel asks one question (which blood cell; which B-ALL stage; which leukaemia), so each
    panel keeps its own answer: a verdict given on one panel never relabels the image on
    another (a lymphocyte verified on blood_cells stays one when a B-ALL verdict calls it
    benign). Within a panel, verdicts are read oldest first, whichever model they answered
    (the class is a fact about the cell, not about a model), and the latest one that names a
    class wins: agree names the model's class, disagree its corrected class. A disagree that
    names no class withdraws the label only when it rejects that very class; 'unsure', and any
    verdict on an abstention that names no class, leave it as it is."""
    F, P = FeedbackRecord, PredictionRecord
    rows = s.execute(select(F.image_id, P.panel, F.verdict, P.class_key, F.corrected_class)
                     .join(P, F.prediction_id == P.id).where(F.verdict.in_(DECIDED))
                     .order_by(F.created_at, F.id))
    labels: dict[int, dict[str, str]] = {}
    for image_id, panel, verdict, model_class, corrected in rows:
        panel_labels = labels.setdefault(image_id, {})
        named = expert_class(verdict, model_class, corrected)
        if named is not None:
            panel_labels[panel] = named  # later rows overwrite: the latest verdict of the panel wins
        elif model_class is not None and panel_labels.get(panel) == model_class:
            del panel_labels[panel]  # "not this class" of the very class held: no verified label now
    return labels


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
