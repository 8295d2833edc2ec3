"""Several Tidings processes on one bus: fan-out across them, failover without loss,
a bus restart, workers on one port, and nginx in front."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import HubProcess, open_stream, publish, token
from tests.nginx import nginx, port_of, require_nginx
from tests.services import POSTGRES_URL, REDIS_URL, PrivateRedis, require
from tidings.transports import open_transport

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["redis", "postgres"])
def bus(request: pytest.FixtureRequest) -> Iterator[str]:
    base = require(REDIS_URL if request.param == "redis" else POSTGRES_URL)
    url = f"{base}?namespace=t{uuid.uuid4().hex[:12]}"
    yield url
    asyncio.run(_destroy(url))


async def _destroy(url: str) -> None:
    """Remove what the test left on the shared server (keys or a table)."""
    transport = open_transport(url)
    await transport.start()
    await transport.destroy()  # type: ignore[attr-defined]
    await transport.close()


def healthz(url: str) -> dict[str, object]:
    return httpx.get(url + "/healthz", timeout=5).json()  # type: ignore[no-any-return]


async def test_publish_on_one_process_reaches_the_others(
    hub_factory: type[HubProcess], bus: str
) -> None:
    a, b, c = (hub_factory("--bus", bus).start() for _ in range(3))
    async with httpx.AsyncClient(timeout=10) as client:
        async with (
            open_stream(client, b.url, [("topic", "/x")]) as on_b,
            open_stream(client, c.url, [("topic", "/x")]) as on_c,
        ):
            ids = [(await publish(client, a.url, "/x", str(i))).text for i in range(20)]
            for stream in (on_b, on_c):
                events = await stream.take(20)
                assert [e.id for e in events] == ids
        # History is shared: any process replays what another acknowledged.
        async with open_stream(client, c.url, [("topic", "/x")],
                               {"Last-Event-ID": ids[9]}) as late:
            assert [e.id for e in await late.take(10)] == ids[10:]


async def test_subscriber_of_a_killed_process_resumes_on_another(
    hub_factory: type[HubProcess], bus: str
) -> None:
    a, b, c = (hub_factory("--bus", bus).start() for _ in range(3))
    total = 300
    received: list[str] = []
    acked: list[str] = []
    async with httpx.AsyncClient(timeout=10) as client:

        async def publisher() -> None:
            for i in range(total):
                reply = await publish(client, b.url, "/k", str(i))
                assert reply.status_code == 200
                acked.append(reply.text)
                await asyncio.sleep(0.002)

        task = asyncio.create_task(publisher())
        last = None
        try:
            async with open_stream(client, a.url, [("topic", "/k")]) as on_a:
                for event in await on_a.take(50, timeout_s=20):
                    received.append(event.data)
                    last = event.id
                a.stop(signal.SIGKILL)  # mid-stream
                try:
                    while True:
                        event = await on_a.next(timeout_s=5)
                        received.append(event.data)
                        last = event.id
                except (httpx.HTTPError, StopAsyncIteration, TimeoutError):
                    pass
        except httpx.HTTPError:
            pass
        await task
        assert last is not None
        async with open_stream(client, c.url, [("topic", "/k")],
                               {"Last-Event-ID": last}) as on_c:
            for event in await on_c.take(total - len(received), timeout_s=20):
                received.append(event.data)
            assert await on_c.nothing_within(0.3)
    assert received == [str(i) for i in range(total)]
    assert len(acked) == total


async def test_redis_restart_mid_stream_loses_nothing_acknowledged(
    hub_factory: type[HubProcess], private_redis: PrivateRedis
) -> None:
    # A Redis of the test's own: restarting the shared one would break everyone else's
    # tests (tests/integration/test_outages.py has the same under load).
    redis = private_redis
    bus = f"{redis.url}?namespace=t{uuid.uuid4().hex[:12]}"
    a, b = hub_factory("--bus", bus).start(), hub_factory("--bus", bus).start()
    async with httpx.AsyncClient(timeout=10) as client:
        async with open_stream(client, a.url, [("topic", "/r")]) as stream:
            acked = [(await publish(client, b.url, "/r", f"before {i}")).text for i in range(20)]
            assert [e.id for e in await stream.take(20)] == acked
            redis.kill()
            try:
                down = await publish(client, b.url, "/r", "while down")
                assert down.status_code == 503
                assert down.headers.get("retry-after")
            finally:
                redis.start()
            after: list[str] = []
            deadline = time.monotonic() + 20
            while len(after) < 20 and time.monotonic() < deadline:
                reply = await publish(client, b.url, "/r", f"after {len(after)}")
                if reply.status_code == 200:
                    after.append(reply.text)
                else:
                    assert reply.status_code == 503
                    await asyncio.sleep(0.1)
            assert len(after) == 20
            events = await stream.take(20, timeout_s=20)
            assert [e.id for e in events] == after


def test_workers_need_a_bus(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tidings", "serve", "--workers", "2", "--port", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")},
    )
    assert result.returncode != 0
    assert "needs a shared bus" in result.stderr


async def test_workers_share_one_port(hub_factory: type[HubProcess]) -> None:
    bus = f"{require(REDIS_URL)}?namespace=t{uuid.uuid4().hex[:12]}"
    server = hub_factory("--bus", bus, "--workers", "2").start()
    pids = _worker_pids(server.url, 2)
    assert len(pids) == 2
    async with httpx.AsyncClient(timeout=10) as client, contextlib.AsyncExitStack() as stack:
        # Each open stream holds its own connection; the kernel spreads them over workers.
        streams = [await stack.enter_async_context(
            open_stream(client, server.url, [("topic", "/w")])) for _ in range(8)]
        reply = await publish(client, server.url, "/w", "to all")
        for stream in streams:
            assert (await stream.next()).id == reply.text
    server.stop()
    assert server.proc is not None and server.proc.returncode == 0


async def test_workers_end_when_their_supervisor_is_killed(
    hub_factory: type[HubProcess],
) -> None:
    """`--workers 2` whose supervisor is SIGKILLed (alone, not its process group): the
    workers shut down by themselves instead of serving on with nobody to stop them."""
    bus = f"{require(REDIS_URL)}?namespace=t{uuid.uuid4().hex[:12]}"
    server = hub_factory("--bus", bus, "--workers", "2").start()
    pids = _worker_pids(server.url, 2)
    assert len(pids) == 2 and server.pid not in pids
    os.kill(server.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not [pid for pid in pids if _running(pid)], "a worker outlived its supervisor"


def _worker_pids(url: str, workers: int) -> set[int]:
    """The pids that answer `/healthz` on `url`, asked over new connections (the kernel
    spreads them over the workers) until `workers` have answered, or for 20 s."""
    pids: set[int] = set()
    deadline = time.monotonic() + 20
    while len(pids) < workers and time.monotonic() < deadline:
        with httpx.Client() as fresh:  # a new connection each time
            pids.add(fresh.get(url + "/healthz").json()["pid"])
    return pids


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_nginx_in_front_of_two_processes(
    hub_factory: type[HubProcess], tmp_path: Path
) -> None:
    require_nginx()
    bus = f"{require(REDIS_URL)}?namespace=t{uuid.uuid4().hex[:12]}"
    a, b = hub_factory("--bus", bus).start(), hub_factory("--bus", bus).start()
    with nginx(tmp_path / "nginx", port_of(a.url), port_of(b.url)) as url:
        async with httpx.AsyncClient(timeout=10) as client:
            # EventSource behaviour: stream, and on a drop reconnect with Last-Event-ID.
            received: list[str] = []
            last = None
            async with open_stream(client, url, [("topic", "/n")]) as stream:
                ids = [(await publish(client, url, "/n", str(i))).text for i in range(10)]
                for event in await stream.take(10):
                    received.append(event.id or "")
                    last = event.id
            assert received == ids
            # The process behind the stream dies; the reconnect lands on the survivor.
            a.stop(signal.SIGKILL)
            more = [(await publish(client, url, "/n", str(i))).text for i in range(10, 15)]
            async with open_stream(client, url, [("topic", "/n")],
                                   {"Last-Event-ID": last or ""}) as stream:
                # nginx acts on X-Accel-Buffering itself and does not pass it on.
                assert stream.response.headers["content-type"].startswith("text/event-stream")
                assert [e.id for e in await stream.take(5)] == more


async def test_change_feed_on_several_processes_delivers_each_change_once(
    hub_factory: type[HubProcess], tmp_path: Path, bus: str
) -> None:
    """Every process tails the same change log; the bus stores each change once."""
    from tests.integration.feed_backends import AUTH, CONFIG, make_db

    make_db(tmp_path)
    config = tmp_path / "tidings.toml"
    config.write_text(CONFIG)
    a, b = (hub_factory("--bus", bus, "--config", str(config)).start() for _ in range(2))
    reader = {"Authorization": f"Bearer {token(subscribe=['*'])}"}
    topics = [("topic", "/collections/{name}")]
    async with httpx.AsyncClient(timeout=10) as client:
        async with (
            open_stream(client, a.url, topics, reader) as on_a,
            open_stream(client, b.url, topics, reader) as on_b,
        ):
            for i in range(10):
                target = (a if i % 2 else b).url
                reply = await client.post(f"{target}/api/collections/messages",
                                          json={"username": "u", "content": str(i)},
                                          headers=AUTH)
                assert reply.status_code == 201
            external = tmp_path / "tidings.db"
            import sqlite3

            with contextlib.closing(sqlite3.connect(external)) as db:
                for i in range(10):
                    db.execute("INSERT INTO orders (item, qty) VALUES (?, ?)", (f"i{i}", i))
                    db.commit()
            seen = []
            for stream in (on_a, on_b):
                events = await stream.take(20, timeout_s=15)
                assert len({e.id for e in events}) == 20
                assert await stream.nothing_within(0.5)
                seen.append([e.id for e in events])
            assert seen[0] == seen[1]  # one order on every process
