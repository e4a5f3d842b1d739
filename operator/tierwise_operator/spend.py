"""Where the budget controller reads spend (the I/O edge): the Redis counters the sidecars reserve
against when budgets are in Redis, else Prometheus.

Redis: one pipeline per cycle over every budget (its period's spend hash and its holds), exact.
Prometheus: each sidecar that keeps its own ledger exports its own spend of the current period
(`tierwise_budget_own_spent_usd`/`_tokens`, monotonic within a period); the spend of a budget is
the sum over sidecars of their highest value since the period started, the sidecars gone since
included (their series stay in Prometheus). One query per unit and distinct period start (budgets
with the same period and time zone share it), and one for what requests in flight hold. An exact
gauge rather than increase() of a counter: increase() extrapolates, and a value that moves with
the clock alone would rewrite an idle budget's status every cycle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tierwise.budgetkeys import held_of, hold_keys, spend_key, spend_of
from tierwise.budgetrules import Amount
from tierwise.money import MICROS_PER_USD
from tierwise.periods import Window
from tierwise_operator.signals import Prometheus, PrometheusUnavailableError

Totals = tuple[Amount, Amount]  # spent, held
SPENT = "sum by (budget_namespace, budget) (max_over_time(tierwise_budget_own_spent_{unit}[{seconds}s]))"
HELD = "sum by (budget_namespace, budget) (tierwise_budget_own_reserved_{unit})"
# Clocks of sidecars, Prometheus and the operator differ a little: a range that reached back to
# the period's very start could take in the last sample of the period before (a high value).
SKEW_SECONDS = 5


class SpendUnavailableError(Exception):
    pass


class SpendSource(Protocol):
    name: str

    async def read(self, budgets: Sequence[tuple[str, Window]], now: float) -> dict[str, Totals]:
        """Spent and held of each budget ("namespace/name") in its window; a budget with no data is
        absent (nothing spent yet). Raises SpendUnavailableError when the source cannot answer."""
        ...

    async def close(self) -> None: ...


class RedisSpend:
    name = "Redis"

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self._client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)

    async def read(self, budgets: Sequence[tuple[str, Window]], now: float) -> dict[str, Totals]:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, w in budgets:
                    pipe.hgetall(spend_key(key, w))
                    pipe.hmget(hold_keys(key)[0], ["u", "t"])
                got = await pipe.execute()
        except (RedisError, OSError) as e:
            raise SpendUnavailableError(f"Redis unavailable: {type(e).__name__}: {e}") from None
        return {key: (spend_of(got[2 * i], w), held_of(got[2 * i + 1])) for i, (key, w) in enumerate(budgets)}

    async def close(self) -> None:
        await self._client.aclose()


class PrometheusSpend:
    name = "Prometheus"

    def __init__(self, prom: Prometheus) -> None:
        self.prom = prom

    async def read(self, budgets: Sequence[tuple[str, Window]], now: float) -> dict[str, Totals]:
        ranges: dict[int, set[str]] = {}
        for key, w in budgets:
            ranges.setdefault(max(math.ceil(now - w.start) - SKEW_SECONDS, 1), set()).add(key)
        spent: dict[str, list[int]] = {}
        try:
            for seconds, keys in sorted(ranges.items()):
                for unit, scale in (("usd", MICROS_PER_USD), ("tokens", 1)):
                    for labels, value in await self._query(SPENT.format(unit=unit, seconds=seconds)):
                        key = f"{labels.get('budget_namespace', '')}/{labels.get('budget', '')}"
                        if key in keys:
                            spent.setdefault(key, [0, 0])[unit == "tokens"] = round(value * scale)
            held: dict[str, list[int]] = {}
            for unit, scale in (("usd", MICROS_PER_USD), ("tokens", 1)):
                for labels, value in await self._query(HELD.format(unit=unit)):
                    key = f"{labels.get('budget_namespace', '')}/{labels.get('budget', '')}"
                    held.setdefault(key, [0, 0])[unit == "tokens"] = round(value * scale)
        except PrometheusUnavailableError as e:
            raise SpendUnavailableError(str(e)) from None
        out: dict[str, Totals] = {}
        for key, _ in budgets:
            s, h = spent.get(key), held.get(key)
            if s is not None or h is not None:
                out[key] = (Amount(*(s or (0, 0))), Amount(*(h or (0, 0))))
        return out

    async def _query(self, q: str) -> list[tuple[dict[str, str], float]]:
        return await self.prom.query(q)

    async def close(self) -> None:
        return None
