"""Fit the atypical-answer band (`core.typicality`) of a calibrated model and store it in its sidecar.

    python -m training.typicality --checkpoint PATH --val DIR... [--panel NAME...] [--seed 0]

`training.calibrate` fits the band with everything else; this command adds it to a model calibrated
before the band existed, without touching its weights, centroids or thresholds (`update_sidecar`).
Each --val folder is read as calibrate reads it and split into the same two seeded halves: the
band is fitted on the answered images of one half, its accuracies measured on the other. Images go
through the app's describe path (`core.describe.describe_batch`) with the model's stored calibration.
A panel without a fitted, non-degenerate calibration is refused (exit 2), as is a model that does
not load; nothing is written then.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from core.checkpoint import ModelLoadError, load_bundle, load_sidecar, update_sidecar
from core.reliability import is_calibrated
from core.typicality import fit_typicality
from training.calibrate_inputs import val_panels
from training.cli import run_main
from training.evaluate import describe_folder
from training.evaluation_utils import seeded_halves


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--val", nargs="+", required=True, help="validation folders (one panel each)")
    p.add_argument("--panel", nargs="+", default=None, metavar="NAME")
    p.add_argument("--seed", type=int, default=None,
                   help="the seed training.calibrate split val with (default: the one the sidecar records, else 0)")
    return p.parse_args(argv)


def panel_band(bundle, items, panel: str, seed: int) -> dict | None:
    """The band of one panel from its val `items` (calibrate's seeded halves)."""
    described, results, refused = describe_folder(bundle, items, panel, 64)
    if refused:
        raise ValueError(f"{len(refused)} val image(s) of panel {panel} could not be read, so the halves "
                         f"would not be calibrate's; the first: {refused[0][0]}: {refused[0][1]}")
    scores = torch.tensor([r.out_of_scope_score for r in results])
    correct = torch.tensor([r.best_class == item.label for item, r in zip(described, results)])
    answered = torch.tensor([not r.abstained for r in results])
    return fit_typicality(scores, correct, answered, *seeded_halves(len(items), seed))


@torch.no_grad()
def main(argv=None) -> int:
    """Fit every --val panel's band, then store them all (nothing is written when one fails); 0 or 2."""
    args = parse_args(argv)
    try:
        bundle = load_bundle(args.checkpoint)
        val_sets = val_panels(bundle, args)
        for _, panel in val_sets:
            if not is_calibrated(bundle, panel):
                raise ValueError(f"panel {panel} has no fitted, non-degenerate calibration: run training.calibrate")
        recorded = bundle.sidecar["calibration"].get("seed")
        if args.seed is not None and recorded is not None and args.seed != recorded:
            raise ValueError(f"--seed {args.seed}: the model was calibrated with seed {recorded}, whose halves "
                             "the band must use (else its held-out accuracy is partly measured on the fit half)")
        seed = recorded if args.seed is None and recorded is not None else (args.seed or 0)
        bands = {panel: panel_band(bundle, items, panel, seed) for items, panel in val_sets}
    except (ModelLoadError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    calibration = load_sidecar(args.checkpoint)["calibration"]
    for panel, band in bands.items():
        calibration["panels"][panel]["typicality"] = band
        print(panel, json.dumps(band), flush=True)
    update_sidecar(args.checkpoint, {"calibration": calibration})
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
