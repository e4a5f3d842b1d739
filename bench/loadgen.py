"""A lean HTTP/1.1 load generator for POST /v1/chat/completions.

Raw asyncio streams, one keep-alive connection per concurrent worker, hand-written request bytes:
far less CPU per request than an aiohttp client, so on a small machine the client does not hide
the cost of the server it measures. Uses uvloop when it is installed.

It runs a warm-up, then a measured window; only requests that finish inside the window count.
With --cpu-pid NAME=PID it samples the CPU time of that process tree (from /proc) at both edges
of the window, so the caller gets CPU seconds per request with no clock skew between processes.
Prints one JSON object on stdout.

    python bench/loadgen.py --port 8080 --concurrency 32 --duration 5 --warmup 1
    python bench/loadgen.py --port 8080 --concurrency 1 --stream --cpu-pid proxy=1234
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import procstat

DEFAULT_PROMPT = "Say hello in one short sentence."


class ProtocolError(Exception):
    pass


@dataclass
class Result:
    status: int
    end_ns: int
    latency_ns: int
    ttfb_ns: int  # first body bytes; for streams, the first SSE chunk
    body: bytes = b""


@dataclass
class Totals:
    ok: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_ns: list[int] = field(default_factory=list)
    ttfbs_ns: list[int] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)


def build_request(host: str, port: int, path: str, body: bytes, extra_headers: list[str]) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: */*",
        "Authorization: Bearer sk-bench",
        f"Content-Length: {len(body)}",
        *extra_headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chat_body(
    model: str, stream: bool, max_tokens: int, prompt: str = DEFAULT_PROMPT, temperature: float | None = None
) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
    }
    if temperature is not None:
        body["temperature"] = temperature
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode()


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, raw: bytes, keep_body: bool) -> Result:
        if self.writer is None:
            await self.open()
        reader, writer = self.reader, self.writer
        assert reader is not None and writer is not None
        start = time.perf_counter_ns()
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1."):
            raise ProtocolError(f"bad status line: {head[:40]!r}")
        status = int(head[9:12])
        lower = head.lower()
        ttfb = 0
        parts: list[bytes] = []
        if b"\r\ntransfer-encoding: chunked" in lower:
            while True:
                size_line = await reader.readline()
                size = int(size_line.split(b";", 1)[0], 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b""):
                        pass  # trailers
                    break
                chunk = await reader.readexactly(size + 2)
                if not ttfb:
                    ttfb = time.perf_counter_ns()
                if keep_body:
                    parts.append(chunk[:-2])
        else:
            i = lower.find(b"\r\ncontent-length:")
            if i >= 0:
                j = lower.index(b"\r\n", i + 2)
                length = int(lower[i + 17 : j])
                data = await reader.readexactly(length) if length else b""
            else:  # no framing: the body runs to the end of the connection
                data = await reader.read()
                self.close()
            ttfb = time.perf_counter_ns()
            if keep_body:
                parts.append(data)
        end = time.perf_counter_ns()
        if b"\r\nconnection: close" in lower:
            self.close()
        return Result(status, end, end - start, ttfb - start, b"".join(parts))


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def summary_ms(values_ns: list[int]) -> dict[str, float]:
    if not values_ns:
        return {}
    s = sorted(v / 1e6 for v in values_ns)
    return {
        "p50": percentile(s, 50),
        "p90": percentile(s, 90),
        "p99": percentile(s, 99),
        "mean": sum(s) / len(s),
        "max": s[-1],
    }


def cpu_sample(cpu_pids: dict[str, int]) -> dict[str, float]:
    sample = {n: procstat.tree_cpu_seconds(p) for n, p in cpu_pids.items()}
    sample["loadgen"] = procstat.cpu_seconds(os.getpid())
    system = procstat.system_cpu_seconds()
    sample["system_busy"], sample["system_steal"] = system["busy"], system["steal"]
    return sample


class Load:
    """`concurrency` workers, each looping on its own keep-alive connection until stopped."""

    ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ProtocolError, ValueError)

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        body = chat_body(args.model, args.stream, args.max_tokens, temperature=args.temperature)
        self.raw = build_request(args.host, args.port, args.path, body, args.header)
        self.totals = Totals()
        self.window = [0, 0]  # measured window, perf_counter_ns; 0 = not started yet
        self.stop = asyncio.Event()

    async def worker(self) -> None:
        totals, window = self.totals, self.window
        conn = Connection(self.args.host, self.args.port)
        try:
            while not self.stop.is_set():
                try:
                    res = await conn.request(self.raw, keep_body=False)
                except self.ERRORS as e:
                    conn.close()
                    if window[0] and not self.stop.is_set():
                        totals.errors += 1
                        if len(totals.error_samples) < 5:
                            totals.error_samples.append(f"{type(e).__name__}: {e}")
                    await asyncio.sleep(0.01)
                    continue
                if not window[0] or res.end_ns > window[1] > 0:
                    continue  # warm-up, or finished after the window closed
                totals.statuses[res.status] = totals.statuses.get(res.status, 0) + 1
                if res.status != 200:
                    totals.errors += 1
                    continue
                totals.ok += 1
                totals.latencies_ns.append(res.latency_ns)
                if self.args.stream:
                    totals.ttfbs_ns.append(res.ttfb_ns)
        finally:
            conn.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cpu_pids = {name: int(pid) for name, _, pid in (spec.partition("=") for spec in args.cpu_pid)}
    load = Load(args)
    tasks = [asyncio.ensure_future(load.worker()) for _ in range(args.concurrency)]
    await asyncio.sleep(args.warmup)
    cpu0 = cpu_sample(cpu_pids)
    load.window[0] = time.perf_counter_ns()
    await asyncio.sleep(args.duration)
    load.window[1] = time.perf_counter_ns()
    cpu1 = cpu_sample(cpu_pids)
    load.stop.set()
    _done, pending = await asyncio.wait(tasks, timeout=args.grace)
    for t in pending:
        t.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*pending, return_exceptions=True)

    totals = load.totals
    elapsed = (load.window[1] - load.window[0]) / 1e9
    cpu = {n: cpu1[n] - cpu0[n] for n in cpu0}
    # Busy CPU time on the machine that none of the measured processes used: other load, i.e. noise.
    cpu["other"] = cpu["system_busy"] - sum(v for n, v in cpu.items() if not n.startswith("system_"))
    return {
        "concurrency": args.concurrency,
        "stream": args.stream,
        "elapsed_s": elapsed,
        "requests": totals.ok,
        "errors": totals.errors,
        "statuses": {str(k): v for k, v in sorted(totals.statuses.items())},
        "error_samples": totals.error_samples,
        "rps": totals.ok / elapsed if elapsed else 0.0,
        "latency_ms": summary_ms(totals.latencies_ns),
        "ttfb_ms": summary_ms(totals.ttfbs_ns),
        "cpu_s": cpu,
        "cpu_ms_per_request": {n: (cpu[n] * 1000 / totals.ok if totals.ok else None) for n in cpu_pids},
        "stuck_workers": len(pending),
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
    }


async def probe(args: argparse.Namespace) -> dict[str, Any]:
    """One request, whole body returned: for sanity checks."""
    body = chat_body(args.model, args.stream, args.max_tokens)
    conn = Connection(args.host, args.port)
    try:
        res = await asyncio.wait_for(
            conn.request(build_request(args.host, args.port, args.path, body, args.header), True), args.grace
        )
    finally:
        conn.close()
    return {"status": res.status, "latency_ms": res.latency_ns / 1e6, "body": res.body.decode(errors="replace")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/v1/chat/completions")
    p.add_argument("--model", default="gpt-4o-mini")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, help="sent when given (a cache caches only cool sampling)")
    p.add_argument("--header", action="append", default=[], help="extra request header, 'Name: value'")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before the measured window")
    p.add_argument("--grace", type=float, default=10.0, help="seconds to let in-flight requests finish")
    p.add_argument("--stream", action="store_true", help="ask for an SSE stream (time to first chunk is measured)")
    p.add_argument("--cpu-pid", action="append", default=[], metavar="NAME=PID", help="process tree to take CPU of")
    p.add_argument("--probe", action="store_true", help="send one request and print status and body")
    p.add_argument("--no-uvloop", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    coro = probe(args) if args.probe else run(args)
    if not args.no_uvloop:
        try:
            import uvloop

            out = uvloop.run(coro)
        except ImportError:
            out = asyncio.run(coro)
    else:
        out = asyncio.run(coro)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
