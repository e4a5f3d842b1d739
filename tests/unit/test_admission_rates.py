"""Rate limits as arithmetic: the token bucket (tierwise.buckets), a tier's compiled rule, the
both-or-neither judgement of its two buckets, a sidecar's share, and the in-process buckets
(corrections after the call, forgetting idle callers)."""

from __future__ import annotations

import asyncio

import pytest

from tierwise.api.tier import RateLimit, RateLimitScope
from tierwise.buckets import Bucket, give, level, take
from tierwise_sidecar.admission import rates
from tierwise_sidecar.admission.rates import (
    REQUESTS,
    TOKENS,
    InProcessRates,
    LocalRates,
    RateRule,
    Verdict,
    judge,
)


def rule(
    rps: float | None = None, tpm: int | None = None, burst: int | None = None, scope: str = "Namespace"
) -> RateRule:
    return RateRule.of(
        "gold", RateLimit(requests_per_second=rps, tokens_per_minute=tpm, burst=burst, scope=RateLimitScope(scope))
    )


# ------------------------------------------------------------------ buckets


def test_a_bucket_never_seen_is_full() -> None:
    assert level(None, rate=2.0, size=10.0, now=123.0) == 10.0


def test_take_charges_the_cost_and_stamps_the_time() -> None:
    ok, after, wait = take(None, rate=2.0, size=10.0, cost=3.0, now=100.0)
    assert (ok, wait) == (True, 0.0)
    assert after == Bucket(7.0, 100.0)


def test_a_bucket_refills_at_its_rate_up_to_its_size() -> None:
    empty = Bucket(0.0, 100.0)
    assert level(empty, rate=2.0, size=10.0, now=101.5) == pytest.approx(3.0)
    assert level(empty, rate=2.0, size=10.0, now=104.999) == pytest.approx(9.998)
    # Never more than the size, however long it was idle.
    assert level(empty, rate=2.0, size=10.0, now=105.0) == 10.0
    assert level(empty, rate=2.0, size=10.0, now=10_000.0) == 10.0
    # A clock that went backwards adds nothing (and takes nothing).
    assert level(Bucket(4.0, 100.0), rate=2.0, size=10.0, now=99.0) == 4.0


def test_a_refused_take_charges_nothing_and_says_when_the_cost_is_there() -> None:
    b = Bucket(1.0, 100.0)
    ok, after, wait = take(b, rate=2.0, size=10.0, cost=4.0, now=100.5)  # 2 tokens there, 4 asked
    assert not ok
    assert after == Bucket(2.0, 100.5)
    assert wait == pytest.approx(1.0)
    # Taking exactly what is there succeeds and leaves nothing.
    ok, after, wait = take(b, rate=2.0, size=10.0, cost=2.0, now=100.5)
    assert ok and after.tokens == pytest.approx(0.0) and wait == 0.0


def test_draining_a_bucket_admits_burst_then_the_rate() -> None:
    """Over T seconds of demand above the rate, a bucket full at the start admits size + rate*T
    (to one token): the formula the integration tests check across processes."""
    bucket: Bucket | None = None
    admitted = 0
    for i in range(1000):  # 100 per second for 10 s against 5/s with 20 burst
        ok, bucket, _ = take(bucket, rate=5.0, size=20.0, cost=1.0, now=i / 100)
        admitted += ok
    assert 20 + 5 * 9.99 - 1 <= admitted <= 20 + 5 * 9.99


def test_a_cost_above_the_size_is_charged_as_the_whole_bucket() -> None:
    ok, after, wait = take(None, rate=1.0, size=10.0, cost=25.0, now=0.0)
    assert ok and after == Bucket(0.0, 0.0) and wait == 0.0
    # Not full: it waits for a full bucket, never forever.
    ok, after, wait = take(Bucket(4.0, 0.0), rate=2.0, size=10.0, cost=25.0, now=0.0)
    assert not ok and wait == pytest.approx(3.0)


def test_give_never_fills_past_the_size() -> None:
    assert give(Bucket(8.0, 0.0), rate=1.0, size=10.0, amount=5.0, now=0.0) == Bucket(10.0, 0.0)
    assert give(None, rate=1.0, size=10.0, amount=5.0, now=3.0) == Bucket(10.0, 3.0)
    assert give(Bucket(2.0, 0.0), rate=1.0, size=10.0, amount=5.0, now=1.0) == Bucket(8.0, 1.0)


