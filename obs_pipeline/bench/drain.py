"""Drain throughput: buffer a backlog first, then time one drain run until all is replicated.

The drain runs in a child process (`drain_child`) whose RSS the parent samples every
`sample_s`; the child reports per-batch figures (round trips to main, fold counts,
replication wait) and where its time went. The result is checked against main: every row
of the backlog must be there, or the figure is marked incomplete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from obs_pipeline.bench.context import BenchContext, median
from obs_pipeline.bench.cpu import cpu_per_tx, stack_meter
from obs_pipeline.config import Settings


def _rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return None


def run_drain(ctx: BenchContext, settings: Settings, batch_size: int, *, max_batch_size: int | None = None,
              profile: str | None = None, sample_s: float = 0.1, while_running: Callable[[subprocess.Popen], None] | None = None) -> dict:
    """One drain run in a child process; returns its figures plus samples [(s since the run began,
    drain RSS MiB, Redis used_memory MiB)] taken by a thread while `while_running(proc)` runs here."""
    with tempfile.TemporaryDirectory(dir=ctx.work_dir) as tmp:
        result_path = Path(tmp) / "result.json"
        cfg = {"settings": dataclasses.asdict(settings), "batch_size": batch_size,
               "max_batch_size": max_batch_size, "profile": profile,
               "result": str(result_path), "service_pids": stack_meter(ctx.stack).service_pids}
        with open(ctx.work_dir / "drain_child.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "obs_pipeline.bench.drain_child", json.dumps(cfg)],
                                    stdout=log, stderr=subprocess.STDOUT)
            samples: list[tuple[float, float, float]] = []
            sampler = threading.Thread(target=_sample, args=(ctx, proc, sample_s, samples), daemon=True)
            sampler.start()
            try:
                if while_running:
                    while_running(proc)
                proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                sampler.join()
        if proc.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"the drain child exited with {proc.returncode}; see {ctx.work_dir / 'drain_child.log'}")
        result = json.loads(result_path.read_text())
    # only samples taken while Drain.run ran (not the child's start-up), timed from its start
    start = result["run_started_at"]
    result["samples"] = [(round(t - start, 2), rss, redis_mb) for t, rss, redis_mb in samples if t >= start]
    return result


def _sample(ctx: BenchContext, proc: subprocess.Popen, every_s: float, out: list) -> None:
    while proc.poll() is None:
        rss = _rss_kb(proc.pid)
        if rss is not None:
            out.append((time.time(), round(rss / 1024, 1), round(ctx.used_memory() / 2**20, 1)))
        time.sleep(every_s)


def summarize(result: dict, expected_tx: int, expected_rows: int, rows_on_main: int, batch_size: int) -> dict:
    """The figures of one drain run: throughput, round trips per batch, fold, time split, memory."""
    work = [b for b in result["batches"] if b["tx"]]
    applied = sum(b["applied"] for b in work)
    rows = sum(b["rows"] for b in work)
    before, after = sum(b["before"] for b in work), sum(b["after"] for b in work)
    elapsed = result["elapsed_s"]
    round_trips = [b["rt"] for b in work]
    return {
        "batch_size": batch_size,
        "largest_batch_claimed": max((b["size"] for b in work), default=batch_size),
        "main_round_trip_ms": next((b["main_rtt_ms"] for b in work if b.get("main_rtt_ms") is not None), None),
        "transactions": applied,
        "rows": rows,
        "elapsed_s": round(elapsed, 3),
        "tx_per_s": applied / elapsed if elapsed else 0.0,
        "rows_per_s": rows / elapsed if elapsed else 0.0,
        "batches": len(work),
        "round_trips_per_batch_median": median(round_trips),
        "round_trips_per_batch_max": max(round_trips, default=0),
        "writes_before_fold": before,
        "writes_after_fold": after,
        "fold_ratio": before / after if after else None,
        "replication_wait_s": round(sum(b["wait"] for b in work), 3),
        "time_split_s": {k: round(v, 3) for k, v in result["spent_s"].items()},
        "replicated": result["summary"]["replicated"],
        "dead_lettered": result["summary"]["dead_lettered"],
        "complete": applied == expected_tx and rows_on_main == expected_rows
        and result["summary"]["replicated"] >= expected_tx,
        "peak_rss_mb": round(result["peak_rss_kb"] / 1024, 1),
        "peak_rss_measure": "VmHWM of the drain process (/proc/self/status at the end of its run)",
        "ru_maxrss_mb": round(result["ru_maxrss_kb"] / 1024, 1),
        "rss_before_run_mb": round(result["rss_before_run_kb"] / 1024, 1),
        "samples_t_rss_redis_mb": result["samples"],
        "cpu": cpu_per_tx(result["cpu"], applied),
    }


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (a real run, so its figures belong together), plus all."""
    ordered = sorted(runs, key=lambda r: r["tx_per_s"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["repeats_tx_per_s"] = [round(r["tx_per_s"], 1) for r in runs]
    chosen.pop("samples_t_rss_redis_mb", None)  # keeps results.json small; the long-outage mode keeps its series
    return chosen
