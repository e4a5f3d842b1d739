"""Operator benchmark: apply-to-ready latency, a 500-tier reconcile, and writes while idle.

Starts its own control plane (hack/localcluster.py: etcd, kube-apiserver with an audit log,
controller-manager, scheduler and kwok's simulated node), installs the CRDs, runs `tierwise
operator` as a subprocess and measures, in one run:

1. latency: N times, a fresh InferenceTier (one self-hosted backend, one external) applied with a
   server-side apply; time until its status says Ready=True for the current generation, and until
   its status counts the Deployment's replica as ready (the whole chain: operator -> Deployment
   controller -> scheduler -> kwok -> operator);
2. scale: 50 namespaces x 10 tiers (half self-hosted, half external only) in one `kubectl apply
   --server-side`; time until every tier is Ready and the operator is idle, its peak RSS and the
   API writes that took;
3. idle: the operator's write counter and the API server's audit log over an idle minute.

    .venv/bin/python bench/run_operator.py            # 20 latency runs, 500 tiers, 60 s idle; ~3.5 min
    .venv/bin/python bench/run_operator.py --quick    # 5 runs, 100 tiers, 20 s idle; ~1.5 min
    .venv/bin/python bench/run_operator.py --json out.json

See bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import datetime
import http.client
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import procstat

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TIERWISE = ROOT / ".venv" / "bin" / "tierwise"
sys.path.insert(0, str(ROOT / "hack"))

import localcluster  # noqa: E402  (hack/ is not a package)

TIER_API = "/apis/tierwise.dev/v1alpha1"
INJECTION_LABEL = "tierwise.dev/injection"
TIER_LABEL = "tierwise.dev/tier"
POLICY_CONFIGMAP = "tierwise-policy"
OPERATOR_AGENT = "tierwise-operator"
BENCH_AGENT = "tierwise-bench"
HEARTBEAT_AGENT = "tierwise-bench-node-heartbeat"
KOPF_AGENT = "kopf/"
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
LATENCY_NS = "bench-latency"
SCALE_NS = "bench-{}"
MODEL_IMAGE = "vllm/vllm-openai:v0.11.0"


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------- manifests


def self_hosted_backend() -> dict[str, Any]:
    return {
        "name": "llama",
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "deployment": {
            "image": MODEL_IMAGE,
            "args": ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--max-model-len", "16384"],
            "port": 8000,
            "replicas": {"min": 1, "max": 2},
        },
        "pricing": {"inputPerMillion": 0.05, "outputPerMillion": 0.15},
        "capabilities": {"maxContextTokens": 16384, "strength": 45},
    }


def external_backend() -> dict[str, Any]:
    return {
        "name": "openai",
        "model": "gpt-4o-mini",
        "url": "https://api.openai.com/v1",
        "apiKeySecretRef": {"name": "openai", "key": "api-key"},
        "pricing": {"inputPerMillion": 0.15, "outputPerMillion": 0.6},
        "capabilities": {"maxContextTokens": 128000, "strength": 70},
    }


def tier(namespace: str, name: str, *, self_hosted: bool, external: bool) -> dict[str, Any]:
    backends = ([self_hosted_backend()] if self_hosted else []) + ([external_backend()] if external else [])
    return {
        "apiVersion": "tierwise.dev/v1alpha1",
        "kind": "InferenceTier",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"description": "operator benchmark", "backends": backends},
    }


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def scale_documents(namespaces: int, per_namespace: int) -> tuple[list[dict[str, Any]], dict[tuple[str, str], bool]]:
    """Namespaces first, then their tiers; the first namespace has sidecar injection enabled.
    Returns the documents and {(namespace, tier): self-hosted}."""
    docs: list[dict[str, Any]] = []
    expected: dict[tuple[str, str], bool] = {}
    for i in range(namespaces):
        ns = SCALE_NS.format(i)
        docs.append(namespace(ns, {INJECTION_LABEL: "enabled"} if i == 0 else None))
    for i in range(namespaces):
        ns = SCALE_NS.format(i)
        for j in range(per_namespace):
            hosted = j % 2 == 0  # tier-0, tier-2, ...: one self-hosted backend; the others: external only
            docs.append(tier(ns, f"tier-{j}", self_hosted=hosted, external=not hosted))
            expected[(ns, f"tier-{j}")] = hosted
    return docs, expected


# ---------------------------------------------------------------------------------------- API access


class Api:
    """A bare HTTPS client for the API server, authenticated with the kubeconfig's client certificate."""

    def __init__(self, kubeconfig: Path, tmp: Path) -> None:
        cfg = json.loads(kubeconfig.read_text())
        url = urllib.parse.urlsplit(cfg["clusters"][0]["cluster"]["server"])
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 443
        user = cfg["users"][0]["user"]
        d = tmp / "api-client"
        d.mkdir(mode=0o700, exist_ok=True)
        files = {}
        for key, fname in (
            ("certificate-authority-data", "ca.crt"),
            ("client-certificate-data", "client.crt"),
            ("client-key-data", "client.key"),
        ):
            src = cfg["clusters"][0]["cluster"] if key.startswith("certificate-authority") else user
            path = d / fname
            path.write_bytes(base64.b64decode(src[key]))
            path.chmod(0o600)
            files[fname] = path
        self.ctx = ssl.create_default_context(cafile=str(files["ca.crt"]))
        self.ctx.load_cert_chain(str(files["client.crt"]), str(files["client.key"]))

    def connect(self, timeout: float | None = 30) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        agent: str = BENCH_AGENT,
    ) -> dict[str, Any]:
        conn = self.connect()
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Accept": "application/json", "User-Agent": agent}
            if data is not None:
                headers["Content-Type"] = content_type
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        if not 200 <= resp.status < 300:
            raise BenchError(f"{method} {path}: HTTP {resp.status}: {raw[:300].decode(errors='replace')}")
        return dict(json.loads(raw)) if raw else {}

    def apply(self, obj: dict[str, Any], collection: str, agent: str = BENCH_AGENT) -> dict[str, Any]:
        """Server-side apply (what `kubectl apply --server-side` sends), without kubectl's start-up."""
        query = urllib.parse.urlencode({"fieldManager": agent, "force": "true"})
        path = f"{collection}/{obj['metadata']['name']}?{query}"
        return self.request("PATCH", path, obj, "application/apply-patch+yaml", agent)


