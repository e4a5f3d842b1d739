"""Session fixtures: one real control plane for the whole run, started on first use."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from localcluster import Cluster, ClusterError, free_port, start
from tests.servers import Fake, GatewayServer, Loop, Served, write_policy

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """etcd + kube-apiserver + controller-manager + scheduler + kwok, on loopback, auditing writes."""
    c = start(tmp_path_factory.mktemp("cluster"), nodes=True, audit=True)
    try:
        yield c
    finally:
        c.stop()


def wait_for(what: str, probe, timeout: float = 60.0, interval: float = 0.2):  # type: ignore[no-untyped-def]
    """Poll `probe` until it returns something truthy; fail naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except ClusterError as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last}")


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> Cluster:
    """The cluster with tierwise's generated CRDs installed and established."""
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=tierwise-tests", "-f", str(ROOT / "crds")
    )
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(ROOT / "crds"))
    # Discovery (kubectl explain, short names) lags Established by a moment.
    wait_for(
        "tierwise.dev in discovery",
        lambda: "inferencetiers" in cluster.kubectl("api-resources", "--api-group=tierwise.dev", check=False).stdout,
    )
    return cluster


_ns_counter = iter(range(10_000))


@pytest.fixture
def namespace(crds: Cluster) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards."""
    name = f"t{int(time.time()) % 100000}-{next(_ns_counter)}"
    crds.kubectl("create", "namespace", name)
    yield name
    crds.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def aio() -> Iterator[Loop]:
    """One background event loop serving every fake provider and gateway of the run."""
    loop = Loop()
    yield loop
    loop.close()


class Net:
    """Servers started by one test, all closed when it ends."""

    def __init__(self, loop: Loop, tmp: Path) -> None:
        self.loop = loop
        self.tmp = tmp
        self.started: list[Served] = []

    def fake(self, name: str = "fake", **config: object) -> Fake:
        f = Fake(self.loop, name, **config)
        self.started.append(f)
        return f

    def gateway(self, *objects: Mapping[str, Any], namespace: str | None = None, **options: Any) -> GatewayServer:
        folder = write_policy(self.tmp / f"policy{len(self.started)}", *objects)
        g = GatewayServer(self.loop, folder, namespace, **options)
        self.started.append(g)
        return g

    def close(self) -> None:
        for s in reversed(self.started):
            with contextlib.suppress(Exception):
                s.close()


@pytest.fixture
def net(aio: Loop, tmp_path: Path) -> Iterator[Net]:
    n = Net(aio, tmp_path)
    yield n
    n.close()


TIERWISE = [sys.executable, "-m", "tierwise_cli"]
Launch = Callable[..., tuple[subprocess.Popen[bytes], str]]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """Start a `tierwise` command on a free port and wait until its /readyz says 200; kill it after."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        log_path = tmp_path / f"proc{len(procs)}.log"
        with log_path.open("wb") as log:
            p = subprocess.Popen([*TIERWISE, *args, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
        procs.append(p)
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{args[0]} to be ready", lambda: _ready(url) or p.poll() is not None, timeout=30)
        assert p.poll() is None, log_path.read_text()
        return p, url

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)
