"""The cache stage: answer a repeated request from the cache, and fill the cache with new answers.

It runs after the estimate (a hit is accounted as the spend it saved) and before the budget stage
(a hit reserves nothing). On the way in: the CachePolicy that covers the request (the namespace's
own before a platform one), whether the request may be cached (the policy's temperature ceiling,
streaming and tools rules; `n` of 1) and whether the client asked to bypass (`Cache-Control:
no-store`) or refresh (`no-cache`: the answer is fetched anew and stored); then the key, and the
layers in order. A miss whose twin is already on its way to a backend waits for it (single
flight). On the way out a complete answer from the tier the key was made for is stored; errors,
refusals, truncated (`length`), cut or resumed answers and answers from another tier (a fallback,
a budget's downgrade, steering) never are.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from tierwise.api.cache import PersistentBackend
from tierwise_sidecar.cache.embed import Embedder
from tierwise_sidecar.cache.entry import Entry, from_stream, from_whole, stream_events, whole_body
from tierwise_sidecar.cache.flight import follow
from tierwise_sidecar.cache.key import Covered, TierId, choose, covered, key, refusal
from tierwise_sidecar.cache.layers import CACHES, Caches
from tierwise_sidecar.cache.metrics import CACHE_METRICS, CacheMetrics
from tierwise_sidecar.cache.near import Near, Pending
from tierwise_sidecar.cache.shared import CACHE_STORES, Layer, SharedLayers
from tierwise_sidecar.exchange import ANSWERED, ClientGoneError, Reply
from tierwise_sidecar.hotmetrics import FastCounter
from tierwise_sidecar.runtime import HEALTH
from tierwise_sidecar.tokens import TOKENS
from tierwise_sidecar.upstream import HTTP

if TYPE_CHECKING:
    from tierwise_sidecar.exchange import Exchange
    from tierwise_sidecar.runtime import Runtime
    from tierwise_sidecar.state import SharedState

log = logging.getLogger("tierwise.cache")
# How long a miss waits at most for an identical request already on its way to a backend, beyond
# which it goes itself (the tier's own total timeout bounds it too).
FOLLOW_SECONDS = 30.0


@dataclass(slots=True)
class CacheNote:
    """What the cache did with a request: the header's value, and what leave needs to fill."""

    outcome: str
    policy: Covered | None = None
    key: str = ""
    tier: str = ""
    leading: bool = False
    # A near-duplicate prompt to index once its answer is stored, and what embedding it cost
    # (part of the request's cost, not of the answer's: a hit saves the answer's).
    pending: Pending | None = None
    embedding_micros: int = 0


@dataclass(frozen=True, slots=True)
class Shared:
    """A policy's shared layers, in lookup order, each with its TTL."""

    layers: tuple[tuple[Layer, int], ...] = ()


def _control(headers: Mapping[str, str]) -> str | None:
    """The client's say, Cache-Control style: no-store bypasses the cache, no-cache refreshes."""
    value = headers.get("cache-control")
    if not value:
        return None
    tokens = {t.strip().lower() for t in value.split(",")}
    if "no-store" in tokens:
        return "bypass"
    if "no-cache" in tokens:
        return "refresh"
    return None


