"""The waiting room in front of one upstream target (a model at one URL, Service or replica),
shared by every tier that sends there, so priorities order requests across tiers.

A request takes a slot at once when one is free and nobody of its rank or higher waits; else it
waits in rank order (the tier's priority, then the request's own, then first come) for at most
its tier's maximum wait. A request is refused at once, with the wait it would have had as
Retry-After, when that wait is longer than it may wait, or when one of its rank waited out its
patience in the last second (the queue of that rank stands at its limit), and a higher rank asked
for a slot lately (for a sheddable request: when the target is saturated at all). The lowest
priorities wait first and are turned away first, and few hold a place only to time out. The
highest rank present waits out its patience instead: it is next whatever the estimate says. A
full room sheds by the tier's policy: the lowest-ranked waiter gives its place to a higher one, or
the newcomer (or the oldest) is refused.

The expected wait is Little's law on what the room has seen: the requests ahead, over the slots,
times how long a slot has recently been held.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from tierwise.api.tier import ShedPolicy
from tierwise.values import value
from tierwise_sidecar.admission.limit import Limit

# How often a waiter looks whether its caller is still connected.
GONE_POLL_SECONDS = 0.25
# Weight of the newest slot-hold time in its moving average.
HOLD_EWMA = 0.1
# How long the highest rank seen keeps the privilege of never being refused on an estimate.
TOP_SECONDS = 10.0
# How long after a waiter of a rank waited out its patience the next ones of it are refused at once.
GAVE_UP_SECONDS = 1.0

Rank = tuple[int, int]


# Why a room refused, as metrics count it.
SATURATED, WAIT, FULL, DISPLACED, DRAINING = "saturated", "wait", "full", "displaced", "draining"


class RefusedError(Exception):
    """No slot: why (for the caller, and as one of the kinds above), and when to try again."""

    def __init__(self, reason: str, retry_after: float, kind: str = WAIT, status: int = 429) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.kind = kind
        self.status = status


class GoneError(Exception):
    """The caller hung up while waiting."""


@dataclass(slots=True)
class Waiter:
    rank: Rank
    future: asyncio.Future[None]
    # Monotonic time (the room's clock) when it has waited as long as it may.
    until: float
    connected: Callable[[], bool]
    # The next look at the waiter: its deadline, or whether its caller is still there.
    look: asyncio.TimerHandle | None = None


# heapq pops the smallest key: the highest rank first, then the earliest. Keys are unique (the
# sequence number), so tuples compare in C and never reach the waiter.
Entry = tuple[tuple[int, int, int], Waiter]


@value
class Ticket:
    """What a request asks of a room."""

    rank: Rank
    max_wait: float
    max_length: int
    shed: ShedPolicy

    @property
    def sheddable(self) -> bool:
        return self.rank[0] < 0


class Room:
    def __init__(self, name: str, limit: Limit, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.limit = limit
        self.clock = clock
        self.in_flight = 0
        self.heap: list[Entry] = []
        self.waiting = 0
        self.hold = 0.0  # seconds a slot is held, on average lately
        # When the latest answered try had started, and when a try turned away last told the
        # limit (monotonic): see congested().
        self.answered_started = -math.inf
        self.busy_at = -math.inf
        # The highest rank that asked for a slot lately, and when: it is never refused on an estimate.
        self.top: Rank = (-(2**31), 0)
        self.top_at = -math.inf
        # Slots seen at the last dispatch: when the limit rises past what the target is known to
        # take, one slot is a probe, owed to the lowest waiter.
        self._slots = limit.slots
        self._probe_owed = False
        # When a waiter of each rank last waited out its patience: the queue of that rank stands
        # at its limit, and the next ones are refused at once instead of after the same wait.
        self.gave_up: dict[Rank, float] = {}
        self._seq = itertools.count()

    # ------------------------------------------------------------ reading

    def answered(self, started: float) -> None:
        """The target answered a try begun at `started`."""
        self.answered_started = max(self.answered_started, started)

    def congested(self, explicit: bool, now: float) -> bool:
        """Whether a try the target turned away should tell its limit. An explicit capacity signal
        (a 429) always does. An ambiguous one (a 503, a timeout: at capacity, or down) does when
        the target answered a try begun since the last one that did: an outage costs one cut."""
        if explicit or self.answered_started > self.busy_at:
            self.busy_at = now
            return True
        return False

    @property
    def load_percent(self) -> float:
        """Slots in use and asked for, over the slots."""
        return 100.0 * (self.in_flight + self.waiting) / self.limit.slots

    @property
    def saturated(self) -> bool:
        # Every slot taken, or somebody waiting for one. A congested last window is not enough by
        # itself: it already lowered the limit, and a sheddable request is never refused while a
        # slot is free (a noisy latency sample must not shed traffic the target could take).
        return self.in_flight >= self.limit.slots or self.waiting > 0

    def _outranked(self, rank: Rank) -> bool:
        """Did a higher rank ask for a slot lately? The highest rank present waits out its
        patience rather than be refused on an estimate: it is served first whatever comes."""
        return rank < self.top and self.clock() - self.top_at < TOP_SECONDS

    def _seen(self, rank: Rank) -> None:
        now = self.clock()
        if rank >= self.top or now - self.top_at >= TOP_SECONDS:
            self.top, self.top_at = rank, now

    def ahead_of(self, rank: Rank) -> int:
        return sum(1 for _, w in self.heap if w.rank >= rank and not w.future.done())

    def expected_wait(self, ahead: int) -> float:
        """Seconds until a request with `ahead` waiters before it would get a slot."""
        hold = self.hold or 1.0
        return (ahead + 1) * hold / self.limit.slots

    # ------------------------------------------------------------ entering and leaving

    def try_enter(self, rank: Rank) -> bool:
        self._seen(rank)
        if self.in_flight < self.limit.slots:
            top = self._top()
            if top is None or top.rank < rank:
                self._take()
                return True
        return False

    def _top(self) -> Waiter | None:
        """The highest-ranked live waiter (refused and cancelled ones are dropped on the way)."""
        heap = self.heap
        while heap and heap[0][1].future.done():
            heapq.heappop(heap)
        return heap[0][1] if heap else None

    async def enter(self, ticket: Ticket, deadline: float, connected: Callable[[], bool]) -> float:
        """Take a slot, waiting if need be; the seconds waited. Raises RefusedError or GoneError."""
        if self.try_enter(ticket.rank):
            return 0.0
        now = self.clock()
        patience = min(ticket.max_wait, deadline - now)
        if ticket.sheddable:
            raise RefusedError(f"target {self.name} is saturated and the request's tier is sheddable",
                               self.expected_wait(self.ahead_of(ticket.rank)), SATURATED)  # fmt: skip
        if self._outranked(ticket.rank):
            expected = self.expected_wait(self.ahead_of(ticket.rank))
            if expected > patience:
                raise RefusedError(f"target {self.name} is saturated: the expected wait ({expected:.1f}s) is longer "
                                   f"than this request may wait ({max(patience, 0):.1f}s)", expected)  # fmt: skip
            if now - self.gave_up.get(ticket.rank, -math.inf) < GAVE_UP_SECONDS:
                why = f"requests of this priority waited out their maximum wait ({ticket.max_wait:.1f}s) lately"
                raise RefusedError(f"target {self.name} is saturated: {why}", max(expected, ticket.max_wait))
        if patience <= 0:
            raise self._waited_out(ticket.rank, now)
        self._make_room(ticket)
        loop = asyncio.get_running_loop()
        w = Waiter(ticket.rank, loop.create_future(), now + patience, connected)
        heapq.heappush(self.heap, ((-ticket.rank[0], -ticket.rank[1], next(self._seq)), w))
        self.waiting += 1
        # The waiter awaits its future alone: a slot (dispatch), a refusal (a full room, draining)
        # or its own look (deadline, caller gone) completes it, each only with a final answer.
        w.look = loop.call_later(min(patience, GONE_POLL_SECONDS), self._look, w)
        try:
            await w.future
        except BaseException:
            f = w.future
            if f.done() and not f.cancelled() and f.exception() is None:
                self.leave(0.0)  # a slot arrived just as the caller left: hand it on
            else:
                f.cancel()
            raise
        finally:
            self.waiting -= 1
            w.look.cancel()
        return self.clock() - now

    def _look(self, w: Waiter) -> None:
        """A timer's look at a waiter: refused at its deadline, dropped when its caller is gone,
        else looked at again later. It stays in its place meanwhile."""
        if w.future.done():
            return
        now = self.clock()
        left = w.until - now
        if left <= 0:
            w.future.set_exception(self._waited_out(w.rank, now))
        elif not w.connected():
            w.future.set_exception(GoneError())
        else:
            w.look = asyncio.get_running_loop().call_later(min(left, GONE_POLL_SECONDS), self._look, w)

    def _waited_out(self, rank: Rank, now: float) -> RefusedError:
        self.gave_up[rank] = now
        return RefusedError(f"target {self.name} had no free slot within the request's maximum wait",
                            self.expected_wait(self.ahead_of(rank)))  # fmt: skip

    def _make_room(self, ticket: Ticket) -> None:
        """A full room sheds by the newcomer's tier's policy, or refuses the newcomer."""
        if self.waiting < ticket.max_length:
            return  # waiters counted include every live one (and some a slot or refusal just reached)
        live = [e for e in self.heap if not e[1].future.done()]
        if len(live) < ticket.max_length:
            return
        victim: Waiter | None = None
        if ticket.shed is ShedPolicy.LOWEST_PRIORITY_FIRST:
            lowest = max(live)[1]  # the last to be served
            victim = lowest if lowest.rank < ticket.rank else None
        elif ticket.shed is ShedPolicy.OLDEST_FIRST:
            victim = min(live, key=lambda e: e[0][2])[1]  # the first come
        if victim is None:
            raise RefusedError(f"the waiting room of target {self.name} is full", self.expected_wait(len(live)), FULL)
        who = "a request of higher priority" if ticket.shed is ShedPolicy.LOWEST_PRIORITY_FIRST else "a newer request"
        victim.future.set_exception(RefusedError(f"{who} took this request's place at target {self.name}",
                                                 self.expected_wait(len(live)), DISPLACED))  # fmt: skip

    def _take(self) -> None:
        self.in_flight += 1
        self.limit.reached(self.in_flight)

    def leave(self, held: float) -> None:
        """A slot is given back after `held` seconds."""
        self.in_flight -= 1
        if held > 0:
            self.hold = held if not self.hold else self.hold + HOLD_EWMA * (held - self.hold)
        self.dispatch()

    def dispatch(self) -> None:
        """Hand free slots to the highest waiters (also after the limit rose). When the limit rises
        past the level the target is known to take, the first slot above it is a probe of the
        target's capacity, which may well be answered 429: it goes to the lowest-ranked waiter, so
        gold does not pay for the probing; the slots after it go by rank again."""
        slots = self.limit.slots
        if slots != self._slots:
            self._probe_owed = slots > self._slots and slots > self.limit.safe
            self._slots = slots
        while self.heap and self.in_flight < slots:
            probe = self._probe_owed and self.in_flight + 1 > self.limit.safe
            w = self._lowest() if probe else heapq.heappop(self.heap)[1]
            if w.future.done():
                continue
            self._probe_owed = self._probe_owed and not probe
            self._take()
            w.future.set_result(None)
        # Cancelled and refused waiters left in the heap are dropped when they reach the top; a
        # heap of only those is emptied here so it does not grow while nothing is dispatched.
        if self.heap and all(w.future.done() for _, w in self.heap):
            self.heap.clear()

    def _lowest(self) -> Waiter:
        live = [e for e in self.heap if not e[1].future.done()]
        if not live:
            return heapq.heappop(self.heap)[1]
        e = max(live)
        self.heap.remove(e)
        heapq.heapify(self.heap)
        return e[1]

    def drain(self, seconds: float) -> int:
        """Refuse (503) every waiter that cannot expect to start within `seconds`; how many."""
        refused = 0
        for i, (_, w) in enumerate(sorted(e for e in self.heap if not e[1].future.done())):
            if self.expected_wait(i) > seconds:
                w.future.set_exception(RefusedError("the sidecar is shutting down", 1.0, DRAINING, 503))
                refused += 1
        return refused
