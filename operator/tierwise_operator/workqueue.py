"""A work queue in the manner of client-go's: keys, not events; a key queued twice is worked once;
a key is never worked by two workers at once; a failed key comes back after an exponential,
per-key backoff while other keys carry on."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
log = logging.getLogger("tierwise.operator.queue")


class RetryLaterError(Exception):
    """Work it again after a delay (a transient failure)."""

    def __init__(self, reason: str, after: float | None = None) -> None:
        super().__init__(reason)
        self.after = after


class WorkQueue(Generic[K]):
    def __init__(
        self,
        work: Callable[[K], Awaitable[None]],
        workers: int = 4,
        base_delay: float = 0.5,
        max_delay: float = 300.0,
        on_error: Callable[[K, BaseException], None] | None = None,
    ) -> None:
        self._work = work
        self._workers = workers
        self._base = base_delay
        self._max = max_delay
        self._on_error = on_error
        self._ready: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._running: set[K] = set()
        self._again: set[K] = set()  # queued while running: worked again right after
        self._failures: dict[K, int] = {}
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self, key: K) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key in self._running:
            self._again.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._idle.clear()
        self._ready.put_nowait(key)

    def add_after(self, key: K, delay: float) -> None:
        """Queue `key` in `delay` seconds, or sooner if it was already due sooner (a change to a
        key waiting out a failure's backoff is worked after `delay`, not after the backoff)."""
        if key in self._queued:
            return
        loop = asyncio.get_running_loop()
        timer = self._timers.get(key)
        if timer is not None:
            if timer.when() <= loop.time() + delay:
                return
            timer.cancel()
        self._idle.clear()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def __len__(self) -> int:
        return len(self._queued) + len(self._running) + len(self._timers)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(), name=f"worker-{i}") for i in range(self._workers)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for timer in self._timers.values():
            timer.cancel()

    async def drained(self) -> None:
        """Wait until nothing is queued, running or waiting for a retry."""
        await self._idle.wait()

    def _check_idle(self) -> None:
        if not self._queued and not self._running and not self._timers:
            self._idle.set()

    async def _worker(self) -> None:
        while True:
            key = await self._ready.get()
            self._queued.discard(key)
            self._running.add(key)
            failed: BaseException | None = None
            try:
                await self._work(key)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # one key's failure must never stop the others
                failed = e
            finally:
                self._running.discard(key)
            if failed is None:
                self._failures.pop(key, None)
                if key in self._again:
                    self._again.discard(key)
                    self.add(key)
            else:
                n = self._failures[key] = self._failures.get(key, 0) + 1
                after = failed.after if isinstance(failed, RetryLaterError) else None
                delay = (after if after is not None else min(self._max, self._base * 2 ** (n - 1))) * (
                    0.8 + 0.4 * random.random()
                )
                if self._on_error is not None:
                    self._on_error(key, failed)
                else:
                    log.warning("%s failed (attempt %d), retrying in %.1fs: %s", key, n, delay, failed)
                self._again.discard(key)
                self.add_after(key, delay)
            self._check_idle()
