"""Append-only feedback store: uploaded images, model predictions and expert feedback.

Rows are only ever inserted; a second opinion is a new feedback row, so the full history of
who said what about which prediction is kept. Writes are guarded in the ORM (see
`_refuse_updates`). The caller frames one transaction per clinician action::

    with sessionmaker.begin() as s:
        add_feedback(s, prediction, verdict="agree", reviewer="Dr A")

Read-side helpers live in `core.store_queries` (also reachable as attributes of this module);
the uploaded image files themselves in `core.uploads`.
"""
from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    CheckConstraint, DateTime, Engine, ForeignKey, String, Text, create_engine, event, select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import (
    DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker,
)

from core.store_errors import store_error_message
from core.store_migrate import add_missing_columns
from core.uploads import check_sha256

log = logging.getLogger(__name__)

VERDICTS = ("agree", "disagree", "unsure")
REVIEWER_MAX = 100
_TEXT_MAX = 5000  # free-text fields: generous, but bounded so one paste cannot bloat the DB


class StoreUnavailable(RuntimeError):
    """The feedback database cannot be used; the message is safe to show to a clinician."""


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base of the feedback store tables."""


class ImageRecord(Base):
    """An uploaded image, stored once by the sha256 of its bytes."""
    __tablename__ = "images"
    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    original_name: Mapped[str] = mapped_column(String(255))  # display only, never a path
    n_bytes: Mapped[int]
    width: Mapped[int]
    height: Mapped[int]
    stored_path: Mapped[str] = mapped_column(String(255))  # relative to upload_dir
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)


class PredictionRecord(Base):
    """What one model said about one image under one panel."""
    __tablename__ = "predictions"
    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    model_id: Mapped[str] = mapped_column(String(200))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    panel: Mapped[str] = mapped_column(String(100))
    class_key: Mapped[str | None] = mapped_column(String(100))  # None when abstained
    sentence: Mapped[str] = mapped_column(Text)
    confidence: Mapped[float]
    abstained: Mapped[bool]
    abstain_reason: Mapped[str | None] = mapped_column(Text)
    scores_json: Mapped[str] = mapped_column(Text)  # {class_key: probability}
    # Whether an answer was in the atypical band (core.typicality) and the out-of-scope score behind
    # it, so the review page can show whether experts agree less with the answers marked atypical on
    # this lab's slides. `atypical` is NULL for an abstention or a model without a band; both are NULL
    # on rows stored before they existed, and the score for an image refused before scoring.
    atypical: Mapped[bool | None] = mapped_column(nullable=True)
    out_of_scope_score: Mapped[float | None] = mapped_column(nullable=True)
    # which calibration decided (core.checkpoint.ModelBundle.calibration_id): recalibrating keeps the
    # weights, so weights_sha256 alone cannot tell the answers of two calibrations apart
    calibration_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)
    image: Mapped[ImageRecord] = relationship()


class FeedbackRecord(Base):
    """One expert verdict on a prediction; rows are only ever added, never changed."""
    __tablename__ = "feedback"
    __table_args__ = (
        CheckConstraint("verdict IN ('agree', 'disagree', 'unsure')", name="ck_feedback_verdict"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id"), index=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    verdict: Mapped[str] = mapped_column(String(16))
    corrected_class: Mapped[str | None] = mapped_column(String(100))
    corrected_sentence: Mapped[str | None] = mapped_column(Text)
    comment: Mapped[str | None] = mapped_column(Text)
    reviewer: Mapped[str] = mapped_column(String(REVIEWER_MAX))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)
    prediction: Mapped[PredictionRecord] = relationship()


_APPEND_ONLY = (ImageRecord, PredictionRecord, FeedbackRecord)


@event.listens_for(Session, "before_flush")
def _refuse_updates(session: Session, _ctx, _instances) -> None:
    # The audit trail is only trustworthy if nothing is ever rewritten: fail loudly instead.
    for obj in session.deleted:
        if isinstance(obj, _APPEND_ONLY):
            raise RuntimeError(f"{type(obj).__name__} rows are append-only; delete refused")
    for obj in session.dirty:
        if isinstance(obj, _APPEND_ONLY) and session.is_modified(obj, include_collections=False):
            raise RuntimeError(f"{type(obj).__name__} rows are append-only; update refused")


@event.listens_for(Session, "do_orm_execute")
def _refuse_bulk_writes(state) -> None:
    mapper = state.bind_mapper
    if (state.is_update or state.is_delete) and getattr(mapper, "class_", None) in _APPEND_ONLY:
        raise RuntimeError("the feedback store is append-only; UPDATE/DELETE refused")


# ---------------------------------------------------------------- engine


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # Hand transaction control to SQLAlchemy (see _sqlite_begin) instead of pysqlite's own.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")  # first, so the WAL switch below may wait too
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the single writer
    # FULL, not NORMAL: in WAL mode NORMAL can lose the last commits on power loss or an OS
    # crash (never corrupts). An expert's saved verdict must survive that; one fsync per
    # clinician click costs nothing noticeable.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


READ_ONLY_OPTION = "hemascribe_read_only"  # execution option of the sessions of make_read_sessionmaker


def _sqlite_begin(conn) -> None:
    # A writing transaction takes the write lock at BEGIN: a deferred one that reads then writes
    # gets SQLITE_BUSY immediately (busy_timeout does not apply) when another writer got in first.
    # A reading one begins deferred: in WAL mode it then blocks neither the writer nor other readers.
    read_only = conn.get_execution_options().get(READ_ONLY_OPTION, False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """Create the engine, the tables, and check the database accepts writes.

    Raises StoreUnavailable (clear message, no SQL noise) when it is read-only, corrupted,
    unreachable or its driver is missing.
    """
    where = "the configured address"  # until parsed: never echo a URL that may hold a password
    engine = None
    try:
        parsed = make_url(url)
        where = url if parsed.password is None else parsed.render_as_string(hide_password=True)
        if parsed.get_backend_name() == "sqlite":
            database = parsed.database or ""
            if database not in ("", ":memory:") and not parsed.query.get("uri"):
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
            event.listen(engine, "connect", _sqlite_pragmas)
            event.listen(engine, "begin", _sqlite_begin)
        else:
            # connect_timeout: an unreachable host must fail in seconds, not minutes.
            args = {"connect_timeout": 10} if parsed.get_backend_name() == "postgresql" else {}
            engine = create_engine(url, pool_pre_ping=True, connect_args=args)
        Base.metadata.create_all(engine)
        add_missing_columns(engine, Base.metadata)  # a database written by an earlier version
        with engine.begin() as conn:
            # Write probe: a read-only file opens and even BEGINs fine; only a write fails.
            conn.execute(text("DELETE FROM feedback WHERE 1 = 0"))
        return engine
    except (SQLAlchemyError, OSError, ImportError, ValueError) as exc:  # ValueError: bad port
        log.warning("feedback store unavailable at %s: %r", where, exc)
        if engine is not None:
            engine.dispose()
        raise StoreUnavailable(store_error_message(exc, where)) from exc


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Session factory; objects stay readable after commit (the UI shows ids afterwards)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def make_read_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Session factory for reading only (history, review table, gallery listing): on SQLite its
    transactions do not take the write lock, so a long read never holds up an expert's save."""
    return sessionmaker(bind=engine.execution_options(**{READ_ONLY_OPTION: True}), expire_on_commit=False)


