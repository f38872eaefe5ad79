"""Tests for the append-only feedback store (core.store, core.store_queries).

DB tests run on a SQLite file in tmp_path, and also on PostgreSQL when
HEMASCRIBE_TEST_PG_URL is set (see .ci/start_postgres.sh); each PG test gets its own schema.
"""
from __future__ import annotations

import hashlib
import time
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import uuid
from datetime import timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, update

from core.store import (
    FeedbackRecord, ImageRecord, PredictionRecord, StoreUnavailable, add_feedback,
    add_prediction, get_or_create_image, make_engine, make_sessionmaker,
)
from core.store_queries import (
    agreement_summary, expert_confusion, feedback_table, image_history, latest_verification,
    rows_to_csv,
)
from core.uploads import store_image_copy
from tests.conftest import BACKENDS, PG_URL, pg_url_with_schema

ROOT = Path(__file__).resolve().parent.parent
DATA = b"\x89PNG fake image bytes"
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def engine(db_url):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def sm(engine):
    return make_sessionmaker(engine)


def _seed(sm, sha=SHA, class_key="neutrophil", abstained=False):
    """One image and one prediction; returns (image_id, prediction_id)."""
    with sm.begin() as s:
        img = get_or_create_image(s, sha256=sha, original_name="smear 1.png", n_bytes=len(DATA),
                                  width=64, height=48, stored_path=f"{sha[:2]}/{sha}.png")
        pred = add_prediction(s, img, model_id="hemascribe-test", weights_sha256="0" * 64,
                              panel="wbc", class_key=class_key, sentence="A neutrophil.",
                              confidence=0.91, abstained=abstained,
                              abstain_reason="low confidence" if abstained else None,
                              scores={"neutrophil": 0.91, "eosinophil": 0.09})
        return img.id, pred.id


def _feedback(sm, prediction_id, **kw):
    with sm.begin() as s:
        return add_feedback(s, s.get(PredictionRecord, prediction_id), **kw).id


# ---------------------------------------------------------------- round trip & history


def test_round_trip(sm, tmp_path):
    rel = store_image_copy(tmp_path / "uploads", SHA, DATA, ".PNG")
    assert rel == f"{SHA[:2]}/{SHA}.png"
    assert (tmp_path / "uploads" / rel).read_bytes() == DATA
    image_id, pred_id = _seed(sm)
    with sm.begin() as s:  # the same content hash maps to the same row
        again = get_or_create_image(s, sha256=SHA, original_name="other.png", n_bytes=1,
                                    width=1, height=1, stored_path=rel)
        assert again.id == image_id and again.original_name == "smear 1.png"
    _feedback(sm, pred_id, verdict="disagree", reviewer="  Dr Ada  ",
              corrected_class="eosinophil", comment="granules are orange")

    with sm() as s:
        rows = feedback_table(s)
        history = image_history(s, SHA)
        latest = latest_verification(s, image_id)
    assert len(rows) == 1
    row = rows[0]
    assert row["reviewer"] == "Dr Ada" and row["verdict"] == "disagree"
    assert (row["model_class"], row["corrected_class"], row["expert_class"]) == (
        "neutrophil", "eosinophil", "eosinophil")
    assert row["sha256"] == SHA and row["original_name"] == "smear 1.png"
    assert row["confidence"] == pytest.approx(0.91) and row["panel"] == "wbc"
    assert row["created_at"].tzinfo == timezone.utc
    assert history[0]["kind"] == "prediction"
    assert history[0]["scores"] == {"eosinophil": 0.09, "neutrophil": 0.91}
    assert latest["reviewer"] == "Dr Ada" and latest["expert_class"] == "eosinophil"
    assert rows_to_csv(rows).splitlines()[1].startswith(str(row["feedback_id"]))
    with sm() as s:
        assert image_history(s, "f" * 64) == []
        assert latest_verification(s, image_id + 999) is None


