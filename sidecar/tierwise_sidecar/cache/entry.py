"""A cached answer: its assembled result, whichever way it was delivered, and how it is served again.

An entry keeps what a client reads in an answer (the message or text, the finish reason, the usage,
the model that produced it) and what it cost, not the bytes of one delivery: a whole answer and a
stream assemble to the same entry, so a streamed request hits an entry a whole answer filled and
the other way round. A hit is served as a whole body or replayed as a stream (a role chunk, the
content, the finish reason, usage when the client asked for it, `[DONE]`). Stored outside the
process, an entry is JSON, compressed when large.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from tierwise_sidecar.sse import DONE_EVENT, StreamState

# Answers at least this long are compressed for the shared layers (below it zlib's header and the
# CPU are not worth it).
COMPRESS_FROM = 1024
_RAW, _ZLIB = b"j", b"z"


@dataclass(frozen=True, slots=True)
class Entry:
    kind: str  # chat or completions
    model: str
    # chat: the assistant message as the provider sent it; completions: {"text": ...}.
    message: Mapping[str, Any]
    finish_reason: str | None
    usage: Mapping[str, Any] | None
    # What the answer cost when it was paid for: what a hit saves.
    micros: int
    expires: float


def from_whole(kind: str, data: Mapping[str, Any], micros: int, expires: float) -> Entry | None:
    """The entry of a whole answer, or None when it is not a complete single answer."""
    entry = assembled(kind, data, micros, expires)
    if entry is None or entry.finish_reason not in ("stop", "tool_calls", "function_call"):
        return None  # "length", "content_filter" or none: truncated or refused, never stored
    return entry


def assembled(kind: str, data: Mapping[str, Any], micros: int = 0, expires: float = 0.0) -> Entry | None:
    """A whole answer of one choice as an entry, however it finished; None for another shape."""
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    finish = choice.get("finish_reason")
    if kind == "chat":
        message = choice.get("message")
        if not isinstance(message, dict):
            return None
    else:
        text = choice.get("text")
        if not isinstance(text, str):
            return None
        message = {"text": text}
    usage = data.get("usage")
    model = data.get("model")
    return Entry(kind, model if isinstance(model, str) else "", message, finish if isinstance(finish, str) else None,
                 usage if isinstance(usage, dict) else None, micros, expires)  # fmt: skip


def from_stream(kind: str, model: str, seg: StreamState, micros: int, expires: float) -> Entry | None:
    """The entry of a stream that ended properly with a whole answer (never one with tool calls,
    which are not assembled from their deltas)."""
    if not seg.complete or seg.error is not None or seg.tool_calls or seg.finish_reason != "stop":
        return None
    text = "".join(seg.text)
    message = {"role": "assistant", "content": text} if kind == "chat" else {"text": text}
    return Entry(kind, model, message, seg.finish_reason, seg.usage, micros, expires)


# ---------------------------------------------------------------------------------------- stored


def encode(e: Entry) -> bytes:
    raw = orjson.dumps({"k": e.kind, "m": e.model, "msg": e.message, "f": e.finish_reason, "u": e.usage,
                        "c": e.micros, "x": e.expires})  # fmt: skip
    if len(raw) >= COMPRESS_FROM:
        return _ZLIB + zlib.compress(raw, 1)
    return _RAW + raw


def decode(blob: bytes) -> Entry | None:
    """An entry read from a store, or None when it is not one (a foreign or damaged value)."""
    try:
        raw = zlib.decompress(blob[1:]) if blob[:1] == _ZLIB else blob[1:] if blob[:1] == _RAW else None
        if raw is None:
            return None
        d = orjson.loads(raw)
        return Entry(str(d["k"]), str(d["m"]), dict(d["msg"]), d["f"], d["u"], int(d["c"]), float(d["x"]))
    except (zlib.error, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------- served


def _id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + "cache" + os.urandom(12).hex()


def whole_body(e: Entry) -> bytes:
    """The answer as a whole body (what a non-streamed request gets)."""
    if e.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": e.message, "logprobs": None, "finish_reason": e.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": e.message.get("text", ""), "logprobs": None, "finish_reason": e.finish_reason}
        obj = "text_completion"
    body: dict[str, Any] = {"id": _id(e.kind), "object": obj, "created": int(time.time()), "model": e.model,
                            "choices": [choice]}  # fmt: skip
    if e.usage is not None:
        body["usage"] = e.usage
    return orjson.dumps(body)


def stream_events(e: Entry, with_usage: bool) -> list[bytes]:
    """The answer replayed as server-sent events, `[DONE]` last."""
    ident, created = _id(e.kind), int(time.time())
    obj = "chat.completion.chunk" if e.kind == "chat" else "text_completion"

    def event(choices: list[dict[str, Any]], usage: Mapping[str, Any] | None = None) -> bytes:
        chunk: dict[str, Any] = {"id": ident, "object": obj, "created": created, "model": e.model, "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    if e.kind == "chat":
        content = e.message.get("content")
        delta: dict[str, Any] = {"content": content if isinstance(content, str) else ""}
        calls = e.message.get("tool_calls")
        if isinstance(calls, list) and calls:
            delta["tool_calls"] = [{**c, "index": i} for i, c in enumerate(calls) if isinstance(c, dict)]
        events = [
            event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
            event([{"index": 0, "delta": delta, "finish_reason": None}]),
            event([{"index": 0, "delta": {}, "finish_reason": e.finish_reason}]),
        ]
    else:
        events = [
            event([{"index": 0, "text": e.message.get("text", ""), "logprobs": None, "finish_reason": None}]),
            event([{"index": 0, "text": "", "logprobs": None, "finish_reason": e.finish_reason}]),
        ]
    if with_usage and e.usage is not None:
        events.append(event([], e.usage))
    events.append(DONE_EVENT)
    return events


def replay_events(kind: str, data: Mapping[str, Any], with_usage: bool) -> list[bytes]:
    """A whole answer (of one choice) as the server-sent events of a stream, `[DONE]` last."""
    entry = assembled(kind, data)
    if entry is None:
        return [b"data: " + orjson.dumps(data) + b"\n\n", DONE_EVENT]
    return stream_events(entry, with_usage)
