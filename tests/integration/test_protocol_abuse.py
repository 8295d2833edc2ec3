"""Abuse below HTTP semantics, over raw sockets to a real `tidings serve`: huge request
heads, heads sent slowly (slowloris), connections that never send or that half-close,
and pipelined requests. Each must cost the server a bounded amount and leave everyone
else served. (tidings/web/protocol.py holds the limits.)
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import HubProcess
from tidings.web.protocol import MAX_HEAD_BYTES

HEAD_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    hub = HubProcess(tmp_path_factory.mktemp("abuse"), "--head-timeout",
                     str(HEAD_TIMEOUT_S)).start()
    try:
        yield hub
    finally:
        hub.stop()


def _connect(server: HubProcess) -> socket.socket:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout_s`)."""
    sock.settimeout(timeout_s)
    out = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:  # closed with our unread bytes in its buffer
            return out
        if not chunk:
            return out
        out += chunk
    raise AssertionError(f"still open after {timeout_s} s; received {out[:200]!r}")


def _healthy(server: HubProcess) -> bool:
    return httpx.get(server.url + "/healthz", timeout=2).status_code == 200


def test_a_100_kb_request_head_is_served(server: HubProcess) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: "
                     + b"a" * 100_000 + b"\r\n\r\n")
        assert _read_until_closed(sock, 5).startswith(b"HTTP/1.1 200 ")
    big_cookie = "c=" + "x" * 100_000
    assert httpx.get(server.url + "/healthz", headers={"Cookie": big_cookie},
                     timeout=5).status_code == 200


@pytest.mark.parametrize("pieces", [1, 64])
def test_a_head_over_the_limit_is_431_and_the_connection_closed(
        server: HubProcess, pieces: int) -> None:
    """Whole in one read, or arriving in many (the parser holds it until it ends)."""
    head = (b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(1100)) + b"\r\n")
    assert len(head) > MAX_HEAD_BYTES
    size = -(-len(head) // pieces)
    with _connect(server) as sock:
        try:
            for start in range(0, len(head), size):
                sock.sendall(head[start:start + size])
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the client finished sending
        assert _read_until_closed(sock, 5).startswith(b"HTTP/1.1 431 ")
    assert _healthy(server)


def test_a_large_body_is_not_counted_as_head(server: HubProcess) -> None:
    reply = httpx.post(server.url + "/.well-known/mercure",
                       content=b"topic=/t&data=" + b"x" * (MAX_HEAD_BYTES + 1000),
                       headers={"Content-Type": "application/x-www-form-urlencoded"},
                       timeout=5)
    assert reply.status_code == 401  # no token: the app's answer, after the whole head


def test_slowloris_heads_are_cut_and_others_are_served_meanwhile(server: HubProcess) -> None:
    slow = [_connect(server) for _ in range(20)]
    try:
        for sock in slow:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for _ in range(3):  # drip a header now and then, never the end of the head
            for sock in slow:
                sock.sendall(b"X-a: b\r\n")
            assert _healthy(server)
            time.sleep(HEAD_TIMEOUT_S / 4)
        for sock in slow:
            assert _read_until_closed(sock, HEAD_TIMEOUT_S + 5).startswith(b"HTTP/1.1 408 ")
    finally:
        for sock in slow:
            sock.close()


def test_a_connection_that_never_sends_is_closed(server: HubProcess) -> None:
    with _connect(server) as sock:
        started = time.monotonic()
        assert _read_until_closed(sock, 15) == b""  # uvicorn's keep-alive timeout (5 s)
        assert time.monotonic() - started < 10


def test_a_half_closed_request_is_answered(server: HubProcess) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert _read_until_closed(sock, 5).startswith(b"HTTP/1.1 200 ")


def test_a_subscriber_that_goes_away_mid_stream_is_unregistered(server: HubProcess) -> None:
    def subscribers() -> int:
        return int(httpx.get(server.url + "/healthz", timeout=2).json()["subscribers"])

    with _connect(server) as sock:
        sock.sendall(b"GET /.well-known/mercure?topic=/abuse HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        assert subscribers() == 1
        sock.shutdown(socket.SHUT_WR)  # half-closed, then gone
    deadline = time.monotonic() + 5
    while subscribers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert subscribers() == 0


def test_pipelined_requests_are_answered_in_order(server: HubProcess) -> None:
    paths = [b"/healthz", b"/openapi.json", b"/no/such", b"/healthz"]
    with _connect(server) as sock:
        sock.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in paths[:-1])
                     + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = _read_until_closed(sock, 5)
    # Each body ends where the next status line starts (bodies have a content-length).
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)
    assert statuses == [b"200", b"200", b"404", b"200"]
