"""The run folder's checkpoint, OUT/last.pt, and resuming from it; its config.json and metrics.jsonl.

The checkpoint holds weights, optimiser, weight average, epoch, step, model config, classes
and the random number generators' states of every process, so a run resumed after epoch k
trains bit-identical weights to one that never stopped: augmentation, sampling, paraphrase
choice and MixStyle all draw from the seeded torch.Generator, and re-seeding it at resume
gave epoch k+1 other random numbers than the uninterrupted run. Everything is stored as
tensors and plain types, so the file loads with ``torch.load(weights_only=True)`` (nothing
is unpickled).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from core.atomic import atomic_write, atomic_write_text
from core.checkpoint import ModelLoadError, model_state, read_verified_tensors
from core.config import ModelConfig
from training.run_inputs import UsageError


def rng_state(generator: torch.Generator) -> dict:
    """This process's RNG states as tensors and plain types: the training generator, torch's
    global CPU generator, Python's `random` and NumPy's global state. Today a training step
    draws only from `generator`; the global ones are kept too so that code drawing from them
    later (a dropout, a library augmentation) cannot silently break resuming. The CUDA
    generators are not: nothing in a step draws from them (random numbers come from the CPU
    generator, also on a GPU), and a GPU run resumed on another GPU count could not restore them."""
    version, mt_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"generator": generator.get_state(), "torch": torch.get_rng_state(),
            "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def restore_rng_state(generator: torch.Generator, state: dict) -> None:
    """Undo `rng_state`: set every generator it saved to the saved state."""
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(int(x) for x in python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))


def gather_rng_states(generator: torch.Generator, world: int) -> list[dict]:
    """Every rank's `rng_state`, index = rank (a collective: every rank calls it). Each DDP
    rank has its own generator (seeded seed + rank), and only rank 0 writes the checkpoint."""
    mine = rng_state(generator)
    if world == 1:
        return [mine]
    states = [None] * world
    dist.all_gather_object(states, mine)  # pickled between processes only, never to disk
    return states


def save_checkpoint(out: Path, model, optimizer, average, state: dict, classes: list[str],
                    rng_states: list[dict]) -> None:
    """Write OUT/last.pt atomically (temp file, then rename)."""
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": state["epoch"],
                  "step": state["step"], "config": model.config.to_dict(), "classes": classes, "rng": rng_states,
                  "precision": state.get("precision"), "init_from": state.get("init_from"),
                  "run_args": state.get("run_args")}
    if average is not None:
        checkpoint["average"] = average.state_dict()
    atomic_write(out / "last.pt", lambda handle: torch.save(checkpoint, handle))


def config_differences(saved: ModelConfig, config: ModelConfig) -> list[str]:
    """Names of the fields in which two model configs differ."""
    wanted = config.to_dict()
    return [field for field, value in saved.to_dict().items() if wanted[field] != value]


def check_same_config(out: Path, checkpoint: dict, config: ModelConfig, asked: str) -> None:
    """UsageError unless the checkpoint was made with `config` (compared as ModelConfig, so
    fields added since it was saved take their defaults): otherwise loading it fails with a
    page of state_dict size mismatches."""
    saved = ModelConfig.from_dict(checkpoint.get("config", {"name": "?"}))
    if saved != config:
        raise UsageError(f"{out / 'last.pt'} was made with config {saved.name!r}, not --config {asked} "
                         f"(they differ in {', '.join(config_differences(saved, config))}); resume with "
                         f"--config {saved.name} or train into a new --out")


def load_for_resume(out: Path, config: ModelConfig, asked: str, rank: int) -> dict | None:
    """OUT/last.pt to resume from, checked against `config` before any data is decoded or model
    built; None (and a line on stderr) when the run folder holds no checkpoint."""
    if not (out / "last.pt").is_file():
        if rank == 0:
            # Not refused: a job script that may be preempted passes --resume on every launch,
            # the first one included; the line keeps a mistyped --out from going unnoticed.
            print(f"warning: no checkpoint in {out}, starting from scratch", file=sys.stderr, flush=True)
        return None
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    check_same_config(out, checkpoint, config, asked)
    return checkpoint


def resume_from(checkpoint: dict, out: Path, model, optimizer, average, state: dict, generator, args,
                world: int) -> None:
    """Continue from `checkpoint` (`load_for_resume`): weights, optimiser, weight average, epoch,
    step and this rank's random number generators."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if average is not None and "average" in checkpoint:
        average.load_state_dict(checkpoint["average"])
    state.update(epoch=checkpoint["epoch"], step=checkpoint["step"])
    saved = checkpoint.get("rng", [])
    if len(saved) == world:
        restore_rng_state(generator, saved[state["rank"]])
    else:  # a checkpoint from before RNG states were saved, or another number of processes
        generator.manual_seed(args.seed + state["rank"] + 1000 * state["epoch"])
        if state["rank"] == 0:
            print(f"warning: {out / 'last.pt'} holds no random number state for {world} process(es); "
                  "re-seeded, so the resumed run will not repeat an uninterrupted one exactly", file=sys.stderr)
    warn_changed_run_args(checkpoint.get("run_args"), state.get("run_args"), out, state["rank"])
    began = checkpoint.get("precision")  # None: a checkpoint from before it was recorded
    if began and began != args.precision and state["rank"] == 0:  # e.g. --precision auto on another machine
        print(f"warning: the run began in {began} and resumes in {args.precision}, so it will not repeat an "
              f"uninterrupted run; pass --precision {began} to keep it", file=sys.stderr)
    print(f"resumed from epoch {state['epoch']}", flush=True)


