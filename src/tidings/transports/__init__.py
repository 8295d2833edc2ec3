"""Where updates travel and are kept: implementations of the hub's port
(`tidings.hub.transport.Transport`). The URL scheme picks the implementation."""

from __future__ import annotations

from urllib.parse import urlsplit

from tidings.errors import BadRequest
from tidings.hub.transport import Transport

__all__ = ["open_transport"]


def open_transport(
    url: str, *, history_size: int = 100_000, history_max_age_s: float = 0.0
) -> Transport:
    """`sqlite:///relative.db`, `sqlite:////absolute.db`, or `memory://` (no file)."""
    scheme = urlsplit(url).scheme
    if scheme in ("sqlite", "memory"):
        from tidings.transports.sqlite import SQLiteTransport

        path = ":memory:" if scheme == "memory" else url.split("sqlite:///", 1)[-1]
        if not path:
            raise BadRequest(f"no file in the database URL {url!r}")
        return SQLiteTransport(
            path, history_size=history_size, history_max_age_s=history_max_age_s
        )
    if scheme in ("redis", "rediss"):
        from tidings.transports.redis import RedisTransport

        return RedisTransport(
            url, history_size=history_size, history_max_age_s=history_max_age_s
        )
    if scheme in ("postgresql", "postgres"):
        from tidings.transports.postgres import PostgresTransport

        return PostgresTransport.from_url(
            url, history_size=history_size, history_max_age_s=history_max_age_s
        )
    raise BadRequest(f"unsupported database URL {url!r}: use sqlite:///FILE or memory://")
