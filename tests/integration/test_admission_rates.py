"""Rate limits that hold with real processes: four `tierwise gateway` processes sharing one tier's
limit through one real Redis (paced open-loop load at twice the rate), Redis killed mid-run (each
sidecar falls back to its share of the limit), a tokens-per-minute limit corrected to the actual
usage after each call, and a rate-limit refusal told apart from a budget refusal.

The client is the official openai SDK with max_retries=0: what it sees is what the gateways said.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from redisserver import Redis, start_redis
from tests.conftest import Launch, Net, wait_for
from tests.servers import Fake, backend, tier

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]
DEFAULT = {"defaultFor": {"names": ["apps"]}}
RATE = 20.0  # requests per second shared by the four sidecars
BURST = 20
SIDECARS = 4


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    r = start_redis(tmp_path / "redis")
    yield r
    r.stop()


def _policy(folder: Path, fake: Fake, rate_limit: dict[str, Any], *extra: dict[str, Any]) -> Path:
    """Tier `gold` (the namespace's default) under `rate_limit`, and tier `warm` on the same backend
    without one, which warms a sidecar up (its token counter, connections) without taking tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    objs = [
        tier("gold", [backend("g", fake.v1)], access=DEFAULT, rateLimit=rate_limit),
        tier("warm", [backend("w", fake.v1)]),
        *extra,
    ]
    (folder / "policy.yaml").write_text(yaml.safe_dump_all(objs))
    return folder


def _sample(url: str, name: str) -> float | None:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return None  # a gauge never set yet


def _metric(url: str, name: str) -> float:
    value = _sample(url, name)
    assert value is not None, f"{name} not in {url}/metrics"
    return value


@dataclass(frozen=True)
class Result:
    sidecar: int
    sent: float  # time.monotonic() just before the request went out
    status: int  # -1: no answer (connection failed)
    code: str | None = None
    retry_after: str | None = None
    limited: str | None = None  # x-tierwise-rate-limited
    total_tokens: int = 0


async def _one(client: openai.AsyncOpenAI, sidecar: int, model: str, max_tokens: int, tenant: str | None) -> Result:
    headers = {"x-tierwise-tenant": tenant} if tenant else None
    sent = time.monotonic()
    try:
        r = await client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=max_tokens, extra_headers=headers
        )
    except openai.APIStatusError as e:
        h = e.response.headers
        return Result(sidecar, sent, e.status_code, e.code, h.get("retry-after"), h.get("x-tierwise-rate-limited"))
    except openai.APIConnectionError:
        return Result(sidecar, sent, -1)
    return Result(sidecar, sent, 200, total_tokens=r.usage.total_tokens if r.usage else 0)


async def _paced(
    urls: list[str], rate: float, seconds: float, *, model: str = "gold", max_tokens: int = 8, tenant: str | None = None
) -> list[Result]:
    """Open loop: request i goes out at start + i/rate, to sidecar i mod len(urls), whatever the
    answers to the others (each request is a task of its own)."""
    clients = [openai.AsyncOpenAI(base_url=u + "/v1", api_key="unused", max_retries=0, timeout=15) for u in urls]
    tasks: list[asyncio.Task[Result]] = []
    try:
        start = time.monotonic() + 0.05
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            k = i % len(urls)
            tasks.append(asyncio.create_task(_one(clients[k], k, model, max_tokens, tenant)))
        return list(await asyncio.wait_for(asyncio.gather(*tasks), 30))
    finally:
        for c in clients:
            await c.close()


def _check_refusals(results: list[Result]) -> None:
    """No 5xx, no lost connection; every refusal a rate-limit 429 with a Retry-After of at least a second."""
    odd = [r for r in results if r.status not in (200, 429)]
    assert not odd, f"{len(odd)} answers neither 200 nor 429, e.g. {odd[:3]}"
    for r in results:
        if r.status == 429:
            assert r.code == "rate_limit_exceeded", r
            assert r.retry_after is not None and int(r.retry_after) >= 1, r
            assert r.limited == "requests", r


def _window(results: list[Result]) -> float:
    sent = sorted(r.sent for r in results)
    # The formulas below assume demand above the rate throughout: no pause in sending long enough
    # to refill a burst.
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert max(gaps) < 0.5 * BURST / RATE, f"the client fell behind its pace (a gap of {max(gaps):.2f}s)"
    return sent[-1] - sent[0]


def _launch_sidecars(launch: Launch, policy: Path, redis_url: str, n: int = SIDECARS) -> list[str]:
    urls = [launch("gateway", "--policy", str(policy), "--rate-limit-store", redis_url)[1] for _ in range(n)]
    for url in urls:  # the first request of a process loads its token counter: not in the measurement
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        client.chat.completions.create(model="warm", messages=MESSAGES, max_tokens=4)
    return urls


