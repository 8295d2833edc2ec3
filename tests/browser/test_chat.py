"""The chat page (/) in headless Chromium against a real `tidings serve`: two users in two
browser contexts (two cookie jars, two windows), a restart of the server in the middle.

Waits are on page state with deadlines, never sleeps. The chat's screenshot is written to
artifacts/chat.png (docs/chat.png is a copy of it, for the README).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.browser.conftest import CHROMIUM
from tests.conftest import PUBLISHER, HubProcess

ARTIFACTS = Path(__file__).parents[2] / "artifacts"
WAIT_MS = 20_000
PASSWORD = "correct horse battery"

if os.environ.get("CI") != "true" and not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)",
                allow_module_level=True)

from playwright.sync_api import (  # noqa: E402
    Browser,
    BrowserContext,
    Page,
    expect,
)


class Window:
    """One user's browser window: its own context, so its own cookies."""

    def __init__(self, browser: Browser, url: str) -> None:
        self.context: BrowserContext = browser.new_context(
            viewport={"width": 1200, "height": 720})
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("dialog", lambda dialog: dialog.accept())
        self.url = url

    def sign_up(self, name: str) -> Window:
        page = self.page
        page.goto(self.url + "/")
        page.get_by_label("Username").fill(name)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign up").click()
        expect(page.locator("#me")).to_have_text(name, timeout=WAIT_MS)
        self.wait_status("live")
        return self

    def wait_status(self, status: str) -> None:
        expect(self.page.locator("#status")).to_have_attribute("data-state", status,
                                                               timeout=WAIT_MS)

    def send(self, text: str) -> None:
        composer = self.page.get_by_role("textbox", name="Message")
        composer.fill(text)
        composer.press("Enter")

    def messages(self, text: str) -> object:
        return self.page.locator("#messages li .content").filter(has_text=text)

    def session(self) -> str:
        return next(c["value"] for c in self.context.cookies()
                    if c["name"] == "tidings_session")

    def close(self) -> None:
        self.context.close()
        assert self.errors == [], "uncaught errors in the page"


@pytest.fixture
def windows(browser: Browser) -> Iterator[list[Window]]:
    opened: list[Window] = []
    yield opened
    for window in opened:
        window.close()


