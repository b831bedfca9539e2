"""`obs-pipeline` operations as an operator runs them, each a real process: the stack, `db init`,
a long-running `drain` stopped by a signal, `status`, `simulate`, the Dagster workspace, and
`dev`, the main job."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import termios
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

import pytest
import redis as redis_lib
import sqlalchemy as sa

from obs_pipeline.config import installed_script
from obs_pipeline.keys import SiteKeys
from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline.stack import LocalStack
from obs_pipeline.stack.osutil import pick_free_ports, pid_alive, port_is_free
from obs_pipeline.stop_signals import STOP_SIGNALS
from obs_pipeline_tests.conftest import OBS_UNIT_IDS, wait_for_replica
from obs_pipeline_tests.stack_fixtures import live_processes
from obs_pipeline_tests.examples import seed_example_json
from obs_pipeline_tests.test_cli import cli, env, one_line_error  # noqa: F401  (env is a fixture)
from obs_pipeline_tests.test_stack import run as run_sql

REPO = Path(__file__).resolve().parents[1]
MODEL_TABLES = {"obs_unit", "executed_obs_unit", "raw_data_package", "raw_data_file"}
WAIT = 180  # seconds for anything that polls a process on a shared 2-core machine


def base_env(**extra: str) -> dict[str, str]:
    """The test's environment without OBS_* and DAGSTER_HOME, plus `extra`."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith("OBS_") and k != "DAGSTER_HOME"}
    return {**kept, **extra}


def start_cli(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`obs-pipeline ARGS` in the background, SIGINT at its default as in a terminal (a shell
    that ran pytest in the background may have it ignored), output in `log`."""
    return subprocess.Popen([sys.executable, "-m", "obs_pipeline.cli", *args], env=base_env(**env),
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def kill_if_running(process: subprocess.Popen | None) -> None:
    """A test's cleanup whatever it asserted: SIGKILL to what `start_cli` started, its group too."""
    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return f"(no {path})"


def until(predicate, timeout: float = WAIT, interval: float = 0.2, alive: subprocess.Popen | None = None,
          log: Path | None = None) -> bool:
    """Poll `predicate` (exceptions count as "not yet"); fail at once if `alive` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except Exception:  # noqa: BLE001 - e.g. a server still starting
            pass
        if alive is not None and alive.poll() is not None:
            pytest.fail(f"{alive.args[3:]} exited with {alive.returncode}:\n" + (tail(log) if log else ""))
        time.sleep(interval)
    return False


def tables(url: str) -> set[str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


# --- 1. the stack -----------------------------------------------------------------------------

def test_stack_up_status_env_down_through_the_cli(tmp_path):
    """A second stack, in a fresh folder, driven only through `obs-pipeline stack ...`."""
    folder = str(tmp_path / "stack")
    try:
        up = cli("stack", "up", "--dir", folder)
        assert up.returncode == 0, up.stderr
        assert "local stack up in" in up.stderr

        status = cli("stack", "status", "--dir", folder)
        assert status.returncode == 0, status.stderr
        running = json.loads(status.stdout)
        for name in ("main", "replica", "redis"):
            assert running[name]["running"] is True and pid_alive(running[name]["pid"]), running
        assert running["proxy"]["running"] is False and running["proxy"]["latency_ms"] == 0  # no latency asked
        assert running["replica"]["replay_lsn"]

        printed = cli("stack", "env", "--dir", folder)
        assert printed.returncode == 0, printed.stderr
        exported = dict(line.removeprefix("export ").split("=", 1) for line in printed.stdout.splitlines())
        assert exported["OBS_SITE"] == "observatory"  # OBS_* are not in cli()'s environment
        assert f":{running['redis']['port']}/" in exported["OBS_REDIS_URL"]
        assert f":{running['main']['port']}/obs" in exported["OBS_MAIN_DB_URL"]
        assert f":{running['replica']['port']}/obs" in exported["OBS_REPLICA_DB_URL"]
        client = redis_lib.Redis.from_url(exported["OBS_REDIS_URL"], socket_timeout=5)
        assert client.ping()
        client.close()
        assert run_sql(exported["OBS_MAIN_DB_URL"], "SELECT pg_is_in_recovery()") is False
        assert run_sql(exported["OBS_REPLICA_DB_URL"], "SELECT pg_is_in_recovery()") is True

        down = cli("stack", "down", "--dir", folder)
        assert down.returncode == 0, down.stderr
        stopped = json.loads(cli("stack", "status", "--dir", folder).stdout)
        assert not any(s["running"] for s in stopped.values()), stopped
        for name in ("main", "replica", "redis"):
            assert not pid_alive(running[name]["pid"]), f"{name} (pid {running[name]['pid']}) outlived `down`"
            assert port_is_free(running[name]["port"])
    finally:
        LocalStack(folder).down()


# --- 2. db init -------------------------------------------------------------------------------

@pytest.fixture
def fresh_database(stack, stack_urls):
    """An empty database on the session stack's main (the replica gets it by replication);
    yields (main URL, replica URL) for it, dropped afterwards."""
    name = f"init_{uuid.uuid4().hex[:10]}"
    run_sql(stack.main_direct_url, f'CREATE DATABASE "{name}"')
    main = sa.engine.make_url(stack_urls["OBS_MAIN_DB_URL"]).set(database=name)
    replica = sa.engine.make_url(stack_urls["OBS_REPLICA_DB_URL"]).set(database=name)
    try:
        yield main.render_as_string(hide_password=False), replica.render_as_string(hide_password=False)
    finally:
        run_sql(stack.main_direct_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_db_init_creates_the_schema_that_reaches_the_replica_and_runs_again_harmlessly(fresh_database, env):
    main_url, replica_url = fresh_database
    env = {**env, "OBS_MAIN_DB_URL": main_url, "OBS_REPLICA_DB_URL": replica_url}
    assert tables(main_url) == set()

    first = cli("db", "init", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stderr.strip() == "schema ready on main (4 models)"
    assert tables(main_url) == MODEL_TABLES | {"obs_pipeline_applied"}
    assert until(lambda: tables(replica_url) == MODEL_TABLES | {"obs_pipeline_applied"}, 60), tables(replica_url)
    assert run_sql(main_url, "SELECT count(*) FROM obs_unit") == 0

    demo = cli("db", "init", "--demo-data", env=env)
    assert demo.returncode == 0, demo.stderr
    assert "demo obs units 1-200" in demo.stderr
    ids = "SELECT count(*) FROM obs_unit WHERE id BETWEEN 1 AND 200"
    assert run_sql(main_url, ids) == 200 == run_sql(main_url, "SELECT count(*) FROM obs_unit")
    assert until(lambda: run_sql(replica_url, ids) == 200, 60)

    run_sql(main_url, "UPDATE obs_unit SET name = 'renamed by hand' WHERE id = 7")
    run_sql(main_url, "INSERT INTO obs_pipeline_applied (transaction_id, site) VALUES ('kept', 'x')")
    again = cli("db", "init", "--demo-data", env=env)
    assert again.returncode == 0, again.stderr
    assert run_sql(main_url, "SELECT count(*) FROM obs_unit") == 200
    assert run_sql(main_url, "SELECT name FROM obs_unit WHERE id = 7") == "renamed by hand"
    assert run_sql(main_url, "SELECT count(*) FROM obs_pipeline_applied") == 1


def test_db_init_demo_data_with_models_without_obs_unit_is_one_line_and_writes_nothing(fresh_database, env):
    """A site's own models (OBS_MODELS) need not have the demo's obs_unit table: `db init
    --demo-data` created their schema, then failed on psycopg2's 'relation "obs_unit" does not
    exist', the line saying nothing of OBS_MODELS nor that the schema was made."""
    main_url, replica_url = fresh_database
    env = {**env, "OBS_MAIN_DB_URL": main_url, "OBS_REPLICA_DB_URL": replica_url,
           "OBS_MODELS": "obs_pipeline_tests.custom_models:Base"}
    result = cli("db", "init", "--demo-data", env=env)
    assert one_line_error(result) == (
        "obs-pipeline: error: --demo-data inserts obs units 1-200 into an obs_unit table (id, name), which the "
        "models of OBS_MODELS (obs_pipeline_tests.custom_models:Base) do not have: leave --demo-data out; "
        "nothing was written")
    assert result.returncode == 1 and tables(main_url) == set()


def test_db_init_demo_data_on_the_shared_database_keeps_what_is_there(clean_db, env, main_engine, replica_engine):
    """The session's own `obs` database (already set up, with the fixture's obs units): `db init
    --demo-data` adds units 1-200 and changes none of the existing rows; the test then puts the
    obs units back as `clean_db` left them."""
    main_url, replica_url = env["OBS_MAIN_DB_URL"], env["OBS_REPLICA_DB_URL"]
    try:
        result = cli("db", "init", "--demo-data", env=env)
        assert result.returncode == 0, result.stderr
        assert tables(main_url) >= MODEL_TABLES | {"obs_pipeline_applied"}
        wait_for_replica(main_engine, replica_engine)
        for url in (main_url, replica_url):
            assert run_sql(url, "SELECT count(*) FROM obs_unit") == 200
            assert run_sql(url, "SELECT min(id) || '-' || max(id) FROM obs_unit") == "1-200"
            assert run_sql(url, "SELECT name FROM obs_unit WHERE id = 123") == "unit 123"  # the fixture's, kept
            assert run_sql(url, "SELECT name FROM obs_unit WHERE id = 4") == "obs unit 4"
        assert cli("db", "init", "--demo-data", env=env).returncode == 0
        assert run_sql(main_url, "SELECT count(*) FROM obs_unit") == 200
    finally:
        keep = ", ".join(str(i) for i in OBS_UNIT_IDS)
        with main_engine.begin() as conn:
            conn.execute(sa.text(f"DELETE FROM obs_unit WHERE id NOT IN ({keep})"))
        wait_for_replica(main_engine, replica_engine)


def test_db_inits_at_the_same_moment_on_a_fresh_database_all_succeed(stack, stack_urls):  # noqa: F811
    """`db init` by dev and by an operator at once (or two sites' drains setting up one main):
    each checked that a table was missing, then created it, and all but one failed with
    PostgreSQL's raw 'duplicate key value violates unique constraint "pg_type_typname_nsp_index"'
    (or 'relation ... already exists'). Rounds on fresh databases, as a round whose first caller
    finished before the others looked would show nothing."""
    from obs_pipeline.model_registry import ModelRegistry
    from obs_pipeline.schema import create_schema

    registry = ModelRegistry.from_path("obs_pipeline.models:Base")
    callers = 8
    for _ in range(5):
        name = f"init_{uuid.uuid4().hex[:10]}"
        run_sql(stack.main_direct_url, f'CREATE DATABASE "{name}"')
        main_url = sa.engine.make_url(stack_urls["OBS_MAIN_DB_URL"]).set(database=name)
        engines = [sa.create_engine(main_url, poolclass=sa.pool.NullPool) for _ in range(callers)]
        lined_up, errors = threading.Barrier(callers), []

        def init(engine: sa.Engine) -> None:
            try:
                lined_up.wait(timeout=60)
                create_schema(engine, registry)
            except Exception as error:  # noqa: BLE001 - every caller's failure is reported
                errors.append(" ".join(str(error).split())[:300])

        threads = [threading.Thread(target=init, args=(engine,)) for engine in engines]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=WAIT)
            assert errors == [], errors
            assert tables(main_url.render_as_string(hide_password=False)) == MODEL_TABLES | {"obs_pipeline_applied"}
        finally:
            for engine in engines:
                engine.dispose()
            run_sql(stack.main_direct_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- 3. drain, running until stopped ------------------------------------------------------------

def buffer_start(buf: TransactionBuffer, obs_unit_id: int = 1) -> str:
    with buf.transaction() as tx:
        tx.create("ExecutedObsUnit", {"obs_unit_id": obs_unit_id, "start_time": "2025-01-01T00:00:00Z",
                                      "status": "running"})
    return tx.transaction_id


@pytest.mark.usefixtures("clean_db")
def test_drain_without_once_drains_before_and_after_it_started_and_stops_on_sigint(env, settings, redis_client,
                                                                                  main_engine, tmp_path):
    buf = TransactionBuffer(settings=settings)
    keys = SiteKeys(settings.site)
    log = tmp_path / "drain.log"
    before = buffer_start(buf)
    drain = start_cli("drain", env=env, log=log)
    try:
        assert buf.wait(before, "replicated", timeout=WAIT), tail(log)
        after = buffer_start(buf, obs_unit_id=2)
        assert buf.wait(after, "replicated", timeout=WAIT), tail(log)
        assert drain.poll() is None, tail(log)  # an empty buffer does not end it
        assert redis_client.exists(keys.lease) == 1  # it holds the site while it runs
        third = buffer_start(buf, obs_unit_id=3)
        assert buf.wait(third, "replicated", timeout=WAIT), tail(log)
        assert drain.poll() is None, tail(log)

        drain.send_signal(signal.SIGINT)
        assert drain.wait(timeout=120) == 130, tail(log)  # cmd_drain: KeyboardInterrupt -> 130
    finally:
        kill_if_running(drain)
        buf.close()
    left = {"lease_pttl": redis_client.pttl(keys.lease), "processing": redis_client.lrange(keys.processing, 0, -1)}
    assert left == {"lease_pttl": -2, "processing": []}, (left, tail(log))
    assert "Traceback" not in tail(log)
    assert tail(log).strip().splitlines()[-1].startswith("obs-pipeline: interrupted")  # one line says so
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit")).scalar_one() == 3


@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_drain_stops_on_sigterm_and_releases_its_lease(env, settings, redis_client, tmp_path, sig):
    """A service manager (systemd, supervisord) stops a long-running drain with SIGTERM, as
    dev.py says of its own processes; the next drain should not wait out the lease. So does the
    terminal it runs in closing (SIGHUP): it killed the drain at once, the lease held for its TTL."""
    buf = TransactionBuffer(settings=settings)
    keys = SiteKeys(settings.site)
    log = tmp_path / "drain.log"
    drain = start_cli("drain", env=env, log=log)
    try:
        assert buf.wait(buffer_start(buf), "replicated", timeout=WAIT), tail(log)
        assert redis_client.exists(keys.lease) == 1
        drain.send_signal(getattr(signal, sig))
        code = drain.wait(timeout=120)
    finally:
        kill_if_running(drain)
        buf.close()
    assert code == 0 and "(asked to stop)" in tail(log), tail(log)  # a clean stop, said so
    assert redis_client.exists(keys.lease, keys.processing) == 0


@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize("waiting_for", ["another drain's lease", "the replica's replay"])
def test_drain_once_stops_on_sigterm_while_it_waits(env, settings, redis_client, main_engine, replica_engine, tmp_path,
                                                   waiting_for):
    """SIGTERM is to finish the batch in hand, release the lease and exit 0. A `drain --once`
    waiting for another drain's lease (up to --lease-ttl), or for the replica's replay of its
    batch (up to --replication-timeout), went on waiting all of it (89 s after the signal with
    --lease-ttl 90, then exit 1 saying another drain held the lease; 115 s with the replica
    stopped and --replication-timeout 120): a service manager's stop timeout (systemd's 90 s)
    ended it with SIGKILL, its lease held. Both waits now end at the signal: what it had not
    claimed stays buffered, what it applied is applied once, its caches kept for a later drain."""
    from obs_pipeline_tests.workload import replay_paused

    buf = TransactionBuffer(settings=settings)
    keys = SiteKeys(settings.site)
    log = tmp_path / "drain.log"
    tx_id = buffer_start(buf)
    drain = None
    with contextlib.ExitStack() as stack:
        if waiting_for == "another drain's lease":
            redis_client.set(keys.lease, "another-drain/held", px=300_000)
            stack.callback(redis_client.delete, keys.lease)
            args, reached = ("--lease-ttl", "90"), lambda: True
        else:
            stack.enter_context(replay_paused(replica_engine))
            args, reached = ("--replication-timeout", "120"), lambda: buf.status(tx_id) == "applied"
        try:
            drain = start_cli("drain", "--once", *args, env=env, log=log)
            assert until(reached, alive=drain, log=log), tail(log)
            time.sleep(2)  # waiting
            assert drain.poll() is None, tail(log)
            drain.send_signal(signal.SIGTERM)
            try:
                code = drain.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail(f"drain --once waited on for {waiting_for} after SIGTERM: {tail(log)}")
        finally:
            kill_if_running(drain)
            buf.close()
        lines = tail(log).strip().splitlines()
        assert code == 0 and lines[-1].endswith("(asked to stop)") and "Traceback" not in tail(log), lines
        if waiting_for == "another drain's lease":
            assert redis_client.get(keys.lease) == b"another-drain/held"  # not ours to touch
            assert [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.buffer, 0, -1)] == [tx_id]
        else:
            assert redis_client.exists(keys.lease, keys.processing) == 0
            assert redis_client.zcard(keys.awaiting_replication) == 1  # its caches, for a later drain
    with main_engine.connect() as conn:
        applied = conn.execute(sa.text("SELECT count(*) FROM obs_pipeline_applied WHERE transaction_id = :t"),
                               {"t": tx_id}).scalar_one()
    assert applied == (0 if waiting_for == "another drain's lease" else 1)


