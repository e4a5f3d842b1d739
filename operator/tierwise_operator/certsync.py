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


_BEGIN = b"-----BEGIN CERTIFICATE-----"


def _certificates(pem: bytes) -> list[x509.Certificate]:
    """Every certificate of a bundle that parses, each once: one damaged block must not cost the
    trust in the others."""
    out: dict[bytes, x509.Certificate] = {}
    for block in pem.split(_BEGIN)[1:]:
        try:
            cert = x509.load_pem_x509_certificate(_BEGIN + block)
        except ValueError:
            continue
        out.setdefault(_der(cert), cert)
    return list(out.values())


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _trusted(hook: Obj) -> list[x509.Certificate]:
    try:
        return _certificates(base64.b64decode((hook.get("clientConfig") or {}).get("caBundle") or ""))
    except ValueError:
        return []


def ca_bundle_ops(config: Obj, bundle: bytes, now: datetime.datetime) -> list[Obj]:
    """JSON patch making every webhook of `config` trust every CA of `bundle`; empty when all do.

    Trust only grows: what a webhook trusts already stays unless it has expired, because a replica
    whose view of the Secret is a moment old must never take away a CA another replica has just
    added (and is about to serve). Each patch is guarded by a test of the clientConfig it was
    computed from, so two replicas patching at once cannot overwrite each other: the loser's patch
    fails and it computes again.
    """
    wanted = [c for c in _certificates(bundle) if c.not_valid_after_utc > now]
    wanted_der = {_der(c) for c in wanted}
    ops: list[Obj] = []
    for i, hook in enumerate(config.get("webhooks") or []):
        trusted = _trusted(hook)
        if wanted_der <= {_der(c) for c in trusted}:
            continue
        kept = [c for c in trusted if _der(c) not in wanted_der and c.not_valid_after_utc > now]
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [*wanted, *kept])
        ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": hook["name"]})
        ops.append({"op": "test", "path": f"/webhooks/{i}/clientConfig", "value": hook.get("clientConfig") or {}})
        ops.append(
            {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": base64.b64encode(pem).decode()}
        )
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
                if obj is None and e.status == 403:
                    # The chart grants no create on Secrets (it cannot be limited to one name).
                    raise ApiError(
                        403,
                        "Forbidden",
                        f"Secret {self.namespace}/{self.secret} is missing and this webhook may not create it; "
                        "`helm upgrade` restores it (the certificate served now stays in use meanwhile)",
                    ) from e
                raise
            log.info("issued a new webhook certificate for %s (%s)", ",".join(self.hosts), reason)
            return new
        raise ApiError(409, "Conflict", f"Secret {self.namespace}/{self.secret} kept changing under rotation")

    async def _trust(self, bundle: bytes, now: datetime.datetime, require: bool) -> bool:
        """Make the configurations trust `bundle`; whether anything had to be patched.

        With `require`, a configuration that does not exist is an error (after the others are
        patched): helm creates them after the Deployments, and a replica must not turn ready
        before the API server trusts it. Later, one deleted by hand (to let pods start while the
        webhook is down, say) must not stop the others' rotation.
        """
        patched, missing = False, []
        for kind, name in self._configurations():
            for attempt in range(3):
                config = await self.kube.get(kind, None, name)
                if config is None:
                    missing.append(f"{kind.kind} {name}")
                    break
                ops = ca_bundle_ops(config, bundle, now)
                if not ops:
                    break
                try:
                    await self.kube.json_patch(kind, None, name, ops)
                except ApiError as e:
                    # A failed test: another replica patched first; look again. (422 on a failed
                    # test, 409 should the configuration change under the patch.)
                    if e.status in (409, 422) and attempt < 2:
                        continue
                    raise
                patched = True
                log.info("caBundle of %s %s updated", kind.kind, name)
                break
        if missing and require:
            raise ApiError(404, "NotFound", f"{', '.join(missing)} not found; its caBundle cannot be set")
        if missing:
            log.warning("%s not found; its caBundle is set once it exists again", ", ".join(missing))
        return patched

    async def sync(self, now: datetime.datetime | None = None) -> ServingCert:
        now = now or datetime.datetime.now(datetime.UTC)
        cert = await self._stored(now)
        patched = await self._trust(cert.trust, now, require=self.served is None)
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