def post(url: str, session: str, path: str, **body: object) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=10,
                      headers={"Authorization": f"Bearer {session}"})


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_two_windows_talk_and_lose_nothing_across_a_restart(
        browser: Browser, windows: list[Window], chat_hubs: type[HubProcess]) -> None:
    """On each store (`chat_db`): the one browser test run twice."""
    server = chat_hubs().start()
    alice = Window(browser, server.url).sign_up("alice")
    windows.append(alice)
    bob = Window(browser, server.url).sign_up("bob")
    windows.append(bob)

    # Presence: each sees the other online in #general.
    expect(bob.page.locator("#presence")).to_contain_text("alice", timeout=WAIT_MS)
    expect(alice.page.locator("#presence")).to_contain_text("bob", timeout=WAIT_MS)

    # A sends, B sees it within a second (through the database, the outbox and the hub).
    started = time.monotonic()
    alice.send("Hello Bob! Did the deploy go out?")
    bob.messages("Hello Bob! Did the deploy go out?").first.wait_for(timeout=1000)
    assert time.monotonic() - started < 1.0

    # Typing shows up live, then the answer.
    bob.page.get_by_role("textbox", name="Message").press_sequentially("It d")
    expect(alice.page.locator("#typing")).to_have_text("bob is typing…", timeout=WAIT_MS)
    bob.send("It did. Restarting the hub now, watch the badge.")
    expect(alice.messages("Restarting the hub now")).to_have_count(1, timeout=WAIT_MS)

    # The text is text: markup in a message is shown, never run.
    alice.send("<img src=x onerror=\"document.title='pwned'\"> is just text")
    expect(bob.messages("is just text")).to_have_count(1, timeout=WAIT_MS)
    assert bob.page.locator("#messages img").count() == 0
    assert bob.page.title() != "pwned"

    # Restart the server (same port, same database) while alice writes through the API.
    port = urlsplit(server.url).port
    session = alice.session()
    server.stop()
    bob.wait_status("reconnecting")
    # Bob's network is down as well until the messages are in: he gets them by resuming
    # after the last id he saw (replay from the hub's history), not by luck of timing.
    bob.context.set_offline(True)
    restarted = chat_hubs("--port", str(port)).start()
    assert restarted.url == server.url
    missed = [f"Sent while you were away, {i} of 5" for i in range(1, 6)]
    for text in missed:
        reply = post(restarted.url, session, "/api/rooms/general/messages", content=text)
        assert reply.status_code == 201, reply.text
    replayed_before = metric(restarted.url, "tidings_replayed_total")
    bob.context.set_offline(False)
    bob.wait_status("live")
    for text in missed:
        expect(bob.messages(text)).to_have_count(1, timeout=WAIT_MS)
    # ... and nothing twice, before or after the restart.
    expect(bob.messages("Hello Bob! Did the deploy go out?")).to_have_count(1)
    expect(alice.messages("Restarting the hub now")).to_have_count(1, timeout=WAIT_MS)
    for text in missed:
        expect(alice.messages(text)).to_have_count(1, timeout=WAIT_MS)
    assert bob.page.locator("#messages li").count() == 3 + len(missed)
    assert metric(restarted.url, "tidings_replayed_total") >= replayed_before + len(missed)

    # Live again after the restart, both ways.
    bob.send("Back! I got all five, once each.")
    expect(alice.messages("I got all five")).to_have_count(1, timeout=WAIT_MS)
    expect(bob.page.locator("#presence")).to_contain_text("alice", timeout=WAIT_MS)

    # A direct message: an unread badge on bob's side until he opens it.
    post(restarted.url, session, "/api/dm/bob/messages", content="Lunch at noon?")
    person = bob.page.locator('#people button[data-user="alice"]')
    expect(person.locator(".unread")).to_have_text("1", timeout=WAIT_MS)
    expect(bob.page.locator(".toast")).to_contain_text("Lunch at noon?", timeout=WAIT_MS)
    ARTIFACTS.mkdir(exist_ok=True)
    bob.page.screenshot(path=str(ARTIFACTS / "chat.png"))
    person.click()
    expect(bob.messages("Lunch at noon?")).to_have_count(1, timeout=WAIT_MS)
    expect(person.locator(".unread")).to_have_count(0)


def test_history_scrolls_up_exports_and_notifications(
        browser: Browser, windows: list[Window], hub_factory: type[HubProcess]) -> None:
    server = hub_factory("--chat-rate-messages", "1000").start()
    httpx.post(server.url + "/api/auth/signup", timeout=10,
               json={"username": "carol", "password": PASSWORD})
    carol = httpx.post(server.url + "/api/auth/login", timeout=10,
                       json={"username": "carol", "password": PASSWORD})
    session = carol.cookies["tidings_session"]
    for i in range(1, 121):
        post(server.url, session, "/api/rooms/general/messages", content=f"history {i:03}")
    dave = Window(browser, server.url)
    windows.append(dave)
    page = dave.page
    # The page subscribes right after the history it loaded: its last_event_id.
    with page.expect_response(lambda r: "/api/rooms/general/messages" in r.url) as history, \
            page.expect_request(lambda r: "/.well-known/mercure" in r.url) as subscription:
        dave.sign_up("dave")
    resume = parse_qs(urlsplit(subscription.value.url).query)["lastEventID"]
    assert resume == [history.value.json()["last_event_id"]]

    # The newest page first, then older ones as the list is scrolled up.
    expect(dave.messages("history 120")).to_have_count(1, timeout=WAIT_MS)
    assert page.locator("#messages li").count() == 50
    for expected in (100, 120):
        page.locator("#scroller").evaluate("node => { node.scrollTop = 0; }")
        expect(page.locator("#messages li")).to_have_count(expected, timeout=WAIT_MS)
    expect(dave.messages("history 001")).to_have_count(1)
    expect(page.locator("#older")).to_have_text("Beginning of the conversation")

    # Edit and delete one's own message, shown live.
    dave.send("tpyo")
    mine = page.locator("#messages li.mine")
    expect(mine).to_have_count(1, timeout=WAIT_MS)
    mine.get_by_role("button", name="Edit").click()
    editor = page.get_by_role("textbox", name="Edit the message")
    editor.fill("typo fixed")
    editor.press("Enter")
    expect(mine.locator(".content")).to_have_text("typo fixed", timeout=WAIT_MS)
    expect(mine.locator(".edited")).to_have_count(1)
    mine.get_by_role("button", name="Delete").click()
    expect(mine).to_have_count(0, timeout=WAIT_MS)

    # An export: a progress bar, then a download link.
    page.get_by_label("Export format").select_option("csv")
    page.get_by_role("button", name="Export history").click()
    task = page.locator(".task[data-state=completed]")
    expect(task.locator("progress")).to_have_attribute("value", "100", timeout=WAIT_MS)
    link = task.get_by_role("link", name="Download")
    href = link.get_attribute("href")
    assert href is not None
    download = page.request.get(server.url + href)
    assert download.ok and download.text().count("history ") == 120

    # A notification from a service becomes a toast.
    reply = httpx.post(server.url + "/api/notifications", timeout=10, json={
        "user": "dave", "message": "Your export is ready", "type": "info"},
        headers={"Authorization": f"Bearer {PUBLISHER}"})
    assert reply.status_code == 202
    expect(page.locator(".toast")).to_contain_text("Your export is ready", timeout=WAIT_MS)

    # Bad input is told, not sent; signing out goes back to the form.
    dave.send("   ")
    expect(page.locator("#composer-error")).to_have_text("A message cannot be empty.")
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("button", name="Log in")).to_be_visible(timeout=WAIT_MS)
    page.get_by_label("Username").fill("dave")
    page.get_by_label("Password").fill("wrong password")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#auth-error")).to_have_text("wrong username or password",
                                                     timeout=WAIT_MS)


