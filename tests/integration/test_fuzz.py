"""Every route of the OpenAPI document, fuzzed against a real `tidings serve` over a socket.

Schemathesis generates requests from `/openapi.json` (valid ones, and invalid ones: wrong
types, missing fields, out-of-range numbers), and each is sent twice: as generated (no
credentials) and with a valid credential (a publisher+subscriber JWT for the hub and the
collections API, a chat session for the chat). Every answer must be documented (status,
content type, body schema), none may be a 5xx, and none may take longer than 5 s.

Path parameters are drawn from what exists (real collections, documents, rooms, users,
messages, tasks) as well as from anything, so that the fuzzer gets past the 404s.

The run is bounded for CI (`TIDINGS_FUZZ_EXAMPLES`, default 15 per operation, mode and
credential, derandomized so that CI does not find a new input each run); `scripts/fuzz`
runs many more, with fresh randomness, before a release. Whatever a run finds becomes a
regular test (tests/integration/test_input_limits.py) and gets fixed.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import KEY, HubProcess
from tidings import __version__
from tidings.hub.tokens import encode_token
from tidings.web.openapi import openapi_document

EXAMPLES = int(os.environ.get("TIDINGS_FUZZ_EXAMPLES", "15"))
RANDOM = os.environ.get("TIDINGS_FUZZ_RANDOM", "") not in ("", "0")
SLOW_S = 5.0
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]
# Answers that are streams: only their status and content type are checked (the body
# never ends by itself).
STREAMS = {("GET", "/.well-known/mercure"), ("GET", "/api/collections/{name}/changes"),
           ("POST", "/api/rooms/{room}/assistant")}

CONFIG = """
[collections.notes]
read = "public"
write = "anyone"

[collections.secret]

[collections.typed]
schema = { type = "object", required = ["title"], properties.title = { type = "string" } }
read = "public"
write = "anyone"

[tables.orders]
key = "id"
read = "public"
"""

# Collected when the module is imported, from the same document the server serves.
OPERATIONS = [(method.upper(), path)
              for path, item in openapi_document(__version__)["paths"].items()  # type: ignore[attr-defined]
              for method in item]


class Fixture:
    """The server, the credentials, and the things that exist on it."""

    def __init__(self, server: HubProcess) -> None:
        self.url = server.url
        self.token = encode_token(KEY, publish=["*"], subscribe=["*"])
        with httpx.Client(base_url=self.url, timeout=10) as client:
            sessions = []
            for name in ("fuzzer", "other"):
                reply = client.post("/api/auth/signup",
                                    json={"username": name, "password": "fuzz-password-1"})
                assert reply.status_code == 201, reply.text
                sessions.append(reply.cookies["tidings_session"])
            self.session = sessions[0]
            auth = {"Authorization": f"Bearer {self.session}"}
            assert client.post("/api/rooms", json={"name": "fuzz"},
                               headers=auth).status_code == 201
            message = client.post("/api/rooms/fuzz/messages", json={"content": "hi @other"},
                                  headers=auth).json()
            dm = client.post("/api/dm/other/messages", json={"content": "hello"},
                             headers=auth).json()
            task = client.post("/api/rooms/fuzz/export", json={"format": "csv"},
                               headers=auth).json()
            doc = client.post("/api/collections/notes", json={"title": "a", "n": 1}).json()
        self.path_values: dict[str, list[str]] = {
            "name": ["notes", "secret", "typed", "orders"],
            "doc_id": [str(doc["id"]), "1"],
            "room": ["fuzz", "general"],
            "user": ["other", "fuzzer"],
            "id": [str(message["id"]), str(dm["id"])],
            "task": [str(task["task"])],
            "rest": ["%2Fchat%2Frooms%2Fgeneral"],
        }

    def credentials(self, path: str) -> dict[str, str]:
        chat = path.startswith("/api/") and not path.startswith("/api/collections")
        return {"Authorization": f"Bearer {self.session if chat else self.token}"}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    workdir = tmp_path_factory.mktemp("fuzz")
    with sqlite3.connect(workdir / "tidings.db") as db:
        db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT, qty INTEGER)")
        db.execute("INSERT INTO orders VALUES (1, 'tea', 2)")
    db.close()
    (workdir / "tidings.toml").write_text(CONFIG)
    server = HubProcess(workdir, "--config", str(workdir / "tidings.toml"), "--subscriptions",
                        "--chat-rate-messages", "1000000").start()
    try:
        yield Fixture(server)
    finally:
        server.stop()
        assert "Traceback" not in server.log(), server.log()[-4000:]


@pytest.fixture(scope="module")
def schema(target: Fixture) -> Any:
    """The document as the server serves it."""
    return schemathesis.openapi.from_url(target.url + "/openapi.json")


def _strategy(operation: Any, mode: GenerationMode, values: dict[str, list[str]]) -> Any:
    """Cases with path parameters drawn from what exists, or from anything."""
    names = [p.name for p in operation.path_parameters]
    strategies = [operation.as_strategy(generation_mode=mode)]
    if mode is GenerationMode.POSITIVE and names:
        choices = st.fixed_dictionaries({n: st.sampled_from(values.get(n, ["x"]))
                                         for n in names})
        strategies.append(choices.flatmap(
            lambda chosen: operation.as_strategy(generation_mode=mode,
                                                 path_parameters=chosen)))
    return st.one_of(*strategies)


def _problems(case: Any, target: Fixture, http: requests.Session) -> list[str]:
    found: list[str] = []
    stream = (case.method.upper(), case.path) in STREAMS
    for headers in (None, target.credentials(case.path)):
        curl = case.as_curl_command(headers=headers, base_url=target.url)
        started = time.monotonic()
        try:
            # Sent here rather than with `case.call`, which reads an event stream until
            # its timeout: a 200 stream is judged by its status and headers alone.
            response = http.request(**case.as_transport_kwargs(target.url, headers),
                                    stream=stream, timeout=SLOW_S)
            if not (stream and response.status_code == 200):
                response.content  # noqa: B018 (read the whole body, within the timeout)
        except requests.RequestException as exc:
            found.append(f"{type(exc).__name__}: {exc}\n  {curl}")
            continue
        elapsed = time.monotonic() - started
        if elapsed > SLOW_S:
            found.append(f"took {elapsed:.1f} s\n  {curl}")
        try:
            if stream and response.status_code == 200:
                if not response.headers["content-type"].startswith("text/event-stream"):
                    found.append(f"a 200 stream that is not text/event-stream\n  {curl}")
                continue
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (AssertionError, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup
            found.append(f"{str(exc).strip()}\n  {curl}")
        finally:
            response.close()
    return found


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_route_survives_any_input(target: Fixture, schema: Any, method: str,
                                  path: str) -> None:
    operation = schema[path][method]
    problems: dict[str, str] = {}
    http = requests.Session()
    modes = [GenerationMode.POSITIVE]
    # Nothing to make invalid without a query, headers or a body (path segments are
    # strings whatever they hold).
    if operation.query or operation.body or operation.headers:
        modes.append(GenerationMode.NEGATIVE)
    for mode in modes:
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not RANDOM,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=_strategy(operation, mode, target.path_values))
        def run(case: Any) -> None:
            for problem in _problems(case, target, http):
                problems.setdefault(problem.split("\n", 1)[0], problem)

        run()
    http.close()
    assert not problems, "\n\n".join(problems.values())
