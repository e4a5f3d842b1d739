"""A SYNTHETIC reference trace, seeded: the same TraceParams give the same trace, byte for byte.

It models traffic a gateway policy is meant to handle, each part with a parameter of TraceParams:
tenants of unequal size, a mix of tiers, prompts that repeat with a Zipf law (what a cache can
save), a mix of easy, medium and hard requests (what routing by difficulty can save), a traffic
spike, multi-turn sessions, and (recorded in TraceMeta, for the replay to apply to its fake
providers) a backend outage and a budget that runs out mid-trace. It is made up from templates
and word lists in this module: it says nothing about any real workload. docs/replay-trace.md.

    python -m tierwise_sidecar.replay.tracegen --out trace.jsonl --seed 7 --duration 300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from itertools import accumulate
from typing import Any

from tierwise_sidecar.replay.prompts import FOLLOW_UPS, SYSTEM, answer, prompt
from tierwise_sidecar.replay.trace import LABELS, Label, TraceError, TraceRequest, write_trace
from tierwise_sidecar.replay.tracestats import estimate_tokens, summarize

TENANT_NAMES = ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "tyrell")


@dataclass(frozen=True, slots=True)
class TraceParams:
    """What the reference trace models. Shares need not sum to 1: they are normalised.

    seed: the only source of randomness (random.Random(seed)); same seed, same trace.
    duration_s: how long the trace lasts, in seconds.
    base_rps: the mean arrival rate outside the spike; arrivals are a Poisson process (independent
      exponential gaps) at the rate in force.
    tenants: how many tenants send traffic (named acme, globex, ... then tenant-9, ...).
    tenant_skew: tenant i (from 1) gets a share proportional to 1 / i**tenant_skew: with 4 tenants
      and 1.0, 48% / 24% / 16% / 12% (one big customer, a long tail); 0 makes them equal.
    tier_mix: (tier, share) pairs; each request's tier is drawn from it, independently, sent as the
      tier hint and as body.model.
    difficulty_mix: (label, share) pairs: easy are short factual questions, medium explanations and
      short writing, hard multi-step reasoning, code and design prompts; set as the request's label.
    max_tokens: (label, max_tokens) pairs: the answer budget each difficulty asks for.
    prompt_pool: how many distinct prompts there are, split between the labels by difficulty_mix.
    zipf_s: within a label's prompts, the k-th most popular is drawn with weight 1 / k**zipf_s, so a
      few prompts repeat often and most rarely (1.1: the head prompt is ~10-20% of its label).
    cacheable_share: the share of requests sent with temperature 0 (the rest 0.7): what a response
      cache may answer from a previous identical request.
    spike_at_s, spike_len_s, spike_factor: a traffic spike: the rate is spike_factor x base_rps from
      spike_at_s for spike_len_s seconds (spike_len_s 0: no spike).
    outage_at_s, outage_len_s, outage_tier: a backend outage the generator cannot cause: recorded in
      TraceMeta for the replay to make the fake provider behind outage_tier fail in that window.
    budget_tenant, budget_fraction, budget_usd_per_1k_tokens: a budget suggestion recorded in
      TraceMeta: the replay gives budget_tenant (default: the largest tenant) a budget of
      budget_fraction of what that tenant's requests would cost on the premium tier at
      budget_usd_per_1k_tokens (prompt tokens estimated as characters / 4, answers as max_tokens):
      the default is small enough for a Policy that cuts cost ~75 % to cross its thresholds.
    session_share: the share of requests that are turns of multi-turn sessions (a conversation
      growing by one user turn and one assistant answer per request), session_turns the range of
      turns a session has.
    """

    seed: int = 0
    duration_s: float = 120.0
    base_rps: float = 5.0
    tenants: int = 4
    tenant_skew: float = 1.0
    tier_mix: tuple[tuple[str, float], ...] = (("gold", 0.2), ("silver", 0.3), ("bronze", 0.5))
    difficulty_mix: tuple[tuple[Label, float], ...] = (("easy", 0.5), ("medium", 0.35), ("hard", 0.15))
    max_tokens: tuple[tuple[Label, int], ...] = (("easy", 64), ("medium", 256), ("hard", 1024))
    prompt_pool: int = 300
    zipf_s: float = 1.1
    cacheable_share: float = 0.7
    spike_at_s: float = 60.0
    spike_len_s: float = 15.0
    spike_factor: float = 4.0
    outage_at_s: float = 80.0
    outage_len_s: float = 10.0
    outage_tier: str = "gold"
    budget_tenant: str | None = None
    budget_fraction: float = 0.08
    budget_usd_per_1k_tokens: float = 0.01
    session_share: float = 0.1
    session_turns: tuple[int, int] = (2, 6)

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"TraceParams: {what}")

        need(self.duration_s > 0 and math.isfinite(self.duration_s), "duration_s must be > 0")
        need(self.base_rps > 0 and math.isfinite(self.base_rps), "base_rps must be > 0")
        need(self.tenants >= 1, "tenants must be >= 1")
        need(self.tenant_skew >= 0, "tenant_skew must be >= 0")
        for name in ("tier_mix", "difficulty_mix"):
            mix = getattr(self, name)
            need(bool(mix) and all(s >= 0 for _, s in mix) and sum(s for _, s in mix) > 0,
                 f"{name} needs shares >= 0 with a positive sum")  # fmt: skip
            need(len({k for k, _ in mix}) == len(mix), f"{name} names a key twice")
        need(all(label in LABELS for label, _ in self.difficulty_mix), f"difficulty_mix labels are {LABELS}")
        need({label for label, _ in self.max_tokens} >= {label for label, _ in self.difficulty_mix},
             "max_tokens needs every label of difficulty_mix")  # fmt: skip
        need(all(n >= 1 for _, n in self.max_tokens), "max_tokens must be >= 1")
        need(self.prompt_pool >= len(self.difficulty_mix), "prompt_pool needs at least one prompt a label")
        need(self.zipf_s >= 0, "zipf_s must be >= 0")
        for name in ("cacheable_share", "session_share", "budget_fraction"):
            need(0 <= getattr(self, name) <= 1, f"{name} must be within [0, 1]")
        need(self.spike_at_s >= 0 and self.spike_len_s >= 0 and self.spike_factor > 0, "spike window and factor")
        need(self.outage_at_s >= 0 and self.outage_len_s >= 0, "outage window")
        need(self.budget_usd_per_1k_tokens >= 0, "budget_usd_per_1k_tokens must be >= 0")
        need(2 <= self.session_turns[0] <= self.session_turns[1], "session_turns is (min, max) with 2 <= min <= max")

    def tenant_names(self) -> list[str]:
        return [TENANT_NAMES[i] if i < len(TENANT_NAMES) else f"tenant-{i + 1}" for i in range(self.tenants)]

    def tenant_shares(self) -> list[tuple[str, float]]:
        weights = [1 / (i + 1) ** self.tenant_skew for i in range(self.tenants)]
        total = sum(weights)
        return [(name, w / total) for name, w in zip(self.tenant_names(), weights, strict=True)]


@dataclass(frozen=True, slots=True)
class Window:
    """[start_s, end_s) of the trace."""

    start_s: float
    end_s: float

    def __contains__(self, t: object) -> bool:
        return isinstance(t, int | float) and self.start_s <= t < self.end_s


@dataclass(frozen=True, slots=True)
class TraceMeta:
    """What the trace cannot say in its lines, for the replay: the params it was made with, the
    spike (rate spike_factor x base_rps in spike), the outage (the fake provider behind
    outage_tier fails in outage), and the budget suggestion (give budget_tenant a budget of
    budget_usd; premium_cost_usd is what its requests would cost all on premium)."""

    params: TraceParams
    requests: int
    spike: Window
    spike_factor: float
    outage: Window
    outage_tier: str
    budget_tenant: str
    budget_usd: float
    premium_cost_usd: float
    tenant_shares: tuple[tuple[str, float], ...]
    synthetic: bool = True
    version: int = 1


def _prompt_pool(params: TraceParams) -> dict[Label, list[str]]:
    """Distinct prompts for each label, as many as its share of prompt_pool (at least one). When
    the templates run out of distinct texts, a numbered context line keeps them distinct."""
    rng = random.Random(f"{params.seed}/pool")
    mix = _normalised(params.difficulty_mix)
    pool: dict[Label, list[str]] = {}
    seen: set[str] = set()
    for label, share in mix:
        want = max(1, round(params.prompt_pool * share))
        prompts: list[str] = []
        tries = 0
        while len(prompts) < want:
            text = prompt(rng, label)
            tries += 1
            if tries > 20 * want:
                text = f"{text}\n(Context: case {len(seen) + 1}.)"
            if text not in seen:
                seen.add(text)
                prompts.append(text)
        pool[label] = prompts
    return pool


def _normalised(mix: Sequence[tuple[Any, float]]) -> list[tuple[Any, float]]:
    total = sum(s for _, s in mix)
    return [(k, s / total) for k, s in mix]


class _Pick:
    """Draws keys by weights with a seeded rng (cumulative weights computed once)."""

    def __init__(self, keys: Sequence[Any], weights: Sequence[float]) -> None:
        self.keys = list(keys)
        self.cum = list(accumulate(weights))

    def __call__(self, rng: random.Random) -> Any:
        return rng.choices(self.keys, cum_weights=self.cum)[0]


def _arrivals(params: TraceParams, rng: random.Random) -> list[float]:
    """A Poisson process at a piecewise-constant rate: an exponential gap at the rate in force; a
    gap that crosses a change of rate is redrawn from the change (exact, the process being
    memoryless)."""
    spike_end = params.spike_at_s + params.spike_len_s
    bounds = sorted({b for b in (params.spike_at_s, spike_end, params.duration_s) if 0 < b <= params.duration_s})
    times: list[float] = []
    t = 0.0
    while True:
        rate = params.base_rps * (params.spike_factor if params.spike_at_s <= t < spike_end else 1.0)
        nxt = t + rng.expovariate(rate)
        boundary = next((b for b in bounds if b > t), params.duration_s)
        if nxt >= boundary:
            if boundary >= params.duration_s:
                return times
            t = boundary
            continue
        t = nxt
        times.append(round(t, 6))


@dataclass(slots=True)
class _Session:
    id: str
    tenant: str
    tier: str
    label: Label
    messages: list[dict[str, str]]
    turns_left: int
    temperature: float
    follow_ups: list[str] = field(default_factory=list)


def generate(params: TraceParams) -> list[TraceRequest]:
    """The reference trace for params: sorted by t, ids r-000001..., deterministic for params."""
    rng = random.Random(params.seed)
    pool = _prompt_pool(params)
    labels = _normalised(params.difficulty_mix)
    pick_label = _Pick([k for k, _ in labels], [s for _, s in labels])
    pick_prompt = {
        label: _Pick(prompts, [1 / (k + 1) ** params.zipf_s for k in range(len(prompts))])
        for label, prompts in pool.items()
    }
    tiers = _normalised(params.tier_mix)
    pick_tier = _Pick([k for k, _ in tiers], [s for _, s in tiers])
    tenants = params.tenant_shares()
    pick_tenant = _Pick([k for k, _ in tenants], [s for _, s in tenants])
    max_tokens = dict(params.max_tokens)

    requests: list[TraceRequest] = []
    open_sessions: list[_Session] = []
    sessions = 0
    # A session of n turns gives n requests: start sessions at session_share / mean turns of
    # arrivals so session_share of requests are session turns.
    # A draw that would continue a session when none is open gives a plain request instead: asking
    # for continuations a bit more often than turns are due keeps open sessions few.
    mean_turns = (params.session_turns[0] + params.session_turns[1]) / 2
    continue_share = min(1 - params.session_share / mean_turns, 1.5 * params.session_share * (1 - 1 / mean_turns))
    for n, t in enumerate(_arrivals(params, rng), start=1):
        temperature = 0.0 if rng.random() < params.cacheable_share else 0.7
        r = rng.random()
        session: _Session | None = None
        if open_sessions and r < continue_share:
            # One of the oldest open sessions takes its next turn, so sessions end and few stay open.
            session = open_sessions[rng.randrange(min(3, len(open_sessions)))]
            follow_up = session.follow_ups.pop()
            session.messages.append({"role": "assistant", "content": answer(rng, session.label)})
            session.messages.append({"role": "user", "content": follow_up})
        else:
            label: Label = pick_label(rng)
            tenant: str = pick_tenant(rng)
            tier: str = pick_tier(rng)
            messages = [
                {"role": "system", "content": SYSTEM[label]},
                {"role": "user", "content": pick_prompt[label](rng)},
            ]
            if r >= 1 - params.session_share / mean_turns:
                sessions += 1
                turns = rng.randint(*params.session_turns)
                session = _Session(f"s-{sessions}", tenant, tier, label, messages, turns, temperature,
                                   rng.sample(FOLLOW_UPS, min(turns - 1, len(FOLLOW_UPS))))  # fmt: skip
                open_sessions.append(session)
            else:
                one = _request(t, n, tenant=tenant, tier=tier, label=label, messages=messages,
                               max_tokens=max_tokens[label], temperature=temperature, session=None)  # fmt: skip
                requests.append(one)
                continue
        session.turns_left -= 1
        if session.turns_left <= 0 or not session.follow_ups:
            open_sessions.remove(session)
        requests.append(_request(t, n, tenant=session.tenant, tier=session.tier, label=session.label,
                                 messages=list(session.messages), max_tokens=max_tokens[session.label],
                                 temperature=session.temperature, session=session.id))  # fmt: skip
    return requests


def _request(t: float, n: int, *, tenant: str, tier: str, label: Label, messages: list[dict[str, str]],
             max_tokens: int, temperature: float, session: str | None) -> TraceRequest:  # fmt: skip
    body = {"model": tier, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
    return TraceRequest(t=t, body=body, kind="chat", tenant=tenant, tier=tier, label=label, session=session,
                        id=f"r-{n:06d}")  # fmt: skip


def trace_meta(params: TraceParams, requests: Sequence[TraceRequest]) -> TraceMeta:
    """The windows and the budget suggestion of a trace made with params."""
    tenant = params.budget_tenant or params.tenant_names()[0]
    tokens = sum(estimate_tokens(r) for r in requests if r.tenant == tenant)
    premium = tokens / 1000 * params.budget_usd_per_1k_tokens
    return TraceMeta(
        params=params,
        requests=len(requests),
        spike=Window(params.spike_at_s, min(params.spike_at_s + params.spike_len_s, params.duration_s)),
        spike_factor=params.spike_factor,
        outage=Window(params.outage_at_s, min(params.outage_at_s + params.outage_len_s, params.duration_s)),
        outage_tier=params.outage_tier,
        budget_tenant=tenant,
        budget_usd=round(premium * params.budget_fraction, 6),
        premium_cost_usd=round(premium, 6),
        tenant_shares=tuple((k, round(s, 6)) for k, s in params.tenant_shares()),
    )


def write_meta(meta: TraceMeta, path: str | os.PathLike[str]) -> None:
    """The meta as JSON (next to the trace: trace.jsonl -> trace.meta.json by convention)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(asdict(meta), f, indent=2)
        f.write("\n")


