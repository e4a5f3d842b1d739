"""How a gateway runs: limits, retries, timers, stores. Fixed for the life of the process."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tierwise_sidecar.validate import Limits


@dataclass(frozen=True)
class ForwardConfig:
    retries: int = 1
    backoff_base: float = 0.025
    backoff_cap: float = 0.25
    max_attempts: int = 6


@dataclass(frozen=True)
class GatewayConfig:
    limits: Limits = field(default_factory=Limits)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    reload_interval: float = 1.0
    dns_interval: float | None = None
    drain_seconds: float = 30.0
    unready_seconds: float = 2.0
    breaker_threshold: int = 5
    breaker_cooldown: float = 10.0
    max_tenants: int = 100
    # The ingress role: every request is served by the Policy's default tier, whatever it names.
    pin_tier: bool = False
    # Where budgets are counted: "memory", "sqlite:PATH" or a redis:// / rediss:// URL.
    budget_store: str = "memory"
    # A reservation's lease outlives its request's own deadline (the tier's total timeout) by this
    # much: the longest a dead sidecar's holds keep budget from others.
    lease_margin_seconds: float = 30.0
    # The spend of every sidecar as the operator publishes it (budgets.json beside the Policy):
    # counted by a sidecar that keeps its own ledger. None: it counts alone.
    published_budgets: Path | None = None
    # Where shared rate limits are counted: "memory" (this process) or a redis:// / rediss:// URL.
    rate_limit_store: str = "memory"
    # The operator's SLO steering of the namespace's tiers (steering.json beside the Policy).
    steering_file: Path | None = None
    # Wall-clock time, in seconds since the epoch: budget periods and leases. Tests move it.
    clock: Callable[[], float] = time.time
