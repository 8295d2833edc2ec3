"""The chat's HTTP side: thin routes over `tidings.chat.ChatService`, and the page.

    POST   /api/auth/signup | /api/auth/login     {"username", "password"} -> the user
    POST   /api/auth/logout                       204
    GET    /api/me                                the user, what its page subscribes to
    GET    /api/session                           {"user": /api/me's answer, or null}
    GET    /api/users                             everyone, with `online`
    GET    /api/rooms             POST {"name"}   rooms (members, joined, unread, online)
    GET    /api/rooms/R           POST .../join, .../leave
    GET    /api/rooms/R/messages?before=ID&limit=N      newest first, and last_event_id
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

Beside it: the presence gate in front of the hub's endpoint (`web/chat_streams.py`), the
streamed private answer (`web/assistant_stream.py`), and these routes' OpenAPI description
(`web/openapi.py`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tidings.chat.accounts import Session
from tidings.chat.errors import InvalidInput, InvalidJSON, NoSession
from tidings.chat.model import Conversation, notifications_topic
from tidings.chat.service import ChatService
from tidings.errors import (
    Forbidden,
    PayloadTooLarge,
    RetryLater,
    TidingsError,
    TokenMissing,
    Unauthorized,
)
from tidings.hub.auth import KeyConfig
from tidings.web.access import RequestParts, publisher_claims
from tidings.web.assistant_stream import AssistantStream
from tidings.web.errors import handles_errors
from tidings.web.json_input import parse_json_object

__all__ = ["HUB_COOKIE", "SESSION_COOKIE", "ChatAPI"]

SESSION_COOKIE = "tidings_session"
HUB_COOKIE = "mercureAuthorization"
HUB_PATH = "/.well-known/mercure"
PAGE = Path(__file__).parent / "static" / "chat" / "index.html"
_MAX_BODY = 64 * 1024


def _error(exc: TidingsError) -> Response:
    body: dict[str, object] = {"error": exc.message, "status": exc.status_hint}
    headers: dict[str, str] = {}
    if isinstance(exc, InvalidInput):
        body["field"] = exc.field
    if isinstance(exc, RetryLater):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, TokenMissing):
        headers["WWW-Authenticate"] = 'Bearer realm="tidings"'
    elif isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="tidings", error="invalid_token"'
    return JSONResponse(body, status_code=exc.status_hint, headers=headers)


_handles_errors = handles_errors(_error)


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
        # A room and a direct conversation take the same calls (`_conversation` tells
        # which one the path names). First: Starlette tries routes in order, and these
        # are the busiest (no other pattern matches their paths).
        routes: list[BaseRoute] = []
        for conversation in ("/api/rooms/{room}", "/api/dm/{user}"):
            routes += [
                r(conversation + "/messages", self.messages, methods=["GET", "POST"]),
                r(conversation + "/messages/{id}", self.message, methods=["PATCH", "DELETE"]),
                r(conversation + "/typing", self.typing, methods=["POST"]),
                r(conversation + "/read", self.read, methods=["POST"]),
            ]
        return [
            *routes,
            r("/", self.page, methods=["GET"]),
            r("/api/auth/signup", self.signup, methods=["POST"]),
            r("/api/auth/login", self.login, methods=["POST"]),
            r("/api/auth/logout", self.logout, methods=["POST"]),
            r("/api/me", self.me, methods=["GET"]),
            r("/api/session", self.session_info, methods=["GET"]),
            r("/api/users", self.users, methods=["GET"]),
            r("/api/rooms", self.rooms, methods=["GET", "POST"]),
            r("/api/rooms/{room}", self.room, methods=["GET"]),
            r("/api/rooms/{room}/join", self.join, methods=["POST"]),
            r("/api/rooms/{room}/leave", self.leave, methods=["POST"]),
            r("/api/rooms/{room}/members", self.members, methods=["GET"]),
            r("/api/rooms/{room}/presence", self.presence, methods=["GET"]),
            r("/api/rooms/{room}/export", self.export, methods=["POST"]),
            r("/api/rooms/{room}/assistant", self.ask, methods=["POST"]),
            r("/api/rooms/{room}/assistant/{id}/cancel", self.cancel_reply,
              methods=["POST"]),
            r("/api/dm", self.dms, methods=["GET"]),
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
            return parse_json_object(raw, "the body")
        except ValueError as exc:
            raise InvalidJSON(str(exc)) from None

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
            return await self.service.room(params["room"])
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

    async def _me(self, request: Request) -> tuple[dict[str, object], Session | None]:
        """/api/me's answer, and a fresh session when the current one is due for it."""
        session = await self._session(request)
        fresh = await self.service.refresh(session)
        return await self.service.me(fresh or session), fresh

    @_handles_errors
    async def me(self, request: Request) -> Response:
        me, fresh = await self._me(request)
        response = JSONResponse(me)
        return self._with_session(response, request, fresh) if fresh else response

    @_handles_errors
    async def session_info(self, request: Request) -> Response:
        """Whether the caller is signed in, as a 200 either way: the page asks this on
        load, where /api/me's 401 would be logged in the console of everyone who has not
        signed in yet."""
        try:
            me, fresh = await self._me(request)
        except NoSession:
            response = JSONResponse({"user": None})
            # A session that ended: its cookies go too.
            stale = _session_token(RequestParts(request.scope)) is not None
            return self._with_session(response, request, None) if stale else response
        response = JSONResponse({"user": me})
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

    async def _for_room(self, request: Request,
                         call: Callable[[str, str], Awaitable[object]]) -> Response:
        """`call(me, room)`'s answer, for the signed-in user and the room in the path."""
        session = await self._session(request)
        return JSONResponse(await call(session.username, request.path_params["room"]))

    @_handles_errors
    async def room(self, request: Request) -> Response:
        return await self._for_room(request, self.service.room_info)

    @_handles_errors
    async def join(self, request: Request) -> Response:
        return await self._for_room(request, self.service.join)

    @_handles_errors
    async def leave(self, request: Request) -> Response:
        return await self._for_room(request, self.service.leave)

    @_handles_errors
    async def members(self, request: Request) -> Response:
        await self._session(request)
        room = request.path_params["room"]
        return JSONResponse({"room": room, "members": await self.service.members(room)})

    @_handles_errors
    async def presence(self, request: Request) -> Response:
        await self._session(request)
        return JSONResponse(await self.service.presence_of(request.path_params["room"]))

    @_handles_errors
    async def dms(self, request: Request) -> Response:
        session = await self._session(request)
        return JSONResponse({"conversations": await self.service.dms(session.username)})

    # -- messages ------------------------------------------------------------------------

    @_handles_errors
    async def messages(self, request: Request) -> Response:
        if request.method == "POST":
            session, unchecked = await self.service.posting_session(
                _session_token(RequestParts(request.scope)))
            conversation = await self._conversation(request, session.username)
            body = await self._body(request)
            message = await self.service.post(session.username, conversation,
                                              body.get("content"),
                                              session if unchecked else None)
            return JSONResponse(message.to_json(), status_code=201)
        session = await self._session(request)
        conversation = await self._conversation(request, session.username)
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
        conversation = await self.service.room(request.path_params["room"])
        body = await self._body(request)
        reply = await self.service.private_reply(session.username, conversation,
                                                 body.get("prompt"))
        return AssistantStream(reply)

    @_handles_errors
    async def cancel_reply(self, request: Request) -> Response:
        session = await self._session(request)
        conversation = await self.service.room(request.path_params["room"])
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
