"""The load: subscribers on raw asyncio streams that check every delivery (exactly once, in
order, on the right topic) and time it from the stamp in its data, and one publisher on a
thread and loop of its own."""

from __future__ import annotations

import asyncio
import time
from array import array
from urllib.parse import quote

import click
import httpx

from tidings.bench.config import HUB_PATH, BenchConfig
from tidings.bench.http import ChunkedDecoder, close, parse_head
from tidings.errors import SSEProtocolError
from tidings.sse import EventParser

__all__ = ["Load", "Subscriber", "new_loop", "publisher_client"]

_FORM = "application/x-www-form-urlencoded"


class Subscriber:
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


class Load:
    def __init__(self, config: BenchConfig, host: str, port: int, base_path: str) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.base_path = base_path
        k = config.topics
        self.topic_names = [f"{config.topic_prefix}{i}" for i in range(k)]
        slots = [len(range(t, config.updates, k)) for t in range(k)]
        self.subs = [Subscriber(i % k, slots[i % k]) for i in range(config.subscribers)]
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

    async def connect(self, sub: Subscriber, window: asyncio.Semaphore) -> None:
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
                    await close(writer)
                    continue
                except BaseException:  # cancelled at the connect deadline
                    writer.close()
                    raise
                status, chunked = parse_head(head)
                if status != 200:
                    self.http_errors += 1
                    self.last_bad_status = status
                    await close(writer)
                    return
                sub.decoder = ChunkedDecoder() if chunked else None
                sub.writer = writer
                sub.connected = True
                self.readers.append(asyncio.create_task(self.read(sub, reader)))
                return

    async def read(self, sub: Subscriber, reader: asyncio.StreamReader) -> None:
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
            async with publisher_client() as client:
                await self.publish(client, token)

        cpu_0 = time.thread_time()
        try:
            with asyncio.Runner(loop_factory=new_loop) as runner:
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
                        config.say("bench: 20 publishes in a row failed; giving up publishing")
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
                status, chunked = parse_head(await reader.readuntil(b"\r\n\r\n"))
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
            await close(writer)

    def expected_total(self) -> int:
        k = self.config.topics
        per_topic = [sum(self.published_ok[t::k]) for t in range(k)]
        return sum(per_topic[s.topic] for s in self.subs if s.connected)


def publisher_client() -> httpx.AsyncClient:
    """One keep-alive connection, one request in flight."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return httpx.AsyncClient(timeout=10.0, limits=limits)


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
