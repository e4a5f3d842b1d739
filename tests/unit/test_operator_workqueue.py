"""The operator's work queue: coalescing, one worker per key, per-key backoff, prompt rework."""

from __future__ import annotations

import asyncio

from tierwise_operator.workqueue import RetryLaterError, WorkQueue


def test_a_failing_key_backs_off_alone_and_a_change_is_worked_promptly() -> None:
    async def scenario() -> None:
        worked: list[str] = []
        fail = {"bad"}

        async def work(key: str) -> None:
            worked.append(key)
            await asyncio.sleep(0.01)
            if key in fail:
                raise RetryLaterError("transient", after=60)

        q: WorkQueue[str] = WorkQueue(work, workers=2, on_error=lambda k, e: None)
        q.start()
        for k in ("a", "bad", "a", "b", "a"):
            q.add(k)
        await asyncio.sleep(0.1)
        assert sorted(worked) == ["a", "b", "bad"]  # "a" queued three times, worked once
        assert len(q) == 1  # "bad" waits out its 60 s backoff; the others are done
        fail.clear()
        q.add_after("bad", 0.05)  # the object changed: worked after the short delay, not in 60 s
        await asyncio.wait_for(q.drained(), 2)
        assert worked.count("bad") == 2
        await q.stop()

    asyncio.run(scenario())


def test_a_key_queued_while_running_is_worked_again_after() -> None:
    async def scenario() -> None:
        running = 0
        most = 0
        seen = 0

        async def work(key: str) -> None:
            nonlocal running, most, seen
            running += 1
            most = max(most, running)
            seen += 1
            await asyncio.sleep(0.05)
            running -= 1

        q: WorkQueue[str] = WorkQueue(work, workers=4)
        q.start()
        q.add("k")
        await asyncio.sleep(0.01)
        q.add("k")  # arrives mid-run: never two at once, but not lost either
        await asyncio.wait_for(q.drained(), 2)
        assert (most, seen) == (1, 2)
        await q.stop()

    asyncio.run(scenario())
