"""The generated CRDs against a real kube-apiserver: install, apply, reject, explain, print."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localcluster import Cluster
from tests.cases import INVALID, VALID, Obj, budget, cache, tier
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]


def apply(cluster: Cluster, obj: Obj, namespace: str, check: bool = False):  # type: ignore[no-untyped-def]
    return cluster.kubectl(
        "apply",
        "--server-side",
        "--field-manager=tests",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps(obj),
        check=check,
    )


def test_crds_are_established_with_names_and_category(crds: Cluster) -> None:
    out = crds.kubectl("api-resources", "--api-group=tierwise.dev", "-o", "wide").stdout
    for plural, short in (("inferencetiers", "itier,tier"), ("costbudgets", "budget,cb"), ("cachepolicies", "cpol")):
        line = next(line for line in out.splitlines() if line.startswith(plural))
        assert short in line and "tierwise" in line and "true" in line  # namespaced, in the category


@pytest.mark.parametrize("path", sorted((ROOT / "examples").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_applies_server_side_and_reads_back(crds: Cluster, namespace: str, path: Path) -> None:
    import yaml

    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    # The platform example names its own namespaces; create them the way a user would, first.
    for d in docs:
        if d["kind"] == "Namespace":
            crds.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(d))
    for d in docs:
        if d["kind"] == "Namespace":
            continue
        ns = d["metadata"].get("namespace", namespace)
        apply(crds, d, ns, check=True)
        got = json.loads(crds.kubectl("get", d["kind"], d["metadata"]["name"], "-n", ns, "-o", "json").stdout)
        # Everything the user wrote is stored as written (the server may add defaults, never drop).
        _assert_contains(got["spec"], d["spec"], f"{d['kind']}/{d['metadata']['name']}.spec")


def _assert_contains(got: object, want: object, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict), where
        for k, v in want.items():
            assert k in got, f"{where}.{k} was dropped by the API server"
            _assert_contains(got[k], v, f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_contains(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_server_applies_scalar_defaults(crds: Cluster, namespace: str) -> None:
    apply(crds, tier(routing={"stickiness": {"enabled": True}}), namespace, check=True)
    got = json.loads(crds.kubectl("get", "tier", "gold", "-n", namespace, "-o", "json").stdout)["spec"]
    assert got["routing"]["strategy"] == "Weighted"
    assert got["routing"]["stickiness"]["ttlSeconds"] == 1800
    assert got["backends"][0]["weight"] == 1


@pytest.mark.parametrize(("obj", "field", "reason"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_api_server_rejects_invalid_object_naming_the_field(
    crds: Cluster, namespace: str, obj: Obj, field: str, reason: str
) -> None:
    res = apply(crds, obj, namespace)
    assert res.returncode != 0, f"the API server accepted an invalid object: {res.stdout}"
    assert f"{field}:" in res.stderr, res.stderr  # named as the field at fault, not only in the prose
    assert reason.lower() in res.stderr.lower(), res.stderr
    # Nothing was stored.
    got = crds.kubectl("get", obj["kind"], obj["metadata"]["name"], "-n", namespace, check=False)
    assert got.returncode != 0 and "NotFound" in got.stderr


@pytest.mark.parametrize("obj", [c[1] for c in VALID], ids=[c[0] for c in VALID])
def test_api_server_accepts_sparse_valid_object(crds: Cluster, namespace: str, obj: Obj) -> None:
    res = apply(crds, obj, namespace)
    assert res.returncode == 0, res.stderr


def test_kubectl_explain_shows_field_descriptions(crds: Cluster) -> None:
    def explain(path: str) -> str:
        return " ".join(crds.kubectl("explain", path).stdout.split())

    out = explain("inferencetier.spec.backends.pricing")
    assert "USD per million prompt tokens" in out
    assert "cachedInputPerMillion" in out
    out = explain("costbudget.spec.thresholds.action")
    assert "Notify, Downgrade, Throttle or Reject" in out
    out = explain("cachepolicy.spec.scope")
    assert "one tenant never sees another's answers" in out
    top = explain("inferencetier")
    assert "one service tier of LLM traffic" in top


def test_kubectl_get_shows_printer_columns_from_spec_and_status(crds: Cluster, namespace: str) -> None:
    apply(crds, tier("silver"), namespace, check=True)
    apply(crds, tier("gold", fallback={"tier": "silver"}), namespace, check=True)
    status = {
        "status": {
            "readyBackends": 1,
            "sloState": "Met",
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "BackendsReady",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
        }
    }
    crds.kubectl(
        "patch", "tier", "gold", "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(status)
    )
    out = crds.kubectl("get", "inferencetiers", "-n", namespace).stdout.splitlines()
    assert out[0].split() == ["NAME", "PRIORITY", "STRATEGY", "FALLBACK", "BACKENDS", "READY", "SLO", "AGE"]
    gold = next(line.split() for line in out if line.startswith("gold"))
    assert gold[:7] == ["gold", "10", "Weighted", "silver", "1", "True", "Met"]

    apply(crds, budget(), namespace, check=True)
    apply(crds, cache(), namespace, check=True)
    head = crds.kubectl("get", "costbudgets", "-n", namespace).stdout.splitlines()[0].split()
    assert head[:5] == ["NAME", "PERIOD", "LIMIT", "USD", "SPENT"]
    every = crds.kubectl("get", "tierwise", "-n", namespace).stdout
    for name in (
        "inferencetier.tierwise.dev/gold",
        "costbudget.tierwise.dev/monthly",
        "cachepolicy.tierwise.dev/cache",
    ):
        assert name in every


def test_status_is_a_subresource_spec_writes_ignore_it(crds: Cluster, namespace: str) -> None:
    obj = tier()
    obj["status"] = {"sloState": "Met"}
    apply(crds, obj, namespace, check=True)
    got = json.loads(crds.kubectl("get", "tier", "gold", "-n", namespace, "-o", "json").stdout)
    assert "status" not in got or "sloState" not in got.get("status", {})


def test_cel_rules_see_the_spec_after_an_update(crds: Cluster, namespace: str) -> None:
    apply(crds, tier(), namespace, check=True)
    res = crds.kubectl(
        "patch",
        "tier",
        "gold",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"fallback":{"tier":"gold"}}}',
        check=False,
    )
    assert res.returncode != 0 and "must not fall back to itself" in res.stderr
    wait_for(
        "tier unchanged",
        lambda: "fallback" not in crds.kubectl("get", "tier", "gold", "-n", namespace, "-o", "json").stdout,
    )