def test_four_sidecars_share_one_rate_limit_through_redis(
    net: Net, launch: Launch, redis_server: Redis, tmp_path: Path
) -> None:
    fake = net.fake(completion_tokens=4)
    limit = {"requestsPerSecond": RATE, "burst": BURST, "scope": "Namespace"}
    urls = _launch_sidecars(launch, _policy(tmp_path / "policy", fake, limit), redis_server.url)
    results = asyncio.run(_paced(urls, rate=2 * RATE, seconds=9))
    _check_refusals(results)
    admitted = sum(r.status == 200 for r in results)
    # The shared bucket is full when the first request is judged (nothing took from it before) and,
    # with twice the rate asked for, never full again: no refill is wasted after the first send. So
    # over the window T from the first send to the last, the four sidecars admit the burst plus
    # what refilled, burst + rate*T, less the fraction of a token left at the end. Each request is
    # judged a little after it was sent (by Redis's clock); a steady latency shifts both ends alike.
    window = _window(results)
    expected = BURST + RATE * window
    assert abs(admitted - expected) <= 0.05 * expected, (admitted, expected, window)
    # The limit is one for the namespace, not one per sidecar (four times as much would pass).
    per_sidecar = [sum(r.status == 200 and r.sidecar == k for r in results) for k in range(SIDECARS)]
    assert all(n > 0 for n in per_sidecar), per_sidecar
    assert admitted < len(results) * 0.75, "twice the rate was offered: about half must be refused"
    assert sum(fake.backend.stats.models.values()) == admitted + SIDECARS  # and the warm-ups


def test_redis_killed_mid_run_each_sidecar_keeps_its_share(
    net: Net, launch: Launch, redis_server: Redis, tmp_path: Path
) -> None:
    fake = net.fake(completion_tokens=4)
    limit = {"requestsPerSecond": RATE, "burst": BURST, "scope": "Namespace"}
    urls = _launch_sidecars(launch, _policy(tmp_path / "policy", fake, limit), redis_server.url)
    # A sidecar counts its peers in the namespaces it has served: one request each, then heartbeats.
    for url in urls:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        client.chat.completions.create(model="gold", messages=MESSAGES, max_tokens=4)
    for url in urls:
        wait_for("four peers seen", lambda u=url: _sample(u, "tierwise_rate_limit_peers") == SIDECARS, timeout=15)
        assert _metric(url, "tierwise_rate_limit_local_share") == 0

    killed_at: list[float] = []

    async def run() -> list[Result]:
        async def kill() -> None:
            await asyncio.sleep(2.0)
            await asyncio.to_thread(redis_server.kill)
            killed_at.append(time.monotonic())

        load = asyncio.create_task(_paced(urls, rate=2 * RATE, seconds=9))
        await kill()
        return await load

    results = asyncio.run(run())
    _check_refusals(results)  # Redis down costs no request a 5xx
    down = [r for r in results if r.sent > killed_at[0]]
    assert len(down) > 200, "most of the load went out after the kill"
    admitted = sum(r.status == 200 for r in down)
    window = _window(down)
    # Each sidecar judges alone on its share, 1/4 of the rate with 1/4 of the burst, on buckets of
    # its own that were full when Redis went (never used before). Over the window T each admits at
    # most burst/4 + rate/4*T: all four, rate*T + 4*(burst/4). Slack 5 %: a sidecar judges a
    # request a little after it is sent, and the four windows are not exactly the client's.
    bound = RATE * window + SIDECARS * (BURST / SIDECARS)
    assert admitted <= bound * 1.05, (admitted, bound, window)
    # And the limit is not turned into a refusal of everything: each sidecar asked twice its
    # share admits about its share, to the end of the window.
    assert admitted >= 0.9 * RATE * window, (admitted, window)
    last = max(r.sent for r in down)
    for k in range(SIDECARS):
        assert any(r.status == 200 and r.sidecar == k and r.sent > last - 1.5 for r in down), f"sidecar {k} stalled"
    for url in urls:
        assert _metric(url, "tierwise_rate_limit_local_share") == 1
        assert _metric(url, "tierwise_rate_limit_peers") == SIDECARS

    redis_server.start()
    for url in urls:
        wait_for("shared limits again", lambda u=url: _metric(u, "tierwise_rate_limit_local_share") == 0, timeout=15)
    # Shared again: one sidecar may take the whole burst and rate (on its share alone it would
    # admit a quarter of them).
    time.sleep(BURST / RATE)  # the shared bucket is full again
    again = asyncio.run(_paced(urls[:1], rate=2 * RATE, seconds=1.5))
    _check_refusals(again)
    after = sum(r.status == 200 for r in again)
    expected = BURST + RATE * _window(again)
    assert abs(after - expected) <= 0.05 * expected, (after, expected)


