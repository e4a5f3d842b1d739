"""`tierwise webhook` through the real API server, over TLS.

Injection: pods in labelled namespaces get the sidecar; opted-out pods, other namespaces and
re-admissions are left alone; with the webhook down, the documented failure policy (Fail) refuses
pods it would have injected. Validation: a fallback cycle, an unknown tier or contradicting budgets
are refused at `kubectl apply`; with the webhook down (Ignore) applies go through. Certificates:
a certificate rotated under the webhook is served; self-managed certificates shared by two
replicas through a Secret rotate before expiry while the API server keeps calling both.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import os
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localcluster import Cluster, free_port
from tests import cases
from tests.conftest import ROOT, TIERWISE, wait_for
from tierwise_operator.certs import CERT_FILE, TRUST_FILE, issue
from tierwise_operator.certsync import CertSync
from tierwise_operator.kube import Kube

pytestmark = pytest.mark.cluster
IMAGE = "ghcr.io/tierwise/tierwise:test"
BASE_URL = {"tierwise.dev/openai-base-url": "true"}


class Webhook:
    def __init__(self, cluster: Cluster, folder: Path, *extra: str) -> None:
        self.cluster = cluster
        self.folder = folder
        self.extra = extra
        self.port = free_port()
        self.health = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            *TIERWISE, "webhook", "--kubeconfig", str(self.cluster.kubeconfig), "--cert-dir", str(self.folder),
            "--host", "127.0.0.1", "--port", str(self.port), "--health-port", str(self.health),
            "--sidecar-image", IMAGE, "--cert-reload-interval", "0.5", "--drain-seconds", "0.5", *self.extra,
        ]  # fmt: skip
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        with (self.folder.parent / f"webhook-{self.port}.log").open("ab") as log:
            env = {**os.environ, "TIERWISE_HEALTH_HOST": "127.0.0.1"}  # loopback only, like everything here
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        wait_for("the webhook ready", lambda: self.ready() or self.proc is None or self.proc.poll() is not None, 60)
        assert self.proc.poll() is None, (self.folder.parent / f"webhook-{self.port}.log").read_text()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health}/readyz", timeout=2):
                return True
        except OSError:
            return False

    def metric_values(self, name: str) -> dict[str, float]:
        """{labels: value} of one metric from /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health}/metrics", timeout=2) as r:
            lines = r.read().decode().splitlines()
        out = {}
        for line in lines:
            if line.startswith(name + "{"):
                labels, _, value = line[len(name) + 1 :].rpartition("} ")
                out[labels] = float(value)
        return out

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.folder / TRUST_FILE))

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/healthz", context=self.context(), timeout=2):
                return True
        except (OSError, ssl.SSLError):
            return False

    def served_certificate(self) -> bytes:
        """The certificate the webhook presents now, PEM (whoever signed it)."""
        return ssl.get_server_certificate(("127.0.0.1", self.port)).encode()

    def review(self, pod: dict[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {"uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "object": pod},
        }
        req = urllib.request.Request(
            f"https://127.0.0.1:{self.port}/mutate", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, context=self.context(), timeout=5) as r:
            return dict(json.loads(r.read())["response"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def inject_hook(name: str, port: int, ca: bytes | None, hook: str = "inject.tierwise.dev") -> dict[str, Any]:
    """The shape the chart renders, pointed at the test's loopback webhook and scoped to the
    namespaces of one test (the API server cannot reach a Service without kube-proxy here)."""
    client: dict[str, Any] = {"url": f"https://127.0.0.1:{port}/mutate"}
    if ca is not None:
        client["caBundle"] = base64.b64encode(ca).decode()
    return {
        "name": hook,
        "namespaceSelector": {"matchLabels": {"tierwise.dev/injection": "enabled", "webhook-test": name}},
        "objectSelector": {
            "matchExpressions": [{"key": "tierwise.dev/inject", "operator": "NotIn", "values": ["false"]}]
        },
        "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
        "clientConfig": client,
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "failurePolicy": "Fail",
        "timeoutSeconds": 5,
        "reinvocationPolicy": "Never",
    }


def configuration(name: str, *hooks: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": list(hooks),
    }


@pytest.fixture
def webhook(cluster: Cluster, tmp_path: Path, namespace: str) -> Iterator[tuple[Webhook, str]]:
    hook = Webhook(cluster, tmp_path / "tls", "--self-signed", "127.0.0.1")
    hook.start()
    name = f"tierwise-test-{namespace}"
    config = configuration(name, inject_hook(name, hook.port, (hook.folder / TRUST_FILE).read_bytes()))
    cluster.kubectl("apply", "-f", "-", input=json.dumps(config))
    try:
        yield hook, name
    finally:
        cluster.kubectl("delete", "mutatingwebhookconfiguration", name, check=False)
        hook.stop()


def pod(name: str, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
            "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
        }
    )


def created(cluster: Cluster, ns: str, manifest: str) -> dict[str, Any]:
    out = cluster.kubectl("create", "-n", ns, "-o", "json", "-f", "-", input=manifest)
    return dict(json.loads(out.stdout))


def test_pods_in_a_labelled_namespace_get_the_sidecar(
    webhook: tuple[Webhook, str], cluster: Cluster, namespace: str
) -> None:
    hook, name = webhook
    cluster.kubectl("label", "namespace", namespace, "tierwise.dev/injection=enabled", f"webhook-test={name}")

    def injected() -> dict[str, Any] | None:
        # The API server's webhook client may need a moment to see a new configuration.
        p = created(cluster, namespace, pod(f"app-{time.monotonic_ns()}", annotations=BASE_URL))
        return p if p["spec"].get("initContainers") else None

    got = wait_for("an injected pod", injected)
    init = {c["name"]: c for c in got["spec"].get("initContainers", [])}
    assert "tierwise-sidecar" in init, got["spec"]
    side = init["tierwise-sidecar"]
    assert side["image"] == IMAGE and side["restartPolicy"] == "Always"
    assert side["securityContext"]["runAsNonRoot"] and side["securityContext"]["readOnlyRootFilesystem"]
    env = {e["name"]: e for e in side["env"]}
    assert env["TIERWISE_POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    vols = {v["name"]: v for v in got["spec"]["volumes"]}
    assert vols["tierwise-policy"]["configMap"] == {"name": "tierwise-policy", "optional": True, "defaultMode": 420}
    app_env = {e["name"]: e.get("value") for e in got["spec"]["containers"][0]["env"]}
    assert app_env["OPENAI_BASE_URL"] == "http://127.0.0.1:8480/v1"
    assert got["metadata"]["annotations"]["tierwise.dev/injected"] == "v1"

    # Without the annotation: the sidecar, but the application's environment is its own.
    plain = created(cluster, namespace, pod("plain"))
    assert [c["name"] for c in plain["spec"]["initContainers"]] == ["tierwise-sidecar"]
    assert "env" not in plain["spec"]["containers"][0]

    # Opted out by label: untouched.
    out = created(cluster, namespace, pod("optout", labels={"tierwise.dev/inject": "false"}))
    assert "initContainers" not in out["spec"]

    # On the host's network: admitted without the sidecar, and kubectl shows why.
    host = json.loads(pod("on-host"))
    host["spec"]["hostNetwork"] = True
    res = cluster.kubectl("create", "-n", namespace, "-o", "json", "-f", "-", input=json.dumps(host))
    assert "initContainers" not in json.loads(res.stdout)["spec"]
    assert "Warning: tierwise-sidecar not injected: the pod uses the host's network" in res.stderr, res.stderr

    # Re-admitted (the pod as it now is): no second sidecar.
    assert "patch" not in hook.review(got)

    # Another namespace, not labelled: untouched.
    other = f"{namespace}-plain"
    cluster.kubectl("create", "namespace", other)
    try:
        assert "initContainers" not in created(cluster, other, pod("elsewhere"))["spec"]
    finally:
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)


def test_webhook_down_fails_closed_and_a_rotated_certificate_is_served(
    webhook: tuple[Webhook, str], cluster: Cluster, namespace: str
) -> None:
    hook, name = webhook
    cluster.kubectl("label", "namespace", namespace, "tierwise.dev/injection=enabled", f"webhook-test={name}")

    def injects() -> bool:
        return "initContainers" in created(cluster, namespace, pod(f"p{time.monotonic_ns()}"))["spec"]

    wait_for("injection working", injects)

    # Rotation: a new CA and certificate are written while the webhook runs, the configuration's
    # caBundle is patched, and the API server keeps getting answers.
    fresh = issue(["127.0.0.1"], datetime.datetime.now(datetime.UTC), datetime.timedelta(days=30))
    fresh.write(hook.folder)
    ca = base64.b64encode(fresh.ca_pem).decode()
    cluster.kubectl(
        "patch", "mutatingwebhookconfiguration", name, "--type=json",
        "-p", json.dumps([{"op": "replace", "path": "/webhooks/0/clientConfig/caBundle", "value": ca}]),
    )  # fmt: skip
    wait_for("the new certificate served", hook.healthy)
    wait_for("injection after rotation", injects)

    hook.stop()
    res = cluster.kubectl("create", "-n", namespace, "-f", "-", input=pod("refused"), check=False)
    assert res.returncode != 0 and "inject.tierwise.dev" in res.stderr, res.stderr


# ---------------------------------------------------------------- validation


def validating_configuration(name: str, port: int, ca: bytes, failure: str) -> dict[str, Any]:
    """The chart's ValidatingWebhookConfiguration, pointed at the loopback webhook and one test's namespace."""
    kinds = ["inferencetiers", "costbudgets", "cachepolicies"]
    rule = {"apiGroups": ["tierwise.dev"], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE"]}
    client = {"url": f"https://127.0.0.1:{port}/validate", "caBundle": base64.b64encode(ca).decode()}
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {
                "name": "validate.tierwise.dev",
                "namespaceSelector": {"matchLabels": {"webhook-test": name}},
                "rules": [{**rule, "resources": kinds}],
                "clientConfig": client,
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": failure,
                "timeoutSeconds": 5,
            }
        ],
    }


def tier(name: str, fallback: str | None = None, **spec: Any) -> dict[str, Any]:
    return cases.tier(name, **({"fallback": {"tier": fallback}} if fallback else {}), **spec)


def test_cross_object_problems_are_refused_at_kubectl_apply(cluster: Cluster, tmp_path: Path, namespace: str) -> None:
    hook = Webhook(cluster, tmp_path / "tls", "--self-signed", "127.0.0.1")
    hook.start()
    name = f"tierwise-validate-{namespace}"
    ca = (hook.folder / TRUST_FILE).read_bytes()
    cluster.kubectl("apply", "-f", "-", input=json.dumps(validating_configuration(name, hook.port, ca, "Ignore")))
    cluster.kubectl("label", "namespace", namespace, f"webhook-test={name}")

    def apply(*docs: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        items = {"apiVersion": "v1", "kind": "List", "items": list(docs)}
        return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(items), check=False)

    try:
        # The API server's webhook client needs a moment to see a new configuration.
        wait_for("the webhook refusing an unknown tier", lambda: apply(tier("gold", "platinum")).returncode != 0)
        res = apply(tier("gold", "platinum"))
        assert 'admission webhook "validate.tierwise.dev" denied the request' in res.stderr, res.stderr
        assert f'InferenceTier {namespace}/gold: spec.fallback.tier: tier "platinum" does not exist' in res.stderr

        # The quickstart's files come in the order they refer to each other: admitted as a folder.
        res = cluster.kubectl(
            "apply", "--server-side", "-n", namespace, "-f", str(ROOT / "examples" / "quickstart"), check=False
        )
        assert res.returncode == 0, res.stderr
        cluster.kubectl("delete", "inferencetiers,costbudgets,cachepolicies", "--all", "-n", namespace)

        assert apply(tier("silver"), tier("gold", "silver")).returncode == 0
        res = apply(tier("silver", "gold"))
        assert res.returncode != 0
        assert f"InferenceTier {namespace}/gold: spec.fallback.tier: fallback cycle: gold -> silver -> gold" in (
            res.stderr
        ), res.stderr
        stored = json.loads(cluster.kubectl("get", "inferencetier", "silver", "-n", namespace, "-o", "json").stdout)
        assert "fallback" not in stored["spec"]  # refused means nothing was stored

        assert apply(cases.budget("team", limit={"usd": 100})).returncode == 0
        res = apply(cases.budget("team-too", limit={"usd": 10}))
        assert res.returncode != 0 and f"CostBudget {namespace}/team-too: spec.selector" in res.stderr, res.stderr
        # Server-side dry run is judged the same way, and deletes are never refused.
        res = cluster.kubectl(
            "apply", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(tier("silver", "gold")),
            check=False,
        )  # fmt: skip
        assert res.returncode != 0 and "fallback cycle" in res.stderr
        cluster.kubectl("delete", "inferencetier", "silver", "-n", namespace)

        # Admissions were judged on the watch's cache (with the namespace read fresh); refusals
        # were confirmed on a fresh list of everything.
        reads = hook.metric_values("tierwise_webhook_cluster_reads_total")
        cached = reads.get('source="cache"', 0) + reads.get('source="merged"', 0)
        assert cached >= 5 and reads.get('source="list"', 0) >= 3, reads

        # Down, the webhook's failure policy (Ignore) lets applies through: the operator still
        # reports the problem on the tier and keeps the last good Policy.
        hook.stop()
        assert apply(tier("bronze", "nowhere")).returncode == 0
        hook.start()
        # gold now names a deleted tier; editing it without fixing that is allowed, with a warning.
        res = apply(tier("gold", "silver", priority=7))
        assert res.returncode == 0, res.stderr
        assert 'tier "silver" does not exist' in res.stderr  # kubectl prints admission warnings on stderr
    finally:
        cluster.kubectl("delete", "validatingwebhookconfiguration", name, check=False)
        hook.stop()


# ---------------------------------------------------------------- self-managed certificates


def test_self_managed_certificates_rotate_across_two_replicas_while_the_api_server_calls_them(
    cluster: Cluster, tmp_path: Path, namespace: str
) -> None:
    """Two replicas share one Secret; certificates live 24 s and are renewed after 16 s. For 45 s
    a pod is created every second; the configuration calls both replicas (Fail), so any certificate
    the API server does not trust would refuse a pod. Half-way, the Secret is emptied."""
    name = f"tierwise-rotate-{namespace}"
    managed = [
        "--manage-certs", "--cert-secret", "webhook-tls", "--namespace", namespace, "--cert-hosts", "127.0.0.1",
        "--cert-validity-hours", str(24 / 3600), "--cert-check-interval", "1", "--mutating-configuration", name,
    ]  # fmt: skip
    replicas = [Webhook(cluster, tmp_path / f"tls{i}", *managed) for i in range(2)]
    hooks = [inject_hook(name, r.port, None, f"r{i}.inject.tierwise.dev") for i, r in enumerate(replicas)]
    cluster.kubectl("apply", "-f", "-", input=json.dumps(configuration(name, *hooks)))
    cluster.kubectl("label", "namespace", namespace, "tierwise.dev/injection=enabled", f"webhook-test={name}")

    def secret_filled() -> bool:
        out = cluster.kubectl("get", "secret", "webhook-tls", "-n", namespace, "-o", "json", check=False).stdout
        return bool(out and json.loads(out).get("data"))

    def secret_cert() -> bytes:
        out = cluster.kubectl("get", "secret", "webhook-tls", "-n", namespace, "-o", "json").stdout
        return base64.b64decode(json.loads(out)["data"][CERT_FILE])

    try:
        for r in replicas:
            r.start()
        config = json.loads(cluster.kubectl("get", "mutatingwebhookconfiguration", name, "-o", "json").stdout)
        bundles = {w["clientConfig"].get("caBundle") for w in config["webhooks"]}
        assert len(bundles) == 1 and None not in bundles  # both webhooks trust the Secret's CA

        wait_for("injection through both replicas", lambda: "initContainers" in created(
            cluster, namespace, pod(f"warm{time.monotonic_ns()}"))["spec"])  # fmt: skip
        seen, refused = {secret_cert()}, []
        deadline = time.monotonic() + 45
        n = 0
        while time.monotonic() < deadline:
            n += 1
            res = cluster.kubectl("create", "-n", namespace, "-o", "json", "-f", "-", input=pod(f"p{n}"), check=False)
            if res.returncode != 0 or not json.loads(res.stdout)["spec"].get("initContainers"):
                refused.append(res.stderr)
            if n == 20:
                # Emptied by hand mid-way (what the chart's account may write: no create, no delete):
                # a fresh certificate, issued with what is served kept trusted.
                cluster.kubectl(
                    "patch", "secret", "webhook-tls", "-n", namespace, "--type=json",
                    "-p", json.dumps([{"op": "remove", "path": "/data"}]),
                )  # fmt: skip
                wait_for("the Secret re-issued", secret_filled, timeout=10)
            seen.add(secret_cert())
            time.sleep(1)
        assert refused == [], refused
        assert len(seen) >= 3, f"expected two rotations in 45 s, saw {len(seen) - 1}"
        # Both replicas end up serving what the Secret holds.
        current = secret_cert()
        wait_for("both replicas serving the current certificate", lambda: all(
            ssl.PEM_cert_to_DER_cert(r.served_certificate().decode()) == ssl.PEM_cert_to_DER_cert(current.decode())
            for r in replicas
        ), timeout=10)  # fmt: skip
    finally:
        cluster.kubectl("delete", "mutatingwebhookconfiguration", name, check=False)
        for r in replicas:
            r.stop()


def test_a_configuration_deleted_by_hand_does_not_stop_the_others_rotation(
    cluster: Cluster, tmp_path: Path, namespace: str
) -> None:
    """Someone deletes the MutatingWebhookConfiguration (to let pods start while the webhook is
    down): the next rotation still makes the validating one trust the new CA, and is served."""
    mutating, validating = f"tw-m-{namespace}", f"tw-v-{namespace}"
    hook = inject_hook(mutating, free_port(), None)
    check = validating_configuration(validating, free_port(), b"", "Ignore")
    del check["webhooks"][0]["clientConfig"]["caBundle"]
    cluster.kubectl("apply", "-f", "-", input=json.dumps(configuration(mutating, hook)))
    cluster.kubectl("apply", "-f", "-", input=json.dumps(check))

    def trusted() -> bytes:
        out = json.loads(cluster.kubectl("get", "validatingwebhookconfiguration", validating, "-o", "json").stdout)
        return base64.b64decode(out["webhooks"][0]["clientConfig"]["caBundle"])

    async def scenario() -> None:
        kube = await Kube.connect(str(cluster.kubeconfig))
        sync = CertSync(
            kube, namespace, "webhook-tls", ["127.0.0.1"], datetime.timedelta(days=1), [mutating], [validating],
            tmp_path / "tls", propagation=0,
        )  # fmt: skip
        try:
            first = await sync.sync()
            assert first.ca_pem in trusted()
            await asyncio.to_thread(cluster.kubectl, "delete", "mutatingwebhookconfiguration", mutating)
            later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=17)  # past 2/3 of a day
            second = await sync.sync(now=later)
            assert second != first and sync.served == second
            assert second.ca_pem in trusted() and first.ca_pem in trusted()
        finally:
            await kube.close()

    try:
        asyncio.run(scenario())
    finally:
        cluster.kubectl("delete", "mutatingwebhookconfiguration", mutating, "--ignore-not-found", check=False)
        cluster.kubectl("delete", "validatingwebhookconfiguration", validating, "--ignore-not-found", check=False)
