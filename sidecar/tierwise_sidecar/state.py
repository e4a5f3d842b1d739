"""The one home of what outlives a Policy: breakers and session pins, the HTTP client, the token
counter, store clients and ledgers, throttles.

Components are kept by stable names, made on first use (a stage's builder asks for what it needs),
started with the server (or, when a reload brings a new one, before that Policy takes effect) and
closed with it, in reverse order, each flushing what it owes. A Policy reload builds new stages
on the same components, so nothing learnt or owed is lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast, runtime_checkable

from tierwise_sidecar.config import GatewayConfig
from tierwise_sidecar.secrets import SecretSource

log = logging.getLogger("tierwise.sidecar")

T = TypeVar("T")


async def stop(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel a component's background tasks and wait until they have ended."""
    running = [t for t in tasks if t is not None]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


class StartupError(Exception):
    """A component cannot start (its store is in use, say); the message says why and what to do."""


@runtime_checkable
class Lifecycle(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Key(Generic[T]):
    """A component's stable name and how to make it from the shared state (its config, others)."""

    name: str
    make: Callable[[SharedState], T]


class SharedState:
    def __init__(self, config: GatewayConfig, secrets: SecretSource | None = None) -> None:
        self.config = config
        # Where store addresses (and API keys) named by Secrets are read.
        self.secrets = secrets or SecretSource()
        self._items: dict[str, object] = {}
        self._order: list[str] = []
        self._started: set[str] = set()
        self.running = False

    def get(self, key: Key[T]) -> T:
        item = self._items.get(key.name)
        if item is None:
            item = key.make(self)
            self._items[key.name] = item
            self._order.append(key.name)
        return cast(T, item)

    def peek(self, key: Key[T]) -> T | None:
        return cast("T | None", self._items.get(key.name))

    async def start(self) -> None:
        """Start every component not started yet (all of them the first time)."""
        self.running = True
        for name in list(self._order):
            item = self._items[name]
            if name not in self._started and isinstance(item, Lifecycle):
                await item.start()
            self._started.add(name)

    async def close(self) -> None:
        """Close in reverse order of making: what depends on another closes before it."""
        self.running = False
        for name in reversed(self._order):
            item = self._items[name]
            if name in self._started and isinstance(item, Lifecycle):
                try:
                    await item.close()
                except Exception:
                    log.exception("closing %s failed", name)
        self._started.clear()
