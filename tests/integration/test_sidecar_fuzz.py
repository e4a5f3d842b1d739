"""Whatever a caller sends, the sidecar answers with a success or an OpenAI-shaped 4xx: never 500."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Net
from tests.servers import GatewayServer, backend, tier

scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=40)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["system", "user", "assistant", "tool", "developer", "wizard", ""]) | values
content = (
    st.text(max_size=200)
    | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]), "text": values}), max_size=3)
    | values
)
message = st.fixed_dictionaries({"role": roles}, optional={"content": content, "name": values, "tool_calls": values})
known = {
    "model": st.text(max_size=20) | st.sampled_from(["t", "gpt-4o"]) | values,
    "messages": st.lists(message, max_size=5) | values,
    "prompt": st.text(max_size=100) | st.lists(st.integers(0, 100_000), max_size=5) | values,
    "input": st.text(max_size=100) | st.lists(st.text(max_size=20), max_size=5) | values,
    "max_tokens": st.integers(-5, 300_000) | values,
    "n": st.integers(-1, 20) | values,
    "temperature": st.floats(-1, 3, allow_nan=False) | values,
    "stream": st.booleans() | values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | values,
    "user": st.text(max_size=300) | values,
    "tools": values,
}
bodies = st.fixed_dictionaries({}, optional=known) | values
headers = st.fixed_dictionaries(
    {},
    optional={
        "x-tierwise-tier": st.sampled_from(["t", "nope", ""]),
        "x-tierwise-priority": st.sampled_from(["high", "LOW", "?", ""]),
        "x-tierwise-tenant": st.sampled_from(["acme", "bad tenant", "a" * 200]),
        "x-tierwise-session": st.text(alphabet="abc", max_size=300),
    },
)


@pytest.fixture(scope="module")
def gateway(aio, tmp_path_factory) -> Iterator[GatewayServer]:  # type: ignore[no-untyped-def]
    net = Net(aio, tmp_path_factory.mktemp("fuzz"))
    fake = net.fake(completion_tokens=3)
    yield net.gateway(tier("t", [backend("b", fake.v1)], access={"defaultFor": {"names": ["apps"]}}), namespace="apps")
    net.close()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, hdrs=headers)
def test_no_body_yields_a_500(gateway: GatewayServer, path: str, body: Any, hdrs: dict[str, str]) -> None:
    status, _, raw = gateway.post(path, json.dumps(body).encode(), hdrs)
    assert status < 500, raw[:500]
    if status >= 400:
        error = json.loads(raw)["error"]
        assert set(error) >= {"message", "type", "code"} and error["message"]
