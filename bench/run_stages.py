"""CPU per request of each pipeline stage, in process, without a network.

Requests go through the gateway's real chain (built from a Policy as the server builds it), with
the forward stage replaced by one that answers at once with a provider's usual answer: what is
left is the stages' own work. Each stage's way in and way out are timed separately with the
thread's CPU clock, over many requests, after a warm-up. Run it beside `run_proxy.py`, which
measures the whole server (HTTP, the client to the provider, the event loop) against a minimal
proxy.

    .venv/bin/python bench/run_stages.py                  # no budget, a budget in memory and in SQLite
    .venv/bin/python bench/run_stages.py --requests 50000 --redis redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from run_proxy import tierwise_policy

from tierwise_sidecar.account import segment
from tierwise_sidecar.app import Gateway
from tierwise_sidecar.config import GatewayConfig
from tierwise_sidecar.exchange import BufferSink, Exchange, Reply
from tierwise_sidecar.pipeline import Chain
from tierwise_sidecar.policy_source import CrFolder
from tierwise_sidecar.secrets import SecretSource
from tierwise_sidecar.serve import settle_the_heap
from tierwise_sidecar.upstream import Candidate, Started

BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
    "max_tokens": 16,
}
ANSWER = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 14, "completion_tokens": 4, "total_tokens": 18},
    }
).encode()


ANSWER_DATA = json.loads(ANSWER)
THRESHOLDS = gc.get_threshold()


class Answer:
    """The terminal stage, without a provider: the answer a provider gives, and its usage."""

    name = "forward"

    async def enter(self, x: Exchange) -> Reply | None:
        tier = x.runtime.tiers[x.identity.tier]
        backend = tier.by_price[0]
        if x.gate is not None:
            # What forward asks of the admit stage on every try: a slot of the target, and what
            # the answer tells its limit (the slot is given back on the admit stage's way out).
            cand = Candidate(tier, backend, backend.url or "", None)
            await x.gate.to(cand)
            x.gate.observe(cand, 0.001, Started(cand, data=ANSWER_DATA), None)
        x.outcome.tier, x.outcome.backend = tier.name, backend
        x.outcome.segments.append(segment(backend, {"prompt_tokens": 14, "completion_tokens": 4}, 0, 0))
        x.served = ANSWER_DATA  # as the forward stage leaves it for the cache to store
        return Reply(200, ANSWER)

    async def leave(self, x: Exchange) -> None:
        return None


@dataclass
class Timed:
    """A stage with its CPU time in and out accumulated."""

    stage: Any
    enter_s: float = 0.0
    leave_s: float = 0.0
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.stage.name

    async def enter(self, x: Exchange) -> Reply | None:
        t = time.thread_time()
        try:
            return await self.stage.enter(x)  # type: ignore[no-any-return]
        finally:
            self.enter_s += time.thread_time() - t

    async def leave(self, x: Exchange) -> None:
        t = time.thread_time()
        try:
            await self.stage.leave(x)
        finally:
            self.leave_s += time.thread_time() - t


# SLO steering as the operator publishes it: the tier's weights lowered for one backend, and half
# of its traffic sent to a tier (itself here: the bench has one) by the steer stage's draw.
STEERING = {"tiers": {"standard": {"weights": {"cheap": 1, "strong": 2},
                                   "divert": {"to": "standard", "reason": "promoted", "percent": 50}}}}  # fmt: skip


# A cache policy in memory, for the cache configurations: "hits" sends the same request every time
# (all but the first answered from L1), "misses" a new one every time (each stored, L1 evicting).
CACHE_POLICY = """
---
apiVersion: tierwise.dev/v1alpha1
kind: CachePolicy
metadata: {name: bench, namespace: bench}
spec: {}
"""


async def measure(  # noqa: PLR0917 (a benchmark's knobs)
    store: str | None,
    requests: int,
    warmup: int,
    tmp: Path,
    steered: bool = False,
    cache: str | None = None,
    admit: bool = True,
) -> dict[str, Any]:
    policy = tmp / f"policy-{store or 'none'}".replace(":", "_").replace("/", "_")
    policy.mkdir()
    text = tierwise_policy("http://127.0.0.1:9/v1", budget=store is not None)
    (policy / "tiers.yaml").write_text(text + (CACHE_POLICY if cache else ""))
    steering = None
    if steered:
        steering = tmp / "steering.json"
        steering.write_text(json.dumps(STEERING))
    config = GatewayConfig(budget_store=store or "memory", steering_file=steering)
    gw = Gateway(CrFolder(policy, "bench"), config, SecretSource(Path("/nonexistent"), {}))
    assert gw.reload(), "the benchmark's Policy did not load"
    await gw.state.start()
    pipeline = gw.pipeline
    assert pipeline is not None
    # Without admit: the chain as it was before the stage, to state its cost in one run.
    timed = [Timed(s) for s in pipeline.chain.stages if s.name != "forward" and (admit or s.name != "admit")]
    chain = Chain([*timed, Answer()])
    runtime = pipeline.runtime
    raw = json.dumps({**BODY, "temperature": 0} if cache else BODY).encode()
    counter = iter(range(10**9))

    async def one() -> None:
        sink = BufferSink()
        body = raw
        if cache == "misses":
            body = json.dumps({**BODY, "temperature": 0, "messages": [{"role": "user", "content":
                              f"Say hello in one short sentence, number {next(counter)}."}]}).encode()  # fmt: skip
        x = Exchange.arriving("chat", body, {}, runtime, sink=sink, started=time.monotonic())
        await chain.run(x)
        assert sink.status == 200, sink.body[:300]

    for _ in range(warmup):
        await one()
    for t in timed:
        t.enter_s = t.leave_s = 0.0
    # The heap as the server keeps it: what start-up built frozen out of the collector's sight, young
    # collections every GC_YOUNG_THRESHOLD allocations (the interpreter's defaults would charge the
    # stages full collections over tiktoken's tables the server never makes).
    settle_the_heap()
    start = time.thread_time()
    for _ in range(requests):
        await one()
    total = time.thread_time() - start
    await gw.state.close()
    gc.unfreeze()
    gc.set_threshold(*THRESHOLDS)
    return {
        "total_us": total / requests * 1e6,
        "stages": {t.name: (t.enter_s / requests * 1e6, t.leave_s / requests * 1e6) for t in timed},
    }


def run_loop(coro: Any) -> Any:
    """On uvloop when installed, as the gateway's server runs."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--warmup", type=int, default=2000)
    p.add_argument("--runs", type=int, default=3, help="repeat each configuration; medians are reported")
    p.add_argument("--redis", help="also measure a budget on this Redis (its client's work included)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        configs: dict[str, str | None] = {"no budget, no admit": None, "no budget": None,
                                          "no budget, steered": None, "budget, memory": "memory",
                                          "cache, misses": None, "cache, hits": None}  # fmt: skip
        configs["budget, SQLite"] = f"sqlite:{tmp / 'ledger.sqlite'}"
        if args.redis:
            configs["budget, Redis"] = args.redis
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
        for run in range(args.runs):
            for name, configured in configs.items():
                run_dir = tmp / f"{run}-{len(results[name])}-{name.replace(' ', '').replace(',', '')}"
                run_dir.mkdir()
                store = configured
                if store and store.startswith("sqlite:"):
                    store = f"sqlite:{run_dir / 'ledger.sqlite'}"  # a fresh ledger per run
                steered = name.endswith("steered")
                cache = name.removeprefix("cache, ") if name.startswith("cache") else None
                admit = not name.endswith("no admit")
                results[name].append(run_loop(measure(store, args.requests, args.warmup, run_dir, steered, cache,
                                                      admit)))  # fmt: skip
    names = list(configs)
    stages = list(results[names[0]][0]["stages"])
    for n in names:
        for s in results[n][0]["stages"]:
            if s not in stages:
                stages.append(s)
    lines = ["| stage (CPU µs per request, in + out) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for s in stages:
        cells = []
        for n in names:
            ins = [r["stages"][s][0] for r in results[n] if s in r["stages"]]
            outs = [r["stages"][s][1] for r in results[n] if s in r["stages"]]
            cells.append(f"{statistics.median(ins):.1f} + {statistics.median(outs):.1f}" if ins else "—")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    totals = [f"{statistics.median(r['total_us'] for r in results[n]):.1f}" for n in names]
    lines.append("| whole chain, forward answering at once | " + " | ".join(totals) + " |")
    print("\n".join(lines))
    python = sys.version.split()[0]
    print(f"\n- {args.requests} requests after {args.warmup} warm-up, {args.runs} run(s), medians; Python {python}; "
          "a 1-message chat request of 16 tokens, CostAware routing over two backends")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
