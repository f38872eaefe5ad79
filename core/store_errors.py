"""Database errors in words a clinician reads: what went wrong with the feedback store, and that
describing still works. Never echoes a password (the caller passes a safe `where`)."""
from __future__ import annotations


def store_error_message(exc: BaseException, where: str) -> str:
    """A clinician-readable sentence for a database error at `where` (no traceback)."""
    original = str(getattr(exc, "orig", None) or exc)
    raw = original.lower()
    tail = "describing still works but feedback cannot be saved."
    if "readonly" in raw or "read-only" in raw or isinstance(exc, PermissionError):
        return f"The feedback database at {where} is read-only; {tail}"
    if "not a database" in raw or "malformed" in raw or "corrupt" in raw:
        return f"The feedback database at {where} is damaged (not a valid database file); {tail}"
    if "unable to open" in raw:
        return f"The feedback database at {where} cannot be opened (check the folder); {tail}"
    if isinstance(exc, ImportError):
        return f"The database driver for {where} is not installed; {tail}"
    if "does not exist" in raw or "authentication failed" in raw or "role" in raw:
        return f"The feedback database server at {where} refused this database or login; {tail}"
    if "connect" in raw or "timeout" in raw or "could not translate host" in raw:
        return f"The feedback database server at {where} cannot be reached; {tail}"
    first = original.strip().splitlines()[0] if original.strip() else type(exc).__name__
    return f"The feedback database at {where} is unavailable ({first}); {tail}"
