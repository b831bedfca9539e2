"""The measurements, one function per table section, each on a fresh site and clean tables.

Repeated measurements quote the median (of throughput; the run chosen is a real run, so its
round trips, fold and memory figures belong to it). Orchestration lives in `run.py`.
"""

from __future__ import annotations

import pstats
from pathlib import Path

from obs_pipeline.bench.baseline import measure_baseline
from obs_pipeline.bench.context import BenchContext, median
from obs_pipeline.bench.drain import median_run, run_drain, summarize
from obs_pipeline.bench.ingest import (ROWS_PER_SEED_TX, buffer_observations, buffer_seed_backlog, measure_ingest,
                                       measure_ingest_threads)
from obs_pipeline.keys import SiteKeys

INGEST_THREADS = 4  # the threaded ingest figure: one process, this many threads


def ingest_phase(ctx: BenchContext, n: int, repeats: int, threads: int = INGEST_THREADS) -> dict:
    runs, threaded = [], []
    for _ in range(repeats):
        settings = ctx.phase("ingest")
        runs.append(measure_ingest(settings, n))
        threaded.append(measure_ingest_threads(settings, n, threads))
        ctx.forget_site(settings.site)
    return {"threaded": {"threads": threads, "throughput_tx_s": median([r["throughput_tx_s"] for r in threaded]),
                         "p50_ms": median([r["p50_ms"] for r in threaded]),
                         "p99_ms": median([r["p99_ms"] for r in threaded]),
                         "repeats_tx_s": [round(r["throughput_tx_s"]) for r in threaded]},
            "transactions_per_repeat": n, "repeats": repeats,
            "p50_ms": median([r["p50_ms"] for r in runs]), "p99_ms": median([r["p99_ms"] for r in runs]),
            "max_ms": max(r["max_ms"] for r in runs),
            "throughput_tx_s": median([r["throughput_tx_s"] for r in runs]),
            "repeats_p99_ms": [round(r["p99_ms"], 3) for r in runs],
            "repeats_tx_s": [round(r["throughput_tx_s"]) for r in runs],
            "measured": "the whole `with buf.transaction()` block of seed 000's example (build, validate, "
                        "one Lua call), one process, back to back"}


def ingest_fsync_always_phase(ctx: BenchContext, n: int) -> dict:
    """The cost of `appendfsync always` (no buffered write lost on power loss): the same ingest
    with Redis fsyncing its AOF on every write, then back to the stack's `everysec`."""
    before = ctx.redis.config_get("appendfsync").get("appendfsync", "everysec")
    ctx.redis.config_set("appendfsync", "always")
    try:
        settings = ctx.phase("ingest_always")
        result = measure_ingest(settings, n)
        ctx.forget_site(settings.site)
    finally:
        ctx.redis.config_set("appendfsync", before)
    return result


def drain_phase(ctx: BenchContext, n: int, batch_size: int, repeats: int, name: str,
                profile: Path | None = None, max_batch_size: int | None = None,
                later_run: bool = False) -> dict:
    """Buffer n seed transactions, then time one drain run until all replicated; median of repeats.
    With `profile`, one more run under cProfile (not counted: the profiler slows it).
    `later_run`: the timed run is the site's second, as a site's drain runs again and again
    (a far drain's run starts at the size the last run's link gave); the first, of n too, is
    timed beside it (`first_run`)."""
    runs, memory = [], []
    first_run: dict | None = None
    for i in range(repeats + (1 if profile else 0)):
        settings = ctx.phase(name)
        if later_run:
            buffer_seed_backlog(settings, n)
            first = summarize(run_drain(ctx, settings, batch_size, max_batch_size=max_batch_size), n,
                              n * ROWS_PER_SEED_TX, ctx.model_rows(), batch_size)
            first_run = first_run or {k: first[k] for k in ("tx_per_s", "elapsed_s", "batches",
                                                             "largest_batch_claimed", "complete")}
            ctx.truncate()  # the site (and what its drain learned of main) stays; the rows go
        before = ctx.used_memory()
        backlog = buffer_seed_backlog(settings, n)
        per_tx = (ctx.used_memory() - before) / n
        entry = ctx.redis.lindex(SiteKeys(settings.site).buffer, 0) or b""
        profiled = str(profile) if profile and i == repeats else None
        result = run_drain(ctx, settings, batch_size, max_batch_size=max_batch_size, profile=profiled)
        figures = summarize(result, n, n * ROWS_PER_SEED_TX, ctx.model_rows(), batch_size)
        figures["max_batch_size"] = max_batch_size
        figures["buffering_tx_per_s"] = n / backlog["elapsed_s"]
        figures["queue_entry_bytes"] = len(entry)
        if not profiled:
            runs.append(figures)
            memory.append(per_tx)
        ctx.forget_site(settings.site)
    chosen = median_run(runs)
    if first_run is not None:
        chosen["first_run"] = first_run
    chosen["rtt_ms"] = ctx.rtt_ms
    chosen["repeats"] = repeats
    chosen["redis_bytes_per_tx"] = median(memory)
    return chosen


def fold_phase(ctx: BenchContext, observations: int, batch_size: int) -> dict:
    settings = ctx.phase("fold")
    work = buffer_observations(settings, observations)
    result = run_drain(ctx, settings, batch_size)
    figures = summarize(result, work["transactions"], work["rows"], ctx.model_rows(), batch_size)
    figures.pop("samples_t_rss_redis_mb", None)
    figures["observations"] = observations
    figures["workload"] = ("obs_pipeline.simulate.observe_once: start (ExecutedObsUnit + RawDataPackage), "
                           "files (bulk_create 2 RawDataFile), finish (update of the ExecutedObsUnit)")
    ctx.forget_site(settings.site)
    return figures


def baseline_phase(ctx: BenchContext, n: int) -> dict:
    settings = ctx.phase("baseline")
    buffer_seed_backlog(settings, n)
    result = measure_baseline(settings)
    result["rows_on_main"] = ctx.model_rows()
    result["complete"] = result["processed"] == n and result["rows_on_main"] == n * ROWS_PER_SEED_TX
    result["transactions"] = n
    result["rtt_ms"] = ctx.rtt_ms
    ctx.forget_site(settings.site)
    return result


def profile_summary(profile: Path, out: Path, lines: int = 35) -> None:
    """Top functions of a cProfile'd drain run, by own time and by cumulative time."""
    with open(out, "w") as fh:
        stats = pstats.Stats(str(profile), stream=fh).strip_dirs()
        fh.write("# cProfile of one drain run (obs_pipeline.bench.drain_child), sorted by own time\n")
        stats.sort_stats("tottime").print_stats(lines)
        fh.write("\n# the same run, sorted by cumulative time\n")
        stats.sort_stats("cumulative").print_stats(lines)
