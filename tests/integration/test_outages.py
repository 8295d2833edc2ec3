"""Outages lose nothing acknowledged: storage goes away under load and comes back.

Each test keeps publishers and subscribers busy on real `tidings serve` processes
(outage_load.py) while the storage under them fails: the PostgreSQL server restarted, a
Redis of the test's own killed and restarted with and without persistence, the disk
under the hub's own SQLite filled. Throughout, a publish is acknowledged (200) only once
stored and refused otherwise (503, or 507 for a full disk, with Retry-After and a message);
every acknowledged update reaches every subscriber once, all in one order; the processes
recover by themselves; and each logs the outage once, not once per refused publish.

The PostgreSQL test stops the shared server: every other test using it fails meanwhile,
so when others run tests at the same time run it under `flock /tmp/pg-restart.lock`.
The Redis tests never touch the shared Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import HubProcess, publish
from tests.integration.outage_load import TOPIC, Load, history
from tests.integration.test_lifecycle import metrics
from tests.services import POSTGRES_URL, LocalPostgres, PrivateRedis, require, unavailable
from tidings.transports import open_transport

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

UNAVAILABLE = "is unavailable ("
BACK = "is back after"


async def storage_metrics(client: httpx.AsyncClient, url: str) -> tuple[int, int, int]:
    """What `/metrics` says of the hub's storage: up (1 or 0, as `/healthz` says it),
    outages begun, and histories lost."""
    values = await metrics(client, url)
    up, outages, lost = (int(values[name]) for name in (
        "tidings_storage_up", "tidings_storage_outages_total", "tidings_history_lost_total"))
    health = await client.get(url + "/healthz")
    assert health.status_code == 200 and health.json()["storage"] == ("up" if up else "down")
    return up, outages, lost


def outage_lines(server: HubProcess, what: str) -> tuple[int, int]:
    """How often the server said `what` became unavailable, and came back."""
    lines = [line for line in server.log().splitlines() if what in line]
    return sum(UNAVAILABLE in line for line in lines), sum(BACK in line for line in lines)


def assert_refusals_say_why(load: Load, statuses: set[int], words: str) -> None:
    """Each refused publish: an expected status, a Retry-After, a message with `words`,
    and quickly (a publisher waits on the storage's timeouts, not forever)."""
    assert load.refusals, "no publish met the outage"
    for refusal in load.refusals:
        assert refusal.status in statuses, refusal
        assert refusal.retry_after is not None and int(refusal.retry_after) > 0, refusal
        assert "not stored" in refusal.message and words in refusal.message, refusal
    assert max(p.slowest_s for p in load.publishers) < 8.0


async def assert_nothing_acknowledged_lost(
    client: httpx.AsyncClient, load: Load, urls: list[str], statuses: set[int], words: str
) -> None:
    """Every acknowledged update reached every follower once, in one order; refusals said
    why; and it is all stored: a new subscriber on each process replays the same."""
    await load.delivered()
    load.assert_exactly_once_in_one_order()
    assert_refusals_say_why(load, statuses, words)
    for url in urls:
        _, replayed = await history(client, url, len(load.acked))
        assert replayed == load.followers[0].ids


async def restart_under_load(hub_factory: type[HubProcess], bus: str, stop: Callable[[], None],
                             start: Callable[[], None], words: str) -> list[HubProcess]:
    """Two processes on `bus` under load through `stop()` ... `start()`: nothing
    acknowledged is lost. Returns the processes (for their logs)."""
    processes = [hub_factory("--bus", bus).start() for _ in range(2)]
    urls = [process.url for process in processes]
    async with httpx.AsyncClient(timeout=10) as client, Load(client, urls) as load:
        await ride_out_a_restart(load, stop, start)
        await assert_nothing_acknowledged_lost(client, load, urls, {503}, words)
        for url in urls:
            assert await storage_metrics(client, url) == (1, 1, 0)
    return processes


async def destroy(url: str) -> None:
    transport = open_transport(url)
    await transport.start()
    await transport.destroy()  # type: ignore[attr-defined]
    await transport.close()


async def ride_out_a_restart(load: Load, stop: Callable[[], None], start: Callable[[], None],
                             *, publishing_at_the_stop: bool = True) -> None:
    """Publish through `stop()` ... `start()` (blocking calls, run in a thread), with
    enough publishes refused in between on every process, then enough acknowledged after
    on every process (both recovered by themselves), then stop publishing. Publishing
    begins before the stop (so that some are in flight when it comes), or right after."""
    if publishing_at_the_stop:
        load.publish()
        mark = [len(p.acked) for p in load.publishers]
        await load.until(lambda: all(len(p.acked) >= m + 20
                                     for p, m in zip(load.publishers, mark, strict=True)),
                         "published")
        await asyncio.to_thread(stop)
    else:
        await asyncio.to_thread(stop)
        load.publish()
    try:
        # Down long enough (a second or so) for the fan-out's reconnects to back off.
        await load.until(lambda: all(len(p.refusals) >= 20 for p in load.publishers),
                         "every process refused publishes")
        for p in load.publishers:
            assert (await storage_metrics(p.client, p.url))[0] == 0, "storage said up"
    finally:
        await asyncio.to_thread(start)
    mark = [len(p.acked) for p in load.publishers]
    await load.until(lambda: all(len(p.acked) >= m + 20
                                 for p, m in zip(load.publishers, mark, strict=True)),
                     "every process acknowledged publishes again", timeout_s=30)
    await load.stop_publishing()


# -- PostgreSQL ------------------------------------------------------------------------


@pytest.fixture
def pg_bus() -> Iterator[str]:
    url = f"{require(POSTGRES_URL)}?namespace=o{uuid.uuid4().hex[:12]}"
    yield url
    asyncio.run(destroy(url))


async def test_postgresql_restart_loses_nothing_acknowledged(
    hub_factory: type[HubProcess], pg_bus: str
) -> None:
    server = LocalPostgres()
    processes = await restart_under_load(hub_factory, pg_bus, server.stop, server.start,
                                         "PostgreSQL")
    for process in processes:
        assert outage_lines(process, "PostgreSQL at") == (1, 1), process.log()


# -- Redis -----------------------------------------------------------------------------


@pytest.mark.parametrize("private_redis", ["appendonly"], indirect=True)
async def test_redis_restart_with_appendonly_loses_nothing_acknowledged(
    hub_factory: type[HubProcess], private_redis: PrivateRedis
) -> None:
    redis = private_redis
    # A crash (SIGKILL) mid-load, not a polite shutdown.
    processes = await restart_under_load(hub_factory, f"{redis.url}?namespace=o", redis.kill,
                                         redis.start, "Redis")
    for process in processes:
        assert outage_lines(process, "Redis at") == (1, 1), process.log()
        assert "lost the history" not in process.log()
        assert "append-only file" not in process.log()  # appendfsync always: nothing to say


@pytest.mark.parametrize("private_redis", ["no-persistence"], indirect=True)
async def test_redis_coming_back_empty_is_noticed_and_served_through(
    hub_factory: type[HubProcess], private_redis: PrivateRedis
) -> None:
    redis = private_redis
    a, b = (hub_factory("--bus", f"{redis.url}?namespace=o").start() for _ in range(2))
    async with httpx.AsyncClient(timeout=10) as client, Load(client, [a.url, b.url]) as load:
        # Before: published, and delivered everywhere, before Redis goes (with nothing in
        # flight at the crash, so that what follows is exact).
        await load.publish_each(20)
        before = load.acked
        await load.delivered()
        # Redis crashes and comes back empty; publishers busy from then on.
        await ride_out_a_restart(load, redis.kill, redis.start, publishing_at_the_stop=False)
        after = [uid for uid in load.acked if uid not in set(before)]
        await load.delivered()
        # The live subscribers never stalled: they got what came after the reset, once.
        load.assert_exactly_once_in_one_order()
        order = load.followers[0].ids
        assert order[:len(before)] == [uid for uid in order if uid in set(before)]
        assert_refusals_say_why(load, {503}, "Redis")
        for url in (a.url, b.url):
            # An id that went with the old history is unknown: `earliest`, all that remains.
            answered, replayed = await history(client, url, len(after), before[-1])
            assert answered == "earliest"
            assert replayed == order[len(before):]
            # One from the new history resumes exactly after it.
            answered, replayed = await history(client, url, 5, order[-6])
            assert answered == order[-6] and replayed == order[-5:]
        # New publishes still reach the live subscribers on both processes.
        reply = await publish(client, a.url, TOPIC, "last", id="last")
        assert reply.status_code == 200
        await load.until(lambda: all(f.ids[-1:] == ["last"] for f in load.followers), "last")
        for url in (a.url, b.url):
            assert await storage_metrics(client, url) == (1, 1, 1)
    for process in (a, b):
        log = process.log()
        assert log.count("lost the history this process had read") == 1, log
        assert log.count("keeps no append-only file (appendonly no)") == 1, log
        assert outage_lines(process, "Redis at") == (1, 1), log


# -- the hub's own SQLite on a full disk -----------------------------------------------


class Tmpfs:
    """A small tmpfs of the test's own (root only), filled with a file and freed by
    deleting it: a real full disk, ENOSPC, which SQLite reports as SQLITE_FULL (507)."""

    status, words = 507, "is full"

    def __init__(self, where: Path) -> None:
        self.dir = where
        self.dir.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs",
                                 str(self.dir)], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            unavailable(f"cannot mount a tmpfs here ({result.stderr.strip()}): the"
                        " file-size-limit variant of this test covers only the 503")
        self._filler = self.dir / "filler"

    def fill(self, pid: int) -> None:
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT)
        try:
            with contextlib.suppress(OSError):  # ENOSPC: full
                for _ in range(10_000):  # 16 MiB in 4 KiB blocks, with room to spare
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)

    def free(self, pid: int) -> None:
        self._filler.unlink()

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.dir)], capture_output=True, timeout=30)


