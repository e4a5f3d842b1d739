"""Counts of a trace (what `python -m tierwise_sidecar.replay.tracegen` prints after writing one),
and the rough size of a request that the reference trace's budget suggestion is made from."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import orjson

from tierwise_sidecar.replay.trace import TraceRequest


def estimate_tokens(request: TraceRequest) -> int:
    """A rough upper estimate of a request's tokens: prompt characters / 4, plus max_tokens."""
    chars = len(orjson.dumps(request.body.get("messages", request.body.get("prompt", ""))))
    return chars // 4 + int(request.body.get("max_tokens") or 0)


def prompt_key(request: TraceRequest) -> bytes:
    """What makes two requests the same prompt: the body's messages (or prompt or input)."""
    body = request.body
    return orjson.dumps(body.get("messages", body.get("prompt", body.get("input"))), option=orjson.OPT_SORT_KEYS)


def summarize(requests: Sequence[TraceRequest]) -> dict[str, Any]:
    """Counts of a trace: requests, per tier, per label, per tenant, distinct prompts, the share of
    requests repeating an earlier prompt, the share also cacheable (temperature 0 and the same body
    as an earlier temperature-0 request), sessions, the mean rate."""
    seen: set[bytes] = set()
    seen_cacheable: set[bytes] = set()
    repeats = cacheable_repeats = 0
    for r in requests:
        key = prompt_key(r)
        repeats += key in seen
        seen.add(key)
        if r.body.get("temperature") == 0:
            full = orjson.dumps(r.body, option=orjson.OPT_SORT_KEYS)
            cacheable_repeats += full in seen_cacheable
            seen_cacheable.add(full)
    n = len(requests)
    span = requests[-1].t if requests else 0.0
    return {
        "requests": n,
        "per_tier": dict(Counter(r.tier for r in requests).most_common()),
        "per_label": dict(Counter(r.label for r in requests).most_common()),
        "per_tenant": dict(Counter(r.tenant for r in requests).most_common()),
        "distinct_prompts": len(seen),
        "repeat_share": round(repeats / n, 4) if n else 0.0,
        "cacheable_repeat_share": round(cacheable_repeats / n, 4) if n else 0.0,
        "sessions": len({r.session for r in requests if r.session}),
        "session_requests": sum(1 for r in requests if r.session),
        "mean_rps": round(n / span, 3) if span else 0.0,
    }