# ---------------------------------------------------------------- writes


def _clean_text(value: str | None, field: str, max_len: int = _TEXT_MAX) -> str | None:
    if value is None:
        return None
    value = str(value).strip()
    if len(value) > max_len:
        raise ValueError(f"{field} is too long ({len(value)} characters, at most {max_len})")
    return value or None


def get_or_create_image(s: Session, *, sha256: str, original_name: str, n_bytes: int,
                        width: int, height: int, stored_path: str) -> ImageRecord:
    """The image row for this content hash, inserted on first sight (first name wins)."""
    check_sha256(sha256)
    found = s.scalar(select(ImageRecord).where(ImageRecord.sha256 == sha256))
    if found is not None:
        return found
    image = ImageRecord(sha256=sha256, original_name=str(original_name or "")[:255],
                        n_bytes=int(n_bytes), width=int(width), height=int(height),
                        stored_path=stored_path)
    try:
        with s.begin_nested():  # savepoint: a concurrent insert of the same hash may win
            s.add(image)
    except IntegrityError:
        image = s.scalars(select(ImageRecord).where(ImageRecord.sha256 == sha256)).one()
    return image


def add_prediction(s: Session, image: ImageRecord, *, model_id: str, weights_sha256: str,
                   panel: str, class_key: str | None, sentence: str, confidence: float,
                   abstained: bool, abstain_reason: str | None, scores: dict,
                   atypical: bool | None = None, out_of_scope_score: float | None = None,
                   calibration_id: str | None = None) -> PredictionRecord:
    """Record what the model said about `image` (a new row every time); `atypical`,
    `out_of_scope_score` and `calibration_id` as `core.describe.Description` gives them (None: not known)."""
    if class_key is None and not abstained:
        raise ValueError("class_key is required unless the model abstained")
    confidence = float(confidence)  # numpy scalars -> plain float
    if not math.isfinite(confidence):
        raise ValueError("confidence must be a finite number")
    # allow_nan=False: NaN is not valid JSON and would break every later reader.
    scores_json = json.dumps({str(k): float(v) for k, v in scores.items()},
                             sort_keys=True, allow_nan=False)
    pred = PredictionRecord(image_id=image.id, model_id=model_id, weights_sha256=weights_sha256,
                            panel=panel, class_key=class_key, sentence=sentence,
                            confidence=confidence, abstained=bool(abstained),
                            abstain_reason=abstain_reason, scores_json=scores_json,
                            atypical=None if atypical is None else bool(atypical),
                            out_of_scope_score=_finite_or_none(out_of_scope_score),
                            calibration_id=_clean_text(calibration_id, "calibration id", 64))
    s.add(pred)
    s.flush()  # assign the id now: the UI needs it to attach feedback
    return pred


