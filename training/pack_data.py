"""Pack training folders small enough to travel to a lent accelerator (64 MiB in all).

    python -m training.pack_data --data PBC/train B_ALL/train --attributes PBC/attributes_train.csv \
        --out .gpudata [--config hemascribe-regnetx004-96] [--quality 85]

Training decodes every image once to a square of `training_cache_size` pixels (see
training/dataset.py) and never looks at the original pixels again; this writes exactly that
square, as lossy WebP (about 2 KB an image at quality 85, mean absolute error about 2.5 of 255
levels: well below what the augmentation's colour, blur and noise change), so training on the
pack sees what training on the originals sees up to that error. Layout: OUT/<parent>/<folder>/
<class>/<stem>.webp, names kept as they are (``data/pbc/train`` -> ``OUT/pbc/train``); a WBCAtt CSV is
rewritten beside its folder with its paths renamed. Two images of one folder that differ only in
their extension are refused before anything is written; a file that cannot be read is left out and
listed in the manifest (training would refuse it too). OUT/PACKED.json records the sources, their fingerprints and
this command; the exported model's sidecar copies it (training.export_model).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from core.atomic import atomic_write_text
from core.config import load_model_config
from core.data import data_fingerprint, scan_class_folders
from core.preprocess import square_resize
from training.cli import run_main
from training.dataset import training_cache_size
from training.run_inputs import is_new_or_empty_folder

MANIFEST = "PACKED.json"


def packed_path(out: Path, folder: Path, image: Path) -> Path:
    """Where `image` of the class-folder tree `folder` lands in the pack."""
    relative = image.relative_to(folder).with_suffix(".webp")
    return out / folder.parent.name / folder.name / relative


def colliding_names(folder: Path) -> list[str]:
    """Images of `folder` that would land on one packed file (``a.png`` and ``a.jpg``)."""
    seen: dict[Path, Path] = {}
    clashes = []
    for item in scan_class_folders(folder):
        target = packed_path(Path("."), folder, item.path)
        if target in seen:
            clashes.append(f"{seen[target]} and {item.path}")
        seen.setdefault(target, item.path)
    return clashes


def pack_folder(folder: Path, out: Path, size: int, quality: int) -> dict:
    """Write every image of `folder` as a size x size WebP; the source's count, fingerprint and
    the files that could not be read."""
    items = scan_class_folders(folder)
    unreadable = []
    for item in tqdm(items, desc=f"pack {folder}", unit="img", mininterval=5):
        target = packed_path(out, folder, item.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with Image.open(item.path) as image:
                square_resize(image, size).save(target, "WEBP", quality=quality, method=6)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            unreadable.append(f"{item.path}: {error}")
    return {"folder": str(folder), "images": len(items) - len(unreadable), "unreadable": unreadable,
            "data_sha256": data_fingerprint(items, folder)}


def pack_attributes(csv_path: Path, out: Path) -> Path:
    """Copy a WBCAtt CSV beside its packed folders (paths relative to the CSV's folder, as read
    by training), with each image path renamed to its .webp."""
    target = out / csv_path.parent.name / csv_path.name
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [{**row, "path": str(Path(row["path"]).with_suffix(".webp"))} for row in reader]
        fields = reader.fieldnames or ["path"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return target


def packed_provenance(folders: list[str]) -> dict | None:
    """The PACKED.json of the pack that the training folders come from (two levels up), or None."""
    for folder in folders:
        manifest = Path(folder).resolve().parent.parent / MANIFEST
        if manifest.is_file():
            return json.loads(manifest.read_text())
    return None


def main(argv=None) -> int:
    """Pack the folders (see the module docstring); 2 with one line for a missing input."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", required=True, help="class-folder trees to pack")
    p.add_argument("--attributes", nargs="*", default=[], help="WBCAtt CSVs to rewrite beside them")
    p.add_argument("--out", required=True, help="pack folder (new or empty)")
    p.add_argument("--config", default="hemascribe-regnetx004-96", help="model config: sets the packed size")
    p.add_argument("--quality", type=int, default=85, help="WebP quality (0-100)")
    args = p.parse_args(argv)
    out = Path(args.out)
    missing = [f for f in args.data if not Path(f).is_dir()] + [c for c in args.attributes if not Path(c).is_file()]
    if missing:
        print(f"error: no such folder or file: {', '.join(missing)}", file=sys.stderr)
        return 2
    if not is_new_or_empty_folder(out):
        print(f"error: {out} is not an empty folder: pack into a new one", file=sys.stderr)
        return 2
    clashes = [clash for folder in args.data for clash in colliding_names(Path(folder))]
    if clashes:
        print(f"error: {len(clashes)} pair(s) of images would share one packed name, e.g. {clashes[0]}",
              file=sys.stderr)
        return 2
    size = training_cache_size(load_model_config(args.config))
    sources = [pack_folder(Path(f), out, size, args.quality) for f in args.data]
    csvs = [str(pack_attributes(Path(c), out)) for c in args.attributes]
    manifest = {"command": "python -m training.pack_data " + " ".join(sys.argv[1:] if argv is None else argv),
                "size": size, "format": "webp", "quality": args.quality, "sources": sources, "attributes": csvs}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    unreadable = sum(len(s["unreadable"]) for s in sources)
    print(f"packed {sum(s['images'] for s in sources)} images at {size} px into {out} ({total / 2**20:.1f} MiB)"
          + (f"; {unreadable} unreadable file(s) left out, listed in {MANIFEST}" if unreadable else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
