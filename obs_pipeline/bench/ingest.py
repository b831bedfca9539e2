"""Ingest: what an observing script pays per transaction, and the workloads the drain eats.

The measured unit is seed 000's "Example Complete Transaction" written the way the README
tells scripts to: `with buf.transaction() as tx:` create ExecutedObsUnit, create
RawDataPackage, bulk_create two RawDataFile. Its latency is the whole `with` block (build,
validate, one Lua call to Redis), because that is what the script waits for.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from obs_pipeline.bench.context import OBS_UNITS, percentile
from obs_pipeline.config import Settings
from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline.simulate import observe_once

ROWS_PER_SEED_TX = 4  # 1 ExecutedObsUnit + 1 RawDataPackage + 2 RawDataFile


def seed_transaction(buf: TransactionBuffer, obs_unit_id: int) -> str:
    """Buffer seed 000's example transaction; returns its id."""
    with buf.transaction(endpoint="create_observation_with_files") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": obs_unit_id, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "running"})
        pkg = tx.create("RawDataPackage", {"name": f"obs_{obs_unit_id}_package", "executed_obs_unit_id": obs["id"]})
        tx.bulk_create("RawDataFile", [{"name": "file1.fits", "raw_data_package_id": pkg["id"]},
                                       {"name": "file2.fits", "raw_data_package_id": pkg["id"]}])
    return tx.transaction_id


def measure_ingest(settings: Settings, n: int, keep_going: Callable[[], bool] = lambda: True,
                   pause_s: float = 0.0) -> dict:
    """Per-transaction latency and one process's throughput over `n` seed transactions.

    `pause_s` spaces them out (ingest measured while a drain runs, at a script's pace);
    throughput is only meaningful without it."""
    buf = TransactionBuffer(settings=settings)
    latencies: list[float] = []
    try:
        seed_transaction(buf, 1)  # connect and warm up outside the measurement
        began = time.perf_counter()
        for i in range(n):
            if not keep_going():
                break
            t0 = time.perf_counter()
            seed_transaction(buf, 1 + i % OBS_UNITS)
            latencies.append(time.perf_counter() - t0)
            if pause_s:
                time.sleep(pause_s)
        elapsed = time.perf_counter() - began
    finally:
        buf.close()
    return {
        "transactions": len(latencies) + 1,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies) * 1000 if latencies else float("nan"),
        "throughput_tx_s": len(latencies) / elapsed if elapsed and not pause_s else None,
    }


def measure_ingest_threads(settings: Settings, n: int, threads: int) -> dict:
    """One process whose `threads` threads buffer `n` seed transactions in all through one
    TransactionBuffer (a script that records from several instruments at once). Each thread
    waits for Redis on its own, so one's round trip overlaps another's Python work."""
    buf = TransactionBuffer(settings=settings)
    latencies: list[float] = []

    def worker(count: int) -> None:
        for i in range(count):
            t0 = time.perf_counter()
            seed_transaction(buf, 1 + i % OBS_UNITS)
            latencies.append(time.perf_counter() - t0)

    try:
        seed_transaction(buf, 1)
        began = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(worker, [n // threads] * threads))
        elapsed = time.perf_counter() - began
    finally:
        buf.close()
    return {"threads": threads, "transactions": len(latencies), "throughput_tx_s": len(latencies) / elapsed,
            "p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000}


def buffer_seed_backlog(settings: Settings, n: int, progress: Callable[[int], None] | None = None) -> dict:
    """Buffer `n` seed transactions while nothing drains (the backlog); ids in buffering order."""
    buf = TransactionBuffer(settings=settings)
    ids, times = [], []
    began = time.perf_counter()
    try:
        for i in range(n):
            ids.append(seed_transaction(buf, 1 + i % OBS_UNITS))
            times.append(time.time())
            if progress and (i + 1) % 100_000 == 0:
                progress(i + 1)
    finally:
        buf.close()
    return {"ids": ids, "buffered_at": times, "elapsed_s": time.perf_counter() - began,
            "rows": n * ROWS_PER_SEED_TX}


def buffer_observations(settings: Settings, observations: int, files: int = 2, seed: int = 5) -> dict:
    """The fold workload: observations start, record files and finish (3 transactions each,
    `obs_pipeline.simulate.observe_once`), all inside the backlog, so each finish's update
    folds into its start's insert when both land in one batch."""
    buf = TransactionBuffer(settings=settings)
    rng = random.Random(seed)
    tx_count = 0
    began = time.perf_counter()
    try:
        for i in range(observations):
            tx_count += len(observe_once(buf, 1 + i % OBS_UNITS, files, rng))
    finally:
        buf.close()
    return {"transactions": tx_count, "rows": observations * (2 + files), "elapsed_s": time.perf_counter() - began}
