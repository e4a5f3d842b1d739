"""The stage contract, as in Envoy's filter chain, and the chain that runs it.

Each stage gets the request on the way in and may answer it itself (a refusal, or a 200 such as a
cache hit); every stage that was entered gets its turn on the way out, in reverse order, whatever
happened (success, refusal, upstream failure, client gone, stream cut): that is where reservations
settle, slots are released, caches fill and metrics record. The last stage (forward) is the one
that calls a backend. A chain is built once per Policy, beside its Runtime, so a request keeps the
chain it started with across a reload; adding a stage means its own module and one line in
`build_chain`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tierwise_sidecar.errors import ApiError
from tierwise_sidecar.exchange import Exchange, Reply
from tierwise_sidecar.runtime import Runtime

log = logging.getLogger("tierwise.sidecar")


class Stage(Protocol):
    name: str

    async def enter(self, x: Exchange) -> Reply | None:
        """None: go on to the next stage. A Reply (or an ApiError raised) answers the request."""

    async def leave(self, x: Exchange) -> None:
        """Always called for an entered stage, in reverse order; must not raise."""


class Chain:
    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = tuple(stages)

    def activate(self) -> None:
        """The chain's Policy is going into force: stages that point shared state (metrics, what a
        store keeps current) at their Policy do so now, on the event loop, not when built."""
        for stage in self.stages:
            activate = getattr(stage, "activate", None)
            if activate is not None:
                activate()

    async def run(self, x: Exchange) -> None:
        """Take the exchange through every stage until one answers, then back out."""
        entered = 0
        try:
            for stage in self.stages:
                entered += 1
                try:
                    reply = await stage.enter(x)
                except ApiError as e:
                    # Kept for the way out, without the frames it came through: they hold the
                    # exchange, and the cycle would keep the request alive until a cyclic collection.
                    e.__context__ = e.__cause__ = None
                    x.error = e.with_traceback(None)
                    reply = Reply.of_error(e)
                if reply is not None:
                    if not x.answered:
                        await x.send(reply)
                    return
        except BaseException as e:
            if not x.answered:
                x.outcome.status = 499 if isinstance(e, asyncio.CancelledError) else 500
            raise
        finally:
            for stage in reversed(self.stages[:entered]):
                try:
                    await stage.leave(x)
                except Exception:
                    # A stage's way out must not cost the caller its answer or the others their turn.
                    log.exception("stage %s failed on the way out", stage.name)


@dataclass(frozen=True)
class Pipeline:
    """A Policy made ready to serve: its routing tables and the chain built on them."""

    runtime: Runtime
    chain: Chain
