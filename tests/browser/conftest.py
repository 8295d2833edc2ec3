"""What the browser tests share: where Chromium is, how it is launched, and `browser`, one
headless Chromium per test module. Playwright is imported only when a browser is launched:
outside CI, a test module without Chromium skips itself before importing it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import asyncpg
import pytest

from tests.services import POSTGRES_URL, require

if TYPE_CHECKING:
    from playwright.sync_api import Browser

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: CI must run the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(params=["sqlite", "postgres"])
def chat_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The chat's store, each in turn (as `tests/integration/conftest.py::chat_db`, for
    synchronous tests: a PostgreSQL schema of the test's own, made and dropped from a
    thread of its own, away from Playwright's loop)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tidings.db'}"
        return
    base = require(POSTGRES_URL)
    schema = "tb_" + uuid.uuid4().hex[:12]
    pg_execute(base, f"CREATE SCHEMA {schema}")
    yield f"{base}{'&' if '?' in base else '?'}search_path={schema}"
    pg_execute(base, f"SET lock_timeout = '20s'; DROP SCHEMA {schema} CASCADE")


def pg_execute(url: str, script: str) -> None:
    """Run `script` (statements, no rows) on PostgreSQL at `url`."""
    _on_connection(url, lambda conn: conn.execute(script))


def pg_fetch(url: str, query: str) -> list[asyncpg.Record]:
    """The rows of `query` on PostgreSQL at `url` (a `?search_path=` in it is a setting
    of the session)."""
    return _on_connection(url, lambda conn: conn.fetch(query))


def _on_connection(url: str, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """`op` on a connection of its own, from a thread of its own, away from Playwright's
    loop."""

    async def run() -> T:
        conn = await asyncpg.connect(url)
        try:
            return await op(conn)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result(timeout=60)