@pytest.mark.usefixtures("clean_db")
def test_a_running_drain_rides_out_a_redis_outage_and_drains_what_comes_after(stack, env, settings, redis_client,
                                                                                 main_engine, tmp_path):
    """`drain` runs until SIGTERM or Ctrl-C, and rides out main's outages; Redis stopped (a
    restart, maintenance) ended it, exit 1 with two lines, and a service manager's restart limit
    (systemd's: 5 in 10 s) could leave the site undrained for good. It says so in one line each
    time, starts again after a wait that doubles, its new run taking back the lease the lost one
    could not release (it waited out the lease's TTL: 120 s here), and drains what comes after;
    SIGTERM still ends it, exit 0."""
    buf = TransactionBuffer(settings=settings)
    keys = SiteKeys(settings.site)
    log = tmp_path / "drain.log"
    drain = start_cli("drain", "--lease-ttl", "120", env=env, log=log)
    try:
        assert buf.wait(buffer_start(buf), "replicated", timeout=WAIT), tail(log)
        stack.stop_service("redis")
        try:
            time.sleep(3)  # (it exited within a second)
            assert drain.poll() is None, tail(log)
        finally:
            stack.start_service("redis")
        after = [buffer_start(buf, obs_unit_id=i) for i in OBS_UNIT_IDS[:3]]
        assert all(buf.wait(tx_id, "replicated", timeout=60) for tx_id in after), tail(log)  # well within 120 s
        drain.send_signal(signal.SIGTERM)
        code = drain.wait(timeout=120)
    finally:
        kill_if_running(drain)
        buf.close()
    lines = tail(log).strip().splitlines()
    assert code == 0 and re.fullmatch(r"drained 4 transactions in [2-4] batches, 0 dead-lettered \(asked to stop\)",
                                      lines[-1]), lines  # (what each of its runs drained)
    down = [line for line in lines if "Redis unreachable" in line]
    assert down and all(line.startswith("obs-pipeline: Redis unreachable (") and
                        re.search(r"; the drain starts again in \d+ s$", line) for line in down), lines
    assert "Traceback" not in tail(log)
    assert redis_client.exists(keys.lease, keys.processing) == 0
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit")).scalar_one() == 4


# --- 4. status, as text -----------------------------------------------------------------------

def test_status_text_names_the_site_the_buffer_size_and_the_replication_lag(env, settings, redis_client):
    keys = SiteKeys(settings.site)
    for _ in range(2):
        redis_client.lpush(keys.buffer, seed_example_json(settings.site)[0])
    result = cli("status", "--check", env=env)
    lines = result.stdout.splitlines()
    assert re.fullmatch(rf"site {settings.site}: (healthy|degraded|unhealthy).*", lines[0]), lines
    assert result.returncode == {"healthy": 0, "degraded": 3, "unhealthy": 4}[lines[0].split()[2]], result.stderr
    assert any(re.fullmatch(r"\s*buffer 2, processing 0, retrying 0, failed 0, oldest pending [0-9.]+ s", line)
               for line in lines), lines
    assert any(re.fullmatch(r"\s*replication lag [0-9.]+ s, [0-9]+ bytes \(main [0-9A-F]+/[0-9A-F]+, "
                            r"replica [0-9A-F]+/[0-9A-F]+, [0-9]+ chunks awaiting replay\)", line)
               for line in lines), lines


