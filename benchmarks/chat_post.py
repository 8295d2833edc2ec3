#!/usr/bin/env python3
"""Chat messages per second through one `tidings serve` process, SQLite or PostgreSQL
(docs/chat.md, "Throughput").

    .venv/bin/python benchmarks/chat_post.py --db sqlite|postgres [--posts 3000]
        [--concurrency 16] [--url postgresql://127.0.0.1:5432/test]

Starts `tidings serve --chat` on a scratch SQLite file or a scratch PostgreSQL schema
(dropped at the end), signs up `--concurrency` users, opens one window (an SSE stream of
`/chat/rooms/general`, with a user's session cookie), and has each user POST messages to
#general back to back until `--posts` are accepted. Prints the accepted messages a
second, the POST latency percentiles, how long until the window had seen every message
(end to end, each once: checked), the server's and the loader's CPU and the load average.
Bounded: the run gives up after 120 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx

from tidings.bench.procstat import cpu_s
from tidings.sse import EventParser

KEY = "chat-post-benchmark-key-0123456789abcdef0123"
_DEADLINE_S = 120.0


def percentiles(samples_s: list[float]) -> str:
    ordered = sorted(samples_s)

    def at(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    return f"p50 {at(0.5):.1f} ms, p90 {at(0.9):.1f} ms, p99 {at(0.99):.1f} ms"


def start_server(db: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    log_path = workdir / "server.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidings", "serve", "--port", "0", "--db", db, "--jwt-key", KEY,
         "--chat-rate-messages", "1000000", "--log-level", "warning"],
        cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if "listening on http://" in line:
                url = line.split("listening on ", 1)[1].split()[0]
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        return proc, url
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the server did not start:\n" + log_path.read_text())


async def window(client: httpx.AsyncClient, url: str, expected: int,
                 seen: list[int], done: asyncio.Event, ready: asyncio.Event) -> None:
    parser = EventParser()
    async with client.stream("GET", f"{url}/.well-known/mercure",
                             params={"topic": "/chat/rooms/general"},
                             timeout=httpx.Timeout(10, read=None)) as response:
        ready.set()
        async for chunk in response.aiter_bytes():
            for event in parser.feed(chunk):
                data = json.loads(event.data)
                if data.get("type") == "message.created":
                    seen.append(int(data["message"]["id"]))
                    if len(seen) >= expected:
                        done.set()
                        return


async def run(url: str, posts: int, concurrency: int, pid: int) -> None:
    clients = []
    for i in range(concurrency):
        client = httpx.AsyncClient(base_url=url, timeout=30,
                                   limits=httpx.Limits(max_connections=2))
        reply = await client.post("/api/auth/signup",
                                  json={"username": f"user{i}", "password": "benchmark-pw"})
        reply.raise_for_status()
        clients.append(client)
    seen: list[int] = []
    done, ready = asyncio.Event(), asyncio.Event()
    watcher = asyncio.create_task(window(clients[0], url, posts, seen, done, ready))
    await ready.wait()
    latencies: list[float] = []
    accepted: list[tuple[float, int]] = []  # (when, id)
    remaining = posts

    async def poster(client: httpx.AsyncClient) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            reply = await client.post("/api/rooms/general/messages",
                                      json={"content": f"message {remaining}"})
            reply.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            accepted.append((time.perf_counter(), int(reply.json()["id"])))

    cpu0, loader0 = cpu_s(pid), time.process_time()
    start = time.perf_counter()
    async with asyncio.timeout(_DEADLINE_S):
        await asyncio.gather(*(poster(c) for c in clients))
        posted_s = time.perf_counter() - start
        await done.wait()
    delivered_s = time.perf_counter() - start
    cpu, loader = cpu_s(pid) - cpu0, time.process_time() - loader0
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    for client in clients:
        await client.aclose()
    ids = [id_ for _, id_ in accepted]
    assert sorted(seen) == sorted(ids) and len(set(seen)) == len(seen), "lost or doubled"
    print(f"accepted {posts} messages in {posted_s:.2f} s: {posts / posted_s:.0f} messages/s "
          f"({concurrency} posters)")
    print(f"POST latency: {percentiles(latencies)}")
    print(f"the window saw all {len(seen)} (once each) after {delivered_s:.2f} s: "
          f"{posts / delivered_s:.0f} messages/s end to end")
    print(f"server CPU {cpu:.1f} s ({cpu / delivered_s * 100:.0f}% of one core), loader CPU "
          f"{loader:.1f} s ({loader / delivered_s * 100:.0f}%); load average "
          f"{os.getloadavg()[0]:.2f}")


async def scratch_schema(base: str, drop: str | None = None) -> str:
    conn = await asyncpg.connect(base)
    try:
        if drop is not None:
            await conn.execute(f"DROP SCHEMA {drop} CASCADE")
            return drop
        schema = "chatbench_" + uuid.uuid4().hex[:8]
        await conn.execute(f"CREATE SCHEMA {schema}")
        return schema
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres"], required=True)
    parser.add_argument("--posts", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--url", default=os.environ.get(
        "TIDINGS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args()
    schema = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.db == "postgres":
            schema = asyncio.run(scratch_schema(args.url))
            db = f"{args.url}?search_path={schema}"
        else:
            db = f"sqlite:///{Path(tmp) / 'chat.db'}"
        proc, url = start_server(db, Path(tmp))
        try:
            print(f"tidings serve --chat --db {args.db}, {os.cpu_count()} cores")
            asyncio.run(run(url, args.posts, args.concurrency, proc.pid))
        except BaseException:
            print((Path(tmp) / "server.log").read_text(errors="replace")[-3000:])
            raise
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            proc.kill()
            if schema is not None:
                asyncio.run(scratch_schema(args.url, drop=schema))


if __name__ == "__main__":
    main()
