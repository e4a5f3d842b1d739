"""Cached answers: what is stored (complete answers only), how they are kept outside the process,
and how a hit is served whole or as a stream; L1's bounds; single flight."""

from __future__ import annotations

import asyncio

import orjson

from tierwise_sidecar.cache.entry import (
    COMPRESS_FROM,
    decode,
    encode,
    from_stream,
    from_whole,
    stream_events,
    whole_body,
)
from tierwise_sidecar.cache.flight import Flights, follow
from tierwise_sidecar.cache.memory import MemoryLayer
from tierwise_sidecar.sse import DONE_EVENT, Relay, StreamState

USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
WHOLE = {
    "id": "x", "object": "chat.completion", "model": "gpt-4o",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Four."}, "finish_reason": "stop"}],
    "usage": USAGE,
}  # fmt: skip


def test_only_complete_single_answers_are_stored() -> None:
    e = from_whole("chat", WHOLE, 120, 100.0)
    assert e is not None and e.message["content"] == "Four." and e.micros == 120
    for finish in ("length", "content_filter", None):
        cut = {**WHOLE, "choices": [{**WHOLE["choices"][0], "finish_reason": finish}]}  # type: ignore[dict-item]
        assert from_whole("chat", cut, 1, 1.0) is None
    assert from_whole("chat", {**WHOLE, "choices": []}, 1, 1.0) is None
    two = {**WHOLE, "choices": [WHOLE["choices"][0], WHOLE["choices"][0]]}  # type: ignore[list-item]
    assert from_whole("chat", two, 1, 1.0) is None


def test_a_stream_assembles_to_the_same_entry_and_a_cut_one_to_none() -> None:
    state = StreamState(chat=True, strip_usage=False)
    relay = Relay(state)
    for text in ("Fo", "ur."):
        relay.feed(b'data: {"choices":[{"index":0,"delta":{"content":"' + text.encode() + b'"}}]}\n\n')
    cut = from_stream("chat", "gpt-4o", state, 5, 10.0)
    assert cut is None, "no finish reason yet: cut"
    relay.feed(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    relay.feed(b'data: {"choices":[],"usage":' + orjson.dumps(USAGE) + b"}\n\n" + DONE_EVENT)
    e = from_stream("chat", "gpt-4o", state, 5, 10.0)
    assert e is not None and e.message == {"role": "assistant", "content": "Four."} and e.usage == USAGE


def test_stored_form_round_trips_and_large_answers_are_compressed() -> None:
    small = from_whole("chat", WHOLE, 1, 2.0)
    assert small is not None and decode(encode(small)) == small
    big_msg = {"role": "assistant", "content": "word " * COMPRESS_FROM}
    big = from_whole("chat", {**WHOLE, "choices": [{"index": 0, "message": big_msg, "finish_reason": "stop"}]}, 1, 2.0)
    assert big is not None
    blob = encode(big)
    assert blob[:1] == b"z" and len(blob) < COMPRESS_FROM and decode(blob) == big
    assert decode(b"garbage") is None and decode(b"z" + b"not zlib") is None and decode(b"j[1]") is None


def test_a_hit_is_served_whole_or_as_a_proper_stream() -> None:
    e = from_whole("chat", WHOLE, 1, 2.0)
    assert e is not None
    body = orjson.loads(whole_body(e))
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "Four."
    assert body["usage"] == USAGE and body["id"].startswith("chatcmpl-")
    events = stream_events(e, with_usage=True)
    assert events[-1] == DONE_EVENT
    state = StreamState(chat=True, strip_usage=False)
    Relay(state).feed(b"".join(events))
    assert "".join(state.text) == "Four." and state.finish_reason == "stop" and state.usage == USAGE and state.done
    first = orjson.loads(events[0][6:])
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert b"usage" not in b"".join(stream_events(e, with_usage=False))


def test_memory_layer_keeps_to_its_entry_and_byte_bounds_least_recently_used_first() -> None:
    m = MemoryLayer(max_entries=3, max_bytes=1000)
    e = from_whole("chat", WHOLE, 1, 100.0)
    assert e is not None
    for k in "abc":
        assert m.put(k, e, 300)
    assert m.get("a", 0) is e  # a is now the most recently used
    assert m.put("d", e, 300)  # 1200 bytes > 1000: b goes
    assert m.get("b", 0) is None and len(m) == 3 and m.bytes == 900 and m.evictions == 1
    assert not m.put("huge", e, 1001), "larger than the layer"
    assert not m.put("d", e, 1001) and m.get("d", 0) is None, "a refresh too large to keep drops the old one"
    assert m.put("d", e, 300)
    m.resize(max_entries=1, max_bytes=1000)
    assert len(m) == 1 and m.get("d", 0) is e
    assert m.get("d", 100.0) is None and m.bytes == 0, "expired: dropped when read"


def test_single_flight_one_leader_and_followers_get_its_entry_or_go_themselves() -> None:
    e = from_whole("chat", WHOLE, 1, 100.0)

    async def go() -> None:
        flights = Flights()
        assert flights.lead("k") is None
        waiting = flights.lead("k")
        assert waiting is not None
        follower = asyncio.ensure_future(follow(waiting, 5))
        await asyncio.sleep(0)
        flights.land("k", e)
        assert await follower is e and len(flights) == 0
        assert flights.lead("k") is None
        late = flights.lead("k")
        assert late is not None and await follow(late, 0.01) is None, "a leader that does not land in time"
        flights.land("k", None)

    asyncio.run(go())
