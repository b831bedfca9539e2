"""One drain run in its own process: `python -m obs_pipeline.bench.drain_child CONFIG_JSON`.

Its own process so that its peak memory (VmHWM, see `_peak_rss_kb`) is the drain's alone and the
parent can sample its RSS over time, and so the drain gets a core of its own while the
parent ingests (long-outage mode). It times `Drain.run(until_empty=True)` - from the first
claim to everything replicated and cleaned, connecting to main included - and splits the
time between the drain's stages by wrapping them (timing only; behaviour unchanged).
It also reads the CPU time the drain and the stack's services spent during the run
(`bench.cpu`). The result goes to the file named in the config, as JSON.
"""

from __future__ import annotations

import cProfile
import json
import os
import resource
import sys
import time
from collections import defaultdict


def _rss_kb() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() // 1024


def _peak_rss_kb() -> int:
    """VmHWM: the peak RSS of this process image. Not getrusage's ru_maxrss, which on Linux keeps
    the forking parent's RSS across fork+exec (a bench parent of 300 MB makes a child "peak" at 300)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _timed(obj, name: str, spent: dict[str, float]) -> None:
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - t0

    setattr(obj, name, wrapper)


def main(argv: list[str]) -> int:
    from obs_pipeline.bench.cpu import CpuMeter
    from obs_pipeline.config import Settings
    from obs_pipeline.drain import BACKGROUND_NICENESS, Drain, DrainConfig

    cfg = json.loads(argv[0])
    drain = Drain(Settings(**cfg["settings"]), DrainConfig(batch_size=cfg["batch_size"],
                                                           max_batch_size=cfg.get("max_batch_size"),
                                                           replication_timeout_s=cfg.get("replication_timeout_s", 30.0),
                                                           niceness=BACKGROUND_NICENESS))  # as the CLI and Dagster run it
    spent: dict[str, float] = defaultdict(float)
    for obj, name in ((drain.store, "claim"), (drain.store, "mark_processing"), (drain.store, "holders"),
                      (drain.main, "apply_batch"), (drain.store, "acknowledge"),
                      (drain.replica, "wait_for_replay"), (drain.store, "clean_replicated")):
        _timed(obj, name, spent)
    batches: list[dict] = []

    def on_batch(r) -> None:
        batches.append({"tx": r.transactions, "applied": r.applied + r.already_applied,
                        "rows": sum(r.rows_per_model.values()), "before": r.writes_before_fold,
                        "after": r.writes_after_fold, "rt": r.round_trips, "wait": r.replication_wait_s,
                        "dur": r.duration_s, "replicated": r.replicated, "dead": len(r.dead_lettered),
                        "size": r.batch_size, "main_rtt_ms": r.main_round_trip_ms})

    rss_before = _rss_kb()
    run_started_at = time.time()
    profiler = cProfile.Profile() if cfg.get("profile") else None
    meter = CpuMeter({"drain": os.getpid(), **cfg.get("service_pids", {})})
    cpu_before = meter.snapshot()
    began = time.perf_counter()
    if profiler:
        profiler.enable()
    try:
        summary = drain.run(until_empty=True, on_batch=on_batch)
    finally:
        if profiler:
            profiler.disable()
        elapsed = time.perf_counter() - began
        cpu = meter.since(cpu_before, elapsed)
        drain.close()
    if profiler:
        profiler.dump_stats(cfg["profile"])
    result = {"elapsed_s": elapsed, "summary": summary.__dict__, "batches": batches, "spent_s": dict(spent),
              "cpu": cpu,
              "rss_before_run_kb": rss_before,
              "run_started_at": run_started_at, "peak_rss_kb": _peak_rss_kb(),
              "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    with open(cfg["result"], "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
