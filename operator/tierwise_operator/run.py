"""`tierwise operator`: kopf's watches, the manager's controllers, and a small HTTP server for
liveness (/healthz), readiness (/readyz: the cache is primed and kopf is watching) and /metrics.

One active operator at a time: it is deployed as a single replica with the Recreate strategy
(docs/operator.md says why not kopf peering or a Lease).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import threading

import kopf

from tierwise_operator import handlers
from tierwise_operator.controllers.registry import register
from tierwise_operator.health import serve_health
from tierwise_operator.kube import SCALED_OBJECT, ApiError, Kube
from tierwise_operator.manager import Config, Manager
from tierwise_operator.metrics import OperatorMetrics
from tierwise_operator.store import Store

log = logging.getLogger("tierwise.operator")


async def prime(kube: Kube, manager: Manager) -> None:
    """List every watched kind once before the first reconcile, so no Policy is ever compiled from
    a half-filled cache (which would write a wrong Policy, then the right one)."""
    for kind, managed in handlers.WATCHED:
        try:
            items = await kube.list(kind, label_selector=handlers.MANAGED_SELECTOR if managed else None)
        except ApiError as e:
            if e.status == 404:  # e.g. KEDA not installed
                continue
            raise
        for obj in items:
            manager.observe(kind.kind, obj, deleted=False)


async def operate(args: argparse.Namespace) -> None:
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    metrics = OperatorMetrics()
    kube = await Kube.connect(args.kubeconfig, on_write=lambda verb, kind: metrics.count_write(verb, kind.kind))
    config = Config(
        platform_namespace=args.platform_namespace,
        prometheus_url=args.prometheus_url,
        sidecar_image=args.sidecar_image,
        autoscale_interval=args.autoscale_interval,
        slo_interval=args.slo_interval,
        steering_hold=args.steering_hold,
        redis_url=args.redis_url,
        spend_interval=args.spend_interval,
    )
    manager = Manager(kube, Store(), config, metrics)
    register(manager)
    ready, alive, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
    kopf_ready = threading.Event()
    loop = asyncio.get_running_loop()

    def stopping(sig: signal.Signals) -> None:
        log.info("%s received: stopping (work in flight is finished or resumed by the next operator)", sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping, sig)
    runner = await serve_health(args.health_port, ready, alive, metrics.registry)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, manager)
    manager.keda_installed = await kube.serves(SCALED_OBJECT)
    await prime(kube, manager)
    alive.set()
    kopf_task = asyncio.create_task(
        kopf.operator(
            registry=registry,
            settings=handlers.settings(),
            clusterwide=True,
            standalone=True,
            ready_flag=kopf_ready,
            stop_flag=stop,
        )
    )
    manager.start()
    manager.requeue_all()
    while not kopf_ready.is_set() and not kopf_task.done():
        await asyncio.sleep(0.1)
    ready.set()
    log.info("operator ready: %d tiers cached", len(list(manager.store.all("InferenceTier"))))
    try:
        await kopf_task
        log.info("watches stopped; operator exiting")
    finally:
        ready.clear()
        await manager.stop()
        await runner.cleanup()
        await kube.close()


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=os.environ.get("TIERWISE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("kopf").setLevel(logging.WARNING)
    asyncio.run(operate(args))
    return 0
