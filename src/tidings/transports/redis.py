"""The shared bus on Redis Streams: every process on one namespace sees one history.

Each update is an entry of the stream `NAME:updates`; its entry id `ms-n` is the update's
position, so `seq` is the same on every process. Appends run as one Lua script, which makes
"store once per retried publish" and the id index atomic: the hash `NAME:ids` maps an
update id to the entry of its newest use, and the sorted set `NAME:id-ages` scores each id
by that entry's millisecond so the index is trimmed along with the stream. `tail` follows
the stream with XREAD BLOCK on a pool of its own, so a blocked read never holds up an
append; when the connection drops it raises and the hub resumes from its last seq.
Retention: XADD's `MAXLEN ~` (count) and `XTRIM MINID ~` (age) on every append, both
exact in `prune()`.

Outages. While Redis is away every command fails fast and a publish answers 503: nothing
is acknowledged that Redis did not take. With `appendonly yes` and `appendfsync always`
Redis comes back with every update it acknowledged, and the tail carries on from its last
seq (with `everysec` it answers before it writes while a background fsync is slow, so a
crash may lose the last second or two; `start` warns of either setting). Without
persistence it comes back empty (a reset). To notice, each namespace carries an epoch,
`NAME:epoch`, a random value written once (by whichever process comes first, and by every
append if it is missing); a process learns it at start and, each time its tail
reconnects, compares: a different epoch, a stream whose last id is below what the process
read, or one that no longer holds the entry the process read last while it holds older
ones (both as when the last writes to an `appendfsync everysec` file were lost) means the
history it relied on is gone. The process says so once, then serves what is published
from then on. A subscriber resuming from an id that went with the old history is told
what the protocol says for an unknown id: `earliest`, a replay of all that remains.

Seqs never go backwards across a reset: the entry ids of a new stream come from the
server's clock, and should that clock stand behind the lost history, the append script
places the entry just above the newest seq this process has seen (as it does for a full
millisecond), so no fan-out cursor is left waiting above the new entries.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import RedisError

from tidings.errors import BadRequest, ServiceUnavailable, TransportClosed
from tidings.hub.update import Update
from tidings.outage import Outage, OutageHealth

__all__ = ["RedisTransport", "entry_id_from_seq", "seq_from_entry_id"]

log = logging.getLogger(__name__)

# seq = (ms << 20) | n for the entry id "ms-n". n counts the entries added within one
# millisecond (or while the server clock stands behind the newest id): a single Redis
# manages a few hundred XADDs per millisecond, far from 2**20 (about a million). The append
# script also moves an entry whose n would reach 2**20 to the next millisecond, so even a
# clock stepped back under heavy load cannot break the encoding. seq stays below 2**63.
_N_BITS = 20
_N_LIMIT = 1 << _N_BITS

# XREAD BLOCK returns at least this often; the tail's socket timeout is set above it, so a
# peer that vanished without closing the connection (a network partition) is noticed.
_BLOCK_MS = 5000
_TAIL_SOCKET_TIMEOUT_S = _BLOCK_MS / 1000 + 5.0
_TAIL_BATCH = 1000
# Redis runs commands one at a time, so more connections per process add nothing but load
# on the server; a burst of publishes waits for a free one (then 503 after the timeout).
_MAX_CONNECTIONS = 32
_POOL_WAIT_S = 5.0
# Index entries dropped per append at most; `prune()` drops all. MAXLEN ~ removes whole
# stream nodes (100 entries by default), so this keeps up while bounding each script's work.
_INDEX_TRIM_BUDGET = 1024

_NAMESPACE = re.compile(r"[A-Za-z0-9_.:-]{1,100}")

# Commands fail fast when Redis is down, so a publish answers 503 instead of hanging: at
# once when the connection is refused, after three socket timeouts when the server is
# silent. Retrying an append is safe: the script stores a repeated update once.
_CLIENT_DEFAULTS: dict[str, object] = {
    "socket_connect_timeout": 2.0,
    "socket_timeout": 5.0,
    "retry": Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), 2),
}

# KEYS: stream, ids hash, id-ages sorted set. Drops index entries of updates older than the
# stream's first entry (at millisecond granularity: an id left pointing at a removed entry
# of that same millisecond resolves to nothing, which is what a pruned id must do).
_TRIM_INDEX = """
local function trim_index(budget)
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  local bound = '+inf'
  if #first > 0 then bound = '(' .. string.match(first[1][1], '^(%d+)') end
  while budget > 0 do
    local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', bound, 'LIMIT', 0,
                             math.min(budget, 512))
    if #stale == 0 then return end
    redis.call('HDEL', KEYS[2], unpack(stale))
    redis.call('ZREM', KEYS[3], unpack(stale))
    budget = budget - #stale
  end
