"""The admit stage: rate limits, graceful degradation, and the waiting room of the target.

On the way in (after routing, so the target is known): the tier's token buckets are charged (a
refusal is a 429 `rate_limit_exceeded` with the time until a token is there); the load of the
first target picks the degradation steps that apply; the request gets a Gate, through which the
forward stage takes a slot of each target it tries: at once when one is free, else in priority
order in the target's waiting room. A refusal there is a 429 `tier_overloaded` with the expected
wait as Retry-After (503 while the sidecar drains). On the way out the slot is given back and the
tokens bucket corrected to what was used.

A request's rank is its tier's priority, then its own: the `x-tierwise-priority` header may lower
a request within its tier (low), never raise it above the tier's (high counts as normal here).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from tierwise.api.tier import DegradationStep, FailureKind, InferenceTierSpec
from tierwise.policy import Policy
from tierwise_sidecar.admission import degrade
from tierwise_sidecar.admission.lag import LOOP_LAG, LoopLag
from tierwise_sidecar.admission.metrics import ADMISSION_METRICS, AdmissionMetrics
from tierwise_sidecar.admission.rates import InProcessRates, RateRule, Rates
from tierwise_sidecar.admission.room import GoneError, RefusedError, Room, Ticket
from tierwise_sidecar.admission.rooms import ROOMS, Rooms, Settings, settings_of
from tierwise_sidecar.errors import INVALID_REQUEST, RATE_LIMIT, SERVER, ApiError, retry_after
from tierwise_sidecar.estimate import reserve_amount
from tierwise_sidecar.route import CHEAP, Decision
from tierwise_sidecar.runtime import HEALTH, Health
from tierwise_sidecar.state import Key, SharedState
from tierwise_sidecar.upstream import BUSY

if TYPE_CHECKING:
    from tierwise_sidecar.exchange import Exchange, Reply
    from tierwise_sidecar.runtime import Runtime
    from tierwise_sidecar.upstream import Candidate, Started

H_QUEUE_WAIT = "x-tierwise-queue-wait-ms"
H_DEGRADED = "x-tierwise-degraded"
H_RATE_LIMITED = "x-tierwise-rate-limited"
# The most times one request waits again for a target that turned it away at capacity.
MAX_REQUEUES = 16


@dataclass(frozen=True, slots=True)
class TierRules:
    """What admission needs of one tier, compiled once per Policy."""

    rate: RateRule | None
    steps: tuple[DegradationStep, ...]
    # The tier's p95 objectives in seconds (None: not declared): an answer slower than its kind's
    # objective tells the target's limit it is too high.
    first_byte_slo: float | None
    total_slo: float | None
    # What a request asks of a waiting room: at the tier's priority, or lowered by its header.
    normal: Ticket
    low: Ticket

    @classmethod
    def of(cls, name: str, spec: InferenceTierSpec) -> TierRules:
        slo = spec.slo

        def seconds(ms: int | None) -> float | None:
            return ms / 1000 if ms is not None else None

        q = spec.queue
        return cls(
            normal=Ticket((spec.priority, 0), q.max_wait_milliseconds / 1000, q.max_length, q.shed),
            low=Ticket((spec.priority, -1), q.max_wait_milliseconds / 1000, q.max_length, q.shed),
            rate=RateRule.of(name, spec.rate_limit) if spec.rate_limit is not None else None,
            steps=tuple(spec.degradation.steps),
            first_byte_slo=seconds(slo.first_token_p95_milliseconds),
            total_slo=seconds(slo.total_p95_milliseconds),
        )


@dataclass(slots=True)
class AdmissionNote:
    """What admission did to a request, for its response headers."""

    waited: float = 0.0
    changes: Sequence[str] = ()
    level: int = 0
    # What the rate limit took: (rule, bucket key, tokens charged, judged locally).
    charged: tuple[RateRule, str, float, bool] | None = None
    # A slot was had: the degradation decided on the way in was served (not refused).
    admitted: bool = False

    def write_headers(self, h: dict[str, str]) -> None:
        """Add what the caller is told to the answer's headers `h`."""
        waited = self.waited
        h[H_QUEUE_WAIT] = str(round(waited * 1000)) if waited else "0"
        if self.changes and self.admitted:
            h[H_DEGRADED] = f"load={self.level}%; " + ", ".join(self.changes)


def refusal(e: RefusedError) -> ApiError:
    if e.status == 503:
        return ApiError(503, e.reason, SERVER, "shutting_down", headers={"Retry-After": retry_after(e.retry_after)})
    return ApiError(429, e.reason, RATE_LIMIT, "tier_overloaded", headers={"Retry-After": retry_after(e.retry_after)})


