"""The sidecar's stages, in the order a request passes them: the one list a new stage joins.

account (first in, last out: it sees every request) → validate → identify → estimate → cache →
budget → steer → route → admit → forward. Each entry builds its stage for a Policy from the shared state, or gives None
when the Policy leaves it nothing to do (no budget counts the namespace, say).
"""

from __future__ import annotations

from collections.abc import Callable

from tierwise_sidecar import account, estimate, forward, identify, route, steer, validate
from tierwise_sidecar.admission import stage as admit
from tierwise_sidecar.budgets import stage as budget
from tierwise_sidecar.cache import stage as cache
from tierwise_sidecar.pipeline import Chain, Stage
from tierwise_sidecar.runtime import Runtime
from tierwise_sidecar.state import SharedState

BUILDERS: tuple[Callable[[Runtime, SharedState], Stage | None], ...] = (
    account.build,
    validate.build,
    identify.build,
    estimate.build,
    cache.build,
    budget.build,
    steer.build,
    route.build,
    admit.build,
    forward.build,
)


def build_chain(runtime: Runtime, state: SharedState) -> Chain:
    return Chain([s for s in (b(runtime, state) for b in BUILDERS) if s is not None])
