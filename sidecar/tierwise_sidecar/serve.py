"""Serving a Gateway: its listeners, a heap the collector does not rescan, a graceful drain."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Callable

from aiohttp import web

from tierwise_sidecar.app import Gateway

log = logging.getLogger("tierwise.sidecar")


# Young objects (a request's) are collected after this many allocations instead of 700: most die by
# reference counting anyway, and each collection has a fixed cost the request path pays.
GC_YOUNG_THRESHOLD = 20_000


def settle_the_heap() -> None:
    """Move what start-up built (modules, the Policy, tiktoken's tables: some 60k objects) out of
    the garbage collector's sight: a full collection over them takes ~27 ms, a pause every request
    in flight would wait out and a tail-latency spike under load. Later collections scan only what
    requests and reloads create."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def run(
    gateway: Gateway,
    host: str,
    port: int,
    ready: Callable[[int], None] | None = None,
    health_port: int | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain: stop accepting, let in-flight requests and streams
    finish (up to drain_seconds), close. With `health_port`, /healthz, /readyz and /metrics are
    also served there on every interface: kubelet probes and Prometheus reach a pod by its IP,
    while an injected sidecar's API listens on loopback, for its own pod only."""
    runner = web.AppRunner(gateway.app(), shutdown_timeout=gateway.config.drain_seconds, access_log=None)
    await runner.setup()
    settle_the_heap()
    site = web.TCPSite(runner, host, port, shutdown_timeout=gateway.config.drain_seconds)
    await site.start()
    health: web.AppRunner | None = None
    if health_port is not None:
        health = web.AppRunner(gateway.health_app(), access_log=None)
        await health.setup()
        # Every interface by default (probes and scrapes reach the pod IP); TIERWISE_HEALTH_HOST
        # narrows it, as for the operator's health port (a sidecar run outside a pod, on loopback).
        await web.TCPSite(health, os.environ.get("TIERWISE_HEALTH_HOST", ""), health_port).start()
    bound = runner.addresses[0][1] if runner.addresses else port
    log.info("serving on %s:%d", host or "*", bound)
    if ready is not None:
        ready(bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    gateway.draining = True
    refused = gateway.drain_waiting()
    if refused:
        log.info("draining: refused %d waiting request(s) that could not start in time", refused)
    # Still serving while /readyz says 503, so load balancers and Endpoints stop sending first.
    await asyncio.sleep(gateway.config.unready_seconds)
    log.info("draining %d in-flight request(s)", gateway.in_flight)
    await runner.cleanup()
    if health is not None:
        await health.cleanup()
    log.info("stopped")
