"""Fake providers and a tierwise gateway on loopback, served from one background event loop, so
tests drive them with the real (blocking or async) openai SDK and can stop a replica at will."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import openai
import yaml
from aiohttp import web

from tierwise_sidecar.app import Gateway, GatewayConfig
from tierwise_sidecar.fake_backend import FakeBackend, FakeConfig
from tierwise_sidecar.policy_source import CrFolder
from tierwise_sidecar.secrets import SecretSource

T = TypeVar("T")


class Loop:
    """An asyncio loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Served:
    """An aiohttp app listening on 127.0.0.1 (a free port), stoppable and restartable."""

    def __init__(self, loop: Loop, app: web.Application, port: int = 0) -> None:
        self.loop = loop
        self.runner = web.AppRunner(app, shutdown_timeout=5)
        self.port = port
        loop.run(self.runner.setup())
        self.start()

    def start(self) -> None:
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        self.loop.run(site.start())
        self.port = self.runner.addresses[-1][1]

    def stop_listening(self) -> None:
        """Like a killed replica: the port refuses connections (open ones are cut)."""

        async def stop() -> None:
            for site in list(self.runner.sites):
                await site.stop()
            server = self.runner.server
            if server is not None:
                for conn in list(server.connections):
                    conn.force_close()
                    if conn.transport is not None:
                        conn.transport.abort()

        self.loop.run(stop())

    def close(self) -> None:
        self.loop.run(self.runner.cleanup())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Fake(Served):
    def __init__(self, loop: Loop, name: str = "fake", **config: Any) -> None:
        self.backend = FakeBackend(FakeConfig(**config), name)
        super().__init__(loop, self.backend.app())

    def configure(self, **changes: Any) -> None:
        for k, v in changes.items():
            setattr(self.backend.config, k, v)

    @property
    def requests(self) -> int:
        return self.backend.stats.requests

    @property
    def v1(self) -> str:
        return self.url + "/v1"


class GatewayServer(Served):
    def __init__(self, loop: Loop, policy: Path, namespace: str | None = None, **options: Any) -> None:
        endpoints = options.pop("endpoints", None)
        secrets = options.pop("secrets", None) or SecretSource(Path("/nonexistent"), {})
        self.gateway = Gateway(CrFolder(policy, namespace, endpoints=endpoints), GatewayConfig(**options), secrets)
        assert self.gateway.reload(), "the test policy did not load"
        super().__init__(loop, self.gateway.app())

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kw)

    def async_client(self, **kw: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kw)

    def post(
        self, path: str, body: bytes | Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """A raw request: status, headers, body (no SDK in between)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method="POST", headers={"Content-Type": "application/json", **(headers or {})}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


def tier(name: str, backends: list[dict[str, Any]], namespace: str = "apps", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tierwise.dev/v1alpha1",
        "kind": "InferenceTier",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"backends": backends, **spec},
    }


def backend(
    name: str, url: str, model: str = "gpt-4o-mini", price: tuple[float, float] = (0.15, 0.6), **kw: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "model": model,
        "url": url,
        "pricing": {"inputPerMillion": price[0], "outputPerMillion": price[1]},
        **kw,
    }


def write_policy(folder: Path, *objects: Mapping[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.yaml").write_text(yaml.safe_dump_all(list(objects), sort_keys=False))
    return folder


CHAT = {"model": "any", "messages": [{"role": "user", "content": "Say hello."}]}
