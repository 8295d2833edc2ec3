"""The batcher that groups chat posts on PostgreSQL (chat/batching.py), on its own."""

from __future__ import annotations

import asyncio

import pytest

from tidings.chat.batching import Batcher


class Database:
    """Answers each batch after the test lets it, recording what came together."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.go = asyncio.Event()

    async def run(self, requests: list[int]) -> list[int | Exception]:
        self.batches.append(requests)
        await self.go.wait()
        return [ValueError(n) if n < 0 else n * 10 for n in requests]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_the_first_go_alone_and_those_that_wait_go_together() -> None:
    async def main() -> None:
        db = Database()
        batcher = Batcher(db.run, most=3, in_flight=2)
        first = asyncio.create_task(batcher.submit(1))
        await settle()
        second = asyncio.create_task(batcher.submit(2))
        await settle()
        waiting = [asyncio.create_task(batcher.submit(n)) for n in (3, 4, 5, -6)]
        await settle()
        assert db.batches == [[1], [2]]  # two in flight; the rest wait for them
        db.go.set()
        assert await first == 10 and await second == 20
        assert await asyncio.gather(*waiting[:3]) == [30, 40, 50]
        with pytest.raises(ValueError):
            await waiting[3]  # its own error, to it alone
        assert db.batches == [[1], [2], [3, 4, 5], [-6]]  # at most 3 each

    asyncio.run(main())


def test_an_error_of_the_whole_batch_reaches_each_of_its_requests() -> None:
    async def main() -> None:
        async def fail(requests: list[int]) -> list[int | Exception]:
            raise ConnectionError("gone")

        batcher = Batcher(fail, in_flight=1)
        results = await asyncio.gather(*(batcher.submit(n) for n in range(3)),
                                       return_exceptions=True)
        assert [type(r) for r in results] == [ConnectionError] * 3
        with pytest.raises(ConnectionError):  # and the next batch is tried all the same
            await batcher.submit(9)

    asyncio.run(main())


def test_a_caller_that_went_away_does_not_stop_the_others() -> None:
    async def main() -> None:
        db = Database()
        batcher = Batcher(db.run, in_flight=1)
        gone = asyncio.create_task(batcher.submit(1))
        kept = asyncio.create_task(batcher.submit(2))
        await settle()
        gone.cancel()
        db.go.set()
        assert await kept == 20
        assert gone.cancelled()

    asyncio.run(main())
