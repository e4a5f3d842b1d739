"""The admission decisions without I/O: the adaptive limit, the waiting room's order and refusals,
and the degradation plan."""

from __future__ import annotations

import asyncio

import pytest

from tierwise.api.tier import DegradationStep, ShedPolicy
from tierwise_sidecar.admission import degrade
from tierwise_sidecar.admission import room as room_module
from tierwise_sidecar.admission.limit import DECREASE, MIN_WINDOW_SAMPLES, Limit
from tierwise_sidecar.admission.room import GoneError, RefusedError, Room, Ticket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ the adaptive limit


def _window(limit: Limit, clock: Clock, seconds: float, *, busy: bool = False, over: bool = False) -> None:
    for _ in range(MIN_WINDOW_SAMPLES):
        clock.now += 0.05
        limit.observe("whole", seconds, busy=busy, over_slo=over, now=clock.now)


def test_a_busy_answer_cuts_the_limit_once_per_round_trip() -> None:
    clock = Clock()
    limit = Limit(40.0, ceiling=64.0)
    limit.observe("busy", 0.01, busy=True, over_slo=False, now=clock.now)
    assert limit.value == pytest.approx(40 * DECREASE)
    # Answers to requests sent before the cut say nothing new: a burst of 429s is one cut.
    for _ in range(20):
        limit.observe("busy", 0.5, busy=True, over_slo=False, now=clock.now + 0.1)
    assert limit.value == pytest.approx(40 * DECREASE)
    clock.now += 1.0
    limit.observe("busy", 0.01, busy=True, over_slo=False, now=clock.now)
    assert limit.value == pytest.approx(40 * DECREASE * DECREASE)


def test_the_limit_rises_only_when_it_was_reached_and_the_window_was_clean() -> None:
    clock = Clock()
    limit = Limit(10.0, ceiling=64.0)
    _window(limit, clock, 0.1)
    assert limit.value == 10.0  # never reached: nothing learnt
    limit.reached(10)
    _window(limit, clock, 0.1)
    assert limit.value > 10.0
    assert limit.increases == 1


def test_queueing_inside_the_target_lowers_the_limit() -> None:
    clock = Clock()
    limit = Limit(16.0, ceiling=64.0)
    _window(limit, clock, 0.1)
    _window(limit, clock, 0.5)  # five times the target's recent best
    assert limit.congested
    assert limit.value == pytest.approx(16 * DECREASE)


def test_latency_a_few_milliseconds_over_a_fast_targets_best_is_not_queueing() -> None:
    """Tripled, but by 2 ms: the sidecar's own lateness or the node's scheduling, not a queue in the
    target. The same ratio over a whole answer of 16 tokens (32 ms more in all) is one."""
    clock = Clock()
    limit = Limit(16.0, ceiling=64.0)
    _window(limit, clock, 0.001)
    _window(limit, clock, 0.003)
    assert not limit.congested and limit.value == 16.0
    for seconds in (0.001, 0.003):
        for _ in range(MIN_WINDOW_SAMPLES):
            clock.now += 0.05
            limit.observe("whole", seconds, busy=False, over_slo=False, now=clock.now, scale=16)
    assert limit.congested and limit.value == pytest.approx(16 * DECREASE)


def test_answers_over_the_slo_lower_the_limit() -> None:
    clock = Clock()
    limit = Limit(16.0)
    _window(limit, clock, 0.1, over=True)
    assert limit.value < 16.0


def test_a_static_limit_never_moves() -> None:
    clock = Clock()
    limit = Limit(8.0, adaptive=False)
    limit.observe("busy", 0.01, busy=True, over_slo=False, now=clock.now)
    _window(limit, clock, 5.0, over=True)
    assert limit.value == 8.0


def test_the_limit_stays_within_floor_and_ceiling() -> None:
    clock = Clock()
    limit = Limit(2.0, floor=1.0, ceiling=3.0)
    for _ in range(10):
        clock.now += 1
        limit.observe("busy", 0.01, busy=True, over_slo=False, now=clock.now)
    assert limit.value == 1.0
    for _ in range(10):
        limit.reached(limit.slots)
        _window(limit, clock, 0.1)
    assert limit.value == 3.0


