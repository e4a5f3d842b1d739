"""The ingress role's narrowing of a Policy (a pure function), its source wrapper, the pinned tier,
and the flags of `tierwise sidecar --ingress` (checked before anything is served)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tierwise.api.tier import Backend
from tierwise.compiler import compile
from tierwise.loader import load
from tierwise.policy import Policy
from tierwise_cli.main import main
from tierwise_sidecar.app import Gateway, GatewayConfig
from tierwise_sidecar.errors import ApiError
from tierwise_sidecar.identify import identify
from tierwise_sidecar.ingress import Ingress, IngressError, IngressSource, ingress_policy, parse_target, parse_upstream
from tierwise_sidecar.policy_source import PolicyFile, PolicyLoadError, read_policy
from tierwise_sidecar.runtime import build_runtime
from tierwise_sidecar.secrets import SecretSource

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM = "http://127.0.0.1:8000/v1"
NO_SECRETS = SecretSource(Path("/nonexistent"), {})


@pytest.fixture(scope="module")
def quickstart() -> Policy:
    """gold (external, sticky, falls back to silver), silver (self-hosted llama-8b and an external
    API, falls back to bronze), bronze (default); two budgets and a cache policy."""
    loaded = load(ROOT / "examples" / "quickstart")
    return compile(loaded.resources, namespaces=loaded.namespaces)


def _with_backends(policy: Policy, tier: str, backends: list[Backend]) -> Policy:
    """The Policy with one tier's backends replaced, sealed again."""
    t = policy.tiers[tier]
    spec = t.spec.model_copy(update={"backends": backends})
    return policy.model_copy(update={"tiers": {**policy.tiers, tier: t.model_copy(update={"spec": spec})}}).sealed()


def test_ingress_policy_keeps_only_the_tier_and_backend(quickstart: Policy) -> None:
    narrowed = ingress_policy(quickstart, "silver", "llama-8b")
    assert list(narrowed.tiers) == ["silver"] and narrowed.default_tier == "silver"
    silver = narrowed.tiers["silver"]
    assert [b.name for b in silver.spec.backends] == ["llama-8b"]
    assert silver.fallback_chain == [] and silver.spec.fallback is None
    assert narrowed.unavailable_tiers == [] and narrowed.budgets == [] and narrowed.cache_policies == []
    assert [(s.kind, s.name) for s in narrowed.sources] == [("InferenceTier", "silver")]
    # What the tier promises is kept: the SLO (timeouts), the deployment, the namespace.
    assert silver.spec.slo == quickstart.tiers["silver"].spec.slo
    assert silver.spec.backends[0] == quickstart.tiers["silver"].spec.backends[0]
    assert narrowed.namespace == quickstart.namespace
    # Sealed with its own hash, stable, and a valid Policy as read back from a file.
    assert narrowed.hash == narrowed.sealed().hash != quickstart.hash
    assert ingress_policy(quickstart, "silver", "llama-8b").hash == narrowed.hash
    assert Policy.model_validate(narrowed.wire()).sealed() == narrowed
    # Pure: the Policy it was given is unchanged.
    assert sorted(quickstart.tiers) == ["bronze", "gold", "silver"] and len(quickstart.budgets) == 2


def test_ingress_policy_turns_stickiness_off(quickstart: Policy) -> None:
    # gold is sticky; give it a self-hosted backend to front.
    hosted = quickstart.tiers["silver"].spec.backends[0].model_copy(update={"name": "local"})
    policy = _with_backends(quickstart, "gold", [*quickstart.tiers["gold"].spec.backends, hosted])
    assert policy.tiers["gold"].spec.routing.stickiness.enabled
    narrowed = ingress_policy(policy, "gold", "local")
    assert not narrowed.tiers["gold"].spec.routing.stickiness.enabled


@pytest.mark.parametrize(
    ("tier", "backend", "message"),
    [
        (
            "platinum",
            "llama-8b",
            "tier 'platinum' is not in the Policy of namespace default (tiers: bronze, gold, silver)",
        ),
        ("silver", "llama-70b", "tier silver has no backend 'llama-70b' (backends: llama-8b, openai-4o-mini)"),
        (
            "silver",
            "openai-4o-mini",
            "backend silver/openai-4o-mini is an external API, not a self-hosted model server",
        ),
    ],
)
def test_ingress_policy_refuses_what_it_cannot_front(quickstart: Policy, tier: str, backend: str, message: str) -> None:
    with pytest.raises(IngressError) as e:
        ingress_policy(quickstart, tier, backend)
    assert str(e.value) == message
    # A refused reload, like any broken Policy: the one in force stays.
    assert isinstance(e.value, PolicyLoadError)


