"""Tests for tidings.hub.auth: token verification, claim shapes, selector semantics (with
tokens minted by tidings.hub.tokens)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tidings.errors import Unauthorized
from tidings.hub import auth
from tidings.hub.auth import Claims, KeyConfig, decode_token
from tidings.hub.tokens import encode_token
from tidings.hub.topics import compile_selector

# At least 32 bytes: PyJWT warns about shorter HMAC keys, and warnings are errors here.
SECRET = "test-secret-that-is-long-enough-for-hs256!"
KEY = KeyConfig(SECRET)


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    # The decode cache is process-wide; isolate tests from each other's tokens.
    auth._cache.clear()
    yield
    auth._cache.clear()


def _sign(claims: dict[str, Any], *, key: str = SECRET, **headers: Any) -> str:
    return jwt.encode(claims, key, algorithm="HS256", headers=headers or None)


def _b64(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def rsa_pems() -> tuple[str, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private_pem, public_pem


# --- happy paths ---------------------------------------------------------------------


def test_hs256_mercure_claim_round_trip() -> None:
    token = encode_token(
        SECRET,
        publish=["https://example.com/books/{id}"],
        subscribe=["https://example.com/users/1"],
        payload={"user": "https://example.com/users/1"},
        expires_in_s=3600,
    )
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["mercure"] == {
        "publish": ["https://example.com/books/{id}"],
        "subscribe": ["https://example.com/users/1"],
        "payload": {"user": "https://example.com/users/1"},
    }
    claims = decode_token(token, KEY)
    assert claims.may_publish(["https://example.com/books/1"])
    assert not claims.may_publish(["https://example.com/users/1"])
    assert claims.may_read_private(["https://example.com/users/1"])
    assert not claims.may_read_private(["https://example.com/books/1"])
    assert claims.payload == {"user": "https://example.com/users/1"}
    assert claims.expires_at is not None and claims.expires_at > time.time()
    assert claims.subject is None


def test_conformance_suite_token_is_accepted() -> None:
    # The exact token dunglas/mercure's conformance suite publishes with: HS256, no typ,
    # no exp, {"mercure": {"publish": ["*"], "subscribe": ["*"]}}, signed with the
    # reference hub's default key.
    token = (
        "eyJhbGciOiJIUzI1NiJ9.eyJtZXJjdXJlIjp7InB1Ymxpc2giOlsiKiJdLCJzdWJzY3JpYmUiOlsiKiJdfX0"
        ".bVXdlWXwfw9ySx7-iV5OpUSHo34RkjUdVzDLBcc6l_g"
    )
    claims = decode_token(token, KeyConfig("!ChangeThisMercureHubJWTSecretKey!"))
    assert claims.expires_at is None
    assert claims.payload is None
    assert claims.may_publish(["anything", "https://example.net/foo/bar"])
    assert claims.may_read_private(["anything"])


def test_hs256_authorization_details_round_trip() -> None:
    token = encode_token(
        SECRET,
        publish=["https://example.com/books/1"],
        subscribe=[
            "https://example.com/users/42",
            compile_selector("https://example.com/books/:id", "urlpattern"),
        ],
        payload={"user": "https://example.com/users/42"},
        expires_in_s=60,
        style="authorization_details",
    )
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    body = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert "mercure" not in body
    assert body["authorization_details"] == [
        {
            "type": "https://mercure.rocks/authorization-detail",
            "actions": ["publish"],
            "topics": [{"match": "https://example.com/books/1"}],
        },
        {
            "type": "https://mercure.rocks/authorization-detail",
            "actions": ["subscribe"],
            "topics": [
                {"match": "https://example.com/users/42"},
                {"match": "https://example.com/books/:id", "match_type": "urlpattern"},
            ],
            "payload": {"user": "https://example.com/users/42"},
        },
    ]
    claims = decode_token(token, KEY)
    assert claims.may_publish(["https://example.com/books/1"])
    assert not claims.may_publish(["https://example.com/books/2"])
    assert claims.may_read_private(["https://example.com/users/42"])
    assert claims.may_read_private(["https://example.com/books/7"])
    assert not claims.may_read_private(["https://example.com/users/43"])
    assert claims.payload == {"user": "https://example.com/users/42"}


@pytest.mark.parametrize(
    ("detail_type", "type_key", "urlpattern"),
    [
        ("https://mercure.rocks/authorization-detail", "match_type", "urlpattern"),
        ("mercure", "match_type", "urlpattern"),
        ("mercure", "matchType", "URLPattern"),
    ],
)
def test_authorization_details_spellings_from_the_drafts(
    detail_type: str, type_key: str, urlpattern: str
) -> None:
    token = _sign(
        {
            "sub": "urn:uuid:1",
            "authorization_details": [
                {"type": "openid_credential", "topics": "not ours, not checked"},
                {
                    "type": detail_type,
                    "actions": ["subscribe", "publish"],
                    "topics": [
                        {"match": "https://example.com/users/42", type_key: "Exact"}
                        if type_key == "matchType"
                        else {"match": "https://example.com/users/42"},
                        {"match": "https://example.com/books/:id", type_key: urlpattern},
                    ],
                },
            ],
        },
        typ="at+jwt",
    )
    claims = decode_token(token, KEY)
    assert claims.subject == "urn:uuid:1"
    assert claims.may_publish(["https://example.com/books/3", "https://example.com/users/42"])
    assert claims.may_read_private(["https://example.com/books/3"])
    # An exact matcher is byte-for-byte: braces are not a template in 1.0.
    assert not claims.may_read_private(["https://example.com/users/420"])


def test_rs256_with_generated_key_pair(rsa_pems: tuple[str, str]) -> None:
    private_pem, public_pem = rsa_pems
    token = encode_token(private_pem, algorithm="RS256", subscribe=["*"], expires_in_s=60)
    claims = decode_token(token, KeyConfig(public_pem, algorithm="RS256"))
    assert claims.may_read_private(["https://example.com/anything"])
    assert claims.publish is None
    # Signed by a different private key: refused.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode({"mercure": {"subscribe": ["*"]}}, other, algorithm="RS256")
    with pytest.raises(Unauthorized, match="signature"):
        decode_token(forged, KeyConfig(public_pem, algorithm="RS256"))


def test_hs256_token_signed_with_the_rsa_public_key_is_refused(rsa_pems: tuple[str, str]) -> None:
    # Algorithm confusion: the attacker knows the public key and uses it as an HMAC secret.
    _, public_pem = rsa_pems
    signing_input = (
        f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64({'mercure': {'publish': ['*']}})}"
    )
    mac = hmac.new(public_pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    with pytest.raises(Unauthorized, match="'HS256' is not the configured 'RS256'"):
        decode_token(token, KeyConfig(public_pem, algorithm="RS256"))
    # Configuring HS256 with a PEM key is a configuration error, not a token error.
    with pytest.raises(ValueError, match="unusable"):
        decode_token(token, KeyConfig(public_pem, algorithm="HS256"))


# --- refusals ------------------------------------------------------------------------


def test_alg_none_is_refused() -> None:
    body = _b64({"mercure": {"publish": ["*"], "subscribe": ["*"]}})
    for alg in ("none", "None", "NONE"):
        with pytest.raises(Unauthorized, match="algorithm"):
            decode_token(f"{_b64({'alg': alg, 'typ': 'JWT'})}.{body}.", KEY)
    with pytest.raises(ValueError, match="none"):
        decode_token(_sign({}), KeyConfig(SECRET, algorithm="none"))
    with pytest.raises(ValueError, match="none"):
        encode_token(SECRET, publish=["*"], algorithm="none")


def test_other_algorithm_than_configured_is_refused() -> None:
    # Long enough for HS512, so PyJWT does not warn while minting it.
    token = jwt.encode({"mercure": {"publish": ["*"]}}, SECRET * 2, algorithm="HS512")
    with pytest.raises(Unauthorized, match="'HS512' is not the configured 'HS256'"):
        decode_token(token, KEY)


def test_wrong_signature_is_refused() -> None:
    token = encode_token("another-secret-that-is-long-enough-too!!", publish=["*"])
    with pytest.raises(Unauthorized, match="signature"):
        decode_token(token, KEY)
    # Tampering with the claims of a genuine token breaks the signature as well.
    header, _, signature = encode_token(SECRET, subscribe=["a"]).split(".")
    tampered = f"{header}.{_b64({'mercure': {'subscribe': ['*']}})}.{signature}"
    with pytest.raises(Unauthorized, match="signature"):
        decode_token(tampered, KEY)


@pytest.mark.parametrize("token", ["", "abc", "a.b", "a.b.c", "...", "x" * 70_000])
def test_malformed_token_is_refused(token: str) -> None:
    with pytest.raises(Unauthorized):
        decode_token(token, KEY)


def test_expired_token_is_refused() -> None:
    token = encode_token(SECRET, subscribe=["*"], expires_in_s=-10)
    with pytest.raises(Unauthorized, match="expired"):
        decode_token(token, KEY)


def test_not_yet_valid_token_is_refused() -> None:
    token = _sign({"nbf": int(time.time()) + 3600, "mercure": {"subscribe": ["*"]}})
    with pytest.raises(Unauthorized, match="not valid yet"):
        decode_token(token, KEY)


def test_issued_in_the_future_is_tolerated() -> None:
    # iat carries no validity meaning; a minting clock slightly ahead must not break auth.
    token = _sign({"iat": int(time.time()) + 30, "mercure": {"subscribe": ["*"]}})
    assert decode_token(token, KEY).may_read_private(["x"])


def test_audience_checked_only_when_configured() -> None:
    with_aud = encode_token(SECRET, subscribe=["*"], audience="https://hub.example.com")
    without_aud = encode_token(SECRET, subscribe=["*"])
    # Not configured: any aud, or none, is fine.
    assert decode_token(with_aud, KEY).subscribe is not None
    assert decode_token(without_aud, KEY).subscribe is not None
    configured = KeyConfig(SECRET, audience="https://hub.example.com")
    assert decode_token(with_aud, configured).subscribe is not None
    with pytest.raises(Unauthorized, match="aud"):
        decode_token(without_aud, configured)
    with pytest.raises(Unauthorized, match="audience"):
        decode_token(with_aud, KeyConfig(SECRET, audience="https://other.example.com"))
    # aud may be an array (RFC 7519); membership is enough.
    listed = _sign({"aud": ["https://a.example", "https://hub.example.com"]})
    assert decode_token(listed, configured).publish is None


def test_issuer_checked_only_when_configured() -> None:
    with_iss = encode_token(SECRET, publish=["*"], issuer="https://example.com")
    without_iss = encode_token(SECRET, publish=["*"])
    assert decode_token(with_iss, KEY).may_publish(["t"])
    assert decode_token(without_iss, KEY).may_publish(["t"])
    configured = KeyConfig(SECRET, issuer="https://example.com")
    assert decode_token(with_iss, configured).may_publish(["t"])
    with pytest.raises(Unauthorized, match="iss"):
        decode_token(without_iss, configured)
    with pytest.raises(Unauthorized, match="issuer"):
        decode_token(with_iss, KeyConfig(SECRET, issuer="https://evil.example"))


@pytest.mark.parametrize(
    "claims",
    [
        {"mercure": ["*"]},
        {"mercure": "publish"},
        {"mercure": {"publish": "*"}},
        {"mercure": {"publish": {"0": "*"}}},
        {"mercure": {"subscribe": "https://example.com/a"}},
        {"mercure": {"subscribe": [1, 2]}},
        {"mercure": {"subscribe": [None]}},
        {"mercure": {"publish": [""]}},
        {"mercure": {"publish": [{"topic": "x"}]}},
        {"https://mercure.rocks/": {"publish": "*"}},
        {"sub": 42},
        {"authorization_details": {"type": "mercure"}},
        {"authorization_details": ["mercure"]},
        {"authorization_details": [{"actions": ["publish"], "topics": [{"match": "*"}]}]},
        {"authorization_details": [{"type": "mercure", "topics": [{"match": "*"}]}]},
        {"authorization_details": [{"type": "mercure", "actions": [], "topics": [{"match": "*"}]}]},
        {
            "authorization_details": [
                {"type": "mercure", "actions": ["admin"], "topics": [{"match": "*"}]}
            ]
        },
        {
            "authorization_details": [
                {"type": "mercure", "actions": "publish", "topics": [{"match": "*"}]}
            ]
        },
        {"authorization_details": [{"type": "mercure", "actions": ["publish"]}]},
        {"authorization_details": [{"type": "mercure", "actions": ["publish"], "topics": []}]},
        # Bare strings are the 0.x shape and must not parse as exact matchers.
        {"authorization_details": [{"type": "mercure", "actions": ["publish"], "topics": ["*"]}]},
        {"authorization_details": [{"type": "mercure", "actions": ["publish"], "topics": [{}]}]},
        {
            "authorization_details": [
                {"type": "mercure", "actions": ["publish"], "topics": [{"match": ""}]}
            ]
        },
        {
            "authorization_details": [
                {"type": "mercure", "actions": ["publish"], "topics": [{"match": None}]}
            ]
        },
        {
            "authorization_details": [
                {
                    "type": "mercure",
                    "actions": ["publish"],
                    "topics": [{"match": "a", "match_type": "regex"}],
                }
            ]
        },
        {
            "authorization_details": [
                {
                    "type": "mercure",
                    "actions": ["publish"],
                    "topics": [{"match": "a", "match_type": "exact", "matchType": "URLPattern"}],
                }
            ]
        },
        # One bad mercure detail rejects the token even next to a good one.
        {
            "authorization_details": [
                {"type": "mercure", "actions": ["subscribe"], "topics": [{"match": "*"}]},
                {"type": "mercure", "actions": ["publish"], "topics": "*"},
            ]
        },
    ],
)
def test_claims_of_the_wrong_shape_are_refused(claims: dict[str, Any]) -> None:
    with pytest.raises(Unauthorized):
        decode_token(_sign(claims), KEY)


def test_too_many_selectors_are_refused() -> None:
    token = encode_token(SECRET, subscribe=[f"https://example.com/{i}" for i in range(1001)])
    with pytest.raises(Unauthorized, match="more than 1000"):
        decode_token(token, KEY)


def test_uncompilable_selector_is_unauthorized_not_bad_request() -> None:
    detail = {
        "type": "mercure",
        "actions": ["subscribe"],
        "topics": [{"match": "https://example.com/(unclosed", "match_type": "urlpattern"}],
    }
    with pytest.raises(Unauthorized, match="invalid topic selector"):
        decode_token(_sign({"authorization_details": [detail]}), KEY)


# --- claim semantics -----------------------------------------------------------------


def test_no_mercure_claim_grants_nothing() -> None:
    claims = decode_token(_sign({"sub": "someone"}), KEY)
    assert claims.publish is None and claims.subscribe is None and claims.payload is None
    assert not claims.may_publish(["a"])
    assert not claims.may_read_private(["a"])


def test_null_and_empty_lists() -> None:
    claims = decode_token(_sign({"mercure": {"publish": None, "subscribe": []}}), KEY)
    assert claims.publish is None
    assert claims.subscribe is not None
    assert not claims.may_read_private(["a"])


def test_publish_requires_every_topic_read_private_requires_any() -> None:
    claims = decode_token(
        encode_token(
            SECRET, publish=["https://example.com/a"], subscribe=["https://example.com/a"]
        ),
        KEY,
    )
    assert claims.may_publish(["https://example.com/a"])
    assert not claims.may_publish(["https://example.com/a", "https://example.com/b"])
    assert not claims.may_publish([])
    assert claims.may_read_private(["https://example.com/b", "https://example.com/a"])
    assert not claims.may_read_private(["https://example.com/b"])
    assert not claims.may_read_private([])


def test_star_matches_every_topic() -> None:
    claims = decode_token(encode_token(SECRET, publish=["*"], subscribe=["*"]), KEY)
    topics = ["https://example.com/a", "urn:isbn:1", "/relative", "plain string"]
    assert claims.may_publish(topics)
    assert claims.may_read_private(topics)
    details = decode_token(encode_token(SECRET, publish=["*"], style="authorization_details"), KEY)
    assert details.may_publish(topics)
    assert details.subscribe is None


def test_uri_template_selectors_in_the_mercure_claim() -> None:
    claims = decode_token(
        encode_token(
            SECRET,
            publish=["https://example.com/books/{id}"],
            subscribe=["https://example.com/users/{user}/books/{id}", "raw-string"],
        ),
        KEY,
    )
    assert claims.may_publish(["https://example.com/books/42"])
    assert not claims.may_publish(["https://example.com/books/42/reviews/1"])
    assert not claims.may_publish(["https://example.com/authors/42"])
    assert claims.may_read_private(["https://example.com/users/7/books/42"])
    assert claims.may_read_private(["raw-string"])
    assert not claims.may_read_private(["raw-string-2"])


def test_namespaced_claim_wins_over_mercure_claim() -> None:
    token = _sign(
        {"mercure": {"publish": ["*"]}, "https://mercure.rocks/": {"publish": ["only-this"]}}
    )
    claims = decode_token(token, KEY)
    assert claims.may_publish(["only-this"])
    assert not claims.may_publish(["other"])


def test_authorization_details_win_over_mercure_claim() -> None:
    token = _sign(
        {
            "mercure": {"publish": ["*"], "subscribe": ["*"]},
            "authorization_details": [
                {"type": "mercure", "actions": ["subscribe"], "topics": [{"match": "a"}]}
            ],
        }
    )
    claims = decode_token(token, KEY)
    assert claims.publish is None
    assert claims.may_read_private(["a"]) and not claims.may_read_private(["b"])
    # An empty array carries nothing, so the 0.x claim still applies.
    fallback = decode_token(
        _sign({"mercure": {"publish": ["*"]}, "authorization_details": []}), KEY
    )
    assert fallback.may_publish(["x"])


def test_only_foreign_authorization_details_grant_nothing() -> None:
    token = _sign(
        {
            "mercure": {"publish": ["*"]},
            "authorization_details": [{"type": "payment_initiation", "actions": ["pay"]}],
        }
    )
    claims = decode_token(token, KEY)
    assert claims.publish is None and claims.subscribe is None


def test_payload_is_the_first_subscribe_detail_payload() -> None:
    token = _sign(
        {
            "authorization_details": [
                {
                    "type": "mercure",
                    "actions": ["publish"],
                    "topics": [{"match": "*"}],
                    "payload": 0,
                },
                {"type": "mercure", "actions": ["subscribe"], "topics": [{"match": "a"}]},
                {
                    "type": "mercure",
                    "actions": ["subscribe"],
                    "topics": [{"match": "b"}],
                    "payload": {"n": 2},
                },
                {
                    "type": "mercure",
                    "actions": ["subscribe"],
                    "topics": [{"match": "*"}],
                    "payload": {"n": 3},
                },
            ]
        }
    )
    claims = decode_token(token, KEY)
    assert claims.payload == {"n": 2}
    assert claims.may_publish(["z"]) and claims.may_read_private(["z"])


def test_mercure_claim_object_entries() -> None:
    token = _sign(
        {
            "mercure": {
                "publish": [{"match": "https://example.com/books/{id}"}],
                "subscribe": [
                    {"match": "https://example.com/books/:id", "match_type": "urlpattern"}
                ],
            }
        }
    )
    claims = decode_token(token, KEY)
    # An object entry is an exact matcher: braces are literal, not a URI template.
    assert claims.may_publish(["https://example.com/books/{id}"])
    assert not claims.may_publish(["https://example.com/books/1"])
    assert claims.may_read_private(["https://example.com/books/1"])


def test_encode_mercure_style_with_selectors() -> None:
    token = encode_token(
        SECRET,
        subscribe=[
            compile_selector("https://example.com/{id}", "topic"),
            compile_selector("https://example.com/x", "match"),
            compile_selector("https://example.com/:id", "urlpattern"),
        ],
    )
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["mercure"] == {
        "subscribe": [
            "https://example.com/{id}",
            {"match": "https://example.com/x"},
            {"match": "https://example.com/:id", "match_type": "urlpattern"},
        ]
    }


def test_encode_refuses_what_has_no_1_0_form() -> None:
    with pytest.raises(ValueError, match="URI template"):
        encode_token(
            SECRET,
            subscribe=[compile_selector("https://example.com/{id}", "topic")],
            style="authorization_details",
        )
    with pytest.raises(ValueError, match="at least one topic"):
        encode_token(SECRET, publish=[], style="authorization_details")


# --- caching -------------------------------------------------------------------------


def test_repeated_token_is_served_from_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    token = encode_token(SECRET, subscribe=["*"], expires_in_s=3600)
    first = decode_token(token, KEY)

    def no_reverify(*args: object, **kwargs: object) -> object:
        raise AssertionError("the signature was verified again")

    monkeypatch.setattr(jwt, "decode", no_reverify)
    assert decode_token(token, KEY) is first
    # A different key configuration is a different cache entry.
    with pytest.raises(AssertionError):
        decode_token(token, KeyConfig(SECRET, audience="https://hub.example.com"))


def test_cached_token_is_refused_after_its_exp(monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    token = encode_token(SECRET, subscribe=["*"], expires_in_s=60)
    assert decode_token(token, KEY).may_read_private(["x"])
    monkeypatch.setattr(auth, "_clock", lambda: now + 3600)
    with pytest.raises(Unauthorized, match="expired"):
        decode_token(token, KEY)
    assert len(auth._cache) == 0


def test_failures_are_not_cached() -> None:
    token = encode_token("another-secret-that-is-long-enough-too!!", publish=["*"])
    for _ in range(2):
        with pytest.raises(Unauthorized):
            decode_token(token, KEY)
    assert len(auth._cache) == 0


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_cache", auth._ClaimsCache(3))
    tokens = [encode_token(SECRET, subscribe=[f"t{i}"]) for i in range(5)]
    for token in tokens:
        decode_token(token, KEY)
    assert len(auth._cache) == 3
    assert auth._cache.get((tokens[0], KEY)) is None
    assert auth._cache.get((tokens[4], KEY)) is not None


def test_claims_is_frozen() -> None:
    claims = decode_token(encode_token(SECRET, publish=["*"]), KEY)
    assert isinstance(claims, Claims)
    with pytest.raises(AttributeError):
        claims.publish = None  # type: ignore[misc]