def read_meta(path: str | os.PathLike[str]) -> TraceMeta:
    """A meta written by write_meta; TraceError if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        p = raw["params"]
        known = {f.name for f in fields(TraceParams)}
        for name in ("tier_mix", "difficulty_mix", "max_tokens"):
            if name in p:
                p[name] = tuple(tuple(pair) for pair in p[name])
        if "session_turns" in p:
            p["session_turns"] = tuple(p["session_turns"])
        params = TraceParams(**{k: v for k, v in p.items() if k in known})
        return TraceMeta(
            params=params,
            requests=int(raw["requests"]),
            spike=Window(**raw["spike"]),
            spike_factor=float(raw["spike_factor"]),
            outage=Window(**raw["outage"]),
            outage_tier=str(raw["outage_tier"]),
            budget_tenant=str(raw["budget_tenant"]),
            budget_usd=float(raw["budget_usd"]),
            premium_cost_usd=float(raw["premium_cost_usd"]),
            tenant_shares=tuple((str(k), float(s)) for k, s in raw["tenant_shares"]),
            synthetic=bool(raw.get("synthetic", True)),
            version=int(raw.get("version", 1)),
        )
    except OSError as e:
        raise TraceError(f"cannot read {os.fspath(path)!r}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise TraceError(f"{os.fspath(path)!r} is not a trace meta: {e!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tierwise_sidecar.replay.tracegen",
                                     description="Write the SYNTHETIC reference trace (and its meta).")  # fmt: skip
    defaults = TraceParams()
    parser.add_argument("--out", required=True, help="the trace file (JSONL)")
    parser.add_argument("--meta", help="the meta file (default: OUT with .meta.json for .jsonl)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--duration", type=float, default=defaults.duration_s, help="seconds")
    parser.add_argument("--rps", type=float, default=defaults.base_rps, help="base requests per second")
    parser.add_argument("--tenants", type=int, default=defaults.tenants)
    parser.add_argument("--prompt-pool", type=int, default=defaults.prompt_pool)
    parser.add_argument("--zipf", type=float, default=defaults.zipf_s)
    parser.add_argument("--spike-at", type=float, default=defaults.spike_at_s)
    parser.add_argument("--spike-len", type=float, default=defaults.spike_len_s)
    parser.add_argument("--spike-factor", type=float, default=defaults.spike_factor)
    parser.add_argument("--outage-at", type=float, default=defaults.outage_at_s)
    parser.add_argument("--outage-len", type=float, default=defaults.outage_len_s)
    args = parser.parse_args(argv)
    try:
        params = TraceParams(seed=args.seed, duration_s=args.duration, base_rps=args.rps, tenants=args.tenants,
                             prompt_pool=args.prompt_pool, zipf_s=args.zipf, spike_at_s=args.spike_at,
                             spike_len_s=args.spike_len, spike_factor=args.spike_factor,
                             outage_at_s=args.outage_at, outage_len_s=args.outage_len)  # fmt: skip
    except ValueError as e:
        parser.error(str(e))
    requests = generate(params)
    meta = trace_meta(params, requests)
    meta_path = args.meta or (
        args.out[: -len(".jsonl")] + ".meta.json" if args.out.endswith(".jsonl") else args.out + ".meta.json"
    )
    try:
        write_trace(requests, args.out)
        write_meta(meta, meta_path)
    except (OSError, TraceError) as e:
        print(f"tracegen: {e}", file=sys.stderr)
        return 1
    summary = summarize(requests)
    print(f"wrote {args.out} (SYNTHETIC, seed {params.seed}) and {meta_path}")
    for name, value in summary.items():
        print(f"  {name}: {value}")
    print(f"  spike: {meta.spike.start_s}-{meta.spike.end_s} s at {meta.spike_factor}x")
    print(
        f"  outage: {meta.outage.start_s}-{meta.outage.end_s} s of the {meta.outage_tier!r} backend (replay applies it)"
    )
    print(
        f"  budget: {meta.budget_usd} USD for tenant {meta.budget_tenant!r} (all-premium cost {meta.premium_cost_usd})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