class Gate:
    """A request's way to the targets it is sent to: one slot held at a time."""

    __slots__ = ("first", "room", "since", "stage", "ticket", "x")

    def __init__(self, stage: AdmissionStage, x: Exchange, ticket: Ticket) -> None:
        self.stage = stage
        self.x = x
        self.ticket = ticket
        self.room: Room | None = None
        self.since = 0.0
        self.first = True

    def to_now(self, cand: Candidate) -> bool:
        """A slot of the candidate's target had at once: the one held, or a free one (most tries
        get theirs here, without a coroutine). False: `to` waits for one."""
        room = self.stage.room(cand)
        if room is self.room:
            return True
        self.release()
        if not room.try_enter(self.ticket.rank):
            return False
        self.first = False
        self._admitted(room, 0.0)
        return True

    async def to(self, cand: Candidate) -> bool:
        """A slot of the candidate's target. The first target's refusal answers the request; a later
        one (failing over) skips the candidate."""
        room = self.stage.room(cand)
        if room is self.room:
            return True
        self.release()
        first, self.first = self.first, False
        return await self._enter(room, cand, raising=first)

    async def _enter(self, room: Room, cand: Candidate, raising: bool) -> bool:
        waited = 0.0 if room.try_enter(self.ticket.rank) else await self._wait(room, cand, raising)
        if waited < 0:
            return False
        self._admitted(room, waited)
        return True

    def _admitted(self, room: Room, waited: float) -> None:
        x = self.x
        self.room, self.since = room, time.monotonic()
        assert x.admission is not None
        x.admission.waited += waited
        x.admission.admitted = True
        self.stage.metrics.wait.observe((x.identity.namespace, x.identity.tier), waited)

    async def _wait(self, room: Room, cand: Candidate, raising: bool) -> float:
        """No slot free: wait in the room. Seconds waited, or -1 when refused and not raising."""
        x, metrics = self.x, self.stage.metrics
        labels = (x.identity.namespace, cand.tier.name, cand.backend.name)
        metrics.waiting.inc(labels)
        try:
            return await room.enter(self.ticket, min(x.deadline, self.stage.rooms.drain_until), x.sink.connected)
        except RefusedError as e:
            metrics.refusals.inc((x.identity.namespace, x.identity.tier, e.kind))
            if raising:
                raise refusal(e) from None
            return -1.0
        except GoneError:
            raise ApiError(499, "the client closed the request while it waited", INVALID_REQUEST,
                           "client_closed_request") from None  # fmt: skip
        finally:
            metrics.waiting.inc(labels, -1)

    async def requeue(self, cand: Candidate) -> bool:
        """The target turned the try away as over its capacity: wait for a slot of it again, in rank
        order, when it is serving others (so it has capacity, only less than the limit said). A
        target that refuses while serving nobody is rate limiting or broken: fail over as ever."""
        room = self.room
        if room is None or room.in_flight <= 1 or self.x.outcome.requeued >= MAX_REQUEUES:
            return False
        self.release()
        self.stage.metrics.requeued.inc((self.x.identity.namespace, self.x.identity.tier))
        assert self.x.admission is not None
        # The wait is the request's, not each try's: what is left of it.
        self.ticket = replace(self.ticket, max_wait=max(0.0, self.ticket.max_wait - self.x.admission.waited))
        return await self._enter(room, cand, raising=False)

    def observe(self, cand: Candidate, seconds: float, started: Started | None, failure: FailureKind | None) -> None:
        """What a try tells the target's limit."""
        room = self.room
        if room is None or not room.limit.adaptive:
            return
        now = time.monotonic()
        if failure is not None:
            # Cutting the limit at every failed try of an outage (its breaker's business) would
            # throttle the tier for long after the target is back.
            if failure in BUSY and room.congested(failure is FailureKind.RATE_LIMITED, now):
                room.limit.observe("busy", seconds, busy=True, over_slo=False, now=now)
            return
        if started is None:
            return
        room.answered(now - seconds)
        rules = self.stage.tiers.get(cand.tier.name)
        lagging = self.stage.lag.lagging
        if self.x.stream:
            slo = rules.first_byte_slo if rules else None
            room.limit.observe("first", seconds, busy=False, over_slo=slo is not None and seconds > slo, now=now,
                               lagging=lagging)  # fmt: skip
            return
        slo = rules.total_slo if rules else None
        usage = started.data.get("usage")
        generated = usage.get("completion_tokens") if isinstance(usage, dict) else None
        tokens = generated if isinstance(generated, int) and generated > 1 else 1
        room.limit.observe("whole", seconds / tokens, busy=False, over_slo=slo is not None and seconds > slo, now=now,
                           lagging=lagging, scale=tokens)  # fmt: skip

    def release(self) -> None:
        room = self.room
        if room is not None:
            self.room = None
            room.leave(time.monotonic() - self.since)


