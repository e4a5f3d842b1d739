"""The cache end to end, through the gateway with the openai SDK and fake providers: repeated
questions answered from memory, Redis and SQLite/PostgreSQL (a restart keeps L2/L3), streams
replayed, tenants and namespaces kept apart, single flight, what is never stored, the client's
Cache-Control, stores failing mid-run with no failed request, and hits that cost nothing against
budgets and are counted as saved."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from pgserver import Postgres, start_postgres
from redisserver import Redis
from tests.conftest import Net
from tests.servers import GatewayServer, backend, tier
from tierwise_sidecar.cache.shared import CACHE_STORES, COOLDOWN_SECONDS
from tierwise_sidecar.secrets import SecretSource

PRICE = (100.0, 400.0)
DEFAULT = {"default": True}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
ASK: dict[str, Any] = {"model": "gold", "messages": MESSAGES, "temperature": 0, "max_tokens": 16}
SECRET = {"name": "cache", "key": "url"}


def cache_policy(namespace: str = "apps", name: str = "answers", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "tierwise.dev/v1alpha1", "kind": "CachePolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}  # fmt: skip


def _gold(net: Net, namespace: str = "apps", **fake: Any) -> tuple[dict[str, Any], Any]:
    f = net.fake("gold", completion_tokens=8, **fake)
    return tier("gold", [backend("g", f.v1, "gpt-4o", PRICE)], namespace=namespace, access=DEFAULT), f


def _post(gw: GatewayServer, body: dict[str, Any] = ASK, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return gw.post("/v1/chat/completions", body, headers)


def _metric(gw: GatewayServer, name: str) -> float:
    total = 0.0
    for line in gw.get("/metrics")[1].decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _shared(url: str) -> SecretSource:
    return SecretSource(Path("/nonexistent"), {"TIERWISE_SECRET_CACHE_URL": url})


def _settle(gw: GatewayServer) -> None:
    """Wait until the gateway's queued fills reached the shared layers."""
    gw.loop.run(gw.gateway.state.get(CACHE_STORES).settle())


def test_a_repeated_question_is_answered_from_memory_at_no_cost(net: Net) -> None:
    gold, fake = _gold(net)
    gw = net.gateway(gold, cache_policy(), namespace="apps")
    client = gw.client()
    first = client.chat.completions.with_raw_response.create(**ASK)
    second = client.chat.completions.with_raw_response.create(**ASK)
    assert fake.requests == 1
    assert first.headers["x-tierwise-cache"] == "miss" and float(first.headers["x-tierwise-cost-usd"]) > 0
    assert second.headers["x-tierwise-cache"] == "hit; layer=memory"
    assert float(second.headers["x-tierwise-cost-usd"]) == 0
    a, b = first.parse(), second.parse()
    assert a.choices[0].message.content == b.choices[0].message.content and b.usage == a.usage
    # Key order and whitespace do not matter; a change of content does.
    status, h, _ = gw.post("/v1/chat/completions",
                           b'{"max_tokens":16,  "temperature":0,\n"messages":[{"content":"Be brief.","role":"system"},'
                           b'{"content":"What is 2+2?","role":"user"}],"model":"gold"}')  # fmt: skip
    assert status == 200 and h["x-tierwise-cache"] == "hit; layer=memory"
    for change in ({"max_tokens": 17}, {"messages": [MESSAGES[0], {"role": "user", "content": "What is 2+2? "}]},
                   {"messages": [{"role": "system", "content": "Be long."}, MESSAGES[1]]}):  # fmt: skip
        assert _post(gw, {**ASK, **change})[1]["x-tierwise-cache"] == "miss"
    assert fake.requests == 4


