"""What a Policy becomes inside the sidecar: per-tier routing tables built once, not per request.

A Runtime is immutable and swapped whole on reload; a request keeps the one it started with.
State that must outlive a reload (breakers, session pins, in-flight counts) lives in `Health`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from tierwise.api.tier import SLO, Backend, FailureKind, InferenceTierSpec, Pricing, RoutingStrategy
from tierwise.money import Rates
from tierwise.naming import backend_key, serving_port
from tierwise.policy import Policy
from tierwise_sidecar.breaker import Breaker
from tierwise_sidecar.endpoints import Endpoints
from tierwise_sidecar.identify import TierAccess, model_routes
from tierwise_sidecar.secrets import SecretSource
from tierwise_sidecar.state import Key, SharedState
from tierwise_sidecar.sticky import SessionPins

USER_AGENT = "tierwise-sidecar"

log = logging.getLogger("tierwise.sidecar")

CONNECT_SECONDS = 3.0
FIRST_BYTE_SECONDS = 30.0
TOTAL_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class Timeouts:
    """connect: TCP/TLS; first_byte: to the first streamed byte and between chunks; attempt: one
    non-streamed try (leaves room for a fallback); total: the whole request, fallbacks included."""

    connect: float
    first_byte: float
    attempt: float
    total: float


def timeouts_for(slo: SLO) -> Timeouts:
    """Timeouts from the tier's SLO: past its p99 a request is in the tail the SLO excludes, so it
    is better retried elsewhere than waited for."""

    def ms(p99: int | None, p95: int | None) -> float | None:
        if p99 is not None:
            return p99 / 1000
        return 2 * p95 / 1000 if p95 is not None else None

    first_byte = ms(slo.first_token_p99_milliseconds, slo.first_token_p95_milliseconds)
    total = ms(slo.total_p99_milliseconds, slo.total_p95_milliseconds)
    if total is None:
        total = max(TOTAL_SECONDS, first_byte or 0)
    if first_byte is None:
        first_byte = min(FIRST_BYTE_SECONDS, total)
    total = max(total, first_byte)
    attempt = slo.total_p95_milliseconds / 1000 if slo.total_p95_milliseconds else total / 2
    return Timeouts(min(CONNECT_SECONDS, first_byte), first_byte, max(min(attempt, total), first_byte), total)


def blended_price(p: Pricing) -> float:
    """One number to rank backends by price: three input tokens to one output, a typical chat mix."""
    return (3 * p.input_per_million + p.output_per_million) / 4


@dataclass(frozen=True, slots=True)
class BackendRoute:
    tier: str
    name: str
    key: str
    model: str
    pricing: Pricing
    rates: Rates
    price: float
    strength: int
    max_context: int
    weight: int
    url: str | None
    spec: Backend = field(repr=False)
    api_key: str | None = field(repr=False)
    # The request headers of every try on it (the second for a low-priority request to a
    # self-hosted replica, whose ingress orders its waiting room by it): built once per Policy.
    headers: Mapping[str, str] = field(repr=False, compare=False, default_factory=dict)
    low_headers: Mapping[str, str] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def of(cls, tier: str, b: Backend, secrets: SecretSource) -> BackendRoute:
        api_key = secrets.get(b.api_key_secret_ref) if b.api_key_secret_ref else None
        # Named, not aiohttp's default; set here rather than skipped per session (aiohttp copies the
        # headers of every request to skip one).
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity", "User-Agent": USER_AGENT}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        low = {**headers, "x-tierwise-priority": "low"} if b.deployment is not None else headers
        return cls(
            tier=tier,
            name=b.name,
            key=backend_key(tier, b.name),
            model=b.model,
            pricing=b.pricing,
            rates=Rates.of(b.pricing),
            price=blended_price(b.pricing),
            strength=b.capabilities.strength,
            max_context=b.capabilities.max_context_tokens,
            weight=b.weight,
            url=b.url.rstrip("/") if b.url else None,
            spec=b,
            api_key=api_key,
            headers=headers,
            low_headers=low,
        )


@dataclass(frozen=True, slots=True)
class TierRoute:
    name: str
    backends: tuple[BackendRoute, ...]
    by_price: tuple[BackendRoute, ...]
    by_strength: tuple[BackendRoute, ...]
    timeouts: Timeouts
    fallback: tuple[str, ...]
    triggers: frozenset[FailureKind]
    strategy: RoutingStrategy
    cheap_below: float
    strong_at: float
    sticky_ttl: float | None
    # The largest context among its backends: a prompt at or above it fits none of them.
    max_context: int
    # Whether a request entering this tier needs a difficulty score (this tier or a fallback
    # routes by cost): scoring is skipped for everyone else.
    needs_score: bool = False

    @classmethod
    def of(cls, name: str, spec: InferenceTierSpec, chain: Sequence[str], secrets: SecretSource) -> TierRoute:
        backends = tuple(BackendRoute.of(name, b, secrets) for b in spec.backends)
        return cls(
            name=name,
            backends=backends,
            by_price=tuple(sorted(backends, key=lambda b: (b.price, -b.strength))),
            by_strength=tuple(sorted(backends, key=lambda b: (-b.strength, b.price))),
            timeouts=timeouts_for(spec.slo),
            fallback=tuple(chain),
            triggers=frozenset(spec.fallback.triggers) if spec.fallback else frozenset(),
            strategy=spec.routing.strategy,
            cheap_below=spec.routing.cost_aware.cheap_below,
            strong_at=spec.routing.cost_aware.strong_at_or_above,
            sticky_ttl=float(spec.routing.stickiness.ttl_seconds) if spec.routing.stickiness.enabled else None,
            max_context=max((b.max_context for b in backends), default=0),
        )


@dataclass(frozen=True)
class Runtime:
    policy: Policy
    tiers: dict[str, TierRoute]
    access: TierAccess

    @property
    def namespace(self) -> str:
        return self.policy.namespace

    def keys_changed(self, secrets: SecretSource) -> bool:
        """Does any backend's Secret now hold another key than the one in use?"""
        return any(
            b.spec.api_key_secret_ref is not None and secrets.get(b.spec.api_key_secret_ref) != b.api_key
            for t in self.tiers.values()
            for b in t.backends
        )


