"""Where a self-hosted backend's replicas are.

In the cluster each backend has a headless Service (`<tier>-<backend>-hl`) whose DNS name
resolves to one address per ready replica; it is re-resolved periodically so stickiness hashes over
the replicas that exist now. Standalone, an endpoints file lists them:

    silver/llama-8b: [http://127.0.0.1:9101/v1, http://127.0.0.1:9102/v1]

External backends (`url`) are a single endpoint and need neither.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from tierwise.naming import backend_key, headless_service

log = logging.getLogger("tierwise.endpoints")
_SCHEMES = ("http://", "https://")


def parse_endpoints(data: object, source: str) -> dict[str, tuple[str, ...]]:
    """Validate an endpoints file's content: `tier/backend` to a list of base URLs."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a mapping of tier/backend to a list of URLs")
    out: dict[str, tuple[str, ...]] = {}
    for key, urls in data.items():
        if not isinstance(key, str) or key.count("/") != 1:
            raise ValueError(f"{source}: key {key!r} is not tier/backend")
        if not isinstance(urls, list) or not all(isinstance(u, str) and u.startswith(_SCHEMES) for u in urls):
            raise ValueError(f"{source}: {key} must be a list of http(s) URLs")
        out[key] = tuple(u.rstrip("/") for u in urls)
    return out


def load_endpoints(path: Path) -> dict[str, tuple[str, ...]]:
    return parse_endpoints(yaml.safe_load(path.read_text()), str(path))


class Endpoints:
    """The current replicas of every self-hosted backend; swapped whole, read without locks."""

    def __init__(self, table: Mapping[str, Sequence[str]] | None = None) -> None:
        self._table: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in (table or {}).items()}

    def get(self, key: str) -> tuple[str, ...]:
        return self._table.get(key, ())

    def replace(self, table: Mapping[str, Sequence[str]]) -> None:
        self._table = {k: tuple(v) for k, v in table.items()}

    def update(self, key: str, urls: Sequence[str]) -> None:
        self._table = {**self._table, key: tuple(urls)}


async def resolve(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addrs = sorted({str(info[4][0]) for info in infos})
    return [f"http://[{a}]:{port}/v1" if ":" in a else f"http://{a}:{port}/v1" for a in addrs]


async def refresh_dns(
    endpoints: Endpoints, backends: Iterable[tuple[str, str, str, int]], cluster_domain: str = "cluster.local"
) -> None:
    """Resolve each (tier, backend, namespace, port) headless Service once; keep the last good
    answer on a lookup failure, so a DNS hiccup does not empty a backend."""
    for tier, backend, namespace, port in backends:
        key = backend_key(tier, backend)
        host = f"{headless_service(tier, backend)}.{namespace}.svc.{cluster_domain}"
        try:
            urls = await resolve(host, port)
        except OSError as e:
            log.warning("could not resolve %s: %s; keeping %d known endpoints", host, e, len(endpoints.get(key)))
            continue
        endpoints.update(key, urls)


def host_port(endpoint: str) -> str:
    """An endpoint as host:port, for logs and metric labels: never a path, a query or a URL's
    credentials."""
    parts = urlsplit(endpoint)
    if not parts.hostname:
        return "?"
    return parts.hostname + (f":{parts.port}" if parts.port else "")
