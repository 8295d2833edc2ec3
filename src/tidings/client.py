"""A small Python client: publish, and subscribe with automatic resume.

    async with Client("http://127.0.0.1:8000", token=TOKEN) as client:
        await client.publish("/books/1", '{"title": "Dune"}')
        async for event in client.subscribe(["/books/{id}"]):
            print(event.id, event.data)

`subscribe` reconnects with backoff and sends the last id it saw, so a dropped connection
or a restarted hub loses nothing the hub's history still holds.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import httpx

from tidings.errors import BadRequest
from tidings.sse import Event, EventParser

__all__ = ["Client", "PublishError"]

MERCURE_PATH = "/.well-known/mercure"


class PublishError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class Client:
    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        max_backoff_s: float = 10.0,
        timeout_s: float = 10.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s)
        self._max_backoff_s = max_backoff_s
        self.last_event_id: str | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def publish(
        self,
        topic: str | Sequence[str],
        data: str = "",
        *,
        private: bool = False,
        id: str | None = None,
        type: str | None = None,
        retry: int | None = None,
    ) -> str:
        """Publish one update; returns its id once the hub has stored it."""
        topics = [topic] if isinstance(topic, str) else list(topic)
        form: list[tuple[str, str]] = [("topic", t) for t in topics]
        form.append(("data", data))
        if private:
            form.append(("private", "on"))
        for name, value in (("id", id), ("type", type)):
            if value is not None:
                form.append((name, value))
        if retry is not None:
            form.append(("retry", str(retry)))
        response = await self._http.post(MERCURE_PATH, data=dict_list(form))
        if response.status_code != 200:
            raise PublishError(response.status_code, response.text)
        return response.text

    async def subscribe(
        self,
        topics: Sequence[str],
        *,
        last_event_id: str | None = None,
        selector: str = "topic",
    ) -> AsyncIterator[Event]:
        """Yield events for `topics` forever, reconnecting and resuming after drops."""
        if not topics:
            raise BadRequest("subscribe needs at least one topic")
        self.last_event_id = last_event_id
        attempt = 0
        while True:
            headers = {"Last-Event-ID": self.last_event_id} if self.last_event_id else {}
            params = httpx.QueryParams([(selector, t) for t in topics])
            try:
                async with self._http.stream(
                    "GET", MERCURE_PATH, params=params, headers=headers,
                    timeout=httpx.Timeout(None, connect=self._http.timeout.connect),
                ) as response:
                    if response.status_code != 200:
                        body = (await response.aread()).decode(errors="replace")
                        if 400 <= response.status_code < 500:
                            raise BadRequest(f"subscribe refused: {response.status_code} {body}")
                        raise httpx.HTTPStatusError(body, request=response.request,
                                                    response=response)
                    attempt = 0
                    parser = EventParser()
                    async for chunk in response.aiter_raw():
                        for event in parser.feed(chunk):
                            if event.id is not None:
                                self.last_event_id = event.id
                            yield event
            except (httpx.TransportError, httpx.HTTPStatusError):
                pass
            # Full jitter, so that many clients do not come back at the same instant.
            delay = min(self._max_backoff_s, 0.1 * 2**attempt)
            attempt = min(attempt + 1, 10)
            await asyncio.sleep(random.uniform(0, delay))

    async def watch(
        self, collection: str, **filters: str | int | float | bool | None
    ) -> AsyncIterator[dict[str, Any]]:
        """The collection's documents now, then every change after them, with no gap and
        no double (see docs/feeds.md); reconnects and resumes after drops.

        Yields `{"operationType": "snapshot", "documentKey": ..., "fullDocument": DOC}`
        for each document of the snapshot (all pages; the changes resume from the first
        page's token, so a document changed while later pages load can come again as a
        change), then the MongoDB-shaped change events, forever. `filters` are field
        equalities, `operationType` too (`"insert,update"`). Raises TokenTooOld when the
        hub no longer holds the changes after the last one seen: load a new snapshot.
        """
        import json
        from urllib.parse import quote

        from tidings.feeds.errors import TokenTooOld
        from tidings.feeds.query import ChangeFilter

        path = f"/api/collections/{quote(collection, safe='')}"
        params = [(name, value if isinstance(value, str) else json.dumps(value))
                  for name, value in filters.items()]
        index = await self._http.get("/api/collections")
        keys = {c["name"]: c["key"] for c in index.json().get("collections", [])} if (
            index.status_code == 200) else {}
        key = keys.get(collection, "id")
        # Filtered here, on the changes: the hub filters server-side once it can.
        wanted = ChangeFilter.from_params(params)
        snapshot_params = [p for p in params if p[0] != "operationType"]
        token: str | None = None
        cursor: str | None = None
        while True:
            page_params = [*snapshot_params, ("limit", "1000")]
            if cursor:
                page_params.append(("cursor", cursor))
            response = await self._http.get(path, params=tuple(page_params))
            if response.status_code != 200:
                raise BadRequest(f"snapshot refused: {response.status_code} {response.text}")
            page = response.json()
            token = token or str(page["resume_token"])
            for document in page["documents"]:
                yield {"operationType": "snapshot", "documentKey": {key: document.get(key)},
                       "fullDocument": document}
            cursor = page.get("next_cursor")
            if not cursor:
                break
        last_id = token
        attempt = 0
        while True:
            try:
                async with self._http.stream(
                    "GET", path + "/changes", headers={"Last-Event-ID": last_id},
                    timeout=httpx.Timeout(None, connect=self._http.timeout.connect),
                ) as response:
                    if response.status_code != 200:
                        body = (await response.aread()).decode(errors="replace")
                        if 400 <= response.status_code < 500:
                            raise BadRequest(f"watch refused: {response.status_code} {body}")
                        raise httpx.HTTPStatusError(body, request=response.request,
                                                    response=response)
                    attempt = 0
                    parser = EventParser()
                    async for chunk in response.aiter_raw():
                        for event in parser.feed(chunk):
                            if event.event == "error":
                                raise TokenTooOld(str(json.loads(event.data).get("error")))
                            if event.id:
                                last_id = event.id
                            change = json.loads(event.data)
                            if wanted.accepts(change):
                                yield change
            except (httpx.TransportError, httpx.HTTPStatusError):
                pass
            delay = min(self._max_backoff_s, 0.1 * 2**attempt)
            attempt = min(attempt + 1, 10)
            await asyncio.sleep(random.uniform(0, delay))


def dict_list(form: list[tuple[str, str]]) -> dict[str, list[str]]:
    """httpx wants repeated form fields as a dict of lists."""
    out: dict[str, list[str]] = {}
    for name, value in form:
        out.setdefault(name, []).append(value)
    return out
