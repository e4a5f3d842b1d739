"""Reading the sidecars' metrics back from Prometheus (the I/O edge of autoscaling and SLO status).

prometheus-api-client is synchronous (requests); queries run in a worker thread so the operator's
event loop keeps serving watches. A query that fails says why; an empty answer means "no data",
which callers must not read as zero.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from requests import RequestException

from tierwise.api.tier import SLO, Autoscaling, ScalingSignal
from tierwise_operator import promql
from tierwise_operator.promql import Scope
from tierwise_operator.scaling import Observation

NO_PROMETHEUS = "no Prometheus configured (--prometheus-url): autoscaling holds replicas and the SLO is not judged"


class PrometheusUnavailableError(Exception):
    pass


@dataclass
class Prometheus:
    url: str
    timeout: float = 5.0
    on_query: Callable[[], None] | None = None  # counts the queries sent

    def __post_init__(self) -> None:
        self._client = PrometheusConnect(url=self.url, disable_ssl=True, timeout=self.timeout)

    def _query(self, q: str) -> list[tuple[dict[str, str], float]]:
        try:
            result = self._client.custom_query(q)
        except (RequestException, PrometheusApiClientException, ValueError) as e:
            raise PrometheusUnavailableError(f"Prometheus at {self.url} unavailable: {type(e).__name__}: {e}") from e
        out = []
        for series in result:
            value = float(series["value"][1])
            if not math.isnan(value):
                out.append((dict(series.get("metric", {})), value))
        return out

    async def query(self, q: str) -> list[tuple[dict[str, str], float]]:
        if self.on_query is not None:
            self.on_query()
        return await asyncio.to_thread(self._query, q)

    async def scalar(self, q: str) -> float | None:
        found = await self.query(q)
        return found[0][1] if found else None


async def observe_load(prom: Prometheus | None, a: Autoscaling, slo: SLO, scope: Scope) -> Observation:
    if prom is None:
        return Observation(None, None, NO_PROMETHEUS)
    idle_window = a.scale_to_zero_after_idle_seconds or 60
    try:
        load = await prom.scalar(promql.load_query(a.signal, scope, slo))
        requests = await prom.scalar(promql.requests(scope, idle_window))
    except PrometheusUnavailableError as e:
        return Observation(None, None, str(e))
    if load is None and requests is not None and requests <= 0 and a.signal is not ScalingSignal.SLO_HEADROOM:
        load = 0.0  # the series is gone because nothing is happening
    return Observation(load, 0.0 if requests is None else requests, None if load is not None else "no data yet")
