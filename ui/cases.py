"""From uploaded bytes to described, recorded cases.

A *case* is one distinct image (by content hash) described against one panel by one model.
Cases live in a per-session dict so that Streamlit reruns (a slider move, a feedback click)
never describe or record the same image twice; the dict only keeps the current inputs.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

from core.checkpoint import ModelBundle
from core.data import IMAGE_SUFFIXES
from core.describe import Description, describe_batch
from core.explain import attribute_heatmap, class_heatmap
from core.imageio import ImageRejected, LoadedImage, load_image_bytes
from core.morphology import describe_morphology
from core.settings import Settings
from core.store import store_error_message
from ui.recording import record_prediction
from ui.resources import Store
from ui.widgets import kept_choice, md_escape, remember_choice

UPLOAD_TYPES = sorted(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES)  # .jfif / .jpe / .dib too
SAMPLE_EXCLUDE = frozenset({"gan_grid.png"})  # synthetic montage for the model card, not a case
BATCH = 16  # images per forward pass: bounded memory, and the progress bar moves
HEATMAP_CACHE_MAX = 64  # (128 px float maps: small; bounded so a long session cannot grow)


@dataclass(frozen=True)
class Input:
    """A file as it reached the page, before any check."""
    name: str  # file name as given by the browser or the sample folder (display only)
    data: bytes  # raw bytes, exactly as uploaded

    @cached_property
    def sha256(self) -> str:
        """Hash of the bytes, computed once per input (a rerun hashes each upload once)."""
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class Case:
    """One image on the Describe page: the loaded image or why it was refused, and its description."""
    sha256: str  # of the raw bytes
    file_name: str  # sanitised name (display only)
    loaded: LoadedImage | None = None  # None when refused
    error: str | None = None  # why the file was refused
    description: Description | None = None
    image_id: int | None = None  # store ids; None when not recorded
    prediction_id: int | None = None
    store_error: str | None = None  # why recording failed, if it did
    timings_ms: dict[str, float] = field(default_factory=dict)  # load / describe / store
    morphology: tuple[str, list] | None = None  # (sentence, phrase predictions), see case_morphology

    @property
    def label(self) -> str:
        """Sentence or 'Uncertain' for tables."""
        d = self.description
        return "Uncertain" if d is None or d.abstained else (d.sentence or "")


def list_samples(folder: Path) -> list[Path]:
    """Image files of the sample folder, sorted by name ([] when missing or empty)."""
    try:
        files = [p for p in Path(folder).iterdir()
                 if p.is_file() and p.suffix.lower().lstrip(".") in UPLOAD_TYPES and p.name not in SAMPLE_EXCLUDE]
    except OSError:
        return []
    return sorted(files, key=lambda p: p.name.lower())


KEPT_UPLOADS = "describe_uploads_kept"  # the uploads as Inputs, kept while other pages run
KEPT_SAMPLE_HASH = "describe_sample_sha256"  # the chosen sample's hash, kept while uploads are shown


def kept_hashes() -> frozenset[str]:
    """Hashes of the images the page would show again when its source is switched back (the kept
    uploads and the chosen sample): their cases stay in the cache, so flipping between uploads and
    samples never describes and records them anew (feedback would land on new prediction rows)."""
    kept = st.session_state.get(KEPT_UPLOADS) or []
    sample = st.session_state.get(KEPT_SAMPLE_HASH)
    return frozenset([item.sha256 for item in kept] + ([sample] if sample else []))


def _keep_uploads() -> None:
    """on_change of the uploader: keep the files as Inputs. Streamlit empties the uploader when
    another page runs; without this, a look at the model card would discard a batch of uploads
    and their cases. Removing the files in the uploader clears the kept ones too."""
    files = st.session_state.get("describe_upload") or []
    st.session_state[KEPT_UPLOADS] = [Input(f.name, f.getvalue()) for f in files]


def _uploaded_inputs() -> list[Input]:
    files = st.file_uploader("Upload one or several cell images", type=UPLOAD_TYPES, accept_multiple_files=True,
                             key="describe_upload", on_change=_keep_uploads)
    kept = st.session_state.get(KEPT_UPLOADS) or []
    if files:
        # the Inputs `_keep_uploads` made on the change: reused, so a rerun (a slider move) neither
        # copies nor hashes the batch again; built here only if they are out of step with the widget
        in_step = [(i.name, len(i.data)) for i in kept] == [(f.name, f.size) for f in files]
        return kept if in_step else [Input(f.name, f.getvalue()) for f in files]
    if kept:  # the uploader came back empty from another page: show the batch it held
        st.caption(f"Showing the {len(kept)} image{'s' if len(kept) != 1 else ''} uploaded earlier in this "
                   "session. Upload again to replace them.")
        if st.button("Clear these images", key="describe_clear_kept"):
            st.session_state.pop(KEPT_UPLOADS, None)
            st.rerun()
    return kept


def pick_inputs(current: Settings) -> list[Input]:
    """Source radio, then the uploader or the sample picker; returns the chosen images. The
    source, the sample and the uploads survive a visit to another page (`kept_choice`)."""
    sources = ["upload", "samples"]
    source = st.radio("Images", sources, horizontal=True, key="describe_source",
                      index=sources.index(kept_choice("describe_source", sources, "upload")),
                      format_func={"upload": "Upload images", "samples": "Sample images"}.get)
    remember_choice("describe_source", source)
    if source == "upload":
        return _uploaded_inputs()
    samples = {p.name: p for p in list_samples(current.samples_dir)}
    if not samples:
        st.info(f"No sample images were found in {md_escape(current.samples_dir)}. Upload images instead.")
        return []
    names = list(samples)
    kept = kept_choice("describe_sample", names, None)
    name = st.selectbox("Sample image", names, index=None if kept is None else names.index(kept),
                        placeholder="Choose a sample", key="describe_sample")
    remember_choice("describe_sample", name)
    if any(n.startswith("synthetic_") for n in samples):
        st.caption("Samples named synthetic_* were drawn by this project's GAN (trained on PBC images), not "
                   "photographed: they show how the app works and are no patient's cells.")
    if name is None:
        st.session_state.pop(KEPT_SAMPLE_HASH, None)  # no sample chosen: its case need not be kept
        return []
    try:
        sample = Input(name, samples[name].read_bytes())
        st.session_state[KEPT_SAMPLE_HASH] = sample.sha256
        return [sample]
    except OSError as error:
        st.error(f"The sample {md_escape(name)} cannot be read ({md_escape(error.strerror or error)}).")
        return []


def repeated_names(inputs: list[Input]) -> list[str]:
    """Names of the inputs whose bytes repeat an earlier input's (they are described once)."""
    seen, repeats = set(), []
    for item in inputs:
        if item.sha256 in seen:
            repeats.append(item.name)
        seen.add(item.sha256)
    return repeats


