"""Train the HemaScribe dual encoder; reads top to bottom.

    python -m training.train --data PBC/train B_ALL/train --val PBC/val B_ALL/val \
        --attributes PBC/attributes_train.csv --epochs 12 --out runs/default \
        --export assets/model/hemascribe_default.safetensors

Runs unchanged under ``torchrun --nproc_per_node 2`` (DDP, gloo on CPU). A run folder
holds config.json, metrics.jsonl and last.pt (weights, optimizer, epoch, config, random
number states: resume with --resume, see training/checkpointing.py); --export writes the
safetensors model and its sidecar.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from core.data import as_class_keys, class_counts, scan_class_folders
from core.loss import attribute_matching_loss, bidirectional_contrastive_loss
from core.model import DualEncoder
from core.panels import all_class_keys, load_attribute_phrases, load_panels
from training.augment import AUGMENT_PRESETS, augment_batch
from training.checkpointing import (gather_rng_states, keep_metrics_up_to, load_for_resume, read_initial_weights,
                                    resume_from, run_args, save_checkpoint, write_run_config)
from training.cli import decay, non_negative_float, non_negative_int, positive_int, run_main
from training.dataset import build_dataset, read_attribute_table, training_cache_size
from training.ema import WeightAverage
from training.evaluation_utils import panel_accuracy
from training.export_model import export
from training.mixstyle import MixStyleHooks
from training.distributed import rank_device, resolve_precision, setup_distributed
from training.run_inputs import (UsageError, check_device, check_paths, epoch_steps, load_items, model_config,
                                 scan_as_class_keys)
from training.sampling import BALANCE_MODES, class_groups, class_weights, epoch_length, rank_epoch_indices
from training.text_features import SentenceFeatureCache


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="training folders (a subfolder per class)")
    p.add_argument("--val", nargs="*", default=[], help="validation folders, same layout")
    p.add_argument("--attributes", nargs="*", default=[], help="WBCAtt CSVs (path column relative to the CSV's folder)")
    p.add_argument("--config", default="hemascribe-regnetx004-96", help="model config name or JSON path")
    p.add_argument("--epochs", type=positive_int, default=12)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr", type=non_negative_float, default=2e-3)  # 0: weights stay (a check of --init-from)
    p.add_argument("--weight-decay", type=non_negative_float, default=0.05)
    p.add_argument("--attribute-weight", type=non_negative_float, default=0.5,
                   help="weight of the morphology phrase loss")
    p.add_argument("--balance", choices=BALANCE_MODES, default="none")
    p.add_argument("--augment", choices=sorted(AUGMENT_PRESETS), default="strong", help="augmentation preset")
    p.add_argument("--mixstyle", type=float, default=0.0,
                   help="MixStyle probability per batch at each --mixstyle-stages output (0: off)")
    p.add_argument("--mixstyle-stages", nargs="*", type=int, default=[1, 2],
                   help="trunk feature stages (0: stem) whose outputs MixStyle mixes")
    p.add_argument("--synthetic", nargs="*", default=[], help="folders of GAN images (for --balance gan)")
    p.add_argument("--max-per-class", type=non_negative_int, default=0,
                   help="cap images per class (0: all); for quick runs")
    p.add_argument("--cut", nargs="*", default=[], help="CLASS=N: keep only N training images of CLASS (stress tests)")
    p.add_argument("--out", default="runs/default", help="run folder")
    fresh_or_not = p.add_mutually_exclusive_group()
    fresh_or_not.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    fresh_or_not.add_argument("--overwrite", action="store_true",
                              help="start afresh in an --out that holds an earlier run (its checkpoint and metrics "
                                   "are removed once the data is known to be usable)")
    p.add_argument("--init-from", default="", metavar="MODEL",
                   help="start from an exported model's weights (sha256 checked, same --config): fine-tune, e.g. "
                        "a model trained on packed images on a GPU, on the original images")
    p.add_argument("--export", default="", help="write the final model (safetensors + JSON sidecar) here")
    p.add_argument("--low-res", type=non_negative_int, default=0,
                   help="progressive resizing: train the first --low-res-epochs at this input size (px)")
    p.add_argument("--low-res-epochs", type=non_negative_int, default=0,
                   help="epochs trained at --low-res before the full size")
    p.add_argument("--final-augment", choices=sorted(AUGMENT_PRESETS), default=None,
                   help="augmentation preset of the last --final-augment-epochs (default: --augment throughout)")
    p.add_argument("--final-augment-epochs", type=non_negative_int, default=0)
    p.add_argument("--val-every", type=positive_int, default=1,
                   help="validate every N epochs and after the last (validation changes no weights)")
    p.add_argument("--ema", type=decay, default=0.999, help="weight-average decay per step (0: off)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the hardware computes bf16, else fp32 (see distributed.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed of the --cut/--max-per-class selection (default --seed); fix it to vary only training")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--cache-dir", default="runs/cache", help="where decoded images are cached")
    p.add_argument("--sentence-features", default="",
                   help="precomputed text-tower features (python -m training.text_features --write) instead of "
                        "the text model, for machines without it")
    return p.parse_args(argv)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns the generator the run's sampling and augmentation draw from."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class TrainingObjective(torch.nn.Module):
    """Everything that touches trainable weights in one forward, so DDP sees every
    parameter used exactly once per step (text projection and logit scale included)."""

    def __init__(self, model: DualEncoder, attribute_slices: list[slice], attribute_weight: float):
        super().__init__()
        self.model = model
        self.attribute_slices = attribute_slices
        self.attribute_weight = attribute_weight

    def forward(self, images, labels, attribute_targets, class_features, value_features, image_weights=None):
        image_emb = self.model.encode_image(images).float()
        with torch.autocast(images.device.type, enabled=False):  # losses in fp32 even under bf16 autocast
            return self._losses(image_emb, labels, attribute_targets, class_features, value_features, image_weights)

    def _losses(self, image_emb, labels, attribute_targets, class_features, value_features, image_weights):
        scale = self.model.scale()
        class_text = self.model.project_sentence_features(class_features)
        class_ids = torch.arange(class_text.shape[0], device=labels.device)
        contrastive = bidirectional_contrastive_loss(image_emb, class_text, labels, class_ids, scale, image_weights)["loss"]
        phrases = self.model.project_sentence_features(value_features)
        attributes = attribute_matching_loss(image_emb, phrases, self.attribute_slices, attribute_targets, scale)
        return contrastive + self.attribute_weight * attributes, contrastive, attributes


def input_size(full_size: int, epoch: int, args) -> int:
    """Training input size of `epoch` (0-based). Progressive resizing: a convolutional tower
    with group norm runs at any size, and a smaller input needs about (size/full)^2 of the
    FLOPs (wall time shrinks less: a 96 px step took 0.6 of a 128 px step here, an 80 px step
    as long as a 96 px one), so the early epochs run small and the last ones at the size the
    model is used at (no train/test size gap at the end)."""
    return args.low_res if args.low_res and epoch < args.low_res_epochs else full_size


def augment_preset(epoch: int, args) -> str:
    """Augmentation preset of `epoch` (0-based). Annealing: the strong preset teaches stain-,
    zoom- and blur-invariant features; a milder one for the last epochs lets the model fit the
    cells as the home lab images them (as detectors switch mosaic augmentation off at the end)."""
    final = args.final_augment and epoch >= args.epochs - args.final_augment_epochs
    return args.final_augment if final else args.augment


def train_one_epoch(model, objective, data, indices, features, optimizer, args, state, generator, weights, average):
    """One pass over `indices`; updates the weight average `average` (or None); returns the mean losses."""
    model.train()
    size = input_size(model.config.image_size, state["epoch"], args)
    augmentation = AUGMENT_PRESETS[augment_preset(state["epoch"], args)]
    sums, steps = {"loss": 0.0, "contrastive": 0.0, "attributes": 0.0}, 0
    n_batches = len(indices) // args.batch_size
    bar = tqdm(range(n_batches), desc=f"epoch {state['epoch'] + 1}/{args.epochs}", disable=state["rank"] != 0,
               mininterval=10)
    for b in bar:
        batch = indices[b * args.batch_size:(b + 1) * args.batch_size]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state["step"], state["total_steps"], args.lr, state["warmup"])
        labels = data.labels[batch].to(args.device)
        # the uint8 batch travels (4x fewer bytes than floats); the augmentation runs on the device
        images = augment_batch(data.images[batch].to(args.device), size, generator, augmentation)
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss, contrastive, attributes = objective(
                images, labels, data.attributes[batch].to(args.device),
                features.sample_class_features(generator).to(args.device),
                features.sample_attribute_features(generator).to(args.device),
                weights[labels] if weights is not None else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if average is not None:
            average.update(model)
        state["step"] += 1
        for key, value in (("loss", loss), ("contrastive", contrastive), ("attributes", attributes)):
            sums[key] += float(value.detach())
        steps += 1
        bar.set_postfix(loss=f"{sums['loss'] / steps:.3f}", scale=f"{float(model.scale().detach()):.1f}", refresh=False)
    return {k: v / max(1, steps) for k, v in sums.items()}


def load_training_data(args, config, panels, vocabulary: dict, rank: int, world: int):
    """Training items, class keys, the decoded training set, its synthetic mask, the val sets and
    the full steps each process takes per epoch.

    Images are decoded once into memory (see training/dataset.py); caps and cuts apply to real
    images only, synthetic (GAN) images are added on top."""
    data_seed = args.seed if args.data_seed is None else args.data_seed
    keys = all_class_keys(panels)  # the classes with sentences
    train_items = load_items(args.data, args.max_per_class, args.cut, data_seed, keys, announce=rank == 0)
    drawn = scan_as_class_keys(args.synthetic, keys, "--synthetic", announce=rank == 0)
    train_items += drawn
    drawn_paths = {item.path for item in drawn}
    synthetic = torch.tensor([item.path in drawn_paths for item in train_items])
    # one epoch length, from the mask the sampler draws with: checked before any image is decoded,
    # and the step count of the learning-rate schedule
    n_synthetic = int(synthetic.sum())
    epoch_images = epoch_length(len(train_items) - n_synthetic, n_synthetic, args.balance)
    steps = epoch_steps(epoch_images, args.batch_size, world, args.data)
    classes = sorted({item.label for item in train_items})
    attribute_table = read_attribute_table([(Path(c), Path(c).parent) for c in args.attributes])
    val_items = {folder: [i for i in as_class_keys(scan_class_folders(folder), keys)[0] if i.label in classes]
                 for folder in args.val}
    for folder, items in val_items.items():  # before the long decode: a NaN val accuracy helps no one
        if not items:
            raise UsageError(f"--val {folder}: no images of the trained classes ({', '.join(classes)})")
    cache_size = training_cache_size(config)
    train = build_dataset(train_items, classes, cache_size, attribute_table, vocabulary, Path(args.cache_dir))
    val_sets = [(folder, build_dataset(items, classes, config.image_size, {}, vocabulary, Path(args.cache_dir)))
                for folder, items in val_items.items()]
    if rank == 0:
        print(f"train: {len(train_items)} images, classes {class_counts(train_items)}", flush=True)
    return train_items, classes, train, synthetic, val_sets, steps


def close_epoch(model, average, optimizer, features, val_sets, state, losses, started, out, classes,
                rng_states: list[dict], validate: bool = True) -> None:
    """Rank 0 after each epoch: validate what will be exported (if `validate`), log, checkpoint atomically."""
    metrics = {"epoch": state["epoch"], "seconds": round(time.time() - started, 1), **losses,
               "logit_scale": float(model.scale().detach())}
    if validate:
        evaluated = average.shadow if average is not None else model
        prototypes = features.class_prototypes(evaluated)
        for folder, val in val_sets:
            metrics[f"val_acc/{Path(folder).parent.name}"] = panel_accuracy(evaluated, val, prototypes)
    print(json.dumps(metrics), flush=True)
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(metrics) + "\n")
    save_checkpoint(out, model, optimizer, average, state, classes, rng_states)


def build_model(config, panels, phrases, classes: list[str], generator, args, world: int, initial_state=None):
    """Model (from `initial_state` when given: --init-from), weight average, sentence features
    (frozen text tower, computed once), the DDP-wrapped objective and the optimiser."""
    model = DualEncoder(config, sentence_features=args.sentence_features or None).to(args.device)
    if initial_state is not None:  # before the weight average copies the model
        model.load_state_dict(initial_state, strict=True)
    average = WeightAverage(model, args.ema) if args.ema > 0 else None  # before the text encoder loads: not copied
    if args.mixstyle > 0:  # after the weight average is copied: training-mode hooks on the live model only
        MixStyleHooks.on_feature_stages(model.visual.trunk, args.mixstyle_stages, args.mixstyle, 0.1, generator)
    features = SentenceFeatureCache(model, panels, classes, phrases)
    objective = TrainingObjective(model, features.slices, args.attribute_weight)
    if world > 1:
        objective = torch.nn.parallel.DistributedDataParallel(objective)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    return model, average, features, objective, optimizer


def main(argv=None) -> int:
    """Train; exit status 2 with one line on stderr for a mistake in the command line or the data."""
    try:
        return run(parse_args(argv))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """Train as the parsed command line says; 0 when done."""
    check_paths(args)
    check_device(args.device)
    rank, world = setup_distributed()
    args.device = rank_device(args.device, world)
    args.precision = resolve_precision(args.precision, args.device, announce=rank == 0)  # config.json: resolved
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = seed_everything(args.seed + rank)
    config = model_config(args.config)
    out = Path(args.out)
    checkpoint = load_for_resume(out, config, args.config, rank) if args.resume else None
    # a resumed run's weights come from its checkpoint, which keeps where they started
    initial_state, init_from = (read_initial_weights(args.init_from, config) if args.init_from and checkpoint is None
                                else (None, (checkpoint or {}).get("init_from")))
    panels, phrases = load_panels(), load_attribute_phrases()
    vocabulary = {name: list(values) for name, values in phrases.items()}
    train_items, classes, train, synthetic, val_sets, steps_per_epoch = load_training_data(
        args, config, panels, vocabulary, rank, world)
    out.mkdir(parents=True, exist_ok=True)  # once the data is known to be usable
    if args.overwrite and rank == 0:  # a kill before epoch 1's checkpoint must not leave the old run to resume
        (out / "last.pt").unlink(missing_ok=True)
    model, average, features, objective, optimizer = build_model(config, panels, phrases, classes, generator,
                                                                 args, world, initial_state)
    state = {"epoch": 0, "step": 0, "rank": rank, "total_steps": steps_per_epoch * args.epochs,
             "warmup": min(300, steps_per_epoch), "precision": args.precision, "init_from": init_from,
             "run_args": run_args(args)}
    if checkpoint is not None:
        resume_from(checkpoint, out, model, optimizer, average, state, generator, args, world)
    weights = class_weights(train.labels, len(classes)).to(args.device) if args.balance == "reweight" else None
    groups = class_groups(classes, panels)
    if rank == 0:
        keep_metrics_up_to(out / "metrics.jsonl", state["epoch"])
        write_run_config(out, args, config, classes)

    # ---- training loop: checkpoint and validate every epoch ----
    while state["epoch"] < args.epochs:
        started = time.time()
        indices = rank_epoch_indices(train.labels, args.balance, generator, rank, world, args.seed, state["epoch"],
                                     synthetic, groups)
        losses = train_one_epoch(model, objective, train, indices, features, optimizer, args, state, generator,
                                 weights, average)
        state["epoch"] += 1
        rng_states = gather_rng_states(generator, world)  # the states the next epoch starts from
        if rank == 0:
            validate = state["epoch"] % args.val_every == 0 or state["epoch"] == args.epochs
            close_epoch(model, average, optimizer, features, val_sets, state, losses, started, out, classes,
                        rng_states, validate)

    if rank == 0 and args.export:
        export(model, panels, phrases, train_items, args, out, average, init_from=state["init_from"])
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
