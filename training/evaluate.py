"""Evaluate a model on a folder of class folders (a contract other tools rely on).

    python -m training.evaluate --checkpoint PATH --data DIR [--panel NAME] [--json OUT]
                                [--attributes CSV]

DIR holds one subfolder per class, named by class key (a folder that differs only in case,
spaces or hyphens, e.g. "Neutrophil" or "Early Pre-B", is read as that class, and the JSON's
`folders_matched` says so). Without --panel, the panel whose class keys contain the folder
names is used; when folders of several panels are mixed, the panel holding the most of them, and
on a tie the run is refused (exit 2) until --panel names one. Folders that are not classes of the
panel are *unknown* cells: `unknown.flagged_rate` is the share of them the model did not describe
as a known class (it abstained), by the same rule the app uses.

`accuracy` is over every image that loads, using the top class even where the model abstained;
`accuracy_answered` only over the ones it answered; `intervals` holds their 95 %
percentile-bootstrap intervals and macro-F1's (images resampled; seeded, so a rerun prints the
same). `macro_f1` averages F1 over the panel's classes that have images in DIR;
`macro_f1_with_predicted` also over the classes predicted for some image but absent from DIR
(scikit-learn's default, lower when the model names classes that are not there). Files that
cannot be read are listed under `refused` and not counted in `n`.

Exit status 2, with one line on stderr and nothing written, when the run cannot give a result:
a model that does not load, an unknown --panel, a DIR with no image in any class folder, or a
--json OUT that cannot be written (a folder, or under a file or a read-only folder: checked before
the run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from core.atomic import atomic_write_text
from core.checkpoint import ModelLoadError, load_bundle
from core.data import LabelledImage, as_class_keys, scan_class_folders
from core.describe import describe_batch
from core.imageio import ImageRejected, load_image_path
from core.panels import all_class_keys, infer_panel, require_panel
from training.attribute_eval import evaluate_attributes, print_attributes, read_attribute_csv
from training.cli import positive_int, run_main
from training.metrics import classification_summary, print_first


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model weights (.safetensors, sidecar beside it)")
    p.add_argument("--data", required=True, help="folder with one subfolder per class")
    p.add_argument("--panel", default=None, help="panel name (default: inferred from the folder names)")
    p.add_argument("--json", default=None, help="write the metrics as JSON here")
    p.add_argument("--attributes", default=None, help="WBCAtt CSV (path column relative to --data)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--record", default=None, metavar="NAME", type=record_name,
                   help="also store the summary in the model sidecar under metrics.NAME (model card); "
                        "a summary recorded earlier under NAME is replaced, and the command says so")
    return p.parse_args(argv)


def record_name(text: str) -> str:
    """argparse type of --record: a non-empty name without dots (it becomes a key of metrics)."""
    name = text.strip()
    if not name or "." in name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a name such as pbc_val (not empty, no dots)")
    return name


def record_in_sidecar(checkpoint: str, name: str, metrics: dict, command: str) -> None:
    """Keep a summary (no confusion matrix; skipped attribute rows as a count, not listed) under
    sidecar["metrics"][name]."""
    from core.checkpoint import load_sidecar, update_sidecar

    keep = ("panel", "n", "accuracy", "macro_f1", "ece", "abstain_rate", "accuracy_answered", "intervals",
            "unknown", "per_class", "attributes", "seconds")
    summary = {k: metrics[k] for k in keep if k in metrics}
    if "skipped_rows" in summary.get("attributes", {}):  # like `refused`: a count, not every file name
        summary["attributes"] = {**summary["attributes"], "skipped_rows": len(summary["attributes"]["skipped_rows"])}
    summary["command"] = command
    recorded = load_sidecar(checkpoint).get("metrics", {})
    earlier = recorded.get(name)
    if isinstance(earlier, dict):  # the model card shows this name: a replacement must not go unnoticed
        print(f"note: metrics.{name} recorded earlier (n={earlier.get('n')}, accuracy {earlier.get('accuracy')}) "
              f"is replaced (n={summary.get('n')}, accuracy {summary.get('accuracy')})", file=sys.stderr)
    recorded[name] = summary
    update_sidecar(checkpoint, {"metrics": recorded})


def describe_folder(bundle, items, panel: str, batch_size: int):
    """(described items, descriptions, refused (file, message) pairs), batch by batch."""
    described, results, refused = [], [], []
    for start in range(0, len(items), batch_size):
        batch, images = [], []
        for item in items[start:start + batch_size]:
            try:
                images.append(load_image_path(item.path).image)
                batch.append(item)
            except ImageRejected as error:
                refused.append((str(item.path), str(error)))
        results.extend(describe_batch(bundle, images, panel))
        described.extend(batch)
    return described, results, refused


def match_folders(bundle, items: list[LabelledImage]) -> tuple[list[LabelledImage], dict[str, str]]:
    """Items relabelled with the class keys of every panel (`core.data.as_class_keys`)."""
    return as_class_keys(items, all_class_keys(bundle.panels))


def evaluate(bundle, data_dir: str, panel: str | None, batch_size: int = 64) -> dict:
    """All metrics of the evaluation contract for one folder tree."""
    started = time.time()
    items, renamed = match_folders(bundle, scan_class_folders(data_dir))
    if not items:  # else: no panel to infer, or with --panel a table of None that reads as a result
        raise ValueError(f"no images found under {data_dir} (expected one sub-folder per class, named by "
                         f"class key, e.g. {Path(data_dir) / 'neutrophil'}/*.png)")
    folders = {item.label for item in items}
    panel = panel or infer_panel(bundle.panels, folders)  # a tie is refused there (PanelTieError)
    if panel is None:
        raise ValueError(f"No panel of this model holds any of the classes {sorted(folders)}; pass --panel")
    classes = bundle.panels[panel].keys
    described, results, refused = describe_folder(bundle, items, panel, batch_size)
    if not described:  # a table of None would read as a result
        raise ValueError(f"none of the {len(refused)} images under {data_dir} could be read; the first: "
                         f"{refused[0][1]}")
    known = [(i, r) for i, r in zip(described, results) if i.label in classes]
    unknown = [r for i, r in zip(described, results) if i.label not in classes]
    metrics = {"panel": panel, "data": str(data_dir),
               **classification_summary([i.label for i, _ in known], [r.best_class for _, r in known],
                                        [r.confidence for _, r in known], [r.abstained for _, r in known], classes),
               "unknown": {"n": len(unknown), "folders": sorted(folders - set(classes)),
                           "flagged_rate": round(sum(r.abstained for r in unknown) / len(unknown), 4) if unknown else None},
               # which check refused the known cells the model abstained on (core.reliability.ABSTAIN_KINDS)
               "abstain_kinds": dict(Counter(r.abstain_kind for _, r in known if r.abstained).most_common()),
               "refused": [{"file": f, "error": e} for f, e in refused],
               "folders_matched": renamed,
               "model_id": bundle.model_id}
    metrics["seconds"] = round(time.time() - started, 2)
    return metrics


def print_refused(refused: list[dict], json_path: str | None) -> None:
    """The first few refused files with their reasons; where the rest are, if anywhere."""
    print(f"refused files: {len(refused)} (not counted in n)")
    print_first([f"{row['file']}: {row['error']}" for row in refused],
                rest=f"all in {json_path}" if json_path else "pass --json OUT to list all")


def print_table(metrics: dict, json_path: str | None = None) -> None:
    """Readable summary on stdout; `json_path` is where the full metrics were written, if at all."""
    print(f"panel {metrics['panel']}  n={metrics['n']}  accuracy={metrics['accuracy']}  macro-F1={metrics['macro_f1']}  "
          f"ECE={metrics['ece']}  abstain={metrics['abstain_rate']}  accuracy(answered)={metrics['accuracy_answered']}")
    print_intervals(metrics.get("intervals"))
    if metrics.get("abstain_kinds"):
        print("abstained, by the check that refused: " + ", ".join(f"{k} {n}" for k, n in metrics["abstain_kinds"].items()))
    if metrics.get("macro_f1_with_predicted") not in (None, metrics["macro_f1"]):
        print(f"macro-F1 counting predicted classes absent from DIR: {metrics['macro_f1_with_predicted']}")
    for folder, key in metrics.get("folders_matched", {}).items():
        print(f"folder {folder!r} read as class {key!r}")
    print(f"{'class':<14}{'precision':>10}{'recall':>8}{'f1':>8}{'support':>9}")
    for key, row in metrics["per_class"].items():
        print(f"{key:<14}{row['precision']:>10.3f}{row['recall']:>8.3f}{row['f1']:>8.3f}{row['support']:>9d}")
    unknown = metrics["unknown"]
    if unknown["n"]:
        print(f"unknown cells: n={unknown['n']} ({', '.join(unknown['folders'])}) flagged_rate={unknown['flagged_rate']}")
    if metrics["refused"]:
        print_refused(metrics["refused"], json_path)
    if "attributes" in metrics:
        print_attributes(metrics["attributes"])
    print(f"seconds {metrics['seconds']}")


def print_intervals(intervals: dict | None) -> None:
    """One line: the bootstrap intervals of `training.metrics.bootstrap_intervals`, if any."""
    shown = [f"{name}=[{intervals[name][0]:.3f}, {intervals[name][1]:.3f}]"
             for name in ("accuracy", "macro_f1", "accuracy_answered") if (intervals or {}).get(name)]
    if not shown:
        return
    print(f"{intervals['level']:.0%} intervals ({intervals['method']}, {intervals['resamples']} resamples; images "
          f"of one patient are not independent, so read them as a lower bound on the spread): " + "  ".join(shown))


def check_json_target(path: str) -> None:
    """Raise ValueError unless `path` can be written as a file (its folder created if need be),
    so a run of many minutes does not end in a traceback with nothing written. Only checks:
    nothing is created here, a refused run leaves no folder behind."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"--json {path} is a folder; give a file name")
    if target.exists() and not os.access(target, os.W_OK):
        raise ValueError(f"--json {path} exists and cannot be written")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:  # the nearest part that exists
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--json {path}: {ancestor} is a file, so no folder can be made there")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"--json {path}: the folder {ancestor} cannot be written")


