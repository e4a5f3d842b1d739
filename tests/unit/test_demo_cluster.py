"""The demo runs the injected sidecar as the kubelet would: the container the webhook adds, its
$(VAR) references resolved from the pod, its volumes mapped to local folders, loopback ports."""

from __future__ import annotations

from pathlib import Path

from demo_cluster import injected_command
from tierwise_operator.injection import InjectionConfig, sidecar_container


def test_the_injected_container_runs_locally_as_injected(tmp_path: Path) -> None:
    pod = {
        "metadata": {"name": "shop-app", "namespace": "shop"},
        "spec": {"serviceAccountName": "shopper", "containers": [{"name": "app", "image": "x"}],
                 "initContainers": [sidecar_container(InjectionConfig(image="tierwise:1"))]},
    }  # fmt: skip
    args, env = injected_command(pod, tmp_path, 18000, 18001)
    assert args == [
        "sidecar", f"--policy-file={tmp_path}/policy/policy.json", "--namespace=shop", "--no-discover-endpoints",
        "--host=127.0.0.1", "--port=18000", "--health-port=18001",
    ]  # fmt: skip
    assert env["TIERWISE_POD_NAMESPACE"] == "shop" and env["TIERWISE_POD_NAME"] == "shop-app"
    assert env["TIERWISE_SERVICE_ACCOUNT"] == "shopper"
    assert env["TIERWISE_BUDGET_STORE"] == f"sqlite:{tmp_path}/state/budgets.sqlite"