def describe_inputs(bundle: ModelBundle, inputs: list[Input], panel: str, store: Store,
                    upload_dir: Path, cache: dict,
                    progress: Callable[[float], None] | None = None, keep: frozenset[str] = frozenset()) -> list[Case]:
    """One Case per distinct input (input order); new ones are loaded, described in
    batches and recorded (image copy + prediction, one transaction each). `cache` is the
    session's dict of cases, one per (image, panel, model and calibration: `answer_id`); entries
    of images no longer among `inputs` (or `keep`, hashes of images shown again on switching
    back), or of another model or calibration, are dropped. Other panels' cases of these images are kept:
    switching back to a panel shows its case again instead of describing and recording the
    image once more (a new prediction row on every switch buried the expert's verdict)."""
    model = answer_id(bundle)
    keyed: dict[tuple, Input] = {}
    for item in inputs:
        keyed.setdefault((item.sha256, panel, model), item)
    fresh = {key: _load(key[0], keyed[key]) for key in keyed if key not in cache}
    # a case enters the cache once it is refused or described: one whose describing raised is
    # described again on the next run instead of staying undescribed (and unseen) in the cache
    cache.update({key: case for key, case in fresh.items() if case.loaded is None})
    todo = [(key, case) for key, case in fresh.items() if case.loaded is not None]
    for start in range(0, len(todo), BATCH):
        chunk = todo[start:start + BATCH]
        t0 = time.perf_counter()
        results = describe_batch(bundle, [case.loaded.image for _, case in chunk], panel)
        per_image = (time.perf_counter() - t0) * 1000 / len(chunk)
        for (key, case), result in zip(chunk, results):
            case.description = result
            case.timings_ms["describe"] = per_image
            if store.available:
                _record(store, upload_dir, keyed[key].data, case)
            cache[key] = case
        if progress is not None:
            progress(min(1.0, (start + len(chunk)) / len(todo)))
    current = {(sha256, m) for sha256, _, m in keyed} | {(sha256, model) for sha256 in keep}
    for stale in [key for key in cache if (key[0], key[2]) not in current]:
        del cache[stale]
    return [cache[key] for key in keyed]


