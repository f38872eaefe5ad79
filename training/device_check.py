"""End-to-end check of the training command lines on an accelerator, on images it draws.

    python -m training.device_check --device cuda --out runs/device_check [--text-model NAME_OR_PATH]

Why it exists: CI and our development machines have no GPU, so the code that moves tensors
between devices (sentence features computed on the CPU, validation, export, class weights,
DDP, the GAN) never runs there. This runs each command line as a user would, in a subprocess,
on a small class-folder tree it draws (no data, no download):

1. training with bf16 autocast and class re-weighting, then resume and export;
2. training in fp32 with oversampling and MixStyle;
3. the first run again on the CPU (same seed): its loss must be close to the device's;
4. the evaluation and describe CLIs on the CPU, reading the model exported from the device;
5. ``torchrun --nproc_per_node 2`` (DDP) on the device;
6. the GAN trainer on the device;
7. speed: epochs of the default vision tower (regnetx_004, 96 px, strong augmentation).

`--text-model` replaces the frozen text encoder (default: the configs' all-MiniLM-L6-v2) for
machines where that package cannot be installed; any BERT-style folder with a tokenizer works.
Prints one JSON line per step and a summary (also OUT/summary.json); exit status 0 only when
every step passed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from core.config import load_model_config
from core.settings import PROJECT_ROOT

# bf16 on two devices runs different kernels: losses after two tiny epochs agree to ~0.01
LOSS_TOLERANCE = 0.05
SPEED_CLASSES = ("neutrophil", "lymphocyte", "eosinophil", "monocyte")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="device under test (cuda, cuda:1, mps, cpu ...)")
    p.add_argument("--out", default="runs/device_check", help="folder for data, runs and logs")
    p.add_argument("--text-model", default="", help="replace the configs' text model (name or local folder)")
    p.add_argument("--speed-images", type=int, default=1024, help="images in the speed step (0: skip it)")
    p.add_argument("--speed-epochs", type=int, default=3, help="epochs timed on the device (the first warms up)")
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
    """root/<class>/<i>.png; a class's drawing depends on its position in `counts`."""
    rng = np.random.default_rng(seed)
    for kind, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            draw_cell(size, kind, rng).save(root / name / f"{i}.png")
    return root


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