# --- 4b. a spool a script left behind ------------------------------------------------------------

SPOOLING_SCRIPT = """
import json, sys
import redis
from obs_pipeline import spool as spool_module
from obs_pipeline.config import Settings
from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline_tests.workload import buffer_observations
spool_module.RETRY_INTERVAL_S = 600  # its flusher never pushes it: only the push at exit may
settings = Settings(**json.loads(sys.argv[1]))
buf = TransactionBuffer(settings=settings)
spooled = buffer_observations(buf, 2)  # Redis refuses writes: 2 starts and a finish spooled
assert buf.spool.pending() == 3, buf.spool.pending()
print(json.dumps([[o.obs_id, o.package_id, o.start_tx, o.finish_tx] for o in spooled]))
TransactionBuffer(settings=settings).close()  # a second buffer of the site: its spool is the same file
if sys.argv[2].startswith("takes-writes-at-exit"):
    redis.Redis.from_url(settings.redis_url).execute_command("REPLICAOF", "NO", "ONE")
if sys.argv[2] == "takes-writes-at-exit-without-threads":
    import threading
    def refuse(thread):  # as Python 3.12.0 and 3.12.1 do at exit, or a pids limit reached
        raise RuntimeError("can't create new thread at interpreter shutdown")
    threading.Thread.start = refuse
buf.close()
"""


def run_spooling_script(settings, at_exit: str, told: list | None = None) -> list:
    """The observations the script spooled; `told`, if given, gets what it wrote to stderr."""
    from obs_pipeline_tests.workload import Observation

    done = subprocess.run([sys.executable, "-c", SPOOLING_SCRIPT, json.dumps(settings.__dict__), at_exit],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if told is not None:
        told.append(done.stderr)
    return [Observation(*o) for o in json.loads(done.stdout)]


@pytest.mark.usefixtures("clean_db")
def test_a_spool_left_by_a_script_that_ended_during_an_outage_is_reported_and_pushed_by_the_cli(
        env, settings, redis_client, main_engine, tmp_path):
    """A script that ends while Redis refuses writes leaves its spool on disk: nothing pushed it
    until another script of the site ran on the host, and neither the script nor `status` said
    so. Now the script's exit says it in one line, `spool` shows it, `status` is degraded while Redis answers and it waits, and `spool push`
    pushes it in order; the drain applies each once."""
    from obs_pipeline_tests.test_reliability import assert_queues_empty, redis_refusing_writes
    from obs_pipeline_tests.workload import assert_applied_exactly_once, drain_until_settled

    keys, env = SiteKeys(settings.site), {**env, "OBS_SPOOL_DIR": settings.spool_dir}
    told = []
    with redis_refusing_writes(redis_client, "readonly", tmp_path):
        spooled = run_spooling_script(settings, "still-refusing-at-exit", told)
        # the script says what it leaves behind, once (it said nothing: its observations only on this host's disk)
        spool_file = Path(settings.spool_dir) / f"{settings.site}.jsonl"
        assert told[0].splitlines() == [
            f"3 spooled transaction(s) stay in {spool_file}: Redis did not take them before the script exited. They "
            f"are pushed when a script of site {settings.site} next runs on this host, or by `obs-pipeline spool "
            f"push` (run as this user, with OBS_SPOOL_DIR={settings.spool_dir})"], told[0]
        shown = cli("spool", env=env)
        assert shown.returncode == 0, shown.stderr
        assert re.fullmatch(rf"\S+/{settings.site}\.jsonl: 3 transaction\(s\) waiting, the oldest [0-9]+ s old\n",
                            shown.stdout), shown.stdout
        refused = cli("spool", "push", env=env)
        assert "3 transaction(s) still wait in the spool" in one_line_error(refused), refused.stderr
    assert redis_client.llen(keys.buffer) == 0  # nothing pushed it: the script is gone
    status = cli("status", "--json", "--check", env=env)
    assert status.returncode == 3, status.stderr  # degraded
    report = json.loads(status.stdout)
    assert report["status"] == "degraded" and report["local_spool"]["pending"] == 3, report
    assert any("3 transaction(s) wait in the local spool" in p and "run `obs-pipeline spool push`" in p
               for p in report["problems"]), report["problems"]
    pushed = cli("spool", "push", env=env)
    assert pushed.returncode == 0 and pushed.stderr.startswith("pushed 3 spooled transaction(s)"), pushed.stderr
    assert cli("spool", env=env).stdout.endswith(": 0 transaction(s) waiting\n")
    queue = [json.loads(e)["transaction_id"] for e in reversed(redis_client.lrange(keys.buffer, 0, -1))]
    assert queue == [t for o in spooled for t in (o.start_tx, o.finish_tx) if t]
    assert cli("spool", "push", env=env).stderr.startswith("pushed 0 spooled transaction(s)")
    report = json.loads(cli("status", "--json", env=env).stdout)
    assert report["local_spool"]["pending"] == 0 and not any("spool" in p for p in report["problems"]), report
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, spooled)
    assert_queues_empty(redis_client, settings.site)


