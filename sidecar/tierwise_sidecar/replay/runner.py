"""Replaying a trace through a standalone gateway, once per strategy, against fake providers.

Strategies are Policies derived from the user's: `policy` is it as written; `premium` and
`cheapest` keep every tier (its name, SLO, access) but serve it with one backend, the dearest or
the cheapest of the whole Policy, and drop what would change the answer (budgets, cache policies,
rate limits, degradation, fallbacks). Every backend is served by an in-process fake provider with
its model's price-class latency; time runs `speed` times faster (the trace's schedule, the fakes'
latencies), and latencies are reported back on the trace's clock. Streams are replayed whole:
the actual cost travels in the headers of a whole answer.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from tierwise.api.cache import PersistentBackend
from tierwise.naming import backend_key
from tierwise.policy import Policy, PolicyTier
from tierwise_sidecar.app import Gateway
from tierwise_sidecar.config import GatewayConfig
from tierwise_sidecar.fake_backend import FakeBackend, FakeConfig
from tierwise_sidecar.policy_source import Loaded
from tierwise_sidecar.replay.events import NO_EVENTS, Events, Outage, with_budget
from tierwise_sidecar.replay.report import Catalog, Result
from tierwise_sidecar.replay.source import PolicyInput
from tierwise_sidecar.replay.trace import TraceRequest as Request
from tierwise_sidecar.runtime import blended_price
from tierwise_sidecar.secrets import SecretSource

POLICY, PREMIUM, CHEAPEST = "policy", "premium", "cheapest"
STRATEGIES = (PREMIUM, CHEAPEST, POLICY)
# A request the replay gives up on (on the trace's clock): counted as a 504.
CLIENT_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Latency:
    """A fake provider's speed, on the trace's clock."""

    first_byte_ms: float
    per_token_ms: float


def latency_of(price: float, dearest: float) -> Latency:
    """Larger (dearer) models answer slower: the dearest at ~400 ms + 25 ms/token, the cheapest
    about a third of that; in between by price."""
    share = price / dearest if dearest else 1.0
    return Latency(150 + 250 * share, 8 + 17 * share)


def _alone(tier: PolicyTier, backend: Any) -> PolicyTier:
    spec = tier.spec.model_copy(update={"backends": [backend], "fallback": None, "promotion": None,
                                        "rate_limit": None, "degradation": type(tier.spec.degradation)()})  # fmt: skip
    return tier.model_copy(update={"spec": spec, "fallback_chain": []})


def strategy(policy: Policy, name: str) -> Policy:
    """The Policy a strategy replays with (`policy`: the one given)."""
    if name == POLICY:
        return policy
    backends = [b for t in policy.tiers.values() for b in t.spec.backends]
    pick = max if name == PREMIUM else min
    chosen = pick(backends, key=lambda b: (blended_price(b.pricing), b.capabilities.strength))
    # An external backend whatever it was: every tier sends to one URL, so they share its waiting
    # room and its limit, as they would share one endpoint.
    chosen = chosen.model_copy(update={"weight": 100, "deployment": None, "url": "http://replay.invalid/v1"})
    tiers = {n: _alone(t, chosen) for n, t in policy.tiers.items()}
    return policy.model_copy(update={"tiers": tiers, "budgets": [], "cache_policies": []}).sealed()


def catalog_of(policy: Policy) -> Catalog:
    backends = [b for t in policy.tiers.values() for b in t.spec.backends]
    slo = {}
    for n, t in policy.tiers.items():
        ms = t.spec.slo.total_p95_milliseconds or t.spec.slo.total_p99_milliseconds
        slo[n] = ms / 1000 if ms else None
    return Catalog(
        price={b.model: blended_price(b.pricing) for b in backends},
        strength={b.model: b.capabilities.strength for b in backends},
        tier_models={n: [b.model for b in t.spec.backends] for n, t in policy.tiers.items()},
        slo_s=slo,
    )


class _Fixed:
    """A Policy source that never changes (the replay's strategies are built in memory)."""

    def __init__(self, loaded: Loaded) -> None:
        self.loaded = loaded

    def signature(self) -> object:
        return self.loaded.policy.hash

    def load(self) -> Loaded:
        return self.loaded


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def _pointed(policy: Policy, urls: dict[str, str]) -> Loaded:
    """Every backend sent to its fake provider: external URLs replaced, self-hosted ones given one
    endpoint."""
    tiers: dict[str, PolicyTier] = {}
    endpoints: dict[str, tuple[str, ...]] = {}
    for name, t in policy.tiers.items():
        backends = []
        for b in t.spec.backends:
            url = urls[b.model]
            if b.deployment is not None:
                endpoints[backend_key(name, b.name)] = (url,)
                backends.append(b)
            else:
                backends.append(b.model_copy(update={"url": url, "api_key_secret_ref": None}))
        tiers[name] = t.model_copy(update={"spec": t.spec.model_copy(update={"backends": backends})})
    return Loaded(policy.model_copy(update={"tiers": tiers}).sealed(), endpoints)


_SLO_FIELDS = ("first_token_p95_milliseconds", "first_token_p99_milliseconds", "total_p95_milliseconds",
               "total_p99_milliseconds")  # fmt: skip


def _compressed(policy: Policy, speed: float) -> Policy:
    """The Policy on the replay's faster clock: latency objectives and waits `speed` times shorter
    (the gateway's timeouts and its limiter judge wall time), rates `speed` times higher.
    Concurrency needs nothing: as many requests are in flight at once on either clock."""
    if speed == 1:
        return policy

    def shorter(ms: int | None) -> int | None:
        return None if ms is None else max(1, round(ms / speed))

    tiers = {}
    for name, t in policy.tiers.items():
        spec = t.spec
        slo = spec.slo.model_copy(update={f: shorter(getattr(spec.slo, f)) for f in _SLO_FIELDS})
        queue = spec.queue.model_copy(update={"max_wait_milliseconds": shorter(spec.queue.max_wait_milliseconds)})
        rate = spec.rate_limit
        if rate is not None:
            rate = rate.model_copy(update={
                "requests_per_second": rate.requests_per_second * speed if rate.requests_per_second else None,
                "tokens_per_minute": round(rate.tokens_per_minute * speed) if rate.tokens_per_minute else None,
            })  # fmt: skip
        spec = spec.model_copy(update={"slo": slo, "queue": queue, "rate_limit": rate})
        tiers[name] = t.model_copy(update={"spec": spec})
    budgets = []
    for b in policy.budgets:
        steps = [s.model_copy(update={"requests_per_second": s.requests_per_second * speed})
                 if s.requests_per_second else s for s in b.spec.thresholds]  # fmt: skip
        budgets.append(b.model_copy(update={"spec": b.spec.model_copy(update={"thresholds": steps})}))
    return policy.model_copy(update={"tiers": tiers, "budgets": budgets})


def _local_caches(policy: Policy, folder: Path) -> Policy:
    """Cache layers a replay can run alone: memory as declared, L2 off (no Redis here), L3 in a
    SQLite file of its own per run (a second replay must not hit what the first one stored)."""
    caches = []
    for c in policy.cache_policies:
        layers = c.spec.layers
        persistent = layers.persistent
        if persistent.enabled:
            path = str(folder / f"{c.namespace}-{c.name}.db")
            persistent = persistent.model_copy(update={"backend": PersistentBackend.SQLITE, "sqlite_path": path,
                                                       "connection_secret_ref": None})  # fmt: skip
        redis = layers.redis.model_copy(update={"enabled": False})
        layers = layers.model_copy(update={"persistent": persistent, "redis": redis,
                                           "memory": layers.memory.model_copy(update={"enabled": True})})  # fmt: skip
        caches.append(c.model_copy(update={"spec": c.spec.model_copy(update={"layers": layers})}))
    return policy.model_copy(update={"cache_policies": caches})


def _result(i: int, r: Request, status: int, latency: float, *, headers: Any, body: bytes) -> Result:
    code = None
    if status >= 400:
        try:
            code = orjson.loads(body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = str(status)
    cost = headers.get("x-tierwise-cost-usd")
    return Result(
        index=i, t=r.t, tier=r.tier or "", status=status, latency_s=latency, cost_usd=float(cost) if cost else 0.0,
        tenant=r.tenant, label=r.label, code=code, served_tier=headers.get("x-tierwise-tier"),
        model=headers.get("x-tierwise-model"), cached=headers.get("x-tierwise-cache", "").startswith("hit"),
        degraded="x-tierwise-degraded" in headers, downgraded_from=headers.get("x-tierwise-downgraded-from"),
        fallback_from=headers.get("x-tierwise-fallback-from"), budget_state=headers.get("x-tierwise-budget-state"),
    )  # fmt: skip


def _written(folder: str, name: str, text: str | None) -> Path | None:
    if text is None:
        return None
    path = Path(folder) / name
    path.write_text(text)
    return path


async def _outage(fake: FakeBackend, outage: Outage, t0: float, speed: float) -> None:
    """The provider fails for the outage's window, then comes back as it was."""
    await asyncio.sleep(max(0.0, t0 + outage.start_s / speed - time.monotonic()))
    before = fake.config
    fake.config = replace(before, error_rate=1.0, error_status=503)
    try:
        await asyncio.sleep(max(0.0, t0 + outage.end_s / speed - time.monotonic()))
    finally:
        fake.config = before


async def replay(
    trace: Sequence[Request], given: PolicyInput, name: str, *, speed: float = 1.0,
    progress: Callable[[int], None] | None = None, events: Events = NO_EVENTS,
) -> list[Result]:  # fmt: skip
    """Every request of the trace through a gateway serving strategy `name`, on schedule, with
    the events' outage and, for the Policy, the events' budget and what a live Policy came with
    (the budgets' spend so far, the SLO steering)."""
    chosen = strategy(given.policy, name)
    if name == POLICY and events.budget is not None:
        chosen = with_budget(chosen, events.budget)
    models = {b.model: b for t in chosen.tiers.values() for b in t.spec.backends}
    dearest = max(blended_price(b.pricing) for b in models.values())
    runners: list[web.AppRunner] = []
    urls: dict[str, str] = {}
    fakes: dict[str, FakeBackend] = {}
    for model, b in models.items():
        lat = latency_of(blended_price(b.pricing), dearest)
        fake = fakes[model] = FakeBackend(FakeConfig(first_byte_ms=lat.first_byte_ms / speed,
                                                     per_token_ms=lat.per_token_ms / speed, completion_tokens=200),
                                          name=model)  # fmt: skip
        runner, url = await _serve(fake.app())
        runners.append(runner)
        urls[model] = url + "/v1"
    with tempfile.TemporaryDirectory(prefix="tierwise-replay-") as folder:
        # The breakers' cooldown is time too: a provider back after an outage is tried again as
        # soon, on the trace's clock, as it would be in real time.
        config = GatewayConfig(budget_store="memory", reload_interval=3600,
                               breaker_cooldown=GatewayConfig.breaker_cooldown / speed)  # fmt: skip
        if name == POLICY:
            config = replace(config, published_budgets=_written(folder, "budgets.json", given.budgets),
                             steering_file=_written(folder, "steering.json", given.steering))  # fmt: skip
        served = _pointed(_compressed(_local_caches(chosen, Path(folder)), speed), urls)
        gateway = Gateway(_Fixed(served), config, SecretSource(None, {}))
        try:
            if not gateway.reload():
                raise RuntimeError(f"strategy {name}: the Policy did not load")
            runner, base = await _serve(gateway.app())
            runners.append(runner)
            t0 = time.monotonic()
            outage = events.outage
            failing = fakes.get(outage.model) if outage is not None else None
            fail = asyncio.create_task(_outage(failing, outage, t0, speed)) if failing and outage else None
            try:
                return await _send(trace, base, speed, progress, t0)
            finally:
                if fail is not None:
                    fail.cancel()
                    await asyncio.gather(fail, return_exceptions=True)
        finally:
            for r in reversed(runners):
                await r.cleanup()


async def _send(
    trace: Sequence[Request], base: str, speed: float, progress: Callable[[int], None] | None, t0: float
) -> list[Result]:
    results: list[Result | None] = [None] * len(trace)
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S / speed)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(i: int, r: Request) -> None:
            headers = {"Content-Type": "application/json"}
            for header, value in (("x-tierwise-tier", r.tier), ("x-tierwise-tenant", r.tenant),
                                  ("x-tierwise-session", r.session)):  # fmt: skip
                if value:
                    headers[header] = value
            body = {k: v for k, v in r.body.items() if k not in ("stream", "stream_options")}
            path = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}.get(r.kind, "/v1/embeddings")
            start = time.monotonic()
            got: Mapping[str, str] = {}
            try:
                async with session.post(base + path, data=orjson.dumps(body), headers=headers) as resp:
                    data = await resp.read()
                    status, got = resp.status, resp.headers
            except (TimeoutError, aiohttp.ClientError):
                status, data = 504, b""
            results[i] = _result(i, r, status, (time.monotonic() - start) * speed, headers=got, body=data)
            if progress is not None:
                progress(1)

        tasks = []
        for i, r in enumerate(trace):
            await asyncio.sleep(max(0.0, t0 + r.t / speed - time.monotonic()))
            tasks.append(asyncio.create_task(one(i, r)))
        await asyncio.gather(*tasks)
    return [r for r in results if r is not None]


def replay_all(
    trace: Sequence[Request], given: PolicyInput, *, speed: float = 1.0, strategies: Iterable[str] = STRATEGIES,
    progress: Callable[[str, int], None] | None = None, events: Events = NO_EVENTS,
) -> dict[str, list[Result]]:  # fmt: skip
    """Every strategy in turn, each on a fresh gateway and fresh fakes."""
    out = {}
    for name in strategies:
        tick = (lambda n, s=name: progress(s, n)) if progress is not None else None
        out[name] = asyncio.run(replay(trace, given, name, speed=speed, progress=tick, events=events))
    return out
