"""The Helm chart: lint, schema, rendered objects accepted by a real API server, alert rules that
promtool accepts and that fire on the metrics they name, and RBAC that is enough and no more (the
real operator and the real webhook run under the chart's ServiceAccounts)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from localcluster import Cluster, free_port, tool
from tests.accounts import token_kubeconfig
from tests.conftest import ROOT, TIERWISE, wait_for
from tests.operatorproc import OperatorProcess
from tierwise.crdgen import all_crds

CHART = ROOT / "charts" / "tierwise"
Obj = dict[str, Any]

# Non-default value sets: each is linted, rendered and applied to the API server.
CERT_MANAGER_AND_MONITORING: Obj = {
    "webhook": {"certManager": {"enabled": True}},
    "monitoring": {
        "labels": {"release": "kube-prometheus-stack"},
        "serviceMonitor": {"enabled": True, "interval": "15s"},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True, "alertLabels": {"team": "platform"}},
    },
}
CUSTOM: Obj = {
    "clusterDomain": "k8s.example",
    "image": {
        "operator": {"repository": "registry.example.com:5000/tw/operator", "tag": "1.2.3"},
        "sidecar": {"repository": "registry.example.com:5000/tw/sidecar", "tag": "1.2.3-rc.1"},
        "pullPolicy": "Always",
    },
    "imagePullSecrets": [{"name": "regcred"}],
    "operator": {
        "prometheusUrl": "http://prometheus.monitoring.svc:9090",
        "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "platform", "effect": "NoSchedule"}],
        "priorityClassName": "tierwise-chart-test",
    },
    "sidecar": {
        "storesSecret": "tierwise-stores",
        "resources": {"requests": {"cpu": "100m", "memory": "200Mi"}, "limits": {"cpu": 1, "memory": "1Gi"}},
    },
    "webhook": {
        "replicas": 3,
        "inject": {"failurePolicy": "Ignore", "timeoutSeconds": 3},
        "validate": {"failurePolicy": "Fail", "timeoutSeconds": 10, "unknownTiers": "Warn"},
        "certValidityHours": 720,
        "podDisruptionBudget": {"maxUnavailable": "50%"},
        "resources": {"requests": {"cpu": "20m", "memory": "100Mi"}, "limits": {"memory": "300Mi"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]}
                    ]
                }
            }
        },
        "priorityClassName": "tierwise-chart-test",
    },
}
ONE_REPLICA: Obj = {"webhook": {"replicas": 1}}
VALUE_SETS: dict[str, Obj] = {
    "default": {},
    "certmanager-monitoring": CERT_MANAGER_AND_MONITORING,
    "custom": CUSTOM,
    "one-replica": ONE_REPLICA,
}


# ---------------------------------------------------------------- helpers


def helm(cluster: Cluster | None, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    extra = ["--kubeconfig", str(cluster.kubeconfig)] if cluster else []
    return subprocess.run([tool("helm"), *args, *extra], capture_output=True, text=True, timeout=timeout, check=False)


def values_file(folder: Path, values: Obj) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"values-{len(list(folder.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def template(release: str, namespace: str, values: Obj, folder: Path) -> str:
    res = helm(None, "template", release, str(CHART), "--namespace", namespace, "-f", str(values_file(folder, values)))
    assert res.returncode == 0, res.stderr
    return res.stdout


def docs_of(rendered: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(rendered) if d]


def one(docs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[Obj]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


def container(deployment: Obj) -> Obj:
    return dict(deployment["spec"]["template"]["spec"]["containers"][0])


def flags(deployment: Obj) -> dict[str, str]:
    """The container's `--name=value` arguments (a bare `--flag` maps to "")."""
    out = {}
    for arg in container(deployment)["args"][1:]:
        name, _, value = arg.partition("=")
        out[name] = value
    return out


def hosts(service: str, namespace: str, domain: str = "cluster.local") -> list[str]:
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.{domain}"]


def get(cluster: Cluster, *args: str) -> Any:
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def can_i(cluster: Cluster, namespace: str, service_account: str, *args: str) -> bool:
    """`kubectl auth can-i` as the ServiceAccount, with the groups its token carries."""
    res = cluster.kubectl(
        "auth", "can-i", *args,
        f"--as=system:serviceaccount:{namespace}:{service_account}",
        "--as-group=system:serviceaccounts", f"--as-group=system:serviceaccounts:{namespace}",
        "--as-group=system:authenticated",
        check=False,
    )  # fmt: skip
    answer = res.stdout.strip()
    assert answer in ("yes", "no"), res.stderr
    return answer == "yes"


def check_permissions(cluster: Cluster, namespace: str, sa: str, allowed: list[str], denied: list[str]) -> None:
    wrong = [f"can {a}" for a in denied if can_i(cluster, namespace, sa, *a.split())]
    wrong += [f"cannot {a}" for a in allowed if not can_i(cluster, namespace, sa, *a.split())]
    assert not wrong, f"{sa}: {wrong}"


# ---------------------------------------------------------------- no cluster


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_strict(name: str, tmp_path: Path) -> None:
    res = helm(None, "lint", "--strict", str(CHART), "-f", str(values_file(tmp_path, VALUE_SETS[name])))
    assert res.returncode == 0, res.stdout + res.stderr


def test_helm_template_includes_the_generated_crds() -> None:
    res = helm(None, "template", "tierwise", str(CHART), "--include-crds")
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    rendered = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert rendered == {crd["metadata"]["name"]: crd for crd in all_crds().values()}


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"webhook": {"inject": {"failurePolicy": "Sometimes"}}}, "/webhook/inject/failurePolicy"),
        ({"webhook": {"validate": {"failurePolicy": "fail"}}}, "/webhook/validate/failurePolicy"),
        ({"webhook": {"replicas": -1}}, "/webhook/replicas"),
        ({"webhook": {"replica": 2}}, "'replica'"),
        ({"webhook": {"podDisruptionBudget": {"maxUnavailable": 0}}}, "/webhook/podDisruptionBudget/maxUnavailable"),
        ({"webhook": {"inject": {"timeoutSeconds": 31}}}, "/webhook/inject/timeoutSeconds"),
        ({"webhook": {"certManager": {"issuerRef": {"kind": "ClusterIssuer"}}}}, "/webhook/certManager/issuerRef"),
        ({"image": {"operator": {"repository": "ghcr.io/x", "tag": "not a tag"}}}, "/image/operator/tag"),
        ({"sidecar": {"resources": {"limits": {"memory": "lots"}}}}, "/sidecar/resources/limits/memory"),
        ({"sidecar": {"storesSecret": "Not_A_Name"}}, "/sidecar/storesSecret"),
        ({"operator": {"prometheusUrl": "prometheus:9090"}}, "/operator/prometheusUrl"),
        ({"monitoring": {"serviceMonitor": {"interval": "30 seconds"}}}, "/monitoring/serviceMonitor/interval"),
        ({"imagePullSecrets": ["regcred"]}, "/imagePullSecrets/0"),
        ({"operator": {"sidecarImage": "x:1"}}, "'sidecarImage'"),
    ],
)
def test_the_values_schema_refuses_a_wrong_value_naming_the_field(values: Obj, field: str, tmp_path: Path) -> None:
    res = helm(None, "template", "tw", str(CHART), "-f", str(values_file(tmp_path, values)))
    assert res.returncode != 0
    assert "schema" in res.stderr and field in res.stderr, res.stderr


