"""Tidings: a real-time update hub speaking the Mercure protocol over Server-Sent Events.

    from tidings import Client
    async with Client("http://127.0.0.1:8000", token=TOKEN) as client:
        await client.publish("/books/1", '{"title": "Dune"}')

The names below are imported on first use (PEP 562), not with the package: `import
tidings.sse` needs the standard library alone and `import tidings.hub` no web or client
code, so a program pays only for the parts it touches. Type checkers read the imports in
the `TYPE_CHECKING` block; `tests/unit/test_exported_members.py` keeps the two lists, and
`__all__`, in step.
"""

from importlib import import_module as _import_module
from typing import TYPE_CHECKING

from tidings.version import __version__

if TYPE_CHECKING:
    from tidings.client import Client, PublishError
    from tidings.errors import TidingsError
    from tidings.hub.hub import Hub, HubConfig
    from tidings.hub.update import Update
    from tidings.sse import Event, EventParser, encode_event

__all__ = [
    "Client",
    "Event",
    "EventParser",
    "Hub",
    "HubConfig",
    "PublishError",
    "TidingsError",
    "Update",
    "__version__",
    "encode_event",
]

# Each exported name and the module that defines it.
_LAZY: dict[str, str] = {
    "Client": "tidings.client",
    "Event": "tidings.sse",
    "EventParser": "tidings.sse",
    "Hub": "tidings.hub.hub",
    "HubConfig": "tidings.hub.hub",
    "PublishError": "tidings.client",
    "TidingsError": "tidings.errors",
    "Update": "tidings.hub.update",
    "encode_event": "tidings.sse",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tidings' has no attribute {name!r}")
    value = getattr(_import_module(module), name)
    globals()[name] = value  # found once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return list(__all__)
