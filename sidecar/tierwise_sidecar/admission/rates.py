"""A tier's rate limits (requests/s and tokens/min, token buckets), compiled once per Policy, and
the in-process buckets that enforce them.

A request takes one token from the requests bucket and its estimated tokens (prompt plus the most
it may generate, as OpenAI's own limits count `max_tokens`) from the tokens bucket, both or
neither; after the call the tokens bucket is corrected to what was actually used. The scope says
whose traffic shares a bucket: one per tenant (the default), per namespace, or per pod (never
shared across sidecars). `share` is the part of the limit this process may use: all of it when
it counts alone or through Redis, 1/N of it for each of N sidecars while Redis is unreachable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tierwise.api.tier import RateLimit, RateLimitScope
from tierwise.buckets import Bucket, give, take
from tierwise.values import value

REQUESTS, TOKENS = "requests", "tokens"
# Buckets kept for callers not seen lately are dropped once full (a full bucket is a new one).
MAX_LOCAL_BUCKETS = 10_000


@dataclass(frozen=True, slots=True)
class RateRule:
    tier: str
    rps: float  # 0: no requests limit
    burst: float
    tokens_per_second: float  # 0: no tokens limit
    tokens_size: float
    scope: RateLimitScope

    @classmethod
    def of(cls, tier: str, spec: RateLimit) -> RateRule:
        rps = float(spec.requests_per_second or 0)
        tpm = float(spec.tokens_per_minute or 0)
        return cls(tier, rps, float(spec.burst or max(1.0, rps)), tpm / 60, tpm, spec.scope)

    @property
    def shared(self) -> bool:
        """Counted across sidecars (through Redis) when a store is configured."""
        return self.scope is not RateLimitScope.POD

    def key(self, namespace: str, tenant: str | None) -> str:
        if self.scope is RateLimitScope.TENANT:
            return f"{namespace}/{self.tier}/t:{tenant or ''}"
        return f"{namespace}/{self.tier}/" + ("n" if self.scope is RateLimitScope.NAMESPACE else "p")

    def charge(self, tokens: int) -> float:
        """What a request's estimate takes from the tokens bucket (never more than the bucket)."""
        return min(float(tokens), self.tokens_size) if self.tokens_per_second else 0.0


@value
class Verdict:
    allowed: bool
    retry_after: float = 0.0
    which: str = ""
    # Judged on this sidecar's own buckets (alone, per pod, or while Redis is away): corrected there.
    local: bool = False


ALLOWED = Verdict(True)


def judge(
    rule: RateRule, held: tuple[Bucket | None, Bucket | None], cost: float, share: float, now: float
) -> tuple[Verdict, tuple[Bucket | None, Bucket | None]]:
    """Take one request and `cost` tokens from the (requests, tokens) buckets, both or neither."""
    requests, tokens = held
    if rule.rps:
        rate, size = rule.rps * share, max(1.0, rule.burst * share)
        ok, requests, wait = take(requests, rate, size, 1.0, now)
        if not ok:
            return Verdict(False, wait, REQUESTS), held
    if rule.tokens_per_second:
        ok, tokens, wait = take(tokens, rule.tokens_per_second * share, rule.tokens_size * share, cost, now)
        if not ok:
            return Verdict(False, wait, TOKENS), held
    return ALLOWED, (requests, tokens)


class LocalRates:
    """The buckets of one process."""

    def __init__(self) -> None:
        self.buckets: dict[str, tuple[Bucket | None, Bucket | None]] = {}
        # When each key's buckets are full again (a full bucket is the same as a forgotten one).
        self.full_at: dict[str, float] = {}

    def take(self, rule: RateRule, key: str, cost: float, share: float, now: float) -> Verdict:
        verdict, after = judge(rule, self.buckets.get(key, (None, None)), cost, share, now)
        if verdict.allowed:
            if len(self.buckets) >= MAX_LOCAL_BUCKETS and key not in self.buckets:
                self._forget_full(now)
            self._keep(rule, key, after, share, now)
        return verdict

    def correct(self, rule: RateRule, key: str, amount: float, share: float, now: float) -> None:
        """Give back `amount` tokens (negative: take more) after the call."""
        if not rule.tokens_per_second or not amount:
            return
        requests, tokens = self.buckets.get(key, (None, None))
        rate, size = rule.tokens_per_second * share, rule.tokens_size * share
        self._keep(rule, key, (requests, give(tokens, rate, size, amount, now)), share, now)

    def _keep(self, rule: RateRule, key: str, held: tuple[Bucket | None, Bucket | None], share: float,
              now: float) -> None:  # fmt: skip
        self.buckets[key] = held
        requests, tokens = held
        refill = 0.0
        if requests is not None and rule.rps:
            refill = (max(1.0, rule.burst * share) - requests.tokens) / (rule.rps * share)
        if tokens is not None and rule.tokens_per_second:
            refill = max(refill, (rule.tokens_size - tokens.tokens / share) / rule.tokens_per_second)
        self.full_at[key] = now + refill

    def _forget_full(self, now: float) -> None:
        for k in [k for k, at in self.full_at.items() if at <= now]:
            del self.buckets[k]
            del self.full_at[k]


class Rates(Protocol):
    async def take(self, rule: RateRule, namespace: str, key: str, cost: float) -> Verdict: ...

    def correct(self, rule: RateRule, namespace: str, key: str, amount: float, local: bool) -> None: ...


class InProcessRates:
    """Every limit counted by this process alone: the default, and the standalone gateway's."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.local = LocalRates()

    async def take(self, rule: RateRule, namespace: str, key: str, cost: float) -> Verdict:
        return self.local.take(rule, key, cost, 1.0, self.clock())

    def correct(self, rule: RateRule, namespace: str, key: str, amount: float, local: bool) -> None:
        self.local.correct(rule, key, amount, 1.0, self.clock())
