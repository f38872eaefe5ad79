"""Saving and loading models: safetensors weights plus a JSON sidecar.

The sidecar holds everything needed to rebuild and trust the model: its config, the panels
and attribute phrases it was trained with, the class prototypes' order, val metrics,
calibration, the data it saw, the command that trained it and the sha256 of the weights
file, checked at every load. Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from core.atomic import atomic_write_bytes, atomic_write_text
from core.config import ModelConfig
from core.model import VIEW_COUNTS, DualEncoder
from core.neighbours import ReferenceIndex, reference_tensors, references_from_tensors
from core.panels import Panel, panels_from_dict
from core.sidecar_checks import check_sidecar

FORMAT_VERSION = 1


# a panel's calibration entries that decide what is answered and with what confidence
DECISIVE_CALIBRATION = ("temperature", "distance_slope", "distance_reference", "min_confidence",
                        "out_of_scope_threshold", "degenerate")
# added in session 17; counted only where present, so earlier calibrations keep their ids
NEIGHBOUR_CALIBRATION = ("neighbours", "min_agreement")


class ModelLoadError(RuntimeError):
    """The model files are missing, tampered with or unreadable (message says which)."""


@dataclass
class ModelBundle:
    """A loaded model with everything describing needs: panels, prototypes, calibration, reference cells."""
    model: DualEncoder  # in eval mode
    sidecar: dict  # the JSON sidecar as saved
    panels: dict[str, Panel]  # panels the model knows, from the sidecar
    prototypes: dict[str, torch.Tensor]  # panel -> (K, D) unit-norm class embeddings
    attribute_prototypes: dict[str, torch.Tensor] = field(default_factory=dict)  # attribute -> (V, D)
    centroids: dict[str, torch.Tensor] = field(default_factory=dict)  # class -> (D,) mean train image embedding
    ood_precision: torch.Tensor | None = None  # (D, D) inverse within-class covariance (Mahalanobis score)
    path: Path | None = None  # weights file it came from
    references: dict[str, torch.Tensor] = field(default_factory=dict)  # class -> (n, D) training image embeddings
    # Grad-CAM registers hooks on the shared model; this lock keeps one session's hooks from
    # seeing another session's forward pass. Forward passes are CPU-bound, so little is lost.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    _reference_indexes: dict = field(default_factory=dict, repr=False, compare=False)

    def set_references(self, references: dict[str, torch.Tensor]) -> None:
        """Replace the reference cells (training.calibrate), dropping the stacked indexes."""
        with self.lock:
            self.references = references
            self._reference_indexes.clear()

    def reference_index(self, panel: str) -> ReferenceIndex:
        """The reference cells of the panel's classes (core.neighbours), stacked on first use."""
        with self.lock:  # sessions share the bundle: stack once
            if panel not in self._reference_indexes:
                self._reference_indexes[panel] = ReferenceIndex(self.references, self.panels[panel].keys)
            return self._reference_indexes[panel]

    @property
    def model_id(self) -> str:
        return self.sidecar.get("model_id", "unknown")

    @property
    def weights_sha256(self) -> str:
        return self.sidecar.get("weights_sha256", "")

    @property
    def views(self) -> int:
        """Turned copies each image is embedded as (`core.model.encode_views`): the number the
        calibration was fitted with (1 for a sidecar that names none)."""
        views = (self.sidecar.get("calibration") or {}).get("views", 1)
        # a hand-edited sidecar (4.0, "4", true, 3) is read as one view, never a crash
        return views if type(views) is int and views in VIEW_COUNTS else 1

    @property
    def embedding_id(self) -> str:
        """What made an image embedding: the weights, and the views when more than one (a gallery
        cache embedded one way is not read by a model that embeds another)."""
        return self.weights_sha256 if self.views == 1 else f"{self.weights_sha256}+views{self.views}"

    @property
    def calibration_id(self) -> str | None:
        """First 12 hex digits of the sha256 of what in the sidecar's calibration decides an answer
        (each panel's temperature, slope, thresholds and band; the phrase thresholds), as canonical
        JSON; None when uncalibrated. A recalibration (`training.calibrate --keep-centroids`) changes
        them but not the weights: this tells stored answers apart. Reports, the command line and the
        method text are left out, so re-running with the same numbers keeps the id."""
        calibration = self.sidecar.get("calibration")
        if not calibration:
            return None
        decisive = {"attributes": calibration.get("attributes"),
                    "panels": {name: {key: fit.get(key) for key in DECISIVE_CALIBRATION}
                               | {key: fit[key] for key in NEIGHBOUR_CALIBRATION if key in fit}
                               | {"typicality": (fit.get("typicality") or {}).get("threshold")}
                               for name, fit in (calibration.get("panels") or {}).items()}}
        if self.views != 1:  # only then: single-view calibrations keep their ids
            decisive["views"] = self.views
        return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:12]


def sidecar_path(weights_path: Path | str) -> Path:
    """``model.safetensors`` -> ``model.json``."""
    return Path(weights_path).with_suffix(".json")


def file_sha256(path: Path | str) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def publish_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                        sidecar: dict) -> dict:
    """Write `tensors` as safetensors at `path` and `sidecar` (plus the weights' sha256) beside
    it, each via a temp file and an atomic rename, weights first; returns the sidecar written.
    The bytes are serialised in memory (a model is tens of MB), hashed there and written with a
    plain ``open``: safetensors' own ``save_file`` creates files 0600, so a model exported for a
    team or a web server would be readable by its owner only; these follow the umask."""
    data = save(tensors, metadata=metadata)
    sidecar = dict(sidecar, weights_sha256=hashlib.sha256(data).hexdigest())
    atomic_write_bytes(path, data)
    atomic_write_text(sidecar_path(path), json.dumps(sidecar, indent=2))
    return sidecar