def test_pinned_tier_answers_whatever_the_request_names(quickstart: Policy) -> None:
    narrowed = ingress_policy(quickstart, "silver", "llama-8b")
    pinned = build_runtime(narrowed, NO_SECRETS, pin_tier=True).access
    for headers, body in [({}, {}), ({"x-tierwise-tier": "gold"}, {}), ({}, {"model": "bronze"}), ({}, {"model": "x"})]:
        assert identify(headers, body, pinned).tier == "silver"
    # Without the pin, the narrowed Policy alone would call gold unknown.
    unpinned = build_runtime(narrowed, NO_SECRETS).access
    with pytest.raises(ApiError, match="tier 'gold' does not exist"):
        identify({"x-tierwise-tier": "gold"}, {}, unpinned)


def test_parse_target_and_upstream() -> None:
    assert parse_target("silver/llama-8b") == ("silver", "llama-8b")
    for bad in ["silver", "/llama-8b", "silver/", "a/b/c"]:
        with pytest.raises(ValueError, match="expected <tier>/<backend>"):
            parse_target(bad)
    assert parse_upstream("http://127.0.0.1:8000/v1/") == UPSTREAM
    for bad in ["127.0.0.1:8000", "ftp://host/v1", "http://"]:
        with pytest.raises(ValueError, match="http\\(s\\) base URL"):
            parse_upstream(bad)


def _write(path: Path, policy: Policy) -> Path:
    path.write_text(json.dumps(policy.wire()))
    return path


def test_every_reload_goes_through_the_narrowing(quickstart: Policy, tmp_path: Path) -> None:
    path = _write(tmp_path / "policy.json", quickstart)
    source = IngressSource(PolicyFile(path, "default"), Ingress("silver", "llama-8b", UPSTREAM))
    gateway = Gateway(source, GatewayConfig(pin_tier=True), NO_SECRETS)
    assert gateway.reload()
    assert gateway.runtime is not None and list(gateway.runtime.tiers) == ["silver"]
    assert gateway.health.endpoints.get("silver/llama-8b") == (UPSTREAM,)

    llama, external = quickstart.tiers["silver"].spec.backends
    renamed = llama.model_copy(update={"model": "llama-next"})
    _write(tmp_path / "next.json", _with_backends(quickstart, "silver", [renamed, external])).replace(path)
    assert gateway.reload()
    assert [b.model for b in gateway.runtime.tiers["silver"].backends] == ["llama-next"]

    _write(tmp_path / "next.json", _with_backends(quickstart, "silver", [external])).replace(path)
    assert not gateway.reload()
    assert [b.model for b in gateway.runtime.tiers["silver"].backends] == ["llama-next"]
    assert gateway.metrics.registry.get_sample_value("tierwise_policy_reloads_total", {"result": "refused"}) == 1


def test_policy_file_refuses_another_namespaces_policy(quickstart: Policy, tmp_path: Path) -> None:
    path = _write(tmp_path / "policy.json", quickstart)
    assert PolicyFile(path).load().policy == read_policy(path)
    with pytest.raises(PolicyLoadError, match="the Policy is namespace default's, this sidecar serves models"):
        PolicyFile(path, "models").load()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--ingress", "silver"], "expected <tier>/<backend>"),
        (["--ingress", "silver/llama-8b", "--upstream", "localhost:8000"], "http(s) base URL"),
        (["--ingress", "silver/llama-8b"], "--ingress needs --upstream"),
        (["--upstream", UPSTREAM], "--upstream is only valid with --ingress"),
        (["--ingress", "silver/llama-8b", "--upstream", UPSTREAM, "--discover-endpoints"], "discovers no endpoints"),
    ],
)
def test_sidecar_flags_are_checked_before_serving(
    args: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["sidecar", "--policy-file", "/nonexistent/policy.json", *args])
    except SystemExit as e:  # argparse's own usage errors
        code = int(e.code or 0)
    assert code == 2 and error in capsys.readouterr().err
