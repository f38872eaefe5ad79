"""Per-attribute accuracy and macro-F1 of the morphology predictions on a WBCAtt CSV."""
from __future__ import annotations

import csv
from pathlib import Path

from core.describe import embed_images
from core.imageio import ImageRejected, load_image_path
from core.morphology import predict_attributes
from training.dataset import annotated_value
from training.metrics import per_class_report


def read_attribute_rows(csv_path: str, data_root: str) -> list[dict[str, str]]:
    """The CSV's rows whose image exists, with `path` made absolute: relative to `data_root`
    or, as in the WBCAtt files shipped with PBC, to the CSV's own folder."""
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        if "path" not in (reader.fieldnames or []):
            raise ValueError(f"{csv_path}: no 'path' column (the image path, relative to --data)")
        rows = list(reader)
    bases = [Path(data_root), Path(csv_path).parent]
    for row in rows:
        row["path"] = next((str(b / row["path"]) for b in bases if row["path"] and (b / row["path"]).is_file()), "")
    found = [r for r in rows if r["path"]]
    if rows and not found:  # reporting 0.0 for "no image found" would read as a terrible model
        raise ValueError(f"{csv_path}: none of its {len(rows)} image paths exists under {data_root} "
                         "or beside the CSV")
    return found


def evaluate_attributes(bundle, csv_path: str, data_root: str, batch_size: int = 64) -> dict:
    """{"n", "per_attribute": {name: {accuracy, macro_f1, certain_share, accuracy_certain}},
    "mean_accuracy", "mean_macro_f1", "mean_certain_share", "mean_accuracy_certain"}.
    *Certain* phrases are those at or above their attribute's calibrated threshold (the ones the
    morphology sentence states without "(?)"); `path` is read as in `read_attribute_rows`."""
    truth: dict[str, list[str]] = {name: [] for name in bundle.attribute_prototypes}
    guess: dict[str, list[str]] = {name: [] for name in bundle.attribute_prototypes}
    certain: dict[str, list[bool]] = {name: [] for name in bundle.attribute_prototypes}
    for row, predictions in _predict_rows(bundle, read_attribute_rows(csv_path, data_root), batch_size):
        for prediction in predictions:
            value = annotated_value(row, prediction.attribute)
            if not value:  # not annotated for this cell: nothing to score (training skips it too)
                continue
            truth[prediction.attribute].append(value)
            guess[prediction.attribute].append(prediction.value)
            certain[prediction.attribute].append(prediction.certain)
    per_attribute = {name: _attribute_scores(truth[name], guess[name], certain[name]) for name in truth}

    def mean(key: str) -> float | None:
        known = [a[key] for a in per_attribute.values() if a[key] is not None]
        return round(sum(known) / len(known), 4) if known else None

    return {"n": max((len(v) for v in truth.values()), default=0), "per_attribute": per_attribute,
            "mean_accuracy": mean("accuracy"), "mean_macro_f1": mean("macro_f1"),
            "mean_certain_share": mean("certain_share"), "mean_accuracy_certain": mean("accuracy_certain")}


def _predict_rows(bundle, rows: list[dict], batch_size: int):
    """Yield (row, attribute predictions) for every row whose image loads."""
    for start in range(0, len(rows), batch_size):
        images, kept = [], []
        for row in rows[start:start + batch_size]:
            try:
                images.append(load_image_path(row["path"]).image)
                kept.append(row)
            except ImageRejected:
                continue
        if images:
            embeddings, _ = embed_images(bundle, images)
            for row, embedding in zip(kept, embeddings):
                yield row, predict_attributes(bundle, embedding)


def _attribute_scores(truth: list[str], guess: list[str], certain: list[bool]) -> dict:
    """Accuracy, macro-F1, share of phrases stated as certain and their accuracy (None when
    no phrase was stated: there is nothing to score, which is not the same as all right)."""
    if not truth:  # no cell annotated for this attribute
        return {"n": 0, "accuracy": None, "macro_f1": None, "certain_share": None, "accuracy_certain": None}
    report = per_class_report(truth, guess, sorted(set(truth)))
    hits = [t == g for t, g in zip(truth, guess)]
    certain_hits = [h for h, c in zip(hits, certain) if c]
    return {"n": len(hits), "accuracy": round(sum(hits) / max(1, len(hits)), 4),
            "macro_f1": round(sum(r["f1"] for r in report.values()) / max(1, len(report)), 4),
            "certain_share": round(len(certain_hits) / max(1, len(hits)), 4),
            "accuracy_certain": round(sum(certain_hits) / len(certain_hits), 4) if certain_hits else None}
