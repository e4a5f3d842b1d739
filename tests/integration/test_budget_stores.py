"""The budget stores against real servers: Redis's scripts judge exactly as the pure rules do, hold
all or nothing, free the leases of a holder that died, count a settle sent twice once, and age a
rolling window out; the SQLite journal keeps settled spend across a restart and lets one process
hold a ledger file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis

from redisserver import Redis
from tests.budgetcases import CASES, Case, rule
from tests.budgetcases import line as _line
from tierwise.budgetkeys import applied_key
from tierwise.budgetrules import OK, OVER_LIMIT, THROTTLED, ZERO, Amount, BudgetRule, judge
from tierwise.periods import window
from tierwise_sidecar.budgets.ledger import MemoryLedger
from tierwise_sidecar.budgets.redis_store import RedisLedgerClient, StoreUnavailableError
from tierwise_sidecar.budgets.settles import Settle
from tierwise_sidecar.budgets.sqlite import LedgerInUseError, SqliteJournal

NOW = 1_800_000_000.0


async def _client(url: str, failed: list[Settle] | None = None) -> RedisLedgerClient:
    c = RedisLedgerClient(url, (failed if failed is not None else []).extend)
    await c.start()
    return c


async def _spend(c: RedisLedgerClient, r: BudgetRule, amount: Amount, now: float = NOW) -> None:
    """Settled spend of `amount`, through the scripts themselves."""
    b = await c.reserve([_line(r, Amount(0), now)], now, 60)
    assert b.reservation is not None
    c.settle(b.reservation, amount)
    await c.drain()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_the_scripts_judge_as_the_rules_do(store: Redis, case: Case) -> None:
    _, spec, before, ask, outcome = case

    async def go() -> None:
        r = rule(**spec)
        c = await _client(store.url)
        try:
            await _spend(c, r, before)
            got = await c.reserve([_line(r, ask)], NOW + 1, 60)
            assert got.verdicts[0].judgement.outcome == judge(r, before, ask, None, NOW + 1).outcome == outcome
            assert got.verdicts[0].totals.spent == before
            assert (got.reservation is not None) == (outcome == OK or r.dry_run)
        finally:
            await c.close()

    asyncio.run(go())


def test_all_or_nothing_across_stacked_budgets(store: Redis) -> None:
    async def go() -> None:
        team, platform = rule("team", limit={"usd": 1.0}), rule("all", "tierwise-system", limit={"usd": 0.5})
        c = await _client(store.url)
        try:
            assert (
                await c.reserve([_line(team, Amount(400_000)), _line(platform, Amount(400_000))], NOW, 60)
            ).reservation
            refused = await c.reserve([_line(team, Amount(400_000)), _line(platform, Amount(400_000))], NOW, 60)
            assert refused.reservation is None
            assert [v.judgement.outcome for v in refused.verdicts] == [OK, OVER_LIMIT]
            # The team budget holds only the first request's 400k: the refused one held nothing.
            (t,) = await c.read([(team, window(team.period, team.time_zone, NOW))])
            assert t.held == Amount(400_000) and t.spent == Amount(0)
        finally:
            await c.close()

    asyncio.run(go())


def test_a_dead_holders_lease_expires_and_settled_spend_stays(store: Redis) -> None:
    async def go() -> None:
        r = rule(limit={"usd": 1.0})
        dead = await _client(store.url)
        kept = await dead.reserve([_line(r, Amount(300_000))], NOW, 60)
        done = await dead.reserve([_line(r, Amount(300_000))], NOW, 60)
        assert kept.reservation and done.reservation
        dead.settle(done.reservation, Amount(250_000))
        await dead.drain()
        await dead.close()  # `kept` is never settled: its holder is gone
        alive = await _client(store.url)
        try:
            w = window(r.period, r.time_zone, NOW)
            assert (await alive.read([(r, w)]))[0].held == Amount(300_000)
            assert (await alive.reserve([_line(r, Amount(500_000))], NOW + 59, 60)).reservation is None
            got = await alive.reserve([_line(r, Amount(500_000))], NOW + 61, 60)
            assert got.reservation is not None and got.verdicts[0].totals.spent == Amount(250_000)
        finally:
            await alive.close()

    asyncio.run(go())


def test_a_settle_sent_twice_counts_once(store: Redis) -> None:
    async def go() -> None:
        r = rule(limit={"usd": 1.0})
        c = await _client(store.url)
        try:
            b = await c.reserve([_line(r, Amount(100_000))], NOW, 60)
            assert b.reservation is not None
            s = Settle(c.next_seq(), b.reservation, Amount(70_000, 12))
            await c.send([s])
            await c.send([s, s])
            (t,) = await c.read([(r, window(r.period, r.time_zone, NOW))])
            assert (t.spent, t.held) == (Amount(70_000, 12), Amount(0))
        finally:
            await c.close()

    asyncio.run(go())


def test_settles_from_the_same_lease_go_as_one_and_count_as_each(store: Redis) -> None:
    """A flush sums the settles of the requests one slice served into one op (one sequence number
    in the applied bitmap), and the ledger ends as if each had been sent alone; one handed back
    unsent (the client closed) is still one settle, counted once however often it is sent."""

    async def go() -> None:
        r = rule(limit={"usd": 10.0})
        c = await _client(store.url)
        try:
            ln = _line(r, Amount(100_000, 100))
            slice_served = [await c.reserve([ln], NOW, 60, [("slice-a", ZERO)]) for _ in range(5)]
            own = await c.reserve([ln], NOW, 60)
            trips = c.round_trips
            for i, b in enumerate(slice_served):
                assert b.reservation is not None
                c.settle(b.reservation, Amount(60_000 + i, 10))
            assert own.reservation is not None
            c.settle(own.reservation, Amount(1, 1))
            await c.drain()
            assert (c.round_trips - trips, c.sent, c.queued()) == (1, 6, 0)
            assert redis.Redis.from_url(store.url).bitcount(applied_key(c.instance)) == 2
            (t,) = await c.read([(r, ln.window)])
            assert (t.spent, t.held) == (Amount(5 * 60_000 + 10 + 1, 51), Amount(0))
        finally:
            await c.close()
        failed: list[Settle] = []
        c = await _client(store.url, failed)
        held = [await c.reserve([ln], NOW, 60, [("slice-b", ZERO)]) for _ in range(3)]
        for b in held:
            assert b.reservation is not None
            c.settle(b.reservation, Amount(1_000, 1))
        await c.close()
        assert [s.requests for s in failed] == [3]
        c = await _client(store.url)
        try:
            await c.send(failed)
            await c.send(failed)
            (t,) = await c.read([(r, ln.window)])
            assert (t.spent, t.held) == (Amount(5 * 60_000 + 10 + 1 + 3_000, 54), Amount(0))
        finally:
            await c.close()

    asyncio.run(go())


def test_a_rolling_window_ages_out_in_redis(store: Redis) -> None:
    async def go() -> None:
        r = rule(period="Rolling24Hours", limit={"usd": 1.0})
        c = await _client(store.url)
        try:
            await _spend(c, r, Amount(1_000_000))
            assert (await c.reserve([_line(r, Amount(1), NOW + 3600)], NOW + 3600, 60)).reservation is None
            later = NOW + 24 * 3600 + 1800
            got = await c.reserve([_line(r, Amount(1), later)], later, 60)
            assert got.reservation is not None and got.verdicts[0].totals.spent == Amount(0)
        finally:
            await c.close()

    asyncio.run(go())


def test_throttled_traffic_is_shared_across_clients(store: Redis) -> None:
    async def go() -> None:
        r = rule(limit={"usd": 1.0}, thresholds=[{"percent": 10, "action": "Throttle", "requestsPerSecond": 1}])
        a, b = await _client(store.url), await _client(store.url)
        try:
            await _spend(a, r, Amount(200_000))
            first = await a.reserve([_line(r, Amount(1))], NOW + 1, 60)
            second = await b.reserve([_line(r, Amount(1))], NOW + 1.2, 60)
            assert [first.verdicts[0].judgement.outcome, second.verdicts[0].judgement.outcome] == [OK, THROTTLED]
            assert second.verdicts[0].judgement.retry_after == pytest.approx(0.8)
        finally:
            await a.close()
            await b.close()

    asyncio.run(go())


def test_an_unreachable_store_is_told_not_waited_for(tmp_path: Path) -> None:
    async def go() -> None:
        down = Redis(tmp_path, 1)  # nothing listens on port 1
        failed: list[Settle] = []
        c = await _client(down.url, failed)
        try:
            with pytest.raises(StoreUnavailableError):
                await c.reserve([_line(rule(), Amount(1))], NOW, 60)
            c.settle(await _fake_reservation(), Amount(5))
            await c.drain()
            assert len(failed) == 1
        finally:
            await c.close()

    asyncio.run(go())


async def _fake_reservation():  # type: ignore[no-untyped-def]
    b = await MemoryLedger().reserve([_line(rule(), Amount(1))], NOW, 60)
    assert b.reservation is not None
    return b.reservation


def test_the_sqlite_journal_keeps_spend_across_a_restart_and_one_process_per_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger" / "budgets.sqlite"
    r = rule(limit={"usd": 1.0})

    async def first() -> None:
        journal = SqliteJournal(path)
        ledger = MemoryLedger(journal)
        await ledger.start()
        for _ in range(3):
            b = await ledger.reserve([_line(r, Amount(100_000))], NOW, 60)
            assert b.reservation is not None
            ledger.settle(b.reservation, Amount(90_000, 10), NOW)
        with pytest.raises(LedgerInUseError, match="one process per ledger file"):
            await SqliteJournal(path).start()
        await ledger.close()

    async def second() -> None:
        ledger = MemoryLedger(SqliteJournal(path))
        await ledger.start()
        try:
            assert ledger.totals(r, window(r.period, r.time_zone, NOW)).spent == Amount(270_000, 30)
        finally:
            await ledger.close()

    asyncio.run(first())
    asyncio.run(second())


def test_a_store_that_lost_its_script_counts_everything_once(store: Redis) -> None:
    """After a Redis restart its script cache is empty: the batch that meets NOSCRIPT ran nothing,
    and is sent again, once."""

    async def go() -> None:
        r = rule(limit={"usd": 1.0})
        c = await _client(store.url)
        try:
            first = await c.reserve([_line(r, Amount(100_000))], NOW, 60)
            assert first.reservation is not None
            redis.Redis.from_url(store.url).script_flush()
            c.settle(first.reservation, Amount(80_000))
            second = asyncio.ensure_future(c.reserve([_line(r, Amount(100_000))], NOW, 60))
            await asyncio.sleep(0)
            assert (await second).reservation is not None
            await c.drain()
            (t,) = await c.read([(r, window(r.period, r.time_zone, NOW))])
            assert (t.spent, t.held) == (Amount(80_000), Amount(100_000))
        finally:
            await c.close()

    asyncio.run(go())
