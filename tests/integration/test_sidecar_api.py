"""The sidecar speaks OpenAI's API: the official openai SDK works against it unchanged, and bad
input gets the SDK's own exception types from OpenAI-shaped errors."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from tests.conftest import Net, wait_for
from tests.servers import CHAT, backend, tier
from tierwise_sidecar.tokens import TokenCounter
from tierwise_sidecar.validate import Limits

PLATFORM = "tierwise-system"


def _setup(net: Net):  # type: ignore[no-untyped-def]
    fake = net.fake("main")
    objects = [
        tier("standard", [backend("mini", fake.v1)], access={"defaultFor": {"names": ["apps"]}}),
        tier("premium", [backend("big", fake.v1, model="gpt-4o", price=(2.5, 10))]),
        # A platform tier granted to another namespace only: visible as forbidden, not unknown.
        tier("restricted", [backend("x", fake.v1)], namespace=PLATFORM, access={"namespaces": {"names": ["other"]}}),
    ]
    return fake, net.gateway(*objects, namespace="apps")


def test_sdk_sync_and_streaming(net: Net) -> None:
    fake, gw = _setup(net)
    client = gw.client()
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=CHAT["messages"])
    reply = raw.parse()
    assert reply.choices[0].message.content
    assert raw.headers["x-tierwise-tier"] == "standard"
    assert raw.headers["x-tierwise-model"] == "gpt-4o-mini"
    # The model named in the request is the tier's business, not the caller's: mini served it.
    assert fake.backend.stats.models == {"gpt-4o-mini": 1}

    chunks = list(client.chat.completions.create(model="premium", messages=CHAT["messages"], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].choices[0].finish_reason == "stop"
    # No usage chunk the caller did not ask for (code reading choices[0] would break on it) ...
    assert all(c.choices for c in chunks)
    # ... and the one it asks for, when it does.
    with_usage = list(
        client.chat.completions.create(
            model="premium", messages=CHAT["messages"], stream=True, stream_options={"include_usage": True}
        )
    )
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens > 0


def test_sdk_async_and_other_endpoints(net: Net) -> None:
    _, gw = _setup(net)

    async def scenario() -> tuple[str, str, int, list[str]]:
        client = gw.async_client()
        reply = await client.chat.completions.create(model="standard", messages=CHAT["messages"])
        stream = await client.chat.completions.create(model="standard", messages=CHAT["messages"], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        emb = await client.embeddings.create(model="standard", input=["one", "two"])
        models = await client.models.list()
        await client.close()
        return reply.choices[0].message.content or "", text, len(emb.data), [m.id for m in models.data]

    whole, streamed, n_emb, models = asyncio.run(scenario())
    assert whole and streamed and n_emb == 2
    assert models == ["premium", "standard"]
    completion = gw.client().completions.create(model="standard", prompt="Once upon a time", max_tokens=5)
    assert completion.choices[0].text


def test_cost_headers_are_usage_times_pricing(net: Net) -> None:
    _, gw = _setup(net)
    status, headers, body = gw.post("/v1/chat/completions", {**CHAT, "max_tokens": 100}, {"x-tierwise-tier": "premium"})
    assert status == 200
    usage = json.loads(body)["usage"]
    expected = (usage["prompt_tokens"] * 2.5 + usage["completion_tokens"] * 10) / 1e6
    assert float(headers["x-tierwise-cost-usd"]) == pytest.approx(expected, abs=1e-8)
    assert headers["x-tierwise-tokens"] == f"{usage['prompt_tokens']}/{usage['completion_tokens']}"
    # The estimate is an upper bound: the prompt as tiktoken counts it and all of max_tokens.
    prompt = TokenCounter().count_chat("gpt-4o", CHAT["messages"])
    assert usage["prompt_tokens"] == prompt
    assert float(headers["x-tierwise-estimated-cost-usd"]) == pytest.approx((prompt * 2.5 + 100 * 10) / 1e6, abs=1e-8)


def test_tier_selection_errors(net: Net) -> None:
    _, gw = _setup(net)
    client = gw.client()
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="x", messages=CHAT["messages"], extra_headers={"x-tierwise-tier": "nope"})
    assert nf.value.code == "tier_not_found"
    with pytest.raises(openai.PermissionDeniedError) as pd:
        client.chat.completions.create(
            model="x", messages=CHAT["messages"], extra_headers={"x-tierwise-tier": "restricted"}
        )
    assert pd.value.code == "tier_not_allowed" and "apps" in str(pd.value.message)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="restricted", messages=CHAT["messages"])
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="x", messages=CHAT["messages"], extra_headers={"x-tierwise-priority": "urgent!"}
        )
    assert bad.value.code == "invalid_priority"


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_json", None),
        (json.dumps({"model": "m"}).encode(), 400, "invalid_value", "messages"),
        (json.dumps({"model": "m", "messages": "hi"}).encode(), 400, "invalid_value", "messages"),
        (json.dumps({**CHAT, "max_tokens": "10"}).encode(), 400, "invalid_value", "max_tokens"),
        (json.dumps({**CHAT, "temperature": 7}).encode(), 400, "invalid_value", "temperature"),
        (json.dumps({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "invalid_value",
         "messages.0.role"),
        (json.dumps({**CHAT, "stream": "yes"}).encode(), 400, "invalid_value", "stream"),
        (json.dumps({**CHAT, "n": 1000}).encode(), 400, "invalid_value", "n"),
        (json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}] * 3000}).encode(), 413,
         "too_many_messages", "messages"),
        (json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 300_000}]}).encode(), 413,
         "request_too_large", None),
    ],
)  # fmt: skip
def test_bad_input_gets_openai_shaped_errors(net: Net, body: bytes, status: int, code: str, param: str | None) -> None:
    fake = net.fake()
    gw = net.gateway(
        tier("t", [backend("b", fake.v1)], access={"defaultFor": {"names": ["apps"]}}),
        namespace="apps",
        limits=Limits(max_body_bytes=256 * 1024),
    )
    got, _, raw = gw.post("/v1/chat/completions", body)
    assert got == status, raw
    error = json.loads(raw)["error"]
    assert error["code"] == code and error["param"] == param and error["message"]
    assert fake.requests == 0, "a refused request must not reach a backend"


def test_context_too_long_for_every_model(net: Net) -> None:
    fake = net.fake()
    small = backend("b", fake.v1, capabilities={"maxContextTokens": 1024})
    gw = net.gateway(tier("t", [small], access={"defaultFor": {"names": ["apps"]}}), namespace="apps")
    status, _, raw = gw.post(
        "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "word " * 2000}]}
    )
    assert status == 400 and json.loads(raw)["error"]["code"] == "context_length_exceeded"


def test_no_default_tier_asks_for_the_header(net: Net) -> None:
    fake = net.fake()
    gw = net.gateway(tier("t", [backend("b", fake.v1)]), namespace="apps")
    with pytest.raises(openai.BadRequestError) as e:
        gw.client().chat.completions.create(model="gpt-4o", messages=CHAT["messages"])
    assert e.value.code == "tier_required"
    assert gw.client().chat.completions.create(model="t", messages=CHAT["messages"]).choices


def test_caller_hanging_up_mid_stream_is_billed_and_not_an_error(net: Net) -> None:
    fake = net.fake("slow", per_token_ms=50, completion_tokens=40)
    gw = net.gateway(tier("t", [backend("b", fake.v1)], access={"defaultFor": {"names": ["apps"]}}), namespace="apps")
    with gw.client().chat.completions.create(model="x", messages=CHAT["messages"], stream=True) as stream:
        for i, _ in enumerate(stream):
            if i == 3:
                break  # closes the connection
    wait_for("the hang-up to be recorded", lambda: 'code="499"' in gw.get("/metrics")[1].decode(), timeout=10)
    text = gw.get("/metrics")[1].decode()
    assert 'code="500"' not in text
    output = [
        line for line in text.splitlines() if line.startswith("tierwise_tokens_total") and 'kind="output"' in line
    ]
    assert output and float(output[0].split()[-1]) >= 3


def test_image_parts_in_either_form_are_counted(net: Net) -> None:
    _, gw = _setup(net)
    for image in ("https://example.com/cat.png", {"url": "https://example.com/cat.png", "detail": "low"}):
        content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": image}]
        status, _, raw = gw.post(
            "/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": content}]}
        )
        assert status == 200, raw
