"""The standalone gateway's ledger on disk: settled spend in SQLite, so it survives a restart.

The process's MemoryLedger decides (on the event loop, atomically, no I/O on a request's path);
this journal writes each settled amount behind it, in order, batched into one transaction per
flush, on aiosqlite's thread. WAL with synchronous=NORMAL: a commit survives the process being
killed (not the machine losing power). What the process had settled but not yet committed when it
was killed (a few milliseconds' worth) is the loss bound of this mode. One process per file: a
second process on the same file is refused at start, since two memory ledgers would each think
they hold the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import aiosqlite

from tierwise_sidecar.budgets.rules import Amount

log = logging.getLogger("tierwise.budgets")

SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
  key TEXT PRIMARY KEY,          -- <namespace>/<budget>@<window>[#<bucket>]
  micros INTEGER NOT NULL,
  tokens INTEGER NOT NULL,
  updated REAL NOT NULL
)
"""
UPSERT = """
INSERT INTO spend (key, micros, tokens, updated) VALUES (?, ?, ?, ?)
ON CONFLICT(key) DO UPDATE SET micros = micros + excluded.micros, tokens = tokens + excluded.tokens,
  updated = excluded.updated
"""
# Spend of windows nobody can count any more (the longest window is a month; kept a year for
# whoever reads the file) is removed at start.
KEEP_SECONDS = 400 * 24 * 3600


class LedgerInUseError(RuntimeError):
    pass


class SqliteJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[tuple[str, Amount]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._lock: IO[str] | None = None
        self.pending = 0

    def _take_lock(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = (self.path.parent / (self.path.name + ".lock")).open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise LedgerInUseError(
                f"budget ledger {self.path} is in use by {holder}: one process per ledger file "
                "(several gateways share budgets through Redis)"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        self._lock = lock

    async def start(self) -> Iterable[tuple[str, Amount]]:
        self._take_lock()
        db = self._db = await aiosqlite.connect(self.path)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute(SCHEMA)
        await db.execute("DELETE FROM spend WHERE updated < ?", (time.time() - KEEP_SECONDS,))
        await db.commit()
        async with db.execute("SELECT key, micros, tokens FROM spend") as cur:
            rows = [(str(k), Amount(int(m), int(t))) for k, m, t in await cur.fetchall()]
        self._writer = asyncio.create_task(self._write_behind())
        log.info("budget ledger %s: %d spend record(s) loaded", self.path, len(rows))
        return rows

    def record(self, key: str, amount: Amount) -> None:
        self.pending += 1
        self._queue.put_nowait((key, amount))

    async def _write_behind(self) -> None:
        db = self._db
        assert db is not None
        while True:
            first = await self._queue.get()
            batch: dict[str, list[int]] = {}
            item: tuple[str, Amount] | None = first
            while item is not None:
                got = batch.setdefault(item[0], [0, 0])
                got[0] += item[1].micros
                got[1] += item[1].tokens
                item = self._queue.get_nowait() if not self._queue.empty() else None
            n = sum(1 for _ in batch)
            now = time.time()
            try:
                await db.executemany(UPSERT, [(k, m, t, now) for k, (m, t) in batch.items()])
                await db.commit()
            except Exception:
                log.exception("budget ledger %s: writing %d record(s) failed; retrying", self.path, n)
                for k, (m, t) in batch.items():
                    self._queue.put_nowait((k, Amount(m, t)))
                await asyncio.sleep(0.5)
                continue
            self.pending = self._queue.qsize()

    async def flush(self) -> None:
        """Wait until everything recorded so far is committed (tests, shutdown)."""
        while self.pending or not self._queue.empty():
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await self.flush()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self._db is not None:
            await self._db.close()
        if self._lock is not None:
            self._lock.close()
