"""A feedback database written before the atypical mark was stored opens, keeps every row, and
gains the new columns (core.store_migrate); the review figures split agreement by the mark."""
from __future__ import annotations

import hashlib
import uuid

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, text
from sqlalchemy.engine import make_url

from core.store import (
    PredictionRecord, StoreUnavailable, add_feedback, add_prediction, get_or_create_image, make_engine,
    make_sessionmaker,
)
from core.store_migrate import add_missing_columns, missing_columns
from core.store_queries import agreement_summary, feedback_table, rows_to_csv
from tests.conftest import PG_URL, pg_url_with_schema

NEW_COLUMNS = ("atypical", "out_of_scope_score", "calibration_id")


def _record(sm, name: str, *, class_key: str | None = "neutrophil", verdict: str = "agree", **marks) -> int:
    data = name.encode()
    sha = hashlib.sha256(data).hexdigest()
    with sm.begin() as s:
        image = get_or_create_image(s, sha256=sha, original_name=name, n_bytes=len(data), width=8, height=8,
                                    stored_path=f"{sha[:2]}/{sha}.png")
        prediction = add_prediction(s, image, model_id="m", weights_sha256="0" * 64, panel="blood_cells",
                                    class_key=class_key, sentence="A neutrophil." if class_key else "Uncertain",
                                    confidence=0.9, abstained=class_key is None,
                                    abstain_reason=None if class_key else "weak match",
                                    scores={"neutrophil": 0.9}, **marks)
        add_feedback(s, prediction, verdict=verdict, reviewer="Dr A")
        return prediction.id


def _drop_new_columns(engine) -> None:
    with engine.begin() as conn:
        for column in NEW_COLUMNS:
            conn.execute(text(f"ALTER TABLE predictions DROP COLUMN {column}"))


def _old_database(tmp_path):
    """A SQLite file as the previous version left it: rows stored, no atypical columns."""
    path = tmp_path / "feedback.sqlite"
    engine = make_engine(f"sqlite:///{path}")
    _record(make_sessionmaker(engine), "old.png")
    _drop_new_columns(engine)
    engine.dispose()
    return path


def test_old_database_gains_the_columns_and_keeps_its_rows(db_url):
    """On SQLite and (in CI) PostgreSQL: the old rows stay, the new columns appear, new rows use them."""
    engine = make_engine(db_url)
    _record(make_sessionmaker(engine), "old.png")
    _drop_new_columns(engine)
    assert sorted(missing_columns(engine, PredictionRecord.metadata)) == [("predictions", c) for c in sorted(NEW_COLUMNS)]
    engine.dispose()
    engine = make_engine(db_url)
    try:
        sm = make_sessionmaker(engine)
        assert missing_columns(engine, PredictionRecord.metadata) == []
        new_id = _record(sm, "new.png", verdict="disagree", atypical=True, out_of_scope_score=12.5,
                         calibration_id="0123456789ab")
        with sm() as s:
            rows = feedback_table(s)
            stored = s.get(PredictionRecord, new_id)
            assert (stored.out_of_scope_score, stored.calibration_id) == (12.5, "0123456789ab")
        assert [(r["original_name"], r["atypical"]) for r in rows] == [("old.png", None), ("new.png", True)]
        assert rows_to_csv(rows).splitlines()[0].endswith(",sha256,atypical,out_of_scope_score,calibration_id")  # appended
        assert add_missing_columns(engine, PredictionRecord.metadata) == []  # a second pass adds nothing
    finally:
        engine.dispose()


def test_read_only_old_database_says_so_and_is_not_changed(tmp_path):
    path = _old_database(tmp_path)
    before = path.read_bytes()
    with pytest.raises(StoreUnavailable, match="read-only"):
        make_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    assert path.read_bytes() == before


def test_a_missing_required_column_is_refused_not_guessed(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'f.sqlite'}")
    wanted = MetaData()
    Table("images", wanted, Column("id", Integer, primary_key=True), Column("lab", String(20), nullable=False))
    try:
        with pytest.raises(ValueError, match=r"images\.lab"):
            add_missing_columns(engine, wanted)
        assert missing_columns(engine, wanted) == [("images", "lab")]  # nothing was added
    finally:
        engine.dispose()


def test_agreement_is_split_by_the_atypical_mark(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'f.sqlite'}")
    try:
        sm = make_sessionmaker(engine)
        _record(sm, "a", atypical=False)
        _record(sm, "b", atypical=False, verdict="disagree")
        _record(sm, "c", atypical=True, verdict="disagree")
        _record(sm, "d", atypical=True, verdict="unsure")
        _record(sm, "e", class_key=None)  # an abstention: never marked, not in the split
        _record(sm, "f")  # stored without the mark
        with sm() as s:
            split = agreement_summary(feedback_table(s))["by_typicality"]
    finally:
        engine.dispose()
    assert list(split) == ["typical", "atypical", "not marked"]
    assert split["typical"] == {"n": 2, "n_agree": 1, "n_disagree": 1, "n_unsure": 0, "agreement_rate": 0.5}
    assert split["atypical"]["agreement_rate"] == 0.0 and split["atypical"]["n_unsure"] == 1
    assert split["not marked"]["n"] == 1


def test_a_score_that_is_not_finite_is_stored_as_unknown(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'f.sqlite'}")
    try:
        sm = make_sessionmaker(engine)
        prediction_id = _record(sm, "x", atypical=False, out_of_scope_score=float("inf"))
        with sm() as s:
            assert s.get(PredictionRecord, prediction_id).out_of_scope_score is None
    finally:
        engine.dispose()


@pytest.mark.skipif(not PG_URL, reason="set HEMASCRIBE_TEST_PG_URL to run against PostgreSQL")
def test_a_login_that_may_not_alter_tables_gets_the_statements_to_ask_for():
    schema, role = f"t_{uuid.uuid4().hex[:12]}", f"r_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        make_engine(pg_url_with_schema(schema)).dispose()
        with admin.begin() as conn:  # an old database, opened by a login that does not own its tables
            conn.exec_driver_sql(f'ALTER TABLE "{schema}".predictions DROP COLUMN atypical')
            conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
            conn.exec_driver_sql(f'GRANT USAGE ON SCHEMA "{schema}" TO {role}')
            conn.exec_driver_sql(f'GRANT SELECT, INSERT, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO {role}')
        url = make_url(pg_url_with_schema(schema)).set(username=role).render_as_string(hide_password=False)
        with pytest.raises(StoreUnavailable, match="an administrator can run: ALTER TABLE predictions ADD COLUMN "
                                                   "IF NOT EXISTS atypical BOOLEAN"):
            make_engine(url)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
        admin.dispose()
