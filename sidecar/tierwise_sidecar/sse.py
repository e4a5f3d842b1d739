"""Server-sent events of a streamed completion, relayed event by event while being read.

The relay forwards each complete event as soon as it has arrived (a partial event is of no use to
a client), and remembers what accounting and resumption need: the text sent so far, the finish
reason, the usage block, whether `[DONE]` came. When the gateway asked the provider for usage that
the client did not ask for, the usage-only event is dropped so the client sees what it expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"


@dataclass
class StreamState:
    chat: bool
    strip_usage: bool
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    done: bool = False
    # A stream that was sending tool calls cannot be resumed from its text.
    tool_calls: bool = False

    @property
    def complete(self) -> bool:
        """Did the stream end properly (as opposed to being cut)?"""
        return self.done or (self.finish_reason is not None and self.error is None)


class Relay:
    def __init__(self, state: StreamState) -> None:
        self.state = state
        self._buf = b""

    def feed(self, chunk: bytes) -> bytes:
        """Bytes of the complete events in `chunk` (plus what was pending) to send on."""
        buf = self._buf + chunk if self._buf else chunk
        out: list[bytes] = []
        start = 0
        while True:
            end, sep = _next_boundary(buf, start)
            if end < 0:
                break
            event = buf[start : end + sep]
            if self._keep(buf[start:end]):
                out.append(event)
            start = end + sep
        self._buf = buf[start:]
        return b"".join(out)

    def _keep(self, event: bytes) -> bool:
        st = self.state
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == DONE:
                # The relay's owner ends the stream itself, after accounting (and after a resume).
                st.done = True
                return False
            try:
                obj = orjson.loads(payload)
            except ValueError:
                return True
            if not isinstance(obj, dict):
                return True
            if obj.get("error"):
                # Held back: the failure may yet be resumed elsewhere; if not, the owner reports it.
                st.error = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
                return False
            choices = obj.get("choices")
            if isinstance(choices, list):
                self._choices(choices)
            usage = obj.get("usage")
            if isinstance(usage, dict) and usage:
                st.usage = usage
                if st.strip_usage and not choices:
                    return False
        return True

    def _choices(self, choices: list[Any]) -> None:
        st = self.state
        for c in choices:
            if not isinstance(c, dict):
                continue
            delta = c.get("delta")
            if st.chat and isinstance(delta, dict):
                piece = delta.get("content")
                if delta.get("tool_calls"):
                    st.tool_calls = True
            else:
                piece = c.get("text")
            if isinstance(piece, str) and piece:
                st.text.append(piece)
            if isinstance(c.get("finish_reason"), str):
                st.finish_reason = c["finish_reason"]


def _next_boundary(buf: bytes, start: int) -> tuple[int, int]:
    lf = buf.find(b"\n\n", start)
    crlf = buf.find(b"\r\n\r\n", start)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, 4
    return lf, 2 if lf >= 0 else 0


def error_event(message: str, code: str, type_: str = "upstream_error") -> bytes:
    """The event that ends a stream that cannot be completed: the openai SDK raises it as APIError."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return b"data: " + orjson.dumps(body) + b"\n\n"
