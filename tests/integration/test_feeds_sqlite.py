"""What only the SQLite change feed has (the contract every feed keeps is test_feeds.py).

SQLite builds a row's JSON with functions of at most 127 arguments and has tables without
a rowid; a watched table's key falls back to the rowid.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

import pytest

from tests.integration.feed_backends import SQLiteDB
from tidings.feeds.sqlite import watch_table

pytestmark = pytest.mark.anyio


def test_wide_tables_and_blobs_are_captured(tmp_path: Path) -> None:
    db = tmp_path / "wide.db"
    columns = [f"c{n}" for n in range(150)]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(f"CREATE TABLE wide (id INTEGER PRIMARY KEY, {', '.join(columns)}, "
                     "data BLOB)")
        conn.commit()
    assert watch_table(f"sqlite:///{db}", "wide") == "id"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(f"INSERT INTO wide ({', '.join(columns)}, data) "
                     f"VALUES ({', '.join('?' * 150)}, ?)", (*range(150), b"\x00\xff"))
        conn.commit()
        new_doc = conn.execute("SELECT new_doc FROM tidings_changes").fetchone()[0]
    document = json.loads(new_doc)
    assert document == {"id": 1, **{c: n for n, c in enumerate(columns)}, "data": "00FF"}


async def test_watch_refuses_a_table_without_a_key(sqlite_db: SQLiteDB) -> None:
    await sqlite_db.execute("CREATE TABLE pairs (a TEXT, b TEXT, PRIMARY KEY (a, b)) "
                            "WITHOUT ROWID")
    refused = await sqlite_db.watch_command("pairs")
    assert refused.returncode != 0 and "has no rowid" in refused.stderr
