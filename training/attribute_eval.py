"""Per-attribute accuracy and macro-F1 of the morphology predictions on a WBCAtt CSV.

Nothing is dropped without notice: rows whose image is missing or refused are listed under
`skipped_rows` (CSV line, path, reason), and a cell whose value is not one the model knows for its
attribute (e.g. granule_colour=green) is not scored (as in training and calibration, which ignore
such values) but counted under the attribute's `unknown_values` ({value: cells}).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from core.describe import embed_images
from core.imageio import ImageRejected, load_image_path
from core.morphology import predict_attributes
from training.dataset import annotated_value, read_path_csv
from training.metrics import per_class_report, print_first



@dataclass(frozen=True)
class AttributeRows:
    """The WBCAtt CSV rows that can be scored, and those left out with the reason."""
    rows: list[dict[str, str]]  # rows whose image exists, `path` made absolute, `_line` = CSV line
    skipped: list[dict]  # {"line", "path", "reason"} for every row left out


def read_attribute_csv(csv_path: str, data_root: str, attributes=None, images: set[Path] | None = None) -> AttributeRows:
    """The CSV's rows whose image exists, with `path` made absolute: relative to `data_root` or,
    as in the WBCAtt files shipped with PBC, to the CSV's own folder; the others as skipped. With
    `images` (the resolved paths of the images evaluated), a row of any other image is skipped
    too: the attribute block then describes the images the class block does, not the whole CSV.
    Raises ValueError when nothing could be scored: no 'path' column, no data row, none of
    `attributes` (names of the model's attributes) among the columns, or no listed image found."""
    columns, rows = read_path_csv(csv_path)
    if not rows:
        raise ValueError(f"{csv_path}: no data rows (a header only); nothing to score")
    if attributes is not None and not set(attributes) & set(columns):
        expected = ", ".join(sorted(attributes)) or "this model predicts no attribute"
        raise ValueError(f"{csv_path}: none of the WBCAtt attribute columns ({expected}); nothing to score")
    bases = [Path(data_root), Path(csv_path).parent]
    found, skipped = [], []
    for row in rows:
        given = row["path"] or ""
        path = next((b / given for b in bases if given and (b / given).is_file()), None)
        if path is None:
            skipped.append({"line": row["_line"], "path": given,
                            "reason": "no path given" if not given else "image file not found"})
        elif images is not None and path.resolve() not in images:
            skipped.append({"line": row["_line"], "path": given, "reason": "not among the --data images"})
        else:
            found.append(dict(row, path=str(path)))
    if not found:  # reporting 0.0 for "no image found" would read as a terrible model
        elsewhere = sum(row["reason"] == "not among the --data images" for row in skipped)
        if elsewhere:
            raise ValueError(f"{csv_path}: none of its {len(rows)} image paths is an image of {data_root} "
                             f"({elsewhere} name images elsewhere)")
        raise ValueError(f"{csv_path}: none of its {len(rows)} image paths exists under {data_root} "
                         "or beside the CSV")
    return AttributeRows(found, skipped)


def read_attribute_rows(csv_path: str, data_root: str) -> list[dict[str, str]]:
    """The rows of `read_attribute_csv` (for callers that need no account of skipped rows)."""
    return read_attribute_csv(csv_path, data_root).rows


def evaluate_attributes(bundle, csv_path: str, data_root: str, batch_size: int = 64,
                        table: AttributeRows | None = None) -> dict:
    """{"n", "per_attribute": {name: {n, accuracy, macro_f1, certain_share, accuracy_certain,
    unknown_values}}, "mean_accuracy", "mean_macro_f1", "mean_certain_share",
    "mean_accuracy_certain", "skipped_rows"}. *Certain* phrases are those at or above their
    attribute's calibrated threshold (the ones the morphology sentence states without "(?)");
    `table` is `read_attribute_csv`'s result when the caller checked the CSV already."""
    names = list(bundle.attribute_prototypes)
    table = table or read_attribute_csv(csv_path, data_root, names)
    known = {name: set(bundle.sidecar["attribute_phrases"][name]) for name in names}
    truth: dict[str, list[str]] = {name: [] for name in names}
    guess: dict[str, list[str]] = {name: [] for name in names}
    certain: dict[str, list[bool]] = {name: [] for name in names}
    unknown: dict[str, Counter] = {name: Counter() for name in names}
    skipped = list(table.skipped)
    for row, predictions in _predict_rows(bundle, table.rows, batch_size, skipped):
        for prediction in predictions:
            name, value = prediction.attribute, annotated_value(row, prediction.attribute)
            if not value:  # not annotated for this cell: nothing to score (training skips it too)
                continue
            if value not in known[name]:  # scoring it as wrong would blame the model for the CSV
                unknown[name][value] += 1
                continue
            truth[name].append(value)
            guess[name].append(prediction.value)
            certain[name].append(prediction.certain)
    per_attribute = {name: {**_attribute_scores(truth[name], guess[name], certain[name]),
                            "unknown_values": dict(sorted(unknown[name].items()))} for name in names}
    n = max((len(v) for v in truth.values()), default=0)
    if n == 0:  # all-None metrics with exit 0 would read as a result
        raise ValueError(f"{csv_path}: no cell with an annotated value the model knows among {len(table.rows)} "
                         f"rows whose image loads ({len(skipped)} rows skipped); nothing to score")

    def mean(key: str) -> float | None:
        values = [a[key] for a in per_attribute.values() if a[key] is not None]
        return round(sum(values) / len(values), 4) if values else None

    return {"n": n, "per_attribute": per_attribute,
            "mean_accuracy": mean("accuracy"), "mean_macro_f1": mean("macro_f1"),
            "mean_certain_share": mean("certain_share"), "mean_accuracy_certain": mean("accuracy_certain"),
            "skipped_rows": sorted(skipped, key=lambda s: s["line"])}


def _predict_rows(bundle, rows: list[dict], batch_size: int, skipped: list[dict]):
    """Yield (row, attribute predictions) for every row whose image loads; the others are
    appended to `skipped` with the loader's reason."""
    for start in range(0, len(rows), batch_size):
        images, kept = [], []
        for row in rows[start:start + batch_size]:
            try:
                images.append(load_image_path(row["path"]).image)
                kept.append(row)
            except ImageRejected as error:
                skipped.append({"line": row["_line"], "path": row["path"], "reason": f"image refused: {error}"})
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


def print_attributes(a: dict) -> None:
    """The attributes section of the evaluation table: means, skipped rows (the first few, with
    their reason), then one line per attribute with the values it did not score."""
    print(f"attributes: n={a['n']} mean accuracy={a['mean_accuracy']} mean macro-F1={a['mean_macro_f1']} "
          f"certain share={a['mean_certain_share']} accuracy of certain phrases={a['mean_accuracy_certain']}")
    skipped = a.get("skipped_rows", [])
    if skipped:
        reasons = Counter(s["reason"].split(":")[0] for s in skipped)
        print(f"  skipped CSV rows: {len(skipped)} ({', '.join(f'{r}: {k}' for r, k in sorted(reasons.items()))})")
        print_first([f"line {s['line']}: {s['path'] or '(empty path)'}: {s['reason']}" for s in skipped], "    ")
    for name, row in a["per_attribute"].items():
        unknown = row.get("unknown_values") or {}
        note = (f"  not scored, values the model does not know: "
                f"{', '.join(f'{v!r} x{k}' for v, k in unknown.items())}") if unknown else ""
        if row["n"] == 0:
            print(f"  {name:<26}no annotated cell{note}")
            continue
        stated = "-" if row["accuracy_certain"] is None else f"{row['accuracy_certain']:.3f}"
        print(f"  {name:<26}acc {row['accuracy']:.3f}  F1 {row['macro_f1']:.3f}  "
              f"certain {row['certain_share']:.3f} (acc {stated})  n {row['n']}{note}")
