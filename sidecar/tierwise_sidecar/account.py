"""The account stage: what a request actually used and cost, as headers, metrics and a log line.

Usage comes from the provider's usage block; when a provider sends none (or a stream was cut
before it), prompt tokens are the estimate's count and completion tokens are counted from the
text with tiktoken. A request served in pieces (a stream resumed elsewhere) is one segment per
backend, each priced at its own backend's rates. Every response header of the gateway is rendered
here, whichever stage answered.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from tierwise.money import cost_micros, cost_usd, usd
from tierwise.values import value
from tierwise_sidecar.endpoints import host_port
from tierwise_sidecar.estimate import Estimate
from tierwise_sidecar.metrics import METRICS, Metrics
from tierwise_sidecar.recording import Recorder
from tierwise_sidecar.runtime import BackendRoute

if TYPE_CHECKING:
    from tierwise_sidecar.exchange import Exchange, Reply
    from tierwise_sidecar.runtime import Runtime
    from tierwise_sidecar.state import SharedState

log = logging.getLogger("tierwise.sidecar")

H_TIER = "x-tierwise-tier"
H_BACKEND = "x-tierwise-backend"
H_MODEL = "x-tierwise-model"
H_ROUTE = "x-tierwise-route"
H_SCORE = "x-tierwise-route-score"
H_ESTIMATE = "x-tierwise-estimated-cost-usd"
H_COST = "x-tierwise-cost-usd"
H_TOKENS = "x-tierwise-tokens"
H_ATTEMPTS = "x-tierwise-attempts"
H_FALLBACK = "x-tierwise-fallback-from"
H_SUBSTITUTED = "x-tierwise-model-substituted"
H_PROMOTED = "x-tierwise-promoted-from"
H_STEERED = "x-tierwise-steered-from"
# The cost of an answer no backend was paid for (a cache hit).
NO_COST = usd(0.0)
# A header value carries printable ASCII; anything else in a model name is percent-encoded.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
H_BUDGET_REMAINING_USD = "x-tierwise-budget-remaining-usd"
H_BUDGET_REMAINING_TOKENS = "x-tierwise-budget-remaining-tokens"
H_BUDGET_STATE = "x-tierwise-budget-state"
H_BUDGET_NOTICE = "x-tierwise-budget-notice"
H_DOWNGRADED = "x-tierwise-downgraded-from"
H_CACHE = "x-tierwise-cache"


@value
class Segment:
    backend: BackendRoute
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    usd: float
    micros: int = 0


def segment(backend: BackendRoute, usage: dict[str, Any] | None, input_tokens: int, counted_output: int) -> Segment:
    """A backend's share of a request, from its usage block (parsed JSON) or, without one, from
    our counts. Checked against dict, not Mapping: an ABC's isinstance costs several times more."""
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        prompt = usage["prompt_tokens"]
        completion = _count(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details")
        cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    else:
        prompt, completion, cached = input_tokens, counted_output, 0
    prompt = max(prompt, 0)
    return Segment(
        backend,
        prompt,
        completion,
        cached,
        cost_usd(backend.pricing, prompt, completion, cached),
        cost_micros(backend.rates, prompt, completion, cached),
    )


def _count(value: object) -> int:
    return value if isinstance(value, int) and value > 0 else 0


@dataclass(slots=True)
class Outcome:
    """What happened to one request, filled in as it goes."""

    estimate: Estimate | None = None
    route: str | None = None
    score: float | None = None
    tier: str | None = None
    backend: BackendRoute | None = None
    attempts: int = 0
    # Tries a target at capacity turned away that waited for a slot again (admission).
    requeued: int = 0
    status: int = 0
    segments: list[Segment] = field(default_factory=list)
    # Each failed try: (backend key, endpoint, failure kind), for the log line of a failed request.
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    # Why a request that reached a backend ended without a whole answer (a stream cut, say).
    problem: str | None = None
    # When the try that answered started (monotonic): the serving backend's own latency is
    # measured from there, not from the request's start (a failover before it is not its time).
    served_since: float = 0.0
    # Answered from the cache: no backend, nothing spent.
    cached: bool = False

    # Sums by plain loops: a request has one segment or a few, and these are read several times
    # per request, where a generator costs more than the sum itself.
    @property
    def usd(self) -> float:
        total = 0.0
        for s in self.segments:
            total += s.usd
        return total

    @property
    def micros(self) -> int:
        total = 0
        for s in self.segments:
            total += s.micros
        return total

    @property
    def tokens(self) -> int:
        total = 0
        for s in self.segments:
            total += s.input_tokens + s.output_tokens
        return total


def render_headers(x: Exchange, final: bool) -> dict[str, str]:
    """Every header the gateway adds to an answer. `final`: the whole answer is known (not a
    stream's start), so the actual cost can be told. Run for every answer: the stages' notes write
    their headers straight into the one dict, and a cost and its tokens are summed in one pass."""
    o = x.outcome
    h = {H_ATTEMPTS: str(o.attempts)}
    tier = o.tier
    if tier is not None:
        h[H_TIER] = tier
        if tier != x.identity.tier:
            h[H_FALLBACK] = x.identity.tier
    backend = o.backend
    if backend is not None:
        h[H_BACKEND] = backend.name
        h[H_MODEL] = backend.model
    if o.route is not None:
        h[H_ROUTE] = o.route
    if o.score is not None:
        h[H_SCORE] = f"{o.score:.3f}"
    if o.estimate is not None:
        h[H_ESTIMATE] = usd(o.estimate.usd)
    if x.steered is not None:
        h[H_PROMOTED if x.steered[1] == "promoted" else H_STEERED] = x.steered[0]
    if x.identity.substituted is not None:
        h[H_SUBSTITUTED] = quote(x.identity.substituted, safe=_HEADER_SAFE)
    if x.budget is not None:
        x.budget.write_headers(h)
    if x.cache is not None:
        h[H_CACHE] = x.cache.outcome
    if x.admission is not None:
        x.admission.write_headers(h)
    if not final:
        return h
    if o.cached:
        h[H_COST] = NO_COST
    if o.segments:
        # Summed in the order Outcome.usd sums them: the same float.
        cost = 0.0
        prompt = completion = 0
        for s in o.segments:
            cost += s.usd
            prompt += s.input_tokens
            completion += s.output_tokens
        h[H_COST] = usd(cost)
        h[H_TOKENS] = f"{prompt}/{completion}"
    return h


def failure_line(x: Exchange, duration: float) -> str:
    """One line for a request that failed upstream: tier, targets tried and why; no key, no prompt."""
    o = x.outcome
    tried = ",".join(f"{key}@{host_port(endpoint)}={kind}" for key, endpoint, kind in o.failures) or "none"
    parts = [
        f"status={o.status}",
        f"namespace={x.identity.namespace}",
        f"tier={x.identity.tier}",
        f"served_by={o.tier}/{o.backend.name}" if o.backend is not None else "served_by=none",
        f"attempts={o.attempts}",
        f"tried={tried}",
        f"duration_ms={duration * 1000:.0f}",
    ]
    if o.problem:
        parts.append(f"problem={o.problem!r}")
    if x.error is not None:
        parts.append(f"code={x.error.code}")
    return "request failed upstream: " + " ".join(parts)


def _failed_upstream(x: Exchange) -> bool:
    return x.outcome.problem is not None or (x.error is not None and x.error.code.startswith("upstream_"))


class AccountStage:
    """First in, last out: it sees every request, whatever stage answered it."""

    name = "account"

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.recorder = Recorder(metrics)

    async def enter(self, x: Exchange) -> Reply | None:
        return None

    async def leave(self, x: Exchange) -> None:
        metrics = self.metrics
        namespace = x.runtime.namespace
        duration = time.monotonic() - x.started
        if not x.valid:
            code = x.error.code if x.error is not None else "internal_error"
            metrics.invalid.inc((namespace, code))
            return
        self.recorder.record(namespace, x, duration)
        if _failed_upstream(x):
            log.warning("%s", failure_line(x, duration))
        elif x.error is not None:
            log.info("request refused: status=%d namespace=%s tier=%s code=%s: %s", x.outcome.status, namespace,
                     x.identity.tier, x.error.code, x.error.message)  # fmt: skip


def build(runtime: Runtime, state: SharedState) -> AccountStage:
    return AccountStage(state.get(METRICS))