def _obeying_file_permissions() -> list[str]:
    """A command prefix under which file permissions apply: root bypasses them (CAP_DAC_OVERRIDE)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: a file root may not read cannot be made")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def _another_users_spool(settings, tmp_path: Path) -> tuple[Path, Path]:
    """A spool folder whose lock file this user may not open (0, as another user's 0600 is)."""
    folder = tmp_path / "spool"
    folder.mkdir()
    (folder / f"{settings.site}.jsonl").write_text("")
    lock = folder / f"{settings.site}.lock"
    lock.touch()
    lock.chmod(0)
    return folder, lock


def test_status_with_a_spool_it_may_not_read_says_what_to_do_and_reports_the_rest(env, settings, tmp_path):
    """Another user's spool (its lock file 0600, as the spool makes it): status stopped with
    "obs-pipeline: error: [Errno 13] Permission denied: '.../site.lock'" (exit 1), no report of
    Redis, main or the replica, nothing saying what to do."""
    folder, lock = _another_users_spool(settings, tmp_path)
    base = {k: v for k, v in os.environ.items() if not k.startswith("OBS_")}

    def status(*args: str, **changes: str) -> subprocess.CompletedProcess:
        return subprocess.run([*_obeying_file_permissions(), sys.executable, "-m", "obs_pipeline.cli", "status", *args],
                              env={**base, **env, "OBS_SPOOL_DIR": str(folder), **changes},
                              capture_output=True, text=True, timeout=120)

    unreadable = (f"the local spool cannot be read (Permission denied: {lock}): run `obs-pipeline status` as the "
                  "user the observing scripts run as, or set OBS_SPOOL_DIR to their spool folder, or give this user "
                  "read and write access to it")
    text = status("--check")
    assert text.returncode == 3, text.stderr
    assert one_line_error(text) == f"obs-pipeline: site {settings.site} is degraded: {unreadable}"
    assert text.stdout.startswith(f"site {settings.site}: degraded ({unreadable})\n  buffer 0, processing 0"), text.stdout
    report = json.loads(status("--json").stdout)
    assert report["local_spool"]["error"] == unreadable and report["replication_lag"]["replica_lsn"], report
    down = status(OBS_REDIS_URL="redis://127.0.0.1:1/0")  # Redis down too: one line saying both
    assert down.returncode == 1 and down.stdout == ""
    line = one_line_error(down)
    assert line.startswith("obs-pipeline: error: Redis unreachable (") and line.endswith(f"; and {unreadable}"), line



def test_spool_and_spool_push_with_a_spool_they_may_not_read_say_what_to_do(env, settings, tmp_path):
    """Another user's spool (its lock file 0600, as the spool makes it): `spool` and `spool push`
    stopped with "obs-pipeline: error: [Errno 13] Permission denied: '.../site.lock'", nothing
    saying what to do (status said it already)."""
    folder, lock = _another_users_spool(settings, tmp_path)
    base = {k: v for k, v in os.environ.items() if not k.startswith("OBS_")}
    for command in (["spool"], ["spool", "push"]):
        done = subprocess.run([*_obeying_file_permissions(), sys.executable, "-m", "obs_pipeline.cli", *command],
                              env={**base, **env, "OBS_SPOOL_DIR": str(folder)}, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 1 and done.stdout == "", (command, done.stdout, done.stderr)
        assert one_line_error(done) == (
            f"obs-pipeline: error: the local spool cannot be read (Permission denied: {lock}): run "
            f"`obs-pipeline {' '.join(command)}` as the user the observing scripts run as, or set OBS_SPOOL_DIR to "
            "their spool folder, or give this user read and write access to it"), command

def spool_folder_gone_wrong(settings, tmp_path, layout: str) -> tuple[Path, str]:
    """OBS_SPOOL_DIR where no script could spool: a file (`file`), or a folder holding a folder
    where the spool keeps its file (`spool file`, `lock file`), or under a file (`under a file`); and
    the one line that says so."""
    why = "scripts could not spool there while Redis cannot take their transactions"
    if layout in ("file", "under a file"):
        (tmp_path / "spool").write_text("")
        folder = tmp_path / "spool" / ("sub" if layout == "under a file" else "")
        where = "is a file" if layout == "file" else f"lies under {tmp_path / 'spool'}, a file"
        return folder, (f"the spool folder {folder} (OBS_SPOOL_DIR) {where}: {why}; give OBS_SPOOL_DIR a folder "
                        "(made if missing), or move that file aside")
    folder = tmp_path / "spool"
    inside = folder / f"{settings.site}.{'jsonl' if layout == 'spool file' else 'lock'}"
    inside.mkdir(parents=True)
    return folder, (f"{inside} is a folder where the spool keeps a file (OBS_SPOOL_DIR {folder}): {why}; move that "
                    "folder aside, or give OBS_SPOOL_DIR another folder")


@pytest.mark.parametrize("layout", ["file", "under a file", "spool file", "lock file"])
def test_status_with_a_spool_folder_no_script_could_spool_in_is_unhealthy_naming_obs_spool_dir(env, settings, tmp_path,
                                                                                             layout):
    """OBS_SPOOL_DIR a file, or holding a folder where the spool keeps its lock file, showed as
    healthy ("local spool 0"), and its spool file a folder as degraded with advice about another
    user's permissions ("Is a directory"): every script would fail on the next outage (SpoolError)
    and none of them said so. Unhealthy now, one line naming OBS_SPOOL_DIR and what to do."""
    folder, line = spool_folder_gone_wrong(settings, tmp_path, layout)
    spool_env = {**env, "OBS_SPOOL_DIR": str(folder)}
    text = cli("status", "--check", env=spool_env)
    assert text.returncode == 4, (text.stdout, text.stderr)
    assert one_line_error(text) == f"obs-pipeline: site {settings.site} is unhealthy: {line}"
    assert f"  local spool: {line}\n" in text.stdout, text.stdout
    report = json.loads(cli("status", "--json", env=spool_env).stdout)
    assert report["status"] == "unhealthy" and report["local_spool"]["error"] == line, report
    down = one_line_error(cli("status", env={**spool_env, "OBS_REDIS_URL": "redis://127.0.0.1:1/0"}))
    assert down.startswith("obs-pipeline: error: Redis unreachable (") and down.endswith(f"; and {line}"), down


_MAKES_A_BUFFER = r"""
from obs_pipeline.config import ConfigError
from obs_pipeline.ingest import TransactionBuffer
try:
    TransactionBuffer.from_env().close()
    print("made")
except ConfigError as error:
    print(error)
"""


@pytest.mark.parametrize("where", ["the folder", "its parent (the folder not made yet)", "another user's folder"])
def test_a_spool_folder_this_user_may_not_write_is_unhealthy_and_refused_as_a_buffer_is_made(env, settings, tmp_path,
                                                                                           where):
    """OBS_SPOOL_DIR a folder the scripts' user may not write (another user's, a read-only file
    system), or one not made yet under such a folder: `status --check` said healthy and exited 0,
    TransactionBuffer() was made, and at the next outage every script lost its transaction to a
    SpoolError ("[Errno 13] Permission denied", "[Errno 30] Read-only file system"). Unhealthy
    now, and refused as a buffer is made, in one line naming OBS_SPOOL_DIR; nothing made there.
    (A read-only file system adds so to the line.) Another user's folder is not said by `status`:
    an operator may be looking at the scripts' folder, theirs to write."""
    why = "scripts could not spool there while Redis cannot take their transactions"
    locked = tmp_path / "spool"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    if where == "another user's folder":
        if os.geteuid() != 0:
            pytest.skip("a folder of another owner is made as root")
        os.chown(locked, 65534, 65534)
    folder = locked if where == "the folder" else locked / "obs"
    line = (f"the spool folder {folder} (OBS_SPOOL_DIR) may not be written by this user" if folder == locked else
            f"the spool folder {folder} (OBS_SPOOL_DIR) cannot be made: {locked} may not be written by this "
            f"user") + f": {why}; give OBS_SPOOL_DIR a folder this user may write (made if missing)"
    spool_env = {**{k: v for k, v in os.environ.items() if not k.startswith("OBS_")}, **env,
                 "OBS_SPOOL_DIR": str(folder)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*_obeying_file_permissions(), sys.executable, *args], env=spool_env,
                              capture_output=True, text=True, timeout=120)

    text = run("-m", "obs_pipeline.cli", "status", "--check")
    if where == "another user's folder":
        assert text.returncode == 0 and "local spool 0, oldest none" in text.stdout, (text.stdout, text.stderr)
    else:
        assert text.returncode == 4, (text.stdout, text.stderr)
        assert one_line_error(text) == f"obs-pipeline: site {settings.site} is unhealthy: {line}"
        assert f"  local spool: {line}\n" in text.stdout, text.stdout
    made = run("-c", _MAKES_A_BUFFER)
    assert (made.returncode, made.stdout.strip()) == (0, line), made.stderr
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("layout", ["file", "under a file", "spool file", "lock file"])
def test_spool_and_spool_push_with_a_spool_folder_no_script_could_spool_in_are_one_line_naming_obs_spool_dir(
        env, settings, tmp_path, layout):
    """They said "[Errno 21] Is a directory: '.../site.jsonl'", or, OBS_SPOOL_DIR a file or the
    lock file a folder, "0 transaction(s) waiting" and exit 0."""
    folder, line = spool_folder_gone_wrong(settings, tmp_path, layout)
    for command in (["spool"], ["spool", "push"]):
        done = cli(*command, env={**env, "OBS_SPOOL_DIR": str(folder)})
        assert one_line_error(done) == f"obs-pipeline: error: {line}", command
        assert done.stdout == "", command


@pytest.mark.usefixtures("clean_db")
def test_a_script_ending_with_a_spool_pushes_it_at_exit_if_redis_takes_it(env, settings, redis_client, main_engine,
                                                                          tmp_path):
    """The spool is pushed at interpreter exit (within EXIT_PUSH_S) when Redis takes it then:
    a script that spooled and ended at once left it on disk."""
    from obs_pipeline_tests.test_reliability import redis_refusing_writes

    with redis_refusing_writes(redis_client, "readonly", tmp_path):
        spooled = run_spooling_script(settings, "takes-writes-at-exit")
    _assert_pushed_in_order_then_applied_once(settings, redis_client, main_engine, spooled)


@pytest.mark.usefixtures("clean_db")
def test_a_script_that_may_start_no_thread_at_exit_still_pushes_its_spool_then(env, settings, redis_client,
                                                                              main_engine, tmp_path):
    """The exit push ran on a thread of its own: where none may start at exit (Python 3.12.0 and
    3.12.1 refuse every new thread in an atexit handler; a pids limit reached), it raised
    RuntimeError out of the handler, a traceback, and left the spool on disk though Redis took
    writes. Now the exiting thread pushes it, within EXIT_PUSH_S."""
    from obs_pipeline_tests.test_reliability import redis_refusing_writes

    told = []
    with redis_refusing_writes(redis_client, "readonly", tmp_path):
        spooled = run_spooling_script(settings, "takes-writes-at-exit-without-threads", told)
    assert "Traceback" not in told[0], told[0]
    _assert_pushed_in_order_then_applied_once(settings, redis_client, main_engine, spooled)


def _assert_pushed_in_order_then_applied_once(settings, redis_client, main_engine, spooled):
    """Nothing left in the spool, the buffer holds the spooled observations' transactions in
    their order, and a drain applies each once."""
    from obs_pipeline.spool import Spool
    from obs_pipeline_tests.workload import assert_applied_exactly_once, drain_until_settled

    assert Spool(settings.spool_dir, settings.site, flush_store=None).summary()["pending"] == 0
    queue = [json.loads(e)["transaction_id"] for e in
             reversed(redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1))]
    assert queue == [t for o in spooled for t in (o.start_tx, o.finish_tx) if t]
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, spooled)


FORKED_SPOOLING_SCRIPT = """
import json, multiprocessing, sys
import redis
from obs_pipeline import spool as spool_module
from obs_pipeline.config import Settings
from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline_tests.workload import buffer_observations
spool_module.RETRY_INTERVAL_S = 600  # no flusher pushes it: only the push at exit may
settings = Settings(**json.loads(sys.argv[1]))
buf = TransactionBuffer(settings=settings)
def observe(results):  # Redis refuses writes: 2 starts and a finish spooled by the child
    spooled = buffer_observations(buf, 2)
    results.put([[o.obs_id, o.package_id, o.start_tx, o.finish_tx] for o in spooled])
fork = multiprocessing.get_context("fork")
results = fork.SimpleQueue()
child = fork.Process(target=observe, args=(results,))
child.start()
child.join()
assert child.exitcode == 0, child.exitcode
print(json.dumps(results.get()))
assert buf.spool.pending() == 3, buf.spool.pending()
redis.Redis.from_url(settings.redis_url).execute_command("REPLICAOF", "NO", "ONE")
buf.close()
"""


@pytest.mark.usefixtures("clean_db")
def test_a_script_whose_forked_child_spooled_pushes_the_spool_at_exit(env, settings, redis_client,
                                                                     main_engine, tmp_path):
    """A script forks a child (multiprocessing) that buffers while Redis refuses writes: the
    child spools, and ends (a child of multiprocessing leaves without the exit push, its
    flusher with it). The script itself spooled nothing, so its exit did not push the spool
    although Redis took writes again: the child's observations stayed on disk, pending,
    until someone ran `spool push`. Now a TransactionBuffer's spool is pushed at exit."""
    from obs_pipeline_tests.test_reliability import redis_refusing_writes
    from obs_pipeline_tests.workload import Observation

    with redis_refusing_writes(redis_client, "readonly", tmp_path):
        script = [sys.executable, "-c", FORKED_SPOOLING_SCRIPT, json.dumps(settings.__dict__)]
        done = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    spooled = [Observation(*o) for o in json.loads(done.stdout)]
    _assert_pushed_in_order_then_applied_once(settings, redis_client, main_engine, spooled)


# --- 5. simulate --------------------------------------------------------------------------------

@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize("rate", ["inf", "nan", "0", "-1"])
def test_simulate_at_a_rate_that_is_no_rate_is_a_usage_line_and_buffers_nothing(env, settings, redis_client, rate):
    """inf and nan buffered an observation, then stopped on 'cannot convert float ... to integer'
    (exit 1); 0 and -1 buffered flat out, with no pacing at all."""
    result = cli("simulate", "--count", "2", "--rate", rate, env=env)
    assert result.returncode == 2, result.stderr
    assert one_line_error(result) == (f"obs-pipeline simulate: error: argument --rate: invalid value '{rate}': give "
                                      "observations per second, a finite number above 0 "
                                      "(see `obs-pipeline simulate -h`)")
    assert redis_client.llen(SiteKeys(settings.site).buffer) == 0


