"""Shared fixtures: a tiny random dual encoder saved as a real safetensors bundle, and
images the tests draw themselves. Nothing downloads; everything runs on CPU in seconds."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import streamlit as st
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from core.store import make_engine, make_sessionmaker  # noqa: E402
from core.checkpoint import ModelBundle, load_bundle, save_bundle  # noqa: E402
from core.config import load_model_config  # noqa: E402
from core.model import DualEncoder  # noqa: E402
from core.panels import PANELS_FILE, load_attribute_phrases, load_panels  # noqa: E402


def make_tiny_bundle(seed: int = 0) -> ModelBundle:
    """Random tiny-test model with random unit prototypes for every shipped panel."""
    torch.manual_seed(seed)
    model = DualEncoder(load_model_config("tiny-test")).eval()
    dim = model.config.embed_dim
    panels = load_panels()
    prototypes = {name: F.normalize(torch.randn(len(p.classes), dim), dim=-1) for name, p in panels.items()}
    phrases = load_attribute_phrases()
    attributes = {name: F.normalize(torch.randn(len(values), dim), dim=-1) for name, values in phrases.items()}
    trained = [k for p in panels.values() if p.validated for k in p.keys]
    centroids = {k: F.normalize(torch.randn(dim), dim=-1) for k in trained}
    sidecar = {"model_id": "tiny-test-random", "panels": json.loads(PANELS_FILE.read_text()),
               "attribute_phrases": phrases, "trained_classes": trained,
               "training": {"command": "tests/conftest.py make_tiny_bundle (random weights)"}}
    return ModelBundle(model, sidecar, panels, prototypes, attributes, centroids)


def tiny_calibration_inputs(root: Path, train_per_class: int, val_per_class: int) -> tuple[Path, Path, Path]:
    """(model, train, val) under `root`: a tiny random model on disk and drawn class trees of every
    blood_cells class, as training.calibrate takes them."""
    model = root / "model.safetensors"
    save_bundle(make_tiny_bundle(), model)
    keys = list(make_tiny_bundle().panels["blood_cells"].keys)
    train = write_class_tree(root / "train", {k: train_per_class for k in keys}, size=48)
    return model, train, write_class_tree(root / "val_tree", {k: val_per_class for k in keys}, size=48)


# An atypical-answer band (core.typicality) as training.calibrate stores it, v18's numbers
BAND = {"threshold": 8.0, "share": 0.1, "n_held_out_above": 96, "accuracy_above": 0.9375,
        "n_held_out_below": 723, "accuracy_below": 0.9848}


def save_calibrated_tiny(path: Path, out_of_scope_threshold: float = 1e9, band_threshold: float | None = None,
                         **calibration) -> Path:
    """A tiny random model whose blood_cells panel is calibrated as given (temperature 1, no
    confidence threshold: every cell the out-of-scope threshold keeps is answered), with the
    atypical band at `band_threshold` if one is given; written to `path` (its folder created)."""
    bundle = make_tiny_bundle()
    fit = {"temperature": 1.0, "min_confidence": 0.0, "out_of_scope_threshold": out_of_scope_threshold}
    if band_threshold is not None:
        fit["typicality"] = {**BAND, "threshold": band_threshold}
    bundle.sidecar["calibration"] = {"panels": {"blood_cells": fit}, "out_of_scope": {"coverage_on_val": 0.99},
                                     **calibration}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_bundle(bundle, path)
    return path


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A tiny random model written to disk (weights + sidecar)."""
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_bundle(make_tiny_bundle(), path)
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model_path) -> ModelBundle:
    return load_bundle(tiny_model_path)


