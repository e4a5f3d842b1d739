"""Request logs as a replay trace: times made relative to the earliest request, rows that carry no
usable request skipped and counted (by reason), never a traceback. docs/replay-trace.md.

Formats:
- openai-jsonl: one JSON object a line: an OpenAI request body with a timestamp field (ISO 8601,
  or epoch seconds; milliseconds above 1e11), or an object with the timestamp and a "body" (or
  "request") object. The timestamp field is `time_field`, else the first of "timestamp" and
  "created". Optional top-level tenant, tier, label, session, id, kind; the tenant falls back to
  the body's `user`.
- litellm: LiteLLM spend-log rows (the LiteLLM_SpendLogs table exported as JSON Lines, or the JSON
  array /spend/logs answers): startTime; the body from proxy_server_request, else built from
  messages and model_group (or model); call_type gives the kind; the tenant is end_user, else user,
  else team_id; request_id, session_id; a tag "tier:NAME" in request_tags or metadata.tags gives
  the tier. LiteLLM stores request content only with store_prompts_in_spend_logs: rows without it
  are skipped ("no request content").
- csv: a header row, then one request a row: timestamp (or `time_field`), prompt (the user
  message); optional system, model, max_tokens, temperature, tenant, tier, label, session, id.

    python -m tierwise_sidecar.replay.convert --from litellm spend_logs.jsonl trace.jsonl
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias, get_args

import orjson

from tierwise_sidecar.replay.trace import (
    BODY_FIELD,
    KINDS,
    LABELS,
    MAX_LINE_BYTES,
    MAX_REQUESTS,
    Kind,
    TraceError,
    TraceRequest,
    iter_lines,
    parse_request,
    write_trace,
)

Format: TypeAlias = Literal["openai-jsonl", "litellm", "csv"]
FORMATS: tuple[Format, ...] = get_args(Format)
MAX_FILE_BYTES = 1 << 30  # a JSON array file is read whole: 1 GiB at most

_MS_ABOVE = 1e11  # epoch numbers above this are milliseconds (1e11 s is the year 5138)
_TRACE_KEYS = ("tenant", "tier", "label", "session", "id", "kind")
_LITELLM_KINDS: dict[str, Kind] = {
    "completion": "chat",
    "acompletion": "chat",
    "text_completion": "completions",
    "atext_completion": "completions",
    "embedding": "embeddings",
    "aembedding": "embeddings",
}


@dataclass(frozen=True, slots=True)
class Converted:
    """What a conversion gave: the requests (sorted by t, t from 0 at the earliest), and how many
    rows were skipped, by reason."""

    requests: list[TraceRequest]
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)


class _SkipError(Exception):
    """A row that gives no request: its reason is counted."""


def parse_time(value: object) -> float | None:
    """Epoch seconds from an ISO 8601 string (naive: UTC), or a number or numeric string of epoch
    seconds (milliseconds above 1e11); None when it is neither."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            try:
                when = datetime.fromisoformat(text)
            except ValueError:
                return None
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return when.timestamp()
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return value / 1000 if value > _MS_ABOVE else float(value)


def _json_field(value: object) -> object:
    """A JSON column that may arrive as its JSON text (LiteLLM exports do both)."""
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _kind_of(body: Mapping[str, Any]) -> Kind:
    for kind, name in BODY_FIELD.items():
        if name in body:
            return kind
    raise _SkipError("no messages, prompt or input")


def _openai_row(row: Mapping[str, Any], time_field: str | None) -> tuple[float, dict[str, Any]]:
    names = (time_field,) if time_field else ("timestamp", "created")
    name = next((n for n in names if n in row), None)
    if name is None:
        raise _SkipError(f"no {' or '.join(names)} field")
    when = parse_time(row[name])
    if when is None:
        raise _SkipError("unusable timestamp")
    nested = next((row[k] for k in ("body", "request") if isinstance(row.get(k), dict)), None)
    if nested is not None:
        body = dict(nested)
    else:
        body = {k: v for k, v in row.items() if k not in (name, "timestamp", "created", *_TRACE_KEYS)}
    kind = row["kind"] if row.get("kind") in KINDS else _kind_of(body)
    obj: dict[str, Any] = {"t": 0.0, "body": body, "kind": kind}
    for key in ("tier", "session", "id", "label"):
        if _str(row.get(key)):
            obj[key] = row[key]
    tenant = _str(row.get("tenant")) or _str(body.get("user"))
    if tenant:
        obj["tenant"] = tenant
    return when, obj


