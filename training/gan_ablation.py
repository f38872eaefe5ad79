"""Does GAN balancing help rare classes? Train and evaluate every (mode, seed), then report.

    python -m training.gan_ablation --data PBC/train --val PBC/val \
        --gan runs/gan64_cut/gan.safetensors --cut basophil=50 lymphocyte=100 \
        --modes none reweight oversample gan --seeds 0 1 2 --epochs 3 --max-per-class 400 \
        --out runs/ablation --report docs/gan_ablation.md

Each run is ``python -m training.train`` into OUT/<mode>_s<seed> followed by
``python -m training.evaluate`` on --val into OUT/<mode>_s<seed>/eval.json. Runs whose
eval.json exists are skipped, and training is started with --resume, so an interrupted
ablation continues where it stopped. --dry-run prints the commands; --report-only rewrites
the report from finished runs.

gan mode: for every cut class, ``training.gan_sample`` writes synthetic images into
OUT/synthetic_s<seed> until real + synthetic reach --target-ratio times the median count of
the other classes. ``training.train`` applies --cut and --max-per-class to the synthetic
folders too (they are pooled by label), which would replace real images of a cut class by
synthetic ones. So gan runs get the *same real images* another way: OUT/real_d<data-seed> holds
symbolic links to exactly the images ``training.train.load_items`` keeps for --data-seed
(checked before training), passed as --data without --cut.

The cut is drawn once (--data-seed, fixed): every mode and seed trains on the same real
images, so the spread over seeds is the training noise, and one GAN trained on that cut
(``train_gan --cut ... --max-per-class ... --data-seed``) serves every seed without seeing
a real image the classifier runs lack. --gan may still contain ``{seed}`` (one GAN per seed). A GAN trained on more real images of a cut
class than the classifier run saw leaks data into gan mode; the sidecar's per-class data
fingerprint is compared with the run's, and the report warns on any mismatch.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from core.checkpoint import sidecar_path
from core.data import class_counts, data_fingerprint, scan_class_folders
from core.settings import PROJECT_ROOT
from training.ablation_report import write_report
from training.cli import run_main
from training.sampling import BALANCE_MODES
from training.train import load_items


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="training folder (a subfolder per class)")
    p.add_argument("--val", required=True, help="evaluation folder, same layout")
    p.add_argument("--gan", default="", help="GAN checkpoint for gan mode; may contain {seed}")
    p.add_argument("--cut", nargs="+", required=True, help="CLASS=N: training images kept of the rare classes")
    p.add_argument("--modes", nargs="+", choices=BALANCE_MODES, default=list(BALANCE_MODES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the cut: every mode and seed trains on the same real images (the GAN's too)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--config", default="hemascribe-regnetx004-128", help="model config of training.train")
    p.add_argument("--augment", default="strong", help="augmentation preset of training.train, the same for every run")
    p.add_argument("--max-per-class", type=int, default=0, help="cap per class for every run (0: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--target-ratio", type=float, default=1.0,
                   help="gan mode: real + synthetic of a cut class = ratio x median count of the other classes")
    p.add_argument("--threads", type=int, default=0, help="passed to training.train (0: not passed)")
    p.add_argument("--cache-dir", default="runs/cache")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--report", default="docs/gan_ablation.md")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    return p.parse_args(argv)


def cut_limits(cuts: list[str]) -> dict[str, int]:
    """{'basophil': 50, ...} from ['basophil=50', ...]."""
    return {c.split("=")[0]: int(c.split("=")[1]) for c in cuts}


def synthetic_counts(counts: dict[str, int], cut: dict[str, int], ratio: float, max_per_class: int) -> dict[str, int]:
    """Synthetic images per cut class to reach ratio x the median count of the other classes."""
    others = [n for c, n in counts.items() if c not in cut] or list(counts.values())
    target = round(ratio * statistics.median(others))
    if max_per_class:
        target = min(target, max_per_class)
    return {c: max(0, target - counts.get(c, 0)) for c in cut}


def build_view(items, folder: Path) -> Path:
    """folder/<class>/<name> symlinks to `items` (replacing an earlier view); no pixel copied."""
    for old in folder.glob("*/*"):
        if old.is_symlink():
            old.unlink()
    for item in items:
        link = folder / item.label / item.path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            raise ValueError(f"two images of {item.label} are both named {item.path.name}; cannot build {folder}")
        link.symlink_to(item.path)
    kept = sorted(str(i.path) for i in load_items([str(folder)], 0, [], 0))
    if kept != sorted(str(i.path) for i in items):  # resolve() in scan_class_folders follows the links
        raise RuntimeError(f"{folder} does not reproduce the selected images")
    return folder


def gan_warnings(gan_path: str, items, cut: dict[str, int], seed: int) -> list[str]:
    """Mismatches between the real images the GAN saw and those of this run, per cut class."""
    side = sidecar_path(gan_path)
    if not side.is_file():
        return [f"seed {seed}: GAN sidecar {side} not found"]
    seen = json.loads(side.read_text()).get("data", {}).get("sha256_per_class", {})
    warnings = []
    for name in cut:
        mine = data_fingerprint([i for i in items if i.label == name])
        if seen.get(name) != mine:
            warnings.append(f"seed {seed}: the GAN {gan_path} was trained on other real {name} images than this "
                            "run keeps (train it with the same --cut/--max-per-class/--data-seed): "
                            "gan mode may leak data")
    return warnings


def gan_plan(args, seed: int) -> tuple[list, dict[str, int], list[str]]:
    """(real images the run keeps, synthetic images per cut class, leak warnings) of a gan run."""
    items = load_items([args.data], args.max_per_class, args.cut, args.data_seed)
    cut = cut_limits(args.cut)
    counts = synthetic_counts(class_counts(items), cut, args.target_ratio, args.max_per_class)
    return items, counts, gan_warnings(args.gan.format(seed=seed), items, cut, seed)


def prepare_gan_run(args, seed: int, python: str) -> tuple[list[list[str]], list[str]]:
    """(gan_sample commands, train data arguments) of a gan run; builds its view of the data."""
    items, counts, _ = gan_plan(args, seed)
    # the cut depends on --data-seed only, so every seed's gan run shares one view of the real images
    view, synthetic = Path(args.out) / f"real_d{args.data_seed}", Path(args.out) / f"synthetic_s{seed}"
    if not args.dry_run:
        build_view(items, view)
    commands = [[python, "-m", "training.gan_sample", "--checkpoint", args.gan.format(seed=seed), "--class", name,
                 "--n", str(n), "--out", str(synthetic), "--seed", str(seed)] for name, n in counts.items() if n > 0]
    return commands, ["--data", str(view), "--max-per-class", "0", "--synthetic", str(synthetic)]


def run_commands(args, mode: str, seed: int, python: str) -> Path:
    """Train and evaluate one (mode, seed) unless its eval.json exists; returns that path."""
    run_dir = Path(args.out) / f"{mode}_s{seed}"
    result = run_dir / "eval.json"
    if result.is_file():
        print(f"skip {run_dir}: {result.name} exists", flush=True)
        return result
    commands, data_args = [], ["--data", args.data, "--max-per-class", str(args.max_per_class), "--cut", *args.cut,
                               "--data-seed", str(args.data_seed)]
    if mode == "gan":
        commands, data_args = prepare_gan_run(args, seed, python)
    model = run_dir / "model.safetensors"
    commands.append([python, "-m", "training.train", *data_args, "--balance", mode, "--seed", str(seed),
                     "--epochs", str(args.epochs), "--config", args.config, "--augment", args.augment,
                     "--batch-size", str(args.batch_size),
                     "--out", str(run_dir), "--export", str(model), "--cache-dir", args.cache_dir, "--resume",
                     *(["--threads", str(args.threads)] if args.threads else [])])
    commands.append([python, "-m", "training.evaluate", "--checkpoint", str(model), "--data", args.val,
                     "--json", str(result)])
    if args.dry_run:
        print("\n".join(shlex.join(c) for c in commands), flush=True)
        return result
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "commands.json").write_text(json.dumps([shlex.join(c) for c in commands], indent=2))
    for command in commands:
        execute(command, run_dir / "log.txt", Path(args.out) / "commands.sh")
    return result


def execute(command: list[str], log: Path, history: Path) -> None:
    """Run one command from the project root, output appended to `log`; stop on failure."""
    line = shlex.join(command)
    print(f"$ {line}", flush=True)
    with open(history, "a") as handle:
        handle.write(line + "\n")
    with open(log, "a") as handle:
        handle.write(f"$ {line}\n")
        handle.flush()
        code = subprocess.run(command, cwd=PROJECT_ROOT, stdout=handle, stderr=subprocess.STDOUT,
                              env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"}).returncode
    if code != 0:
        raise SystemExit(f"command failed ({code}); see {log}:\n{line}")


def collect(args) -> tuple[dict[str, dict[int, dict]], list[str]]:
    """Finished results {mode: {seed: eval JSON}} and the commands that produced them."""
    results, commands = {}, []
    for mode in args.modes:
        results[mode] = {}
        for seed in args.seeds:
            run_dir = Path(args.out) / f"{mode}_s{seed}"
            if (run_dir / "eval.json").is_file():
                results[mode][seed] = json.loads((run_dir / "eval.json").read_text())
                if (run_dir / "commands.json").is_file():
                    commands += json.loads((run_dir / "commands.json").read_text())
    return results, commands


def main(argv=None) -> int:
    args = parse_args(argv)
    if "gan" in args.modes and not args.gan:
        raise SystemExit("--modes gan needs --gan CHECKPOINT")
    missing = set(cut_limits(args.cut)) - {i.label for i in scan_class_folders(args.data)}
    if missing:
        raise SystemExit(f"--cut names classes not under {args.data}: {sorted(missing)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    context = {"val": args.val, "warnings": [], "settings": {
        "training data": args.data, "cut": " ".join(args.cut), "config": args.config, "epochs": args.epochs,
        "augmentation": args.augment,
        "max per class": args.max_per_class or "all", "cut seed": args.data_seed, "batch size": args.batch_size, "gan": args.gan or "-",
        "target ratio (gan)": args.target_ratio,
        "driver": "python -m training.gan_ablation " + shlex.join(sys.argv[1:])}}
    for seed in args.seeds if "gan" in args.modes else []:
        _, counts, warnings = gan_plan(args, seed)
        context["settings"][f"synthetic images, seed {seed}"] = ", ".join(f"{k}: {v}" for k, v in counts.items())
        context["warnings"].extend(warnings)
    if not args.report_only:
        for seed in args.seeds:
            for mode in args.modes:
                run_commands(args, mode, seed, sys.executable)
    if args.dry_run:
        return 0
    results, commands = collect(args)
    absent = [f"{m}_s{s}" for m in args.modes for s in args.seeds if s not in results[m]]
    if absent:
        context["warnings"].append(f"runs without results (not in the table): {', '.join(absent)}")
    write_report(results, list(cut_limits(args.cut)), context, commands, Path(args.report))
    (Path(args.out) / "summary.json").write_text(json.dumps({"results": results, **context}, indent=2))
    print(f"wrote {args.report} and {Path(args.report).with_suffix('.png')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
