"""The chat: accounts, rooms, direct conversations, presence, notifications and exports,
delivered live through the hub. No HTTP in here (`tidings.web.chat` serves it).

    service = ChatService(hub, ChatConfig(db_url="sqlite:///tidings.db"), subscriber_key)
    await service.start()          # after hub.start()
    ...
    await service.stop()           # before hub.stop()

See docs/chat.md.
"""

from __future__ import annotations

from tidings.chat.accounts import Passwords, Session, SessionTokens
from tidings.chat.errors import (
    BadCredentials,
    ChatUnavailable,
    InvalidInput,
    InvalidJSON,
    NoSession,
    NotAllowed,
    RateLimited,
    Taken,
    UnknownMessage,
    UnknownRoom,
    UnknownTask,
    UnknownUser,
)
from tidings.chat.model import Conversation, Message
from tidings.chat.presence import PresenceRegistry, PresenceTracker
from tidings.chat.ratelimit import SlidingWindow
from tidings.chat.service import ChatConfig, ChatService

__all__ = [
    "BadCredentials",
    "ChatConfig",
    "ChatService",
    "ChatUnavailable",
    "Conversation",
    "InvalidInput",
    "InvalidJSON",
    "Message",
    "NoSession",
    "NotAllowed",
    "Passwords",
    "PresenceRegistry",
    "PresenceTracker",
    "RateLimited",
    "Session",
    "SessionTokens",
    "SlidingWindow",
    "Taken",
    "UnknownMessage",
    "UnknownRoom",
    "UnknownTask",
    "UnknownUser",
]