def _litellm_tier(row: Mapping[str, Any]) -> str | None:
    metadata = _json_field(row.get("metadata"))
    tags: list[object] = []
    for source in (_json_field(row.get("request_tags")), metadata.get("tags") if isinstance(metadata, dict) else None):
        if isinstance(source, list):
            tags.extend(source)
    for tag in tags:
        if isinstance(tag, str) and tag.startswith(("tier:", "tierwise-tier:")):
            return tag.split(":", 1)[1].strip() or None
    return None


def _litellm_row(row: Mapping[str, Any], time_field: str | None) -> tuple[float, dict[str, Any]]:
    name = time_field or "startTime"
    if name not in row:
        raise _SkipError(f"no {name} field")
    when = parse_time(row[name])
    if when is None:
        raise _SkipError("unusable timestamp")
    call_type = _str(row.get("call_type"))
    kind: Kind | None = None
    if call_type is not None:
        kind = _LITELLM_KINDS.get(call_type)
        if kind is None:
            raise _SkipError(f"call_type {call_type} is not replayed")
    model = _str(row.get("model_group")) or _str(row.get("model"))
    request = _json_field(row.get("proxy_server_request"))
    if isinstance(request, dict) and any(k in request for k in BODY_FIELD.values()):
        body = {k: v for k, v in request.items() if k != "metadata" and not k.startswith("litellm_")}
        kind = kind or _kind_of(body)
    else:
        content = _json_field(row.get("messages"))
        if not content:
            raise _SkipError("no request content (LiteLLM stores it with store_prompts_in_spend_logs)")
        kind = kind or "chat"
        if kind == "chat" and not isinstance(content, list):
            raise _SkipError("messages is not a list")
        body = {BODY_FIELD[kind]: content}
    if model and "model" not in body:
        body["model"] = model
    obj: dict[str, Any] = {"t": 0.0, "body": body, "kind": kind}
    tenant = _str(row.get("end_user")) or _str(row.get("user")) or _str(row.get("team_id"))
    for key, value in (("tenant", tenant), ("tier", _litellm_tier(row)), ("session", _str(row.get("session_id"))),
                       ("id", _str(row.get("request_id")))):  # fmt: skip
        if value:
            obj[key] = value
    return when, obj


def _csv_row(row: Mapping[str, Any], time_field: str | None) -> tuple[float, dict[str, Any]]:
    name = time_field or "timestamp"
    when = parse_time(row.get(name))
    if when is None:
        raise _SkipError(f"no usable {name}")
    prompt = _str(row.get("prompt"))
    if prompt is None:
        raise _SkipError("no prompt")
    messages = [{"role": "user", "content": prompt}]
    if _str(row.get("system")):
        messages.insert(0, {"role": "system", "content": row["system"]})
    body: dict[str, Any] = {"messages": messages}
    if _str(row.get("model")):
        body["model"] = row["model"]
    for key, cast in (("max_tokens", int), ("temperature", float)):
        if _str(row.get(key)):
            try:
                body[key] = cast(row[key])
            except ValueError:
                raise _SkipError(f"{key} is not a number") from None
    obj: dict[str, Any] = {"t": 0.0, "body": body, "kind": "chat"}
    for key in ("tenant", "tier", "label", "session", "id"):
        if _str(row.get(key)):
            obj[key] = row[key].strip()
    return when, obj


_ROW = {"openai-jsonl": _openai_row, "litellm": _litellm_row, "csv": _csv_row}


def convert_rows(
    rows: Iterable[object], fmt: Format, *, time_field: str | None = None, max_requests: int = MAX_REQUESTS
) -> Converted:
    """Rows already decoded (JSON objects, or CSV rows as dicts) as a trace."""
    if fmt not in _ROW:
        raise TraceError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    to_request = _ROW[fmt]
    skipped: Counter[str] = Counter()
    timed: list[tuple[float, TraceRequest]] = []
    for row in rows:
        try:
            if isinstance(row, _SkipError):
                raise row
            if not isinstance(row, dict):
                raise _SkipError("not a JSON object")
            when, obj = to_request(row, time_field)
            if obj.get("label") not in (None, *LABELS):
                del obj["label"]
            try:
                request = parse_request(obj)
            except TraceError as e:
                raise _SkipError(f"invalid {e.field or 'row'}") from None
        except _SkipError as skip:
            skipped[str(skip)] += 1
            continue
        if len(timed) >= max_requests:
            raise TraceError(f"more than {max_requests} requests (max_requests)")
        timed.append((when, request))
    timed.sort(key=lambda pair: pair[0])
    start = timed[0][0] if timed else 0.0
    requests = [replace(r, t=round(when - start, 6)) for when, r in timed]
    return Converted(requests, sum(skipped.values()), dict(skipped.most_common()))


