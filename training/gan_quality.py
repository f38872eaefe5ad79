"""How good are a GAN's synthetic cells? Class fidelity and a Frechet distance.

    python -m training.gan_quality --checkpoint runs/gan64/gan.safetensors \
        --classifier assets/model/hemascribe_default.safetensors \
        --real PBC/val [--n 200] [--json runs/gan64/quality.json]

* Fidelity: n images per class are generated (upsampled to 224 px like gan_sample) and
  described by our classifier against --panel, else the panel holding the most of the GAN's
  classes (training.evaluate's rule, `core.panels.infer_panel`: a tie is one line and exit
  status 2 until --panel names one; with no panel holding any, no fidelity is scored); fidelity
  is the share whose ``best_class`` is the class asked for (abstentions still have a best
  class, and the abstain rate is reported beside it).
* Frechet distance between generated and real images (REAL/<class>) in the embedding
  space of *our* image encoder, unit-normalised (the space where the classifier compares
  cosines), NOT Inception FID: its numbers are not comparable with published FIDs. The
  same distance between two disjoint halves of the real images is reported as the floor
  to compare with; both use the same sample size, because the estimate is biased upwards
  for small samples (a few hundred images against 256 dimensions).
Use held-out real images (the val split), not the GAN's own training images.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from core.checkpoint import ModelLoadError, load_bundle
from core.data import is_image_file
from core.describe import describe_batch, embed_images
from core.gan import generate, to_pil
from core.gan_checkpoint import load_gan
from core.imageio import ImageRejected, load_image_path
from core.panels import infer_panel, require_panel
from training.cli import run_main

NOTE = ("Frechet distance in the HemaScribe image encoder's unit-normalised embedding space, NOT Inception FID; "
        "compare it only with frechet_real_vs_real (same encoder, same sample size).")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="GAN weights (gan.safetensors)")
    p.add_argument("--classifier", required=True, help="HemaScribe model (.safetensors, sidecar beside it)")
    p.add_argument("--real", required=True, help="folder with a subfolder per class (held-out images)")
    p.add_argument("--n", type=int, default=200, help="generated images per class")
    p.add_argument("--panel", default=None,
                   help="panel (default: the one holding the most of the GAN's classes; a tie is refused)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    return p.parse_args(argv)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64 via
    symmetric eigendecompositions (no scipy; stable for rank-deficient covariances)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * middle)


def embed(bundle, images, batch_size: int) -> torch.Tensor:
    """Unit-norm image embeddings (N, D) of PIL images, in batches."""
    chunks = [embed_images(bundle, images[i:i + batch_size])[0] for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, bundle.model.config.embed_dim)


def real_images(folder: Path, n: int, seed: int) -> list:
    """Up to n readable images of a class folder, a seeded random choice."""
    paths = sorted(p for p in folder.rglob("*") if is_image_file(p))
    random.Random(seed).shuffle(paths)
    images = []
    for path in paths:
        if len(images) == n:
            break
        try:
            images.append(load_image_path(path).image)
        except ImageRejected:
            continue
    return images


def assess_class(gan, bundle, panel: str | None, name: str, args) -> tuple[dict, torch.Tensor, tuple]:
    """Metrics of one class, its generated embeddings and its two real halves' embeddings."""
    generated = to_pil(generate(gan.generator, gan.label(name), args.n, args.seed), 224)
    row = {"n_generated": len(generated), "fidelity": None, "abstain_rate": None}
    if panel and name in bundle.panels[panel].keys:
        results = [r for i in range(0, len(generated), args.batch_size)
                   for r in describe_batch(bundle, generated[i:i + args.batch_size], panel)]
        row["fidelity"] = round(sum(r.best_class == name for r in results) / len(results), 4)
        row["abstain_rate"] = round(sum(r.abstained for r in results) / len(results), 4)
        row["predicted"] = {k: sum(r.best_class == k for r in results) for k in bundle.panels[panel].keys}
    fake = embed(bundle, generated, args.batch_size)
    folder = Path(args.real) / name
    real = embed(bundle, real_images(folder, 2 * args.n, args.seed), args.batch_size) if folder.is_dir() else fake[:0]
    m = min(args.n, len(real) // 2)  # same sample size for both distances
    row.update(n_real=m, frechet=None, frechet_real_vs_real=None)
    if m >= 2:
        row["frechet"] = round(frechet_distance(fake[:m], real[:m]), 4)
        row["frechet_real_vs_real"] = round(frechet_distance(real[:m], real[m:2 * m]), 4)
    return row, fake[:m], (real[:m], real[m:2 * m])


def assess(gan, bundle, args) -> dict:
    """Per-class and pooled metrics as one JSON-ready dict."""
    panel = args.panel or infer_panel(bundle.panels, set(gan.classes), "GAN's classes")  # a tie: PanelTieError
    per_class, fakes, halves_a, halves_b = {}, [], [], []
    for name in gan.classes:
        row, fake, (real_a, real_b) = assess_class(gan, bundle, panel, name, args)
        per_class[name] = row
        fakes.append(fake)
        halves_a.append(real_a)
        halves_b.append(real_b)
    fake, real_a, real_b = torch.cat(fakes), torch.cat(halves_a), torch.cat(halves_b)
    scored = [r for r in per_class.values() if r["fidelity"] is not None]
    overall = {"fidelity": round(sum(r["fidelity"] for r in scored) / len(scored), 4) if scored else None,
               "abstain_rate": round(sum(r["abstain_rate"] for r in scored) / len(scored), 4) if scored else None,
               "frechet": round(frechet_distance(fake, real_a), 4) if len(fake) >= 2 else None,
               "frechet_real_vs_real": round(frechet_distance(real_a, real_b), 4) if len(real_a) >= 2 else None}
    return {"note": NOTE, "embedding": "encode_image, unit-normalised", "panel": panel,
            "gan": str(gan.path), "gan_sha256": gan.sha256, "gan_step": gan.sidecar.get("step"),
            "classifier": str(bundle.path), "classifier_model_id": bundle.model_id, "real": str(args.real),
            "n_per_class": args.n, "seed": args.seed, "per_class": per_class, "overall": overall}


def print_table(result: dict) -> None:
    """Readable summary; repeats that the distance is not Inception FID."""
    def fmt(value, width):
        return f"{value:>{width}.3f}" if isinstance(value, float) else f"{'-':>{width}}"

    print(f"GAN {Path(result['gan']).name} step {result['gan_step']}  classifier {result['classifier_model_id']}  "
          f"panel {result['panel']}")
    print(f"{'class':<14}{'fidelity':>9}{'abstain':>9}{'frechet':>10}{'real/real':>11}{'n_real':>8}")
    rows = list(result["per_class"].items()) + [("ALL (pooled)", {**result["overall"], "n_real": None})]
    for name, r in rows:
        n_real = f"{r['n_real']:>8d}" if isinstance(r.get("n_real"), int) else f"{'':>8}"
        print(f"{name:<14}{fmt(r['fidelity'], 9)}{fmt(r['abstain_rate'], 9)}{fmt(r['frechet'], 10)}"
              f"{fmt(r['frechet_real_vs_real'], 11)}{n_real}")
    print(NOTE)


@torch.no_grad()  # in-process callers (tests) keep their grad mode
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        gan, bundle = load_gan(args.checkpoint), load_bundle(args.classifier)
        require_panel(bundle.panels, args.panel)
        result = assess(gan, bundle, args)
    except (ModelLoadError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_table(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
