"""Which requests a CachePolicy covers, which of them may be cached, and the key of each: pure.

The key is a hash of the canonical request: the fields that change the answer, serialised with
sorted keys and no whitespace between tokens (so key order and formatting do not matter), with
`model` replaced by the tier it resolved to (the InferenceTier's own namespace and name: a team's
tier never shares entries with a platform tier of the same name) and the fields that do not change
the answer left out (`stream` and `stream_options` always; what the policy's normalization lists,
by default `user`). To that come the scope (the tenant by default; the namespace, or nothing, when
the policy says so), the tier's backend models (a model change starts a fresh cache, when the
policy asks), the policy's revision (a spec change does, when it asks) and its epoch. Nothing else
changes a key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from tierwise.api.cache import CacheScope
from tierwise.policy import PolicyCache

# Never part of a key, whatever the policy says: how the answer is delivered, not what it is.
ALWAYS_IGNORED = frozenset({"model", "stream", "stream_options"})
# OpenAI's default when a request names none: sampled, so not cacheable under a lower ceiling.
DEFAULT_TEMPERATURE = 1.0
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Covered:
    """A CachePolicy as the sidecar applies it, with what is fixed per Policy made once."""

    policy: PolicyCache
    ignored: frozenset[str]
    # Per tier the namespace uses: what identifies it in a key (the InferenceTier's namespace and
    # name, and its backend models unless a model change should keep the entries).
    tiers: Mapping[str, str]
    salt: bytes
    name: str  # "namespace/name" of the policy


@dataclass(frozen=True, slots=True)
class TierId:
    """A tier as the cache knows it: where the InferenceTier lives, and its backends' models."""

    namespace: str
    models: tuple[str, ...]


def _tier_key(name: str, t: TierId, with_models: bool) -> str:
    parts = [t.namespace, name, *(sorted(t.models) if with_models else ())]
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=12).hexdigest()


def covered(policy: PolicyCache, tiers: Mapping[str, TierId]) -> Covered:
    spec = policy.spec
    inv = spec.invalidation
    ids = {name: _tier_key(name, t, inv.on_model_change) for name, t in tiers.items()}
    salt = f"{policy.namespace}/{policy.name}\0{policy.revision if inv.on_policy_change else ''}\0{inv.epoch}"
    return Covered(policy, frozenset(spec.normalization.ignore_fields) | ALWAYS_IGNORED, ids, salt.encode(),
                   f"{policy.namespace}/{policy.name}")  # fmt: skip


def applies(c: Covered, tier: str, tier_models: tuple[str, ...]) -> bool:
    """Does the policy's selector take a request served by this tier (by its name, or a model it
    serves)? The compiler already kept only the policies that govern the namespace. The model a
    request names does not count: it would let a request pick a policy it is not routed under."""
    sel = c.policy.spec.selector
    if sel.tiers and tier not in sel.tiers:
        return False
    return not sel.models or any(m in sel.models for m in tier_models)


def choose(policies: tuple[Covered, ...], namespace: str, tier: str, tier_models: tuple[str, ...]) -> Covered | None:
    """The namespace's own policy before a platform one; by name within each."""
    for own in (True, False):
        for c in policies:
            if (c.policy.namespace == namespace) is own and applies(c, tier, tier_models):
                return c
    return None


def refusal(c: Covered, kind: str, body: Mapping[str, Any], stream: bool) -> str | None:
    """Why this request may not be cached under the policy, or None when it may."""
    if kind == "embeddings":
        return "kind"
    rules = c.policy.spec.cacheable
    if stream and not rules.streaming:
        return "stream"
    if (body.get("tools") or body.get("functions")) and not rules.tools:
        return "tools"
    temperature = body.get("temperature")
    t = DEFAULT_TEMPERATURE if temperature is None else temperature
    if not isinstance(t, int | float) or t > rules.max_temperature:
        return "temperature"
    if (body.get("n") or 1) != 1:
        return "n"
    if body.get("logprobs") or body.get("top_logprobs"):
        return "logprobs"  # the entry keeps the message, not the token probabilities
    return None


def _collapse(value: Any) -> Any:
    if isinstance(value, str):
        return _SPACES.sub(" ", value).strip()
    if isinstance(value, list):
        return [_collapse(v) for v in value]
    if isinstance(value, dict):
        return {k: _collapse(v) for k, v in value.items()}
    return value


def key(c: Covered, kind: str, body: Mapping[str, Any], tier: str, *, namespace: str, tenant: str | None) -> str:
    """The request's cache key (a hex digest)."""
    content = {k: v for k, v in body.items() if k not in c.ignored}
    if c.policy.spec.normalization.collapse_whitespace:
        content = _collapse(content)
    scope = c.policy.spec.scope
    if scope is CacheScope.TENANT:
        who = f"t\0{namespace}\0{tenant or ''}"
    elif scope is CacheScope.NAMESPACE:
        who = f"n\0{namespace}"
    else:
        who = "g"
    h = hashlib.blake2b(digest_size=20)
    h.update(c.salt)
    h.update(f"\0{who}\0{kind}\0{tier}\0{c.tiers.get(tier, '')}\0".encode())
    h.update(orjson.dumps(content, option=orjson.OPT_SORT_KEYS))
    return h.hexdigest()
