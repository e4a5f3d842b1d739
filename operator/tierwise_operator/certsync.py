"""Self-managed webhook certificates, shared by every webhook replica through one Secret.

Each replica, at start and then periodically:
  1. reads the Secret; if it holds no certificate, a damaged one, one for other names, or one past
     two thirds of its life, issues a new one and writes it with the Secret's resourceVersion, so
     when two replicas rotate at once one wins and the other adopts the winner's;
  2. makes every webhook of the configured Mutating/ValidatingWebhookConfigurations trust the
     Secret's bundle (the new CA plus the previous one);
  3. only then (and a moment later, for the API server to notice) serves the Secret's certificate.
Step order is the point: no replica serves a certificate the API server does not trust yet, and
a replica still serving the previous certificate stays trusted until the next rotation.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tierwise_operator.certs import ServingCert, rotate, rotation_reason
from tierwise_operator.kube import MUTATING_WEBHOOKS, SECRET, VALIDATING_WEBHOOKS, ApiError, Kind, Kube

log = logging.getLogger("tierwise.webhook.certs")
Obj = dict[str, Any]
MANAGED_BY = "tierwise-webhook"


def _certificates(pem: bytes) -> set[bytes]:
    try:
        return {c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(pem)}
    except ValueError:
        return set()


def _trusted(hook: Obj) -> set[bytes]:
    try:
        return _certificates(base64.b64decode((hook.get("clientConfig") or {}).get("caBundle") or ""))
    except ValueError:
        return set()


def ca_bundle_ops(config: Obj, bundle: bytes) -> list[Obj]:
    """JSON patch making every webhook of `config` trust every CA of `bundle`; empty when all do.

    A webhook already trusting them all (and maybe more) is left alone: a replica whose view of
    the Secret is a moment old must never take away the trust another replica has just added.
    """
    b64 = base64.b64encode(bundle).decode()
    wanted = _certificates(bundle)
    ops: list[Obj] = []
    for i, hook in enumerate(config.get("webhooks") or []):
        if not wanted <= _trusted(hook):
            # The test pins the index to the webhook it was computed for, should the list change meanwhile.
            ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": hook["name"]})
            ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": b64})
    return ops


@dataclass
class CertSync:
    kube: Kube
    namespace: str
    secret: str
    hosts: list[str]
    validity: datetime.timedelta
    mutating: Sequence[str]
    validating: Sequence[str]
    folder: Path
    # Called after a new certificate is written to `folder` (the TLS context reloads it).
    on_served: Callable[[ServingCert], None] = lambda _: None
    # The API server learns of a patched caBundle through its informer, a moment later; switching
    # to a new certificate only after this long keeps calls in that moment from failing.
    propagation: float = 3.0
    served: ServingCert | None = None

    def _configurations(self) -> list[tuple[Kind, str]]:
        return [(MUTATING_WEBHOOKS, n) for n in self.mutating] + [(VALIDATING_WEBHOOKS, n) for n in self.validating]

    async def _stored(self, now: datetime.datetime) -> ServingCert:
        """The Secret's certificate, rotated first when due."""
        for _ in range(3):
            obj = await self.kube.get(SECRET, self.namespace, self.secret)
            current = ServingCert.from_secret_data((obj or {}).get("data"))
            reason = rotation_reason(current, self.hosts, now)
            if reason is None and current is not None:
                return current
            # Damaged or emptied: what this replica serves must stay trusted through the switch.
            new = rotate(current or self.served, self.hosts, now, self.validity)
            # The chart may create the Secret empty (so uninstall removes it); its metadata is kept,
            # and its resourceVersion makes the write lose cleanly to a concurrent one.
            meta = {k: v for k, v in ((obj or {}).get("metadata") or {}).items() if k != "managedFields"}
            meta.update(name=self.secret, namespace=self.namespace)
            meta.setdefault("labels", {}).setdefault("app.kubernetes.io/managed-by", MANAGED_BY)
            body: Obj = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": meta,
                "type": (obj or {}).get("type", "Opaque"),
                "data": new.secret_data(),
            }
            try:
                await (self.kube.update(SECRET, body) if obj else self.kube.create(SECRET, body))
            except ApiError as e:
                if e.status == 409:  # another replica rotated first: adopt its certificate
                    continue
                raise
            log.info("issued a new webhook certificate for %s (%s)", ",".join(self.hosts), reason)
            return new
        raise ApiError(409, "Conflict", f"Secret {self.namespace}/{self.secret} kept changing under rotation")

    async def _trust(self, bundle: bytes) -> bool:
        """Make the configurations trust `bundle`; whether anything had to be patched."""
        patched = False
        for kind, name in self._configurations():
            config = await self.kube.get(kind, None, name)
            if config is None:
                # Not created yet (an install in progress) or deleted: nothing calls us through it.
                log.warning("%s %s not found; its caBundle is set once it exists", kind.kind, name)
                continue
            ops = ca_bundle_ops(config, bundle)
            if ops:
                await self.kube.json_patch(kind, None, name, ops)
                patched = True
                log.info("caBundle of %s %s updated", kind.kind, name)
        return patched

    async def sync(self, now: datetime.datetime | None = None) -> ServingCert:
        cert = await self._stored(now or datetime.datetime.now(datetime.UTC))
        patched = await self._trust(cert.trust)
        if cert != self.served:
            if patched or self.served is not None:
                await asyncio.sleep(self.propagation)
            cert.write(self.folder)
            self.served = cert
            self.on_served(cert)
        return cert

    async def run(self, interval: float, retry: float = 5.0) -> None:
        """Keep syncing; API errors are retried sooner, the certificate served meanwhile stays."""
        while True:
            try:
                await self.sync()
                delay = interval
            except Exception as e:  # the keeper must outlive any one bad pass, or rotation stops
                log.warning("webhook certificate not synced: %s: %s", type(e).__name__, e)
                delay = min(interval, retry)
            await asyncio.sleep(delay)
