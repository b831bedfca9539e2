"""An observing script: observations start, record files, and finish, at a given rate.

Each observation is three buffered transactions, as at the telescope: start (the executed
obs unit and its data package), files (a bulk create), finish (an update of the start's
record, usually while it is still buffered).
"""

from __future__ import annotations

import datetime as dt
import math
import random
import time
from dataclasses import dataclass

import sqlalchemy as sa

from obs_pipeline.ingest import TransactionBuffer


@dataclass
class SimulationResult:
    observations: int = 0
    transactions: int = 0
    last_transaction_id: str | None = None


def known_obs_units(buffer: TransactionBuffer) -> list[int]:
    """The obs units to observe, from the replica; its errors in one line that names it and says
    what to do (they were psycopg2's alone: "connection to server ... failed", `relation "obs_unit"
    does not exist`)."""
    engine = buffer.query.engine
    if engine is None:
        return []
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(sa.text("SELECT id FROM obs_unit ORDER BY id LIMIT 1000"))]
    except sa.exc.ProgrammingError as error:
        if getattr(error.orig, "pgcode", None) != "42P01":  # undefined_table
            raise
        raise RuntimeError("no obs_unit table on the replica (OBS_REPLICA_DB_URL): run `obs-pipeline db init "
                           "--demo-data` first") from error
    except sa.exc.OperationalError as error:
        from obs_pipeline.apply import hot_standby_off, replica_hot_standby_off

        if hot_standby_off(error):
            raise RuntimeError(f"{replica_hot_standby_off(engine.url)}; simulate picks its obs units there") from error
        lines = str(error.orig or error).strip().splitlines()
        raise RuntimeError(f"replica unreachable (OBS_REPLICA_DB_URL): {lines[0] if lines else type(error).__name__}; "
                           "simulate picks its obs units there: is OBS_REPLICA_DB_URL right and the stack up "
                           "(`obs-pipeline stack status`)?") from error


def observe_once(buffer: TransactionBuffer, obs_unit_id: int, files: int, rng: random.Random) -> list[str]:
    """Start, record files, finish: returns the three transaction ids."""
    start = dt.datetime.now(dt.timezone.utc)
    with buffer.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": obs_unit_id, "start_time": start, "status": "running"})
        pkg = tx.create("RawDataPackage", {"name": f"obs_{obs_unit_id}_{start:%Y%m%dT%H%M%S%f}",
                                           "executed_obs_unit_id": obs["id"]})
    with buffer.transaction(endpoint="record_files") as files_tx:
        files_tx.bulk_create("RawDataFile", [{"name": f"{pkg['name']}_{i:03d}.fits", "raw_data_package_id": pkg["id"]}
                                             for i in range(files)])
    status = "completed" if rng.random() > 0.05 else "aborted"
    finish = buffer.update("ExecutedObsUnit", obs["id"],
                           {"status": status, "end_time": dt.datetime.now(dt.timezone.utc)},
                           endpoint="finish_observation")
    return [tx.transaction_id, files_tx.transaction_id, finish]


def simulate(buffer: TransactionBuffer, *, rate: float, count: int | None, duration_s: float | None,
             files: int = 3, seed: int | None = None, echo=print,
             result: SimulationResult | None = None) -> SimulationResult:
    """`result`: filled in as it goes, so a caller stopped by Ctrl-C can still say what was buffered."""
    units = known_obs_units(buffer)
    if not units:
        raise RuntimeError("no ObsUnit rows on the replica: run `obs-pipeline db init --demo-data` first")
    rng = random.Random(seed)
    result = SimulationResult() if result is None else result
    began = time.monotonic()
    interval = 1.0 / rate if rate > 0 else 0.0
    ends_at = began + duration_s if duration_s is not None else math.inf
    echo_every = max(1, int(min(rate * 10, 1e9)))  # (rate * 10 is inf for a rate near the float's top)
    while (count is None or result.observations < count) and time.monotonic() < ends_at:
        ids = observe_once(buffer, rng.choice(units), files, rng)
        result.observations += 1
        result.transactions += len(ids)
        result.last_transaction_id = ids[-1]
        if echo and result.observations % echo_every == 0:
            echo(f"{result.observations} observations buffered ({result.transactions} transactions)")
        if count is not None and result.observations >= count:
            break  # done: the pause before a next observation would only delay the return
        # until the next observation is due, or the duration ends, whichever comes first; in
        # steps of an hour at most (time.sleep refuses a pause beyond time_t, a rate of 1e-300)
        next_at = min(began + result.observations * interval, ends_at)
        while (left := next_at - time.monotonic()) > 0:
            time.sleep(min(left, 3600.0))
    return result
