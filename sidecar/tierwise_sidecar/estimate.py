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


def count_prompt(counter: TokenCounter, model: str, prompt: Any) -> int:
    """Tokens of a completions prompt or an embeddings input: text, texts, or token id lists."""
    if isinstance(prompt, str):
        return counter.count_text(model, prompt)
    if not isinstance(prompt, list):
        return 0
    if all(isinstance(p, int) for p in prompt):
        return len(prompt)
    return sum(
        counter.count_text(model, p) if isinstance(p, str) else len(p) if isinstance(p, list) else 0 for p in prompt
    )


def count_input(counter: TokenCounter, kind: str, model: str, body: Mapping[str, Any]) -> int:
    if kind == "chat":
        return counter.count_chat(model, body.get("messages") or [], body.get("tools") or ())
    return count_prompt(counter, model, body.get("prompt") if kind == "completions" else body.get("input"))


def estimate_request(
    counter: TokenCounter, kind: str, body: Mapping[str, Any], backend: Backend, input_tokens: int | None = None
) -> Estimate:
    """Estimate of any request kind on a backend; embeddings produce no output tokens. Pass
    `input_tokens` when the prompt was already counted with this backend's encoding."""
    if input_tokens is None:
        input_tokens = count_input(counter, kind, backend.model, body)
    output_tokens = (
        0 if kind == "embeddings" else max_output_tokens(body, backend, input_tokens) * int(body.get("n") or 1)
    )
    return Estimate(input_tokens, output_tokens, cost_usd(backend.pricing, input_tokens, output_tokens))