def test_default_rendering(tmp_path: Path) -> None:
    """The self-managed certificate mode: no caBundle rendered, the webhook's flags name the
    objects the chart creates, least-privilege Role on exactly the one Secret."""
    ns = "tierwise-system"
    docs = docs_of(template("tw", ns, {}, tmp_path))
    assert not [d for d in docs if d["apiVersion"].startswith(("cert-manager.io", "monitoring.coreos.com"))]
    mutating = one(docs, "MutatingWebhookConfiguration", "tw-inject")
    validating = one(docs, "ValidatingWebhookConfiguration", "tw-validate")
    for config in (mutating, validating):
        assert "annotations" not in config["metadata"]
        for hook in config["webhooks"]:
            assert "caBundle" not in hook["clientConfig"]  # the webhook patches it in at run time
            assert hook["clientConfig"]["service"]["name"] == "tw-webhook"
            assert hook["clientConfig"]["service"]["port"] == 443
            assert (hook["admissionReviewVersions"], hook["sideEffects"], hook["timeoutSeconds"]) == (["v1"], "None", 5)
            assert hook["matchPolicy"] == "Equivalent"

    inject, opt_in = mutating["webhooks"]
    assert [inject["name"], opt_in["name"]] == ["inject.tierwise.dev", "inject-opt-in.tierwise.dev"]
    for hook in (inject, opt_in):
        assert hook["clientConfig"]["service"]["path"] == "/mutate"
        assert (hook["failurePolicy"], hook["reinvocationPolicy"]) == ("Fail", "Never")
        assert hook["rules"] == [
            {"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "operations": ["CREATE"],
             "scope": "Namespaced"}
        ]  # fmt: skip
    excluded = {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [ns, "kube-system"]}
    assert inject["namespaceSelector"]["matchExpressions"] == [
        {"key": "tierwise.dev/injection", "operator": "In", "values": ["enabled"]},
        excluded,
    ]
    assert inject["objectSelector"]["matchExpressions"] == [
        {"key": "tierwise.dev/inject", "operator": "NotIn", "values": ["false"]}
    ]
    assert opt_in["namespaceSelector"]["matchExpressions"] == [
        {"key": "tierwise.dev/injection", "operator": "In", "values": ["opt-in"]},
        excluded,
    ]
    assert opt_in["objectSelector"]["matchExpressions"] == [
        {"key": "tierwise.dev/inject", "operator": "In", "values": ["true"]}
    ]
    (validate,) = validating["webhooks"]
    assert (validate["name"], validate["failurePolicy"]) == ("validate.tierwise.dev", "Ignore")
    assert validate["clientConfig"]["service"]["path"] == "/validate"
    assert validate["rules"] == [
        {"apiGroups": ["tierwise.dev"], "apiVersions": ["v1alpha1"],
         "resources": ["inferencetiers", "costbudgets", "cachepolicies"], "operations": ["CREATE", "UPDATE"],
         "scope": "Namespaced"}
    ]  # fmt: skip

    webhook = one(docs, "Deployment", "tw-webhook")
    assert webhook["spec"]["replicas"] == 2
    assert webhook["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert container(webhook)["image"] == "ghcr.io/tierwise/tierwise-operator:0.1.0"
    assert container(webhook)["args"][0] == "webhook"
    assert flags(webhook) == {
        "--port": "9443",
        "--health-port": "8081",
        "--platform-namespace": ns,
        "--sidecar-image": "ghcr.io/tierwise/tierwise-sidecar:0.1.0",
        "--sidecar-resources": json.dumps(
            {"limits": {"memory": "256Mi"}, "requests": {"cpu": "50m", "memory": "128Mi"}}, separators=(",", ":")
        ),
        "--mutating-configuration": "tw-inject",
        "--validating-configuration": "tw-validate",
        "--unknown-tiers": "deny",
        "--manage-certs": "",
        "--cert-secret": "tw-webhook-tls",
        "--namespace": "$(POD_NAMESPACE)",
        "--cert-hosts": ",".join(hosts("tw-webhook", ns)),
        "--cert-dir": "/tmp/webhook-tls",
        "--cert-validity-hours": "8760",
    }
    pod = webhook["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container(webhook)
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}
    }  # fmt: skip
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}}]
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in c["env"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"https": 9443, "health": 8081}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == webhook["spec"]["selector"]["matchLabels"]
    assert one(docs, "PodDisruptionBudget", "tw-webhook")["spec"]["maxUnavailable"] == 1

    service = one(docs, "Service", "tw-webhook")
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("https", 443, "https"),
        ("metrics", 8081, "health"),
    }
    metrics = one(docs, "Service", "tw-operator-metrics")
    assert metrics["spec"]["selector"] == one(docs, "Deployment", "tw-operator")["spec"]["selector"]["matchLabels"]

    secret = one(docs, "Secret", "tw-webhook-tls")
    assert "data" not in secret  # filled in by the webhook, left alone by upgrades
    role = one(docs, "Role", "tw-webhook")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["tw-webhook-tls"], "verbs": ["get", "update"]}
    ]
    cluster_role = one(docs, "ClusterRole", "tw-webhook")
    named = {r["resources"][0]: r["resourceNames"] for r in cluster_role["rules"] if "resourceNames" in r}
    assert named == {"mutatingwebhookconfigurations": ["tw-inject"], "validatingwebhookconfigurations": ["tw-validate"]}
    assert all(set(r["verbs"]) <= {"get", "list", "watch", "patch"} for r in cluster_role["rules"])

    operator = one(docs, "Deployment", "tw-operator")
    assert flags(operator)["--sidecar-image"] == "ghcr.io/tierwise/tierwise-sidecar:0.1.0"
    assert "--prometheus-url" not in flags(operator)
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/instance"] == "tw", d["metadata"]["name"]
        assert d["metadata"]["labels"]["helm.sh/chart"] == "tierwise-0.1.0", d["metadata"]["name"]


