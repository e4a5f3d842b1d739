"""The models reject locally exactly what the API server rejects, naming the same field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.cases import INVALID, VALID, Obj, budget, cache, tier
from tierwise.api import CostBudget, InferenceTier, Problem, parse_object

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("obj", "field", "reason"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_object_is_a_problem_naming_the_field(obj: Obj, field: str, reason: str) -> None:
    got = parse_object(obj)
    assert isinstance(got, Problem), f"accepted: {got}"
    text = str(got)
    assert f"{field}:" in text, text  # named as the field at fault, not only in the prose
    assert reason.lower() in text.lower(), text


def test_valid_objects_parse_with_defaults() -> None:
    t = parse_object(tier())
    assert isinstance(t, InferenceTier)
    assert t.spec.routing.strategy == "Weighted"
    assert t.spec.queue.max_wait_milliseconds == 5000
    assert t.namespace == "default" and t.ref == "InferenceTier default/gold"
    b = parse_object(budget())
    assert isinstance(b, CostBudget)
    assert [(th.percent, th.action) for th in b.spec.thresholds] == [(100, "Reject")]
    assert not isinstance(parse_object(cache()), Problem)


def test_unknown_fields_are_refused_locally() -> None:
    obj = tier()
    obj["spec"]["backends"][0]["pricing"]["inputPerMilion"] = 1  # a typo must not silently price at 0
    got = parse_object(obj)
    assert isinstance(got, Problem)
    assert "spec.backends[0].pricing.inputPerMilion" in str(got)


def test_wrong_api_version_is_a_problem() -> None:
    obj = tier()
    obj["apiVersion"] = "tierwise.dev/v1"
    assert (
        str(parse_object(obj))
        == "InferenceTier default/gold: apiVersion: must be tierwise.dev/v1alpha1, not 'tierwise.dev/v1'"
    )


def test_other_kinds_are_not_ours() -> None:
    assert parse_object({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}) is None


@pytest.mark.parametrize("path", sorted((ROOT / "examples").rglob("*.yaml")), ids=lambda p: p.name)
def test_examples_parse(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc["kind"] != "Namespace":
            got = parse_object(doc)
            assert got is not None and not isinstance(got, Problem), got


def test_wire_round_trip_is_stable() -> None:
    t = parse_object(tier(fallback={"tier": "silver"}))
    assert isinstance(t, InferenceTier)
    again = InferenceTier.model_validate(t.wire())
    assert again == t


@pytest.mark.parametrize("obj", [c[1] for c in VALID], ids=[c[0] for c in VALID])
def test_sparse_valid_object_is_accepted(obj: Obj) -> None:
    got = parse_object(obj)
    assert got is not None and not isinstance(got, Problem), got
