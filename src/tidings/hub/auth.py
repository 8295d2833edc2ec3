"""JWT authorization for the hub: verify a token, turn its claims into matchers.

There is no HTTP in here. The web layer finds the token on a request (`web/access.py`),
passes it to `decode_token`, and asks the resulting `Claims` whether the request may
publish (`may_publish`) or read a private update (`may_read_private`). Failures raise
`Unauthorized` (401, the token itself is bad); deciding that a *valid* token does not
cover a request (403) is the caller's job. Minting tokens is `hub/tokens.py`'s.
"""

# What the Mercure reference material says (read from dunglas/mercure: spec/mercure.md
# draft-dunglas-mercure-08, authorization.go, authorization_deprecated.go,
# authorizationdetails.go, caddy/cmdtoken.go, conformance-tests/mercure.spec.ts):
#
# * 0.x claim (spec drafts <= 07, reference hub 0.x, and the only shape the conformance
#   suite uses: it publishes with an HS256 token, no `exp`, whose payload is
#   `{"mercure": {"publish": ["*"], "subscribe": ["*"]}}`):
#
#       {"mercure": {"publish": [selector, ...],
#                    "subscribe": [selector, ...],
#                    "payload": <any JSON>}}
#
#   Selectors are strings: `*` (every topic), an exact topic, or an RFC 6570 URI template.
#   The reference hub also reads the same object under the namespaced claim
#   `"https://mercure.rocks/"`, which wins when present. Its compatibility build
#   additionally accepts object entries `{"match": ..., "match_type": ...}` in these lists.
#   A missing `publish` grants no publish right; an update may be published only when
#   *every* one of its topics matches a publish selector (`canDispatch`). A private
#   update is readable when *any* of its topics matches a subscribe selector
#   (`canReceive`).
#
# * 1.0 claim (RFC 9396 `authorization_details`, in an RFC 9068 token whose header has
#   `"typ": "at+jwt"`):
#
#       {"authorization_details": [
#           {"type": "https://mercure.rocks/authorization-detail",
#            "actions": ["publish" | "subscribe", ...],          # non-empty
#            "topics": [{"match": "<pattern>",                    # non-empty list
#                        "match_type": "exact" | "urlpattern"}],  # optional, default exact
#            "payload": <JSON object, subscribe details only>}]}
#
#   The key and value spellings moved during the 1.0 drafts. The current reference minter
#   (caddy/cmdtoken.go) writes `"type": "https://mercure.rocks/authorization-detail"` and
#   `"match_type": "urlpattern"`. Draft-08 of the spec and earlier hub code used
#   `"type": "mercure"` and `"matchType": "Exact" | "URLPattern"`. Every one of these
#   spellings is accepted here. A `match` of `*` matches every topic whatever its type.
#   Entries of other `type`s belong to other resource servers and are ignored. One
#   malformed mercure entry, such as a bare-string topic, an unknown action or an unknown
#   match type, rejects the whole token, because partial acceptance is forbidden. A
#   non-empty `authorization_details` takes precedence, and the legacy `mercure` claim
#   is then ignored. A grant covers a topic when a detail with that action has a
#   matching topic. Publishing needs a grant on every topic of the update, which the
#   reference checks with `grantsAll`.
#
# * How a request carries its token: see `token_from_request` in web/access.py.
#
# Decisions taken here where the sources leave room:
#
# * `exp` is optional, because the conformance suite's token has none; when present it is
#   enforced on every call, including when the decoded claims come from the cache.
#   `iat` is not checked, since it carries no validity meaning (the reference hub does not
#   check it either) and checking it only turns clock skew into spurious 401s. `nbf` is
#   enforced.
# * `aud` and `iss` are checked only when `KeyConfig` sets them, and are then required.
# * `typ: at+jwt` is not required. Like the reference hub's compatibility mode, this hub
#   accepts 0.x tokens, and those predate RFC 9068.
# * 1.0 payloads live per subscribe detail. `Claims.payload` is the first non-null one,
#   and the 0.x `mercure.payload` otherwise.

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jwt

from tidings.errors import BadRequest, Unauthorized
from tidings.hub.topics import Matcher, Selector, SelectorKind, compile_selector

__all__ = [
    "DETAIL_TYPE",
    "LEGACY_CLAIM",
    "Claims",
    "KeyConfig",
    "decode_token",
]

