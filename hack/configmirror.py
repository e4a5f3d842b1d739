"""The kubelet's part for a sidecar run outside a pod: the namespace's Policy ConfigMap brought
to a folder as its volume would be, every key a file, the set swapped in when it changes (the
sidecar watches the file's identity, as it does the kubelet's symlink swap). Used by the tests and
the demo, where no container runtime runs the injected sidecar."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from localcluster import Cluster

KEYS = ("policy.json", "budgets.json", "steering.json")


class PolicyMirror:
    def __init__(self, cluster: Cluster, ns: str, folder: Path, interval: float = 0.5) -> None:
        self.cluster, self.ns, self.folder, self.interval = cluster, ns, folder, interval
        self.stop = threading.Event()
        self.version = ""
        self.thread = threading.Thread(target=self._run, daemon=True)

    def sync(self) -> bool:
        """Bring the folder up to date; True when it holds a Policy."""
        out = self.cluster.kubectl("get", "configmap", "tierwise-policy", "-n", self.ns, "-o", "json", check=False)
        cm = json.loads(out.stdout) if out.returncode == 0 else None
        if cm is not None and cm["metadata"]["resourceVersion"] != self.version:
            data = cm.get("data") or {}
            for name in KEYS:
                target = self.folder / name
                if name not in data:
                    target.unlink(missing_ok=True)
                    continue
                tmp = self.folder / f".{name}.tmp"
                tmp.write_text(data[name])
                tmp.replace(target)
            self.version = cm["metadata"]["resourceVersion"]
        return (self.folder / "policy.json").exists()

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self.sync()
