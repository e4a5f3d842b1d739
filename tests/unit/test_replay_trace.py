"""The replay trace: its format round-trips and every bad line is refused by line and field; the
reference trace is deterministic and has the mix, repeats and spike its parameters say; the
converter reads OpenAI JSON Lines, LiteLLM spend logs and CSV, counting the rows it skips."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from tierwise_sidecar.replay import convert as convert_mod
from tierwise_sidecar.replay import tracegen
from tierwise_sidecar.replay.convert import convert, convert_file, parse_time
from tierwise_sidecar.replay.trace import TraceError, TraceRequest, read_trace, write_trace
from tierwise_sidecar.replay.tracegen import TraceParams, generate, read_meta, trace_meta, write_meta
from tierwise_sidecar.replay.tracestats import summarize

CHAT = {"model": "gold", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}


def _line(**fields: Any) -> str:
    obj: dict[str, Any] = {"t": 0.5, "body": CHAT}
    obj.update(fields)
    return json.dumps({k: v for k, v in obj.items() if v is not ...})


# -- format ---------------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    requests = [
        TraceRequest(t=0.0, body=CHAT),
        TraceRequest(t=0.25, body=CHAT, kind="chat", tenant="acme", tier="gold", label="hard", session="s-1", id="a"),
        TraceRequest(t=0.25, body={"model": "m", "prompt": "Say hi"}, kind="completions", label="easy"),
        TraceRequest(t=1.5, body={"model": "e", "input": ["a", "b"]}, kind="embeddings", tenant="globex"),
    ]
    path = tmp_path / "t.jsonl"
    assert write_trace(requests, path) == 4
    assert read_trace(path) == requests
    assert read_trace(path.read_text().splitlines()) == requests
    # None fields are left out of the line; kind is written.
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {"t": 0.0, "kind": "chat", "body": CHAT}


def test_defaults_and_blank_lines() -> None:
    got = read_trace(["", _line(), "   ", _line(t=1)])
    assert [r.t for r in got] == [0.5, 1.0]
    assert got[0].kind == "chat" and got[0].tenant is None and got[0].label is None
    assert isinstance(got[1].t, float)


BAD = [
    ("not json", "not valid JSON", None),
    ("[1, 2]", "JSON object", None),
    (_line(t=...), "required", "t"),
    (_line(t="0.5"), "number", "t"),
    (_line(t=True), "number", "t"),
    (_line(t=-1), ">= 0", "t"),
    ('{"t": 1e999, "body": {"messages": [{"role": "user"}]}}', "not valid JSON", None),
    (_line(body=...), "required", "body"),
    (_line(body=[1]), "object", "body"),
    (_line(body={"model": "x"}), "required for kind 'chat'", "body.messages"),
    (_line(body={"model": "x", "messages": []}), "non-empty", "body.messages"),
    (_line(body={"messages": ["hi"]}), "role", "body.messages[0]"),
    (_line(body={"model": 3, "messages": [{"role": "user"}]}), "string", "body.model"),
    (_line(kind="images"), "one of chat", "kind"),
    (_line(kind="embeddings"), "required for kind 'embeddings'", "body.input"),
    (_line(kind="completions"), "required for kind 'completions'", "body.prompt"),
    (_line(label="trivial"), "one of easy", "label"),
    (_line(tenant=3), "non-empty string", "tenant"),
    (_line(tier=""), "non-empty string", "tier"),
    (_line(session=["s"]), "non-empty string", "session"),
    (_line(id=7), "non-empty string", "id"),
    (_line(tennant="acme"), "unknown field", "tennant"),
]


@pytest.mark.parametrize(("line", "message", "field"), BAD)
def test_bad_lines_name_line_and_field(line: str, message: str, field: str | None) -> None:
    with pytest.raises(TraceError) as caught:
        read_trace([_line(t=0), "", line])
    e = caught.value
    assert isinstance(e, ValueError)
    assert e.line == 3
    assert e.field == field
    assert str(e).startswith("line 3")
    assert message in str(e)
    if field is not None:
        assert repr(field) in str(e)


def test_times_must_not_decrease_unless_sorted() -> None:
    lines = [_line(t=2, id="a"), _line(t=1, id="b"), _line(t=1, id="c")]
    with pytest.raises(TraceError) as caught:
        read_trace(lines)
    assert (caught.value.line, caught.value.field) == (2, "t")
    assert [r.id for r in read_trace(lines, sort=True)] == ["b", "c", "a"]


def test_bounds(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"line 3: more than 2 requests"):
        read_trace([_line(), _line(), _line()], max_requests=2)
    assert len(read_trace([_line(), _line()], max_requests=2)) == 2
    big = json.dumps({"t": 0, "body": {"messages": [{"role": "user", "content": "x" * (1 << 20)}]}})
    path = tmp_path / "big.jsonl"
    path.write_text(_line() + "\n" + big + "\n" + _line(t=1) + "\n")
    with pytest.raises(TraceError, match=r"line 2: longer than 1048576 bytes"):
        read_trace(path)
    with pytest.raises(TraceError, match=r"line 2: longer than"):
        read_trace([_line(), big])
    # Just under the bound is fine, from a file as from lines.
    ok = _line(body={"messages": [{"role": "user", "content": "x" * 1000}]})
    assert len(read_trace([ok], max_line_bytes=len(ok))) == 1
    with pytest.raises(TraceError, match="longer than"):
        read_trace([ok], max_line_bytes=len(ok) - 1)
    with pytest.raises(TraceError, match="cannot read"):
        read_trace(tmp_path / "missing.jsonl")


def test_write_refuses_what_read_would(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"request 2: .*body.messages"):
        write_trace([TraceRequest(t=0, body=CHAT), TraceRequest(t=1, body={"model": "x"})], tmp_path / "t.jsonl")
    with pytest.raises(TraceError, match=r"request 2: t 0\.5 is before"):
        write_trace([TraceRequest(t=1, body=CHAT), TraceRequest(t=0.5, body=CHAT)], tmp_path / "t.jsonl")


# -- reference trace ------------------------------------------------------------------------------

LONG = TraceParams(seed=11, duration_s=600, base_rps=10, spike_at_s=300, spike_len_s=60, spike_factor=4)


@pytest.fixture(scope="module")
def long_trace() -> list[TraceRequest]:
    return generate(LONG)


def test_deterministic_for_a_seed() -> None:
    params = TraceParams(seed=3, duration_s=60)
    a, b = generate(params), generate(params)
    assert a == b and len(a) > 100
    assert [orjson.dumps(r.to_json()) for r in a] == [orjson.dumps(r.to_json()) for r in b]
    c = generate(TraceParams(seed=4, duration_s=60))
    assert [r.to_json() for r in c] != [r.to_json() for r in a]
    assert [r.t for r in c] != [r.t for r in a]


def test_sorted_valid_and_written(long_trace: list[TraceRequest], tmp_path: Path) -> None:
    times = [r.t for r in long_trace]
    assert times == sorted(times)
    assert times[0] >= 0 and times[-1] < LONG.duration_s
    path = tmp_path / "ref.jsonl"
    write_trace(long_trace, path)
    assert read_trace(path) == long_trace
    assert len({r.id for r in long_trace}) == len(long_trace)


def _shares(values: list[Any]) -> dict[Any, float]:
    return {k: n / len(values) for k, n in Counter(values).items()}


def test_mix_shares(long_trace: list[TraceRequest]) -> None:
    n = len(long_trace)
    # 540 s at 10/s and 60 s at 40/s: 7800 expected, a Poisson count (sd ~90).
    assert 7450 < n < 8150
    tiers = _shares([r.tier for r in long_trace])
    for tier, share in LONG.tier_mix:
        assert tiers[tier] == pytest.approx(share, abs=0.03)
    labels = _shares([r.label for r in long_trace])
    for label, share in LONG.difficulty_mix:
        assert labels[label] == pytest.approx(share, abs=0.03)
    for r in long_trace:
        assert r.body["model"] == r.tier
        assert r.body["max_tokens"] == dict(LONG.max_tokens)[r.label]  # type: ignore[index]
    tenants = _shares([r.tenant for r in long_trace])
    for name, share in LONG.tenant_shares():
        assert tenants[name] == pytest.approx(share, abs=0.03)
    assert tenants["acme"] > 2 * tenants["umbrella"]  # skewed: 48% against 12%
    cold = _shares([r.body["temperature"] == 0 for r in long_trace])
    assert cold[True] == pytest.approx(LONG.cacheable_share, abs=0.03)
    in_sessions = sum(1 for r in long_trace if r.session) / n
    assert in_sessions == pytest.approx(LONG.session_share, abs=0.03)


def test_prompt_text_by_difficulty(long_trace: list[TraceRequest]) -> None:
    def mean_len(label: str) -> float:
        return statistics.mean(len(r.body["messages"][1]["content"]) for r in long_trace if r.label == label)

    assert mean_len("easy") * 2 < mean_len("medium") < mean_len("hard")
    hard = [r.body["messages"][1]["content"] for r in long_trace if r.label == "hard"]
    assert sum("```" in h for h in hard) > len(hard) / 10


def test_zipf_repeats(long_trace: list[TraceRequest]) -> None:
    first_turns = [r for r in long_trace if r.session is None]
    counts = Counter(r.body["messages"][1]["content"] for r in first_turns)
    assert len(counts) <= LONG.prompt_pool
    ranked = [n for _, n in counts.most_common()]
    assert ranked[0] > 10 * statistics.median(ranked)
    summary = summarize(long_trace)
    assert summary["repeat_share"] > 0.8
    assert summary["cacheable_repeat_share"] > 0.3
    assert summary["distinct_prompts"] < len(long_trace) / 5
    # Without the Zipf skew (s = 0) repeats are flatter: the head is no longer far above the median.
    flat = generate(TraceParams(seed=11, duration_s=600, base_rps=10, zipf_s=0, session_share=0))
    flat_ranked = [n for _, n in Counter(r.body["messages"][1]["content"] for r in flat).most_common()]
    assert flat_ranked[0] < 3 * statistics.median(flat_ranked)


def test_spike_rate(long_trace: list[TraceRequest]) -> None:
    start, end = LONG.spike_at_s, LONG.spike_at_s + LONG.spike_len_s
    inside = sum(1 for r in long_trace if start <= r.t < end) / LONG.spike_len_s
    outside = sum(1 for r in long_trace if not start <= r.t < end) / (LONG.duration_s - LONG.spike_len_s)
    assert outside == pytest.approx(LONG.base_rps, rel=0.08)
    assert inside / outside == pytest.approx(LONG.spike_factor, rel=0.15)
    calm = generate(TraceParams(seed=11, duration_s=600, base_rps=10, spike_len_s=0))
    calm_inside = sum(1 for r in calm if start <= r.t < end) / LONG.spike_len_s
    assert calm_inside == pytest.approx(LONG.base_rps, rel=0.2)


def test_sessions_grow(long_trace: list[TraceRequest]) -> None:
    by_session: dict[str, list[TraceRequest]] = {}
    for r in long_trace:
        if r.session:
            by_session.setdefault(r.session, []).append(r)
    assert len(by_session) > 20
    for turns in by_session.values():
        assert len(turns) <= LONG.session_turns[1]
        # A session still open when the trace ends is cut short: only the last ones may be.
        assert len(turns) >= LONG.session_turns[0] or turns[0].t > LONG.duration_s - 60
        lengths = [len(r.body["messages"]) for r in turns]
        assert lengths == list(range(2, 2 + 2 * len(turns), 2))
        assert len({(r.tenant, r.tier, r.label) for r in turns}) == 1
        assert turns[-1].body["messages"][: lengths[0]] == turns[0].body["messages"]


def test_meta(long_trace: list[TraceRequest], tmp_path: Path) -> None:
    meta = trace_meta(LONG, long_trace)
    assert (meta.spike.start_s, meta.spike.end_s, meta.spike_factor) == (300, 360, 4)
    assert (meta.outage.start_s, meta.outage.end_s, meta.outage_tier) == (80, 90, "gold")
    assert 85 in meta.outage and 90 not in meta.outage
    assert meta.budget_tenant == "acme" and meta.synthetic and meta.requests == len(long_trace)
    assert meta.budget_usd == pytest.approx(meta.premium_cost_usd * LONG.budget_fraction, rel=1e-3)
    assert meta.budget_usd > 0
    path = tmp_path / "ref.meta.json"
    write_meta(meta, path)
    assert json.loads(path.read_text())["synthetic"] is True
    assert read_meta(path) == meta
    path.write_text("{}")
    with pytest.raises(TraceError, match="not a trace meta"):
        read_meta(path)


def test_bad_params() -> None:
    for bad in ({"duration_s": 0}, {"base_rps": -1}, {"tier_mix": (("gold", 0.0),)}, {"cacheable_share": 2},
                {"difficulty_mix": (("trivial", 1.0),)}, {"session_turns": (1, 3)}):  # fmt: skip
        with pytest.raises(ValueError, match="TraceParams"):
            TraceParams(**bad)


def test_main_writes_trace_and_meta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "trace.jsonl"
    assert tracegen.main(["--out", str(out), "--seed", "5", "--duration", "30"]) == 0
    requests = read_trace(out)
    assert requests == generate(TraceParams(seed=5, duration_s=30))
    assert read_meta(tmp_path / "trace.meta.json").params.seed == 5
    printed = capsys.readouterr().out
    assert f"requests: {len(requests)}" in printed and "SYNTHETIC" in printed and "repeat_share" in printed


# -- converter ------------------------------------------------------------------------------------


def test_parse_time() -> None:
    assert parse_time("2024-06-01T12:00:00Z") == 1717243200.0
    assert parse_time("2024-06-01T14:00:00.5+02:00") == 1717243200.5
    assert parse_time("2024-06-01 12:00:00") == 1717243200.0  # naive: UTC
    assert parse_time(1717243200) == 1717243200.0
    assert parse_time(1717243200500) == 1717243200.5  # milliseconds
    assert parse_time("1717243200.25") == 1717243200.25
    for bad in ("yesterday", True, None, -5, float("nan"), [1]):
        assert parse_time(bad) is None


def test_convert_openai_jsonl() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    lines = [
        json.dumps({"timestamp": "2024-06-01T12:00:02Z", "model": "gpt-4o", "messages": msgs, "user": "u1"}),
        json.dumps({"timestamp": 1717243200, "model": "gpt-4o-mini", "messages": msgs, "tier": "bronze"}),
        "",
        json.dumps({"created": 1717243201.5, "body": {"model": "e", "input": "x"}, "tenant": "acme", "label": "easy"}),
        json.dumps({"timestamp": "2024-06-01T12:00:03Z", "model": "m", "prompt": "Say hi", "id": "c1"}),
        json.dumps({"model": "gpt-4o", "messages": msgs}),  # no timestamp
        json.dumps({"timestamp": "soon", "messages": msgs}),  # unusable timestamp
        json.dumps({"timestamp": 1717243200, "model": "gpt-4o"}),  # no body content
        json.dumps({"timestamp": 1717243200, "messages": "hi"}),  # invalid messages
        "{broken",
        "[1]",
    ]
    got = convert(lines, "openai-jsonl")
    assert [r.t for r in got.requests] == [0.0, 1.5, 2.0, 3.0]
    first, emb, chat, comp = got.requests
    assert first.body == {"model": "gpt-4o-mini", "messages": msgs} and first.tier == "bronze"
    assert (emb.kind, emb.tenant, emb.label, emb.body) == ("embeddings", "acme", "easy", {"model": "e", "input": "x"})
    assert chat.tenant == "u1" and chat.body["user"] == "u1" and "timestamp" not in chat.body
    assert (comp.kind, comp.id) == ("completions", "c1") and "id" not in comp.body
    assert got.skipped == 6
    assert got.skip_reasons == {
        "no timestamp or created field": 1,
        "unusable timestamp": 1,
        "no messages, prompt or input": 1,
        "invalid body.messages": 1,
        "not JSON": 1,
        "not a JSON object": 1,
    }
    # A named time field.
    named = convert([json.dumps({"ts": 10, "messages": msgs}), json.dumps({"ts": 12.5, "messages": msgs})],
                    "openai-jsonl", time_field="ts")  # fmt: skip
    assert [r.t for r in named.requests] == [0.0, 2.5] and "ts" not in named.requests[0].body


def test_convert_litellm(tmp_path: Path) -> None:
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    rows: list[dict[str, Any]] = [
        {"request_id": "a", "call_type": "acompletion", "startTime": "2024-06-01T12:00:05.000+00:00",
         "model": "gpt-4o-2024-08-06", "model_group": "gpt-4o", "user": "key-owner", "end_user": "cust-1",
         "messages": msgs, "proxy_server_request": {"model": "gpt-4o", "messages": msgs, "max_tokens": 10,
                                                    "metadata": {"tags": ["x"]}, "litellm_trace_id": "z"},
         "request_tags": ["tier:gold"], "session_id": "sess-9"},
        {"request_id": "b", "call_type": "completion", "startTime": "2024-06-01T12:00:00Z", "model": "gpt-4o-mini",
         "user": "key-owner", "messages": json.dumps(msgs), "proxy_server_request": "{}",
         "metadata": json.dumps({"tags": ["tier:bronze"]})},
        {"request_id": "c", "call_type": "aembedding", "startTime": 1717243201, "model": "text-embedding-3-small",
         "team_id": "team-7", "messages": ["embed me"], "proxy_server_request": {}},
        {"request_id": "d", "call_type": "acompletion", "startTime": "2024-06-01T12:00:01Z", "model": "gpt-4o",
         "messages": {}, "proxy_server_request": {}},  # content not stored
        {"request_id": "e", "call_type": "image_generation", "startTime": "2024-06-01T12:00:01Z", "messages": "x"},
        {"request_id": "f", "call_type": "acompletion", "model": "gpt-4o", "messages": msgs},  # no startTime
    ]  # fmt: skip
    got = convert([json.dumps(r) for r in rows], "litellm")
    assert [r.id for r in got.requests] == ["b", "c", "a"]
    assert [r.t for r in got.requests] == [0.0, 1.0, 5.0]
    b, c, a = got.requests
    assert (b.tenant, b.tier, b.kind) == ("key-owner", "bronze", "chat")
    assert b.body == {"messages": msgs, "model": "gpt-4o-mini"}
    assert (c.tenant, c.kind) == ("team-7", "embeddings")
    assert c.body == {"input": ["embed me"], "model": "text-embedding-3-small"}
    assert (a.tenant, a.tier, a.session) == ("cust-1", "gold", "sess-9")
    assert a.body == {"model": "gpt-4o", "messages": msgs, "max_tokens": 10}
    assert got.skipped == 3
    assert got.skip_reasons == {
        "no request content (LiteLLM stores it with store_prompts_in_spend_logs)": 1,
        "call_type image_generation is not replayed": 1,
        "no startTime field": 1,
    }
    # The JSON array /spend/logs answers, from a file, gives the same.
    path = tmp_path / "spend.json"
    path.write_text(json.dumps(rows, indent=1))
    assert convert_file(path, "litellm") == got
    jsonl = tmp_path / "spend.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert convert_file(jsonl, "litellm") == got


def test_convert_csv(tmp_path: Path) -> None:
    text = (
        "timestamp,tenant,tier,model,system,prompt,max_tokens,temperature,label\n"
        "2024-06-01T12:00:01Z,acme,gold,gpt-4o,Be brief.,What is 2+2?,16,0,easy\n"
        '1717243200,globex,,gpt-4o-mini,,"Hello, world",,,\n'
        "2024-06-01T12:00:02Z,acme,,m,,,,,\n"
        "2024-06-01T12:00:03Z,acme,,m,,Hi,lots,,\n"
    )
    got = convert(text.splitlines(keepends=True), "csv")
    assert [r.t for r in got.requests] == [0.0, 1.0]
    g, a = got.requests
    assert g.body == {"messages": [{"role": "user", "content": "Hello, world"}], "model": "gpt-4o-mini"}
    assert g.tier is None and g.tenant == "globex"
    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}
    assert a.body == {"messages": [system, user], "model": "gpt-4o", "max_tokens": 16, "temperature": 0.0}
    assert (a.tier, a.label) == ("gold", "easy")
    assert got.skip_reasons == {"no prompt": 1, "max_tokens is not a number": 1}
    path = tmp_path / "log.csv"
    path.write_text(text)
    assert convert_file(path, "csv") == got


def test_convert_bounds_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = json.dumps({"timestamp": 1, "messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(TraceError, match="more than 2 requests"):
        convert([line] * 3, "openai-jsonl", max_requests=2)
    huge = json.dumps({"timestamp": 1, "messages": [{"role": "user", "content": "x" * 2000}]})
    got = convert([line, huge], "openai-jsonl", max_line_bytes=1000)
    assert (len(got.requests), got.skip_reasons) == (1, {"line over 1000 bytes": 1})
    with pytest.raises(TraceError, match="unknown format"):
        convert([line], "har")  # type: ignore[arg-type]

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(line + "\n" + "oops\n" + json.dumps({"timestamp": 3.5, "prompt": "p"}) + "\n")
    assert convert_mod.main(["--from", "openai-jsonl", str(src), str(out)]) == 0
    assert [(r.t, r.kind) for r in read_trace(out)] == [(0.0, "chat"), (2.5, "completions")]
    printed = capsys.readouterr().out
    assert "wrote 2 requests" in printed and "skipped 1: not JSON" in printed
    src.write_text("oops\n")
    assert convert_mod.main(["--from", "litellm", str(src), str(out)]) == 1
    assert "no request" in capsys.readouterr().err
    assert convert_mod.main(["--from", "litellm", str(tmp_path / "missing"), str(out)]) == 1
    assert "cannot read" in capsys.readouterr().err
