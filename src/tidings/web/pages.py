"""The static side: the hub's status page and debugger (`/hub`, and `/` when the chat is
off) and the files under `/static`."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

__all__ = ["STATIC", "hub_page_routes", "static_files"]

STATIC = Path(__file__).parent / "static"


async def hub_page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html")


def hub_page_routes(*, at_root: bool) -> list[BaseRoute]:
    """`/hub`, and `/` too when nothing else (the chat) is served there."""
    return [*([Route("/", hub_page)] if at_root else []), Route("/hub", hub_page)]


def static_files() -> Mount:
    return Mount("/static", StaticFiles(directory=STATIC), name="static")
