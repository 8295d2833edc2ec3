"""What one benchmark run is asked to do, and its progress lines."""

from __future__ import annotations

from dataclasses import dataclass

import click

__all__ = ["DEFAULT_KEY", "HUB_PATH", "BenchConfig"]

DEFAULT_KEY = "tidings-bench-key-0123456789abcdef0123456789abcdef"
HUB_PATH = "/.well-known/mercure"


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """One benchmark run. ``rate`` 0 publishes back to back (one POST in flight)."""

    subscribers: int = 100
    updates: int = 100
    rate: float = 0.0
    topics: int = 1
    url: str | None = None
    pid: int | None = None
    jwt_key: str = DEFAULT_KEY
    timeout_s: float = 120.0
    idle_s: float = 5.0
    window: int = 200
    settle_s: float = 0.5
    warmup: int = 20
    topic_prefix: str = "bench/"
    server_args: tuple[str, ...] = ()
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.subscribers < 1 or self.updates < 1 or self.topics < 1 or self.window < 1:
            raise ValueError("subscribers, updates, topics and window must be positive")
        if (self.rate < 0 or self.timeout_s <= 0 or self.idle_s <= 0 or self.settle_s < 0
                or self.warmup < 0):
            raise ValueError("rate, timeout, idle and settle must not be negative")
        if self.pid is not None and self.url is None:
            raise ValueError("--pid needs --url (the server that PID is listening on)")

    @property
    def label(self) -> str:
        rate = f"{self.rate:g}"
        return f"n={self.subscribers} k={self.topics} m={self.updates} r={rate}"

    def say(self, message: str) -> None:
        """A progress line on standard error, unless quiet."""
        if not self.quiet:
            click.echo(message, err=True)
