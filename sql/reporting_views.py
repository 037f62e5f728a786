"""The reporting views under ``sql/views``: their SQL per database, and creating or dropping them in a migration.

Each migration that creates views has its own folder, ``sql/views/<revision>/``, never edited afterwards, so that
an old migration keeps creating the views its schema can support. Changing a view means a new migration with a
new folder that drops the old views and creates the new ones.

The view files are written once for PostgreSQL and SQLite; ``SECONDS_BETWEEN(a, b)`` stands for the seconds from
``a`` to ``b`` and is replaced by each dialect's form. SQLite cannot rebuild a table that a view reads (Alembic's
batch mode does that for most column changes other than adding one: it fails with "error in view ..."), so a
migration that rebuilds one of the tables the views read wraps the change::

    drop_views(op, "0002")
    with op.batch_alter_table("processing_runs", recreate="always") as batch: ...
    create_views(op, "0002")
"""
from __future__ import annotations

import re
from typing import Any

from sql import VIEWS_DIR


def seconds_between(dialect: str, start: str, end: str) -> str:
    if dialect == "postgresql":
        return f"CAST(EXTRACT(EPOCH FROM (({end}) - ({start}))) AS DOUBLE PRECISION)"
    if dialect == "sqlite":
        return f"((julianday({end}) - julianday({start})) * 86400.0)"
    raise NotImplementedError(f"reporting views: no SECONDS_BETWEEN for the {dialect!r} database")


def expand_macros(sql: str, dialect: str) -> str:
    """Replace every ``SECONDS_BETWEEN(a, b)`` (arguments may hold parentheses and commas inside them)."""
    marker = "SECONDS_BETWEEN("
    while (start := sql.find(marker)) >= 0:
        depth, position, arguments, argument_start = 1, start + len(marker), [], start + len(marker)
        while depth:
            char = sql[position]
            if char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
            elif char == "," and depth == 1:
                arguments.append(sql[argument_start:position].strip())
                argument_start = position + 1
            position += 1
        arguments.append(sql[argument_start:position - 1].strip())
        if len(arguments) != 2:
            raise ValueError(f"SECONDS_BETWEEN takes two arguments, got {arguments}")
        sql = sql[:start] + seconds_between(dialect, *arguments) + sql[position:]
    return sql


def view_statements(dialect: str, revision: str) -> list[tuple[str, str]]:
    """(view name, CREATE VIEW statement) for every view of a revision (sql/views/<revision>/), in file order."""
    folder = VIEWS_DIR / revision
    if not folder.is_dir():
        raise FileNotFoundError(f"no reporting views for revision {revision!r}: {folder} does not exist")
    statements = []
    for path in sorted(folder.glob("*.sql")):
        text = re.sub(r"--[^\n]*", "", path.read_text())
        for statement in (s.strip() for s in text.split(";")):
            if statement:
                name = re.match(r"CREATE\s+VIEW\s+(\w+)", statement, re.IGNORECASE)
                if name is None:
                    raise ValueError(f"{path}: only CREATE VIEW statements belong here, found {statement[:60]!r}")
                statements.append((name.group(1), expand_macros(statement, dialect)))
    return statements


def create_views(op: Any, revision: str) -> None:
    """Create the reporting views of ``revision`` (``op``: Alembic's operations object inside a migration)."""
    for _name, statement in view_statements(op.get_bind().dialect.name, revision):
        op.execute(statement)


def drop_views(op: Any, revision: str) -> None:
    """Drop the reporting views of ``revision``, dependents first."""
    for name, _statement in reversed(view_statements(op.get_bind().dialect.name, revision)):
        op.execute(f"DROP VIEW IF EXISTS {name}")
