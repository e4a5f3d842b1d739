"""`tierwise webhook`: the sidecar-injection admission webhook, served over TLS.

The API server calls /mutate for pods in namespaces labelled for injection (the chart's
MutatingWebhookConfiguration selects them); the decision is injection.patch, a pure function.
The serving certificate is read from a folder (a mounted Secret, e.g. cert-manager's) and
re-read when it changes, so a rotated certificate is served without a restart.
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
from pathlib import Path
from typing import Any

from aiohttp import web

from tierwise_operator.certs import CA_FILE, CERT_FILE, KEY_FILE, issue
from tierwise_operator.injection import InjectionConfig, patch

log = logging.getLogger("tierwise.webhook")


def review_response(review: dict[str, Any], cfg: InjectionConfig) -> dict[str, Any]:
    request = review.get("request") or {}
    uid = request.get("uid", "")
    out: dict[str, Any] = {"uid": uid, "allowed": True}
    pod = request.get("object")
    if request.get("kind", {}).get("kind") == "Pod" and isinstance(pod, dict):
        ops = patch(pod, cfg)
        if ops:
            out["patchType"] = "JSONPatch"
            out["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
            meta = pod.get("metadata") or {}
            log.info(
                "injected the sidecar into pod %s/%s",
                request.get("namespace"),
                meta.get("name") or meta.get("generateName", "") + "*",
            )
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": out}


class CertReloader:
    """Serves the certificate in `folder`, reloading it when the files change."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
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
        log.info("serving certificate loaded from %s", self.folder)
        return True

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.reload()
            except (OSError, ssl.SSLError) as e:  # mid-rotation: keep serving the old one
                log.warning("certificate not reloaded yet: %s", e)


def app(cfg: InjectionConfig) -> web.Application:
    async def mutate(request: web.Request) -> web.Response:
        try:
            review = await request.json()
        except ValueError:
            return web.json_response({"error": "body is not an AdmissionReview"}, status=400)
        return web.json_response(review_response(review, cfg))

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    a = web.Application(client_max_size=8 * 1024 * 1024)
    a.router.add_post("/mutate", mutate)
    a.router.add_get("/healthz", ok)
    a.router.add_get("/readyz", ok)
    return a


async def serve(args: argparse.Namespace) -> None:
    folder = Path(args.cert_dir)
    if args.self_signed:
        hosts = args.self_signed.split(",")
        issue(hosts, datetime.datetime.now(datetime.UTC), datetime.timedelta(days=365)).write(folder)
        log.info("self-signed certificate for %s written to %s (CA in %s)", hosts, folder, CA_FILE)
    certs = CertReloader(folder)
    cfg = InjectionConfig(image=args.sidecar_image, stores_secret=args.stores_secret)
    runner = web.AppRunner(app(cfg), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port, ssl_context=certs.context).start()
    log.info("webhook listening on https://%s:%d", args.host, args.port)
    watcher = asyncio.create_task(certs.watch(args.cert_reload_interval))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        await runner.cleanup()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cert-dir", default="/etc/tierwise/webhook-tls", help=f"folder with {CERT_FILE} and {KEY_FILE}")
    p.add_argument(
        "--self-signed",
        metavar="HOSTS",
        help="generate a CA and a certificate for these comma-separated names/IPs into --cert-dir first",
    )
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9443)
    p.add_argument("--cert-reload-interval", type=float, default=10.0, help="seconds between certificate checks")
    p.add_argument(
        "--sidecar-image", default=os.environ.get("TIERWISE_SIDECAR_IMAGE", "ghcr.io/tierwise/tierwise:latest")
    )
    p.add_argument("--stores-secret", help="Secret whose keys become the sidecar's environment (Redis, PostgreSQL)")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=os.environ.get("TIERWISE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(args))
    return 0
