"""The forward stage: send a request to the chosen backend and get an answer back, or fail over.

Order of tries: the routed backends of the tier (a sticky session's target first), each replica
in the session's rendezvous order; a target that fails before the first byte is retried with
jittered backoff when the failure is transient, then the next target is tried, then the tier's
fallback chain when the failure is one of the tier's triggers. All of that is invisible to the
caller. Once bytes have reached the caller (a stream), a failure is resumed on the next target
with the text already sent, or the stream ends with an OpenAI-style error event: never a hang
(every wait is bounded by the tier's timeouts) and never a silent truncation.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tierwise.api.tier import FailureKind, RoutingStrategy
from tierwise_sidecar.account import Outcome, Segment, final_headers, segment, served_headers, usd
from tierwise_sidecar.breaker import State
from tierwise_sidecar.errors import RATE_LIMIT, UPSTREAM, ApiError
from tierwise_sidecar.estimate import count_input, estimate_request
from tierwise_sidecar.identify import Identity
from tierwise_sidecar.metrics import Metrics
from tierwise_sidecar.route import Decision, order_backends, order_endpoints, pin_first
from tierwise_sidecar.runtime import BackendRoute, Health, Runtime, TierRoute
from tierwise_sidecar.sse import DONE_EVENT, Relay, StreamState, error_event
from tierwise_sidecar.sticky import Pin
from tierwise_sidecar.tokens import TokenCounter
from tierwise_sidecar.validate import Kind

PATHS: dict[Kind, str] = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}
# Worth another try on the same target: a blip, not a verdict on the target.
RETRYABLE = frozenset({FailureKind.SERVER_ERROR, FailureKind.CONNECTION_ERROR})
# Count against a target's circuit breaker (a provider's rate limit says nothing of its health).
UNHEALTHY = frozenset(
    {FailureKind.SERVER_ERROR, FailureKind.TIMEOUT, FailureKind.CONNECTION_ERROR, FailureKind.OVERLOADED}
)
CONTINUE_PROMPT = "Continue exactly where your previous message was cut off, without repeating anything."
MAX_ERROR_BODY = 64 * 1024
LAST_WRITE_SECONDS = 10.0


@dataclass(frozen=True)
class ForwardConfig:
    retries: int = 1
    backoff_base: float = 0.025
    backoff_cap: float = 0.25
    max_attempts: int = 6


class UpstreamError(Exception):
    def __init__(self, kind: FailureKind, detail: str, retry_after: str | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.retry_after = retry_after


class UpstreamRefusalError(Exception):
    """The backend refused the request itself (a 4xx): the caller's problem, passed on as is."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type


class ClientGoneError(Exception):
    """The caller hung up while a stream was being relayed."""


@dataclass(slots=True)
class Call:
    """One request on its way through the pipeline."""

    kind: Kind
    body: dict[str, Any]
    identity: Identity
    deadline: float
    input_tokens: int
    score: float | None
    started: float = 0.0
    counted_with: str = ""
    stream: bool = False
    client_usage: bool = False
    resume_text: str = ""
    # Rendered bodies by (model, resume text): retries and same-model backends reuse them.
    payloads: dict[tuple[str, str], bytes] = field(default_factory=dict)

    @property
    def resumable(self) -> bool:
        if (self.body.get("n") or 1) != 1:
            return False
        return self.kind == "chat" or (self.kind == "completions" and isinstance(self.body.get("prompt"), str))


@dataclass(frozen=True, slots=True)
class Candidate:
    tier: TierRoute
    backend: BackendRoute
    endpoint: str
    session_key: str | None


@dataclass(slots=True)
class PlanState:
    last: FailureKind | None = None
    detail: str = ""
    retry_after: str | None = None
    pinned: Pin | None = None


@dataclass(slots=True)
class Flight:
    """A request in progress: what was asked, what happened so far, and the targets left to try."""

    call: Call
    outcome: Outcome
    state: PlanState = field(default_factory=PlanState)
    plan: Iterator[Candidate] = field(default_factory=lambda: iter(()))


@dataclass(slots=True)
class Started:
    candidate: Candidate
    body: bytes = b""
    data: dict[str, Any] = field(default_factory=dict)
    response: aiohttp.ClientResponse | None = None
    first: bytes = b""


