"""Several feeds served as one: the database's (`--db`) and MongoDB's (`--mongo`).

Every collection belongs to exactly one feed (a name configured in both is a startup
error), and each call goes to the feed of the collection it names. They start in order
and stop in reverse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tidings.feeds.base import ChangeFeed, Page, ResumePoint, Snapshot, WriteResult, resolve_in
from tidings.feeds.config import CollectionConfig
from tidings.feeds.errors import ConfigError, UnknownCollection, UnknownToken
from tidings.feeds.events import JSONObject
from tidings.feeds.query import ListQuery

__all__ = ["Feeds"]


class Feeds:
    def __init__(self, feeds: Sequence[ChangeFeed]) -> None:
        self._feeds = tuple(feeds)
        self._started: list[ChangeFeed] = []

    def _owner(self, name: str) -> ChangeFeed:
        for feed in self._feeds:
            if name in feed.collections:
                return feed
        raise UnknownCollection(f"no collection named {name!r}")

    async def start(self) -> None:
        try:
            for feed in self._feeds:
                await feed.start()
                self._started.append(feed)
            # Known only now: a PostgreSQL feed learns its watched tables when connected.
            names = [name for feed in self._feeds for name in feed.collections]
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                raise ConfigError(f"collections configured twice: {', '.join(twice)}")
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        while self._started:
            await self._started.pop().stop()

    @property
    def collections(self) -> Mapping[str, CollectionConfig]:
        out: dict[str, CollectionConfig] = {}
        for feed in self._feeds:
            out.update(feed.collections)
        return out

    def collection(self, name: str) -> CollectionConfig:
        return self._owner(name).collection(name)

    async def insert(self, name: str, document: JSONObject) -> WriteResult:
        return await self._owner(name).insert(name, document)

    async def replace(self, name: str, doc_id: str, document: JSONObject) -> WriteResult:
        return await self._owner(name).replace(name, doc_id, document)

    async def update(self, name: str, doc_id: str, patch: JSONObject) -> WriteResult:
        return await self._owner(name).update(name, doc_id, patch)

    async def delete(self, name: str, doc_id: str) -> WriteResult:
        return await self._owner(name).delete(name, doc_id)

    async def get(self, name: str, doc_id: str) -> Snapshot:
        return await self._owner(name).get(name, doc_id)

    async def list(self, name: str, query: ListQuery) -> Page:
        return await self._owner(name).list(name, query)

    async def resolve(self, token: str) -> ResumePoint:
        error: UnknownToken | None = None
        for feed in self._feeds:
            try:
                return await feed.resolve(token)
            except UnknownToken as exc:
                error = error or exc
        raise error or UnknownToken("no feed knows this resume token")

    async def resolve_in(self, name: str, token: str) -> ResumePoint:
        return await resolve_in(self._owner(name), name, token)

    async def prune(self) -> int:
        return sum([await feed.prune() for feed in self._feeds])
