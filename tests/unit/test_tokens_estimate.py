"""Token counts offline with tiktoken, and cost estimation before the call."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import tiktoken

from tests.cases import tier
from tierwise.api import InferenceTier, parse_object
from tierwise_sidecar.estimate import cost_usd, estimate_request
from tierwise_sidecar.tokens import TokenCounter, encoding_name, seed_tiktoken_cache


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


def test_seeded_cache_holds_the_files_tiktoken_verifies(tmp_path: Path) -> None:
    folder = seed_tiktoken_cache(tmp_path / "tk")
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(folder)
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    data = (folder / hashlib.sha1(url.encode()).hexdigest()).read_bytes()
    # The sha256 tiktoken itself checks the file against before use.
    assert hashlib.sha256(data).hexdigest() == "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"


def test_known_token_ids(counter: TokenCounter) -> None:
    assert counter.encoding("gpt-4").encode("hello world") == [15339, 1917]
    assert counter.count_text("gpt-4", "hello world") == 2


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("meta-llama/Llama-3.1-8B-Instruct", "o200k_base"),
    ],
)
def test_encoding_per_model(model: str, encoding: str) -> None:
    assert encoding_name(model) == encoding


def test_chat_count_is_tiktoken_count_plus_chat_framing(counter: TokenCounter) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "name": "alice", "content": "How many tokens is this sentence, exactly?"},
        {"role": "assistant", "content": "Let me count them for you."},
    ]
    enc = tiktoken.get_encoding("o200k_base")
    expected = 3  # reply priming
    for m in messages:
        expected += 3 + len(enc.encode(m["role"])) + len(enc.encode(m["content"]))
        if "name" in m:
            expected += 1 + len(enc.encode(m["name"]))
    assert counter.count_chat("gpt-4o", messages) == expected
    # Counting again hits the per-message cache and gives the same answer.
    assert counter.count_chat("gpt-4o", messages) == expected


def test_single_message_framing(counter: TokenCounter) -> None:
    # 3 (message) + 1 ("user") + 2 ("hello world") + 3 (reply priming)
    assert counter.count_chat("gpt-4", [{"role": "user", "content": "hello world"}]) == 9


def test_text_parts_and_images_are_counted(counter: TokenCounter) -> None:
    parts = [{"type": "text", "text": "hello world"}, {"type": "image_url", "image_url": {"url": "x", "detail": "low"}}]
    assert counter.count_chat("gpt-4", [{"role": "user", "content": parts}]) == 9 + 85


def _backend(**pricing: float) -> InferenceTier:
    obj = tier()
    obj["spec"]["backends"][0]["pricing"] = pricing
    obj["spec"]["backends"][0]["capabilities"] = {"maxContextTokens": 1000}
    parsed = parse_object(obj)
    assert isinstance(parsed, InferenceTier)
    return parsed


def test_estimate_uses_max_tokens_and_prices(counter: TokenCounter) -> None:
    backend = _backend(inputPerMillion=2.5, outputPerMillion=10).spec.backends[0]
    body = {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 100}
    est = estimate_request(counter, "chat", body, backend)
    n_in = counter.count_chat(backend.model, body["messages"])
    assert (est.input_tokens, est.output_tokens) == (n_in, 100)
    assert est.usd == pytest.approx((n_in * 2.5 + 100 * 10) / 1e6)


def test_estimate_without_max_tokens_is_bounded_by_the_context(counter: TokenCounter) -> None:
    backend = _backend(inputPerMillion=1, outputPerMillion=1).spec.backends[0]
    body = {"messages": [{"role": "user", "content": "hello world"}], "n": 2}
    est = estimate_request(counter, "chat", body, backend)
    assert est.output_tokens == 2 * (1000 - est.input_tokens)


def test_cached_input_is_priced_at_the_cached_price() -> None:
    pricing = _backend(inputPerMillion=2, outputPerMillion=8, cachedInputPerMillion=0.5).spec.backends[0].pricing
    assert cost_usd(pricing, 1000, 100, cached_input_tokens=400) == pytest.approx((600 * 2 + 400 * 0.5 + 100 * 8) / 1e6)
    plain = _backend(inputPerMillion=2, outputPerMillion=8).spec.backends[0].pricing
    assert cost_usd(plain, 1000, 0, cached_input_tokens=400) == pytest.approx(1000 * 2 / 1e6)