end
"""

# KEYS: stream, ids hash, id-ages sorted set, epoch. ARGV: id, topics, data, private, type,
# retry, created_at, frame, maxlen, max_age_ms, index trim budget, floor (the entry id of
# the newest seq the caller has seen), an epoch to propose. Returns {entry id} for a new
# entry, {entry id, fields} for a repeat.
_APPEND = _TRIM_INDEX + """
redis.call('SET', KEYS[4], ARGV[13], 'NX')
local previous = redis.call('HGET', KEYS[2], ARGV[1])
if previous then
  local found = redis.call('XRANGE', KEYS[1], previous, previous)
  if #found == 1 then
    local fields, stored = found[1][2], {}
    for i = 1, #fields, 2 do stored[fields[i]] = fields[i + 1] end
    if stored['frame'] == ARGV[8] and stored['topics'] == ARGV[2]
        and stored['private'] == ARGV[4] then
      return {previous, fields}
    end
  end
end
local fields = {'id', ARGV[1], 'topics', ARGV[2], 'data', ARGV[3], 'private', ARGV[4],
                'type', ARGV[5], 'retry', ARGV[6], 'created_at', ARGV[7], 'frame', ARGV[8]}
local entry = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[9], '*', unpack(fields))
local ms, n = string.match(entry, '^(%d+)-(%d+)$')
ms, n = tonumber(ms), tonumber(n)
local moved = false
local floor_ms, floor_n = string.match(ARGV[12], '^(%d+)-(%d+)$')
floor_ms, floor_n = tonumber(floor_ms), tonumber(floor_n)
if ms < floor_ms or (ms == floor_ms and n <= floor_n) then
  -- The stream lost the history the caller saw (a reset) and the server's clock stands
  -- behind it: go just above it, or the caller's tail would wait above this entry.
  ms, n, moved = floor_ms, floor_n + 1, true
end
if n >= """ + str(_N_LIMIT) + """ then
  -- seq keeps 20 bits for n: take the next millisecond instead.
  ms, n, moved = ms + 1, 0, true
end
if moved then
  -- Atomic, so the first id is never seen; it stays above the stream's last id.
  redis.call('XDEL', KEYS[1], entry)
  entry = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[9],
                     string.format('%.0f-%.0f', ms, n), unpack(fields))
end
redis.call('HSET', KEYS[2], ARGV[1], entry)
redis.call('ZADD', KEYS[3], string.format('%.0f', ms), ARGV[1])
local max_age_ms = tonumber(ARGV[10])
if max_age_ms > 0 then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%.0f', ms - max_age_ms))
end
trim_index(tonumber(ARGV[11]))
return {entry}
"""

# ARGV: maxlen, max_age_ms. Exact trims; age measured on the server's clock, like the ids.
_PRUNE = _TRIM_INDEX + """
local removed = redis.call('XTRIM', KEYS[1], 'MAXLEN', ARGV[1])
local max_age_ms = tonumber(ARGV[2])
if max_age_ms > 0 then
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  removed = removed + redis.call('XTRIM', KEYS[1], 'MINID',
                                 string.format('%.0f', now_ms - max_age_ms))
end
trim_index(math.huge)
return removed
"""

# KEYS: stream, epoch; ARGV: an epoch to propose, the entry id the caller read through
# ('' for none). The namespace's epoch (written now if it is missing); the stream's last
# generated id ('' when there is no stream): the newest entry ever added, even when
# retention has removed it since; and 0 if the caller's entry is gone while an older one
# remains (a hole: retention removes the oldest first, so Redis lost it), else 1.
_EPOCH = """
redis.call('SET', KEYS[2], ARGV[1], 'NX')
local last = ''
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
end
local kept = 1
if ARGV[2] ~= '' and #redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2]) == 0
    and #redis.call('XRANGE', KEYS[1], '-', ARGV[2], 'COUNT', 1) == 1 then
  kept = 0
