"""What the demo's traffic act drives: fake providers on loopback, and an application's calls
through the sidecar with the real openai SDK (the sidecar holds no key for the fakes; the SDK
wants one, so it gets a word that is not a key)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import openai

from localcluster import free_port, stop_process

NAMES = ("openai-4o", "azure-4o", "mini")
BOLD, PLAIN = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")


def step(text: str) -> None:
    print(f"\n{BOLD}== {text}{PLAIN}", flush=True)


class Providers:
    """One fake provider per backend of namespace shop, each its own process on loopback."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = {name: free_port() for name in NAMES}
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Providers:
        for name, port in self.ports.items():
            log = (self.workdir / f"provider-{name}.log").open("wb")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "tierwise_sidecar.fake_backend", "--port", str(port), "--name", name,
                 "--first-byte-ms", "40", "--per-token-ms", "1", "--completion-tokens", "64"],
                stdout=log, stderr=subprocess.STDOUT,
            ))  # fmt: skip
        for name in NAMES:
            self._wait(name)
        return self

    def __exit__(self, *_: object) -> None:
        for proc in self.procs:
            stop_process(proc)

    def _wait(self, name: str) -> None:
        for _ in range(100):
            try:
                self.requests(name)
                return
            except OSError:
                threading.Event().wait(0.1)
        raise RuntimeError(f"the fake provider {name} did not start; see {self.workdir}/provider-{name}.log")

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}/v1"

    def requests(self, name: str) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[name]}/fake/stats", timeout=5) as r:
            return int(json.loads(r.read())["requests"])

    def configure(self, name: str, **config: Any) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.ports[name]}/fake/config", json.dumps(config).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
        urllib.request.urlopen(req, timeout=5).close()


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    code: str | None = None
    message: str | None = None


_clients: dict[str, openai.OpenAI] = {}


def ask(url: str, *, tier: str, tenant: str, stream: bool = False) -> Answer:
    """One chat completion as the application sends it (model = the tier's name)."""
    client = _clients.get(url)
    if client is None:
        client = _clients[url] = openai.OpenAI(base_url=url + "/v1", api_key="not-a-key", max_retries=0, timeout=30)
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=tier, messages=[{"role": "user", "content": "Suggest a name for a coffee shop."}], max_tokens=64,
            stream=stream, extra_headers={"x-tierwise-tenant": tenant},
        )  # fmt: skip
        parsed = raw.parse()
        if stream:
            for _ in parsed:
                pass
        return Answer(raw.status_code, raw.headers)
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        error = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
        return Answer(e.status_code, e.response.headers, error.get("code") or e.code, error.get("message"))


class Workers:
    """`work(n)` in `threads` threads until the block ends, n counting each thread's calls."""

    def __init__(self, work: Callable[[int], None], threads: int = 4) -> None:
        self.work = work
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            self.work(n)
            n += 1

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(35)


class Traffic(Workers):
    """Callers of one tier, every other request streamed, until the block ends."""

    def __init__(self, url: str, *, tier: str, tenant: str, threads: int = 4) -> None:
        super().__init__(self._one, threads)
        self.url, self.tier, self.tenant = url, tier, tenant
        self.ok = 0
        self.failed: dict[int, int] = {}

    def _one(self, n: int) -> None:
        got = ask(self.url, tier=self.tier, tenant=self.tenant, stream=n % 2 == 1)
        if got.status == 200:
            self.ok += 1
        else:
            self.failed[got.status] = self.failed.get(got.status, 0) + 1
