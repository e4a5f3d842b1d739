"""The sidecar's HTTP server: OpenAI-compatible endpoints in front of the stage chain.

Each request takes the Pipeline (Runtime and chain) in force when it starts and keeps it to the
end, so a Policy reload never changes a request half-way. A reload is read, checked and built off
the event loop (file I/O, compiling, loading encodings), then swapped in on it; what must survive
reloads (breakers, session pins, clients, ledgers) lives in the shared state.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tierwise.api.tier import SLO
from tierwise.policy import Policy
from tierwise_sidecar.admission.rooms import ROOMS
from tierwise_sidecar.config import GatewayConfig
from tierwise_sidecar.endpoints import refresh_dns
from tierwise_sidecar.errors import SERVER, ApiError
from tierwise_sidecar.exchange import Exchange
from tierwise_sidecar.httpsink import UNMATCHED, HttpSink, endpoint_of
from tierwise_sidecar.metrics import METRICS
from tierwise_sidecar.pipeline import Pipeline
from tierwise_sidecar.policy_source import Loaded, PolicyLoadError
from tierwise_sidecar.runtime import HEALTH, Health, Runtime, build_runtime, self_hosted, unreachable
from tierwise_sidecar.secrets import SecretSource
from tierwise_sidecar.stages import build_chain
from tierwise_sidecar.state import SharedState, StartupError
from tierwise_sidecar.tokens import TOKENS
from tierwise_sidecar.validate import Kind, check_size, too_large

__all__ = ["Gateway", "GatewayConfig", "Source"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger("tierwise.sidecar")


class Source(Protocol):
    def signature(self) -> object: ...

    def load(self) -> Loaded: ...


@dataclass(frozen=True)
class Prepared:
    """A reload read and checked off the event loop, for `apply` to put in force on it."""

    signature: object
    pipeline: Pipeline | None = None
    endpoints: dict[str, tuple[str, ...]] | None = None
    refused: str | None = None
    why: str = "policy"


class Gateway:
    def __init__(
        self, source: Source, config: GatewayConfig | None = None, secrets: SecretSource | None = None
    ) -> None:
        self.source = source
        self.config = config or GatewayConfig()
        self.secrets = secrets or SecretSource()
        self.state = SharedState(self.config, self.secrets)
        self.metrics = self.state.get(METRICS)
        self.pipeline: Pipeline | None = None
        self.draining = False
        self.in_flight = 0
        self._signature: object = None
        self._tasks: list[asyncio.Task[None]] = []
        self._unreachable: frozenset[str] = frozenset()
        if not self.config.pin_tier:
            # In the ingress role the callers' sidecars already count these attempts under the
            # same labels; exporting them twice would double the autoscaler's load signal.
            self.metrics.watch_backends(self._backend_load)
            self.metrics.watch_objectives(self._objectives)

    @property
    def runtime(self) -> Runtime | None:
        return self.pipeline.runtime if self.pipeline is not None else None

    @property
    def health(self) -> Health:
        return self.state.get(HEALTH)

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

    def _objectives(self) -> list[tuple[str, str, SLO]]:
        runtime = self.runtime
        if runtime is None:
            return []
        return [(runtime.namespace, n, t.spec.slo) for n, t in runtime.policy.tiers.items()]

    def drain_waiting(self) -> int:
        """Requests waiting for a slot that cannot start before the drain ends are refused (503
        with Retry-After) now; the rest are refused when it ends."""
        rooms = self.state.peek(ROOMS)
        return rooms.drain(self.config.unready_seconds + self.config.drain_seconds) if rooms is not None else 0

    # ------------------------------------------------------------ policy

    def _build(self, policy: Policy) -> Pipeline:
        runtime = build_runtime(policy, self.secrets, self.config.pin_tier)
        counter = self.state.get(TOKENS)
        for tier in runtime.tiers.values():
            for b in tier.backends:
                counter.encoding(b.model)  # loaded now, not on a request's clock
        return Pipeline(runtime, build_chain(runtime, self.state))

    def prepare(self) -> Prepared | None:
        """Read and check the source if it changed, and build what it needs; touches nothing in
        force (safe off the event loop). None: nothing to do."""
        signature = self.source.signature()
        current = self.pipeline
        if signature == self._signature:
            if current is None or not current.runtime.keys_changed(self.secrets):
                return None
            return Prepared(signature, self._build(current.runtime.policy), why="keys")
        try:
            loaded = self.source.load()
        except PolicyLoadError as e:
            if self.source.signature() != signature:
                return None  # caught mid-write: judge what the next tick finds
            return Prepared(signature, refused=str(e))
        if self.source.signature() != signature:
            return None
        if current is not None and current.runtime.policy.hash == loaded.policy.hash and loaded.endpoints is None:
            return Prepared(signature)
        return Prepared(signature, self._build(loaded.policy), loaded.endpoints)

    def apply(self, prepared: Prepared | None) -> bool:
        """Put a prepared reload in force (on the event loop); True when a new Pipeline is."""
        if prepared is None:
            return False
        self._signature = prepared.signature
        old = self.runtime
        if prepared.refused is not None:
            self.metrics.reloads.labels("refused").inc()
            kept = f"keeping Policy {old.policy.hash}" if old else "no Policy in force"
            log.error("policy refused: %s; %s", prepared.refused, kept)
            return False
        if prepared.pipeline is None:
            return False
        if prepared.endpoints is not None:
            self.health.endpoints.replace(prepared.endpoints)
            self.health.prune()
        prepared.pipeline.chain.activate()
        self.pipeline = prepared.pipeline
        runtime = prepared.pipeline.runtime
        if prepared.why == "keys":
            log.info("API keys changed; in force for new requests")
            return True
        if old is not None:
            self.metrics.policy_info.remove(old.namespace, old.policy.hash)
        self.metrics.policy_info.labels(runtime.namespace, runtime.policy.hash).set(1)
        self.metrics.policy_loaded.set(time.time())
        self.metrics.reloads.labels("applied").inc()
        log.info("policy %s in force for namespace %s: tiers %s", runtime.policy.hash, runtime.namespace,
                 ", ".join(runtime.tiers))  # fmt: skip
        if not self.config.dns_interval:
            self._warn_unreachable(runtime)
        return True

    def reload(self) -> bool:
        """Load the source if it changed, in one go (at start-up, or from a test)."""
        return self.apply(self.prepare())

    def _warn_unreachable(self, runtime: Runtime) -> None:
        """Say once (per change) which backends have nowhere to send a request."""
        now = frozenset(unreachable(runtime, self.health))
        for key in sorted(now - self._unreachable):
            log.warning("backend %s has no known endpoint: requests skip it (self-hosted: no replica found%s)",
                        key, "" if self.config.dns_interval else "; list it in --endpoints")  # fmt: skip
        self._unreachable = now

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_interval)
            try:
                prepared = await asyncio.to_thread(self.prepare)
                if prepared is not None and prepared.pipeline is not None:
                    try:
                        await self.state.start()  # what the new stages asked for, before they serve
                    except StartupError as e:
                        prepared = Prepared(prepared.signature, refused=str(e))
                self.apply(prepared)
            except Exception:
                log.exception("policy reload failed")

    async def _discover(self, interval: float) -> None:
        while True:
            try:
                runtime = self.runtime
                if runtime is not None:
                    await refresh_dns(self.health.endpoints, self_hosted(runtime.policy))
                    self.health.prune()
                    self._warn_unreachable(runtime)
            except Exception:
                log.exception("endpoint discovery failed; keeping the endpoints known")
            await asyncio.sleep(interval)

    # ------------------------------------------------------------ requests

    async def serve(self, kind: Kind, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        pipeline = self.pipeline
        if pipeline is None:
            raise ApiError(503, "no Policy loaded yet", SERVER, "policy_not_loaded", headers={"Retry-After": "1"})
        runtime = pipeline.runtime
        raw = await self._read(request)
        sink = HttpSink(request)
        x = Exchange.arriving(kind, raw, request.headers, runtime, sink=sink, started=started)
        await pipeline.chain.run(x)
        if sink.response is None:
            raise RuntimeError("the pipeline ended without an answer")
        return sink.response

    async def _read(self, request: web.Request) -> bytes:
        limits = self.config.limits
        check_size(request.content_length, limits)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large(limits) from None

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

    def _guarded(self, handler: Handler, endpoint: str | None = None) -> Handler:
        """`handler` with its errors answered OpenAI-shaped and every response counted, under
        `endpoint` when its route serves one path (None: the path is found per request). Bound to
        each route rather than run as an aiohttp middleware: aiohttp then runs its own middleware
        and a handler chain built per request too, and every await of a request passes through
        each coroutine frame between the event loop and the socket read."""
        return functools.partial(self._answer, handler, endpoint)

    async def _unmatched(self, request: web.Request) -> web.StreamResponse:
        """A path the gateway does not serve, or one it serves with another method."""
        allowed = {r.method for res in request.app.router.resources() if res.canonical == request.path for r in res}
        if allowed:
            raise web.HTTPMethodNotAllowed(request.method, allowed)
        raise web.HTTPNotFound()

    async def _answer(self, handler: Handler, endpoint: str | None, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        status = 500
        try:
            # The error mapping in the same frame as the counting: every await of the request
            # passes through each coroutine frame between the event loop and the socket read.
            try:
                response = await handler(request)
            except ApiError as e:
                response = web.Response(status=e.status, body=e.body(), content_type="application/json",
                                        headers=e.headers)  # fmt: skip
            except web.HTTPException as e:
                if e.status < 400:
                    raise
                err = ApiError(e.status, e.reason, "invalid_request_error", "http_error")
                response = web.Response(status=e.status, body=err.body(), content_type="application/json")
            except Exception:
                log.exception("unexpected error serving %s", request.path)
                err = ApiError(500, "internal error in the tierwise sidecar", SERVER, "internal_error")
                response = web.Response(status=500, body=err.body(), content_type="application/json")
            status = response.status
            return response
        finally:
            self.in_flight -= 1
            self.metrics.responses.inc((endpoint or endpoint_of(request), str(status)))

    # ------------------------------------------------------------ lifecycle

    def app(self) -> web.Application:
        # One byte over the limit is enough to know a body is too large.
        app = web.Application(client_max_size=self.config.limits.max_body_bytes + 1)
        guarded = self._guarded

        def post(path: str, handler: Handler) -> web.RouteDef:
            return web.post(path, guarded(handler, path))

        def get(path: str, handler: Handler) -> web.RouteDef:
            return web.get(path, guarded(handler, path))  # and HEAD, as aiohttp's get does

        app.add_routes(
            [
                post("/v1/chat/completions", functools.partial(self.serve, "chat")),
                post("/v1/completions", functools.partial(self.serve, "completions")),
                post("/v1/embeddings", functools.partial(self.serve, "embeddings")),
                get("/v1/models", self.models),
                get("/healthz", self.healthz),
                get("/readyz", self.readyz),
                get("/metrics", self.metrics_page),
                # Last: what no route above takes, answered and counted like the rest.
                web.route("*", "/{path:.*}", guarded(self._unmatched), name=UNMATCHED),
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
        await self.state.start()
        self._tasks.append(asyncio.create_task(self._watch()))
        if self.config.dns_interval:
            self._tasks.append(asyncio.create_task(self._discover(self.config.dns_interval)))

    async def _on_cleanup(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.state.close()
