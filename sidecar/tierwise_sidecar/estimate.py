"""The estimate stage: what a request may cost, before any backend is called.

Prompt tokens are counted with tiktoken (per-message counts cached by content hash); the most the
request may produce is its own cap, else what the backend's context leaves. Both priced at each
backend's rates give the worst case on every backend of the tier, which the budget stage reserves
and the account stage reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tierwise.api.tier import Backend
from tierwise.money import Rates, cost_micros, cost_usd
from tierwise.values import value
from tierwise_sidecar.errors import ApiError
from tierwise_sidecar.runtime import BackendRoute, TierRoute
from tierwise_sidecar.tokens import TOKENS, TokenCounter

if TYPE_CHECKING:
    from tierwise_sidecar.exchange import Exchange, Reply
    from tierwise_sidecar.runtime import Runtime
    from tierwise_sidecar.state import SharedState

__all__ = ["Estimate", "EstimateStage", "cost_usd", "count_input", "estimate_request", "worst_case"]


@value
class Estimate:
    """Tokens and cost of a request before it is sent; output is the most the request may produce."""

    input_tokens: int
    output_tokens: int
    usd: float
    micros: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _max_output(body: Mapping[str, Any], max_context: int, input_tokens: int) -> int:
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    room = max(max_context - input_tokens, 0)
    if isinstance(cap, int) and cap > 0:
        return min(cap, room) if room else cap
    return room


def max_output_tokens(body: Mapping[str, Any], backend: Backend, input_tokens: int) -> int:
    """The most completion tokens the request may cost: its own cap, else what the context leaves."""
    return _max_output(body, backend.capabilities.max_context_tokens, input_tokens)


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


def worst_case(kind: str, body: Mapping[str, Any], backend: BackendRoute, input_tokens: int) -> Estimate:
    """The most a request may cost on a backend, its prompt already counted in that backend's encoding."""
    output = (
        0 if kind == "embeddings" else _max_output(body, backend.max_context, input_tokens) * int(body.get("n") or 1)
    )
    return Estimate(
        input_tokens,
        output,
        cost_usd(backend.pricing, input_tokens, output),
        cost_micros(backend.rates, input_tokens, output, up=True),
    )


def estimate_request(
    counter: TokenCounter, kind: str, body: Mapping[str, Any], backend: Backend, input_tokens: int | None = None
) -> Estimate:
    """Estimate of any request kind on a backend spec; embeddings produce no output tokens. Pass
    `input_tokens` when the prompt was already counted with this backend's encoding."""
    if input_tokens is None:
        input_tokens = count_input(counter, kind, backend.model, body)
    output = 0 if kind == "embeddings" else max_output_tokens(body, backend, input_tokens) * int(body.get("n") or 1)
    return Estimate(
        input_tokens,
        output,
        cost_usd(backend.pricing, input_tokens, output),
        cost_micros(Rates.of(backend.pricing), input_tokens, output, up=True),
    )


def prompt_tokens(x: Exchange, backend: BackendRoute, counter: TokenCounter) -> int:
    """The request's prompt in a backend's encoding: the count made on arrival when the encodings
    agree (the usual case), else counted again, once per encoding."""
    enc = counter.encoding(backend.model)
    if enc is counter.encoding(x.counted_with):
        return x.input_tokens
    n = x.prompt_counts.get(enc.name)
    if n is None:
        n = x.prompt_counts[enc.name] = count_input(counter, x.kind, backend.model, x.body)
    return n


def estimate_on(x: Exchange, backend: BackendRoute, counter: TokenCounter) -> Estimate:
    """The worst case on one backend, remembered for the request."""
    est = x.estimates.get(backend.key)
    if est is None:
        est = x.estimates[backend.key] = worst_case(x.kind, x.body, backend, prompt_tokens(x, backend, counter))
    return est


def enter_tier(x: Exchange, tier: TierRoute, counter: TokenCounter) -> None:
    """Count, bound and price the request for the tier it is to be served by."""
    first = tier.by_price[0]
    x.counted_with = first.model
    x.prompt_counts.clear()
    x.input_tokens = count_input(counter, x.kind, first.model, x.body)
    if x.input_tokens >= tier.max_context:
        raise ApiError(
            400,
            f"the prompt has {x.input_tokens} tokens, more than any model of tier {tier.name} accepts",
            "invalid_request_error",
            "context_length_exceeded",
            param="messages" if x.kind == "chat" else "prompt",
        )
    x.deadline = x.started + tier.timeouts.total
    x.estimates = {}
    for b in tier.backends:
        estimate_on(x, b, counter)


def reserve_amount(x: Exchange, tier: TierRoute) -> Estimate:
    """What a budget holds for the request: the most it may cost on any backend of its tier that can
    take its prompt (the one that serves is chosen later, by routing and failover)."""
    fits = [x.estimates[b.key] for b in tier.backends if x.estimates[b.key].input_tokens < b.max_context]
    return max(fits or x.estimates.values(), key=lambda e: (e.micros, e.tokens))


class EstimateStage:
    name = "estimate"

    def __init__(self, counter: TokenCounter) -> None:
        self.counter = counter

    async def enter(self, x: Exchange) -> Reply | None:
        tier = x.runtime.tiers[x.identity.tier]
        enter_tier(x, tier, self.counter)
        x.stream = bool(x.body.get("stream")) and x.kind != "embeddings"
        options = x.body.get("stream_options")
        x.client_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        x.valid = True
        return None

    async def leave(self, x: Exchange) -> None:
        return None


def build(runtime: Runtime, state: SharedState) -> EstimateStage:
    return EstimateStage(state.get(TOKENS))