def test_append_only_history(sm):
    image_id, pred_id = _seed(sm)
    first = _feedback(sm, pred_id, verdict="agree", reviewer="Dr A")
    second = _feedback(sm, pred_id, verdict="disagree", reviewer="Dr B",
                       corrected_class="monocyte")
    _feedback(sm, pred_id, verdict="unsure", reviewer="Dr C")  # not a verification

    with sm() as s:
        history = image_history(s, SHA)
        latest = latest_verification(s, image_id)
    assert [e["kind"] for e in history] == ["prediction", "feedback", "feedback", "feedback"]
    assert [e["reviewer"] for e in history[1:]] == ["Dr A", "Dr B", "Dr C"]
    times = [e["created_at"] for e in history]
    assert times == sorted(times)
    assert latest["feedback_id"] == second and latest["verdict"] == "disagree"

    # Rewriting history is refused, both through the ORM and as a bulk statement.
    with pytest.raises(RuntimeError, match="append-only"):
        with sm.begin() as s:
            s.get(FeedbackRecord, first).verdict = "disagree"
    with pytest.raises(RuntimeError, match="append-only"):
        with sm.begin() as s:
            s.delete(s.get(FeedbackRecord, first))
    with pytest.raises(RuntimeError, match="append-only"):
        with sm.begin() as s:
            s.execute(update(FeedbackRecord).values(reviewer="x"))
    with sm() as s:
        assert s.get(FeedbackRecord, first).verdict == "agree"
        assert s.scalar(select(func.count()).select_from(FeedbackRecord)) == 3