def test_cert_manager_and_monitoring_rendering(tmp_path: Path) -> None:
    ns = "tierwise-system"
    docs = docs_of(template("tw", ns, CERT_MANAGER_AND_MONITORING, tmp_path))
    # A self-signed Issuer bootstraps a CA, whose Issuer signs the serving certificate.
    assert one(docs, "Issuer", "tw-webhook-selfsigned")["spec"] == {"selfSigned": {}}
    ca = one(docs, "Certificate", "tw-webhook-ca")["spec"]
    assert ca["isCA"] is True and ca["issuerRef"]["name"] == "tw-webhook-selfsigned"
    assert one(docs, "Issuer", "tw-webhook-ca")["spec"] == {"ca": {"secretName": ca["secretName"]}}
    serving = one(docs, "Certificate", "tw-webhook")["spec"]
    assert serving["issuerRef"] == {"name": "tw-webhook-ca", "kind": "Issuer", "group": "cert-manager.io"}
    assert serving["dnsNames"] == hosts("tw-webhook", ns)
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        config = one(docs, kind)
        assert config["metadata"]["annotations"] == {"cert-manager.io/inject-ca-from": f"{ns}/tw-webhook"}
        assert all("caBundle" not in h["clientConfig"] for h in config["webhooks"])

    webhook = one(docs, "Deployment", "tw-webhook")
    f = flags(webhook)
    assert f["--cert-dir"] == "/etc/tierwise/webhook-tls"
    assert not {"--manage-certs", "--cert-secret", "--cert-hosts"} & set(f)
    mount = next(m for m in container(webhook)["volumeMounts"] if m["mountPath"] == "/etc/tierwise/webhook-tls")
    assert mount["readOnly"] is True
    volume = next(v for v in webhook["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == serving["secretName"]
    # Nothing of the self-managed mode: no Secret to write, no configuration to patch.
    assert not [d for d in docs if d["kind"] in ("Secret", "Role", "RoleBinding")]
    rules = one(docs, "ClusterRole", "tw-webhook")["rules"]
    assert {g for r in rules for g in r["apiGroups"]} == {"tierwise.dev", ""}

    service_monitor = one(docs, "ServiceMonitor", "tw")
    assert service_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = service_monitor["spec"]["selector"]
    for svc in ("tw-operator-metrics", "tw-webhook"):
        labels = one(docs, "Service", svc)["metadata"]["labels"]
        assert all(labels[k] == v for k, v in selector["matchLabels"].items())
        assert labels[selector["matchExpressions"][0]["key"]] in selector["matchExpressions"][0]["values"]
        assert "metrics" in {p["name"] for p in one(docs, "Service", svc)["spec"]["ports"]}
    assert service_monitor["spec"]["endpoints"][0]["interval"] == "15s"
    pod_monitor = one(docs, "PodMonitor", "tw-sidecars")["spec"]
    assert pod_monitor["selector"] == {"matchLabels": {"tierwise.dev/sidecar": "injected"}}
    assert pod_monitor["namespaceSelector"] == {"any": True}
    assert pod_monitor["podMetricsEndpoints"] == [{"port": "tierwise", "path": "/metrics", "interval": "30s"}]
    one(docs, "PrometheusRule", "tw")


def test_a_given_issuer_replaces_the_charts_own_ca(tmp_path: Path) -> None:
    values = {"webhook": {"certManager": {"enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}}}
    docs = docs_of(template("tw", "tierwise-system", values, tmp_path))
    assert [d["metadata"]["name"] for d in docs if d["apiVersion"].startswith("cert-manager.io")] == ["tw-webhook"]
    assert one(docs, "Certificate")["spec"]["issuerRef"] == {
        "name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"
    }  # fmt: skip


def test_custom_values_rendering(tmp_path: Path) -> None:
    ns = "tierwise-system"
    docs = docs_of(template("tw", ns, CUSTOM, tmp_path))
    webhook, operator = one(docs, "Deployment", "tw-webhook"), one(docs, "Deployment", "tw-operator")
    sidecar_image = "registry.example.com:5000/tw/sidecar:1.2.3-rc.1"
    for dep in (webhook, operator):
        pod = dep["spec"]["template"]["spec"]
        assert container(dep)["image"] == "registry.example.com:5000/tw/operator:1.2.3"
        assert container(dep)["imagePullPolicy"] == "Always"
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
        assert pod["priorityClassName"] == "tierwise-chart-test"
        assert flags(dep)["--sidecar-image"] == sidecar_image
    assert flags(operator)["--prometheus-url"] == "http://prometheus.monitoring.svc:9090"
    assert container(operator)["resources"] == CUSTOM["operator"]["resources"]
    assert webhook["spec"]["replicas"] == 3
    assert webhook["spec"]["template"]["spec"]["affinity"] == CUSTOM["webhook"]["affinity"]  # replaces the default
    assert webhook["spec"]["template"]["spec"]["tolerations"] == CUSTOM["webhook"]["tolerations"]
    assert container(webhook)["resources"] == CUSTOM["webhook"]["resources"]
    assert flags(webhook)["--unknown-tiers"] == "warn"
    f = flags(webhook)
    assert f["--stores-secret"] == "tierwise-stores"
    assert json.loads(f["--sidecar-resources"]) == CUSTOM["sidecar"]["resources"]
    assert f["--cert-validity-hours"] == "720"
    assert f["--cert-hosts"] == ",".join(hosts("tw-webhook", ns, "k8s.example"))
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == "50%"
    assert {
        (h["failurePolicy"], h["timeoutSeconds"]) for h in one(docs, "MutatingWebhookConfiguration")["webhooks"]
    } == {("Ignore", 3)}
    (validate,) = one(docs, "ValidatingWebhookConfiguration")["webhooks"]
    assert (validate["failurePolicy"], validate["timeoutSeconds"]) == ("Fail", 10)


@pytest.mark.cluster
def test_notes_say_what_to_do_next_and_warn_without_prometheus(cluster: Cluster, tmp_path: Path) -> None:
    def notes(values: Obj) -> str:
        # A client-side dry run; helm still asks the API server for its version.
        res = helm(
            cluster, "install", "tw", str(CHART), "--dry-run=client", "--namespace", "tierwise-system",
            "-f", str(values_file(tmp_path, values)),
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        return res.stdout.split("NOTES:", 1)[1]

    text = notes({})
    for step in (
        "kubectl label namespace my-app tierwise.dev/injection=enabled",
        "tierwise.dev/injection=opt-in",
        "examples/quickstart/",
        'tierwise.dev/openai-base-url: "true"',
        "kubectl get inferencetiers",
    ):
        assert step in text, step
    assert "WARNING: operator.prometheusUrl is empty" in text
    assert "WARNING" not in notes({"operator": {"prometheusUrl": "http://prometheus:9090"}})


# ---------------------------------------------------------------- alert rules


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool not found: install the Debian package prometheus (hack/setup.sh does)"
    return found


def _s(metric: str, **labels: str) -> str:
    """A sidecar series as scraped: the pod's namespace and name from the PodMonitor's target."""
    return metric + "{" + ", ".join(f'{k}="{v}"' for k, v in {"namespace": "app", "pod": "p", **labels}.items()) + "}"


PROMTOOL_TESTS: Obj = {
    "rule_files": ["rules.yaml"],
    "evaluation_interval": "1m",
    "tests": [
        {  # nothing scrapes the operator; the webhook is up
            "interval": "1m",
            "input_series": [
                {"series": 'up{job="tw-operator-metrics", namespace="tierwise-system"}', "values": "0x30"},
                {"series": 'up{job="tw-webhook", namespace="tierwise-system", pod="w1"}', "values": "1x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "TierwiseOperatorDown", "exp_alerts": []},  # not for 5m yet
                {
                    "eval_time": "10m",
                    "alertname": "TierwiseOperatorDown",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "critical",
                                "team": "platform",
                                "job": "tw-operator-metrics",
                                "namespace": "tierwise-system",
                            }
                        }
                    ],
                },
                {"eval_time": "10m", "alertname": "TierwiseWebhookDown", "exp_alerts": []},
            ],
        },
        {  # 10% of gold's requests end in a 502, 1% of silver's; a backend fails 40% of its attempts
            "interval": "1m",
            "input_series": [
                {"series": _s("tierwise_requests_total", backend="b", tier="gold", code="200"), "values": "0+90x30"},
                {"series": _s("tierwise_requests_total", backend="b", tier="gold", code="502"), "values": "0+10x30"},
                {"series": _s("tierwise_requests_total", backend="b", tier="silver", code="200"), "values": "0+99x30"},
                {"series": _s("tierwise_requests_total", backend="b", tier="silver", code="502"), "values": "0+1x30"},
                {
                    "series": _s("tierwise_upstream_attempts_total", backend="b", tier="gold", result="ok"),
                    "values": "0+60x30",
                },
                {
                    "series": _s("tierwise_upstream_attempts_total", backend="b", tier="gold", result="timeout"),
                    "values": "0+40x30",
                },
                {"series": _s("tierwise_policy_reloads_total", result="refused"), "values": "0 0 0 1 1 1 1 1 1 1"},
            ],
            "alert_rule_test": [
                {
                    "eval_time": "20m",
                    "alertname": "TierwiseTierErrors",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "team": "platform",
                                "namespace": "app",
                                "tier": "gold",
                            },
                            "exp_annotations": {
                                "summary": "A tier answers too many requests with a server error.",
                                "description": "10% of the requests of tier gold in app end in a 5xx (every backend"
                                " and fallback failed).",
                            },
                        }
                    ],
                },
                {
                    "eval_time": "20m",
                    "alertname": "TierwiseBackendFailing",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "team": "platform",
                                "namespace": "app",
                                "tier": "gold",
                                "backend": "b",
                            }
                        }
                    ],
                },
                {  # no webhook scraped at all
                    "eval_time": "10m",
                    "alertname": "TierwiseWebhookDown",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "critical",
                                "team": "platform",
                                "job": "tw-webhook",
                                "namespace": "tierwise-system",
                            }
                        }
                    ],
                },
                {
                    "eval_time": "5m",
                    "alertname": "TierwisePolicyRefused",
                    "exp_alerts": [
                        {"exp_labels": {"severity": "warning", "team": "platform", "namespace": "app", "pod": "p"}}
                    ],
                },
            ],
        },
        {  # a certificate 7 days from expiry (promtool's clock starts at 0); a held Policy; errors
            "interval": "1m",
            "input_series": [
                {
                    "series": 'tierwise_webhook_certificate_expiry_timestamp_seconds{job="tw-webhook", pod="w1"}',
                    "values": f"{7 * 86400}x40",
                },
                {
                    "series": 'tierwise_webhook_certificate_expiry_timestamp_seconds{job="tw-webhook", pod="w2"}',
                    "values": f"{300 * 86400}x40",
                },
                {
                    "series": 'tierwise_operator_policy_held{job="tw-operator-metrics", namespace="team-a"}',
                    "values": "1x40",
                },
                {
                    "series": 'tierwise_operator_policy_held{job="tw-operator-metrics", namespace="team-b"}',
                    "values": "0x40",
                },
                {
                    "series": 'tierwise_operator_reconcile_errors_total{job="tw-operator-metrics", key="tier", '
                    'error="ApiError"}',
                    "values": "0+1x40",
                },
                {
                    "series": 'tierwise_webhook_admissions_total{job="tw-webhook", operation="validate", '
                    'result="error"}',
                    "values": "0+3x40",
                },
                {
                    "series": 'tierwise_webhook_admissions_total{job="tw-webhook", operation="mutate", '
                    'result="patched"}',
                    "values": "0+3x40",
                },
            ],
            "alert_rule_test": [
                {
                    "eval_time": "20m",
                    "alertname": "TierwiseWebhookCertificateExpiry",
                    "exp_alerts": [{"exp_labels": {"severity": "critical", "team": "platform"}}],
                },
                {
                    "eval_time": "20m",
                    "alertname": "TierwisePolicyHeld",
                    "exp_alerts": [{"exp_labels": {"severity": "warning", "team": "platform", "namespace": "team-a"}}],
                },
                {
                    "eval_time": "35m",
                    "alertname": "TierwiseOperatorReconcileErrors",
                    "exp_alerts": [
                        {"exp_labels": {"severity": "warning", "team": "platform", "key": "tier", "error": "ApiError"}}
                    ],
                },
                {
                    "eval_time": "20m",
                    "alertname": "TierwiseWebhookAdmissionErrors",
                    "exp_alerts": [
                        {"exp_labels": {"severity": "warning", "team": "platform", "operation": "validate"}}
                    ],
                },
            ],
        },
    ],
}