class AdmissionStage:
    name = "admit"

    def __init__(
        self, tiers: dict[str, TierRules], settings: dict[str, Settings], *, rooms: Rooms, rates: Rates,
        health: Health, metrics: AdmissionMetrics, lag: LoopLag,
    ) -> None:  # fmt: skip
        self.tiers = tiers
        self.settings = settings
        self.rooms = rooms
        self.rates = rates
        self.health = health
        self.metrics = metrics
        self.lag = lag
        self._default = Settings(64, True)

    def activate(self) -> None:
        self.metrics.targets.load = self.rooms.load

    def room(self, cand: Candidate) -> Room:
        return self.rooms.get(cand.endpoint, cand.backend.model, self.settings.get(cand.backend.key, self._default))

    async def enter(self, x: Exchange) -> Reply | None:
        who = x.identity
        rules = self.tiers[who.tier]
        x.admission = note = AdmissionNote()
        if rules.rate is not None:
            await self._rate(x, rules.rate, note)
        if rules.steps and x.decision is not None and x.decision.order:
            self._degrade(x, rules, note)
        x.gate = Gate(self, x, rules.low if who.priority < 0 else rules.normal)
        return None

    async def _rate(self, x: Exchange, rule: RateRule, note: AdmissionNote) -> None:
        who = x.identity
        key = rule.key(who.namespace, who.tenant)
        cost = rule.charge(reserve_amount(x, x.runtime.tiers[who.tier]).tokens)
        verdict = await self.rates.take(rule, who.namespace, key, cost)
        if not verdict.allowed:
            self.metrics.refusals.inc((who.namespace, who.tier, f"rate_{verdict.which}"))
            what = "requests per second" if verdict.which == "requests" else "tokens per minute"
            raise ApiError(
                429,
                f"rate limit of tier {who.tier} reached ({what}); retry after {verdict.retry_after:.2f}s",
                RATE_LIMIT,
                "rate_limit_exceeded",
                headers={"Retry-After": retry_after(verdict.retry_after), H_RATE_LIMITED: verdict.which},
            )
        note.charged = (rule, key, cost, verdict.local)

    def _degrade(self, x: Exchange, rules: TierRules, note: AdmissionNote) -> None:
        decision = x.decision
        assert decision is not None
        first = decision.order[0]
        targets = self.health.targets(first)
        if not targets:
            return
        room = self.rooms.get(targets[0], first.model, self.settings.get(first.key, self._default))
        p = degrade.plan(rules.steps, room.load_percent)
        if p is None:
            return
        body, changes = degrade.apply(p, x.kind, x.body, x.stream)
        if not changes:
            return
        if p.cheapest:
            by_price = x.runtime.tiers[x.identity.tier].by_price
            x.decision = Decision(tuple(b for b in by_price if b in decision.order), CHEAP, decision.score)
        if degrade.NO_STREAM in changes:
            x.stream, x.unstreamed = False, True
        x.body, x.altered = body, True
        x.payloads.clear()
        note.changes, note.level = changes, p.level

    async def leave(self, x: Exchange) -> None:
        if x.gate is not None:
            x.gate.release()
            # The gate and the exchange refer to each other: left linked, every request would wait
            # for a cyclic garbage collection to be freed (hundreds of requests' objects at a time).
            x.gate = None
        note = x.admission
        if note is None:
            return
        if note.admitted:
            for change in note.changes:
                self.metrics.degraded.inc((x.identity.namespace, x.identity.tier, change.partition("=")[0]))
        if note.charged is None:
            return
        rule, key, cost, local = note.charged
        # The estimate charged against what was used (nothing, for a request that failed or was refused).
        self.rates.correct(rule, x.identity.namespace, key, cost - x.outcome.tokens, local)


def _rates(state: SharedState) -> Rates:
    store = state.config.rate_limit_store
    if store.startswith(("redis://", "rediss://", "unix://")):
        from tierwise_sidecar.admission.shared_rates import SharedRates

        return SharedRates(store, state.get(ADMISSION_METRICS))
    return InProcessRates()


RATES = Key("admission-rates", _rates)


def build(runtime: Runtime, state: SharedState) -> AdmissionStage:
    policy: Policy = runtime.policy
    tiers = {name: TierRules.of(name, t.spec) for name, t in policy.tiers.items()}
    return AdmissionStage(tiers, settings_of(policy, state.config.pin_tier), rooms=state.get(ROOMS),
                          rates=state.get(RATES), health=state.get(HEALTH),
                          metrics=state.get(ADMISSION_METRICS), lag=state.get(LOOP_LAG))  # fmt: skip
