"""Which external services the tests may use, and the two a test may stop: a Redis of
its own (`PrivateRedis`) and the local PostgreSQL (`LocalPostgres`). Outside CI a missing
service skips its tests with the reason; under CI=true it fails them, so CI cannot pass by
skipping."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import free_port

POSTGRES_URL = os.environ.get("TIDINGS_TEST_POSTGRES_URL", "postgresql://127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TIDINGS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 2):
            return True
    except OSError:
        return False


def require(url: str) -> str:
    """The URL, if its server answers; else skip (or fail under CI=true)."""
    if not _reachable(url):
        unavailable(f"no server at {url} (set TIDINGS_TEST_*_URL)")
    return url


def unavailable(message: str) -> None:
    """Skip with `message`, or fail under CI=true (CI must not pass by skipping)."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


class PrivateRedis:
    """A `redis-server` of the test's own, on a free port with its files in `workdir`: a
    test may kill and restart it, which it must never do to the shared one."""

    def __init__(self, workdir: Path, *, appendonly: bool) -> None:
        if shutil.which("redis-server") is None:
            unavailable("redis-server is not installed (apt-get install redis-server)")
        self.dir = workdir / "redis"
        self.dir.mkdir(exist_ok=True)
        self.appendonly = appendonly
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 15.0) -> PrivateRedis:
        """Start (again: with `appendonly` it reloads what it had) and wait for PONG."""
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--save", "",
             # `always`, the setting under which Redis loses nothing it acknowledged
             # (README): with `everysec` it answers before it writes while a slow
             # background fsync runs (up to 2 s), and a SIGKILL then loses those writes.
             "--appendonly", "yes" if self.appendonly else "no",
             "--appendfsync", "always", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), 1
            ) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):  # not -LOADING
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.dir / "redis.log"
                raise RuntimeError("redis-server did not start: "
                                   + (log.read_text() if log.exists() else ""))
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed on the way out."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class LocalPostgres:
    """The PostgreSQL cluster behind POSTGRES_URL, which a test may stop and start with
    pg_ctlcluster: only as root, on this machine, with the one cluster Debian set up.

    Every other test that uses PostgreSQL fails while it is down, so run a test that uses
    this under `flock /tmp/pg-restart.lock` when others run tests at the same time."""

    def __init__(self) -> None:
        require(POSTGRES_URL)
        if urlsplit(POSTGRES_URL).hostname not in ("127.0.0.1", "localhost", "::1"):
            unavailable(f"{POSTGRES_URL} is not on this machine: it cannot be restarted")
        if shutil.which("pg_ctlcluster") is None or os.geteuid() != 0:
            unavailable("restarting PostgreSQL needs root and pg_ctlcluster (Debian's"
                         " postgresql-common)")
        versions = sorted(os.listdir("/etc/postgresql"))
        if len(versions) != 1:
            unavailable(f"expected one PostgreSQL version in /etc/postgresql: {versions}")
        self.version = versions[0]

    def _ctl(self, action: str) -> None:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", self.version, "main",
                        action], check=True, timeout=60, capture_output=True)

    def stop(self) -> None:
        self._ctl("stop")  # fast mode: sessions are terminated, as in a restart

    def start(self) -> None:
        self._ctl("start")  # returns once the server accepts connections