def test_a_negative_give_is_a_debt_of_at_most_one_bucket() -> None:
    debt = give(Bucket(2.0, 0.0), rate=1.0, size=10.0, amount=-7.0, now=0.0)
    assert debt == Bucket(-5.0, 0.0)
    assert give(debt, rate=1.0, size=10.0, amount=-100.0, now=0.0) == Bucket(-10.0, 0.0)
    # A bucket in debt pays it off before it admits again.
    ok, _, wait = take(Bucket(-10.0, 0.0), rate=2.0, size=10.0, cost=1.0, now=0.0)
    assert not ok and wait == pytest.approx(5.5)
    assert level(Bucket(-10.0, 0.0), rate=2.0, size=10.0, now=10.0) == 10.0


# ------------------------------------------------------------------ rules


def test_a_rule_compiles_the_spec() -> None:
    r = rule(rps=20, tpm=6000, burst=40)
    assert (r.tier, r.rps, r.burst, r.tokens_per_second, r.tokens_size) == ("gold", 20.0, 40.0, 100.0, 6000.0)
    # Burst defaults to one second of requests, and to at least one request.
    assert rule(rps=20).burst == 20.0
    assert rule(rps=0.2).burst == 1.0
    only_tokens = rule(tpm=600)
    assert (only_tokens.rps, only_tokens.tokens_per_second) == (0.0, 10.0)
    assert only_tokens.charge(250) == 250.0
    assert only_tokens.charge(10_000) == 600.0  # never more than the bucket
    assert rule(rps=5).charge(250) == 0.0  # no tokens limit: nothing charged


def test_the_scope_decides_the_bucket_key_and_whether_it_is_shared() -> None:
    tenant, ns, pod = rule(rps=1, scope="Tenant"), rule(rps=1, scope="Namespace"), rule(rps=1, scope="Pod")
    assert tenant.key("apps", "alice") == "apps/gold/t:alice"
    assert tenant.key("apps", "alice") != tenant.key("apps", "bob")
    assert tenant.key("apps", None) == "apps/gold/t:"
    assert tenant.key("apps", "alice") != tenant.key("other", "alice")
    assert ns.key("apps", "alice") == ns.key("apps", "bob") == ns.key("apps", None) == "apps/gold/n"
    assert pod.key("apps", "alice") == pod.key("apps", None) == "apps/gold/p"
    assert ns.key("apps", None) != pod.key("apps", None)
    assert (tenant.shared, ns.shared, pod.shared) == (True, True, False)
    # The default scope is Tenant.
    assert RateLimit(requests_per_second=1).scope is RateLimitScope.TENANT


# ------------------------------------------------------------------ judging both buckets


def test_judge_takes_a_request_and_its_tokens_together() -> None:
    r = rule(rps=2, tpm=600, burst=2)
    verdict, (req, tok) = judge(r, (None, None), cost=100.0, share=1.0, now=0.0)
    assert verdict == Verdict(True)
    assert req == Bucket(1.0, 0.0) and tok == Bucket(500.0, 0.0)


def test_judge_charges_neither_bucket_when_tokens_refuse() -> None:
    r = rule(rps=2, tpm=600, burst=2)
    held = (Bucket(2.0, 0.0), Bucket(50.0, 0.0))
    verdict, after = judge(r, held, cost=100.0, share=1.0, now=0.0)
    assert not verdict.allowed and verdict.which == TOKENS
    assert verdict.retry_after == pytest.approx(5.0)  # 50 missing at 10 tokens/s
    assert after == held, "the request token is not taken when the tokens bucket refuses"
    # So a cheap request right after is still admitted by both.
    verdict, after = judge(r, after, cost=10.0, share=1.0, now=0.0)
    assert verdict.allowed and after == (Bucket(1.0, 0.0), Bucket(40.0, 0.0))


def test_judge_charges_no_tokens_when_requests_refuse() -> None:
    r = rule(rps=2, tpm=600, burst=2)
    held = (Bucket(0.5, 0.0), Bucket(600.0, 0.0))
    verdict, after = judge(r, held, cost=100.0, share=1.0, now=0.0)
    assert not verdict.allowed and verdict.which == REQUESTS
    assert verdict.retry_after == pytest.approx(0.25)
    assert after == held