def _requests(ns: str, tier: str, ok_per_min: int, failed_per_min: int, minutes: int) -> list[Obj]:
    return [
        {"series": f'tierwise_requests_total{{namespace="{ns}", tier="{tier}", code="200"}}',
         "values": f"0+{ok_per_min}x{minutes}"},
        {"series": f'tierwise_requests_total{{namespace="{ns}", tier="{tier}", code="502"}}',
         "values": f"0+{failed_per_min}x{minutes}"},
        {"series": f'tierwise_tier_availability_objective_ratio{{namespace="{ns}", tier="{tier}", pod="p"}}',
         "values": f"0.99x{minutes}"},
    ]  # fmt: skip


# Burn rates against each tier's own objective (99% here: a 1% error budget), and budget states.
PROMTOOL_TESTS["tests"].append(
    {
        "interval": "1m",
        "input_series": [
            *_requests("app", "burning", 80, 20, 200),  # 20%: 20x the budget, both pairs of the fast burn
            *_requests("app", "leaking", 98, 2, 200),  # 2%: 2x, only the 1x pair of the slow burn
            *_requests("app", "calm", 995, 5, 200),  # 0.5%: within the budget
            {"series": 'tierwise_budget_state{budget_namespace="team", budget="hard", state="Exceeded", pod="p"}',
             "values": "1x30"},
            {"series": 'tierwise_budget_state{budget_namespace="team", budget="soft", state="Exceeded", pod="p"}',
             "values": "0x30"},
            {"series": 'tierwise_budget_state{budget_namespace="team", budget="soft", state="Warning", pod="p"}',
             "values": "1x30"},
            {"series": 'tierwise_budget_state{budget_namespace="team", budget="hard", state="Warning", pod="p"}',
             "values": "0x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "TierwiseSLOBurnFast", "exp_alerts": []},  # not for 2m yet
            {
                "eval_time": "10m",
                "alertname": "TierwiseSLOBurnFast",
                "exp_alerts": [
                    {"exp_labels": {"severity": "critical", "team": "platform", "namespace": "app", "tier": "burning"}}
                ],
            },
            {"eval_time": "10m", "alertname": "TierwiseSLOBurnSlow", "exp_alerts": []},  # not for 15m yet
            {
                "eval_time": "60m",
                "alertname": "TierwiseSLOBurnSlow",
                "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "team": "platform", "namespace": "app", "tier": "burning"}},
                    {"exp_labels": {"severity": "warning", "team": "platform", "namespace": "app", "tier": "leaking"}},
                ],
            },
            {"eval_time": "30s", "alertname": "TierwiseBudgetExceeded", "exp_alerts": []},
            {
                "eval_time": "5m",
                "alertname": "TierwiseBudgetExceeded",
                "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "team": "platform", "budget_namespace": "team",
                                    "budget": "hard"}}
                ],
            },
            {"eval_time": "3m", "alertname": "TierwiseBudgetThreshold", "exp_alerts": []},
            {
                "eval_time": "10m",
                "alertname": "TierwiseBudgetThreshold",
                "exp_alerts": [
                    {"exp_labels": {"severity": "info", "team": "platform", "budget_namespace": "team",
                                    "budget": "soft", "state": "Warning"}}
                ],
            },
        ],
    }
)  # fmt: skip