class Steps:
    """Runs command lines as subprocesses and records what each did."""

    def __init__(self, out: Path, timeout: float = 1800):
        self.out, self.results, self.timeout = out, [], timeout
        self.env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}

    def run(self, name: str, args: list[str], check=None) -> bool:
        """Run ``python ARGS``; `check()` (if given) returns a detail to record or raises."""
        started = time.time()
        try:
            proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=self.env,
                                  cwd=PROJECT_ROOT, timeout=self.timeout)
        except subprocess.TimeoutExpired as exc:  # a hung step fails; the others still run
            proc = subprocess.CompletedProcess(exc.cmd, -1, _text(exc.stdout),
                                               _text(exc.stderr) + f"\ntimed out after {self.timeout} s")
        (self.out / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        record = {"step": name, "ok": proc.returncode == 0, "rc": proc.returncode,
                  "seconds": round(time.time() - started, 1)}
        if record["ok"] and check is not None:
            try:
                record["detail"] = check()
            except Exception as exc:  # noqa: BLE001 - a failed check is a result, not a crash
                record.update(ok=False, detail=f"check failed: {exc}")
        if proc.returncode != 0:
            record["stderr_tail"] = proc.stderr[-1500:]
        print(json.dumps(record), flush=True)
        self.results.append(record)
        return record["ok"]


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def last_metrics(run: Path) -> dict:
    """The last line of a training run's metrics.jsonl."""
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def train_args(tree: Path, config: Path, run: Path, device: str, epochs: int, *extra: str) -> list[str]:
    return ["-m", "training.train", "--data", str(tree), "--val", str(tree), "--config", str(config),
            "--batch-size", "16", "--epochs", str(epochs), "--device", device, "--out", str(run),
            "--cache-dir", str(run.parent / "cache"), *extra]


def check_training(steps: Steps, tree: Path, config: Path, device: str) -> None:
    """Steps 1-3: train, resume, export on the device; fp32 variant; the same run on the CPU."""
    out = steps.out
    run, cpu = out / "train_device", out / "train_cpu"
    steps.run("train_bf16_reweight", train_args(tree, config, run, device, 2, "--balance", "reweight"),
              lambda: last_metrics(run))
    steps.run("resume_and_export",
              train_args(tree, config, run, device, 3, "--balance", "reweight", "--resume",
                         "--export", str(run / "model.safetensors")),
              lambda: {"epochs_logged": len((run / "metrics.jsonl").read_text().splitlines()),
                       "exported_mb": round((run / "model.safetensors").stat().st_size / 1e6, 2)})
    steps.run("train_fp32_oversample_mixstyle",
              train_args(tree, config, out / "train_fp32", device, 2, "--precision", "fp32",
                         "--balance", "oversample", "--mixstyle", "0.5"),
              lambda: last_metrics(out / "train_fp32"))

    def same_loss() -> dict:
        here, there = last_metrics(cpu)["loss"], json.loads((run / "metrics.jsonl").read_text().splitlines()[1])["loss"]
        if abs(here - there) > LOSS_TOLERANCE:
            raise ValueError(f"epoch-2 loss {there:.4f} on {device} vs {here:.4f} on the CPU")
        return {"loss_device": round(there, 4), "loss_cpu": round(here, 4)}

    steps.run("same_run_on_cpu", train_args(tree, config, cpu, "cpu", 2, "--balance", "reweight"), same_loss)


def check_inference_and_others(steps: Steps, tree: Path, eval_tree: Path, config: Path, device: str) -> None:
    """Steps 4-6: CPU evaluation / describe of the device-trained model, DDP, the GAN."""
    out, model = steps.out, steps.out / "train_device" / "model.safetensors"
    steps.run("evaluate_on_cpu",
              ["-m", "training.evaluate", "--checkpoint", str(model), "--data", str(eval_tree),
               "--json", str(out / "eval.json")],
              lambda: {"n_scored": json.loads((out / "eval.json").read_text())["n"]})  # a smoke test, not a score
    image = next((eval_tree / "neutrophil").iterdir())

    def described() -> dict:
        record = json.loads((out / "describe_on_cpu.log").read_text().splitlines()[0])
        if not record["ok"]:
            raise ValueError(f"describe refused the image: {record.get('error')}")
        return {"class": record["class"], "abstained": record["abstained"]}

    steps.run("describe_on_cpu", ["-m", "core.describe", str(image), "--json", "--model", str(model)], described)
    steps.run("torchrun_2_ranks", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                   *train_args(tree, config, out / "train_ddp", device, 1)],
              lambda: last_metrics(out / "train_ddp"))
    steps.run("train_gan", ["-m", "training.train_gan", "--data", str(tree), "--out", str(out / "gan"),
                            "--size", "32", "--steps", "40", "--batch-size", "16", "--g-channels", "8",
                            "--d-channels", "8", "--device", device, "--cache-dir", ""],
              lambda: sorted(p.name for p in (out / "gan").iterdir()))


def check_speed(steps: Steps, config: Path, device: str, n_images: int, epochs: int) -> None:
    """Step 7: seconds per epoch of the default tower on the device and on this machine's CPU."""
    per_class = max(1, n_images // len(SPEED_CLASSES))
    tree = draw_tree(steps.out / "data_speed", {name: per_class for name in SPEED_CLASSES}, size=108)
    for where, n_epochs in ((device, epochs), ("cpu", 1)):
        run = steps.out / f"speed_{where.replace(':', '_')}"
        steps.run(run.name, train_args(tree, config, run, where, n_epochs),
                  lambda run=run: {"images": per_class * len(SPEED_CLASSES), "epoch_seconds":
                                   [json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()]})
        if where == "cpu":
            break


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tiny, default_tower = write_configs(out, args.text_model)
    tree = draw_tree(out / "data_train", {"neutrophil": 40, "lymphocyte": 40, "eosinophil": 16}, size=64)
    eval_tree = draw_tree(out / "data_eval", {"neutrophil": 6, "lymphocyte": 6, "not_a_class": 4}, size=64, seed=1)
    steps = Steps(out, args.step_timeout)
    check_training(steps, tree, tiny, args.device)
    check_inference_and_others(steps, tree, eval_tree, tiny, args.device)
    if args.speed_images:
        check_speed(steps, default_tower, args.device, args.speed_images, args.speed_epochs)
    failed = [r["step"] for r in steps.results if not r["ok"]]
    summary = {"device": args.device, "passed": len(steps.results) - len(failed), "failed": failed}
    (out / "summary.json").write_text(json.dumps({**summary, "steps": steps.results}, indent=1))
    print(json.dumps(summary), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
