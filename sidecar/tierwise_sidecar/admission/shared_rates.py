"""Rate limits shared by every sidecar of a namespace, in Redis; a local share while it is away.

A request's buckets are judged by one server-side script in one round trip (the arithmetic of
tierwise.buckets, with Redis's own clock so sidecars' clocks do not matter); both buckets of a
(tier, scope) live in one hash, so the script touches one key and runs on a Redis Cluster too.
Corrections after the call (the actual tokens against the charged estimate) are summed per bucket
and sent together every CORRECT_SECONDS, off the request's path.

Each sidecar says it is alive every HEARTBEAT_SECONDS in a sorted set per namespace, and reads how
many are: when Redis cannot be reached, each enforces 1/N of every shared limit on its own
buckets, N being the number it last saw. The aggregate then stays within the limit plus each
sidecar's local burst (docs/admission.md), `tierwise_rate_limit_local_share` says so, and Redis is
tried again after RETRY_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from tierwise_sidecar.admission.metrics import AdmissionMetrics
from tierwise_sidecar.admission.rates import LocalRates, RateRule, Verdict
from tierwise_sidecar.redis_conn import connection_class
from tierwise_sidecar.state import stop

log = logging.getLogger("tierwise.admission")

HEARTBEAT_SECONDS = 2.0
PEER_TTL_SECONDS = 10.0
RETRY_SECONDS = 1.0
CORRECT_SECONDS = 0.1
TIMEOUT_SECONDS = 0.25

# ARGV: mode ("take" | "give"), requests rate, requests size, tokens rate, tokens size, amount, ttl
# KEYS: the (tier, scope) hash: r/ra requests tokens and when counted, t/ta the same for tokens.
# take -> {1, "0", ""} or {0, seconds until there is enough, "requests" | "tokens"}
SCRIPT = """
local key, mode = KEYS[1], ARGV[1]
local rr, rs, tr, ts = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local amount, ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local b = redis.call('HMGET', key, 'r', 'ra', 't', 'ta')
local function level(tokens, at, rate, size)
  if not tokens then return size end
  return math.min(size, tonumber(tokens) + math.max(now - tonumber(at), 0) * rate)
end
if mode == 'give' then
  local t = math.max(-ts, math.min(ts, level(b[3], b[4], tr, ts) + amount))
  redis.call('HSET', key, 't', tostring(t), 'ta', tostring(now))
  redis.call('EXPIRE', key, ttl)
  return {1, '0', ''}
end
local r, t
local cost = math.min(amount, ts)
if rr > 0 then
  r = level(b[1], b[2], rr, rs)
  if r < 1 then return {0, tostring((1 - r) / rr), 'requests'} end
end
if tr > 0 then
  t = level(b[3], b[4], tr, ts)
  if t < cost then return {0, tostring((cost - t) / tr), 'tokens'} end