def _classify(status: int) -> FailureKind | None:
    if status == 429:
        return FailureKind.RATE_LIMITED
    if status in (503, 529):
        return FailureKind.OVERLOADED
    if status in (408, 504):
        return FailureKind.TIMEOUT
    if status >= 500 or status < 200 or 300 <= status < 400:
        return FailureKind.SERVER_ERROR
    return None


def render(call: Call, backend: BackendRoute, counter: TokenCounter) -> bytes:
    """The body sent to a backend: its model, usage asked for on streams, and a resume's context."""
    key = (backend.model, call.resume_text)
    cached = call.payloads.get(key)
    if cached is None:
        cached = call.payloads[key] = _render(call, backend, counter)
    return cached


def _render(call: Call, backend: BackendRoute, counter: TokenCounter) -> bytes:
    body = dict(call.body)
    body["model"] = backend.model
    if call.stream:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    if call.resume_text:
        if call.kind == "chat":
            body["messages"] = [
                *body["messages"],
                {"role": "assistant", "content": call.resume_text},
                {"role": "user", "content": CONTINUE_PROMPT},
            ]
        else:
            body["prompt"] = str(body["prompt"]) + call.resume_text
        sent = counter.count_text(backend.model, call.resume_text)
        for cap in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(cap), int):
                body[cap] = max(body[cap] - sent, 1)
    return json.dumps(body, separators=(",", ":")).encode()


