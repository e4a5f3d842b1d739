"""The budget controller reading spend where the sidecars count it when budgets are in Redis: the
status is exact (settled and held, from the same keys the sidecars' scripts write), and Redis
gone keeps the last status with a condition saying it is stale."""

from __future__ import annotations

import glob
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from configmirror import PolicyMirror
from localcluster import Cluster, free_port, stop_process
from redisserver import Redis, start_redis
from tests.conftest import TIERWISE, Net, _ready, wait_for
from tests.integration.test_budget_controller import (
    _condition,
    _post,
    _spent,
    objects,
)
from tests.integration.test_operator import apply, get
from tests.operatorproc import OperatorProcess
from tests.servers import Fake

pytestmark = pytest.mark.cluster


@dataclass
class World:
    cluster: Cluster
    ns: str
    fake: Fake
    redis: Redis
    sidecar: str
    op: OperatorProcess
    workdir: Path


@pytest.fixture(scope="module")
def world(crds: Cluster, tmp_path_factory: pytest.TempPathFactory, aio: Any) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("budgetredis")
    net = Net(aio, tmp)
    ns = f"budr{int(time.time()) % 100000}"
    crds.kubectl("create", "namespace", ns)
    crds.kubectl("label", "namespace", ns, "tierwise.dev/injection=enabled")
    fake = net.fake("gold", completion_tokens=16)
    redis = start_redis(tmp / "redis")
    op = OperatorProcess(crds, tmp / "op", "--redis-url", redis.url, "--spend-interval", "1").start()
    kubelet = PolicyMirror(crds, ns, tmp / "mount")
    kubelet.folder.mkdir()
    proc = None
    world: World | None = None
    try:
        apply(crds, ns, *objects(ns, fake))
        wait_for("the Policy ConfigMap", lambda: kubelet.sync() or (kubelet.folder / "policy.json").exists(), 60)
        port = free_port()
        with (tmp / "sidecar.log").open("wb") as log:
            proc = subprocess.Popen(
                [*TIERWISE, "sidecar", "--policy-file", str(kubelet.folder / "policy.json"), "-n", ns,
                 "--budget-store", redis.url, "--no-discover-endpoints", "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_for("the sidecar ready", lambda: _ready(url), 30)
        world = World(crds, ns, fake, redis, url, op, tmp)
        yield world
    finally:
        if proc is not None:
            stop_process(proc)
        op.stop()
        if world is not None:
            world.op.stop()  # a test may have replaced it
        redis.stop()
        net.close()
        crds.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _status(w: World) -> dict[str, Any]:
    return dict((get(w.cluster, "costbudget", "team", "-n", w.ns) or {}).get("status") or {})


def test_status_is_read_from_the_sidecars_redis_exactly_and_kept_while_redis_is_away(world: World) -> None:
    w = world
    for _ in range(12):
        assert _post(w.sidecar)[0] == 200
    total = _spent(w.fake)
    wait_for("status spent equals the backends' usage", lambda: _status(w).get("spentUsd") == round(total, 6), 30)
    # The sidecar's allowance slice is held (reserved) until it has been idle for a moment.
    wait_for("the idle slice given back", lambda: _status(w).get("reservedUsd") == 0, 30)
    s = _status(w)
    assert s["reservedUsd"] == 0 and s["state"] == "Ok" and s["remainingUsd"] == round(1.0 - total, 6)
    assert _condition(s, "SpendObserved")["reason"] == "Redis"

    w.redis.kill()
    wait_for("stale", lambda: _condition(_status(w), "SpendObserved").get("reason") == "RedisUnavailable", 30)
    assert _status(w)["spentUsd"] == s["spentUsd"]
    w.redis.start()
    wait_for("fresh again", lambda: _condition(_status(w), "SpendObserved").get("status") == "True", 60)
    assert _status(w)["spentUsd"] == s["spentUsd"]


def test_a_new_period_resets_the_status(world: World) -> None:
    """The operator run (under libfaketime) from 20 s before the end of the month: the status shows
    this month's spend, then the new month's, which starts from nothing."""
    w = world
    assert _status(w)["spentUsd"] > 0
    now = datetime.now(UTC)
    first_next = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    start = datetime.fromtimestamp(first_next.timestamp() - 20, UTC)
    w.op.stop()
    # libfaketime preloaded into the operator itself (the `faketime` command would fork it as a
    # child that outlives the process the test stops).
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    assert found, "libfaketime is not installed: hack/setup.sh installs the Debian package faketime"
    w.op = OperatorProcess(
        w.cluster, w.workdir / "op-faked", "--redis-url", w.redis.url, "--spend-interval", "1",
        env={"LD_PRELOAD": found[0], "FAKETIME": start.strftime("@%Y-%m-%d %H:%M:%S")},
    ).start()  # fmt: skip
    before = _status(w)
    assert before["periodStart"] == f"{now:%Y-%m}-01T00:00:00Z"
    wait_for("the new period", lambda: _status(w).get("periodStart") == f"{first_next:%Y-%m}-01T00:00:00Z", 60)
    s = _status(w)
    assert s["spentUsd"] == 0 and s["state"] == "Ok" and s["lastReset"] == s["periodStart"]
    assert "crossedPercent" not in s and s["remainingUsd"] == 1.0
