"""Relaying a stream to the caller, and resuming it elsewhere when its backend fails mid-way.

Events are passed on one by one as they arrive. When the provider fails after bytes have reached
the caller, the request is resumed on the next target with the text already sent, or the stream
ends with an OpenAI-style error event and no `[DONE]`: never a hang (every wait is bounded by the
tier's timeouts) and never a clean end that hides a truncation. What each backend produced is
billed, also when the caller hangs up.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import aiohttp

from tierwise.api.tier import FailureKind
from tierwise.money import usd
from tierwise_sidecar.exchange import ClientGoneError, Exchange, Sink
from tierwise_sidecar.hotmetrics import FastHistogram
from tierwise_sidecar.sse import DONE_EVENT, Relay, StreamState, error_event
from tierwise_sidecar.upstream import Started, UpstreamError

if TYPE_CHECKING:
    from tierwise_sidecar.forward import Flight, ForwardStage


class Writer:
    """Writes a stream to the sink: notes the first byte, and tells a caller who hung up (or
    stopped reading) from a provider that failed."""

    def __init__(self, sink: Sink, first_byte: FastHistogram, labels: tuple[str, str], started: float) -> None:
        self.sink = sink
        self.first_byte = first_byte
        self.labels = labels
        self.started = started
        self.writing = False
        self._first = True

    async def write(self, data: bytes) -> None:
        self.writing = True
        try:
            await self.sink.write(data)
        finally:
            self.writing = False
        if self._first:
            self._first = False
            self.first_byte.observe(self.labels, time.monotonic() - self.started)


async def relay(fw: ForwardStage, flight: Flight, started: Started) -> None:
    """Send a started stream to the caller to its end, resuming it on another target if cut."""
    x = flight.x
    outcome, state = x.outcome, flight.state
    metrics = fw.metrics
    writer = Writer(x.sink, metrics.first_byte, (x.identity.namespace, outcome.tier or x.identity.tier), x.started)
    opening = True
    while True:
        cand = started.candidate
        seg = StreamState(chat=x.kind == "chat", strip_usage=not x.client_usage)
        try:
            failure = await _pump(fw, started, seg, x, writer, opening=opening)
        except ClientGoneError:
            outcome.segments.append(fw.measure(x, cand.backend, seg.usage, "".join(seg.text)))
            outcome.status = 499  # the caller hung up; what the provider produced is still billed
            return
        opening = False
        outcome.segments.append(fw.measure(x, cand.backend, seg.usage, "".join(seg.text)))
        if failure is None:
            if not x.resume_text:
                x.streamed = seg
            break
        fw.note_attempt(x, cand, str(failure.kind))
        outcome.failures.append((cand.backend.key, cand.endpoint, str(failure.kind)))
        state.last, state.detail = failure.kind, failure.detail
        out_of_time = fw.now() >= x.deadline
        if not out_of_time:
            fw.health.breaker(cand.backend, cand.endpoint).failure(fw.now())
            fw.gauge_circuits(cand.backend)
        x.resume_text += "".join(seg.text)
        resumed = None if out_of_time or seg.tool_calls else await _resume(fw, flight)
        if resumed is None:
            if out_of_time or seg.tool_calls:
                metrics.resumes.labels(outcome.tier or x.identity.tier, "error_event").inc()
            outcome.problem = f"stream interrupted: {failure.detail}"
            await x.sink.close(error_event(outcome.problem, "stream_interrupted"))
            outcome.status = 502
            return
        started = resumed
    closing = f": tierwise cost_usd={usd(outcome.usd)} attempts={outcome.attempts}\n\n".encode()
    await x.sink.close(closing + DONE_EVENT)


async def _pump(
    fw: ForwardStage, started: Started, seg: StreamState, x: Exchange, writer: Writer, *, opening: bool
) -> UpstreamError | None:
    """Relay one upstream stream to the caller; the failure that cut it, if any. `opening`: the
    caller's stream is opened here, once the first bytes are in hand, so a caller gone by then is
    billed for them like one gone mid-stream."""
    resp = started.response
    assert resp is not None
    feed = Relay(seg).feed
    key = started.candidate.backend.key
    in_flight = fw.health.in_flight
    in_flight[key] = in_flight.get(key, 0) + 1
    try:
        data = feed(started.first)
        if opening:
            # Outside the deadline below: writing the caller's headers is not the provider's time.
            await x.open_stream()
        async with asyncio.timeout(x.deadline - fw.now()):
            if data:
                await writer.write(data)
            async for chunk in resp.content.iter_any():
                data = feed(chunk)
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


async def _resume(fw: ForwardStage, flight: Flight) -> Started | None:
    x = flight.x
    tier = x.outcome.tier or x.identity.tier
    if not x.resumable:
        fw.metrics.resumes.labels(tier, "error_event").inc()
        return None
    started = await fw.resume(flight)
    fw.metrics.resumes.labels(tier, "resumed" if started is not None else "error_event").inc()
    return started
