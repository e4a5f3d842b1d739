"""Admission webhook benchmark: what `tierwise webhook` adds to admission, as the API server sees it.

Starts its own control plane (hack/localcluster.py: etcd and kube-apiserver only; pods are admitted
and stored, never run), installs the CRDs, runs `tierwise webhook` on loopback with a self-signed
certificate and registers the chart's Mutating/ValidatingWebhookConfigurations with URL client
configs pointing at it. Then, from one keep-alive HTTPS connection authenticated with the
kubeconfig's client certificate:

1. pods: N sequential pod creations in a namespace the mutating webhook does not select, interleaved
   with N in a namespace labelled tierwise.dev/injection=enabled (the API server calls /mutate over
   TLS and stores the injected pod);
2. validation: with 0, 100 and 1000 other InferenceTiers in the cluster (spread over 20 namespaces),
   M sequential server-side dry-run creates of an InferenceTier in a namespace the validating webhook
   does not select, interleaved with M in one it selects (every /validate reads the tier's own
   namespace and the platform namespace fresh, lays them over its watch of the cluster and runs the
   compiler's cross-object check over every tierwise object and namespace);
3. the webhook's peak RSS.

Latency is p50/p95 (nearest rank) per request; CPU per request of the webhook, kube-apiserver + etcd
and this harness is read from /proc before and after each request.

    .venv/bin/python bench/run_webhook.py            # 300 pod pairs, 200 tier pairs per size; ~3 min
    .venv/bin/python bench/run_webhook.py --quick    # 50 and 30; ~1 min
    .venv/bin/python bench/run_webhook.py --json out.json

See bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
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
import time
import urllib.parse
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
SIDECAR = "tierwise-sidecar"
VALIDATE_LABEL = "tierwise-bench/validate"
AGENT = "tierwise-bench-webhook"
POD_NS = {"off": "bench-pods-plain", "on": "bench-pods-inject"}
TIER_NS = {"off": "bench-tiers-plain", "on": "bench-tiers-validated"}
BACKGROUND_NS = "bench-bg-{}"
CONFIG_NAME = "tierwise-bench"
MODES = ("off", "on")
# Processes whose CPU is read around every request.
COMPONENTS = ("webhook", "apiserver", "etcd", "harness")


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------- manifests


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}


def pod(name: str) -> dict[str, Any]:
    """An application pod; annotated so that the injection also sets OPENAI_BASE_URL (the full patch)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "bench"}, "annotations": {"tierwise.dev/openai-base-url": "true"}},
        "spec": {"containers": [{"name": "app", "image": "example/app:1", "ports": [{"containerPort": 8080}]}]},
    }


def tier(ns: str, name: str, fallback: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "description": "webhook benchmark",
        "priority": 10,
        "backends": [
            {
                "name": "openai",
                "model": "gpt-4o-mini",
                "url": "https://api.openai.com/v1",
                "apiKeySecretRef": {"name": "openai", "key": "api-key"},
                "pricing": {"inputPerMillion": 0.15, "outputPerMillion": 0.6},
                "capabilities": {"maxContextTokens": 128000, "strength": 70},
            }
        ],
    }
    if fallback:
        spec["fallback"] = {"tier": fallback}
    return {
        "apiVersion": "tierwise.dev/v1alpha1",
        "kind": "InferenceTier",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def background_tier(i: int, namespaces: int) -> dict[str, Any]:
    """The i-th background tier: round-robin over the namespaces; within a namespace, chains of five
    tiers falling back to the previous one, so the cross-object check resolves references."""
    ns, k = BACKGROUND_NS.format(i % namespaces), i // namespaces
    return tier(ns, f"tier-{k}", f"tier-{k - 1}" if k % 5 else None)


def webhook_configurations(port: int, ca: bytes, timeout: int) -> list[dict[str, Any]]:
    """The chart's two configurations (charts/tierwise/templates/webhook-configurations.yaml), with URL
    client configs on loopback (the API server cannot reach a Service here). The mutating one keeps the
    chart's selectors; the validating one, which in the chart selects every namespace, is limited to
    namespaces labelled tierwise-bench/validate=on, so that requests elsewhere are the baseline. Both
    fail closed, so that a failed or timed-out call shows up as an error here instead of an admission."""
    bundle = base64.b64encode(ca).decode()

    def client(path: str) -> dict[str, Any]:
        return {"url": f"https://127.0.0.1:{port}{path}", "caBundle": bundle}

    common = {
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "matchPolicy": "Equivalent",
        "failurePolicy": "Fail",
        "timeoutSeconds": timeout,
    }
    mutating = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": CONFIG_NAME},
        "webhooks": [
            {
                "name": "inject.tierwise.dev",
                **common,
                "reinvocationPolicy": "Never",
                "clientConfig": client("/mutate"),
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                        "operations": ["CREATE"],
                        "scope": "Namespaced",
                    }
                ],
                "namespaceSelector": {
                    "matchExpressions": [
                        {"key": INJECTION_LABEL, "operator": "In", "values": ["enabled"]},
                        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system"]},
                    ]
                },
                "objectSelector": {
                    "matchExpressions": [{"key": "tierwise.dev/inject", "operator": "NotIn", "values": ["false"]}]
                },
            }
        ],
    }
    validating = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": CONFIG_NAME},
        "webhooks": [
            {
                "name": "validate.tierwise.dev",
                **common,
                "clientConfig": client("/validate"),
                "rules": [
                    {
                        "apiGroups": ["tierwise.dev"],
                        "apiVersions": ["v1alpha1"],
                        "resources": ["inferencetiers", "costbudgets", "cachepolicies"],
                        "operations": ["CREATE", "UPDATE"],
                        "scope": "Namespaced",
                    }
                ],
                "namespaceSelector": {"matchLabels": {VALIDATE_LABEL: "on"}},
            }
        ],
    }
    return [mutating, validating]