def test_tokens_per_minute_are_corrected_to_the_actual_usage(
    net: Net, launch: Launch, redis_server: Redis, tmp_path: Path
) -> None:
    fake = net.fake(completion_tokens=5)
    tpm = 1200  # 20 tokens a second, at most 1200 at once
    limit = {"tokensPerMinute": tpm, "scope": "Tenant"}
    urls = _launch_sidecars(launch, _policy(tmp_path / "policy", fake, limit), redis_server.url, n=2)
    clients = [openai.OpenAI(base_url=u + "/v1", api_key="unused", max_retries=0, timeout=30) for u in urls]
    max_tokens = 1000
    headers = {"x-tierwise-tenant": "steady"}

    # Each request is charged its prompt plus max_tokens (about 1010 of the 1200) and uses about
    # 15: uncorrected, one request would be admitted now and the next a minute later. Corrected
    # (through Redis: the requests alternate between the two sidecars), every one is admitted.
    n, admitted, prompt = 8, 0, 0
    start = time.monotonic()
    for i in range(n):
        try:
            r = clients[i % 2].chat.completions.create(
                model="gold", messages=MESSAGES, max_tokens=max_tokens, extra_headers=headers
            )
        except openai.RateLimitError:
            continue
        finally:
            time.sleep(0.4)  # four times the interval at which corrections are sent
        assert r.usage is not None and r.usage.completion_tokens <= 5
        admitted, prompt = admitted + 1, r.usage.prompt_tokens
    elapsed = time.monotonic() - start
    uncorrected = math.floor((tpm + tpm / 60 * elapsed) / (prompt + max_tokens))
    assert uncorrected <= 1
    assert admitted == n, f"{admitted} of {n} admitted (uncorrected, {uncorrected} would be)"

    # A tokens refusal says when the tokens will be there: a new tenant's bucket is full (1200); a
    # slow request takes prompt + 1000 of it, and the same request right after is short of
    # 2*(prompt + 1000) - 1200 tokens at 20 a second, minus what refilled meanwhile.
    fake.configure(first_byte_ms=2500)
    burst = {"x-tierwise-tenant": "burst"}
    first: list[int] = []

    def slow() -> None:
        r = clients[0].chat.completions.create(model="gold", messages=MESSAGES, max_tokens=max_tokens,
                                               extra_headers=burst)  # fmt: skip
        first.append(r.usage.total_tokens if r.usage else 0)

    seen = fake.requests
    caller = threading.Thread(target=slow, daemon=True)
    sent = time.monotonic()
    caller.start()
    wait_for("the slow request at the backend", lambda: fake.requests > seen, timeout=10, interval=0.02)
    with pytest.raises(openai.RateLimitError) as refused:
        clients[1].chat.completions.create(model="gold", messages=MESSAGES, max_tokens=max_tokens, extra_headers=burst)
    since = time.monotonic() - sent
    e = refused.value
    assert e.code == "rate_limit_exceeded"
    assert e.response.headers.get("x-tierwise-rate-limited") == "tokens"
    short = (2 * (prompt + max_tokens) - tpm) / (tpm / 60)
    retry_after = int(e.response.headers["retry-after"])
    assert math.ceil(short - since) - 1 <= retry_after <= math.ceil(short), (retry_after, short, since)
    assert retry_after > 30  # far from the one-second default

    # Its correction gives the slow request's unused tokens back long before that.
    fake.configure(first_byte_ms=0)
    caller.join(10)
    assert first and first[0] < 30
    time.sleep(0.5)
    # (Uncorrected, the bucket would hold about 190 + 20/s * 3 s now: a refusal, raised here.)
    r = clients[1].chat.completions.create(model="gold", messages=MESSAGES, max_tokens=max_tokens, extra_headers=burst)
    assert r.usage is not None and r.usage.total_tokens < 30


def test_a_rate_limit_refusal_is_told_apart_from_a_budget_refusal(net: Net, tmp_path: Path) -> None:
    fake = net.fake(completion_tokens=5)
    budget = {
        "apiVersion": "tierwise.dev/v1alpha1",
        "kind": "CostBudget",
        "metadata": {"name": "tiny", "namespace": "apps"},
        # One request's worst case (prompt + 16) fits; after it, what it spent and the next's do not.
        "spec": {"selector": {"tenants": ["spender"]}, "limit": {"tokens": 30}},
    }
    limit = {"requestsPerSecond": 0.1, "burst": 1, "scope": "Tenant"}
    folder = _policy(tmp_path / "policy", fake, limit, budget)
    gw = net.gateway(*yaml.safe_load_all((folder / "policy.yaml").read_text()))
    client = gw.client()

    def ask(tenant: str) -> openai.RateLimitError | None:
        try:
            client.chat.completions.create(model="gold", messages=MESSAGES, max_tokens=16,
                                           extra_headers={"x-tierwise-tenant": tenant})  # fmt: skip
        except openai.RateLimitError as e:
            return e
        return None

    assert ask("caller") is None
    rate = ask("caller")
    assert ask("spender") is None
    spent = ask("spender")
    assert rate is not None and spent is not None
    assert rate.code == "rate_limit_exceeded"
    assert rate.response.headers.get("x-tierwise-rate-limited") == "requests"
    assert 9 <= int(rate.response.headers["retry-after"]) <= 10  # one request at 0.1 a second
    assert spent.code == "budget_exceeded"
    assert spent.response.headers.get("x-tierwise-rate-limited") is None
    assert rate.code != spent.code
    assert rate.status_code == spent.status_code == 429