class FileSizeLimit:
    """RLIMIT_FSIZE on the server process, set at the current size of its database's
    files and raised again with prlimit (same user, no restart): writes beyond it fail
    with EFBIG (Python ignores SIGXFSZ), which SQLite reports as an I/O error (503)."""

    status, words = 503, "disk I/O error"

    def __init__(self, where: Path) -> None:
        self.dir = where
        self.dir.mkdir()

    def fill(self, pid: int) -> None:
        size = max(path.stat().st_size for path in self.dir.iterdir())
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))

    def free(self, pid: int) -> None:
        resource.prlimit(pid, resource.RLIMIT_FSIZE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    def close(self) -> None:
        pass


@pytest.fixture(params=["tmpfs", "file-size-limit"])
def full_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tmpfs | FileSizeLimit]:
    disk = (Tmpfs if request.param == "tmpfs" else FileSizeLimit)(tmp_path / "disk")
    yield disk
    disk.close()


async def test_a_full_disk_refuses_publishes_and_keeps_what_was_acknowledged(
    hub_factory: type[HubProcess], full_disk: Tmpfs | FileSizeLimit
) -> None:
    hub = hub_factory(db=f"sqlite:///{full_disk.dir / 'tidings.db'}").start()
    async with httpx.AsyncClient(timeout=10) as client, Load(client, [hub.url]) as load:
        await load.publish_each(30)
        await asyncio.to_thread(full_disk.fill, hub.pid)
        load.publish()
        try:
            await load.until(lambda: len(load.refusals) >= 5, "publishes refused")
            assert await storage_metrics(client, hub.url) == (0, 1, 0)
        finally:
            await asyncio.to_thread(full_disk.free, hub.pid)
        mark = len(load.acked)
        await load.until(lambda: len(load.acked) >= mark + 20, "published again")
        await load.stop_publishing()
        await assert_nothing_acknowledged_lost(client, load, [hub.url], {full_disk.status},
                                               full_disk.words)
        assert await storage_metrics(client, hub.url) == (1, 1, 0)
    assert outage_lines(hub, "the hub's history database") == (1, 1), hub.log()
