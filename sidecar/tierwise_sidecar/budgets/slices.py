"""A sidecar's allowance slices: budget it holds in Redis ahead of its own requests.

A reservation in Redis is a round trip before the backend is called. To keep it off the hot path,
when a request has to go to Redis it also asks for a slice: up to SLICE_REQUESTS times its own
worst case more (or twice as many as the sidecar has in flight on that budget, or what its
requests take in ROUND_TRIPS round trips to Redis, when that is more), held under one lease of
this sidecar's per budget. Later requests whose every
budget has enough left in its slice are reserved here, at once, and a slice running low is topped
up in the background before it runs out. Everything a slice holds is held in Redis, so the limit
is never loosened: the overshoot bound stays that of a reservation per request. Redis grants at
most 1/8 of what a budget has left after the asking request (see lua.py), so near the limit
slices shrink to nothing and every request is judged in Redis again; a budget past a Throttle
threshold gets no slices (each request takes a token from the shared bucket).

What a slice holds is not spent: it counts as held by requests in flight, for other sidecars'
decisions (a request may be refused, Retry-After one second, while another sidecar holds an
unused slice) and for thresholds (a threshold may be crossed up to a slice early). Slices go back
to Redis as soon as a grant is refused, and after IDLE_SECONDS without use; a sidecar that dies
leaves its slices to expire with their leases, as it would its requests' reservations.

This module is the sidecar's book of its slices: pure bookkeeping, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tierwise.budgetrules import ZERO, Amount, BudgetRule
from tierwise_sidecar.budgets.ledger import SLICED, Line, Reservation, new_id

# A slice aims to cover this many more requests like the one that asked; topped up at half.
SLICE_REQUESTS = 8
# And, on a busy budget, what its requests take in this many round trips to Redis: topped up at
# half, a slice then lasts two round trips more, so the top-up lands before it runs dry.
ROUND_TRIPS = 4
# How often a slice's take rate is re-estimated (seconds), and the weight of the newest estimate.
RATE_EVERY = 0.25
RATE_WEIGHT = 0.5
IDLE_SECONDS = 2.0


@dataclass(slots=True)
class Slice:
    lease: str
    rule: BudgetRule
    window: str
    # The lease's length: that of the requests it serves.
    length: float
    # Granted and not yet taken by a request (micro-dollars, tokens). Plain integers rather than
    # Amounts: they change on every request's way in and out, and an Amount a change was the
    # slice path's largest cost.
    free_micros: int
    free_tokens: int
    # Taken by requests that have not settled (still held under the lease in Redis).
    held_micros: int
    held_tokens: int
    expires: float
    used: float
    # What it is topped up to, in asks like the last: SLICE_REQUESTS, twice its requests in flight,
    # or ROUND_TRIPS round trips' worth of its takes, whichever is most (a busy sidecar would
    # drain a small slice before its top-up lands, and its requests would queue for Redis).
    target: Amount
    topping: bool = False
    in_flight: int = 0
    # Requests reserved under its lease per second (slice or round trip), lately; counting since.
    rate: float = 0.0
    counted: int = 0
    since: float = 0.0

    @property
    def free(self) -> Amount:
        return Amount(self.free_micros, self.free_tokens)

    def add_free(self, extra: Amount) -> None:
        self.free_micros += extra.micros
        self.free_tokens += extra.tokens

    def has_free(self) -> bool:
        return bool(self.free_micros or self.free_tokens)

    def holds(self) -> bool:
        return bool(self.held_micros or self.held_tokens)

    def hold(self, ask: Amount, now: float) -> None:
        """A request's ask is held under the lease, from the free part or from a grant."""
        self.held_micros += ask.micros
        self.held_tokens += ask.tokens
        self.in_flight += 1
        self.used = now


def _count(s: Slice, now: float) -> bool:
    """Count a request reserved under the slice's lease; True when its rate was re-estimated."""
    s.counted += 1
    elapsed = now - s.since
    if elapsed < RATE_EVERY:
        return False
    s.rate = s.rate + RATE_WEIGHT * (s.counted / elapsed - s.rate) if s.rate else s.counted / elapsed
    s.counted, s.since = 0, now
    return True


