"""Sidecar injection through the real API server: it calls `tierwise webhook` over TLS for pods in
labelled namespaces; opted-out pods, other namespaces and re-admissions are left alone; with the
webhook down, the documented failure policy (Fail) refuses pods it would have injected; a rotated
certificate keeps being accepted."""

from __future__ import annotations

import base64
import datetime
import json
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localcluster import Cluster, free_port
from tests.conftest import ROOT, wait_for
from tierwise_operator.certs import CA_FILE, issue

pytestmark = pytest.mark.cluster
IMAGE = "ghcr.io/tierwise/tierwise:test"
BASE_URL = {"tierwise.dev/openai-base-url": "true"}


class Webhook:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, self_signed: bool = True) -> None:
        args = ["--self-signed", "127.0.0.1"] if self_signed else []
        cmd = [
            sys.executable, "-m", "tierwise.cli", "webhook", "--cert-dir", str(self.folder), "--host", "127.0.0.1",
            "--port", str(self.port), "--sidecar-image", IMAGE, "--cert-reload-interval", "0.5", *args,
        ]  # fmt: skip
        with (self.folder.parent / "webhook.log").open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_for("the webhook serving", self.healthy, timeout=30)

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.folder / CA_FILE))

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/healthz", context=self.context(), timeout=2):
                return True
        except (OSError, ssl.SSLError):
            return False

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


def configuration(name: str, port: int, ca: bytes) -> dict[str, Any]:
    """The same shape the chart renders, pointed at the test's loopback webhook."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {
                "name": "inject.tierwise.dev",
                "namespaceSelector": {"matchLabels": {"tierwise.dev/injection": "enabled", "webhook-test": name}},
                "objectSelector": {
                    "matchExpressions": [{"key": "tierwise.dev/inject", "operator": "NotIn", "values": ["false"]}]
                },
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
                "clientConfig": {"url": f"https://127.0.0.1:{port}/mutate", "caBundle": base64.b64encode(ca).decode()},
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "timeoutSeconds": 5,
                "reinvocationPolicy": "Never",
            }
        ],
    }


@pytest.fixture
def webhook(cluster: Cluster, tmp_path: Path, namespace: str) -> Iterator[tuple[Webhook, str]]:
    hook = Webhook(tmp_path / "tls")
    hook.start()
    name = f"tierwise-test-{namespace}"
    config = configuration(name, hook.port, (hook.folder / CA_FILE).read_bytes())
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
