"""`tierwise webhook`: the admission webhook, served over TLS.

- /mutate: the API server calls it for pods in namespaces labelled for injection (the chart's
  MutatingWebhookConfiguration selects them); the decision is injection.patch, a pure function.
- /validate: for InferenceTiers, CostBudgets and CachePolicies being created or updated; the
  decision is validation.judge (the compiler's cross-object check) over the cluster's objects,
  kept by a watch (clusterview, informer) rather than listed on every admission.

Certificates either come from a folder (cert-manager's mounted Secret, re-read when it changes) or
are self-managed (certsync: one Secret shared by the replicas, rotated before expiry, caBundle
patched). Health and metrics are on a plain-HTTP side port.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import logging
import os
import signal
import ssl
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tierwise.api.resources import KINDS as RESOURCE_KINDS
from tierwise_operator.certs import CA_FILE, CERT_FILE, KEY_FILE, ServingCert, issue, rotation_reason
from tierwise_operator.certsync import CertSync
from tierwise_operator.clusterview import ClusterView
from tierwise_operator.health import serve_health
from tierwise_operator.injection import DEFAULT_RESOURCES, InjectionConfig, patch, skip_warning
from tierwise_operator.kube import ApiError, Kube
from tierwise_operator.validation import judge_against

log = logging.getLogger("tierwise.webhook")
Obj = dict[str, Any]
USER_AGENT = "tierwise-webhook"


class WebhookMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.admissions = Counter(
            "tierwise_webhook_admissions", "Admission reviews answered, by operation and result.",
            ["operation", "result"], registry=r,
        )  # fmt: skip
        self.seconds = Histogram(
            "tierwise_webhook_admission_duration_seconds", "Time to answer one admission review.", ["operation"],
            registry=r,
        )  # fmt: skip
        self.cluster_reads = Counter(
            "tierwise_webhook_cluster_reads", "Views of the cluster a validation was judged on, by source.",
            ["source"], registry=r,
        )  # fmt: skip
        self.cert_expiry = Gauge(
            "tierwise_webhook_certificate_expiry_timestamp_seconds",
            "When the served certificate expires (Unix time).", registry=r,
        )  # fmt: skip


def _response(review: Obj, out: Obj) -> Obj:
    out["uid"] = (review.get("request") or {}).get("uid", "")
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": out}


def mutate_response(review: Obj, cfg: InjectionConfig) -> tuple[Obj, str]:
    request = review.get("request") or {}
    out: Obj = {"allowed": True}
    pod = request.get("object")
    result = "allowed"
    if request.get("kind", {}).get("kind") == "Pod" and isinstance(pod, dict):
        if warning := skip_warning(pod):
            out["warnings"] = [warning]
        ops = patch(pod, cfg)
        if ops:
            result = "patched"
            out["patchType"] = "JSONPatch"
            out["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
            meta = pod.get("metadata") or {}
            log.info(
                "injected the sidecar into pod %s/%s",
                request.get("namespace"),
                meta.get("name") or meta.get("generateName", "") + "*",
            )
    return _response(review, out), result


async def validate_response(review: Obj, view: ClusterView, tolerate: bool) -> tuple[Obj, str]:
    request = review.get("request") or {}
    obj = request.get("object")
    if (
        request.get("operation") not in ("CREATE", "UPDATE")
        or (request.get("kind") or {}).get("kind") not in RESOURCE_KINDS
        or not isinstance(obj, dict)
    ):
        return _response(review, {"allowed": True}), "allowed"
    obj.setdefault("metadata", {}).setdefault("namespace", request.get("namespace"))
    snap = await view.for_object(str(obj.get("kind")), str(obj["metadata"].get("namespace") or ""))
    while True:
        verdict = judge_against(
            snap.resources,
            snap.namespaces,
            obj,
            view.platform,
            tolerate_dangling=tolerate,
            before=snap.problems,
        )
        if snap.source == "list" or (verdict.allowed and not verdict.warnings):
            break
        snap = await view.fresh()  # refuse or warn only on everything as the API server holds it now
    out: Obj = {"allowed": verdict.allowed}
    if verdict.warnings:
        out["warnings"] = list(verdict.warnings)
    if not verdict.allowed:
        out["status"] = {"code": 422, "reason": "Invalid", "message": verdict.message}
        log.info("refused %s: %s", request.get("name") or obj["metadata"].get("name"), verdict.message)
    return _response(review, out), "allowed" if verdict.allowed else "denied"


class CertReloader:
    """Serves the certificate in `folder`, reloading it when the files change."""

    def __init__(self, folder: Path, metrics: WebhookMetrics | None = None) -> None:
        self.folder = folder
        self.metrics = metrics
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp: tuple[float, float] | None = None
        self.reload()

    def _files(self) -> tuple[Path, Path]:
        return self.folder / CERT_FILE, self.folder / KEY_FILE

    def reload(self) -> bool:
        cert, key = self._files()
        stamp = (cert.stat().st_mtime, key.stat().st_mtime)
        if stamp == self._stamp:
            return False
        self.context.load_cert_chain(cert, key)  # new handshakes use it; open connections keep theirs
        self._stamp = stamp
        if self.metrics is not None:
            self.metrics.cert_expiry.set(ServingCert.expiry(cert.read_bytes()).timestamp())
        log.info("serving certificate loaded from %s", self.folder)
        return True

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.reload()
            except (OSError, ssl.SSLError) as e:  # mid-rotation: keep serving the old one
                log.warning("certificate not reloaded yet: %s", e)


def app(
    cfg: InjectionConfig, view: ClusterView, metrics: WebhookMetrics, tolerate_dangling: bool = False
) -> web.Application:
    async def answer(request: web.Request, operation: str) -> web.Response:
        started = time.perf_counter()
        try:
            review = await request.json()
        except ValueError:
            review = None
        if not isinstance(review, dict) or not isinstance(review.get("request"), dict):
            metrics.admissions.labels(operation, "error").inc()
            return web.json_response({"error": "body is not an AdmissionReview"}, status=400)
        try:
            if operation == "mutate":
                body, result = mutate_response(review, cfg)
            else:
                body, result = await validate_response(review, view, tolerate_dangling)
        except ApiError as e:
            # The cluster cannot be read, so nothing can be judged: let the failure policy decide.
            log.warning("cannot %s: %s", operation, e)
            metrics.admissions.labels(operation, "error").inc()
            return web.json_response({"error": f"cannot read the cluster: {e}"}, status=503)
        finally:
            metrics.seconds.labels(operation).observe(time.perf_counter() - started)
        metrics.admissions.labels(operation, result).inc()
        return web.json_response(body)

    async def mutate(request: web.Request) -> web.Response:
        return await answer(request, "mutate")

    async def validate(request: web.Request) -> web.Response:
        return await answer(request, "validate")

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    a = web.Application(client_max_size=8 * 1024 * 1024)
    a.router.add_post("/mutate", mutate)
    a.router.add_post("/validate", validate)
    a.router.add_get("/healthz", ok)
    return a


def _injection_config(args: argparse.Namespace) -> InjectionConfig:
    resources = json.loads(args.sidecar_resources) if args.sidecar_resources else dict(DEFAULT_RESOURCES)
    if not isinstance(resources, dict):
        raise SystemExit('--sidecar-resources must be a JSON object like {"requests": {"cpu": "50m"}}')
    return InjectionConfig(image=args.sidecar_image, resources=resources, stores_secret=args.stores_secret)


async def _certificates(
    args: argparse.Namespace, kube: Kube, metrics: WebhookMetrics
) -> tuple[CertReloader, asyncio.Task[None]]:
    """The certificate to serve, and the task keeping it current."""
    folder = Path(args.cert_dir)
    if not args.manage_certs:
        if args.self_signed:
            hosts, now = args.self_signed.split(","), datetime.datetime.now(datetime.UTC)
            # A restart keeps a certificate that is still good: the configurations trust its CA.
            if rotation_reason(ServingCert.read(folder), hosts, now) is not None:
                issue(hosts, now, datetime.timedelta(days=365)).write(folder)
                log.info("self-signed certificate for %s written to %s (CA in %s)", hosts, folder, CA_FILE)
        certs = CertReloader(folder, metrics)
        return certs, asyncio.create_task(certs.watch(args.cert_reload_interval))
    if not (args.cert_secret and args.cert_hosts and args.namespace):
        raise SystemExit("--manage-certs needs --cert-secret, --cert-hosts and --namespace (or POD_NAMESPACE)")
    sync = CertSync(
        kube=kube,
        namespace=args.namespace,
        secret=args.cert_secret,
        hosts=args.cert_hosts.split(","),
        validity=datetime.timedelta(hours=args.cert_validity_hours),
        mutating=args.mutating_configuration,
        validating=args.validating_configuration,
        folder=folder,
    )
    while True:  # nothing to serve before the first sync; the pod stays unready meanwhile
        try:
            await sync.sync()
            break
        except Exception as e:  # e.g. no access yet: retried, the pod stays unready meanwhile
            log.warning("webhook certificate not synced yet: %s: %s", type(e).__name__, e)
            await asyncio.sleep(2)
    certs = CertReloader(folder, metrics)

    def served(_: ServingCert) -> None:
        certs.reload()

    sync.on_served = served
    return certs, asyncio.create_task(sync.run(args.cert_check_interval))


async def serve(args: argparse.Namespace) -> None:
    metrics = WebhookMetrics()
    ready, alive = asyncio.Event(), asyncio.Event()
    alive.set()
    health = await serve_health(args.health_port, ready, alive, metrics.registry)
    kube = await Kube.connect(args.kubeconfig, user_agent=USER_AGENT)
    certs, keeper = await _certificates(args, kube, metrics)
    # Should the certificate keeper ever end, rotation has stopped: let liveness restart the pod.
    keeper.add_done_callback(lambda t: None if t.cancelled() else alive.clear())
    tolerate = args.unknown_tiers == "warn"
    view = ClusterView(kube, args.platform_namespace, on_read=lambda source: metrics.cluster_reads.labels(source).inc())
    informer = asyncio.create_task(view.run(), name="informer")
    runner = web.AppRunner(app(_injection_config(args), view, metrics, tolerate), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port, ssl_context=certs.context).start()
    ready.set()
    log.info("webhook listening on https://%s:%d", args.host or "*", args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        # Unready but still answering while the Service's endpoints catch up: the API server does
        # not retry a failed call, and with failurePolicy Fail that would refuse a pod.
        ready.clear()
        log.info("stopping in %.1f s", args.drain_seconds)
        await asyncio.sleep(args.drain_seconds)
    finally:
        ready.clear()
        keeper.cancel()
        informer.cancel()
        await runner.cleanup()
        await health.cleanup()
        await kube.close()


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=os.environ.get("TIERWISE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(args))
    return 0
