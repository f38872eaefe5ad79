"""GAN checkpoints: safetensors weights plus a JSON sidecar, verified by sha256 at load.

One file holds the generator (``g.*``), its EMA copy when trained with one (``g_ema.*``)
and the discriminator (``d.*``), so training resumes from it; sampling uses the EMA
generator when present. The sidecar carries the config, the class list (index = label),
the step, the seed, the data the GAN saw (per class, so an ablation can check that the GAN
never saw real images its classifier run did not) and the weights' sha256. Optimizer
state for resuming lives in a separate torch file (plain tensors, loaded weights_only).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from core.checkpoint import ModelLoadError, file_sha256, publish_safetensors, sidecar_path
from core.gan import Discriminator, GanConfig, Generator

GAN_FORMAT = "hemascribe-gan"


@dataclass
class GanCheckpoint:
    """A loaded GAN: the generator to sample from and the file it came from."""
    generator: Generator  # the generator to sample from (EMA when available), eval mode
    sidecar: dict  # the JSON sidecar as saved
    path: Path  # weights file it came from
    tensors: dict[str, torch.Tensor]  # every tensor of the file (for resuming training)

    @property
    def classes(self) -> list[str]:
        return list(self.sidecar["classes"])

    @property
    def sha256(self) -> str:
        return self.sidecar["weights_sha256"]

    def label(self, class_name: str) -> int:
        """Class index of `class_name`; ValueError naming the known classes otherwise."""
        if class_name not in self.classes:
            raise ValueError(f"The GAN {self.path.name} knows no class {class_name!r}; it knows {self.classes}")
        return self.classes.index(class_name)


def _prefixed(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_gan(path: Path | str, generator: Generator, discriminator: Discriminator,
             ema: Generator | None, sidecar: dict) -> Path:
    """Write weights then sidecar, each via a temp file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {**_prefixed(generator, "g"), **_prefixed(discriminator, "d")}
    if ema is not None:
        tensors.update(_prefixed(ema, "g_ema"))
    publish_safetensors(path, tensors, {"format": GAN_FORMAT},
                        dict(sidecar, format=GAN_FORMAT, config=generator.config.to_dict(),
                             sampling_weights="g_ema" if ema is not None else "g"))
    return path


def _state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def load_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, name: str) -> None:
    """Strictly load the `prefix.*` tensors into `module`; ModelLoadError on a mismatch."""
    try:
        module.load_state_dict(_state(tensors, prefix), strict=True)
    except RuntimeError as error:
        raise ModelLoadError(f"{name}: the {prefix!r} weights do not match the config: {error}") from error


def load_gan(path: Path | str) -> GanCheckpoint:
    """Load and verify a GAN checkpoint: ModelLoadError when files are missing, the sha256
    differs from the sidecar's, or the weights do not fit the config."""
    path = Path(path)
    side = sidecar_path(path)
    if not path.is_file() or not side.is_file():
        raise ModelLoadError(f"GAN checkpoint not found: {path} (and its sidecar {side.name} beside it)")
    sidecar = json.loads(side.read_text())
    if sidecar.get("format") != GAN_FORMAT:
        raise ModelLoadError(f"{side} is not a HemaScribe GAN sidecar (format {sidecar.get('format')!r})")
    actual = file_sha256(path)
    if actual != sidecar.get("weights_sha256"):
        raise ModelLoadError(f"Refusing to load {path.name}: its sha256 {actual[:12]}... does not match the "
                             f"sidecar's {str(sidecar.get('weights_sha256'))[:12]}... (changed or corrupted).")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ModelLoadError(f"{path.name} is not a readable safetensors file: {error}") from error
    generator = Generator(GanConfig.from_dict(sidecar["config"]))
    load_module(generator, tensors, sidecar.get("sampling_weights", "g"), path.name)
    generator.eval()
    return GanCheckpoint(generator, sidecar, path, tensors)
