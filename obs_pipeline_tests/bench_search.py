"""Benchmark: `search` with 10,000 buffered records of one model (issue 4).

    .venv/bin/python -m obs_pipeline_tests.bench_search            # a throwaway local stack
    eval "$(obs-pipeline stack env)"; .venv/bin/python -m obs_pipeline_tests.bench_search --env

Buffers N ExecutedObsUnit records (in transactions of 100, a fifth of them with a pending
update overlay) under a fresh site, then times several searches: by obs_unit_id, by a time
window, by status (a column the overlays change) and with no filter. Prints the median and
the 90th percentile per query. `bench_search(buf, ...)` is the callable part, for other
benchmarks; it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from obs_pipeline.ingest import TransactionBuffer

OBS_UNITS = (1, 2, 3, 123)
T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def buffer_records(buf: TransactionBuffer, count: int = 10_000, per_tx: int = 100,
                   updated_every: int = 5) -> list[str]:
    """Buffer `count` observations; every `updated_every`-th gets a pending update. Returns ids."""
    ids: list[str] = []
    for start in range(0, count, per_tx):
        with buf.transaction(endpoint="bench_start") as tx:
            rows = tx.bulk_create("ExecutedObsUnit", [
                {"obs_unit_id": OBS_UNITS[i % len(OBS_UNITS)], "start_time": T0 + dt.timedelta(seconds=i),
                 "status": "running"} for i in range(start, min(count, start + per_tx))])
        ids.extend(r["id"] for r in rows)
    for i in range(0, count, updated_every):
        with buf.transaction(endpoint="bench_finish") as tx:
            tx.update("ExecutedObsUnit", ids[i], {"status": "completed",
                                                  "end_time": T0 + dt.timedelta(seconds=i + 60)})
    return ids


QUERIES: dict[str, dict[str, Any]] = {
    "obs_unit_id = 123": {"obs_unit_id": 123},
    "start_time window (1 h)": {"start_time": {">=": "2025-01-01T01:00:00Z", "<": "2025-01-01T02:00:00Z"}},
    "status = completed (overlaid)": {"status": "completed"},
    "no filter": {},
}


def bench_search(buf: TransactionBuffer, runs: int = 15, queries: dict[str, dict] | None = None) -> dict[str, dict]:
    """Time each query `runs` times (after one warm-up); milliseconds."""
    out = {}
    for name, filters in (queries or QUERIES).items():
        found = len(buf.search("ExecutedObsUnit", filters))
        timings = []
        for _ in range(runs):
            began = time.perf_counter()
            buf.search("ExecutedObsUnit", filters)
            timings.append((time.perf_counter() - began) * 1000)
        timings.sort()
        out[name] = {"results": found, "median_ms": round(statistics.median(timings), 2),
                     "p90_ms": round(timings[int(0.9 * (len(timings) - 1))], 2),
                     "min_ms": round(timings[0], 2)}
    return out


def get_latency(buf: TransactionBuffer, ids: list[str], runs: int = 200) -> dict[str, float]:
    timings = []
    for rid in ids[:runs]:
        began = time.perf_counter()
        buf.get("ExecutedObsUnit", rid)
        timings.append((time.perf_counter() - began) * 1000)
    return {"median_ms": round(statistics.median(timings), 3), "max_ms": round(max(timings), 3)}


def run(env: dict[str, str], count: int, runs: int) -> dict[str, Any]:
    import sqlalchemy as sa

    from obs_pipeline.config import Settings
    from obs_pipeline.model_registry import ModelRegistry
    from obs_pipeline.schema import create_schema

    engine = sa.create_engine(env["OBS_MAIN_DB_URL"])
    create_schema(engine, ModelRegistry.from_path("obs_pipeline.models:Base"))
    with engine.begin() as conn:
        for unit in OBS_UNITS:
            conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (:i, :n) ON CONFLICT DO NOTHING"),
                         {"i": unit, "n": f"unit {unit}"})
    engine.dispose()
    site = f"bench{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as spool:
        settings = Settings(site=site, redis_url=env["OBS_REDIS_URL"], replica_db_url=env["OBS_REPLICA_DB_URL"],
                            spool_dir=spool)
        buf = TransactionBuffer(settings=settings)
        try:
            began = time.perf_counter()
            ids = buffer_records(buf, count)
            buffering_s = time.perf_counter() - began
            result = {"buffered_records": count, "buffering_s": round(buffering_s, 1),
                      "search": bench_search(buf, runs), "get": get_latency(buf, ids)}
        finally:
            keys = list(buf.redis.scan_iter(match=f"site:{site}:*", count=1000))
            for i in range(0, len(keys), 1000):
                buf.redis.delete(*keys[i:i + 1000])
            buf.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", action="store_true", help="use the stack named by OBS_* variables")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args(argv)
    if args.env:
        import os

        print(json.dumps(run(dict(os.environ), args.count, args.runs), indent=2))
        return 0
    from obs_pipeline.stack import LocalStack

    with tempfile.TemporaryDirectory() as folder:
        stack = LocalStack(Path(folder) / "stack")
        stack.up()
        try:
            print(json.dumps(run(stack.env(), args.count, args.runs), indent=2))
        finally:
            stack.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
