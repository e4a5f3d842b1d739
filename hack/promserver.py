"""A real Prometheus on loopback with a temporary data dir, scraping the given targets.

`python hack/promserver.py DIR --target HOST:PORT [--port N]` starts one and prints
`PROM_URL=... PROM_PID=...` for a shell to eval (the demo); it keeps running after this exits."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from localcluster import free_port, stop_process


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    config: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        return query(self.url, expr)

    def stop(self) -> None:
        stop_process(self.process)


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """An instant query's result (urllib.error.HTTPError when Prometheus refuses it)."""
    q = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as r:
        data = json.loads(r.read())
    return list(data["data"]["result"])


def start_prometheus(
    workdir: Path, targets: Sequence[str], interval: str = "1s", port: int | None = None
) -> Prometheus:
    """Start Prometheus (again, with `port` and the same workdir: same address, same data)."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not installed (hack/setup.sh installs the Debian package)")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": interval, "evaluation_interval": interval},
                "scrape_configs": [{"job_name": "tierwise", "static_configs": [{"targets": list(targets)}]}],
            }
        )
    )
    port = port or free_port()
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"prometheus did not start; see {workdir / 'prometheus.log'}") from None
            time.sleep(0.2)
    return Prometheus(url, proc, config)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", type=Path)
    p.add_argument("--target", action="append", default=[], help="HOST:PORT to scrape (repeatable)")
    p.add_argument("--port", type=int)
    p.add_argument("--interval", default="1s")
    args = p.parse_args(argv)
    prom = start_prometheus(args.workdir, args.target, args.interval, args.port)
    print(f"PROM_URL={prom.url} PROM_PID={prom.process.pid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