def test_a_share_scales_rate_and_burst_of_both_buckets() -> None:
    r = rule(rps=20, tpm=6000, burst=20)
    held: tuple[Bucket | None, Bucket | None] = (None, None)
    admitted = 0
    for _ in range(10):
        verdict, held = judge(r, held, cost=10.0, share=0.25, now=0.0)
        admitted += verdict.allowed
    assert admitted == 5, "a quarter of a burst of 20"
    verdict, _ = judge(r, held, cost=10.0, share=0.25, now=0.0)
    assert verdict.which == REQUESTS and verdict.retry_after == pytest.approx(1 / 5)  # a quarter of 20/s
    # Tokens: a quarter of the bucket (1500), refilling at a quarter of 100/s.
    verdict, (_, tok) = judge(r, (None, None), cost=1400.0, share=0.25, now=0.0)
    assert verdict.allowed and tok == Bucket(100.0, 0.0)
    verdict, _ = judge(r, (None, tok), cost=200.0, share=0.25, now=0.0)
    assert verdict.which == TOKENS and verdict.retry_after == pytest.approx(100 / 25)


def test_a_share_never_makes_a_requests_bucket_smaller_than_one_request() -> None:
    r = rule(rps=2, burst=2)
    verdict, held = judge(r, (None, None), cost=0.0, share=0.1, now=0.0)
    assert verdict.allowed
    verdict, _ = judge(r, held, cost=0.0, share=0.1, now=0.0)
    assert not verdict.allowed and verdict.retry_after == pytest.approx(1 / 0.2)


# ------------------------------------------------------------------ in-process buckets


def test_local_correct_gives_back_what_was_not_used() -> None:
    r = rule(tpm=1200)  # 20 tokens/s, 1200 in the bucket
    local = LocalRates()
    key = r.key("apps", None)
    assert local.take(r, key, 1000.0, 1.0, 0.0).allowed
    refused = local.take(r, key, 1000.0, 1.0, 0.0)
    assert not refused.allowed and refused.which == TOKENS
    assert refused.retry_after == pytest.approx(800 / 20)
    local.correct(r, key, 1000.0 - 15, 1.0, 0.0)  # it used 15 tokens
    assert local.take(r, key, 1000.0, 1.0, 0.0).allowed
    # Corrections never fill past the bucket...
    local.correct(r, key, 1e9, 1.0, 0.0)
    assert local.buckets[key][1] == Bucket(1200.0, 0.0)
    # ... and a request that used more than it was charged takes the rest, down to a debt.
    local.correct(r, key, -2000.0, 1.0, 0.0)
    assert local.buckets[key][1] == Bucket(-800.0, 0.0)
    verdict = local.take(r, key, 10.0, 1.0, 0.0)
    assert not verdict.allowed and verdict.retry_after == pytest.approx(810 / 20)


def test_local_correct_without_a_tokens_limit_changes_nothing() -> None:
    r = rule(rps=1, burst=1)
    local = LocalRates()
    key = r.key("apps", None)
    assert local.take(r, key, 0.0, 1.0, 0.0).allowed
    before = dict(local.buckets)
    local.correct(r, key, 500.0, 1.0, 0.0)
    assert local.buckets == before
    assert not local.take(r, key, 0.0, 1.0, 0.0).allowed


def test_a_refused_request_leaves_the_local_buckets_as_they_were() -> None:
    r = rule(rps=1, tpm=600, burst=1)
    local = LocalRates()
    key = r.key("apps", None)
    assert local.take(r, key, 100.0, 1.0, 0.0).allowed
    before = dict(local.buckets)
    assert not local.take(r, key, 100.0, 1.0, 0.5).allowed
    assert local.buckets == before


def test_in_process_rates_count_alone_on_their_clock() -> None:
    now = [0.0]
    r = rule(rps=2, tpm=600, burst=2, scope="Tenant")
    rates_ = InProcessRates(clock=lambda: now[0])

    async def run() -> list[bool]:
        got = []
        for tenant in ("a", "a", "a", "b"):
            v = await rates_.take(r, "apps", r.key("apps", tenant), 10.0)
            got.append(v.allowed)
            assert not v.local  # only a shared store's fallback says local
        now[0] = 0.5  # one more request's worth refilled
        got.append((await rates_.take(r, "apps", r.key("apps", "a"), 10.0)).allowed)
        got.append((await rates_.take(r, "apps", r.key("apps", "a"), 10.0)).allowed)
        return got

    assert asyncio.run(run()) == [True, True, False, True, True, False]
    rates_.correct(r, "apps", r.key("apps", "a"), 5.0, local=False)
    assert rates_.local.buckets[r.key("apps", "a")][1] == Bucket(575.0 + 5.0, 0.5)


