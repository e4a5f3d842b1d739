"""What a shared cache layer is to the cache, and L3 on SQLite (the embedded default).

A store keeps encoded entries by key with an expiry, and sweeps: expired entries out, then, past
its size bound, the entries that would expire soonest (the oldest fills, since a policy's entries
share one TTL) until it is back under 90 % of the bound. A store raises StoreError for anything
that went wrong talking to it; the cache treats that as a miss (or a dropped fill) and stops
asking a store that keeps failing (shared.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

import aiosqlite


class StoreError(Exception):
    """The store could not be read or written (unreachable, timed out, refused)."""


class Store(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, blob: bytes, expires: float) -> None:
        """Keep `blob` under `key` until `expires` (seconds since the epoch)."""


class PersistentStore(Store, Protocol):
    async def sweep(self, now: float, max_bytes: int) -> int:
        """Drop expired entries, then the soonest to expire past the size bound; how many."""

    async def totals(self, now: float) -> tuple[int, int]:
        """Live entries and their bytes."""


def schema(blob: str) -> str:
    """The cache table; `blob` is the database's type for bytes (BLOB, BYTEA)."""
    return (
        "CREATE TABLE IF NOT EXISTS tierwise_cache (key TEXT PRIMARY KEY, "
        f"blob {blob} NOT NULL, expires DOUBLE PRECISION NOT NULL, size INTEGER NOT NULL)"
    )


INDEX = "CREATE INDEX IF NOT EXISTS tierwise_cache_expires ON tierwise_cache (expires)"


class SqliteStore:
    """L3 in a SQLite file (WAL): for one pod, or the standalone gateway. aiosqlite runs every
    statement on the connection's own thread, off the event loop."""

    name = "persistent"

    def __init__(self, path: Path, timeout: float = 1.0) -> None:
        self.path = path
        self.timeout = timeout
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def _conn(self) -> aiosqlite.Connection:
        if self._db is not None:
            return self._db
        async with self._lock:
            if self._db is None:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    db = await aiosqlite.connect(str(self.path), timeout=self.timeout)
                    await db.execute("PRAGMA journal_mode=WAL")
                    await db.execute("PRAGMA synchronous=NORMAL")
                    await db.execute(schema("BLOB"))
                    await db.execute(INDEX)
                    await db.commit()
                except (OSError, aiosqlite.Error) as e:
                    raise StoreError(f"sqlite {self.path}: {e}") from None
                self._db = db
            return self._db

    async def start(self) -> None:
        return None  # opened at first use: an unwritable path is a miss, not a failed start

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def get(self, key: str) -> bytes | None:
        db = await self._conn()
        try:
            async with asyncio.timeout(self.timeout):
                async with db.execute("SELECT blob FROM tierwise_cache WHERE key = ?", (key,)) as cur:
                    row = await cur.fetchone()
        except (aiosqlite.Error, TimeoutError) as e:
            raise StoreError(f"sqlite get: {type(e).__name__}: {e}") from None
        return bytes(row[0]) if row is not None and isinstance(row[0], bytes) else None

    async def put(self, key: str, blob: bytes, expires: float) -> None:
        db = await self._conn()
        try:
            await db.execute(
                "INSERT INTO tierwise_cache (key, blob, expires, size) VALUES (?, ?, ?, ?) ON CONFLICT (key) "
                "DO UPDATE SET blob = excluded.blob, expires = excluded.expires, size = excluded.size",
                (key, blob, expires, len(blob)),
            )
            await db.commit()
        except aiosqlite.Error as e:
            raise StoreError(f"sqlite put: {e}") from None

    async def sweep(self, now: float, max_bytes: int) -> int:
        db = await self._conn()
        try:
            cur = await db.execute("DELETE FROM tierwise_cache WHERE expires <= ?", (now,))
            dropped = cur.rowcount
            async with db.execute("SELECT COALESCE(SUM(size), 0) FROM tierwise_cache") as c:
                row = await c.fetchone()
            total = int(row[0]) if row is not None else 0
            if total > max_bytes:
                # The soonest to expire first, until under 90 % of the bound.
                cur = await db.execute(
                    "DELETE FROM tierwise_cache WHERE key IN (SELECT key FROM (SELECT key, SUM(size) OVER "
                    "(ORDER BY expires DESC, key) AS kept FROM tierwise_cache) WHERE kept > ?)",
                    (int(max_bytes * 0.9),),
                )
                dropped += cur.rowcount
            await db.commit()
        except aiosqlite.Error as e:
            raise StoreError(f"sqlite sweep: {e}") from None
        return max(dropped, 0)

    async def totals(self, now: float) -> tuple[int, int]:
        db = await self._conn()
        try:
            async with db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM tierwise_cache WHERE expires > ?", (now,)
            ) as cur:
                row = await cur.fetchone()
        except aiosqlite.Error as e:
            raise StoreError(f"sqlite totals: {e}") from None
        return (int(row[0]), int(row[1])) if row is not None else (0, 0)
