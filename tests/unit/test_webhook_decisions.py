"""The validating webhook's judgement and the self-managed certificates' rotation, without a cluster."""

from __future__ import annotations

import base64
import datetime
from typing import Any

import jsonpatch
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.cases import budget, tier
from tierwise.api import Namespace
from tierwise_operator.certs import ServingCert, hosts_of, issue, renew_at, rotate, rotation_reason
from tierwise_operator.certsync import ca_bundle_ops
from tierwise_operator.validation import judge

NOW = datetime.datetime(2026, 11, 22, tzinfo=datetime.UTC)
HOSTS = ["tierwise-webhook.tierwise-system.svc", "10.0.0.1"]
PLATFORM = "tierwise-system"


def placed(doc: dict[str, Any], namespace: str = "team-a") -> dict[str, Any]:
    doc["metadata"]["namespace"] = namespace
    return doc


def test_a_fallback_cycle_is_refused_naming_both_tiers_and_the_field() -> None:
    cluster = [placed(tier("gold", fallback={"tier": "silver"})), placed(tier("silver"))]
    v = judge(cluster, [], placed(tier("silver", fallback={"tier": "gold"})), PLATFORM)
    assert not v.allowed
    assert v.message == "InferenceTier team-a/gold: spec.fallback.tier: fallback cycle: gold -> silver -> gold"


def test_unknown_tiers_and_contradicting_budgets_are_refused() -> None:
    v = judge([], [], placed(tier("gold", promotion={"borrowFrom": "platinum"})), PLATFORM)
    assert not v.allowed and "spec.promotion.borrowFrom" in v.message and '"platinum"' in v.message
    cluster = [placed(tier("gold")), placed(budget("team", limit={"usd": 100}))]
    v = judge(cluster, [], placed(budget("team-2", limit={"usd": 10})), PLATFORM)
    assert not v.allowed and "CostBudget team-a/team-2: spec.selector" in v.message
    # The same budget updated with a new limit replaces its old self: no conflict with itself.
    assert judge(cluster, [], placed(budget("team", limit={"usd": 10})), PLATFORM).allowed


def test_dangling_references_may_be_tolerated_but_cycles_never() -> None:
    # GitOps tools apply a set in their own order: gold may arrive before the silver it names.
    v = judge([], [], placed(tier("gold", fallback={"tier": "silver"})), PLATFORM, tolerate_dangling=True)
    assert v.allowed and v.warnings == ('InferenceTier team-a/gold: spec.fallback.tier: tier "silver" does not '
                                        "exist in namespace team-a",)  # fmt: skip
    cluster = [placed(tier("gold", fallback={"tier": "silver"})), placed(tier("silver"))]
    cycle = placed(tier("silver", fallback={"tier": "gold"}))
    assert not judge(cluster, [], cycle, PLATFORM, tolerate_dangling=True).allowed


def test_only_problems_the_change_adds_refuse_it() -> None:
    # gold already names a missing tier (applied while the webhook was down): editing bronze,
    # or gold itself without fixing it, is allowed; gold's standing problem comes back as a warning.
    broken = placed(tier("gold", fallback={"tier": "platinum"}))
    cluster = [broken, placed(tier("bronze"))]
    assert judge(cluster, [], placed(tier("bronze", priority=3)), PLATFORM).allowed
    v = judge(cluster, [], placed(tier("gold", fallback={"tier": "platinum"}, priority=9)), PLATFORM)
    assert v.allowed and len(v.warnings) == 1 and "platinum" in v.warnings[0]
    # Fixing it is of course allowed, and leaves no warning.
    fixed = judge(cluster, [], placed(tier("gold", fallback={"tier": "bronze"})), PLATFORM)
    assert fixed.allowed and fixed.warnings == ()


def test_platform_tiers_are_visible_where_they_grant_access() -> None:
    shared = placed(tier("gold", access={"namespaces": {"names": ["team-a"]}}), PLATFORM)
    v = judge([shared], [Namespace("team-a", {})], placed(tier("silver", fallback={"tier": "gold"})), PLATFORM)
    assert v.allowed
    v = judge([shared], [], placed(tier("silver", fallback={"tier": "gold"}), "team-b"), PLATFORM)
    assert not v.allowed and "team-b" in v.message


def test_an_object_that_does_not_parse_is_refused_with_its_field() -> None:
    bad = placed(tier("gold"))
    bad["spec"]["priority"] = "high"
    v = judge([], [], bad, PLATFORM)
    assert not v.allowed and "spec.priority" in v.message


