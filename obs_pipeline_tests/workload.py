"""A realistic workload for fault tests: observations started (with a package and files),
some finished by a later transaction that depends on the start, and a check that main holds
each exactly once."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import sqlalchemy as sa

from obs_pipeline.drain import Drain, DrainConfig
from obs_pipeline.ingest import TransactionBuffer


@dataclass
class Observation:
    obs_id: str
    package_id: str
    start_tx: str
    finish_tx: str | None


def buffer_observations(buf: TransactionBuffer, count: int, finish_every: int = 2, files: int = 2,
                        obs_unit_id: int = 1) -> list[Observation]:
    out = []
    for i in range(count):
        with buf.transaction(endpoint="start_observation") as tx:
            obs = tx.create("ExecutedObsUnit", {"obs_unit_id": obs_unit_id, "start_time": "2025-01-01T00:00:00Z",
                                                "status": "running"})
            pkg = tx.create("RawDataPackage", {"name": f"pkg{i}", "executed_obs_unit_id": obs["id"]})
            tx.bulk_create("RawDataFile", [{"name": f"f{i}_{j}.fits", "raw_data_package_id": pkg["id"]}
                                           for j in range(files)])
        finish = None
        if finish_every and i % finish_every == 0:
            finish = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed",
                                                              "end_time": "2025-01-01T01:00:00Z"})
        out.append(Observation(obs["id"], pkg["id"], tx.transaction_id, finish))
    return out


def assert_applied_exactly_once(engine: sa.Engine, observations: list[Observation], files: int = 2,
                                others: Collection[str] = ()) -> None:
    """Every observation once, with its files, finished ones completed; nothing else (but the
    transactions `others`, whose ids count among those recorded applied)."""
    with engine.connect() as conn:
        rows = dict(conn.execute(sa.text("SELECT id::text, status FROM executed_obs_unit")).all())
        pkg_files = dict(conn.execute(sa.text(
            "SELECT raw_data_package_id::text, count(*) FROM raw_data_file GROUP BY 1")).all())
        applied = conn.execute(sa.text("SELECT count(*) FROM obs_pipeline_applied")).scalar_one()
    assert len(rows) == len(observations)
    for o in observations:
        assert rows[o.obs_id] == ("completed" if o.finish_tx else "running"), o
        assert pkg_files[o.package_id] == files, o
    expected_txs = len(observations) + sum(1 for o in observations if o.finish_tx) + len(others)
    assert applied == expected_txs


def look_once_the_replica_caught_up(drain: Drain, main_engine: sa.Engine, replica_engine: sa.Engine) -> None:
    """Whenever `drain` asks how far the replica has replayed, the replica first catches up with
    main: a full batch is cleaned in its own step only if the replica has replayed it when the
    step looks, a few ms after the commit, else in the next step's overlap, and a replica late by
    that much on a busy machine changed what a test saw."""
    from obs_pipeline_tests.conftest import wait_for_replica

    looks = drain._replay_lsn

    def caught_up() -> int | None:
        wait_for_replica(main_engine, replica_engine)
        return looks()

    drain._replay_lsn = caught_up


def push_raw(redis_client, site: str, tx_id: str, *steps: dict) -> str:
    """Push as a raw producer does (contract section 4): the id and its steps only, no status and
    no caches, the steps numbered. Returns the entry."""
    from obs_pipeline.keys import SiteKeys

    raw = json.dumps({"transaction_id": tx_id, "steps": [{"step_id": f"s{n}", **step}
                                                         for n, step in enumerate(steps)]})
    redis_client.lpush(SiteKeys(site).buffer, raw)
    return raw


def create_unit(unit: int, name: str) -> dict:
    """A raw producer's step: make obs unit `unit`."""
    return {"operation": "create", "model_class": "ObsUnit", "data": {"id": unit, "name": name}}


def rename_unit(unit: int, name: str) -> dict:
    """A raw producer's step: rename obs unit `unit`."""
    return {"operation": "update", "model_class": "ObsUnit", "conditions": {"id": unit}, "data": {"name": name}}


def drain_steps(settings, steps: int, batch_size: int = 1) -> None:
    """`steps` drain cycles of `batch_size` transactions: apply, await replay, clean, each step
    looking at the replica once it has caught up (look_once_the_replica_caught_up)."""
    drain = Drain(settings, DrainConfig(batch_size=batch_size))
    main = sa.create_engine(settings.main_db_url, poolclass=sa.pool.NullPool)
    replica = sa.create_engine(settings.replica_db_url, poolclass=sa.pool.NullPool)
    look_once_the_replica_caught_up(drain, main, replica)
    try:
        drain.acquire()
        for _ in range(steps):
            drain.step()
    finally:
        drain.close()
        main.dispose()
        replica.dispose()


def drain_one_batch(settings, **config):
    """One claim/apply/acknowledge/clean cycle under the lease; its BatchReport."""
    drain = Drain(settings, DrainConfig(**config))
    try:
        drain.acquire()
        return drain.step()
    finally:
        drain.close()


def drain_until_settled(settings, timeout_s: float = 120, **config) -> None:
    """Run drains until nothing is buffered, processing, retrying or awaiting replication."""
    import time

    drain = Drain(settings, DrainConfig(**config))
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            drain.run(until_empty=True, budget_s=max(1.0, deadline - time.monotonic()), lease_wait_s=10)
            if not drain.redis.zcard(drain.store.keys.retry):
                return
            time.sleep(0.2)
        raise AssertionError(f"drain did not settle in time: {_drain_state(drain)}")
    finally:
        drain.close()


