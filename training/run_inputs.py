"""What `training.train` reads, checked before any work: the folders and files it is given,
the class folders in them (read as class keys), --cut, --batch-size and --config.

A mistake there is a `UsageError`: ``training.train`` prints its message as one line on
stderr and exits with status 2, never with a traceback.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from core.config import ModelConfig, load_model_config
from core.data import LabelledImage, as_class_keys, class_key_for_folder, scan_class_folders


class UsageError(Exception):
    """A mistake in the command line or the data layout; the message says what to change."""


def is_new_or_empty_folder(path: Path) -> bool:
    """True when `path` does not exist or is an empty folder: an output folder that holds no
    earlier run's files to be read as this run's."""
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def check_paths(args) -> None:
    """Every folder and file of the command line exists (else a UsageError naming it)."""
    for flag, folders in (("--data", args.data), ("--val", args.val), ("--synthetic", args.synthetic)):
        for folder in folders:
            if not Path(folder).is_dir():
                what = "a file, not a folder" if Path(folder).exists() else "no such folder"
                raise UsageError(f"{flag} {folder}: {what} (expected a folder with a sub-folder per class)")
    for path in args.attributes:
        if not Path(path).is_file():
            what = "a folder, not a file" if Path(path).is_dir() else "no such file"
            raise UsageError(f"--attributes {path}: {what}")
    initial = getattr(args, "init_from", "")
    resuming = args.resume and (Path(args.out) / "last.pt").exists()  # then the checkpoint's weights are read
    if initial and not resuming and not Path(initial).is_file():
        raise UsageError(f"--init-from {initial}: no such file (expected an exported model's .safetensors)")
    check_output_file("--export", getattr(args, "export", ""))
    # checked before the process group forms: every rank reads the same answer or none starts
    refuse_earlier_run(Path(args.out), "last.pt", "an earlier run", args)
    features = getattr(args, "sentence_features", "")
    if features and not Path(features).is_file():
        raise UsageError(f"--sentence-features {features}: no such file (write it with "
                         "python -m training.text_features --write FILE)")


def refuse_earlier_run(out: Path, marker: str, what: str, args) -> None:
    """UsageError when `out` holds `marker` (an earlier run's file) and neither --resume nor
    --overwrite says what to do with it: a run is continued or replaced, never silently."""
    if not args.resume and not args.overwrite and (out / marker).exists():
        raise UsageError(f"--out {out} holds {what} ({marker}): pass --resume to continue it, --overwrite "
                         "to replace it, or choose another --out")


def check_output_file(flag: str, path: str) -> None:
    """A file a run writes at its end can be written there (else a UsageError now, not after
    hours of training): not an existing folder, and no existing file where a folder must be."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {path}: a folder; give a file name, e.g. {target / 'model.safetensors'}")
    parent = next(p for p in target.absolute().parents if p.exists())  # the root exists, so one does
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, so no folder can be made there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {parent} is not writable by this user")


def check_device(device: str) -> None:
    """A device this machine has (else a UsageError): ``--device cuda`` on a machine without a GPU
    failed deep inside the model's first move, with a traceback, after every image was decoded."""
    try:
        wanted = torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"--device {device}: not a device name (e.g. cpu, cuda, cuda:1)") from error
    if wanted.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {device}: this machine has no CUDA GPU that torch can use; use --device cpu")
        if wanted.index is not None and wanted.index >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA GPU(s), numbered from 0")


def parse_cuts(cuts: list[str]) -> dict[str, int]:
    """{class: N} from --cut CLASS=N arguments."""
    limits = {}
    for cut in cuts:
        name, _, count = cut.partition("=")
        if not name or not count.isdigit():
            raise UsageError(f"--cut {cut!r}: expected CLASS=N, e.g. neutrophil=50")
        limits[name] = int(count)
    return limits


def scan_as_class_keys(folders: list[str], keys: set[str], flag: str = "--data",
                       announce: bool = True) -> list[LabelledImage]:
    """Images of every folder labelled with class keys (`as_class_keys`); a UsageError naming
    every class folder that means no key, with the valid keys (training needs each class's
    sentences, so an unknown folder cannot be trained)."""
    items, unknown = [], []
    for folder in folders:
        found, renamed = as_class_keys(scan_class_folders(folder), keys)
        unknown += [str(Path(folder) / label) for label in sorted({i.label for i in found}) if label not in keys]
        for name, key in renamed.items() if announce else ():  # once, not by every DDP rank
            print(f"folder {str(Path(folder) / name)!r} read as class {key!r}", flush=True)
        items += found
    if unknown:
        raise UsageError(f"{flag}: class folder(s) {', '.join(unknown)} name no class of assets/panels.json; "
                         f"rename each to one of {', '.join(sorted(keys))} (case, spaces and hyphens are ignored)")
    return items


def load_items(folders: list[str], max_per_class: int, cuts: list[str], seed: int,
               keys: set[str] | None = None, announce: bool = True) -> list[LabelledImage]:
    """Labelled images of all folders, optionally capped/cut per class (seeded). With `keys`,
    folder names and --cut names are read as class keys (`scan_as_class_keys`)."""
    if keys:
        items = scan_as_class_keys(folders, keys, announce=announce)
        limits = {class_key_for_folder(name, keys): n for name, n in parse_cuts(cuts).items()}
    else:
        items = [item for folder in folders for item in scan_class_folders(folder)]
        limits = parse_cuts(cuts)
    rng = random.Random(seed)
    by_class: dict[str, list] = {}
    for item in items:
        by_class.setdefault(item.label, []).append(item)
    kept = []
    for label, group in sorted(by_class.items()):
        limit = limits.get(label, max_per_class or len(group))
        kept.extend(sorted(rng.sample(group, min(limit, len(group))), key=lambda i: str(i.path)))
    return kept


def epoch_steps(n_images: int, batch_size: int, world: int, folders: list[str]) -> int:
    """Full steps each process takes in an epoch of `n_images` (the length the sampler draws);
    a UsageError for a batch larger than one process's share. Refused rather than shrunk: the
    contrastive loss takes its negatives from the batch, so the batch size is a choice of
    objective, and a silently smaller batch would train another one than asked; a last partial
    batch is dropped every epoch for the same reason (and keeps DDP ranks in lockstep). So every
    epoch that passes has at least one full step, and the schedule counts these steps."""
    per_process = n_images // world
    if n_images == 0:
        raise UsageError(f"--data {' '.join(folders)}: no images found (expected DATA/<class>/<image files>)")
    if batch_size < 1 or batch_size > per_process:
        where = f" per process ({n_images} in all, {world} processes)" if world > 1 else ""
        raise UsageError(f"--batch-size {batch_size}: the training set has {per_process} images{where}, so no "
                         f"training step would run; use --batch-size {max(1, per_process)} or less")
    return per_process // batch_size


def model_config(name: str) -> ModelConfig:
    """The model config --config names (a UsageError whose message lists the configs there are)."""
    try:
        return load_model_config(name)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(f"--config: {error}") from error