def test_certificates_are_renewed_at_two_thirds_of_their_life() -> None:
    cert = issue(HOSTS, NOW, datetime.timedelta(days=90))
    at = renew_at(cert.cert_pem)
    assert NOW + datetime.timedelta(days=59) < at < NOW + datetime.timedelta(days=61)
    # Short-lived ones too: backdating for clock skew does not make them due at once.
    short = issue(HOSTS, NOW, datetime.timedelta(seconds=30))
    assert NOW + datetime.timedelta(seconds=15) < renew_at(short.cert_pem) < NOW + datetime.timedelta(seconds=20)


def test_rotation_reasons_and_the_trust_bundle_across_a_rotation() -> None:
    assert rotation_reason(None, HOSTS, NOW) == "no certificate yet"
    first = rotate(None, HOSTS, NOW, datetime.timedelta(days=30))
    assert first.trust == first.ca_pem and hosts_of(first.cert_pem) == set(HOSTS)
    assert rotation_reason(first, HOSTS, NOW + datetime.timedelta(days=19)) is None
    assert rotation_reason(first, ["other.svc"], NOW) == "the webhook's names changed"
    later = NOW + datetime.timedelta(days=21)
    assert rotation_reason(first, HOSTS, later) == "two thirds of its lifetime passed"
    second = rotate(first, HOSTS, later, datetime.timedelta(days=30))
    # Both CAs are trusted: replicas still serving the first certificate are not refused.
    assert second.trust == second.ca_pem + first.ca_pem
    assert len(x509.load_pem_x509_certificates(second.trust)) == 2
    # A previous CA that has expired is dropped, so the bundle does not grow.
    third = rotate(first, HOSTS, NOW + datetime.timedelta(days=40), datetime.timedelta(days=30))
    assert third.trust == third.ca_pem


def test_a_secret_round_trip_and_damaged_secrets() -> None:
    cert = rotate(None, HOSTS, NOW, datetime.timedelta(days=1))
    assert ServingCert.from_secret_data(cert.secret_data()) == cert
    assert ServingCert.from_secret_data(None) is None
    assert ServingCert.from_secret_data({**cert.secret_data(), "tls.crt": "bm90IGEgY2VydA=="}) is None
    assert ServingCert.from_secret_data({"tls.crt": cert.secret_data()["tls.crt"]}) is None


def test_ca_bundle_patch_touches_only_the_webhooks_that_need_it() -> None:
    bundle = rotate(None, HOSTS, NOW, datetime.timedelta(days=1)).trust
    b64 = base64.b64encode(bundle).decode()
    config = {
        "webhooks": [
            {"name": "a.tierwise.dev", "clientConfig": {"service": {"name": "w"}}},
            {"name": "b.tierwise.dev", "clientConfig": {"caBundle": b64}},
        ]
    }
    ops = ca_bundle_ops(config, bundle, NOW)
    patched = jsonpatch.apply_patch(config, ops)
    assert [w["clientConfig"].get("caBundle") for w in patched["webhooks"]] == [b64, b64]
    # Tests of the name and of the clientConfig it was computed from, then the add, for the one
    # webhook that lacked it.
    assert [op["op"] for op in ops] == ["test", "test", "add"]
    assert ca_bundle_ops(patched, bundle, NOW) == []
    # Patched by someone else meanwhile: the guarded patch no longer applies.
    moved = {"webhooks": [{**config["webhooks"][0], "clientConfig": {"caBundle": "b3RoZXI="}}, config["webhooks"][1]]}
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(moved, ops)


def test_a_platform_cap_and_a_teams_own_budget_stack() -> None:
    own = placed(budget("own", limit={"usd": 100}))
    cap = placed(budget("cap", limit={"usd": 1000}, selector={"namespaces": {"names": ["team-a"]}}), PLATFORM)
    assert judge([own], [], cap, PLATFORM).allowed
    assert judge([cap], [], own, PLATFORM).allowed


def test_a_partial_fix_is_admitted_though_the_problem_message_changes() -> None:
    defaults = [placed(tier(n, access={"default": True})) for n in ("a", "b", "c")]
    fixed_c = placed(tier("c"))
    v = judge(defaults, [], fixed_c, PLATFORM)
    assert v.allowed, v.message


def test_damaged_secrets_and_hosts_that_only_grow() -> None:
    cert = rotate(None, HOSTS, NOW, datetime.timedelta(days=1))
    other = rotate(None, HOSTS, NOW, datetime.timedelta(days=1))
    mismatched = {**cert.secret_data(), "tls.key": other.secret_data()["tls.key"]}
    assert ServingCert.from_secret_data(mismatched) is None  # a key not the certificate's
    # A replica asking for fewer names is content; one asking for another keeps the current names too.
    assert rotation_reason(cert, HOSTS[:1], NOW) is None
    grown = rotate(cert, ["new.svc"], NOW, datetime.timedelta(days=1))
    assert hosts_of(grown.cert_pem) == {*HOSTS, "new.svc"}
    assert rotation_reason(grown, HOSTS, NOW) is None and rotation_reason(grown, ["new.svc"], NOW) is None


