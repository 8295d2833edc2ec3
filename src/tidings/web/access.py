"""What every route asks of a request: who is calling (JWT claims) and a bounded body.

Shared by the Mercure endpoint, the collections API and the chat, so that a token is read,
verified and checked the same way everywhere. Where a request carries its token (header,
query parameter, cookie names) is HTTP, so it is decided here; what a token allows is
`hub/auth.py`'s.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl

from starlette.types import Message, Receive, Scope

from tidings.errors import BadRequest, PayloadTooLarge, TokenMissing, Unauthorized
from tidings.hub.auth import Claims, KeyConfig, decode_token

__all__ = [
    "Access", "RequestParts", "claims_for", "publisher_claims", "read_body", "reader_claims",
    "token_from_request",
]

# Token transport (reference hub, compatibility mode): an `Authorization: Bearer <jwt>`
# header (scheme case-insensitive, anything else is a 400/401), then the 0.x
# `authorization` query parameter, then the cookie (`__Secure-mercure_access_token` in
# 1.0, with `mercureAuthorization` as the 0.x fallback). Draft-08 uses the same order,
# with `access_token` as the name of the query parameter. The reference hub refuses that
# parameter (RFC 9700), and it is not accepted here either.
_COOKIE_NAME = "__Secure-mercure_access_token"
_LEGACY_COOKIE_NAME = "mercureAuthorization"
_LEGACY_QUERY_PARAM = "authorization"

# RFC 6750 `b64token` after a case-insensitive `Bearer` scheme (RFC 9110 section 11.1).
_BEARER = re.compile(r"(?i:bearer) +([A-Za-z0-9\-._~+/]+=*)[ \t]*")


@dataclass(frozen=True, slots=True)
class Access:
    """The hub's access settings, as the Mercure endpoint and the collections API apply
    them: which keys verify tokens, whether readers may come without one, and how large
    a request body may be."""

    publisher_key: KeyConfig | None
    subscriber_key: KeyConfig | None
    anonymous: bool
    max_body: int

    def reader(self, parts: RequestParts) -> Claims | None:
        return reader_claims(parts, self.subscriber_key, anonymous=self.anonymous)

    def publisher(self, parts: RequestParts, *, doing: str) -> Claims:
        return publisher_claims(parts, self.publisher_key, doing=doing)

    async def body(self, receive: Receive, parts: RequestParts) -> bytes:
        return await read_body(receive, parts.headers.get("content-length"), self.max_body)


class RequestParts:
    """Headers, cookies and query of an ASGI scope, decoded once."""

    def __init__(self, scope: Scope) -> None:
        self.headers: dict[str, str] = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
        }
        self.query_list = parse_qsl(
            scope.get("query_string", b"").decode("utf-8", "replace"), keep_blank_values=True
        )
        self.query: dict[str, str] = dict(self.query_list)
        self.cookies: dict[str, str] = {}
        raw_cookie = self.headers.get("cookie")
        if raw_cookie:
            parsed: SimpleCookie = SimpleCookie()
            with contextlib.suppress(Exception):
                parsed.load(raw_cookie)
            self.cookies = {k: m.value for k, m in parsed.items()}


def token_from_request(
    headers: Mapping[str, str], cookies: Mapping[str, str], query: Mapping[str, str]
) -> str | None:
    """The request's token, or None when it carries none (an anonymous subscriber).

    Precedence follows the reference hub and spec draft-08: the Authorization header,
    then the 0.x `authorization` query parameter, then the cookie (1.0 name first,
    0.x name second). An explicit per-request credential therefore beats an ambient
    cookie. `headers` keys are lowercase. An Authorization header that is not
    `Bearer <token>` raises Unauthorized rather than being skipped, so a client never
    silently falls back to weaker (or no) credentials.
    """
    authorization = headers.get("authorization")
    if authorization is not None:
        match = _BEARER.fullmatch(authorization)
        if match is None:
            raise Unauthorized('malformed Authorization header: expected "Bearer <token>"')
        return match.group(1)
    token = query.get(_LEGACY_QUERY_PARAM)
    if token:
        return token
    for name in (_COOKIE_NAME, _LEGACY_COOKIE_NAME):
        token = cookies.get(name)
        if token:
            return token
    return None


def claims_for(parts: RequestParts, key: KeyConfig | None) -> Claims | None:
    token = token_from_request(parts.headers, parts.cookies, parts.query)
    if token is None:
        return None
    if key is None:
        raise Unauthorized("this hub has no key configured for tokens")
    return decode_token(token, key)


def reader_claims(parts: RequestParts, key: KeyConfig | None, *, anonymous: bool) -> Claims | None:
    """The subscriber's claims; None for an anonymous reader where the hub allows them."""
    claims = claims_for(parts, key)
    if claims is None and not anonymous:
        raise TokenMissing("this hub requires a subscriber token")
    return claims


def publisher_claims(parts: RequestParts, key: KeyConfig | None, *, doing: str) -> Claims:
    """The publisher's claims; `doing` names the action in errors ("publishing", ...)."""
    if key is None:
        raise Unauthorized(f"{doing} is disabled: no publisher key is configured")
    claims = claims_for(parts, key)
    if claims is None:
        raise TokenMissing(f"{doing} needs a publisher token")
    return claims


async def read_body(receive: Receive, content_length: str | None, limit: int) -> bytes:
    """The whole request body, refused with 413 as soon as it passes `limit` bytes."""
    too_large = f"the request body is larger than {limit} bytes"
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise PayloadTooLarge(too_large)
    body = bytearray()
    more = True
    while more:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("the client went away during the request")
        body += message.get("body", b"")
        if len(body) > limit:
            raise PayloadTooLarge(too_large)
        more = message.get("more_body", False)
    return bytes(body)
