"""Session stickiness: a session keeps its backend and replica.

A new session's replica is picked by rendezvous (highest random weight) hashing over the
backend's endpoints: every sidecar computes the same answer without sharing state, and when an
endpoint disappears only its own sessions move. The pin table then keeps a session where it was
put (so it does not bounce back when a failed replica returns) until it has been idle for the
tier's TTL.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

from tierwise.values import value


def _weight(key: str, endpoint: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{endpoint}".encode(), digest_size=8).digest(), "big")


def rendezvous(key: str, endpoints: Sequence[str]) -> list[str]:
    """Endpoints in the order this key prefers them."""
    return sorted(endpoints, key=lambda e: _weight(key, e), reverse=True)


@value
class Pin:
    backend: str
    endpoint: str
    expires: float


class SessionPins:
    """Bounded, idle-expiring map of a session key to where the session is served."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._pins: OrderedDict[str, Pin] = OrderedDict()
        self._max = max_entries

    def get(self, key: str, now: float) -> Pin | None:
        pin = self._pins.get(key)
        if pin is None:
            return None
        if pin.expires <= now:
            del self._pins[key]
            return None
        return pin

    def put(self, key: str, pin: Pin) -> None:
        self._pins[key] = pin
        self._pins.move_to_end(key)
        while len(self._pins) > self._max:
            self._pins.popitem(last=False)

    def __len__(self) -> int:
        return len(self._pins)
