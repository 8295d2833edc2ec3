"""A MongoDB server for the tests: `TIDINGS_TEST_MONGO_URL` (a real replica set), else
nx-27017 (a MongoDB wire-protocol server backed by SQLite, from the `test` extra) started
as a process of its own on a free port, as a deployment's server would be.

Without either the tests skip with the reason; under CI=true they fail (nx-27017 comes
with the test extra, so CI always has it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from pymongo import MongoClient
from pymongo.errors import AutoReconnect

from tests.conftest import free_port
from tests.services import unavailable

MONGO_URL = os.environ.get("TIDINGS_TEST_MONGO_URL", "")


def nx_27017() -> str | None:
    """The nx-27017 command beside this Python, or on PATH."""
    beside = Path(sys.executable).parent / "nx-27017"
    return str(beside) if beside.exists() else shutil.which("nx-27017")


class MongoServer:
    """One test's database on the server: `url` names it (`mongodb://.../DB`)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.db_name = "t" + uuid.uuid4().hex[:10]
        self.nx = not MONGO_URL
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        if self.nx:
            command = nx_27017()
            if command is None:
                unavailable("no MongoDB: set TIDINGS_TEST_MONGO_URL or install nx-27017")
            self._command = command
            self.port = free_port()
            self.start()
            self.base = f"mongodb://127.0.0.1:{self.port}/"
            self.options = "?directConnection=true"
        else:
            base, _, options = MONGO_URL.partition("?")
            self.base = base.rstrip("/") + "/"
            self.options = f"?{options}" if options else ""
        self.url = f"{self.base}{self.db_name}{self.options}"
        self.client: MongoClient[dict[str, object]] = MongoClient(
            f"{self.base}{self.options}", serverSelectionTimeoutMS=5000)
        self.db = self.client[self.db_name]

    def start(self) -> None:
        """Start nx-27017 (again, on the same file and port)."""
        log = open(self.workdir / "nx-27017.log", "ab")
        self.proc = subprocess.Popen(
            [self._command, "--db", str(self.workdir / "nx.db"), "-p", str(self.port),
             "--log-file", str(self.workdir / "nx-27017.server.log"),
             "--pid-file", str(self.workdir / "nx-27017.pid")],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.5):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("nx-27017 exited: " + (
                        self.workdir / "nx-27017.log").read_text(errors="replace")) from None
                time.sleep(0.05)
        raise RuntimeError("nx-27017 did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        """Restart nx-27017; this process's client then works again (its pooled
        connections to the old process fail once and are dropped)."""
        self.stop()
        self.start()
        for _ in range(5):
            try:
                self.client.admin.command("ping")
                return
            except AutoReconnect:
                time.sleep(0.1)

    def close(self) -> None:
        if not self.nx:
            self.client.drop_database(self.db_name)
        self.client.close()
        self.stop(signal.SIGKILL)
