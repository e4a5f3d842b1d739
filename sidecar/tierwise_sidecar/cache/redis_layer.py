"""L2: answers shared by every sidecar through Redis, each with its TTL (Redis expires them).

One value per key (`tierwise:cache:<key>`), so a Redis Cluster spreads entries over its slots: the
client finds out at the first connection whether the server is a cluster node and then talks to
the cluster (redis-py's RedisCluster follows the slot map and its MOVED redirects). Every command
is bounded by a short timeout: a slow Redis costs a lookup a miss, not the request its latency.
Size the Redis with `maxmemory` and an eviction policy (`allkeys-lru`): TTLs alone bound the
layer only in time.
"""

from __future__ import annotations

import asyncio
import math
import time

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from tierwise_sidecar.cache.stores import StoreError
from tierwise_sidecar.redis_conn import connection_class

PREFIX = "tierwise:cache:"


class RedisCacheLayer:
    name = "redis"

    def __init__(self, url: str, timeout: float = 0.25) -> None:
        self.url = url
        self.timeout = timeout
        self._client: aioredis.Redis | RedisCluster | None = None
        self._lock = asyncio.Lock()

    def _options(self) -> dict[str, object]:
        # Commands packed by hiredis (in C) as the budgets' connections are; no blind retries: a
        # failure is a miss, and the breaker decides when to try again.
        return {"socket_timeout": self.timeout, "socket_connect_timeout": self.timeout,
                "retry": Retry(NoBackoff(), 0), "health_check_interval": 0,
                "connection_class": connection_class(self.url)}  # fmt: skip

    async def _connect(self) -> aioredis.Redis | RedisCluster:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                try:
                    plain = aioredis.Redis.from_url(self.url, **self._options())  # type: ignore[arg-type]
                except ValueError as e:
                    raise StoreError(f"redis: the address is not a redis:// URL ({e})") from None
                try:
                    info = await plain.info("cluster")
                except (RedisError, OSError) as e:
                    await plain.aclose()
                    raise StoreError(f"redis: {type(e).__name__}") from None
                if info.get("cluster_enabled") == 1:
                    await plain.aclose()
                    cluster = RedisCluster.from_url(self.url, socket_timeout=self.timeout,
                                                    socket_connect_timeout=self.timeout)  # fmt: skip
                    try:
                        await cluster.initialize()
                    except (RedisError, OSError) as e:
                        await cluster.aclose()
                        raise StoreError(f"redis cluster: {type(e).__name__}") from None
                    self._client = cluster
                else:
                    self._client = plain
            return self._client

    @property
    def cluster(self) -> bool:
        return isinstance(self._client, RedisCluster)

    async def start(self) -> None:
        return None  # connected at first use: a Redis down at start is a miss, not a failed start

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def get(self, key: str) -> bytes | None:
        client = await self._connect()
        try:
            async with asyncio.timeout(self.timeout):
                got = await client.get(PREFIX + key)
        except (RedisError, RedisClusterException, OSError, TimeoutError) as e:
            raise StoreError(f"redis get: {type(e).__name__}") from None
        return got if isinstance(got, bytes) else None

    async def put(self, key: str, blob: bytes, expires: float) -> None:
        ttl = math.ceil(expires - time.time())
        if ttl <= 0:
            return
        client = await self._connect()
        try:
            async with asyncio.timeout(self.timeout * 4):
                await client.set(PREFIX + key, blob, ex=ttl)
        except (RedisError, RedisClusterException, OSError, TimeoutError) as e:
            raise StoreError(f"redis set: {type(e).__name__}") from None
