"""`tidings bench`: the project's own fan-out benchmark.

N subscribers on one topic (or spread round-robin over K topics), M updates published at R per
second (0: back to back, one POST in flight). Every update's data is ``<seq>:<monotonic ns>``,
taken right before its POST is written, so each subscriber measures publish -> receive latency
and checks that it got every update of its topic exactly once and in order.

The hub is a fresh ``tidings serve --port 0 --db memory://`` subprocess unless the URL (and PID,
for the memory and CPU columns) of a running one is given. Subscribers are raw asyncio streams
(one HTTP/1.1 ``GET`` each, chunked body decoded here, SSE parsed by
:class:`tidings.sse.EventParser`); the publisher is one keep-alive ``httpx.AsyncClient``.
Server memory and CPU come from ``/proc/PID/status`` (VmRSS) and ``/proc/PID/stat``
(utime + stime), so those columns need Linux.

The loader is Python too: it tops out at a few tens of thousands of deliveries per second,
so its own CPU utilisation is reported; near 100 % the loader, not the hub, is the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import click
import httpx

from tidings.errors import SSEProtocolError
from tidings.sse import EventParser

__all__ = [
    "DEFAULT_KEY",
    "BenchConfig",
    "BenchResult",
    "ChunkedDecoder",
    "ChunkedError",
    "LatencySummary",
    "ServerStats",
    "command",
    "main",
    "markdown_header",
    "markdown_row",
    "run_bench",
]

DEFAULT_KEY = "tidings-bench-key-0123456789abcdef0123456789abcdef"
HUB_PATH = "/.well-known/mercure"
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_LISTENING = "listening on http://"
_FORM = "application/x-www-form-urlencoded"


# -- configuration and results ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """One benchmark run. ``rate`` 0 publishes back to back (one POST in flight)."""

    subscribers: int = 100
    updates: int = 100
    rate: float = 0.0
    topics: int = 1
    url: str | None = None
    pid: int | None = None
    jwt_key: str = DEFAULT_KEY
    timeout_s: float = 120.0
    idle_s: float = 5.0
    window: int = 200
    settle_s: float = 0.5
    warmup: int = 20
    topic_prefix: str = "bench/"
    server_args: tuple[str, ...] = ()
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.subscribers < 1 or self.updates < 1 or self.topics < 1 or self.window < 1:
            raise ValueError("subscribers, updates, topics and window must be positive")
        if (self.rate < 0 or self.timeout_s <= 0 or self.idle_s <= 0 or self.settle_s < 0
                or self.warmup < 0):
            raise ValueError("rate, timeout, idle and settle must not be negative")
        if self.pid is not None and self.url is None:
            raise ValueError("--pid needs --url (the server that PID is listening on)")

    @property
    def label(self) -> str:
        rate = f"{self.rate:g}"
        return f"n={self.subscribers} k={self.topics} m={self.updates} r={rate}"


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Publish -> receive latency in milliseconds over every unique delivery."""

    count: int = 0
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    p999: float = 0.0
    max: float = 0.0
    mean: float = 0.0

    @classmethod
    def of(cls, samples_ns: Sequence[int]) -> LatencySummary:
        if not samples_ns:
            return cls()
        ordered = sorted(samples_ns)
        n = len(ordered)

        def rank(q: float) -> float:
            # Nearest rank: the smallest sample with at least q of the samples at or below it.
            index = min(n - 1, max(0, -int(-q * n // 1) - 1))
            return round(ordered[index] / 1e6, 3)

        return cls(count=n, p50=rank(0.5), p90=rank(0.9), p99=rank(0.99), p999=rank(0.999),
                   max=round(ordered[-1] / 1e6, 3), mean=round(sum(ordered) / n / 1e6, 3))


@dataclass(frozen=True, slots=True)
class ServerStats:
    """Memory and CPU of the hub process, from ``/proc/PID``."""

    pid: int
    rss_base_kb: int
    rss_connected_kb: int
    rss_peak_kb: int
    rss_end_kb: int
    rss_per_conn_idle_kb: float
    rss_per_conn_peak_kb: float
    cpu_s_connect: float
    cpu_s_run: float
    cpu_util_run: float
    cpu_wait_s_run: float
    cpu_us_per_delivery: float


@dataclass(frozen=True, slots=True)
class BenchResult:
    """Everything one run measured; ``ok`` means nothing was lost, duplicated or reordered."""

    config: dict[str, Any]
    label: str
    url: str
    connections_requested: int
    connections_ok: int
    connect_errors: int
    http_errors: int
    last_bad_status: int
    connect_time_s: float
    published: int
    publish_errors: int
    publish_time_s: float
    publish_rate: float
    publish_rtt_ms: dict[str, float]
    events_expected: int
    events_received: int
    lost: int
    duplicates: int
    out_of_order: int
    misrouted: int
    bad_events: int
    closed_early: int
    heartbeats: int
    deliveries_per_s: float
    latency_ms: LatencySummary
    server: ServerStats | None
    loader_cpu_s: float
    loader_cpu_util: float
    loader_cpu_us_per_delivery: float
    publisher_cpu_s: float
    loader_cpu_wait_s: float
    run_wall_s: float
    stop_reason: str
    elapsed_s: float
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.connections_ok == self.connections_requested
            and self.publish_errors == 0
            and self.published == self.config["updates"]
            and self.events_received == self.events_expected
            and self.lost == self.duplicates == self.out_of_order == self.misrouted == 0
            and self.bad_events == 0
            and self.closed_early == 0
            and self.stop_reason == "complete"
        )

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        return json.dumps(data, separators=(",", ":"))


# -- wire helpers ----------------------------------------------------------------------------


class ChunkedError(ValueError):
    """The response body is not valid HTTP/1.1 chunked encoding."""


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """Incremental decoder of an HTTP/1.1 ``Transfer-Encoding: chunked`` body (sans I/O).

    :meth:`feed` takes whatever bytes arrived and returns the body bytes they complete; a
    chunk-size line or CRLF cut anywhere stays buffered until the rest arrives. ``done`` turns
    true after the last (zero-size) chunk and its trailer.
    """

    __slots__ = ("_buf", "_remaining", "_state")

    MAX_LINE = 4096

    def __init__(self) -> None:
        self._buf = bytearray()
        self._remaining = 0
        self._state = _SIZE

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> bytes:
        if self._state == _DONE:
            return b""
        if self._state == _SIZE and not self._buf:
            # Fast path: a read holding exactly one whole chunk, as each SSE frame usually is.
            eol = data.find(b"\r\n")
            if 0 < eol <= 8 and data.endswith(b"\r\n"):
                with contextlib.suppress(ValueError):
                    size = int(data[:eol], 16)
                    if size > 0 and len(data) == eol + size + 4 and data[:eol].isalnum():
                        return data[eol + 2:-2]
        buf = self._buf
        buf += data
        out = bytearray()
        pos = 0
        end_of_buf = len(buf)
        while pos < end_of_buf or self._state == _DATA_END:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end_of_buf - pos)
                out += buf[pos:pos + take]
                pos += take
                self._remaining -= take
                if self._remaining:
                    break
                self._state = _DATA_END
            elif state == _DATA_END:
                if end_of_buf - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ChunkedError("a chunk is not followed by CRLF")
                pos += 2
                self._state = _SIZE
            else:  # _SIZE or _TRAILER: one line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if end_of_buf - pos > self.MAX_LINE:
                        raise ChunkedError("chunk-size or trailer line too long")
                    break
                line = bytes(buf[pos:eol])
                pos = eol + 2
                if state == _TRAILER:
                    if not line:
                        self._state = _DONE
                        break
                    continue
                digits = line.split(b";", 1)[0].strip()
                try:
                    size = int(digits, 16)
                except ValueError:
                    raise ChunkedError(f"bad chunk size {digits!r}") from None
                if size < 0 or not digits.isalnum():
                    raise ChunkedError(f"bad chunk size {digits!r}")
                if size == 0:
                    self._state = _TRAILER
                else:
                    self._remaining = size
                    self._state = _DATA
        del buf[:pos]
        return bytes(out)


# -- /proc -----------------------------------------------------------------------------------


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    raise ProcessLookupError(pid)


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        text = stat.read()
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)


