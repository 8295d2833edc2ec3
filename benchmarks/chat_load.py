#!/usr/bin/env python3
"""The chat end to end: messages POSTed, then received by every window (docs/chat.md).

    .venv/bin/python benchmarks/chat_load.py [--start 2 --db postgresql://... --bus redis://...]
        [--url http://127.0.0.1:8000 ...] [--windows 1000] [--rooms 10] [--users 50]
        [--rate 2000] [--seconds 10] [--timed 2]

With `--start N` it runs N `tidings serve --chat` processes itself (ports of its own, the
given `--db` and `--bus`, the rate limit lifted, a scratch schema on PostgreSQL that is
dropped at the end); with `--url` (repeatable) it uses servers already running, whose
`--chat-rate-messages` must allow the rate. Then:

1. `--users` accounts sign up (argon2: tens of ms each), and join `--rooms` rooms;
2. `--windows` windows, spread over the servers round-robin, each an EventSource on one
   room's topic (window i: room i % rooms, user i % users, server i % servers), like the
   chat page's. `--timed` windows per room and server parse every event (the latency
   and the order and completeness checks); the others count messages without parsing
   (a Python loader cannot parse hundreds of thousands of events a second on 2 cores);
3. `--warmup` seconds of messages at the rate, not counted (connections opened,
   statements prepared); then messages are POSTed open loop at `--rate` for `--seconds`
   (each to room i % rooms on server i % servers, over keep-alive connections), each
   carrying the wall-clock time it was sent; a timed window's latency is its arrival
   time minus that.

Prints: accepted messages/s (201s over the sending span), refusals by status, POST round
trip, POST-to-window latency percentiles, what the windows received against what they
should have (lost, doubled, out of order), and the servers' and the loader's CPU. Every
phase is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import uvloop

from tidings.bench.http import ChunkedDecoder, close, parse_head
from tidings.bench.procstat import cpu_s, loader_cpu_s, raise_fd_limit
from tidings.bench.results import percentiles
from tidings.sse import EventParser

KEY = "chat-load-benchmark-key-0123456789abcdefghij"
PASSWORD = "bench-password-1"
_STAMP = re.compile(rb"bench \d+ (\d+\.\d+)")
_SESSION = re.compile(rb"tidings_session=([^;\r]+)")


class Server:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url.rstrip("/")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80


async def request(server: Server, method: str, path: str, body: object | None = None,
                  token: str | None = None) -> tuple[int, bytes, bytes]:
    """One request on a connection of its own (setup only): status, head, body."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(_request_bytes(server, method, path, body, token, keep_alive=False))
        return await _response(reader)
    finally:
        await close(writer)


