"""Cache keys by content: what changes the answer changes the key, nothing else does; scopes keep
tenants and namespaces apart; which requests may be cached follows the policy."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tierwise.api.cache import CachePolicySpec
from tierwise.policy import PolicyCache
from tierwise_sidecar.cache.key import Covered, TierId, choose, covered, key, refusal

MODELS = {"gold": TierId("apps", ("gpt-4o",)), "bronze": TierId("tierwise-system", ("gpt-4o-mini",))}
BODY: dict[str, Any] = {
    "model": "gold",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    "temperature": 0,
    "max_tokens": 16,
}


def _policy(name: str = "c", namespace: str = "apps", revision: str = "r1", **spec: Any) -> Covered:
    return covered(PolicyCache(name=name, namespace=namespace, revision=revision,
                               spec=CachePolicySpec.model_validate(spec)), MODELS)  # fmt: skip


def _key(c: Covered, body: dict[str, Any] = BODY, tier: str = "gold", namespace: str = "apps",
         tenant: str | None = "t1") -> str:  # fmt: skip
    return key(c, "chat", body, tier, namespace=namespace, tenant=tenant)


def test_key_order_whitespace_stream_and_user_do_not_change_the_key() -> None:
    c = _policy()
    reordered = orjson.loads(orjson.dumps(dict(reversed(list(BODY.items())))))
    spaced = orjson.loads(b'{ "max_tokens" : 16,\n "temperature": 0, "messages": ' + orjson.dumps(BODY["messages"])
                          + b', "model": "gold"}')  # fmt: skip
    assert _key(c) == _key(c, reordered) == _key(c, spaced)
    assert _key(c) == _key(c, {**BODY, "stream": True, "stream_options": {"include_usage": True}, "user": "u9"})


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [BODY["messages"][0], {"role": "user", "content": "What is 2+2? "}]},
        {"messages": [{"role": "system", "content": "Be long."}, BODY["messages"][1]]},
        {"temperature": 0.1},
        {"max_tokens": 17},
        {"response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
    ],
)
def test_a_change_of_content_changes_the_key(change: dict[str, Any]) -> None:
    c = _policy()
    assert _key(c) != _key(c, {**BODY, **change})


def test_the_tier_and_its_models_the_policy_revision_and_epoch_are_in_the_key() -> None:
    c = _policy()
    assert _key(c) != _key(c, tier="bronze")
    other_models = covered(c.policy, {"gold": TierId("apps", ("gpt-4.1",))})
    assert _key(c) != _key(other_models)
    # A team's own tier never shares entries with a platform tier of the same name and models.
    platform = covered(_policy(scope="Global").policy, {"gold": TierId("tierwise-system", ("gpt-4o",))})
    assert _key(_policy(scope="Global")) != _key(platform)
    assert _key(c) != _key(_policy(revision="r2"))
    fixed = {"onPolicyChange": False}
    assert _key(_policy(invalidation=fixed)) == _key(_policy(revision="r2", invalidation=fixed))
    assert _key(_policy(invalidation=fixed)) != _key(_policy(invalidation={**fixed, "epoch": 1}))
    assert _key(_policy(invalidation={"onModelChange": False})) == _key(
        covered(_policy(invalidation={"onModelChange": False}).policy, {"gold": TierId("apps", ("gpt-4.1",))})
    )


def test_scopes() -> None:
    tenant, namespace, everyone = _policy(), _policy(scope="Namespace"), _policy(scope="Global")
    assert _key(tenant, tenant="t1") != _key(tenant, tenant="t2")
    assert _key(tenant, tenant=None) != _key(tenant, tenant="t1")
    assert _key(namespace, tenant="t1") == _key(namespace, tenant="t2")
    assert _key(namespace, namespace="apps") != _key(namespace, namespace="other")
    assert _key(everyone, namespace="apps", tenant="t1") == _key(everyone, namespace="other", tenant="t2")


def test_collapsing_whitespace_is_the_policy_s_choice() -> None:
    c = _policy(normalization={"collapseWhitespace": True})
    spaced = {**BODY, "messages": [BODY["messages"][0], {"role": "user", "content": " What  is\n2+2? "}]}
    assert _key(c) == _key(c, spaced)


def test_which_requests_may_be_cached() -> None:
    c = _policy()
    assert refusal(c, "chat", BODY, False) is None
    assert refusal(c, "chat", {**BODY, "temperature": None}, False) == "temperature"
    assert refusal(c, "chat", {k: v for k, v in BODY.items() if k != "temperature"}, False) == "temperature"
    assert refusal(_policy(cacheable={"maxTemperature": 1}), "chat", {"messages": []}, False) is None
    assert refusal(c, "chat", {**BODY, "tools": [{}]}, False) == "tools"
    assert refusal(_policy(cacheable={"tools": True}), "chat", {**BODY, "tools": [{}]}, False) is None
    assert refusal(_policy(cacheable={"streaming": False}), "chat", BODY, True) == "stream"
    assert refusal(c, "chat", {**BODY, "n": 2}, False) == "n"
    assert refusal(c, "embeddings", {"input": "x"}, False) == "kind"
    assert refusal(c, "chat", {**BODY, "logprobs": True}, False) == "logprobs"


def test_the_namespace_s_own_policy_comes_before_a_platform_one_and_selectors_narrow() -> None:
    platform = _policy("a", namespace="tierwise-system")
    own = _policy("z", selector={"tiers": ["gold"]})
    by_model = _policy("m", selector={"models": ["gpt-4o-mini"]})
    policies = (platform, own, by_model)
    assert choose(policies, "apps", "gold", MODELS["gold"].models) is own
    assert choose(policies, "apps", "bronze", MODELS["bronze"].models) is by_model
    assert choose((own,), "apps", "bronze", MODELS["bronze"].models) is None
    assert choose((platform,), "apps", "bronze", MODELS["bronze"].models) is platform
    assert choose((by_model,), "apps", "gold", MODELS["gold"].models) is None, "by the tier's models only"
