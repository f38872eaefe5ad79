"""core.atomic: the one temp-file-and-rename writer of every rewritten file."""
from __future__ import annotations

import os
import stat

import pytest

from core.atomic import atomic_write, atomic_write_bytes, atomic_write_text


def test_replaces_the_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "manifest.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new é")
    assert target.read_text(encoding="utf-8") == "new é"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path):
    target = tmp_path / "model.safetensors"
    atomic_write_bytes(target, b"old weights")

    def half_then_fail(handle):
        handle.write(b"half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_files_follow_the_umask_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_bytes(tmp_path / "shared.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp would give 0o600


def test_concurrent_writers_use_their_own_temp_files(tmp_path):
    """Two writers of one target (two DDP ranks) interleaved: each renames its own whole file."""
    target = tmp_path / "cache.npy"
    seen = []

    def outer(handle):
        seen.append(handle.name)
        atomic_write_bytes(target, b"inner")  # another writer finishes while this one writes
        seen.append(next(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")))
        handle.write(b"outer")

    atomic_write(target, outer)
    assert target.read_bytes() == b"outer"
    assert os.path.basename(seen[0]) == seen[1]  # the inner write did not touch the outer's temp file
