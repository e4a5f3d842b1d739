"""One try against one backend target: the body it is sent, and how its answer starts.

A try either starts an answer (a whole JSON body, or a stream whose first bytes have arrived) or
fails with what kind of failure it was, which the forward stage turns into a retry, the next
target, a fallback tier or the caller's error.
"""

from __future__ import annotations

import asyncio
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from tierwise.api.tier import FailureKind
from tierwise.values import value
from tierwise_sidecar.runtime import BackendRoute, TierRoute
from tierwise_sidecar.state import Key
from tierwise_sidecar.tokens import TokenCounter
from tierwise_sidecar.validate import Kind

if TYPE_CHECKING:
    from tierwise_sidecar.exchange import Exchange

PATHS: dict[Kind, str] = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}
CONTINUE_PROMPT = "Continue exactly where your previous message was cut off, without repeating anything."
MAX_ERROR_BODY = 64 * 1024
# What a target answers when it has more requests than it can serve: the sidecar's limit for it
# was too high. BUSY adds a try that ran out of time, which tells the same of a queueing target.
AT_CAPACITY = frozenset({FailureKind.RATE_LIMITED, FailureKind.OVERLOADED})
BUSY = AT_CAPACITY | {FailureKind.TIMEOUT}


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


@value
class Candidate:
    tier: TierRoute
    backend: BackendRoute
    endpoint: str
    session_key: str | None


@dataclass(slots=True)
class Started:
    candidate: Candidate
    body: bytes = b""
    data: dict[str, Any] = field(default_factory=dict)
    response: aiohttp.ClientResponse | None = None
    first: bytes = b""


def classify(status: int) -> FailureKind | None:
    if status == 429:
        return FailureKind.RATE_LIMITED
    if status in (503, 529):
        return FailureKind.OVERLOADED
    if status in (408, 504):
        return FailureKind.TIMEOUT
    if status >= 500 or status < 200 or 300 <= status < 400:
        return FailureKind.SERVER_ERROR
    return None


def render(x: Exchange, backend: BackendRoute, counter: TokenCounter) -> bytes:
    """The body sent to a backend: its model, usage asked for on streams, and a resume's context."""
    key = (backend.model, x.resume_text)
    cached = x.payloads.get(key)
    if cached is None:
        cached = x.payloads[key] = _render(x, backend, counter)
    return cached


def _render(x: Exchange, backend: BackendRoute, counter: TokenCounter) -> bytes:
    body = dict(x.body)
    body["model"] = backend.model
    if x.stream:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    if x.resume_text:
        if x.kind == "chat":
            body["messages"] = [
                *body["messages"],
                {"role": "assistant", "content": x.resume_text},
                {"role": "user", "content": CONTINUE_PROMPT},
            ]
        else:
            body["prompt"] = str(body["prompt"]) + x.resume_text
        sent = counter.count_text(backend.model, x.resume_text)
        for cap in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(cap), int):
                body[cap] = max(body[cap] - sent, 1)
    return orjson.dumps(body)


def text_of(data: dict[str, Any]) -> str:
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


# aiohttp's timeouts for the tiers' own (an attrs instance is some microseconds to build): one per
# distinct triple; a Policy has a few, and a reload may bring others (cleared when full).
_TIMEOUTS: dict[tuple[float | None, float, float | None], aiohttp.ClientTimeout] = {}
_TIMEOUTS_MAX = 256


def _client_timeout(total: float | None, connect: float, sock_read: float | None) -> aiohttp.ClientTimeout:
    key = (total, connect, sock_read)
    timeout = _TIMEOUTS.get(key)
    if timeout is None:
        if len(_TIMEOUTS) >= _TIMEOUTS_MAX:
            _TIMEOUTS.clear()
        timeout = _TIMEOUTS[key] = aiohttp.ClientTimeout(total=total, connect=connect, sock_read=sock_read)
    return timeout


async def attempt(
    session: aiohttp.ClientSession, cand: Candidate, x: Exchange, payload: bytes, remaining: float
) -> Started:
    """Send the request to one target and wait for its answer to start."""
    t = cand.tier.timeouts
    headers = cand.backend.low_headers if x.identity.priority < 0 else cand.backend.headers
    if x.stream:
        timeout = _client_timeout(None, t.connect, t.first_byte)
    elif t.attempt <= remaining:
        timeout = _client_timeout(t.attempt, t.connect, None)
    else:
        timeout = aiohttp.ClientTimeout(total=remaining, connect=t.connect)
    url = cand.endpoint + PATHS[x.kind]
    # A whole answer is bounded by aiohttp's total timeout; a stream's wait for its first byte
    # (aiohttp only bounds each read) by this one.
    guard = asyncio.timeout(remaining) if x.stream else nullcontext()
    try:
        async with guard:
            resp = await session.post(url, data=payload, headers=headers, timeout=timeout)
            try:
                return await _read_start(cand, x.stream, resp)
            except BaseException:
                resp.close()
                raise
    except TimeoutError:
        raise UpstreamError(FailureKind.TIMEOUT, f"{cand.backend.key} did not answer in time") from None
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
        raise UpstreamError(FailureKind.CONNECTION_ERROR, f"{cand.backend.key}: {type(e).__name__}") from None


async def _read_start(cand: Candidate, stream: bool, resp: aiohttp.ClientResponse) -> Started:
    kind = classify(resp.status)
    if kind is not None:
        resp.close()
        raise UpstreamError(kind, f"{cand.backend.key} answered {resp.status}", resp.headers.get("Retry-After"))
    if resp.status >= 400:
        body = await _read_capped(resp, MAX_ERROR_BODY)
        resp.close()
        raise UpstreamRefusalError(resp.status, body, resp.content_type)
    if stream:
        first = await resp.content.readany()
        if not first:
            raise UpstreamError(FailureKind.CONNECTION_ERROR, f"{cand.backend.key} closed the stream before any byte")
        return Started(cand, response=resp, first=first)
    body = await resp.read()
    resp.release()
    try:
        data = orjson.loads(body)
    except ValueError:
        raise UpstreamError(FailureKind.SERVER_ERROR, f"{cand.backend.key} answered with invalid JSON") from None
    if not isinstance(data, dict):
        raise UpstreamError(FailureKind.SERVER_ERROR, f"{cand.backend.key} answered with a non-object")
    return Started(cand, body=body, data=data)


class HttpClient:
    """The pooled HTTP client every request's tries share, opened and closed with the server."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=10, keepalive_timeout=30)
        # No cookie jar: a cookie one provider's answer sets (a CDN's, say) would otherwise go
        # back with every later request to it, whoever sends it: state shared across tenants.
        self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the HTTP client is started with the server"
        return self._session


HTTP = Key("http", lambda state: HttpClient())