def draw_cell(size: int = 96, kind: int = 0, seed: int = 0) -> Image.Image:
    """A synthetic 'cell': pink background, a purple nucleus whose shape depends on `kind`."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), (235, 200, 205))
    draw = ImageDraw.Draw(image)
    c = size // 2 + int(rng.integers(-4, 5))
    r = size // 3
    draw.ellipse((c - r, c - r, c + r, c + r), fill=(200, 170, 210))
    if kind % 2 == 0:
        draw.ellipse((c - r // 2, c - r // 2, c + r // 2, c + r // 2), fill=(90, 40, 120))
    else:
        draw.ellipse((c - r // 2 - 6, c - 6, c - 2, c + 6), fill=(90, 40, 120))
        draw.ellipse((c + 2, c - 6, c + r // 2 + 6, c + 6), fill=(90, 40, 120))
    noise = rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


@pytest.fixture
def cell_image() -> Image.Image:
    return draw_cell()


def write_class_tree(root: Path, classes: dict[str, int], size: int = 64) -> Path:
    """root/<class>/<i>.png with `n` drawn cells per class; returns root."""
    for k, (name, n) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            draw_cell(size, kind=k, seed=i).save(folder / f"{name}_{i}.png")
    return root


def cell_png_bytes(size: int = 96, kind: int = 0, seed: int = 0) -> bytes:
    """A drawn cell encoded as PNG bytes, as an upload would arrive."""
    import io

    buffer = io.BytesIO()
    draw_cell(size, kind=kind, seed=seed).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def app_env(tiny_model_path, tmp_path, monkeypatch):
    """Environment of one app: tiny model, fresh SQLite file, upload and sample folders."""
    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(2):
        (samples / f"cell_{i}.png").write_bytes(cell_png_bytes(96, kind=i, seed=i))
    db_url = f"sqlite:///{tmp_path / 'feedback.sqlite'}"
    monkeypatch.setenv("HEMASCRIBE_MODEL", str(tiny_model_path))
    monkeypatch.setenv("HEMASCRIBE_DB_URL", db_url)
    monkeypatch.setenv("HEMASCRIBE_UPLOAD_DIR", str(tmp_path / "uploads"))
    monkeypatch.setenv("HEMASCRIBE_SAMPLES_DIR", str(samples))
    st.cache_resource.clear()
    engine = make_engine(db_url)
    yield SimpleNamespace(db_url=db_url, samples=samples, uploads=tmp_path / "uploads",
                          sessionmaker=make_sessionmaker(engine))
    engine.dispose()
    st.cache_resource.clear()


def write_format1_index(folder: Path, refuse: dict[str, str] | None = None) -> None:
    """Rewrite the gallery index in `folder` as the code before format 2 wrote it (no decode
    bound per entry, no limits per refusal; a reviewed case with one plain label, verified, and
    no per-panel labels); the files of `refuse` (path -> reason) move from the rows to the
    refusals, or keep their refusal with that reason, as the old 512 px bound refused strips over
    32:1."""
    refuse = refuse or {}
    manifest = json.loads((folder / "manifest.json").read_text())
    matrix = np.load(folder / manifest["matrix"])
    keep = [row for row, entry in enumerate(manifest["items"]) if entry["path"] not in refuse]
    items = []
    for row in keep:
        entry = dict(manifest["items"][row])
        expert = entry.pop("expert_labels", ())
        entry.pop("max_side", None)
        if entry["source"] == "reviewed" and expert:
            entry["label"], entry["verified"] = expert[-1][1], True  # the old single label
        items.append(entry)
    skipped = {path: {"key": entry["key"], "reason": refuse.get(path, entry["reason"])}
               for path, entry in manifest["skipped"].items()}  # the old shape: no limits
    skipped.update({entry["path"]: {"key": entry["key"], "reason": refuse[entry["path"]]}
                    for entry in manifest["items"] if entry["path"] in refuse})
    (folder / manifest["matrix"]).unlink()
    np.save(folder / "embeddings-format1.npy", matrix[keep])
    manifest.update(format=1, matrix="embeddings-format1.npy", items=items, skipped=skipped)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def counted(monkeypatch):
    """Counts the images the gallery passes to embed_checked (what an index update embeds)."""
    from core import gallery

    calls = []
    real = gallery.embed_checked

    def counting(bundle, images):
        calls.append(len(images))
        return real(bundle, images)

    monkeypatch.setattr(gallery, "embed_checked", counting)
    return calls


# Store tests run on SQLite, and also on PostgreSQL where HEMASCRIBE_TEST_PG_URL is set (.ci/run does)
PG_URL = os.environ.get("HEMASCRIBE_TEST_PG_URL")
BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.skipif(
        not PG_URL, reason="set HEMASCRIBE_TEST_PG_URL to run against PostgreSQL")),
]
def pg_url_with_schema(schema: str, **options: str) -> str:
    """The test PostgreSQL URL with `schema` as its search path (and other server options)."""
    opts = " ".join([f"-csearch_path={schema}"] + [f"-c{k}={v}" for k, v in options.items()])
    return make_url(PG_URL).update_query_dict({"options": opts}).render_as_string(
        hide_password=False)


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path):
    """A URL to an empty database: a fresh SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'feedback.sqlite'}"
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    yield pg_url_with_schema(schema)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    admin.dispose()
