"""`run_main`: what every command line shares (training's and `core.describe`'s), turning any
failure that escapes a command's own checks into one line on stderr instead of a traceback.

Why a guard as well as checks: the checks name the mistake precisely, but a command reads
folders, CSVs, sidecars and images written by people and other tools, and a malformed one
can fail deep inside a library. A clinician or lab engineer should then read what failed,
not thirty lines of stack; a developer gets the stack back with HEMASCRIBE_TRACEBACK=1.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

DEBUG_VARIABLE = "HEMASCRIBE_TRACEBACK"


def debugging() -> bool:
    """True when HEMASCRIBE_TRACEBACK=1 asks for the traceback of a failure instead of one line."""
    return os.environ.get(DEBUG_VARIABLE) == "1"


def run_main(main: Callable[[], int]) -> int:
    """`main()`'s exit status; an exception that escapes it is printed as one line on stderr
    (status 2 for a problem with the input: a file, folder, value or model; 1 for anything else,
    which is a bug to report). Ctrl-C exits 130 quietly, and a reader that leaves early (`| head`)
    ends the run quietly with 141, as a shell reports a closed pipe. HEMASCRIBE_TRACEBACK=1 re-raises."""
    try:
        return main()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout at exit
        return 141
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the point: no traceback reaches the user
        if debugging():
            raise
        print(f"error: {describe_failure(error)}", file=sys.stderr)
        return 2 if is_input_problem(error) else 1


def is_input_problem(error: BaseException) -> bool:
    """True for the failures a wrong input causes (missing or unreadable file, malformed value,
    a model that does not load), as opposed to a bug in the command."""
    from core.checkpoint import ModelLoadError
    from core.imageio import ImageRejected

    return isinstance(error, (OSError, ValueError, KeyError, MemoryError, ModelLoadError, ImageRejected)) \
        or type(error).__name__ == "UsageError" or "out of memory" in str(error).lower()


def describe_failure(error: BaseException) -> str:
    """One line saying what failed: the message, prefixed by the kind of failure where the
    message alone would not say it (a KeyError's message is only the key)."""
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, MemoryError) or "out of memory" in message.lower():
        return f"out of memory ({message}); try a smaller --batch-size, fewer images or fewer threads"
    if isinstance(error, KeyError):  # mostly a file of another kind (a junk last.pt, a CSV's columns)
        return f"missing entry {message} in what was read (is each file of the expected kind?)"
    if isinstance(error, UnicodeDecodeError):
        return f"a text file is not UTF-8 ({message})"
    if is_input_problem(error):
        return message
    return (f"unexpected {type(error).__name__}: {message} (a bug: rerun with {DEBUG_VARIABLE}=1 "
            "for the traceback and report it)")
