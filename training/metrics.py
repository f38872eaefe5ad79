"""Classification metrics as plain functions over label lists (no sklearn needed)."""
from __future__ import annotations

import numpy as np
import torch

from training.calibration_fit import expected_calibration_error


def per_class_report(labels: list[str], predicted: list[str], classes: list[str]) -> dict[str, dict]:
    """precision, recall, f1 and support for every class."""
    report = {}
    for key in classes:
        tp = sum(1 for y, p in zip(labels, predicted) if y == key and p == key)
        n_pred = sum(1 for p in predicted if p == key)
        support = sum(1 for y in labels if y == key)
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[key] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "support": support}
    return report


def confusion_matrix(labels: list[str], predicted: list[str], classes: list[str]) -> list[list[int]]:
    """rows: true class, columns: predicted class, in `classes` order."""
    index = {key: i for i, key in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    for y, p in zip(labels, predicted):
        if y in index and p in index:
            matrix[index[y]][index[p]] += 1
    return matrix


def classification_summary(labels: list[str], predicted: list[str], confidences: list[float],
                           abstained: list[bool], classes: list[str]) -> dict:
    """Accuracy, macro-F1 over the classes with support (and over those plus the classes that
    were predicted: scikit-learn's default), ECE, abstention and accuracy on the answered cases.
    `predicted` is the top class even when the model abstained."""
    n = len(labels)
    correct = [y == p for y, p in zip(labels, predicted)]
    report = per_class_report(labels, predicted, classes)
    supported = [r["f1"] for r in report.values() if r["support"] > 0]
    present = set(labels) | set(predicted)  # scikit-learn's default label set
    with_predicted = [r["f1"] for k, r in report.items() if k in present]
    answered = [c for c, a in zip(correct, abstained) if not a]
    return {
        "n": n,
        "accuracy": round(sum(correct) / n, 4) if n else None,
        "macro_f1": round(sum(supported) / len(supported), 4) if supported else None,
        "macro_f1_with_predicted": round(sum(with_predicted) / len(with_predicted), 4) if with_predicted else None,
        "per_class": report,
        "confusion": {"labels": classes, "matrix": confusion_matrix(labels, predicted, classes)},
        "ece": round(expected_calibration_error(torch.tensor(confidences), torch.tensor(correct)), 4) if n else None,
        "abstain_rate": round(sum(abstained) / n, 4) if n else None,
        "accuracy_answered": round(sum(answered) / len(answered), 4) if answered else None,
        "intervals": bootstrap_intervals(labels, predicted, abstained, classes),
    }


def bootstrap_intervals(labels: list[str], predicted: list[str], abstained: list[bool], classes: list[str],
                        resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict | None:
    """Percentile bootstrap intervals of accuracy, macro-F1 (classes with support in the resample)
    and accuracy on the answered cases; None under 2 images.

    Why: a val set of a few hundred images moves a score by about a point between draws, so a
    target missed or met by less than that is not settled by one number. Images are resampled
    as if independent; cells of one patient or smear are not, so the true spread is wider
    (B-ALL's val shares patients with train). Seeded: the same inputs give the same interval."""
    n = len(labels)
    if n < 2:
        return None
    index = {key: i for i, key in enumerate(classes)}
    n_classes = len(classes)  # labels and predictions outside `classes` get indices past them, distinct
    truth = np.array([index.get(y, n_classes) for y in labels])  # so that an unknown label and an
    guess = np.array([index.get(p, n_classes + 1) for p in predicted])  # unknown prediction never match
    answered = ~np.array(abstained, dtype=bool)
    rng = np.random.default_rng(seed)
    scores: dict[str, list] = {"accuracy": [], "macro_f1": [], "accuracy_answered": []}
    for chunk in np.array_split(np.arange(resamples), max(1, resamples * n // 2_000_000)):  # bounded memory
        draws = rng.integers(0, n, size=(len(chunk), n))
        for name, values in _resampled_scores(truth[draws], guess[draws], answered[draws], n_classes).items():
            scores[name].append(values)
    tail = 100 * (1 - level) / 2
    intervals = {"level": level, "resamples": resamples, "method": "percentile bootstrap over images"}
    for name, chunks in scores.items():
        values = np.concatenate(chunks)
        values = values[~np.isnan(values)]
        intervals[name] = [round(float(np.percentile(values, tail)), 4),
                           round(float(np.percentile(values, 100 - tail)), 4)] if len(values) else None
    return intervals


def _resampled_scores(truth: np.ndarray, guess: np.ndarray, answered: np.ndarray, n_classes: int) -> dict:
    """Accuracy, macro-F1 and answered accuracy of each row of (resamples, n) class indices."""
    correct = truth == guess
    true_pos = _row_counts(np.where(correct, truth, n_classes), n_classes)  # n_classes: dropped below
    support, called = _row_counts(truth, n_classes), _row_counts(guess, n_classes)
    f1 = 2 * true_pos / np.maximum(support + called, 1)  # = 2PR / (P + R); 0 where nothing matched
    has_support = support > 0
    n_answered = answered.sum(1)
    answered_right = (correct & answered).sum(1) / np.maximum(n_answered, 1)
    return {"accuracy": correct.mean(1),
            "macro_f1": (f1 * has_support).sum(1) / np.maximum(has_support.sum(1), 1),
            "accuracy_answered": np.where(n_answered > 0, answered_right, np.nan)}


def _row_counts(indices: np.ndarray, n_classes: int) -> np.ndarray:
    """(rows, n_classes) counts of each class index per row; indices n_classes and n_classes + 1
    (outside the classes) are dropped."""
    rows, width = indices.shape[0], n_classes + 2
    flat = (np.arange(rows)[:, None] * width + indices).ravel()
    return np.bincount(flat, minlength=rows * width).reshape(rows, width)[:, :n_classes]


SHOWN = 5  # lines printed of a list the JSON holds in full: enough to see what went wrong


def print_first(lines: list[str], indent: str = "  ", rest: str = "") -> None:
    """The first SHOWN of `lines`, then "... and N more" (with `rest`, where the others are)."""
    for line in lines[:SHOWN]:
        print(indent + line)
    if len(lines) > SHOWN:
        print(f"{indent}... and {len(lines) - SHOWN} more" + (f" ({rest})" if rest else ""))
