"""A policy's near-duplicate matching as the cache stage uses it: embed the user's words, look for
a prompt of the same context answered before, and remember the new one once it is answered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tierwise_sidecar.cache.embed import Embedder
from tierwise_sidecar.cache.key import Covered, key
from tierwise_sidecar.cache.metrics import CacheMetrics
from tierwise_sidecar.cache.similar import Indexed, Match, SimilarIndex, context, floor_of, user_text

if TYPE_CHECKING:
    from tierwise_sidecar.exchange import Exchange

H_SIMILARITY = "x-tierwise-cache-similarity"


@dataclass(frozen=True, slots=True)
class Pending:
    """A prompt to index once its answer is stored."""

    context: str
    vector: tuple[float, ...]
    text: str


@dataclass(frozen=True, slots=True)
class Near:
    index: SimilarIndex
    embed: Embedder
    threshold: float

    async def find(self, c: Covered, x: Exchange, metrics: CacheMetrics) -> tuple[Match | None, Pending | None]:
        """The best near duplicate already answered (or None), and what to index if none is."""
        text = user_text(x.kind, x.body)
        if text is None:
            return None, None
        who = x.identity
        ctx = key(c, x.kind, context(x.body), who.tier, namespace=who.namespace, tenant=who.tenant)
        vector, spent = await self.embed(text)
        policy = (c.policy.namespace, c.policy.name)
        if spent is not None:
            x.outcome.segments.append(spent)  # the request's own cost: headers, metrics, budgets on a miss
            metrics.embedding_cost.inc(policy, spent.usd)
        if vector is None:
            metrics.similar.inc((*policy, "unavailable"))
            return None, None
        found = self.index.best(ctx, vector, text, floor_of(self.threshold, x.headers.get(H_SIMILARITY)))
        metrics.similar.inc((*policy, "hit" if found is not None else "miss"))
        return found, Pending(ctx, vector, text)

    def remember(self, pending: Pending, exact_key: str) -> None:
        self.index.add(pending.context, Indexed(pending.vector, exact_key, pending.text))
