"""A replication slot read over the streaming replication protocol (`START_REPLICATION`).

The SQL functions (`pg_logical_slot_peek_binary_changes`, `pg_replication_slot_advance`)
start a new decoding context on every call, which decodes the WAL again from the slot's
restart point, and the tailer called two of them per step. A replication connection
keeps one context for as long as it is open: the server's WAL sender decodes each record
once, as soon as it is flushed, and pushes what the publication holds. This module holds
that connection and collects what it pushes; `decoding.py`'s step takes the
transactions that committed before its WAL position and copies them into the change log,
as it does with what a peek returned.

asyncpg does not speak the replication sub-protocol (CopyBoth); psycopg2 (libpq) does,
with every authentication method and TLS setting libpq has. Its replication cursor reads
without blocking, so the event loop reads the socket (every _READ_EVERY_S, and whenever
it is readable while a step waits); only the connect runs in a thread.

Positions (`position`): every message of the stream carries a WAL position, and a
keepalive the position the WAL sender has decoded through. Whatever position the stream
has shown, every transaction that committed before it has arrived whole (the WAL sender
sends a transaction at its commit record, in commit order, and the socket keeps the
order). So once `position` >= L, the transactions committing before L are all here.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from typing import Any

from tidings.pgdb import url_keeping

__all__ = ["SlotBusy", "SlotStream", "StreamUnavailable", "libpq_dsn"]

_CONNECT_TIMEOUT_S = 10
# While no step waits, the socket is read this often, not whenever it is readable: the
# WAL sender sends each transaction as it decodes it, and a wake-up per transaction cost
# more CPU than the SQL functions did (thousands a second under load). A step reads
# at once what has come, and then whenever more comes until it has what it needs.
_READ_EVERY_S = 0.05
# And not at all while this many messages wait for a step (the WAL sender then waits on
# the socket): a tailer that cannot publish does not buffer the WAL in memory. A step
# that finds this many before its position takes the whole transactions among them
# (`complete`), and the next step goes on from there.
_MAX_WAITING = 100_000
_OBJECT_IN_USE = "55006"
# The URL parameters libpq knows. asyncpg takes any other as a server setting
# (`?search_path=`), which libpq refuses and a replication connection does not need.
_LIBPQ_PARAMS = frozenset({
    "host", "hostaddr", "port", "dbname", "user", "password", "passfile", "channel_binding",
    "connect_timeout", "client_encoding", "options", "application_name",
    "fallback_application_name", "keepalives", "keepalives_idle", "keepalives_interval",
    "keepalives_count", "tcp_user_timeout", "sslmode", "requiressl", "sslcompression",
    "sslcert", "sslkey", "sslpassword", "sslcertmode", "sslrootcert", "sslcrl", "sslcrldir",
    "sslsni", "requirepeer", "ssl_min_protocol_version", "ssl_max_protocol_version",
    "gssencmode", "krbsrvname", "gsslib", "gssdelegation", "service", "target_session_attrs",
    "load_balance_hosts"
})


class StreamUnavailable(Exception):
    """The server refused a replication connection, or the stream ended."""


class SlotBusy(StreamUnavailable):
    """Another session reads the slot (a WAL sender of another process, or SQL)."""


@dataclass(slots=True)
class _Transaction:
    commit_lsn: int  # where its commit record starts (pgoutput's Begin has it)
    end_lsn: int  # where it ends (its Commit message's position)
    end: int  # the index in `_messages` after its Commit


@dataclass(slots=True)
class SlotStream:
    """One replication connection streaming a slot's `pgoutput` messages (module doc)."""

    _conn: Any
    _cursor: Any
    position: int = 0
    _messages: list[tuple[int, bytes]] = field(default_factory=list)
    _done: list[_Transaction] = field(default_factory=list)  # whole, in commit order
    _open_commit: int | None = None  # the commit LSN of the transaction arriving
    _moved: asyncio.Event = field(default_factory=asyncio.Event)
    _error: BaseException | None = None
    _watching: bool = False  # reading whenever the socket is readable (a step waits)
    _timer: asyncio.TimerHandle | None = None
    limit: int = _MAX_WAITING  # messages kept waiting for a step, at most

    @classmethod
    async def open(cls, dsn: str, slot: str, publication: str, *,
                   application_name: str) -> SlotStream:
        """Stream `slot` from where it was confirmed. Raises SlotBusy when another
        session holds it, StreamUnavailable when there is no replication connection."""
        starting = asyncio.ensure_future(asyncio.to_thread(
            _start, dsn, slot, publication, application_name))
        try:
            conn, cursor = await asyncio.shield(starting)
        except asyncio.CancelledError:
            # The thread goes on: close what it opens, or the slot stays held.
            starting.add_done_callback(_close_started)
            raise
        stream = cls(conn, cursor)
        stream._every()
        return stream

    # -- what the step uses ----------------------------------------------------------------

    async def reach(self, lsn: int, timeout_s: float) -> bool:
        """Whether the stream shows `lsn` (asking the server where it is), waiting at most
        `timeout_s`; false too as soon as it keeps `limit` messages, whole transactions
        among them (`full`). Raises StreamUnavailable when the stream has ended."""
        self._read()
        self._check()
        if self.position >= lsn:
            return True
        try:
            self._cursor.send_feedback(reply=True)  # a keepalive with its position
        except Exception as exc:  # (psycopg2's OperationalError, InterfaceError)
            self._fail(exc)
            self._check()
        self._watch(True)
        try:
            async with asyncio.timeout(timeout_s):
                while self.position < lsn:
                    if self.full:
                        return False
                    self._moved.clear()
                    await self._moved.wait()
                    self._check()
        except TimeoutError:
            return False
        finally:
            self._watch(False)
        return True

    @property
    def waiting(self) -> bool:
        """Messages wait for a step (a transaction of the publication's tables came)."""
        return bool(self._messages)

    def before(self, lsn: int) -> tuple[list[tuple[int, bytes]], int]:
        """The messages of the transactions that committed before `lsn`, and how many
        transactions that is (`consume`'s argument once they are in the log)."""
        count = 0
        while count < len(self._done) and self._done[count].commit_lsn < lsn:
            count += 1
        end = self._done[count - 1].end if count else 0
        return self._messages[:end], count

    @property
    def full(self) -> bool:
        """`limit` messages wait, whole transactions among them."""
        return len(self._messages) >= self.limit and bool(self._done)

    def complete(self) -> tuple[list[tuple[int, bytes]], int, int]:
        """The messages of every whole transaction kept, how many transactions, and the
        position where the last one ends (a step of `full` stream goes that far)."""
        return self._messages[:self._done[-1].end], len(self._done), self._done[-1].end_lsn

    def consume(self, transactions: int) -> None:
        """Forget the first `transactions` (their rows are committed in the log)."""
        if not transactions:
            return
        end = self._done[transactions - 1].end
        del self._messages[:end]
        del self._done[:transactions]
        for done in self._done:
            done.end -= end

    def confirm(self, lsn: int) -> None:
        """The slot may move to `lsn`: everything before it is in the log."""
        try:
            self._cursor.send_feedback(write_lsn=lsn, flush_lsn=lsn, force=True)
        except Exception as exc:
            self._fail(exc)

    def close(self) -> None:
        if self._error is None:
            self._fail(None)

    @property
    def closed(self) -> bool:
        return self._error is not None

    # -- reading ---------------------------------------------------------------------------

    def _read(self) -> None:
        """Take the messages the socket has, until `full` (it also answers the server's
        keepalives). Those left wait in libpq's buffer, then the socket's, then the WAL
        sender's: the memory a backlog takes is bounded."""
        if self._error is not None:
            return
        try:
            while not self.full and (message := self._cursor.read_message()) is not None:
                self._take(int(message.data_start), bytes(message.payload))
            self.position = max(self.position, int(self._cursor.wal_end))
        except Exception as exc:
            self._fail(exc)
            return
        self._moved.set()

    def _every(self) -> None:
        """Read every _READ_EVERY_S while no step waits (`_read` stops at `full`)."""
        if not self._watching:
            self._read()
        if self._error is None:
            self._timer = asyncio.get_running_loop().call_later(_READ_EVERY_S, self._every)

    def _take(self, lsn: int, data: bytes) -> None:
        kind = data[:1]
        if kind == b"B":
            (self._open_commit,) = struct.unpack_from("!q", data, 1)
        elif self._open_commit is None:
            return  # a message outside any transaction (`pg_logical_emit_message`, false)
        self._messages.append((lsn, data))
        if kind == b"C":
            self._done.append(_Transaction(self._open_commit, lsn, len(self._messages)))
            self._open_commit = None
        # Any message's position: the WAL sender has sent every transaction that
        # committed before it (module doc).
        self.position = max(self.position, lsn)

    def _watch(self, on: bool) -> None:
        if on and not self._watching and self._error is None:
            asyncio.get_running_loop().add_reader(self._conn.fileno(), self._read)
        elif not on and self._watching:
            asyncio.get_running_loop().remove_reader(self._conn.fileno())
        self._watching = on and self._error is None

    def _fail(self, exc: BaseException | None) -> None:
        """End the stream: closed (`exc` None) or failed."""
        self._watch(False)
        if self._timer is not None:
            self._timer.cancel()
        self._error = StreamUnavailable("the replication stream was closed" if exc is None
                                        else f"the replication stream ended: {exc}".strip())
        self._moved.set()
        if not self._conn.closed:
            self._conn.close()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error


