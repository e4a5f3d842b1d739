#!/usr/bin/env python3
"""A real Kubernetes control plane on loopback, from binaries built by hack/build-tools.sh.

etcd and kube-apiserver always; kube-controller-manager, kube-scheduler and kwok (simulated nodes,
so Deployments get Running pods) with --nodes. Certificates and the service-account key are
generated per cluster. Where binaries come from, in order: $KUBEBUILDER_ASSETS or
$TIERWISE_BIN_DIR (a folder holding them), else hack/build-tools.sh (builds once, then cached).
With $TIERWISE_KUBECONFIG set nothing is started: that existing cluster (e.g. kind) is used.

    python hack/localcluster.py up [--nodes]   start in the background, print `export KUBECONFIG=...`
    python hack/localcluster.py kubeconfig     print the kubeconfig path of the running cluster
    python hack/localcluster.py status         say what runs
    python hack/localcluster.py down           stop everything it started and remove its files
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustercerts import SERVICE_CIDR, kubeconfig_for, write_certs

ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = Path(os.environ.get("TIERWISE_CLUSTER_STATE", ROOT / ".tierwise" / "cluster"))
POD_CIDR = "10.244.0.0/16"
KWOK_NODE = "kwok-node-0"


class ClusterError(RuntimeError):
    pass


# ---------------------------------------------------------------- binaries


def binaries() -> Path:
    """The folder holding etcd, kube-apiserver, kubectl, ... (building them if needed)."""
    for var in ("KUBEBUILDER_ASSETS", "TIERWISE_BIN_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "build-tools.sh")], check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])


def tool(name: str) -> str:
    """Path of a tool: from the binaries folder, else from PATH (kubectl/helm of a laptop)."""
    path = binaries() / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise ClusterError(f"{name} not found in {binaries()} nor on PATH")
    return found


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # A test run that is killed must not leave a control plane behind.
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Cluster:
    """A running control plane (or an existing cluster reached through a kubeconfig)."""

    kubeconfig: Path
    workdir: Path | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    nodes: bool = False

    @property
    def server(self) -> str:
        return str(json.loads(self.kubeconfig.read_text())["clusters"][0]["cluster"]["server"])

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; on failure with check=True the error says what kubectl said."""
        cmd = [tool("kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def _spawn(self, name: str, argv: Sequence[str], detach: bool) -> None:
        assert self.workdir is not None
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child from here on
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=None if detach else _die_with_parent,  # noqa: PLW1509 - no threads run yet
        )
        log.close()
        self.processes[name] = proc
        self.pids[name] = proc.pid

    def _check_alive(self, name: str) -> None:
        proc = self.processes.get(name)
        if proc is not None and proc.poll() is not None:
            assert self.workdir is not None
            tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
            raise ClusterError(f"{name} exited with {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        """Stop every process this cluster started, newest first; nothing is left running."""
        for name in reversed(list(self.pids)):
            _terminate(self.pids[name], self.processes.get(name))
        self.processes.clear()
        self.pids.clear()


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, and SIGKILL if it has not exited after `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _terminate(pid: int, proc: subprocess.Popen[bytes] | None) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return
        elif not _alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait(5)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (FileNotFoundError, IndexError):
        return False
    return status != "Z"


def _wait(what: str, probe: Any, timeout: float, cluster: Cluster, name: str) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        cluster._check_alive(name)
        try:
            if probe():
                return
        except Exception as e:
            last = e
        time.sleep(0.1)
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}: {last}")


def _https_ok(url: str, certs: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    ctx.load_cert_chain(str(certs / "admin.crt"), str(certs / "admin.key"))
    with urllib.request.urlopen(url, context=ctx, timeout=2) as r:
        return bool(r.status == 200)


def start(workdir: Path | None = None, nodes: bool = False, audit: bool = False, detach: bool = False) -> Cluster:
    """Start etcd and kube-apiserver (and with `nodes` the controller-manager, scheduler and kwok).

    With $TIERWISE_KUBECONFIG set, return that cluster instead and start nothing.
    """
    if os.environ.get("TIERWISE_KUBECONFIG"):
        return Cluster(kubeconfig=Path(os.environ["TIERWISE_KUBECONFIG"]), nodes=nodes)
    bins = binaries()
    wd = workdir or Path(tempfile.mkdtemp(prefix="tierwise-cluster-"))
    wd.mkdir(parents=True, exist_ok=True)
    certs = wd / "certs"
    write_certs(certs)
    etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
    server = f"https://127.0.0.1:{api_port}"
    kubeconfig = wd / "kubeconfig"
    kubeconfig.write_text(kubeconfig_for(server, certs))
    kubeconfig.chmod(0o600)
    cluster = Cluster(kubeconfig=kubeconfig, workdir=wd, nodes=nodes)
    try:
        cluster._spawn(
            "etcd",
            [
                str(bins / "etcd"),
                f"--data-dir={wd / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync",  # a throwaway test store: durability costs seconds per test
                "--log-level=warn",
            ],
            detach,
        )
        api = [
            str(bins / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
            f"--cert-dir={certs}",
            f"--tls-cert-file={certs / 'apiserver.crt'}",
            f"--tls-private-key-file={certs / 'apiserver.key'}",
            f"--client-ca-file={certs / 'ca.crt'}",
            f"--service-account-key-file={certs / 'sa.pub'}",
            f"--service-account-signing-key-file={certs / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
            "--profiling=false",
        ]
        if not nodes:
            # Without the controller-manager no default ServiceAccount is ever created.
            api.append("--disable-admission-plugins=ServiceAccount")
        if audit:
            policy = wd / "audit-policy.yaml"
            policy.write_text(
                "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n"
                "- level: Metadata\n  verbs: [create, update, patch, delete, deletecollection]\n- level: None\n"
            )
            api += [f"--audit-policy-file={policy}", f"--audit-log-path={wd / 'audit.log'}"]
        cluster._spawn("kube-apiserver", api, detach)
        _wait("kube-apiserver /readyz", lambda: _https_ok(f"{server}/readyz", certs), 90, cluster, "kube-apiserver")
        if nodes:
            _start_node_components(cluster, bins, certs, detach)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _start_node_components(cluster: Cluster, bins: Path, certs: Path, detach: bool) -> None:
    kc = str(cluster.kubeconfig)
    auth = [f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}", "--bind-address=127.0.0.1"]
    cluster._spawn(
        "kube-controller-manager",
        [
            str(bins / "kube-controller-manager"),
            f"--kubeconfig={kc}",
            *auth,
            f"--secure-port={free_port()}",
            "--leader-elect=false",
            f"--service-account-private-key-file={certs / 'sa.key'}",
            f"--root-ca-file={certs / 'ca.crt'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--use-service-account-credentials=false",
            # kwok's simulated node has no kubelet that can really fail; on two busy cores (or a
            # paused VM) its heartbeat can lag past the default 50 s, and the node controller then
            # marks every pod NotReady for good. Tests that need a node to fail delete it instead.
            "--node-monitor-grace-period=10m",
        ],
        detach,
    )
    cluster._spawn(
        "kube-scheduler",
        [
            str(bins / "kube-scheduler"),
            f"--kubeconfig={kc}",
            *auth,
            f"--secure-port={free_port()}",
            "--leader-elect=false",
        ],
        detach,
    )
    cluster._spawn(
        "kwok",
        [
            str(bins / "kwok"),
            f"--kubeconfig={kc}",
            f"--config={ROOT / 'hack' / 'kwok-stages.yaml'}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--cidr={POD_CIDR}",
            "--node-ip=10.240.0.1",
            # Renew the simulated node's Lease, as a kubelet would; without it the node controller
            # marks the node and its pods NotReady once the grace period passes.
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{free_port()}",
        ],
        detach,
    )
    cluster.kubectl("apply", "-f", "-", input=json.dumps(_fake_node()))
    _wait(
        "the default ServiceAccount",
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0,
        60,
        cluster,
        "kube-controller-manager",
    )
    _wait(
        f"node {KWOK_NODE} Ready",
        lambda: (
            "True"
            in cluster.kubectl(
                "get", "node", KWOK_NODE, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False
            ).stdout
        ),
        60,
        cluster,
        "kwok",
    )


def _fake_node() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": KWOK_NODE,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"type": "kwok", "kubernetes.io/hostname": KWOK_NODE, "kubernetes.io/os": "linux"},
        },
        "status": {
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "500", "nvidia.com/gpu": "16"},
            "capacity": {"cpu": "64", "memory": "256Gi", "pods": "500", "nvidia.com/gpu": "16"},
        },
    }


# ---------------------------------------------------------------- shell interface


def _save(cluster: Cluster) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    (STATE_DIR / "state.json").write_text(
        json.dumps({"kubeconfig": str(cluster.kubeconfig), "workdir": str(cluster.workdir), "pids": cluster.pids})
    )


def _load() -> dict[str, Any] | None:
    f = STATE_DIR / "state.json"
    return json.loads(f.read_text()) if f.exists() else None


def down() -> bool:
    """Stop a cluster started with `up`. Returns whether there was one."""
    state = _load()
    if state is None:
        return False
    for name, pid in reversed(list(state["pids"].items())):
        cmdline = Path(f"/proc/{pid}/cmdline")
        # Only signal a pid that is still the binary we started (pids get reused).
        if cmdline.exists() and name in cmdline.read_bytes().decode(errors="replace"):
            _terminate(pid, None)
    shutil.rmtree(state["workdir"], ignore_errors=True)
    (STATE_DIR / "state.json").unlink()
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a control plane in the background")
    up.add_argument("--nodes", action="store_true", help="also controller-manager, scheduler and kwok")
    up.add_argument("--audit", action="store_true", help="write an audit log of API writes")
    sub.add_parser("down", help="stop it")
    sub.add_parser("kubeconfig", help="print its kubeconfig path")
    sub.add_parser("status", help="say whether one runs")
    args = p.parse_args(argv)
    if args.cmd == "up":
        if _load() is not None:
            down()
        t0 = time.monotonic()
        cluster = start(STATE_DIR / "run", nodes=args.nodes, audit=args.audit, detach=True)
        _save(cluster)
        print(f"# control plane up in {time.monotonic() - t0:.1f}s at {cluster.server}", file=sys.stderr)
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        return 0
    if args.cmd == "down":
        print("stopped" if down() else "no cluster was running")
        return 0
    state = _load()
    if state is None:
        print("no cluster is running (start one with: python hack/localcluster.py up)", file=sys.stderr)
        return 1
    if args.cmd == "kubeconfig":
        print(state["kubeconfig"])
    else:
        alive = {n: _alive(pid) for n, pid in state["pids"].items()}
        print(json.dumps({"kubeconfig": state["kubeconfig"], "running": alive}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


class ServerProcess:
    """A test server's process (Redis, PostgreSQL): killed as a crash, or stopped gracefully."""

    process: subprocess.Popen[bytes] | None

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing flushed beyond what the server had already made durable."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None