def test_alert_rules_pass_promtool_and_fire_on_the_metrics_they_name(tmp_path: Path) -> None:
    rule = one(docs_of(template("tw", "tierwise-system", CERT_MANAGER_AND_MONITORING, tmp_path)), "PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    res = subprocess.run(
        [promtool(), "check", "rules", "rules.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0 and "SUCCESS" in res.stdout + res.stderr, res.stdout + res.stderr
    # Firing is about expr, for and labels: promtool compares annotations too, so the copy under
    # test keeps them on one alert only, whose text (templated from the alert's labels) is checked.
    groups = rule["spec"]["groups"]
    for r in (r for g in groups for r in g["rules"] if r["alert"] != "TierwiseTierErrors"):
        r.pop("annotations")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(PROMTOOL_TESTS))
    res = subprocess.run(
        [promtool(), "test", "rules", "tests.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    every = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    tests = [t for case in PROMTOOL_TESTS["tests"] for t in case["alert_rule_test"]]
    fires = {t["alertname"] for t in tests if t["exp_alerts"]}
    silent = {t["alertname"] for t in tests if not t["exp_alerts"]}
    assert every == fires  # each alert is shown to fire on its metric
    assert {a for a in every if a.startswith(("TierwiseSLO", "TierwiseBudget"))} <= silent  # and to keep quiet


# ---------------------------------------------------------------- real API server


def _schema(props: Obj, **extra: Any) -> Obj:
    return {"type": "object", "properties": props, **extra}


STR, BOOL, INT = {"type": "string"}, {"type": "boolean"}, {"type": "integer"}
STRS, STRMAP = {"type": "array", "items": STR}, {"type": "object", "additionalProperties": STR}
LABEL_SELECTOR = _schema(
    {
        "matchLabels": STRMAP,
        "matchExpressions": {
            "type": "array",
            "items": _schema({"key": STR, "operator": STR, "values": STRS}, required=["key", "operator"]),
        },
    }
)
ISSUER_REF = _schema({"name": STR, "kind": STR, "group": STR}, required=["name"])


def _crd(group: str, kind: str, plural: str, spec: Obj) -> Obj:
    """A CRD with a structural schema of the fields the chart uses, as upstream spells them: an
    unknown or misspelt field is refused by kubectl's strict field validation."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": _schema({"spec": spec})},
                }
            ],
        },
    }


THIRD_PARTY_CRDS = [
    _crd(
        "cert-manager.io", "Certificate", "certificates",
        _schema(
            {
                "secretName": STR, "commonName": STR, "dnsNames": STRS, "duration": STR, "renewBefore": STR,
                "isCA": BOOL, "usages": STRS, "issuerRef": ISSUER_REF,
                "privateKey": _schema(
                    {"algorithm": {"type": "string", "enum": ["RSA", "ECDSA", "Ed25519"]}, "size": INT,
                     "rotationPolicy": {"type": "string", "enum": ["Never", "Always"]}, "encoding": STR}
                ),
            },
            required=["issuerRef", "secretName"],
        ),
    ),
    _crd(
        "cert-manager.io", "Issuer", "issuers",
        _schema({"selfSigned": _schema({"crlDistributionPoints": STRS}),
                 "ca": _schema({"secretName": STR}, required=["secretName"])}),
    ),
    _crd(
        "monitoring.coreos.com", "ServiceMonitor", "servicemonitors",
        _schema(
            {
                "selector": LABEL_SELECTOR, "jobLabel": STR,
                "namespaceSelector": _schema({"any": BOOL, "matchNames": STRS}),
                "endpoints": {"type": "array", "items": _schema(
                    {"port": STR, "path": STR, "interval": STR, "scrapeTimeout": STR, "honorLabels": BOOL,
                     "scheme": STR}
                )},
            },
            required=["selector"],
        ),
    ),
    _crd(
        "monitoring.coreos.com", "PodMonitor", "podmonitors",
        _schema(
            {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": _schema({"any": BOOL, "matchNames": STRS}),
                "podMetricsEndpoints": {"type": "array", "items": _schema(
                    {"port": STR, "path": STR, "interval": STR, "scrapeTimeout": STR, "honorLabels": BOOL}
                )},
            },
            required=["selector"],
        ),
    ),
    _crd(
        "monitoring.coreos.com", "PrometheusRule", "prometheusrules",
        _schema({"groups": {"type": "array", "items": _schema(
            {"name": STR, "interval": STR, "rules": {"type": "array", "items": _schema(
                {"alert": STR, "record": STR, "expr": {"x-kubernetes-int-or-string": True}, "for": STR,
                 "labels": STRMAP, "annotations": STRMAP},
                required=["expr"],
            )}},
            required=["name"],
        )}}),
    ),
]  # fmt: skip


@pytest.fixture(scope="module")
def third_party_crds(cluster: Cluster) -> Iterator[Cluster]:
    """cert-manager's and the Prometheus Operator's kinds the chart renders (CRDs only)."""
    manifest = yaml.safe_dump_all(THIRD_PARTY_CRDS)
    cluster.kubectl("apply", "--server-side", "--field-manager=tierwise-tests", "-f", "-", input=manifest)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", "-", input=manifest)
    wait_for(
        "the third-party kinds in discovery",
        lambda: all(
            k in cluster.kubectl("api-resources", check=False).stdout
            for k in ("Certificate", "Issuer", "ServiceMonitor", "PodMonitor", "PrometheusRule")
        ),
    )
    yield cluster
    cluster.kubectl("delete", "-f", "-", "--wait=false", "--ignore-not-found", input=manifest, check=False)


@pytest.fixture(scope="module")
def priority_class(cluster: Cluster) -> Iterator[str]:
    name = "tierwise-chart-test"
    body = {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name}, "value": 1000}
    cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(body))
    yield name
    cluster.kubectl("delete", "priorityclass", name, "--ignore-not-found", check=False)


def evict(cluster: Cluster, namespace: str, pod: str) -> subprocess.CompletedProcess[str]:
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": namespace}}
    return cluster.kubectl(
        "create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction", "-f", "-",
        input=json.dumps(body), check=False,
    )  # fmt: skip


def webhook_pods(cluster: Cluster, namespace: str) -> list[Obj]:
    out = get(cluster, "pods", "-n", namespace, "-l", "app.kubernetes.io/component=webhook")
    return [p for p in out["items"] if not p["metadata"].get("deletionTimestamp")]


def pdb_allows(cluster: Cluster, namespace: str, name: str, expected: int, allowed: int) -> bool:
    status = (get(cluster, "pdb", name, "-n", namespace) or {}).get("status", {})
    return bool(status.get("expectedPods") == expected and status.get("disruptionsAllowed") == allowed)


@pytest.mark.cluster
@pytest.mark.parametrize("name", VALUE_SETS)
def test_the_api_server_accepts_every_rendered_object(
    name: str, third_party_crds: Cluster, priority_class: str, tmp_path: Path
) -> None:
    """Server-side apply with strict field validation: every object the chart renders for this
    value set is valid for the real API server; the Deployments then roll out (kwok runs the pods),
    and the webhook's PodDisruptionBudget lets a node drain go on, even with one replica."""
    cluster = third_party_crds
    ns, release = f"tierwise-chart-{name}", f"c{list(VALUE_SETS).index(name)}"
    rendered = template(release, ns, VALUE_SETS[name], tmp_path)
    expected = kinds(docs_of(rendered))
    cluster.kubectl("create", "namespace", ns)
    try:
        res = cluster.kubectl(
            "apply", "--server-side", "--field-manager=helm-template-test", "--validate=strict", "-f", "-",
            input=rendered, check=False,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        live = json.loads(cluster.kubectl("get", "-f", "-", "-o", "json", input=rendered).stdout)["items"]
        assert kinds(live) == expected

        wait_for(
            "the Deployments available",
            lambda: all(
                d["status"].get("availableReplicas", 0) == d["spec"]["replicas"]
                and d["status"].get("updatedReplicas", 0) == d["spec"]["replicas"]
                for d in get(cluster, "deployments", "-n", ns)["items"]
            ),
            timeout=90,
        )
        replicas = one(live, "Deployment", f"{release}-webhook")["spec"]["replicas"]
        assert len(webhook_pods(cluster, ns)) == replicas
        if name == "default":
            wait_for("the budget to allow one eviction", lambda: pdb_allows(cluster, ns, f"{release}-webhook", 2, 1))
        if name == "one-replica":
            # maxUnavailable, not minAvailable: a single webhook pod can still be evicted (drain).
            wait_for("the budget to allow one eviction", lambda: pdb_allows(cluster, ns, f"{release}-webhook", 1, 1))
            (pod,) = webhook_pods(cluster, ns)
            res = evict(cluster, ns, pod["metadata"]["name"])
            assert res.returncode == 0, res.stderr
        if name == "certmanager-monitoring":
            webhooks = [one(live, k)["metadata"]["annotations"] for k in ("MutatingWebhookConfiguration",
                                                                         "ValidatingWebhookConfiguration")]  # fmt: skip
            assert webhooks == [{"cert-manager.io/inject-ca-from": f"{ns}/{release}-webhook"}] * 2
    finally:
        cluster.kubectl("delete", "-f", "-", "--ignore-not-found", "--wait=false", input=rendered, check=False)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.mark.cluster
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


@pytest.mark.cluster
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


# ---------------------------------------------------------------- RBAC: enough, and no more

RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def conditions(obj: Obj) -> list[Obj]:
    return list((obj.get("status") or {}).get("conditions", []))


def tier_ready(cluster: Cluster, namespace: str, name: str) -> bool:
    tier = get(cluster, "inferencetier", name, "-n", namespace)
    for c in ((tier or {}).get("status") or {}).get("conditions", []):
        if c["type"] == "Ready":
            return bool(c["status"] == "True" and c.get("observedGeneration") == tier["metadata"]["generation"])
    return False


def audited(cluster: Cluster, since: float, username: str) -> list[Obj]:
    """Write requests (the audit policy logs writes only) sent as `username` after `since`."""
    assert cluster.workdir is not None
    out = []
    for line in (cluster.workdir / "audit.log").read_text().splitlines():
        e = json.loads(line)
        if e.get("stage") == "ResponseComplete" and e.get("user", {}).get("username") == username:
            stamp = time.mktime(time.strptime(e["requestReceivedTimestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
            if stamp - time.timezone >= since:
                out.append(e)
    return out


@pytest.mark.cluster
def test_the_operator_reconciles_the_quickstart_as_the_charts_service_account(crds: Cluster, tmp_path: Path) -> None:
    cluster = crds
    ns, app, release = "tierwise-rbac-operator", "tierwise-rbac-app", "rbac"
    sa = f"{release}-operator"
    rbac = [d for d in docs_of(template(release, ns, {}, tmp_path)) if d["kind"] in RBAC_KINDS]
    rbac = [d for d in rbac if d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"]
    manifest = yaml.safe_dump_all(rbac)
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("create", "namespace", app)
    cluster.kubectl("label", "namespace", app, "tierwise.dev/injection=enabled")
    operator = None
    try:
        cluster.kubectl("apply", "--server-side", "--field-manager=tierwise-tests", "-f", "-", input=manifest)
        kubeconfig = token_kubeconfig(cluster, ns, sa, tmp_path / "operator.kubeconfig")
        since = time.time() - 1
        operator = OperatorProcess(Cluster(kubeconfig=kubeconfig), tmp_path / "operator", "--platform-namespace", ns)
        operator.start()
        cluster.kubectl(
            "apply", "--server-side", "--field-manager=tests", "-n", app, "-f", str(ROOT / "examples" / "quickstart")
        )
        try:
            for tier in ("gold", "silver", "bronze"):
                wait_for(f"tier {tier} Ready", lambda t=tier: tier_ready(cluster, app, t), timeout=90)
            wait_for("the Policy ConfigMap", lambda: get(cluster, "configmap", "tierwise-policy", "-n", app))
            for kind in ("costbudgets", "cachepolicies"):  # their status is written as the account too
                wait_for(f"{kind} Ready", lambda k=kind: all(
                    any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions(o))
                    for o in get(cluster, k, "-n", app)["items"]
                ))  # fmt: skip
        except AssertionError as e:
            raise AssertionError(f"{e}; the operator's log:\n{operator.log.read_text()[-3000:]}") from None
        assert get(cluster, "deployment", "silver-llama-8b", "-n", app)  # a self-hosted backend's children
        assert get(cluster, "pdb", "silver-llama-8b", "-n", app)
        log = operator.log.read_text()
        assert "forbidden" not in log.lower(), log[-3000:]
        if cluster.workdir is not None:  # our own control plane: its audit log says who wrote
            writes = audited(cluster, since, f"system:serviceaccount:{ns}:{sa}")
            assert {e["verb"] for e in writes} >= {"create", "patch"}, "the operator wrote nothing as its account"
            assert [e["requestURI"] for e in writes if e["responseStatus"]["code"] == 403] == []
    finally:
        if operator is not None:
            operator.stop()
        cluster.kubectl("delete", "namespace", app, "--wait=false", check=False)

    try:
        check_permissions(
            cluster, ns, sa,
            allowed=[
                "watch inferencetiers.tierwise.dev -A", "list costbudgets.tierwise.dev -A",
                "watch cachepolicies.tierwise.dev -A",
                f"patch inferencetiers.tierwise.dev --subresource=status -n {app}",
                f"patch costbudgets.tierwise.dev --subresource=status -n {app}",
                f"patch cachepolicies.tierwise.dev --subresource=status -n {app}",
                "watch namespaces", f"patch deployments.apps -n {app}", f"delete services -n {app}",
                f"create configmaps -n {app}", f"create poddisruptionbudgets.policy -n {app}",
                f"patch horizontalpodautoscalers.autoscaling -n {app}", f"create events -n {app}",
                "watch customresourcedefinitions.apiextensions.k8s.io",
            ],
            denied=[
                "get secrets -A", "list secrets -A", f"get secrets -n {ns}", f"watch secrets -n {app}",
                "delete namespaces", "create namespaces", "create clusterrolebindings.rbac.authorization.k8s.io",
                "bind clusterroles.rbac.authorization.k8s.io", "escalate clusterroles.rbac.authorization.k8s.io",
                "impersonate serviceaccounts", f"create serviceaccounts/token -n {ns}",
                f"patch inferencetiers.tierwise.dev -n {app}", f"update inferencetiers.tierwise.dev -n {app}",
                f"delete inferencetiers.tierwise.dev -n {app}", f"patch costbudgets.tierwise.dev -n {app}",
                f"delete cachepolicies.tierwise.dev -n {app}", f"delete pods -n {app}", f"create pods -n {app}",
                f"create pods/exec -n {app}", f"update deployments.apps -n {app}",
                "patch mutatingwebhookconfigurations.admissionregistration.k8s.io",
                "delete customresourcedefinitions.apiextensions.k8s.io", "get nodes",
            ],
        )  # fmt: skip
    finally:
        cluster.kubectl("delete", "-f", "-", "--ignore-not-found", "--wait=false", input=manifest, check=False)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


class WebhookProcess:
    """`tierwise webhook` on loopback with the chart's own command line (ports and folder aside)."""

    def __init__(self, args: list[str], kubeconfig: Path, namespace: str, folder: Path) -> None:
        self.port, self.health = free_port(), free_port()
        local = {"--port": str(self.port), "--health-port": str(self.health), "--cert-dir": str(folder / "tls")}
        argv = []
        for arg in args:
            name, sep, value = arg.partition("=")
            value = local.get(name, value).replace("$(POD_NAMESPACE)", namespace)
            argv.append(f"{name}{sep}{value}")
        self.log = folder / "webhook.log"
        folder.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    *TIERWISE, *argv, "--kubeconfig", str(kubeconfig), "--host", "127.0.0.1", "--drain-seconds", "0.5",
                    "--cert-check-interval", "1",
                ],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "TIERWISE_HEALTH_HOST": "127.0.0.1"},
            )  # fmt: skip

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""
        except OSError:
            return 0, ""

    def served_der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", self.port)))

    def wait_ready(self) -> None:
        try:
            wait_for("the webhook ready", lambda: self.get("/readyz")[0] == 200 or self.proc.poll() is not None, 60)
        except AssertionError as e:
            raise AssertionError(f"{e}; its log:\n{self.log.read_text()[-3000:]}") from None
        assert self.proc.poll() is None, self.log.read_text()[-3000:]

    def post(self, path: str, body: Obj, ca: bytes, hostname: str) -> tuple[int, Obj]:
        """POST over TLS, verifying the certificate against `ca` for `hostname` (a name the API
        server would use)."""
        ctx = ssl.create_default_context(cadata=ca.decode())
        data = json.dumps(body).encode()
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {hostname}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        )
        reply = b""
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=hostname) as tls,
        ):
            tls.sendall(request.encode() + data)
            while chunk := tls.recv(65536):
                reply += chunk
        head, _, payload = reply.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(payload or b"{}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def admission_review(obj: Obj, namespace: str) -> Obj:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "chart-test",
            "kind": {"group": "tierwise.dev", "version": "v1alpha1", "kind": obj["kind"]},
            "resource": {"group": "tierwise.dev", "version": "v1alpha1", "resource": "inferencetiers"},
            "operation": "CREATE",
            "namespace": namespace,
            "name": obj["metadata"]["name"],
            "object": obj,
        },
    }


@pytest.mark.cluster
def test_the_webhook_keeps_its_certificate_as_the_charts_service_account_and_upgrades_keep_it(
    crds: Cluster, tmp_path: Path
) -> None:
    """helm install; the real webhook, run with the chart's command line under the chart's
    ServiceAccount, fills the chart's Secret and patches the caBundle of the chart's two
    configurations (and can read the cluster to validate); `helm upgrade` then changes the
    configurations without resetting what the webhook wrote; uninstall removes it all."""
    cluster = crds
    ns, release = "tierwise-rbac-webhook", "whk"
    sa, secret = f"{release}-webhook", f"{release}-webhook-tls"
    configs = (
        ("mutatingwebhookconfiguration", f"{release}-inject"),
        ("validatingwebhookconfiguration", f"{release}-validate"),
    )
    res = helm(
        cluster, "install", release, str(CHART), "--namespace", ns, "--create-namespace", "--wait", "--timeout=90s",
        timeout=150,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    webhook: WebhookProcess | None = None
    try:
        assert "data" not in get(cluster, "secret", secret, "-n", ns)
        deployment = get(cluster, "deployment", sa, "-n", ns)
        kubeconfig = token_kubeconfig(cluster, ns, sa, tmp_path / "webhook.kubeconfig")
        webhook = WebhookProcess(container(deployment)["args"], kubeconfig, ns, tmp_path / "webhook")
        webhook.wait_ready()

        data = get(cluster, "secret", secret, "-n", ns)["data"]
        cert = x509.load_pem_x509_certificate(ssl.get_server_certificate(("127.0.0.1", webhook.port)).encode())
        assert cert == x509.load_pem_x509_certificate(base64.b64decode(data["tls.crt"]))  # the Secret's, served
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        )
        assert set(names) == set(hosts(sa, ns))
        bundles = {
            hook["clientConfig"].get("caBundle")
            for kind, name in configs
            for hook in get(cluster, kind, name)["webhooks"]
        }
        (bundle,) = bundles
        assert bundle, "caBundle not patched"

        # The API server's view: the Service name, verified against the caBundle it was given.
        tier = {
            "apiVersion": "tierwise.dev/v1alpha1",
            "kind": "InferenceTier",
            "metadata": {"name": "chart-check", "namespace": "default"},
            "spec": {
                "backends": [
                    {
                        "name": "api",
                        "model": "gpt-4o-mini",
                        "url": "https://api.openai.com/v1",
                        "pricing": {"inputPerMillion": 0.15, "outputPerMillion": 0.6},
                    }
                ]
            },
        }
        status, reply = webhook.post(
            "/validate", admission_review(tier, "default"), base64.b64decode(bundle), f"{sa}.{ns}.svc"
        )
        assert status == 200, reply  # 503 when it cannot list what it validates against
        assert reply["response"]["uid"] == "chart-test" and reply["response"]["allowed"] is True, reply
        assert 'result="error"' not in webhook.get("/metrics")[1]
        # The account may watch what it judges: validations come from the watch's cache.
        cached = 'tierwise_webhook_cluster_reads_total{source="cache"}'
        wait_for("a validation judged on the cache", lambda: webhook.post(
            "/validate", admission_review(tier, "default"), base64.b64decode(bundle), f"{sa}.{ns}.svc"
        )[0] == 200 and cached in webhook.get("/metrics")[1])  # fmt: skip
        assert "forbidden" not in webhook.log.read_text().lower(), webhook.log.read_text()[-3000:]

        # An upgrade changing the configurations keeps the caBundle and the certificate.
        res = helm(
            cluster, "upgrade", release, str(CHART), "--namespace", ns,
            "--set", "webhook.inject.timeoutSeconds=7", "--set", "webhook.validate.timeoutSeconds=9",
            "--wait", "--timeout=90s", timeout=150,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        after = {name: get(cluster, kind, name)["webhooks"] for kind, name in configs}
        assert [h["timeoutSeconds"] for h in after[f"{release}-inject"]] == [7, 7]
        assert [h["timeoutSeconds"] for h in after[f"{release}-validate"]] == [9]
        assert {h["clientConfig"].get("caBundle") for hooks in after.values() for h in hooks} == {bundle}
        assert get(cluster, "secret", secret, "-n", ns)["data"] == data

        check_permissions(
            cluster, ns, sa,
            allowed=[
                f"get secrets/{secret} -n {ns}", f"update secrets/{secret} -n {ns}",
                f"get mutatingwebhookconfigurations.admissionregistration.k8s.io/{release}-inject",
                f"patch mutatingwebhookconfigurations.admissionregistration.k8s.io/{release}-inject",
                f"get validatingwebhookconfigurations.admissionregistration.k8s.io/{release}-validate",
                f"patch validatingwebhookconfigurations.admissionregistration.k8s.io/{release}-validate",
                "list inferencetiers.tierwise.dev -A", "list costbudgets.tierwise.dev -A",
                "list cachepolicies.tierwise.dev -A", "list namespaces", "watch inferencetiers.tierwise.dev -A",
                "watch costbudgets.tierwise.dev -A", "watch cachepolicies.tierwise.dev -A", "watch namespaces",
            ],
            denied=[
                f"get secrets/{release}-other -n {ns}", f"list secrets -n {ns}", "get secrets -A",
                f"create secrets -n {ns}", f"delete secrets/{secret} -n {ns}", f"get secrets/{secret} -n default",
                "patch mutatingwebhookconfigurations.admissionregistration.k8s.io/other",
                "patch validatingwebhookconfigurations.admissionregistration.k8s.io/other",
                "list mutatingwebhookconfigurations.admissionregistration.k8s.io",
                "create mutatingwebhookconfigurations.admissionregistration.k8s.io",
                f"delete mutatingwebhookconfigurations.admissionregistration.k8s.io/{release}-inject",
                "create pods -n default", "get pods -n default", "update inferencetiers.tierwise.dev -A",
                "patch inferencetiers.tierwise.dev --subresource=status -A", "get inferencetiers.tierwise.dev -A",
                "create configmaps -n default", "delete namespaces",
            ],
        )  # fmt: skip

        # The Secret deleted by hand: the webhook may not create Secrets, so it keeps serving the
        # certificate it has and says what to do; `helm upgrade` puts the chart's empty Secret back
        # and the webhook fills it again.
        served = webhook.served_der()
        cluster.kubectl("delete", "secret", secret, "-n", ns)
        wait_for("the missing Secret reported", lambda: "may not create it" in webhook.log.read_text())
        assert webhook.get("/healthz")[0] == 200 and webhook.served_der() == served
        res = helm(cluster, "upgrade", release, str(CHART), "--namespace", ns, "--reuse-values", timeout=150)
        assert res.returncode == 0, res.stderr
        wait_for("the Secret filled again", lambda: (get(cluster, "secret", secret, "-n", ns) or {}).get("data"))
        renewed = get(cluster, "secret", secret, "-n", ns)["data"]
        wait_for(
            "the new certificate served",
            lambda: webhook.served_der() == ssl.PEM_cert_to_DER_cert(base64.b64decode(renewed["tls.crt"]).decode()),
        )
        # Trusted by the configurations the API server uses: the old CA stays while it is valid.
        trusted = {
            h["clientConfig"]["caBundle"] for kind, name in configs for h in get(cluster, kind, name)["webhooks"]
        }
        (now_trusted,) = trusted
        status, reply = webhook.post(
            "/validate", admission_review(tier, "default"), base64.b64decode(now_trusted), f"{sa}.{ns}.svc"
        )
        assert status == 200 and reply["response"]["allowed"] is True, reply
    finally:
        if webhook is not None:
            webhook.stop()
        res = helm(cluster, "uninstall", release, "--namespace", ns, "--wait", timeout=150)
        with contextlib.suppress(Exception):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    assert res.returncode == 0, res.stderr
    # Uninstall leaves nothing of the webhook's behind: the Secret was the chart's.
    assert all(get(cluster, kind, name) is None for kind, name in configs)
    assert get(cluster, "secret", secret, "-n", ns) is None
