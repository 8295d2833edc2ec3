"""Shared fixtures: a real `tidings serve` process on a free port, and SSE helpers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tidings.hub.tokens import encode_token
from tidings.sse import Event, EventParser

KEY = "test-secret-key-that-is-long-enough-for-hs256"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def token(
    publish: list[str] | None = None, subscribe: list[str] | None = None, **kw: object
) -> str:
    return encode_token(KEY, publish=publish, subscribe=subscribe, **kw)  # type: ignore[arg-type]


PUBLISHER = token(publish=["*"])


class HubProcess:
    """`tidings serve` in a subprocess; `url` once it is listening."""

    def __init__(self, workdir: Path, *args: str, db: str | None = None) -> None:
        self.workdir = workdir
        self.log_path = workdir / f"server-{time.monotonic_ns()}.log"
        self.db = db or f"sqlite:///{workdir / 'tidings.db'}"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout_s: float = 20.0) -> HubProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tidings", "serve", "--port", "0", "--db", self.db,
             "--jwt-key", KEY, "--log-level", os.environ.get("TIDINGS_TEST_LOG_LEVEL", "warning"),
             *self.args],
            cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # a group of its own: its workers die with it (`stop`)
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            for line in text.splitlines():
                if "listening on http://" in line:
                    self.url = line.split("listening on ", 1)[1].split()[0]
            if self.url:
                try:
                    if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {text}")
            time.sleep(0.05)
        raise RuntimeError("server did not start: " + self.log_path.read_text())

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        """Send `sig` (SIGTERM: to the server, which stops its workers; SIGKILL: a crash
        of the whole server, its `--workers` processes too) and wait for the exit; what
        is left after `timeout_s` is killed."""
        assert self.proc is not None
        if self.proc.poll() is None:
            if sig == signal.SIGKILL:
                self._kill_group()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._kill_group()  # workers the server left behind, if any
        self._log.close()
        return self.proc.returncode

    def _kill_group(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def hub_factory(tmp_path: Path) -> Iterator[type[HubProcess]]:
    started: list[HubProcess] = []

    class Factory(HubProcess):
        def start(self, timeout_s: float = 20.0) -> HubProcess:
            started.append(self)
            return super().start(timeout_s)

    def make(*args: str, db: str | None = None) -> HubProcess:
        return Factory(tmp_path, *args, db=db)

    yield make  # type: ignore[misc]
    for server in started:
        server.stop(signal.SIGKILL)


@pytest.fixture
def chat_hubs(chat_db: str, hub_factory: type[HubProcess]) -> type[HubProcess]:
    """`hub_factory` whose servers keep the chat in `chat_db` (a fixture of the browser and
    integration tests: SQLite and PostgreSQL in turn). `chat_db` is set up first, so the
    servers die before its PostgreSQL schema is dropped."""

    def make(*args: str, db: str | None = None) -> HubProcess:
        return hub_factory(*args, db=db or chat_db)

    return make  # type: ignore[return-value]


@pytest.fixture
def hub(hub_factory: type[HubProcess]) -> HubProcess:
    return hub_factory("--subscriptions").start()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RestartableHub:
    """`tidings serve` on one port chosen once, so that clients reconnect after a restart
    to the URL they had, and `side()`: a second hub process on the same database, for
    publishing while the first is down (what it publishes can reach those clients only by
    replay from history)."""

    def __init__(self, factory: type[HubProcess]) -> None:
        self._factory = factory
        self._port = str(free_port())

    def start(self) -> HubProcess:
        return self._factory("--port", self._port).start()

    @contextlib.contextmanager
    def side(self) -> Iterator[HubProcess]:
        side = self._factory().start()
        try:
            yield side
        finally:
            side.stop()


@pytest.fixture
def restartable(hub_factory: type[HubProcess]) -> RestartableHub:
    return RestartableHub(hub_factory)


class SSEStream:
    """An open subscription read with the project's own parser."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.parser = EventParser()
        self._chunks = response.aiter_raw()
        self._pending: list[Event] = []

    async def next(self, timeout_s: float = 5.0) -> Event:
        import anyio

        with anyio.fail_after(timeout_s):
            while not self._pending:
                chunk = await self._chunks.__anext__()
                self._pending.extend(self.parser.feed(chunk))
        return self._pending.pop(0)

    async def take(self, n: int, timeout_s: float = 10.0) -> list[Event]:
        return [await self.next(timeout_s) for _ in range(n)]

    async def nothing_within(self, seconds: float) -> bool:
        import anyio

        if self._pending:
            return False
        with anyio.move_on_after(seconds):
            await self.next(seconds + 1)
            return False
        return True


@contextlib.asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient, url: str, params: list[tuple[str, str]],
    headers: dict[str, str] | None = None,
) -> AsyncIterator[SSEStream]:
    request = client.build_request("GET", url + "/.well-known/mercure", params=params,
                                   headers=headers or {})
    response = await client.send(request, stream=True)
    try:
        yield SSEStream(response)
    finally:
        await response.aclose()


async def publish(client: httpx.AsyncClient, url: str, topic: str | list[str], data: str,
                  token_: str = PUBLISHER, **fields: str) -> httpx.Response:
    topics = [topic] if isinstance(topic, str) else topic
    form = [("topic", t) for t in topics] + [("data", data), *fields.items()]
    return await client.post(
        url + "/.well-known/mercure",
        content=httpx.QueryParams(form).__str__(),
        headers={"Authorization": f"Bearer {token_}",
                 "Content-Type": "application/x-www-form-urlencoded"},
    )
