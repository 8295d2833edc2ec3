"""A run as one Markdown table row (with its header), and the notes that say how far to
trust it (a saturated loader, a contended machine, a run that stopped early)."""

from __future__ import annotations

from tidings.bench.results import BenchResult

__all__ = ["markdown_header", "markdown_row", "notes"]

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


def notes(result: BenchResult) -> list[str]:
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
