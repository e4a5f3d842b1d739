"""What the operator writes into an InferenceTier's status."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from tierwise.api.common import ObjectStatus, StatusModel


class SLOState(StrEnum):
    MET = "Met"
    AT_RISK = "AtRisk"
    MISSED = "Missed"
    UNKNOWN = "Unknown"


class ObservedLatency(StatusModel):
    """Service level observed in Prometheus over the SLO window."""

    first_token_p95_milliseconds: float | None = Field(default=None, description="Observed p95 time to first byte.")
    first_token_p99_milliseconds: float | None = Field(default=None, description="Observed p99 time to first byte.")
    total_p95_milliseconds: float | None = Field(default=None, description="Observed p95 total time.")
    total_p99_milliseconds: float | None = Field(default=None, description="Observed p99 total time.")
    error_rate_percent: float | None = Field(default=None, description="Observed backend error rate.")
    availability_percent: float | None = Field(default=None, description="Observed caller-visible success.")


class Diversion(StatusModel):
    """Traffic the operator steers away from a tier that misses its SLO."""

    to: str = Field(description="The tier it goes to.")
    reason: str = Field(description="Promoted (promotion.borrowFrom) or Fallback (fallback.tier).")
    percent: int = Field(description="Share of the tier's requests sent there.")
    why: str = Field(default="", description="What missed, with the numbers.")


class InferenceTierStatus(ObjectStatus):
    """Observed state of an InferenceTier, written by the operator. Conditions: Ready, SLOMet, Degraded."""

    ready_backends: int | None = Field(default=None, description="Backends able to serve.")
    total_backends: int | None = Field(default=None, description="Backends declared.")
    replicas: int | None = Field(default=None, description="Replicas of self-hosted backends.")
    ready_replicas: int | None = Field(default=None, description="Ready replicas of self-hosted backends.")
    slo_state: SLOState | None = Field(default=None, description="Met, AtRisk, Missed or Unknown.")
    observed: ObservedLatency | None = Field(default=None, description="Service level seen in Prometheus.")
    routing_weights: dict[str, int] = Field(
        default_factory=dict, description="Current weight per backend: declared, or lowered while it misses the SLO."
    )
    observed_backends: dict[str, ObservedLatency] = Field(
        default_factory=dict, description="Service level of each backend seen in Prometheus (its own tries)."
    )
    diversion: Diversion | None = Field(
        default=None, description="Share of the tier's traffic sent to another tier while it misses its SLO."
    )
