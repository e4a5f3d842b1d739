"""Cost estimation before the call: an upper bound used to reserve budget, and the actual cost after."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tierwise.api.tier import Backend, Pricing
from tierwise_sidecar.tokens import TokenCounter

PER_MILLION = 1_000_000


@dataclass(frozen=True)
class Estimate:
    """Tokens and USD of a request before it is sent; output is the most the request may produce."""

    input_tokens: int
    output_tokens: int
    usd: float


def cost_usd(pricing: Pricing, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> float:
    """USD for a usage, with prompt-cache hits at the cached price (the input price when unset)."""
    cached_price = pricing.cached_input_per_million
    if cached_price is None:
        cached_price = pricing.input_per_million
    fresh = max(input_tokens - cached_input_tokens, 0)
    return (
        fresh * pricing.input_per_million
        + cached_input_tokens * cached_price
        + output_tokens * pricing.output_per_million
    ) / PER_MILLION


def max_output_tokens(body: Mapping[str, Any], backend: Backend, input_tokens: int) -> int:
    """The most completion tokens the request may cost: its own cap, else what the context leaves."""
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    room = max(backend.capabilities.max_context_tokens - input_tokens, 0)
    if isinstance(cap, int) and cap > 0:
        return min(cap, room) if room else cap
    return room


def estimate_chat(counter: TokenCounter, body: Mapping[str, Any], backend: Backend) -> Estimate:
    """Estimate of a /v1/chat/completions body on a backend (the model is the backend's)."""
    n = int(body.get("n") or 1)
    input_tokens = counter.count_chat(backend.model, body.get("messages") or [], body.get("tools") or ())
    output_tokens = max_output_tokens(body, backend, input_tokens) * n
    return Estimate(input_tokens, output_tokens, cost_usd(backend.pricing, input_tokens, output_tokens))