def libpq_dsn(dsn: str) -> str:
    """`dsn` (a URL asyncpg takes) without the parameters libpq does not know."""
    return url_keeping(dsn, _LIBPQ_PARAMS.__contains__)


def _close_started(starting: asyncio.Future[tuple[Any, Any]]) -> None:
    if not starting.cancelled() and starting.exception() is None:
        starting.result()[0].close()


def _start(dsn: str, slot: str, publication: str, application_name: str) -> tuple[Any, Any]:
    """Connect and start streaming (blocking: in a thread)."""
    try:
        import psycopg2
        from psycopg2.extras import LogicalReplicationConnection
    except ImportError:
        raise StreamUnavailable("psycopg2 is not installed (pip install "
                                "'tidings[postgres]')") from None
    try:
        conn = psycopg2.connect(libpq_dsn(dsn), connection_factory=LogicalReplicationConnection,
                                connect_timeout=_CONNECT_TIMEOUT_S,
                                application_name=application_name[:63])
    except psycopg2.Error as exc:
        raise StreamUnavailable(str(exc).strip()) from None
    try:
        cursor = conn.cursor()
        cursor.start_replication(
            slot_name=slot, decode=False,
            options={"proto_version": "1", "publication_names": publication,
                     "messages": "true"})
    except psycopg2.Error as exc:
        conn.close()
        error = SlotBusy if exc.pgcode == _OBJECT_IN_USE else StreamUnavailable
        raise error(str(exc).strip()) from None
    except BaseException:
        conn.close()
        raise
    return conn, cursor