def _fill(local: LocalRates, r: RateRule, n: int, now: float) -> None:
    for i in range(n):
        assert local.take(r, f"apps/gold/t:idle{i}", 1.0, 1.0, now).allowed


def test_idle_buckets_are_forgotten_beyond_the_maximum_and_active_ones_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rates, "MAX_LOCAL_BUCKETS", 5)
    r = rule(rps=1, tpm=60, burst=3, scope="Tenant")  # refill: 3 s of requests, 60 s of tokens
    local = LocalRates()
    _fill(local, r, 4, now=0.0)
    busy = "apps/gold/t:busy"
    for _ in range(3):
        assert local.take(r, busy, 1.0, 1.0, 100.0).allowed
    assert not local.take(r, busy, 1.0, 1.0, 100.0).allowed
    assert len(local.buckets) == 5
    # A sixth caller, 100 s on: the four idle ones (full again) go; the busy one stays, empty.
    assert local.take(r, "apps/gold/t:new", 1.0, 1.0, 100.0).allowed
    assert set(local.buckets) == {busy, "apps/gold/t:new"}
    assert not local.take(r, busy, 1.0, 1.0, 100.0).allowed, "forgetting did not refill a busy bucket"
    # A forgotten caller is a full bucket, as it would have been anyway.
    for _ in range(3):
        assert local.take(r, "apps/gold/t:idle0", 1.0, 1.0, 100.0).allowed
    assert not local.take(r, "apps/gold/t:idle0", 1.0, 1.0, 100.0).allowed


def test_buckets_not_yet_full_are_kept_even_beyond_the_maximum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rates, "MAX_LOCAL_BUCKETS", 3)
    r = rule(rps=1, tpm=60, burst=3, scope="Tenant")
    local = LocalRates()
    _fill(local, r, 3, now=0.0)
    # Half a second on, the buckets are not full yet (one request back in 1 s, one token in 1 s):
    # none may go, the map grows instead.
    assert local.take(r, "apps/gold/t:new", 1.0, 1.0, 0.5).allowed
    assert len(local.buckets) == 4
    # Once they are full again they are forgotten: nothing about them is lost.
    assert local.take(r, "apps/gold/t:newer", 1.0, 1.0, 5.0).allowed
    assert set(local.buckets) == {"apps/gold/t:newer"}


@pytest.mark.parametrize("share", [1.0, 0.25])
def test_forgetting_a_bucket_changes_no_verdict(monkeypatch: pytest.MonkeyPatch, share: float) -> None:
    """What forgetting promises, checked against a LocalRates that never forgets: the same
    requests, judged at the same times, get the same verdicts. The callers overspend their
    estimate (a correction takes more, down to a debt of one bucket), then go quiet."""
    monkeypatch.setattr(rates, "MAX_LOCAL_BUCKETS", 4)
    r = rule(rps=1, tpm=600, burst=2, scope="Tenant")  # 10 tokens/s, refilled from empty in 60 s
    forgetting, keeping = LocalRates(), LocalRates()

    def both(key: str, cost: float, now: float) -> tuple[bool, bool]:
        a = forgetting.take(r, key, cost, share, now)
        with monkeypatch.context() as m:
            m.setattr(rates, "MAX_LOCAL_BUCKETS", 10**9)
            b = keeping.take(r, key, cost, share, now)
        return a.allowed, b.allowed

    for i in range(4):
        key = f"apps/gold/t:c{i}"
        assert both(key, 100.0, 0.0) == (True, True)
        for rates_ in (forgetting, keeping):
            rates_.correct(r, key, -5000.0, share, 0.0)  # used far more than it was charged: a debt
    # Later, new callers push the map past its maximum; then the first ones come back.
    later = 90.0 / share
    for i in range(4):
        assert both(f"apps/gold/t:n{i}", 100.0, later) == (True, True)
    verdicts = [both(f"apps/gold/t:c{i}", 500.0 * share, later) for i in range(4)]
    assert all(a == b for a, b in verdicts), f"forgetting changed verdicts (forgetting, keeping): {verdicts}"
