"""`tidings bench` (and `benchmarks/fanout.py`): the options, the run, the table row; exits
3 unless exactly-once held."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from tidings.bench.config import DEFAULT_KEY, BenchConfig
from tidings.bench.report import markdown_header, markdown_row, notes
from tidings.bench.run import run_bench

__all__ = ["command", "main"]


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
    for note in notes(result):
        click.echo(f"bench: {note}", err=True)
    if as_json:
        click.echo(result.to_json())
    if not result.ok:
        sys.exit(3)


def main(args: Sequence[str] | None = None, prog_name: str | None = None) -> None:
    """Entry point for ``benchmarks/fanout.py`` and ``tidings bench``."""
    command.main(args=list(args) if args is not None else None, prog_name=prog_name)
