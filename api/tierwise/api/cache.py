"""CachePolicy: which requests may be answered from cache, in which layers, for how long."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field

from tierwise.api.common import (
    ApiModel,
    Invariant,
    NamespaceSelection,
    ObjectStatus,
    SecretKeyRef,
    StatusModel,
    TierName,
)


class CacheSelector(ApiModel):
    """Which requests the policy covers; empty fields do not narrow."""

    namespaces: NamespaceSelection | None = Field(
        default=None,
        description="Namespaces covered; only policies in the platform namespace may select other namespaces.",
    )
    tiers: list[TierName] = Field(
        default_factory=list,
        max_length=32,
        description="Tiers covered; empty covers all.",
    )
    models: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list,
        max_length=64,
        description="Models covered; empty covers all.",
    )


class CacheScope(StrEnum):
    TENANT = "Tenant"
    NAMESPACE = "Namespace"
    GLOBAL = "Global"


class MemoryLayer(ApiModel):
    """L1: in the sidecar's memory, bounded by entries and bytes."""

    enabled: bool = Field(default=True, description="Use the in-process layer.")
    max_entries: int = Field(default=10000, ge=1, le=10_000_000, description="Most entries held.")
    max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, le=16 * 1024**3, description="Most bytes of answers held."
    )


class RedisLayer(ApiModel):
    """L2: shared by every sidecar through Redis."""

    enabled: bool = Field(default=False, description="Use Redis.")
    connection_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the redis:// URL; required when enabled."
    )
    ttl_seconds: int | None = Field(default=None, ge=1, description="TTL in Redis; defaults to the policy TTL.")

    invariants = (
        Invariant(
            rule="!has(self.enabled) || !self.enabled || has(self.connectionSecretRef)",
            message="connectionSecretRef is required when the Redis layer is enabled",
            holds=lambda s: not s.enabled or s.connection_secret_ref is not None,
            field=".connectionSecretRef",
        ),
    )


class PersistentBackend(StrEnum):
    SQLITE = "SQLite"
    POSTGRESQL = "PostgreSQL"


class PersistentLayer(ApiModel):
    """L3: survives restarts; SQLite in the pod by default, PostgreSQL when shared."""

    enabled: bool = Field(default=False, description="Use the persistent layer.")
    backend: PersistentBackend = Field(default=PersistentBackend.SQLITE, description="SQLite or PostgreSQL.")
    connection_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the postgresql:// URL; required for PostgreSQL."
    )
    sqlite_path: str = Field(
        default="/var/cache/tierwise/cache.db", max_length=1024, description="Database file for SQLite."
    )
    ttl_seconds: int | None = Field(default=None, ge=1, description="TTL in the store; defaults to the policy TTL.")
    max_bytes: int = Field(
        default=1024**3,
        ge=1024**2,
        le=1024**4,
        description="Most bytes of answers kept; past it the entries that would expire soonest are dropped.",
    )

    invariants = (
        Invariant(
            rule="!has(self.enabled) || !self.enabled || !has(self.backend) || self.backend != 'PostgreSQL'"
            " || has(self.connectionSecretRef)",
            message="connectionSecretRef is required for the PostgreSQL backend",
            holds=lambda s: (
                not s.enabled or s.backend != PersistentBackend.POSTGRESQL or s.connection_secret_ref is not None
            ),
            field=".connectionSecretRef",
        ),
    )


class CacheLayers(ApiModel):
    """Looked up in order L1, L2, L3; a hit in a lower layer is promoted to the upper ones."""

    memory: MemoryLayer = Field(default_factory=MemoryLayer, description="L1 in-process.")
    redis: RedisLayer = Field(default_factory=RedisLayer, description="L2 Redis.")
    persistent: PersistentLayer = Field(default_factory=PersistentLayer, description="L3 SQLite or PostgreSQL.")

    invariants = (
        Invariant(
            # An omitted layer takes its defaults: memory on, the others off.
            rule="(!has(self.memory) || !has(self.memory.enabled) || self.memory.enabled)"
            " || (has(self.redis) && has(self.redis.enabled) && self.redis.enabled)"
            " || (has(self.persistent) && has(self.persistent.enabled) && self.persistent.enabled)",
            message="at least one layer must be enabled",
            holds=lambda s: s.memory.enabled or s.redis.enabled or s.persistent.enabled,
        ),
    )


