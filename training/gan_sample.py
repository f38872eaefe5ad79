"""Write synthetic images of one class from a trained GAN, ready for ``--synthetic``.

    python -m training.gan_sample --checkpoint runs/gan64/gan.safetensors \
        --class basophil --n 500 --out runs/synthetic [--seed 0] [--size 224]

Images go to OUT/<class>/synthetic_<class>_<i>.png (the class-folder layout, so
``python -m training.train ... --balance gan --synthetic OUT`` reads them), upsampled
(bicubic) to --size so they pass through the same preprocessing as the 224 px PBC images.
Every PNG carries text metadata ``synthetic=true`` and ``generator=<weights sha256>`` (plus
class, seed, index), and OUT/<class>/synthetic.json records how the folder was made.
Earlier ``synthetic_<class>_*.png`` files of that folder are removed first, so a folder
never mixes two generations.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from core.checkpoint import ModelLoadError
from core.gan import generate, to_pil
from core.gan_checkpoint import load_gan
from training.cli import run_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="gan.safetensors (gan.json beside it)")
    p.add_argument("--class", dest="class_name", required=True, help="class folder name known to the GAN")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--out", required=True, help="root folder; images go to OUT/<class>/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224, help="side of the written images")
    p.add_argument("--batch-size", type=int, default=64)
    return p.parse_args(argv)


def png_metadata(sha256: str, class_name: str, seed: int, index: int) -> PngInfo:
    """The text chunks that mark a file as synthetic and name the generator weights."""
    info = PngInfo()
    for key, value in (("synthetic", "true"), ("generator", sha256), ("class", class_name),
                       ("seed", str(seed)), ("index", str(index))):
        info.add_text(key, value)
    return info


def write_class(checkpoint: str, class_name: str, n: int, out: Path | str, seed: int = 0,
                size: int = 224, batch_size: int = 64) -> list[Path]:
    """Generate and write n images of `class_name`; returns their paths."""
    gan = load_gan(checkpoint)
    label = gan.label(class_name)
    folder = Path(out) / class_name
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"synthetic_{class_name}_*.png"):
        stale.unlink()
    paths = []
    for start in range(0, n, batch_size):
        # seeded per batch: the same checkpoint, n, seed and batch size give the same files
        images = generate(gan.generator, label, min(batch_size, n - start), seed * 1_000_003 + start)
        for offset, image in enumerate(to_pil(images, size)):
            i = start + offset
            path = folder / f"synthetic_{class_name}_{i}.png"
            image.save(path, pnginfo=png_metadata(gan.sha256, class_name, seed, i))
            paths.append(path)
    record = {"synthetic": True, "generator_sha256": gan.sha256, "checkpoint": str(Path(checkpoint).resolve()),
              "gan_step": gan.sidecar.get("step"), "gan_data": gan.sidecar.get("data", {}),
              "class": class_name, "n": n, "seed": seed, "size": size}
    (folder / "synthetic.json").write_text(json.dumps(record, indent=2))
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        paths = write_class(args.checkpoint, args.class_name, args.n, args.out, args.seed, args.size, args.batch_size)
    except (ModelLoadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} synthetic {args.class_name} images to {Path(args.out) / args.class_name}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
