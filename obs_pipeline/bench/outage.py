"""Long outage (`--backlog N`): main "down" while N transactions pile up, then the catch-up.

Main is down in the only sense that matters to the buffer: nothing drains. Then one drain
works the backlog off while this process keeps ingesting at a script's pace (one seed
transaction every 10 ms) and times each one, so the figures answer: how much Redis does a
night of buffering take, does the drain's memory stay flat (it holds two batches at most, never the
backlog), and does ingest stay fast while the drain hammers the same Redis.
"""

from __future__ import annotations

import time

from obs_pipeline.bench.context import BenchContext, percentile
from obs_pipeline.bench.drain import run_drain, summarize
from obs_pipeline.bench.ingest import ROWS_PER_SEED_TX, buffer_seed_backlog, measure_ingest
from obs_pipeline.keys import SiteKeys


class _WhileDraining:
    """Keep ingesting while the drain child lives and the backlog is not yet worked off."""

    def __init__(self, ctx: BenchContext, settings, buffer_key: str):
        self.ctx, self.settings, self.buffer_key = ctx, settings, buffer_key
        self.proc = None
        self.calls = 0
        self.result: dict = {}

    def __call__(self, proc) -> None:
        self.proc = proc
        lease = SiteKeys(self.settings.site).lease
        while proc.poll() is None and not self.ctx.redis.exists(lease):
            time.sleep(0.01)  # the child is still importing: not draining yet
        self.result = measure_ingest(self.settings, n=10**9, keep_going=self.keep_going, pause_s=0.01)

    def keep_going(self) -> bool:
        self.calls += 1
        if self.proc.poll() is not None:
            return False
        return bool(self.calls % 50) or self.ctx.redis.llen(self.buffer_key) > 100


def measure_outage(ctx: BenchContext, n: int, batch_size: int) -> dict:
    settings = ctx.phase("outage")
    memory_before = ctx.used_memory()
    ctx.say(f"outage: buffering {n:,} transactions with nothing draining")
    ctx.start_redis_watch()
    backlog = buffer_seed_backlog(settings, n, progress=lambda i: ctx.say(f"outage: {i:,} buffered"))
    memory_after = ctx.used_memory()
    redis_buffering = ctx.redis_watch()
    gaps = [b - a for a, b in zip(backlog["buffered_at"], backlog["buffered_at"][1:])]
    ctx.say(f"outage: Redis holds {(memory_after - memory_before) / 2**20:,.0f} MiB more; draining")
    ingest = _WhileDraining(ctx, settings, SiteKeys(settings.site).buffer)
    ctx.start_redis_watch()
    result = run_drain(ctx, settings, batch_size, sample_s=0.5 if n >= 100_000 else 0.1, while_running=ingest)
    figures = summarize(result, n, n * ROWS_PER_SEED_TX, ctx.model_rows(), batch_size)
    redis_seen = ctx.redis_watch()
    figures["complete"] = figures["transactions"] >= n and figures["replicated"] >= n
    samples = figures.pop("samples_t_rss_redis_mb")
    rss = [s[1] for s in samples]
    ctx.forget_site(settings.site)
    return {
        "backlog": n,
        "buffering_s": backlog["elapsed_s"],
        "buffering_tx_per_s": n / backlog["elapsed_s"],
        "buffering_ingest_ms": {"p50": percentile(gaps, 50) * 1000, "p99": percentile(gaps, 99) * 1000,
                                "p99.99": percentile(gaps, 99.99) * 1000, "max": max(gaps, default=0) * 1000,
                                "measure": "time between consecutive buffered transactions, back to back"},
        "redis_while_buffering": redis_buffering,
        "redis_used_memory_before_mb": memory_before / 2**20,
        "redis_used_memory_backlog_mb": memory_after / 2**20,
        "redis_bytes_per_tx": (memory_after - memory_before) / n,
        "drain": figures,
        "drain_rss_mb_first_last_max": [rss[0], rss[-1], max(rss)] if rss else None,
        "ingest_while_draining": ingest.result,
        "redis_while_draining": redis_seen,
        "drain_asked_aof_rewrites": result["summary"].get("aof_compactions"),
        "samples_t_rss_redis_mb": samples,
        "memory_measure": "drain RSS from /proc/<pid>/statm every 0.5 s (0.1 s below 100,000), while "
                          "Drain.run runs; peak = VmHWM of the drain process (not ru_maxrss: on Linux it keeps "
                          "the forking parent's RSS across exec)",
    }
