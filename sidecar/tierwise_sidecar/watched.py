"""A JSON file the operator keeps current beside the Policy (a key of the same ConfigMap), read
off the request path: its identity (the kubelet swaps a mount through a symlink) is polled every
interval and the file is parsed only when it changed. A missing file is an empty value; a file
that does not parse keeps the last good value, with a warning."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from tierwise_sidecar.state import stop

log = logging.getLogger("tierwise.sidecar")
T = TypeVar("T")


class WatchedJson(Generic[T]):
    def __init__(self, path: Path | None, interval: float, parse: Callable[[Any], T], empty: T, what: str) -> None:
        self.path = path
        self.interval = interval
        self.parse = parse
        self.value = empty
        self.empty = empty
        self.what = what
        self.version = 0  # bumped on every change of `value`
        self._signature: object = None
        self._task: asyncio.Task[None] | None = None

    def refresh(self) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
            signature: object = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            signature = None
        if signature == self._signature:
            return
        self._signature = signature
        if signature is None:
            self._set(self.empty)
            return
        try:
            value = self.parse(json.loads(self.path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("%s: cannot read %s (%s); keeping what was read before", self.path, self.what, e)
            return
        self._set(value)

    def _set(self, value: T) -> None:
        self.value = value
        self.version += 1

    async def start(self) -> None:
        self.refresh()
        if self.path is not None:
            self._task = asyncio.create_task(self._poll(), name=f"watch {self.what}")

    async def close(self) -> None:
        await stop(self._task)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.refresh()