class NodeHeartbeat(threading.Thread):
    """Renews the simulated node's Lease every 10 s, as a kubelet would.

    kwok runs here without --node-lease-duration-seconds and hack/kwok-stages.yaml has no
    heartbeat stage, so nothing renews the node: once the controller-manager's
    --node-monitor-grace-period is over (50 s by default; hack/localcluster.py now passes 10m) it
    marks the node NotReady and every pod on it not ready; kwok makes the node Ready again but never
    the pods, so every self-hosted tier loses its replicas. The benchmark keeps the node alive
    itself, whatever the grace period (these writes carry their own user agent)."""

    def __init__(self, api: Api, node: str, every: float = 10.0) -> None:
        super().__init__(daemon=True, name="node heartbeat")
        self.api, self.node, self.every = api, node, every
        self.renewals = 0
        self.error: str | None = None
        self._stopping = threading.Event()

    def beat(self) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.node, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": self.node, "leaseDurationSeconds": 40, "renewTime": now},
        }
        self.api.apply(lease, "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", HEARTBEAT_AGENT)
        self.renewals += 1

    def run(self) -> None:
        while not self._stopping.wait(self.every):
            try:
                self.beat()
            except (OSError, http.client.HTTPException, BenchError) as e:
                self.error = f"{type(e).__name__}: {e}"

    def stop(self) -> None:
        self._stopping.set()


Handler = Callable[[float, str, dict[str, Any]], None]


class Watcher(threading.Thread):
    """List, then watch one collection, calling `handler(monotonic time, event type, object)` for
    every object listed ("SYNC") and every event; re-lists when the watch expires."""

    def __init__(self, api: Api, path: str, handler: Handler) -> None:
        super().__init__(daemon=True, name=f"watch {path}")
        self.api = api
        self.path = path
        self.handler = handler
        self.synced = threading.Event()
        self.error: str | None = None
        self._stopping = threading.Event()
        self._conn: http.client.HTTPSConnection | None = None

    def stop(self) -> None:
        self._stopping.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._list_and_watch()
            except (OSError, http.client.HTTPException, ValueError, BenchError) as e:
                if self._stopping.is_set():
                    return
                self.error = f"{type(e).__name__}: {e}"
                time.sleep(0.2)

    def _list_and_watch(self) -> None:
        listed = self.api.request("GET", self.path)
        now = time.monotonic()
        for item in listed.get("items", []):
            self.handler(now, "SYNC", item)
        self.synced.set()
        rv = listed["metadata"]["resourceVersion"]
        while not self._stopping.is_set():
            query = urllib.parse.urlencode(
                {"watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true", "timeoutSeconds": "600"}
            )
            self._conn = conn = self.api.connect(timeout=None)
            sep = "&" if "?" in self.path else "?"
            try:
                conn.request("GET", f"{self.path}{sep}{query}", headers={"Accept": "application/json"})
                resp = conn.getresponse()
                if resp.status != 200:
                    raise BenchError(f"watch {self.path}: HTTP {resp.status}")
                while True:
                    line = resp.readline()
                    if not line:
                        break  # the server ended the watch: carry on from rv
                    event = json.loads(line)
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        return  # e.g. 410 Gone: list again
                    rv = obj["metadata"]["resourceVersion"]
                    if kind != "BOOKMARK":
                        self.handler(time.monotonic(), kind, obj)
            finally:
                self._conn = None
                conn.close()


def ready_condition(obj: dict[str, Any]) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return dict(c)
    return None


class Tiers:
    """Per tier, the first moment each milestone was seen on the watch (monotonic seconds)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seen: dict[tuple[str, str], dict[str, float]] = {}
        self.events = 0

    def on_event(self, t: float, kind: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        with self.cond:
            self.events += 1
            if kind == "DELETED":
                self.seen.pop(key, None)
                return
            marks = self.seen.setdefault(key, {})
            generation = meta.get("generation")
            status = obj.get("status") or {}
            current = status.get("observedGeneration") == generation
            ready = ready_condition(obj)
            if ready and ready.get("status") == "True" and ready.get("observedGeneration") == generation and current:
                marks.setdefault("ready", t)
            elif "ready" in marks and not (ready and ready.get("status") == "True"):
                marks["unready_again"] = t  # should never happen in this benchmark
            if current and int(status.get("readyReplicas") or 0) >= 1:
                marks.setdefault("replicas", t)
            self.cond.notify_all()

    def wait(self, keys: list[tuple[str, str]], marks: tuple[str, ...], deadline: float) -> bool:
        with self.cond:
            while True:
                if all(all(m in self.seen.get(k, {}) for m in marks) for k in keys):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 1.0))

    def missing(self, keys: list[tuple[str, str]], mark: str) -> list[tuple[str, str]]:
        with self.cond:
            return [k for k in keys if mark not in self.seen.get(k, {})]


class Deployments:
    """Per tier (by label), when its first Deployment appeared and when it had a ready replica."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[tuple[str, str], dict[str, float]] = {}

    def on_event(self, t: float, kind: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        owner = (meta.get("labels") or {}).get(TIER_LABEL)
        if owner is None or kind == "DELETED":
            return
        with self.lock:
            marks = self.seen.setdefault((meta["namespace"], owner), {})
            marks.setdefault("created", t)
            if int((obj.get("status") or {}).get("readyReplicas") or 0) >= 1:
                marks.setdefault("available", t)

    def get(self, key: tuple[str, str]) -> dict[str, float]:
        with self.lock:
            return dict(self.seen.get(key, {}))


# ---------------------------------------------------------------------------------------- the operator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class Metrics:
    """The operator's /metrics at one moment."""

    at: float
    writes: dict[tuple[str, str], float]  # (verb, kind) -> count
    reconciles: float
    errors: dict[tuple[str, str], float]
    queue_depth: float | None

    @property
    def total_writes(self) -> float:
        return sum(self.writes.values())

    def activity(self) -> tuple[float, float, float]:
        return self.total_writes, self.reconciles, sum(self.errors.values())


def parse_metrics(text: str, at: float) -> Metrics:
    writes: dict[tuple[str, str], float] = {}
    errors: dict[tuple[str, str], float] = {}
    reconciles, depth = 0.0, None
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))
        if name == "tierwise_operator_api_writes_total":
            writes[(labels.get("verb", ""), labels.get("kind", ""))] = value
        elif name == "tierwise_operator_reconcile_errors_total":
            errors[(labels.get("key", ""), labels.get("error", ""))] = value
        elif name == "tierwise_operator_reconcile_duration_seconds_count":
            reconciles += value
        elif name == "tierwise_operator_queue_depth":
            depth = value
    return Metrics(at, writes, reconciles, errors, depth)


