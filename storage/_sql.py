"""SQL helpers shared by the parts of the Store: version counters, id chunks, timestamps."""

import re
from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import sqlalchemy as sa

EMBEDDING_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 500  # ids per `IN (...)` clause, well under SQLite's bound-parameter limit


def _bump(conn: sa.Connection, counter: sa.Column, row_ids: list[int]) -> None:
    """Add 1 to a version counter (users.pref_version, collections.content_version) of these rows."""
    table = counter.table
    conn.execute(table.update().where(table.c.id.in_(row_ids)).values({counter.name: counter + 1}))


def _chunks(items: list) -> Iterator[list]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