end
if r then redis.call('HSET', key, 'r', tostring(r - 1), 'ra', tostring(now)) end
if t then redis.call('HSET', key, 't', tostring(t - cost), 'ta', tostring(now)) end
redis.call('EXPIRE', key, ttl)
return {1, '0', ''}
"""


def _ttl(rule: RateRule) -> int:
    refill = max(rule.burst / rule.rps if rule.rps else 0.0, 60.0)
    return int(refill) + 60


class SharedRates:
    def __init__(self, url: str, metrics: AdmissionMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.metrics = metrics
        self.clock = clock
        self.instance = uuid.uuid4().hex
        self.local = LocalRates()
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=TIMEOUT_SECONDS, socket_connect_timeout=TIMEOUT_SECONDS, retry=Retry(NoBackoff(), 0),
            health_check_interval=0, connection_class=connection_class(url),
        )  # fmt: skip
        self._script = self._client.register_script(SCRIPT)
        self.peers: dict[str, int] = {}
        self._down_until = 0.0
        self._corrections: dict[str, tuple[RateRule, float]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._heartbeats()), asyncio.create_task(self._send_corrections())]

    async def close(self) -> None:
        await stop(*self._tasks)
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await self._flush()
        await self._client.aclose()

    # ------------------------------------------------------------ judging

    @property
    def local_mode(self) -> bool:
        return self.clock() < self._down_until

    def share(self, namespace: str) -> float:
        return 1.0 / max(1, self.peers.get(namespace, 1))

    async def take(self, rule: RateRule, namespace: str, key: str, cost: float) -> Verdict:
        self.peers.setdefault(namespace, 1)
        if not rule.shared:
            return self.local.take(rule, key, cost, 1.0, self.clock())
        if not self.local_mode:
            try:
                ok, wait, which = await self._script(keys=[_key(key)], args=_args(rule, "take", cost))
                return Verdict(bool(ok), float(wait), which.decode() if isinstance(which, bytes) else str(which))
            except (RedisError, OSError, TimeoutError) as e:
                self._went_down(e)
        return replace(self.local.take(rule, key, cost, self.share(namespace), self.clock()), local=True)

    def correct(self, rule: RateRule, namespace: str, key: str, amount: float, local: bool) -> None:
        if not amount or not rule.tokens_per_second:
            return
        if local or not rule.shared:
            self.local.correct(rule, key, amount, self.share(namespace) if rule.shared else 1.0, self.clock())
            return
        _, before = self._corrections.get(key, (rule, 0.0))
        self._corrections[key] = (rule, before + amount)

    def _went_down(self, e: BaseException) -> None:
        if not self.local_mode:
            log.warning("rate limits: Redis unreachable (%s); enforcing this sidecar's share locally for %.0fs",
                        type(e).__name__, RETRY_SECONDS)  # fmt: skip
        self._down_until = self.clock() + RETRY_SECONDS
        self.metrics.local_share.set((), 1.0)

    def _came_back(self) -> None:
        self._down_until = 0.0
        if self.metrics.local_share.value(()):
            log.info("rate limits: Redis reachable again; limits are shared")
        self.metrics.local_share.set((), 0.0)

    # ------------------------------------------------------------ background

    async def _heartbeats(self) -> None:
        while True:
            for namespace in list(self.peers):
                try:
                    self.peers[namespace] = await self._beat(namespace)
                    self._came_back()
                except (RedisError, OSError, TimeoutError) as e:
                    self._went_down(e)
            if self.peers:
                self.metrics.peers.set((), float(max(self.peers.values())))
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _beat(self, namespace: str) -> int:
        now = time.time()
        key = f"tierwise:rl:peers:{{{namespace}}}"
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {self.instance: now})
            pipe.zremrangebyscore(key, "-inf", now - PEER_TTL_SECONDS)
            pipe.zcard(key)
            pipe.expire(key, int(PEER_TTL_SECONDS * 6))
            replies: list[Any] = await pipe.execute()
        return max(1, int(replies[2]))

    async def _send_corrections(self) -> None:
        while True:
            await asyncio.sleep(CORRECT_SECONDS)
            if self._corrections and not self.local_mode:
                try:
                    await self._flush()
                except (RedisError, OSError, TimeoutError) as e:
                    self._went_down(e)

    async def _flush(self) -> None:
        pending, self._corrections = self._corrections, {}
        if not pending:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, (rule, amount) in pending.items():
                    await self._script(keys=[_key(key)], args=_args(rule, "give", amount), client=pipe)
                await pipe.execute()
        except BaseException:
            # Kept for the next flush: Redis unreachable applied none of them. (A reply lost after
            # Redis applied them gives them back twice: lenient by one correction, and rare.)
            for key, (rule, amount) in pending.items():
                _, later = self._corrections.get(key, (rule, 0.0))
                self._corrections[key] = (rule, amount + later)
            raise


def _key(key: str) -> str:
    return f"tierwise:rl:{{{key}}}"


def _args(rule: RateRule, mode: str, amount: float) -> list[Any]:
    rr, rs, tr, ts, ttl = _rule_args(rule)
    return [mode, rr, rs, tr, ts, repr(amount), ttl]


@functools.lru_cache(maxsize=1024)
def _rule_args(rule: RateRule) -> tuple[str, str, str, str, int]:
    """A rule's part of the script's arguments, rendered once per rule (rules live as long as a
    Policy), not once per request."""
    return repr(rule.rps), repr(rule.burst), repr(rule.tokens_per_second), repr(rule.tokens_size), _ttl(rule)
