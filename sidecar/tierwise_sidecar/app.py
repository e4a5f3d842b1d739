"""The sidecar's HTTP server: OpenAI-compatible endpoints in front of the pipeline stages.

identify → validate → estimate → choose backend → forward → account. Each request takes the
Runtime in force when it starts and keeps it to the end, so a Policy reload never changes a
request half-way; state that must survive reloads (breakers, session pins) lives in Health.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tierwise_sidecar.account import Outcome, record
from tierwise_sidecar.difficulty import difficulty_of
from tierwise_sidecar.endpoints import Endpoints, refresh_dns
from tierwise_sidecar.errors import SERVER, ApiError
from tierwise_sidecar.estimate import count_input
from tierwise_sidecar.forward import Call, ForwardConfig, Forwarder
from tierwise_sidecar.identify import Identity, identify
from tierwise_sidecar.metrics import Metrics
from tierwise_sidecar.policy_source import Loaded, PolicyLoadError
from tierwise_sidecar.runtime import Health, Runtime, build_runtime, self_hosted
from tierwise_sidecar.secrets import SecretSource
from tierwise_sidecar.tokens import TokenCounter
from tierwise_sidecar.validate import Kind, Limits, check_size, parse_body, too_large, validate

log = logging.getLogger("tierwise.sidecar")


class Source(Protocol):
    def signature(self) -> object: ...

    def load(self) -> Loaded: ...


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


class Gateway:
    def __init__(
        self, source: Source, config: GatewayConfig | None = None, secrets: SecretSource | None = None
    ) -> None:
        self.source = source
        self.config = config or GatewayConfig()
        self.secrets = secrets or SecretSource()
        self.metrics = Metrics(max_tenants=self.config.max_tenants)
        self.health = Health(Endpoints(), self.config.breaker_threshold, self.config.breaker_cooldown)
        self.counter = TokenCounter()
        self.forwarder = Forwarder(self.health, self.metrics, self.counter, self.config.forward)
        self.runtime: Runtime | None = None
        self.draining = False
        self.in_flight = 0
        self._signature: object = None
        self._tasks: list[asyncio.Task[None]] = []
        if not self.config.pin_tier:
            # In the ingress role the callers' sidecars already count these attempts under the
            # same labels; exporting them twice would double the autoscaler's load signal.
            self.metrics.watch_backends(self._backend_load)

    def _backend_load(self) -> list[tuple[str, str, str, int]]:
        runtime = self.runtime
        if runtime is None:
            return []
        in_flight = self.health.in_flight
        return [
            (runtime.namespace, t.name, b.name, in_flight.get(b.key, 0))
            for t in runtime.tiers.values()
            for b in t.backends
        ]

    # ------------------------------------------------------------ policy

    def reload(self) -> bool:
        """Load the source if it changed; True when a new Policy is in force."""
        signature = self.source.signature()
        if signature == self._signature:
            return self._refresh_keys()
        try:
            loaded = self.source.load()
        except PolicyLoadError as e:
            if self.source.signature() != signature:
                return False  # caught mid-write: judge what the next tick finds
            self._signature = signature
            self.metrics.reloads.labels("refused").inc()
            kept = f"keeping Policy {self.runtime.policy.hash}" if self.runtime else "no Policy in force"
            log.error("policy refused: %s; %s", e, kept)
            return False
        if self.source.signature() != signature:
            return False
        self._signature = signature
        old = self.runtime
        if old is not None and old.policy.hash == loaded.policy.hash and loaded.endpoints is None:
            return False
        runtime = build_runtime(loaded.policy, self.secrets, self.config.pin_tier)
        for tier in runtime.tiers.values():
            for b in tier.backends:
                self.counter.encoding(b.model)  # loaded now, not on a request's clock
        if loaded.endpoints is not None:
            self.health.endpoints.replace(loaded.endpoints)
            self.health.prune()
        self.runtime = runtime
        if old is not None:
            self.metrics.policy_info.remove(old.namespace, old.policy.hash)
        self.metrics.policy_info.labels(runtime.namespace, runtime.policy.hash).set(1)
        self.metrics.policy_loaded.set(time.time())
        self.metrics.reloads.labels("applied").inc()
        log.info("policy %s in force for namespace %s: tiers %s", runtime.policy.hash, runtime.namespace,
                 ", ".join(runtime.tiers))  # fmt: skip
        return True

    def _refresh_keys(self) -> bool:
        """A rotated API key (a Secret's mounted file changes in place) is used from the next request."""
        runtime = self.runtime
        if runtime is None or not runtime.keys_changed(self.secrets):
            return False
        self.runtime = build_runtime(runtime.policy, self.secrets, self.config.pin_tier)
        log.info("API keys changed; in force for new requests")
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_interval)
            try:
                await asyncio.to_thread(self.reload)
            except Exception:
                log.exception("policy reload failed")

    async def _discover(self, interval: float) -> None:
        while True:
            try:
                if self.runtime is not None:
                    await refresh_dns(self.health.endpoints, self_hosted(self.runtime.policy))
                    self.health.prune()
            except Exception:
                log.exception("endpoint discovery failed; keeping the endpoints known")
            await asyncio.sleep(interval)

    # ------------------------------------------------------------ requests

    def _call(
        self, kind: Kind, body: dict[str, Any], identity: Identity, runtime: Runtime, started: float
    ) -> tuple[Call, Outcome]:
        tier = runtime.tiers[identity.tier]
        first = tier.by_price[0]
        input_tokens = count_input(self.counter, kind, first.model, body)
        score = difficulty_of(kind, body, input_tokens, identity.priority) if tier.needs_score else None
        if not any(input_tokens < b.max_context for b in tier.backends):
            raise ApiError(
                400,
                f"the prompt has {input_tokens} tokens, more than any model of tier {tier.name} accepts",
                "invalid_request_error",
                "context_length_exceeded",
                param="messages" if kind == "chat" else "prompt",
            )
        stream = bool(body.get("stream")) and kind != "embeddings"
        options = body.get("stream_options")
        call = Call(
            kind=kind,
            body=body,
            identity=identity,
            started=started,
            deadline=started + tier.timeouts.total,
            input_tokens=input_tokens,
            score=score,
            counted_with=first.model,
            stream=stream,
            client_usage=isinstance(options, dict) and bool(options.get("include_usage")),
        )
        return call, Outcome(identity)

    def _handler(self, kind: Kind) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self.serve(kind, request)

        return handle

    async def serve(self, kind: Kind, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        runtime = self.runtime
        if runtime is None:
            raise ApiError(503, "no Policy loaded yet", SERVER, "policy_not_loaded", headers={"Retry-After": "1"})
        try:
            body = await self._read(kind, request)
            identity = identify(request.headers, body, runtime.access)
            call, outcome = self._call(kind, body, identity, runtime, started)
        except ApiError as e:
            self.metrics.child(self.metrics.invalid, runtime.namespace, e.code).inc()
            raise
        gauge = self.metrics.child(self.metrics.in_flight, identity.tier)
        gauge.inc()
        try:
            return await self.forwarder.serve(request, runtime, call, outcome)
        except ApiError as e:
            outcome.status = e.status
            raise
        except Exception:
            outcome.status = 500
            raise
        finally:
            gauge.dec()
            record(self.metrics, runtime.namespace, outcome, time.monotonic() - started)

    async def _read(self, kind: Kind, request: web.Request) -> dict[str, Any]:
        limits = self.config.limits
        check_size(request.content_length, limits)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large(limits) from None
        body = parse_body(raw)
        validate(kind, body, limits)
        return body

    async def models(self, request: web.Request) -> web.Response:
        runtime = self.runtime
        tiers = sorted(runtime.tiers) if runtime else []
        data = [{"id": t, "object": "model", "created": 0, "owned_by": "tierwise"} for t in tiers]
        return web.json_response({"object": "list", "data": data})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        if self.runtime is None:
            return web.json_response({"status": "no policy"}, status=503)
        return web.json_response({"status": "ready", "policy": self.runtime.policy.hash})

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.in_flight += 1
        try:
            return await handler(request)
        except ApiError as e:
            return web.Response(status=e.status, body=e.body(), content_type="application/json", headers=e.headers)
        except web.HTTPException as e:
            if e.status >= 400:
                err = ApiError(e.status, e.reason, "invalid_request_error", "http_error")
                return web.Response(status=e.status, body=err.body(), content_type="application/json")
            raise
        except Exception:
            log.exception("unexpected error serving %s", request.path)
            err = ApiError(500, "internal error in the tierwise sidecar", SERVER, "internal_error")
            return web.Response(status=500, body=err.body(), content_type="application/json")
        finally:
            self.in_flight -= 1

    # ------------------------------------------------------------ lifecycle

    def app(self) -> web.Application:
        # One byte over the limit is enough to know a body is too large.
        app = web.Application(middlewares=[self._errors], client_max_size=self.config.limits.max_body_bytes + 1)
        app.add_routes(
            [
                web.post("/v1/chat/completions", self._handler("chat")),
                web.post("/v1/completions", self._handler("completions")),
                web.post("/v1/embeddings", self._handler("embeddings")),
                web.get("/v1/models", self.models),
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", self.metrics_page),
            ]
        )
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    def health_app(self) -> web.Application:
        """Probes and metrics alone, for a port on the pod IP while the API stays on loopback."""
        app = web.Application()
        app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", self.metrics_page),
            ]
        )
        return app

    async def _on_startup(self, app: web.Application) -> None:
        await self.forwarder.start()
        self._tasks.append(asyncio.create_task(self._watch()))
        if self.config.dns_interval:
            self._tasks.append(asyncio.create_task(self._discover(self.config.dns_interval)))

    async def _on_cleanup(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.forwarder.close()


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
    site = web.TCPSite(runner, host, port, shutdown_timeout=gateway.config.drain_seconds)
    await site.start()
    health: web.AppRunner | None = None
    if health_port is not None:
        health = web.AppRunner(gateway.health_app(), access_log=None)
        await health.setup()
        await web.TCPSite(health, "", health_port).start()
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
    # Still serving while /readyz says 503, so load balancers and Endpoints stop sending first.
    await asyncio.sleep(gateway.config.unready_seconds)
    log.info("draining %d in-flight request(s)", gateway.in_flight)
    await runner.cleanup()
    if health is not None:
        await health.cleanup()
    log.info("stopped")