def test_feedback_validation(sm):
    _, pred_id = _seed(sm)
    bad = [
        dict(verdict="maybe", reviewer="Dr A"),
        dict(verdict="agree", reviewer="   "),
        dict(verdict="agree", reviewer=None),
        dict(verdict="agree", reviewer="x" * 101),
        dict(verdict="agree", reviewer="Dr A", corrected_class="monocyte"),
        dict(verdict="disagree", reviewer="Dr A", corrected_class="neutrophil"),  # the model's own class
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            _feedback(sm, pred_id, **kwargs)
    with pytest.raises(ValueError, match="the corrected class is the model's own answer"):
        _feedback(sm, pred_id, verdict="disagree", reviewer="Dr A", corrected_class="neutrophil", comment="hm")
    # the class is right but the sentence is not: a disagreement about the wording
    assert _feedback(sm, pred_id, verdict="disagree", reviewer="Dr A", corrected_class="neutrophil",
                     corrected_sentence="A band neutrophil.")
    assert _feedback(sm, pred_id, verdict=" Agree ", reviewer="x" * 100)
    # the model's own class left in the form on Agree is a confirmation, not a correction: not stored
    assert _feedback(sm, pred_id, verdict="agree", reviewer="Dr B", corrected_class="neutrophil")
    with sm() as s:
        rows = feedback_table(s)
        assert sorted(r["verdict"] for r in rows) == ["agree", "agree", "disagree"]
        assert [r["corrected_class"] for r in rows if r["verdict"] == "agree"] == [None, None]
    with pytest.raises(ValueError, match="class_key"):
        _seed(sm, sha="a" * 64, class_key=None, abstained=False)


def test_verification_is_per_panel_and_unsure_takes_no_class(sm):
    image_id, on_cells = _seed(sm)  # the model said neutrophil on "wbc"
    with sm.begin() as s:
        image = s.get(ImageRecord, image_id)
        on_other = add_prediction(s, image, model_id="m", weights_sha256="0" * 64, panel="leukemia", class_key=None,
                                  sentence="Uncertain", confidence=0.5, abstained=True, abstain_reason="weak",
                                  scores={}).id
    _feedback(sm, on_cells, verdict="agree", reviewer="Dr A")
    _feedback(sm, on_other, verdict="disagree", reviewer="Dr B")  # later, on another panel's abstention
    with sm() as s:
        assert latest_verification(s, image_id, "wbc")["verdict"] == "agree"
        assert latest_verification(s, image_id, "leukemia")["verdict"] == "disagree"
        assert latest_verification(s, image_id)["verdict"] == "disagree"  # without a panel: the latest
        assert latest_verification(s, image_id, "wbc", "0" * 64)["verdict"] == "agree"
        assert latest_verification(s, image_id, "wbc", "1" * 64) is None  # another model's answer: not verified
        assert latest_verification(s, image_id, "wbc", "0" * 64, ("neutrophil", False))["verdict"] == "agree"
    # the same weights recalibrated: an abstention agreed with ("right not to answer") on the leukemia
    # panel does not verify the answer the new calibration gives, and vice versa
    with sm.begin() as s:
        answered = add_prediction(s, s.get(ImageRecord, image_id), model_id="m", weights_sha256="0" * 64,
                                  panel="leukemia", class_key="cll", sentence="CLL.", confidence=0.9,
                                  abstained=False, abstain_reason=None, scores={}, calibration_id="c2").id
    _feedback(sm, on_other, verdict="agree", reviewer="Dr A")
    with sm() as s:
        assert latest_verification(s, image_id, "leukemia", "0" * 64, ("cll", False)) is None
        assert latest_verification(s, image_id, "leukemia", "0" * 64, (None, True))["reviewer"] == "Dr A"
    _feedback(sm, answered, verdict="disagree", reviewer="Dr D", corrected_class="all")
    with sm() as s:
        assert latest_verification(s, image_id, "leukemia", "0" * 64, ("cll", False))["reviewer"] == "Dr D"
        assert latest_verification(s, image_id, "leukemia", "0" * 64, (None, True))["reviewer"] == "Dr A"
    with pytest.raises(ValueError, match="a correction goes with 'disagree'"):
        _feedback(sm, on_cells, verdict="unsure", reviewer="Dr C", corrected_class="monocyte")
    with pytest.raises(ValueError, match="a correction goes with 'disagree'"):
        _feedback(sm, on_cells, verdict="unsure", reviewer="Dr C", corrected_sentence="A monocyte?")
    # an agreement with a typed correction is contradictory: refused, nothing stored
    with pytest.raises(ValueError, match="a corrected sentence goes with 'disagree'"):
        _feedback(sm, on_cells, verdict="agree", reviewer="Dr C", corrected_sentence="A monocyte, looks fine.")


def test_feedback_table_filters_and_stats(sm):
    _, p1 = _seed(sm)
    _, p2 = _seed(sm, sha="b" * 64, class_key=None, abstained=True)
    _feedback(sm, p1, verdict="agree", reviewer="Dr A")
    _feedback(sm, p1, verdict="disagree", reviewer="Dr B", corrected_class="monocyte")
    _feedback(sm, p2, verdict="disagree", reviewer="Dr A", corrected_class="lymphocyte")
    _feedback(sm, p2, verdict="unsure", reviewer="Dr B", comment="=HYPERLINK(\"x\")")
    with sm() as s:
        rows = feedback_table(s)
        assert len(feedback_table(s, reviewer="Dr A")) == 2
        assert len(feedback_table(s, verdict="unsure")) == 1
        assert len(feedback_table(s, class_key="neutrophil")) == 2
        assert feedback_table(s, panel="rbc") == []
        assert len(feedback_table(s, model_id="hemascribe-test")) == 4 and feedback_table(s, model_id="other") == []
    summary = agreement_summary(rows)
    assert (summary["n_feedback"], summary["n_decided"], summary["n_unsure"]) == (4, 3, 1)
    assert summary["agreement_rate"] == pytest.approx(1 / 2)  # on the answered case only
    assert summary["n_on_abstentions"] == 2
    assert summary["per_class"]["neutrophil"]["agreement_rate"] == pytest.approx(0.5)
    assert summary["per_class"]["(abstained)"]["n"] == 2
    labels, matrix = expert_confusion(rows)
    assert labels == ["monocyte", "neutrophil"]  # abstained rows carry no model class
    assert matrix == [[0, 1], [0, 1]]
    csv_text = rows_to_csv(rows)
    assert "'=HYPERLINK" in csv_text and len(csv_text.splitlines()) == 5


def test_a_repeated_or_changed_verdict_counts_once_as_it_stands(sm):
    from core.store import latest_opinions

    _, pred_id = _seed(sm)
    for verdict, reviewer in (("agree", "Dr A"), ("agree", "Dr A"), ("agree", "Dr B"), ("agree", "Dr C")):
        _feedback(sm, pred_id, verdict=verdict, reviewer=reviewer)
    _feedback(sm, pred_id, verdict="disagree", reviewer="Dr C", corrected_class="monocyte")  # changed mind
    with sm() as s:
        rows = feedback_table(s)
    kept = latest_opinions(rows)
    assert len(rows) == 5 and [(r["reviewer"], r["verdict"]) for r in kept] == [
        ("Dr A", "agree"), ("Dr B", "agree"), ("Dr C", "disagree")]
    assert agreement_summary(kept)["agreement_rate"] == pytest.approx(2 / 3)  # not 4 / 5
    assert latest_opinions([]) == []


def test_pure_helpers_on_empty_rows():
    assert agreement_summary([])["agreement_rate"] is None
    assert expert_confusion([]) == ([], [])
    assert rows_to_csv([]).startswith("feedback_id,")


# ---------------------------------------------------------------- concurrency & crashes


def test_an_open_read_never_holds_up_a_save(engine, sm):
    from core.store import make_read_sessionmaker

    _, pred_id = _seed(sm)
    with make_read_sessionmaker(engine)() as reader:  # e.g. a long gallery listing in another session
        assert len(feedback_table(reader)) == 0  # its transaction is open from here on
        started = time.monotonic()
        _feedback(sm, pred_id, verdict="agree", reviewer="Dr Quick")  # SQLite: waited 30 s, then "locked"
        assert time.monotonic() - started < 5
    with make_read_sessionmaker(engine)() as reader:
        assert [r["reviewer"] for r in feedback_table(reader)] == ["Dr Quick"]


def test_concurrent_writers_keep_every_row(sm):
    _, pred_id = _seed(sm)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(200):
                _feedback(sm, pred_id, verdict="agree", reviewer=f"thread {n} #{i}")
        except BaseException as exc:  # surfaced below: a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with sm() as s:
        assert s.scalar(select(func.count()).select_from(FeedbackRecord)) == 1600
        assert s.scalar(select(func.count(func.distinct(FeedbackRecord.reviewer)))) == 1600


def test_same_image_uploaded_twice_at_once_gives_one_row(sm):
    def create(s):
        return get_or_create_image(s, sha256=SHA, original_name="x.png", n_bytes=1, width=1,
                                   height=1, stored_path="x").id

    result: dict[str, int] = {}
    with sm.begin() as first:
        result["first"] = create(first)  # inserted, not yet committed
        # The second upload waits on the first (SQLite write lock / PG unique index), then
        # must find the committed row instead of failing on the unique constraint.
        other = threading.Thread(target=lambda: result.setdefault("second", create_in_tx()))

        def create_in_tx():
            with sm.begin() as s:
                return create(s)

        other.start()
        other.join(0.5)
    other.join(60)
    assert result["first"] == result["second"]
    with sm() as s:
        assert s.scalar(select(func.count()).select_from(ImageRecord)) == 1


WRITER = textwrap.dedent("""
    import sys
    from core.store import PredictionRecord, add_feedback, make_engine, make_sessionmaker
    sm = make_sessionmaker(make_engine(sys.argv[1]))
    i = 0
    while True:
        with sm.begin() as s:
            fid = add_feedback(s, s.get(PredictionRecord, int(sys.argv[2])),
                               verdict="agree", reviewer=f"writer {i}").id
        print(fid, flush=True)  # printed only once the commit has returned
        i += 1
""")


def test_sigkill_mid_write_loses_no_committed_row(db_url, sm):
    _, pred_id = _seed(sm)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, db_url, str(pred_id)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, proc.kill)  # never hang the suite on a stuck writer
    watchdog.start()
    try:
        committed = []
        while len(committed) < 40:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"writer died early: {proc.stderr.read()[-2000:]}")
            committed.append(int(line))
        proc.send_signal(signal.SIGKILL)  # mid-loop: it is busy writing the next rows
        rest, _ = proc.communicate(timeout=30)
    finally:
        watchdog.cancel()
    committed += [int(x) for x in rest.splitlines(keepends=True) if x.endswith("\n")]
    assert proc.returncode == -signal.SIGKILL

    fresh = make_engine(db_url)  # reopen as after a crash
    try:
        fresh_sm = make_sessionmaker(fresh)
        with fresh_sm() as s:
            found = set(s.scalars(select(FeedbackRecord.id)
                                  .where(FeedbackRecord.id.in_(committed))))
        assert found == set(committed)
        assert _feedback(fresh_sm, pred_id, verdict="unsure", reviewer="after crash")
        if fresh.dialect.name == "sqlite":
            with fresh.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    finally:
        fresh.dispose()


