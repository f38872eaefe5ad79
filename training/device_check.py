"""End-to-end check of the training command lines on an accelerator, on images it draws.

    python -m training.device_check --device cuda --out runs/device_check [--text-model NAME_OR_PATH]

Why it exists: CI and our development machines have no GPU, so the code that moves tensors
between devices (sentence features computed on the CPU, validation, export, class weights,
DDP, the GAN) never runs there. This runs each command line as a user would, in a subprocess,
on a small class-folder tree it draws (no data, no download):

1. training with bf16 autocast, class re-weighting and morphology captions (a WBCAtt-style CSV
   it writes), then resume and export;
2. training in fp32 with oversampling and MixStyle;
3. the first run again on the CPU (same seed): its losses must be close to the device's;
4. the evaluation and describe CLIs on the CPU, reading the model exported from the device;
5. ``torchrun --nproc_per_node 2`` (DDP, gloo) on the device;
6. the GAN trainer on the device;
7. speed: epochs of the default vision tower (regnetx_004, 96 px, strong augmentation, the
   training default batch of 64) on the device and on this machine's CPU, and on the device at
   a larger batch (`--speed-large-batch`, 256 by default).

`--text-model` replaces the frozen text encoder (default: the configs' all-MiniLM-L6-v2) for
machines where that package cannot be installed; any BERT-style folder with a tokenizer works.
Prints one JSON line per step; OUT/summary.json (rewritten after every step) holds them with the
torch / CUDA versions and the device name. Exit status 0 only when every step passed; OUT must
be new or empty, so that no earlier run's metrics are read.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from core.config import load_model_config
from training.checkpointing import read_metrics
from training.cli import run_main
from training.run_inputs import is_new_or_empty_folder
from training.step_runner import Steps

# bf16 on two devices runs different kernels: losses after two tiny epochs agree to ~0.01
LOSS_TOLERANCE = 0.05
SPEED_CLASSES = ("neutrophil", "lymphocyte", "eosinophil", "monocyte")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="device under test (cuda, cuda:1, mps, cpu ...)")
    p.add_argument("--out", default="runs/device_check", help="folder for data, runs and logs")
    p.add_argument("--text-model", default="", help="replace the configs' text model (name or local folder)")
    p.add_argument("--speed-images", type=int, default=1024, help="images in the speed step (0: skip it)")
    p.add_argument("--speed-epochs", type=int, default=3, help="epochs timed on the device (the first warms up)")
    p.add_argument("--speed-large-batch", type=int, default=256,
                   help="also time the device at this batch size, a GPU user's choice (0: skip)")
    p.add_argument("--step-timeout", type=float, default=1800, help="seconds after which a step counts as failed")
    return p.parse_args(argv)


def draw_cell(size: int, kind: int, rng: np.random.Generator) -> Image.Image:
    """A pink field with one 'cell' whose size and number of nuclear lobes depend on `kind`."""
    yy, xx = np.mgrid[:size, :size] / size
    centre = 0.5 + rng.uniform(-0.05, 0.05, 2)
    radius = 0.22 + 0.06 * (kind % 2)
    image = np.zeros((size, size, 3)) + (235, 200, 205)
    image[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius ** 2] = (200, 170, 210)
    for lobe in range(1 + kind % 3):
        offset = (lobe - kind % 3 / 2) * radius * 0.5
        inside = (yy - centre[0]) ** 2 + (xx - centre[1] - offset) ** 2 < (radius * 0.35) ** 2
        image[inside] = (90, 40, 120)
    image += rng.normal(0, 6, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def draw_tree(root: Path, counts: dict[str, int], size: int, seed: int = 0) -> Path:
    """root/<class>/<i>.png; a class's drawing depends on its position in `counts` (its kind)."""
    rng = np.random.default_rng(seed)
    for kind, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            draw_cell(size, kind, rng).save(root / name / f"{i}.png")
    return root


def write_attribute_csv(tree: Path, counts: dict[str, int], csv_path: Path) -> Path:
    """A WBCAtt-style CSV for a tree drawn from `counts` (`path` relative to the CSV's folder): size
    and nucleus follow what `draw_cell` draws for each class's kind, the other attributes are fixed."""
    columns = ["img_name", "label", "cell_size", "cell_shape", "nucleus_shape", "nuclear_cytoplasmic_ratio",
               "chromatin_density", "cytoplasm_vacuole", "cytoplasm_texture", "cytoplasm_colour", "granule_type",
               "granule_colour", "granularity", "path"]
    nuclei = ["unsegmented-round", "segmented-bilobed", "segmented-multilobed"]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for kind, (name, n) in enumerate(counts.items()):
            for i in range(n):
                image = tree / name / f"{i}.png"
                writer.writerow([image.name, name, "big" if kind % 2 else "small", "round", nuclei[kind % 3], "high",
                                 "densely", "no", "clear", "light blue", "nil", "nil", "no",
                                 image.relative_to(csv_path.parent).as_posix()])
    return csv_path


