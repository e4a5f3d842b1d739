"""The replay trace: JSON Lines, one OpenAI request per line, with when to send it.

    {"t": 0.25, "tenant": "acme", "tier": "gold", "kind": "chat", "body": {...}, "label": "hard"}

`read_trace` validates every line and raises `TraceError` (a ValueError) naming the line number
and the field at fault; `write_trace` writes only what `read_trace` accepts. Times are seconds
since the trace's start and must not decrease from one line to the next (`sort=True` sorts them
instead, stably). The reader is bounded: a line over `MAX_LINE_BYTES` or a trace over
`max_requests` requests is refused. docs/replay-trace.md describes the format.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Literal, TypeAlias, get_args

import orjson

Kind: TypeAlias = Literal["chat", "completions", "embeddings"]
Label: TypeAlias = Literal["easy", "medium", "hard"]
KINDS: tuple[Kind, ...] = get_args(Kind)
LABELS: tuple[Label, ...] = get_args(Label)

MAX_LINE_BYTES = 1 << 20  # 1 MiB, the line's UTF-8 bytes without its newline
MAX_REQUESTS = 1_000_000

# What each kind's body must carry, as OpenAI's API requires it.
BODY_FIELD: dict[Kind, str] = {"chat": "messages", "completions": "prompt", "embeddings": "input"}
_FIELDS = frozenset({"t", "body", "kind", "tenant", "tier", "label", "session", "id"})
_OPTIONAL_STR = ("tenant", "tier", "session", "id")

Source: TypeAlias = "str | os.PathLike[str] | Iterable[str] | Iterable[bytes]"


class TraceError(ValueError):
    """A trace that cannot be used: says which line and which field, when it is about one."""

    def __init__(self, message: str, *, line: int | None = None, field: str | None = None) -> None:
        where = []
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.line = line
        self.field = field


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace.

    t: seconds since the trace's start (finite, >= 0). body: the OpenAI request body, sent as is.
    kind: which endpoint (chat -> /v1/chat/completions, completions -> /v1/completions,
    embeddings -> /v1/embeddings). tenant: who sends it. tier: a tier hint (sent as the
    x-tierwise-tier header). label: how hard the request is (easy | medium | hard), for quality
    accounting. session: a conversation's id (turns of one session share it). id: the request's id.
    """

    t: float
    body: dict[str, Any]
    kind: Kind = "chat"
    tenant: str | None = None
    tier: str | None = None
    label: Label | None = None
    session: str | None = None
    id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The line's object: fields left at None are left out."""
        out: dict[str, Any] = {"t": self.t}
        for name in ("tenant", "tier", "kind"):
            out[name] = getattr(self, name)
        out["body"] = self.body
        for name in ("label", "session", "id"):
            out[name] = getattr(self, name)
        return {k: v for k, v in out.items() if v is not None}