def _wait_s(pid: int | str) -> float:
    """Seconds the process's threads spent runnable but waiting for a CPU (schedstat field 2):
    how much other processes on the machine held it back. 0 where unavailable."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError), open(
                    f"/proc/{pid}/task/{task}/schedstat", "rb") as stat:
                total += int(stat.read().split()[1])
    return total / 1e9


def _loader_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


# -- the run ---------------------------------------------------------------------------------


class _Subscriber:
    __slots__ = (
        "closed_early", "connected", "decoder", "duplicates", "heartbeats", "high", "misrouted",
        "out_of_order", "parser", "received", "seen", "topic", "writer",
    )

    def __init__(self, topic: int, slots: int) -> None:
        self.topic = topic
        self.seen = bytearray(slots)  # one byte per update of this subscriber's topic
        self.high = -1
        self.received = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.misrouted = 0
        self.heartbeats = 0
        self.connected = False
        self.closed_early = False
        self.parser = EventParser()
        self.decoder: ChunkedDecoder | None = None
        self.writer: asyncio.StreamWriter | None = None


class _Run:
    def __init__(self, config: BenchConfig, host: str, port: int, base_path: str) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.base_path = base_path
        k = config.topics
        self.topic_names = [f"{config.topic_prefix}{i}" for i in range(k)]
        slots = [len(range(t, config.updates, k)) for t in range(k)]
        self.subs = [_Subscriber(i % k, slots[i % k]) for i in range(config.subscribers)]
        self.latencies = array("q")
        self.received_total = 0
        self.bad_events = 0
        self.connect_errors = 0
        self.http_errors = 0
        self.last_bad_status = 0
        self.first_publish_ns = 0
        self.last_delivery_ns = 0
        self.published_ok = bytearray(config.updates)
        self.published = 0
        self.publish_errors = 0
        self.publish_done = False
        self.publish_end_ns = 0
        self.rtts_ns = array("q")
        self.publisher_cpu_s = 0.0
        self.stopping = False
        self.readers: list[asyncio.Task[None]] = []

    # -- subscribers -------------------------------------------------------------------------

    def _request(self, topic: int) -> bytes:
        target = f"{self.base_path}{HUB_PATH}?topic={quote(self.topic_names[topic], safe='')}"
        return (f"GET {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n").encode()

    async def connect(self, sub: _Subscriber, window: asyncio.Semaphore) -> None:
        request = self._request(sub.topic)
        async with window:
            for _attempt in range(3):
                try:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                except OSError:
                    self.connect_errors += 1
                    await asyncio.sleep(0.05)
                    continue
                try:
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    self.connect_errors += 1
                    await _close(writer)
                    continue
                except BaseException:  # cancelled at the connect deadline
                    writer.close()
                    raise
                status, chunked = self._check_head(head)
                if status != 200:
                    self.http_errors += 1
                    self.last_bad_status = status
                    await _close(writer)
                    return
                sub.decoder = ChunkedDecoder() if chunked else None
                sub.writer = writer
                sub.connected = True
                self.readers.append(asyncio.create_task(self.read(sub, reader)))
                return

    @staticmethod
    def _check_head(head: bytes) -> tuple[int, bool]:
        """(status, chunked) of a response head; status 0 if not a text/event-stream 200."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if status == 200 and not headers.get("content-type", "").startswith("text/event-stream"):
            status = 0
        return status, "chunked" in headers.get("transfer-encoding", "")

    async def read(self, sub: _Subscriber, reader: asyncio.StreamReader) -> None:
        decoder, parser = sub.decoder, sub.parser
        k, m = self.config.topics, self.config.updates
        topic, seen, latencies = sub.topic, sub.seen, self.latencies
        try:
            while True:
                data = await reader.read(1 << 18)
                if not data:
                    break
                now = time.monotonic_ns()
                if decoder is not None:
                    data = decoder.feed(data)
                events = parser.feed(data) if data else []
                fresh = 0
                for event in events:
                    seq_text, _, stamp = event.data.partition(":")
                    try:
                        seq = int(seq_text)
                        sent = int(stamp)
                    except ValueError:
                        self.bad_events += 1
                        continue
                    if not 0 <= seq < m:
                        self.bad_events += 1
                        continue
                    if seq % k != topic:
                        sub.misrouted += 1
                        continue
                    slot = seq // k
                    if seen[slot]:
                        sub.duplicates += 1
                        continue
                    seen[slot] = 1
                    if slot < sub.high:
                        sub.out_of_order += 1
                    else:
                        sub.high = slot
                    fresh += 1
                    latencies.append(now - sent)
                if fresh:
                    sub.received += fresh
                    self.received_total += fresh
                    self.last_delivery_ns = now
                if decoder is not None and decoder.done:
                    break
        except (OSError, ValueError, SSEProtocolError):  # reset, bad chunk, oversized event
            self.bad_events += 1
        finally:
            sub.heartbeats = parser.comments
            if not self.stopping:
                sub.closed_early = True

    # -- publisher ---------------------------------------------------------------------------

    def publish_in_thread(self, token: str) -> None:
        """Publish from a thread with its own event loop, so that the subscribers' loop, busy
        parsing deliveries, does not hold POST responses unread (that would slow the publish
        rate and inflate the round trip). The GIL is still shared: see ``run_bench``."""

        async def go() -> None:
            async with _publisher_client() as client:
                await self.publish(client, token)

        cpu_0 = time.thread_time()
        try:
            with asyncio.Runner(loop_factory=_new_loop) as runner:
                runner.run(go())
        finally:
            self.publisher_cpu_s = time.thread_time() - cpu_0

    async def publish(self, client: httpx.AsyncClient, token: str) -> None:
        config = self.config
        url = f"http://{self.host}:{self.port}{self.base_path}{HUB_PATH}"
        headers = {"Authorization": f"Bearer {token}", "Content-Type": _FORM}
        topics = [quote(t, safe="") for t in self.topic_names]
        interval_ns = int(1e9 / config.rate) if config.rate > 0 else 0
        start = time.monotonic_ns()
        failures_in_a_row = 0
        try:
            for seq in range(config.updates):
                if self.stopping:
                    break
                while interval_ns and not self.stopping:  # an absolute schedule: no drift
                    delay = start + seq * interval_ns - time.monotonic_ns()
                    if delay <= 0:
                        break
                    await asyncio.sleep(min(delay / 1e9, 0.1))
                if self.stopping:
                    break
                sent = time.monotonic_ns()
                if seq == 0:
                    self.first_publish_ns = sent
                body = f"topic={topics[seq % config.topics]}&data={seq}%3A{sent}"
                try:
                    reply = await client.post(url, content=body, headers=headers)
                    ok = reply.status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.rtts_ns.append(time.monotonic_ns() - sent)
                if ok:
                    self.published_ok[seq] = 1
                    self.published += 1
                    failures_in_a_row = 0
                else:
                    self.publish_errors += 1
                    failures_in_a_row += 1
                    if failures_in_a_row >= 20:
                        _say(config, "bench: 20 publishes in a row failed; giving up publishing")
                        break
        finally:
            self.publish_end_ns = time.monotonic_ns()
            self.publish_done = True

    async def warm_up(self, client: httpx.AsyncClient, token: str, count: int) -> None:
        """One subscriber on a topic of its own and ``count`` updates before measuring, so
        first-use costs (lazy imports, caches) stay out of the numbers."""
        url = f"http://{self.host}:{self.port}{self.base_path}{HUB_PATH}"
        target = f"{self.base_path}{HUB_PATH}?topic=bench-warmup%2F0"
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write((f"GET {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                          "Accept: text/event-stream\r\n\r\n").encode())
            async with asyncio.timeout(10):
                status, chunked = self._check_head(await reader.readuntil(b"\r\n\r\n"))
                if status != 200:
                    raise click.ClickException(f"warm-up subscription answered {status}")
                for seq in range(count):
                    reply = await client.post(url, content=f"topic=bench-warmup%2F0&data={seq}",
                                              headers={"Authorization": f"Bearer {token}",
                                                       "Content-Type": _FORM})
                    if reply.status_code != 200:
                        raise click.ClickException(
                            f"warm-up publish answered {reply.status_code}: {reply.text}")
                decoder, parser, got = ChunkedDecoder() if chunked else None, EventParser(), 0
                while got < count:
                    data = await reader.read(1 << 16)
                    if not data:
                        break
                    got += len(parser.feed(decoder.feed(data) if decoder else data))
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise click.ClickException(f"warm-up failed: {exc!r}") from exc
        finally:
            await _close(writer)

    def expected_total(self) -> int:
        k = self.config.topics
        per_topic = [sum(self.published_ok[t::k]) for t in range(k)]
        return sum(per_topic[s.topic] for s in self.subs if s.connected)


def _publisher_client() -> httpx.AsyncClient:
    """One keep-alive connection, one request in flight."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return httpx.AsyncClient(timeout=10.0, limits=limits)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def _say(config: BenchConfig, message: str) -> None:
    if not config.quiet:
        click.echo(message, err=True)


class _Server:
    """A ``tidings serve`` subprocess on a free port; output goes to a temporary log file."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.workdir = Path(tempfile.mkdtemp(prefix="tidings-bench-"))
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout_s: float = 30.0) -> str:
        args = list(self.config.server_args)
        if self.config.subscribers > 19_000 and not any(
                a.startswith("--max-subscribers") for a in args):
            args += ["--max-subscribers", str(self.config.subscribers + 1000)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tidings", "serve", "--host", "127.0.0.1", "--port", "0",
                 "--db", "memory://", "--jwt-key", self.config.jwt_key,
                 "--log-level", "warning", *args],
                cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if not self.url and _LISTENING in text:
                self.url = "http://" + text.split(_LISTENING, 1)[1].split()[0]
            if self.url:
                try:
                    if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                        return self.url
                except httpx.TransportError:
                    pass
            if self.proc.poll() is not None:
                raise click.ClickException(f"the hub exited during startup:\n{text}")
            time.sleep(0.05)
        self.stop()
        raise click.ClickException(f"the hub did not start within {timeout_s:g} s:\n"
                                   + self.log_path.read_text(errors="replace"))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cleanup(self) -> None:
        with contextlib.suppress(OSError):
            self.log_path.unlink()
            self.workdir.rmdir()


class _Sampler:
    """Peak RSS of the hub, sampled every 100 ms while the run lasts."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = _rss_kb(pid)

    def sample(self) -> int:
        rss = _rss_kb(self.pid)
        self.peak_kb = max(self.peak_kb, rss)
        return rss

    async def run(self) -> None:
        with contextlib.suppress(OSError, ProcessLookupError):
            while True:
                self.sample()
                await asyncio.sleep(0.1)


def _ms_summary(samples_ns: Sequence[int]) -> dict[str, float]:
    if not samples_ns:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(samples_ns)
    n = len(ordered)
    return {"p50": round(ordered[(n - 1) // 2] / 1e6, 3),
            "p99": round(ordered[min(n - 1, int(0.99 * n))] / 1e6, 3),
            "max": round(ordered[-1] / 1e6, 3)}


async def _run_async(config: BenchConfig, url: str, pid: int | None,
                     alive: Callable[[], bool]) -> BenchResult:
    from tidings.hub.auth import encode_token

    started = time.monotonic()
    deadline = started + config.timeout_s
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise click.ClickException(f"only http:// URLs are supported: {url}")
    run = _Run(config, parts.hostname, parts.port or 80, parts.path.rstrip("/"))

    token = encode_token(config.jwt_key, publish=["*"])
    if config.warmup:
        async with _publisher_client() as client:
            await run.warm_up(client, token, config.warmup)

    sampler = _Sampler(pid) if pid is not None else None
    rss_base = sampler.sample() if sampler else 0
    cpu_base = _cpu_s(pid) if pid is not None else 0.0
    sampling = asyncio.create_task(sampler.run()) if sampler else None

    # Connect with a sliding window so the listen backlog is never overrun.
    window = asyncio.Semaphore(config.window)
    t0 = time.monotonic()
    connecting = [asyncio.create_task(run.connect(s, window)) for s in run.subs]
    _, pending = await asyncio.wait(connecting, timeout=max(0.1, deadline - time.monotonic()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    connect_time_s = time.monotonic() - t0
    connected = sum(s.connected for s in run.subs)
    _say(config, f"bench: {connected}/{config.subscribers} subscribers connected "
                 f"in {connect_time_s:.2f} s")

    await asyncio.sleep(config.settle_s)
    rss_connected = sampler.sample() if sampler else 0
    cpu_connected = _cpu_s(pid) if pid is not None else 0.0
    wait_connected = _wait_s(pid) if pid is not None else 0.0
    loader_cpu_0, loader_wait_0 = _loader_cpu_s(), _wait_s("self")
    wall_0 = time.monotonic()

    stop_reason = "complete"
    publisher = asyncio.ensure_future(asyncio.to_thread(run.publish_in_thread, token))
    while True:
        await asyncio.sleep(0.02)
        now = time.monotonic()
        if run.publish_done and run.received_total >= run.expected_total():
            break
        if now >= deadline:
            stop_reason = "timeout"
            break
        if not alive():
            stop_reason = "server exited"
            break
        last = max(run.last_delivery_ns, run.publish_end_ns) / 1e9
        if run.publish_done and now - last >= config.idle_s:
            stop_reason = "idle"
            break
    run.stopping = True
    await publisher  # within one POST timeout at worst
    wall_s = time.monotonic() - wall_0
    loader_cpu_s = _loader_cpu_s() - loader_cpu_0
    loader_wait_s = _wait_s("self") - loader_wait_0

    server: ServerStats | None = None
    if sampler is not None and pid is not None:
        try:
            cpu_end, wait_end = _cpu_s(pid), _wait_s(pid)
            rss_end = sampler.sample()
        except (OSError, ProcessLookupError):
            cpu_end, wait_end, rss_end = cpu_connected, wait_connected, 0
        n = max(1, config.subscribers)
        cpu_run = cpu_end - cpu_connected
        server = ServerStats(
            pid=pid, rss_base_kb=rss_base, rss_connected_kb=rss_connected,
            rss_peak_kb=sampler.peak_kb, rss_end_kb=rss_end,
            rss_per_conn_idle_kb=round((rss_connected - rss_base) / n, 2),
            rss_per_conn_peak_kb=round((sampler.peak_kb - rss_base) / n, 2),
            cpu_s_connect=round(cpu_connected - cpu_base, 3), cpu_s_run=round(cpu_run, 3),
            cpu_util_run=round(cpu_run / wall_s, 3) if wall_s > 0 else 0.0,
            cpu_wait_s_run=round(wait_end - wait_connected, 3),
            cpu_us_per_delivery=round(cpu_run / run.received_total * 1e6, 2)
            if run.received_total else 0.0,
        )
    if sampling is not None:
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)

    for sub in run.subs:
        if sub.writer is not None:
            sub.writer.close()
    for task in run.readers:
        task.cancel()
    await asyncio.gather(*run.readers, return_exceptions=True)
    for sub in run.subs:
        if sub.writer is not None:
            with contextlib.suppress(OSError):
                await sub.writer.wait_closed()

    k = config.topics
    lost = 0
    for sub in run.subs:
        if sub.connected:
            ok = run.published_ok[sub.topic::k]
            lost += sum(1 for got, pub in zip(sub.seen, ok, strict=True) if pub and not got)
    delivery_span_s = (run.last_delivery_ns - run.first_publish_ns) / 1e9
    publish_time_s = (run.publish_end_ns - run.first_publish_ns) / 1e9 if run.published else 0.0
    return BenchResult(
        config=dataclasses.asdict(config) | {"jwt_key": "<redacted>"},
        label=config.label, url=url,
        connections_requested=config.subscribers,
        connections_ok=sum(s.connected for s in run.subs),
        connect_errors=run.connect_errors, http_errors=run.http_errors,
        last_bad_status=run.last_bad_status, connect_time_s=round(connect_time_s, 3),
        published=run.published, publish_errors=run.publish_errors,
        publish_time_s=round(publish_time_s, 3),
        publish_rate=round(run.published / publish_time_s, 1) if publish_time_s > 0 else 0.0,
        publish_rtt_ms=_ms_summary(run.rtts_ns),
        events_expected=run.expected_total(), events_received=run.received_total,
        lost=lost, duplicates=sum(s.duplicates for s in run.subs),
        out_of_order=sum(s.out_of_order for s in run.subs),
        misrouted=sum(s.misrouted for s in run.subs), bad_events=run.bad_events,
        closed_early=sum(s.closed_early for s in run.subs),
        heartbeats=sum(s.heartbeats for s in run.subs),
        deliveries_per_s=round(run.received_total / delivery_span_s, 1)
        if delivery_span_s > 0 else 0.0,
        latency_ms=LatencySummary.of(run.latencies), server=server,
        loader_cpu_s=round(loader_cpu_s, 3),
        loader_cpu_util=round(loader_cpu_s / wall_s, 3) if wall_s > 0 else 0.0,
        loader_cpu_us_per_delivery=round(
            (loader_cpu_s - run.publisher_cpu_s) / run.received_total * 1e6, 2)
        if run.received_total else 0.0,
        publisher_cpu_s=round(run.publisher_cpu_s, 3),
        loader_cpu_wait_s=round(loader_wait_s, 3), run_wall_s=round(wall_s, 3),
        stop_reason=stop_reason, elapsed_s=round(time.monotonic() - started, 3),
    )


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _cache_missing_sniffio() -> None:
    # httpcore runs `import sniffio` on every request; when sniffio is not installed, each
    # failed import searches sys.path again (~0.3 ms a POST). A None entry is Python's way to
    # make such an import fail at once; nothing changes if sniffio is installed.
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


def run_bench(config: BenchConfig) -> BenchResult:
    """Run one benchmark (starting and stopping a hub unless ``config.url`` is set)."""
    fds = raise_fd_limit(config.subscribers + 64)
    if fds < config.subscribers + 64:
        _say(config, f"bench: the open-files limit is {fds}: not enough for "
                     f"{config.subscribers} subscribers (raise the hard limit, `ulimit -Hn`)")
    _cache_missing_sniffio()
    server: _Server | None = None
    url, pid = config.url, config.pid
    if url is None:
        server = _Server(config)
        url = server.start()
        pid = server.pid

    def alive() -> bool:
        return server is None or server.running

    failed = True
    # The publisher thread waits for the GIL whenever its POST answer arrives; let it have it
    # after 1 ms instead of the default 5 ms.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    try:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            result = runner.run(_run_async(config, url, pid, alive))
        failed = False
    finally:
        sys.setswitchinterval(switch_interval)
        if server is not None:
            crashed = not server.running
            server.stop()
            if failed or crashed:
                sys.stderr.write(f"bench: hub log {server.log_path}:\n{server.log()[-4000:]}\n")
            else:
                server.cleanup()
    versions = {"python": sys.version.split()[0], "httpx": httpx.__version__}
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        versions["tidings"] = version("tidings")
    return dataclasses.replace(result, versions=versions)


# -- output ----------------------------------------------------------------------------------

_COLUMNS = (
    "scenario", "conns ok", "pub/s", "POST rtt p50/p99 ms", "received / expected", "lost",
    "dup", "ooo", "deliveries/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms",
    "server CPU s (util)", "server CPU µs/delivery", "loader CPU util", "RSS base MB",
    "RSS connected MB", "RSS peak MB", "RSS/conn KB (idle / peak)",
)


def markdown_header() -> str:
    return ("| " + " | ".join(_COLUMNS) + " |\n"
            + "|" + "|".join("---" for _ in _COLUMNS) + "|")


def markdown_row(result: BenchResult) -> str:
    lat, srv = result.latency_ms, result.server
    cells = [
        result.label,
        f"{result.connections_ok}/{result.connections_requested}",
        f"{result.publish_rate:.0f}",
        f"{result.publish_rtt_ms['p50']:.2f} / {result.publish_rtt_ms['p99']:.2f}",
        f"{result.events_received} / {result.events_expected}",
        str(result.lost), str(result.duplicates), str(result.out_of_order),
        f"{result.deliveries_per_s:.0f}",
        *(f"{v:.1f}" for v in (lat.p50, lat.p90, lat.p99, lat.p999, lat.max)),
    ]
    if srv is None:
        cells += ["-", "-"]
    else:
        cells += [f"{srv.cpu_s_run:.2f} ({srv.cpu_util_run:.0%})", f"{srv.cpu_us_per_delivery:.1f}"]
    cells.append(f"{result.loader_cpu_util:.0%}")
    if srv is None:
        cells += ["-"] * 4
    else:
        cells += [f"{srv.rss_base_kb / 1024:.1f}", f"{srv.rss_connected_kb / 1024:.1f}",
                  f"{srv.rss_peak_kb / 1024:.1f}",
                  f"{srv.rss_per_conn_idle_kb:.1f} / {srv.rss_per_conn_peak_kb:.1f}"]
    return "| " + " | ".join(cells) + " |"


def _notes(result: BenchResult) -> list[str]:
    notes: list[str] = []
    notes.append(f"loader: {result.loader_cpu_util:.0%} of a core; subscribers "
                 f"{result.loader_cpu_us_per_delivery:.1f} µs CPU per delivery, publisher "
                 f"{result.publisher_cpu_s:.2f} s CPU")
    if result.loader_cpu_util >= 0.85:
        notes.append(f"loader CPU {result.loader_cpu_util:.0%}: the Python loader is (nearly) "
                     "saturated, so deliveries/s and latency are bounded by it, not the hub")
    wall = result.run_wall_s
    waits = [("loader", result.loader_cpu_wait_s)]
    if result.server is not None:
        waits.append(("hub", result.server.cpu_wait_s_run))
    for who, wait in waits:
        if wall > 0 and wait / wall >= 0.1:
            notes.append(f"the {who} waited {wait:.2f} s of {wall:.2f} s for a CPU (run queue): "
                         "the machine was contended, so its utilisation understates its demand")
    if result.stop_reason != "complete":
        notes.append(f"stopped early: {result.stop_reason}")
    if result.closed_early:
        notes.append(f"{result.closed_early} streams were closed by the hub during the run "
                     "(slow-consumer disconnects?)")
    if not result.ok:
        notes.append("NOT exactly-once: see lost / dup / ooo / errors in --json")
    return notes


# -- command line ----------------------------------------------------------------------------


@click.command(name="bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-n", "--subscribers", type=click.IntRange(min=1), default=100, show_default=True,
              help="Subscriber connections.")
@click.option("-m", "--updates", type=click.IntRange(min=1), default=100, show_default=True,
              help="Updates to publish.")
@click.option("-r", "--rate", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Updates per second (0: back to back, one POST in flight).")
@click.option("-k", "--topics", type=click.IntRange(min=1), default=1, show_default=True,
              help="Topics: subscriber i listens to topic i % K, update s goes to s % K.")
@click.option("--url", default=None,
              help="Benchmark this running hub instead of starting one (http:// only).")
@click.option("--pid", type=int, default=None,
              help="PID of the --url hub, for the memory and CPU columns.")
@click.option("--jwt-key", default=DEFAULT_KEY, envvar="TIDINGS_BENCH_JWT_KEY",
              help="Publisher JWT key (must match the --url hub's key).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=120.0,
              show_default=True, help="Hard limit for the whole run, seconds.")
@click.option("--idle", "idle_s", type=click.FloatRange(min=0.1), default=5.0,
              show_default=True, help="Stop once nothing arrived for this long after publishing.")
@click.option("--window", type=click.IntRange(min=1), default=200, show_default=True,
              help="Subscribers connecting at once.")
@click.option("--settle", "settle_s", type=click.FloatRange(min=0), default=0.5,
              show_default=True, help="Pause after connecting before the idle RSS sample.")
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True,
              help="Updates to a separate warm-up subscriber before measuring (0: none).")
@click.option("--server-arg", "server_args", multiple=True,
              help="Extra argument for the started `tidings serve` (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Also print the result as one JSON line.")
@click.option("--no-header", is_flag=True, help="Print the Markdown row without its header.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on standard error.")
def command(subscribers: int, updates: int, rate: float, topics: int, url: str | None,
            pid: int | None, jwt_key: str, timeout_s: float, idle_s: float, window: int,
            settle_s: float, warmup: int, server_args: tuple[str, ...], as_json: bool,
            no_header: bool, quiet: bool) -> None:
    """Fan-out benchmark: N subscribers, M updates at R/s; exits 3 unless exactly-once held."""
    try:
        config = BenchConfig(
            subscribers=subscribers, updates=updates, rate=rate, topics=topics, url=url,
            pid=pid, jwt_key=jwt_key, timeout_s=timeout_s, idle_s=idle_s, window=window,
            settle_s=settle_s, warmup=warmup, server_args=server_args, quiet=quiet,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    result = run_bench(config)
    if not no_header:
        click.echo(markdown_header())
    click.echo(markdown_row(result))
    for note in _notes(result):
        click.echo(f"bench: {note}", err=True)
    if as_json:
        click.echo(result.to_json())
    if not result.ok:
        sys.exit(3)


def main(args: Sequence[str] | None = None, prog_name: str | None = None) -> None:
    """Entry point for ``benchmarks/fanout.py`` and ``tidings bench``."""
    command.main(args=list(args) if args is not None else None, prog_name=prog_name)