def test_streams_are_stored_assembled_and_replayed_as_streams_the_sdk_reads(net: Net) -> None:
    gold, fake = _gold(net)
    gw = net.gateway(gold, cache_policy(), namespace="apps")
    client = gw.client()
    streamed = list(client.chat.completions.create(**ASK, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    # A whole request hits the entry the stream filled, and a streamed one is replayed from it.
    whole = client.chat.completions.with_raw_response.create(**ASK)
    assert whole.headers["x-tierwise-cache"] == "hit; layer=memory"
    assert whole.parse().choices[0].message.content == text
    replay = client.chat.completions.with_streaming_response
    with replay.create(**ASK, stream=True, stream_options={"include_usage": True}) as r:
        assert r.headers["x-tierwise-cache"] == "hit; layer=memory"
        chunks = list(r.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert fake.requests == 1


def test_tenants_never_share_an_entry_unless_the_policy_says_global(net: Net) -> None:
    gold, fake = _gold(net)
    gw = net.gateway(gold, cache_policy(), namespace="apps")
    assert _post(gw, **{"x-tierwise-tenant": "acme"})[1]["x-tierwise-cache"] == "miss"
    assert _post(gw, **{"x-tierwise-tenant": "globex"})[1]["x-tierwise-cache"] == "miss"
    assert _post(gw)[1]["x-tierwise-cache"] == "miss", "no tenant is a scope of its own"
    assert _post(gw, **{"x-tierwise-tenant": "acme"})[1]["x-tierwise-cache"] == "hit; layer=memory"
    assert fake.requests == 3
    shared = net.gateway(_gold(net)[0], cache_policy(scope="Global"), namespace="apps")
    assert _post(shared, **{"x-tierwise-tenant": "acme"})[1]["x-tierwise-cache"] == "miss"
    assert _post(shared, **{"x-tierwise-tenant": "globex"})[1]["x-tierwise-cache"] == "hit; layer=memory"


def test_the_client_can_bypass_or_refresh_and_hot_sampling_is_not_cached(net: Net) -> None:
    gold, fake = _gold(net)
    gw = net.gateway(gold, cache_policy(), namespace="apps")
    _post(gw)
    assert _post(gw, **{"Cache-Control": "no-store"})[1]["x-tierwise-cache"] == "bypass; reason=client"
    assert _post(gw, **{"Cache-Control": "no-cache"})[1]["x-tierwise-cache"] == "refresh"
    assert _post(gw)[1]["x-tierwise-cache"] == "hit; layer=memory"
    assert fake.requests == 3
    hot = {**ASK, "temperature": 0.7}
    assert _post(gw, hot)[1]["x-tierwise-cache"] == "bypass; reason=temperature"
    assert _post(gw, hot)[1]["x-tierwise-cache"] == "bypass; reason=temperature"
    unset = {k: v for k, v in ASK.items() if k != "temperature"}
    assert _post(gw, unset)[1]["x-tierwise-cache"] == "bypass; reason=temperature", "OpenAI's default is 1"
    assert fake.requests == 6
    warm = net.gateway(_gold(net)[0], cache_policy(cacheable={"maxTemperature": 1}), namespace="apps")
    _post(warm, hot)
    assert _post(warm, hot)[1]["x-tierwise-cache"] == "hit; layer=memory"


def test_errors_and_cut_streams_are_never_stored(net: Net) -> None:
    gold, fake = _gold(net, error_rate=1.0, error_status=500)
    gw = net.gateway(gold, cache_policy(), namespace="apps")
    assert _post(gw)[0] == 502
    fake.configure(error_rate=0.0, drop_after_chunks=2)
    client = gw.client()
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(**ASK, stream=True))
    fake.configure(drop_after_chunks=None)
    status, h, _ = _post(gw)
    assert status == 200 and h["x-tierwise-cache"] == "miss"
    assert _post(gw)[1]["x-tierwise-cache"] == "hit; layer=memory"


def test_fifty_identical_misses_make_one_backend_call(net: Net) -> None:
    gold, fake = _gold(net, first_byte_ms=400)
    gw = net.gateway(gold, cache_policy(), namespace="apps")

    async def go() -> list[tuple[str, str]]:
        client = gw.async_client()
        try:
            got = await asyncio.gather(*(client.chat.completions.with_raw_response.create(**ASK) for _ in range(50)))
            return [(r.headers["x-tierwise-cache"], r.parse().choices[0].message.content or "") for r in got]
        finally:
            await client.close()

    results = asyncio.run(go())
    assert fake.requests == 1
    assert sorted(h for h, _ in results) == ["hit; layer=flight"] * 49 + ["miss"]
    assert len({text for _, text in results}) == 1


def test_a_hit_reserves_nothing_against_budgets_and_is_counted_as_saved(net: Net) -> None:
    gold, fake = _gold(net)
    budget = {"apiVersion": "tierwise.dev/v1alpha1", "kind": "CostBudget",
              "metadata": {"name": "team", "namespace": "apps"}, "spec": {"limit": {"usd": 1.0}}}  # fmt: skip
    gw = net.gateway(gold, cache_policy(), budget, namespace="apps")
    first = _post(gw, **{"x-tierwise-tenant": "acme"})[1]
    cost = float(first["x-tierwise-cost-usd"])
    spent = _metric(gw, "tierwise_budget_spent_usd")
    assert spent == pytest.approx(cost)
    for _ in range(5):
        h = _post(gw, **{"x-tierwise-tenant": "acme"})[1]
        assert h["x-tierwise-cache"] == "hit; layer=memory" and "x-tierwise-budget-remaining-usd" not in h
    assert _metric(gw, "tierwise_budget_spent_usd") == pytest.approx(spent)
    assert _metric(gw, "tierwise_budget_reserved_usd") == 0
    saved = 'tierwise_cache_saved_usd_total{namespace="apps",tenant="acme",tier="gold"}'
    assert _metric(gw, saved) == pytest.approx(5 * cost)
    assert _metric(gw, 'tierwise_cache_requests_total{namespace="apps",outcome="hit",tier="gold"}') == 5
    assert fake.requests == 1


def test_redis_shares_entries_across_sidecars_by_scope_and_survives_being_down(net: Net, store: Redis) -> None:
    layers = {"memory": {"enabled": False}, "redis": {"enabled": True, "connectionSecretRef": SECRET}}
    secrets = _shared(store.url)
    gold_a, fake_a = _gold(net)
    a = net.gateway(gold_a, cache_policy(layers=layers, scope="Namespace"), namespace="apps", secrets=secrets)
    gold_b, fake_b = _gold(net)
    b = net.gateway(gold_b, cache_policy(layers=layers, scope="Namespace"), namespace="apps", secrets=secrets)
    gold_o, _ = _gold(net, namespace="other")
    other = net.gateway(gold_o, cache_policy("other", layers=layers, scope="Namespace"), namespace="other",
                        secrets=secrets)  # fmt: skip
    assert _post(a)[1]["x-tierwise-cache"] == "miss"
    _settle(a)  # the fill leaves the request's path through a queue
    assert _post(b)[1]["x-tierwise-cache"] == "hit; layer=redis"
    assert fake_b.requests == 0
    assert _post(other)[1]["x-tierwise-cache"] == "miss", "a namespace-scoped entry never crosses namespaces"
    store.kill()
    statuses = [_post(b, {**ASK, "max_tokens": 20 + i})[0] for i in range(5)]
    assert statuses == [200] * 5, "Redis down costs no request"
    assert _metric(b, 'tierwise_cache_lookups_total{cache_namespace="apps",cache_policy="answers",layer="redis",'
                      'result="error"}') >= 1  # fmt: skip
    store.start()
    time.sleep(COOLDOWN_SECONDS + 0.5)
    assert _post(b)[1]["x-tierwise-cache"] == "hit; layer=redis", "used again once back (its data kept)"
    assert fake_a.requests == 1


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    pg = start_postgres(tmp_path_factory.mktemp("pg"))
    yield pg
    pg.remove()


def _restart_keeps(net: Net, layers: dict[str, Any], secrets: SecretSource | None, layer: str) -> None:
    gold, fake = _gold(net)
    policy = cache_policy(layers={"memory": {"enabled": True}, **layers})
    first = net.gateway(gold, policy, namespace="apps", secrets=secrets)
    assert _post(first)[1]["x-tierwise-cache"] == "miss"
    first.close()  # closing flushes the queued fills
    net.started.remove(first)
    again = net.gateway(gold, policy, namespace="apps", secrets=secrets)
    assert _post(again)[1]["x-tierwise-cache"] == f"hit; layer={layer}"
    assert _post(again)[1]["x-tierwise-cache"] == "hit; layer=memory", "promoted"
    assert fake.requests == 1


def test_sqlite_keeps_answers_across_a_restart(net: Net, tmp_path: Path) -> None:
    path = str(tmp_path / "cache" / "cache.db")
    _restart_keeps(net, {"persistent": {"enabled": True, "sqlitePath": path}}, None, "persistent")


def test_postgresql_keeps_answers_across_a_restart_and_its_loss_costs_no_request(net: Net, postgres: Postgres) -> None:
    layers = {"persistent": {"enabled": True, "backend": "PostgreSQL", "connectionSecretRef": SECRET}}
    secrets = _shared(postgres.url)
    _restart_keeps(net, layers, secrets, "persistent")
    gold, _ = _gold(net)
    gw = net.gateway(gold, cache_policy(layers={"memory": {"enabled": False}, **layers}), namespace="apps",
                     secrets=secrets)  # fmt: skip
    postgres.stop()
    try:
        assert [_post(gw, {**ASK, "max_tokens": 30 + i})[0] for i in range(5)] == [200] * 5
    finally:
        postgres.start()


def test_memory_keeps_to_its_byte_bound_with_large_answers(net: Net) -> None:
    fake = net.fake("big", completion_tokens=400)  # answers of about 2 KiB
    big = tier("gold", [backend("g", fake.v1, "gpt-4o", PRICE)], access=DEFAULT)
    gw = net.gateway(big, cache_policy(layers={"memory": {"maxBytes": 5000}}), namespace="apps")
    for i in range(6):
        assert _post(gw, {**ASK, "max_tokens": 400 + i})[1]["x-tierwise-cache"] == "miss"
    labels = '{cache_namespace="apps",cache_policy="answers",layer="memory"}'
    assert 0 < _metric(gw, "tierwise_cache_bytes" + labels) <= 5000
    assert _metric(gw, "tierwise_cache_entries" + labels) == 2
    assert _metric(gw, "tierwise_cache_evictions_total" + labels) == 4
    assert _post(gw, {**ASK, "max_tokens": 405})[1]["x-tierwise-cache"] == "hit; layer=memory", "the newest stays"
    assert _post(gw, {**ASK, "max_tokens": 400})[1]["x-tierwise-cache"] == "miss", "the oldest went"


def test_a_store_address_that_is_not_a_url_costs_a_miss_not_an_error(net: Net) -> None:
    gold, fake = _gold(net)
    layers = {"redis": {"enabled": True, "connectionSecretRef": SECRET}}
    gw = net.gateway(gold, cache_policy(layers=layers), namespace="apps", secrets=_shared("redis-master:6379"))
    assert _post(gw)[0] == 200
    status, h, _ = _post(gw)
    assert status == 200 and h["x-tierwise-cache"] == "hit; layer=memory"
    errors = 'tierwise_cache_lookups_total{cache_namespace="apps",cache_policy="answers",layer="redis",result="error"}'
    assert _metric(gw, errors) == 1, "one failure, then the breaker skips the layer"
    assert fake.requests == 1


def _near_gateway(net: Net, threshold: float = 0.8) -> tuple[GatewayServer, Any]:
    gold, fake = _gold(net)
    emb = net.fake("emb")
    embeddings = tier("emb", [backend("e", emb.v1, "text-embedding-3-small", (100.0, 0.0))])
    policy = cache_policy(selector={"tiers": ["gold"]},
                          similarity={"enabled": True, "threshold": threshold, "embeddingsTier": "emb"})  # fmt: skip
    return net.gateway(gold, embeddings, policy, namespace="apps"), fake


def _asking(text: str, system: str = "Be brief.") -> dict[str, Any]:
    return {**ASK, "messages": [{"role": "system", "content": system}, {"role": "user", "content": text}]}


def test_a_near_duplicate_prompt_is_answered_from_cache_and_a_negated_one_never(net: Net) -> None:
    gw, fake = _near_gateway(net)
    assert _post(gw, _asking("How do I enable dark mode?"))[1]["x-tierwise-cache"] == "miss"
    # The same words, other case and punctuation: not the same key, the same question.
    h = _post(gw, _asking("how do I enable dark mode"))[1]
    assert h["x-tierwise-cache"].startswith("hit; layer=memory; similarity=")
    assert float(h["x-tierwise-cache"].rsplit("=", 1)[1]) >= 0.8
    # False hits the guard stops, although their embeddings are as close as the hit's.
    for other in ("How do I disable dark mode?", "How do I not enable dark mode?", "How do I enable dark mode 2?"):
        assert _post(gw, _asking(other))[1]["x-tierwise-cache"] == "miss", other
    # Another system prompt is another context: never matched.
    assert _post(gw, _asking("how do I enable dark mode", system="Be long."))[1]["x-tierwise-cache"] == "miss"
    assert fake.requests == 5
    embedded = _metric(gw, "tierwise_cache_embedding_cost_usd_total")
    assert embedded > 0
    # The embeddings are the requests' own cost, under the embeddings backend.
    cost = 'tierwise_cost_usd_total{backend="e",namespace="apps",tenant="none",tier="emb"}'
    assert _metric(gw, cost) == pytest.approx(embedded)


def test_near_duplicates_are_single_turn_only_and_a_client_may_raise_the_floor_not_lower_it(net: Net) -> None:
    gw, fake = _near_gateway(net, threshold=0.95)
    _post(gw, _asking("Which port does Redis listen on by default?"))
    # Extra words: similar, but below the policy's 0.95; a client asking for 0.5 does not lower it.
    wordy = _asking("Which port does Redis listen on by default, usually, for clients?")  # 0.88 here
    assert _post(gw, wordy, **{"x-tierwise-cache-similarity": "0.5"})[1]["x-tierwise-cache"] == "miss"
    # A client may raise the floor: at 1.0 only an exact match would do.
    same = _asking("which port does redis listen on by default")
    assert _post(gw, same, **{"x-tierwise-cache-similarity": "1.01"})[1]["x-tierwise-cache"] == "miss"
    variant = _asking("Which port does Redis listen on, by default?")
    assert _post(gw, variant)[1]["x-tierwise-cache"].startswith("hit; layer=memory; similarity=")
    # A second turn is never matched by similarity.
    first = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    turns = {**ASK, "messages": [*first, {"role": "user", "content": "Which port does Redis listen on, by default"}]}
    assert _post(gw, turns)[1]["x-tierwise-cache"] == "miss"
    assert fake.requests == 4
