"""Where a measured run's CPU went: the stack's processes and the machine, read from /proc.

The bench runs everything on one machine, so a throughput figure alone cannot say whether the
drain waits on main, on Redis, or on the cores they share. This reads, before and after a run,
the CPU time of each service's process tree (its own time, what its ended children spent -
PostgreSQL's finished backends - and its live children's) and the machine's busy and steal
time (steal: time the hypervisor gave this VM's cores to someone else). Clock ticks: 10 ms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _proc_stats() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, own ticks, ticks of its ended children) for every process we may read."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended while we looked
        # after the command: state ppid ... utime(12) stime(13) cutime(14) cstime(15), 0-based
        out[int(name)] = (int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))
    return out


def tree_cpu_s(root: int, stats: dict[int, tuple[int, int, int]] | None = None) -> float:
    """CPU seconds of `root`, its ended children and its live descendants."""
    stats = _proc_stats() if stats is None else stats
    if root not in stats:
        return 0.0
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    ticks, todo = 0, [root]
    while todo:
        pid = todo.pop()
        _, own, ended = stats[pid]
        ticks += own + ended
        todo.extend(children.get(pid, ()))
    return ticks * TICK_S


def machine_ticks() -> tuple[int, int, int]:
    """(busy, steal, all) ticks summed over all cores since boot, from the `cpu` line of /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return user + nice + system + irq + softirq, steal, sum(values[:8])


@dataclass
class CpuSnapshot:
    services_s: dict[str, float]
    busy_ticks: int
    steal_ticks: int
    all_ticks: int


class CpuMeter:
    """`meter = CpuMeter({"main": pid, ...}); before = meter.snapshot(); ...; meter.since(before)`."""

    def __init__(self, service_pids: dict[str, int | None]):
        self.service_pids = {name: pid for name, pid in service_pids.items() if pid}

    def snapshot(self) -> CpuSnapshot:
        stats = _proc_stats()
        busy, steal, all_ticks = machine_ticks()
        return CpuSnapshot({name: tree_cpu_s(pid, stats) for name, pid in self.service_pids.items()}, busy, steal,
                           all_ticks)

    def since(self, before: CpuSnapshot, elapsed_s: float) -> dict:
        """CPU seconds per service since `before`, and the machine's cores busy and stolen (on
        average): shares of all the ticks counted meanwhile, times the cores (ticks over wall
        time came out above the core count in short runs: the counters move in steps)."""
        after = self.snapshot()
        cores = os.cpu_count() or 1
        ticks = after.all_ticks - before.all_ticks
        return {"services_s": {name: round(after.services_s[name] - before.services_s.get(name, 0.0), 3)
                               for name in after.services_s},
                "machine_busy_cores": round(cores * (after.busy_ticks - before.busy_ticks) / ticks, 2)
                if ticks > 0 else None,
                "machine_steal_cores": round(cores * (after.steal_ticks - before.steal_ticks) / ticks, 2)
                if ticks > 0 else None,
                "cores": cores, "elapsed_s": round(elapsed_s, 3)}


def stack_meter(stack) -> CpuMeter:
    """A meter over the local stack's main, replica and Redis (and the proxy, when one runs)."""
    status = stack.status()
    return CpuMeter({name: status[name]["pid"] for name in ("main", "replica", "redis", "proxy")})


def cpu_per_tx(cpu: dict, transactions: int) -> dict:
    """CPU microseconds per transaction of each process tree, and the machine's busy and stolen cores."""
    per_tx = {name: round(1e6 * s / transactions, 1) if transactions else None for name, s in cpu["services_s"].items()}
    return {"us_per_tx": per_tx, "us_per_tx_all": round(sum(v for v in per_tx.values() if v), 1),
            "machine_busy_cores": cpu["machine_busy_cores"], "machine_steal_cores": cpu["machine_steal_cores"],
            "cores": cpu["cores"]}
