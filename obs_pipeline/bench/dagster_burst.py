"""A burst through Dagster itself: buffering to `replicated`, sensor and run launch included.

A real `dagster-daemon` (the same command `obs-pipeline dev` runs) with a fresh site and a
fresh DAGSTER_HOME. One warm-up transaction first goes the whole way (daemon start, code
location load, first run), and its run is let finish, so the burst pays what a burst at the
telescope pays - sensor tick, run launch, drain - and not the daemon's cold start (reported
apart). Each transaction's latency runs from the moment its `with` block returned to the
first status poll that sees it `replicated`; a thread polls every 0.2 s while this one buffers.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from obs_pipeline.bench.context import OBS_UNITS, BenchContext, percentile
from obs_pipeline.bench.ingest import seed_transaction
from obs_pipeline.dev import dagster_environment, stop_processes
from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline.keys import SiteKeys

POLL_S = 0.2
REPLICATED = b'"status":"replicated"'
PENDING = b'"status":"pending"'


def _daemon_command() -> list[str]:
    script = Path(sys.executable).parent / "dagster-daemon"
    return [str(script) if script.exists() else "dagster-daemon", "run", "-m", "obs_pipeline.definitions"]


class _StatusPoller(threading.Thread):
    """Pipelined GET of every not-yet-replicated status key, every 0.2 s."""

    def __init__(self, ctx: BenchContext, keys: SiteKeys, ids: list[str], done: dict[int, float]):
        super().__init__(daemon=True)
        self.ctx, self.keys, self.ids, self.done = ctx, keys, ids, done
        self.stop = threading.Event()
        self.first_picked_up: float | None = None  # first poll that saw a transaction leave `pending`

    def run(self) -> None:
        while not self.stop.is_set():
            pending = [i for i in range(len(self.ids)) if i not in self.done]
            if pending:
                pipe = self.ctx.redis.pipeline(transaction=False)
                for i in pending:
                    pipe.get(self.keys.transaction(self.ids[i]))
                values = pipe.execute()
                now = time.monotonic()
                for i, raw in zip(pending, values):
                    if raw and REPLICATED in raw:
                        self.done[i] = now
                    if raw and self.first_picked_up is None and PENDING not in raw:
                        self.first_picked_up = now
            self.stop.wait(POLL_S)


def measure_dagster_burst(ctx: BenchContext, n: int, timeout_s: float = 180.0) -> dict:
    settings = ctx.phase("dagster")
    keys = SiteKeys(settings.site)
    env = dagster_environment(ctx.stack, home=ctx.work_dir / f"dagster_home_{settings.site}")
    env["OBS_SITE"] = settings.site
    env["OBS_SPOOL_DIR"] = settings.spool_dir or ""
    log_path = ctx.work_dir / "dagster-daemon.log"
    with open(log_path, "ab") as log:
        daemon = subprocess.Popen(_daemon_command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    buf = TransactionBuffer(settings=settings)
    try:
        started = time.monotonic()
        warm = seed_transaction(buf, 1)
        if not buf.wait(warm, until="replicated", timeout=timeout_s):
            raise RuntimeError(f"warm-up transaction not replicated within {timeout_s:.0f} s; see {log_path}")
        cold_start_s = time.monotonic() - started
        deadline = time.monotonic() + 60
        while ctx.redis.exists(keys.lease) and time.monotonic() < deadline:
            time.sleep(0.2)  # the warm-up run's drain stays up for its idle grace, then releases
        time.sleep(3.0)      # ... and its run finishes, so the burst needs a fresh launch
        ids: list[str] = []
        buffered_at: list[float] = []
        done: dict[int, float] = {}
        poller = _StatusPoller(ctx, keys, ids, done)
        poller.start()
        burst_began = time.monotonic()
        for i in range(n):
            ids.append(seed_transaction(buf, 1 + i % OBS_UNITS))
            buffered_at.append(time.monotonic())
        buffering_s = time.monotonic() - burst_began
        end = burst_began + timeout_s
        while len(done) < n and time.monotonic() < end and daemon.poll() is None:
            time.sleep(POLL_S)
        poller.stop.set()
        poller.join()
    finally:
        buf.close()
        stop_processes([daemon])
    latencies = [done[i] - buffered_at[i] for i in done]
    return {
        "transactions": n,
        "replicated": len(done),
        "complete": len(done) == n,
        "buffering_s": buffering_s,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "last_s": (max(done.values()) - burst_began) if done else None,
        "last_after_buffered_s": max(latencies) if latencies else None,
        "picked_up_s": (poller.first_picked_up - burst_began) if poller.first_picked_up else None,
        "cold_start_s": cold_start_s,
        "timeout_s": timeout_s,
        "rtt_ms": ctx.rtt_ms,
    }