end
return {redis.call('GET', KEYS[2]), last, kept}
"""

# ARGV: id. Returns {entry id, fields} of the newest use of the id, or nil.
_FIND = """
local entry = redis.call('HGET', KEYS[2], ARGV[1])
if not entry then return nil end
local found = redis.call('XRANGE', KEYS[1], entry, entry)
if #found == 0 then return nil end
return found[1]
"""


def seq_from_entry_id(entry_id: str | bytes) -> int:
    """The seq of a stream entry id `ms-n`."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, n = text.partition("-")
    low = int(n)
    if low >= _N_LIMIT:
        raise ValueError(f"stream entry {text} was not written by tidings (n >= 2**20)")
    return (int(ms) << _N_BITS) | low


def entry_id_from_seq(seq: int) -> str:
    """The stream entry id `ms-n` of a seq."""
    return f"{seq >> _N_BITS}-{seq & (_N_LIMIT - 1)}"


def _to_update(entry_id: bytes, fields: Mapping[bytes, bytes]) -> Update:
    type_ = fields[b"type"].decode()
    retry = fields[b"retry"]
    return Update(
        topics=tuple(json.loads(fields[b"topics"])),
        data=fields[b"data"].decode(),
        id=fields[b"id"].decode(),
        private=fields[b"private"] == b"1",
        type=type_ or None,
        retry=int(retry) if retry else None,
        seq=seq_from_entry_id(entry_id),
        created_at=float(fields[b"created_at"]),
        frame=bytes(fields[b"frame"]),
    )


def _from_script(reply: Sequence[object]) -> Update:
    """An update from a script's `{entry id, {field, value, ...}}`."""
    entry_id, flat = cast(bytes, reply[0]), cast(list[bytes], reply[1])
    return _to_update(entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))


def _describe(url: str) -> str:
    """Where a Redis URL points, for logs: never the password."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or '/0'}"


def _split_url(url: str) -> tuple[str, str]:
    """The URL for redis-py (without `namespace`) and the namespace."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    namespace = next((v for k, v in query if k == "namespace"), "tidings")
    if not _NAMESPACE.fullmatch(namespace):
        raise BadRequest(f"a Redis namespace is 1-100 of A-Z a-z 0-9 _ . : - (not {namespace!r})")
    rest = urlencode([(k, v) for k, v in query if k != "namespace"])
    return urlunsplit(parts._replace(query=rest)), namespace


