"""Whatever a caller sends, the sidecar answers with a success or an OpenAI-shaped 4xx: never 500."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
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
        "cache-control": st.sampled_from(["no-store", "NO-CACHE, max-age=0", ",,", "\u00e9"]),
    },
)


@pytest.fixture(scope="module")
def gateway(aio, tmp_path_factory) -> Iterator[GatewayServer]:  # type: ignore[no-untyped-def]
    net = Net(aio, tmp_path_factory.mktemp("fuzz"))
    fake = net.fake(completion_tokens=3)
    # A cache policy that takes every request it can: adversarial bodies reach its key too.
    cache = {"apiVersion": "tierwise.dev/v1alpha1", "kind": "CachePolicy",
             "metadata": {"name": "c", "namespace": "apps"},
             "spec": {"cacheable": {"maxTemperature": 2, "tools": True}}}  # fmt: skip
    yield net.gateway(tier("t", [backend("b", fake.v1)], access={"defaultFor": {"names": ["apps"]}}), cache,
                      namespace="apps")  # fmt: skip
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


PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
BIG_INT = b"9" * 5000
# Bodies a parser can choke on, each of which once produced (or could produce) a 500.
ADVERSARIAL: list[tuple[str, bytes]] = [
    ("integer beyond 4300 digits", b'{"model": "t", "max_tokens": ' + BIG_INT + b', "messages": []}'),
    ("integer beyond 64 bits", b'{"model": "t", "n": 36893488147419103232, "prompt": "x", "input": "x"}'),
    ("float beyond a double", b'{"model": "t", "temperature": 1e999, "prompt": "x", "input": "x"}'),
    ("nested 1000 deep", b'{"model": "t", "x": ' + b"[" * 1000 + b"]" * 1000 + b', "prompt": "x", "input": "x"}'),
    ("nested 300 deep in a field kept", b'{"model": "t", "x": ' + b"[" * 300 + b"]" * 300 + b', "prompt": "x"}'),
    ("nested 100000 deep", b"[" * 100_000),
    ("NaN", b'{"model": "t", "temperature": NaN, "prompt": "x", "input": "x"}'),
    ("Infinity", b'{"model": "t", "top_p": -Infinity, "prompt": "x", "input": "x"}'),
    ("invalid UTF-8", b'{"model": "t\xff\xfe", "prompt": "x", "input": "x"}'),
    ("a lone surrogate escape", b'{"model": "t", "prompt": "\\ud800", "input": "\\udfff", "messages": '
     b'[{"role": "user", "content": "\\ud800"}]}'),
    ("a byte order mark", b'\xef\xbb\xbf{"model": "t", "prompt": "x", "input": "x"}'),
    ("UTF-16", '{"model": "t", "prompt": "x"}'.encode("utf-16")),
    ("NUL bytes", b'{"model": "t\x00", "prompt": "x\x00"}'),
    ("model with CR LF", b'{"model": "t\\r\\nx-injected: 1", "prompt": "x", "input": "x", "messages": '
     b'[{"role": "user", "content": "hi"}]}'),
    ("model with NUL", b'{"model": "t\\u0000", "prompt": "x", "input": "x", "messages": '
     b'[{"role": "user", "content": "hi"}]}'),
    ("empty body", b""),
    ("only whitespace", b"   \n"),
    ("a bare string", b'"hello"'),
    ("trailing garbage", b'{"model": "t", "prompt": "x"} {'),
    ("duplicate keys", b'{"model": "t", "model": 5, "prompt": "x", "input": "x"}'),
    ("a huge key count", b"{" + b",".join(b'"k%d": 0' % i for i in range(50_000)) + b"}"),
    ("tools nested deep", b'{"model": "t", "messages": [{"role": "user", "content": "hi"}], "tools": '
     + b"[" * 250 + b"]" * 250 + b"}"),
]  # fmt: skip


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("case", "raw"), ADVERSARIAL, ids=[c for c, _ in ADVERSARIAL])
def test_adversarial_bodies_get_a_4xx_never_a_500(gateway: GatewayServer, path: str, case: str, raw: bytes) -> None:
    status, _, body = gateway.post(path, raw)
    assert 200 <= status < 500, (case, status, body[:300])
    if status >= 400:
        error = json.loads(body)["error"]
        assert error["code"] and error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/json; charset=latin-1", ""])  # fmt: skip
def test_odd_content_types_are_read_as_json_or_refused(gateway: GatewayServer, content_type: str) -> None:
    req = urllib.request.Request(
        gateway.url + "/v1/chat/completions",
        data=json.dumps({"model": "t", "messages": [{"role": "user", "content": "hi"}]}).encode(),
        method="POST",
        headers={"Content-Type": content_type},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", [*PATHS, "/v1/models", "/nope", "/v1/chat/completions/x"])
def test_other_methods_and_paths_get_openai_shaped_4xx(gateway: GatewayServer, method: str, path: str) -> None:
    req = urllib.request.Request(gateway.url + path, data=b"{}" if method != "GET" else None, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    if method == "GET" and path == "/v1/models":
        assert status == 200
        return
    assert status in (404, 405), (method, path, status)
    assert json.loads(body)["error"]["code"] == "http_error"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_no_byte_string_yields_a_500(gateway: GatewayServer, raw: bytes) -> None:
    for path in PATHS:
        status, _, body = gateway.post(path, raw)
        assert status < 500, body[:300]


def test_every_response_is_counted_by_status(gateway: GatewayServer) -> None:
    def count(code: str, endpoint: str) -> float:
        for line in gateway.get("/metrics")[1].decode().splitlines():
            if (
                line.startswith("tierwise_http_responses_total{")
                and f'code="{code}"' in line
                and (f'endpoint="{endpoint}"' in line)
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = (count("400", "/v1/completions"), count("404", "unmatched"), count("405", "/v1/embeddings"))
    gateway.post("/v1/completions", b"[" * 2000)
    gateway.get("/nope")
    req = urllib.request.Request(gateway.url + "/v1/embeddings", method="GET")
    with contextlib.suppress(urllib.error.HTTPError):
        urllib.request.urlopen(req, timeout=10)
    after = (count("400", "/v1/completions"), count("404", "unmatched"), count("405", "/v1/embeddings"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