def write_configs(out: Path, text_model: str) -> tuple[Path, Path]:
    """(tiny config, default-tower config) as JSON files in `out`, with `text_model` (if given)
    and its feature width replacing the shipped text tower."""
    paths = []
    for name in ("tiny-test", "hemascribe-regnetx004-96"):
        config = load_model_config(name).to_dict()
        if text_model:
            from transformers import AutoConfig

            from core.text_tower import resolve_text_model
            if Path(text_model).is_dir():  # the steps run from the project root
                text_model = str(Path(text_model).resolve())
            config.update(text_model=text_model,
                          text_width=AutoConfig.from_pretrained(resolve_text_model(text_model)).hidden_size)
        path = out / f"check-{name}.json"
        path.write_text(json.dumps(config, indent=1))
        paths.append(path)
    return paths[0], paths[1]


def platform_facts(device: str) -> dict:
    """torch / CUDA versions and the name of `device`, for the summary. The name is read in a
    short subprocess, so this process never holds a CUDA context while the steps run."""
    import torch

    name = None
    if device.startswith("cuda"):
        probe = ("import sys, torch; d = torch.device(sys.argv[1]); "
                 "print(torch.cuda.get_device_name(d) if torch.cuda.is_available() else '')")
        proc = subprocess.run([sys.executable, "-c", probe, device], capture_output=True, text=True, timeout=300)
        name = proc.stdout.strip() or None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "device_name": name}


def compare_runs(device_run: list[dict], cpu_run: list[dict], tolerance: float = LOSS_TOLERANCE) -> dict:
    """Per-epoch losses of the same seeded run on the device and on the CPU; ValueError when any
    loss term differs by more than `tolerance` or the runs logged different (or no) epochs."""
    if not cpu_run:
        raise ValueError("no epochs to compare")
    if [m["epoch"] for m in device_run] != [m["epoch"] for m in cpu_run]:
        raise ValueError("the two runs logged different epochs")
    compared = {}
    for there, here in zip(device_run, cpu_run):
        for term in ("loss", "contrastive", "attributes"):
            if abs(there[term] - here[term]) > tolerance:
                raise ValueError(f"epoch {here['epoch']} {term}: {there[term]:.4f} on the device, "
                                 f"{here[term]:.4f} on the CPU")
        compared[f"epoch{here['epoch']}"] = {"device": round(there["loss"], 4), "cpu": round(here["loss"], 4)}
    return compared


def train_args(tree: Path, config: Path, run: Path, device: str, epochs: int, *extra: str,
               batch_size: int | None = 16) -> list[str]:
    """Arguments of one `training.train` run (`batch_size` None: the trainer's default)."""
    batch = ["--batch-size", str(batch_size)] if batch_size else []
    return ["-m", "training.train", "--data", str(tree), "--val", str(tree), "--config", str(config), *batch,
            "--epochs", str(epochs), "--device", device, "--out", str(run), "--cache-dir", str(run.parent / "cache"),
            *extra]


def check_training(steps: Steps, tree: Path, attributes: Path, config: Path) -> None:
    """Steps 1-3: train (with captions), resume, export on the device; fp32 variant; the same run on the CPU."""
    out, device = steps.out, steps.device
    run, cpu = out / "train_device", out / "train_cpu"
    # bf16 named, not left to --precision auto: the check compares bf16 on the device with bf16 on the CPU
    first = ("--precision", "bf16", "--balance", "reweight", "--attributes", str(attributes))
    steps.run("train_bf16_reweight_captions", train_args(tree, config, run, device, 2, *first),
              lambda _: read_metrics(run)[-1])
    steps.run("resume_and_export",
              train_args(tree, config, run, device, 3, *first, "--resume", "--export", str(run / "model.safetensors")),
              lambda _: {"epochs_logged": len(read_metrics(run)),
                         "exported_mb": round((run / "model.safetensors").stat().st_size / 1e6, 2)})
    steps.run("train_fp32_oversample_mixstyle",
              train_args(tree, config, out / "train_fp32", device, 2, "--precision", "fp32",
                         "--balance", "oversample", "--mixstyle", "0.5"),
              lambda _: read_metrics(out / "train_fp32")[-1])
    steps.run("same_run_on_cpu", train_args(tree, config, cpu, "cpu", 2, *first),
              lambda _: compare_runs(read_metrics(run)[:2], read_metrics(cpu)))


