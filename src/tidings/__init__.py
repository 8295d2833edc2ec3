"""Tidings: a real-time update hub speaking the Mercure protocol over Server-Sent Events.

    from tidings import Client
    async with Client("http://127.0.0.1:8000", token=TOKEN) as client:
        await client.publish("/books/1", '{"title": "Dune"}')
"""

from tidings.client import Client, PublishError
from tidings.errors import TidingsError
from tidings.hub.hub import Hub, HubConfig
from tidings.hub.update import Update
from tidings.sse import Event, EventParser, encode_event

__version__ = "0.1.0"

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
