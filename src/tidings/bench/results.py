"""What one run measured: latency percentiles, the hub's memory and CPU, and the verdict."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BenchResult", "LatencySummary", "ServerStats", "ms_summary", "percentiles"]


def percentiles(samples_s: Sequence[float]) -> str:
    """One line of latency percentiles of `samples_s` (seconds), in ms: the benchmarks'
    scripts print this (benchmarks/)."""
    if not samples_s:
        return "no samples"
    ordered = sorted(samples_s)

    def at(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    return (f"n={len(ordered)} p50={at(0.5):.1f} p90={at(0.9):.1f} p99={at(0.99):.1f} "
            f"max={ordered[-1] * 1000:.1f} ms")


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


def ms_summary(samples_ns: Sequence[int]) -> dict[str, float]:
    if not samples_ns:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(samples_ns)
    n = len(ordered)
    return {"p50": round(ordered[(n - 1) // 2] / 1e6, 3),
            "p99": round(ordered[min(n - 1, int(0.99 * n))] / 1e6, 3),
            "max": round(ordered[-1] / 1e6, 3)}
