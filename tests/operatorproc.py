"""`tierwise operator` as a real process against the test cluster: started, probed, killed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from localcluster import Cluster, free_port

ROOT = Path(__file__).resolve().parent.parent


class OperatorProcess:
    def __init__(self, cluster: Cluster, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.args = args
        self.env = env or {}  # more environment (libfaketime's, say)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "operator.log"
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self, wait: bool = True) -> OperatorProcess:
        cmd = [
            sys.executable, "-m", "tierwise_cli", "operator",
            "--kubeconfig", str(self.cluster.kubeconfig),
            "--health-port", str(self.port),
            *self.args,
        ]  # fmt: skip
        env = {**os.environ, "TIERWISE_HEALTH_HOST": "127.0.0.1", **self.env}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if wait:
            self.wait_ready()
        return self

    def _get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""
        except OSError:
            return 0, ""

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self._get("/readyz")[0] != 200:
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"operator not ready; log:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples matching the labels (0 if none)."""
        _, text = self._get("/metrics")
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"^{name}(?:{{(.*)}})? (\S+)$", line)
            if not m:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def writes(self) -> float:
        return self.metric("tierwise_operator_api_writes_total")

    def idle(self) -> bool:
        return self.metric("tierwise_operator_queue_depth") == 0

    def kill(self) -> None:
        """SIGKILL: no chance to finish anything in flight."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode
