"""Uploaded image files, stored under their content hash.

The name of a stored file comes only from the validated sha256 of its bytes and an allow-listed
extension, so a user's file name can never choose where it is written (or overwrite another).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .atomic import atomic_write_bytes
from .data import IMAGE_SUFFIXES

SAFE_EXTENSIONS = frozenset(IMAGE_SUFFIXES)  # what the loader decodes; anything else is stored as .bin
_SHA_RE = re.compile(r"[0-9a-f]{64}")


def check_sha256(sha256: str) -> str:
    """`sha256` itself if it is 64 lowercase hex characters; ValueError otherwise."""
    if not isinstance(sha256, str) or not _SHA_RE.fullmatch(sha256):
        raise ValueError("sha256 must be 64 lowercase hexadecimal characters")
    return sha256


def safe_extension(ext: str) -> str:
    """Lower-cased extension from the allow-list, or '.bin' for anything else."""
    ext = (ext or "").strip().lower()
    ext = ext if ext.startswith(".") else "." + ext
    return ext if ext in SAFE_EXTENSIONS else ".bin"


def store_image_copy(upload_dir: Path, sha256: str, data: bytes, ext: str) -> str:
    """Write `data` to upload_dir/<sha[:2]>/<sha><ext> atomically; return the relative path.

    The name comes only from the validated hash and an allow-listed extension, so it can
    never escape `upload_dir`. The bytes must hash to `sha256`.
    """
    check_sha256(sha256)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError("data does not match its sha256")
    rel = f"{sha256[:2]}/{sha256}{safe_extension(ext)}"
    target = Path(upload_dir) / rel
    if target.is_file() and target.stat().st_size == len(data):
        return rel  # content-addressed: same name means same bytes
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, data)  # readers see no file or the whole file, never half
    return rel