def diff_writes(a: Metrics, b: Metrics) -> dict[str, int]:
    out = {}
    for k in sorted(set(a.writes) | set(b.writes)):
        n = int(b.writes.get(k, 0) - a.writes.get(k, 0))
        if n:
            out[f"{k[0]} {k[1]}"] = n
    return out


@dataclass
class Operator:
    kubeconfig: Path
    log_path: Path
    autoscale_interval: float
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    exited_at: str | None = None  # wall-clock time the process was seen to end, if it did by itself

    def _watch_exit(self) -> None:
        assert self.proc is not None
        self.proc.wait()
        self.exited_at = datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]

    def start(self, timeout: float = 90) -> float:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["TIERWISE_HEALTH_HOST"] = "127.0.0.1"
        env.pop("TIERWISE_PROMETHEUS_URL", None)
        argv = [str(TIERWISE), "operator", "--kubeconfig", str(self.kubeconfig), "--health-port", str(self.port)]
        argv += ["--autoscale-interval", f"{self.autoscale_interval:g}"]
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads run yet)
            )
        threading.Thread(target=self._watch_exit, daemon=True, name="operator exit").start()
        while time.monotonic() - t0 < timeout:
            self.check_alive()
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self._get("/readyz")[0] == 200:
                    return time.monotonic() - t0
            time.sleep(0.1)
        raise BenchError(f"operator not ready after {timeout:.0f} s; log tail:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid  # the console script execs its interpreter: same pid

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise BenchError(f"the operator exited ({code}) at {self.exited_at}; log tail:\n{self.log_tail()}")

    def _get(self, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def metrics(self) -> Metrics:
        self.check_alive()
        status, text = self._get("/metrics")
        if status != 200:
            raise BenchError(f"/metrics: HTTP {status}")
        return parse_metrics(text, time.monotonic())

    def memory(self) -> dict[str, float]:
        """VmHWM (peak) and VmRSS of the operator, in MiB."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(line.split()[1]) / 1024
        return out

    def cpu(self) -> float:
        return procstat.cpu_seconds(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_problems(self) -> dict[str, Any]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return {}
        lines = text.splitlines()
        bad = [ln for ln in lines if " WARNING " in ln or " ERROR " in ln or " CRITICAL " in ln]
        return {
            "lines": len(lines),
            "warnings": sum(" WARNING " in ln for ln in lines),
            "errors": sum(" ERROR " in ln or " CRITICAL " in ln for ln in lines),
            "tracebacks": text.count("Traceback (most recent call last)"),
            "samples": bad[:8],
        }

    def stop(self) -> None:
        if self.proc is None:
            return
        procstat.stop_group(self.proc, grace=15)

    def wait_quiet(self, quiet: float, timeout: float, not_before: float = 0.0) -> tuple[float, Metrics]:
        """Poll /metrics until writes, reconciles and errors have not moved for `quiet` seconds and
        the operator used under 10% of a core meanwhile (no reconcile in flight). Returns the time
        of the last change of a counter (monotonic) and the metrics then."""
        deadline = time.monotonic() + timeout
        m = self.metrics()
        last, last_change = m.activity(), m.at
        window, cpu_at = m.at, self.cpu()
        while True:
            time.sleep(0.2)
            m = self.metrics()
            now = m.at
            if m.activity() != last or (m.queue_depth or 0) > 0:
                last, last_change = m.activity(), now
                window, cpu_at = now, self.cpu()
            elif now - window >= quiet and now >= not_before:
                cpu = self.cpu()
                if (cpu - cpu_at) / (now - window) < 0.1:
                    return last_change, m
                window, cpu_at = now, cpu  # busy without writing (e.g. an autoscaler pass): look again
            if now > deadline:
                raise BenchError(f"the operator did not go quiet within {timeout:.0f} s")


# ---------------------------------------------------------------------------------------- audit log


def audit_offset(path: Path | None) -> int:
    try:
        return path.stat().st_size if path else 0
    except OSError:
        return 0


def _epoch(ts: str) -> float:
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def audit_writes(path: Path | None, offset: int, start: float, end: float) -> dict[str, Any] | None:
    """Write requests in the API server's audit log received in [start, end) (wall clock), by agent."""
    if path is None or not path.exists():
        return None
    by_agent: Counter[str] = Counter()
    operator: Counter[str] = Counter()
    kopf = 0
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            if ev.get("stage") != "ResponseComplete" or ev.get("verb") not in WRITE_VERBS:
                continue
            if not start <= _epoch(ev["requestReceivedTimestamp"]) < end:
                continue
            agent = str(ev.get("userAgent") or "")
            name = re.split(r"[/ ]", agent, maxsplit=1)[0] or "(none)"
            if name == "kube-controller-manager":  # its user agent ends with the controller's name
                name += ":" + agent.rsplit("/", 1)[-1]
            by_agent[name] += 1
            ref = ev.get("objectRef") or {}
            what = f"{ev['verb']} {ref.get('resource', '?')}" + (
                f"/{ref['subresource']}" if ref.get("subresource") else ""
            )
            if agent.startswith(OPERATOR_AGENT):
                operator[what] += 1
            elif agent.startswith(KOPF_AGENT):
                kopf += 1
    return {
        "operator": sum(operator.values()),
        "operator_by_request": dict(operator.most_common()),
        "kopf": kopf,
        "by_agent": dict(by_agent.most_common()),
    }


# ---------------------------------------------------------------------------------------- phases


def nearest_rank(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"p50": nearest_rank(values, 0.5), "p95": nearest_rank(values, 0.95), "max": max(values), "n": len(values)}


@dataclass
class Bench:
    args: argparse.Namespace
    cluster: localcluster.Cluster
    api: Api
    operator: Operator
    tiers: Tiers
    deployments: Deployments
    audit: Path | None

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 600) -> str:
        return self.cluster.kubectl(*args, input=input, timeout=timeout).stdout

    def cpu_snapshot(self) -> tuple[float, float, float]:
        """(monotonic time, machine busy CPU s, CPU s of the benchmark's own processes)."""
        ours = sum(procstat.cpu_seconds(p) for p in self.cluster.pids.values())
        ours += self.operator.cpu() + procstat.cpu_seconds(os.getpid())  # the harness and its reaped kubectls
        return time.monotonic(), procstat.system_cpu_seconds()["busy"], ours

    def load_since(self, snap: tuple[float, float, float]) -> dict[str, float]:
        """Cores busy over the interval: the benchmark's processes, and everything else on the machine."""
        t1, busy1, ours1 = self.cpu_snapshot()
        dt = t1 - snap[0]
        ours = (ours1 - snap[2]) / dt
        return {"ours_cores": ours, "other_cores": (busy1 - snap[1]) / dt - ours}

    def operator_events(self, namespace_prefix: str) -> dict[str, int]:
        """Events the operator posted in matching namespaces, by type and reason."""
        found = self.api.request("GET", "/api/v1/events")
        out: Counter[str] = Counter()
        for ev in found.get("items", []):
            if not ev["metadata"]["namespace"].startswith(namespace_prefix):
                continue
            if (ev.get("reportingComponent") or (ev.get("source") or {}).get("component")) == OPERATOR_AGENT:
                out[f"{ev.get('type')} {ev.get('reason')}"] += int(ev.get("count") or 1)
        return dict(out.most_common())

    # ---------------------------------------------------------------- 1. latency

    def latency(self) -> dict[str, Any]:
        a = self.args
        self.api.request("POST", "/api/v1/namespaces", namespace(LATENCY_NS))
        self.operator.wait_quiet(a.quiet_between, a.timeout)
        snap = self.cpu_snapshot()
        runs = []
        for i in range(a.runs):
            runs.append(self._latency_run(f"lat-{i}"))
            r = runs[-1]
            dep = (r["deployment_created_s"] or 0) * 1000
            print(
                f"  run {i + 1}/{a.runs}: Ready {r['ready_s'] * 1000:4.0f} ms, replica ready in status"
                f" {r['replicas_ready_s'] * 1000:4.0f} ms, Deployment after {dep:4.0f} ms",
                flush=True,
            )
            # The next tier starts on an idle operator (and outside the previous one's burst of events).
            self.operator.wait_quiet(a.quiet_between, a.timeout)
        load = self.load_since(snap)
        events = self.operator_events(LATENCY_NS)
        # Leave the scale run a clean slate: the tiers go (their children by garbage collection), then
        # the namespace; deleting the namespace first has the operator post events into a namespace
        # that is being terminated (refused, and logged as warnings).
        t = time.monotonic()
        self.kubectl("delete", "inferencetiers", "--all", "-n", LATENCY_NS, "--wait=true", "--timeout=300s")
        self.kubectl("delete", "namespace", LATENCY_NS, "--wait=true", "--timeout=300s")
        deleted_s = time.monotonic() - t
        self.operator.wait_quiet(a.quiet, a.timeout)
        summary = latency_summary(runs)
        return {"runs": runs, "summary": summary, "events": events, "cleanup_s": deleted_s, "load": load}

    def _latency_run(self, name: str) -> dict[str, Any]:
        a = self.args
        key = (LATENCY_NS, name)
        doc = tier(LATENCY_NS, name, self_hosted=True, external=True)
        t0 = time.monotonic()
        self.api.apply(doc, f"{TIER_API}/namespaces/{LATENCY_NS}/inferencetiers")
        t_applied = time.monotonic()
        if not self.tiers.wait([key], ("ready", "replicas"), t0 + a.timeout):
            tail = self.operator.log_tail()
            raise BenchError(f"tier {name} not ready after {a.timeout:.0f} s; operator log tail:\n{tail}")
        with self.tiers.cond:
            marks = dict(self.tiers.seen[key])
        dep = self.deployments.get(key)
        return {
            "apply_request_s": t_applied - t0,
            "ready_s": marks["ready"] - t0,
            "replicas_ready_s": marks["replicas"] - t0,
            "deployment_created_s": dep["created"] - t0 if "created" in dep else None,
            "deployment_available_s": dep["available"] - t0 if "available" in dep else None,
        }

    # ---------------------------------------------------------------- 2. scale

    def scale(self) -> dict[str, Any]:
        a = self.args
        docs, expected = scale_documents(a.namespaces, a.tiers_per_namespace)
        keys = sorted(expected)
        manifest = self.args.tmp / "scale.yaml"
        manifest.write_text("".join(f"---\n{json.dumps(d)}\n" for d in docs))
        mem_before = self.operator.memory()
        m0, cpu0 = self.operator.metrics(), self.operator.cpu()
        offset = audit_offset(self.audit)
        snap = self.cpu_snapshot()
        wall0, t0 = time.time(), time.monotonic()
        self.kubectl("apply", "--server-side", "-f", str(manifest), timeout=900)
        applied_s = time.monotonic() - t0
        print(f"  {len(keys)} tiers in {a.namespaces} namespaces applied in {applied_s:.1f} s", flush=True)
        ready_all = self._wait_all_ready(keys, t0, t0 + a.scale_timeout)
        print(f"  all Ready after {ready_all:.1f} s", flush=True)
        idle_at, m_idle = self.operator.wait_quiet(a.quiet, t0 + a.scale_timeout - time.monotonic())
        cpu_idle, mem_idle = self.operator.cpu(), self.operator.memory()
        wall_idle = time.time() - (time.monotonic() - idle_at)
        print(f"  operator idle after {idle_at - t0:.1f} s", flush=True)
        # The built-in autoscaler passes over every tier each --autoscale-interval; let one more pass
        # go by (earlier operators turned Degraded to True on it), then wait for quiet again.
        not_before = time.monotonic() + a.autoscale_interval + 1
        steady_at, m_steady = self.operator.wait_quiet(a.quiet, a.scale_timeout, not_before=not_before)
        cpu_steady, mem_steady = self.operator.cpu(), self.operator.memory()
        wall_steady = time.time() - (time.monotonic() - steady_at)
        load = self.load_since(snap)
        print(f"  steady (after the autoscaler's next pass) after {steady_at - t0:.1f} s", flush=True)
        time.sleep(1.0)  # the audit log's last lines
        with self.tiers.cond:
            unready_again = sum("unready_again" in self.tiers.seen.get(k, {}) for k in keys)
        return {
            "tiers": len(keys),
            "namespaces": a.namespaces,
            "self_hosted": sum(expected.values()),
            "kubectl_apply_s": applied_s,
            "all_ready_s": ready_all,
            "idle_s": idle_at - t0,
            "steady_s": steady_at - t0,
            "writes_until_idle": int(m_idle.total_writes - m0.total_writes),
            "writes_until_idle_by_kind": diff_writes(m0, m_idle),
            "writes_until_steady": int(m_steady.total_writes - m0.total_writes),
            "writes_until_steady_by_kind": diff_writes(m0, m_steady),
            "reconciles_until_idle": int(m_idle.reconciles - m0.reconciles),
            "reconciles_until_steady": int(m_steady.reconciles - m0.reconciles),
            "reconcile_errors": {f"{k[0]} {k[1]}": int(v - m0.errors.get(k, 0)) for k, v in m_steady.errors.items()},
            "audit_until_idle": audit_writes(self.audit, offset, wall0, wall_idle + 0.5),
            "audit_until_steady": audit_writes(self.audit, offset, wall0, wall_steady + 0.5),
            "events": self.operator_events("bench-"),
            "cpu_until_idle_s": cpu_idle - cpu0,
            "cpu_until_steady_s": cpu_steady - cpu0,
            "rss_before_mib": mem_before.get("VmRSS"),
            "hwm_before_mib": mem_before.get("VmHWM"),
            "rss_idle_mib": mem_idle.get("VmRSS"),
            "hwm_mib": mem_steady.get("VmHWM"),
            "rss_steady_mib": mem_steady.get("VmRSS"),
            **self._policy(),
            "running_pods": len(self.api.request("GET", "/api/v1/pods?fieldSelector=status.phase%3DRunning")["items"]),
            "tiers_unready_again": unready_again,
            "milestones": self._milestones(expected, t0),
            "load": load,
        }

    def _milestones(self, expected: dict[tuple[str, str], bool], t0: float) -> dict[str, Any]:
        """When each tier got where, seconds after the apply started: the operator's own pace (external
        tiers, Deployments written) against the rest of the chain (Deployments with a ready replica)."""
        with self.tiers.cond:
            ready = {k: self.tiers.seen[k]["ready"] - t0 for k in expected if "ready" in self.tiers.seen.get(k, {})}
        hosted = [k for k, h in expected.items() if h]
        deps = {k: self.deployments.get(k) for k in hosted}
        created = [d["created"] - t0 for d in deps.values() if "created" in d]
        available = [d["available"] - t0 for d in deps.values() if "available" in d]
        return {
            "external_ready": stats([v for k, v in ready.items() if not expected[k]]),
            "self_hosted_ready": stats([v for k, v in ready.items() if expected[k]]),
            "deployment_created": stats(created),
            "deployment_available": stats(available),
        }

    def _wait_all_ready(self, keys: list[tuple[str, str]], t0: float, deadline: float) -> float:
        last_print = time.monotonic()
        while not self.tiers.wait(keys, ("ready",), min(deadline, time.monotonic() + 10)):
            self.operator.check_alive()
            if time.monotonic() >= deadline:
                missing = self.tiers.missing(keys, "ready")
                raise BenchError(f"{len(missing)} tiers not Ready after {deadline - t0:.0f} s, e.g. {missing[:5]}")
            if time.monotonic() - last_print >= 10:
                left = len(self.tiers.missing(keys, "ready"))
                print(f"  {len(keys) - left}/{len(keys)} Ready after {time.monotonic() - t0:.0f} s", flush=True)
                last_print = time.monotonic()
        with self.tiers.cond:
            return max(self.tiers.seen[k]["ready"] for k in keys) - t0

    def _policy(self) -> dict[str, Any]:
        """Is there a Policy ConfigMap in the injection-enabled namespace, and how many tiers does it hold?"""
        ns = SCALE_NS.format(0)
        try:
            found = self.api.request("GET", f"/api/v1/namespaces/{ns}/configmaps/{POLICY_CONFIGMAP}")
        except BenchError:
            found = {}
        tiers = None
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            tiers = len(json.loads(found["data"]["policy.json"]).get("tiers") or [])
        return {"policy_configmap": bool(found), "policy_tiers": tiers}

    # ---------------------------------------------------------------- 3. idle

    def idle(self) -> dict[str, Any]:
        a = self.args
        m0, cpu0 = self.operator.metrics(), self.operator.cpu()
        offset = audit_offset(self.audit)
        snap = self.cpu_snapshot()
        wall0, t0 = time.time(), time.monotonic()
        events0 = self.tiers.events
        time.sleep(a.idle)
        m1, cpu1 = self.operator.metrics(), self.operator.cpu()
        wall1, elapsed = time.time(), time.monotonic() - t0
        events1 = self.tiers.events
        load = self.load_since(snap)
        time.sleep(1.0)
        audit = audit_writes(self.audit, offset, wall0, wall1)
        per_min = 60.0 / elapsed
        writes = m1.total_writes - m0.total_writes
        return {
            "window_s": elapsed,
            "writes": int(writes),
            "writes_per_min": writes * per_min,
            "writes_by_kind": diff_writes(m0, m1),
            "reconciles": int(m1.reconciles - m0.reconciles),
            "audit": audit,
            "audit_operator_per_min": None if audit is None else audit["operator"] * per_min,
            "audit_kopf_per_min": None if audit is None else audit["kopf"] * per_min,
            "tier_watch_events": events1 - events0,
            "cpu_cores": (cpu1 - cpu0) / elapsed,
            "rss_mib": self.operator.memory().get("VmRSS"),
            "load": load,
        }


def latency_summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    def col(k: str) -> list[float]:
        return [r[k] for r in runs if r.get(k) is not None]

    def between(a: str, b: str) -> list[float]:
        return [r[b] - r[a] for r in runs if r.get(a) is not None and r.get(b) is not None]

    return {
        "ready": stats(col("ready_s")),
        "replicas_ready": stats(col("replicas_ready_s")),
        "apply_request": stats(col("apply_request_s")),
        "deployment_created": stats(col("deployment_created_s")),
        "deployment_chain": stats(between("deployment_created_s", "deployment_available_s")),
        "status_after_available": stats(between("deployment_available_s", "replicas_ready_s")),
    }


# ---------------------------------------------------------------------------------------- report


def ms(s: dict[str, float], k: str) -> str:
    return f"{s[k] * 1000:.0f}" if k in s else "n/a"


def load_line(phase: dict[str, Any]) -> str:
    load = phase.get("load")
    if not load:
        return ""
    return (
        f"CPU during the phase: {load['ours_cores']:.2f} cores by the benchmark (control plane, operator, harness),"
        f" {load['other_cores']:.2f} cores by other work on the machine"
    )


def _counts(d: dict[str, int] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (d or {}).items()) or "none"


def render_latency(lat: dict[str, Any], runs: int) -> list[str]:
    s = lat["summary"]
    out = [
        f"Apply to ready, one tier (one self-hosted + one external backend), {runs} runs, ms (nearest rank):",
        "",
        "| interval | p50 | p95 | max |",
        "|---|---|---|---|",
    ]
    rows = (
        ("apply → Ready=True for the current generation", "ready"),
        ("apply → status counts the Deployment's replica ready (whole chain)", "replicas_ready"),
        ("  apply → Deployment exists (operator's first write)", "deployment_created"),
        ("  Deployment exists → 1 ready replica (controller-manager, scheduler, kwok)", "deployment_chain"),
        ("  1 ready replica → tier status says so (operator)", "status_after_available"),
        ("the server-side apply request itself", "apply_request"),
    )
    for title, k in rows:
        out.append(f"| {title} | {ms(s[k], 'p50')} | {ms(s[k], 'p95')} | {ms(s[k], 'max')} |")
    out += ["", f"Events posted by the operator for these tiers: {_counts(lat.get('events'))}", load_line(lat), ""]
    return out


def render_scale(sc: dict[str, Any], quiet: float) -> list[str]:
    au_i, au_s = sc.get("audit_until_idle") or {}, sc.get("audit_until_steady") or {}
    n = sc["tiers"]
    wi, ws = sc["writes_until_idle"], sc["writes_until_steady"]
    policy = "yes" if sc["policy_configmap"] else "NO"
    if sc.get("policy_tiers") is not None:
        policy += f" ({sc['policy_tiers']} tiers)"
    rss = f"{sc['rss_before_mib']:.0f} / {sc['rss_idle_mib']:.0f} / {sc['rss_steady_mib']:.0f} MiB"
    out = [
        f"Scale: {n} tiers in {sc['namespaces']} namespaces ({sc['self_hosted']} with one self-hosted backend,"
        " the others one external backend), one `kubectl apply --server-side`:",
        "",
        "| metric | value |",
        "|---|---|",
        f"| kubectl apply of every object | {sc['kubectl_apply_s']:.1f} s |",
        f"| apply start → every tier Ready=True | {sc['all_ready_s']:.1f} s |",
        f"| apply start → operator idle (no write, no reconcile for {quiet:g} s) | {sc['idle_s']:.1f} s |",
        f"| apply start → steady (after the autoscaler's next pass) | {sc['steady_s']:.1f} s |",
        f"| operator API writes until idle (/metrics) | {wi} ({wi / n:.1f} per tier) |",
        f"| operator API writes until steady (/metrics) | {ws} ({ws / n:.1f} per tier) |",
        f"| same from the audit log ({OPERATOR_AGENT}), until idle / steady"
        f" | {au_i.get('operator', 'n/a')} / {au_s.get('operator', 'n/a')} |",
        f"| writes by kopf (audit log, kopf/) | {au_s.get('kopf', 'n/a')} |",
        f"| reconciles until idle / steady | {sc['reconciles_until_idle']} / {sc['reconciles_until_steady']} |",
        f"| operator CPU until idle / steady | {sc['cpu_until_idle_s']:.1f} s / {sc['cpu_until_steady_s']:.1f} s |",
        f"| operator peak RSS (VmHWM) | {sc['hwm_mib']:.0f} MiB |",
        f"| operator RSS before / idle / steady | {rss} |",
        f"| Policy ConfigMap in the injection-enabled namespace | {policy} |",
        f"| Running pods at the end | {sc['running_pods']} |",
        "",
        f"Operator writes until steady (/metrics, verb kind): {_counts(sc['writes_until_steady_by_kind'])}",
        f"Operator writes until steady (audit log, verb resource): {_counts(au_s.get('operator_by_request'))}",
        f"Events the operator posted (type reason): {_counts(sc.get('events'))}",
    ]
    ms_ = sc.get("milestones") or {}
    if ms_:
        out += [
            "",
            "When tiers got there, seconds after the apply started:",
            "",
            "| milestone | p50 | p95 | last |",
            "|---|---|---|---|",
        ]
        for title, k in (
            ("external-only tier Ready (the operator alone)", "external_ready"),
            ("Deployment written (the operator)", "deployment_created"),
            ("Deployment has a ready replica (controller-manager, scheduler, kwok)", "deployment_available"),
            ("self-hosted tier Ready (the whole chain)", "self_hosted_ready"),
        ):
            st = ms_.get(k) or {}
            if st:
                out.append(f"| {title} | {st['p50']:.1f} | {st['p95']:.1f} | {st['max']:.1f} |")
        out += ["", f"Every client's writes until steady (audit log): {_counts(au_s.get('by_agent'))}"]
    errs = {k: v for k, v in sc["reconcile_errors"].items() if v}
    if errs:
        out.append(f"Reconcile errors: {_counts(errs)}")
    if sc["tiers_unready_again"]:
        out.append(f"Tiers that went from Ready back to not Ready: {sc['tiers_unready_again']}")
    return [*out, load_line(sc), ""]


def render_idle(idle: dict[str, Any]) -> list[str]:
    au = idle.get("audit") or {}
    audit_rate = idle["audit_operator_per_min"]
    audit = f"{au.get('operator', 'n/a')}" + (f" = {audit_rate:.1f}/min" if audit_rate is not None else "")
    out = [
        f"Idle: {idle['window_s']:.0f} s with nothing changing, scaled to one minute:",
        "",
        "| metric | value |",
        "|---|---|",
        f"| operator writes (/metrics) | {idle['writes']} = {idle['writes_per_min']:.1f}/min |",
        f"| operator writes (audit log, {OPERATOR_AGENT}) | {audit} |",
        f"| kopf writes (audit log, kopf/) | {au.get('kopf', 'n/a')} |",
        f"| reconciles | {idle['reconciles']} |",
        f"| InferenceTier watch events | {idle['tier_watch_events']} |",
        f"| operator CPU | {idle['cpu_cores'] * 100:.1f}% of a core |",
        f"| operator RSS | {idle['rss_mib']:.0f} MiB |",
        f"| every client's writes in the window (audit log) | {_counts(au.get('by_agent'))} |",
    ]
    if idle["writes_by_kind"]:
        out.append(f"Idle writes by kind: {_counts(idle['writes_by_kind'])}")
    return [*out, "", load_line(idle), ""]


def render(res: dict[str, Any], args: argparse.Namespace) -> str:
    out: list[str] = []
    if res.get("latency"):
        out += render_latency(res["latency"], args.runs)
    if res.get("scale"):
        out += render_scale(res["scale"], args.quiet)
    if res.get("idle"):
        out += render_idle(res["idle"])
    env, log = res["env"], res.get("operator_log") or {}
    hb = res.get("node_heartbeat") or {}
    out += [
        f"- CPU: {env['cpu']} ({env['cores']} cores), load average before the run {env['loadavg']}",
        f"- Linux {env['kernel']}, Python {env['python']}, kopf {env.get('kopf', '?')}, Kubernetes"
        f" {env.get('kubernetes', '?')}: etcd, kube-apiserver, controller-manager, scheduler and kwok on this machine",
        f"- operator: `tierwise operator` at commit {env.get('commit', '?')}"
        + (f" with uncommitted changes to {', '.join(env['dirty'])}" if env.get("dirty") else "")
        + f", no Prometheus, --autoscale-interval {args.autoscale_interval:g};"
        f" ready in {res.get('operator_start_s', float('nan')):.1f} s",
        f"- operator log: {log.get('warnings', '?')} warnings, {log.get('errors', '?')} errors,"
        f" {log.get('tracebacks', '?')} tracebacks",
    ]
    out += [f"  - {line[:300]}" for line in log.get("samples", [])]
    if hb:
        out.append(
            f"- node heartbeat: {hb.get('renewals', 0)} Lease renewals by the benchmark"
            + (f" (last error: {hb['error']})" if hb.get("error") else "")
        )
    else:
        out.append("- node heartbeat: off (--no-node-heartbeat)")
    out += [f"- FAILED: {f}" for f in res.get("failures", [])]
    return "\n".join(out)


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "cpu": procstat.cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    with contextlib.suppress(Exception):
        import importlib.metadata

        env["kopf"] = importlib.metadata.version("kopf")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(ROOT)]
        env["commit"] = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, check=False)
        env["commit"] = env["commit"].stdout.decode().strip()
        # What the operator runs is the working tree: say whether it differs from the commit.
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "api", "operator", "crds"], capture_output=True, check=False
        )
        env["dirty"] = [line[3:] for line in dirty.stdout.decode().splitlines()]
    return env


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, help="apply-to-ready measurements (20; --quick: 5)")
    p.add_argument("--namespaces", type=int, help="namespaces of the scale run (50; --quick: 10)")
    p.add_argument("--tiers-per-namespace", type=int, default=10)
    p.add_argument("--idle", type=float, help="seconds of the idle window (60; --quick: 20)")
    p.add_argument("--quiet", type=float, default=3.0, help="no write or reconcile for this long counts as idle")
    p.add_argument("--quiet-between", type=float, default=1.0, help="idle time before each latency run")
    p.add_argument("--autoscale-interval", type=float, default=15.0, help="passed to the operator (its default)")
    p.add_argument("--timeout", type=float, default=120.0, help="limit of one latency run")
    p.add_argument("--scale-timeout", type=float, default=1200.0, help="limit of the scale run")
    p.add_argument(
        "--no-node-heartbeat",
        dest="node_heartbeat",
        action="store_false",
        help="do not renew the kwok node's Lease (the node controller then marks the node and its pods NotReady"
        " once its grace period is over)",
    )
    p.add_argument("--phases", default="latency,scale,idle", help="comma-separated subset of latency,scale,idle")
    p.add_argument("--quick", action="store_true", help="5 runs, 10 namespaces x 10 tiers, 20 s idle")
    p.add_argument("--json", type=Path, help="write every raw result here")
    p.add_argument("--keep-logs", action="store_true", help="keep the cluster's and operator's files")
    args = p.parse_args(argv)
    for name, full, quick in (("runs", 20, 5), ("namespaces", 50, 10), ("idle", 60.0, 20.0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    if set(args.phases) - {"latency", "scale", "idle"}:
        p.error("--phases: latency, scale, idle")
    return args


def _on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_crds(cluster: localcluster.Cluster) -> str:
    """Installs the CRDs; returns the server's version."""
    version = "?"
    with contextlib.suppress(ValueError, KeyError, localcluster.ClusterError):
        version = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    return str(version)


def start_watchers(api: Api, tiers: Tiers, deployments: Deployments) -> list[Watcher]:
    selector = urllib.parse.quote(TIER_LABEL)  # every Deployment that carries a tier label
    watchers = [
        Watcher(api, f"{TIER_API}/inferencetiers", tiers.on_event),
        Watcher(api, f"/apis/apps/v1/deployments?labelSelector={selector}", deployments.on_event),
    ]
    for w in watchers:
        w.start()
    for w in watchers:
        if not w.synced.wait(30):
            raise BenchError(f"{w.name}: not synced ({w.error})")
    return watchers


def run(args: argparse.Namespace, res: dict[str, Any]) -> None:
    # Always a fresh control plane of our own (an existing cluster has neither our audit log nor a clean slate).
    os.environ.pop("TIERWISE_KUBECONFIG", None)
    t = time.monotonic()
    cluster = localcluster.start(args.tmp / "cluster", nodes=True, audit=True)
    watchers: list[Watcher] = []
    op: Operator | None = None
    heartbeat: NodeHeartbeat | None = None
    try:
        res["control_plane_start_s"] = time.monotonic() - t
        print(f"control plane up in {res['control_plane_start_s']:.1f} s", flush=True)
        res["env"]["kubernetes"] = install_crds(cluster)
        kubeconfig = args.tmp / "operator-kubeconfig"
        shutil.copyfile(cluster.kubeconfig, kubeconfig)
        kubeconfig.chmod(0o600)
        # The operator first, while this process runs no thread yet (its start uses a preexec_fn).
        op = Operator(kubeconfig, args.tmp / "operator.log", args.autoscale_interval)
        res["operator_start_s"] = op.start()
        print(f"operator ready in {res['operator_start_s']:.1f} s (pid {op.pid})", flush=True)
        api = Api(cluster.kubeconfig, args.tmp)
        if args.node_heartbeat:
            heartbeat = NodeHeartbeat(api, localcluster.KWOK_NODE)
            heartbeat.beat()
            heartbeat.start()
        tiers, deployments = Tiers(), Deployments()
        watchers = start_watchers(api, tiers, deployments)
        audit = cluster.workdir / "audit.log" if cluster.workdir else None
        bench = Bench(args, cluster, api, op, tiers, deployments, audit)
        if "latency" in args.phases:
            print(f"latency: {args.runs} runs", flush=True)
            res["latency"] = bench.latency()
        if "scale" in args.phases:
            print(f"scale: {args.namespaces} x {args.tiers_per_namespace} tiers", flush=True)
            res["scale"] = bench.scale()
        if "idle" in args.phases:
            print(f"idle: {args.idle:g} s", flush=True)
            res["idle"] = bench.idle()
        res["operator_memory_end"] = op.memory()
    finally:
        if op is not None:
            op.stop()
            res["operator_log"] = op.log_problems()
        if heartbeat is not None:
            heartbeat.stop()
            res["node_heartbeat"] = {"renewals": heartbeat.renewals, "error": heartbeat.error}
        for w in watchers:
            w.stop()
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)
    args.tmp = Path(tempfile.mkdtemp(prefix="tierwise-bench-operator-"))
    res: dict[str, Any] = {"env": environment(), "failures": []}
    started = time.monotonic()
    code = 0
    try:
        run(args, res)
    except KeyboardInterrupt:
        res["failures"].append("interrupted")
        code = 130
    except (BenchError, localcluster.ClusterError, subprocess.SubprocessError, OSError) as e:
        res["failures"].append(f"{type(e).__name__}: {e}")
        code = 1
    res["wall_s"] = time.monotonic() - started
    print()
    print(render(res, args))
    print(f"- wall time {res['wall_s']:.0f} s")
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"settings": settings, **res}, indent=2, default=str) + "\n")
        print(f"- raw results: {args.json}")
    if code or args.keep_logs:
        print(f"- files kept in {args.tmp} (operator.log, cluster/*.log, cluster/audit.log)", file=sys.stderr)
    else:
        shutil.rmtree(args.tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
