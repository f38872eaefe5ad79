"""Train several variants of a recipe side by side on a lent accelerator, inside a deadline, and
bring back the best few.

    python -m training.device_train --plan PLAN.json --out OUT --deadline SECONDS [--keep 3]

Why: a lent GPU comes with minutes, not hours (15 of device time a session, 10 a command, 64 MiB
back), and a small tower trained from scratch leaves it mostly idle: on an H200 each training
process was bound by its own CPU core launching kernels (86 ms a step, the GPU busy about 10 ms),
and three processes side by side each ran at nearly the speed of one. So the plan's variants all
start at once; one whose measured epochs say it cannot finish before the deadline is stopped
(the longest first, so the others keep their cores), and the rest export as usual.

PLAN.json: ``{"common": [train arguments...], "variants": {"name": [more arguments...]}}``; each
variant runs ``python -m training.train COMMON VARIANT --out OUT/runs/NAME --export
OUT/runs/NAME/model.safetensors``. Give COMMON ``--val`` folders (packed ones travel: see
training.pack_data) and the last epoch's ``val_acc/*`` rank the exported variants (their mean,
fixed before any run; the real evaluation is training.evaluate afterwards, on the full val
splits). OUT/summary.json lists every variant, its epochs, seconds an epoch, end and rank;
OUT/best.tar holds the --keep best models (weights, sidecar, metrics, log), split into 15 MiB
parts (OUT/best.tar.partNN) when larger: ``cat best.tar.part* > best.tar``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from training.checkpointing import read_metrics
from training.cli import run_main
from training.run_inputs import is_new_or_empty_folder

PART_BYTES = 15 * 2**20
EXPORT_SECONDS = 20  # export and the last validation, after the last epoch


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True, help="JSON: common arguments and one argument list per variant")
    p.add_argument("--out", required=True, help="folder for runs, logs, summary.json and best.tar")
    p.add_argument("--deadline", type=float, required=True, help="seconds from start by which every run must end")
    p.add_argument("--keep", type=int, default=3, help="how many of the best exported models to pack")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between looks at the runs")
    return p.parse_args(argv)


def read_plan(path: Path) -> dict:
    """The plan, checked: a list of string arguments in common and in each named variant."""
    plan = json.loads(path.read_text())
    lists = [plan.get("common")] + list((plan.get("variants") or {}).values()) if isinstance(plan, dict) else [None]
    if (not isinstance(plan, dict) or not isinstance(plan.get("variants"), dict) or not plan["variants"]
            or not all(isinstance(a, list) and all(isinstance(x, str) for x in a) for a in lists)):
        raise ValueError('expected {"common": ["--arg", "value", ...], "variants": {"name": [...]}}, '
                         'every argument a string')
    return plan


def projected_end(done: list[dict], epochs: int, now: float, since: int = 1) -> float | None:
    """Seconds from start at which a run ends, from the mean of its epochs from index `since` on
    (1 skips the first, which warms up); None until two such epochs are done."""
    measured = done[since:]
    if len(measured) < 2:
        return None
    per_epoch = sum(m["seconds"] for m in measured) / len(measured)
    return now + (epochs - len(done)) * per_epoch + EXPORT_SECONDS


def requested_epochs(arguments: list[str]) -> int:
    """The last --epochs in an argument list (train's default, 12, when none)."""
    values = [arguments[i + 1] for i, a in enumerate(arguments[:-1]) if a == "--epochs"]
    return int(values[-1]) if values else 12


def start_runs(plan: dict, out: Path) -> dict[str, dict]:
    """Start every variant; {name: {process, run folder, epochs, log}}."""
    runs = {}
    for name, extra in plan["variants"].items():
        run = out / "runs" / name
        run.mkdir(parents=True, exist_ok=True)
        arguments = [*plan["common"], *extra]
        command = [sys.executable, "-m", "training.train", *arguments, "--out", str(run),
                   "--export", str(run / "model.safetensors")]
        log = open(run / "train.log", "w")
        runs[name] = {"process": subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), "run": run,
                      "epochs": requested_epochs(arguments), "log": log, "end": "running"}
        print(f"started {name}: {' '.join(command[1:])}", flush=True)
    return runs


