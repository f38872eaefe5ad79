"""Plots of the reliability report (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15):
    edges = np.linspace(0, 1, n_bins + 1)
    centres, accuracy, counts = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            centres.append(confidence[inside].mean())
            accuracy.append(correct[inside].mean())
            counts.append(int(inside.sum()))
    return np.array(centres), np.array(accuracy), counts


def reliability_diagram(curve: dict, bundle, path: Path) -> None:
    """Accuracy against calibrated confidence (15 bins) on the blood_cells val images."""
    confidence, correct = np.array(curve["confidence"]), np.array(curve["correct"])
    centres, accuracy, counts = _bins(confidence, correct)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(centres, accuracy, "o-", color="#b03030", label="model (calibrated)")
    for x, y, n in zip(centres, accuracy, counts):
        ax.annotate(str(n), (x, y), fontsize=6, xytext=(2, -8), textcoords="offset points")
    ax.set(xlabel="confidence", ylabel="accuracy", title=f"Reliability, blood_cells val\n{bundle.model_id}",
           xlim=(0, 1.02), ylim=(0, 1.02))
    ax.legend(loc="upper left", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def risk_coverage_plot(panels: dict, path: Path) -> None:
    """Error rate of the answered cases against coverage, one line per panel."""
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    for name, section in panels.items():
        ax.plot(section["curve"]["coverage"], section["curve"]["risk"], label=name)
    ax.set(xlabel="coverage (share answered)", ylabel="risk (error rate)", title="Risk-coverage on val")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