def save_bundle(bundle: ModelBundle, path: Path | str) -> Path:
    """Write weights and sidecar atomically (temp files then rename), return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()}
    tensors.update({f"bank.{k}": v.cpu().contiguous() for k, v in bundle.prototypes.items()})
    tensors.update({f"attr.{k}": v.cpu().contiguous() for k, v in bundle.attribute_prototypes.items()})
    tensors.update({f"centroid.{k}": v.cpu().contiguous() for k, v in bundle.centroids.items()})
    if bundle.ood_precision is not None:
        tensors["ood.precision"] = bundle.ood_precision.cpu().contiguous()
    tensors.update(reference_tensors(bundle.references))
    bundle.sidecar = publish_safetensors(
        path, tensors, {"format": "hemascribe", "version": str(FORMAT_VERSION)},
        dict(bundle.sidecar, format_version=FORMAT_VERSION, config=bundle.model.config.to_dict()))
    return path


def _read_sidecar(path: Path) -> dict:
    side = sidecar_path(path)
    if path.is_dir():
        raise ModelLoadError(f"Model weights expected, but {path} is a folder (name the .safetensors file)")
    if not path.is_file():
        raise ModelLoadError(f"Model weights not found: {path}")
    if not side.is_file():
        raise ModelLoadError(f"Model sidecar not found: {side} (it must lie beside the weights)")
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"Model sidecar {side} is not valid JSON: {error}") from error
    if not isinstance(data, dict):  # valid JSON, but not a sidecar: every reader expects an object
        raise ModelLoadError(f"Model sidecar {side} is not a model sidecar (a JSON object is expected)")
    return data


def read_verified_tensors(path: Path | str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(sidecar, tensors) of a model file whose sha256 matches its sidecar's; ModelLoadError when
    the files are missing or malformed or the hash differs (nothing is unpickled)."""
    path = Path(path)
    sidecar = _read_sidecar(path)
    try:  # read once, hash and parse these very bytes: a model published in between cannot slip in
        data = path.read_bytes()
    except OSError as error:
        raise ModelLoadError(f"{path.name} cannot be read: {error.strerror or error}") from error
    actual = hashlib.sha256(data).hexdigest()
    if not sidecar.get("weights_sha256"):
        raise ModelLoadError(f"Refusing to load {path.name}: its sidecar records no weights_sha256, so the "
                             "weights cannot be verified (export the model again: python -m training.export_model).")
    if actual != sidecar.get("weights_sha256"):
        raise ModelLoadError(f"Refusing to load {path.name}: its sha256 {actual[:12]}... does not match "
                             f"the sidecar's {str(sidecar.get('weights_sha256'))[:12]}... "
                             "(the file was changed or corrupted).")
    try:
        return sidecar, load(data)
    except (SafetensorError, OSError) as error:
        raise ModelLoadError(f"{path.name} is not a readable safetensors file: {error}") from error


def model_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DualEncoder state dict inside a model file's tensors (keys ``model.*``)."""
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def _sidecar_config(sidecar: dict, path: Path) -> ModelConfig:
    """The model config the sidecar records (ModelLoadError when it is missing or malformed:
    the weights cannot be rebuilt without it)."""
    try:
        return ModelConfig.from_dict(sidecar["config"])
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise ModelLoadError(f"{sidecar_path(path).name}: its 'config' entry is missing or malformed "
                             f"({type(error).__name__}: {error})") from error


def load_bundle(path: Path | str, text_model_override: str | None = None) -> ModelBundle:
    """Load and verify a model: refuses (ModelLoadError) when the weights' sha256 differs
    from the sidecar's, or when the files are missing or malformed."""
    path = Path(path)
    sidecar, tensors = read_verified_tensors(path)
    model = DualEncoder(_sidecar_config(sidecar, path), text_model_override)
    try:
        model.load_state_dict(model_state(tensors), strict=True)
    except RuntimeError as error:
        raise ModelLoadError(f"{path.name} does not match its config: {error}") from error
    try:
        panels = panels_from_dict(sidecar["panels"])
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise ModelLoadError(f"{sidecar_path(path).name}: its 'panels' entry is missing or malformed "
                             f"({type(error).__name__}: {error})") from error
    model.eval()
    prototypes = {k[len("bank."):]: v for k, v in tensors.items() if k.startswith("bank.")}
    attributes = {k[len("attr."):]: v for k, v in tensors.items() if k.startswith("attr.")}
    try:
        check_sidecar(sidecar, panels, prototypes, attributes)
    except ValueError as error:
        raise ModelLoadError(f"{sidecar_path(path).name} does not fit its weights: {error}") from error
    centroids = {k[len("centroid."):]: v for k, v in tensors.items() if k.startswith("centroid.")}
    return ModelBundle(model, sidecar, panels, prototypes, attributes,
                       centroids, ood_precision=tensors.get("ood.precision"), path=path,
                       references=references_from_tensors(tensors))


def load_sidecar(weights_path: Path | str) -> dict:
    """The sidecar of a weights file (ModelLoadError when missing or malformed)."""
    return _read_sidecar(Path(weights_path))


def update_sidecar(weights_path: Path | str, updates: dict) -> dict:
    """Merge `updates` into the sidecar (atomically). The weights, and so their sha256,
    are untouched: reports and metrics can be added after training."""
    side = sidecar_path(weights_path)
    data = _read_sidecar(Path(weights_path))
    data.update(updates)
    atomic_write_text(side, json.dumps(data, indent=2))
    return data
