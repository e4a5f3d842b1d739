"""Single flight: identical requests missing the cache at once make one backend call.

The first miss of a key leads; the others wait (bounded) for its entry and are answered from it.
When the leader ends without an entry to share (an error, a truncated answer, a client that hung
up), or the wait runs out, each follower goes to a backend itself: waiting never costs an answer.
"""

from __future__ import annotations

import asyncio

from tierwise_sidecar.cache.entry import Entry


class Flights:
    def __init__(self) -> None:
        self._leaders: dict[str, asyncio.Future[Entry | None]] = {}

    def __len__(self) -> int:
        return len(self._leaders)

    def lead(self, key: str) -> asyncio.Future[Entry | None] | None:
        """None: this request leads for `key` (it must `land` it); else the leader's future."""
        fut = self._leaders.get(key)
        if fut is None:
            self._leaders[key] = asyncio.get_running_loop().create_future()
        return fut

    def land(self, key: str, entry: Entry | None) -> None:
        fut = self._leaders.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(entry)


async def follow(fut: asyncio.Future[Entry | None], timeout: float) -> Entry | None:
    """The leader's entry, or None when it has none or does not land within `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.shield(fut)
    except TimeoutError:
        return None
