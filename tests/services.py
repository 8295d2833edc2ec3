"""Which external services the tests may use. Outside CI a missing service skips its
tests with the reason; under CI=true it fails them, so CI cannot pass by skipping."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest

POSTGRES_URL = os.environ.get("TIDINGS_TEST_POSTGRES_URL", "postgresql://127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TIDINGS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 2):
            return True
    except OSError:
        return False


def require(url: str) -> str:
    """The URL, if its server answers; else skip (or fail under CI=true)."""
    if not _reachable(url):
        message = f"no server at {url} (set TIDINGS_TEST_*_URL)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return url
