"""The injection decision, without a cluster."""

from __future__ import annotations

from typing import Any

import jsonpatch

from tierwise_operator.injection import InjectionConfig, patch, skip_warning

CFG = InjectionConfig(image="tw:1", stores_secret="tierwise-stores")


def pod(**meta: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", **meta},
        "spec": {
            "initContainers": [{"name": "setup", "image": "busybox"}],
            "containers": [
                {"name": "app", "image": "a", "env": [{"name": "X", "value": "1"}]},
                {"name": "b", "image": "b"},
            ],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }


def test_patch_appends_after_the_pods_own_and_is_idempotent() -> None:
    p = pod(annotations={"tierwise.dev/openai-base-url": "true"})
    out = jsonpatch.apply_patch(p, patch(p, CFG))
    assert [c["name"] for c in out["spec"]["initContainers"]] == ["setup", "tierwise-sidecar"]
    side = out["spec"]["initContainers"][1]
    # The API only on loopback (the pod's own identity must not serve other pods); probes and the
    # metrics port on the pod IP, where kubelet and Prometheus reach it.
    assert "--host=127.0.0.1" in side["args"] and "--health-port=8481" in side["args"]
    assert {side[p]["httpGet"]["port"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} == {8481}
    assert side["ports"] == [{"name": "tierwise", "containerPort": 8481, "protocol": "TCP"}]
    assert side["envFrom"] == [{"secretRef": {"name": "tierwise-stores", "optional": True}}]
    assert [v["name"] for v in out["spec"]["volumes"]] == [
        "data",
        "tierwise-policy",
        "tierwise-tmp",
        "tierwise-state",
        "tierwise-cache",
    ]
    # Without Redis, budgets are counted in a ledger that outlives a restart of the container.
    assert {"name": "TIERWISE_BUDGET_STORE", "value": "sqlite:/var/lib/tierwise/budgets.sqlite"} in side["env"]
    assert {"name": "tierwise-state", "mountPath": "/var/lib/tierwise"} in side["volumeMounts"]
    assert {"name": "tierwise-cache", "mountPath": "/var/cache/tierwise"} in side["volumeMounts"]
    assert out["spec"]["containers"][0]["env"][-1] == {"name": "OPENAI_BASE_URL", "value": "http://127.0.0.1:8480/v1"}
    assert out["spec"]["containers"][1]["env"] == [{"name": "OPENAI_BASE_URL", "value": "http://127.0.0.1:8480/v1"}]
    assert out["metadata"]["annotations"]["tierwise.dev/injected"] == "v1"
    assert out["metadata"]["labels"] == {"tierwise.dev/sidecar": "injected"}
    assert patch(out, CFG) == []
    labelled = pod(labels={"app": "x"})
    assert jsonpatch.apply_patch(labelled, patch(labelled, CFG))["metadata"]["labels"] == {
        "app": "x",
        "tierwise.dev/sidecar": "injected",
    }


def test_opt_out_by_label_or_annotation_and_an_existing_base_url_kept() -> None:
    assert patch(pod(labels={"tierwise.dev/inject": "false"}), CFG) == []
    assert patch(pod(annotations={"tierwise.dev/inject": "false"}), CFG) == []
    p = pod(annotations={"tierwise.dev/openai-base-url": "true"})
    p["spec"]["containers"][0]["env"].append({"name": "OPENAI_BASE_URL", "value": "http://mine/v1"})
    out = jsonpatch.apply_patch(p, patch(p, CFG))
    assert [e["value"] for e in out["spec"]["containers"][0]["env"] if e["name"] == "OPENAI_BASE_URL"] == [
        "http://mine/v1"
    ]


def test_a_pod_on_the_hosts_network_is_left_alone_with_a_warning() -> None:
    p = pod()
    p["spec"]["hostNetwork"] = True
    assert patch(p, CFG) == []
    warning = skip_warning(p)
    assert warning is not None and "host's network" in warning and "tierwise.dev/inject=false" in warning
    # Opted out knowingly: no warning.
    quiet = pod(labels={"tierwise.dev/inject": "false"})
    quiet["spec"]["hostNetwork"] = True
    assert skip_warning(quiet) is None and skip_warning(pod()) is None
