"""How hard and how important a request looks, from features cheap to compute on the hot path.

The score (0 easy .. 1 hard) is what cost-aware routing compares with a tier's thresholds. It reads
the last user turn (the question being asked now, capped in length), the prompt size and the depth
of the conversation, and the caller's explicit priority. Each feature is kept so the decision can
be explained in a header and in metrics.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from tierwise_sidecar.identify import Priority

SCAN_CHARS = 8192

# Cues, matched on words (a set lookup) and a few substrings: regular expressions with many
# case-insensitive alternatives cost more than the rest of the request's decisions together.
_WORD = re.compile(r"[a-z]+")
_CODE_WORDS = frozenset(
    {
        "def",
        "class",
        "import",
        "return",
        "function",
        "const",
        "lambda",
        "async",
        "await",
        "struct",
        "impl",
        "fn",
        "println",
        "printf",
        "sql",
        "regex",
        "stacktrace",
        "traceback",
    }
)
_CODE_MARKS = ("```", "=>", "();", "){", ") {", "#include", "SELECT ", "</")
# The marks and a line ending like code, in one search rather than a scan per mark.
_CODE = re.compile("|".join([*map(re.escape, _CODE_MARKS), r"[;{}]\s*$"]), re.MULTILINE)
_MATH_WORDS = frozenset(
    {
        "integral",
        "derivative",
        "prove",
        "proof",
        "theorem",
        "equation",
        "probability",
        "matrix",
        "eigenvalue",
        "eigenvalues",
        "lemma",
        "solve",
        "calculate",
        "compute",
    }
)
_LATEX = ("\\frac", "\\sum", "\\int", "\\sqrt", "$$")
_MATH = re.compile("|".join([*map(re.escape, _LATEX), r"\d\s*[-+*/^=<>]\s*\d"]))
_REASONING_WORDS = frozenset(
    {
        "why",
        "reason",
        "reasoning",
        "analyze",
        "analyse",
        "compare",
        "tradeoffs",
        "plan",
        "design",
        "justify",
        "evaluate",
        "debug",
        "architecture",
        "think",
        "explain",
    }
)
_REASONING_PHRASES = ("step by step", "step-by-step", "trade-off", "root cause", "pros and cons", "in depth")

# How strongly each feature alone suggests a hard request. Features combine as a noisy OR
# (1 - product of (1 - weight * feature)): any one strong cue raises the score, several together
# raise it further, and none can push it past 1.
W_LENGTH, W_CODE, W_MATH, W_REASONING, W_DEPTH = 0.4, 0.35, 0.35, 0.45, 0.25
PRIORITY_SHIFT = 0.15


Features = tuple[float, float, float, float, float]  # length, code, maths, reasoning, depth


class Difficulty(NamedTuple):
    score: float
    length: float
    code: float
    math: float
    reasoning: float
    depth: float


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return ""


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return _text(m.get("content"))[:SCAN_CHARS]
    return ""


def _features(text: str, input_tokens: int, user_turns: int) -> Features:
    length = min(math.log2(1 + input_tokens / 64) / 6, 1.0)
    lower = text.lower()
    words = set(_WORD.findall(lower))
    code = 1.0 if (words & _CODE_WORDS or _CODE.search(text)) else 0.0
    maths = 1.0 if (words & _MATH_WORDS or _MATH.search(text)) else 0.0
    cues = len(words & _REASONING_WORDS) + len([p for p in _REASONING_PHRASES if p in lower])
    reasoning = min(cues / 2, 1.0)
    depth = min(max(user_turns - 1, 0) / 8, 1.0)
    return length, code, maths, reasoning, depth


def _combine(f: Features, priority: Priority) -> float:
    length, code, maths, reasoning, depth = f
    easy = (
        (1 - W_LENGTH * length)
        * (1 - W_CODE * code)
        * (1 - W_MATH * maths)
        * (1 - W_REASONING * reasoning)
        * (1 - W_DEPTH * depth)
    )
    # Priority is an IntEnum: its int value, without the enum's slower `.value` lookup.
    raw = 1 - easy + PRIORITY_SHIFT * int(priority)
    # Clamped by comparisons: min() and max() calls cost more than the rest of the arithmetic.
    return round(0.0 if raw < 0.0 else 1.0 if raw > 1.0 else raw, 3)


def _chat_features(messages: Sequence[Mapping[str, Any]], input_tokens: int) -> Features:
    turns = len([m for m in messages if m.get("role") == "user"])
    return _features(last_user_text(messages), input_tokens, turns)


def _prompt_features(prompt: Any, input_tokens: int) -> Features:
    text = prompt if isinstance(prompt, str) else " ".join(p for p in prompt if isinstance(p, str))
    return _features(text[-SCAN_CHARS:], input_tokens, 1)


def chat_difficulty(messages: Sequence[Mapping[str, Any]], input_tokens: int, priority: Priority) -> Difficulty:
    """The score of a chat request with the features that made it, to explain a decision."""
    f = _chat_features(messages, input_tokens)
    return Difficulty(_combine(f, priority), *f)


def difficulty_of(kind: str, body: Mapping[str, Any], input_tokens: int, priority: Priority) -> float | None:
    """The score of a validated request body; embeddings have none. Routing needs the score alone,
    so the explained form (Difficulty) is not built here."""
    if kind == "chat":
        return _combine(_chat_features(body["messages"], input_tokens), priority)
    if kind == "completions":
        return _combine(_prompt_features(body["prompt"], input_tokens), priority)
    return None
