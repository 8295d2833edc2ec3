"""The chat's HTTP side: thin routes over `tidings.chat.ChatService`, the page, and the
presence gate in front of the hub's endpoint.

    POST   /api/auth/signup | /api/auth/login     {"username", "password"} -> the user
    POST   /api/auth/logout                       204
    GET    /api/me                                the user, what its page subscribes to
    GET    /api/users                             everyone, with `online`
    GET    /api/rooms             POST {"name"}   rooms (members, joined, unread, online)
    GET    /api/rooms/R           POST .../join, .../leave
    GET    /api/rooms/R/messages?before=ID&limit=N      newest first
    POST   /api/rooms/R/messages  {"content"}     201 the message
    PATCH  /api/rooms/R/messages/ID {"content"}   DELETE .../ID (204): one's own only
    POST   /api/rooms/R/typing | /read {"id"} | /export {"format"} (202 {"task"})
    GET    /api/rooms/R/presence | /members
    GET    /api/dm                                one's direct conversations (unread)
    GET    /api/dm/U/messages     POST, PATCH, DELETE, typing, read: as for rooms
    PATCH  /api/messages/ID       DELETE /api/messages/ID
    POST   /api/rooms/R/assistant {"prompt"}      text/event-stream: delta..., done | error
    POST   /api/rooms/R/assistant/ID/cancel       stop a streaming reply (its asker only)
    POST   /api/notifications     {"user", "message", "type"} with a publisher token
    GET    /api/tasks/ID          GET /api/tasks/ID/download

The session is a JWT in two HttpOnly, SameSite=Lax cookies holding the same token:
`tidings_session` (Path=/) for these routes, and `mercureAuthorization` (Path=/.well-known/
mercure), the cookie the hub already reads, for the page's EventSource. The token's
subscribe claim covers exactly the private topics its user may read, so the hub needs no
change and no other credential. API clients may send the token as `Authorization: Bearer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tidings.chat.accounts import Session
from tidings.chat.errors import InvalidInput, InvalidJSON, RateLimited
from tidings.chat.model import Conversation, notifications_topic
from tidings.chat.presence import Connection
from tidings.chat.service import ChatService
from tidings.errors import (
    Forbidden,
    PayloadTooLarge,
    ServiceUnavailable,
    TidingsError,
    TokenMissing,
    Unauthorized,
)
from tidings.hub.auth import KeyConfig
from tidings.sse import encode_event
from tidings.web.access import RequestParts, publisher_claims

__all__ = ["HUB_COOKIE", "SESSION_COOKIE", "ChatAPI", "ChatStreams", "openapi_paths"]

SESSION_COOKIE = "tidings_session"
HUB_COOKIE = "mercureAuthorization"
HUB_PATH = "/.well-known/mercure"
PAGE = Path(__file__).parent / "static" / "chat" / "index.html"
_MAX_BODY = 64 * 1024
_SESSION_COOKIE_BYTES = SESSION_COOKIE.encode() + b"="

Handler = Callable[["ChatAPI", Request], Awaitable[Response]]


def _error(exc: TidingsError) -> Response:
    body: dict[str, object] = {"error": exc.message, "status": exc.status_hint}
    headers: dict[str, str] = {}
    if isinstance(exc, InvalidInput):
        body["field"] = exc.field
    if isinstance(exc, RateLimited | ServiceUnavailable):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, TokenMissing):
        headers["WWW-Authenticate"] = 'Bearer realm="tidings"'
    elif isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="tidings", error="invalid_token"'
    return JSONResponse(body, status_code=exc.status_hint, headers=headers)


def _handles_errors(handler: Handler) -> Handler:
    async def wrapper(self: ChatAPI, request: Request) -> Response:
        try:
            return await handler(self, request)
        except TidingsError as exc:
            return _error(exc)

    return wrapper


def _session_token(parts: RequestParts) -> str | None:
    authorization = parts.headers.get("authorization", "")
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return parts.cookies.get(SESSION_COOKIE) or None


class ChatAPI:
    def __init__(self, service: ChatService, *, publisher_key: KeyConfig | None) -> None:
        self.service = service
        self.publisher_key = publisher_key

    def routes(self) -> list[BaseRoute]:
        r = Route
        return [
            r("/", self.page, methods=["GET"]),
            r("/api/auth/signup", self.signup, methods=["POST"]),
            r("/api/auth/login", self.login, methods=["POST"]),
            r("/api/auth/logout", self.logout, methods=["POST"]),
            r("/api/me", self.me, methods=["GET"]),
            r("/api/users", self.users, methods=["GET"]),
            r("/api/rooms", self.rooms, methods=["GET", "POST"]),
            r("/api/rooms/{room}", self.room, methods=["GET"]),
            r("/api/rooms/{room}/join", self.join, methods=["POST"]),
            r("/api/rooms/{room}/leave", self.leave, methods=["POST"]),
            r("/api/rooms/{room}/members", self.members, methods=["GET"]),
            r("/api/rooms/{room}/presence", self.presence, methods=["GET"]),
            r("/api/rooms/{room}/messages", self.messages, methods=["GET", "POST"]),
            r("/api/rooms/{room}/messages/{id}", self.message, methods=["PATCH", "DELETE"]),
            r("/api/rooms/{room}/typing", self.typing, methods=["POST"]),
            r("/api/rooms/{room}/read", self.read, methods=["POST"]),
            r("/api/rooms/{room}/export", self.export, methods=["POST"]),
            r("/api/rooms/{room}/assistant", self.ask, methods=["POST"]),
            r("/api/rooms/{room}/assistant/{id}/cancel", self.cancel_reply,
              methods=["POST"]),
            r("/api/dm", self.dms, methods=["GET"]),
            r("/api/dm/{user}/messages", self.messages, methods=["GET", "POST"]),
            r("/api/dm/{user}/messages/{id}", self.message, methods=["PATCH", "DELETE"]),
            r("/api/dm/{user}/typing", self.typing, methods=["POST"]),
            r("/api/dm/{user}/read", self.read, methods=["POST"]),
            r("/api/messages/{id}", self.message, methods=["PATCH", "DELETE"]),
            r("/api/notifications", self.notify, methods=["POST"]),
            r("/api/tasks/{task}", self.task, methods=["GET"]),
            r("/api/tasks/{task}/download", self.download, methods=["GET"]),
        ]

    # -- helpers -------------------------------------------------------------------------

    async def _session(self, request: Request) -> Session:
        return await self.service.session(_session_token(RequestParts(request.scope)))

    @staticmethod
    async def _body(request: Request, *, optional: bool = False) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > _MAX_BODY:
            raise PayloadTooLarge(f"the body is larger than {_MAX_BODY} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > _MAX_BODY:
                raise PayloadTooLarge(f"the body is larger than {_MAX_BODY} bytes")
        if not raw.strip():
            if optional:
                return {}
            raise InvalidJSON("a JSON object is required")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            # Forms cannot send JSON across sites without CORS: one more CSRF guard.
            raise InvalidJSON("send the body as application/json")
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise InvalidJSON("the body is not valid JSON") from None
        if not isinstance(value, dict):
            raise InvalidJSON("the body must be a JSON object")
        return value

    @staticmethod
    def _with_session(response: Response, request: Request, session: Session | None) -> Response:
        """Set (session) or clear (None) the two cookies."""
        secure = request.url.scheme == "https"
        if session is None:
            for name, path in ((SESSION_COOKIE, "/"), (HUB_COOKIE, HUB_PATH)):
                response.delete_cookie(name, path=path, secure=secure, httponly=True,
                                       samesite="lax")
            return response
        max_age = max(0, int(session.expires_at - time.time()))
        for name, path in ((SESSION_COOKIE, "/"), (HUB_COOKIE, HUB_PATH)):
            response.set_cookie(name, session.token, max_age=max_age, path=path,
                                secure=secure, httponly=True, samesite="lax")
        return response

    async def _conversation(self, request: Request, me: str) -> Conversation:
        params = request.path_params
        if "room" in params:
            return self.service.room(params["room"])
        return await self.service.dm(me, params["user"])

    # -- the page ------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        return FileResponse(PAGE, headers={"Cache-Control": "no-cache"})

    # -- accounts ------------------------------------------------------------------------

    @_handles_errors
    async def signup(self, request: Request) -> Response:
        body = await self._body(request)
        user, session = await self.service.signup(body.get("username"), body.get("password"))
        return self._with_session(JSONResponse(user, status_code=201), request, session)

    @_handles_errors
    async def login(self, request: Request) -> Response:
        body = await self._body(request)
        user, session = await self.service.login(body.get("username"), body.get("password"))
        return self._with_session(JSONResponse(user), request, session)

    @_handles_errors
    async def logout(self, request: Request) -> Response:
        await self.service.logout(_session_token(RequestParts(request.scope)))
        return self._with_session(Response(status_code=204), request, None)

    @_handles_errors
    async def me(self, request: Request) -> Response:
        session = await self._session(request)
        fresh = await self.service.refresh(session)
        response = JSONResponse(await self.service.me(fresh or session))
        return self._with_session(response, request, fresh) if fresh else response

    @_handles_errors
    async def users(self, request: Request) -> Response:
        await self._session(request)
        return JSONResponse({"users": await self.service.users()})

    # -- rooms ---------------------------------------------------------------------------

    @_handles_errors
    async def rooms(self, request: Request) -> Response:
        session = await self._session(request)
        if request.method == "POST":
            body = await self._body(request)
            room = await self.service.create_room(session.username, body.get("name"))
            return JSONResponse(room, status_code=201,
                                headers={"Location": f"/api/rooms/{room['name']}"})
        return JSONResponse({"rooms": await self.service.rooms(session.username)})

    @_handles_errors
    async def room(self, request: Request) -> Response:
        session = await self._session(request)
        return JSONResponse(await self.service.room_info(session.username,
                                                         request.path_params["room"]))

    @_handles_errors
    async def join(self, request: Request) -> Response:
        session = await self._session(request)
        return JSONResponse(await self.service.join(session.username,
                                                    request.path_params["room"]))

    @_handles_errors
    async def leave(self, request: Request) -> Response:
        session = await self._session(request)
        return JSONResponse(await self.service.leave(session.username,
                                                     request.path_params["room"]))

    @_handles_errors
    async def members(self, request: Request) -> Response:
        await self._session(request)
        room = request.path_params["room"]
        return JSONResponse({"room": room, "members": await self.service.members(room)})

    @_handles_errors
    async def presence(self, request: Request) -> Response:
        await self._session(request)
        return JSONResponse(self.service.presence_of(request.path_params["room"]))

    @_handles_errors
    async def dms(self, request: Request) -> Response:
        session = await self._session(request)
        return JSONResponse({"conversations": await self.service.dms(session.username)})

    # -- messages ------------------------------------------------------------------------

    @_handles_errors
    async def messages(self, request: Request) -> Response:
        session = await self._session(request)
        conversation = await self._conversation(request, session.username)
        if request.method == "POST":
            body = await self._body(request)
            message = await self.service.post(session.username, conversation,
                                              body.get("content"))
            return JSONResponse(message.to_json(), status_code=201)
        query = request.query_params
        return JSONResponse(await self.service.history(
            conversation, query.get("before"), query.get("limit")))

    @_handles_errors
    async def message(self, request: Request) -> Response:
        session = await self._session(request)
        params = request.path_params
        expected = None
        if "room" in params or "user" in params:
            expected = await self._conversation(request, session.username)
        if request.method == "DELETE":
            await self.service.delete(session.username, params["id"], expected)
            return Response(status_code=204)
        body = await self._body(request)
        message = await self.service.edit(session.username, params["id"],
                                          body.get("content"), expected)
        return JSONResponse(message.to_json())

    @_handles_errors
    async def typing(self, request: Request) -> Response:
        session = await self._session(request)
        conversation = await self._conversation(request, session.username)
        sent = await self.service.typing(session.username, conversation)
        return JSONResponse({"sent": sent}, status_code=202)

    @_handles_errors
    async def read(self, request: Request) -> Response:
        session = await self._session(request)
        conversation = await self._conversation(request, session.username)
        body = await self._body(request, optional=True)
        last_read = await self.service.mark_read(session.username, conversation,
                                                 body.get("id"))
        return JSONResponse({**conversation.fields(), "last_read": last_read})

    # -- notifications and tasks ------------------------------------------------------------

    @_handles_errors
    async def notify(self, request: Request) -> Response:
        claims = publisher_claims(RequestParts(request.scope), self.publisher_key,
                                  doing="sending a notification")
        body = await self._body(request)
        user = body.get("user")
        topic = notifications_topic(str(user).strip().lower()) if isinstance(user, str) else ""
        if topic and not claims.may_publish([topic]):
            raise Forbidden(f"the token's publish claim does not cover {topic}")
        sent = await self.service.notify(user, body.get("message"), body.get("type"),
                                         claims.subject)
        return JSONResponse(sent, status_code=202)

    @_handles_errors
    async def export(self, request: Request) -> Response:
        session = await self._session(request)
        body = await self._body(request, optional=True)
        task = await self.service.export(session.username, request.path_params["room"],
                                         body.get("format"))
        return JSONResponse(task.to_json(), status_code=202,
                            headers={"Location": f"/api/tasks/{task.id}"})

    @_handles_errors
    async def ask(self, request: Request) -> Response:
        session = await self._session(request)
        conversation = self.service.room(request.path_params["room"])
        body = await self._body(request)
        reply = self.service.private_reply(session.username, conversation,
                                           body.get("prompt"))
        return AssistantStream(reply)

    @_handles_errors
    async def cancel_reply(self, request: Request) -> Response:
        session = await self._session(request)
        conversation = self.service.room(request.path_params["room"])
        message = await self.service.cancel_reply(session.username, conversation,
                                                  request.path_params["id"])
        return JSONResponse(message.to_json())

    @_handles_errors
    async def task(self, request: Request) -> Response:
        session = await self._session(request)
        task = await self.service.task(session.username, request.path_params["task"])
        return JSONResponse(task.to_json())

    @_handles_errors
    async def download(self, request: Request) -> Response:
        session = await self._session(request)
        task, data = await self.service.task_result(session.username,
                                                    request.path_params["task"])
        media = "text/csv; charset=utf-8" if task.format == "csv" else "application/json"
        filename = f"{task.room}-{task.created_at[:10]}.{task.format}"
        return Response(data, media_type=media, headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "private, no-store",
        })


def _json_event(event: str, data: dict[str, object]) -> bytes:
    return encode_event(json.dumps(data, ensure_ascii=False, separators=(",", ":")),
                        event=event)


class AssistantStream(Response):
    """A private reply as `text/event-stream`: `delta` events (`{"text"}`) as it arrives,
    then `done` (`{"text"}`: all of it) or `error` (`{"error", "text"}`: what came before).

    The upstream request lives in this coroutine: when the caller goes away, the failed
    send unwinds it and the endpoint's connection is closed, with no watcher task."""

    media_type = "text/event-stream"

    def __init__(self, reply: contextlib.AbstractAsyncContextManager[
            AsyncIterator[str]]) -> None:
        self.status_code = 200
        self.background = None
        self.body = b""
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"private, no-cache, no-store"),
            (b"x-accel-buffering", b"no"),
        ]
        self._reply = reply

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": self.raw_headers})
        # The body has been read: the next message is the caller leaving (the server
        # reports it; a send to a closed connection does not fail), which stops the reply.
        streaming = asyncio.create_task(self._stream(send))
        left = False

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            left = True
            streaming.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await streaming
        except asyncio.CancelledError:
            if not left:
                raise
        finally:
            watcher.cancel()

    async def _stream(self, send: Send) -> None:
        text: list[str] = []
        try:
            async with self._reply as pieces:
                async for piece in pieces:
                    text.append(piece)
                    await send({"type": "http.response.body",
                                "body": _json_event("delta", {"text": piece}),
                                "more_body": True})
            last = _json_event("done", {"text": "".join(text)})
        except TidingsError as exc:  # AssistantFailed, or the database went away
            last = _json_event("error", {"error": exc.message, "text": "".join(text)})
        except TimeoutError:
            last = _json_event("error", {"error": "the reply took too long",
                                         "text": "".join(text)})
        await send({"type": "http.response.body", "body": last, "more_body": False})


