"""Benchmark the describing process on this machine (prints numbers, asserts nothing).

    python -m training.benchmark [--model PATH] [--images DIR] [--runs 50]

Measures: import time and model load (sha256 check + build + weights) side by side, with their
sum (a cold start), describe latency for one image (median and nearest-rank p95, model loaded),
batch throughput (images/s) and the peak resident memory of this process. Images: files from
--images (first 64) or drawn test images. A model that does not load (missing, tampered: sha256
mismatch) is refused with one line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
import torch  # noqa: E402

from core.checkpoint import load_bundle  # noqa: E402
from core.describe import describe, describe_batch  # noqa: E402
from core.settings import load_settings  # noqa: E402
from training.bench_common import P95_RULE, REFUSED, nearest_rank, refuse_model  # noqa: E402
from training.cli import positive_int, run_main  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - T0


def _images(folder: str | None, n: int):
    """`n` images to time: the first loadable ones of `folder` (through the product's loader, as
    an upload is), or seeded noise without one. ValueError when the folder has none."""
    from PIL import Image

    if folder:
        from core.data import scan_class_folders
        from core.imageio import ImageRejected, load_image_path

        if not Path(folder).is_dir():
            raise ValueError(f"--images {folder}: not a folder (expected a folder of class folders)")
        images = []
        for item in scan_class_folders(folder):
            try:
                images.append(load_image_path(item.path).image)
            except ImageRejected as error:
                print(f"skipped: {error}", file=sys.stderr)
            if len(images) == n:
                break
        if not images:
            raise ValueError(f"--images {folder}: no loadable image in its class folders")
        return images
    import numpy as np

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)) for _ in range(n)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--images", default=None, help="folder of class folders (optional)")
    parser.add_argument("--runs", type=positive_int, default=50)
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        settings = load_settings()  # also with --model: describing reads the upload limits
        bundle = load_bundle(args.model or settings.model_path)
    except REFUSED as error:
        return refuse_model(error)
    load_seconds = time.perf_counter() - started
    images = _images(args.images, 64)
    describe(bundle, images[0])  # warm-up
    latencies = []
    for i in range(args.runs):
        t = time.perf_counter()
        describe(bundle, images[i % len(images)])
        latencies.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    batches = 4
    for _ in range(batches):
        describe_batch(bundle, images)
    throughput = batches * len(images) / (time.perf_counter() - t)
    report = {"model_id": bundle.model_id, "threads": args.threads, "import_seconds": round(IMPORT_SECONDS, 2),
              "model_load_seconds": round(load_seconds, 3),
              "cold_start_seconds (imports + model load)": round(IMPORT_SECONDS + load_seconds, 2),
              "describe_ms_median": round(statistics.median(latencies), 1),
              "describe_ms_p95": round(nearest_rank(latencies), 1), "p95_rule": P95_RULE,
              "batch_images_per_second": round(throughput, 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
