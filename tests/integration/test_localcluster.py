"""The local control plane itself: pods really run on kwok nodes, and `down` leaves nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from localcluster import Cluster
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_deployment_gets_running_pods_on_simulated_nodes(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "deployment", "web", "--image=registry.example/web:1", "--replicas=2", "-n", namespace)

    def ready() -> bool:
        pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
        return len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods)

    wait_for("2 Running pods", ready, timeout=90)
    wait_for(
        "deployment readyReplicas=2",
        lambda: (
            cluster.kubectl(
                "get", "deployment", "web", "-n", namespace, "-o", "jsonpath={.status.readyReplicas}"
            ).stdout
            == "2"
        ),
        timeout=60,
    )
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
    assert {p["spec"]["nodeName"] for p in pods} == {"kwok-node-0"}  # placed by the real scheduler
    assert all(p["status"].get("podIP") for p in pods)


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "hack" / "localcluster.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )


def test_shell_up_and_down_leave_nothing_running(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TIERWISE_KUBECONFIG"}
    env["TIERWISE_CLUSTER_STATE"] = str(tmp_path / "state")
    up = _run(["up"], env)
    try:
        assert up.returncode == 0, up.stderr
        kubeconfig = up.stdout.strip().removeprefix("export KUBECONFIG=")
        assert Path(kubeconfig).exists()
        assert _run(["kubeconfig"], env).stdout.strip() == kubeconfig
        status = json.loads(_run(["status"], env).stdout)
        assert status["running"] == {"etcd": True, "kube-apiserver": True}
        pids = json.loads((tmp_path / "state" / "state.json").read_text())["pids"]
        ns = Cluster(kubeconfig=Path(kubeconfig)).kubectl("get", "namespaces", "-o", "name").stdout
        assert "namespace/default" in ns
    finally:
        down = _run(["down"], env)
    assert down.returncode == 0 and down.stdout.strip() == "stopped"
    for pid in pids.values():
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z", f"pid {pid} still running"
    assert not Path(kubeconfig).exists()
    again = _run(["status"], env)
    assert again.returncode == 1 and "no cluster is running" in again.stderr


def test_audit_log_records_writes_not_reads(cluster: Cluster, namespace: str) -> None:
    assert cluster.workdir is not None
    cluster.kubectl("create", "configmap", "audited", "-n", namespace, "--from-literal=a=b")
    cluster.kubectl("get", "configmap", "audited", "-n", namespace)
    log = cluster.workdir / "audit.log"

    def events() -> list[dict[str, object]]:
        out = []
        for line in log.read_text().splitlines():
            e = json.loads(line)
            ref = e.get("objectRef", {})
            if (
                ref.get("namespace") == namespace
                and ref.get("name") == "audited"
                and e.get("stage") == "ResponseComplete"
            ):
                out.append(e)
        return out

    got = wait_for("the create in the audit log", events, timeout=30)
    assert [e["verb"] for e in got] == ["create"]