# ------------------------------------------------------------------ the waiting room


def _ticket(priority: int, own: int = 0, wait: float = 5.0, length: int = 100,
            shed: ShedPolicy = ShedPolicy.LOWEST_PRIORITY_FIRST) -> Ticket:  # fmt: skip
    return Ticket((priority, own), wait, length, shed)


def _run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_higher_priority_is_served_first_and_equal_priority_in_order() -> None:
    async def main() -> None:
        room = Room("t", Limit(1.0, adaptive=False))
        assert room.try_enter((0, 0))
        order: list[str] = []

        async def wait(name: str, ticket: Ticket) -> None:
            await room.enter(ticket, float("inf"), lambda: True)
            order.append(name)

        tasks = [asyncio.create_task(wait(n, t)) for n, t in
                 [("bronze1", _ticket(-0, -1)), ("silver", _ticket(0)), ("gold", _ticket(100)),
                  ("bronze2", _ticket(0, -1))]]  # fmt: skip
        await asyncio.sleep(0.01)
        assert room.waiting == 4
        for _ in range(4):
            room.leave(0.1)
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert order == ["gold", "silver", "bronze1", "bronze2"]

    _run(main())


def test_sheddable_requests_pass_when_there_is_room_and_are_refused_when_saturated() -> None:
    async def main() -> None:
        room = Room("t", Limit(1.0, adaptive=False))
        assert await room.enter(_ticket(-1), float("inf"), lambda: True) == 0.0
        with pytest.raises(RefusedError) as e:
            await room.enter(_ticket(-1), float("inf"), lambda: True)
        assert "sheddable" in e.value.reason
        assert e.value.retry_after > 0

    _run(main())


def test_a_wait_longer_than_allowed_is_refused_at_once_with_the_expected_wait() -> None:
    async def main() -> None:
        room = Room("t", Limit(1.0, adaptive=False))
        room.try_enter((0, 0))
        room.leave(2.0)  # a slot is held two seconds, lately
        room.try_enter((0, 0))
        gold = asyncio.create_task(room.enter(_ticket(10), float("inf"), lambda: True))
        await asyncio.sleep(0.01)
        with pytest.raises(RefusedError) as e:
            await room.enter(_ticket(0, wait=0.5), float("inf"), lambda: True)
        assert e.value.retry_after == pytest.approx(4.0)  # gold first, then its own turn: two holds
        assert room.waiting == 1
        # The highest rank present is never refused on an estimate: it waits its turn.
        top = asyncio.create_task(room.enter(_ticket(10, wait=0.5), float("inf"), lambda: True))
        await asyncio.sleep(0.01)
        assert room.waiting == 2 and not top.done()
        room.leave(0.1)
        await gold
        room.leave(0.1)
        await top

    _run(main())


def test_a_slot_above_the_known_capacity_is_a_probe_for_the_lowest_waiter() -> None:
    async def main() -> None:
        limit = Limit(2.0)
        limit.safe = 2.0  # the target is known to take two
        room = Room("t", limit)
        for _ in range(2):
            assert room.try_enter((0, 0))
        gold = asyncio.create_task(room.enter(_ticket(10), float("inf"), lambda: True))
        low = asyncio.create_task(room.enter(_ticket(0, -1), float("inf"), lambda: True))
        await asyncio.sleep(0.01)
        limit.value = 3.0  # the limit rose: the third slot is a probe that may come back 429
        room.dispatch()
        await asyncio.sleep(0.01)
        assert low.done() and not gold.done()
        room.leave(0.1)  # the third slot again: the probe was made, rank decides
        await asyncio.sleep(0.01)
        assert gold.done()

    _run(main())


def test_after_one_of_a_rank_waited_out_its_patience_the_next_are_refused_at_once() -> None:
    async def main() -> None:
        room = Room("t", Limit(1.0, adaptive=False))
        room.try_enter((0, 0))
        room.leave(0.01)
        room.try_enter((10, 0))  # gold asked lately: silver is refused on estimates
        with pytest.raises(RefusedError, match="maximum wait"):
            await room.enter(_ticket(0, wait=0.05), float("inf"), lambda: True)
        with pytest.raises(RefusedError, match="lately") as e:
            await room.enter(_ticket(0, wait=0.05), float("inf"), lambda: True)
        assert e.value.retry_after >= 0.05 and room.waiting == 0

    _run(main())


