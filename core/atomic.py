"""Write a file so that readers (and a crash) see the old file or the whole new one, never half.

One rule for every file the project rewrites in place (gallery index, uploads, models and their
sidecars, training checkpoints, decoded-image caches): write a temp file beside the target,
flush it to disk, then ``os.replace`` it over the target (atomic on POSIX within one folder).

The temp name is unique per call, so two processes writing one target (DDP ranks, two app
sessions) never write into each other's temp file; the last rename wins whole. The file is
created with ``open(..., "xb")``, so it follows the umask as any other file does (``mkstemp``
and safetensors' ``save_file`` create files readable by their owner only, which a model shared
with a team or an upload folder served by another user must not be).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: Path | str, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(handle)` on a temp file beside `path`, fsync it, rename it over `path`;
    the temp file is removed if anything fails (the old `path` is then untouched)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())  # a database row may point at it right after: make it durable
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """`atomic_write` of `data`."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: Path | str, text: str) -> Path:
    """`atomic_write` of `text` as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))