def parse_request(obj: Any, line: int | None = None) -> TraceRequest:
    """One line's decoded object as a TraceRequest, or TraceError naming the field at fault."""

    def fail(field: str, message: str) -> TraceError:
        return TraceError(message, line=line, field=field)

    if not isinstance(obj, dict):
        raise TraceError(f"a trace line is a JSON object, not {_type(obj)}", line=line)
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise fail(unknown[0], f"unknown field (known: {', '.join(sorted(_FIELDS))})")
    if "t" not in obj:
        raise fail("t", "required")
    t = obj["t"]
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise fail("t", f"a number of seconds, not {_type(t)}")
    if not math.isfinite(t) or t < 0:
        raise fail("t", f"finite and >= 0, not {t!r}")
    if "body" not in obj:
        raise fail("body", "required")
    body = obj["body"]
    if not isinstance(body, dict):
        raise fail("body", f"an OpenAI request body (a JSON object), not {_type(body)}")
    kind = obj.get("kind", "chat")
    if kind not in KINDS:
        raise fail("kind", f"one of {', '.join(KINDS)}, not {kind!r}")
    needed = BODY_FIELD[kind]
    if needed not in body:
        raise fail(f"body.{needed}", f"required for kind {kind!r}")
    if kind == "chat":
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise fail("body.messages", "a non-empty list of messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise fail(f"body.messages[{i}]", "an object with a string 'role'")
    if "model" in body and not isinstance(body["model"], str):
        raise fail("body.model", f"a string, not {_type(body['model'])}")
    for name in _OPTIONAL_STR:
        value = obj.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise fail(name, f"a non-empty string, not {value!r}")
    label = obj.get("label")
    if label is not None and label not in LABELS:
        raise fail("label", f"one of {', '.join(LABELS)}, not {label!r}")
    return TraceRequest(
        t=float(t),
        body=body,
        kind=kind,
        tenant=obj.get("tenant"),
        tier=obj.get("tier"),
        label=label,
        session=obj.get("session"),
        id=obj.get("id"),
    )


def iter_lines(source: Source, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """(line number from 1, the line without its newline) for each line of a file or of an iterable
    of lines; None instead of a line over max_line_bytes (never read whole into memory from a
    file). A str or PathLike is a path; any other iterable gives the lines themselves."""
    if isinstance(source, str | os.PathLike):
        try:
            with open(source, "rb") as f:
                yield from _file_lines(f, max_line_bytes)
        except OSError as e:
            raise TraceError(f"cannot read {os.fspath(source)!r}: {e.strerror or e}") from None
        return
    for number, raw in enumerate(source, start=1):
        if isinstance(raw, str):
            data = raw.encode()
        elif isinstance(raw, bytes | bytearray):
            data = bytes(raw)
        else:
            raise TraceError(f"a line is a string or bytes, not {_type(raw)}", line=number)
        data = data.rstrip(b"\r\n")
        yield number, (data if len(data) <= max_line_bytes else None)


def _file_lines(f: IO[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    number = 0
    while True:
        chunk = f.readline(max_line_bytes + 2)
        if not chunk:
            return
        number += 1
        if chunk.endswith(b"\n") or len(chunk) <= max_line_bytes:
            line = chunk.rstrip(b"\r\n")
            yield number, (line if len(line) <= max_line_bytes else None)
            continue
        while chunk and not chunk.endswith(b"\n"):  # the rest of an over-long line
            chunk = f.readline(1 << 16)
        yield number, None


def read_trace(
    source: Source,
    *,
    max_requests: int = MAX_REQUESTS,
    max_line_bytes: int = MAX_LINE_BYTES,
    sort: bool = False,
) -> list[TraceRequest]:
    """Every request of a trace (a path, or an iterable of lines), validated. Blank lines are
    skipped. A time below the previous line's is an error unless sort=True (then the requests are
    sorted by t, stably). Raises TraceError naming the line and the field at fault."""
    requests: list[TraceRequest] = []
    last_t = 0.0
    for number, line in iter_lines(source, max_line_bytes):
        if line is None:
            raise TraceError(f"longer than {max_line_bytes} bytes", line=number)
        if not line.strip():
            continue
        if len(requests) >= max_requests:
            raise TraceError(f"more than {max_requests} requests (max_requests)", line=number)
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise TraceError(f"not valid JSON: {e}", line=number) from None
        request = parse_request(obj, number)
        if not sort and request.t < last_t:
            raise TraceError(f"{request.t} is before the previous line's {last_t} (times must not decrease)",
                             line=number, field="t")  # fmt: skip
        last_t = request.t
        requests.append(request)
    if sort:
        requests.sort(key=lambda r: r.t)
    return requests


def dumps_request(request: TraceRequest) -> bytes:
    """One line (without its newline) for a request; TraceError if read_trace would refuse it."""
    obj = request.to_json()
    try:
        line = orjson.dumps(obj)
    except TypeError as e:
        raise TraceError(f"not JSON-serialisable: {e}", field="body") from None
    parse_request(orjson.loads(line))
    return line


def write_trace(requests: Iterable[TraceRequest], path: str | os.PathLike[str]) -> int:
    """Write requests as a trace file, each validated first (so read_trace accepts what this
    writes); times must not decrease. Returns how many were written."""
    count = 0
    last_t = 0.0
    with open(path, "wb") as f:
        for count, request in enumerate(requests, start=1):
            try:
                line = dumps_request(request)
            except TraceError as e:
                raise TraceError(f"request {count}: {e}") from None
            if request.t < last_t:
                raise TraceError(f"request {count}: t {request.t} is before the previous one's {last_t}")
            last_t = request.t
            if len(line) > MAX_LINE_BYTES:
                raise TraceError(f"request {count}: longer than {MAX_LINE_BYTES} bytes")
            f.write(line + b"\n")
    return count


def _type(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), f"a {type(value).__name__}"
    )
