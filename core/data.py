"""Reading labelled image folders: a folder per class (the PBC layout), CSV label files and
the Munich AML-Cytomorphology ``annotations.dat`` layout.

Every reader returns a list of `LabelledImage` so training and evaluation never care where
the labels came from.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from core.panels import class_key_for_label

# what core.imageio decodes (it picks the decoder from the content; these only find the files)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".tif", ".tiff", ".bmp", ".dib", ".gif", ".webp"}


@dataclass(frozen=True)
class LabelledImage:
    """One image file and the class it is labelled with."""
    path: Path  # absolute path of the image file
    label: str  # class key (folder name, CSV label or annotation label)


def is_image_file(path: Path) -> bool:
    """True for a regular file with one of the image suffixes we read."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def scan_class_folders(root: Path | str) -> list[LabelledImage]:
    """All images under ``root/<class>/``, recursively inside each class folder and through
    symlinked folders (each real folder once), skipping hidden files and folders; sorted.
    A class folder that is a link to another class folder (an alias such as ``Neutrophils ->
    neutrophil``) is skipped: its images are the linked class's, and would be labelled twice."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"Data folder expected, but {root} is a file (give the folder of class folders)")
    if not root.is_dir():
        raise FileNotFoundError(f"Data folder not found: {root}")
    items = []
    class_dirs = _distinct_class_folders(root)
    others = {os.path.realpath(d) for d in class_dirs}
    root_real = os.path.realpath(root)
    for class_dir in class_dirs:
        # Links into another class would give its images this label; links to the data folder or
        # above it would read every class again.
        skip = (others - {os.path.realpath(class_dir)}) | {root_real}
        paths = _image_files(class_dir, skip, root_real)
        items.extend(LabelledImage(path.resolve(), class_dir.name) for path in paths)
    return items


def _distinct_class_folders(root: Path) -> list[Path]:
    """Visible sub-folders of `root`, one per real folder: of several names for one folder the
    one that is not a link wins (else the first name), so an alias adds no class."""
    by_real: dict[str, Path] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        real = os.path.realpath(folder)
        if real not in by_real or (by_real[real].is_symlink() and not folder.is_symlink()):
            by_real[real] = folder
    return sorted(by_real.values())


def _image_files(folder: Path, skip: set[str], root_real: str) -> list[Path]:
    """Image files under `folder`, following linked folders once each, except `skip` folders and
    the ancestors of the data folder."""
    seen, found = set(), []
    for current, subfolders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen or real in skip or root_real.startswith(real.rstrip(os.sep) + os.sep):
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))  # .thumbnails, .git ...
        found.extend(p for p in (Path(current) / f for f in files) if is_image_file(p))
    return sorted(found)


def class_key_for_folder(folder: str, keys: set[str]) -> str:
    """The class key a folder name means: itself, or the one key it equals up to case, spaces
    and hyphens ("Early Pre-B" -> "early_pre_b"; `core.panels.class_key_for_label`, without
    the quiz's plurals and display names, so a training folder is read only by its key); the
    folder name when it matches none."""
    return class_key_for_label(folder, keys) or folder


def as_class_keys(items: list[LabelledImage], keys: set[str]) -> tuple[list[LabelledImage], dict[str, str]]:
    """Items relabelled with the class key their folder name means (`class_key_for_folder`), and
    {folder: key} for the folders whose name was not exactly a key. Safe: a name is changed only
    when it equals exactly one key once normalised, so no folder lands in a class it does not name.
    Training and evaluation read folders this one way."""
    matched = {folder: class_key_for_folder(folder, keys) for folder in {item.label for item in items}}
    renamed = {folder: key for folder, key in sorted(matched.items()) if folder != key}
    return [LabelledImage(item.path, matched[item.label]) for item in items], renamed


def class_counts(items: list[LabelledImage]) -> dict[str, int]:
    """Number of images per label, sorted by label."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item.label] = counts.get(item.label, 0) + 1
    return dict(sorted(counts.items()))


def data_fingerprint(items: list[LabelledImage], root: Path | str | None = None) -> str:
    """sha256 over (relative path, label, size) of every item: identifies the data a model
    saw without hashing gigabytes of pixels."""
    digest = hashlib.sha256()
    for item in items:
        name = str(item.path.relative_to(root)) if root else item.path.name
        digest.update(f"{name}\t{item.label}\t{item.path.stat().st_size}\n".encode())
    return digest.hexdigest()
