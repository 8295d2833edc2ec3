"""The chat page in headless Chromium against two `tidings serve` processes sharing the
chat's PostgreSQL schema and a Redis bus, each behind its own nginx (deploy/nginx.conf
with the other process as the backup upstream): alice's window is served by A, bob's by
B. Messages, a direct message, an edit, presence, typing and an assistant reply are seen
live in both; then A is SIGKILLed: alice's window reconnects through nginx to B, and
nothing is lost or doubled. And the same with one `tidings serve --workers 2` behind one
nginx: the two windows' streams on different workers, then alice's worker SIGKILLed.

Waits are on page state (or the database's) with deadlines, never fixed sleeps."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.conftest import CHROMIUM, pg_fetch
from tests.conftest import HubProcess
from tests.integration.test_assistant import FULL, FakeLLM
from tests.nginx import nginx, port_of, require_nginx
from tests.services import REDIS_URL, require

if os.environ.get("CI") != "true" and not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)",
                allow_module_level=True)

from playwright.sync_api import Browser, expect

from tests.browser.test_chat import WAIT_MS, Window, post


@pytest.fixture
def opened() -> Iterator[list[Window]]:
    """The windows a test opened, closed (and checked for page errors) after it."""
    found: list[Window] = []
    yield found
    for window in found:
        window.close()


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    """The assistant's stand-in endpoint (tests/integration/test_assistant.py), on an
    event loop in a thread of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fake = FakeLLM()
    server = asyncio.run_coroutine_threadsafe(
        asyncio.start_server(fake.handle, "127.0.0.1", 0), loop).result(10)
    fake.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield fake

    async def shutdown() -> None:
        server.close()
        await fake.stop()

    asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.mark.parametrize("chat_db", ["postgres"], indirect=True)
def test_two_windows_on_two_processes_and_a_sigkill(
        browser: Browser, opened: list[Window], chat_db: str, fake_llm: FakeLLM,
        hub_factory: type[HubProcess], tmp_path: Path) -> None:
    require_nginx()
    bus = f"{require(REDIS_URL)}?namespace=cb{uuid.uuid4().hex[:12]}"
    a, b = (hub_factory("--bus", bus, "--chat-heartbeat", "1", "--assistant-url",
                        fake_llm.url, "--assistant-model", "m", db=chat_db).start()
            for _ in range(2))
    with nginx(tmp_path / "via-a", port_of(a.url), port_of(b.url), b_backup=True) as via_a, \
            nginx(tmp_path / "via-b", port_of(b.url), port_of(a.url), b_backup=True) as via_b:
        alice = Window(browser, via_a).sign_up("alice")
        opened.append(alice)
        bob = Window(browser, via_b).sign_up("bob")
        opened.append(bob)

        held = live_in_both(alice, bob, via_a, "Hello from process A", "Hello from process B")
        # A dies. Alice's window reconnects through its nginx, to B; messages sent
        # meanwhile reach her once, and hers reach bob.
        a.stop(signal.SIGKILL)
        nothing_lost_after_the_kill(alice, bob, held)


@pytest.mark.parametrize("chat_db", ["postgres"], indirect=True)
def test_two_windows_on_two_workers_behind_nginx_and_a_sigkill(
        browser: Browser, opened: list[Window], chat_db: str, fake_llm: FakeLLM,
        hub_factory: type[HubProcess], tmp_path: Path) -> None:
    """`tidings serve --workers 2` behind nginx: the kernel gives each connection to
    either worker, so bob's page is reloaded until his stream is on the other worker
    than alice's (the chat's presence rows say which process holds each stream)."""
    require_nginx()
    bus = f"{require(REDIS_URL)}?namespace=cw{uuid.uuid4().hex[:12]}"
    server = hub_factory("--workers", "2", "--bus", bus, "--chat-heartbeat", "1",
                         "--assistant-url", fake_llm.url, "--assistant-model", "m",
                         db=chat_db).start()
    port = port_of(server.url)
    with nginx(tmp_path / "nginx", port, port) as via:
        alice = Window(browser, via).sign_up("alice")
        opened.append(alice)
        bob = Window(browser, via).sign_up("bob")
        opened.append(bob)
        alice_worker = stream_worker(chat_db, "alice")
        for _ in range(12):
            if stream_worker(chat_db, "bob") != alice_worker:
                break
            bob.page.reload()
            bob.wait_status("live")
        else:
            raise AssertionError("bob's stream never landed on the other worker")

        held = live_in_both(alice, bob, via, "Hello from one worker", "Hello from the other")
        # Alice's worker dies (uvicorn starts another): her window reconnects through
        # nginx, and misses nothing sent meanwhile.
        os.kill(alice_worker, signal.SIGKILL)
        nothing_lost_after_the_kill(alice, bob, held)