def _finite_or_none(value: float | None) -> float | None:
    # An image refused before scoring can carry an infinite score; it has no value to keep.
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def add_feedback(s: Session, prediction: PredictionRecord, *, verdict: str, reviewer: str,
                 corrected_class: str | None = None, corrected_sentence: str | None = None,
                 comment: str | None = None) -> FeedbackRecord:
    """Append one expert opinion on `prediction`; raises ValueError on invalid input."""
    verdict = str(verdict or "").strip().lower()
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}")
    who = _clean_text(reviewer, "reviewer name", REVIEWER_MAX)
    if not who:
        raise ValueError("a reviewer name is required")
    corrected_class = _clean_text(corrected_class, "corrected class", 100)
    if verdict == "agree" and corrected_class not in (None, prediction.class_key):
        raise ValueError("a corrected class contradicts 'agree'; choose 'disagree' instead")
    if verdict == "agree":
        corrected_class = None  # the model's own class, left in the form: stored, it would read as a correction
    corrected_sentence = _clean_text(corrected_sentence, "corrected sentence")
    if verdict == "agree" and corrected_sentence:  # stored, it would read as the expert's wording of an agreement
        raise ValueError("a corrected sentence goes with 'disagree'; to agree, clear it (remarks go in the comment)")
    if verdict == "unsure" and (corrected_class is not None or corrected_sentence):  # a silent correction
        raise ValueError("a correction goes with 'disagree'; for 'unsure', say what you suspect in the comment")
    if verdict == "disagree" and corrected_class is not None and corrected_class == prediction.class_key \
            and not corrected_sentence:
        # it would count as a disagreement and, in the expert-versus-model matrix, as agreement
        raise ValueError("the corrected class is the model's own answer; choose 'agree', name another "
                         "class, or write the sentence you would use")
    fb = FeedbackRecord(prediction_id=prediction.id, image_id=prediction.image_id,
                        verdict=verdict, reviewer=who, corrected_class=corrected_class,
                        corrected_sentence=corrected_sentence, comment=_clean_text(comment, "comment"))
    s.add(fb)
    s.flush()
    return fb


# Read-side helpers re-exported lazily (PEP 562): a plain import would be circular.
_QUERY_NAMES = frozenset({"agreement_summary", "expert_confusion", "feedback_table",
                          "image_history", "latest_opinions", "latest_verification", "rows_to_csv"})


def __getattr__(name: str):
    if name in _QUERY_NAMES:
        from core import store_queries
        return getattr(store_queries, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