@torch.no_grad()  # in-process callers (tests) keep their grad mode
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.json:  # refuse before the run, not after it
            check_json_target(args.json)
        bundle = load_bundle(args.checkpoint)
        require_panel(bundle.panels, args.panel)
        # the CSV is checked before the run: a header-only or attribute-less CSV is refused at once
        table = read_attribute_csv(args.attributes, args.data, list(bundle.attribute_prototypes),
                                   {item.path for item in scan_class_folders(args.data)}) if args.attributes else None
        metrics = evaluate(bundle, args.data, args.panel, args.batch_size)
        if table is not None:
            metrics["attributes"] = evaluate_attributes(bundle, args.attributes, args.data, args.batch_size, table)
    except (ModelLoadError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    status = 0
    if args.json:  # first: a closed stdout below must not lose the results
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(args.json), json.dumps(metrics, indent=2))  # a full disk leaves no half file
        except OSError as error:  # checked before the run, but a disk can fill: the table still prints
            print(f"error: --json {args.json} could not be written: {error}", file=sys.stderr)
            status, args.json = 2, None
    if args.record:
        record_in_sidecar(args.checkpoint, args.record, metrics, "python -m training.evaluate " + " ".join(sys.argv[1:]))
    try:
        print_table(metrics, args.json)
    except BrokenPipeError:  # e.g. piped into `head`: the results are written, say nothing more
        sys.stdout = open(os.devnull, "w")
    return status


if __name__ == "__main__":
    sys.exit(run_main(main))
