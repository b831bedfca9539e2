"""The bench's CPU accounting (`bench.cpu`) on real processes: a tree's time counts its live
children and the ones that ended, which is how PostgreSQL's backends are counted."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from obs_pipeline.bench.cpu import CpuMeter, tree_cpu_s

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n{then}"


def _spawn_parent_of_burner(seconds: float, then: str) -> subprocess.Popen:
    """A parent process whose child burns `seconds` of CPU; the parent itself stays idle."""
    child = BURN.format(s=seconds, then=then)
    parent = f"import subprocess, sys, time\np = subprocess.Popen([sys.executable, '-c', {child!r}])\n" \
             "sys.stdout.write('started\\n'); sys.stdout.flush(); p.wait(); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "started\n"
    return proc


def test_a_tree_counts_the_cpu_of_children_that_ended():
    proc = _spawn_parent_of_burner(0.5, "")
    try:
        before = tree_cpu_s(proc.pid)
        deadline = time.monotonic() + 20
        while tree_cpu_s(proc.pid) - before < 0.4 and time.monotonic() < deadline:
            time.sleep(0.05)
        spent = tree_cpu_s(proc.pid) - before
        assert 0.4 <= spent < 3.0, spent  # the burner's half second, whether running or reaped
        children = f"/proc/{proc.pid}/task/{proc.pid}/children"
        while open(children).read().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not open(children).read().strip()  # the burner has ended and been reaped
        after = tree_cpu_s(proc.pid) - before
        assert 0.4 <= after < spent + 0.3, (spent, after)  # ...and its time still counted, once
    finally:
        proc.kill()
        proc.wait()


def test_a_meter_splits_cpu_by_service_and_reads_the_machine():
    busy = _spawn_parent_of_burner(0.6, "time.sleep(30)")  # the burner stays alive afterwards
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        meter = CpuMeter({"busy": busy.pid, "idle": idle.pid, "gone": None})
        before = meter.snapshot()
        time.sleep(1.2)
        cpu = meter.since(before, 1.2)
        assert set(cpu["services_s"]) == {"busy", "idle"}  # a service without a pid is left out
        assert cpu["services_s"]["busy"] >= 0.3 and cpu["services_s"]["idle"] < 0.1, cpu
        assert 0.2 <= cpu["machine_busy_cores"] <= cpu["cores"] == os.cpu_count()
        assert cpu["machine_steal_cores"] >= 0
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait()
