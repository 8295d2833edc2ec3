"""What every SQL backend of a change feed does the same way, written once.

Both backends (`feeds/sqlite/`, `feeds/postgres/`) keep a catalog of collection shapes and
a change log with an epoch; both name a change by `ResumeToken(epoch, seq)`, check a
client's token against the log the same way, and turn a log row into the update the
tailer publishes the same way. A third backend (MongoDB) starts from here too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Generic, cast

from tidings.feeds.catalog import Catalog, S
from tidings.feeds.config import CollectionConfig
from tidings.feeds.errors import TokenTooOld, UnknownToken
from tidings.feeds.events import ChangeRow, ResumeToken, change_update
from tidings.hub.update import Update

__all__ = ["Backend", "decode_change"]

log = logging.getLogger(__name__)


def decode_change(row: Sequence[object]) -> ChangeRow | None:
    """A change-log row `(seq, coll, op, doc_key, old_doc, new_doc, wall_time)`, the JSON
    as text; None (logged) when it cannot be read: the tailer skips it."""
    seq, coll, op, key, old, new, wall_time = row
    try:
        return ChangeRow.decode(int(cast(int, seq)), str(coll), str(op), str(key),
                                cast("str | None", old), cast("str | None", new),
                                str(wall_time))
    except ValueError as exc:
        log.error("change %s cannot be read (%s): skipped", seq, exc)
        return None


class Backend(Generic[S]):
    """A feed's collections (a catalog of shapes `S`), its log's epoch, and its tokens."""

    def __init__(self, db_name: str = "") -> None:
        self._catalog: Catalog[S] = Catalog()
        self._db_name = db_name  # the change events' `ns.db`
        self.epoch = ""
        self.active = False  # False: nothing to watch, nothing created

    @property
    def collections(self) -> Mapping[str, CollectionConfig]:
        return self._catalog.configs

    def collection(self, name: str) -> CollectionConfig:
        return self._catalog.get(name).config

    def _token(self, seq: int) -> ResumeToken:
        return ResumeToken(self.epoch, seq)

    def _written(self) -> None:
        """Called after every write through the API, whether it committed or not."""

    def _publishable(self, change: ChangeRow, shape: S | None) -> Update:
        """The update the tailer publishes for `change` of the collection `shape`."""
        # A collection nobody configured (left-over triggers): private, the safe default.
        private = True if shape is None else shape.config.private
        return change_update(change, db=self._db_name, epoch=self.epoch, private=private)

    # -- resuming --------------------------------------------------------------------------

    def _parse_token(self, token: str) -> ResumeToken:
        """A client's token, if it is one of this log's; UnknownToken (400) otherwise."""
        parsed = ResumeToken.parse(token)
        if not self.active or parsed.epoch != self.epoch:
            raise UnknownToken("the resume token is not from this database's change log")
        return parsed

    def _check_in_log(self, parsed: ResumeToken, high: int, pruned: int) -> None:
        """The log, whose newest change is `high` and which was pruned through `pruned`,
        still holds every change after `parsed`."""
        if parsed.seq > high:
            raise UnknownToken("the resume token names a change this database has not had")
        if parsed.seq < pruned:
            raise TokenTooOld(
                f"the change log no longer holds the changes after {parsed}: "
                f"it starts after {self._token(pruned)}; load a new snapshot")

    def _history_lost(self, seq: int) -> TokenTooOld:
        """The error for a change the hub's history no longer holds."""
        return TokenTooOld(
            f"the hub's history (--history-size, --history-max-age) no longer holds "
            f"change {self._token(seq)}; load a new snapshot")
