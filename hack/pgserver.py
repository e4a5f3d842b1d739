"""A real PostgreSQL on loopback with a temporary data dir (Debian's postgresql), for tests and
benchmarks: stopped and started again on the same port and data, as an outage would.

PostgreSQL refuses to run as root, so when the tests run as root the server runs as the Debian
package's `postgres` user, on a data dir of its own under the system's temporary directory
(pytest's are private to root). One database, `tierwise`, trusted on loopback: a test server,
never reachable from outside the machine.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from localcluster import ServerProcess, free_port


def _bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"{name} not found: hack/setup.sh installs the Debian package postgresql")
    return found


def _user() -> dict[str, str]:
    """Popen's arguments that run the server as `postgres` when we are root (exec'd directly: no
    wrapper process that could outlive a kill)."""
    return {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}


@dataclass
class Postgres(ServerProcess):
    workdir: Path
    port: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/tierwise"

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    def init(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
        if not (self.data / "PG_VERSION").exists():
            subprocess.run(
                [_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                 "--no-sync"],
                check=True, capture_output=True, timeout=120, **_user(),  # type: ignore[call-overload]
            )  # fmt: skip

    def start(self, timeout: float = 30.0) -> None:
        log = self.workdir / "postgres.log"
        self.process = subprocess.Popen(  # type: ignore[call-overload]
            [_bin("postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port), "-k",
             str(self.workdir), "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "shared_buffers=32MB",
             "-c", "max_connections=50"],
            stdout=log.open("ab"), stderr=subprocess.STDOUT, **_user(),
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"postgres did not start; see {log}")
            time.sleep(0.1)

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        r = subprocess.run(
            [_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-tAc",
             "SELECT 1 FROM pg_database WHERE datname = 'tierwise'"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        if r.returncode != 0:
            return False
        if r.stdout.strip() != "1":
            subprocess.run([_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                            "-c", "CREATE DATABASE tierwise"], capture_output=True, timeout=30, check=True)  # fmt: skip
        return True

    def remove(self) -> None:
        """Stop it and delete its data."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_postgres(workdir: Path, port: int | None = None) -> Postgres:
    """A server on `workdir` (as root: on a private directory of the postgres user instead)."""
    if os.geteuid() == 0:
        workdir = Path(tempfile.mkdtemp(prefix="tierwise-pg-"))
    pg = Postgres(workdir, port or free_port())
    pg.init()
    pg.start()
    return pg