def build_runtime(policy: Policy, secrets: SecretSource, pin_tier: bool = False, *, calls: bool = True) -> Runtime:
    """`pin_tier`: every request is served by the Policy's default tier (the ingress role).
    `calls` False: the runtime never calls a backend (an estimate), so a missing API key is no news."""
    tiers = {
        name: TierRoute.of(name, t.spec, [c for c in t.fallback_chain if c in policy.tiers], secrets)
        for name, t in policy.tiers.items()
    }
    cost_aware = {n for n, t in tiers.items() if t.strategy is RoutingStrategy.COST_AWARE}
    tiers = {n: replace(t, needs_score=bool(cost_aware & {n, *t.fallback})) for n, t in tiers.items()}
    for t in tiers.values() if calls else ():
        for b in t.backends:
            ref = b.spec.api_key_secret_ref
            if ref is not None and b.api_key is None:
                log.warning("backend %s: Secret %s key %s not found; sending no API key", b.key, ref.name, ref.key)
    served = {n: (policy.tiers[n].spec.priority, {b.model for b in t.backends}) for n, t in tiers.items()}
    access = TierAccess(
        policy.namespace,
        frozenset(tiers),
        frozenset(policy.unavailable_tiers),
        policy.default_tier,
        pin_tier,
        model_routes(served, policy.default_tier),
        bool(policy.refuse_unknown_models),
    )
    return Runtime(policy, tiers, access)


def self_hosted(policy: Policy) -> list[tuple[str, str, str, int]]:
    """(tier, backend, namespace, port) of every self-hosted backend, for endpoint discovery."""
    return [
        (name, b.name, t.namespace, serving_port(b.deployment.port, b.deployment.sidecar))
        for name, t in policy.tiers.items()
        for b in t.spec.backends
        if b.deployment is not None
    ]


def self_hosted_keys(policy: Policy) -> list[str]:
    return [backend_key(tier, backend) for tier, backend, _, _ in self_hosted(policy)]


class Health:
    """What the sidecar learnt about its upstreams; survives Policy reloads."""

    def __init__(self, endpoints: Endpoints, breaker_threshold: int = 5, breaker_cooldown: float = 10.0) -> None:
        self.endpoints = endpoints
        self.pins = SessionPins()
        self.in_flight: dict[str, int] = {}
        self._breakers: dict[tuple[str, str], Breaker] = {}
        self._threshold = breaker_threshold
        self._cooldown = breaker_cooldown

    def targets(self, backend: BackendRoute) -> tuple[str, ...]:
        return (backend.url,) if backend.url else self.endpoints.get(backend.key)

    def breaker(self, backend: BackendRoute, endpoint: str) -> Breaker:
        key = (backend.key, endpoint)
        b = self._breakers.get(key)
        if b is None:
            b = self._breakers[key] = Breaker(self._threshold, self._cooldown)
        return b

    def usable(self, backend: BackendRoute, now: float) -> bool:
        """Has the backend an endpoint whose breaker would let a request through?"""
        targets = self.targets(backend)
        if len(targets) == 1:  # a provider URL, or one replica: no generator for the usual case
            return self.breaker(backend, targets[0]).available(now)
        return any(self.breaker(backend, e).available(now) for e in targets)

    def prune(self) -> None:
        """Forget breakers of replicas that are gone (pod IPs come and go)."""

        def alive(key: str, endpoint: str) -> bool:
            known = self.endpoints.get(key)  # empty for external backends: their URL stays
            return not known or endpoint in known

        self._breakers = {k: b for k, b in self._breakers.items() if alive(*k)}

    def open_targets(self, backend: BackendRoute, now: float) -> int:
        return sum(1 for e in self.targets(backend) if not self.breaker(backend, e).available(now))


def _health(state: SharedState) -> Health:
    return Health(Endpoints(), state.config.breaker_threshold, state.config.breaker_cooldown)


HEALTH = Key("health", _health)


def unreachable(runtime: Runtime, health: Health) -> list[str]:
    """Backends with no endpoint to send to (a self-hosted backend whose replicas are unknown)."""
    return [b.key for t in runtime.tiers.values() for b in t.backends if not health.targets(b)]
