"""CPU time and resident memory of a process tree, read from /proc (Linux only)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

_TICK = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Direct children of every thread of `pid` (needs CONFIG_PROC_CHILDREN, on by default)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    seen: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo.extend(children(p))
    return seen


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads) plus that of its reaped children, in seconds.

    0 when the process is gone. Counting reaped children keeps a tree's total steady when a worker
    exits between two samples: its time moves to its parent's cutime/cstime.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces; fields after its closing parenthesis are fixed.
    rest = stat[stat.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return (utime + stime + cutime + cstime) / _TICK


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in tree(pid))


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss_bytes(pid: int) -> int:
    return sum(rss_bytes(p) for p in tree(pid))


def system_cpu_seconds() -> dict[str, float]:
    """Machine-wide busy and steal time since boot, summed over all CPUs (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return {"busy": (user + nice + system + irq + softirq) / _TICK, "steal": steal / _TICK}


def stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM a process started with its own process group, SIGKILL it after `grace` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, for a benchmark's environment note."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"
