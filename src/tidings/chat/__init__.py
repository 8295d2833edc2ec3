"""The chat: accounts, rooms, direct conversations, presence, notifications and exports,
delivered live through the hub. No HTTP in here (`tidings.web.chat` serves it).

    service = ChatService(hub, ChatConfig(db_url="sqlite:///tidings.db"), subscriber_key)
    await service.start()          # after hub.start()
    ...
    await service.stop()           # before hub.stop()

The errors, each with its `status_hint`, are in `tidings.chat.errors`. See docs/chat.md.
"""

from __future__ import annotations

from tidings.chat.accounts import Passwords, Session, SessionTokens
from tidings.chat.model import Conversation, Message
from tidings.chat.presence import PresenceRegistry, PresenceTracker
from tidings.chat.ratelimit import SlidingWindow
from tidings.chat.service import ChatConfig, ChatService, ChatStatus

__all__ = [
    "ChatConfig",
    "ChatService",
    "ChatStatus",
    "Conversation",
    "Message",
    "Passwords",
    "PresenceRegistry",
    "PresenceTracker",
    "Session",
    "SessionTokens",
    "SlidingWindow",
]
