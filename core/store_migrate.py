"""Additive upgrades of an existing feedback database to the current tables.

`Base.metadata.create_all` creates missing tables but never touches a table that exists, so a
database written before a column was added would make every later query fail. The store only
ever gains nullable columns (rows written before keep NULL there: "not recorded"), and adding
one is a plain `ALTER TABLE ... ADD COLUMN` in SQLite and PostgreSQL: nothing stored is
rewritten or lost. A missing column that cannot be NULL is a schema this code cannot reach by
adding, and is refused with a message instead of being guessed at.
"""
from __future__ import annotations

import logging

from sqlalchemy import Connection, Engine, MetaData, inspect, text
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)


def missing_columns(bind: Engine | Connection, metadata: MetaData) -> list[tuple[str, str]]:
    """(table, column) pairs of `metadata` that the database's existing tables lack."""
    inspector = inspect(bind)
    missing = []
    for table in metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue  # create_all makes it whole
        present = {column["name"] for column in inspector.get_columns(table.name)}
        missing += [(table.name, column.name) for column in table.columns if column.name not in present]
    return missing


def add_missing_columns(engine: Engine, metadata: MetaData) -> list[str]:
    """Add every missing nullable column, in one transaction; returns "table.column" of each.
    Raises ValueError (nothing changed) when a missing column may not be NULL, or when the database
    login may not alter the tables (the message gives the statements an administrator can run)."""
    with engine.begin() as conn:
        # Looked up inside the transaction that adds them: two app processes opening one old
        # database at once must not both try (SQLite's BEGIN IMMEDIATE already serialises them).
        missing = missing_columns(conn, metadata)
        required = [f"{t}.{c}" for t, c in missing if not metadata.tables[t].columns[c].nullable]
        if required:
            raise ValueError(f"this database lacks the required column(s) {', '.join(required)}; it was written by "
                             "an incompatible version of HemaScribe (open it with that version, or choose another file)")
        statements = [_add_column_sql(engine, metadata, table, column) for table, column in missing]
        if statements and engine.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL lock_timeout = '5s'"))  # never hang the app behind a long query
        try:
            for statement in statements:
                conn.execute(text(statement))
        except SQLAlchemyError as error:
            raw = str(getattr(error, "orig", None) or error).lower()
            if "must be owner" in raw or "permission denied" in raw:
                raise ValueError("the database login may not add the columns this version needs; an administrator "
                                 "can run: " + "; ".join(statements)) from error
            raise
    added = [f"{t}.{c}" for t, c in missing]
    if added:
        log.info("feedback store upgraded: added %s (NULL on existing rows)", ", ".join(added))
    return added


def _add_column_sql(engine: Engine, metadata: MetaData, table: str, column: str) -> str:
    quote = engine.dialect.identifier_preparer.quote
    kind = metadata.tables[table].columns[column].type.compile(dialect=engine.dialect)
    # IF NOT EXISTS (PostgreSQL): a process that read the schema just before another added it
    guard = "IF NOT EXISTS " if engine.dialect.name == "postgresql" else ""
    return f"ALTER TABLE {quote(table)} ADD COLUMN {guard}{quote(column)} {kind}"
