"""A fake OpenAI-compatible LLM provider for tests, benchmarks and the demo.

It can be slow (time to first byte, time per token), fail (error rate and status), reset
connections, drop streams after N chunks, run out of capacity (concurrency: answered with 429, or
with `queue_at_capacity` made to wait its turn, as a model server at its batch size queues), and
report usage as a real provider does. Behaviour can be changed while it runs:
`POST /fake/config` with any fields of FakeConfig; `GET /fake/stats` says what it saw.

    python -m tierwise_sidecar.fake_backend --port 9001 --first-byte-ms 50 --per-token-ms 5
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from aiohttp import web

from tierwise_sidecar.tokens import TokenCounter

WORDS = ("the", "model", "answers", "with", "a", "short", "and", "plain", "reply", "about", "it")


@dataclass
class FakeConfig:
    first_byte_ms: float = 0.0
    per_token_ms: float = 0.0
    error_rate: float = 0.0
    error_status: int = 500
    reset_rate: float = 0.0
    drop_after_chunks: int | None = None
    capacity: int | None = None
    queue_at_capacity: bool = False
    include_usage: bool = True
    completion_tokens: int = 16
    model: str | None = None
    seed: int = 0
    # A Set-Cookie on every answer, as a provider behind a CDN sends one (Cloudflare's __cf_bm).
    set_cookie: str | None = None


@dataclass
class FakeStats:
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    errors: int = 0
    resets: int = 0
    drops: int = 0
    overloaded: int = 0
    queued: int = 0
    # The last completion request's body as received: what a test checks the sidecar sent.
    last_request: dict[str, Any] = field(default_factory=dict)
    # And the headers it came with (a provider's key, who is calling).
    last_headers: dict[str, str] = field(default_factory=dict)
    # Requests that came with a Cookie header (a client that keeps what a provider set).
    with_cookie: int = 0
    models: dict[str, int] = field(default_factory=dict)
    # Usage reported in answers that went out whole (a stream cut or dropped on purpose is not in it).
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    completion_tokens: dict[str, int] = field(default_factory=dict)

    def used(self, model: str, usage: dict[str, int]) -> None:
        self.prompt_tokens[model] = self.prompt_tokens.get(model, 0) + usage["prompt_tokens"]
        self.completion_tokens[model] = self.completion_tokens.get(model, 0) + usage.get("completion_tokens", 0)


def _error(status: int, message: str, type_: str, code: str) -> web.Response:
    headers = {"Retry-After": "1"} if status == 429 else None
    body = {"error": {"message": message, "type": type_, "code": code, "param": None}}
    return web.json_response(body, status=status, headers=headers)


class FakeBackend:
    def __init__(self, config: FakeConfig | None = None, name: str = "fake") -> None:
        self.config = config or FakeConfig()
        self.name = name
        self.stats = FakeStats()
        self.counter = TokenCounter()
        self._rng = random.Random(self.config.seed)
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    # ------------------------------------------------------------ helpers

    def _reply(self, prompt: str, n_tokens: int) -> list[str]:
        """Deterministic words for a prompt; each piece is one streamed chunk."""
        rng = random.Random(f"{self.name}\0{prompt}")
        return [("" if i == 0 else " ") + rng.choice(WORDS) for i in range(max(n_tokens, 1))]

    async def _sleep_ms(self, ms: float) -> None:
        if ms > 0:
            await asyncio.sleep(ms / 1000)

    def _fault(self, request: web.Request) -> web.StreamResponse | None:
        cfg = self.config
        if cfg.reset_rate and self._rng.random() < cfg.reset_rate:
            self.stats.resets += 1
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("fake backend reset the connection")
        if cfg.error_rate and self._rng.random() < cfg.error_rate:
            self.stats.errors += 1
            return _error(cfg.error_status, f"fake backend error {cfg.error_status}", "server_error", "fake_error")
        return None

    # ------------------------------------------------------------ handlers

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self.stats.requests += 1
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "body is not JSON", "invalid_request_error", "invalid_json")
        if not isinstance(body, dict) or "model" not in body:
            return _error(400, "model is required", "invalid_request_error", "missing_model")
        model = self.config.model or str(body["model"])
        self.stats.last_request = body
        self.stats.last_headers = dict(request.headers)
        if "Cookie" in request.headers:
            self.stats.with_cookie += 1
        self.stats.models[model] = self.stats.models.get(model, 0) + 1
        cap = self.config.capacity
        if cap is not None and self.stats.in_flight >= cap:
            if not self.config.queue_at_capacity:
                self.stats.overloaded += 1
                return _error(429, "fake backend is at capacity", "rate_limit_error", "overloaded")
            self.stats.queued += 1
            turn = asyncio.get_running_loop().create_future()
            self._waiting.append(turn)
            try:
                await turn  # a finishing request hands its slot over (in_flight stays counted)
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release()
                raise
        else:
            self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            fault = self._fault(request)
            if fault is not None:
                return fault
            if chat:
                messages = body.get("messages") or []
                prompt_tokens = self.counter.count_chat(model, messages, body.get("tools") or ())
                prompt = json.dumps(messages[-1:])
            else:
                prompt = str(body.get("prompt", ""))
                prompt_tokens = self.counter.count_text(model, prompt)
            limit = body.get("max_completion_tokens") or body.get("max_tokens") or self.config.completion_tokens
            pieces = self._reply(prompt, min(int(limit), self.config.completion_tokens))
            completion_tokens = self.counter.count_text(model, "".join(pieces))
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            await self._sleep_ms(self.config.first_byte_ms)
            if body.get("stream"):
                include = bool((body.get("stream_options") or {}).get("include_usage")) and self.config.include_usage
                return await self._stream(request, model, pieces, usage, include=include, chat=chat)
            await self._sleep_ms(self.config.per_token_ms * len(pieces))
            self.stats.used(model, usage)
            return web.json_response(self._whole(model, "".join(pieces), usage, chat))
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.stats.in_flight -= 1

    def _whole(self, model: str, text: str, usage: dict[str, int], chat: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            choice["text"] = text
        out: dict[str, Any] = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-fake{self.stats.requests}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
        }
        if self.config.include_usage:
            out["usage"] = usage
        return out

    async def _stream(
        self, request: web.Request, model: str, pieces: list[str], usage: dict[str, int], *, include: bool, chat: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        base = {
            "id": f"chatcmpl-fake{self.stats.requests}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

        async def send(choice: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> None:
            event = {**base, "choices": [choice] if choice else [], **(extra or {})}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())

        def delta(d: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": d.get("content", ""), "finish_reason": finish, "logprobs": None}

        if chat:
            await send(delta({"role": "assistant", "content": ""}))
        for i, piece in enumerate(pieces):
            if self.config.drop_after_chunks is not None and i >= self.config.drop_after_chunks:
                self.stats.drops += 1
                # An abrupt end of the chunked body: the client sees a truncated stream, not [DONE].
                if request.transport is not None:
                    request.transport.abort()
                return resp
            if i:
                await self._sleep_ms(self.config.per_token_ms)
            await send(delta({"content": piece}))
        await send(delta({}, "stop"))
        if include:
            await send(None, {"usage": usage})
        await resp.write(b"data: [DONE]\n\n")
        self.stats.used(model, usage)
        await resp.write_eof()
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        body = await request.json()
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        model = self.config.model or str(body.get("model", "fake-embedding"))
        data = []
        tokens = 0
        for i, text in enumerate(items):
            data.append({"object": "embedding", "index": i, "embedding": _embedding(str(text))})
            tokens += self.counter.count_text(model, str(text))
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return web.json_response({"object": "list", "data": data, "model": model, "usage": usage})

    async def models(self, request: web.Request) -> web.Response:
        model = self.config.model or "fake-model"
        return web.json_response(
            {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "tierwise-fake"}]}
        )

    async def set_config(self, request: web.Request) -> web.Response:
        changes = await request.json()
        known = {f.name for f in fields(FakeConfig)}
        unknown = sorted(set(changes) - known)
        if unknown:
            return _error(400, f"unknown fields: {', '.join(unknown)}", "invalid_request_error", "unknown_field")
        for k, v in changes.items():
            setattr(self.config, k, v)
        if "seed" in changes:
            self._rng = random.Random(self.config.seed)
        return web.json_response(asdict(self.config))

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self.stats))

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.stats = FakeStats(in_flight=self.stats.in_flight)
        return web.json_response(asdict(self.stats))

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _set_cookie(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.config.set_cookie:
            response.headers["Set-Cookie"] = self.config.set_cookie

    def app(self) -> web.Application:
        app = web.Application()
        app.on_response_prepare.append(self._set_cookie)
        app.add_routes(
            [
                web.post("/v1/chat/completions", self.chat),
                web.post("/v1/completions", self.completions),
                web.post("/v1/embeddings", self.embeddings),
                web.get("/v1/models", self.models),
                web.get("/healthz", self.health),
                web.post("/fake/config", self.set_config),
                web.get("/fake/stats", self.get_stats),
                web.delete("/fake/stats", self.reset_stats),
            ]
        )
        return app


EMBEDDING_DIMENSIONS = 64


def _embedding(text: str) -> list[float]:
    """A bag of words hashed into 64 dimensions: texts that share words are close, as a real
    embedding model's would be for near duplicates (and, as with a real one, "enable X" and
    "disable X" are close too: telling them apart is the cache's guard's job)."""
    vector = [0.0] * EMBEDDING_DIMENSIONS
    for word in re.findall(r"[a-z0-9']+", text.lower()):
        h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "big")
        vector[h % EMBEDDING_DIMENSIONS] += 1.0 if h & 0x80000000 else -1.0
    return vector if any(vector) else [1.0] + [0.0] * (EMBEDDING_DIMENSIONS - 1)


def _flag_bool(text: str) -> bool:
    return text.lower() in ("1", "true", "yes")


# FakeConfig's annotations are strings (postponed evaluation); each maps to a flag parser.
_FLAG_TYPES: dict[str, Any] = {"float": float, "int": int, "bool": _flag_bool, "int | None": int, "str | None": str}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9001)
    p.add_argument("--name", default="fake", help="changes the words it answers with")
    for f in fields(FakeConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=_FLAG_TYPES[str(f.type)], default=f.default)
    args = p.parse_args(argv)
    config = FakeConfig(**{f.name: getattr(args, f.name) for f in fields(FakeConfig)})
    web.run_app(FakeBackend(config, args.name).app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
