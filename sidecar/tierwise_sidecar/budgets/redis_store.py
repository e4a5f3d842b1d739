"""Budgets shared by every sidecar, in Redis: a round trip per reservation at most, settles ride along.

A reservation is run by a server-side script (lua.py) over every budget that counts the request:
it frees expired leases, reads each budget's settled spend (a calendar period's hash, or the
buckets of a rolling window) and what requests in flight hold, judges each as `rules.judge` does,
and only when no enforcing budget refuses, holds the amount under a lease: the request's own, or
a sidecar's allowance slice to which the script adds what it can spare for later requests
(slices.py). Settling takes what the request held out of its lease and adds the actual cost; it
carries this sidecar's instance id and a sequence number, recorded in a bitmap, so a settle that
is sent again (its reply was lost, or it was owed while Redis was away) counts once. All of them,
with slices given back and renewed, go through one outbox, one script call a flush. The settles
of a flush that take from the same leases (the requests a slice served) go as one (settles.py).

All keys share one hash tag, so the scripts also run on Redis Cluster, where every key of one
script must live in one slot. Amounts are integers (micro-dollars, tokens) passed as decimal
strings: Lua's numbers are doubles, exact up to 2^53 micro-dollars ($9e9), above any limit the API
allows, and increments never go through Lua's number formatting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from tierwise.budgetkeys import held_of, hold_keys, spend_key, spend_of
from tierwise.budgetrules import OK, OVER_LIMIT, THROTTLED, ZERO, Amount, BudgetRule, Judgement
from tierwise.periods import Window
from tierwise_sidecar.budgets.ledger import Booking, Line, Reservation, Totals, Verdict, new_id
from tierwise_sidecar.budgets.lua import BATCH
from tierwise_sidecar.budgets.settles import KEYS_CACHE_MAX, Settle, SettleOps, Summed, same_leases
from tierwise_sidecar.redis_conn import connection_class

log = logging.getLogger("tierwise.budgets")

# A settle waits at most this long for a reservation to share a round trip with. It only delays
# when a hold is released and its spend lands (both in the safe direction for others' decisions);
# a sidecar killed in that window leaves its lease to expire.
SETTLE_DELAY = 0.05


def _throttle_spec(rule: BudgetRule) -> str:
    def n(v: int | None) -> int:
        return -1 if v is None else v

    return ";".join(f"{n(s.micros)},{n(s.tokens)},{rps!r}" for s, rps in rule.throttles)


def _caps(rule: BudgetRule) -> tuple[int, int]:
    cap = rule.cap
    if cap is None:
        return -1, -1
    return -1 if cap.micros is None else cap.micros, -1 if cap.tokens is None else cap.tokens


class StoreUnavailableError(Exception):
    pass


# What an op's result goes to: a reservation's or renewal's future, a settle (counted, and handed
# back if it could not be sent), or nothing (a give-back, sent when convenient).
Waiter = asyncio.Future[Any] | Settle | None
Op = tuple[list[Any], list[Any], Waiter]
# A reservation's per-budget keys, and its arguments before and after the amounts.
_ReserveParts = tuple[tuple[str, ...], tuple[int, int, int, int], tuple[str, str]]


class RedisLedgerClient:
    """The script and one outbox for it; no local view (the shared ledger adds that).

    Reservations go out at the event loop's next turn, together with whatever else was issued
    meanwhile; settles wait for the next reservation to ride along with (at most SETTLE_DELAY).
    One flush is in flight at a time, on a connection of its own (a redis-py Connection: no pool,
    no lock, no timer per read; one timeout bounds the round trip), and what is issued while it is
    goes out in the next: the busier the sidecar, the more requests share a round trip and
    redis-py's work for it, and a lone request costs one round trip, not two. The script is called
    by its SHA, loaded again only when Redis answers that it does not know it (after a restart).
    """

    def __init__(self, url: str, on_failed: Callable[[Sequence[Settle]], None], timeout: float = 0.5) -> None:
        self.url = url
        self.instance = uuid.uuid4().hex
        self._seq = 0
        self._on_failed = on_failed
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # A reserve or settle sent twice would hold or count twice: no blind retries here; a
            # failure degrades to the local ledger and settles are sent again idempotently.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            connection_class=connection_class(url),
        )
        self._batch = self._client.register_script(BATCH)
        pool: aioredis.ConnectionPool = aioredis.ConnectionPool.from_url(
            url, socket_timeout=None, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            health_check_interval=0, connection_class=connection_class(url),
        )  # fmt: skip
        self._conn = pool.make_connection()  # type: ignore[no-untyped-call]
        self._lock = asyncio.Lock()
        self.timeout = timeout
        # Each op: its keys, its args (its kind first), and what waits for its result.
        self._outbox: list[Op] = []
        self._flushing: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self._in_flight = False
        self._timer: asyncio.TimerHandle | None = None
        self._settles_pending = 0
        self._summing: dict[tuple[object, ...], Summed] = {}
        self._settle_op = SettleOps(self.instance).op
        self._reserve_cache: dict[tuple[str, Window], tuple[BudgetRule, _ReserveParts]] = {}
        self.sent = 0
        self.round_trips = 0

    async def start(self) -> None:
        return None

    async def drain(self, seconds: float = 5.0) -> None:
        """Wait (bounded) until everything issued was sent, a settle that failed handed back."""
        if (self._outbox or self._summing) and not self._scheduled:
            self._flush()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while self._settles_pending or self._outbox or self._summing or self._in_flight:
                    if (self._outbox or self._summing) and not self._scheduled and not self._in_flight:
                        self._flush()
                    await asyncio.sleep(0.005)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._flushing):
            task.cancel()
        await asyncio.gather(*self._flushing, return_exceptions=True)
        rest = [item for _, _, item in self._outbox if isinstance(item, Settle)]
        rest += [summed.settle(self.next_seq()) for summed in self._summing.values()]
        self._outbox.clear()
        self._summing.clear()
        if rest:
            self._settles_pending -= sum(s.requests for s in rest)
            self._on_failed(rest)
        await self._conn.disconnect()
        await self._client.aclose()

    async def ping(self) -> None:
        try:
            await self._client.execute_command("PING")  # type: ignore[no-untyped-call]
        except (RedisError, OSError) as e:
            raise StoreUnavailableError(str(e)) from None

    # ------------------------------------------------------------ the outbox

    def _post(self, keys: list[Any], args: list[Any], item: Waiter) -> None:
        self._outbox.append((keys, args, item))
        self._wake(isinstance(item, asyncio.Future))

    def _wake(self, waited_for: bool) -> None:
        """A flush at the loop's next turn for what a request waits for; within SETTLE_DELAY else."""
        if self._scheduled or self._in_flight:
            return
        if not waited_for:
            # Asked only when a timer is to be set: every settle comes here, and on Python 3.11
            # get_running_loop() makes a getpid() system call (a fork check).
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(SETTLE_DELAY, self._flush)
            return
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._in_flight:
            return  # the flush in flight sends what waits when it is done
        batch, self._outbox = self._outbox, []
        if self._summing:
            # Settles first: what finished before a reservation in the same flush is counted for it.
            batch[:0] = [(*self._settle_op(s), s) for s in (m.settle(self.next_seq()) for m in self._summing.values())]
            self._summing.clear()
        if batch:
            self._in_flight = True
            task = asyncio.create_task(self._send(batch))
            self._flushing.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._flushing.discard(task)
        self._in_flight = False
        if any(isinstance(item, asyncio.Future) for _, _, item in self._outbox):
            self._flush()  # reservations waited for this round trip
        elif (self._outbox or self._summing) and self._timer is None and not task.cancelled():
            self._timer = asyncio.get_running_loop().call_later(SETTLE_DELAY, self._flush)

    async def _send(self, batch: list[Op]) -> None:
        try:
            results = await self._call(batch)
        except asyncio.CancelledError:
            self._fail(batch, StoreUnavailableError("closed"))
            raise
        except (RedisError, OSError, StoreUnavailableError) as e:
            self._fail(batch, e if isinstance(e, StoreUnavailableError) else StoreUnavailableError(str(e)))
            return
        for (_, _, item), result in zip(batch, results, strict=True):
            if isinstance(item, Settle):
                self._settles_pending -= item.requests
                self.sent += item.requests
            elif item is not None and not item.done():
                item.set_result(result)

    def _fail(self, batch: list[Op], error: Exception) -> None:
        settles = [item for _, _, item in batch if isinstance(item, Settle)]
        for _, _, item in batch:
            if isinstance(item, asyncio.Future) and not item.done():
                item.set_exception(error)
        if settles:
            n = sum(s.requests for s in settles)
            self._settles_pending -= n
            log.warning("budget store %s: %d settle(s) not sent (%s); kept to send when it returns",
                        self.redacted, n, error)  # fmt: skip
            self._on_failed(settles)

    async def _call(self, batch: list[Op]) -> list[Any]:
        """Every op of the batch in one script call. NOSCRIPT (Redis restarted and lost its script
        cache) means nothing ran: the script is loaded and the call sent once more."""
        keys = [k for op_keys, _, _ in batch for k in op_keys]
        args = [len(batch), *(a for _, op_args, _ in batch for a in op_args)]
        async with self._lock:  # one command at a time on the connection: replies come in order
            self.round_trips += 1
            for attempt in range(2):
                try:
                    return list(await self._round_trip("EVALSHA", self._batch.sha, len(keys), *keys, *args))
                except NoScriptError:
                    if attempt:
                        raise
                    await self._round_trip("SCRIPT LOAD", BATCH)
        raise AssertionError("unreachable")

    async def _round_trip(self, *command: Any) -> Any:
        """One command on the flush's own connection, bounded in time; on any failure the
        connection is dropped (a reply may still be on its way) and made again next time."""
        conn = self._conn
        try:
            async with asyncio.timeout(self.timeout):
                await conn.connect()
                await conn.send_command(*command)
                reply = await conn.read_response()
        except NoScriptError:
            raise
        except (RedisError, OSError, TimeoutError) as e:
            await conn.disconnect()
            raise StoreUnavailableError(f"{type(e).__name__}: {e}") from None
        if isinstance(reply, RedisError):
            raise reply
        return reply

    # ------------------------------------------------------------ the contract

    async def reserve(
        self, lines: Sequence[Line], now: float, lease_seconds: float, slices: Sequence[tuple[str, Amount]] = ()
    ) -> Booking:
        """Hold each line's ask, all or nothing. With `slices` (per line: a lease id and how much
        more to hold under it for later requests) the ask goes under that lease and the store adds
        what it can spare of the rest (Booking.extras); without, under a lease of the request's own."""
        expires = now + lease_seconds
        own = new_id()
        ids = [lease for lease, _ in slices] if slices else [own] * len(lines)
        wants = [want for _, want in slices] if slices else [ZERO] * len(lines)
        keys: list[str] = []
        args: list[Any] = ["R", repr(now), repr(expires), len(lines)]
        for line, lease, want in zip(lines, ids, wants, strict=True):
            budget_keys, head, tail = self._reserve_parts(line.rule, line.window)
            keys += budget_keys
            args += [*head, str(line.ask.micros), str(line.ask.tokens), str(want.micros), str(want.tokens), *tail,
                     lease]  # fmt: skip
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._post(keys, args, fut)
        out = await fut
        granted = int(out[0]) == 1
        verdicts, extras = [], []
        for i, line in enumerate(lines):
            code, su, st, hu, ht, wait, xu, xt = out[1 + 8 * i : 9 + 8 * i]
            outcome = OK if int(code) == 0 else OVER_LIMIT if int(code) == 1 else THROTTLED
            extra = Amount(int(xu), int(xt))
            held = Amount(int(hu), int(ht)) + (line.ask + extra if granted else ZERO)
            totals = Totals(Amount(int(su), int(st)), held)
            verdicts.append(Verdict(line, Judgement(outcome, None, float(wait)), totals))
            extras.append(extra)
        if not granted:
            return Booking(None, tuple(verdicts))
        reservation = Reservation(own, tuple(lines), expires, remote=True, leases=tuple(ids))
        return Booking(reservation, tuple(verdicts), extras=tuple(extras))

    def _reserve_parts(self, rule: BudgetRule, w: Window) -> _ReserveParts:
        """A reservation's keys and the arguments around its amounts for one budget in one window:
        the same for every request of that window under the same rule, so formatted once. Checked
        to be the same rule object: a reload may change a budget (caps, throttles) under its key."""
        cached = self._reserve_cache.get((rule.key, w))
        if cached is not None and cached[0] is rule:
            return cached[1]
        parts: _ReserveParts = (
            (spend_key(rule.key, w), *hold_keys(rule.key)),
            (1 if w.rolling else 0, w.first_bucket, *_caps(rule)),
            ("1" if rule.dry_run else "0", _throttle_spec(rule)),
        )
        if len(self._reserve_cache) >= KEYS_CACHE_MAX:
            self._reserve_cache.clear()
        self._reserve_cache[(rule.key, w)] = (rule, parts)
        return parts

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def settle(self, reservation: Reservation, actual: Amount) -> None:
        """Sent with the next flush, summed with the other settles from the same leases."""
        self._settles_pending += 1
        same = same_leases(reservation)
        summed = self._summing.get(same)
        if summed is None:
            asks = [[ln.ask.micros, ln.ask.tokens] for ln in reservation.lines]
            self._summing[same] = Summed(reservation, asks, actual.micros, actual.tokens)
        else:
            summed.add(reservation, actual)
        self._wake(False)

    def give_back(self, rule: BudgetRule, lease: str, amount: Amount) -> None:
        """Release part of a slice, sent with the next flush; lost if that flush fails (the
        slice's lease then frees it when it expires)."""
        self._post(list(hold_keys(rule.key)[:3]), ["F", lease, str(amount.micros), str(amount.tokens)], None)

    async def renew(self, leases: Sequence[tuple[BudgetRule, str, float]]) -> None:
        """Lengthen the leases of slices still in use (each to its new expiry)."""
        if not leases:
            return
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        args: list[Any] = ["E", len(leases)]
        for _, lease, expires in leases:
            args += [lease, repr(expires)]
        self._post([hold_keys(rule.key)[1] for rule, _, _ in leases], args, fut)
        await fut

    async def send(self, batch: Sequence[Settle]) -> None:
        """Send settles now, in one script call (replaying what was owed); raises
        StoreUnavailable when they could not be sent."""
        try:
            await self._call([(*self._settle_op(s), s) for s in batch])
        except RedisError as e:
            raise StoreUnavailableError(f"{type(e).__name__}: {e}") from None
        self.sent += sum(s.requests for s in batch)

    def queued(self) -> int:
        return self._settles_pending

    async def read(self, rules: Sequence[tuple[BudgetRule, Window]]) -> list[Totals]:
        """Settled and in-flight spend of each (budget, window), as the store has them now."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for r, w in rules:
                    pipe.hgetall(spend_key(r.key, w))
                    pipe.hmget(hold_keys(r.key)[0], ["u", "t"])
                got = await pipe.execute()
        except (RedisError, OSError) as e:
            raise StoreUnavailableError(f"{type(e).__name__}: {e}") from None
        out = []
        for i, (_, w) in enumerate(rules):
            spend, held = got[2 * i], got[2 * i + 1]
            out.append(Totals(spend_of(spend, w), held_of(held)))
        return out

    @property
    def redacted(self) -> str:
        """The store's address without credentials, for logs."""
        kw = self._client.connection_pool.connection_kwargs
        return f"{kw.get('host', '?')}:{kw.get('port', '?')}"
