"""The stage chain on its own: it serves a request with no HTTP request behind it (a batch line, a
cache replay) into a buffer, a stage's way out runs whatever happened, and a reload is built off
the event loop without touching what is in force until it is applied."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import Net, wait_for
from tests.servers import CHAT, backend, tier
from tierwise_sidecar.app import Gateway
from tierwise_sidecar.config import GatewayConfig
from tierwise_sidecar.exchange import BufferSink, Exchange, Reply
from tierwise_sidecar.pipeline import Chain
from tierwise_sidecar.policy_source import CrFolder
from tierwise_sidecar.secrets import SecretSource

DEFAULT = {"defaultFor": {"names": ["apps"]}}


def _gateway(folder: Path, *objects: dict[str, Any]) -> Gateway:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.yaml").write_text(yaml.safe_dump_all(list(objects)))
    gw = Gateway(CrFolder(folder, "apps"), GatewayConfig(), SecretSource(Path("/nonexistent"), {}))
    assert gw.reload()
    return gw


def _exchange(gw: Gateway, body: dict[str, Any], sink: BufferSink) -> Exchange:
    runtime = gw.runtime
    assert runtime is not None
    return Exchange.arriving("chat", json.dumps(body).encode(), {}, runtime, sink=sink, started=time.monotonic())


def test_the_chain_serves_a_line_with_no_http_request_behind_it(net: Net, tmp_path: Path) -> None:
    fake = net.fake(completion_tokens=5)
    gw = _gateway(tmp_path / "p", tier("t", [backend("b", fake.v1)], access=DEFAULT))

    async def go() -> tuple[BufferSink, BufferSink]:
        await gw.state.start()
        try:
            pipeline = gw.pipeline
            assert pipeline is not None
            whole, stream = BufferSink(), BufferSink()
            await pipeline.chain.run(_exchange(gw, CHAT, whole))
            await pipeline.chain.run(_exchange(gw, {**CHAT, "stream": True}, stream))
            return whole, stream
        finally:
            await gw.state.close()

    whole, stream = asyncio.run(go())
    assert whole.status == 200 and whole.closed
    assert json.loads(whole.body)["choices"][0]["message"]["content"]
    # Headers are the ones an HTTP caller gets, rendered by the account stage.
    assert whole.headers["x-tierwise-tier"] == "t" and float(whole.headers["x-tierwise-cost-usd"]) > 0
    assert stream.status == 200 and stream.content_type == "text/event-stream"
    assert stream.body.endswith(b"data: [DONE]\n\n") and stream.headers["x-tierwise-backend"] == "b"
    assert fake.requests == 2


class _Recorder:
    """A stage that notes its turns."""

    def __init__(self, name: str, seen: list[str], answer: Reply | None = None, fail: bool = False) -> None:
        self.name, self.seen, self.answer, self.fail = name, seen, answer, fail

    async def enter(self, x: Exchange) -> Reply | None:
        self.seen.append(f"in:{self.name}")
        if self.fail:
            raise RuntimeError("a bug")
        return self.answer

    async def leave(self, x: Exchange) -> None:
        self.seen.append(f"out:{self.name}")
        if self.fail:
            raise RuntimeError("a bug on the way out too")


def test_every_entered_stage_leaves_in_reverse_order_whatever_happened(net: Net, tmp_path: Path) -> None:
    fake = net.fake()
    gw = _gateway(tmp_path / "p", tier("t", [backend("b", fake.v1)], access=DEFAULT))

    def run(*stages: _Recorder) -> tuple[BufferSink, BaseException | None]:
        sink = BufferSink()
        try:
            asyncio.run(Chain(stages).run(_exchange(gw, CHAT, sink)))
        except RuntimeError as e:
            return sink, e
        return sink, None

    seen: list[str] = []
    sink, _ = run(_Recorder("a", seen), _Recorder("hit", seen, Reply(200, b"{}")), _Recorder("never", seen))
    assert seen == ["in:a", "in:hit", "out:hit", "out:a"] and sink.status == 200  # a 200 answered locally
    seen.clear()
    _, error = run(_Recorder("a", seen), _Recorder("bug", seen, fail=True), _Recorder("never", seen))
    assert seen == ["in:a", "in:bug", "out:bug", "out:a"] and error is not None  # a failing leave costs no one


def test_a_reload_is_built_without_touching_what_is_in_force(net: Net, tmp_path: Path) -> None:
    old, new = net.fake("old"), net.fake("new")
    folder = tmp_path / "p"
    gw = _gateway(folder, tier("t", [backend("b", old.v1)], access=DEFAULT))
    before = gw.pipeline
    (folder / "policy.yaml").write_text(yaml.safe_dump(tier("t", [backend("b", new.v1)], access=DEFAULT)))
    prepared = gw.prepare()  # what the reload thread runs
    assert prepared is not None and prepared.pipeline is not None
    assert gw.pipeline is before, "nothing changes until the loop applies it"
    assert gw.apply(prepared) and gw.pipeline is prepared.pipeline
    assert gw.runtime is not None and gw.runtime.tiers["t"].backends[0].url == new.v1
    # The shared state is the same: what the sidecar learnt outlives the Policy.
    assert gw.pipeline.chain.stages[-1].health is before.chain.stages[-1].health  # type: ignore[union-attr,attr-defined]


def _kinds(garbage: list[object]) -> set[str]:
    """The sidecar's own types among what only the cycle collector could free."""
    return {type(o).__qualname__ for o in garbage if type(o).__module__.startswith("tierwise")}


def test_a_finished_request_is_freed_at_once_not_left_for_the_cycle_collector(net: Net) -> None:
    """A request whose objects refer to each other in a cycle outlives its answer until a cyclic
    collection: with the collector run rarely (the gateway raises its thresholds), hundreds of
    requests' worth of memory at a time, and a longer pause when it runs."""
    fake = net.fake("gold", completion_tokens=5)
    gw = net.gateway(
        tier("gold", [backend("g", fake.v1, "gpt-4o", (100.0, 400.0))], access=DEFAULT),
        {"apiVersion": "tierwise.dev/v1alpha1", "kind": "CostBudget", "metadata": {"name": "m", "namespace": "apps"},
         "spec": {"limit": {"usd": 10}, "perRequestMax": {"usd": 0.01}}},
        {"apiVersion": "tierwise.dev/v1alpha1", "kind": "CachePolicy", "metadata": {"name": "c", "namespace": "apps"},
         "spec": {}},
        namespace="apps",
    )  # fmt: skip
    ask = {**CHAT, "max_tokens": 16}
    cached = {**ask, "temperature": 0}
    gc.collect()
    gc.disable()
    try:
        statuses = [
            gw.post("/v1/chat/completions", ask)[0],
            gw.post("/v1/chat/completions", {**ask, "stream": True})[0],
            gw.post("/v1/chat/completions", cached)[0],
            gw.post("/v1/chat/completions", cached)[0],  # a cache hit
            gw.post("/v1/chat/completions", {**CHAT, "max_tokens": 100_000})[0],  # over perRequestMax
            gw.post("/v1/chat/completions", b'{"model": "gold", "messages": [')[0],
        ]
        fake.configure(error_rate=1.0, error_status=503)
        statuses.append(gw.post("/v1/chat/completions", ask)[0])
        assert statuses[:6] == [200, 200, 200, 200, 400, 400] and statuses[6] >= 500, statuses
        # The stages' way out may end just after the caller has its answer.
        wait_for("every request's way out", lambda: gw.gateway.in_flight == 0, timeout=10, interval=0.02)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = _kinds(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not left, f"freed only by the cycle collector: {sorted(left)}"