def answer_id(bundle: ModelBundle) -> str:
    """What decides a described case's answer: the weights and the calibration (which also names
    the views). A recalibrated model reloaded under an open session describes its images anew
    rather than showing, and attaching feedback to, the old calibration's answers."""
    return f"{bundle.weights_sha256}|{bundle.calibration_id}"


def _load(sha256: str, item: Input) -> Case:
    t0 = time.perf_counter()
    try:
        loaded = load_image_bytes(item.data, item.name)
    except ImageRejected as error:
        return Case(sha256, item.name, error=str(error))
    return Case(sha256, loaded.file_name, loaded, timings_ms={"load": (time.perf_counter() - t0) * 1000})


def _record(store: Store, upload_dir: Path, data: bytes, case: Case) -> None:
    t0 = time.perf_counter()
    try:
        case.image_id, case.prediction_id = record_prediction(store.sessionmaker, upload_dir, data, case.loaded,
                                                               case.description)
    except SQLAlchemyError as error:
        case.store_error = store_error_message(error, "the configured database")
    except ValueError as error:  # a value the store refuses (e.g. a non-finite confidence): not recorded
        case.store_error = f"This case could not be recorded ({error}); feedback cannot be attached to it."
    except OSError as error:
        case.store_error = (f"The image copy could not be saved in the upload folder ({error.strerror or error}); "
                            "this case is described but not recorded, so feedback cannot be attached.")
    case.timings_ms["store"] = (time.perf_counter() - t0) * 1000


ATTRIBUTE_TARGET = "attr:"


def case_morphology(bundle: ModelBundle, case: Case) -> tuple[str, list]:
    """The case's morphology sentence and phrases (`describe_morphology`), computed once: the
    summary and the Grad-CAM picker both show them, on every rerun. A case belongs to one model
    (its cache key holds the weights), so the stored result cannot be another model's."""
    if case.morphology is None:
        case.morphology = describe_morphology(bundle, case.loaded.image)
    return case.morphology


def cached_heatmap(bundle: ModelBundle, case: Case, panel: str, class_key: str, cache: dict) -> np.ndarray:
    """Grad-CAM map for (image, panel, class), computed once per session and model: moving
    the opacity slider or switching back to a sentence never recomputes it."""
    key = (case.sha256, panel, class_key, bundle.weights_sha256)
    if key not in cache:
        if class_key.startswith(ATTRIBUTE_TARGET):  # "attr:<attribute>=<value>": a morphology phrase
            attribute, value = class_key[len(ATTRIBUTE_TARGET):].split("=", 1)
            cache[key] = attribute_heatmap(bundle, case.loaded.image, attribute, value)
        else:
            cache[key] = class_heatmap(bundle, case.loaded.image, panel, class_key)
        while len(cache) > HEATMAP_CACHE_MAX:
            cache.pop(next(iter(cache)))
    return cache[key]