def live_in_both(alice: Window, bob: Window, url: str, hers: str, his: str) -> list[str]:
    """Presence, messages (`hers` from alice, `his` from bob), typing, an edit, an
    assistant reply and a direct message (posted through `url`), each seen live in the
    other's window. Returns the texts the room now holds."""
    expect(bob.page.locator("#presence")).to_contain_text("alice", timeout=WAIT_MS)
    expect(alice.page.locator("#presence")).to_contain_text("bob", timeout=WAIT_MS)
    alice.send(hers)
    expect(bob.messages(hers)).to_have_count(1, timeout=WAIT_MS)
    bob.page.get_by_role("textbox", name="Message").press_sequentially("Hel")
    expect(alice.page.locator("#typing")).to_have_text("bob is typing…", timeout=WAIT_MS)
    bob.send(his)
    expect(alice.messages(his)).to_have_count(1, timeout=WAIT_MS)

    mine = alice.page.locator("#messages li.mine")
    mine.get_by_role("button", name="Edit").click()
    editor = alice.page.get_by_role("textbox", name="Edit the message")
    editor.fill(f"{hers}, edited")
    editor.press("Enter")
    expect(bob.messages(f"{hers}, edited")).to_have_count(1, timeout=WAIT_MS)
    # Bob may see the edit before Alice's page has its own answer and closes the
    # editor (whose label also says "message"): wait for that before typing on.
    expect(editor).to_have_count(0, timeout=WAIT_MS)

    alice.send("@assistant say hello")
    for window in (alice, bob):
        expect(window.messages(FULL)).to_have_count(1, timeout=WAIT_MS)

    reply = post(url, alice.session(), "/api/dm/bob/messages", content="A word")
    assert reply.status_code == 201, reply.text
    person = bob.page.locator('#people button[data-user="alice"]')
    expect(person.locator(".unread")).to_have_text("1", timeout=WAIT_MS)
    return [f"{hers}, edited", his, FULL]


def nothing_lost_after_the_kill(alice: Window, bob: Window, held: list[str]) -> None:
    """Alice's server was just SIGKILLed: a message sent meanwhile reaches her once, hers
    reaches bob, and each window holds the room's earlier messages (`held`) and these,
    each once."""
    bob.send("Sent while it was down")
    expect(alice.messages("Sent while it was down")).to_have_count(1, timeout=WAIT_MS)
    alice.wait_status("live")
    alice.send("Back, on a live process")
    expect(bob.messages("Back, on a live process")).to_have_count(1, timeout=WAIT_MS)
    expect(bob.page.locator("#presence")).to_contain_text("alice", timeout=WAIT_MS)
    for window in (alice, bob):
        for text in (*held, "Sent while it was down", "Back, on a live process"):
            expect(window.messages(text)).to_have_count(1)
        expect(window.page.locator("#messages li")).to_have_count(6)


def stream_worker(chat_db: str, user: str) -> int:
    """The pid of the process holding `user`'s one stream, once the chat's presence rows
    show exactly one (a reloaded page's old stream leaves its row for the 2 s grace)."""
    deadline = time.monotonic() + 15
    while True:
        pids = [row["pid"] for row in pg_fetch(chat_db, f"""
            SELECT pid FROM chat_cluster_presence JOIN chat_cluster_processes
            USING (process) WHERE username = '{user}'""")]
        if len(pids) == 1:
            return int(pids[0])
        if time.monotonic() > deadline:
            raise AssertionError(f"{user} has {len(pids)} streams, not one")
        time.sleep(0.2)