# The `type` written by encode_token (hub/tokens.py) and the spellings accepted here.
DETAIL_TYPE = "https://mercure.rocks/authorization-detail"
_DETAIL_TYPES = frozenset({DETAIL_TYPE, "mercure"})
_MATCH_TYPES: Mapping[str, SelectorKind] = {
    "exact": "match",
    "Exact": "match",
    "urlpattern": "urlpattern",
    "URLPattern": "urlpattern",
}
_ACTIONS = frozenset({"publish", "subscribe"})
LEGACY_CLAIM = "mercure"
_LEGACY_NAMESPACED_CLAIM = "https://mercure.rocks/"

# Every selector in a token is compiled at decode time (URL patterns are not free), so the
# count is capped, at the 1000 the reference hub allows in one token.
_MAX_SELECTORS = 1000
# Bounds the parsing work one attacker-supplied string can cause before the signature
# check; real tokens are a few hundred bytes.
_MAX_TOKEN_LENGTH = 64 * 1024
_LEEWAY_S = 0.0
_CACHE_SIZE = 2048
# PyJWT's refusals, a subclass before its base (InvalidSignatureError is a DecodeError),
# and what the client is told; `{error}` is PyJWT's own detail. Others: "invalid token".
_REFUSALS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token has expired"),
    (jwt.ImmatureSignatureError, "token is not valid yet (nbf)"),
    (jwt.InvalidSignatureError, "token signature verification failed"),
    (jwt.InvalidAlgorithmError, "token algorithm is not allowed: {error}"),
    (jwt.InvalidAudienceError, "token audience is wrong: {error}"),
    (jwt.InvalidIssuerError, "token issuer is wrong: {error}"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim: {error}"),
    (jwt.DecodeError, "malformed token: {error}"),
)

# Looked up through the module so tests can move time without sleeping.
_clock: Callable[[], float] = time.time


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """How tokens are verified: one key, one algorithm, optional audience and issuer."""

    key: str  # HMAC secret, or PEM public key (RS*/ES*/PS*/EdDSA)
    algorithm: str = "HS256"
    audience: str | None = None
    issuer: str | None = None


@dataclass(frozen=True)
class Claims:
    """What a verified token allows. Matchers are compiled once, at decode time.

    Treat `payload` as read-only: the same object is shared by every cache hit.
    """

    publish: Matcher | None  # None: no publish rights at all
    subscribe: Matcher | None  # None: no subscribe claim (only public updates)
    payload: object  # the token's payload JSON value, or None
    expires_at: float | None  # exp as unix time, if present
    subject: str | None

    def may_publish(self, topics: Sequence[str]) -> bool:
        """Whether an update with these topics may be published.

        Every topic must be granted (the reference hub's `canDispatch` / `grantsAll`);
        granting one topic must not let a publisher spray private updates onto others.
        An empty topic list is refused: there is nothing it could be authorized for.
        """
        publish = self.publish
        if publish is None or not topics:
            return False
        return all(publish.matches(topic) for topic in topics)

    def may_read_private(self, topics: Sequence[str]) -> bool:
        """Whether a private update with these topics is visible: any topic granted."""
        subscribe = self.subscribe
        return subscribe is not None and subscribe.matches_any(topics)


# --- decoding ----------------------------------------------------------------------


