"""The fake provider speaks OpenAI's protocol as the real openai SDK expects, and fails on demand."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import openai
import pytest

from localcluster import free_port
from tierwise_sidecar.tokens import TokenCounter


class Fake:
    def __init__(self, url: str) -> None:
        self.url = url

    def configure(self, **changes: object) -> None:
        req = urllib.request.Request(
            f"{self.url}/fake/config",
            data=json.dumps(changes).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(req, timeout=5).read()

    def stats(self) -> dict[str, object]:
        return json.loads(urllib.request.urlopen(f"{self.url}/fake/stats", timeout=5).read())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def fake_server() -> Iterator[Fake]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tierwise_sidecar.fake_backend", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fake backend did not start: {proc.stderr.read() if proc.stderr else ''}") from None
            time.sleep(0.1)
    try:
        yield Fake(url)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def fake(fake_server: Fake) -> Fake:
    fake_server.configure(
        first_byte_ms=0,
        per_token_ms=0,
        error_rate=0,
        error_status=500,
        reset_rate=0,
        drop_after_chunks=None,
        capacity=None,
        include_usage=True,
        completion_tokens=16,
    )
    return fake_server


def client(fake: Fake) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fake.url}/v1", api_key="unused", max_retries=0, timeout=10)


MESSAGES = [{"role": "user", "content": "Say something about tiers."}]


def test_chat_completion_with_usage_matching_tiktoken(fake: Fake) -> None:
    r = client(fake).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage is not None
    assert r.usage.prompt_tokens == TokenCounter().count_chat("gpt-4o-mini", MESSAGES)
    assert r.usage.completion_tokens == TokenCounter().count_text("gpt-4o-mini", r.choices[0].message.content)
    assert r.model == "gpt-4o-mini"


def test_streaming_with_usage_chunk(fake: Fake) -> None:
    stream = client(fake).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text and finish == "stop"
    assert usage is not None and usage.completion_tokens == TokenCounter().count_text("gpt-4o", text)


def test_async_client_and_other_endpoints(fake: Fake) -> None:
    async def go() -> None:
        c = openai.AsyncOpenAI(base_url=f"{fake.url}/v1", api_key="unused", max_retries=0)
        r = await c.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon a time", max_tokens=4)
        assert r.choices[0].text
        e = await c.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        assert [d.index for d in e.data] == [0, 1]
        models = await c.models.list()
        assert models.data[0].id
        await c.close()

    asyncio.run(go())


def test_injected_errors_raise_the_sdks_own_exceptions(fake: Fake) -> None:
    fake.configure(error_rate=1.0, error_status=503)
    with pytest.raises(openai.InternalServerError) as e:
        client(fake).chat.completions.create(model="m", messages=MESSAGES)
    assert e.value.status_code == 503
    fake.configure(error_rate=1.0, error_status=400)
    with pytest.raises(openai.BadRequestError):
        client(fake).chat.completions.create(model="m", messages=MESSAGES)


def test_connection_reset(fake: Fake) -> None:
    fake.configure(reset_rate=1.0)
    with pytest.raises(openai.APIConnectionError):
        client(fake).chat.completions.create(model="m", messages=MESSAGES)
    assert int(fake.stats()["resets"]) >= 1  # type: ignore[call-overload]


def test_mid_stream_drop_is_a_truncation_not_a_clean_end(fake: Fake) -> None:
    fake.configure(drop_after_chunks=3)
    received = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in client(fake).chat.completions.create(model="m", messages=MESSAGES, stream=True):
            received.append(chunk)
    assert 1 <= len(received) <= 4  # the role chunk and some content, then the connection is cut
    assert all(c.choices[0].finish_reason is None for c in received)


def test_capacity_answers_429_with_retry_after(fake: Fake) -> None:
    fake.configure(capacity=2, first_byte_ms=300)

    async def go() -> list[object]:
        c = openai.AsyncOpenAI(base_url=f"{fake.url}/v1", api_key="unused", max_retries=0)
        try:
            calls = [c.chat.completions.create(model="m", messages=MESSAGES) for _ in range(5)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await c.close()

    results = asyncio.run(go())
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(limited) == 3
    assert limited[0].response.headers["retry-after"] == "1"
    assert fake.stats()["max_in_flight"] == 2
