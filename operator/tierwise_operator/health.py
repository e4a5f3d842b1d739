"""The plain-HTTP side port of the operator and the webhook: /healthz, /readyz and /metrics.

Kept off the webhook's TLS port so kubelet probes and Prometheus need no certificate, and the
admission port serves the API server only.
"""

from __future__ import annotations

import asyncio
import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


async def serve_health(
    port: int, ready: asyncio.Event, alive: asyncio.Event, registry: CollectorRegistry
) -> web.AppRunner:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n") if alive.is_set() else web.Response(status=503, text="starting\n")

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ready\n") if ready.is_set() else web.Response(status=503, text="not ready\n")

    async def metrics_view(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # "" is every interface, IPv4 and IPv6 (an IPv6-only cluster probes on ::).
    await web.TCPSite(runner, os.environ.get("TIERWISE_HEALTH_HOST", ""), port).start()
    return runner
