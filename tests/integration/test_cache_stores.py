"""The cache's shared layers against real servers: Redis (single, and a Cluster of 3 masters),
SQLite and PostgreSQL keep entries to their expiry and the persistent ones to their size bound,
survive a restart, and a store that is down costs a miss, is skipped while its breaker is open
and is used again once back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync
from prometheus_client import generate_latest

from pgserver import Postgres, start_postgres
from redisserver import Redis, RedisCluster, start_redis_cluster
from tierwise_sidecar.cache.entry import Entry, decode, encode
from tierwise_sidecar.cache.postgres_store import PostgresStore
from tierwise_sidecar.cache.redis_layer import RedisCacheLayer
from tierwise_sidecar.cache.shared import COOLDOWN_SECONDS, Layer, SharedLayers
from tierwise_sidecar.cache.stores import SqliteStore, StoreError
from tierwise_sidecar.config import GatewayConfig
from tierwise_sidecar.metrics import METRICS
from tierwise_sidecar.state import SharedState


def _entry(text: str = "Four.", expires: float | None = None) -> Entry:
    return Entry("chat", "gpt-4o", {"role": "assistant", "content": text}, "stop", None, 10,
                 expires if expires is not None else time.time() + 3600)  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    c = start_redis_cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    pg = start_postgres(tmp_path_factory.mktemp("pg"))
    yield pg
    pg.remove()


def test_redis_keeps_an_entry_to_its_ttl(store: Redis) -> None:
    async def go() -> None:
        layer = RedisCacheLayer(store.url)
        try:
            await layer.put("k1", encode(_entry()), time.time() + 1)
            got = await layer.get("k1")
            assert got is not None and decode(got) is not None
            assert await layer.get("absent") is None
            assert not layer.cluster
            await asyncio.sleep(2.1)
            assert await layer.get("k1") is None, "expired by Redis"
        finally:
            await layer.close()

    asyncio.run(go())


def test_a_redis_cluster_spreads_entries_over_its_masters(cluster: RedisCluster) -> None:
    async def go() -> None:
        layer = RedisCacheLayer(cluster.url)
        try:
            for i in range(60):
                await layer.put(f"key{i}", encode(_entry(f"answer {i}")), time.time() + 600)
            assert layer.cluster
            for i in range(60):
                got = await layer.get(f"key{i}")
                entry = decode(got) if got is not None else None
                assert entry is not None and entry.message["content"] == f"answer {i}"
        finally:
            await layer.close()

    asyncio.run(go())
    sizes = [redis_sync.Redis(port=n.port).dbsize() for n in cluster.nodes]
    assert all(s > 0 for s in sizes) and sum(sizes) == 60, sizes


def _persistent_cases(store: SqliteStore | PostgresStore) -> None:
    async def go() -> None:
        try:
            now = time.time()
            await store.put("old", encode(_entry(expires=now - 1)), now - 1)
            await store.put("live", encode(_entry()), now + 600)
            assert await store.get("live") is not None
            assert await store.sweep(now, 1024**3) == 1, "the expired entry"
            assert await store.get("old") is None
            # 300 answers of ~8 KiB (compressed less well than text: random-ish) over a 1 MiB bound.
            for i in range(300):
                text = "".join(f"{(i * 7919 + j * 104729) % 1000003:x}" for j in range(1600))
                await store.put(f"big{i}", encode(_entry(text)), now + 1000 + i)
            entries, size = await store.totals(now)
            assert size > 1024**2
            dropped = await store.sweep(now, 1024**2)
            entries_after, size_after = await store.totals(now)
            assert dropped > 0 and size_after <= 0.9 * 1024**2 and entries_after == entries - dropped
            # The soonest to expire went first: the last ones written are still there.
            assert await store.get("big299") is not None and await store.get("big0") is None
        finally:
            await store.close()

    asyncio.run(go())


def _still_there(store: SqliteStore | PostgresStore) -> None:
    """What the last sweep kept is there for a store opened afresh."""

    async def go() -> None:
        try:
            assert await store.get("big299") is not None
        finally:
            await store.close()

    asyncio.run(go())


def test_sqlite_sweeps_expired_entries_and_keeps_its_size_bound_and_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "cache.db"
    _persistent_cases(SqliteStore(path))
    _still_there(SqliteStore(path))


def test_postgresql_sweeps_expired_entries_and_keeps_its_size_bound_and_survives_a_restart(postgres: Postgres) -> None:
    _persistent_cases(PostgresStore(postgres.url))
    postgres.stop()
    postgres.start()
    _still_there(PostgresStore(postgres.url))


def test_a_store_that_is_down_is_a_miss_skipped_while_its_breaker_is_open_and_used_again(postgres: Postgres) -> None:
    async def go() -> None:
        layers = SharedLayers(SharedState(GatewayConfig()))
        await layers.start()
        layer: Layer = layers.layer("pg", lambda: PostgresStore(postgres.url, timeout=0.5))
        seen: list[tuple[str, str]] = []

        def counted(name: str, result: str) -> None:
            seen.append((name, result))

        try:
            layers.fill("k", _entry(), [(layer, time.time() + 600)], counted)
            await layers.settle()
            assert seen[-1] == ("persistent", "stored")
            assert await layers.get(layer, "k", counted) is not None
            postgres.stop()
            assert await layers.get(layer, "k", counted) is None
            assert seen[-1] == ("persistent", "error")
            started = time.monotonic()
            assert await layers.get(layer, "k", counted) is None
            assert seen[-1] == ("persistent", "skipped") and time.monotonic() - started < 0.05, "no round trip"
            layers.fill("k2", _entry(), [(layer, time.time() + 600)], counted)
            await layers.settle()
            assert seen[-1] == ("persistent", "dropped"), "a fill is not sent to an open breaker either"
            postgres.start()
            await asyncio.sleep(COOLDOWN_SECONDS)
            assert await layers.get(layer, "k", counted) is not None, "probed after the cooldown, used again"
        finally:
            if postgres.process is None:
                postgres.start()
            await layers.close()

    asyncio.run(go())


def test_sqlite_at_a_path_it_cannot_write_is_an_error_not_a_crash(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    async def go() -> None:
        store = SqliteStore(blocker / "cache.db")
        with pytest.raises(StoreError):
            await store.get("k")
        await store.close()

    asyncio.run(go())


def test_sweeps_report_what_a_persistent_store_holds(tmp_path: Path) -> None:
    async def go() -> None:
        state = SharedState(GatewayConfig())
        layers = SharedLayers(state)
        await layers.start()
        layer = layers.layer("sqlite", lambda: SqliteStore(tmp_path / "c.db"), max_bytes=1024**2)
        seen: list[tuple[str, str]] = []
        try:
            for i in range(400):
                text = "".join(f"{(i * 7919 + j * 104729) % 1000003:x}" for j in range(1600))
                layers.fill(f"k{i}", _entry(text), [(layer, time.time() + 600 + i)], lambda *a: seen.append(a))
            await layers.settle(30)
            await layers.sweep()
            ((name, entries, size, swept),) = layers.sizes()
            assert name == "persistent" and swept > 0 and entries == 400 - swept and 0 < size <= 0.9 * 1024**2
            text = generate_latest(state.get(METRICS).registry).decode()
            assert f'tierwise_cache_store_entries{{layer="persistent"}} {float(entries)}' in text
            assert "sqlite" not in text.split("tierwise_cache_store_entries")[1].split("\n")[0]
        finally:
            await layers.close()

    asyncio.run(go())
