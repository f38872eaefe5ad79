"""Settings read from environment variables, all prefixed ``HEMASCRIBE_``.

One frozen dataclass so every module sees the same values; `load_settings()` reads the
environment each time it is called (tests set variables and call it again).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = PROJECT_ROOT / "assets"
DEFAULT_MODEL_PATH = ASSETS_DIR / "model" / "hemascribe_default.safetensors"


@dataclass(frozen=True)
class Settings:
    """Where the app finds its model, database and images (environment variables, defaults)."""
    model_path: Path  # safetensors weights; the JSON sidecar lies beside it
    db_url: str  # any SQLAlchemy URL; SQLite file by default
    upload_dir: Path  # stored copies of uploads, named by content hash
    samples_dir: Path  # redistributable sample images shown in the app
    gallery_dir: Path | None  # atlas gallery folder (optional)
    gallery_cache_dir: Path  # gallery embeddings, one sub-folder per model and gallery
    max_upload_mb: float  # refuse larger uploads before decoding
    max_pixels: int  # decompression-bomb guard: refuse headers declaring more pixels
    text_model: str | None  # override of the text tower (HF name or local path)
    torch_threads: int  # CPU threads for inference; 1 keeps sessions from fighting over 2 cores


class SettingsError(ValueError):
    """A setting whose value cannot be used; the message names the variable and the value."""


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"HEMASCRIBE_{name}", default)


def _positive(name: str, default: str, kind: type):
    """The variable as a positive int or float, or SettingsError saying what is wrong."""
    raw = _env(name, default)
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not value > 0 or value != value or value == float("inf"):
        what = "a positive whole number" if kind is int else "a positive number"
        raise SettingsError(f"HEMASCRIBE_{name} must be {what}, not {raw!r} (default {default})")
    return value


def load_settings() -> Settings:
    """Read the current settings from the environment (defaults in README). Raises
    SettingsError for a number setting that is not a positive number."""
    data_dir = Path(_env("DATA_DIR", str(PROJECT_ROOT / "var")))
    gallery = _env("GALLERY_DIR")
    return Settings(
        model_path=Path(_env("MODEL", str(DEFAULT_MODEL_PATH))),
        db_url=_env("DB_URL", f"sqlite:///{data_dir / 'hemascribe.sqlite'}"),
        upload_dir=Path(_env("UPLOAD_DIR", str(data_dir / "uploads"))),
        samples_dir=Path(_env("SAMPLES_DIR", str(ASSETS_DIR / "samples"))),
        gallery_dir=Path(gallery) if gallery else None,
        gallery_cache_dir=Path(_env("GALLERY_CACHE_DIR", str(data_dir / "gallery_cache"))),
        max_upload_mb=_positive("MAX_UPLOAD_MB", "50", float),
        max_pixels=_positive("MAX_PIXELS", str(60_000_000), int),
        text_model=_env("TEXT_MODEL"),
        torch_threads=_positive("TORCH_THREADS", "1", int),
    )