# ---------------------------------------------------------------- unavailable databases


def _sqlite_file(tmp_path) -> Path:
    path = tmp_path / "feedback.sqlite"
    make_engine(f"sqlite:///{path}").dispose()
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_database_is_unavailable(backend, tmp_path):
    if backend == "sqlite":
        # Root ignores chmod, so open the file read-only at the SQLite level instead.
        url = f"sqlite:///file:{_sqlite_file(tmp_path)}?mode=ro&uri=true"
        with pytest.raises(StoreUnavailable, match="read-only") as info:
            make_engine(url)
        assert "feedback cannot be saved" in str(info.value)
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        make_engine(pg_url_with_schema(schema)).dispose()  # tables exist: only writes fail
        with pytest.raises(StoreUnavailable, match="read-only"):
            make_engine(pg_url_with_schema(schema, default_transaction_read_only="on"))
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores file permissions")
def test_chmod_read_only_file_is_unavailable(tmp_path):
    path = _sqlite_file(tmp_path)
    path.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(StoreUnavailable, match="feedback cannot be saved"):
            make_engine(f"sqlite:///{path}")
    finally:
        tmp_path.chmod(0o755)
        path.chmod(0o644)


def test_corrupted_file_is_unavailable(tmp_path):
    path = tmp_path / "feedback.sqlite"
    path.write_bytes(b"this is not a database, just garbage " * 200)
    with pytest.raises(StoreUnavailable, match="damaged") as info:
        make_engine(f"sqlite:///{path}")
    assert str(path) in str(info.value) and "Traceback" not in str(info.value)


