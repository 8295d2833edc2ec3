"""Values that used to reach storage or arithmetic unchecked, each now a clear 4xx.

Every case here was a 500 (an OverflowError from SQLite, a RecursionError from `json`,
an int() of thousands of digits) or a misleading answer; tests/integration/test_fuzz.py
looks for more. One server (hub, collections, chat) serves the whole module.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import KEY, PUBLISHER, HubProcess, open_stream, publish
from tidings.feeds.query import encode_cursor
from tidings.hub.update import MAX_ID_LENGTH, MAX_RETRY_MS

CONFIG = """
[collections.notes]
read = "public"
write = "anyone"

[tables.orders]
key = "id"
read = "public"
"""
HUB = "/.well-known/mercure"
FORM = {"Authorization": f"Bearer {PUBLISHER}",
        "Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    workdir = tmp_path_factory.mktemp("limits")
    with sqlite3.connect(workdir / "tidings.db") as db:
        db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT, qty INTEGER)")
    db.close()
    (workdir / "tidings.toml").write_text(CONFIG)
    hub = HubProcess(workdir, "--config", str(workdir / "tidings.toml")).start()
    try:
        yield hub
    finally:
        hub.stop()
        assert "Traceback" not in hub.log(), hub.log()[-4000:]


@pytest.fixture
def client(server: HubProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def _publish(client: httpx.Client, **fields: str) -> httpx.Response:
    form = {"topic": "/limits", "data": "x", **fields}
    return client.post(HUB, content=str(httpx.QueryParams(form)), headers=FORM)


def _error(reply: httpx.Response, status: int) -> str:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    message = reply.json()["error"]
    assert isinstance(message, str)
    return message


# -- the hub ---------------------------------------------------------------------------------


@pytest.mark.parametrize("retry", ["1000000000000000000000000000000", "9" * 5000,
                                   str(MAX_RETRY_MS + 1)])
def test_a_retry_the_hub_cannot_store_is_400_stating_the_limit(
        client: httpx.Client, retry: str) -> None:
    assert str(MAX_RETRY_MS) in _error(_publish(client, retry=retry), 400)


@pytest.mark.anyio
async def test_the_largest_retry_is_stored_and_sent(server: HubProcess) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        reply = await publish(client, server.url, "/limits/retry", "x", retry=str(MAX_RETRY_MS))
        assert reply.status_code == 200
        async with open_stream(client, server.url, [("topic", "/limits/retry"),
                                                    ("lastEventID", "earliest")]) as stream:
            assert (await stream.next()).retry == MAX_RETRY_MS


def test_an_update_id_longer_than_the_limit_is_400(client: httpx.Client) -> None:
    assert "longer than" in _error(_publish(client, id="x" * (MAX_ID_LENGTH + 1)), 400)
    assert _publish(client, id="y" * MAX_ID_LENGTH).status_code == 200


def test_data_holding_nul_is_400_on_every_transport(client: httpx.Client) -> None:
    # PostgreSQL's text cannot store it: a 503 there, stored here, before this was refused.
    assert "NUL" in _error(_publish(client, data="a\0b"), 400)


@pytest.mark.parametrize(("where", "value"), [
    ("header", "x" * (MAX_ID_LENGTH + 1)),
    ("query", "x" * (MAX_ID_LENGTH + 1)),
    ("query", "a\0b"),
])
def test_a_last_event_id_no_update_can_have_is_400(
        client: httpx.Client, where: str, value: str) -> None:
    params = {"topic": "/limits"}
    headers = {}
    if where == "header":
        headers["Last-Event-ID"] = value
    else:
        params["lastEventID"] = value
    assert "Last-Event-ID" in _error(client.get(HUB, params=params, headers=headers), 400)


def _signed(payload: str) -> str:
    """An HS256 token whose payload is this exact JSON text (numbers PyJWT cannot make)."""
    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    head = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(payload.encode())
    signature = b64(hmac.new(KEY.encode(), head, hashlib.sha256).digest())
    return (head + b"." + signature).decode()


@pytest.mark.parametrize("exp", ["1" + "0" * 400, "1e400"])
def test_a_token_expiring_beyond_any_date_is_401(client: httpx.Client, exp: str) -> None:
    claims = '"mercure": {"publish": ["*"], "subscribe": ["*"]}'
    bad = _signed(f'{{"exp": {exp}, {claims}}}')
    message = _error(client.get(HUB, params={"topic": "/limits"},
                                headers={"Authorization": f"Bearer {bad}"}), 401)
    assert "exp" in message
    reply = client.post(HUB, content="topic=/limits&data=x", headers={
        **FORM, "Authorization": f"Bearer {bad}"})
    assert _error(reply, 401) == message


def test_routes_that_do_not_exist_answer_json_errors(client: httpx.Client) -> None:
    _error(client.get("/no/such/route"), 404)
    # A newline in the path matched no route and got a text/plain 404.
    _error(client.get(HUB + "/subscriptions/a%0Ab"), 404)
    reply = client.delete("/api/collections")
    _error(reply, 405)
    assert "GET" in reply.headers["allow"]


# -- the collections API --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/collections/notes", "/api/collections/orders"])
def test_a_filter_on_a_number_beyond_64_bits_is_400(client: httpx.Client, path: str) -> None:
    for field in ("n", "qty") if path.endswith("orders") else ("n",):
        message = _error(client.get(path, params={field: str(10**30)}), 400)
        assert str(2**63 - 1) in message
    assert client.get(path, params={"id": str(2**63 - 1)}).status_code == 200


def test_a_filter_on_a_number_beyond_a_double_matches_the_string(
        client: httpx.Client) -> None:
    client.post("/api/collections/notes", json={"label": "1e400"})
    reply = client.get("/api/collections/notes", params={"label": "1e400"})
    assert reply.status_code == 200
    assert [d["label"] for d in reply.json()["documents"]] == ["1e400"]


@pytest.mark.parametrize("value", [10**30, [1, 2], {"a": 1}])
def test_a_cursor_holding_what_no_page_ends_on_is_400(
        client: httpx.Client, value: object) -> None:
    cursor = encode_cursor("created_at", False, value, "key")  # type: ignore[arg-type]
    assert _error(client.get("/api/collections/notes", params={"cursor": cursor}),
                  400) == "malformed cursor"
    cursor = encode_cursor("id", False, None, value)  # type: ignore[arg-type]
    _error(client.get("/api/collections/orders", params={"cursor": cursor}), 400)


def test_a_limit_of_thousands_of_digits_is_400(client: httpx.Client) -> None:
    _error(client.get("/api/collections/notes", params={"limit": "1" * 5000}), 400)


@pytest.mark.parametrize("body", ['{"n": 1e400}', '{"n": -1e400}', '{"n": NaN}'])
def test_a_number_no_database_stores_is_400(client: httpx.Client, body: str) -> None:
    # 1e400 read as infinity, then failed to store and came back as a 409 "exists".
    reply = client.post("/api/collections/notes", content=body,
                        headers={"Content-Type": "application/json"})
    assert "not valid JSON" in _error(reply, 400)


def test_a_whole_number_beyond_64_bits_is_kept_exactly(client: httpx.Client) -> None:
    created = client.post("/api/collections/notes", json={"big": 10**30})
    assert created.status_code == 201
    doc_id = created.json()["id"]
    assert client.get(f"/api/collections/notes/{doc_id}").json()["big"] == 10**30


@pytest.mark.parametrize("depth", [101, 200_000])
def test_a_document_nested_too_deep_is_400(client: httpx.Client, depth: int) -> None:
    body = '{"a": ' + "[" * depth + "]" * depth + "}"
    reply = client.post("/api/collections/notes", content=body,
                        headers={"Content-Type": "application/json"})
    assert "nested deeper than 100" in _error(reply, 400)


def test_a_document_nested_to_the_limit_is_stored(client: httpx.Client) -> None:
    body = '{"a": ' + "[" * 99 + "]" * 99 + "}"
    reply = client.post("/api/collections/notes", content=body,
                        headers={"Content-Type": "application/json"})
    assert reply.status_code == 201, reply.text


# -- the chat --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def session(server: HubProcess) -> dict[str, str]:
    reply = httpx.post(server.url + "/api/auth/signup",
                       json={"username": "limits", "password": "limits-password-1"})
    assert reply.status_code == 201
    return {"Authorization": f"Bearer {reply.cookies['tidings_session']}"}


def test_a_chat_body_nested_too_deep_is_400(client: httpx.Client,
                                            session: dict[str, str]) -> None:
    body = '{"content": ' + "[" * 30_000 + "]" * 30_000 + "}"
    reply = client.post("/api/rooms/general/messages", content=body,
                        headers={**session, "Content-Type": "application/json"})
    assert "nested deeper" in _error(reply, 400)


@pytest.mark.parametrize("message_id", [2**63, 10**30])
def test_a_read_marker_beyond_any_message_id_is_422(
        client: httpx.Client, session: dict[str, str], message_id: int) -> None:
    reply = client.post("/api/rooms/general/read", content=json.dumps({"id": message_id}),
                        headers={**session, "Content-Type": "application/json"})
    assert _error(reply, 422) == "id must be a message id"


@pytest.mark.parametrize("params", [{"before": "9" * 5000}, {"limit": "9" * 5000},
                                    {"before": str(2**63)}])
def test_history_paging_numbers_out_of_range_are_422(
        client: httpx.Client, session: dict[str, str], params: dict[str, str]) -> None:
    _error(client.get("/api/rooms/general/messages", params=params, headers=session), 422)

