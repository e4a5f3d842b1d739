"""One request on its way through the pipeline, and the sink its answer goes to.

The Exchange is what every stage reads and fills in: the request as it arrived, who sent it, what
it may cost, what happened upstream. The answer is written to a Sink, which is not tied to HTTP:
the same chain serves an HTTP request (HttpSink), a batch line or a cache replay (BufferSink).
Response headers are rendered in one place, the account module, whichever stage answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tierwise_sidecar.account import Outcome, render_headers
from tierwise_sidecar.errors import ApiError
from tierwise_sidecar.estimate import Asked, Estimate
from tierwise_sidecar.identify import Identity, Priority
from tierwise_sidecar.runtime import Runtime
from tierwise_sidecar.validate import Kind

if TYPE_CHECKING:
    from tierwise_sidecar.admission.stage import AdmissionNote, Gate
    from tierwise_sidecar.budgets.note import BudgetNote
    from tierwise_sidecar.cache.stage import CacheNote
    from tierwise_sidecar.route import Decision
    from tierwise_sidecar.sse import StreamState


class ClientGoneError(Exception):
    """The caller hung up (or stopped reading) while its answer was being written."""


class Sink(Protocol):
    """Where an answer goes: a whole body, or a stream opened once and written piece by piece."""

    async def whole(self, status: int, headers: Mapping[str, str], body: bytes, content_type: str) -> None: ...

    async def open(self, status: int, headers: Mapping[str, str]) -> None: ...

    async def write(self, data: bytes) -> None:
        """Raises ClientGoneError when nobody is reading any more."""

    async def close(self, last: bytes) -> None:
        """The final bytes of a stream, bounded in time; never raises."""

    def connected(self) -> bool:
        """Is somebody still waiting for the answer? (Asked while a request waits for a slot.)"""


@dataclass(slots=True)
class Reply:
    """An answer a stage gives itself instead of calling a backend (a refusal, a cache hit)."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    @classmethod
    def of_error(cls, e: ApiError) -> Reply:
        return cls(e.status, e.body(), e.headers)


# What a stage returns when it wrote its answer to the sink itself (a stream replayed from cache).
ANSWERED = Reply(200, b"")


@dataclass(slots=True)
class BufferSink:
    """Keeps the answer in memory: a batch line, a replay, a test without a socket."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    content_type: str = ""
    closed: bool = False

    async def whole(self, status: int, headers: Mapping[str, str], body: bytes, content_type: str) -> None:
        self.status, self.headers, self.content_type = status, dict(headers), content_type
        self.chunks.append(body)
        self.closed = True

    async def open(self, status: int, headers: Mapping[str, str]) -> None:
        self.status, self.headers, self.content_type = status, dict(headers), "text/event-stream"

    async def write(self, data: bytes) -> None:
        self.chunks.append(data)

    async def close(self, last: bytes) -> None:
        self.chunks.append(last)
        self.closed = True

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def connected(self) -> bool:
        return True


@dataclass(slots=True, eq=False)
class Exchange:
    kind: Kind
    raw: bytes
    headers: Mapping[str, str]
    runtime: Runtime
    sink: Sink
    started: float
    outcome: Outcome
    identity: Identity
    body: dict[str, Any] = field(default_factory=dict)
    # Set once the request passed validation and identification: a refusal after that point is a
    # policy decision about a well-formed request, not bad input.
    valid: bool = False
    deadline: float = 0.0
    stream: bool = False
    client_usage: bool = False
    # Prompt tokens, counted with the encoding named `counted_in` (the tier's cheapest backend's).
    input_tokens: int = 0
    counted_in: str = ""
    # The request's own bounds on its output (estimate.asked): the same on every backend.
    bounds: Asked = (None, 1)
    # The worst case on each backend of the tier being entered, by backend key; other tiers'
    # backends (fallbacks) are estimated when asked.
    estimates: dict[str, Estimate] = field(default_factory=dict)
    score: float | None = None
    decision: Decision | None = None
    # Sent to another tier by the operator's SLO steering: (the tier asked for, promoted | fallback).
    steered: tuple[str, str] | None = None
    budget: BudgetNote | None = None
    cache: CacheNote | None = None
    admission: AdmissionNote | None = None
    # The request's way into the waiting rooms of the targets it is sent to (None: no admission).
    gate: Gate | None = None
    # The backend gets another request than the caller sent (degraded under load): never cached.
    altered: bool = False
    # Asked for a stream, served whole by the backend (degraded): replayed to the caller as one.
    unstreamed: bool = False
    # What was served, for stages on the way out (the cache stores it): a whole answer's parsed
    # body, or the state of a stream that ended properly on the backend it started on.
    served: Mapping[str, Any] | None = None
    streamed: StreamState | None = None
    # Before serving from a backend costlier than what was reserved (a fallback tier, a resumed
    # stream), the forward stage asks for more; None: nothing to ask (no budget counts it).
    extend: Callable[[Exchange, int, int], Awaitable[bool]] | None = None
    # What the budgets hold for the request (micro-dollars, tokens): `extend` is asked only above it.
    held: tuple[int, int] = (0, 0)
    error: ApiError | None = None
    answered: bool = False
    resume_text: str = ""
    # Rendered bodies by (model, resume text): retries and same-model backends reuse them.
    payloads: dict[tuple[str, str], bytes] = field(default_factory=dict)
    prompt_counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def arriving(
        cls, kind: Kind, raw: bytes, headers: Mapping[str, str], runtime: Runtime, *, sink: Sink, started: float
    ) -> Exchange:
        """A request as it arrives: until the identify stage has run, it is the namespace's, on
        its default tier, at normal priority (what an error before then is reported under)."""
        who = Identity(runtime.namespace, None, runtime.access.default or "", Priority.NORMAL, None)
        return cls(kind, raw, headers, runtime, sink, started, Outcome(), who)

    @property
    def resumable(self) -> bool:
        if (self.body.get("n") or 1) != 1:
            return False
        return self.kind == "chat" or (self.kind == "completions" and isinstance(self.body.get("prompt"), str))

    async def send(self, reply: Reply) -> None:
        """Answer with a whole body; the status is what the caller gets."""
        self.outcome.status = reply.status
        self.answered = True
        headers = render_headers(self, True)
        if reply.headers:
            headers.update(reply.headers)
        await self.sink.whole(reply.status, headers, reply.body, reply.content_type)

    async def open_stream(self) -> None:
        self.outcome.status = 200
        self.answered = True
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **render_headers(self, False)}
        await self.sink.open(200, headers)