def test_a_full_room_gives_the_lowest_waiters_place_to_a_higher_one() -> None:
    async def main() -> None:
        room = Room("t", Limit(1.0, adaptive=False))
        room.try_enter((0, 0))
        low = asyncio.create_task(room.enter(_ticket(0, -1, length=1), float("inf"), lambda: True))
        await asyncio.sleep(0.01)
        high = asyncio.create_task(room.enter(_ticket(10, length=1), float("inf"), lambda: True))
        await asyncio.sleep(0.01)
        with pytest.raises(RefusedError, match="higher priority"):
            await low
        # A newcomer ranked below everyone waiting is refused itself.
        with pytest.raises(RefusedError, match="full"):
            await room.enter(_ticket(0, length=1), float("inf"), lambda: True)
        room.leave(0.1)
        await high
        assert room.in_flight == 1

    _run(main())


def test_a_caller_that_hangs_up_leaves_the_queue_and_a_slot_reaches_the_next() -> None:
    async def main() -> None:
        room = Room("t", Limit(1.0, adaptive=False))
        room.try_enter((0, 0))
        connected = [True]
        gone = asyncio.create_task(room.enter(_ticket(5), float("inf"), lambda: connected[0]))
        after = asyncio.create_task(room.enter(_ticket(0), float("inf"), lambda: True))
        await asyncio.sleep(0.01)
        connected[0] = False
        with pytest.raises(GoneError):
            await asyncio.wait_for(gone, 2)
        assert room.waiting == 1
        room.leave(0.1)
        await asyncio.wait_for(after, 1)
        assert room.in_flight == 1

    _run(main())


def test_waiters_keep_their_places_across_their_looks_at_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """Looking whether a caller is still there (every GONE_POLL_SECONDS) puts the waiter back
    where it was, once: slots still go first come, first served, one each."""
    monkeypatch.setattr(room_module, "GONE_POLL_SECONDS", 0.01)

    async def main() -> None:
        room = Room("t", Limit(1.0, adaptive=False))
        room.try_enter((0, 0))
        first = asyncio.create_task(room.enter(_ticket(0), float("inf"), lambda: True))
        await asyncio.sleep(0.005)
        second = asyncio.create_task(room.enter(_ticket(0), float("inf"), lambda: True))
        await asyncio.sleep(0.1)  # several looks each
        assert room.waiting == 2 and sum(1 for _, w in room.heap if not w.future.done()) == 2
        room.leave(0.1)
        await asyncio.wait_for(first, 1)
        assert not second.done() and room.in_flight == 1
        await asyncio.sleep(0.05)
        room.leave(0.1)
        await asyncio.wait_for(second, 1)
        assert room.in_flight == 1 and room.waiting == 0

    _run(main())


def test_a_look_at_a_connected_caller_keeps_the_slot_in_the_same_turn_for_its_rank() -> None:
    """The look at a waiter's caller decides only when it has to: a connected caller's waiter is
    left pending, so a slot freed in the same loop turn still goes to it, not to a lower rank."""

    async def main() -> None:
        room = Room("t", Limit(1.0, adaptive=False))
        room.try_enter((0, 0))
        high = asyncio.create_task(room.enter(_ticket(5), float("inf"), lambda: True))
        low = asyncio.create_task(room.enter(_ticket(0), float("inf"), lambda: True))
        await asyncio.sleep(0.01)
        waiter = next(w for _, w in room.heap if w.rank == (5, 0))
        room._look(waiter)  # the timer's look, then a slot freed before the waiter's task runs
        room.leave(0.1)
        await asyncio.wait_for(high, 1)
        assert not low.done() and room.in_flight == 1
        room.leave(0.1)
        await asyncio.wait_for(low, 1)

    _run(main())


