"""An InferenceTier's autoscaling: who owns its self-hosted backends' replicas, on which signal,
and the schedules that raise the floor."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from tierwise.api.common import DNS_LABEL, ApiModel, Invariant


class AutoscalingMode(StrEnum):
    BUILTIN = "Builtin"
    HPA = "HPA"
    KEDA = "KEDA"
    NONE = "None"


class ScalingSignal(StrEnum):
    IN_FLIGHT_PER_REPLICA = "InFlightPerReplica"
    QUEUE_DEPTH = "QueueDepth"
    TOKENS_PER_SECOND = "TokensPerSecond"
    SLO_HEADROOM = "SLOHeadroom"


class Weekday(StrEnum):
    MON = "Mon"
    TUE = "Tue"
    WED = "Wed"
    THU = "Thu"
    FRI = "Fri"
    SAT = "Sat"
    SUN = "Sun"


_CLOCK = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"


class ScalingSchedule(ApiModel):
    """A time window with its own replica floor (e.g. a night-time minimum, zero for batch tiers)."""

    name: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL, description="Name of the window.")
    start: str = Field(pattern=_CLOCK, description="Start time, HH:MM in timeZone.")
    end: str = Field(pattern=_CLOCK, description="End time, HH:MM in timeZone; before start means overnight.")
    days: list[Weekday] = Field(default_factory=list, max_length=7, description="Days it applies; empty is every day.")
    time_zone: str = Field(default="UTC", min_length=1, max_length=64, description="IANA time zone.")
    min_replicas: int = Field(ge=0, le=1000, description="Replica floor inside the window.")

    invariants = (
        Invariant(
            rule="self.start != self.end",
            message="start and end must differ",
            holds=lambda s: s.start != s.end,
            field=".end",
        ),
    )


class Autoscaling(ApiModel):
    """How the replicas of the tier's self-hosted backends follow load. One owner of spec.replicas."""

    mode: AutoscalingMode = Field(
        default=AutoscalingMode.BUILTIN,
        description="Builtin (the operator's SLO-aware autoscaler), HPA or KEDA (rendered objects own "
        "replicas), or None (replicas stay at the backend minimum).",
    )
    signal: ScalingSignal = Field(
        default=ScalingSignal.IN_FLIGHT_PER_REPLICA, description="Load signal read from Prometheus."
    )
    target: float = Field(default=8, gt=0, description="Target value of the signal per replica.")
    scale_down_stabilization_seconds: int = Field(
        default=300, ge=0, le=86400, description="Highest recommendation over this window wins a scale-down."
    )
    scale_up_stabilization_seconds: int = Field(default=0, ge=0, le=3600, description="Delay before scaling up.")
    schedules: list[ScalingSchedule] = Field(default_factory=list, max_length=16, description="Time windows.")
    scale_to_zero_after_idle_seconds: int | None = Field(
        default=None, ge=60, description="Scale to zero after this long with no traffic (batch tiers)."
    )
