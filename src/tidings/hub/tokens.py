"""Minting tokens: the other half of `hub/auth.py`, for `tidings token`, the bench and tests.

A minted token is what `decode_token` accepts, in either claim style (the 0.x `mercure`
claim or 1.0 `authorization_details`): the claim names come from `hub/auth.py`, so the two
halves cannot drift apart. The hub itself never mints; it only verifies.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import jwt

from tidings.hub.auth import DETAIL_TYPE, LEGACY_CLAIM
from tidings.hub.topics import Selector

__all__ = ["encode_token"]


def encode_token(
    key: str,
    *,
    publish: Sequence[str | Selector] | None = None,
    subscribe: Sequence[str | Selector] | None = None,
    payload: object = None,
    algorithm: str = "HS256",
    expires_in_s: float | None = None,
    audience: str | None = None,
    issuer: str | None = None,
    style: Literal["mercure", "authorization_details"] = "mercure",
) -> str:
    """Mint a signed token (for `tidings token` and tests).

    `key` is the HMAC secret or, for asymmetric algorithms, a PEM private key. A plain
    string selector means a 0.x topic selector in the "mercure" style and an exact match
    in the "authorization_details" style. Pass a compiled `Selector` to choose
    its kind explicitly, for example `compile_selector(p, "urlpattern")`.
    A negative `expires_in_s` mints an already expired token.
    """
    if algorithm.lower() == "none":
        raise ValueError('refusing to mint an unsigned ("none") token')
    now = time.time()
    claims: dict[str, Any] = {"iat": int(now)}
    if expires_in_s is not None:
        # Rounded up so a short lifetime is never truncated into an expired token.
        claims["exp"] = math.ceil(now + expires_in_s)
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer

    headers: dict[str, Any] | None = None
    if style == "mercure":
        mercure: dict[str, Any] = {}
        if publish is not None:
            mercure["publish"] = [_legacy_entry(s) for s in publish]
        if subscribe is not None:
            mercure["subscribe"] = [_legacy_entry(s) for s in subscribe]
        if payload is not None:
            mercure["payload"] = payload
        claims[LEGACY_CLAIM] = mercure
    elif style == "authorization_details":
        details: list[dict[str, Any]] = []
        if publish is not None:
            details.append(_detail("publish", publish, None))
        if subscribe is not None:
            details.append(_detail("subscribe", subscribe, payload))
        claims["authorization_details"] = details
        # RFC 9068 access tokens, which is what 1.0 hubs require of this claim style.
        headers = {"typ": "at+jwt"}
    else:
        raise ValueError(f"unknown token style {style!r}")
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def _legacy_entry(selector: str | Selector) -> str | dict[str, str]:
    if isinstance(selector, str):
        return selector
    if selector.kind == "topic":
        return selector.value
    return _topic_json(selector)


def _detail(action: str, selectors: Iterable[str | Selector], payload: object) -> dict[str, Any]:
    topics = [{"match": s} if isinstance(s, str) else _topic_json(s) for s in selectors]
    if not topics:
        # The spec requires a non-empty topics list, and hubs reject the whole token.
        raise ValueError(f"a {action} grant needs at least one topic")
    detail: dict[str, Any] = {"type": DETAIL_TYPE, "actions": [action], "topics": topics}
    if payload is not None:
        detail["payload"] = payload
    return detail


def _topic_json(selector: Selector) -> dict[str, str]:
    if selector.kind == "match":
        return {"match": selector.value}
    if selector.kind == "urlpattern":
        return {"match": selector.value, "match_type": "urlpattern"}
    if selector.value == "*":
        return {"match": "*"}
    raise ValueError(f"URI template selector {selector.value!r} has no 1.0 form; use a URL pattern")