class Cacheability(ApiModel):
    """Which requests may be cached at all."""

    max_temperature: float = Field(
        default=0.0, ge=0, le=2, description="Requests sampled hotter than this are never cached."
    )
    streaming: bool = Field(default=True, description="Cache streamed answers (replayed as a stream).")
    tools: bool = Field(default=False, description="Cache requests that declare tools.")


class Normalization(ApiModel):
    """How a request is canonicalised before hashing into a key."""

    collapse_whitespace: bool = Field(default=False, description="Treat runs of whitespace as one space.")
    ignore_fields: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=lambda: ["user", "stream", "stream_options"],
        max_length=32,
        description="Request fields that do not change the answer and are left out of the key.",
    )


class Invalidation(ApiModel):
    """What else, besides the request content, is part of the key."""

    on_policy_change: bool = Field(
        default=True, description="A change of this CachePolicy's spec starts a fresh cache."
    )
    on_model_change: bool = Field(default=True, description="A different backend model starts a fresh cache.")
    epoch: int = Field(default=0, ge=0, description="Bump to drop every entry of this policy at once.")


class Similarity(ApiModel):
    """Optional near-duplicate matching, single-turn only, with a floor no request can lower."""

    enabled: bool = Field(default=False, description="Answer near-duplicate prompts from cache.")
    threshold: float = Field(default=0.95, ge=0.8, le=1, description="Least similarity that counts as a hit.")
    embeddings_tier: TierName | None = Field(
        default=None,
        description="The tier whose backend embeds prompts (its /v1/embeddings); required when enabled.",
    )

    invariants = (
        Invariant(
            rule="!has(self.enabled) || !self.enabled || has(self.embeddingsTier)",
            message="embeddingsTier is required when similarity matching is enabled",
            holds=lambda s: not s.enabled or s.embeddings_tier is not None,
            field=".embeddingsTier",
        ),
    )


class CachePolicySpec(ApiModel):
    """Desired state of a CachePolicy."""

    selector: CacheSelector = Field(default_factory=CacheSelector, description="Requests covered.")
    scope: CacheScope = Field(
        default=CacheScope.TENANT,
        description="Who shares entries: Tenant (default; one tenant never sees another's answers), "
        "Namespace, or Global.",
    )
    ttl_seconds: int = Field(default=3600, ge=1, le=31_536_000, description="How long an entry lives.")
    layers: CacheLayers = Field(default_factory=CacheLayers, description="Cache layers.")
    cacheable: Cacheability = Field(default_factory=Cacheability, description="Which requests are cached.")
    normalization: Normalization = Field(default_factory=Normalization, description="Key canonicalisation.")
    invalidation: Invalidation = Field(default_factory=Invalidation, description="Key versioning.")
    similarity: Similarity = Field(default_factory=Similarity, description="Near-duplicate matching.")


class LayerHitRatio(StatusModel):
    """Hit ratio per layer over the last hour, from Prometheus."""

    memory: float | None = Field(default=None, description="L1 hit ratio.")
    redis: float | None = Field(default=None, description="L2 hit ratio.")
    persistent: float | None = Field(default=None, description="L3 hit ratio.")


class CachePolicyStatus(ObjectStatus):
    """Observed state of a CachePolicy, written by the operator."""

    entries: int | None = Field(default=None, description="Entries held in memory (L1), over every sidecar.")
    hit_ratio: LayerHitRatio | None = Field(default=None, description="Hit ratio per layer.")
