"""nginx in front of Tidings processes, configured from deploy/nginx.conf (the file a
deployment starts from), for the tests that put a load balancer in front."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.services import unavailable

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
TEMPLATE = Path(__file__).parents[1] / "deploy" / "nginx.conf"


def require_nginx() -> None:
    if not os.path.exists(NGINX):
        unavailable("nginx is not installed (apt-get install nginx)")


@contextlib.contextmanager
def nginx(workdir: Path, port_a: int, port_b: int, *, b_backup: bool = False) -> Iterator[str]:
    """nginx with the two processes as upstreams (round-robin, or with `b_backup` every
    request to A while it is up); yields its URL once it answers."""
    require_nginx()
    workdir.mkdir(parents=True, exist_ok=True)
    listen = free_port()
    config = TEMPLATE.read_text()
    if b_backup:
        config = config.replace("{port_b} max_fails=1 fail_timeout=2s;", "{port_b} backup;")
    for name, value in {"prefix": str(workdir), "port_a": str(port_a),
                        "port_b": str(port_b), "listen_port": str(listen)}.items():
        config = config.replace("{" + name + "}", value)
    (workdir / "nginx.conf").write_text(config)
    proc = subprocess.Popen([NGINX, "-p", str(workdir), "-c", str(workdir / "nginx.conf"),
                             "-g", "daemon off;"], stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{listen}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(url + "/healthz", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)  # fast: open streams would hold a graceful one
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])