def test_unreachable_server_is_unavailable():
    pytest.importorskip("psycopg2")
    with pytest.raises(StoreUnavailable, match="cannot be reached"):
        make_engine("postgresql+psycopg2://nobody:secret@127.0.0.1:1/none")


def test_password_never_in_message():
    pytest.importorskip("psycopg2")
    with pytest.raises(StoreUnavailable) as info:
        make_engine("postgresql+psycopg2://nobody:s3cr3t@127.0.0.1:1/none")
    assert "s3cr3t" not in str(info.value)


def test_missing_folder_is_created_with_durable_pragmas(tmp_path):
    path = tmp_path / "a" / "b" / "feedback.sqlite"
    eng = make_engine(f"sqlite:///{path}")
    try:
        with eng.connect() as conn:
            pragma = lambda name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
            assert pragma("synchronous") == 2  # FULL
            assert pragma("foreign_keys") == 1 and pragma("busy_timeout") == 30000
    finally:
        eng.dispose()
    assert path.is_file()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ---------------------------------------------------------------- stored copies


@pytest.mark.parametrize("sha", ["", "abc", SHA.upper(), "../" + SHA[3:], SHA + "0",
                                 "g" * 64, SHA[:63] + "/"])
def test_store_image_copy_refuses_bad_sha(tmp_path, sha):
    with pytest.raises(ValueError):
        store_image_copy(tmp_path, sha, DATA, ".png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ext, expected", [
    (".png", ".png"), (".JPEG", ".jpeg"), ("tif", ".tif"), (".webp", ".webp"), (".jfif", ".jfif"),
    (".exe", ".bin"), ("/../../etc/passwd", ".bin"), ("", ".bin"), (".png/..", ".bin"),
])
def test_store_image_copy_sanitises_extension(tmp_path, ext, expected):
    rel = store_image_copy(tmp_path, SHA, DATA, ext)
    assert rel == f"{SHA[:2]}/{SHA}{expected}"
    target = (tmp_path / rel).resolve()
    assert target.parent.parent == tmp_path.resolve() and target.read_bytes() == DATA
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp file left


def test_store_image_copy_checks_hash_and_is_idempotent(tmp_path):
    with pytest.raises(ValueError, match="does not match"):
        store_image_copy(tmp_path, SHA, DATA + b"x", ".png")
    assert store_image_copy(tmp_path, SHA, DATA, ".png") == store_image_copy(
        tmp_path, SHA, DATA, ".png")


def test_image_rows_reject_bad_sha(sm):
    with pytest.raises(ValueError):
        with sm.begin() as s:
            get_or_create_image(s, sha256="../x", original_name="x", n_bytes=1, width=1,
                                height=1, stored_path="x")
    with sm() as s:
        assert s.scalar(select(func.count()).select_from(ImageRecord)) == 0
