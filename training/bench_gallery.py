"""Benchmark the atlas gallery on this machine (prints numbers, asserts nothing).

    python -m training.bench_gallery [--model PATH | --config NAME] [--n 20000]
                                     [--images DIR --limit 500] [--queries 50] [--threads 1]

Builds an index of --n rows: random unit vectors, or real images embedded from --images
(first --limit files, recursive) padded with random vectors up to --n. Writes it to a
temporary folder and measures: loading it from disk, a text query (text encoding + search;
median and p95 over --queries different queries), the matrix search alone, and an image
query (image embedding + search), with the import time beside the model load (a cold start is
both). p95 is the nearest rank (see training.bench_common). Target: <= 200 ms per query. Without
a trained model file, --config builds the architecture with random weights: the timings are the
same. A model file that does not load (tampered: sha256 mismatch) is refused with one line and
exit status 2.
"""
from __future__ import annotations

import argparse
import os
import json
import statistics
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from core.checkpoint import ModelBundle, load_bundle  # noqa: E402
from core.gallery import (GalleryIndex, GalleryItem, load_index, save_index, search_image,  # noqa: E402
                          search_text, update_index)
from core.gallery_sources import FOLDER, scan_folder  # noqa: E402
from core.settings import load_settings  # noqa: E402
from training.bench_common import P95_RULE, REFUSED, nearest_rank, refuse_model  # noqa: E402
from training.cli import non_negative_int, positive_int, run_main  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - T0

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
TARGET_MS = 200.0
_SHAPES = ["round", "bilobed", "segmented", "kidney-shaped", "folded", "eccentric", "band-shaped"]
_COLOURS = ["orange", "purple-black", "pale pink", "blue-grey", "azurophilic", "red"]


def _queries(n: int) -> list[str]:
    """n different free-text queries (no two alike, so no cache could help)."""
    out = [f"cell with a {s} nucleus and {c} granules" for s in _SHAPES for c in _COLOURS]
    out += [f"large cell with a {s} nucleus and {c} cytoplasm, query {i}" for i, (s, c)
            in enumerate((s, c) for s in _SHAPES for c in _COLOURS)]
    return out[:n]


def _bundle(args) -> tuple[ModelBundle, str]:
    settings = load_settings()  # also with --model: loading images reads the upload limits
    path = Path(args.model or settings.model_path)
    if path.is_file() and not args.config:
        return load_bundle(path), str(path)
    from core.config import load_model_config
    from core.model import DualEncoder

    config = args.config or "hemascribe-regnetx004-128"
    model = DualEncoder(load_model_config(config)).eval()
    return ModelBundle(model, {"model_id": f"{config}-random", "weights_sha256": "0" * 64}, {}, {}), \
        f"{config} (random weights: {path} not found or --config given)"


def _pad(index: GalleryIndex, n: int, dim: int, seed: int = 0) -> GalleryIndex:
    """Add random unit rows (synthetic items) until the index has n rows."""
    extra = max(0, n - len(index))
    generator = torch.Generator().manual_seed(seed)
    rows = F.normalize(torch.randn(extra, dim, generator=generator), dim=-1)
    items = tuple(GalleryItem(f"/synthetic/{i:06d}.png", f"0:{i}", 0, 0, None, FOLDER, False, f"synthetic/{i}.png")
                  for i in range(extra))
    base = index.embeddings if len(index) else torch.zeros(0, dim)
    return GalleryIndex(index.items + items, torch.cat([base, rows]), index.weights_sha256, index.skipped, time.time())


def _stats(samples: list[float]) -> dict:
    return {"median": round(statistics.median(samples), 2), "p95": round(nearest_rank(samples), 2)}


def _timed(function, runs: int) -> list[float]:
    out = []
    for i in range(runs):
        started = time.perf_counter()
        function(i)
        out.append((time.perf_counter() - started) * 1000)
    return out