def described(proc: subprocess.CompletedProcess) -> dict:
    """What the describe CLI said of the one file it was given; ValueError if it refused it."""
    record = json.loads(proc.stdout.splitlines()[0])
    if not record["ok"]:
        raise ValueError(f"describe refused the image: {record.get('error')}")
    return {"class": record["class"], "abstained": record["abstained"]}


def check_inference_and_others(steps: Steps, tree: Path, eval_tree: Path, config: Path) -> None:
    """Steps 4-6: CPU evaluation / describe of the device-trained model, DDP, the GAN."""
    out, device, model = steps.out, steps.device, steps.out / "train_device" / "model.safetensors"
    steps.run("evaluate_on_cpu",
              ["-m", "training.evaluate", "--checkpoint", str(model), "--data", str(eval_tree),
               "--json", str(out / "eval.json")],
              lambda _: {"n_scored": json.loads((out / "eval.json").read_text())["n"]})  # a smoke test, not a score
    image = sorted((eval_tree / "neutrophil").iterdir())[0]
    steps.run("describe_on_cpu", ["-m", "core.describe", str(image), "--json", "--model", str(model)], described)
    steps.run("torchrun_2_ranks", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                   *train_args(tree, config, out / "train_ddp", device, 1)],
              lambda _: read_metrics(out / "train_ddp")[-1])
    steps.run("train_gan", ["-m", "training.train_gan", "--data", str(tree), "--out", str(out / "gan"),
                            "--size", "32", "--steps", "40", "--batch-size", "16", "--g-channels", "8",
                            "--d-channels", "8", "--device", device, "--cache-dir", ""],
              lambda _: sorted(p.name for p in (out / "gan").iterdir()))


def check_speed(steps: Steps, config: Path, n_images: int, epochs: int, large_batch: int = 0) -> None:
    """Step 7: seconds per epoch of the default tower, at the trainer's default batch size, on the
    device and (if that is not the CPU) on this machine's CPU, and on the device at `large_batch`
    (if not 0); the first epoch includes warm-up."""
    per_class = max(1, n_images // len(SPEED_CLASSES))
    tree = draw_tree(steps.out / "data_speed", {name: per_class for name in SPEED_CLASSES}, size=108)
    timed = [(steps.device, epochs, None)] + ([("cpu", min(epochs, 2), None)] if steps.device != "cpu" else [])
    if large_batch and steps.device != "cpu":  # a GPU user's batch; never more than the drawn images
        timed.append((steps.device, epochs, min(large_batch, per_class * len(SPEED_CLASSES))))
    for where, n_epochs, batch_size in timed:
        run = steps.out / (f"speed_{where.replace(':', '_')}" + (f"_batch{batch_size}" if batch_size else ""))
        steps.run(run.name, train_args(tree, config, run, where, n_epochs, batch_size=batch_size),
                  lambda _, run=run: {"images": per_class * len(SPEED_CLASSES), "epoch_seconds":
                                      [m["seconds"] for m in read_metrics(run)],
                                      "batch_size": json.loads((run / "config.json").read_text())["args"]["batch_size"]})


def main(argv=None) -> int:
    """Run every step; 0 when all passed, 1 when one failed, 2 when OUT is not new or empty."""
    args = parse_args(argv)
    out = Path(args.out).resolve()
    if not is_new_or_empty_folder(out):
        print(f"{out} is not an empty folder: give a new --out (earlier runs' metrics would be read)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    tiny, default_tower = write_configs(out, args.text_model)
    counts = {"neutrophil": 48, "lymphocyte": 48, "eosinophil": 32}
    tree = draw_tree(out / "data_train", counts, size=64)
    attributes = write_attribute_csv(tree, counts, out / "attributes.csv")
    eval_tree = draw_tree(out / "data_eval", {"neutrophil": 6, "lymphocyte": 6, "not_a_class": 4}, size=64, seed=1)
    steps = Steps(out, args.device, args.step_timeout, platform_facts(args.device))
    check_training(steps, tree, attributes, tiny)
    check_inference_and_others(steps, tree, eval_tree, tiny)
    if args.speed_images:
        check_speed(steps, default_tower, args.speed_images, args.speed_epochs, args.speed_large_batch)
    summary = steps.write_summary()
    print(json.dumps(summary), flush=True)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
