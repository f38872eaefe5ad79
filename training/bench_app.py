"""Latency of the app's own path, from raw uploaded bytes to what the clinician sees.

    python -m training.bench_app [--model PATH] [--runs 20] [--image FILE] [--threads N]

Loads the model exactly as the app does (`load_bundle` on the configured checkpoint), then
times, per image:
  describe path  = load_image_bytes + describe + store write (image copy + rows, one
                   transaction, into a temporary SQLite file)       target: <= 1 s
  explain path   = describe path + Grad-CAM of the described sentence + overlay
                                                                    target: <= 2 s
Each run uses new bytes (a synthetic JPEG with another seed, like a new upload), so every
store write is a real insert. Without --image the image is synthetic at PBC size
(360 x 363); with --image the same file is re-encoded per run at another JPEG quality.
Prints the import time beside the model load time (a cold start pays both), medians, p95 (the
nearest rank, see training.bench_common) and per-stage medians; exit status 1 when a target is
missed, 2 when the model does not load (missing, tampered: sha256 mismatch), with one line.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from core.checkpoint import load_bundle  # noqa: E402
from core.describe import default_panel, describe  # noqa: E402
from core.explain import class_heatmap, overlay  # noqa: E402
from core.imageio import load_image_bytes  # noqa: E402
from core.settings import load_settings  # noqa: E402
from core.store import make_engine, make_sessionmaker  # noqa: E402
from training.bench_common import P95_RULE, REFUSED, nearest_rank, refuse_model  # noqa: E402
from training.cli import run_main  # noqa: E402
from ui.recording import record_prediction  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - T0

TARGET_DESCRIBE_S = 1.0
TARGET_EXPLAIN_S = 2.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time the app's describe and explain paths.")
    parser.add_argument("--model", default=None, help="weights file (default: the HEMASCRIBE_MODEL setting)")
    parser.add_argument("--panel", default=None, help="panel (default: the model's first validated panel)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per path (after 2 warm-up runs)")
    parser.add_argument("--image", default=None, help="an image file to upload (default: a synthetic cell)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser.parse_args(argv)


def synthetic_upload(seed: int, source: Image.Image | None) -> bytes:
    """JPEG bytes that differ per seed: a drawn cell, or `source` at another quality."""
    if source is not None:
        image = source
    else:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:363, :360]
        cy, cx = 181 + rng.integers(-20, 21), 180 + rng.integers(-20, 21)
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        pixels = np.empty((363, 360, 3), np.float32)
        pixels[:] = (235, 200, 205)
        pixels[r2 < 90 ** 2] = (200, 170, 210)
        pixels[r2 < 45 ** 2] = (90, 40, 120)
        image = Image.fromarray(np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=70 + seed % 30)
    return buffer.getvalue()


def one_run(bundle, panel: str, make_session, upload_dir: Path, data: bytes, explain: bool) -> dict[str, float]:
    """Seconds per stage for one upload (the 'total' key is the wall time of the path)."""
    times: dict[str, float] = {}
    start = last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        times[name], last = now - last, now

    loaded = load_image_bytes(data, "upload.jpg")
    lap("load")
    result = describe(bundle, loaded.image, panel)
    lap("describe")
    record_prediction(make_session, upload_dir, data, loaded, result)
    lap("store")
    if explain:
        heatmap = class_heatmap(bundle, loaded.image, panel, result.class_key or result.best_class)
        lap("gradcam")
        overlay(loaded.image, heatmap, 0.5).save(io.BytesIO(), format="PNG")  # as st.image sends it
        lap("overlay")
    times["total"] = time.perf_counter() - start
    return times


def summarise(runs: list[dict[str, float]]) -> dict:
    """Median and p95 (nearest rank) of the total, and the median of every stage, in milliseconds."""
    totals = [r["total"] for r in runs]
    p95 = nearest_rank(totals)
    stages = {k: round(statistics.median(r[k] for r in runs) * 1000, 1) for k in runs[0] if k != "total"}
    return {"median_ms": round(statistics.median(totals) * 1000, 1), "p95_ms": round(p95 * 1000, 1),
            "stages_median_ms": stages, "runs": len(runs)}


def bench(args: argparse.Namespace) -> dict:
    """Load the model like the app, then time both paths; returns the summary dict."""
    settings = load_settings()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bundle = load_bundle(args.model or settings.model_path, settings.text_model)
    load_s = time.perf_counter() - t0
    panel = args.panel or default_panel(bundle)
    source = Image.open(args.image).convert("RGB") if args.image else None
    with tempfile.TemporaryDirectory(prefix="hemascribe-bench-") as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'bench.sqlite'}")
        make_session = make_sessionmaker(engine)
        try:
            seed = 0
            results = {}
            for path, explain in (("describe", False), ("explain", True)):
                runs = []
                for i in range(args.runs + 2):  # two warm-up runs, not counted
                    seed += 1
                    data = synthetic_upload(seed, source)
                    timing = one_run(bundle, panel, make_session, Path(tmp) / "uploads", data, explain)
                    if i >= 2:
                        runs.append(timing)
                results[path] = summarise(runs)
        finally:
            engine.dispose()
    return {"model_id": bundle.model_id, "panel": panel, "image_size": bundle.model.config.image_size,
            "threads": torch.get_num_threads(), "import_ms": round(IMPORT_SECONDS * 1000, 1),
            "model_load_ms": round(load_s * 1000, 1), "p95_rule": P95_RULE, **results}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = bench(args)
    except REFUSED as error:
        return refuse_model(error)
    ok = (summary["describe"]["p95_ms"] <= TARGET_DESCRIBE_S * 1000
          and summary["explain"]["p95_ms"] <= TARGET_EXPLAIN_S * 1000)
    if args.json:
        print(json.dumps(dict(summary, targets_met=ok)))
        return 0 if ok else 1
    print(f"model {summary['model_id']} ({summary['image_size']} px), panel {summary['panel']}, "
          f"{summary['threads']} threads; imports {summary['import_ms']:.0f} ms, "
          f"model load {summary['model_load_ms']:.0f} ms; {summary['p95_rule']}")
    for path, target in (("describe", TARGET_DESCRIBE_S), ("explain", TARGET_EXPLAIN_S)):
        s = summary[path]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in s["stages_median_ms"].items())
        verdict = "ok" if s["p95_ms"] <= target * 1000 else "MISSED"
        print(f"{path:9s} median {s['median_ms']:7.1f} ms  p95 {s['p95_ms']:7.1f} ms  "
              f"(target {target * 1000:.0f} ms: {verdict}; {s['runs']} runs)  stages: {stages}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
