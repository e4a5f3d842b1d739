"""Which requests a CachePolicy covers, which of them may be cached, and the key of each: pure.

The key is a hash of the canonical request: the fields that change the answer, serialised with
sorted keys and no whitespace between tokens (so key order and formatting do not matter), with
`model` replaced by the tier it resolved to and the fields that do not change the answer left out
(`stream`, `stream_options`, `user` and whatever the policy's normalization lists). To that come
the scope (the tenant by default; the namespace, or nothing, when the policy says so), the tier's
backend models (a model change starts a fresh cache, when the policy asks), the policy's revision
(a spec change does, when it asks) and its epoch. Nothing else changes a key.
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
    # Per tier: the digest of its backend models (empty when a model change does not invalidate).
    models: Mapping[str, str]
    salt: bytes

    @property
    def name(self) -> str:
        return f"{self.policy.namespace}/{self.policy.name}"


def _digest(models: tuple[str, ...]) -> str:
    return hashlib.blake2b("\0".join(sorted(models)).encode(), digest_size=8).hexdigest()


def covered(policy: PolicyCache, tier_models: Mapping[str, tuple[str, ...]]) -> Covered:
    spec = policy.spec
    inv = spec.invalidation
    models = {tier: _digest(ms) if inv.on_model_change else "" for tier, ms in tier_models.items()}
    salt = f"{policy.namespace}/{policy.name}\0{policy.revision if inv.on_policy_change else ''}\0{inv.epoch}"
    return Covered(policy, frozenset(spec.normalization.ignore_fields) | ALWAYS_IGNORED, models, salt.encode())


def applies(c: Covered, tier: str, model: str, tier_models: tuple[str, ...]) -> bool:
    """Does the policy's selector take this request (its tier, the model it named or one its tier
    serves)? The compiler already kept only the policies that govern the namespace."""
    sel = c.policy.spec.selector
    if sel.tiers and tier not in sel.tiers:
        return False
    return not sel.models or model in sel.models or any(m in sel.models for m in tier_models)


def choose(
    policies: tuple[Covered, ...], namespace: str, tier: str, model: str, tier_models: tuple[str, ...]
) -> Covered | None:
    """The namespace's own policy before a platform one; by name within each."""
    for own in (True, False):
        for c in policies:
            if (c.policy.namespace == namespace) is own and applies(c, tier, model, tier_models):
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
    h.update(f"\0{who}\0{kind}\0{tier}\0{c.models.get(tier, '')}\0".encode())
    h.update(orjson.dumps(content, option=orjson.OPT_SORT_KEYS))
    return h.hexdigest()