def test_a_wait_ends_at_the_deadline_and_draining_refuses_with_503() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        room = Room("t", Limit(1.0, adaptive=False))
        room.try_enter((0, 0))
        room.leave(0.01)  # slots turn over fast, lately: a short wait is worth it
        room.try_enter((0, 0))
        with pytest.raises(RefusedError, match="maximum wait"):
            await room.enter(_ticket(0, wait=0.05), loop.time() + 10, lambda: True)
        waiting = asyncio.create_task(room.enter(_ticket(0), float("inf"), lambda: True))
        await asyncio.sleep(0.01)
        assert room.drain(0.0) == 1
        with pytest.raises(RefusedError) as e:
            await waiting
        assert e.value.status == 503

    _run(main())


# ------------------------------------------------------------------ degradation


STEPS = (
    DegradationStep(at_load_percent=50, max_tokens=64),
    DegradationStep(at_load_percent=80, max_tokens=16, max_temperature=0.3, disable_streaming=True),
)


def test_below_the_first_level_nothing_changes() -> None:
    assert degrade.plan(STEPS, 49.9) is None


def test_steps_add_up_and_only_real_changes_are_reported() -> None:
    p = degrade.plan(STEPS, 90)
    assert p is not None and p.level == 80 and p.max_tokens == 16 and p.no_stream
    body, changes = degrade.apply(p, "chat", {"model": "m", "max_tokens": 500, "stream": True,
                                              "stream_options": {"include_usage": True}}, stream=True)  # fmt: skip
    assert body["max_tokens"] == 16 and body["temperature"] == 0.3 and body["stream"] is False
    assert "stream_options" not in body
    assert changes == ["max_tokens=16", "temperature=0.3", "no_stream"]
    # Already within the caps: nothing to change, nothing reported.
    p = degrade.plan(STEPS, 60)
    assert p is not None
    body, changes = degrade.apply(p, "chat", {"model": "m", "max_tokens": 10, "temperature": 0.0}, stream=False)
    assert changes == [] and body["max_tokens"] == 10


def test_the_cap_applies_to_the_field_the_request_uses() -> None:
    p = degrade.plan(STEPS, 55)
    assert p is not None
    body, _ = degrade.apply(p, "chat", {"max_completion_tokens": 1000}, stream=False)
    assert body == {"max_completion_tokens": 64}


def test_while_the_sidecar_itself_lags_latency_is_not_held_against_the_target() -> None:
    clock = Clock()
    limit = Limit(16.0)
    for _ in range(MIN_WINDOW_SAMPLES):
        clock.now += 0.05
        limit.observe("whole", 0.1, busy=False, over_slo=False, now=clock.now)
    for _ in range(MIN_WINDOW_SAMPLES):  # five times slower and over the SLO, but the loop lags
        clock.now += 0.05
        limit.observe("whole", 0.5, busy=False, over_slo=True, now=clock.now, lagging=True)
    assert limit.value == 16.0 and not limit.congested
    clock.now += 1.0
    limit.observe("busy", 0.01, busy=True, over_slo=False, now=clock.now, lagging=True)
    assert limit.value < 16.0  # what the target says still counts


def test_an_outage_costs_the_limit_one_cut_a_rate_limit_every_signal() -> None:
    clock = Clock()
    room = Room("t", Limit(64.0), clock=clock)
    room.answered(clock.now - 0.2)  # it answered; then it went down
    assert room.congested(explicit=False, now=clock.now)  # the first 503 tells the limit
    for _ in range(20):  # the tries still in flight (begun before it) fail too: they do not
        clock.now += 0.01
        assert not room.congested(explicit=False, now=clock.now)
    room.answered(clock.now - 0.5)  # an answer to a try begun before the last signal: still down
    assert not room.congested(explicit=False, now=clock.now)
    clock.now += 0.3
    room.answered(clock.now - 0.1)  # a try begun since was answered: it is back, so the next counts
    assert room.congested(explicit=False, now=clock.now)
    assert room.congested(explicit=True, now=clock.now)  # a 429 is at capacity whatever came before
    assert room.congested(explicit=True, now=clock.now)
