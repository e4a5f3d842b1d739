"""kopf's part: watch streams (with relisting, reconnection and backoff) feeding the manager's
cache and work queue. Handlers are one line each; all decisions live in the controllers.

Only `on.event` handlers are used: they need no finalizer and write no annotation or status of
kopf's own, so watching costs the cluster nothing and an idle operator makes no writes.
"""

from __future__ import annotations

import os
from typing import Any

import kopf
from kopf._cogs.structs.references import Selector  # not re-exported; the documented key type of label_selectors

from tierwise.naming import MANAGED_BY, MANAGED_BY_LABEL
from tierwise_operator.kube import (
    BUDGET,
    CACHE,
    CONFIGMAP,
    DEPLOYMENT,
    HPA,
    NAMESPACE,
    PDB,
    SCALED_OBJECT,
    SERVICE,
    TIER,
    Kind,
)
from tierwise_operator.manager import Manager

# Every kind the manager caches, and whether only the operator's own objects are wanted.
WATCHED: tuple[tuple[Kind, bool], ...] = (
    (TIER, False),
    (BUDGET, False),
    (CACHE, False),
    (NAMESPACE, False),
    (DEPLOYMENT, True),
    (SERVICE, True),
    (PDB, True),
    (HPA, True),
    (SCALED_OBJECT, True),
    (CONFIGMAP, True),
)
MANAGED_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"


def settings() -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    # Events are posted by the controllers, on transitions only; kopf's own would add noise.
    s.posting.enabled = False
    s.watching.server_timeout = 300
    s.watching.client_timeout = 330
    for kind, managed in WATCHED:
        if managed:
            # Server-side: the operator never receives, caches or holds objects it does not own.
            s.watching.label_selectors[Selector(group=kind.group, plural=kind.plural)] = MANAGED_SELECTOR
    return s


def register(registry: kopf.OperatorRegistry, manager: Manager) -> None:
    def make(kind: str) -> Any:
        async def on_event(event: kopf.RawEvent, **_: Any) -> None:
            obj = dict(event["object"])
            obj.setdefault("kind", kind)
            manager.observe(kind, obj, deleted=event.get("type") == "DELETED")

        return on_event

    for kind, _managed in WATCHED:
        kopf.on.event(
            group=kind.group, version=kind.version, plural=kind.plural, registry=registry, id=f"watch-{kind.plural}"
        )(make(kind.kind))

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        if "KUBECONFIG" not in os.environ:
            found = kopf.login_with_service_account(**kwargs)
            if found is not None:
                return found
        return kopf.login_with_kubeconfig(**kwargs)
