#!/usr/bin/env python3
"""Commit-to-subscriber latency of the PostgreSQL change feed (docs/feeds.md, "The cost").

    .venv/bin/python benchmarks/pg_feed_latency.py [--url postgresql://127.0.0.1:5432/test]
        [--subscribers 100] [--rate 5000] [--seconds 10] [--idle 100] [--fanout share|all]
        [--capture auto|logical|trigger] [--slot-read auto|stream|sql]

Starts `tidings serve --db URL?search_path=SCRATCH` (the hub's history in the same
schema, as a plain `--db postgresql://` server keeps it) watching a table `bench` of a
scratch schema (dropped at the end), connects the subscribers to
`GET /api/collections/bench/changes` (raw asyncio streams, the project's SSE parser), then:

0. quiet: 5 s without a change (the server's CPU meanwhile: its tailer sleeps);
1. idle: `--idle` single-row INSERTs, one every 100 to 300 ms (the tailer falls asleep in
   between), each timed from its COMMIT returning (asyncpg, in this process) to its event
   reaching the first subscriber;
2. load: pgbench INSERTs one row per transaction at `--rate` a second for `--seconds`
   (`-R`, `--clients` connections), each row stamped with `clock_timestamp()` inside its
   transaction, so the time measured (stamp to arrival) includes the COMMIT itself. With
   `--fanout share` subscriber i watches `?k=i` and each row (k random below the number
   of subscribers; 0 in the idle phase) goes to one of them (the hub's filter index,
   hub/filters.py, finds that one without asking the others); with `--fanout all` every subscriber
   receives every change (a Python loader cannot read 500 000 events a second on 2
   cores: see its CPU).

Prints the latency percentiles of each phase (the load phase's also split in two: the
feed's part, from the row's stamp to its update in the hub's history, and the hub's, from
there to the subscriber), what arrived, the server's and the loader's CPU, and the load
average. Bounded: each phase ends at its deadline plus 30 s at most.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import asyncpg

from tidings.bench.http import ChunkedDecoder, close, parse_head
from tidings.bench.procstat import cpu_s, loader_cpu_s, raise_fd_limit
from tidings.bench.results import percentiles
from tidings.feeds.postgres.decoding import slot_name
from tidings.sse import EventParser

KEY = "pg-feed-latency-benchmark-key-0123456789abcdef"


class Subscriber:
    """One watch stream. Times events by the row's stamp (`at`) or by id (idle phase)."""

    def __init__(self, timed: bool) -> None:
        self.timed = timed
        self.count = 0
        self.arrivals: dict[int, float] = {}  # id -> perf_counter (idle phase, first only)
        self.delays: list[float] = []  # load phase: arrival wall time - stamp
        self.landed: list[tuple[str, float]] = []  # load phase: (event id, arrival wall time)
        self.measure_load = False

    async def run(self, port: int, query: str, ready: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET /api/collections/bench/changes{query} HTTP/1.1\r\n"
                         f"Host: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n"
                         .encode())
            status, chunked = parse_head(await reader.readuntil(b"\r\n\r\n"))
            if status != 200:
                raise RuntimeError(f"watch answered {status}")
            ready.set()
            decoder = ChunkedDecoder() if chunked else None
            parser = EventParser()
            while data := await reader.read(1 << 18):
                now_perf, now_wall = time.perf_counter(), time.time()
                if decoder is not None:
                    data = decoder.feed(data)
                for event in parser.feed(data) if data else []:
                    if not event.data:
                        continue
                    self.count += 1
                    if not self.timed:
                        continue
                    document = json.loads(event.data)["fullDocument"]
                    if self.measure_load:
                        stamp = datetime.fromisoformat(document["at"]).timestamp()
                        self.delays.append(now_wall - stamp)
                        self.landed.append((event.id, now_wall))
                    else:
                        self.arrivals.setdefault(int(document["id"]), now_perf)
        finally:
            await close(writer)


