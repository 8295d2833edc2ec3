"""Passwords (argon2id) and session tokens (JWTs the hub accepts too).

A session is a JWT signed with the hub's subscriber key. Its subscribe claim lists the
private topics its user may read (`model.subscribe_selectors`), so the very token that
authorizes the chat's API calls also authorizes the browser's `EventSource` on the hub,
with no second credential. Its Mercure payload names the user and the session id; the
store keeps session ids, so logging out revokes the session for the API: at once on the
process that logs out, within `CheckedSessions.ttl_s` on the others. (The hub
itself checks signatures and `exp` only: a copied token would read until it expires, but
the browser drops both cookies at logout.)
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from tidings.chat.errors import ChatUnavailable, NoSession
from tidings.chat.model import subscribe_selectors
from tidings.errors import Unauthorized
from tidings.hub.auth import KeyConfig, decode_token

__all__ = ["CheckedSessions", "Passwords", "Session", "SessionTokens"]


class Passwords:
    """argon2id hashes, computed off the event loop (a hash takes tens of milliseconds).

    The parameters are OWASP's argon2id minimum (19 MiB, 2 passes, 1 lane); a stored hash
    carries its own, so they can be raised later without invalidating accounts."""

    def __init__(self) -> None:
        self._hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
        self._dummy: str | None = None

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, stored: str | None, password: str) -> bool:
        """Whether `password` matches `stored`. With no stored hash (no such user) a
        dummy hash is checked all the same, so both failures take the same time."""
        if stored is None:
            if self._dummy is None:
                self._dummy = await self.hash(secrets.token_urlsafe(16))
            stored = self._dummy
            password = password + "\0"  # never matches the dummy
        return await asyncio.to_thread(self._check, stored, password)

    def _check(self, stored: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False


@dataclass(frozen=True, slots=True)
class Session:
    username: str
    sid: str
    expires_at: float
    token: str


class SessionTokens:
    """Mints and reads session JWTs with the hub's subscriber key."""

    def __init__(self, key: KeyConfig | None, ttl_s: float) -> None:
        self.key = key
        self.ttl_s = ttl_s
        # Minting needs the signing secret: the hub's subscriber key must be an HMAC key
        # (with an RS/ES/PS/EdDSA public key the chat cannot sign sessions).
        self.usable = key is not None and key.algorithm.upper().startswith("HS")

    def require_key(self) -> KeyConfig:
        if self.key is None or not self.usable:
            raise ChatUnavailable(
                "the chat signs sessions with the hub's subscriber key, which must be an "
                "HMAC secret (--jwt-key or --subscriber-jwt-key with HS256/384/512)")
        return self.key

    def mint(self, username: str, sid: str) -> Session:
        key = self.require_key()
        now = time.time()
        expires_at = float(int(now + self.ttl_s))
        claims: dict[str, object] = {
            "sub": username,
            "iat": int(now),
            "exp": int(expires_at),
            "mercure": {
                "subscribe": subscribe_selectors(username),
                "payload": {"user": username, "sid": sid},
            },
        }
        if key.audience is not None:
            claims["aud"] = key.audience
        if key.issuer is not None:
            claims["iss"] = key.issuer
        token = jwt.encode(claims, key.key, algorithm=key.algorithm)
        return Session(username, sid, expires_at, token)

    def read(self, token: str | None) -> Session:
        """The session a token carries; NoSession when it is missing, invalid, expired or
        not a chat session (a publisher token, say)."""
        if not token:
            raise NoSession("sign in first")
        key = self.require_key()
        try:
            claims = decode_token(token, key)
        except Unauthorized:
            raise NoSession("the session has expired or is invalid: sign in again") from None
        payload = claims.payload
        if not isinstance(payload, dict):
            raise NoSession("not a chat session")
        user, sid = payload.get("user"), payload.get("sid")
        if (not isinstance(user, str) or not isinstance(sid, str) or claims.subject != user
                or claims.expires_at is None):
            raise NoSession("not a chat session")
        return Session(user, sid, claims.expires_at, token)

    def due_for_refresh(self, session: Session) -> bool:
        """Past half its life: `GET /api/me` then hands out a fresh token."""
        return session.expires_at - time.time() < self.ttl_s / 2


class CheckedSessions:
    """Sessions the store confirmed live in the last `ttl_s`: every API call checks its
    session, and a chat POST did so with a round trip of its own to the database, on the
    pool its write then waited for. A logout on this process is forgotten at once
    (`forget`); one on another process takes effect here within `ttl_s`."""

    def __init__(self, ttl_s: float = 1.0, size: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self._size = size
        self._until: dict[str, tuple[str, float]] = {}  # sid: (username, monotonic)

    def fresh(self, sid: str, username: str) -> bool:
        checked = self._until.get(sid)
        return checked is not None and checked[0] == username and time.monotonic() < checked[1]

    def confirmed(self, sid: str, username: str) -> None:
        if len(self._until) >= self._size:  # bounded: start over (each costs one check)
            self._until.clear()
        self._until[sid] = (username, time.monotonic() + self.ttl_s)

    def forget(self, sid: str) -> None:
        self._until.pop(sid, None)
