"""Embeddings for near-duplicate matching, from the policy's embeddings tier.

The prompt is embedded by the tier's backends (its cheapest first, each target once) through the
gateway's pooled HTTP client, bounded in time: an embedding that fails or is late leaves the
request to the exact cache and the backend, never fails it. What it cost becomes a segment of the
request's own cost (its headers, the cost metrics, and the budgets that settle it on a miss).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp
import orjson

from tierwise_sidecar.account import Segment, segment
from tierwise_sidecar.cache.similar import normalized
from tierwise_sidecar.runtime import Health, TierRoute
from tierwise_sidecar.tokens import TokenCounter

log = logging.getLogger("tierwise.cache")

TIMEOUT_SECONDS = 2.0


class Embedder:
    def __init__(self, tier: TierRoute, health: Health, session: Callable[[], aiohttp.ClientSession],
                 counter: TokenCounter, timeout: float = TIMEOUT_SECONDS) -> None:  # fmt: skip
        self.tier = tier
        self.counter = counter
        self.health = health
        self.session = session
        self.timeout = timeout

    async def __call__(self, text: str) -> tuple[tuple[float, ...] | None, Segment | None]:
        """The prompt's unit vector (None when no backend gave one) and what it cost."""
        for backend in self.tier.by_price:
            for endpoint in self.health.targets(backend):
                headers = {"Content-Type": "application/json"}
                if backend.api_key:
                    headers["Authorization"] = f"Bearer {backend.api_key}"
                body = orjson.dumps({"model": backend.model, "input": text})
                try:
                    async with asyncio.timeout(self.timeout):
                        async with self.session().post(endpoint + "/embeddings", data=body, headers=headers) as r:
                            if r.status != 200:
                                continue
                            data = orjson.loads(await r.read())
                except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                    log.debug("embedding on %s failed: %s", backend.key, type(e).__name__)
                    continue
                vector = _vector(data)
                if vector is None:
                    continue
                usage = data.get("usage") if isinstance(data, dict) else None
                tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
                if not isinstance(tokens, int) or tokens < 0:
                    tokens = self.counter.count_text(backend.model, text)
                return vector, segment(backend, {"prompt_tokens": tokens, "completion_tokens": 0}, 0, 0)
        return None, None


def _vector(data: object) -> tuple[float, ...] | None:
    if not isinstance(data, dict):
        return None
    items = data.get("data")
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        return None
    raw = items[0].get("embedding")
    if not isinstance(raw, list) or not raw or not all(isinstance(v, int | float) for v in raw):
        return None
    return normalized([float(v) for v in raw])
