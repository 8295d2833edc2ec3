"""The CLI against a real hub: token, publish, and subscribe resuming across a restart."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from tests.conftest import KEY, HubProcess, RestartableHub, free_port

CLI = [sys.executable, "-m", "tidings"]
ENV = {**os.environ, "TIDINGS_JWT_KEY": KEY}


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


def test_subscribe_resumes_across_a_restart(restartable: RestartableHub) -> None:
    server = restartable.start()
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
        server = restartable.start()
        subprocess.run([*publish, "two"], env=ENV, check=True, capture_output=True)
        wait_for(lambda: subscribers(server.url) == 1)
        subprocess.run([*publish, "three"], env=ENV, check=True, capture_output=True)
        out, err = reader.communicate(timeout=20)
    finally:
        reader.kill()
        reader.communicate()
    data = [line.removeprefix("data: ") for line in out.splitlines() if line.startswith("data:")]
    assert data == ["one", "two", "three"], err


def _serve_banner(workdir: object, *args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """`tidings serve` in `workdir` with no key configured, and what it printed up to and
    including the publisher token."""
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", "0", "--db", "memory://", *args], cwd=str(workdir),
        env={k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline()]
    while "A publisher token:" not in lines[-1] and lines[-1]:
        lines.append(proc.stdout.readline())
    lines.append(proc.stdout.readline())
    return proc, lines


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def test_serve_makes_a_dev_key_and_prints_a_token(tmp_path: object) -> None:
    proc, lines = _serve_banner(tmp_path)
    try:
        url = lines[0].split("listening on ", 1)[1].split()[0]
        printed_token = lines[-1].strip()
        wait_for(lambda: subscribers(url) == 0)
        reply = httpx.post(url + "/.well-known/mercure", data={"topic": "/dev", "data": "x"},
                           headers={"Authorization": f"Bearer {printed_token}"})
        assert reply.status_code == 200
    finally:
        _stop(proc)


def test_serve_says_where_the_chat_and_the_debugger_are(tmp_path: object) -> None:
    proc, lines = _serve_banner(tmp_path)
    _stop(proc)
    url = lines[0].split("listening on ", 1)[1].split()[0]
    banner = "".join(lines)
    assert f"chat        {url}/\n" in banner
    assert f"debugger    {url}/hub " in banner
    assert f"hub         {url}/.well-known/mercure\n" in banner
    assert "Development key saved in .tidings-dev-key. A publisher token:" in banner
    proc, lines = _serve_banner(tmp_path, "--no-chat")
    _stop(proc)
    banner = "".join(lines)
    assert "chat " not in banner and "status page " in banner
    # The second run in the same directory made no key: it says so.
    assert ("Development key reused from .tidings-dev-key (made by an earlier run). "
            "A publisher token:") in banner


def test_publish_with_nothing_listening_says_so_in_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    failed = subprocess.run([*CLI, "publish", "/cli", "x", "--url", url], env=ENV,
                            capture_output=True, text=True, timeout=30)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.count("\n") == 1, failed.stderr
    assert failed.stderr.count("cannot reach") == 1
    assert f"cannot reach {url}: " in failed.stderr and "TIDINGS_URL" in failed.stderr


def test_subscribe_says_where_it_is_retrying_then_that_it_is_back(
        hub_factory: type[HubProcess]) -> None:
    port = str(free_port())
    url = f"http://127.0.0.1:{port}"
    reader = subprocess.Popen(
        [*CLI, "subscribe", "/cli", "--count", "1"], env={**ENV, "TIDINGS_URL": url},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert reader.stderr is not None
        first = reader.stderr.readline()
        assert first.startswith(f"cannot reach {url}/.well-known/mercure (")
        assert "retrying" in first
        server = hub_factory("--port", port).start()
        back = reader.stderr.readline()
        assert back.startswith(f"{url}/.well-known/mercure: connected")
        wait_for(lambda: subscribers(server.url) == 1)
        subprocess.run([*CLI, "publish", "/cli", "hello", "--url", server.url], env=ENV,
                       check=True, capture_output=True)
        out, err = reader.communicate(timeout=20)
    finally:
        reader.kill()
        reader.communicate()
    assert "data: hello" in out
    assert "cannot reach" not in err  # said once, not once per attempt
