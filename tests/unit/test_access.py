"""Tests for tidings.web.access: where a request carries its token."""

from __future__ import annotations

import pytest

from tidings.errors import Unauthorized
from tidings.hub.auth import KeyConfig, decode_token
from tidings.hub.tokens import encode_token
from tidings.web.access import token_from_request

# At least 32 bytes: PyJWT warns about shorter HMAC keys, and warnings are errors here.
SECRET = "test-secret-that-is-long-enough-for-hs256!"
KEY = KeyConfig(SECRET)


def test_token_precedence() -> None:
    cookies = {"__Secure-mercure_access_token": "c1", "mercureAuthorization": "c0"}
    query = {"authorization": "q"}
    assert token_from_request({"authorization": "Bearer h.h.h"}, cookies, query) == "h.h.h"
    assert token_from_request({}, cookies, query) == "q"
    assert token_from_request({}, cookies, {}) == "c1"
    assert token_from_request({}, {"mercureAuthorization": "c0"}, {}) == "c0"
    assert token_from_request({"accept": "text/event-stream"}, {}, {}) is None
    # Empty values are absent, not tokens.
    assert (
        token_from_request({}, {"__Secure-mercure_access_token": ""}, {"authorization": ""}) is None
    )
    # The 1.0 query parameter name is not a Mercure token transport here.
    assert token_from_request({}, {}, {"access_token": "x"}) is None


@pytest.mark.parametrize(
    "value", ["bearer a.b.c", "BEARER a.b.c", "Bearer   a.b.c", "Bearer a.b.c "]
)
def test_bearer_scheme_is_case_insensitive(value: str) -> None:
    assert token_from_request({"authorization": value}, {}, {}) == "a.b.c"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token a.b.c",
        "a.b.c",
        "Bearer a b",
        "Bearer\ta.b.c",
    ],
)
def test_malformed_authorization_header(value: str) -> None:
    cookies = {"__Secure-mercure_access_token": "c1"}
    # A bad header never falls back to the cookie: the client meant to use the header.
    with pytest.raises(Unauthorized, match="Authorization header"):
        token_from_request({"authorization": value}, cookies, {})


def test_full_flow_from_request() -> None:
    token = encode_token(SECRET, publish=["https://example.com/a"], style="authorization_details")
    found = token_from_request({"authorization": f"Bearer {token}"}, {}, {})
    assert found == token
    assert decode_token(found, KEY).may_publish(["https://example.com/a"])
