"""How late the sidecar's own event loop runs: a timer asks to wake every INTERVAL seconds and
notes by how much it overslept.

A sidecar short of CPU answers late whatever its targets do: the latency it measures for a try
then holds its own queueing, not the target's. While the loop lags, the adaptive limits judge
targets by what they say (429s, 503s, timeouts) and not by latency, so a busy sidecar does not
throttle healthy targets (and cutting their limit would not give it CPU back).
"""

from __future__ import annotations

import asyncio
import time

from tierwise_sidecar.state import Key, stop

INTERVAL = 0.05
# Weight of the newest lateness in the moving average.
EWMA = 0.2
# Above this (seconds, on average), latency says more of the sidecar than of its targets.
TOLERANCE = 0.005


class LoopLag:
    def __init__(self) -> None:
        self.value = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def lagging(self) -> bool:
        return self.value > TOLERANCE

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def close(self) -> None:
        await stop(self._task)

    async def _watch(self) -> None:
        while True:
            asked = time.monotonic() + INTERVAL
            await asyncio.sleep(INTERVAL)
            late = max(0.0, time.monotonic() - asked)
            self.value += EWMA * (late - self.value)


LOOP_LAG = Key("loop-lag", lambda state: LoopLag())