@pytest.mark.parametrize("args, message", [
    (["--count", "-1"], "argument --count: invalid value '-1': give observations, a whole number of 1 or more"),
    (["--count", "two"], "argument --count: invalid value 'two': give observations, a whole number of 1 or more"),
    (["--duration", "-1"], "argument --duration: invalid value '-1': give seconds, a finite number above 0"),
    (["--files", "-1"], "argument --files: invalid value '-1': give files per observation, a whole number from 1 "
                        "to 100000"),
])
def test_simulate_with_a_count_duration_or_files_that_cannot_be_is_a_usage_line(env, settings, redis_client, args,
                                                                              message):
    """--count -1 and --duration -1 buffered nothing and exited 0, as if done; --files -1 said
    only that a bulk_create needs a non-empty list of rows."""
    result = cli("simulate", "--count", "2", *args, env=env)
    assert result.returncode == 2, result.stderr
    assert one_line_error(result) == f"obs-pipeline simulate: error: {message} (see `obs-pipeline simulate -h`)"
    assert redis_client.llen(SiteKeys(settings.site).buffer) == 0


@pytest.mark.usefixtures("clean_db")
def test_simulate_with_more_files_than_a_transaction_may_write_is_a_usage_line_and_buffers_nothing(
        env, settings, redis_client):
    """The start was buffered, then the files' transaction refused ('... more than 100,000 records
    ...'), exit 1: an observation left running for ever."""
    result = cli("simulate", "--count", "1", "--files", "100001", env=env)
    assert result.returncode == 2, result.stderr
    assert one_line_error(result) == ("obs-pipeline simulate: error: argument --files: invalid value '100001': give "
                                      "files per observation, a whole number from 1 to 100000 "
                                      "(see `obs-pipeline simulate -h`)")
    assert redis_client.llen(SiteKeys(settings.site).buffer) == 0
    from obs_pipeline.buffer_store import MAX_TRANSACTION_WRITES
    from obs_pipeline.cli import MAX_FILES

    assert MAX_FILES == MAX_TRANSACTION_WRITES  # the parser's copy of ingest's limit


@pytest.mark.parametrize("args, message", [
    (["stack", "stop"], "obs-pipeline stack: error: `stack stop` needs a service: main, replica, redis or proxy"),
    (["stack", "up", "--main-latency-ms", "5001"], "obs-pipeline stack: error: argument --main-latency-ms: main "
     "latency must be a whole number of milliseconds from 0 to 5000 (each way; 0 removes the proxy), not 5001"),
    (["stack", "up", "--main-latency-ms", "1.5"], "obs-pipeline stack: error: argument --main-latency-ms: main "
     "latency must be a whole number of milliseconds from 0 to 5000 (each way; 0 removes the proxy), not '1.5'"),
    (["dev", "--main-latency-ms", "-1"], "obs-pipeline dev: error: argument --main-latency-ms: main "
     "latency must be a whole number of milliseconds from 0 to 5000 (each way; 0 removes the proxy), not -1"),
    (["failed", "show"], "obs-pipeline failed: error: `failed show` takes one transaction id"),
    (["failed", "discard"], "obs-pipeline failed: error: `failed discard` takes one transaction id"),
    (["failed", "discard", "obs-1", "--all"], "obs-pipeline failed: error: `failed discard` takes one transaction id"),
    (["failed", "retry"], "obs-pipeline failed: error: give one transaction id or --all"),
    (["failed", "list", "obs-1"], "obs-pipeline failed: error: `failed list` lists them all: `failed show ID` shows one"),
])
def test_a_command_line_missing_or_misgiving_an_argument_is_a_usage_error(tmp_path, env, args, message):
    """The README says a usage error exits 2; these exited 1 (`--main-latency-ms abc` exited 2,
    5001 exited 1), so a wrapper could not tell a mistyped line from a failure."""
    folder = tmp_path / "not_made"
    result = cli(*args, *(["--dir", str(folder)] if args[0] in ("stack", "dev") else []), env=env)
    assert result.returncode == 2, result.stderr
    assert one_line_error(result) == f"{message} (see `obs-pipeline {args[0]} -h`)"
    assert not folder.exists()


@pytest.mark.parametrize("args, message", [
    (["failed", "show"], "`failed show` takes one transaction id"),
    (["failed", "retry"], "give one transaction id or --all"),
    (["failed", "list", "obs-1"], "`failed list` lists them all: `failed show ID` shows one"),
])
def test_a_failed_command_line_misgiven_is_a_usage_error_before_the_settings_are_read(env, args, message):
    """Found by review: `failed show` without an id read OBS_MODELS and asked Redis before it
    looked at its own line; with a setting that does not load it exited 1 on that, not 2 with
    the usage line, as the README says a usage error does before anything is asked."""
    result = cli(*args, env={**env, "OBS_MODELS": "no_such_module_here:Base"})
    assert result.returncode == 2, result.stderr
    assert one_line_error(result) == f"obs-pipeline failed: error: {message} (see `obs-pipeline failed -h`)"


@pytest.mark.parametrize("args, message", [
    (["--port", "0"], "argument --port: invalid value '0': give a TCP port, a whole number from 1 to 65535"),
    (["--port", "70000"], "argument --port: invalid value '70000': give a TCP port, a whole number from 1 to 65535"),
    (["--simulate", "--rate", "nan"], "argument --rate: invalid value 'nan': give observations per second"),
])
def test_dev_with_a_port_or_rate_that_cannot_be_is_a_usage_line_before_anything_starts(tmp_path, args, message):
    """--port 0 brought the stack and Dagster up on a port the webserver picked at random while
    it printed http://127.0.0.1:0; 70000 said 'bind(): port must be 0-65535' (exit 1); --rate nan
    started everything, then the simulator stopped on it."""
    if args != ["--port", "70000"]:  # unchecked, these start the whole system: ask the parser alone
        from obs_pipeline.cli import build_parser

        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(["dev", "--dir", str(tmp_path / "dev_stack"), *args])
        assert exited.value.code == 2
        return
    folder = tmp_path / "dev_stack"
    result = subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "dev", "--dir", str(folder), *args],
                            env=base_env(), capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    line = one_line_error(result)
    assert line.startswith(f"obs-pipeline dev: error: {message}") and line.endswith("(see `obs-pipeline dev -h`)"), line
    assert not folder.exists()

@pytest.mark.usefixtures("clean_db")
def test_simulate_buffers_what_it_reports_and_a_drain_applies_it(env, settings, redis_client, main_engine,
                                                                replica_engine, tmp_path):
    env = {**env, "OBS_SPOOL_DIR": str(tmp_path / "spool")}
    result = cli("simulate", "--count", "4", "--rate", "20", "--seed", "7", env=env)
    assert result.returncode == 0, result.stderr
    assert "buffered 4 observations (12 transactions)" in result.stderr  # start, files, finish each
    keys = SiteKeys(settings.site)
    assert redis_client.llen(keys.buffer) == 12
    spooled = tmp_path / "spool" / f"{settings.site}.jsonl"
    assert not spooled.exists() or spooled.stat().st_size == 0  # Redis was up: nothing spooled

    drained = cli("drain", "--once", env=env)
    assert drained.returncode == 0, drained.stderr
    assert "drained 12 transactions" in drained.stderr and "0 dead-lettered" in drained.stderr
    assert redis_client.llen(keys.buffer) == 0
    wait_for_replica(main_engine, replica_engine)
    for engine in (main_engine, replica_engine):
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT obs_unit_id, status, end_time FROM executed_obs_unit")).all()
            files = conn.execute(sa.text("SELECT count(*) FROM raw_data_file")).scalar_one()
        assert len(rows) == 4 and files == 12  # 3 files per observation by default
        assert all(r.obs_unit_id in OBS_UNIT_IDS and r.status in ("completed", "aborted") and r.end_time
                   for r in rows), rows


@pytest.mark.usefixtures("clean_db")
def test_simulate_stopped_by_ctrl_c_says_what_it_buffered_and_exits_130(env, settings, redis_client, tmp_path):
    """`simulate` without --count runs until Ctrl-C, and then exited 0 saying nothing: how many
    observations it had buffered went unsaid, and the exit was not the 130 of every command."""
    log = tmp_path / "simulate.log"
    keys = SiteKeys(settings.site)
    sim = start_cli("simulate", "--rate", "20", env={**env, "OBS_SPOOL_DIR": str(tmp_path / "spool")}, log=log)
    try:
        assert until(lambda: redis_client.llen(keys.buffer) >= 6, alive=sim, log=log), tail(log)
        sim.send_signal(signal.SIGINT)
        assert sim.wait(timeout=60) == 130, tail(log)
    finally:
        if sim.poll() is None:
            sim.kill()
    last = log.read_text().strip().splitlines()[-1]
    said = re.fullmatch(r"obs-pipeline: stopped by Ctrl-C after buffering (\d+) observations \((\d+) transactions\); "
                        r"the one in progress may be left unfinished", last)
    assert said, last
    observations, transactions = int(said[1]), int(said[2])
    assert observations >= 2 and transactions == 3 * observations, last
    assert transactions <= redis_client.llen(keys.buffer) <= transactions + 2  # + a start and files in progress



@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize("args", [["--count", "1"], ["--duration", "3"]])
def test_simulate_at_a_slow_rate_ends_at_its_count_or_duration_not_a_pause_later(env, settings, redis_client,
                                                                               tmp_path, args):
    """It slept out the pause after the last observation: `--count 1 --rate 0.02` buffered its
    one observation, then waited 50 s before it returned; `--duration 3` waited the same 50 s."""
    began = time.monotonic()
    result = cli("simulate", "--rate", "0.02", *args, env={**env, "OBS_SPOOL_DIR": str(tmp_path / "spool")})
    took = time.monotonic() - began
    assert result.returncode == 0, result.stderr
    assert "buffered 1 observations (3 transactions)" in result.stderr, result.stderr
    assert redis_client.llen(SiteKeys(settings.site).buffer) == 3
    assert took < 30, f"took {took:.0f} s"


