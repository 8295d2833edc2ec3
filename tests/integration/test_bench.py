"""`tidings bench` for real: a small run must deliver every update exactly once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import KEY, HubProcess
from tidings.bench import BenchConfig, ChunkedDecoder, ChunkedError, run_bench


def test_chunked_decoder_fed_byte_by_byte() -> None:
    body = [b"id: 1\ndata: a\n\n", b"x" * 300, b"\r\n inside a chunk \r\n"]
    wire = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in body) + b"0\r\nX-T: 1\r\n\r\n"
    decoder = ChunkedDecoder()
    out = b""
    for i in range(len(wire)):
        out += decoder.feed(wire[i:i + 1])
        assert decoder.done == (i == len(wire) - 1)
    assert out == b"".join(body)
    assert decoder.feed(b"after the end") == b""

    whole = ChunkedDecoder()
    assert whole.feed(wire) == b"".join(body) and whole.done
    one_at_a_time = ChunkedDecoder()  # one whole chunk per read: the fast path
    assert [one_at_a_time.feed(b"%x\r\n%s\r\n" % (len(c), c)) for c in body] == body
    assert one_at_a_time.feed(b"0\r\n\r\n") == b"" and one_at_a_time.done
    with pytest.raises(ChunkedError):
        ChunkedDecoder().feed(b"zz\r\n")
    with pytest.raises(ChunkedError):
        ChunkedDecoder().feed(b"2\r\nabXY")


def test_small_run_delivers_everything_exactly_once() -> None:
    result = run_bench(BenchConfig(subscribers=20, updates=50, rate=0, timeout_s=60, quiet=True))
    assert result.connections_ok == 20
    assert result.published == 50 and result.publish_errors == 0
    assert result.events_expected == 20 * 50
    assert result.events_received == result.events_expected
    assert (result.lost, result.duplicates, result.out_of_order, result.misrouted) == (0, 0, 0, 0)
    assert result.bad_events == result.closed_early == 0
    assert result.stop_reason == "complete" and result.ok
    assert result.latency_ms.count == 1000
    assert 0 < result.latency_ms.p50 <= result.latency_ms.p99 <= result.latency_ms.max
    assert result.deliveries_per_s > 0 and result.publish_rate > 0
    assert result.publish_rtt_ms["p50"] > 0
    assert result.loader_cpu_s > 0
    server = result.server
    assert server is not None
    assert 0 < server.rss_base_kb <= server.rss_peak_kb
    assert server.rss_connected_kb <= server.rss_peak_kb
    assert server.cpu_s_run > 0 and server.cpu_us_per_delivery > 0
    assert json.loads(result.to_json())["ok"] is True


def _bench_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tidings", "bench", "-q", "--no-header", *args],
                          capture_output=True, text=True, timeout=90)


def test_cli_against_a_running_hub_over_several_topics(hub_factory: type[HubProcess]) -> None:
    hub = hub_factory(db="memory://").start()
    done = _bench_cli("--url", hub.url, "--pid", str(hub.pid), "--jwt-key", KEY,
                      "-n", "12", "-m", "30", "-k", "3", "-r", "300", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    row, line = done.stdout.strip().splitlines()
    assert row.startswith("| n=12 k=3 m=30 r=300 | 12/12 |")
    data = json.loads(line)
    assert data["ok"] is True
    assert data["events_expected"] == data["events_received"] == 12 * 10  # 10 updates per topic
    assert data["misrouted"] == data["lost"] == 0
    assert data["server"]["pid"] == hub.pid and data["server"]["rss_peak_kb"] > 0


def test_cli_reports_failure_when_publishing_is_refused(hub_factory: type[HubProcess]) -> None:
    hub = hub_factory(db="memory://").start()
    done = _bench_cli("--url", hub.url, "--jwt-key", "not-the-hub-key-" * 4, "--warmup", "0",
                      "-n", "3", "-m", "25", "--idle", "0.5", "--json")
    assert done.returncode == 3, done.stdout + done.stderr
    data = json.loads(done.stdout.strip().splitlines()[-1])
    assert data["ok"] is False
    assert data["published"] == 0 and data["publish_errors"] == 20  # gives up after 20 in a row
    assert data["server"] is None
