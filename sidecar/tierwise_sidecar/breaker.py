"""A circuit breaker per upstream target: stop sending to what keeps failing, probe it later.

Closed: requests flow; `threshold` consecutive failures open it. Open: nothing is sent for
`cooldown` seconds. Then half-open: one probe at a time; its success closes the breaker, its
failure opens it again. Time is passed in, so the state machine is a pure object.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class Breaker:
    threshold: int = 5
    cooldown: float = 10.0
    state: State = State.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = False

    def available(self, now: float) -> bool:
        """Could a request be sent now (without taking the half-open probe)?"""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            return now - self.opened_at >= self.cooldown
        return not self.probing

    def acquire(self, now: float) -> bool:
        """Take the right to send one request now."""
        if self.state is State.OPEN and now - self.opened_at >= self.cooldown:
            self.state = State.HALF_OPEN
            self.probing = False
        if self.state is State.HALF_OPEN:
            if self.probing:
                return False
            self.probing = True
            return True
        return self.state is State.CLOSED

    def success(self) -> None:
        self.state = State.CLOSED
        self.failures = 0
        self.probing = False

    def failure(self, now: float) -> None:
        self.probing = False
        if self.state is State.HALF_OPEN:
            self._open(now)
            return
        self.failures += 1
        if self.failures >= self.threshold:
            self._open(now)

    def release(self) -> None:
        """A request that ended without saying anything about the target (e.g. client gone)."""
        self.probing = False

    def _open(self, now: float) -> None:
        self.state = State.OPEN
        self.opened_at = now
        self.failures = 0