def _text_of(data: dict[str, Any]) -> str:
    """The text of a whole answer's choices; whatever does not have the expected shape is none."""
    choices = data.get("choices")
    if not isinstance(choices, list):
        return ""
    parts = []
    for c in choices:
        if not isinstance(c, dict):
            continue
        msg = c.get("message")
        text = msg.get("content") if isinstance(msg, dict) else c.get("text")
        if isinstance(text, str):
            parts.append(text)
    return "".join(parts)


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """A body up to `cap` bytes, however it is chunked."""
    out = bytearray()
    while len(out) < cap:
        chunk = await resp.content.read(cap - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


class Forwarder:
    def __init__(
        self,
        health: Health,
        metrics: Metrics,
        counter: TokenCounter,
        config: ForwardConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.health = health
        self.metrics = metrics
        self.counter = counter
        self.config = config or ForwardConfig()
        self.rng = rng or random.Random()
        self.session: aiohttp.ClientSession | None = None
        self._turn = 0

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=10, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    # Deadlines are on the monotonic clock; calling it is cheaper than asking the running loop.
    now = staticmethod(time.monotonic)

    # ------------------------------------------------------------ choosing

    def decide(self, tier: TierRoute, call: Call, now: float) -> Decision:
        health = self.health

        def usable(b: BackendRoute) -> bool:
            return call.input_tokens < b.max_context and health.usable(b, now)

        score = call.score if tier.strategy is RoutingStrategy.COST_AWARE else None
        return order_backends(tier, score, health.in_flight, usable, self.rng)

    def plan(self, runtime: Runtime, call: Call, outcome: Outcome, state: PlanState) -> Iterator[Candidate]:
        """Every target worth a try, in order; moves to the next fallback tier only when the last
        failure is one the tier falls back on."""
        tier = runtime.tiers[call.identity.tier]
        chain = iter(runtime.tiers[call.identity.tier].fallback)
        first = True
        while True:
            now = self.now()
            decision = self.decide(tier, call, now)
            session_key = None
            if tier.sticky_ttl is not None and call.identity.session is not None:
                session_key = f"{tier.name}\0{call.identity.tenant or ''}\0{call.identity.session}"
                state.pinned = self.health.pins.get(session_key, now)
                if state.pinned is not None:
                    decision = pin_first(decision, state.pinned.backend)
            if first:
                outcome.route, outcome.score, first = decision.decision, decision.score, False
                if decision.score is not None:
                    self.metrics.child(self.metrics.route_score, tier.name).observe(decision.score)
            if not decision.order and state.last is None:
                state.last, state.detail = FailureKind.CIRCUIT_OPEN, f"no backend of tier {tier.name} is available"
            self._turn += 1
            for backend in decision.order:
                pinned = state.pinned.endpoint if state.pinned and state.pinned.backend == backend.name else None
                for endpoint in order_endpoints(
                    self.health.targets(backend), call.identity.session, self._turn, pinned
                ):
                    yield Candidate(tier, backend, endpoint, session_key)
            if state.last not in tier.triggers:
                return
            nxt = next(chain, None)
            if nxt is None:
                return
            self.metrics.fallbacks.labels(tier.name, nxt, str(state.last)).inc()
            tier = runtime.tiers[nxt]

    # ------------------------------------------------------------ one try

    async def attempt(self, cand: Candidate, call: Call) -> Started:
        assert self.session is not None
        t = cand.tier.timeouts
        remaining = call.deadline - self.now()
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if cand.backend.api_key:
            headers["Authorization"] = f"Bearer {cand.backend.api_key}"
        if call.stream:
            timeout = aiohttp.ClientTimeout(total=None, connect=t.connect, sock_read=t.first_byte)
        else:
            timeout = aiohttp.ClientTimeout(total=min(t.attempt, remaining), connect=t.connect)
        payload = render(call, cand.backend, self.counter)
        url = cand.endpoint + PATHS[call.kind]
        # A whole answer is bounded by aiohttp's total timeout; a stream's wait for its first byte
        # (aiohttp only bounds each read) by this one.
        guard = asyncio.timeout(remaining) if call.stream else nullcontext()
        try:
            async with guard:
                resp = await self.session.post(url, data=payload, headers=headers, timeout=timeout)
                try:
                    return await self._read_start(cand, call, resp)
                except BaseException:
                    resp.close()
                    raise
        except TimeoutError:
            raise UpstreamError(FailureKind.TIMEOUT, f"{cand.backend.key} did not answer in time") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise UpstreamError(FailureKind.CONNECTION_ERROR, f"{cand.backend.key}: {type(e).__name__}") from None

    async def _read_start(self, cand: Candidate, call: Call, resp: aiohttp.ClientResponse) -> Started:
        kind = _classify(resp.status)
        if kind is not None:
            resp.close()
            raise UpstreamError(kind, f"{cand.backend.key} answered {resp.status}", resp.headers.get("Retry-After"))
        if resp.status >= 400:
            body = await _read_capped(resp, MAX_ERROR_BODY)
            resp.close()
            raise UpstreamRefusalError(resp.status, body, resp.content_type)
        if call.stream:
            first = await resp.content.readany()
            if not first:
                raise UpstreamError(
                    FailureKind.CONNECTION_ERROR, f"{cand.backend.key} closed the stream before any byte"
                )
            return Started(cand, response=resp, first=first)
        body = await resp.read()
        resp.release()
        try:
            data = json.loads(body)
        except ValueError:
            raise UpstreamError(FailureKind.SERVER_ERROR, f"{cand.backend.key} answered with invalid JSON") from None
        if not isinstance(data, dict):
            raise UpstreamError(FailureKind.SERVER_ERROR, f"{cand.backend.key} answered with a non-object")
        return Started(cand, body=body, data=data)

    # ------------------------------------------------------------ failing over

    async def first_success(self, flight: Flight) -> Started:
        cfg = self.config
        call, outcome, state = flight.call, flight.outcome, flight.state
        for cand in flight.plan:
            for retry in range(cfg.retries + 1):
                if outcome.attempts >= cfg.max_attempts:
                    raise self.exhausted(state, outcome)
                if self.now() >= call.deadline:
                    # Out of time is the request's verdict, not the target's: no breaker counts it.
                    state.last, state.detail = FailureKind.TIMEOUT, "the request's total timeout passed"
                    raise self.exhausted(state, outcome)
                breaker = self.health.breaker(cand.backend, cand.endpoint)
                was = breaker.state
                if not breaker.acquire(self.now()):
                    state.last, state.detail = FailureKind.CIRCUIT_OPEN, f"circuit open for {cand.backend.key}"
                    break
                outcome.attempts += 1
                in_flight = self.health.in_flight
                key = cand.backend.key
                in_flight[key] = in_flight.get(key, 0) + 1
                try:
                    started = await self.attempt(cand, call)
                except UpstreamError as f:
                    state.last, state.detail, state.retry_after = f.kind, f.detail, f.retry_after
                    self._attempt(call, cand, str(f.kind))
                    if f.kind in UNHEALTHY:
                        breaker.failure(self.now())
                        if breaker.state is not was:
                            self._gauge_circuits(cand.backend)
                    else:
                        breaker.release()
                    delay = min(cfg.backoff_cap, cfg.backoff_base * 2**retry) * self.rng.random()
                    if f.kind in RETRYABLE and retry < cfg.retries and self.now() + delay < call.deadline:
                        await asyncio.sleep(delay)
                        continue
                    break
                except UpstreamRefusalError:
                    breaker.success()
                    self._attempt(call, cand, "client_error")
                    self._served_by(cand, call, outcome, state)
                    raise
                except BaseException:
                    breaker.release()
                    raise
                finally:
                    in_flight[key] -= 1
                breaker.success()
                if was is not State.CLOSED:
                    self._gauge_circuits(cand.backend)
                self._attempt(call, cand, "ok")
                self._served_by(cand, call, outcome, state)
                return started
        raise self.exhausted(state, outcome)

    def _served_by(self, cand: Candidate, call: Call, outcome: Outcome, state: PlanState) -> None:
        if outcome.backend is None:
            # The estimate is on the backend that answers, which routing and failover decided.
            prompt = self._prompt_tokens(cand.backend, call)
            outcome.estimate = estimate_request(self.counter, call.kind, call.body, cand.backend.spec, prompt)
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

    def _attempt(self, call: Call, cand: Candidate, result: str) -> None:
        labels = (call.identity.namespace, cand.tier.name, cand.backend.name, result)
        self.metrics.child(self.metrics.attempts, *labels).inc()

    def _gauge_circuits(self, backend: BackendRoute) -> None:
        self.metrics.open_circuits.labels(backend.tier, backend.name).set(self.health.open_targets(backend, self.now()))

    def exhausted(self, state: PlanState, outcome: Outcome) -> ApiError:
        """The answer when every target (and fallback) failed: the status says what kind."""
        detail = f"every backend failed after {outcome.attempts} attempt(s); last: {state.detail or 'none'}"
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

    # ------------------------------------------------------------ serving

    async def serve(self, request: web.Request, runtime: Runtime, call: Call, outcome: Outcome) -> web.StreamResponse:
        flight = Flight(call, outcome)
        flight.plan = self.plan(runtime, call, outcome, flight.state)
        try:
            started = await self.first_success(flight)
        except UpstreamRefusalError as p:
            outcome.status = p.status
            return web.Response(
                status=p.status, body=p.body, content_type=p.content_type, headers=served_headers(outcome)
            )
        if not call.stream:
            return self._whole(started, call, outcome)
        return await self._relay(request, flight, started)

    def _whole(self, started: Started, call: Call, outcome: Outcome) -> web.Response:
        usage = started.data.get("usage")
        text = "" if usage or call.kind == "embeddings" else _text_of(started.data)
        outcome.segments.append(self._segment(started.candidate.backend, usage, text, call))
        outcome.status = 200
        return web.Response(
            status=200, body=started.body, content_type="application/json", headers=final_headers(outcome)
        )

    def _segment(self, backend: BackendRoute, usage: Any, text: str, call: Call) -> Segment:
        """A backend's share, from its usage block or, without a usable one, counted here."""
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            return segment(backend, usage, 0, 0)
        completion = self.counter.count_text(backend.model, text) if text else 0
        return segment(backend, None, self._prompt_tokens(backend, call), completion)

    def _prompt_tokens(self, backend: BackendRoute, call: Call) -> int:
        """The request's prompt in the backend's encoding: the count made on arrival when the
        encodings agree (the usual case), else counted again."""
        counter = self.counter
        if counter.encoding(backend.model) is counter.encoding(call.counted_with) and not call.resume_text:
            return call.input_tokens
        return count_input(counter, call.kind, backend.model, call.body)

    async def _relay(self, request: web.Request, flight: Flight, started: Started) -> web.StreamResponse:
        call, outcome, state = flight.call, flight.outcome, flight.state
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **served_headers(outcome)}
        out = web.StreamResponse(status=200, headers=headers)
        await out.prepare(request)
        outcome.status = 200
        ttfb = self.metrics.child(self.metrics.first_byte, call.identity.namespace, outcome.tier or call.identity.tier)
        writer = _Writer(out, ttfb, call)
        while True:
            cand = started.candidate
            seg = StreamState(chat=call.kind == "chat", strip_usage=not call.client_usage)
            try:
                failure = await self._pump(started, seg, call, writer)
            except ClientGoneError:
                outcome.segments.append(self._segment(cand.backend, seg.usage, "".join(seg.text), call))
                outcome.status = 499  # the caller hung up; what the provider produced is still billed
                return out
            outcome.segments.append(self._segment(cand.backend, seg.usage, "".join(seg.text), call))
            if failure is None:
                break
            self._attempt(call, cand, str(failure.kind))
            state.last, state.detail = failure.kind, failure.detail
            out_of_time = self.now() >= call.deadline
            if not out_of_time:
                self.health.breaker(cand.backend, cand.endpoint).failure(self.now())
                self._gauge_circuits(cand.backend)
            call.resume_text += "".join(seg.text)
            resumed = None if out_of_time or seg.tool_calls else await self._resume(flight)
            if resumed is None:
                if out_of_time or seg.tool_calls:
                    self.metrics.resumes.labels(outcome.tier or call.identity.tier, "error_event").inc()
                await writer.last(error_event(f"stream interrupted: {failure.detail}", "stream_interrupted"))
                outcome.status = 502
                return out
            started = resumed
        closing = f": tierwise cost_usd={usd(outcome.usd)} attempts={outcome.attempts}\n\n".encode()
        await writer.last(closing + DONE_EVENT)
        return out

    async def _pump(self, started: Started, seg: StreamState, call: Call, writer: _Writer) -> UpstreamError | None:
        """Relay one upstream stream to the caller; the failure that cut it, if any."""
        resp = started.response
        assert resp is not None
        relay = Relay(seg)
        key = started.candidate.backend.key
        in_flight = self.health.in_flight
        in_flight[key] = in_flight.get(key, 0) + 1
        try:
            async with asyncio.timeout(call.deadline - self.now()):
                data = relay.feed(started.first)
                if data:
                    await writer.write(data)
                async for chunk in resp.content.iter_any():
                    data = relay.feed(chunk)
                    if data:
                        await writer.write(data)
                    if seg.error is not None:
                        break
        except TimeoutError:
            if writer.writing:
                # The deadline passed while the caller was not reading: its doing, not the provider's.
                resp.close()
                raise ClientGoneError() from None
            return UpstreamError(FailureKind.TIMEOUT, f"{key} stalled mid-stream")
        except ClientGoneError:
            resp.close()
            raise
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            return UpstreamError(FailureKind.CONNECTION_ERROR, f"{key}: {type(e).__name__}")
        finally:
            in_flight[key] -= 1
            resp.release()
        if seg.error is not None:
            return UpstreamError(FailureKind.SERVER_ERROR, str(seg.error.get("message") or "error event"))
        if not seg.complete:
            return UpstreamError(FailureKind.CONNECTION_ERROR, f"{key} ended the stream early")
        return None

    async def _resume(self, flight: Flight) -> Started | None:
        tier = flight.outcome.tier or flight.call.identity.tier
        if not flight.call.resumable:
            self.metrics.resumes.labels(tier, "error_event").inc()
            return None
        try:
            started = await self.first_success(flight)
        except (ApiError, UpstreamRefusalError):
            self.metrics.resumes.labels(tier, "error_event").inc()
            return None
        self.metrics.resumes.labels(tier, "resumed").inc()
        return started


class _Writer:
    """Writes a stream to the caller: notes the first byte, and tells a caller who hung up (or
    stopped reading) from a provider that failed."""

    def __init__(self, out: web.StreamResponse, first_byte: Any, call: Call) -> None:
        self.out = out
        self.first_byte = first_byte
        self.call = call
        self.writing = False
        self._first = True

    async def write(self, data: bytes) -> None:
        self.writing = True
        try:
            await self.out.write(data)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            raise ClientGoneError() from None
        finally:
            self.writing = False
        if self._first:
            self._first = False
            self.first_byte.observe(time.monotonic() - self.call.started)

    async def last(self, data: bytes) -> None:
        """The final bytes, bounded in time: a caller that stopped reading cannot hold the handler."""
        with suppress(ClientGoneError, TimeoutError):
            async with asyncio.timeout(LAST_WRITE_SECONDS):
                await self.write(data)
                await self.out.write_eof()
