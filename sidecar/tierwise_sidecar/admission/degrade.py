"""Graceful degradation: what a loaded tier changes in a request so it is served cheaper instead
of refused. Pure functions of the tier's steps, the load, and the request.

Every step whose level the load has reached applies, and they add up: the tightest max_tokens and
temperature caps of them, the cheapest backend if any says so, streaming off if any says so. A
request already within a cap is left as it is; the changes actually made are what the
`x-tierwise-degraded` header and the metric report, and what the backend receives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tierwise.api.tier import DegradationStep
from tierwise.values import value

MAX_TOKENS, TEMPERATURE, CHEAPEST, NO_STREAM = "max_tokens", "temperature", "cheapest_backend", "no_stream"
# A request that names no temperature is sampled at the provider's default.
DEFAULT_TEMPERATURE = 1.0


@value
class Plan:
    level: int  # the highest step level reached, in percent
    max_tokens: int | None = None
    temperature: float | None = None
    cheapest: bool = False
    no_stream: bool = False


def plan(steps: Sequence[DegradationStep], load_percent: float) -> Plan | None:
    """What the steps reached at this load ask for; None below the first step."""
    reached = [s for s in steps if load_percent >= s.at_load_percent]
    if not reached:
        return None
    caps = [s.max_tokens for s in reached if s.max_tokens is not None]
    temps = [s.max_temperature for s in reached if s.max_temperature is not None]
    return Plan(
        level=reached[-1].at_load_percent,
        max_tokens=min(caps) if caps else None,
        temperature=min(temps) if temps else None,
        cheapest=any(s.cheapest_backend for s in reached),
        no_stream=any(s.disable_streaming for s in reached),
    )


def apply(p: Plan, kind: str, body: Mapping[str, Any], stream: bool) -> tuple[dict[str, Any], list[str]]:
    """The request as the backend gets it, and the changes made (an empty list: none needed)."""
    out = dict(body)
    changes: list[str] = []
    if kind == "embeddings":
        return out, changes
    if p.max_tokens is not None:
        field = "max_completion_tokens" if "max_completion_tokens" in out else "max_tokens"
        asked = out.get(field)
        if not isinstance(asked, int) or asked > p.max_tokens:
            out[field] = p.max_tokens
            changes.append(f"{MAX_TOKENS}={p.max_tokens}")
    if p.temperature is not None:
        asked = out.get("temperature")
        current = asked if isinstance(asked, int | float) else DEFAULT_TEMPERATURE
        if current > p.temperature:
            out["temperature"] = p.temperature
            changes.append(f"{TEMPERATURE}={p.temperature:g}")
    if p.cheapest:
        changes.append(CHEAPEST)
    if p.no_stream and stream and (out.get("n") or 1) == 1:
        out.pop("stream_options", None)
        out["stream"] = False
        changes.append(NO_STREAM)
    return out, changes