def _build(bundle: ModelBundle, args, folder: Path) -> tuple[GalleryIndex, dict, list[Image.Image]]:
    """The index (real images first, if any), embedding timings, and query images."""
    info, images = {}, []
    index = GalleryIndex((), torch.zeros(0, bundle.model.config.embed_dim), bundle.weights_sha256)
    if args.images:
        sources = scan_folder(args.images)[:args.limit]
        started = time.perf_counter()
        index = update_index(bundle, folder / "real", sources)
        seconds = time.perf_counter() - started
        if not len(index):  # else the benchmark would time noise and call it the gallery
            raise ValueError(f"--images {args.images}: no loadable image there ({len(index.skipped)} refused)")
        info = {"real_images": len(index), "refused": len(index.skipped), "embed_seconds": round(seconds, 1),
                "embed_images_per_second": round(len(index) / max(seconds, 1e-9), 1)}
        images = [Image.open(item.path).convert("RGB") for item in index.items[:args.queries]]
    if not images:
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(8)]
    return _pad(index, args.n, bundle.model.config.embed_dim), info, images


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="weights file (default: the HEMASCRIBE_MODEL setting)")
    parser.add_argument("--config", default=None, help="model config for random weights (no trained model needed)")
    parser.add_argument("--n", type=positive_int, default=20000, help="rows in the index")
    parser.add_argument("--images", default=None, help="folder of real images to embed (recursive)")
    parser.add_argument("--limit", type=non_negative_int, default=500, help="at most this many real images")
    parser.add_argument("--queries", type=positive_int, default=50)
    parser.add_argument("--k", type=positive_int, default=12)
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (the app uses 1 per session)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        bundle, model_text = _bundle(args)
    except REFUSED as error:
        return refuse_model(error)
    load_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        index, info, images = _build(bundle, args, Path(tmp))
        started = time.perf_counter()
        save_index(Path(tmp) / "bench", index)
        write_ms = (time.perf_counter() - started) * 1000
        load_ms = _timed(lambda _: load_index(Path(tmp) / "bench", index.weights_sha256), 5)
        size_mb = sum(p.stat().st_size for p in (Path(tmp) / "bench").iterdir()) / 2**20
    started = time.perf_counter()
    search_text(bundle, index, "warm-up: loads the text model", args.k)
    first_text_ms = (time.perf_counter() - started) * 1000
    queries = _queries(args.queries)
    text_ms = _timed(lambda i: search_text(bundle, index, queries[i % len(queries)], args.k), args.queries)
    vectors = F.normalize(torch.randn(args.queries, index.embeddings.shape[1]), dim=-1)
    matrix_ms = _timed(lambda i: index.nearest(vectors[i], args.k), args.queries)
    search_image(bundle, index, images[0], args.k)  # warm-up
    image_ms = _timed(lambda i: search_image(bundle, index, images[i % len(images)], args.k), args.queries)
    report = {"model": model_text, "import_seconds": round(IMPORT_SECONDS, 2),
              "model_load_seconds": round(load_seconds, 3), "p95_rule": P95_RULE,
              "threads": args.threads, "rows": len(index),
              "dim": int(index.embeddings.shape[1]), **info,
              "index_on_disk_mb": round(size_mb, 1), "index_write_ms": round(write_ms, 1),
              "index_load_ms": _stats(load_ms), "first_text_query_ms (loads the text model)": round(first_text_ms),
              "text_query_ms (encode + search)": _stats(text_ms), "matrix_search_ms": _stats(matrix_ms),
              "image_query_ms (embed + search)": _stats(image_ms)}
    print(json.dumps(report, indent=2))
    worst = max(_stats(text_ms)["p95"], _stats(image_ms)["p95"])
    print(f"target <= {TARGET_MS:.0f} ms per query: {'met' if worst <= TARGET_MS else 'NOT met'} "
          f"(worst p95 {worst:.1f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
