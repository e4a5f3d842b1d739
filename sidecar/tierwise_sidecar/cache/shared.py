"""The shared layers (L2 Redis, L3 SQLite or PostgreSQL) as the cache stage uses them.

Each store sits behind a circuit breaker: a failure opens it, and while open the layer is skipped
(a miss, or a dropped fill) without a round trip; after the cooldown one lookup probes it, and a
success closes it. Lookups are awaited on the request's path, bounded by the store's timeout.
Fills leave that path: they go into one bounded queue, drained by one task; a full queue drops the
fill (counted), it never makes a request wait. The same task sweeps the persistent stores: expired
entries out, then the size bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tierwise_sidecar.breaker import Breaker
from tierwise_sidecar.cache.entry import Entry, decode, encode
from tierwise_sidecar.cache.metrics import PersistentSizes
from tierwise_sidecar.cache.stores import PersistentStore, Store
from tierwise_sidecar.metrics import METRICS
from tierwise_sidecar.state import Key, SharedState

log = logging.getLogger("tierwise.cache")

FILL_QUEUE = 1024
SWEEP_SECONDS = 30.0
COOLDOWN_SECONDS = 5.0
# Answers larger than this are not sent to the shared layers (L1 keeps to its own byte bound).
MAX_SHARED_BYTES = 4 * 1024 * 1024


@dataclass
class Layer:
    """A store, its breaker, and (for L3) its size bound."""

    store: Store
    breaker: Breaker = field(default_factory=lambda: Breaker(threshold=1, cooldown=COOLDOWN_SECONDS))
    max_bytes: int = 0
    # What the last sweep saw (a persistent store), and what the sweeps dropped.
    entries: int = 0
    bytes: int = 0
    swept: int = 0

    @property
    def name(self) -> str:
        return self.store.name


Counted = Callable[[str, str], None]  # (layer, result)


@dataclass(frozen=True, slots=True)
class Fill:
    key: str
    entry: Entry
    # Each layer with when the entry expires there (its own TTL).
    targets: tuple[tuple[Layer, float], ...]
    counted: Counted


class SharedLayers:
    """Lifecycle component: the stores by address (policies naming the same one share it)."""

    def __init__(self, state: SharedState) -> None:
        self.clock = state.config.clock
        state.get(METRICS).registry.register(PersistentSizes(self.sizes))
        self._layers: dict[str, Layer] = {}
        self._queue: asyncio.Queue[Fill] | None = None
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def layer(self, address: str, make: Callable[[], Store], max_bytes: int = 0) -> Layer:
        got = self._layers.get(address)
        if got is None:
            got = self._layers[address] = Layer(make(), max_bytes=max_bytes)
        elif max_bytes:
            got.max_bytes = max_bytes
        return got

    async def start(self) -> None:
        if self._task is None:
            self._queue = asyncio.Queue(FILL_QUEUE)
            self._task = asyncio.create_task(self._drain())
        for layer in self._layers.values():
            await layer.store.start()

    async def close(self) -> None:
        if self._queue is not None and self._task is not None:
            # What is queued gets a bounded moment to land (a restart keeps L2/L3 content).
            await self.settle()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for layer in self._layers.values():
            try:
                await layer.store.close()
            except Exception:
                log.exception("closing cache store %s failed", layer.name)

    # ------------------------------------------------------------ lookups

    async def get(self, layer: Layer, key: str, counted: Counted) -> Entry | None:
        """The live entry under `key` in `layer`, or None (a miss, or the layer unavailable)."""
        now = time.monotonic()
        if not layer.breaker.acquire(now):
            counted(layer.name, "skipped")
            return None
        try:
            blob = await layer.store.get(key)
        except Exception as e:  # any store or client error is a miss, never the request's failure
            self._failed(layer, e)
            counted(layer.name, "error")
            return None
        layer.breaker.success()
        entry = decode(blob) if blob is not None else None
        if entry is not None and entry.expires <= self.clock():
            entry = None
        counted(layer.name, "hit" if entry is not None else "miss")
        return entry

    def _failed(self, layer: Layer, e: Exception) -> None:
        was = layer.breaker.state
        layer.breaker.failure(time.monotonic())
        if layer.breaker.state is not was:
            log.warning("cache layer %s unavailable (%s: %s): skipped for %.0f s, then probed", layer.name,
                        type(e).__name__, e, COOLDOWN_SECONDS)  # fmt: skip

    # ------------------------------------------------------------ fills

    def fill(self, key: str, entry: Entry, targets: Sequence[tuple[Layer, float]], counted: Counted) -> None:
        """Queue an entry for the shared layers; dropped (and counted) when the queue is full."""
        if not targets or self._queue is None:
            return
        try:
            self._queue.put_nowait(Fill(key, entry, tuple(targets), counted))
        except asyncio.QueueFull:
            self.dropped += 1
            for layer, _ in targets:
                counted(layer.name, "dropped")

    async def _drain(self) -> None:
        assert self._queue is not None
        next_sweep = time.monotonic() + SWEEP_SECONDS
        while True:
            if time.monotonic() >= next_sweep:
                # Due: before the next fill, so steady fills never put it off.
                try:
                    await self.sweep()
                except Exception:
                    log.exception("cache sweep failed")
                next_sweep = time.monotonic() + SWEEP_SECONDS
            try:
                async with asyncio.timeout(max(next_sweep - time.monotonic(), 0.01)):
                    item = await self._queue.get()
            except TimeoutError:
                continue
            try:
                await self._put(item)
            except Exception:
                log.exception("cache fill failed")
            finally:
                self._queue.task_done()

    async def _put(self, item: Fill) -> None:
        blobs: dict[float, bytes] = {}
        for layer, expires in item.targets:
            blob = blobs.get(expires)
            if blob is None:
                blob = blobs[expires] = encode(dataclasses.replace(item.entry, expires=expires))
            if len(blob) > MAX_SHARED_BYTES or not layer.breaker.acquire(time.monotonic()):
                item.counted(layer.name, "dropped")
                continue
            try:
                await layer.store.put(item.key, blob, expires)
            except Exception as e:
                self._failed(layer, e)
                item.counted(layer.name, "error")
                continue
            layer.breaker.success()
            item.counted(layer.name, "stored")

    async def settle(self, seconds: float = 5.0) -> None:
        """Wait (bounded) until every queued fill was written or dropped."""
        if self._queue is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._queue.join()

    async def sweep(self) -> None:
        """Expired entries out of the persistent stores, and each back under its size bound."""
        for layer in list(self._layers.values()):  # a reload may add layers meanwhile
            store = _persistent(layer.store)
            if store is None or not layer.max_bytes:
                continue
            try:
                now = self.clock()
                layer.swept += await store.sweep(now, layer.max_bytes)
                layer.entries, layer.bytes = await store.totals(now)
            except Exception as e:
                log.info("cache layer %s: sweep skipped (%s: %s)", layer.name, type(e).__name__, e)

    def sizes(self) -> list[tuple[str, int, int, int]]:
        return [(la.name, la.entries, la.bytes, la.swept) for la in self._layers.values() if la.max_bytes]


def _persistent(store: Store) -> PersistentStore | None:
    """The store as an L3 (it sweeps), or None for L2 (Redis expires its own keys)."""
    return store if hasattr(store, "sweep") else None  # type: ignore[return-value]


CACHE_STORES: Key[SharedLayers] = Key("cache-stores", SharedLayers)
