"""The smallest useful aiohttp pass-through for POST /v1/chat/completions: the benchmark's floor.

It forwards the request body unchanged to the upstream with one pooled ClientSession, streams an
SSE answer back chunk by chunk, and returns any other answer whole. Nothing else: no parsing, no
routing, no accounting. Whatever a real gateway costs beyond this is the cost of its features.

    python bench/minimal_proxy.py --upstream http://127.0.0.1:9001/v1 --port 8081
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
# Headers the upstream needs to see; hop-by-hop and framing headers are left to aiohttp.
FORWARD = ("Content-Type", "Authorization", "Accept")


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {h: request.headers[h] for h in FORWARD if h in request.headers}
    session = request.app[SESSION]
    async with session.post(request.app[UPSTREAM] + "/chat/completions", data=body, headers=headers) as up:
        content_type = up.headers.get("Content-Type", "application/json")
        if content_type.startswith("text/event-stream"):
            resp = web.StreamResponse(
                status=up.status, headers={"Content-Type": content_type, "Cache-Control": "no-cache"}
            )
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        return web.Response(status=up.status, body=await up.read(), headers={"Content-Type": content_type})


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(total=300, sock_connect=5)
        app[SESSION] = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", chat)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", required=True, help="base URL ending in /v1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--uvloop", action="store_true", help="run on uvloop (default: asyncio's own loop)")
    args = p.parse_args()
    loop = None
    if args.uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
    web.run_app(make_app(args.upstream), host=args.host, port=args.port, print=None, loop=loop, access_log=None)


if __name__ == "__main__":
    main()
