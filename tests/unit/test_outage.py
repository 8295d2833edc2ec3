"""An outage is told once: the first failure logs that the storage is unavailable and
what clients get meanwhile, the first success after it how long it lasted; what fails in
between is only counted. And what a SQLite error becomes: 507 for a full disk, 503 else."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from tidings.errors import InsufficientStorage, ServiceUnavailable
from tidings.outage import Outage
from tidings.sqlitedb import storage_error


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def test_an_outage_logs_when_it_starts_and_when_it_ends(caplog: pytest.LogCaptureFixture,
                                                        ) -> None:
    clock = Clock()
    outage = Outage("the bus", clock=clock)
    caplog.set_level(logging.DEBUG, logger="tidings.outage")
    outage.ok()  # nothing to end
    assert not outage.down and messages(caplog) == []
    assert outage.failed(ConnectionError("refused")) is True
    for _ in range(99):
        assert outage.failed(ConnectionError("refused")) is False
    assert outage.down
    clock.now += 2.5
    outage.ok()
    outage.ok()
    assert not outage.down
    assert messages(caplog) == [
        "the bus is unavailable (refused): publishes answer 503 until it is back",
        "the bus is back after 2.5 s (100 operations failed meanwhile)",
    ]
    assert all(record.levelno == logging.WARNING for record in caplog.records)


def test_a_second_outage_is_told_again_with_its_own_consequence(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outage = Outage("the disk", clock=Clock())
    caplog.set_level(logging.WARNING, logger="tidings.outage")
    outage.failed("full")
    outage.ok()
    outage.failed("full", consequence="publishes answer 507")
    outage.failed("full")
    assert messages(caplog)[-1] == "the disk is unavailable (full): publishes answer 507"
    assert "(1 operations failed" in messages(caplog)[1]
    assert outage.outages == 2  # outages begun, not operations failed


def test_an_operation_under_way_when_the_outage_began_does_not_end_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    outage = Outage("the bus", clock=clock)
    caplog.set_level(logging.WARNING, logger="tidings.outage")
    began = outage.now()
    clock.now += 0.1
    outage.failed("reset")
    clock.now += 0.1
    outage.ok(began)  # sent before the failure, answered after it
    assert outage.down
    outage.ok(outage.now())
    assert not outage.down and len(caplog.records) == 2


def _error(code: int, message: str) -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError(message)
    exc.sqlite_errorcode = code
    return exc


@pytest.mark.parametrize(("code", "status", "words"), [
    (sqlite3.SQLITE_FULL, 507, "is full (database or disk is full): free space"),
    (sqlite3.SQLITE_IOERR_WRITE, 503, "cannot be used: disk I/O error"),  # EFBIG, EIO
    (sqlite3.SQLITE_BUSY, 503, "is busy"),
    (sqlite3.SQLITE_READONLY, 503, "cannot be used"),
])
def test_a_sqlite_error_becomes_507_for_a_full_disk_and_503_otherwise(
    code: int, status: int, words: str
) -> None:
    message = {507: "database or disk is full", 503: "disk I/O error"}[status]
    error = storage_error(_error(code, message), "the database")
    assert isinstance(error, ServiceUnavailable) and error.status_hint == status
    assert isinstance(error, InsufficientStorage) == (status == 507)
    assert error.message.startswith("the database ") and words in error.message
    assert error.retry_after_s > 0


def test_the_error_code_decides_not_the_message() -> None:
    """An I/O error whose text reads like a full disk is still a 503: the status comes
    from SQLite's error code, not from words in the message."""
    error = storage_error(_error(sqlite3.SQLITE_IOERR_WRITE, "database or disk is full"), "x")
    assert error.status_hint == 503 and not isinstance(error, InsufficientStorage)
