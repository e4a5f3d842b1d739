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

__all__ = ["Asked", "Estimate", "EstimateStage", "cost_usd", "count_input", "estimate_request", "worst_case"]


# A request's own bounds on its output: tokens per choice (None: no cap), and choices.
Asked = tuple[int | None, int]


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


def asked(kind: str, body: Mapping[str, Any]) -> Asked:
    """What a request itself bounds its output by: its cap on tokens per choice (None: none) and
    its number of choices (0 for embeddings, which produce none). The same for every backend."""
    if kind == "embeddings":
        return None, 0
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    return (cap if isinstance(cap, int) and cap > 0 else None), int(body.get("n") or 1)


def max_output(max_context: int, input_tokens: int, bounds: Asked) -> int:
    """The most completion tokens a request may cost: its own cap (within what the context leaves,
    when it leaves any), else what the context leaves; times its choices."""
    cap, n = bounds
    room = max_context - input_tokens if max_context > input_tokens else 0
    if cap is None:
        return room * n
    return (cap if room == 0 or cap < room else room) * n


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


def worst_case(backend: BackendRoute, input_tokens: int, bounds: Asked) -> Estimate:
    """The most a request may cost on a backend, its prompt already counted in that backend's encoding."""
    output = max_output(backend.max_context, input_tokens, bounds)
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
    output = max_output(backend.capabilities.max_context_tokens, input_tokens, asked(kind, body))
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
    if enc.name == x.counted_in:
        return x.input_tokens
    n = x.prompt_counts.get(enc.name)
    if n is None:
        n = x.prompt_counts[enc.name] = count_input(counter, x.kind, backend.model, x.body)
    return n


def estimate_on(x: Exchange, backend: BackendRoute, counter: TokenCounter) -> Estimate:
    """The worst case on one backend, remembered for the request."""
    est = x.estimates.get(backend.key)
    if est is None:
        est = x.estimates[backend.key] = worst_case(backend, prompt_tokens(x, backend, counter), x.bounds)
    return est


def enter_tier(x: Exchange, tier: TierRoute, counter: TokenCounter) -> None:
    """Count, bound and price the request for the tier it is to be served by."""
    first = tier.by_price[0]
    x.counted_in = counter.encoding(first.model).name
    x.bounds = asked(x.kind, x.body)
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
    estimates = x.estimates
    most: Estimate | None = None
    # A plain loop: run for every request a budget counts, where a comprehension and a keyed max
    # cost more than the comparison.
    for b in tier.backends:
        e = estimates[b.key]
        if e.input_tokens < b.max_context and (most is None or (e.micros, e.tokens) > (most.micros, most.tokens)):
            most = e
    if most is None:
        return max(estimates.values(), key=lambda e: (e.micros, e.tokens))
    return most


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
