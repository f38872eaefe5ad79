"""The only place the app caches shared resources: the model bundle, the feedback store and
the atlas gallery index.

All are `st.cache_resource`: one object per server process, shared by every session and
page (the bundle carries its own lock for Grad-CAM hooks; SQLAlchemy engines are
thread-safe; a gallery index is never mutated, an update makes a new one).
Per-user things (reviewer name, current cases) live in `st.session_state`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
import torch
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.checkpoint import ModelBundle, ModelLoadError, load_bundle, sidecar_path
from core.gallery import GalleryIndex, cache_folder, load_index
from core.gallery_index import manifest_stamp
from core.gallery_sources import Source, list_sources, synthetic_hashes
from core.settings import Settings, SettingsError, load_settings
from core.store import (REVIEWER_MAX, StoreUnavailable, make_engine, make_read_sessionmaker, make_sessionmaker,
                        store_error_message)

# A store that failed to open is retried after this many seconds, not on every rerun: an
# unreachable server costs a 10 s connect timeout each time.
STORE_RETRY_S = 30.0
REVIEWER_KEY = "reviewer"  # plain session key: widget keys are dropped on page switches
_REVIEWER_WIDGET = "sidebar_reviewer"


def settings() -> Settings:
    """Current settings (read from the environment each call; cheap). A setting that cannot
    be used stops the page with one message: the app must not guess a safety limit."""
    try:
        return load_settings()
    except SettingsError as error:
        st.error(f"HemaScribe cannot start: {error}. Correct the environment variable and restart the app.")
        st.stop()


def _model_stamp(path: Path) -> int:
    # Training publishes weights and sidecar by atomic renames; the newest mtime of the two
    # changes whenever a new model lands, so the cache key changes and the app reloads.
    stamps = [p.stat().st_mtime_ns for p in (path, sidecar_path(path)) if p.exists()]
    return max(stamps, default=0)


@st.cache_resource(max_entries=2, show_spinner="Loading the model...")
def _cached_bundle(path: str, stamp: int, text_model: str | None, threads: int) -> ModelBundle:
    del stamp  # part of the cache key only
    # Several sessions share 2 cores: more torch threads per call only make them fight.
    torch.set_num_threads(max(1, threads))
    return load_bundle(path, text_model)


def get_bundle() -> ModelBundle | None:
    """The cached model for the configured checkpoint, reloaded when its file changes;
    None (after showing why) when it cannot be loaded."""
    current = settings()
    try:
        return _cached_bundle(str(current.model_path), _model_stamp(current.model_path),
                              current.text_model, current.torch_threads)
    except ModelLoadError as error:
        st.error(f"The model cannot be loaded, so nothing can be described. {error}")
        return None


def require_bundle() -> ModelBundle:
    """`get_bundle()`, stopping the page when there is no usable model."""
    bundle = get_bundle()
    if bundle is None:
        st.stop()
    return bundle


@dataclass(frozen=True)
class Store:
    """The database engine and sessions, or why the database is unavailable."""
    engine: Engine | None  # None when the database is unavailable
    sessionmaker: sessionmaker[Session] | None  # frame one transaction per clinician action
    error: str | None  # clinician-readable reason when unavailable
    opened_at: float  # time.monotonic() of the attempt
    reader: sessionmaker[Session] | None = None  # sessions that only read (core.store.make_read_sessionmaker)

    @property
    def available(self) -> bool:
        """True when feedback can be saved."""
        return self.sessionmaker is not None

    def reading(self) -> Session:
        """A session for reads only: on SQLite it takes no write lock, so it never delays a save."""
        return (self.reader or self.sessionmaker)()


def _dispose(store: Store) -> None:
    if store.engine is not None:
        store.engine.dispose()


@st.cache_resource(show_spinner=False, on_release=_dispose)
def _cached_store(db_url: str) -> Store:
    try:
        engine = make_engine(db_url)
    except StoreUnavailable as error:
        return Store(None, None, str(error), time.monotonic())
    return Store(engine, make_sessionmaker(engine), None, time.monotonic(), make_read_sessionmaker(engine))


def get_store() -> Store:
    """The cached feedback store for `settings().db_url` (check `.available`)."""
    url = settings().db_url
    store = _cached_store(url)
    if not store.available and time.monotonic() - store.opened_at > STORE_RETRY_S:
        _cached_store.clear(url)
        store = _cached_store(url)
    return store


def store_or_warn() -> Store:
    """`get_store()`, showing a warning when feedback cannot be saved."""
    store = get_store()
    if not store.available:
        st.warning(store.error or "The feedback database is unavailable; feedback cannot be saved.")
    return store


def _keep_reviewer() -> None:
    st.session_state[REVIEWER_KEY] = str(st.session_state.get(_REVIEWER_WIDGET, ""))


def reviewer_sidebar() -> str:
    """Reviewer name box in the sidebar; returns the stripped name ('' when empty).

    The name is kept in a plain session key and copied back into the widget on every page,
    so it survives page switches."""
    st.session_state.setdefault(REVIEWER_KEY, "")
    st.session_state[_REVIEWER_WIDGET] = st.session_state[REVIEWER_KEY]
    st.sidebar.text_input("Reviewer name", key=_REVIEWER_WIDGET, on_change=_keep_reviewer,
                          max_chars=REVIEWER_MAX, placeholder="e.g. Dr A. Smith",
                          help="Needed to record feedback; stored with each opinion.")
    return st.session_state[REVIEWER_KEY].strip()


def gallery_folder(bundle: ModelBundle) -> Path:
    """Cache folder of the gallery index for this model and the configured sources."""
    current = settings()
    return cache_folder(current.gallery_cache_dir, bundle.embedding_id, current.gallery_dir, current.upload_dir)


@st.cache_resource(max_entries=4, show_spinner=False)
def _cached_gallery(embedding_id: str, gallery_dir: str, folder: str, stamp: str) -> GalleryIndex:
    del gallery_dir, stamp  # part of the cache key only
    return load_index(folder, embedding_id)


def get_gallery(bundle: ModelBundle) -> GalleryIndex:
    """The gallery index on disk for this model and gallery folder (empty when never
    indexed). Keyed on the manifest file's identity: after any session re-indexes, every session
    gets the new index on its next rerun."""
    folder = gallery_folder(bundle)
    return _cached_gallery(bundle.embedding_id, str(settings().gallery_dir or ""), str(folder),
                           manifest_stamp(folder))


def gallery_sources() -> list[Source]:
    """Images of the gallery folder plus the reviewed cases of the feedback store (when
    it is available). Not cached: listing is stat-only and the sources change."""
    current = settings()
    store = get_store()
    if store.available:
        try:
            with store.reading() as s:
                return list_sources(current.gallery_dir, current.upload_dir, s, synthetic_hashes(current.samples_dir))
        except SQLAlchemyError as error:  # the folder's images still make a gallery
            st.warning(store_error_message(error, "the configured database") + " Reviewed cases are left out "
                       "of the gallery for now.")
    return list_sources(current.gallery_dir, current.upload_dir)