# -- a new user's first minutes: each fix leaves a screenshot in artifacts/first-minutes/ ----

SHOTS = ARTIFACTS / "first-minutes"


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def watch_console(page: Page) -> list[str]:
    """Errors a visitor would see in the console: logged errors, and failed requests
    (which Chromium logs as "Failed to load resource")."""
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console: {m.text}")
            if m.type == "error" else None)
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}")
            if r.status >= 400 else None)
    return problems


def within(inner: dict[str, float] | None, outer: dict[str, float] | None) -> bool:
    assert inner is not None and outer is not None
    return (inner["y"] >= outer["y"] - 1
            and inner["y"] + inner["height"] <= outer["y"] + outer["height"] + 1)


def test_a_signed_out_visit_logs_nothing_and_both_pages_have_an_icon(
        browser: Browser, hub_factory: type[HubProcess]) -> None:
    server = hub_factory().start()
    context = browser.new_context(viewport={"width": 1200, "height": 720})
    page = context.new_page()
    problems = watch_console(page)
    page.goto(server.url + "/")
    expect(page.get_by_role("button", name="Sign up")).to_be_visible(timeout=WAIT_MS)
    page.wait_for_load_state("networkidle")
    shot(page, "signed-out")
    assert problems == []  # /api/me's 401 was one
    for path in ("/", "/hub"):
        page.goto(server.url + path)
        page.wait_for_load_state("networkidle")
        icon = page.locator("link[rel=icon]").get_attribute("href")
        assert icon and icon.endswith(".svg"), f"{path} has no icon"
        assert page.request.get(server.url + icon).ok
    expect(page.locator("#st-status")).not_to_have_text("…", timeout=WAIT_MS)
    shot(page, "hub-with-icon")
    context.close()
    assert problems == []


def test_exports_say_done_and_why_csv_cells_get_a_quote(
        browser: Browser, windows: list[Window], hub_factory: type[HubProcess]) -> None:
    server = hub_factory().start()
    erin = Window(browser, server.url).sign_up("erin")
    windows.append(erin)
    page = erin.page
    erin.send("@alice =1+1")
    expect(erin.messages("@alice =1+1")).to_have_count(1, timeout=WAIT_MS)
    csv_option = page.locator("#export-format option[value=csv]")
    assert "formula" in (csv_option.get_attribute("title") or "")
    page.get_by_label("Export format").select_option("csv")
    page.get_by_role("button", name="Export history").click()
    task = page.locator(".task[data-state=completed]")
    expect(task.locator(".hint").first).to_have_text("done", timeout=WAIT_MS)
    expect(task).not_to_contain_text("%")
    note = task.locator(".csv-note")
    expect(note).to_contain_text("'")
    assert "formula" in (note.get_attribute("title") or "")
    shot(page, "export-done")
    href = task.get_by_role("link", name="Download").get_attribute("href")
    assert href is not None
    assert "'@alice =1+1" in page.request.get(server.url + href).text()