def _request_bytes(server: Server, method: str, path: str, body: object | None,
                   token: str | None, *, keep_alive: bool) -> bytes:
    payload = b"" if body is None else json.dumps(body).encode()
    head = [f"{method} {path} HTTP/1.1", f"Host: {server.host}:{server.port}",
            f"Content-Length: {len(payload)}", "Content-Type: application/json"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    if not keep_alive:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, head, await reader.readexactly(length) if length else b""


class Window:
    """One EventSource on one room. Timed windows parse every event: the latency from the
    stamp in its content, and the order from the message ids (the server's commit order;
    the loader's own numbering is not, as its POSTs overlap)."""

    def __init__(self, room: str, timed: bool) -> None:
        self.room = room
        self.timed = timed
        self.count = 0
        self.ids: list[int] = []
        self.delays: list[float] = []

    def _request(self, server: Server, token: str) -> bytes:
        return (f"GET /.well-known/mercure?topic=/chat/rooms/{self.room} HTTP/1.1\r\n"
                f"Host: {server.host}:{server.port}\r\nAccept: text/event-stream\r\n"
                f"Authorization: Bearer {token}\r\n\r\n").encode()

    async def run(self, server: Server, token: str, ready: asyncio.Event) -> None:
        if not self.timed:
            await self._count(server, token, ready)
            return
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            writer.write(self._request(server, token))
            status, chunked = parse_head(await reader.readuntil(b"\r\n\r\n"))
            if status != 200:
                raise RuntimeError(f"subscribe answered {status}")
            ready.set()
            decoder = ChunkedDecoder() if chunked else None
            parser = EventParser()
            while data := await reader.read(1 << 18):
                now = time.time()
                if decoder is not None:
                    data = decoder.feed(data)
                for event in parser.feed(data):
                    update = json.loads(event.data) if event.data else {}
                    if update.get("type") != "message.created":
                        continue
                    self.count += 1
                    message = update["message"]
                    found = _STAMP.search(message["content"].encode())
                    if found is not None:
                        self.ids.append(int(message["id"]))
                        self.delays.append(now - float(found.group(1)))
        finally:
            await close(writer)

    async def _count(self, server: Server, token: str, ready: asyncio.Event) -> None:
        """An untimed window: a protocol that counts `message.created` in what arrives,
        no task switch per read (the loader shares the 2 cores with what it measures)."""
        loop = asyncio.get_running_loop()
        closed = loop.create_future()
        transport, _ = await loop.create_connection(
            lambda: _Counting(self, ready, closed), server.host, server.port)
        try:
            transport.write(self._request(server, token))
            await closed
        finally:
            transport.close()


class _Counting(asyncio.Protocol):
    _MARK = b"message.created"

    def __init__(self, window: Window, ready: asyncio.Event,
                 closed: asyncio.Future[None]) -> None:
        self.window, self.ready, self.closed = window, ready, closed
        self.head: bytearray | None = bytearray()
        self.tail = b""  # a mark may be cut between two reads

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            status, _ = parse_head(bytes(self.head[:end + 4]))
            if status != 200:
                self.closed.set_exception(RuntimeError(f"subscribe answered {status}"))
                return
            data, self.head = bytes(self.head[end + 4:]), None
            self.ready.set()
        data = self.tail + data
        self.window.count += data.count(self._MARK)
        self.tail = data[-(len(self._MARK) - 1):]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class Poster:
    """A keep-alive connection that POSTs one message at a time."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.lock = asyncio.Lock()

    async def post(self, room: str, token: str, content: str) -> int:
        async with self.lock:
            if self.conn is None:
                self.conn = await asyncio.open_connection(self.server.host, self.server.port)
            reader, writer = self.conn
            try:
                writer.write(_request_bytes(self.server, "POST",
                                            f"/api/rooms/{room}/messages",
                                            {"content": content}, token, keep_alive=True))
                status, _, _ = await _response(reader)
                return status
            except (OSError, asyncio.IncompleteReadError):
                self.conn = None
                return 599


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _with_schema(db: str, schema: str) -> str:
    return db + ("&" if "?" in db else "?") + f"search_path={schema}"


async def _healthy(server: Server) -> bool:
    try:
        status, _, _ = await request(server, "GET", "/healthz")
    except OSError:
        return False
    return status == 200


def start_servers(count: int, db: str, bus: str | None, workdir: Path,
                  extra: list[str]) -> tuple[list[Server], list[subprocess.Popen[bytes]]]:
    exe = Path(sys.executable).parent / "tidings"
    servers, procs = [], []
    for n in range(count):
        port = _free_port()
        args = [str(exe), "serve", "--port", str(port), "--db", db, "--jwt-key", KEY,
                "--chat-rate-messages", "100000000", "--max-subscribers", "100000",
                "--log-level", "warning", *extra]
        if bus:
            args += ["--bus", bus]
        with open(workdir / f"server-{n}.log", "wb") as log:
            procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=workdir))
        servers.append(Server(f"http://127.0.0.1:{port}"))
    return servers, procs


async def wait_healthy(servers: list[Server], procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 60
    for server, proc in zip(servers, procs, strict=False):
        while not await _healthy(server):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{server.url} did not start (see its log)")
            await asyncio.sleep(0.1)


async def setup(servers: list[Server], users: int, rooms: int, tag: str) -> list[str]:
    """Sign up the users (on the first server), create the rooms, join everyone to every
    room; the users' session tokens."""
    first = servers[0]
    tokens: list[str] = []
    semaphore = asyncio.Semaphore(8)

    async def signup(n: int) -> str:
        async with semaphore:
            status, head, body = await request(
                first, "POST", "/api/auth/signup",
                {"username": f"b{tag}{n}", "password": PASSWORD})
        session = _SESSION.search(head)
        if status != 201 or session is None:
            raise RuntimeError(f"signup answered {status}: {body[:200]!r}")
        return session.group(1).decode()

    tokens = list(await asyncio.gather(*(signup(n) for n in range(users))))
    for r in range(rooms):
        status, _, body = await request(first, "POST", "/api/rooms", {"name": f"r{tag}{r}"},
                                        tokens[0])
        if status not in (201, 409):
            raise RuntimeError(f"room creation answered {status}: {body[:200]!r}")

    async def join(token: str, room: str) -> None:
        async with semaphore:
            status, _, body = await request(first, "POST", f"/api/rooms/{room}/join",
                                            None, token)
        if status != 200:
            raise RuntimeError(f"join answered {status}: {body[:200]!r}")

    await asyncio.gather(*(join(t, f"r{tag}{r}") for t in tokens for r in range(rooms)))
    return tokens


async def run(args: argparse.Namespace, servers: list[Server], pids: list[int]) -> None:
    tag = secrets.token_hex(2)
    print(f"setup: {args.users} users, {args.rooms} rooms, {len(servers)} server(s)")
    tokens = await setup(servers, args.users, args.rooms, tag)
    rooms = [f"r{tag}{r}" for r in range(args.rooms)]

    windows: list[Window] = []
    tasks: list[asyncio.Task[None]] = []
    timed_of: Counter[tuple[int, int]] = Counter()
    for i in range(args.windows):
        room_n, server_n = i % args.rooms, i % len(servers)
        timed = timed_of[(room_n, server_n)] < args.timed
        timed_of[(room_n, server_n)] += 1
        window = Window(rooms[room_n], timed)
        ready = asyncio.Event()
        windows.append(window)
        tasks.append(asyncio.create_task(
            window.run(servers[server_n], tokens[i % args.users], ready)))
        await asyncio.wait_for(ready.wait(), 30)
    await asyncio.sleep(1.0)
    print(f"windows: {len(windows)} connected "
          f"({sum(w.timed for w in windows)} timed)")

    posters = [[Poster(s) for _ in range(args.connections)] for s in servers]
    if args.warmup > 0:
        await warm_up(args, servers, posters, rooms, tokens, windows)
    statuses: Counter[int] = Counter()
    rtts: list[float] = []
    total = int(args.rate * args.seconds)
    cpu_before = [cpu_s(pid) for pid in pids]
    loader_before = loader_cpu_s()
    began = time.monotonic()
    last_done = began

    async def send(i: int) -> None:
        nonlocal last_done
        server_n = i % len(servers)
        poster = posters[server_n][(i // len(servers)) % args.connections]
        sent = time.time()
        status = await poster.post(rooms[i % args.rooms], tokens[i % args.users],
                                   f"bench {i} {sent:.6f}")
        statuses[status] += 1
        rtts.append(time.time() - sent)
        last_done = time.monotonic()

    sends: list[asyncio.Task[None]] = []
    for i in range(total):
        delay = began + i / args.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sends.append(asyncio.create_task(send(i)))
    await asyncio.wait(sends, timeout=args.seconds + 30)
    accepted = statuses[201]
    span = max(last_done - began, 1e-9)

    expected = Counter(i % args.rooms for i in range(total))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if all(w.count >= expected_in(w, rooms, expected, statuses) for w in windows):
            break
        await asyncio.sleep(0.2)
    elapsed = time.monotonic() - began
    cpu = [cpu_s(pid) - before for pid, before in zip(pids, cpu_before, strict=False)]
    loader = loader_cpu_s() - loader_before
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    delays = [d for w in windows for d in w.delays]
    lost = doubled = disordered = 0
    for w in windows:
        if w.timed:
            doubled += len(w.ids) - len(set(w.ids))
            disordered += sum(1 for a, b in zip(w.ids, w.ids[1:], strict=False) if b < a)
    for w in windows:
        lost += max(0, expected_in(w, rooms, expected, statuses) - w.count)
    print(f"asked: {total} messages at {args.rate:g}/s for {args.seconds:g} s")
    print(f"accepted: {accepted} ({accepted / span:,.0f} messages/s over {span:.2f} s); "
          f"statuses {dict(statuses)}")
    print(f"POST round trip: {percentiles(rtts)}")
    print(f"POST to window (timed windows): {percentiles(delays)}")
    received = sum(w.count for w in windows)
    print(f"deliveries: {received:,} ({received / max(elapsed, 1e-9):,.0f}/s); "
          f"short of expected {lost}, doubled {doubled}, out of order {disordered}")
    print("server CPU s: " + ", ".join(f"{c:.1f}" for c in cpu)
          + f" over {elapsed:.1f} s; loader CPU s: {loader:.1f}; "
          f"load average {os.getloadavg()[0]:.1f}")


async def warm_up(args: argparse.Namespace, servers: list[Server],
                  posters: list[list[Poster]], rooms: list[str], tokens: list[str],
                  windows: list[Window]) -> None:
    """`--warmup` seconds of posts at the rate, not measured: the posters' connections
    open, and each server's pool connections prepare their statements (PostgreSQL
    compiles a PL/pgSQL function once per session), as on a server that has been up a
    while. Returns once every window has them all, its counts then set back to zero."""
    total = int(args.rate * args.warmup)
    began = time.monotonic()
    sends = []
    for i in range(total):
        delay = began + i / args.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        poster = posters[i % len(servers)][(i // len(servers)) % args.connections]
        sends.append(asyncio.create_task(
            poster.post(rooms[i % args.rooms], tokens[i % args.users], f"warm-up {i}")))
    accepted = sum(status == 201 for status in await asyncio.gather(*sends))
    share = Counter(i % args.rooms for i in range(total))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and accepted == total and any(
            w.count < share[rooms.index(w.room)] for w in windows):
        await asyncio.sleep(0.1)
    for window in windows:
        window.count = 0
    print(f"warm-up: {accepted} of {total} messages in {args.warmup:g} s, not counted")


def expected_in(window: Window, rooms: list[str], expected: Counter[int],
                statuses: Counter[int]) -> int:
    """Messages a window should see: its room's share of those accepted (every message of
    a room goes to all its windows; refusals are spread evenly enough to be ignored only
    when there are none, so with refusals the check is a lower bound)."""
    share = expected[rooms.index(window.room)]
    refused = sum(n for status, n in statuses.items() if status != 201)
    return share if refused == 0 else max(0, share - refused)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", action="append", default=[])
    parser.add_argument("--start", type=int, default=0,
                        help="start this many servers (needs --db)")
    parser.add_argument("--db", default=os.environ.get(
        "TIDINGS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--bus", default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--windows", type=int, default=1000)
    parser.add_argument("--timed", type=int, default=2,
                        help="windows per room and server that parse every event")
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=1,
                        help="seconds of posts at the rate before measuring (not counted)")
    parser.add_argument("--connections", type=int, default=16,
                        help="keep-alive POST connections per server")
    args = parser.parse_args()
    raise_fd_limit(args.windows * 2 + 1000)
    if not args.start and not args.url:
        parser.error("give --start N or --url URL")

    async def go() -> None:
        with tempfile.TemporaryDirectory(prefix="chat-load-") as tmp:
            procs: list[subprocess.Popen[bytes]] = []
            schema = None
            db = args.db
            try:
                if args.start:
                    if db.startswith("postgres"):
                        schema = "chat_load_" + secrets.token_hex(4)
                        await _psql(db, f"CREATE SCHEMA {schema}")
                        db = _with_schema(db, schema)
                    elif db.startswith("sqlite"):
                        db = f"sqlite:///{tmp}/chat.db"
                    extra = ["--workers", str(args.workers)] if args.workers > 1 else []
                    servers, procs = start_servers(args.start, db, args.bus, Path(tmp), extra)
                    await wait_healthy(servers, procs)
                else:
                    servers = [Server(u) for u in args.url]
                pids = [p.pid for p in procs]
                await run(args, servers, pids)
            finally:
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(15)
                    if proc.poll() is None:
                        proc.kill()
                if schema is not None:
                    await _psql(args.db, f"DROP SCHEMA {schema} CASCADE")

    uvloop.run(go())  # the loader shares the machine with what it measures


async def _psql(db: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(db)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