class CacheStage:
    name = "cache"

    def __init__(
        self,
        policies: tuple[Covered, ...],
        by_tier: Mapping[str, Covered],
        caches: Caches,
        metrics: CacheMetrics,
        *,
        shared: Mapping[str, Shared] | None = None,
        stores: SharedLayers | None = None,
        embedders: Mapping[str, tuple[Embedder, float]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policies = policies
        # Which policy covers a tier's requests: decided once per Policy.
        self.by_tier = by_tier
        self.caches = caches
        self.metrics = metrics
        self.shared = shared or {}
        self.stores = stores
        self.embedders = embedders or {}
        self.clock = clock

    def activate(self) -> None:
        self.caches.configure(self.policies)
        self.metrics.watch(self.caches.sizes)
        # Every layer's series exist from the start, at 0: a rate over a window then counts the
        # first lookups too (Prometheus takes a counter's first sample as its starting point).
        for c in self.policies:
            layers = ["memory"] if c.name in self.caches.memory else []
            layers += [layer.name for layer, _ in self.shared.get(c.name, Shared()).layers]
            for layer in layers:
                for result in ("hit", "miss"):
                    self.metrics.lookups.inc((c.policy.namespace, c.policy.name, layer, result), 0)

    # ------------------------------------------------------------ the way in

    async def enter(self, x: Exchange) -> Reply | None:
        who = x.identity
        c = self.by_tier.get(who.tier)
        if c is None:
            return None
        control = _control(x.headers)
        why = "client" if control == "bypass" else refusal(c, x.kind, x.body, x.stream)
        if why is not None:
            x.cache = CacheNote(f"bypass; reason={why}")
            self.metrics.requests.inc((who.namespace, who.tier, "bypass"))
            return None
        k = key(c, x.kind, x.body, who.tier, namespace=who.namespace, tenant=who.tenant)
        note = x.cache = CacheNote("refresh" if control == "refresh" else "miss", c, k, who.tier)
        if control != "refresh":
            entry, layer = await self._lookup(c, k)
            if entry is not None:
                return await self._serve(x, note, entry, layer)
            near = self._near(c)
            if near is not None:
                found, note.pending = await near.find(c, x, self.metrics)
                note.embedding_micros = x.outcome.micros  # no backend has answered yet: the embedding alone
                if found is not None:
                    entry, layer = await self._lookup(c, found.key)
                    if entry is not None:
                        return await self._serve(x, note, entry, f"{layer}; similarity={found.similarity:.3f}")
            waiting = self.caches.flights.lead(k)
            if waiting is not None:
                # At most half the time the request has left: going itself must still fit.
                entry = await follow(waiting, min(FOLLOW_SECONDS, (x.deadline - time.monotonic()) / 2))
                if entry is not None:
                    return await self._serve(x, note, entry, "flight")
            else:
                note.leading = True
        self.metrics.requests.inc((who.namespace, who.tier, note.outcome))
        return None

    def _near(self, c: Covered) -> Near | None:
        index = self.caches.indexes.get(c.name)
        got = self.embedders.get(c.name)
        return Near(index, got[0], got[1]) if index is not None and got is not None else None

    async def _lookup(self, c: Covered, k: str) -> tuple[Entry | None, str]:
        """L1, then the shared layers in order; a hit below L1 is promoted to the layers above."""
        policy = (c.policy.namespace, c.policy.name)
        now = self.clock()
        memory = self.caches.memory.get(c.name)
        if memory is not None:
            entry = memory.get(k, now)
            self.metrics.lookups.inc((*policy, "memory", "hit" if entry is not None else "miss"))
            if entry is not None:
                return entry, "memory"
        shared = self.shared.get(c.name)
        if shared is None or self.stores is None:
            return None, ""
        counted = self._counter(policy, self.metrics.lookups)
        for i, (layer, _) in enumerate(shared.layers):
            entry = await self.stores.get(layer, k, counted)
            if entry is not None:
                self._promote(c, k, entry, shared.layers[:i], now)
                return entry, layer.name
        return None, ""

    def _promote(self, c: Covered, k: str, entry: Entry, above: Sequence[tuple[Layer, int]], now: float) -> None:
        ttl = c.policy.spec.ttl_seconds
        memory = self.caches.memory.get(c.name)
        if memory is not None:
            memory.put(k, dataclasses.replace(entry, expires=min(entry.expires, now + ttl)), _size(entry))
        if above and self.stores is not None:
            policy = (c.policy.namespace, c.policy.name)
            targets = [(layer, min(entry.expires, now + layer_ttl)) for layer, layer_ttl in above]
            self.stores.fill(k, entry, targets, self._counter(policy, self.metrics.fills))

    def _counter(self, policy: tuple[str, str], family: FastCounter) -> Callable[[str, str], None]:
        return lambda layer, result: family.inc((*policy, layer, result))

    async def _serve(self, x: Exchange, note: CacheNote, entry: Entry, layer: str) -> Reply:
        note.outcome = f"hit; layer={layer}"
        who = x.identity
        self.metrics.requests.inc((who.namespace, who.tier, "hit"))
        if entry.micros:
            self.metrics.saved.inc((who.namespace, self.metrics.tenant(who.tenant), who.tier), entry.micros / 1e6)
        x.outcome.tier = who.tier
        x.outcome.cached = True
        if not x.stream:
            return Reply(200, whole_body(entry))
        await x.open_stream()
        events = stream_events(entry, x.client_usage)
        try:
            for event in events[:-1]:
                await x.sink.write(event)
        except ClientGoneError:
            x.outcome.status = 499  # the caller hung up during the replay
            return ANSWERED
        await x.sink.close(events[-1])
        return ANSWERED

    # ------------------------------------------------------------ the way out

    async def leave(self, x: Exchange) -> None:
        note = x.cache
        if note is None or note.policy is None or note.outcome.startswith("hit"):
            return
        entry = None
        try:
            entry = self._entry(x, note)
            if entry is not None:
                self._fill(note, entry)
        finally:
            if note.leading:
                self.caches.flights.land(note.key, entry)

    def _entry(self, x: Exchange, note: CacheNote) -> Entry | None:
        """The answer to store, if this request got one worth storing."""
        o = x.outcome
        if o.status != 200 or x.error is not None or o.problem or x.resume_text or o.tier != note.tier or x.altered:
            return None
        assert note.policy is not None
        expires = self.clock() + note.policy.policy.spec.ttl_seconds
        if x.streamed is not None:
            model = o.backend.model if o.backend is not None else ""
            return from_stream(x.kind, model, x.streamed, o.micros - note.embedding_micros, expires)
        if x.served is not None:
            return from_whole(x.kind, x.served, o.micros - note.embedding_micros, expires)
        return None

    def _fill(self, note: CacheNote, entry: Entry) -> None:
        c = note.policy
        assert c is not None
        near = self._near(c) if note.pending is not None else None
        if near is not None and note.pending is not None:
            near.remember(note.pending, note.key)
        policy = (c.policy.namespace, c.policy.name)
        memory = self.caches.memory.get(c.name)
        if memory is not None:
            stored = memory.put(note.key, entry, _size(entry))
            self.metrics.fills.inc((*policy, "memory", "stored" if stored else "dropped"))
        shared = self.shared.get(c.name)
        if shared is not None and self.stores is not None:
            now = self.clock()
            targets = [(layer, now + ttl) for layer, ttl in shared.layers]
            self.stores.fill(note.key, entry, targets, self._counter(policy, self.metrics.fills))


def _size(entry: Entry) -> int:
    """What an entry counts against L1's byte bound: its answer, and a little for the rest."""
    return len(orjson.dumps(entry.message)) + 256


def _shared_layers(c: Covered, state: SharedState) -> Shared | None:
    """The policy's L2 and L3 stores, addresses read from their Secrets; a layer whose Secret
    cannot be read is left out, with a warning (the others still serve)."""
    spec = c.policy.spec
    out: list[tuple[Layer, int]] = []
    redis, persistent = spec.layers.redis, spec.layers.persistent
    if redis.enabled and redis.connection_secret_ref is not None:
        url = state.secrets.get(redis.connection_secret_ref)
        if url:
            from tierwise_sidecar.cache.redis_layer import RedisCacheLayer

            layer = state.get(CACHE_STORES).layer(f"redis:{url}", lambda: RedisCacheLayer(url))
            out.append((layer, redis.ttl_seconds or spec.ttl_seconds))
        else:
            log.warning("cache policy %s: the Redis layer's Secret %s/%s cannot be read; serving without it",
                        c.name, redis.connection_secret_ref.name, redis.connection_secret_ref.key)  # fmt: skip
    if persistent.enabled:
        ttl = persistent.ttl_seconds or spec.ttl_seconds
        stores = state.get(CACHE_STORES)
        if persistent.backend is PersistentBackend.POSTGRESQL:
            ref = persistent.connection_secret_ref
            dsn = state.secrets.get(ref) if ref is not None else None
            if dsn:
                from tierwise_sidecar.cache.postgres_store import PostgresStore

                out.append((stores.layer(f"postgres:{dsn}", lambda: PostgresStore(dsn), persistent.max_bytes), ttl))
            else:
                log.warning("cache policy %s: the PostgreSQL layer's Secret cannot be read; serving without it", c.name)
        else:
            from tierwise_sidecar.cache.stores import SqliteStore

            path = Path(persistent.sqlite_path).expanduser()
            out.append((stores.layer(f"sqlite:{path}", lambda: SqliteStore(path), persistent.max_bytes), ttl))
    return Shared(tuple(out)) if out else None


def build(runtime: Runtime, state: SharedState) -> CacheStage | None:
    policy = runtime.policy
    if not policy.cache_policies and state.peek(CACHES) is None:
        return None
    tiers = {name: TierId(t.namespace, tuple(b.model for b in runtime.tiers[name].backends))
             for name, t in policy.tiers.items() if name in runtime.tiers}  # fmt: skip
    policies = tuple(covered(p, tiers) for p in policy.cache_policies)
    embedders: dict[str, tuple[Embedder, float]] = {}
    for c in policies:
        sim = c.policy.spec.similarity
        if not sim.enabled or sim.embeddings_tier is None:
            continue
        tier = runtime.tiers.get(sim.embeddings_tier)
        if tier is None:
            log.warning("cache policy %s: its embeddings tier %s is not usable from namespace %s; exact matches only",
                        c.name, sim.embeddings_tier, runtime.namespace)  # fmt: skip
            continue
        embedders[c.name] = (Embedder(tier, state.get(HEALTH), state.get(HTTP).session, state.get(TOKENS)),
                             sim.threshold)  # fmt: skip
    shared = {c.name: got for c in policies if (got := _shared_layers(c, state)) is not None}
    by_tier = {
        name: chosen
        for name, t in tiers.items()
        if (chosen := choose(policies, runtime.namespace, name, t.models)) is not None
    }
    return CacheStage(policies, by_tier, state.get(CACHES), state.get(CACHE_METRICS), shared=shared,
                      stores=state.peek(CACHE_STORES), embedders=embedders, clock=state.config.clock)  # fmt: skip