# What decides the schedule, the data and the augmentation of a run: a resume with other values
# trains other weights than the uninterrupted run (e.g. --epochs reshapes the cosine schedule).
RUN_ARGS = ("data", "epochs", "batch_size", "lr", "weight_decay", "attribute_weight", "balance", "augment",
            "mixstyle", "synthetic", "max_per_class", "cut", "low_res", "low_res_epochs", "final_augment",
            "final_augment_epochs", "ema", "seed", "data_seed")


def run_args(args) -> dict[str, str]:
    """The RUN_ARGS of a run as text, kept in its checkpoint."""
    return {name: str(getattr(args, name, None)) for name in RUN_ARGS}


def warn_changed_run_args(began: dict | None, now: dict | None, out: Path, rank: int) -> None:
    """A line on stderr naming the options a resume changes (None: a checkpoint from before they were kept)."""
    changed = [name for name in RUN_ARGS if began and now and began.get(name) != now.get(name)]
    if changed and rank == 0:
        listed = "; ".join(f"--{name.replace('_', '-')} {began.get(name)} -> {now.get(name)}" for name in changed)
        print(f"warning: resuming {out / 'last.pt'} with other options ({listed}): the run will not repeat an "
              "uninterrupted one", file=sys.stderr)


def read_metrics(run: Path) -> list[dict]:
    """The epoch lines of RUN/metrics.jsonl that parse: none before the first epoch, and a line
    being written (read while training runs) or torn by a kill is left out."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def keep_metrics_up_to(path: Path, epoch: int) -> None:
    """Drop the lines of OUT/metrics.jsonl after `epoch`, the epoch training starts from
    (atomically: temp file, then rename). An epoch's metrics line is written before its
    checkpoint, so a kill between the two leaves a line for an epoch the resumed run trains
    again; a torn line (a kill mid-write) goes too. On a fresh start (epoch 0) the previous
    run's lines go, as its last.pt is about to be overwritten and --export takes the final
    metrics from the last line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= epoch:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(kept))


def write_run_config(out: Path, args, config: ModelConfig, classes: list[str]) -> None:
    """OUT/config.json: arguments, model config, classes and command line, for whoever reads the run."""
    record = {"args": vars(args), "model": config.to_dict(), "classes": classes, "command": " ".join(sys.argv)}
    (out / "config.json").write_text(json.dumps(record, indent=2))


# Fields an --init-from run may change: the tower is convolutional with global pooling and the text
# side never sees pixels, so the same tensors fit any input size (the tower must then re-learn how
# large a cell is in pixels, hence a fine-tuning run, not a mere change of the config).
RESIZABLE_FIELDS = ("name", "image_size")


def read_initial_weights(path: Path | str, config: ModelConfig) -> tuple[dict, dict]:
    """(model state dict, provenance {file, model_id, weights_sha256}) of an exported model to start
    a run from (--init-from: fine-tuning; optimiser, schedule and weight average start afresh),
    checked before any image is decoded. UsageError when the file fails its sha256 check or was
    trained with another model config (compared as ModelConfig, as check_same_config does) beyond
    its name and input size (RESIZABLE_FIELDS; the provenance then records the old size)."""
    try:
        sidecar, tensors = read_verified_tensors(path)
        saved = ModelConfig.from_dict(sidecar.get("config") or {"name": "?"})
    except (ModelLoadError, TypeError, ValueError) as error:
        raise UsageError(f"--init-from: {error}") from error
    differences = [field for field in config_differences(saved, config) if field not in RESIZABLE_FIELDS]
    if differences:
        raise UsageError(f"--init-from {path}: trained with model config {saved.name!r}, not this run's "
                         f"{config.name!r} (they differ in {', '.join(differences)})")
    provenance = {"file": Path(path).name, "model_id": sidecar.get("model_id"),
                  "weights_sha256": sidecar["weights_sha256"]}
    if saved.image_size != config.image_size:
        provenance["image_size"] = saved.image_size  # fine-tuned at another input size
    return model_state(tensors), provenance
