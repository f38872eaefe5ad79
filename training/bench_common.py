"""What the benchmarks share: one percentile rule, said in their output, and a one-line refusal
of a model that does not load or a setting that cannot be used (a finding, not a crash)."""
from __future__ import annotations

import sys

from core.checkpoint import ModelLoadError
from core.settings import SettingsError

# what a benchmark refuses with one line: a model that does not load, a setting that cannot be used
REFUSED = (ModelLoadError, SettingsError)

# Nearest rank, not interpolation: the reported p95 is a latency that was actually measured, and
# never below the true 95th percentile of the runs (the earlier sorted[int(0.95 n) - 1] read the
# 47th of 50 runs, i.e. the 94th percentile, and so flattered the tail).
P95_RULE = "p95 = nearest rank: the ceil(0.95 n)-th smallest of n runs"


def nearest_rank(samples, q: int = 95) -> float:
    """The ceil(q/100 * n)-th smallest of `samples` (q an integer percent; integer arithmetic,
    so 0.95 * 20 cannot round to the 20th of 20)."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples to take a percentile of")
    rank = max(1, (q * len(ordered) + 99) // 100)
    return ordered[rank - 1]


def refuse_model(error: Exception) -> int:
    """Print a `REFUSED` error as one line on stderr; the exit status for it (2, as the CLIs use)."""
    print(f"error: {error}", file=sys.stderr)
    return 2