class RedisTransport(OutageHealth):
    """History and fan-out on one Redis stream shared by every process of a namespace."""

    def __init__(
        self, url: str, *, history_size: int = 100_000, history_max_age_s: float = 0.0
    ) -> None:
        redis_url, self.namespace = _split_url(url)
        # MAXLEN 0 would remove the entry just added before any tail could read it.
        self._history_size = max(history_size, 1)
        self._max_age_ms = max(int(history_max_age_s * 1000), 0)
        self._keys = [f"{self.namespace}:{key}"
                      for key in ("updates", "ids", "id-ages", "epoch")]
        self._stream = self._keys[0]
        # The namespace's epoch as this process knows it. Each write that might create the
        # epoch proposes a fresh random value, never one seen before.
        self._epoch = b""
        # No I/O here: redis-py connects on the first command.
        self._client = Redis.from_pool(BlockingConnectionPool.from_url(
            redis_url,
            max_connections=_MAX_CONNECTIONS,
            timeout=_POOL_WAIT_S,
            client_name=f"tidings:{self.namespace}",
            **_CLIENT_DEFAULTS,
        ))
        # Blocking reads get a pool of their own, with a socket timeout above the BLOCK time
        # and no retries: a lost connection ends the tail and the hub resumes it.
        tail_pool = ConnectionPool.from_url(redis_url, **_CLIENT_DEFAULTS)
        tail_pool.connection_kwargs.update(
            socket_timeout=_TAIL_SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
            client_name=f"tidings:{self.namespace}:tail",
        )
        self._tail_client = Redis.from_pool(tail_pool)
        self._append_script = self._client.register_script(_APPEND)
        self._prune_script = self._client.register_script(_PRUNE)
        self._find_script = self._client.register_script(_FIND)
        self._epoch_script = self._client.register_script(_EPOCH)
        self._where = f"Redis at {_describe(redis_url)} (namespace {self.namespace})"
        self._outage = Outage(self._where)
        self._losses = 0
        self._last_seq = 0
        self._closed = False

    @contextlib.contextmanager
    def _bus(self, refused: str = "") -> Iterator[None]:
        """Redis failures become ServiceUnavailable (503), never a silent drop; `refused`
        says what the caller did not get done."""
        if self._closed:
            raise TransportClosed("the transport is closed")
        began = self._outage.now()
        try:
            yield
        except RedisError as exc:
            if self._closed:
                raise TransportClosed("the transport is closed") from exc
            self._outage.failed(exc)  # logged once per outage, not per request
            raise ServiceUnavailable(
                f"{refused}{': ' if refused else ''}the bus is unavailable (Redis);"
                " try again later"
            ) from exc
        self._outage.ok(began)

    async def start(self) -> None:
        self._epoch, _, _ = await self._read_epoch()
        with self._bus():
            newest = cast(
                list[tuple[bytes, object]], await self._client.xrevrange(self._stream, count=1)
            )
        self._last_seq = seq_from_entry_id(newest[0][0]) if newest else 0
        await self._warn_of_persistence()

    async def _warn_of_persistence(self) -> None:
        """Say once, at start, when Redis's persistence may lose what the hub acknowledges
        (README, "When storage goes away"). Nothing when Redis refuses CONFIG (hosted
        ones may, and ACLs): its settings are then unknown here."""
        try:
            config = await self._client.config_get("append*")
        except RedisError:
            return
        if config.get("appendonly") == "no":
            log.warning(
                "%s keeps no append-only file (appendonly no): a restart of Redis loses the"
                " history (subscribers resuming get what remains). Set appendonly yes and"
                " appendfsync always to keep every acknowledged update (see the README).",
                self._where)
        elif config.get("appendonly") == "yes" and config.get("appendfsync") != "always":
            log.warning(
                "%s writes its append-only file with appendfsync %s: a crash of Redis may"
                " lose the last second or two of acknowledged updates. Set appendfsync"
                " always to keep every one (see the README).",
                self._where, config.get("appendfsync"))

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def history_losses(self) -> int:
        """StorageHealth's (OutageHealth has the others): lost histories told."""
        return self._losses

    async def append(self, update: Update) -> Update:
        created_at = time.time()
        with self._bus("the update was not stored"):
            reply = await self._append_script(keys=self._keys,
                                              args=self._append_args(update, created_at))
        return self._appended(update, created_at, cast(list[object], reply))

    async def append_many(self, updates: Sequence[Update]) -> list[Update]:
        """`append` each, in one round trip (a pipeline: Redis runs its scripts in order,
        so what ran when it fails is a prefix). The chat's relay and the feeds' tailers
        publish pages this way: one round trip per update held them to about 700 a
        second behind a busy event loop."""
        created_at = time.time()
        with self._bus("the updates were not stored"):
            async with self._client.pipeline(transaction=False) as pipe:
                for update in updates:
                    await self._append_script(keys=self._keys, client=pipe,
                                              args=self._append_args(update, created_at))
                replies = await pipe.execute()
        return [self._appended(update, created_at, cast(list[object], reply))
                for update, reply in zip(updates, replies, strict=True)]

    def _append_args(self, update: Update, created_at: float) -> list[str | bytes | int]:
        return [
            update.id,
            json.dumps(update.topics),
            update.data,
            "1" if update.private else "0",
            update.type or "",
            "" if update.retry is None else str(update.retry),
            repr(created_at),
            update.frame,
            self._history_size,
            self._max_age_ms,
            _INDEX_TRIM_BUDGET,
            entry_id_from_seq(self._last_seq),
            secrets.token_hex(8),
        ]

    def _appended(self, update: Update, created_at: float, reply: list[object]) -> Update:
        if len(reply) == 2:
            return _from_script(reply)  # the same update sent again: stored once
        stored = update.stored(seq_from_entry_id(cast(bytes, reply[0])), created_at)
        # Concurrent appends may complete out of order: last_seq only moves forward.
        self._last_seq = max(self._last_seq, stored.seq)
        return stored

    async def prune(self) -> int:
        """Apply retention (count, then age) exactly; returns how many updates were removed."""
        with self._bus():
            removed = await self._prune_script(
                keys=self._keys, args=[self._history_size, self._max_age_ms]
            )
        return int(cast(int, removed))

    async def read_after(self, seq: int, limit: int) -> list[Update]:
        start = f"({entry_id_from_seq(seq)}" if seq > 0 else "-"
        with self._bus():
            entries = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                await self._client.xrange(self._stream, min=start, count=limit),
            )
        return [_to_update(entry_id, fields) for entry_id, fields in entries]

    async def find(self, update_id: str) -> Update | None:
        with self._bus():
            reply = await self._find_script(keys=self._keys, args=[update_id])
        return None if reply is None else _from_script(cast(list[object], reply))

    async def first_seq(self) -> int:
        with self._bus():
            oldest = cast(
                list[tuple[bytes, object]], await self._client.xrange(self._stream, count=1)
            )
        return seq_from_entry_id(oldest[0][0]) if oldest else 0

    async def tail(self, after: int) -> AsyncIterator[Update]:
        cursor = entry_id_from_seq(max(after, 0))
        try:
            await self._check_continuity(after)
        except TransportClosed:
            return
        while not self._closed:
            try:
                with self._bus():
                    reply = cast(
                        list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]],
                        await self._tail_client.xread(
                            {self._stream: cursor}, count=_TAIL_BATCH, block=_BLOCK_MS
                        ),
                    )
            except TransportClosed:
                return  # close() cut the blocked read: the end of the tail, not a failure
            for _stream, entries in reply:
                for entry_id, fields in entries:
                    update = _to_update(entry_id, fields)
                    cursor = entry_id.decode()
                    self._last_seq = max(self._last_seq, update.seq)
                    yield update

    async def _read_epoch(self, after: int = 0) -> tuple[bytes, bytes, bool]:
        """The namespace's epoch (proposing ours if there is none), the stream's last
        generated entry id (b"" without a stream), and whether the entry of seq `after`
        is still there or went the way of retention (not a hole)."""
        read_through = entry_id_from_seq(after) if after > 0 else ""
        with self._bus():
            reply = cast(list[Any], await self._epoch_script(
                keys=[self._stream, self._keys[3]], args=[secrets.token_hex(8), read_through]))
        epoch, last, kept = reply
        return epoch, last, kept == 1

    async def _check_continuity(self, after: int) -> None:
        """Say so (once: this runs when the tail starts) if the history this process read
        up to seq `after` is gone. The tail then goes on from there: what is in the stream
        now was published after the loss and has a greater seq (see the module docstring)."""
        epoch, last, kept = await self._read_epoch(after)
        known, self._epoch = self._epoch, epoch
        # A stream behind what was read lost its newest entries; one that lost the entry
        # read last but has newer ones took appends after losing it (Redis back from an
        # `everysec` file that missed its last writes, before this tail reconnected).
        behind = after > 0 and (not last or seq_from_entry_id(last) < after or not kept)
        if epoch != known or behind:
            self._losses += 1
            log.warning(
                "%s lost the history this process had read up to seq %s (restarted without"
                " persistence, or flushed): those updates are gone; a subscriber resuming"
                " from one of them replays from the earliest update that remains. Run Redis"
                " with appendonly yes (see the README).",
                self._where, after)

    async def destroy(self) -> None:
        """Delete every key of this namespace (its whole history)."""
        with self._bus():
            await self._client.delete(*self._keys)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Closing the pools also ends a tail blocked in XREAD (it then returns).
        await self._client.aclose()
        await self._tail_client.aclose()
