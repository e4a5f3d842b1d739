"""What every answered request adds to the request metrics, its series bound once per kind of answer.

An answer updates up to nine series of seven families: requests, duration, the backend's duration,
the route decision, the estimated cost, and for each backend that served part of it its tokens
and cost. A family keys its series by a tuple of label values, and building and hashing those
tuples was most of what recording a request cost. Answers of one kind (namespace, tenant, tiers,
backend, status, route, and which of the optional series they update) update the same series, so
a Recorder keeps them bound per kind, finds them with one lookup and updates them in place.

A Recorder lives with its Policy's chain (the labels come from that Policy). The series live in
their families for the process's life, so nothing bound goes stale when a reload replaces the
chain, and a new Recorder binds the same series again.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from tierwise_sidecar.hotmetrics import Cell, Observed
from tierwise_sidecar.metrics import Metrics

if TYPE_CHECKING:
    from tierwise_sidecar.exchange import Exchange

# Kinds of answers (and of usage) kept bound; cleared when full. Their labels are bounded (the
# Policy's names, fixed sets, tenants capped by Metrics.tenant), so this only bounds the unusual.
KINDS_MAX = 4096

# namespace, tenant, asked tier, served tier, backend label, status, route, served (by a backend),
# timed (the backend's duration is observed), estimated (the estimated cost is counted)
AnswerKind = tuple[str, str, str, str, str, int, str | None, bool, bool, bool]
# namespace, tenant, tier, backend
UsageKind = tuple[str, str, str, str]


class _Answer:
    __slots__ = ("backend_duration", "duration", "estimated", "requests", "route")

    def __init__(
        self, requests: Cell, duration: Observed, backend_duration: Observed | None, route: Cell | None,
        estimated: Cell | None,
    ) -> None:  # fmt: skip
        self.requests = requests
        self.duration = duration
        self.backend_duration = backend_duration
        self.route = route
        self.estimated = estimated


class _Usage:
    __slots__ = ("cached", "cost", "input", "kind", "output")

    def __init__(self, kind: UsageKind, input_: Cell, output: Cell, cost: Cell) -> None:
        self.kind = kind
        self.input = input_
        self.output = output
        self.cost = cost
        # Bound when a backend first reports prompt-cache hits: most never do, and an unused
        # series would be exported as a 0.
        self.cached: Cell | None = None


class Recorder:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._answers: dict[AnswerKind, _Answer] = {}
        self._usage: dict[UsageKind, _Usage] = {}

    def record(self, namespace: str, x: Exchange, duration: float) -> None:
        o = x.outcome
        served, est = o.backend, o.estimate
        tenant = self.metrics.tenant(x.identity.tenant)
        asked = x.identity.tier
        timed = served is not None and o.served_since > 0 and o.status < 500
        backend = served.name if served is not None else "cache" if o.cached else "none"
        kind = (namespace, tenant, asked, o.tier or asked, backend, o.status, o.route, served is not None, timed,
                est is not None)  # fmt: skip
        a = self._answers.get(kind) or self._bind(kind)
        a.requests[0] += 1
        a.duration.observe(duration)
        if a.backend_duration is not None:
            a.backend_duration.observe(time.monotonic() - o.served_since)
        if a.route is not None:
            a.route[0] += 1
        if est is not None and a.estimated is not None:
            a.estimated[0] += est.usd
        for s in o.segments:
            b = s.backend
            used = (namespace, tenant, b.tier, b.name)
            u = self._usage.get(used) or self._bind_usage(used)
            u.input[0] += s.input_tokens
            u.output[0] += s.output_tokens
            if s.cached_tokens:
                cached = u.cached
                if cached is None:
                    cached = u.cached = self.metrics.tokens.cell((*u.kind, "cached_input"))
                cached[0] += s.cached_tokens
            u.cost[0] += s.usd

    def _bind(self, kind: AnswerKind) -> _Answer:
        """The series answers of this kind update (only those: a series is exported once bound)."""
        m = self.metrics
        namespace, tenant, asked, tier, backend, status, route, served, timed, estimated = kind
        a = _Answer(
            m.requests.cell((namespace, tenant, tier, backend, str(status))),
            m.duration.series((namespace, tier)),
            m.backend_duration.series((namespace, tier, backend)) if timed else None,
            m.route.cell((tier, route, backend)) if route is not None and served else None,
            m.estimated_cost.cell((namespace, tenant, asked)) if estimated else None,
        )
        if len(self._answers) >= KINDS_MAX:
            self._answers.clear()
        self._answers[kind] = a
        return a

    def _bind_usage(self, kind: UsageKind) -> _Usage:
        tokens = self.metrics.tokens
        u = _Usage(kind, tokens.cell((*kind, "input")), tokens.cell((*kind, "output")), self.metrics.cost.cell(kind))
        if len(self._usage) >= KINDS_MAX:
            self._usage.clear()
        self._usage[kind] = u
        return u
