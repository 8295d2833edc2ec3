"""The chat page in headless Chromium against two `tidings serve` processes sharing the
chat's PostgreSQL schema and a Redis bus, each behind its own nginx (deploy/nginx.conf
with the other process as the backup upstream): alice's window is served by A, bob's by
B. Messages, a direct message, an edit, presence, typing and an assistant reply are seen
live in both; then A is SIGKILLed: alice's window reconnects through nginx to B, and
nothing is lost or doubled.

Waits are on page state with deadlines, never sleeps."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.conftest import CHROMIUM
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

        # Presence across processes: each sees the other online in #general.
        expect(bob.page.locator("#presence")).to_contain_text("alice", timeout=WAIT_MS)
        expect(alice.page.locator("#presence")).to_contain_text("bob", timeout=WAIT_MS)

        alice.send("Hello from process A")
        expect(bob.messages("Hello from process A")).to_have_count(1, timeout=WAIT_MS)
        bob.page.get_by_role("textbox", name="Message").press_sequentially("Hel")
        expect(alice.page.locator("#typing")).to_have_text("bob is typing…",
                                                            timeout=WAIT_MS)
        bob.send("Hello from process B")
        expect(alice.messages("Hello from process B")).to_have_count(1, timeout=WAIT_MS)

        # An edit on A, seen on B.
        mine = alice.page.locator("#messages li.mine")
        mine.get_by_role("button", name="Edit").click()
        editor = alice.page.get_by_role("textbox", name="Edit the message")
        editor.fill("Hello from process A, edited")
        editor.press("Enter")
        expect(bob.messages("Hello from process A, edited")).to_have_count(1,
                                                                          timeout=WAIT_MS)
        # Bob may see the edit before Alice's page has its own answer and closes the
        # editor (whose label also says "message"): wait for that before typing on.
        expect(editor).to_have_count(0, timeout=WAIT_MS)

        # The assistant's reply, streamed by A, in both windows.
        alice.send("@assistant say hello")
        for window in (alice, bob):
            expect(window.messages(FULL)).to_have_count(1, timeout=WAIT_MS)

        # A direct message from alice, posted on A, to bob's window on B.
        reply = post(via_a, alice.session(), "/api/dm/bob/messages", content="A word")
        assert reply.status_code == 201, reply.text
        person = bob.page.locator('#people button[data-user="alice"]')
        expect(person.locator(".unread")).to_have_text("1", timeout=WAIT_MS)

        # A dies. Alice's window reconnects through its nginx, to B; messages sent
        # meanwhile reach her once, and hers reach bob.
        a.stop(signal.SIGKILL)
        bob.send("Sent while A was down")
        expect(alice.messages("Sent while A was down")).to_have_count(1, timeout=WAIT_MS)
        alice.wait_status("live")
        alice.send("Back, on process B")
        expect(bob.messages("Back, on process B")).to_have_count(1, timeout=WAIT_MS)
        expect(bob.page.locator("#presence")).to_contain_text("alice", timeout=WAIT_MS)
        for window in (alice, bob):
            for text in ("Hello from process A, edited", "Hello from process B", FULL,
                         "Sent while A was down", "Back, on process B"):
                expect(window.messages(text)).to_have_count(1)
            expect(window.page.locator("#messages li")).to_have_count(6)
