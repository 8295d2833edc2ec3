"""The CLI against a real hub: token, publish, and subscribe resuming across a restart."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

from tests.conftest import KEY, HubProcess

CLI = [sys.executable, "-m", "tidings"]
ENV = {**os.environ, "TIDINGS_JWT_KEY": KEY}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: object, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def subscribers(url: str) -> int:
    try:
        return int(httpx.get(url + "/healthz", timeout=2).json()["subscribers"])
    except httpx.TransportError:
        return -1


def test_token_then_publish_with_it(hub: HubProcess) -> None:
    minted = subprocess.run([*CLI, "token", "--publish", "/cli/{x}"], env=ENV,
                            capture_output=True, text=True, check=True).stdout.strip()
    ok = subprocess.run([*CLI, "publish", "/cli/1", "hello", "--url", hub.url,
                         "--token", minted], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("urn:uuid:")
    denied = subprocess.run([*CLI, "publish", "/elsewhere", "x", "--url", hub.url,
                             "--token", minted], capture_output=True, text=True)
    assert denied.returncode != 0 and "403" in denied.stderr


def test_subscribe_resumes_across_a_restart(hub_factory: type[HubProcess]) -> None:
    port = str(free_port())
    server = hub_factory("--port", port).start()
    reader = subprocess.Popen(
        [*CLI, "subscribe", "/cli", "--url", server.url, "--count", "3"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: subscribers(server.url) == 1)
        publish = [*CLI, "publish", "/cli", "--url", server.url]
        subprocess.run([*publish, "one"], env=ENV, check=True, capture_output=True)
        server.stop()
        # Published while the subscriber is away: it must arrive after the reconnect.
        server = hub_factory("--port", port).start()
        subprocess.run([*publish, "two"], env=ENV, check=True, capture_output=True)
        wait_for(lambda: subscribers(server.url) == 1)
        subprocess.run([*publish, "three"], env=ENV, check=True, capture_output=True)
        out, err = reader.communicate(timeout=20)
    finally:
        reader.kill()
        reader.communicate()
    data = [line.removeprefix("data: ") for line in out.splitlines() if line.startswith("data:")]
    assert data == ["one", "two", "three"], err


def test_serve_makes_a_dev_key_and_prints_a_token(tmp_path: object) -> None:
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", "0", "--db", "memory://"], cwd=str(tmp_path),
        env={k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        url = lines[0].split("listening on ", 1)[1].split()[0]
        printed_token = lines[2].strip()
        wait_for(lambda: subscribers(url) == 0)
        reply = httpx.post(url + "/.well-known/mercure", data={"topic": "/dev", "data": "x"},
                           headers={"Authorization": f"Bearer {printed_token}"})
        assert reply.status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
