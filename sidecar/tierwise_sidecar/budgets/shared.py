"""Budgets in Redis, kept when Redis is away.

Normally every reservation is held in Redis (all sidecars see one ledger): judged there, or taken
from this sidecar's allowance slice, which is held there (slices.py; this ledger tops slices up,
renews their leases and gives them back). The replies keep a snapshot of each budget's committed
spend; a refresher keeps it current for every budget of the Policy. When Redis cannot be reached,
no request gets a 5xx: the sidecar judges on its own ledger, counting the last known committed
spend of each budget plus what it has spent and holds since, says so (a log line,
`tierwise_budget_store_degraded`, a response header), and keeps every settle it owes Redis. It
probes Redis every second; when Redis answers, the owed settles are sent (once each: they are
idempotent) before it is trusted again. While degraded, N sidecars can together overshoot a budget
by up to N times the remaining amount each last saw; with Redis up, by at most the difference
between a request's estimate and its actual cost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from tierwise.budgetrules import OK, ZERO, Amount, BudgetRule, Judgement
from tierwise.periods import Window, window
from tierwise_sidecar.budgets.ledger import Booking, Line, MemoryLedger, Reservation, Totals, Verdict
from tierwise_sidecar.budgets.redis_store import RedisLedgerClient, StoreUnavailableError
from tierwise_sidecar.budgets.settles import Settle
from tierwise_sidecar.budgets.slices import Slice, Slices
from tierwise_sidecar.state import stop

log = logging.getLogger("tierwise.budgets")

PROBE_SECONDS = 1.0
REFRESH_SECONDS = 5.0
_GRANTED = Judgement(OK)


class SharedLedger:
    def __init__(self, url: str, clock: Callable[[], float] = time.time, timeout: float = 0.5) -> None:
        self.client = RedisLedgerClient(url, self._owe, timeout)
        self.clock = clock
        self.local = MemoryLedger(base=self._last_known)
        self.slices = Slices()
        self._growing: set[asyncio.Task[None]] = set()
        self._snapshot: dict[tuple[str, str], Totals] = {}
        self._owed: list[Settle] = []
        self._tracked: tuple[BudgetRule, ...] = ()
        self._degraded = False
        self._task: asyncio.Task[None] | None = None
        self.errors = 0
        self.replayed = 0

    @property
    def degraded(self) -> bool:
        return self._degraded

    def owed(self) -> int:
        return len(self._owed)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.client.start()
        try:
            await self.client.ping()
            await self._refresh()
        except StoreUnavailableError as e:
            self._degrade(f"unreachable at start: {e}")
        self._task = asyncio.create_task(self._watch())

    async def close(self) -> None:
        await stop(self._task)
        for task in list(self._growing):
            task.cancel()
        await asyncio.gather(*self._growing, return_exceptions=True)
        if not self._degraded:
            self._give_back(self.slices.clear())
        await self.client.drain()
        if self._owed:
            try:
                await self.client.send(self._owed)
                self._owed.clear()
            except StoreUnavailableError as e:
                log.error("budget store %s: %d settle(s) could not be sent before exit (%s)", self.client.redacted,
                          len(self._owed), e)  # fmt: skip
        await self.client.close()

    def track(self, rules: Sequence[BudgetRule]) -> None:
        """The budgets of the Policy in force: their totals are refreshed for decisions and metrics."""
        self._tracked = tuple(rules)

    # ------------------------------------------------------------ the contract

    def _last_known(self, rule: BudgetRule, w: Window) -> Totals:
        return self._snapshot.get((rule.key, w.id)) or Totals()

    def own(self, rule: BudgetRule, w: Window) -> Totals | None:
        return None  # the store counts every sidecar's spend; the operator reads it there

    def totals(self, rule: BudgetRule, w: Window) -> Totals:
        if self._degraded:
            return self.local.totals(rule, w)
        return self._last_known(rule, w)

    def reserve_now(self, lines: Sequence[Line], now: float, lease_seconds: float) -> Booking | None:
        """A reservation decided here, without waiting: taken from the slices, or judged on the
        local ledger while Redis is away. None: Redis is to be asked (`reserve`)."""
        if self._degraded:
            booking = self.local.reserve_now(lines, now, lease_seconds)
            return Booking(booking.reservation, booking.verdicts, degraded=True)
        taken = self.slices.take(lines, now, lease_seconds)
        if taken is None:
            return None
        if self.slices.due:
            self._grow(now, lease_seconds)
        return Booking(taken, tuple(map(self._granted, lines)))

    async def reserve(self, lines: Sequence[Line], now: float, lease_seconds: float) -> Booking:
        booking = self.reserve_now(lines, now, lease_seconds)
        if booking is not None:
            return booking
        asks = self.slices.asks(lines, now, lease_seconds)
        sent = time.monotonic()
        try:
            booking = await self.client.reserve(lines, now, lease_seconds, asks)
        except StoreUnavailableError as e:
            self._degrade(str(e))
            local = self.local.reserve_now(lines, now, lease_seconds)
            return Booking(local.reservation, local.verdicts, degraded=True)
        self.slices.timed(time.monotonic() - sent)
        self._remember(booking)
        if booking.reservation is None:
            self._give_back(self.slices.refused(asks))
        else:
            for rule, lease, extra in self.slices.granted(booking.reservation, asks, booking.extras, now,
                                                          lease_seconds):  # fmt: skip
                self.client.give_back(rule, lease, extra)
        return booking

    def _granted(self, line: Line) -> Verdict:
        """A line taken from a slice: granted, against the budget's spend as last seen."""
        return Verdict(line, _GRANTED, self._last_known(line.rule, line.window))

    def _remember(self, booking: Booking) -> None:
        for v in booking.verdicts:
            self._snapshot[(v.line.rule.key, v.line.window.id)] = v.totals

    def settle(self, reservation: Reservation, actual: Amount, now: float) -> None:
        if not reservation.remote:
            if self._degraded:
                # Judged locally: counted locally until Redis has it, and owed to Redis.
                self.local.settle(reservation, actual, now)
                self._owed.append(Settle(self.client.next_seq(), reservation, actual))
                return
            # Held here while Redis was away, settled once it is back: the spend goes to Redis.
            self.local.release(reservation)
        else:
            self.slices.settled(reservation)
        self.client.settle(reservation, actual)

    # ------------------------------------------------------------ slices

    def _grow(self, now: float, lease_seconds: float) -> None:
        """Top up, in the background, the slices takes left below half their target."""
        for s, line in self.slices.due:
            task = asyncio.create_task(self._top_up(s, line, now, lease_seconds))
            self._growing.add(task)
            task.add_done_callback(self._growing.discard)
        self.slices.due.clear()

    async def _top_up(self, s: Slice, line: Line, now: float, lease_seconds: float) -> None:
        sent = time.monotonic()
        try:
            booking = await self.client.reserve([Line(line.rule, line.window, ZERO)], now, lease_seconds,
                                                [(s.lease, self.slices.want(s))])  # fmt: skip
        except StoreUnavailableError as e:
            self.slices.topped(s, ZERO, now, lease_seconds)
            self._degrade(str(e))
            return
        self.slices.timed(time.monotonic() - sent)
        self._remember(booking)
        extra = booking.extras[0] if booking.reservation is not None else ZERO
        back = self.slices.topped(s, extra, now, lease_seconds)
        if back != ZERO:
            self.client.give_back(s.rule, s.lease, back)

    def _give_back(self, freed: Sequence[tuple[Slice, Amount]]) -> None:
        for s, amount in freed:
            self.client.give_back(s.rule, s.lease, amount)

    async def _tend_slices(self) -> None:
        """Idle slices go back; slices in use have their leases lengthened."""
        now = self.clock()
        self._give_back(self.slices.idle(now))
        due = self.slices.to_renew(now)
        if due:
            await self.client.renew([(s.rule, s.lease, now + s.length) for s in due])
            for s in due:
                s.expires = max(s.expires, now + s.length)

    # ------------------------------------------------------------ degraded and back

    def _owe(self, settles: Sequence[Settle]) -> None:
        self._owed.extend(settles)
        self._degrade(f"{len(settles)} settle(s) could not be sent")

    def _degrade(self, why: str) -> None:
        self.errors += 1
        if not self._degraded:
            self._degraded = True
            log.warning("budget store %s unavailable (%s): enforcing on this sidecar's last known totals and "
                        "its own spend until it returns", self.client.redacted, why)  # fmt: skip

    async def _recover(self) -> None:
        await self.client.ping()
        await self._pay_back()
        await self._refresh()
        # Settled while the totals were read: paid too, and nothing awaited until the switch, so
        # no settle can slip between the last payment and trusting Redis again.
        await self._pay_back()
        # What was counted locally is in Redis now, and in the snapshot.
        self.local.forget_spent()
        # Slices were not tended while Redis was away: what is left of them goes back.
        self._give_back(self.slices.clear())
        self._degraded = False
        log.info("budget store %s is back: owed settles sent, enforcing on it again", self.client.redacted)

    async def _pay_back(self) -> None:
        while self._owed:
            batch = self._owed[:256]
            await self.client.send(batch)
            del self._owed[: len(batch)]
            self.replayed += len(batch)

    async def _refresh(self) -> None:
        if not self._tracked:
            return
        now = self.clock()
        pairs = [(r, window(r.period, r.time_zone, now)) for r in self._tracked]
        totals = await self.client.read(pairs)
        for (r, w), amount in zip(pairs, totals, strict=True):
            self._snapshot[(r.key, w.id)] = amount

    async def _watch(self) -> None:
        last_refresh = time.monotonic()
        while True:
            await asyncio.sleep(PROBE_SECONDS)
            try:
                if self._degraded:
                    await self._recover()
                    continue
                await self._tend_slices()
                if time.monotonic() - last_refresh >= REFRESH_SECONDS:
                    await self._refresh()
                    last_refresh = time.monotonic()
            except StoreUnavailableError as e:
                self._degrade(str(e))
            except Exception:
                log.exception("budget store watch failed")
