"""The PostgreSQL ceiling: the backlog's rows written with COPY in one transaction.

Nothing writes these rows faster through libpq, so the drain's rows/s as a fraction of this
says how much the drain leaves on the table. Same tables, same foreign keys, same row
shapes as seed 000's example (1 ExecutedObsUnit, 1 RawDataPackage, 2 RawDataFile per
transaction). The clock runs from the first COPY to COMMIT returning (the rows are built in
memory first); the time until the replica has replayed the commit is reported beside it (the
commit's LSN read past the proxy, so that clock pays no round trip to main after COMMIT), and
so is the CPU main spent per transaction meanwhile (beside the drain's: what main pays for the
same rows either way). Each COPY starts from what each drain run starts from: tables truncated
(new, empty files; obs units 1..200) and the replica caught up. Deleting the rows between
repeats instead left dead tuples in the heap and the unique indexes, and work for autovacuum and
the replica, so each repeat ran slower than the one before (the third at 0.83x the first in the
median of 26 published runs) and the drain's fraction of the ceiling came out too high.
"""

from __future__ import annotations

import io
import time
import uuid

import psycopg2
import sqlalchemy as sa

from obs_pipeline.lsn import lsn_to_int
from obs_pipeline.bench.context import OBS_UNITS, BenchContext, median
from obs_pipeline.bench.cpu import cpu_per_tx, stack_meter
from obs_pipeline.bench.ingest import ROWS_PER_SEED_TX


def _libpq_url(sqlalchemy_url: str) -> str:
    return sa.make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)


def _copy_buffers(n: int) -> dict[str, io.StringIO]:
    units, packages, files = [], [], []
    for i in range(n):
        obs, pkg = uuid.uuid4(), uuid.uuid4()
        unit = 1 + i % OBS_UNITS
        units.append(f"{obs}\t{unit}\t2025-01-01T00:00:00Z\trunning\n")
        packages.append(f"{pkg}\tobs_{unit}_package\t{obs}\n")
        files.append(f"{uuid.uuid4()}\tfile1.fits\t{pkg}\n{uuid.uuid4()}\tfile2.fits\t{pkg}\n")
    return {"executed_obs_unit (id, obs_unit_id, start_time, status)": io.StringIO("".join(units)),
            "raw_data_package (id, name, executed_obs_unit_id)": io.StringIO("".join(packages)),
            "raw_data_file (id, name, raw_data_package_id)": io.StringIO("".join(files))}


def flush_lsn_past_the_proxy(ctx: BenchContext) -> int:
    """Main's flush LSN once COPY has committed (at or past its commit record), read on the
    bench's direct connection. Read on COPY's own connection, behind the proxy, it cost three
    round trips to main (BEGIN, the SELECT, COMMIT: 0.75 s at 250 ms) inside COPY's replay
    clock, which the drain does not pay: its commit LSN comes back in its batch's one round trip."""
    with ctx.direct.connect() as conn:
        return lsn_to_int(conn.execute(sa.text("SELECT pg_current_wal_flush_lsn()::text")).scalar_one())


def copy_once(ctx: BenchContext, main_url: str, n: int) -> dict:
    buffers = _copy_buffers(n)
    meter = stack_meter(ctx.stack)
    conn = psycopg2.connect(_libpq_url(main_url))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")  # connected and warm before the clock starts
            conn.commit()
            cpu_before = meter.snapshot()
            began = time.perf_counter()
            for target, data in buffers.items():
                cur.copy_expert(f"COPY {target} FROM STDIN", data)
            conn.commit()
            committed = time.perf_counter() - began
            cpu = cpu_per_tx(meter.since(cpu_before, committed), n)
        lsn = flush_lsn_past_the_proxy(ctx)
        while True:
            with ctx.replica.connect() as rconn:
                replay = rconn.execute(sa.text("SELECT pg_last_wal_replay_lsn()::text")).scalar()
            if replay and lsn_to_int(replay) >= lsn:
                break
            time.sleep(0.002)
        replayed = time.perf_counter() - began
    finally:
        conn.close()
    rows = n * ROWS_PER_SEED_TX
    return {"rows": rows, "commit_s": committed, "replayed_s": replayed,
            "rows_per_s": rows / committed, "tx_equivalent_per_s": n / committed, "cpu": cpu}


def measure_ceiling(ctx: BenchContext, main_url: str, n: int, repeats: int) -> dict:
    """Median of `repeats` COPY runs of `n` seed transactions' rows, each into freshly truncated
    tables, as each drain run is (`BenchContext.phase`); the tables are left truncated."""
    runs = []
    for _ in range(repeats):
        ctx.truncate()  # not the previous phase's rows, nor the previous repeat's dead tuples
        runs.append(copy_once(ctx, main_url, n))
    ctx.truncate()
    out = {"transactions": n, "rows": n * ROWS_PER_SEED_TX, "repeats": repeats,
           "rows_per_s": median([r["rows_per_s"] for r in runs]),
           "tx_equivalent_per_s": median([r["tx_equivalent_per_s"] for r in runs]),
           "commit_s": median([r["commit_s"] for r in runs]),
           "replayed_s": median([r["replayed_s"] for r in runs]),
           "repeats_rows_per_s": [round(r["rows_per_s"]) for r in runs],
           "cpu": sorted(runs, key=lambda r: r["rows_per_s"])[len(runs) // 2]["cpu"]}  # the median run's
    return out