async def _healthy(port: int) -> bool:
    """Whether `/healthz` answers 200 (the server has started, its feed included)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return (await reader.readline()).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
    finally:
        await close(writer)


async def start_server(url: str, workdir: Path, capture: str,
                       slot_read: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    config = workdir / "tidings.toml"
    config.write_text('[tables.bench]\nread = "public"\n')
    log_path = workdir / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tidings", "serve", "--port", "0", "--db", url,
             "--config", str(config), "--jwt-key", KEY, "--log-level", "warning",
             "--subscriber-buffer", "100000", "--max-subscribers", "10000",
             "--pg-capture", capture, "--pg-slot-read", slot_read],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log_path.read_text())
        if found and await _healthy(int(found.group(1))):
            return proc, int(found.group(1)), log_path
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    proc.kill()
    raise RuntimeError("tidings serve did not start:\n" + log_path.read_text())


async def idle_phase(conn: asyncpg.Connection, first: Subscriber, count: int) -> list[float]:
    commits: dict[int, float] = {}
    for n in range(count):
        await asyncio.sleep(random.uniform(0.1, 0.3))
        row_id = await conn.fetchval("INSERT INTO bench (k) VALUES (0) RETURNING id")
        commits[int(row_id)] = time.perf_counter()  # autocommit: COMMIT has returned
        del n
    deadline = time.monotonic() + 30
    while len(first.arrivals) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return [first.arrivals[i] - t for i, t in commits.items() if i in first.arrivals]


async def load_phase(base_url: str, schema: str, args: argparse.Namespace,
                     subscribers: list[Subscriber]) -> tuple[str, int]:
    script = Path(tempfile.mkstemp(suffix=".sql")[1])
    script.write_text(f"\\set k random(0, {args.subscribers - 1})\n"
                      f"INSERT INTO {schema}.bench (k) VALUES (:k);\n")
    for sub in subscribers:
        sub.measure_load = True
    before = sum(sub.count for sub in subscribers)
    done = await asyncio.to_thread(
        subprocess.run,
        ["pgbench", base_url, "-n", "-c", str(args.clients), "-j", "2", "-R", str(args.rate),
         "-T", str(args.seconds), "-f", str(script)],
        capture_output=True, text=True, timeout=args.seconds + 60)
    script.unlink()
    if done.returncode != 0:
        raise RuntimeError(f"pgbench failed: {done.stderr}")
    tps = re.search(r"tps = ([\d.]+)", done.stdout)
    return (tps.group(1) if tps else "?"), before


async def main(args: argparse.Namespace) -> None:
    raise_fd_limit(args.subscribers + 256)
    schema = f"tidings_latency_{os.getpid()}"
    conn = await asyncpg.connect(args.url)
    await conn.execute(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.bench ("
                       "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, k int NOT NULL, "
                       "at timestamptz NOT NULL DEFAULT clock_timestamp())")
    await conn.execute(f"SET search_path = {schema}")
    sep = "&" if "?" in args.url else "?"
    workdir = Path(tempfile.mkdtemp(prefix="tidings-latency-"))
    proc, port, log_path = await start_server(f"{args.url}{sep}search_path={schema}", workdir,
                                              args.capture, args.slot_read)
    tasks: list[asyncio.Task[None]] = []
    try:
        subscribers = [Subscriber(timed=(i == 0 or args.fanout == "share"))
                       for i in range(args.subscribers)]
        for i, sub in enumerate(subscribers):
            ready = asyncio.Event()
            query = f"?k={i}" if args.fanout == "share" else ""
            tasks.append(asyncio.create_task(sub.run(port, query, ready)))
            await asyncio.wait_for(ready.wait(), 10)
        print(f"load average: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
        await asyncio.sleep(1.0)
        # The tailer's PostgreSQL backend (same machine): its polling costs CPU there too.
        backend = int(await conn.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            f"tidings-feed-tailer:{schema}"))
        quiet_cpu, quiet_backend = cpu_s(proc.pid), cpu_s(backend)
        await asyncio.sleep(5.0)
        print(f"nothing happening: server CPU {(cpu_s(proc.pid) - quiet_cpu) / 5.0:.1%}, "
              f"its tailer's PostgreSQL backend {(cpu_s(backend) - quiet_backend) / 5.0:.1%} "
              f"of a core (5 s; capture {args.capture})")
        first = subscribers[0]
        delays = await idle_phase(conn, first, args.idle)
        print(f"idle, commit to subscriber: {percentiles(delays)} "
              f"({args.subscribers} subscribers connected)")
        server_cpu, loader_cpu, began = cpu_s(proc.pid), loader_cpu_s(), time.monotonic()
        tps, before = await load_phase(args.url, schema, args, subscribers)
        total = int(await conn.fetchval("SELECT count(*) FROM bench"))
        expected = (total - args.idle) * (1 if args.fanout == "share" else args.subscribers)
        deadline = time.monotonic() + 30
        while (sum(s.count for s in subscribers) - before < expected
               and time.monotonic() < deadline):
            await asyncio.sleep(0.1)
        wall = time.monotonic() - began
        received = sum(s.count for s in subscribers) - before
        delays = [d for s in subscribers if s.timed for d in s.delays]
        print(f"load, {tps} inserts/s for {args.seconds} s, fan-out {args.fanout}: "
              f"insert (incl. COMMIT) to subscriber: {percentiles(delays)}")
        # The feed's share: from the row's stamp to its update in the hub's history.
        stored = await conn.fetchval(
            "SELECT percentile_disc(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY extract(epoch "
            "FROM u.created_at - (u.data::jsonb -> 'fullDocument' ->> 'at')::timestamptz)) "
            "FROM tidings_updates u WHERE u.data::jsonb -> 'fullDocument' ->> 'k' <> '0' "
            "OR u.seq > $1", args.idle)
        print(f"  of which insert to the hub's history (tailer): p50 "
              f"{float(stored[0]) * 1000:.1f} p99 {float(stored[1]) * 1000:.1f} ms")
        # The hub's share: from the update's row in its history (stamped under the append
        # lock, before that COMMIT) to its arrival (NOTIFY, the hub's read, fan-out, the
        # write, and this loader's read).
        created = dict(await conn.fetch(
            "SELECT id, extract(epoch FROM created_at)::float8 FROM tidings_updates"))
        hub_part = [at - created[i] for s in subscribers if s.timed for i, at in s.landed
                    if i in created]
        print(f"  of which the hub's history to subscriber (hub): {percentiles(hub_part)}")
        print(f"  deliveries {received}/{expected}; server CPU "
              f"{(cpu_s(proc.pid) - server_cpu) / wall:.0%}, loader CPU "
              f"{(loader_cpu_s() - loader_cpu) / wall:.0%} of a core over {wall:.1f} s")
        print(f"load average: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.returncode not in (0, -15):
            print(log_path.read_text()[-3000:], file=sys.stderr)
        if conn.is_closed():  # the server went away meanwhile: a new session drops it
            conn = await asyncpg.connect(args.url)
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        # Logical decoding's slot (its session ended with the server).
        await conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = $1 AND NOT active",
            slot_name(str(await conn.fetchval("SELECT current_database()")), schema))
        await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql://127.0.0.1:5432/test")
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rate", type=int, default=5000, help="changes per second (load)")
    parser.add_argument("--seconds", type=int, default=10, help="length of the load phase")
    parser.add_argument("--clients", type=int, default=16, help="pgbench connections")
    parser.add_argument("--idle", type=int, default=100, help="changes timed when idle")
    parser.add_argument("--fanout", choices=("share", "all"), default="share")
    parser.add_argument("--capture", choices=("auto", "logical", "trigger"), default="auto",
                        help="--pg-capture of the server")
    parser.add_argument("--slot-read", choices=("auto", "stream", "sql"), default="auto",
                        help="--pg-slot-read of the server (logical decoding)")
    asyncio.run(main(parser.parse_args()))