def test_ca_bundle_patch_never_takes_trust_away() -> None:
    first = rotate(None, HOSTS, NOW, datetime.timedelta(days=30))
    second = rotate(first, HOSTS, NOW + datetime.timedelta(days=21), datetime.timedelta(days=30))
    config = {"webhooks": [{"name": "a", "clientConfig": {"caBundle": base64.b64encode(second.trust).decode()}}]}
    # A replica still holding the first Secret's view wants [first CA]: already trusted, no patch.
    assert ca_bundle_ops(config, first.trust, NOW) == []
    assert ca_bundle_ops(config, second.trust, NOW) == []


def trusted_cas(config: dict[str, Any]) -> list[bytes]:
    pem = base64.b64decode(config["webhooks"][0]["clientConfig"]["caBundle"])
    return [c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(pem)]


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def test_a_stale_replica_never_drops_the_newest_ca_over_many_rotations() -> None:
    """Rotation after rotation, a replica that read the Secret just before another rotated patches
    with its older bundle: the configuration keeps the newest CA, and CAs drop out only once expired."""
    life = datetime.timedelta(days=30)
    certs = [rotate(None, HOSTS, NOW, life)]
    config: dict[str, Any] = {"webhooks": [{"name": "a", "clientConfig": {}}]}
    config = jsonpatch.apply_patch(config, ca_bundle_ops(config, certs[0].trust, NOW))
    for n in range(1, 5):
        at = NOW + n * datetime.timedelta(days=21)
        certs.append(rotate(certs[-1], HOSTS, at, life))
        config = jsonpatch.apply_patch(config, ca_bundle_ops(config, certs[-1].trust, at))  # the rotating replica
        stale = ca_bundle_ops(config, certs[-2].trust, at)  # the one a moment behind
        config = jsonpatch.apply_patch(config, stale)
        trusted = trusted_cas(config)
        assert der(certs[-1].ca_pem) in trusted and der(certs[-2].ca_pem) in trusted
        # Nothing expired is kept, so the bundle stays small.
        assert all(x509.load_der_x509_certificate(c).not_valid_after_utc > at for c in trusted)
        assert len(trusted) <= 3


def test_a_cycle_closed_on_a_field_that_named_a_missing_tier_is_refused() -> None:
    # a names x, which does not exist yet (applied with unknown tiers tolerated); x then arrives
    # falling back to a: the field's problem turns from a missing tier into a cycle, a new problem.
    cluster = [placed(tier("a", fallback={"tier": "x"}))]
    closing = placed(tier("x", fallback={"tier": "a"}))
    for tolerate in (False, True):
        v = judge(cluster, [], closing, PLATFORM, tolerate_dangling=tolerate)
        assert not v.allowed and "fallback cycle: a -> x -> a" in v.message, v


def test_a_second_namespace_with_two_default_tiers_is_refused_though_the_first_already_had_them() -> None:
    # Platform tiers default for team-a and team-b; team-a already has two defaults (the same tier
    # reports both namespaces' clash): giving team-b a second default too is a new problem.
    spaces = [Namespace("team-a", {"t": "x"}), Namespace("team-b", {"t": "x"})]
    grant = {"namespaces": {"selector": {"matchLabels": {"t": "x"}}}}
    a = placed(tier("a", access={**grant, "defaultFor": {"names": ["team-a", "team-b"]}}), PLATFORM)
    own = placed(tier("own", access={"default": True}), "team-a")
    v = judge([a, own], spaces, placed(tier("other", access={"default": True}), "team-b"), PLATFORM)
    assert not v.allowed and "namespace team-b has more than one default tier" in v.message, v


def test_a_damaged_block_or_a_duplicate_in_the_trusted_bundle_costs_no_other_ca() -> None:
    first = rotate(None, HOSTS, NOW, datetime.timedelta(days=30))
    second = rotate(None, HOSTS, NOW, datetime.timedelta(days=30))
    damaged = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    trusted = first.ca_pem + damaged + first.ca_pem
    config = {"webhooks": [{"name": "a", "clientConfig": {"caBundle": base64.b64encode(trusted).decode()}}]}
    patched = jsonpatch.apply_patch(config, ca_bundle_ops(config, second.ca_pem, NOW))
    assert trusted_cas(patched) == [der(second.ca_pem), der(first.ca_pem)]


def test_a_time_zone_outside_the_iana_database_is_refused_at_admission() -> None:
    v = judge([], [], placed(budget("team", timeZone="Mars/Olympus_Mons")), PLATFORM)
    assert not v.allowed and "spec.timeZone" in v.message and "IANA" in v.message