class ChatStreams:
    """Presence: wraps the hub's endpoint for subscriptions that carry a chat session.

    The user is online from the moment the hub answers 200 until the stream ends, in the
    rooms whose topics (`topic=/chat/rooms/NAME`) the subscription names. Other
    subscriptions (no session cookie) go straight to the hub, at no cost."""

    def __init__(self, service: ChatService) -> None:
        self.service = service

    @staticmethod
    def wants(scope: Scope) -> bool:
        if scope["method"] != "GET":
            return False
        for name, value in scope["headers"]:
            if name == b"cookie" and _SESSION_COOKIE_BYTES in value:
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send,
                       inner: ASGIApp) -> None:
        parts = RequestParts(scope)
        user = await self.service.stream_user(parts.cookies.get(SESSION_COOKIE))
        if user is None:
            await inner(scope, receive, send)
            return
        topics = [value for name, value in parts.query_list
                  if name in ("topic", "match", "matchExact")]
        del parts
        service = self.service
        opened: list[Connection] = []

        async def tracking_send(message: Message) -> None:
            if (message["type"] == "http.response.start" and message["status"] == 200
                    and not opened):
                opened.append(service.stream_opened(user, topics))
            await send(message)

        try:
            await inner(scope, receive, tracking_send)
        finally:
            for connection in opened:
                service.stream_closed(connection)

    def wrap(self, inner: ASGIApp) -> ASGIApp:
        """The hub's endpoint with this gate in front (for the routed path)."""
        return _Gated(self, inner)


