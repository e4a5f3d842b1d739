"""A real Redis on loopback with a temporary data dir (Debian's redis-server), for tests and
benchmarks: stopped, killed and started again on the same port and data, as an outage would.

The append-only file is fsynced on every write (`appendfsync always`), as a budget store should
be run: a Redis killed and restarted keeps every settle it acknowledged.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from localcluster import ServerProcess, free_port


@dataclass
class Redis(ServerProcess):
    workdir: Path
    port: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    # Extra server arguments (a cluster node's, say).
    extra: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (hack/setup.sh installs the Debian package)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.workdir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "yes",
             "--daemonize", "no", *self.extra],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start; see {self.workdir / 'redis.log'}")
            time.sleep(0.05)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


def start_redis(workdir: Path, port: int | None = None) -> Redis:
    r = Redis(workdir, port or free_port())
    r.start()
    return r


@dataclass
class RedisCluster:
    """Masters of one Redis Cluster on loopback, every slot assigned, no replicas."""

    nodes: list[Redis]

    @property
    def url(self) -> str:
        """Any node's address: a cluster client learns the others from it."""
        return self.nodes[0].url

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def _cluster_ok(port: int) -> bool:
    r = subprocess.run(["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True, text=True,
                       timeout=10, check=False)  # fmt: skip
    return "cluster_state:ok" in r.stdout


def start_redis_cluster(workdir: Path, masters: int = 3, timeout: float = 30.0) -> RedisCluster:
    nodes: list[Redis] = []
    try:
        for i in range(masters):
            # The cluster bus on a port of its own (by default it is the port + 10000, which a free
            # port near the top of the range would not have).
            bus = ("--cluster-port", str(free_port()))
            extra = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout",
                     "2000", *bus)  # fmt: skip
            node = Redis(workdir / f"node{i}", free_port(), extra=extra)
            node.start()
            nodes.append(node)
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-replicas", "0",
             "--cluster-yes"],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not all(_cluster_ok(n.port) for n in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)
    except BaseException:
        for n in nodes:
            n.stop()
        raise
    return RedisCluster(nodes)
