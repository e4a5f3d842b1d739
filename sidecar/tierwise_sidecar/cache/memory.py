"""L1: answers in the sidecar's memory, least recently used first out, bounded by entries and bytes.

One per CachePolicy (by its name), kept across Policy reloads; a reload that changes the bounds
applies them at once (evicting what no longer fits). An expired entry is dropped when it is read.
"""

from __future__ import annotations

from collections import OrderedDict

from tierwise_sidecar.cache.entry import Entry


class MemoryLayer:
    name = "memory"

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[Entry, int]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def resize(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._shrink()

    def get(self, key: str, now: float) -> Entry | None:
        got = self._items.get(key)
        if got is None:
            return None
        entry, size = got
        if entry.expires <= now:
            del self._items[key]
            self.bytes -= size
            return None
        self._items.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry, size: int) -> bool:
        """Keep an entry; False when it alone is larger than the whole layer may hold."""
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[1]  # replaced, or (too large to keep) dropped: never left stale
        if size > self.max_bytes:
            return False
        self._items[key] = (entry, size)
        self.bytes += size
        self._shrink()
        return True

    def _shrink(self) -> None:
        items = self._items
        while items and (len(items) > self.max_entries or self.bytes > self.max_bytes):
            _, (_, size) = items.popitem(last=False)
            self.bytes -= size
            self.evictions += 1
