"""The chat's pure parts: rules, topics, the rate limit, the presence registry, exports."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest

from tidings.chat import events
from tidings.chat.accounts import CheckedSessions
from tidings.chat.errors import InvalidInput
from tidings.chat.exports import render
from tidings.chat.model import (
    Conversation,
    Message,
    check_content,
    check_room_name,
    check_username,
    mentions,
    subscribe_selectors,
)
from tidings.chat.presence import PresenceRegistry
from tidings.chat.ratelimit import SlidingWindow
from tidings.hub.topics import Matcher, compile_selector


def test_usernames_are_case_folded_and_checked() -> None:
    assert check_username("  Alice_1 ") == "alice_1"
    for bad in ("a", "x" * 33, "al ice", "al.ice", "élodie", "", 5, None):
        with pytest.raises(InvalidInput):
            check_username(bad)


def test_room_names() -> None:
    assert check_room_name("Dev-Ops") == "dev-ops"
    for bad in ("-x", "a b", "x" * 33, "", "a/b"):
        with pytest.raises(InvalidInput):
            check_room_name(bad)


def test_message_content() -> None:
    assert check_content("  hi  ") == "  hi  "  # kept as sent
    assert check_content("x" * 4000)
    for bad in ("", " \n\t", "x" * 4001, None, 1, "a\0b"):
        with pytest.raises(InvalidInput):
            check_content(bad)


def test_mentions() -> None:
    assert mentions("@Bob and @bob, @carol! mail@example.com @x") == ["bob", "carol"]
    assert mentions("no mentions") == []


def test_conversations_and_topics() -> None:
    dm = Conversation.between("bob", "alice")
    assert dm == Conversation.between("alice", "bob")
    assert (dm.key, dm.topic) == ("dm:alice:bob", "/chat/dm/alice/bob")
    assert Conversation.from_key(dm.key) == dm
    assert dm.other("alice") == "bob" and dm.includes("bob") and not dm.includes("carol")
    room = Conversation.of_room("general")
    assert (room.key, room.topic, room.fields()) == (
        "room:general", "/chat/rooms/general", {"room": "general", "dm": None})


def test_a_users_claim_covers_exactly_its_private_topics() -> None:
    claim = Matcher([compile_selector(s, "topic") for s in subscribe_selectors("alice")])
    for topic in ("/chat/rooms/general", "/chat/rooms", "/chat/presence",
                  "/chat/dm/alice/bob", "/chat/dm/aaron/alice", "/users/alice/notifications",
                  "/tasks/alice.0123abcd"):
        assert claim.matches(topic), topic
    for topic in ("/chat/dm/bob/carol", "/chat/dm/alice2/bob", "/users/bob/notifications",
                  "/tasks/alice2.0123abcd", "/tasks/bob.1", "/chat/rooms/a/b",
                  "/users/alice/notifications/x"):
        assert not claim.matches(topic), topic


def test_sliding_window() -> None:
    now = [0.0]
    limit = SlidingWindow(3, 10.0, clock=lambda: now[0])
    assert [limit.hit("a") for _ in range(3)] == [0, 0, 0]
    assert limit.hit("a") == 10
    assert limit.hit("b") == 0  # per key
    now[0] = 9.2
    assert limit.hit("a") == 1  # the first hit leaves the window at 10.0
    now[0] = 10.0  # all three left the window
    assert [limit.hit("a") for _ in range(4)] == [0, 0, 0, 10]
    now[0] = 100.0
    limit.hit("c")
    assert set(limit._hits) == {"c"}  # idle keys are swept


def test_checked_sessions_are_trusted_briefly_and_forgotten_at_logout() -> None:
    checked = CheckedSessions(ttl_s=0.05, size=2)
    assert not checked.fresh("s1", "alice")
    checked.confirmed("s1", "alice")
    assert checked.fresh("s1", "alice")
    assert not checked.fresh("s1", "bob")  # the session of another user: asked again
    checked.forget("s1")
    assert not checked.fresh("s1", "alice")
    checked.confirmed("s1", "alice")
    time.sleep(0.06)
    assert not checked.fresh("s1", "alice")  # past ttl_s: the store is asked again
    for sid in ("a", "b", "c"):  # bounded: the third starts over
        checked.confirmed(sid, "alice")
    assert checked.fresh("c", "alice") and not checked.fresh("a", "alice")


def test_presence_registry() -> None:
    registry = PresenceRegistry()
    a1 = registry.connect("alice", ["general", "random"])
    a2 = registry.connect("alice", ["general"])
    b = registry.connect("bob", [])
    assert registry.online("general") == ["alice"] and registry.online() == ["alice", "bob"]
    registry.disconnect(a1)
    assert registry.online("general") == ["alice"] and registry.online("random") == []
    registry.disconnect(a2)
    assert not registry.is_online("alice") and registry.online("general") == []
    assert registry.disconnect(a2) is False  # twice is harmless
    registry.disconnect(b)
    assert len(registry) == 0 and registry.online() == []


def test_updates_are_typed_json_on_the_conversation_topic() -> None:
    message = Message(7, Conversation.between("bob", "alice"), "alice", "<b>hi</b>",
                      "2026-01-01T00:00:00.000Z")
    out = events.message_created(message)
    assert out.topic == "/chat/dm/alice/bob"
    data = json.loads(out.data)
    assert data["type"] == "message.created"
    assert data["message"] == {"id": 7, "room": None, "dm": ["alice", "bob"],
                               "sender": "alice", "content": "<b>hi</b>",
                               "created_at": "2026-01-01T00:00:00.000Z", "edited_at": None}
    assert json.loads(events.presence(None, ["a"]).data)["room"] is None
    assert events.task_event("progress", "alice.1", {"percent": 5}).topic == "/tasks/alice.1"


@pytest.mark.parametrize("conversation", [Conversation.of_room("general"),
                                          Conversation.between("bob", "alice")])
@pytest.mark.parametrize("content", ['plain', '{"id":0,"room":null}', 'é "id":0, \\ \n'])
def test_a_message_update_made_around_its_id_is_the_update_itself(
        conversation: Conversation, content: str) -> None:
    # PostgreSQL's chat_post writes head + id + tail (one round trip per post).
    head, tail = events.message_created_around_id(conversation, "alice", content,
                                                  "2026-01-01T00:00:00.000Z")
    for id_ in (1, 42, 9_007_199_254_740_993):
        message = Message(id_, conversation, "alice", content, "2026-01-01T00:00:00.000Z")
        assert head + str(id_) + tail == events.message_created(message).data


def test_exports() -> None:
    messages = [Message(i, Conversation.of_room("general"), "alice", text,
                        "2026-01-01T00:00:00.000Z")
                for i, text in enumerate(["=SUM(A1)", 'say "hi",\nthere', "@bob", "+1", "ok"])]
    rows = list(csv.reader(io.StringIO(render("general", messages, "csv").decode())))
    assert rows[0] == ["id", "sender", "content", "created_at", "edited_at"]
    assert [row[2] for row in rows[1:]] == ["'=SUM(A1)", 'say "hi",\nthere', "'@bob", "'+1",
                                            "ok"]
    document = json.loads(render("general", messages, "json"))
    assert document["room"] == "general"
    assert document["messages"][0]["content"] == "=SUM(A1)"  # only CSV escapes
