"""redis-py connections whose commands hiredis packs."""

from __future__ import annotations

from typing import Any

import hiredis
import redis.asyncio as aioredis


class _HiredisPacking:
    """Commands packed by hiredis, in C: redis-py's asyncio connection packs in Python, which
    for a script call with its keys and arguments costs some 300 us of CPU (hiredis: 5 us)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if isinstance(name, str) and " " in name:  # "SCRIPT LOAD": the name is two words
            args = (*name.split(), *args[1:])
        return [hiredis.pack_command(args)]


class _Connection(_HiredisPacking, aioredis.Connection):
    pass


class _SSLConnection(_HiredisPacking, aioredis.SSLConnection):
    pass


class _UnixConnection(_HiredisPacking, aioredis.UnixDomainSocketConnection):
    pass


def connection_class(url: str) -> type[aioredis.Connection | aioredis.UnixDomainSocketConnection]:
    if url.startswith("rediss://"):
        return _SSLConnection
    if url.startswith("unix://"):
        return _UnixConnection
    return _Connection
