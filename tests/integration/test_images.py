"""The container images' install steps, run for real: no image can be built here, so the
Dockerfile's builder runs images/install.sh and these tests run the same script, for both roles,
into fresh virtual environments, then check what the images would ship.

Marked `images`: it installs from PyPI (or pip's cache and find-links), about 40 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import tierwise
from localcluster import free_port
from tests.conftest import ROOT, wait_for
from tierwise_cli.main import OPERATOR_DEPENDENCIES, OPERATOR_MISSING

pytestmark = [pytest.mark.images, pytest.mark.timeout(300)]

SCRIPT = ROOT / "images" / "install.sh"
DOCKERFILE = ROOT / "images" / "Dockerfile"
PREFIX = "/opt/tierwise"
# Any HTTP(S) download goes through a proxy on a port nothing listens on, so it fails.
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1"}


@dataclass
class Install:
    prefix: Path

    @property
    def baked(self) -> Path:
        return self.prefix / "share" / "tiktoken"

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """A command of the install (bin/...), with the environment the image sets."""
        full_env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(self.baked), "HOME": "/nonexistent", **(env or {})}
        return subprocess.run(
            [str(self.prefix / "bin" / args[0]), *args[1:]],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def importable(self, *modules: str) -> dict[str, bool]:
        code = (
            "import importlib.util, json, sys\n"
            "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))"
        )
        out = self.run("python", "-c", code, *modules)
        assert out.returncode == 0, out.stderr
        found: dict[str, bool] = json.loads(out.stdout)
        return found

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """Every file with its size and mtime: a read-only root filesystem would refuse any change."""
        return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in self.prefix.rglob("*")}


@pytest.fixture(scope="module")
def installs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Install]:
    """images/install.sh for both roles, side by side, each into a fresh virtual environment."""
    root = tmp_path_factory.mktemp("images")
    env = {**os.environ, "PYTHON": sys.executable}
    procs = {
        role: subprocess.Popen(
            ["bash", str(SCRIPT), role, str(root / role)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for role in ("operator", "sidecar")
    }
    for role, p in procs.items():
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, f"install.sh {role} failed:\n{out}"
    return {role: Install(root / role) for role in procs}


def test_help_lists_every_command(installs: dict[str, Install]) -> None:
    for install in installs.values():
        out = install.run("tierwise", "--help")
        assert out.returncode == 0, out.stderr
        for command in ("compile", "gateway", "sidecar", "estimate", "operator", "webhook"):
            assert command in out.stdout


def test_sidecar_install_leaves_the_operator_out(installs: dict[str, Install]) -> None:
    sidecar = installs["sidecar"]
    assert sidecar.importable(*OPERATOR_DEPENDENCIES) == dict.fromkeys(OPERATOR_DEPENDENCIES, False)
    for args in (["operator"], ["operator", "--help"], ["webhook", "--port", "9443", "--manage-certs"]):
        out = sidecar.run("tierwise", *args)
        assert (out.returncode, out.stdout, out.stderr) == (2, "", f"error: {OPERATOR_MISSING}\n")


def test_operator_install_runs_operator_and_webhook(installs: dict[str, Install]) -> None:
    operator = installs["operator"]
    assert operator.importable(*OPERATOR_DEPENDENCIES) == dict.fromkeys(OPERATOR_DEPENDENCIES, True)
    for command in ("operator", "webhook"):
        out = operator.run("tierwise", command, "--help")
        assert out.returncode == 0, out.stderr
        assert "--kubeconfig" in out.stdout


def test_nothing_to_build_or_install_with(installs: dict[str, Install]) -> None:
    for install in installs.values():
        assert install.importable("pip", "setuptools", "wheel") == {"pip": False, "setuptools": False, "wheel": False}
        assert not list((install.prefix / "bin").glob("pip*"))
        # Only the two encodings (no half-written .tmp), and every module compiled.
        assert len(list(install.baked.iterdir())) == 2
        assert list((install.prefix / "lib").rglob("tierwise_sidecar/__pycache__/app.*.pyc"))


def test_sidecar_counts_tokens_offline_and_writes_nothing(installs: dict[str, Install], tmp_path: Path) -> None:
    sidecar = installs["sidecar"]
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 10})
    )
    before = sidecar.snapshot()
    sidecar.baked.chmod(0o555)  # read-only as in the image (root ignores it; the snapshot does not)
    try:
        out = sidecar.run(
            "tierwise",
            "estimate",
            "--policy",
            str(ROOT / "examples" / "quickstart"),
            "-o",
            "json",
            str(request),
            env=OFFLINE,
        )
    finally:
        sidecar.baked.chmod(0o755)
    assert out.returncode == 0, out.stderr
    # "hello world" is 2 tokens, plus the chat framing: 3 for the message, 1 for the role, 3 priming.
    assert [b["inputTokens"] for b in json.loads(out.stdout)["backends"]] == [9]
    assert sidecar.snapshot() == before


@pytest.fixture
def gateway(installs: dict[str, Install]) -> Iterator[str]:
    """`tierwise gateway` from the sidecar install, on the quickstart policy."""
    sidecar = installs["sidecar"]
    port = free_port()
    env = {**os.environ, **OFFLINE, "TIKTOKEN_CACHE_DIR": str(sidecar.baked), "HOME": "/nonexistent"}
    args = ["gateway", "--policy", str(ROOT / "examples" / "quickstart"), "--port", str(port)]
    p = subprocess.Popen([str(sidecar.prefix / "bin" / "tierwise"), *args], env=env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return p.poll() is not None

    try:
        wait_for("the installed gateway to be healthy", healthy, timeout=30)
        assert p.poll() is None, p.communicate()[1]
        yield url
    finally:
        p.kill()
        p.communicate(timeout=10)


def test_sidecar_install_serves(installs: dict[str, Install], gateway: str) -> None:
    before = installs["sidecar"].snapshot()
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(gateway + path, timeout=5) as r:
            assert r.status == 200
    with urllib.request.urlopen(gateway + "/v1/models", timeout=5) as r:
        assert {m["id"] for m in json.load(r)["data"]} >= {"gold", "silver", "bronze"}
    assert installs["sidecar"].snapshot() == before


# -- the Dockerfile, read (no image can be built here) ----------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]]

    def last(self, instruction: str) -> str | None:
        found = [args for op, args in self.instructions if op == instruction]
        return found[-1] if found else None


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        op, _, rest = line.strip().partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "FROM":
            base, _, name = rest.partition(" AS ")
            stages.append(Stage(name.strip(), base.strip(), []))
        elif not stages and op == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append((op, rest))
    return args, stages


def test_dockerfile_final_stages() -> None:
    global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
    by_name = {s.name: s for s in stages}
    assert global_args["PYTHON_IMAGE"] == "python:3.11-slim"
    for stage in stages:
        assert stage.base in by_name or stage.base == "${PYTHON_IMAGE}", stage.name
        for op, args in stage.instructions:
            assert not (op == "RUN" and "apt-get" in args), f"{stage.name}: {args}"

    runtime = by_name["runtime"]
    assert runtime.last("ENTRYPOINT") == f'["{PREFIX}/bin/tierwise"]'
    env = runtime.last("ENV") or ""
    assert f"TIKTOKEN_CACHE_DIR={PREFIX}/share/tiktoken" in env
    assert "useradd --uid 10001 --gid 10001" in (runtime.last("RUN") or "")
    version = next(a for op, a in runtime.instructions if op == "ARG" and a.startswith("VERSION="))
    assert version == f"VERSION={tierwise.__version__}"

    for role in ("operator", "sidecar"):
        final, builder = by_name[role], by_name[f"builder-{role}"]
        assert final.base == "runtime"
        assert final.instructions[-2:] == [("USER", "10001:10001"), ("CMD", f'["{role}"]')]
        assert ("COPY", f"--from=builder-{role} {PREFIX} {PREFIX}") in final.instructions
        assert f"bash images/install.sh {role} {PREFIX}" in (builder.last("RUN") or "")
        assert by_name[builder.base].name == "source"


def test_dockerignore_sends_what_the_dockerfile_copies() -> None:
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    copied = {
        src
        for op, args in stages[0].instructions
        if op == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    }
    assert copied == allowed
