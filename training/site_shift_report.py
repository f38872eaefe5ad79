"""How often the batch-level lab check (`core.site_shift`) warns, on home and other-lab images, and
how many answers the atypical-answer note (`core.typicality`) marks there.

    python -m training.site_shift_report --checkpoint PATH --home PBC/val [--other bccd_wbc] \
        [--panel blood_cells] [--sizes 5 10 20 50] [--draws 2000] [--json OUT]

Every image of each folder tree is described once; then `--draws` random batches of each size
are drawn (without replacement within a batch, seeded) and the check is applied to each. Printed:
the share of home batches it warns on (false alarms: the home val was partly used to fit the
out-of-scope threshold, so this is optimistic) and of other-lab batches (detections), with the
out-of-scope share of each set and the accuracy of the answers the model gave on each.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from core.atomic import atomic_write_text
from core.checkpoint import ModelLoadError, load_bundle
from core.data import scan_class_folders
from core.panels import require_panel
from core.site_shift import batch_shift, home_out_of_scope_rate
from training.cli import positive_int, run_main
from training.evaluate import check_json_target, describe_folder, match_folders


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--home", required=True, help="class folders from the training lab (e.g. its val split)")
    p.add_argument("--other", default=None, help="class folders from another lab (none: false alarms only)")
    p.add_argument("--panel", default="blood_cells")
    p.add_argument("--sizes", nargs="+", type=positive_int, default=[5, 10, 20, 50])
    p.add_argument("--draws", type=positive_int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def abstain_kinds_and_answers(bundle, folder: str, panel: str) -> tuple[list, list[bool], list[bool | None]]:
    """Per image: the abstain kind (None when answered); per answer: whether it was right and
    whether it was atypical (`core.typicality`; None without a fitted band)."""
    items, _ = match_folders(bundle, scan_class_folders(folder))
    described, results, _ = describe_folder(bundle, items, panel, 64)
    if not results:
        raise ValueError(f"no image under {folder} could be described (expected one sub-folder per class)")
    kinds = [r.abstain_kind for r in results]
    answers = [(item, r) for item, r in zip(described, results) if not r.abstained]
    right = [r.class_key == item.label for item, r in answers]
    atypical = [r.atypical for _, r in answers]
    return kinds, right, atypical


def typicality_summary(right: list[bool], atypical: list[bool | None]) -> dict:
    """Share of the answers flagged atypical and the accuracy of both groups (None where empty)."""
    if not right or atypical[0] is None:
        return {}
    flagged = [r for r, a in zip(right, atypical) if a]
    rest = [r for r, a in zip(right, atypical) if not a]
    return {"atypical_share_of_answers": round(len(flagged) / len(right), 4),
            "accuracy_atypical": round(sum(flagged) / len(flagged), 4) if flagged else None,
            "accuracy_typical": round(sum(rest) / len(rest), 4) if rest else None}


def warning_rate(kinds: list, home_rate: float, size: int, draws: int, rng: np.random.Generator) -> float | None:
    """Share of `draws` random batches of `size` images on which the check warns."""
    if len(kinds) < size:
        return None
    warned = sum(batch_shift([kinds[i] for i in rng.choice(len(kinds), size, replace=False)], home_rate) is not None
                 for _ in range(draws))
    return round(warned / draws, 4)


@torch.no_grad()
def main(argv=None) -> int:
    """Describe both folder trees, draw the batches, print (and with --json write) the rates; 2 on a
    model, panel or folder that cannot give a result."""
    args = parse_args(argv)
    try:
        if args.json:  # refused before the run, not after it
            check_json_target(args.json)
        bundle = load_bundle(args.checkpoint)
        require_panel(bundle.panels, args.panel)
    except (ModelLoadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    home_rate = home_out_of_scope_rate(bundle.sidecar, args.panel)
    if home_rate is None:
        print(f"error: panel {args.panel} has no fitted out-of-scope threshold (run training.calibrate)",
              file=sys.stderr)
        return 2
    report = {"panel": args.panel, "home_rate": home_rate, "draws": args.draws, "sets": {}}
    for role, folder in (("home", args.home), ("other", args.other)) if args.other else (("home", args.home),):
        try:
            kinds, right, atypical = abstain_kinds_and_answers(bundle, folder, args.panel)
        except (ValueError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        rng = np.random.default_rng(args.seed)
        report["sets"][role] = {
            "folder": folder, "n": len(kinds),
            "out_of_scope_share": round(sum(k == "out_of_scope" for k in kinds) / len(kinds), 4),
            "answered": len(right), "accuracy_answered": round(sum(right) / len(right), 4) if right else None,
            "warning_rate": {str(size): warning_rate(kinds, home_rate, size, args.draws, rng) for size in args.sizes},
            **typicality_summary(right, atypical)}
        row = report["sets"][role]
        print(f"{role:6s} {folder}: n={row['n']} out-of-scope {row['out_of_scope_share']:.3f}, answered "
              f"{row['answered']} ({row['accuracy_answered']} right); warns on batches of "
              + ", ".join(f"{size}: {rate}" for size, rate in row["warning_rate"].items()))
        if "atypical_share_of_answers" in row:
            print(f"       answers marked atypical: {row['atypical_share_of_answers']:.3f} (right "
                  f"{row['accuracy_atypical']}; the others {row['accuracy_typical']})")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
