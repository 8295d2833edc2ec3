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

    config.py    what a run is asked to do          results.py   what it measured
    load.py      the subscribers and the publisher  http.py      response head, chunked body
    procstat.py  memory and CPU from /proc          server.py    the hub subprocess
    run.py       one run, start to verdict          report.py    the Markdown row and notes
    command.py   the command line (`main` is what `tidings bench` calls)
"""

from __future__ import annotations

from tidings.bench.command import command, main
from tidings.bench.config import DEFAULT_KEY, BenchConfig
from tidings.bench.http import ChunkedDecoder, ChunkedError
from tidings.bench.report import markdown_header, markdown_row
from tidings.bench.results import BenchResult, LatencySummary, ServerStats
from tidings.bench.run import run_bench

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
