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

from sqlalchemy import Engine, MetaData, inspect, text

log = logging.getLogger(__name__)


def missing_columns(engine: Engine, metadata: MetaData) -> list[tuple[str, str]]:
    """(table, column) pairs of `metadata` that the database's existing tables lack."""
    inspector = inspect(engine)
    missing = []
    for table in metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue  # create_all makes it whole
        present = {column["name"] for column in inspector.get_columns(table.name)}
        missing += [(table.name, column.name) for column in table.columns if column.name not in present]
    return missing


def add_missing_columns(engine: Engine, metadata: MetaData) -> list[str]:
    """Add every missing nullable column, in one transaction; returns "table.column" of each.
    Raises ValueError (nothing changed) when a missing column may not be NULL."""
    missing = missing_columns(engine, metadata)
    required = [f"{t}.{c}" for t, c in missing if not metadata.tables[t].columns[c].nullable]
    if required:
        raise ValueError(f"this database lacks the required column(s) {', '.join(required)}; it was written by an "
                         "incompatible version of HemaScribe (open it with that version, or choose another file)")
    quote = engine.dialect.identifier_preparer.quote
    with engine.begin() as conn:
        for table, column in missing:
            kind = metadata.tables[table].columns[column].type.compile(dialect=engine.dialect)
            conn.execute(text(f"ALTER TABLE {quote(table)} ADD COLUMN {quote(column)} {kind}"))
    added = [f"{t}.{c}" for t, c in missing]
    if added:
        log.info("feedback store upgraded: added %s (NULL on existing rows)", ", ".join(added))
    return added