# ---------------------------------------------------------------------------------------- API access


class Api:
    """One keep-alive HTTPS connection to the API server with the kubeconfig's client certificate.

    A TLS handshake per request (or kubectl's start-up) would cost more than what is measured; the
    request body is serialised and the answer decoded outside the timed part."""

    def __init__(self, kubeconfig: Path, tmp: Path) -> None:
        cfg = json.loads(kubeconfig.read_text())
        url = urllib.parse.urlsplit(cfg["clusters"][0]["cluster"]["server"])
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 443
        d = tmp / "api-client"
        d.mkdir(mode=0o700, exist_ok=True)
        paths = {}
        for key, fname, src in (
            ("certificate-authority-data", "ca.crt", cfg["clusters"][0]["cluster"]),
            ("client-certificate-data", "client.crt", cfg["users"][0]["user"]),
            ("client-key-data", "client.key", cfg["users"][0]["user"]),
        ):
            path = d / fname
            path.write_bytes(base64.b64decode(src[key]))
            path.chmod(0o600)
            paths[fname] = str(path)
        self.ctx = ssl.create_default_context(cafile=paths["ca.crt"])
        self.ctx.load_cert_chain(paths["client.crt"], paths["client.key"])
        self.conn: http.client.HTTPSConnection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def timed(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, bytes, float]:
        """(status, raw body, seconds from sending the request to having read the whole answer)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json", "User-Agent": AGENT}
        if data is not None:
            headers["Content-Type"] = content_type
        if self.conn is None:
            self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=30)
            self.conn.connect()
        t0 = time.perf_counter()
        try:
            self.conn.request(method, path, body=data, headers=headers)
            resp = self.conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException):
            self.close()  # not retried: a create might have happened; the caller counts an error
            raise
        return resp.status, raw, time.perf_counter() - t0

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        status, raw, _ = self.timed(method, path, body, content_type)
        if not 200 <= status < 300:
            raise BenchError(f"{method} {path}: HTTP {status}: {raw[:300].decode(errors='replace')}")
        return json.loads(raw) if raw else {}

    def apply(self, obj: dict[str, Any], path: str) -> Any:
        query = urllib.parse.urlencode({"fieldManager": AGENT, "force": "true"})
        return self.request("PATCH", f"{path}/{obj['metadata']['name']}?{query}", obj, "application/apply-patch+yaml")


# ---------------------------------------------------------------------------------------- the webhook


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
class WebhookMetrics:
    """The webhook's own counters: admissions answered and the time it spent answering them."""

    answered: dict[str, float] = field(default_factory=dict)  # operation -> answered (any result)
    errors: dict[str, float] = field(default_factory=dict)  # operation -> answered with an error
    seconds: dict[str, float] = field(default_factory=dict)  # operation -> sum of answering times
    reads: dict[str, float] = field(default_factory=dict)  # source (cache, list) -> validations judged on it

    def minus(self, before: WebhookMetrics, op: str) -> tuple[int, int, float]:
        return (
            int(self.answered.get(op, 0) - before.answered.get(op, 0)),
            int(self.errors.get(op, 0) - before.errors.get(op, 0)),
            self.seconds.get(op, 0) - before.seconds.get(op, 0),
        )


