"""What every command line of `training/` shares: argument types that refuse impossible numbers
at parse time (argparse then prints its usage line and exits 2), and `run_main`, which turns
any failure that escapes a command's own checks into one line on stderr instead of a traceback.

Why a guard as well as checks: the checks name the mistake precisely, but a command reads
folders, CSVs, sidecars and images written by people and other tools, and a malformed one
can fail deep inside a library. A clinician or lab engineer should then read what failed,
not thirty lines of stack; a developer gets the stack back with HEMASCRIBE_TRACEBACK=1.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

DEBUG_VARIABLE = "HEMASCRIBE_TRACEBACK"


def _number(kind: type, text: str, test: Callable[[float], bool], wanted: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if value != value or not test(value):  # value != value: NaN passes no test
        raise argparse.ArgumentTypeError(f"{text} is out of range: expected {wanted}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(int, text, lambda v: v >= 1, "an integer of 1 or more")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (0 usually means "off" or "all")."""
    return _number(int, text, lambda v: v >= 0, "an integer of 0 or more")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(float, text, lambda v: 0 < v < float("inf"), "a number above 0")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _number(float, text, lambda v: 0 <= v < float("inf"), "a number of 0 or more")


def share(text: str) -> float:
    """argparse type: a share or accuracy in (0, 1]."""
    return _number(float, text, lambda v: 0 < v <= 1, "a share above 0 and at most 1")


def decay(text: str) -> float:
    """argparse type: a weight-average decay in [0, 1) (0: no average)."""
    return _number(float, text, lambda v: 0 <= v < 1, "a decay of 0 (off) or more, below 1, e.g. 0.999")


def run_main(main: Callable[[], int]) -> int:
    """`main()`'s exit status; an exception that escapes it is printed as one line on stderr
    (status 2 for a problem with the input: a file, folder, value or model; 1 for anything else,
    which is a bug to report). Ctrl-C exits 130 quietly. HEMASCRIBE_TRACEBACK=1 re-raises."""
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the point: no traceback reaches the user
        if os.environ.get(DEBUG_VARIABLE) == "1":
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
