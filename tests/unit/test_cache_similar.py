"""Near-duplicate matching's pure parts: what is single-turn, the guard against false hits, the
floor a request may only raise, and the bounded index."""

from __future__ import annotations

import pytest

from tierwise_sidecar.cache.similar import Indexed, SimilarIndex, context, floor_of, guarded, normalized, user_text


def test_only_a_single_turn_after_system_messages_is_matched() -> None:
    one = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "}]}
    assert user_text("chat", one) == "Hi there"
    assert context(one)["messages"][-1]["content"] == "" and one["messages"][-1]["content"] == " Hi there "
    two = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}]}  # fmt: skip
    assert user_text("chat", two) is None
    assert user_text("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}) is None
    assert user_text("completions", {"prompt": "x"}) is None
    assert user_text("chat", {"messages": [{"role": "user", "content": "   "}]}) is None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("How do I enable X?", "How do I disable X?"),
        ("Is it safe?", "Is it not safe?"),
        ("Can I delete it?", "Can I create it?"),
        ("What is 2+2?", "What is 2+3?"),
        ("Sort ascending", "Sort descending"),
        ("Do it with logging", "Do it without logging"),
    ],
)
def test_the_guard_refuses_negations_antonyms_and_numbers(a: str, b: str) -> None:
    assert not guarded(a, b)


def test_the_guard_lets_wording_differences_through() -> None:
    assert guarded("How do I enable dark mode?", "how do i enable dark mode")
    assert guarded("What's the capital of France?", "Tell me the capital of France")


def test_the_floor_can_only_be_raised() -> None:
    assert floor_of(0.9, None) == 0.9
    assert floor_of(0.9, "0.5") == 0.9
    assert floor_of(0.9, "0.97") == 0.97
    assert floor_of(0.9, "nan") == 0.9 and floor_of(0.9, "x") == 0.9 and floor_of(0.9, "inf") == 0.9


def test_the_index_finds_the_best_match_of_the_same_context_and_keeps_to_its_bound() -> None:
    index = SimilarIndex(limit=2)
    a, b = normalized([1.0, 0.0]), normalized([0.8, 0.6])
    assert a is not None and b is not None and normalized([0.0, 0.0]) is None
    index.add("ctx", Indexed(a, "ka", "how do I enable X"))
    index.add("ctx", Indexed(b, "kb", "how do I enable Y"))
    found = index.best("ctx", a, "how do I enable X?", 0.5)
    assert found is not None and found.key == "ka" and found.similarity == pytest.approx(1.0)
    assert index.best("other", a, "how do I enable X?", 0.5) is None, "another context"
    assert index.best("ctx", a, "how do I disable X?", 0.5) is None, "guarded"
    index.add("ctx", Indexed(b, "kc", "third"))
    assert len(index) == 2
    found = index.best("ctx", a, "how do I enable X", 0.99)
    assert found is None, "ka, the oldest, went"