@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize("rate, args", [("1e308", ["--count", "2"]), ("1e-300", ["--duration", "2"])])
def test_simulate_at_an_extreme_rate_paces_without_an_overflow(env, settings, redis_client, tmp_path, rate, args):
    """Any finite rate above 0 is taken, and these buffered an observation, then stopped on
    'cannot convert float infinity to integer' (1e308: its echo's cadence) or 'timestamp out of
    range for platform time_t' (1e-300: its pause), exit 1, the run cut short."""
    result = cli("simulate", "--rate", rate, *args, env={**env, "OBS_SPOOL_DIR": str(tmp_path / "spool")})
    assert result.returncode == 0, result.stderr
    observations = 2 if args[0] == "--count" else 1
    assert f"buffered {observations} observations ({3 * observations} transactions)" in result.stderr, result.stderr
    assert redis_client.llen(SiteKeys(settings.site).buffer) == 3 * observations


# --- 6. the Dagster workspace -----------------------------------------------------------------------

def test_workspace_yaml_loads_the_definitions(tmp_path):
    result = subprocess.run([installed_script("dagster"), "definitions", "validate", "-w", "workspace.yaml"],
                            cwd=REPO, env=base_env(DAGSTER_HOME=str(tmp_path)), capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Validation successful for code location obs_pipeline.definitions" in output, output[-3000:]


# --- 7. dev, the main job ---------------------------------------------------------------------------

def descendants(pid: int) -> set[int]:
    """Live processes below `pid` (by parent pid, through new sessions too)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def with_environment(name: str, value: str) -> set[int]:
    """Live processes started with NAME=VALUE in their environment."""
    wanted = f"{name}={value}".encode()
    return live_processes(lambda entry: wanted in (entry / "environ").read_bytes().split(b"\0"))


def webserver_answers(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5) as response:
        return response.status == 200 and "dagster_webserver_version" in json.loads(response.read())


def replicated(client: redis_lib.Redis, key: str) -> bool:
    raw = client.get(key)
    return raw is not None and json.loads(raw)["status"] == "replicated"


def kill_what_dev_left(dev: subprocess.Popen | None, started: set[int], dagster_home: str, folder: Path) -> None:
    """A dev test's cleanup whatever it asserted: dev, what it started, and its stack."""
    kill_if_running(dev)
    for pid in started | with_environment("DAGSTER_HOME", dagster_home):
        for kill in (os.killpg, os.kill):  # its group if it leads one, and itself
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    LocalStack(folder).down()


@pytest.mark.slow
def test_dev_serves_the_ui_drains_through_the_daemon_and_ctrl_c_stops_everything(tmp_path):
    """The README's first command: the UI answers, a transaction pushed to its Redis is drained
    through the daemon's sensor and run, and Ctrl-C (twice, even) stops all it started."""
    folder = tmp_path / "dev_stack"
    port = pick_free_ports(1)[0]
    log = tmp_path / "dev.log"
    dagster_home = str(folder / "dagster_home")  # dev.py: DAGSTER_HOME in the stack folder
    dev = start_cli("dev", "--dir", str(folder), "--port", str(port), env={}, log=log)
    started: set[int] = set()
    try:
        assert until(lambda: webserver_answers(port), WAIT, 1.0, alive=dev, log=log), \
            f"no Dagster UI on port {port}:\n{tail(log)}\n{tail(folder / 'logs' / 'dagster-webserver.log')}"
        assert f"Dagster UI: http://127.0.0.1:{port}" in log.read_text()
        stack = LocalStack(folder)
        services = stack.status()
        assert all(services[name]["running"] for name in ("main", "replica", "redis")), services

        client = redis_lib.Redis.from_url(stack.env()["OBS_REDIS_URL"], socket_timeout=5)
        raw, tx, _ = seed_example_json("observatory")  # dev's site; obs unit 123 is in its demo data
        client.lpush(SiteKeys("observatory").buffer, raw)
        status_key = SiteKeys("observatory").transaction(tx["transaction_id"])
        assert until(lambda: replicated(client, status_key), WAIT, 0.5, alive=dev, log=log), \
            f"not replicated within {WAIT} s; daemon log:\n{tail(folder / 'logs' / 'dagster-daemon.log')}"
        client.close()
        assert run_sql(stack.env()["OBS_REPLICA_DB_URL"], "SELECT count(*) FROM executed_obs_unit") == 1

        # a second dev on this folder (another port): it started a second daemon on the same
        # DAGSTER_HOME, and the first, stopped, took the stack down under it
        second = subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "dev", "--dir", str(folder), "--port",
                                 str(pick_free_ports(1)[0])], env=base_env(), capture_output=True, text=True,
                                timeout=WAIT)
        assert second.returncode == 1 and second.stdout == "", second.stdout + second.stderr
        assert second.stderr.splitlines() == [
            f"obs-pipeline: error: another `obs-pipeline dev` runs on {folder} (pid {dev.pid}): stop it (Ctrl-C in "
            "its terminal), or give this one another --dir"], second.stderr
        assert with_environment("DAGSTER_HOME", dagster_home) <= descendants(dev.pid) and webserver_answers(port)

        started = descendants(dev.pid) | with_environment("DAGSTER_HOME", dagster_home)
        assert len(with_environment("DAGSTER_HOME", dagster_home)) >= 2  # at least the daemon and the webserver
        dev.send_signal(signal.SIGINT)
        time.sleep(0.5)
        dev.send_signal(signal.SIGINT)  # an impatient second Ctrl-C must not cut the cleanup short
        assert dev.wait(timeout=WAIT) == 0, tail(log)

        # everything dev started is gone: Dagster's processes and, as dev brought the stack up, the stack
        assert until(lambda: not any(pid_alive(p) for p in started), 30), [p for p in started if pid_alive(p)]
        assert with_environment("DAGSTER_HOME", dagster_home) == set()
        assert not any(s["running"] for s in stack.status().values()), stack.status()
        for name in ("main", "replica", "redis"):
            assert not pid_alive(services[name]["pid"]), f"{name} outlived dev"
        assert until(lambda: port_is_free(port), 30)
    finally:
        kill_what_dev_left(dev, started, dagster_home, folder)


def start_in_terminal(*args: str, log: Path) -> tuple[subprocess.Popen, Callable[[], None]]:
    """`obs-pipeline ARGS` in a terminal of its own (a pty it controls, as a login shell's
    command), what it prints copied into `log`; returns it and a function that closes the
    terminal (hangs it up)."""
    master, slave = os.openpty()

    def controlling_terminal() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, "-m", "obs_pipeline.cli", *args], env=base_env(), stdin=slave,
                            stdout=slave, stderr=slave, start_new_session=True, preexec_fn=controlling_terminal)
    os.close(slave)
    closing = threading.Event()

    def copy() -> None:  # never blocked in a read: the terminal hangs up only once no call holds it
        with open(log, "ab") as out:
            while not closing.is_set():
                if select.select([master], [], [], 0.1)[0]:
                    try:
                        out.write(os.read(master, 4096))
                    except OSError:
                        return
                    out.flush()

    copier = threading.Thread(target=copy, daemon=True)
    copier.start()

    def close() -> None:
        closing.set()
        copier.join()
        os.close(master)

    return proc, close


@pytest.mark.slow
def test_dev_whose_terminal_closes_stops_everything_and_a_second_dev_starts(tmp_path):
    """Closing the terminal (or a dropped ssh session) hangs `dev` up: SIGHUP, and its output
    can no longer be written. It died at once and left the Dagster daemon, its webserver and the
    stack running, so the next `dev` failed on its own port ('dagster-webserver exited with 3')
    beside a second daemon."""
    folder = tmp_path / "dev_stack"
    port = pick_free_ports(1)[0]
    dagster_home = str(folder / "dagster_home")
    started: set[int] = set()
    dev = None
    try:
        for attempt in ("first", "second"):
            log = tmp_path / f"dev-{attempt}.log"
            dev, close_terminal = start_in_terminal("dev", "--dir", str(folder), "--port", str(port), log=log)
            assert until(lambda: webserver_answers(port), WAIT, 1.0, alive=dev, log=log), tail(log)
            services = LocalStack(folder).status()
            started = descendants(dev.pid) | with_environment("DAGSTER_HOME", dagster_home) | {
                services[name]["pid"] for name in ("main", "replica", "redis")}
            close_terminal()  # the terminal window closes
            dev.wait(timeout=WAIT)
            assert until(lambda: not any(pid_alive(p) for p in started), 30), \
                [p for p in started if pid_alive(p)]
            assert not any(s["running"] for s in LocalStack(folder).status().values())
            assert until(lambda: port_is_free(port), 30)
    finally:
        kill_what_dev_left(dev, started, dagster_home, folder)


@pytest.mark.slow
def test_dev_stopped_by_two_signals_at_once_still_stops_everything(tmp_path):
    """systemd stops a unit with SIGTERM and, with `SendSIGHUP=yes`, SIGHUP right after it (so
    does a terminal closing while a service manager stops its job). The second signal's handler
    ran while the first's KeyboardInterrupt unwound, before the cleanup ignored stop signals:
    dev exited 130 without a word, leaving the Dagster daemon, its webserver and the stack up."""
    folder = tmp_path / "dev_stack"
    port = pick_free_ports(1)[0]
    log = tmp_path / "dev.log"
    dagster_home = str(folder / "dagster_home")
    dev = start_cli("dev", "--dir", str(folder), "--port", str(port), env={}, log=log)
    started: set[int] = set()
    try:
        assert until(lambda: webserver_answers(port), WAIT, 1.0, alive=dev, log=log), tail(log)
        services = LocalStack(folder).status()
        started = descendants(dev.pid) | with_environment("DAGSTER_HOME", dagster_home) | {
            services[name]["pid"] for name in ("main", "replica", "redis")}
        assert until(lambda: "Ctrl-C stops everything" in log.read_text(), WAIT, 0.2), tail(log)
        time.sleep(2)  # dev waits in its loop
        dev.send_signal(signal.SIGTERM)
        dev.send_signal(signal.SIGHUP)
        assert dev.wait(timeout=WAIT) == 0, tail(log)
        assert "stopping (up to 20 s" in log.read_text() and "Traceback" not in log.read_text(), tail(log)
        assert until(lambda: not any(pid_alive(p) for p in started), 30), [p for p in started if pid_alive(p)]
        assert not any(s["running"] for s in LocalStack(folder).status().values())
        assert until(lambda: port_is_free(port), 30)
    finally:
        kill_what_dev_left(dev, started, dagster_home, folder)


