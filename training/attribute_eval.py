"""Per-attribute accuracy and macro-F1 of the morphology predictions on a WBCAtt CSV."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from core.describe import embed_images
from core.imageio import ImageRejected, load_image_path
from core.morphology import predict_attributes
from training.metrics import per_class_report


def evaluate_attributes(bundle, csv_path: str, data_root: str, batch_size: int = 64) -> dict:
    """{"n", "per_attribute": {name: {accuracy, macro_f1}}, "mean_accuracy", "mean_macro_f1"};
    `path` in the CSV is relative to `data_root` or, as in the WBCAtt files shipped with PBC
    (``val/basophil/x.jpg`` beside ``pbc/attributes_val.csv``), to the CSV's own folder."""
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    bases = [Path(data_root), Path(csv_path).parent]
    for row in rows:
        row["path"] = next((str(b / row["path"]) for b in bases if (b / row["path"]).is_file()), "")
    rows = [r for r in rows if r["path"]]
    truth: dict[str, list[str]] = {name: [] for name in bundle.attribute_prototypes}
    guess: dict[str, list[str]] = {name: [] for name in bundle.attribute_prototypes}
    for start in range(0, len(rows), batch_size):
        images, kept = [], []
        for row in rows[start:start + batch_size]:
            try:
                images.append(load_image_path(row["path"]).image)
                kept.append(row)
            except ImageRejected:
                continue
        if not images:
            continue
        embeddings, _ = embed_images(bundle, images)
        for row, embedding in zip(kept, embeddings):
            for prediction in predict_attributes(bundle, embedding):
                truth[prediction.attribute].append(row[prediction.attribute].strip())
                guess[prediction.attribute].append(prediction.value)
    per_attribute = {}
    for name in truth:
        values = sorted(set(truth[name]))
        report = per_class_report(truth[name], guess[name], values)
        correct = sum(t == g for t, g in zip(truth[name], guess[name]))
        per_attribute[name] = {"accuracy": round(correct / max(1, len(truth[name])), 4),
                               "macro_f1": round(sum(r["f1"] for r in report.values()) / max(1, len(report)), 4)}
    n_attr = max(1, len(per_attribute))
    return {"n": len(next(iter(truth.values()), [])), "per_attribute": per_attribute,
            "mean_accuracy": round(sum(a["accuracy"] for a in per_attribute.values()) / n_attr, 4),
            "mean_macro_f1": round(sum(a["macro_f1"] for a in per_attribute.values()) / n_attr, 4)}