@dataclass
class Webhook:
    kubeconfig: Path
    folder: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> float:
        argv = [
            str(TIERWISE), "webhook", "--kubeconfig", str(self.kubeconfig), "--cert-dir", str(self.folder),
            "--self-signed", "127.0.0.1", "--host", "127.0.0.1", "--port", str(self.port),
            "--health-port", str(self.health_port),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["TIERWISE_HEALTH_HOST"] = "127.0.0.1"
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads run in this process)
            )
        while time.monotonic() - t0 < timeout:
            self.check_alive()
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self._get("/readyz")[0] == 200:
                    return time.monotonic() - t0
            time.sleep(0.05)
        raise BenchError(f"webhook not ready after {timeout:.0f} s; log tail:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid  # the console script execs its interpreter: same pid

    def ca(self) -> bytes:
        from tierwise_operator.certs import TRUST_FILE

        return (self.folder / TRUST_FILE).read_bytes()

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise BenchError(f"the webhook exited ({code}); log tail:\n{self.log_tail()}")

    def _get(self, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.health_port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def metrics(self) -> WebhookMetrics:
        self.check_alive()
        status, text = self._get("/metrics")
        if status != 200:
            raise BenchError(f"webhook /metrics: HTTP {status}")
        m = WebhookMetrics()
        for line in text.splitlines():
            found = _METRIC.match(line)
            if not found:
                continue
            name, labels, value = found.group(1), dict(_LABEL.findall(found.group(2) or "")), float(found.group(3))
            op = labels.get("operation", "")
            if name == "tierwise_webhook_admissions_total":
                m.answered[op] = m.answered.get(op, 0) + value
                if labels.get("result") == "error":
                    m.errors[op] = m.errors.get(op, 0) + value
            elif name == "tierwise_webhook_admission_duration_seconds_sum":
                m.seconds[op] = value
            elif name == "tierwise_webhook_cluster_reads_total":
                m.reads[labels.get("source", "")] = value
        return m

    def memory_mib(self) -> dict[str, float]:
        """VmHWM (peak) and VmRSS of the webhook, in MiB."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(line.split()[1]) / 1024
        return out

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
            "warnings": sum(" WARNING " in ln for ln in lines),
            "errors": sum(" ERROR " in ln or " CRITICAL " in ln for ln in lines),
            "tracebacks": text.count("Traceback (most recent call last)"),
            "samples": bad[:5],
        }

    def stop(self) -> None:
        if self.proc is not None:
            procstat.stop_group(self.proc, grace=10)


# ---------------------------------------------------------------------------------------- measuring


def nearest_rank(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


@dataclass
class Series:
    """The measured requests of one mode (webhook not called / called) of one phase."""

    latencies: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0.0))
    errors: list[str] = field(default_factory=list)
    wrong: int = 0  # answered, but not as expected (e.g. a pod not injected where it should be)

    def summary(self) -> dict[str, Any]:
        n = len(self.latencies)
        out: dict[str, Any] = {"n": n, "errors": len(self.errors), "wrong": self.wrong}
        if n:
            out.update(
                p50=nearest_rank(self.latencies, 0.5),
                p95=nearest_rank(self.latencies, 0.95),
                p99=nearest_rank(self.latencies, 0.99),
                max=max(self.latencies),
                mean=sum(self.latencies) / n,
                cpu_per_request={k: v / n for k, v in self.cpu.items()},
            )
        if self.errors:
            out["error_samples"] = self.errors[:3]
        return out


class Bench:
    def __init__(self, args: argparse.Namespace, cluster: localcluster.Cluster, api: Api, webhook: Webhook) -> None:
        self.args = args
        self.cluster = cluster
        self.api = api
        self.webhook = webhook
        self.pids = {
            "webhook": webhook.pid,
            "apiserver": cluster.pids["kube-apiserver"],
            "etcd": cluster.pids["etcd"],
            "harness": os.getpid(),
        }
        self.background = 0  # background tiers created so far

    def cpu(self) -> dict[str, float]:
        return {name: procstat.cpu_seconds(pid) for name, pid in self.pids.items()}

    def snapshot(self) -> tuple[float, float, float, float]:
        """(monotonic time, machine busy CPU s, steal s, CPU s of the benchmark's own processes)."""
        system = procstat.system_cpu_seconds()
        return time.monotonic(), system["busy"], system["steal"], sum(self.cpu().values())

    @staticmethod
    def load_since(snap: tuple[float, float, float, float], now: tuple[float, float, float, float]) -> dict[str, float]:
        """Cores used over the interval by the benchmark's processes, by everything else, and taken by
        the hypervisor (steal: this VM wanted to run and could not)."""
        dt = now[0] - snap[0]
        ours = (now[3] - snap[3]) / dt
        return {
            "ours_cores": ours,
            "other_cores": (now[1] - snap[1]) / dt - ours,
            "steal_cores": (now[2] - snap[2]) / dt,
        }

    def measure(self, series: Series | None, method: str, path: str, body: Any) -> dict[str, Any] | None:
        """One request; its latency and the CPU each component used meanwhile go into `series`
        (None: a warm-up). Returns the decoded answer, None on an error."""
        before = self.cpu()
        try:
            status, raw, elapsed = self.api.timed(method, path, body)
        except (OSError, http.client.HTTPException) as e:
            if series is not None:
                series.errors.append(f"{type(e).__name__}: {e}")
            return None
        after = self.cpu()
        if status != 201:
            if series is not None:
                series.errors.append(f"HTTP {status}: {raw[:300].decode(errors='replace')}")
            return None
        if series is not None:
            series.latencies.append(elapsed)
            for k in COMPONENTS:
                series.cpu[k] += after[k] - before[k]
        return dict(json.loads(raw))

    def wait_until(self, what: str, probe: Any, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.webhook.check_alive()
            if probe():
                return
            time.sleep(0.2)
        raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}; webhook log:\n{self.webhook.log_tail()}")

    # ------------------------------------------------------------------------------ set-up

    def setup(self) -> None:
        a = self.args
        for ns, labels in (
            (POD_NS["off"], {}),
            (POD_NS["on"], {INJECTION_LABEL: "enabled"}),
            (TIER_NS["off"], {}),
            (TIER_NS["on"], {VALIDATE_LABEL: "on"}),
            *((BACKGROUND_NS.format(i), {}) for i in range(a.namespaces)),
        ):
            self.api.request("POST", "/api/v1/namespaces", namespace(ns, labels))
        # The tier the measured ones fall back to, in both namespaces (before the webhook is registered).
        for ns in TIER_NS.values():
            self.api.request("POST", f"{TIER_API}/namespaces/{ns}/inferencetiers", tier(ns, "base"))
        for config in webhook_configurations(self.webhook.port, self.webhook.ca(), a.webhook_timeout):
            kind = config["kind"].lower() + "s"
            self.api.request("POST", f"/apis/admissionregistration.k8s.io/v1/{kind}", config)

        # The API server learns of new configurations through an informer: wait until both are called.
        def injects() -> bool:
            path = f"/api/v1/namespaces/{POD_NS['on']}/pods?dryRun=All"
            got = self.measure(None, "POST", path, pod(f"probe-{time.monotonic_ns()}"))
            return got is not None and injected(got)

        def validates() -> bool:
            before = self.webhook.metrics().answered.get("validate", 0)
            path = f"{TIER_API}/namespaces/{TIER_NS['on']}/inferencetiers?dryRun=All"
            self.measure(None, "POST", path, tier(TIER_NS["on"], f"probe-{time.monotonic_ns()}", "base"))
            return self.webhook.metrics().answered.get("validate", 0) > before

        self.wait_until("the API server calling /mutate", injects)
        self.wait_until("the API server calling /validate", validates)

    def grow_background(self, target: int) -> float:
        """Create background tiers (outside every selected namespace: the webhook is not called) until
        there are `target`; returns the seconds it took."""
        t0 = time.monotonic()
        while self.background < target:
            doc = background_tier(self.background, self.args.namespaces)
            self.api.request("POST", f"{TIER_API}/namespaces/{doc['metadata']['namespace']}/inferencetiers", doc)
            self.background += 1
        listed = self.api.request("GET", f"{TIER_API}/inferencetiers?limit=1")
        remaining = int(listed["metadata"].get("remainingItemCount") or 0)
        total = len(listed.get("items", [])) + remaining
        if total != target + len(TIER_NS):
            raise BenchError(f"expected {target + len(TIER_NS)} InferenceTiers in the cluster, found {total}")
        return time.monotonic() - t0

    # ------------------------------------------------------------------------------ phases

    def interleaved(
        self, count: int, warmup: int, budget: float, request: Any, check: Any
    ) -> tuple[dict[str, Series], dict[str, Any]]:
        """`count` pairs of requests, one per mode, alternating which goes first; stops early when the
        phase has run for `budget` seconds. `request(mode, i)` gives (path, body); `check(mode, answer)`
        says whether the answer is what that mode should give."""
        series = {m: Series() for m in MODES}
        for i in range(warmup):
            for m in MODES:
                path, body = request(m, -1 - i)
                self.measure(None, "POST", path, body)
        m0 = self.webhook.metrics()
        snap = self.snapshot()
        t0 = time.monotonic()
        done = 0
        for i in range(count):
            if time.monotonic() - t0 > budget:
                break
            for m in MODES if i % 2 == 0 else reversed(MODES):
                path, body = request(m, i)
                got = self.measure(series[m], "POST", path, body)
                if got is not None and not check(m, got):
                    series[m].wrong += 1
            done += 1
            if sum(len(s.errors) for s in series.values()) > 20:
                raise BenchError(f"too many failed requests: {series['on'].errors[:2] + series['off'].errors[:2]}")
        elapsed = time.monotonic() - t0
        load = self.load_since(snap, self.snapshot())
        m1 = self.webhook.metrics()
        info = {
            "pairs": done,
            "requested_pairs": count,
            "seconds": elapsed,
            "load": load,
            "webhook_memory_mib": self.webhook.memory_mib(),
            "metrics_after": m1,
            "metrics_before": m0,
        }
        return series, info

    def pods(self) -> dict[str, Any]:
        a = self.args

        def request(mode: str, i: int) -> tuple[str, dict[str, Any]]:
            name = f"app-{i}" if i >= 0 else f"warmup-{-i}"
            return f"/api/v1/namespaces/{POD_NS[mode]}/pods", pod(name)

        def check(mode: str, got: dict[str, Any]) -> bool:
            return injected(got) == (mode == "on")

        series, info = self.interleaved(a.pods, a.warmup, a.phase_budget, request, check)
        return self._result(series, info, "mutate")

    def validation(self, size: int) -> dict[str, Any]:
        a = self.args
        grow_s = self.grow_background(size)
        time.sleep(1.0)  # let the API server's watch cache and the machine settle after the creates

        def request(mode: str, i: int) -> tuple[str, dict[str, Any]]:
            ns = TIER_NS[mode]
            name = f"probe-{size}-{i}" if i >= 0 else f"warmup-{size}-{-i}"
            return f"{TIER_API}/namespaces/{ns}/inferencetiers?dryRun=All", tier(ns, name, "base")

        def check(_mode: str, got: dict[str, Any]) -> bool:
            return got.get("kind") == "InferenceTier"

        series, info = self.interleaved(a.tiers, a.warmup, a.phase_budget, request, check)
        out = self._result(series, info, "validate")
        out.update(background=size, grow_s=grow_s)
        return out

    def _result(self, series: dict[str, Series], info: dict[str, Any], op: str) -> dict[str, Any]:
        m0, m1 = info.pop("metrics_before"), info.pop("metrics_after")
        answered, errors, seconds = m1.minus(m0, op)
        on = series["on"]
        calls_expected = len(on.latencies) + len(on.errors)
        return {
            **info,
            "off": series["off"].summary(),
            "on": on.summary(),
            # Counted by the webhook itself: every "on" request called it, no "off" one did.
            "webhook_answered": answered,
            "webhook_answered_expected": calls_expected,
            "webhook_errors": errors,
            "webhook_seconds_mean": seconds / answered if answered else None,
            "webhook_cpu_per_admission": on.cpu["webhook"] / answered if answered else None,
            "webhook_reads": {k: int(v - m0.reads.get(k, 0)) for k, v in m1.reads.items()},
        }


def injected(got: dict[str, Any]) -> bool:
    return any(c.get("name") == SIDECAR for c in (got.get("spec") or {}).get("initContainers") or [])


# ---------------------------------------------------------------------------------------- report


def _ms(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x * 1000:.{digits}f}"


def row(title: str, r: dict[str, Any]) -> str:
    off, on = r["off"], r["on"]
    if not off.get("n") or not on.get("n"):
        return f"| {title} | {off.get('n', 0)} / {on.get('n', 0)} | n/a |" + " |" * 8
    add50, add95 = on["p50"] - off["p50"], on["p95"] - off["p95"]
    server = ("apiserver", "etcd")
    cpu_off = sum(off["cpu_per_request"][k] for k in server)
    cpu_on = sum(on["cpu_per_request"][k] for k in server)
    return (
        f"| {title} | {on['n']} | {_ms(off['p50'])} / {_ms(off['p95'])} | {_ms(on['p50'])} / {_ms(on['p95'])}"
        f" | +{_ms(add50)} / +{_ms(add95)} | {on['p50'] / off['p50']:.2f}x / {on['p95'] / off['p95']:.2f}x"
        f" | {_ms(r['webhook_seconds_mean'])} | {_ms(r['webhook_cpu_per_admission'], 2)}"
        f" | {_ms(cpu_off, 2)} → {_ms(cpu_on, 2)} |"
    )


def slope(validation: dict[str, Any]) -> list[str]:
    """How /validate grows with the cluster: from the smallest to the largest size measured."""
    done = sorted(((int(k), v) for k, v in validation.items() if v["on"].get("n")), key=lambda kv: kv[0])
    if len(done) < 2 or done[-1][0] == done[0][0]:
        return []
    (lo, a), (hi, b) = done[0], done[-1]
    per = 100 / (hi - lo)

    def server(r: dict[str, Any]) -> float:
        return float(sum(r["on"]["cpu_per_request"][k] for k in ("apiserver", "etcd")))

    cpu_a, cpu_b = a["webhook_cpu_per_admission"] or 0.0, b["webhook_cpu_per_admission"] or 0.0
    return [
        f"Growth of a validated admission from {lo} to {hi} other tiers, per 100 tiers: called p50"
        f" +{_ms((b['on']['p50'] - a['on']['p50']) * per)} ms, webhook CPU +{_ms((cpu_b - cpu_a) * per)} ms,"
        f" kube-apiserver + etcd CPU +{_ms((server(b) - server(a)) * per)} ms.",
        "",
    ]


def render(res: dict[str, Any], args: argparse.Namespace) -> str:
    out = [
        'Per request, ms: p50 / p95 (nearest rank). "not called": the same request in a namespace the webhook'
        ' does not select; "called": in one it selects; the two interleaved, one after the other.',
        "",
        "| admission | n | not called p50 / p95 | called p50 / p95 | added p50 / p95 | ratio p50 / p95"
        " | webhook's own time, mean | webhook CPU per admission | kube-apiserver + etcd CPU per request,"
        " not called → called |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if res.get("pods"):
        out.append(row("pod create (/mutate injects the sidecar)", res["pods"]))
    for size, r in sorted((res.get("validation") or {}).items(), key=lambda kv: int(kv[0])):
        spread = f" over {args.namespaces} namespaces" if int(size) else ""
        out.append(row(f"InferenceTier dry-run create (/validate), {size} other tiers{spread}", r))
    out.append("")
    out += slope(res.get("validation") or {})
    notes = []
    phases = [("pods", res.get("pods"))] + [
        (f"validation {k}", v) for k, v in sorted((res.get("validation") or {}).items(), key=lambda kv: int(kv[0]))
    ]
    for name, r in phases:
        if not r:
            continue
        line = (
            f"- {name}: {r['pairs']} pairs in {r['seconds']:.1f} s"
            + (f" (stopped by the {args.phase_budget:g} s budget)" if r["pairs"] < r["requested_pairs"] else "")
            + f"; webhook calls counted by the webhook {r['webhook_answered']} (expected"
            f" {r['webhook_answered_expected']}), its errors {r['webhook_errors']};"
            f" failed requests {r['off']['errors']} / {r['on']['errors']}, unexpected answers"
            f" {r['off']['wrong']} / {r['on']['wrong']} (not called / called);"
            f" CPU {r['load']['ours_cores']:.2f} cores by the benchmark, {r['load']['other_cores']:.2f} by other work,"
            f" {r['load']['steal_cores']:.2f} stolen by the hypervisor"
        )
        if "grow_s" in r:
            line += f"; background tiers created in {r['grow_s']:.1f} s"
        if r.get("webhook_reads"):
            reads = r["webhook_reads"]
            line += (
                f"; judged on the watch's cache {reads.get('cache', 0)} (its namespaces read fresh and unchanged),"
                f" on the cache with its namespaces read fresh laid over {reads.get('merged', 0)},"
                f" on a fresh list of everything {reads.get('list', 0)}"
            )
        if r["on"].get("n"):
            line += (
                f"; called p99 / max {_ms(r['on']['p99'])} / {_ms(r['on']['max'])} ms;"
                f" harness CPU per request {_ms(r['on']['cpu_per_request']['harness'], 2)} ms"
            )
        notes.append(line)
        for sample in r["off"].get("error_samples", []) + r["on"].get("error_samples", []):
            notes.append(f"  - {sample}")
    mem = res.get("webhook_memory") or {}
    if mem.get("end_hwm"):
        notes.append(
            f"- webhook memory: RSS {mem['start_rss']:.0f} MiB after start; peak RSS (VmHWM)"
            f" {mem['end_hwm']:.0f} MiB at the end"
            + "".join(f", {v['VmHWM']:.0f} MiB after {k}" for k, v in mem.get("after", {}).items())
        )
    env, log = res["env"], res.get("webhook_log") or {}
    notes += [
        f"- CPU: {env['cpu']} ({env['cores']} cores, shared, unpinned); load average {env['loadavg']} before,"
        f" {res.get('loadavg_after', '?')} after",
        f"- Linux {env['kernel']}, Python {env['python']}, aiohttp {env.get('aiohttp', '?')}, Kubernetes"
        f" {env.get('kubernetes', '?')} (etcd + kube-apiserver on this machine, no nodes)",
        f"- webhook: `tierwise webhook` at commit {env.get('commit', '?')}"
        + (f" with uncommitted changes to {', '.join(env['dirty'])}" if env.get("dirty") else "")
        + f", ready {res.get('webhook_start_s', float('nan')):.1f} s after start; configurations: the chart's,"
        f" URL client configs on loopback, failurePolicy Fail, timeoutSeconds {args.webhook_timeout}",
        f"- webhook log: {log.get('warnings', '?')} warnings, {log.get('errors', '?')} errors,"
        f" {log.get('tracebacks', '?')} tracebacks",
    ]
    notes += [f"  - {line[:300]}" for line in log.get("samples", [])]
    notes += [f"- FAILED: {f}" for f in res.get("failures", [])]
    return "\n".join(out + notes)


def source_state() -> tuple[str, list[str]]:
    """HEAD and the uncommitted changes under api/, operator/ and crds/: the webhook runs the working
    tree, which other people may be editing."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, check=False)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "api", "operator", "crds"], capture_output=True, check=False
    )
    return head.stdout.decode().strip(), [line[3:] for line in dirty.stdout.decode().splitlines()]


def environment() -> dict[str, Any]:
    import importlib.metadata

    env: dict[str, Any] = {
        "cpu": procstat.cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        env["aiohttp"] = importlib.metadata.version("aiohttp")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        env["commit"], env["dirty"] = source_state()
    return env


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pods", type=int, help="pod creations per mode (300; --quick: 50)")
    p.add_argument(
        "--tiers", type=int, help="InferenceTier dry-run creates per mode and cluster size (200; --quick: 30)"
    )
    p.add_argument("--sizes", default="0,100,1000", help="other InferenceTiers in the cluster, ascending")
    p.add_argument("--namespaces", type=int, default=20, help="namespaces the other tiers are spread over")
    p.add_argument("--warmup", type=int, help="unmeasured requests per mode before each phase (20; --quick: 5)")
    p.add_argument("--phase-budget", type=float, default=150.0, help="a phase stops measuring after this many seconds")
    p.add_argument("--webhook-timeout", type=int, default=5, help="timeoutSeconds of the configurations (the chart's)")
    p.add_argument("--quick", action="store_true", help="50 pod pairs, 30 tier pairs per size, 5 warm-ups")
    p.add_argument("--json", type=Path, help="write every raw result here")
    p.add_argument("--keep-logs", action="store_true", help="keep the cluster's and the webhook's files")
    args = p.parse_args(argv)
    for name, full, quick in (("pods", 300, 50), ("tiers", 200, 30), ("warmup", 20, 5)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    if args.sizes != sorted(args.sizes) or any(s < 0 for s in args.sizes):
        p.error("--sizes: ascending, not negative")
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


def run(args: argparse.Namespace, res: dict[str, Any]) -> None:
    # Always a fresh control plane of our own: an existing cluster has other objects and other load.
    os.environ.pop("TIERWISE_KUBECONFIG", None)
    t = time.monotonic()
    cluster = localcluster.start(args.tmp / "cluster")
    webhook: Webhook | None = None
    api: Api | None = None
    try:
        res["control_plane_start_s"] = time.monotonic() - t
        print(f"control plane up in {res['control_plane_start_s']:.1f} s", flush=True)
        res["env"]["kubernetes"] = install_crds(cluster)
        kubeconfig = args.tmp / "webhook-kubeconfig"
        shutil.copyfile(cluster.kubeconfig, kubeconfig)
        kubeconfig.chmod(0o600)
        webhook = Webhook(kubeconfig, args.tmp / "tls", args.tmp / "webhook.log")
        res["webhook_start_s"] = webhook.start()
        print(f"webhook ready in {res['webhook_start_s']:.1f} s (pid {webhook.pid})", flush=True)
        api = Api(cluster.kubeconfig, args.tmp)
        bench = Bench(args, cluster, api, webhook)
        bench.setup()
        memory: dict[str, Any] = {"start_rss": webhook.memory_mib()["VmRSS"], "after": {}}
        res["webhook_memory"] = memory
        print(f"pods: {args.pods} pairs (+{args.warmup} warm-up)", flush=True)
        res["pods"] = bench.pods()
        memory["after"]["pods"] = res["pods"]["webhook_memory_mib"]
        print(f"  {row('pods', res['pods'])}", flush=True)
        res["validation"] = {}
        for size in args.sizes:
            print(f"validation with {size} other tiers: {args.tiers} pairs (+{args.warmup} warm-up)", flush=True)
            r = res["validation"][str(size)] = bench.validation(size)
            memory["after"][f"{size} tiers"] = r["webhook_memory_mib"]
            print(f"  {row(str(size), r)}", flush=True)
        memory["end_hwm"] = webhook.memory_mib()["VmHWM"]
    finally:
        if api is not None:
            api.close()
        if webhook is not None:
            webhook.stop()
            res["webhook_log"] = webhook.log_problems()
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)
    args.tmp = Path(tempfile.mkdtemp(prefix="tierwise-bench-webhook-"))
    res: dict[str, Any] = {"env": environment(), "failures": []}
    started = time.monotonic()
    code = 0
    try:
        run(args, res)
    except KeyboardInterrupt:
        res["failures"].append("interrupted")
        code = 130
    except (BenchError, localcluster.ClusterError, subprocess.SubprocessError, OSError, http.client.HTTPException) as e:
        res["failures"].append(f"{type(e).__name__}: {e}")
        code = 1
    res["wall_s"] = time.monotonic() - started
    res["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if source_state() != (res["env"].get("commit"), res["env"].get("dirty")):
            res["failures"].append(
                "the code under test changed during the run (HEAD or uncommitted changes under api/, operator/,"
                " crds/): measure again"
            )
            code = code or 1
    print()
    print(render(res, args))
    print(f"- wall time {res['wall_s']:.0f} s")
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"settings": settings, **res}, indent=2, default=str) + "\n")
        print(f"- raw results: {args.json}")
    if code or args.keep_logs:
        print(f"- files kept in {args.tmp} (webhook.log, cluster/*.log)", file=sys.stderr)
    else:
        shutil.rmtree(args.tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
