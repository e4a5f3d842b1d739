"""The HTTP side of the gateway: an answer written to an aiohttp request, and how responses are
named in metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
from aiohttp import web

from tierwise_sidecar.exchange import ClientGoneError

LAST_WRITE_SECONDS = 10.0


class HttpSink:
    """An answer written to an aiohttp request. A whole answer is sent at once (not when the
    handler returns), so the stages' way out does not hold the caller."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    async def whole(self, status: int, headers: Mapping[str, str], body: bytes, content_type: str) -> None:
        resp = web.Response(status=status, body=body, content_type=content_type, headers=headers)
        self.response = resp
        try:
            await resp.prepare(self.request)
            await resp.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass  # the caller left; nothing else to do for a whole answer

    async def open(self, status: int, headers: Mapping[str, str]) -> None:
        resp = web.StreamResponse(status=status, headers=headers)
        self.response = resp
        try:
            await resp.prepare(self.request)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            # Nobody reads it: what the response metric counts for a caller gone before the start.
            self.response = web.Response(status=499)
            raise ClientGoneError() from None

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        try:
            await self.response.write(data)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            raise ClientGoneError() from None

    def connected(self) -> bool:
        transport = self.request.transport
        return transport is not None and not transport.is_closing()

    async def close(self, last: bytes) -> None:
        """The final bytes, bounded in time: a caller that stopped reading cannot hold the handler."""
        assert self.response is not None
        try:
            async with asyncio.timeout(LAST_WRITE_SECONDS):
                await self.response.write(last)
                await self.response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError, TimeoutError):
            pass


# The paths the gateway serves: a request to another path is counted as "unmatched", so a scan of
# random paths cannot grow the metric's label set.
SERVED = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/healthz", "/readyz",
                    "/metrics"})  # fmt: skip


# The name of the route that takes what no other route does (app.py).
UNMATCHED = "unmatched"


def endpoint_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    if resource is not None and resource.name != UNMATCHED:
        return resource.canonical
    return request.path if request.path in SERVED else UNMATCHED  # a known path with a wrong method
