"""Train the class-conditional GAN that makes synthetic images of rare cell types (issue 4).

    python -m training.train_gan --data PBC/train --out runs/gan64 \
        --size 64 --minutes 60 [--steps N] [--classes basophil lymphocyte ...] \
        [--cut basophil=50 lymphocyte=100 --max-per-class 300] [--resume]

The run folder holds gan.safetensors + gan.json (weights and sidecar, see
core/gan_checkpoint.py), optim.pt (optimizer state, for --resume), config.json,
metrics.jsonl, grid.png (rows = classes) and samples/<class>.png, rewritten at every
checkpoint (samples/grid_<step>.png keeps the history).

To compare fairly with a classifier trained on cut data, train the GAN on the *same* images:
--cut, --max-per-class and --data-seed select exactly what ``training.train`` selects with
the same --cut, --max-per-class and --seed (the same function does it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from core.atomic import atomic_write
from core.data import class_counts, data_fingerprint
from core.gan import (Discriminator, GanConfig, Generator, d_hinge_loss, g_hinge_loss, generate,
                      image_grid, standing_stats, update_ema)
from core.gan_checkpoint import load_gan, load_module, save_gan
from training.cli import decay, non_negative_int, positive_float, positive_int, run_main
from training.dataset import decode_images
from training.diffaugment import POLICIES, diff_augment
from training.run_inputs import UsageError, check_device, refuse_earlier_run
from training.train import load_items, seed_everything


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with a subfolder per class")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--size", type=int, default=64, choices=(32, 64, 128), help="image side (32: tests only)")
    p.add_argument("--minutes", type=positive_float, default=60.0, help="wall-clock budget of this invocation")
    p.add_argument("--steps", type=non_negative_int, default=0, help="stop at this total step (0: only --minutes)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    fresh_or_not = p.add_mutually_exclusive_group()
    fresh_or_not.add_argument("--resume", action="store_true", help="continue from OUT/gan.safetensors + optim.pt")
    fresh_or_not.add_argument("--overwrite", action="store_true",
                              help="start afresh in an --out that holds a trained GAN (its weights, optimizer "
                                   "state and metrics are removed first)")
    p.add_argument("--classes", nargs="*", default=[], help="train on these class folders only")
    p.add_argument("--cut", nargs="*", default=[], help="CLASS=N: keep N images of CLASS, as training.train")
    p.add_argument("--max-per-class", type=non_negative_int, default=0,
                   help="cap per class, as training.train (0: all)")
    p.add_argument("--data-seed", type=int, default=None, help="seed of the --cut selection (default --seed)")
    p.add_argument("--sampling", choices=("balanced", "uniform"), default="balanced",
                   help="balanced: every class equally often per batch (rare classes get as many steps)")
    p.add_argument("--g-channels", type=positive_int, default=32)
    p.add_argument("--d-channels", type=positive_int, default=32)
    p.add_argument("--g-lr", type=positive_float, default=1e-4)
    p.add_argument("--d-lr", type=positive_float, default=4e-4, help="TTUR: D learns faster, one D step per G step")
    p.add_argument("--ema", type=decay, default=0.999, help="decay of the generator EMA (0: no EMA)")
    p.add_argument("--diffaugment", nargs="*", default=list(POLICIES), help=f"policies of {POLICIES}")
    p.add_argument("--checkpoint-every", type=positive_int, default=1000)
    p.add_argument("--log-every", type=positive_int, default=50)
    p.add_argument("--cache-dir", default="runs/cache", help="decoded images are cached here ('' : no cache)")
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="torch threads (0: leave as is); 1 is ~4x faster than 2 while another job holds the CPUs")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def load_real(args) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """uint8 images (N, 3, S, S), labels, classes and a record of the data for the sidecar."""
    data_seed = args.seed if args.data_seed is None else args.data_seed
    items = load_items([args.data], args.max_per_class, args.cut, data_seed)
    if args.classes:
        missing = set(args.classes) - {i.label for i in items}
        if missing:
            raise SystemExit(f"--classes {sorted(missing)} not found under {args.data}")
        items = [i for i in items if i.label in args.classes]
    classes = sorted({i.label for i in items})
    images = decode_images(items, args.size, Path(args.cache_dir) if args.cache_dir else None)
    labels = torch.tensor([classes.index(i.label) for i in items])
    record = {"folder": str(Path(args.data).resolve()), "counts": class_counts(items), "cut": args.cut,
              "max_per_class": args.max_per_class, "data_seed": data_seed,
              # per class, so an ablation can check the GAN saw exactly its run's real images
              "sha256_per_class": {c: data_fingerprint([i for i in items if i.label == c]) for c in classes}}
    return images, labels, classes, record


def real_batch(images, labels, batch_size: int, balanced: bool, rng: torch.Generator):
    """A batch in [-1, 1] with random flips/transposes (cells have no up or left, so this
    enlarges a small class without teaching the generator anything false) and its labels."""
    if balanced:
        n_classes = int(labels.max()) + 1
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=n_classes)
        starts = torch.cumsum(counts, 0) - counts
        y = torch.randint(0, n_classes, (batch_size,), generator=rng)
        index = order[starts[y] + (torch.rand(batch_size, generator=rng) * counts[y]).long()]
    else:
        index = torch.randint(0, len(labels), (batch_size,), generator=rng)
    x = images[index].float().div_(127.5).sub_(1)
    for dims in ((3,), (2,)):
        x = torch.where(torch.rand(batch_size, 1, 1, 1, generator=rng) < 0.5, x.flip(dims), x)
    x = torch.where(torch.rand(batch_size, 1, 1, 1, generator=rng) < 0.5, x.transpose(2, 3), x)
    return x, labels[index]


def train_step(g, d, ema, opt_g, opt_d, x_real, y, args, rng) -> dict[str, float]:
    """One discriminator and one generator update (hinge loss, DiffAugment on both sides)."""
    policy = tuple(args.diffaugment)
    z = torch.randn(len(y), g.config.z_dim, generator=rng).to(x_real.device)
    with torch.no_grad():
        fake = g(z, y)
    # real and fake in one forward: D has no batch norm, and it is one matmul fewer per layer
    scores = d(diff_augment(torch.cat([x_real, fake]), policy, rng), torch.cat([y, y]))
    d_real, d_fake = scores[:len(y)], scores[len(y):]
    d_loss = d_hinge_loss(d_real, d_fake)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()

    d.requires_grad_(False)  # the G step needs gradients w.r.t. images only: skip D's weights
    z = torch.randn(len(y), g.config.z_dim, generator=rng).to(x_real.device)
    g_loss = g_hinge_loss(d(diff_augment(g(z, y), policy, rng), y))
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    d.requires_grad_(True)
    if ema is not None:
        update_ema(ema, g, args.ema)
    return {"d_loss": float(d_loss.detach()), "g_loss": float(g_loss.detach()),
            "d_real": float(d_real.detach().mean()), "d_fake": float(d_fake.detach().mean())}


def write_samples(sampler: Generator, classes: list[str], out: Path, step: int, seed: int) -> None:
    """grid.png (a row of 8 per class), samples/<class>.png (4 x 8) and a dated copy of the
    grid; the noise is fixed by `seed` so grids of successive checkpoints are comparable."""
    (out / "samples").mkdir(parents=True, exist_ok=True)
    per_class = [generate(sampler, k, 32, seed + k) for k in range(len(classes))]
    for name, images in zip(classes, per_class):
        image_grid(images, rows=4).save(out / "samples" / f"{name}.png")
    grid = image_grid(torch.cat([images[:8] for images in per_class]), rows=len(classes))
    grid.save(out / "grid.png")
    grid.save(out / "samples" / f"grid_{step:07d}.png")


def checkpoint(out: Path, nets, opts, step: int, args, classes, record, last_metrics) -> None:
    """gan.safetensors + gan.json, optim.pt (paired by the weights' sha256) and sample grids."""
    g, d, ema = nets
    sampler = ema if ema is not None else g
    if ema is not None:
        standing_stats(ema, seed=args.seed)  # its own batch-norm statistics, see core.gan
    sidecar = {"classes": classes, "step": step, "seed": args.seed, "data": record,
               "args": vars(args), "last_metrics": last_metrics,
               "command": "python -m training.train_gan " + " ".join(sys.argv[1:])}
    path = save_gan(out / "gan.safetensors", g, d, ema, sidecar)
    sha = json.loads(path.with_suffix(".json").read_text())["weights_sha256"]
    optimizers = {"g": opts[0].state_dict(), "d": opts[1].state_dict(), "step": step, "weights_sha256": sha}
    atomic_write(out / "optim.pt", lambda handle: torch.save(optimizers, handle))
    write_samples(sampler, classes, out, step, args.seed)
    g.train()


def build(config: GanConfig, args):
    """Networks and optimizers; betas (0, 0.999) as in SAGAN/BigGAN's TTUR setting."""
    g, d = Generator(config).to(args.device), Discriminator(config).to(args.device)
    ema = None
    if args.ema > 0:
        ema = Generator(config).to(args.device)
        ema.load_state_dict(g.state_dict())
        ema.requires_grad_(False)
    opt_g = torch.optim.Adam(g.parameters(), lr=args.g_lr, betas=(0.0, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=args.d_lr, betas=(0.0, 0.999))
    return (g, d, ema), (opt_g, opt_d)


def resume(out: Path, nets, opts, classes: list[str]) -> int:
    """Load weights and optimizer state of OUT; returns the step reached."""
    saved = load_gan(out / "gan.safetensors")
    if saved.classes != classes:
        raise SystemExit(f"--resume: the checkpoint's classes {saved.classes} differ from the data's {classes}")
    g, d, ema = nets
    load_module(g, saved.tensors, "g", saved.path.name)
    load_module(d, saved.tensors, "d", saved.path.name)
    if ema is not None:
        load_module(ema, saved.tensors, "g_ema" if "g_ema" in saved.sidecar["sampling_weights"] else "g",
                    saved.path.name)
    state = torch.load(out / "optim.pt", map_location="cpu", weights_only=True)
    if state["weights_sha256"] != saved.sha256:
        raise SystemExit("--resume: optim.pt belongs to another gan.safetensors (interrupted save?)")
    opts[0].load_state_dict(state["g"])
    opts[1].load_state_dict(state["d"])
    return int(state["step"])


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_device(args.device)
        refuse_earlier_run(Path(args.out), "gan.safetensors", "a trained GAN", args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.overwrite:  # metrics.jsonl is appended to: the old run's lines would precede the new run's
        for name in ("gan.safetensors", "gan.json", "optim.pt", "metrics.jsonl"):
            (out / name).unlink(missing_ok=True)
    images, labels, classes, record = load_real(args)
    print(f"GAN data: {len(labels)} images, {record['counts']}", flush=True)
    config = GanConfig(len(classes), args.size, g_channels=args.g_channels, d_channels=args.d_channels)
    nets, opts = build(config, args)
    step = resume(out, nets, opts, classes) if args.resume and (out / "gan.safetensors").is_file() else 0
    # a fresh stream per (seed, step): a resumed run does not replay the batches it saw
    rng = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    (out / "config.json").write_text(json.dumps({"args": vars(args), "gan": config.to_dict(), "classes": classes,
                                                 "data": record}, indent=2))
    deadline = time.time() + args.minutes * 60
    total = args.steps or None
    bar = tqdm(total=total, initial=step, desc="gan", mininterval=10)
    sums, count, started, last = {}, 0, time.time(), {}
    while (not total or step < total) and time.time() < deadline:
        x, y = real_batch(images, labels, args.batch_size, args.sampling == "balanced", rng)
        losses = train_step(*nets, *opts, x.to(args.device), y.to(args.device), args, rng)
        step += 1
        count += 1
        sums = {k: sums.get(k, 0.0) + v for k, v in losses.items()}
        bar.update(1)
        if step % args.log_every == 0 or step == total:
            last = {"step": step, **{k: round(v / count, 4) for k, v in sums.items()},
                    "ms_per_step": round((time.time() - started) * 1000 / count, 1)}
            bar.set_postfix(d=last["d_loss"], g=last["g_loss"], refresh=False)
            with open(out / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(last) + "\n")
            sums, count, started = {}, 0, time.time()
        if step % args.checkpoint_every == 0:
            checkpoint(out, nets, opts, step, args, classes, record, last)
            started = time.time()  # keep checkpoint time out of ms_per_step
    bar.close()
    checkpoint(out, nets, opts, step, args, classes, record, last)
    print(f"saved {out / 'gan.safetensors'} at step {step}; samples in {out / 'grid.png'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