def watch(runs: dict[str, dict], deadline: float, started: float, poll: float) -> None:
    """Until every run ended: stop the longest run projected past the deadline, and every run still
    going at the deadline. Whenever a run ends (stopped, finished or failed) the others are judged
    only from epochs begun after that: they speed up once it frees its share (session 15: five runs
    side by side took 8-9 s an epoch, two 4.2 s, one alone 3.3 s), and projecting from the crowded
    epochs stopped runs that would have finished. A run beside a shorter one is still projected at
    the shared speed, so the plan's deadline should allow for that."""
    since = {name: 1 for name in runs}
    running = set(runs)
    while running:
        time.sleep(poll)
        now = time.time() - started
        live = {n: r for n, r in runs.items() if r["process"].poll() is None}
        if set(live) != running:  # the epoch now running is part crowded: measure from the one after it
            since.update({n: len(read_metrics(r["run"])) + 1 for n, r in live.items()})
            running = set(live)
            continue
        if now > deadline:
            late = sorted((r["epochs"], n) for n, r in live.items())
        else:
            late = sorted((r["epochs"], n) for n, r in live.items()
                          if (end := projected_end(read_metrics(r["run"]), r["epochs"], now, since[n])) is not None
                          and end > deadline)[-1:]
        for _, name in late:
            runs[name]["process"].kill()
            runs[name]["process"].wait()
            runs[name]["end"] = f"stopped at {now:.0f} s: would not finish by {deadline:.0f} s"
            print(f"stopped {name} after {len(read_metrics(runs[name]['run']))} epochs", flush=True)


def summarise(runs: dict[str, dict]) -> list[dict]:
    """One row a variant, exported ones ranked by their mean last-epoch val accuracy."""
    rows = []
    for name, r in runs.items():
        done = read_metrics(r["run"])
        # the sidecar is written last: a run stopped between the two files has not exported
        exported = all((r["run"] / f).is_file() for f in ("model.safetensors", "model.json"))
        val = {k: v for k, v in (done[-1] if done else {}).items() if k.startswith("val_acc/")}
        rows.append({"variant": name, "epochs": f"{len(done)}/{r['epochs']}", "exported": exported,
                     "end": "finished" if exported else (r["end"] if r["end"] != "running" else
                                                         f"exit status {r['process'].returncode}"),
                     "seconds_per_epoch": round(sum(m["seconds"] for m in done[1:]) / max(1, len(done) - 1), 1),
                     "val": val, "score": round(sum(val.values()) / len(val), 4) if exported and val else None})
    ranked = sorted((row for row in rows if row["score"] is not None), key=lambda row: -row["score"])
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    return rows


def pack_best(runs: dict[str, dict], rows: list[dict], out: Path, keep: int) -> list[Path]:
    """best.tar of the `keep` best exported models, split into PART_BYTES parts when larger."""
    best = [row["variant"] for row in sorted(rows, key=lambda row: row.get("rank", 1e9))[:keep] if "rank" in row]
    archive = out / "best.tar"
    with tarfile.open(archive, "w") as tar:
        for name in best:
            for file in ("model.safetensors", "model.json", "metrics.jsonl", "config.json", "train.log"):
                if (runs[name]["run"] / file).is_file():
                    tar.add(runs[name]["run"] / file, arcname=f"{name}/{file}")
    if archive.stat().st_size <= PART_BYTES:
        return [archive]
    parts = []
    with open(archive, "rb") as whole:
        while chunk := whole.read(PART_BYTES):
            parts.append(out / f"best.tar.part{len(parts):02d}")
            parts[-1].write_bytes(chunk)
    archive.unlink()
    return parts


def main(argv=None) -> int:
    """Run the plan; 0 when at least one variant exported, 1 when none did, 2 for a bad plan."""
    args = parse_args(argv)
    try:
        plan = read_plan(Path(args.plan))
    except (OSError, ValueError) as error:
        print(f"error: --plan {args.plan}: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if not is_new_or_empty_folder(out):  # an old run's models would be ranked
        print(f"error: --out {out} is not an empty folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    runs = start_runs(plan, out)
    try:
        watch(runs, args.deadline, started, args.poll)
    finally:  # never leave training processes behind, whatever stopped the watch
        for run in runs.values():
            if run["process"].poll() is None:
                run["process"].kill()
                run["process"].wait()
            run["log"].close()
    rows = summarise(runs)
    (out / "summary.json").write_text(json.dumps({"seconds": round(time.time() - started, 1), "variants": rows},
                                                 indent=2))
    parts = pack_best(runs, rows, out, args.keep)
    for row in rows:
        print(json.dumps(row), flush=True)
    print(f"packed {', '.join(p.name for p in parts)}", flush=True)
    return 0 if any(row["exported"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
