"""The hub under test, when no `--url` is given: a `tidings serve` subprocess on a free
port of 127.0.0.1, its output in a temporary log file that is kept when the run fails."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import httpx

from tidings.bench.config import BenchConfig

__all__ = ["HubServer"]

_LISTENING = "listening on http://"


class HubServer:
    """A ``tidings serve`` subprocess on a free port; output goes to a temporary log file."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.workdir = Path(tempfile.mkdtemp(prefix="tidings-bench-"))
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout_s: float = 30.0) -> str:
        args = list(self.config.server_args)
        if self.config.subscribers > 19_000 and not any(
                a.startswith("--max-subscribers") for a in args):
            args += ["--max-subscribers", str(self.config.subscribers + 1000)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tidings", "serve", "--host", "127.0.0.1", "--port", "0",
                 "--db", "memory://", "--jwt-key", self.config.jwt_key,
                 "--log-level", "warning", *args],
                cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if not self.url and _LISTENING in text:
                self.url = "http://" + text.split(_LISTENING, 1)[1].split()[0]
            if self.url:
                try:
                    if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                        return self.url
                except httpx.TransportError:
                    pass
            if self.proc.poll() is not None:
                raise click.ClickException(f"the hub exited during startup:\n{text}")
            time.sleep(0.05)
        self.stop()
        raise click.ClickException(f"the hub did not start within {timeout_s:g} s:\n"
                                   + self.log_path.read_text(errors="replace"))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cleanup(self) -> None:
        with contextlib.suppress(OSError):
            self.log_path.unlink()
            self.workdir.rmdir()
