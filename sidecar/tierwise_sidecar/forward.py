"""The forward stage: send a request to the chosen backend and get an answer back, or fail over.

Order of tries: the routed backends of the tier (a sticky session's target first), each replica
in the session's rendezvous order; a target that fails before the first byte is retried once with
jittered backoff when the failure is a blip (a 500/502 or a connection error; not a 503, a 504 or
a rate limit, which say the target is busy), then the next target is tried, then the tier's
fallback chain when the failure is one of the tier's triggers. All of that is invisible to the
caller. A stream that fails after its first byte is resumed on the next target (streaming.py).
This is the terminal stage: it answers every request that reaches it, into the exchange's sink.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import aiohttp

from tierwise.api.tier import FailureKind
from tierwise_sidecar.account import Segment, segment
from tierwise_sidecar.breaker import State
from tierwise_sidecar.cache.entry import replay_events
from tierwise_sidecar.config import ForwardConfig
from tierwise_sidecar.errors import RATE_LIMIT, UPSTREAM, ApiError
from tierwise_sidecar.estimate import estimate_on, prompt_tokens
from tierwise_sidecar.exchange import ANSWERED, ClientGoneError, Exchange, Reply
from tierwise_sidecar.metrics import METRICS, Metrics
from tierwise_sidecar.route import RNG, decide, order_endpoints, pin_first
from tierwise_sidecar.runtime import HEALTH, BackendRoute, Health, Runtime
from tierwise_sidecar.state import SharedState
from tierwise_sidecar.sticky import Pin
from tierwise_sidecar.streaming import relay
from tierwise_sidecar.tokens import TOKENS, TokenCounter
from tierwise_sidecar.upstream import (
    AT_CAPACITY,
    CONTINUE_PROMPT,
    HTTP,
    Candidate,
    Started,
    UpstreamError,
    UpstreamRefusalError,
    attempt,
    render,
    text_of,
)

# Worth another try on the same target: a blip, not a verdict on the target.
RETRYABLE = frozenset({FailureKind.SERVER_ERROR, FailureKind.CONNECTION_ERROR})
# Count against a target's circuit breaker (a provider's rate limit says nothing of its health).
UNHEALTHY = frozenset(
    {FailureKind.SERVER_ERROR, FailureKind.TIMEOUT, FailureKind.CONNECTION_ERROR, FailureKind.OVERLOADED}
)
# Shown as a try's result when a budget could not cover a costlier target (a fallback, a resume).
OVER_BUDGET = "over_budget"


@dataclass(slots=True)
class PlanState:
    last: FailureKind | None = None
    detail: str = ""
    retry_after: str | None = None
    pinned: Pin | None = None


@dataclass(slots=True)
class Flight:
    """A request being forwarded: what happened so far, and the targets left to try."""

    x: Exchange
    state: PlanState
    plan: Iterator[Candidate]


def exhausted(state: PlanState, attempts: int) -> ApiError:
    """The answer when every target (and fallback) failed: the status says what kind."""
    detail = f"every backend failed after {attempts} attempt(s); last: {state.detail or 'none'}"
    kind = state.last
    if kind is FailureKind.TIMEOUT:
        return ApiError(504, detail, UPSTREAM, "upstream_timeout")
    if kind is FailureKind.RATE_LIMITED:
        return ApiError(
            429, detail, RATE_LIMIT, "upstream_rate_limited", headers={"Retry-After": state.retry_after or "1"}
        )
    if kind in (FailureKind.OVERLOADED, FailureKind.CIRCUIT_OPEN):
        return ApiError(503, detail, UPSTREAM, "upstream_unavailable", headers={"Retry-After": "1"})
    return ApiError(502, detail, UPSTREAM, "upstream_failed")


class ForwardStage:
    name = "forward"

    def __init__(
        self,
        health: Health,
        metrics: Metrics,
        counter: TokenCounter,
        session: Callable[[], aiohttp.ClientSession],
        *,
        config: ForwardConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.health = health
        self.metrics = metrics
        self.counter = counter
        self.session = session
        self.config = config or ForwardConfig()
        self.rng = rng or random.Random()
        self._turn = 0

    # Deadlines are on the monotonic clock; calling it is cheaper than asking the running loop.
    now = staticmethod(time.monotonic)

    # ------------------------------------------------------------ choosing

    def plan(self, x: Exchange, state: PlanState) -> Iterator[Candidate]:
        """Every target worth a try, in order; moves to the next fallback tier only when the last
        failure is one the tier falls back on."""
        runtime, outcome = x.runtime, x.outcome
        tier = runtime.tiers[x.identity.tier]
        chain = iter(tier.fallback)
        first = True
        while True:
            now = self.now()
            decision = (
                x.decision
                if first and x.decision is not None
                else decide(tier, x.input_tokens, x.score, self.health, rng=self.rng, now=now)
            )
            session_key = None
            if tier.sticky_ttl is not None and x.identity.session is not None:
                session_key = f"{tier.name}\0{x.identity.tenant or ''}\0{x.identity.session}"
                state.pinned = self.health.pins.get(session_key, now)
                if state.pinned is not None:
                    decision = pin_first(decision, state.pinned.backend)
            if first:
                outcome.route, outcome.score, first = decision.decision, decision.score, False
            if not decision.order and state.last is None:
                state.last, state.detail = FailureKind.CIRCUIT_OPEN, f"no backend of tier {tier.name} is available"
            self._turn += 1
            for backend in decision.order:
                pinned = state.pinned.endpoint if state.pinned and state.pinned.backend == backend.name else None
                for endpoint in order_endpoints(self.health.targets(backend), x.identity.session, self._turn, pinned):
                    yield Candidate(tier, backend, endpoint, session_key)
            if state.last not in tier.triggers:
                return
            nxt = next(chain, None)
            if nxt is None:
                return
            self.metrics.fallbacks.labels(tier.name, nxt, str(state.last)).inc()
            tier = runtime.tiers[nxt]

    # ------------------------------------------------------------ failing over

    def _beyond_held(self, x: Exchange, backend: BackendRoute) -> tuple[int, int] | None:
        """What the request may cost in all on this backend (with what it used so far, and a
        resume's longer prompt) when that is more than its budgets hold; None when they hold enough
        or none counts it. Only then is a budget asked for more."""
        if x.extend is None:
            return None
        est = estimate_on(x, backend, self.counter)
        micros, tokens = est.micros, est.tokens
        if x.resume_text:
            extra = self.counter.count_text(backend.model, x.resume_text + CONTINUE_PROMPT) + 8
            micros += -(-extra * backend.rates.input // 1_000_000)
            tokens += extra
        o = x.outcome
        micros, tokens = o.micros + micros, o.tokens + tokens
        held_micros, held_tokens = x.held
        return None if micros <= held_micros and tokens <= held_tokens else (micros, tokens)

    async def first_success(self, flight: Flight) -> Started:
        cfg = self.config
        x, state = flight.x, flight.state
        outcome = x.outcome
        for cand in flight.plan:
            more = self._beyond_held(x, cand.backend)
            if more is not None and x.extend is not None and not await x.extend(x, *more):
                state.last, state.detail = FailureKind.SERVER_ERROR, f"{cand.backend.key} is over the budget left"
                outcome.failures.append((cand.backend.key, cand.endpoint, OVER_BUDGET))
                continue
            retry = 0
            while True:
                # A try a target at capacity turned away and that waited its turn again is not a
                # failed attempt: the room bounds those (MAX_REQUEUES, the wait, the deadline).
                if outcome.attempts - outcome.requeued >= cfg.max_attempts:
                    raise exhausted(state, outcome.attempts)
                if self.now() >= x.deadline:
                    # Out of time is the request's verdict, not the target's: no breaker counts it.
                    state.last, state.detail = FailureKind.TIMEOUT, "the request's total timeout passed"
                    raise exhausted(state, outcome.attempts)
                started = await self._try(cand, x, state)
                if started is not None:
                    return started
                if state.last in AT_CAPACITY and x.gate is not None and await x.gate.requeue(cand):
                    outcome.requeued += 1
                    continue  # the target was over its capacity: a slot of it was waited for again
                delay = min(cfg.backoff_cap, cfg.backoff_base * 2**retry) * self.rng.random()
                if state.last in RETRYABLE and retry < cfg.retries and self.now() + delay < x.deadline:
                    retry += 1
                    await asyncio.sleep(delay)
                    continue
                break
        raise exhausted(state, outcome.attempts)

    async def _try(self, cand: Candidate, x: Exchange, state: PlanState) -> Started | None:
        """One try on one target, its breaker and load counts kept; None when it failed (`state`
        says how, CircuitOpen when the breaker let nothing through)."""
        gate = x.gate
        if gate is not None and not (gate.to_now(cand) or await gate.to(cand)):
            state.last, state.detail = FailureKind.OVERLOADED, f"no slot for {cand.backend.key} in time"
            return None
        breaker = self.health.breaker(cand.backend, cand.endpoint)
        was = breaker.state
        if not breaker.acquire(self.now()):
            state.last, state.detail = FailureKind.CIRCUIT_OPEN, f"circuit open for {cand.backend.key}"
            return None
        x.outcome.attempts += 1
        in_flight = self.health.in_flight
        key = cand.backend.key
        in_flight[key] = in_flight.get(key, 0) + 1
        t0 = self.now()
        try:
            payload = render(x, cand.backend, self.counter)
            started = await attempt(self.session(), cand, x, payload, x.deadline - self.now())
        except UpstreamError as f:
            state.last, state.detail, state.retry_after = f.kind, f.detail, f.retry_after
            if gate is not None:
                gate.observe(cand, self.now() - t0, None, f.kind)
            self.note_attempt(x, cand, str(f.kind))
            x.outcome.failures.append((key, cand.endpoint, str(f.kind)))
            if f.kind in UNHEALTHY:
                breaker.failure(self.now())
                if breaker.state is not was:
                    self.gauge_circuits(cand.backend)
            else:
                breaker.release()
            return None
        except UpstreamRefusalError:
            breaker.success()
            self.note_attempt(x, cand, "client_error")
            self._served_by(cand, x, state)
            raise
        except BaseException:
            breaker.release()
            raise
        finally:
            in_flight[key] -= 1
        breaker.success()
        if gate is not None:
            gate.observe(cand, self.now() - t0, started, None)
        if was is not State.CLOSED:
            self.gauge_circuits(cand.backend)
        self.note_attempt(x, cand, "ok")
        labels = (x.identity.namespace, cand.tier.name, cand.backend.name)
        self.metrics.backend_first_byte.observe(labels, self.now() - t0)
        x.outcome.served_since = t0
        self._served_by(cand, x, state)
        return started

    def _served_by(self, cand: Candidate, x: Exchange, state: PlanState) -> None:
        outcome = x.outcome
        if outcome.backend is None:
            # The estimate reported is on the backend that answers, which routing and failover decided.
            outcome.estimate = estimate_on(x, cand.backend, self.counter)
        outcome.tier, outcome.backend = cand.tier.name, cand.backend
        if cand.session_key is not None and cand.tier.sticky_ttl is not None:
            moved = state.pinned is not None and (state.pinned.backend, state.pinned.endpoint) != (
                cand.backend.name,
                cand.endpoint,
            )
            if moved:
                self.metrics.session_moves.labels(cand.tier.name).inc()
            now = self.now()
            self.health.pins.put(cand.session_key, Pin(cand.backend.name, cand.endpoint, now + cand.tier.sticky_ttl))
            state.pinned = self.health.pins.get(cand.session_key, now)

    def note_attempt(self, x: Exchange, cand: Candidate, result: str) -> None:
        labels = (x.identity.namespace, cand.tier.name, cand.backend.name, result)
        self.metrics.attempts.inc(labels)

    def gauge_circuits(self, backend: BackendRoute) -> None:
        self.metrics.open_circuits.labels(backend.tier, backend.name).set(self.health.open_targets(backend, self.now()))

    def prompt_tokens(self, x: Exchange, backend: BackendRoute) -> int:
        return prompt_tokens(x, backend, self.counter)

    async def resume(self, flight: Flight) -> Started | None:
        """The next target for a stream cut mid-way, or None when none is left (or affordable)."""
        try:
            return await self.first_success(flight)
        except (ApiError, UpstreamRefusalError):
            return None

    # ------------------------------------------------------------ serving

    async def enter(self, x: Exchange) -> Reply | None:
        self.metrics.in_flight.inc((x.identity.tier,))
        state = PlanState()
        flight = Flight(x, state, self.plan(x, state))
        try:
            started = await self.first_success(flight)
        except UpstreamRefusalError as p:
            return Reply(p.status, p.body, content_type=p.content_type)
        if not x.stream:
            reply = self._whole(started, x)
            if x.unstreamed:
                return await self._as_stream(x, started)
            return reply
        await relay(self, flight, started)
        return None

    async def leave(self, x: Exchange) -> None:
        self.metrics.in_flight.inc((x.identity.tier,), -1)

    def _whole(self, started: Started, x: Exchange) -> Reply:
        usage = started.data.get("usage")
        text = "" if _has_usage(usage) or x.kind == "embeddings" else text_of(started.data)
        x.outcome.segments.append(self.measure(x, started.candidate.backend, usage, text))
        x.served = started.data
        return Reply(200, started.body)

    async def _as_stream(self, x: Exchange, started: Started) -> Reply:
        """A whole answer to a request that asked for a stream (degradation turned streaming off),
        replayed to the caller as the stream it asked for."""
        events = replay_events(x.kind, started.data, x.client_usage)
        try:
            await x.open_stream()
            for event in events[:-1]:
                await x.sink.write(event)
        except ClientGoneError:
            x.outcome.status = 499  # the answer was billed whole (_whole) before the replay
            return ANSWERED
        await x.sink.close(events[-1])
        return ANSWERED

    def measure(self, x: Exchange, backend: BackendRoute, usage: object, text: str) -> Segment:
        """A backend's share, from its usage block or, without a usable one, counted here."""
        if _has_usage(usage):
            assert isinstance(usage, dict)
            return segment(backend, usage, 0, 0)
        completion = self.counter.count_text(backend.model, text) if text else 0
        return segment(backend, None, self.prompt_tokens(x, backend), completion)


def _has_usage(usage: object) -> bool:
    return isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int)


def build(runtime: Runtime, state: SharedState) -> ForwardStage:
    return ForwardStage(state.get(HEALTH), state.get(METRICS), state.get(TOKENS), state.get(HTTP).session,
                        config=state.config.forward, rng=state.get(RNG))  # fmt: skip