def _decoded(lines: str | os.PathLike[str] | Iterable[str] | Iterable[bytes], max_line_bytes: int) -> Iterable[object]:
    for _, line in iter_lines(lines, max_line_bytes):
        if line is None:
            yield _SkipError(f"line over {max_line_bytes} bytes")
            continue
        if not line.strip():
            continue
        try:
            yield orjson.loads(line)
        except orjson.JSONDecodeError:
            yield _SkipError("not JSON")


def _csv_rows(lines: Iterable[str] | Iterable[bytes]) -> Iterable[object]:
    text = (line.decode("utf-8", "replace") if isinstance(line, bytes) else line for line in lines)
    reader = csv.DictReader(text)
    try:
        yield from reader
    except csv.Error as e:
        raise TraceError(f"not valid CSV: {e}", line=reader.line_num) from None


def convert(
    lines: Iterable[str] | Iterable[bytes],
    fmt: Format,
    *,
    time_field: str | None = None,
    max_requests: int = MAX_REQUESTS,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Converted:
    """Log lines (JSON Lines for openai-jsonl and litellm, CSV text lines for csv) as a trace: t in
    seconds from the earliest request, sorted; rows giving no request are skipped and counted."""
    rows = _csv_rows(lines) if fmt == "csv" else _decoded(lines, max_line_bytes)
    return convert_rows(rows, fmt, time_field=time_field, max_requests=max_requests)


def convert_file(
    path: str | os.PathLike[str], fmt: Format, *, time_field: str | None = None, max_requests: int = MAX_REQUESTS
) -> Converted:
    """A log file as a trace: JSON Lines, a JSON array of rows (as LiteLLM's /spend/logs answers),
    or CSV for fmt csv."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
            f.seek(0)
            if fmt == "csv":
                return convert(io.TextIOWrapper(f, encoding="utf-8", newline=""), fmt, time_field=time_field,
                               max_requests=max_requests)  # fmt: skip
            if head.startswith(b"["):
                data = f.read(MAX_FILE_BYTES + 1)
                if len(data) > MAX_FILE_BYTES:
                    raise TraceError(f"{os.fspath(path)!r}: a JSON array over {MAX_FILE_BYTES} bytes; use JSON Lines")
                try:
                    rows = orjson.loads(data)
                except orjson.JSONDecodeError as e:
                    raise TraceError(f"{os.fspath(path)!r}: not valid JSON: {e}") from None
                return convert_rows(rows, fmt, time_field=time_field, max_requests=max_requests)
    except OSError as e:
        raise TraceError(f"cannot read {os.fspath(path)!r}: {e.strerror or e}") from None
    return convert_rows(_decoded(path, MAX_LINE_BYTES), fmt, time_field=time_field, max_requests=max_requests)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tierwise_sidecar.replay.convert", description="Convert request logs to a replay trace (JSONL)."
    )
    parser.add_argument("--from", dest="fmt", choices=FORMATS, required=True, help="the log's format")
    parser.add_argument("--time-field", help="the timestamp's field (default: by format)")
    parser.add_argument("input", help="the log file")
    parser.add_argument("output", help="the trace to write")
    args = parser.parse_args(argv)
    try:
        result = convert_file(args.input, args.fmt, time_field=args.time_field)
        if not result.requests:
            print(f"convert: no request in {args.input} (skipped {result.skipped}: {result.skip_reasons})",
                  file=sys.stderr)  # fmt: skip
            return 1
        written = write_trace(result.requests, args.output)
    except (OSError, TraceError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 1
    span = result.requests[-1].t
    print(f"wrote {written} requests over {span:.1f} s to {args.output}; skipped {result.skipped}")
    for reason, count in result.skip_reasons.items():
        print(f"  skipped {count}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
