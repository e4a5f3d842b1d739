"""Every waiting room of the sidecar, by upstream target; kept across Policy reloads.

A target is a model at one endpoint: an external API's URL, or one replica of a self-hosted
backend. Tiers that send the same model to the same endpoint share its room (and its limit), so
gold and bronze on one model server are ordered against each other. What a Policy says of a
target (adaptive or static, the ceiling) is merged once per Policy into a Settings object; a room
takes a new one when a request of a new Policy first reaches it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tierwise.policy import Policy
from tierwise_sidecar.admission.limit import Limit
from tierwise_sidecar.admission.room import Room
from tierwise_sidecar.endpoints import host_port
from tierwise_sidecar.state import Key

# Rooms of replicas that went away (pod IPs come and go) are forgotten past this many, idle ones first.
MAX_ROOMS = 1024


@dataclass(frozen=True, slots=True)
class Settings:
    """What the Policy says of a target's limit: learnt up to `ceiling`, or fixed at it."""

    ceiling: int
    adaptive: bool


def target_name(endpoint: str, model: str) -> str:
    """A target as metrics and logs show it: host:port and model, never a path or credentials."""
    return f"{host_port(endpoint)}/{model}"


def settings_of(policy: Policy, pin_tier: bool) -> dict[str, Settings]:
    """Per backend key, its target's settings, merged over the tiers sending the same model to the
    same URL: the largest ceiling, adaptive unless one of them fixes the limit. In the ingress role
    the one backend's limit is its replica's declared concurrency, fixed."""
    groups: dict[tuple[str, str], list[tuple[str, int, bool]]] = {}
    for name, tier in policy.tiers.items():
        spec = tier.spec
        for b in spec.backends:
            key = f"{name}/{b.name}"
            if pin_tier and b.deployment is not None:
                groups[(key, b.model)] = [(key, b.deployment.max_concurrency_per_replica, False)]
                continue
            where = b.url.rstrip("/") if b.url else key
            groups.setdefault((where, b.model), []).append(
                (key, spec.concurrency.max_in_flight, spec.concurrency.adaptive)
            )
    out: dict[str, Settings] = {}
    for members in groups.values():
        merged = Settings(max(c for _, c, _ in members), all(a for _, _, a in members))
        for key, _, _ in members:
            out[key] = merged
    return out


class Rooms:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.rooms: dict[str, Room] = {}
        self._settings: dict[str, Settings] = {}
        # While draining, no wait outlasts the drain (monotonic time).
        self.drain_until = math.inf

    def get(self, endpoint: str, model: str, settings: Settings) -> Room:
        key = f"{endpoint}\0{model}"
        room = self.rooms.get(key)
        if room is None:
            if len(self.rooms) >= MAX_ROOMS:
                self._forget_idle()
            limit = Limit(float(settings.ceiling), ceiling=float(settings.ceiling), adaptive=settings.adaptive)
            room = self.rooms[key] = Room(target_name(endpoint, model), limit, self.clock)
            self._settings[key] = settings
        elif self._settings.get(key) is not settings:
            self._settings[key] = settings
            limit = room.limit
            limit.ceiling, limit.adaptive = float(settings.ceiling), settings.adaptive
            limit.value = float(settings.ceiling) if not settings.adaptive else min(limit.value, limit.ceiling)
            room.dispatch()
        return room

    def _forget_idle(self) -> None:
        for key in [k for k, r in self.rooms.items() if not r.in_flight and not r.waiting]:
            del self.rooms[key]
            self._settings.pop(key, None)

    def drain(self, seconds: float) -> int:
        """SIGTERM: refuse (503) the waiters that cannot expect to start within `seconds`; those
        still waiting when it has passed are refused then."""
        self.drain_until = min(self.drain_until, self.clock() + seconds)
        asyncio.get_running_loop().call_later(max(seconds, 0.0), self._refuse_all)
        return sum(room.drain(seconds) for room in self.rooms.values())

    def _refuse_all(self) -> None:
        for room in self.rooms.values():
            room.drain(0.0)

    def load(self) -> Iterable[tuple[str, float, int, int, int, int]]:
        for room in list(self.rooms.values()):
            lim = room.limit
            yield room.name, float(lim.slots), room.in_flight, room.waiting, lim.decreases, lim.increases


ROOMS = Key("admission-rooms", lambda state: Rooms())
