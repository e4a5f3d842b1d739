"""The standalone gateway's ledger on disk: settled spend in SQLite, so it survives a restart.

The process's MemoryLedger decides (on the event loop, atomically, no I/O on a request's path);
this journal writes each settled amount behind it, in order, from one writer thread that commits
whatever has queued up in one transaction, at most every COMMIT_SECONDS (sqlite3 from the standard
library: a queue put is all a request pays, where a call through aiosqlite costs two hops to its
thread per commit). WAL with synchronous=NORMAL: a commit survives the process being killed (not
the machine losing power). What was settled but not yet committed when the process was killed,
at most COMMIT_SECONDS and one commit's worth, is the loss bound of this mode. One process per file: a second process on
the same file is refused at start, since two memory ledgers would each think they hold the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from tierwise.budgetrules import Amount
from tierwise_sidecar.state import StartupError

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
# The writer commits what queued up at most this often. Woken by every settle, it committed a
# handful at a time, and each commit took the interpreter's lock from the event loop's thread:
# at 2000 settles a second, the SQLite ledger cost a request a third more CPU than Redis.
COMMIT_SECONDS = 0.02
_STOP = ("", Amount())


class LedgerInUseError(StartupError):
    pass


class SqliteJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[tuple[str, Amount]] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._lock: IO[str] | None = None
        # Records put and committed: equal when everything recorded so far is on disk.
        self._put = 0
        self._done = 0

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

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(SCHEMA)
        return db

    def _load(self) -> list[tuple[str, Amount]]:
        db = self._open()
        try:
            db.execute("DELETE FROM spend WHERE updated < ?", (time.time() - KEEP_SECONDS,))
            return [(str(k), Amount(int(m), int(t))) for k, m, t in db.execute("SELECT key, micros, tokens FROM spend")]
        finally:
            db.close()

    async def start(self) -> Iterable[tuple[str, Amount]]:
        self._take_lock()
        rows = await asyncio.to_thread(self._load)
        self._writer = threading.Thread(target=self._write_behind, name="tierwise-ledger", daemon=True)
        self._writer.start()
        log.info("budget ledger %s: %d spend record(s) loaded", self.path, len(rows))
        return rows

    def record(self, key: str, amount: Amount) -> None:
        self._put += 1
        self._queue.put((key, amount))

    def _write_behind(self) -> None:
        db = self._open()
        try:
            while True:
                item = self._queue.get()
                time.sleep(COMMIT_SECONDS)  # let a batch gather (the lock is released meanwhile)
                batch: dict[str, list[int]] = {}
                taken = 0
                stop = False
                while True:
                    if item is _STOP:
                        stop = True
                    else:
                        got = batch.setdefault(item[0], [0, 0])
                        got[0] += item[1].micros
                        got[1] += item[1].tokens
                        taken += 1
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    self._commit(db, batch)
                self._done += taken
                if stop:
                    return
        finally:
            db.close()

    def _commit(self, db: sqlite3.Connection, batch: dict[str, list[int]]) -> None:
        now = time.time()
        rows = [(k, m, t, now) for k, (m, t) in batch.items()]
        while True:
            try:
                db.execute("BEGIN")
                db.executemany(UPSERT, rows)
                db.execute("COMMIT")
                return
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                log.exception("budget ledger %s: writing %d record(s) failed; retrying", self.path, len(rows))
                time.sleep(0.5)

    async def flush(self) -> None:
        """Wait until everything recorded so far is committed (tests, shutdown)."""
        target = self._put
        while self._done < target and self._writer is not None and self._writer.is_alive():
            await asyncio.sleep(0.002)

    @property
    def pending(self) -> int:
        return self._put - self._done

    async def close(self) -> None:
        if self._writer is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._writer.join, 10)
        if self._lock is not None:
            self._lock.close()
