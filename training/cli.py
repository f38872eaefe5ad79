"""What every command line of `training/` shares: argument types that refuse impossible numbers
at parse time (argparse then prints its usage line and exits 2), and `run_main` (from
`core.cli_guard`, which the describe CLI uses too), which turns any failure that escapes a
command's own checks into one line on stderr instead of a traceback.
"""
from __future__ import annotations

import argparse
from typing import Callable

# the guard lives in core, where the describe CLI uses it too; re-exported for training's commands
from core.cli_guard import DEBUG_VARIABLE, describe_failure, is_input_problem, run_main

__all__ = ["DEBUG_VARIABLE", "decay", "describe_failure", "is_input_problem", "non_negative_float",
           "non_negative_int", "positive_float", "positive_int", "run_main", "share"]


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
