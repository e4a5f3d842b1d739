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
from dataclasses import dataclass
from typing import Any

from tierwise_sidecar.identify import Priority

SCAN_CHARS = 8192

_CODE = re.compile(
    r"```|\b(?:def|class|import|return|function|const|SELECT|FROM|#include|public static)\b|[{};]\s*$|=>|\w+\(.*\)\s*:",
    re.MULTILINE,
)
_MATH = re.compile(
    r"\d\s*[-+*/^=<>]\s*\d|\\(?:frac|sum|int|sqrt)|\b(?:integral|derivative|prove|theorem|equation|probability|"
    r"matrix|eigen\w*|lemma|solve for)\b",
    re.IGNORECASE,
)
_REASONING = re.compile(
    r"\b(?:step[- ]by[- ]step|explain why|why does|reason(?:ing)?|analy[sz]e|compare|trade-?offs?|plan|design|"
    r"justify|evaluate|debug|root cause|architecture|pros and cons|in depth|think)\b",
    re.IGNORECASE,
)

# How strongly each feature alone suggests a hard request. Features combine as a noisy OR
# (1 - product of (1 - weight * feature)): any one strong cue raises the score, several together
# raise it further, and none can push it past 1.
W_LENGTH, W_CODE, W_MATH, W_REASONING, W_DEPTH = 0.4, 0.35, 0.35, 0.45, 0.25
PRIORITY_SHIFT = 0.15


@dataclass(frozen=True, slots=True)
class Difficulty:
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


def score(text: str, input_tokens: int, user_turns: int, priority: Priority) -> Difficulty:
    length = min(math.log2(1 + input_tokens / 64) / 6, 1.0)
    code = 1.0 if _CODE.search(text) else 0.0
    maths = 1.0 if _MATH.search(text) else 0.0
    reasoning = min(len(_REASONING.findall(text)) / 2, 1.0)
    depth = min(max(user_turns - 1, 0) / 8, 1.0)
    easy = 1.0
    for weight, feature in ((W_LENGTH, length), (W_CODE, code), (W_MATH, maths), (W_REASONING, reasoning),
                            (W_DEPTH, depth)):  # fmt: skip
        easy *= 1 - weight * feature
    raw = 1 - easy + PRIORITY_SHIFT * int(priority)
    return Difficulty(round(min(max(raw, 0.0), 1.0), 3), length, code, maths, reasoning, depth)


def chat_difficulty(messages: Sequence[Mapping[str, Any]], input_tokens: int, priority: Priority) -> Difficulty:
    turns = sum(1 for m in messages if m.get("role") == "user")
    return score(last_user_text(messages), input_tokens, turns, priority)


def prompt_difficulty(prompt: Any, input_tokens: int, priority: Priority) -> Difficulty:
    text = prompt if isinstance(prompt, str) else " ".join(p for p in prompt if isinstance(p, str))
    return score(text[-SCAN_CHARS:], input_tokens, 1, priority)
