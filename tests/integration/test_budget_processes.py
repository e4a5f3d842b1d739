"""Budgets that hold with real processes: several sidecars sharing one Redis under concurrent load
(half of it streaming), the standalone gateway's SQLite ledger across a restart, Redis killed and
brought back mid-run, and a sidecar killed while it holds reservations.

The spend that counts is what the fake providers report they served (their usage), priced here;
the gateways' own figures are what is checked against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis as redis_sync
import yaml

from redisserver import Redis, start_redis
from tests.budgetcases import rule
from tests.conftest import Launch, Net, wait_for
from tests.servers import Fake, backend, tier
from tierwise.budgetkeys import hold_keys, spend_key
from tierwise.periods import window
from tierwise_sidecar.budgets.slices import SLICE_REQUESTS

PRICE = (100.0, 400.0)  # per million tokens
MAX_TOKENS = 16
MESSAGES = [{"role": "user", "content": "Say hello."}]
LIMIT = 0.3  # about 40 requests of $0.0074


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    r = start_redis(tmp_path / "redis")
    yield r
    r.stop()


def _policy(folder: Path, fake: Fake, limit: float = LIMIT, **tier_spec: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    objs = [
        tier("gold", [backend("g", fake.v1, "gpt-4o", PRICE)], access={"defaultFor": {"names": ["apps"]}}, **tier_spec),
        {
            "apiVersion": "tierwise.dev/v1alpha1",
            "kind": "CostBudget",
            "metadata": {"name": "hard", "namespace": "apps"},
            "spec": {"limit": {"usd": limit}},
        },
    ]
    (folder / "policy.yaml").write_text(yaml.safe_dump_all(objs))
    return folder


def _spent_usd(fake: Fake) -> float:
    s = fake.backend.stats
    return sum(s.prompt_tokens.values()) * PRICE[0] / 1e6 + sum(s.completion_tokens.values()) * PRICE[1] / 1e6


def _tokens(fake: Fake) -> int:
    s = fake.backend.stats
    return sum(s.prompt_tokens.values()) + sum(s.completion_tokens.values())


def _one_request_worst(fake: Fake) -> float:
    """The most one request of this test may cost (its prompt and MAX_TOKENS out)."""
    s = fake.backend.stats
    n = sum(s.models.values()) or 1
    return (sum(s.prompt_tokens.values()) / n) * PRICE[0] / 1e6 + MAX_TOKENS * PRICE[1] / 1e6


async def _client_loop(
    url: str, stream: bool, results: list[tuple[int, str]], stop: Callable[[], bool], spent: list[int]
) -> None:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    try:
        while not stop():
            try:
                if stream:
                    s = await client.chat.completions.create(
                        model="gold",
                        messages=MESSAGES,
                        max_tokens=MAX_TOKENS,
                        stream=True,  # type: ignore[arg-type]
                    )
                    async for _ in s:
                        pass
                else:
                    await client.chat.completions.create(model="gold", messages=MESSAGES, max_tokens=MAX_TOKENS)  # type: ignore[arg-type]
                results.append((200, ""))
            except openai.APIStatusError as e:
                results.append((e.status_code, str(e.code)))
                if "the period resets" in str(e):
                    spent.append(1)  # refused because the budget is spent, not only held
                if e.status_code == 429:
                    await asyncio.sleep(0.05)
            except openai.APIConnectionError:
                results.append((-1, "connection"))
                await asyncio.sleep(0.05)
    finally:
        await client.close()


async def _load(
    urls: list[str], clients: int, seconds: float, until_refused: int = 0, until_answered: int = 0
) -> list[tuple[int, str]]:
    """`clients` concurrent clients spread over `urls`, half of them streaming, for at most `seconds`
    or until `until_refused` refusals said the budget is spent, or `until_answered` requests were
    answered (then at most that many plus `clients` are). (A refusal may also say that only
    what is held stands in the way, requests in flight or another sidecar's slice, with Retry-After
    one second: that is not the end of the budget.)"""
    results: list[tuple[int, str]] = []
    spent: list[int] = []
    deadline = time.monotonic() + seconds

    def stop() -> bool:
        # Asked by each client before each request: a poll from here every few tens of
        # milliseconds let a fast gateway answer dozens more than `until_answered`.
        return (
            time.monotonic() >= deadline
            or bool(until_refused and len(spent) >= until_refused)
            or bool(until_answered and len(results) >= until_answered)
        )

    tasks = [asyncio.create_task(_client_loop(urls[i % len(urls)], i % 2 == 1, results, stop, spent))
             for i in range(clients)]  # fmt: skip
    await asyncio.wait_for(asyncio.gather(*tasks), seconds + 60)
    return results


def _post(url: str) -> int:
    body = json.dumps({"model": "gold", "messages": MESSAGES, "max_tokens": MAX_TOKENS}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()
        return int(r.status)


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in {url}/metrics")


def _redis_spend(url: str) -> tuple[int, int]:
    r = rule("hard", limit={"usd": LIMIT})
    fields = redis_sync.Redis.from_url(url).hgetall(spend_key(r.key, window(r.period, r.time_zone, time.time())))
    return int(fields.get(b"u", 0)), int(fields.get(b"t", 0))


def _redis_held(url: str) -> tuple[int, int]:
    got = redis_sync.Redis.from_url(url).hmget(hold_keys("apps/hard")[0], "u", "t")
    return int(got[0] or 0), int(got[1] or 0)


def test_four_sidecars_on_one_redis_hold_a_hard_budget(
    net: Net, launch: Launch, redis_server: Redis, tmp_path: Path
) -> None:
    fake = net.fake(completion_tokens=MAX_TOKENS)
    policy = _policy(tmp_path / "policy", fake)
    env_store = ["--budget-store", redis_server.url]
    urls = [launch("gateway", "--policy", str(policy), *env_store)[1] for _ in range(4)]
    results = asyncio.run(_load(urls, clients=64, seconds=60, until_refused=64))
    assert not [r for r in results if r[0] >= 500 or r[0] < 0], "no request failed"
    assert {c for s, c in results if s == 429} == {"budget_exceeded"}
    spent, worst = _spent_usd(fake), _one_request_worst(fake)
    # Never more than one request's maximum cost above the limit; and the budget was used, not
    # refused early (within two requests of the limit).
    assert spent <= LIMIT + worst, (spent, LIMIT, worst)
    assert spent >= LIMIT - 2 * worst, (spent, LIMIT)
    served = sum(1 for s, _ in results if s == 200)
    assert served == sum(fake.backend.stats.models.values())
    # Every further request is refused with the budget's code, through any sidecar.
    more = asyncio.run(_load(urls, clients=8, seconds=1.5))
    assert more and {c for _, c in more} == {"budget_exceeded"}
    # Redis's ledger is what the providers served: tokens exactly, dollars to the micro-dollar per request.
    micros, tokens = _redis_spend(redis_server.url)
    assert tokens == _tokens(fake)
    assert abs(micros - spent * 1e6) <= served
    # Nothing stays held: the sidecars' slices went back when grants were refused (or idle).
    wait_for("slices given back", lambda: _redis_held(redis_server.url) == (0, 0), timeout=10)


def test_the_standalone_gateway_keeps_spend_in_sqlite_across_a_restart(
    net: Net, launch: Launch, tmp_path: Path
) -> None:
    fake = net.fake(completion_tokens=MAX_TOKENS)
    policy = _policy(tmp_path / "policy", fake)
    store = ["--budget-store", f"sqlite:{tmp_path / 'ledger' / 'budgets.sqlite'}"]
    proc, url = launch("gateway", "--policy", str(policy), *store)
    # A part of the budget: at most 12 + 16 requests of about 40 it takes (however fast they go).
    first = asyncio.run(_load([url], clients=16, seconds=30, until_answered=12))
    assert first and not [r for r in first if r[0] != 200]
    before = _metric(url, 'tierwise_budget_spent_usd{budget="hard",budget_namespace="apps"}')
    assert 0 < before < LIMIT
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    proc, url = launch("gateway", "--policy", str(policy), *store)
    assert _metric(url, 'tierwise_budget_spent_usd{budget="hard",budget_namespace="apps"}') == pytest.approx(before)
    rest = asyncio.run(_load([url], clients=16, seconds=60, until_refused=16))
    assert not [r for r in rest if r[0] >= 500 or r[0] < 0]
    spent, worst = _spent_usd(fake), _one_request_worst(fake)
    assert LIMIT - 2 * worst <= spent <= LIMIT + worst


def test_redis_killed_mid_run_no_5xx_no_loosening_and_nothing_lost(
    net: Net, launch: Launch, redis_server: Redis, tmp_path: Path
) -> None:
    fake = net.fake(completion_tokens=MAX_TOKENS)
    # Short leases: a reservation Redis ran but whose reply the kill lost is held by nobody.
    policy = _policy(tmp_path / "policy", fake, slo={"totalP99Milliseconds": 3000})
    store = ["--budget-store", redis_server.url, "--budget-lease-margin", "1"]
    urls = [launch("gateway", "--policy", str(policy), *store)[1] for _ in range(2)]
    # Spend about half the budget with Redis up, one request at a time through either sidecar.
    i = 0
    while _spent_usd(fake) < LIMIT / 2:
        _post(urls[i % 2])
        i += 1
    at_kill = _spent_usd(fake)
    # What each sidecar last saw (its settled plus in-flight spend) is all it can enforce on once
    # Redis is gone.
    labels = '{budget="hard",budget_namespace="apps"}'
    seen = [_metric(u, f"tierwise_budget_spent_usd{labels}") + _metric(u, f"tierwise_budget_reserved_usd{labels}")
            for u in urls]  # fmt: skip
    # (Holds count at their worst case, and each sidecar's allowance slice holds up to
    # SLICE_REQUESTS requests' worth ahead of them: a view can be that much above what was spent.)
    slices = len(urls) * SLICE_REQUESTS * _one_request_worst(fake)
    assert all(0 < v <= at_kill + _one_request_worst(fake) + slices + 1e-9 for v in seen), (seen, at_kill)
    redis_server.kill()
    during = asyncio.run(_load(urls, clients=16, seconds=60, until_refused=16))
    assert not [r for r in during if r[0] >= 500 or r[0] < 0], "Redis down costs no request a 5xx"
    assert any(c == "budget_exceeded" for _, c in during), "still enforced while Redis is away"
    for url in urls:
        assert _metric(url, "tierwise_budget_store_degraded") == 1
    spent, worst = _spent_usd(fake), _one_request_worst(fake)
    # Each sidecar spent at most the remaining amount it last saw: never more than that in all.
    assert spent <= at_kill + sum(LIMIT - v for v in seen) + 2 * worst, (spent, at_kill, seen)
    redis_server.start()
    for url in urls:
        wait_for("Redis trusted again", lambda u=url: _metric(u, "tierwise_budget_store_degraded") == 0, timeout=30)
    micros, tokens = _redis_spend(redis_server.url)
    assert tokens == _tokens(fake), "every settle owed while Redis was away reached it, once"
    assert abs(micros - spent * 1e6) <= sum(fake.backend.stats.models.values())
    # Nothing stays held: owed settles released their holds, and a hold whose reservation reply the
    # kill lost expires with its lease (any reservation, granted or not, sweeps expired leases).
    deadline = time.monotonic() + 15
    while _redis_held(redis_server.url) != (0, 0) and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            _post(urls[0])
        time.sleep(0.5)
    assert _redis_held(redis_server.url) == (0, 0)
    assert _redis_spend(redis_server.url) == (micros, tokens), "refused requests cost nothing"


def test_a_killed_sidecars_reservations_expire_and_settled_spend_stays(
    net: Net, launch: Launch, redis_server: Redis, tmp_path: Path
) -> None:
    fake = net.fake(completion_tokens=MAX_TOKENS)
    slow = net.fake("slow", completion_tokens=MAX_TOKENS, first_byte_ms=20_000)
    store = ["--budget-store", redis_server.url, "--budget-lease-margin", "1"]
    healthy = launch("gateway", "--policy", str(_policy(tmp_path / "p1", fake)), *store)[1]
    stuck_proc, stuck = launch(
        "gateway", "--policy", str(_policy(tmp_path / "p2", slow, slo={"totalP99Milliseconds": 3000})), *store
    )
    asyncio.run(_load([healthy], clients=2, seconds=30, until_answered=8))  # a part of the budget
    # Settles ride along with the next reservation, or go on their own within 50 ms.
    wait_for("settled spend in Redis", lambda: _redis_spend(redis_server.url)[1] > 0, timeout=5)
    settled = _redis_spend(redis_server.url)

    def hang() -> None:
        body = json.dumps({"model": "gold", "messages": MESSAGES, "max_tokens": MAX_TOKENS}).encode()
        req = urllib.request.Request(stuck + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        with contextlib.suppress(OSError):
            urllib.request.urlopen(req, timeout=30).read()

    callers = [threading.Thread(target=hang, daemon=True) for _ in range(4)]
    for c in callers:
        c.start()
    # The stuck sidecar's requests hold reservations now (its backend has not answered).
    wait_for("reservations held", lambda: _redis_held(redis_server.url)[0] > 0, timeout=10)
    os.kill(stuck_proc.pid, signal.SIGKILL)
    stuck_proc.wait(10)
    for c in callers:
        c.join(10)
    assert _redis_held(redis_server.url)[0] > 0
    time.sleep(3 + 1 + 0.5)  # the tier's total timeout, the lease margin, a little more
    before = _redis_spend(redis_server.url)
    # Its reservations sweep expired leases.
    asyncio.run(_load([healthy], clients=1, seconds=30, until_answered=3))
    wait_for("holds freed", lambda: _redis_held(redis_server.url) == (0, 0), timeout=10)
    after = _redis_spend(redis_server.url)
    assert before[1] >= settled[1] and after[1] > before[1], "settled spend stays, new spend adds"
    assert after[1] == _tokens(fake)


def test_a_second_gateway_on_the_same_ledger_file_is_refused_with_a_clear_error(
    net: Net, launch: Launch, tmp_path: Path
) -> None:
    fake = net.fake()
    policy = _policy(tmp_path / "policy", fake)
    store = ["--budget-store", f"sqlite:{tmp_path / 'ledger.sqlite'}"]
    launch("gateway", "--policy", str(policy), *store)
    second = subprocess.run(
        [sys.executable, "-m", "tierwise_cli", "gateway", "--policy", str(policy), *store, "--port", "0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert second.returncode == 1
    assert "is in use by pid" in second.stderr and "share budgets through Redis" in second.stderr
    assert "Traceback" not in second.stderr
