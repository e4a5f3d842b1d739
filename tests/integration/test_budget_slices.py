"""Allowance slices against a real Redis: a grant spares at most an eighth of what a budget has
left (nothing near the limit, nothing to a throttled budget), a sidecar's requests are then
reserved with no round trip, and slices are renewed while in use and go back when idle or closed.
Settled spend and holds in Redis always add up to what the requests cost and hold."""

from __future__ import annotations

import asyncio
import time

import redis

from redisserver import Redis
from tests.budgetcases import THROTTLED_AT_HALF, rule
from tests.budgetcases import line as _line
from tierwise.budgetkeys import hold_keys
from tierwise.budgetrules import ZERO, Amount, BudgetRule
from tierwise.periods import window
from tierwise_sidecar.budgets.redis_store import RedisLedgerClient
from tierwise_sidecar.budgets.shared import PROBE_SECONDS, SharedLedger
from tierwise_sidecar.budgets.slices import IDLE_SECONDS, SLICE_REQUESTS

NOW = 1_800_000_000.0


def _held(url: str, r: BudgetRule) -> Amount:
    got = redis.Redis.from_url(url).hmget(hold_keys(r.key)[0], "u", "t")
    return Amount(int(got[0] or 0), int(got[1] or 0))


def test_a_grant_spares_an_eighth_of_what_is_left_and_nothing_near_the_limit(store: Redis) -> None:
    r = rule(limit={"usd": 1.0})
    ask, big = Amount(100_000), Amount(10_000_000)

    async def go() -> None:
        c = RedisLedgerClient(store.url, lambda _: None)
        try:
            first = await c.reserve([_line(r, ask)], NOW, 60, [("s1", big)])
            assert first.extras == (Amount((1_000_000 - 100_000) // 8),)
            assert _held(store.url, r) == ask + first.extras[0]
            # Another sidecar's grant sees what is left after the first slice.
            left = 1_000_000 - 100_000 - first.extras[0].micros
            second = await c.reserve([_line(r, ask)], NOW, 60, [("s2", big)])
            assert second.extras == (Amount((left - 100_000) // 8),)
            # Asked for less than the share: given what was asked.
            third = await c.reserve([_line(r, ask)], NOW, 60, [("s3", Amount(5))])
            assert third.extras == (Amount(5),)
            # Within a request of the limit, a grant spares nothing: one request per round trip.
            committed = _held(store.url, r).micros
            exact = await c.reserve([_line(r, Amount(1_000_000 - committed - 10))], NOW, 60, [("s4", big)])
            assert exact.reservation is not None and exact.extras == (Amount(1),)
            committed_after = _held(store.url, r).micros
            assert committed_after == 1_000_000 - 10 + 1
            refused = await c.reserve([_line(r, Amount(100))], NOW, 60, [("s5", big)])
            assert refused.reservation is None and refused.extras == ()
            # A slice's lease gives back what it holds, and a settle takes what its request held.
            c.give_back(r, "s1", first.extras[0])
            assert second.reservation is not None
            c.settle(second.reservation, Amount(70_000, 7))
            await c.drain()
            assert _held(store.url, r) == Amount(committed_after - first.extras[0].micros - ask.micros)
        finally:
            await c.close()

    asyncio.run(go())


def test_a_throttled_budget_gets_no_slice_and_a_top_up_takes_no_token(store: Redis) -> None:
    r = rule(limit={"usd": 1.0}, **THROTTLED_AT_HALF)

    async def go() -> None:
        c = RedisLedgerClient(store.url, lambda _: None)
        try:
            spend = await c.reserve([_line(r, ZERO)], NOW, 60)
            assert spend.reservation is not None
            c.settle(spend.reservation, Amount(600_000))
            await c.drain()
            top_up = await c.reserve([_line(r, ZERO)], NOW, 60, [("s", Amount(100_000))])
            assert top_up.reservation is not None and top_up.extras == (ZERO,)
            # The bucket (rate 0.5/s, burst 1) still has its one token for a request.
            one = await c.reserve([_line(r, Amount(1_000))], NOW, 60, [("s", Amount(100_000))])
            assert one.reservation is not None and one.extras == (ZERO,)
            two = await c.reserve([_line(r, Amount(1_000))], NOW, 60, [("s", Amount(100_000))])
            assert two.reservation is None
        finally:
            await c.close()

    asyncio.run(go())


def test_a_sidecar_reserves_from_its_slice_without_round_trips_and_gives_it_back(store: Redis) -> None:
    r = rule(limit={"usd": 10.0})
    ask, actual = Amount(1_000, 20), Amount(600, 12)

    async def go() -> None:
        ledger = SharedLedger(store.url)
        await ledger.start()
        try:
            trips = ledger.client.round_trips
            n = 10 * SLICE_REQUESTS
            for _ in range(n):
                now = time.time()
                b = await ledger.reserve([_line(r, ask, now)], now, 60)
                assert b.reservation is not None
                ledger.settle(b.reservation, actual, now)
                await asyncio.sleep(0.002)  # a request's time: a top-up's reply lands meanwhile
            # The first request and the top-ups (one per half a slice) go to Redis; settles ride
            # along with them, or go on their own at most every SETTLE_DELAY.
            assert ledger.client.round_trips - trips <= 2 * n // SLICE_REQUESTS + 6
            await ledger.client.drain()
            (t,) = await ledger.client.read([(r, window(r.period, r.time_zone, time.time()))])
            assert t.spent == Amount(actual.micros * n, actual.tokens * n)
            assert t.held == sum((s.free for s in ledger.slices), ZERO) != ZERO, "what the slice has left"
        finally:
            await ledger.close()
        assert _held(store.url, r) == ZERO, "closing gives the slice back"

    asyncio.run(go())


def test_slices_in_use_are_renewed_and_idle_ones_go_back(store: Redis) -> None:
    r = rule(limit={"usd": 10.0})
    lease = 2.0

    async def go() -> None:
        ledger = SharedLedger(store.url)
        await ledger.start()
        try:
            now = time.time()
            b = await ledger.reserve([_line(r, Amount(1_000), now)], now, lease)
            assert b.reservation is not None
            (slice_,) = list(ledger.slices)
            # Held past its first lease: the slice is renewed, so Redis does not free the hold.
            await asyncio.sleep(lease + 2 * PROBE_SECONDS)
            score = redis.Redis.from_url(store.url).zscore(hold_keys(r.key)[1], slice_.lease)
            assert score is not None and score > now + lease
            assert _held(store.url, r).micros >= 1_000
            ledger.settle(b.reservation, Amount(900), time.time())
            deadline = time.monotonic() + IDLE_SECONDS + 3 * PROBE_SECONDS
            while _held(store.url, r) != ZERO and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert _held(store.url, r) == ZERO, "the idle slice went back while the sidecar runs"
            assert len(ledger.slices) == 0
        finally:
            await ledger.close()

    asyncio.run(go())
