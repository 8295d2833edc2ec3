"""Python client for a Tidings (or any Mercure) hub: publish, and subscribe with resume.

    async with Client("http://127.0.0.1:8000", token=TOKEN) as client:
        await client.publish("/books/1", '{"title": "Dune"}')
        async with client.subscribe(["/books/{id}"]) as events:
            async for event in events:
                print(event.id, event.data)

A subscription reconnects after any drop (a connection error, a hub restart, a 5xx, a 429,
a stream the hub ended) with full-jitter backoff and resumes after the last id it handed
out, so it loses nothing the hub's history still holds and yields nothing twice. Refusals
that a retry cannot fix are raised instead. Scripts without asyncio use `SyncClient` or
`publish_sync`. The errors:

    TidingsError
    ├── HubError          the hub answered an error status (`.status`); PublishError is
    │   │                 its older name
    │   ├── AuthError     401 or 403: a token missing, invalid, expired or too narrow
    │   └── TokenTooOld   410 on a watch: the hub no longer holds the changes after the
    │                     last one seen (load a new snapshot)
    ├── HubUnreachable    no answer at all after the retries (also a ConnectionError)
    └── BadRequest        a call the client refuses before sending anything (no topics)

The client speaks HTTP only: it imports no server module (its errors are its own, and the
hub filters a watch's changes), so it runs where only httpx is installed.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import inspect
import json
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypedDict, TypeVar, Unpack
from urllib.parse import quote

import httpx

from tidings.errors import BadRequest, TidingsError
from tidings.sse import Event, EventParser

__all__ = [
    "AuthError",
    "Backoff",
    "Client",
    "HubError",
    "HubUnreachable",
    "PublishError",
    "RecentEvents",
    "Subscription",
    "SyncClient",
    "SyncSubscription",
    "TokenSource",
    "TokenTooOld",
    "publish_sync",
]

log = logging.getLogger(__name__)

MERCURE_PATH = "/.well-known/mercure"
DEDUPE_WINDOW = 1000
# Larger than any update the hub accepts (--max-body, 1 MiB by default) plus its framing.
_MAX_EVENT_BYTES = 1 << 24
# 507: the hub's disk is full; like a 503 it says when to look again (Retry-After).
_RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 507})

_P = ParamSpec("_P")
_T = TypeVar("_T")

TokenSource = str | Callable[[], str | Awaitable[str]]
"""A JWT, or a function (plain or async) called for a fresh one before every request."""


# -- errors ------------------------------------------------------------------------------


class HubError(TidingsError):
    """The hub answered an error status; `status` is it, `reason` the hub's message."""

    def __init__(self, status: int, reason: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.status_hint = status
        self.reason = reason
        self.retry_after_s = retry_after_s


class AuthError(HubError):
    """401 or 403: retrying with the same token cannot help, so it is never retried."""


class TokenTooOld(HubError):
    """410 on a watch: the hub's change log no longer reaches back to the last change seen,
    so the changes cannot resume without a gap; load a new snapshot (watch again)."""

    def __init__(self, reason: str) -> None:
        super().__init__(410, reason)


PublishError = HubError
"""The name `publish` errors had before the client raised `HubError` for every call."""


class HubUnreachable(TidingsError, ConnectionError):
    """No HTTP answer from the hub (refused, reset, timed out) after the retries."""

    status_hint = 503


def _error_for(response: httpx.Response, body: bytes) -> HubError:
    text = body.decode("utf-8", "replace")
    reason = text.strip() or response.reason_phrase
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        reason = parsed["error"]  # the hub's JSON error shape: {"error": ..., "status": ...}
    status = response.status_code
    kind = AuthError if status in (401, 403) else HubError
    return kind(status, reason, retry_after_s=_retry_after_s(response))


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# -- pure helpers: backoff and the window of recent events --------------------------------


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter.

    The n-th consecutive delay is uniform in [0, min(max_s, base_s * 2**n)], so clients
    dropped together (a hub restart) come back spread out instead of in one herd.
    """

    base_s: float = 0.1
    max_s: float = 10.0
    rand: Callable[[], float] = field(default=random.random, repr=False)  # uniform in [0, 1)
    attempt: int = 0

    def next_delay_s(self) -> float:
        cap = min(self.max_s, self.base_s * 2.0 ** min(self.attempt, 64))
        self.attempt += 1
        return self.rand() * cap

    def reset(self) -> None:
        self.attempt = 0


class RecentEvents:
    """The last `size` events seen, by id plus a hash of type and data; bounded memory.

    `add` returns False for an event already in the window (a repeat a hub may send after a
    resume from an id it no longer holds). Events without an id always pass, and so does an
    id reused for a different update, which Mercure allows and Tidings stores as new.
    """

    __slots__ = ("_keys", "_order", "size")

    def __init__(self, size: int = DEDUPE_WINDOW) -> None:
        self.size = size
        self._keys: set[tuple[str, str, int]] = set()
        self._order: deque[tuple[str, str, int]] = deque()

    def add(self, event: Event) -> bool:
        if self.size <= 0 or event.id is None:
            return True
        key = (event.id, event.event, hash(event.data))
        if key in self._keys:
            return False
        self._keys.add(key)
        self._order.append(key)
        if len(self._order) > self.size:
            self._keys.discard(self._order.popleft())
        return True

    def __len__(self) -> int:
        return len(self._order)


# -- the async client ---------------------------------------------------------------------


class _AsyncClosing:
    """`async with x:` hands out `x` and awaits `x.aclose()` on the way out, whatever
    happened inside (the clients and subscriptions release connections that way)."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class Client(_AsyncClosing):
    """An async client for one hub; use it as `async with Client(...) as client:`.

    `token` is a JWT or a function returning one (called before every request, so a
    long-lived subscription picks up refreshed tokens when it reconnects). `timeout_s`
    bounds connecting and each non-streaming request; `idle_timeout_s` is how long a stream
    may stay silent before it is presumed dead and reopened (hubs send heartbeats, Tidings
    every 30 s by default; None: wait forever). Backoff starts at `backoff_base_s` and is
    capped at `max_backoff_s`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: TokenSource | None = None,
        max_backoff_s: float = 10.0,
        backoff_base_s: float = 0.1,
        timeout_s: float = 10.0,
        idle_timeout_s: float | None = 90.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout_s, transport=transport)
        self._token = token
        self._timeout_s = timeout_s
        self._idle_timeout_s = idle_timeout_s
        self.max_backoff_s = max_backoff_s
        self.backoff_base_s = backoff_base_s
        self._subscriptions: set[Subscription] = set()
        self._closed = False
        self.last_event_id: str | None = None
        """The id the most recent subscription of this client has reached (prefer
        `Subscription.last_event_id` when several run at once)."""

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    async def aclose(self) -> None:
        """Close every open subscription, then the connections. The client cannot reopen."""
        self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.aclose()
        await self._http.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Client is closed; make a new one")

    def backoff(self) -> Backoff:
        return Backoff(self.backoff_base_s, self.max_backoff_s)

    async def _headers(self) -> dict[str, str]:
        source = self._token
        if callable(source):
            result = source()
            token = str(await result) if inspect.isawaitable(result) else str(result)
        else:
            token = source or ""
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _request(
        self, method: str, path: str, *, retries: int = 0,
        params: Sequence[tuple[str, str]] = (), data: dict[str, list[str]] | None = None,
    ) -> httpx.Response:
        """One request, retried `retries` times on no answer, 408, 429 and 5xx (honouring
        Retry-After); raises HubError, AuthError or HubUnreachable."""
        self._check_open()
        backoff = self.backoff()
        attempts = 0
        while True:
            attempts += 1
            last = attempts > retries
            try:
                response = await self._http.request(
                    method, path, params=tuple(params), data=data,
                    headers=await self._headers(),
                )
            except httpx.TransportError as exc:
                if last:
                    raise HubUnreachable(
                        f"cannot reach {self.base_url}: {exc or type(exc).__name__}"
                    ) from exc
                await asyncio.sleep(backoff.next_delay_s())
                continue
            if response.is_success:
                return response
            error = _error_for(response, response.content)
            if last or response.status_code not in _RETRIED_STATUSES:
                raise error
            wait_s = min(error.retry_after_s or 0.0, self.max_backoff_s)
            await asyncio.sleep(wait_s + backoff.next_delay_s())

    async def publish(
        self,
        topic: str | Sequence[str],
        data: str = "",
        *,
        private: bool = False,
        id: str | None = None,
        type: str | None = None,
        retry: int | None = None,
        retries: int = 3,
    ) -> str:
        """Publish one update; returns its id once the hub has stored it.

        The first topic is the canonical one. Without an `id`, the client makes one
        (`urn:uuid:...`) so that a retry (up to `retries`, after no answer, a 5xx or a 429)
        is stored once: Tidings stores an update sent again with its id only once.
        """
        topics = [topic] if isinstance(topic, str) else list(topic)
        if not topics:
            raise BadRequest("publish needs at least one topic")
        if id is None and retries > 0:
            id = f"urn:uuid:{uuid.uuid4()}"
        form: dict[str, list[str]] = {"topic": topics, "data": [data]}
        if private:
            form["private"] = ["on"]
        if id is not None:
            form["id"] = [id]
        if type is not None:
            form["type"] = [type]
        if retry is not None:
            form["retry"] = [str(retry)]
        response = await self._request("POST", MERCURE_PATH, data=form, retries=retries)
        return response.text

    def subscribe(
        self,
        topics: str | Sequence[str],
        last_event_id: str | None = None,
        *,
        selector: str = "topic",
        dedupe: int = DEDUPE_WINDOW,
    ) -> Subscription:
        """The events of `topics` (selectors: exact topics, URI templates, `*`), forever.

        `last_event_id` resumes after that id (`"earliest"`: all of history). `selector` is
        the query parameter each topic goes in (`topic`, or 1.0's `match`...). Raises
        BadRequest at once, before connecting, when `topics` is empty. Iterating raises
        AuthError on 401/403 and HubError on any other 4xx but 408 and 429; everything
        else is retried. The last `dedupe` events are remembered to drop repeats.
        """
        self._check_open()
        selectors = [topics] if isinstance(topics, str) else list(topics)
        if not selectors:
            raise BadRequest("subscribe needs at least one topic, e.g. subscribe(['/books/{id}'])")
        return Subscription(
            self, MERCURE_PATH, [(selector, t) for t in selectors],
            last_event_id=last_event_id, resume_param="lastEventID", dedupe=dedupe,
        )

    async def watch(
        self, collection: str, **filters: str | int | float | bool | None
    ) -> AsyncIterator[dict[str, Any]]:
        """The collection's documents now, then every change after them, with no gap and
        no double (see docs/feeds.md); reconnects and resumes after drops.

        Yields `{"operationType": "snapshot", "documentKey": ..., "fullDocument": DOC}`
        for each document of the snapshot (all pages; the changes resume from the first
        page's token, so a document changed while later pages load can come again as a
        change), then the MongoDB-shaped change events, forever. `filters` are field
        equalities, `operationType` too (`"insert,update"`): the hub applies them to the
        snapshot and to the changes. Raises TokenTooOld when the hub no longer holds the
        changes after the last one seen (load a new snapshot), AuthError when the token may
        not read the collection.
        """
        self._check_open()
        path = f"/api/collections/{quote(collection, safe='')}"
        params = [(name, value if isinstance(value, str) else json.dumps(value))
                  for name, value in filters.items()]
        try:
            index = (await self._request("GET", "/api/collections")).json()
        except AuthError:
            raise
        except HubError:
            index = {}  # the index only tells the key's name: "id" is the default
        keys = {c["name"]: c["key"] for c in index.get("collections", [])}
        key = keys.get(collection, "id")
        snapshot_params = [p for p in params if p[0] != "operationType"]
        token: str | None = None
        cursor: str | None = None
        while True:
            page_params = [*snapshot_params, ("limit", "1000")]
            if cursor:
                page_params.append(("cursor", cursor))
            page = (await self._request("GET", path, params=page_params)).json()
            token = token or str(page["resume_token"])
            for document in page["documents"]:
                yield {"operationType": "snapshot", "documentKey": {key: document.get(key)},
                       "fullDocument": document}
            cursor = page.get("next_cursor")
            if not cursor:
                break
        # The same filters go to the changes endpoint, which applies them before fan-out.
        async with Subscription(self, path + "/changes", params, last_event_id=token,
                                resume_param="resume_after") as changes:
            async for event in changes:
                if event.event == "error":
                    raise TokenTooOld(str(json.loads(event.data).get("error")))
                yield json.loads(event.data)


class Subscription(_AsyncClosing):
    """One subscription's events, forever: `async for event in subscription`.

    Use it as `async with client.subscribe(...) as events:` (or call `aclose`) so the
    connection is released when you stop; closing the client closes it too. Nothing is
    sent before the first iteration. `last_event_id` is the id of the last event handed
    out (before any, the hub's newest id at connect time): give it to a new subscription
    to continue where this one stopped. `connects` counts the streams opened.
    """

    def __init__(
        self,
        client: Client,
        path: str,
        params: list[tuple[str, str]],
        *,
        last_event_id: str | None,
        resume_param: str,
        dedupe: int = DEDUPE_WINDOW,
    ) -> None:
        self._client = client
        self._path = path
        self._params = params
        self._resume_param = resume_param
        self.last_event_id = last_event_id or None
        self.connects = 0
        self._recent = RecentEvents(dedupe)
        self._backoff = client.backoff()
        self._pending: deque[Event] = deque()
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._parser = EventParser(_MAX_EVENT_BYTES)
        self._retrying = False
        self._unreachable = False
        self._extra_wait_s = 0.0
        self._closed = False
        client._subscriptions.add(self)

    def __aiter__(self) -> Subscription:
        return self

    async def aclose(self) -> None:
        """Stop: release the connection; iterating afterwards ends at once."""
        self._closed = True
        self._client._subscriptions.discard(self)
        await self._release()

    async def __anext__(self) -> Event:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._pending:
                event = self._pending.popleft()
                if event.id is not None:
                    self.last_event_id = self._client.last_event_id = event.id
                return event
            if self._chunks is None:
                await self._connect()
            else:
                await self._read(self._chunks)

    async def _read(self, chunks: AsyncIterator[bytes]) -> None:
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            await self._drop("the hub ended the stream")
            return
        except httpx.TransportError as exc:
            await self._drop(str(exc) or type(exc).__name__)
            return
        self._backoff.reset()  # the stream works: the next drop starts the backoff afresh
        for event in self._parser.feed(chunk):  # SSEProtocolError (oversized) is raised
            if self._recent.add(event):
                self._pending.append(event)

    async def _drop(self, reason: str) -> None:
        await self._release()
        if not self._closed:
            log.info("%s: stream dropped (%s); resuming after %s", self._path, reason,
                     self.last_event_id)

    async def _release(self) -> None:
        response, self._response, self._chunks = self._response, None, None
        if response is not None:
            await response.aclose()

    async def _connect(self) -> None:
        client = self._client
        while not self._closed:
            if self._retrying:
                delay_s = self._extra_wait_s + self._backoff.next_delay_s()
                self._extra_wait_s = 0.0
                await asyncio.sleep(delay_s)
                if self._closed:
                    return
            self._retrying = True
            params = list(self._params)
            if self.last_event_id:
                params.append((self._resume_param, self.last_event_id))
            headers = await client._headers()
            headers.update({"Accept": "text/event-stream", "Cache-Control": "no-cache"})
            request = client._http.build_request(
                "GET", self._path, params=tuple(params), headers=headers,
                timeout=httpx.Timeout(client._timeout_s, read=client._idle_timeout_s),
            )
            try:
                response = await client._http.send(request, stream=True)
            except httpx.TransportError as exc:
                # Once per outage at INFO (where, and that it keeps trying), then quiet.
                log.log(logging.DEBUG if self._unreachable else logging.INFO,
                        "cannot reach %s%s (%s); retrying, at most %g s apart",
                        client.base_url.rstrip("/"), self._path, exc or type(exc).__name__,
                        client.max_backoff_s)
                self._unreachable = True
                continue
            content_type = response.headers.get("content-type", "")
            if response.status_code == 200 and content_type.startswith("text/event-stream"):
                if self._closed:
                    await response.aclose()
                    return
                self._response = response
                self._chunks = response.aiter_bytes()
                self._parser = EventParser(_MAX_EVENT_BYTES)
                self.connects += 1
                if self.last_event_id is None:
                    # The hub's newest id when it registered us: a resume from it misses
                    # nothing even if the stream drops before the first event.
                    self.last_event_id = response.headers.get("last-event-id") or None
                log.log(logging.INFO if self._unreachable else logging.DEBUG,
                        "%s%s: connected (resuming after %s)", client.base_url.rstrip("/"),
                        self._path,
                        self.last_event_id)
                self._unreachable = False
                return
            try:
                body = await response.aread()
            except httpx.TransportError:
                body = b""
            finally:
                await response.aclose()
            if response.status_code == 200:
                error = HubError(200, f"not an event stream: {content_type or 'no type'}")
            else:
                error = _error_for(response, body)
                if response.status_code not in _RETRIED_STATUSES:
                    raise error
            self._extra_wait_s = min(error.retry_after_s or 0.0, client.max_backoff_s)
            log.info("%s: %s; retrying", self._path, error)


# -- the synchronous wrapper ------------------------------------------------------------


class _Closing:
    """`with x:` hands out `x` and calls `x.close()` on the way out (`_AsyncClosing`
    without asyncio)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _blocking(
    method: Callable[Concatenate[Client, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[SyncClient, _P], _T]:
    """`method` of `Client` as a method of `SyncClient` that blocks until it is done: one
    signature and one docstring for both, so the two cannot drift apart."""

    @functools.wraps(method)
    def blocking(self: SyncClient, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return self._runner.run(method(self.client, *args, **kwargs))

    return blocking


def _iterated_blocking(
    method: Callable[Concatenate[Client, _P], Subscription],
) -> Callable[Concatenate[SyncClient, _P], SyncSubscription]:
    """`method` of `Client` as a method of `SyncClient` whose subscription is iterated
    without asyncio (a `SyncSubscription`); like `_blocking`, one signature for both."""

    @functools.wraps(method)
    def iterated(self: SyncClient, /, *args: _P.args, **kwargs: _P.kwargs) -> SyncSubscription:
        return SyncSubscription(self._runner, method(self.client, *args, **kwargs))

    return iterated


class _SyncOptions(TypedDict, total=False):
    """The options of `Client` a `SyncClient` passes on (their defaults are `Client`'s)."""

    token: TokenSource | None
    max_backoff_s: float
    timeout_s: float
    idle_timeout_s: float | None


class SyncClient(_Closing):
    """`Client` for scripts without asyncio (not for use inside a running event loop).

        with SyncClient("http://127.0.0.1:8000", token=TOKEN) as client:
            client.publish("/books/1", "{}")
            with client.subscribe(["/books/{id}"]) as events:
                for event in events:
                    ...

    It runs its own event loop in the calling thread, one call at a time.
    """

    def __init__(self, base_url: str, **options: Unpack[_SyncOptions]) -> None:
        self._runner = asyncio.Runner()
        self._closed = False
        self.client = Client(base_url, **options)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._runner.run(self.client.aclose())
        finally:
            self._runner.close()

    publish = _blocking(Client.publish)

    subscribe = _iterated_blocking(Client.subscribe)


class SyncSubscription(_Closing):
    """A `Subscription` iterated without asyncio; `close()` (or `with`) releases it."""

    def __init__(self, runner: asyncio.Runner, subscription: Subscription) -> None:
        self._runner = runner
        self.subscription = subscription

    @property
    def last_event_id(self) -> str | None:
        return self.subscription.last_event_id

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        event = self._runner.run(self._next())
        if event is None:
            raise StopIteration
        return event

    async def _next(self) -> Event | None:
        try:
            return await self.subscription.__anext__()
        except StopAsyncIteration:
            return None

    def close(self) -> None:
        self._runner.run(self.subscription.aclose())


def publish_sync(
    base_url: str,
    topic: str | Sequence[str],
    data: str = "",
    *,
    token: TokenSource | None = None,
    private: bool = False,
    id: str | None = None,
    type: str | None = None,
    retries: int = 3,
) -> str:
    """Publish one update from a script; returns its id once the hub has stored it."""
    with SyncClient(base_url, token=token) as client:
        return client.publish(topic, data, private=private, id=id, type=type, retries=retries)