class _ClaimsCache:
    """A bounded LRU of verified claims, so a repeated token skips signature checks.

    Only successes are stored, so a flood of garbage tokens cannot evict good entries
    without first costing a valid signature each. Locked because the hub may decode
    from worker threads as well as from the event loop.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[tuple[str, KeyConfig], Claims] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, cache_key: tuple[str, KeyConfig]) -> Claims | None:
        with self._lock:
            claims = self._entries.get(cache_key)
            if claims is not None:
                self._entries.move_to_end(cache_key)
            return claims

    def put(self, cache_key: tuple[str, KeyConfig], claims: Claims) -> None:
        with self._lock:
            self._entries[cache_key] = claims
            self._entries.move_to_end(cache_key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)

    def discard(self, cache_key: tuple[str, KeyConfig]) -> None:
        with self._lock:
            self._entries.pop(cache_key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_cache = _ClaimsCache(_CACHE_SIZE)


@lru_cache(maxsize=32)
def _verification_key(key: KeyConfig) -> Any:
    """Parse the configured key once per KeyConfig rather than once per token.

    A bad key is a configuration error, not a bad token, so it raises ValueError
    (a 500) instead of telling every client that its token is invalid.
    """
    if key.algorithm.lower() == "none":
        raise ValueError('the "none" algorithm cannot be configured: tokens must be signed')
    algorithms = jwt.algorithms.get_default_algorithms()
    if key.algorithm not in algorithms:
        raise ValueError(f"unsupported JWT algorithm {key.algorithm!r}")
    try:
        # PyJWT's HMAC prepare_key refuses PEM material, which closes the classic
        # "verify an HS256 token with the RSA public key as secret" confusion attack.
        return algorithms[key.algorithm].prepare_key(key.key)
    except (jwt.InvalidKeyError, ValueError, TypeError) as e:
        raise ValueError(f"the configured {key.algorithm} key is unusable: {e}") from e


def _is_expired(expires_at: float | None, now: float) -> bool:
    # Same boundary as PyJWT: a token is dead at its exp second.
    return expires_at is not None and expires_at <= now - _LEEWAY_S


def _refusal(error: jwt.PyJWTError) -> str:
    """What the client is told about a token PyJWT refused."""
    for kind, message in _REFUSALS:
        if isinstance(error, kind):
            return message.format(error=error)
    return f"invalid token: {error}"


def decode_token(token: str, key: KeyConfig) -> Claims:
    """Verify `token` with `key` and return what it allows.

    Raises Unauthorized for a malformed token, an algorithm other than
    `key.algorithm` (including "none"), a bad signature, an expired or not-yet-valid
    token, a wrong audience or issuer (when configured) and claims of the wrong shape.
    Raises ValueError when `key` itself is unusable.
    """
    if not isinstance(token, str) or not token:
        raise Unauthorized("no token")
    if len(token) > _MAX_TOKEN_LENGTH:
        raise Unauthorized("malformed token: too long")

    cache_key = (token, key)
    cached = _cache.get(cache_key)
    if cached is not None:
        if _is_expired(cached.expires_at, _clock()):
            _cache.discard(cache_key)
            raise Unauthorized("token has expired")
        return cached

    verification_key = _verification_key(key)
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as e:
        raise Unauthorized(f"malformed token: {e}") from e
    alg = header.get("alg")
    if alg != key.algorithm:
        # Checked before PyJWT (which would refuse it too) only to say clearly why.
        raise Unauthorized(f"token algorithm {alg!r} is not the configured {key.algorithm!r}")

    try:
        payload = jwt.decode(
            token,
            verification_key,
            algorithms=[key.algorithm],
            audience=key.audience,
            issuer=key.issuer,
            leeway=_LEEWAY_S,
            options={"verify_aud": key.audience is not None, "verify_iat": False},
        )
    except jwt.PyJWTError as e:
        raise Unauthorized(_refusal(e)) from e

    claims = _claims_from_payload(payload)
    # PyJWT checked exp against its own clock; re-check against ours so a token that
    # expired in between is never cached, and the cache and first decode agree.
    if _is_expired(claims.expires_at, _clock()):
        raise Unauthorized("token has expired")
    _cache.put(cache_key, claims)
    return claims


def _claims_from_payload(payload: Mapping[str, Any]) -> Claims:
    """Turn a verified JWT payload into Claims, rejecting any malformed Mercure claim."""
    exp = payload.get("exp")
    # PyJWT has already refused a non-numeric exp; bool is excluded since it is an int.
    expires_at = None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        try:
            expires_at = float(exp)
        except OverflowError:  # an integer beyond any date a float can hold
            raise Unauthorized('the "exp" claim is out of range') from None
    sub = payload.get("sub")
    if sub is not None and not isinstance(sub, str):
        raise Unauthorized('the "sub" claim must be a string')

    budget = _SelectorBudget()
    details = payload.get("authorization_details")
    if details is not None and not isinstance(details, list):
        raise Unauthorized('the "authorization_details" claim must be an array')
    if details:
        publish, subscribe, grant_payload = _from_authorization_details(details, budget)
    else:
        legacy = payload.get(_LEGACY_NAMESPACED_CLAIM)
        if legacy is None:
            legacy = payload.get(LEGACY_CLAIM)
        publish, subscribe, grant_payload = _from_mercure_claim(legacy, budget)

    return Claims(
        publish=publish,
        subscribe=subscribe,
        payload=grant_payload,
        expires_at=expires_at,
        subject=sub,
    )


class _SelectorBudget:
    """Counts the selectors compiled for one token against _MAX_SELECTORS."""

    def __init__(self) -> None:
        self.used = 0

    def compile(self, value: str, kind: SelectorKind) -> Selector:
        self.used += 1
        if self.used > _MAX_SELECTORS:
            raise Unauthorized(f"token carries more than {_MAX_SELECTORS} topic selectors")
        try:
            return compile_selector(value, kind)
        except BadRequest as e:
            # A selector that cannot compile is a defect of the token (invalid_token),
            # not of the request, so it is a 401 rather than a 400.
            raise Unauthorized(f"invalid topic selector {value!r} in token: {e.message}") from e


def _from_mercure_claim(
    claim: object, budget: _SelectorBudget
) -> tuple[Matcher | None, Matcher | None, object]:
    """The 0.x `mercure` claim: {"publish": [...], "subscribe": [...], "payload": ...}."""
    if claim is None:
        return None, None, None
    if not isinstance(claim, dict):
        raise Unauthorized('the "mercure" claim must be an object')
    publish = _legacy_selectors(claim.get("publish"), "publish", budget)
    subscribe = _legacy_selectors(claim.get("subscribe"), "subscribe", budget)
    return publish, subscribe, claim.get("payload")


def _legacy_selectors(value: object, name: str, budget: _SelectorBudget) -> Matcher | None:
    # null is how Go's reference hub sees an absent list, so it means "no right" too.
    if value is None:
        return None
    if not isinstance(value, list):
        raise Unauthorized(f'"mercure.{name}" must be an array of topic selectors')
    selectors: list[Selector] = []
    for entry in value:
        if isinstance(entry, str):
            if not entry:
                raise Unauthorized(f'"mercure.{name}" contains an empty selector')
            # Bare strings keep their 0.x meaning: exact topic, URI template or "*".
            selectors.append(budget.compile(entry, "topic"))
        elif isinstance(entry, dict):
            selectors.append(_topic_object(entry, f"mercure.{name}", budget))
        else:
            raise Unauthorized(f'"mercure.{name}" entries must be strings')
    return Matcher(selectors)


def _from_authorization_details(
    details: list[Any], budget: _SelectorBudget
) -> tuple[Matcher | None, Matcher | None, object]:
    """The 1.0 RFC 9396 claim; see the module docstring for the accepted shape."""
    publish: list[Selector] | None = None
    subscribe: list[Selector] | None = None
    grant_payload: object = None
    for detail in details:
        if not isinstance(detail, dict):
            raise Unauthorized('"authorization_details" entries must be objects')
        detail_type = detail.get("type")
        if not isinstance(detail_type, str):
            raise Unauthorized('an "authorization_details" entry lacks a string "type"')
        if detail_type not in _DETAIL_TYPES:
            continue  # another resource server's grant (RFC 9396 section 2)

        actions = detail.get("actions")
        if not isinstance(actions, list) or not actions:
            raise Unauthorized('a mercure authorization detail needs a non-empty "actions"')
        for action in actions:
            if action not in _ACTIONS:
                raise Unauthorized(f"unsupported mercure authorization action {action!r}")

        topics = detail.get("topics")
        if not isinstance(topics, list) or not topics:
            raise Unauthorized('a mercure authorization detail needs a non-empty "topics"')
        selectors: list[Selector] = []
        for topic in topics:
            if not isinstance(topic, dict):
                # Bare strings are the 0.x shape; accepting them here would silently
                # change their meaning (URI template vs exact), so the token is refused.
                raise Unauthorized('"topics" entries must be objects like {"match": "..."}')
            selectors.append(_topic_object(topic, "authorization_details.topics", budget))

        if "publish" in actions:
            publish = [*(publish or ()), *selectors]
        if "subscribe" in actions:
            subscribe = [*(subscribe or ()), *selectors]
            if grant_payload is None:
                grant_payload = detail.get("payload")

    return (
        None if publish is None else Matcher(publish),
        None if subscribe is None else Matcher(subscribe),
        grant_payload,
    )


def _topic_object(entry: Mapping[str, Any], where: str, budget: _SelectorBudget) -> Selector:
    """Compile a {"match": ..., "match_type"/"matchType": ...} topic matcher object."""
    match = entry.get("match")
    if not isinstance(match, str) or not match:
        raise Unauthorized(f'a topic in "{where}" needs a non-empty string "match"')
    kinds = {
        _match_kind(entry[name], where) for name in ("match_type", "matchType") if name in entry
    }
    if len(kinds) > 1:
        raise Unauthorized(f'a topic in "{where}" has conflicting match types')
    kind: SelectorKind = kinds.pop() if kinds else "match"
    return budget.compile(match, kind)


def _match_kind(value: object, where: str) -> SelectorKind:
    kind = _MATCH_TYPES.get(value) if isinstance(value, str) else None
    if kind is None:
        raise Unauthorized(f'unsupported match type {value!r} in "{where}"')
    return kind
