"""The Helm chart carries exactly the generated CRDs and installs them into a real API server."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from localcluster import Cluster, tool
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
    rendered = {d["metadata"]["name"]: d for d in yaml.safe_load_all(res.stdout) if d}
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