def group_leaders(dagster_home: str) -> set[int]:
    """The process groups of Dagster processes on DAGSTER_HOME (dev starts the daemon and the
    webserver each in a session of its own; their code servers and run workers join them)."""
    leaders = set()
    for pid in with_environment("DAGSTER_HOME", dagster_home):
        try:
            leaders.add(os.getpgid(pid))
        except ProcessLookupError:
            continue
    return leaders


@pytest.mark.slow
def test_dev_after_a_dev_killed_with_sigkill_stops_what_it_left_and_runs_one_daemon(tmp_path):
    """`kill -9` of dev left its Dagster daemon and webserver running (sessions of their own)
    and released its lock with it: the next `dev` started a second daemon (and webserver) on the
    same DAGSTER_HOME, two sensors ticking for one site. Now the next `dev` stops what the killed
    one recorded, says so in one line, and runs the only daemon; its Ctrl-C takes the stack down
    as the killed one's would have."""
    folder = tmp_path / "dev_stack"
    dagster_home = str(folder / "dagster_home")
    first_log, second_log = tmp_path / "dev-first.log", tmp_path / "dev-second.log"
    first_port, second_port = pick_free_ports(2)
    first = start_cli("dev", "--dir", str(folder), "--port", str(first_port), env={}, log=first_log)
    dev, started = first, set()
    try:
        assert until(lambda: webserver_answers(first_port), WAIT, 1.0, alive=first, log=first_log), tail(first_log)
        left = with_environment("DAGSTER_HOME", dagster_home)
        assert len(group_leaders(dagster_home)) == 2, group_leaders(dagster_home)  # the daemon, the webserver
        os.kill(first.pid, signal.SIGKILL)  # dev alone: what it started lives on
        first.wait()
        assert webserver_answers(first_port)
        started = left | with_environment("DAGSTER_HOME", dagster_home)

        dev = start_cli("dev", "--dir", str(folder), "--port", str(second_port), env={}, log=second_log)
        assert until(lambda: webserver_answers(second_port), WAIT, 1.0, alive=dev, log=second_log), tail(second_log)
        started |= with_environment("DAGSTER_HOME", dagster_home)
        leaders = group_leaders(dagster_home)
        assert len(leaders) == 2 and leaders <= descendants(dev.pid), \
            f"Dagster process groups on {dagster_home}: {sorted(leaders)}, of the second dev: " \
            f"{sorted(leaders & descendants(dev.pid))}"
        assert not any(pid_alive(p) for p in left), [p for p in left if pid_alive(p)]
        stopped = [line for line in second_log.read_text().splitlines() if "left running" in line]
        assert len(stopped) == 1 and f"pid {first.pid}" in stopped[0], second_log.read_text()

        stack = LocalStack(folder)
        client = redis_lib.Redis.from_url(stack.env()["OBS_REDIS_URL"], socket_timeout=5)
        raw, tx, _ = seed_example_json("observatory")
        client.lpush(SiteKeys("observatory").buffer, raw)
        status_key = SiteKeys("observatory").transaction(tx["transaction_id"])
        assert until(lambda: replicated(client, status_key), WAIT, 0.5, alive=dev, log=second_log), \
            tail(folder / "logs" / "dagster-daemon.log")
        client.close()

        dev.send_signal(signal.SIGINT)
        assert dev.wait(timeout=WAIT) == 0, tail(second_log)
        assert until(lambda: not any(pid_alive(p) for p in started), 30), [p for p in started if pid_alive(p)]
        assert not any(s["running"] for s in stack.status().values()), stack.status()  # the killed dev's stack
    finally:
        kill_what_dev_left(dev, started, dagster_home, folder)


def test_dev_on_a_port_another_program_holds_is_one_line_before_anything_starts(tmp_path):
    """It brought the stack up, printed the UI's address, started a daemon, and then said only
    'dagster-webserver exited with 3; see <logs>' (a second `dev` beside a running one did so)."""
    import socket

    folder = tmp_path / "dev_stack"
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    port = squatter.getsockname()[1]
    try:
        result = subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "dev", "--dir", str(folder), "--port",
                                 str(port)], env=base_env(), capture_output=True, text=True, timeout=WAIT)
    finally:
        squatter.close()
        LocalStack(folder).down()
    assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"obs-pipeline: error: port {port} for the Dagster UI is in use by pid {os.getpid()} ("), \
        lines[0]
    assert lines[0].endswith("(another `obs-pipeline dev`?): stop it, or choose another port with --port"), lines[0]
    assert not (folder / "stack.json").exists()


def test_a_port_holder_whose_command_line_has_a_newline_is_named_in_one_line(tmp_path):
    """The holder's command line was pasted as it is: a `python -c` squatter with a program of
    several lines broke the error's line, and the CLI, which prints an error's first line, cut
    it inside the program: what to do (stop it, or choose another port) was lost. Its control
    characters are now escaped, as `failed list` escapes a producer's text."""
    program = "import socket, sys, time\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\n" \
              "s.listen(1)\nprint(s.getsockname()[1], flush=True)\ntime.sleep(120)"
    squatter = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    folder = tmp_path / "dev_stack"
    try:
        port = int(squatter.stdout.readline())
        result = subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "dev", "--dir",
                                 str(folder), "--port", str(port)], env=base_env(),
                                capture_output=True, text=True, timeout=WAIT)
    finally:
        squatter.kill()
        squatter.wait()
    assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"obs-pipeline: error: port {port} for the Dagster UI is in use by pid "
                           f"{squatter.pid} ({sys.executable} -c import socket, sys, "
                           "time\\ns = "), line
    assert line.endswith(") (another `obs-pipeline dev`?): stop it, or choose another port "
                         "with --port"), line
    assert not (folder / "stack.json").exists()


CUSTOM_MODELS = "obs_pipeline_tests.custom_models:Base"  # a site's own models: no obs_unit, no simulator's


def test_dev_with_a_sites_own_models_makes_their_schema_and_serves_the_ui(tmp_path):
    """dev ran `db init --demo-data` whatever OBS_MODELS named: with a site's own models it
    failed on 'relation "obs_unit" does not exist' and took everything down again."""
    folder, log = tmp_path / "dev_stack", tmp_path / "dev.log"
    dev = start_cli("dev", "--dir", str(folder), "--port", str(pick_free_ports(1)[0]),
                    env={"OBS_MODELS": CUSTOM_MODELS}, log=log)
    try:
        assert until(lambda: "In another shell: " in log.read_text(), WAIT, 0.5, alive=dev, log=log), tail(log)
        main_url = LocalStack(folder).env()["OBS_MAIN_DB_URL"]
        assert {"custom_instrument", "obs_pipeline_applied"} <= tables(main_url) and "obs_unit" not in tables(main_url)
    finally:
        dev.send_signal(signal.SIGINT)
        assert dev.wait(timeout=WAIT) == 0, tail(log)
        LocalStack(folder).down()


def test_dev_simulating_with_models_the_simulator_cannot_use_is_one_line_before_anything_starts(tmp_path):
    folder = tmp_path / "dev_stack"
    result = subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "dev", "--dir", str(folder), "--port",
                             str(pick_free_ports(1)[0]), "--simulate"], env=base_env(OBS_MODELS=CUSTOM_MODELS),
                            capture_output=True, text=True, timeout=WAIT)
    LocalStack(folder).down()
    assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "obs-pipeline: error: --simulate observes the demo models (obs_unit, ExecutedObsUnit, RawDataPackage, "
        f"RawDataFile), which the models of OBS_MODELS ({CUSTOM_MODELS}) do not have: leave --simulate out"], \
        result.stderr
    assert not (folder / "stack.json").exists()


@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize("services", ["up", "unreachable"])
def test_simulate_with_models_the_simulator_cannot_use_is_one_line_before_connecting(env, settings, redis_client,
                                                                                   services):
    """A site's own OBS_MODELS: simulate picked its obs units on the replica, then failed in its
    first block ("unknown model 'ExecutedObsUnit'"), or with the replica or Redis down said that
    instead, as if fixing them would help. Refused now by dev's check, before it connects."""
    env = {**env, "OBS_MODELS": CUSTOM_MODELS}
    if services == "unreachable":
        for name in ("OBS_REDIS_URL", "OBS_REPLICA_DB_URL"):
            env[name] = sa.engine.make_url(env[name]).set(port=1).render_as_string(hide_password=False)
    result = cli("simulate", "--count", "1", env=env)
    assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
    assert one_line_error(result) == (
        "obs-pipeline: error: simulate observes the demo models (obs_unit, ExecutedObsUnit, RawDataPackage, "
        f"RawDataFile), which the models of OBS_MODELS ({CUSTOM_MODELS}) do not have: unset OBS_MODELS to simulate "
        "the built-in models (`obs-pipeline db init --demo-data` makes their schema)")
    assert redis_client.keys(f"{SiteKeys(settings.site).prefix}*") == []


def test_dev_with_models_that_do_not_load_is_one_line_before_anything_starts(tmp_path):
    """OBS_MODELS that does not load, read by dev's `db init`: dev brought the stack up first (in
    a new folder, made one), saved a new --main-latency-ms, then said why and took the stack
    down. The next plain `stack up` put main behind a proxy at the latency of that refused
    command. Now refused before anything starts, in the line db init said (it was followed by
    "Command '[...'db', 'init', '--demo-data']' returned non-zero exit status 1.")."""
    folder, new_folder = tmp_path / "dev_stack", tmp_path / "new_stack"
    stack = LocalStack(folder)
    stack.up()
    stack.down()
    saved = stack.config_path.read_text()
    try:
        results = [subprocess.run(
            [sys.executable, "-m", "obs_pipeline.cli", "dev", "--dir", str(where), "--port",
             str(pick_free_ports(1)[0]), "--main-latency-ms", "50"],
            env=base_env(OBS_MODELS="nosuch_module:Base"), capture_output=True, text=True,
            timeout=WAIT) for where in (folder, new_folder)]
        assert stack.config_path.read_text() == saved  # "main_latency_ms": 0, as it was
        assert not any(s["running"] for s in stack.status().values())
        assert not new_folder.exists()
        for result in results:
            assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
            assert result.stderr.splitlines() == [
                "obs-pipeline: error: OBS_MODELS='nosuch_module:Base' cannot be loaded: "
                "No module named 'nosuch_module'"], result.stderr
    finally:
        stack.down()
        LocalStack(new_folder).down()


