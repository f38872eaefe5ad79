"""Classification metrics as plain functions over label lists (no sklearn needed)."""
from __future__ import annotations

import torch

from core.reliability import expected_calibration_error


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
    }


SHOWN = 5  # lines printed of a list the JSON holds in full: enough to see what went wrong


def print_first(lines: list[str], indent: str = "  ", rest: str = "") -> None:
    """The first SHOWN of `lines`, then "... and N more" (with `rest`, where the others are)."""
    for line in lines[:SHOWN]:
        print(indent + line)
    if len(lines) > SHOWN:
        print(f"{indent}... and {len(lines) - SHOWN} more" + (f" ({rest})" if rest else ""))
