"""`obs-pipeline bench`: ingest, drain, fold, COPY ceiling, seed 000's loop and a Dagster burst,
at 0 ms and 250 ms round trip to main, on a local stack; a table, results.json and a chart.

Modules: run (orchestration), phases (one function per measurement), ingest, drain and
drain_child (a drain run in its own process), ceiling (COPY), baseline (seed 000's loop),
dagster_burst, outage (`--backlog`), table and report (output). Importing this package
starts nothing.
"""

from obs_pipeline.bench.run import run_bench

__all__ = ["run_bench"]