def test_a_ctrl_c_as_the_webserver_starts_still_stops_the_daemon(stack, monkeypatch):  # noqa: F811
    """dev kept the daemon and the webserver it started in locals until both had started: a
    Ctrl-C while the webserver's process was being created left the daemon running, unseen."""
    import obs_pipeline.dev as dev

    real_popen, launched = subprocess.Popen, []

    def popen(args, *rest, **kwargs):
        if "dagster-webserver" in str(args[0]):
            raise KeyboardInterrupt  # Ctrl-C arrives here
        proc = real_popen(args, *rest, **kwargs)
        launched.append(proc)
        return proc

    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    monkeypatch.setattr(dev.subprocess, "Popen", popen)
    try:
        assert dev.run_dev(stack, port=pick_free_ports(1)[0], simulate_rate=None, main_latency_ms=None) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        monkeypatch.undo()
    daemons = [p for p in launched if "dagster-daemon" in str(p.args[0])]
    try:
        assert len(daemons) == 1
        assert daemons[0].poll() is not None, "the daemon outlived dev"
    finally:
        dev.stop_processes(daemons)
    assert all(stack.status()[name]["running"] for name in ("main", "replica", "redis"))  # was up before dev


def test_dev_in_a_folder_with_a_space_prints_a_stack_env_command_that_works(tmp_path):
    """dev printed `eval "$(obs-pipeline stack env --dir <folder>)"` unquoted: with a space in
    the folder's name the shell split it, and the command failed ('unrecognized arguments').
    And it named `obs-pipeline` bare: in a shell without the venv on PATH the eval ran nothing,
    said nothing, and later commands used the default Redis (another one on the machine)."""
    folder = tmp_path / "my stack"
    log = tmp_path / "dev.log"
    dev = start_cli("dev", "--dir", str(folder), "--port", str(pick_free_ports(1)[0]), env={}, log=log)
    try:
        assert until(lambda: "In another shell: " in log.read_text(), WAIT, 0.5, alive=dev, log=log), tail(log)
        hint = re.search(r'In another shell: (eval "\$\(.*\)")', log.read_text()).group(1)
        shell = subprocess.run(["bash", "-c", f'set -e; {hint}; echo "$OBS_REDIS_URL"'], capture_output=True,
                               text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=60)
        port = json.loads((folder / "stack.json").read_text())["ports"]["redis"]
        assert shell.stdout.strip() == f"redis://127.0.0.1:{port}/0", hint + shell.stderr
    finally:
        dev.send_signal(signal.SIGINT)
        assert dev.wait(timeout=WAIT) == 0, tail(log)
        LocalStack(folder).down()


def test_dev_on_a_stack_partly_up_stops_only_what_it_started(stack):  # noqa: F811
    """With one service of the operator's stack stopped (the replica had died), dev started it
    and then, on Ctrl-C, took the whole stack down: the main and Redis that scripts were using."""
    log = Path(stack.directory) / "logs" / "dev-partly-up.log"
    before = stack.status()
    stack.stop_service("replica")
    dev = start_cli("dev", "--dir", str(stack.directory), "--port", str(pick_free_ports(1)[0]), env={}, log=log)
    try:
        assert until(lambda: "In another shell: " in log.read_text(), WAIT, 0.5, alive=dev, log=log), tail(log)
        assert stack.status()["replica"]["running"]
        dev.send_signal(signal.SIGINT)
        assert dev.wait(timeout=WAIT) == 0, tail(log)
        after = stack.status()
        assert not after["replica"]["running"]  # dev started it
        for name in ("main", "redis"):
            assert after[name]["pid"] == before[name]["pid"], name  # the operator's, untouched
    finally:
        kill_if_running(dev)
        stack.up()


def test_dev_given_a_main_latency_on_a_stack_up_leaves_the_replica_streaming(stack, monkeypatch):  # noqa: F811
    """`dev --main-latency-ms N` on the operator's running stack saved N and put its proxy between
    main and the replica; on Ctrl-C dev stopped the proxy as a thing it had started, and the
    operator's replica, left up, streamed from a port nobody listened on: replication stopped
    (and `stack env`'s main URL led nowhere) until the next `stack up`."""
    import obs_pipeline.dev as dev

    real_popen = subprocess.Popen

    def popen(args, *rest, **kwargs):
        if "dagster-daemon" in str(args[0]):
            raise KeyboardInterrupt  # Ctrl-C, the stack up and the schema on it
        return real_popen(args, *rest, **kwargs)

    before = stack.status()
    assert not before["proxy"]["running"] and all(before[name]["running"] for name in ("main", "replica", "redis"))
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    monkeypatch.setattr(dev.subprocess, "Popen", popen)
    streaming = "SELECT sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming'"
    try:
        try:
            assert dev.run_dev(stack, port=pick_free_ports(1)[0], simulate_rate=None, main_latency_ms=100) == 0
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            monkeypatch.undo()
        after = stack.status()
        for name in ("main", "replica", "redis"):
            assert after[name]["pid"] == before[name]["pid"], name  # the operator's, untouched
        assert after["proxy"]["running"] and after["proxy"]["latency_ms"] == 100, after["proxy"]
        assert until(lambda: run_sql(stack.env()["OBS_REPLICA_DB_URL"], streaming) == after["proxy"]["port"], 30)
    finally:  # the session's stack as it was, for the tests after this one
        stack.up(main_latency_ms=0)
        assert until(lambda: run_sql(stack.env()["OBS_REPLICA_DB_URL"], streaming) == stack.status()["main"]["port"], 60)


def test_dev_in_a_folder_that_is_a_file_says_so_in_one_line(tmp_path):
    """dev's cleanup (stack down) failed on the file too, and its line replaced the reason:
    'unreadable <file>/stack.json: [Errno 20] Not a directory'."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    result = subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "dev", "--dir", str(afile), "--port",
                             str(pick_free_ports(1)[0])], env=base_env(), capture_output=True, text=True,
                            timeout=WAIT)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 1 and errors == [
        f"obs-pipeline: error: the stack folder {afile} is a file, not a folder: choose another folder (--dir)"], \
        result.stderr
    assert afile.read_text() == "mine"


@pytest.mark.usefixtures("clean_db")
def test_dev_stopped_while_a_drain_run_applies_ends_it_canceled_and_the_next_sensor_does_not_pause(
        stack, settings, main_engine, monkeypatch):  # noqa: F811
    """SIGTERM to `dev` (Ctrl-C, a service manager) while its drain_buffer run applies a batch:
    the run worker is interrupted with no termination request in Dagster, and the run ended
    FAILURE. The next `dev`'s buffer_sensor took that for a failure with a cause and launched
    no drain for 60 s (the failed-run pause). Now the run ends CANCELED, and the next tick
    launches a drain at once; each transaction is applied once."""
    from dagster import (DagsterInstance, DagsterRunStatus, RunRequest, RunsFilter,
                         build_sensor_context)

    from obs_pipeline.dagster_defs.jobs import SITE_TAG
    from obs_pipeline.dagster_defs.resources import ObsPipelineResource
    from obs_pipeline.dagster_defs.sensors import buffer_sensor
    from obs_pipeline_tests.workload import (assert_applied_exactly_once, buffer_observations,
                                             drain_until_settled)

    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 6, finish_every=2)  # 9 transactions
    log = Path(stack.directory) / "logs" / "dev-stopped-mid-run.log"
    waiting_drain = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                     "AND application_name = 'obs-pipeline drain'")
    dev = None
    try:
        with main_engine.connect() as blocker:  # main's apply of the batch waits on this row lock
            blocker.execute(sa.text("SELECT id FROM obs_unit WHERE id = 1 FOR UPDATE"))
            dev = start_cli("dev", "--dir", str(stack.directory), "--port",
                            str(pick_free_ports(1)[0]), env={"OBS_SITE": settings.site}, log=log)
            main_url = stack.env()["OBS_MAIN_DB_URL"]
            assert until(lambda: run_sql(main_url, waiting_drain) > 0, WAIT, 0.5, alive=dev,
                         log=log), tail(Path(stack.directory) / "logs" / "dagster-daemon.log")
            dev.send_signal(signal.SIGTERM)
            time.sleep(2)
            blocker.commit()  # main applies the batch; the run's drain lets go of its lease
        assert dev.wait(timeout=WAIT) == 0, tail(log)
        observations += buffer_observations(buf, 1, finish_every=0)  # work for the next sensor

        monkeypatch.setenv("OBS_DAGSTER_PG_URL", stack.env()["OBS_DAGSTER_PG_URL"])
        instance = DagsterInstance.from_config(str(Path(stack.directory) / "dagster_home"))
        try:
            [run] = instance.get_runs(filters=RunsFilter(job_name="drain_buffer",
                                                         tags={SITE_TAG: settings.site}))
            assert run.status == DagsterRunStatus.CANCELED, run.status
            resource = ObsPipelineResource(site=settings.site, redis_url=settings.redis_url,
                                           main_db_url=settings.main_db_url,
                                           replica_db_url=settings.replica_db_url)
            context = build_sensor_context(instance=instance, resources={"obs_pipeline": resource})
            decision = buffer_sensor(context)
            assert isinstance(decision, RunRequest), decision
        finally:
            instance.dispose()
        drain_until_settled(settings)
        assert_applied_exactly_once(main_engine, observations)
    finally:
        buf.close()
        kill_if_running(dev)