class Slices:
    def __init__(self) -> None:
        self._by_budget: dict[tuple[str, str], Slice] = {}
        self._by_lease: dict[str, Slice] = {}
        # A reservation's round trip to Redis lately (seconds): how long a top-up takes to land.
        self.round_trip = 0.0
        # The slices takes left below half their target, each with the line that drew on it and
        # marked as being topped up: the shared ledger sends their top-ups (and empties this).
        self.due: list[tuple[Slice, Line]] = []

    def timed(self, seconds: float) -> None:
        """A round trip to Redis took `seconds`."""
        self.round_trip = self.round_trip + RATE_WEIGHT * (seconds - self.round_trip) if self.round_trip else seconds

    def _aim(self, s: Slice, ask: Amount) -> None:
        n = max(SLICE_REQUESTS, 2 * (s.in_flight + 1), math.ceil(ROUND_TRIPS * s.rate * self.round_trip))
        s.target = Amount(ask.micros * n, ask.tokens * n)

    def __iter__(self) -> Iterator[Slice]:
        return iter(list(self._by_budget.values()))

    def __len__(self) -> int:
        return len(self._by_budget)

    def _slice(self, line: Line, now: float) -> Slice | None:
        s = self._by_budget.get((line.rule.key, line.window.id))
        if s is not None and s.expires <= now:
            # Its lease may be gone from Redis: a new lease id, so nothing lands on a freed one.
            self._drop(s)
            return None
        return s

    def _drop(self, s: Slice) -> None:
        if self._by_budget.get((s.rule.key, s.window)) is s:
            del self._by_budget[(s.rule.key, s.window)]
        self._by_lease.pop(s.lease, None)

    # ------------------------------------------------------------ on a request's way in

    def take(self, lines: Sequence[Line], now: float, lease_seconds: float) -> Reservation | None:
        """A reservation from the slices alone, all lines or none: every budget's slice has the
        ask free and a lease that outlives the request. A slice it leaves below half its target
        is put on `due` in the same pass."""
        slices = []
        by_budget = self._by_budget
        for line in lines:
            # An expired slice is not taken from; asks() drops it on the way to Redis.
            s = by_budget.get((line.rule.key, line.window.id))
            ask = line.ask
            if (
                s is None
                or s.expires - now < lease_seconds / 2
                or s.free_micros < ask.micros
                or s.free_tokens < ask.tokens
            ):
                return None
            slices.append(s)
        for s, line in zip(slices, lines, strict=True):
            ask = line.ask
            s.free_micros -= ask.micros
            s.free_tokens -= ask.tokens
            s.hold(ask, now)
            if _count(s, now):
                self._aim(s, ask)
            if not s.topping and (s.free_micros < s.target.micros // 2 or s.free_tokens < s.target.tokens // 2):
                s.topping = True
                self.due.append((s, line))
        # One budget is the usual case: its lease without a comprehension's frame.
        leases = (slices[0].lease,) if len(slices) == 1 else tuple([s.lease for s in slices])
        return Reservation(SLICED, tuple(lines), now + lease_seconds, True, leases)

    def asks(self, lines: Sequence[Line], now: float, lease_seconds: float) -> list[tuple[str, Amount]]:
        """For a reservation that goes to Redis: per line, the lease to hold under and how much
        more to ask for (what tops the slice up to SLICE_REQUESTS times this ask). One grant at a
        time asks for more: requests that go to Redis together do not each take a slice."""
        out = []
        for line in lines:
            s = self._slice(line, now)
            if s is None:
                lease = new_id()
                # Expiring when its first grant's lease would (the grant may still be on its way).
                s = Slice(lease, line.rule, line.window.id, lease_seconds, 0, 0, 0, 0, now + lease_seconds, now, ZERO,
                          since=now)  # fmt: skip
                self._by_budget[(line.rule.key, line.window.id)] = s
                self._by_lease[lease] = s
            self._aim(s, line.ask)
            want = ZERO if s.topping else self.want(s)
            s.topping = s.topping or want != ZERO
            out.append((s.lease, want))
        return out

    def granted(
        self, r: Reservation, asks: Sequence[tuple[str, Amount]], extras: Sequence[Amount], now: float,
        lease_seconds: float,
    ) -> list[tuple[BudgetRule, str, Amount]]:  # fmt: skip
        """Redis held the request's ask and `extras` more under the slices' leases. Returns the
        extras of slices that went from the book meanwhile (given back while this grant was on its
        way): they are to be given back too, or they would stay held until their lease expires."""
        orphaned = []
        for line, (lease, want), extra in zip(r.lines, asks, extras, strict=True):
            s = self._by_lease.get(lease)
            if s is None:
                if extra != ZERO:
                    orphaned.append((line.rule, lease, extra))
                continue
            if want != ZERO:
                s.topping = False
            s.add_free(extra)
            s.hold(line.ask, now)
            s.expires = max(s.expires, now + lease_seconds)
            s.length = lease_seconds
            _count(s, now)
        return orphaned

    def want(self, s: Slice) -> Amount:
        return Amount(max(s.target.micros - s.free_micros, 0), max(s.target.tokens - s.free_tokens, 0))

    def topped(self, s: Slice, extra: Amount, now: float, lease_seconds: float) -> Amount:
        """A top-up landed; what to give back (all of it when the slice went from the book
        meanwhile)."""
        s.topping = False
        if self._by_lease.get(s.lease) is not s:
            return extra
        s.add_free(extra)
        if extra != ZERO:
            s.expires = max(s.expires, now + lease_seconds)
        return ZERO

    # ------------------------------------------------------------ on its way out, and over time

    def settled(self, r: Reservation) -> None:
        # Indexed rather than zipped, and clamped by comparisons rather than max(): run on every
        # request's way out, for one line or a few.
        leases, by_lease = r.leases, self._by_lease
        for i, line in enumerate(r.lines):
            s = by_lease.get(leases[i])
            if s is not None:
                ask = line.ask
                held = s.held_micros - ask.micros
                s.held_micros = held if held > 0 else 0
                held = s.held_tokens - ask.tokens
                s.held_tokens = held if held > 0 else 0
                s.in_flight = s.in_flight - 1 if s.in_flight > 0 else 0

    def release(self, s: Slice) -> Amount:
        """Empty a slice's free part (to be given back); what it gave up."""
        free = s.free
        s.free_micros = s.free_tokens = 0
        if not s.holds():
            self._drop(s)
        return free

    def refused(self, asks: Sequence[tuple[str, Amount]]) -> list[tuple[Slice, Amount]]:
        """A reservation was refused: the slices of its budgets give back what they have free."""
        out = []
        for lease, want in asks:
            s = self._by_lease.get(lease)
            if s is None:
                continue
            if want != ZERO:
                s.topping = False
            if s.has_free():
                out.append((s, self.release(s)))
        return out

    def idle(self, now: float) -> list[tuple[Slice, Amount]]:
        """Slices unused for IDLE_SECONDS give back what they have free; empty ones are dropped."""
        out = []
        for s in self:
            if now - s.used < IDLE_SECONDS:
                continue
            if s.has_free():
                out.append((s, self.release(s)))
            elif not s.holds():
                self._drop(s)
        return out

    def to_renew(self, now: float) -> list[Slice]:
        """Slices in use whose lease has less than three quarters of its length left."""
        return [s for s in self if (s.has_free() or s.holds()) and s.expires - now < 0.75 * s.length]

    def clear(self) -> list[tuple[Slice, Amount]]:
        """Every slice's free part, to give back (the book starts afresh)."""
        out = [(s, s.free) for s in self if s.has_free()]
        self._by_budget.clear()
        self._by_lease.clear()
        return out