def test_editing_the_last_message_is_not_cut_off(
        browser: Browser, windows: list[Window], hub_factory: type[HubProcess]) -> None:
    server = hub_factory("--chat-rate-messages", "1000").start()
    frank = Window(browser, server.url).sign_up("frank")
    windows.append(frank)
    page = frank.page
    for i in range(1, 31):
        post(server.url, frank.session(), "/api/rooms/general/messages", content=f"line {i}")
    expect(frank.messages("line 30")).to_have_count(1, timeout=WAIT_MS)
    page.locator("#messages li.mine").last.get_by_role("button", name="Edit").click()
    editor = page.get_by_role("textbox", name="Edit the message")
    expect(editor).to_be_focused()
    scroller = page.locator("#scroller").bounding_box()
    save = page.locator("#messages li.mine").last.get_by_role("button", name="Save")
    assert within(editor.bounding_box(), scroller)
    assert within(save.bounding_box(), scroller)
    shot(page, "edit-last-message")


def test_a_non_member_sees_only_join_room(
        browser: Browser, windows: list[Window], hub_factory: type[HubProcess]) -> None:
    server = hub_factory().start()
    gina = httpx.post(server.url + "/api/auth/signup", timeout=10,
                      json={"username": "gina", "password": PASSWORD})
    assert post(server.url, gina.cookies["tidings_session"], "/api/rooms",
                name="books").status_code == 201
    hank = Window(browser, server.url).sign_up("hank")
    windows.append(hank)
    page = hank.page
    page.locator('#rooms button[data-room="books"]').click()
    expect(page.get_by_role("button", name="Join room")).to_be_visible(timeout=WAIT_MS)
    for hidden in ("#composer-hint", "#export", "#export-format", "#composer", "#send"):
        expect(page.locator(hidden)).to_be_hidden()
    shot(page, "non-member")
    page.get_by_role("button", name="Join room").click()
    expect(page.locator("#composer-hint")).to_be_visible(timeout=WAIT_MS)
    expect(page.get_by_role("button", name="Export history")).to_be_visible()


def test_the_newest_message_is_in_view_at_390_px(
        browser: Browser, windows: list[Window], hub_factory: type[HubProcess]) -> None:
    server = hub_factory("--chat-rate-messages", "1000").start()
    ivan = httpx.post(server.url + "/api/auth/signup", timeout=10,
                      json={"username": "ivan", "password": PASSWORD})
    session = ivan.cookies["tidings_session"]
    for i in range(1, 41):
        post(server.url, session, "/api/rooms/general/messages", content=f"older news {i}")
    window = Window(browser, server.url)
    windows.append(window)
    window.context.close()
    window.context = browser.new_context(viewport={"width": 390, "height": 844},
                                         is_mobile=True, has_touch=True)
    window.page = window.context.new_page()
    window.page.on("pageerror", lambda exc: window.errors.append(str(exc)))
    window.sign_up("judy")
    page = window.page
    newest = window.messages("older news 40")
    expect(newest).to_have_count(1, timeout=WAIT_MS)
    expect(newest).to_be_in_viewport(timeout=WAIT_MS)
    assert within(newest.bounding_box(), page.locator("#scroller").bounding_box())
    shot(page, "narrow-newest-in-view")
    # The visible height shrinks (a phone's address bar comes back, its keyboard opens):
    # the page fits the new height, and a reader at the bottom stays there.
    page.set_viewport_size({"width": 390, "height": 520})
    expect(page.get_by_role("textbox", name="Message")).to_be_in_viewport(timeout=WAIT_MS)
    expect(newest).to_be_in_viewport(timeout=WAIT_MS)
    assert within(newest.bounding_box(), page.locator("#scroller").bounding_box())
    shot(page, "narrow-shorter-viewport")
    window.send("and one from me")
    mine = window.messages("and one from me")
    expect(mine).to_be_in_viewport(timeout=WAIT_MS)
    composer = page.get_by_role("textbox", name="Message")
    expect(composer).to_be_in_viewport()
    shot(page, "narrow-after-sending")
