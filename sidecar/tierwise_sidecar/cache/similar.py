"""Near-duplicate matching: what may be matched, the guard against false hits, and the index.

Only a single-turn request is matched: one user message, after the system messages. Its context
(everything but the user's words: the system prompt, sampling, the tier, the scope) must be
exactly the same as the entry's, so the index is partitioned by a context key, and only the
user's words are compared, by the cosine of their embeddings. A match needs the similarity floor
(the policy's threshold, which a request may raise but never lower) and must pass the guard:
prompts that differ by a negation, by a word of an antonym pair, or by a number never match, so
"how do I enable X" never answers "how do I disable X", nor "what is 2+2" "what is 2+3".

The index is this sidecar's own (the shared layers hold the answers, not the vectors), bounded per
policy: oldest out first.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
NEGATIONS = frozenset(
    [
        "not",
        "no",
        "never",
        "none",
        "nothing",
        "nobody",
        "nowhere",
        "neither",
        "nor",
        "without",
        "cannot",
        "can't",
        "don't",
        "doesn't",
        "didn't",
        "isn't",
        "aren't",
        "wasn't",
        "weren't",
        "won't",
        "wouldn't",
        "shouldn't",
        "couldn't",
        "mustn't",
        "hasn't",
        "haven't",
        "hadn't",
        "except",
        "unless",
    ]
)
# Words whose swap for their opposite changes the answer; a prompt holding one that the other
# lacks is never a near duplicate of it.
ANTONYMS = frozenset(
    [
        "enable",
        "disable",
        "enabled",
        "disabled",
        "allow",
        "deny",
        "allowed",
        "denied",
        "add",
        "remove",
        "added",
        "removed",
        "start",
        "stop",
        "started",
        "stopped",
        "open",
        "close",
        "opened",
        "closed",
        "on",
        "off",
        "increase",
        "decrease",
        "increased",
        "decreased",
        "up",
        "down",
        "in",
        "out",
        "before",
        "after",
        "above",
        "below",
        "max",
        "min",
        "maximum",
        "minimum",
        "more",
        "less",
        "most",
        "least",
        "first",
        "last",
        "true",
        "false",
        "yes",
        "no",
        "include",
        "exclude",
        "included",
        "excluded",
        "accept",
        "reject",
        "accepted",
        "rejected",
        "encrypt",
        "decrypt",
        "import",
        "export",
        "install",
        "uninstall",
        "installed",
        "uninstalled",
        "connect",
        "disconnect",
        "lock",
        "unlock",
        "locked",
        "unlocked",
        "show",
        "hide",
        "visible",
        "hidden",
        "buy",
        "sell",
        "push",
        "pull",
        "upload",
        "download",
        "create",
        "delete",
        "created",
        "deleted",
        "insert",
        "drop",
        "grant",
        "revoke",
        "success",
        "failure",
        "pass",
        "fail",
        "valid",
        "invalid",
        "left",
        "right",
        "input",
        "output",
        "private",
        "public",
        "internal",
        "external",
        "ascending",
        "descending",
        "old",
        "new",
        "better",
        "worse",
        "faster",
        "slower",
        "higher",
        "lower",
        "larger",
        "smaller",
        "longer",
        "shorter",
    ]
)
_NUMBER = re.compile(r"\d")


def user_text(kind: str, body: Mapping[str, Any]) -> str | None:
    """The user's words of a single-turn request, or None when it is not one."""
    if kind != "chat":
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    *before, last = messages
    if not isinstance(last, dict) or last.get("role") != "user" or not isinstance(last.get("content"), str):
        return None
    if any(not isinstance(m, dict) or m.get("role") not in ("system", "developer") for m in before):
        return None
    text = last["content"].strip()
    return text or None


def context(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request without the user's words: what must match exactly for a near duplicate."""
    messages = list(body["messages"])
    messages[-1] = {**messages[-1], "content": ""}
    return {**body, "messages": messages}


def guarded(a: str, b: str) -> bool:
    """May `a` and `b` be near duplicates? Not when they differ by a negation, an antonym or a number."""
    wa, wb = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
    return not any(w in NEGATIONS or w in ANTONYMS or _NUMBER.search(w) for w in wa ^ wb)


def normalized(vector: Sequence[float]) -> tuple[float, ...] | None:
    norm = math.sqrt(math.fsum(v * v for v in vector))
    if not norm or not math.isfinite(norm):
        return None
    return tuple(v / norm for v in vector)


@dataclass(frozen=True, slots=True)
class Indexed:
    vector: tuple[float, ...]
    key: str
    text: str


@dataclass(frozen=True, slots=True)
class Match:
    key: str
    similarity: float


class SimilarIndex:
    """Per context key, the prompts answered, their vectors and exact keys; at most `limit` in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[tuple[str, str], Indexed] = OrderedDict()
        self._by_context: dict[str, dict[str, Indexed]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def add(self, ctx: str, item: Indexed) -> None:
        self._items[(ctx, item.key)] = item
        self._items.move_to_end((ctx, item.key))
        self._by_context.setdefault(ctx, {})[item.key] = item
        while len(self._items) > self.limit:
            (old_ctx, old_key), _ = self._items.popitem(last=False)
            bucket = self._by_context.get(old_ctx)
            if bucket is not None:
                bucket.pop(old_key, None)
                if not bucket:
                    del self._by_context[old_ctx]

    def best(self, ctx: str, vector: tuple[float, ...], text: str, floor: float) -> Match | None:
        """The most similar prompt of the same context at or above `floor` that the guard lets
        through."""
        found: Match | None = None
        for item in self._by_context.get(ctx, {}).values():
            if len(item.vector) != len(vector):
                continue
            sim = math.fsum(x * y for x, y in zip(item.vector, vector, strict=True))
            if sim >= floor and (found is None or sim > found.similarity) and guarded(text, item.text):
                found = Match(item.key, sim)
        return found


def floor_of(policy_threshold: float, header: str | None) -> float:
    """The similarity floor: the policy's, raised (never lowered) by the request's header."""
    if not header:
        return policy_threshold
    try:
        asked = float(header)
    except ValueError:
        return policy_threshold
    if not math.isfinite(asked):
        return policy_threshold
    return max(policy_threshold, asked)
