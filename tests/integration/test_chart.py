"""The Helm chart carries exactly the generated CRDs and installs them into a real API server."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from localcluster import Cluster, tool
from tests.conftest import wait_for
from tierwise.crdgen import all_crds

CHART = Path(__file__).resolve().parents[2] / "charts" / "tierwise"


def helm(cluster: Cluster | None, *args: str) -> subprocess.CompletedProcess[str]:
    extra = ["--kubeconfig", str(cluster.kubeconfig)] if cluster else []
    return subprocess.run([tool("helm"), *args, *extra], capture_output=True, text=True, timeout=120, check=False)


def test_helm_lint_strict() -> None:
    res = helm(None, "lint", "--strict", str(CHART))
    assert res.returncode == 0, res.stdout + res.stderr


def test_helm_template_includes_the_generated_crds() -> None:
    res = helm(None, "template", "tierwise", str(CHART), "--include-crds")
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    rendered = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert rendered == {crd["metadata"]["name"]: crd for crd in all_crds().values()}


def test_helm_install_creates_the_crds(cluster: Cluster) -> None:
    ns = "tierwise-helm-test"
    res = helm(cluster, "install", "tierwise", str(CHART), "--namespace", ns, "--create-namespace", "--wait")
    assert res.returncode == 0, res.stderr
    try:
        names = json.loads(cluster.kubectl("get", "crds", "-o", "json").stdout)["items"]
        assert {"inferencetiers.tierwise.dev", "costbudgets.tierwise.dev", "cachepolicies.tierwise.dev"} <= {
            c["metadata"]["name"] for c in names
        }
    finally:
        helm(cluster, "uninstall", "tierwise", "--namespace", ns)


def test_the_operator_runs_as_one_replica_that_a_rollout_never_doubles(cluster: Cluster) -> None:
    """Recreate: the old operator pod is gone before the new one is created, so two operators
    never act at once (kwok runs the pods; the Deployment controller is the real one)."""
    ns = "tierwise-recreate-test"
    res = helm(cluster, "install", "tw", str(CHART), "--namespace", ns, "--create-namespace")
    assert res.returncode == 0, res.stderr
    try:
        dep = json.loads(cluster.kubectl("get", "deployment", "tw-operator", "-n", ns, "-o", "json").stdout)
        assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
        pod_spec = dep["spec"]["template"]["spec"]
        assert pod_spec["securityContext"]["runAsNonRoot"] is True
        assert pod_spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True

        def pods() -> list[dict[str, Any]]:
            out = cluster.kubectl("get", "pods", "-n", ns, "-l", "app.kubernetes.io/component=operator", "-o", "json")
            return list(json.loads(out.stdout)["items"])

        wait_for("the operator pod Running", lambda: [p["status"].get("phase") for p in pods()] == ["Running"])
        generations = [{p["metadata"]["labels"]["pod-template-hash"] for p in pods()}]
        cluster.kubectl("set", "env", "deployment/tw-operator", "-n", ns, "ROLLOUT=2")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            seen = pods()
            generations.append({p["metadata"]["labels"]["pod-template-hash"] for p in seen})
            if [p["status"].get("phase") for p in seen] == ["Running"] and any(
                e.get("name") == "ROLLOUT" for e in seen[0]["spec"]["containers"][0].get("env", [])
            ):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"rollout did not finish; last pods: {generations[-1:]}")
        assert len({h for g in generations for h in g}) == 2  # old and new pod template
        assert all(len(g) <= 1 for g in generations), generations  # never both at once
    finally:
        helm(cluster, "uninstall", "tw", "--namespace", ns)