def _drain_state(drain) -> dict:
    """What is left, for the failure message: each retry (due in s, id, metadata), held_ids,
    the lease holder and the queues' lengths."""
    import json
    import time

    keys = drain.store.keys
    retry = [(round(due - time.time(), 2), json.loads(m).get("transaction_id"), json.loads(m).get("metadata"))
             for m, due in drain.redis.zrange(keys.retry, 0, -1, withscores=True)]
    return {"retry": retry, "held_ids": drain.redis.hgetall(keys.held_ids), "lease": drain.store.lease_holder(),
            "buffer": drain.redis.llen(keys.buffer), "processing": drain.redis.llen(keys.processing),
            "failed": drain.redis.llen(keys.failed)}


@contextlib.contextmanager
def replay_paused(replica_engine: sa.Engine) -> Iterator[None]:
    """The replica stops replaying WAL inside the block (it still receives it), as a stuck or
    lagging replica would; replay resumes on the way out, whatever happened."""
    with replica_engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_wal_replay_pause()"))
    try:
        yield
    finally:
        with replica_engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_wal_replay_resume()"))


def with_statement_timeout(settings, ms: int, setting: str = "statement_timeout"):
    """The settings with main's URL giving the drain's sessions this statement_timeout (or
    another `setting`, lock_timeout say)."""
    url = sa.engine.make_url(settings.main_db_url).update_query_dict({"options": f"-c {setting}={ms}"})
    return dataclasses.replace(settings, main_db_url=url.render_as_string(hide_password=False))


@contextlib.contextmanager
def slow_file_inserts(main_engine, sleep_s: float, name: str | None = None):
    """Inside the block, main takes `sleep_s` longer to insert each raw_data_file row (only the
    row of that `name`, if given): a trigger that sleeps, dropped on the way out."""
    condition = "TRUE" if name is None else f"NEW.name = '{name}'"
    with main_engine.begin() as conn:
        conn.execute(sa.text("DROP TRIGGER IF EXISTS obs_test_slow_file ON raw_data_file"))
        conn.execute(sa.text(f"CREATE OR REPLACE FUNCTION obs_test_slow_file() RETURNS trigger LANGUAGE plpgsql AS "
                             f"$$ BEGIN IF {condition} THEN PERFORM pg_sleep({sleep_s}); END IF; RETURN NEW; END $$"))
        conn.execute(sa.text("CREATE TRIGGER obs_test_slow_file BEFORE INSERT ON raw_data_file "
                             "FOR EACH ROW EXECUTE FUNCTION obs_test_slow_file()"))
    try:
        yield
    finally:
        with main_engine.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER IF EXISTS obs_test_slow_file ON raw_data_file"))
            conn.execute(sa.text("DROP FUNCTION IF EXISTS obs_test_slow_file()"))


@contextlib.contextmanager
def cancelled_once_while_sleeping(main_engine, application_name: str, wait_s: float = 120) -> Iterator[list]:
    """Inside the block, another session cancels (pg_cancel_backend, as an administrator would)
    the statement of the session on main named `application_name`, once, the first time it is
    seen active in pg_sleep (a trigger of slow_file_inserts: mid-batch). Yields a list that gets
    (pid, what pg_cancel_backend returned); on the way out the watcher stops (within `wait_s` of
    its start it gives up looking)."""
    import threading
    import time

    cancelled: list[tuple[int, bool]] = []
    done = threading.Event()
    find = sa.text("SELECT pid FROM pg_stat_activity WHERE application_name = :name AND state = 'active' "
                   "AND wait_event = 'PgSleep' AND pid <> pg_backend_pid() LIMIT 1")

    def watch() -> None:
        deadline = time.monotonic() + wait_s
        with main_engine.connect() as conn:
            while not done.is_set() and time.monotonic() < deadline:
                pid = conn.execute(find, {"name": application_name}).scalar()
                if pid is not None:
                    ok = conn.execute(sa.text("SELECT pg_cancel_backend(:pid)"), {"pid": pid}).scalar_one()
                    cancelled.append((pid, ok))
                    return
                conn.rollback()  # a fresh snapshot of pg_stat_activity each time
                time.sleep(0.01)

    watcher = threading.Thread(target=watch, name="obs-test-canceller", daemon=True)
    watcher.start()
    try:
        yield cancelled
    finally:
        done.set()
        watcher.join(timeout=30)


# Holds Redis for ARGV[1] seconds (TIME advances inside a script; the spin cap bounds it anyway)
HOLD_REDIS = """local function now() local t = redis.call('TIME') return t[1] * 1000000 + t[2] end
local start, spins = now(), 0
while now() - start < tonumber(ARGV[1]) * 1000000 and spins < 50000000 do spins = spins + 1 end
return spins"""


def exec_answered_late(pipe, seconds: float = 1.5, timeout_s: float = 0.3) -> None:
    """Make this WATCHing pipeline's MULTI, queued and not yet sent, hold Redis `seconds`, past a
    socket timeout of `timeout_s` on its connection (this socket only): Redis applies all of it,
    and the client times out waiting for the EXEC's reply, as a `retry --all` of a million letters
    did past the CLI's 5 s."""
    pipe.eval(HOLD_REDIS, 0, seconds)
    conn = pipe.connection
    if hasattr(conn, "update_current_socket_timeout"):
        conn.update_current_socket_timeout(timeout_s)
    else:  # redis-py < 7.0 has no such method: the socket's own timeout (the timeout drops the connection)
        conn._sock.settimeout(timeout_s)


def kill_connection(redis_client, pipe) -> None:
    """Redis closes this WATCHing pipeline's connection (CLIENT KILL), as a restart or a reset link
    would: what it sends next is lost."""
    pipe.connection.send_command("CLIENT", "ID")
    redis_client.client_kill_filter(_id=pipe.connection.read_response())
