"""L3 on PostgreSQL: one table shared by every sidecar, through an asyncpg pool.

asyncpg speaks PostgreSQL's binary protocol from the event loop (no thread per query), prepares
each statement once per connection, and pools connections; every call is bounded by a short
timeout, so a slow or unreachable database costs a lookup a miss. The table and index are made at
the first connection (CREATE IF NOT EXISTS: any sidecar may be first). Sweeping (expired entries,
then the size bound) is done by whichever sidecar's turn comes; the statements are idempotent.
"""

from __future__ import annotations

import asyncio

import asyncpg

from tierwise_sidecar.cache.stores import INDEX, StoreError, schema

_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class PostgresStore:
    name = "persistent"

    def __init__(self, url: str, timeout: float = 0.5, pool_size: int = 4) -> None:
        self.url = url
        self.timeout = timeout
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._lock:
            if self._pool is None:
                try:
                    async with asyncio.timeout(self.timeout * 4):
                        pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.pool_size,
                                                         command_timeout=self.timeout)  # fmt: skip
                        async with pool.acquire() as conn:
                            await conn.execute(schema("BYTEA"))
                            await conn.execute(INDEX)
                except _ERRORS as e:
                    raise StoreError(f"postgresql: {type(e).__name__}") from None
                self._pool = pool
            return self._pool

    async def start(self) -> None:
        return None  # connected at first use: a database down at start is a miss, not a failed start

    async def close(self) -> None:
        if self._pool is not None:
            try:
                async with asyncio.timeout(5):
                    await self._pool.close()
            except TimeoutError:
                self._pool.terminate()
            self._pool = None

    async def get(self, key: str) -> bytes | None:
        pool = await self._get_pool()
        try:
            async with asyncio.timeout(self.timeout):
                got = await pool.fetchval("SELECT blob FROM tierwise_cache WHERE key = $1", key)
        except _ERRORS as e:
            raise StoreError(f"postgresql get: {type(e).__name__}") from None
        return bytes(got) if got is not None else None

    async def put(self, key: str, blob: bytes, expires: float) -> None:
        pool = await self._get_pool()
        try:
            async with asyncio.timeout(self.timeout * 4):
                await pool.execute(
                    "INSERT INTO tierwise_cache (key, blob, expires, size) VALUES ($1, $2, $3, $4) ON CONFLICT (key) "
                    "DO UPDATE SET blob = excluded.blob, expires = excluded.expires, size = excluded.size",
                    key, blob, expires, len(blob),
                )  # fmt: skip
        except _ERRORS as e:
            raise StoreError(f"postgresql put: {type(e).__name__}") from None

    async def sweep(self, now: float, max_bytes: int) -> int:
        pool = await self._get_pool()
        try:
            async with asyncio.timeout(30):
                dropped = _count(await pool.execute("DELETE FROM tierwise_cache WHERE expires <= $1", now))
                total = await pool.fetchval("SELECT COALESCE(SUM(size), 0) FROM tierwise_cache")
                if int(total) > max_bytes:
                    # The soonest to expire first, until under 90 % of the bound.
                    dropped += _count(await pool.execute(
                        "DELETE FROM tierwise_cache WHERE key IN (SELECT key FROM (SELECT key, SUM(size) OVER "
                        "(ORDER BY expires DESC, key) AS kept FROM tierwise_cache) AS k WHERE kept > $1)",
                        int(max_bytes * 0.9),
                    ))  # fmt: skip
        except _ERRORS as e:
            raise StoreError(f"postgresql sweep: {type(e).__name__}") from None
        return dropped

    async def totals(self, now: float) -> tuple[int, int]:
        pool = await self._get_pool()
        try:
            async with asyncio.timeout(self.timeout * 4):
                row = await pool.fetchrow(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM tierwise_cache WHERE expires > $1", now
                )
        except _ERRORS as e:
            raise StoreError(f"postgresql totals: {type(e).__name__}") from None
        return (int(row[0]), int(row[1])) if row is not None else (0, 0)


def _count(status: str) -> int:
    """Rows a DELETE touched, from its status line ("DELETE 3")."""
    try:
        return int(status.rsplit(" ", 1)[1])
    except (IndexError, ValueError):
        return 0