class _Gated:
    def __init__(self, gate: ChatStreams, inner: ASGIApp) -> None:
        self.gate = gate
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.gate.wants(scope):
            await self.gate(scope, receive, send, self.inner)
        else:
            await self.inner(scope, receive, send)


# -- the OpenAPI description of the routes above (spliced into /openapi.json) -------------

_ERR = {"description": "Error", "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/Error"}}}}
_OBJECT = {"content": {"application/json": {"schema": {"type": "object"}}}}
# (path, method, summary, request body, success status)
_OPERATIONS: tuple[tuple[str, str, str, bool, str], ...] = (
    ("/api/auth/signup", "post", "Sign up ({username, password}); sets the session cookies",
     True, "201"),
    ("/api/auth/login", "post", "Log in ({username, password}); sets the session cookies",
     True, "200"),
    ("/api/auth/logout", "post", "Log out: ends the session, clears the cookies", False, "204"),
    ("/api/me", "get", "The signed-in user and what its page subscribes to", False, "200"),
    ("/api/users", "get", "Every user, with whether they are online", False, "200"),
    ("/api/rooms", "get", "Rooms: members, joined, unread, online", False, "200"),
    ("/api/rooms", "post", "Create a room ({name}) and join it", True, "201"),
    ("/api/rooms/{room}", "get", "One room", False, "200"),
    ("/api/rooms/{room}/join", "post", "Join a room", False, "200"),
    ("/api/rooms/{room}/leave", "post", "Leave a room", False, "200"),
    ("/api/rooms/{room}/members", "get", "A room's members", False, "200"),
    ("/api/rooms/{room}/presence", "get", "Who is online in a room", False, "200"),
    ("/api/rooms/{room}/messages", "get",
     "History, newest first (?before=ID&limit=N)", False, "200"),
    ("/api/rooms/{room}/messages", "post", "Post a message ({content})", True, "201"),
    ("/api/rooms/{room}/messages/{id}", "patch", "Edit one's own message", True, "200"),
    ("/api/rooms/{room}/messages/{id}", "delete", "Delete one's own message", False, "204"),
    ("/api/rooms/{room}/typing", "post", "Say one is typing (ephemeral)", False, "202"),
    ("/api/rooms/{room}/read", "post", "Mark read ({id} optional)", False, "200"),
    ("/api/rooms/{room}/export", "post", "Export the history ({format}: json or csv)",
     False, "202"),
    ("/api/dm", "get", "One's direct conversations, with unread counts", False, "200"),
    ("/api/dm/{user}/messages", "get", "Direct messages with a user, newest first",
     False, "200"),
    ("/api/dm/{user}/messages", "post", "Send a direct message ({content})", True, "201"),
    ("/api/dm/{user}/messages/{id}", "patch", "Edit one's own direct message", True, "200"),
    ("/api/dm/{user}/messages/{id}", "delete", "Delete one's own direct message", False,
     "204"),
    ("/api/dm/{user}/typing", "post", "Say one is typing (ephemeral)", False, "202"),
    ("/api/dm/{user}/read", "post", "Mark read ({id} optional)", False, "200"),
    ("/api/messages/{id}", "patch", "Edit one's own message", True, "200"),
    ("/api/messages/{id}", "delete", "Delete one's own message", False, "204"),
    ("/api/rooms/{room}/assistant", "post",
     "Ask the assistant privately ({prompt}): text/event-stream of `delta` events "
     "({text}), then `done` ({text}) or `error` ({error, text})", True, "200"),
    ("/api/rooms/{room}/assistant/{id}/cancel", "post",
     "Stop a streaming reply of the assistant (the person who asked only); it keeps its "
     "text, marked cancelled", False, "200"),
    ("/api/notifications", "post",
     "Notify a user ({user, message, type}); needs a publisher token", True, "202"),
    ("/api/tasks/{task}", "get", "A task's state (its owner only)", False, "200"),
    ("/api/tasks/{task}/download", "get", "A finished export (its owner only)", False, "200"),
)


def openapi_paths() -> dict[str, dict[str, object]]:
    """The chat's routes for the OpenAPI document (the page at / is described there).
    Every call takes the session as the `tidings_session` cookie or a bearer token."""
    paths: dict[str, dict[str, object]] = {}
    for path, method, summary, body, status in _OPERATIONS:
        operation: dict[str, object] = {
            "summary": summary,
            "tags": ["chat"],
            "security": [{"bearer": []}],
            "responses": {
                status: {"description": "OK", **({} if status == "204" else _OBJECT)},
                **{code: _ERR for code in ("400", "401", "403", "404", "409", "422", "429")},
            },
        }
        names = re.findall(r"\{(\w+)\}", path)
        if names:
            operation["parameters"] = [{"name": name, "in": "path", "required": True,
                                        "schema": {"type": "string"}} for name in names]
        if body:
            operation["requestBody"] = {"required": True, **_OBJECT}
        if path.endswith("/assistant"):
            operation["responses"][status] = {  # type: ignore[index]
                "description": "The reply as it arrives", "content": {
                    "text/event-stream": {"schema": {"type": "string"}}}}
        paths.setdefault(path, {})[method] = operation
    return paths
