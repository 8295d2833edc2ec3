"""One run from start to verdict: start the hub (unless given one), warm up, connect the
subscribers, sample the idle hub, publish, wait until everything arrived (or a deadline,
idleness, or the hub's exit), sample again, and add it all up in a `BenchResult`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import click
import httpx

from tidings.bench import procstat
from tidings.bench.config import BenchConfig
from tidings.bench.load import Load, new_loop, publisher_client
from tidings.bench.results import BenchResult, LatencySummary, ServerStats, ms_summary
from tidings.bench.server import HubServer

__all__ = ["run_bench"]


async def _run_async(config: BenchConfig, url: str, pid: int | None,
                     alive: Callable[[], bool]) -> BenchResult:
    from tidings.hub.tokens import encode_token

    started = time.monotonic()
    deadline = started + config.timeout_s
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise click.ClickException(f"only http:// URLs are supported: {url}")
    run = Load(config, parts.hostname, parts.port or 80, parts.path.rstrip("/"))

    token = encode_token(config.jwt_key, publish=["*"])
    if config.warmup:
        async with publisher_client() as client:
            await run.warm_up(client, token, config.warmup)

    sampler = procstat.RssSampler(pid) if pid is not None else None
    rss_base = sampler.sample() if sampler else 0
    cpu_base = procstat.cpu_s(pid) if pid is not None else 0.0
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
    config.say(f"bench: {connected}/{config.subscribers} subscribers connected "
               f"in {connect_time_s:.2f} s")

    await asyncio.sleep(config.settle_s)
    rss_connected = sampler.sample() if sampler else 0
    cpu_connected = procstat.cpu_s(pid) if pid is not None else 0.0
    wait_connected = procstat.wait_s(pid) if pid is not None else 0.0
    loader_cpu_0, loader_wait_0 = procstat.loader_cpu_s(), procstat.wait_s("self")
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
    loader_cpu_s = procstat.loader_cpu_s() - loader_cpu_0
    loader_wait_s = procstat.wait_s("self") - loader_wait_0

    server: ServerStats | None = None
    if sampler is not None and pid is not None:
        try:
            cpu_end, wait_end = procstat.cpu_s(pid), procstat.wait_s(pid)
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
        publish_rtt_ms=ms_summary(run.rtts_ns),
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


def _cache_missing_sniffio() -> None:
    # httpcore runs `import sniffio` on every request; when sniffio is not installed, each
    # failed import searches sys.path again (~0.3 ms a POST). A None entry is Python's way to
    # make such an import fail at once; nothing changes if sniffio is installed.
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


def run_bench(config: BenchConfig) -> BenchResult:
    """Run one benchmark (starting and stopping a hub unless ``config.url`` is set)."""
    fds = procstat.raise_fd_limit(config.subscribers + 64)
    if fds < config.subscribers + 64:
        config.say(f"bench: the open-files limit is {fds}: not enough for "
                   f"{config.subscribers} subscribers (raise the hard limit, `ulimit -Hn`)")
    _cache_missing_sniffio()
    server: HubServer | None = None
    url, pid = config.url, config.pid
    if url is None:
        server = HubServer(config)
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
        with asyncio.Runner(loop_factory=new_loop) as runner:
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
