"""Which trunk stage gives Grad-CAM maps that point at the cell and depend on the sentence?

    python -m training.gradcam_check --checkpoint assets/model/hemascribe_default.safetensors --data PBC/val

PBC crops centre the cell, so for each stage this prints (1) the share of the map's mass inside
the central disc (radius 0.3 of the side; a uniform map scores the disc's area share) and (2) the
correlation between the map for the true class's sentence and the map for the runner-up sentence
(near 1: the map does not depend on the sentence). Used to choose `core.explain.CAM_STAGE`.
"""
from __future__ import annotations

import argparse
import random

import numpy as np
from PIL import Image

from core.checkpoint import load_bundle
from core.data import scan_class_folders
from core.describe import embed_images
from core.explain import gradcam_heatmap
from training.cli import run_main


def centre_disc(size: int, radius_share: float = 0.3) -> np.ndarray:
    """Boolean (size, size) mask of the central disc."""
    yy, xx = np.mgrid[:size, :size]
    centre = (size - 1) / 2
    return ((yy - centre) ** 2 + (xx - centre) ** 2) <= (radius_share * size) ** 2


def stage_scores(bundle, stage: int, items, prototypes, keys) -> tuple[float, float]:
    """(mean centre share, mean true-vs-runner-up map correlation) of one trunk stage, with the
    app's own Grad-CAM (`core.explain.gradcam_heatmap`)."""
    disc, shares, correlations = centre_disc(bundle.model.config.image_size), [], []
    for item in items:
        with Image.open(item.path) as opened:
            image = opened.convert("RGB")
        true = keys.index(item.label)
        similarity = embed_images(bundle, [image])[0][0] @ prototypes.T
        similarity[true] = -float("inf")
        maps = [gradcam_heatmap(bundle, image, prototypes[k], stage) for k in (true, int(similarity.argmax()))]
        shares.append(maps[0][disc].sum() / max(maps[0].sum(), 1e-8))
        if maps[0].std() > 0 and maps[1].std() > 0:
            correlations.append(np.corrcoef(maps[0].ravel(), maps[1].ravel())[0, 1])
    return float(np.mean(shares)), float(np.mean(correlations)) if correlations else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="folder of class folders with centred single cells")
    p.add_argument("--panel", default="blood_cells")
    p.add_argument("--n", type=int, default=200, help="images, drawn with a fixed seed")
    args = p.parse_args(argv)
    bundle = load_bundle(args.checkpoint)
    keys = [c.key for c in bundle.panels[args.panel].classes]
    items = [i for i in scan_class_folders(args.data) if i.label in keys]
    random.Random(0).shuffle(items)
    items = items[:args.n]
    prototypes = bundle.prototypes[args.panel]
    print(f"{len(items)} images; a uniform map puts {centre_disc(bundle.model.config.image_size).mean():.3f} "
          "of its mass in the centre disc")
    for stage in range(-1, -len(bundle.model.visual.trunk.feature_info), -1):
        share, correlation = stage_scores(bundle, stage, items, prototypes, keys)
        name = bundle.model.visual.trunk.feature_info[stage]["module"]
        print(f"stage {stage} ({name}): centre share {share:.3f}, true-vs-runner-up correlation {correlation:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
