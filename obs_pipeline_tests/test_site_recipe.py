"""The README's recipe for a site, `deploy/`, on the real stack: main's roles and grants as
main-setup.sql makes them, the settings as site.env gives them, the units' commands as they
start. Only what the test stack cannot have is changed: its hosts and ports, no passwords (it
trusts loopback), no `sslmode=require` (no TLS), the site's and roles' names made the test's own,
and the venv's bin folder for /opt/obs-pipeline/.venv/bin."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import redis as redis_lib
import sqlalchemy as sa

from obs_pipeline.dev import stop_processes
from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline.stack.binaries import pg_bin_dir, redis_server_path
from obs_pipeline.stack.osutil import clean_env, pick_free_ports, wait_until

REPOSITORY = Path(__file__).resolve().parent.parent
DEPLOY = REPOSITORY / "deploy"
UNIT_BIN = "/opt/obs-pipeline/.venv/bin/"
READ_BY_OBS_PIPELINE = {"OBS_SITE", "OBS_REDIS_URL", "OBS_MAIN_DB_URL", "OBS_REPLICA_DB_URL", "OBS_DAGSTER_PG_URL",
                        "OBS_SPOOL_DIR", "DAGSTER_HOME"}
WAIT_S = 180


def site_env_file() -> dict[str, str]:
    """deploy/site.env's settings, read as a shell reads them (`set -a; . site.env`)."""
    settings = {}
    for line in (DEPLOY / "site.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            (assignment,) = shlex.split(line)
            name, value = assignment.split("=", 1)
            settings[name] = value
    return settings


def unit_command(unit: str) -> list[str]:
    """A unit's ExecStart, run from this venv."""
    (line,) = [ln for ln in (DEPLOY / "systemd" / unit).read_text().splitlines() if ln.startswith("ExecStart=")]
    command = shlex.split(line.removeprefix("ExecStart="))
    assert command[0].startswith(UNIT_BIN), command
    return [str(Path(sys.executable).parent / command[0].removeprefix(UNIT_BIN)), *command[1:]]


def test_site_env_names_only_what_obs_pipeline_reads_and_every_setting_it_needs():
    names = set(site_env_file())
    assert names <= READ_BY_OBS_PIPELINE, names - READ_BY_OBS_PIPELINE
    assert READ_BY_OBS_PIPELINE - {"OBS_SPOOL_DIR"} <= names  # the spool's folder is each user's by default


@pytest.fixture
def site_roles(settings, main_engine, clean_db):
    """main-setup.sql run on the stack's main as the tables' owner, for this test's site: the
    drain's and the readers' roles, and Dagster's database. Dropped afterwards."""
    roles = {role: f"{role}_{settings.site}" for role in ("obs_drain", "obs_reader", "obs_replication")}
    drain_role, reader_role, dagster_db = roles["obs_drain"], roles["obs_reader"], f"obs_dagster_{settings.site}"
    script = re.sub(r"\b(obs_drain|obs_reader|obs_replication)\b", lambda m: roles[m.group(1)],
                    (DEPLOY / "main-setup.sql").read_text())
    script = script.replace("observatory", settings.site)
    statements = [s.strip() for s in re.sub(r"--[^\n]*", "", script).split(";") if s.strip()]
    assert any(dagster_db in s for s in statements)
    with main_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for statement in statements:  # as psql runs them: each on its own (CREATE DATABASE cannot be in a block)
            conn.execute(sa.text(statement))
    try:
        yield drain_role, reader_role, dagster_db
    finally:
        with main_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{dagster_db}" WITH (FORCE)'))
            for role in roles.values():
                conn.execute(sa.text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"))
                conn.execute(sa.text(f"DROP OWNED BY {role}"))
                conn.execute(sa.text(f"DROP ROLE {role}"))


def _as_role(file_url: str, stack_url: str, role: str, database: str | None = None) -> str:
    """site.env's URL on the test stack: its host, port and no password, with the role given."""
    url, stack = sa.engine.make_url(file_url), sa.engine.make_url(stack_url)
    query = {k: v for k, v in url.query.items() if k != "sslmode"}
    url = url.set(host=stack.host, port=stack.port, username=role, password=None, query=query)
    return url.set(database=database or url.database).render_as_string(hide_password=False)


@pytest.fixture
def site_env(site_roles, settings, stack_urls, tmp_path):
    """The environment of the units and of a script's shell: site.env on the test stack, and a
    DAGSTER_HOME holding a copy of the repository's dagster.yaml, as the README's recipe makes it."""
    drain_role, reader_role, dagster_db = site_roles
    file = site_env_file()
    assert file["OBS_SITE"] == "observatory"
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPOSITORY / "dagster.yaml", home / "dagster.yaml")
    site = {
        "OBS_SITE": settings.site,
        "OBS_REDIS_URL": stack_urls["OBS_REDIS_URL"],
        "OBS_MAIN_DB_URL": _as_role(file["OBS_MAIN_DB_URL"], stack_urls["OBS_MAIN_DB_URL"], drain_role),
        "OBS_REPLICA_DB_URL": _as_role(file["OBS_REPLICA_DB_URL"], stack_urls["OBS_REPLICA_DB_URL"], reader_role),
        "OBS_DAGSTER_PG_URL": _as_role(file["OBS_DAGSTER_PG_URL"].replace("observatory", settings.site),
                                       stack_urls["OBS_MAIN_DB_URL"], drain_role),
        "OBS_SPOOL_DIR": settings.spool_dir,
        "DAGSTER_HOME": str(home),
    }
    assert sa.engine.make_url(site["OBS_DAGSTER_PG_URL"]).database == dagster_db
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OBS_", "DAGSTER_"))}
    return {**env, **site}


def _observe(monkeypatch, env: dict[str, str]) -> tuple[TransactionBuffer, list[str], str]:
    """A script of the site: starts an observation and finishes it once the start is replicated,
    with the readers' role on the replica (the finish's id is checked there)."""
    for name in READ_BY_OBS_PIPELINE:
        monkeypatch.setenv(name, env[name])
    buf = TransactionBuffer.from_env()
    with buf.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 123, "start_time": "2026-12-06T01:00:00Z",
                                            "status": "running"})
        package = tx.create("RawDataPackage", {"name": "obs_123_package", "executed_obs_unit_id": obs["id"]})
        tx.bulk_create("RawDataFile", [{"name": f"file{i}.fits", "raw_data_package_id": package["id"]}
                                       for i in (1, 2)])
    return buf, [tx.transaction_id], obs["id"]


def _finish(buf: TransactionBuffer, ids: list[str], obs_id: str, log: Path) -> None:
    assert buf.wait(ids[0], until="replicated", timeout=WAIT_S), log.read_text()[-3000:]
    ids.append(buf.update("ExecutedObsUnit", obs_id, {"status": "completed", "end_time": "2026-12-06T01:05:00Z"}))
    assert buf.wait(ids[1], until="replicated", timeout=WAIT_S), log.read_text()[-3000:]
    assert buf.get("ExecutedObsUnit", obs_id)["status"] == "completed"


def _applied_once(main_engine, ids: list[str], obs_id: str) -> None:
    with main_engine.connect() as conn:
        applied = conn.execute(sa.text("SELECT transaction_id, count(*) FROM obs_pipeline_applied "
                                       "WHERE transaction_id = ANY(:ids) GROUP BY 1"), {"ids": ids}).all()
        assert sorted(applied) == sorted((i, 1) for i in ids)
        assert conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :i"),
                            {"i": obs_id}).scalar_one() == "completed"
        assert conn.execute(sa.text("SELECT count(*) FROM raw_data_file")).scalar_one() == 2


@pytest.mark.slow
def test_the_site_recipe_drains_through_the_daemon_unit_with_the_sites_own_roles(
        site_env, main_engine, monkeypatch, tmp_path):
    """The daemon's unit with site.env, main's roles from main-setup.sql (no superuser), Dagster's
    storage in the site's own database; the UI's unit answers."""
    log = tmp_path / "daemon.log"
    ui_port = pick_free_ports(1)[0]
    ui_command = unit_command("obs-pipeline-dagster-webserver.service")
    ui_command[ui_command.index("-p") + 1] = str(ui_port)
    started = []
    try:
        started.append(subprocess.Popen(unit_command("obs-pipeline-dagster-daemon.service"), env=site_env,
                                        stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True))
        started.append(subprocess.Popen(ui_command, env=site_env, stdout=open(tmp_path / "ui.log", "wb"),
                                        stderr=subprocess.STDOUT, start_new_session=True))
        buf, ids, obs_id = _observe(monkeypatch, site_env)
        _finish(buf, ids, obs_id, log)

        def ui_answers() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/server_info", timeout=5) as reply:
                    return reply.status == 200
            except OSError:
                return False
        assert wait_until(ui_answers, WAIT_S, 1.0), (tmp_path / "ui.log").read_text()[-3000:]
        storage = sa.create_engine(site_env["OBS_DAGSTER_PG_URL"])  # the runs are in the site's own database

        def a_run_succeeded() -> bool:  # (the run ends once the buffer has been idle for idle_exit_s)
            with storage.connect() as conn:
                return conn.execute(sa.text("SELECT count(*) FROM runs WHERE pipeline_name = 'drain_buffer' "
                                            "AND status = 'SUCCESS'")).scalar_one() >= 1
        assert wait_until(a_run_succeeded, WAIT_S, 1.0), log.read_text()[-3000:]
        storage.dispose()
        assert all(p.poll() is None for p in started), log.read_text()[-3000:]
    finally:
        stop_processes(started)
    _applied_once(main_engine, ids, obs_id)


def test_the_drain_unit_drains_with_the_sites_own_roles_and_stops_on_sigterm(
        site_env, main_engine, monkeypatch, tmp_path):
    log = tmp_path / "drain.log"
    drain = subprocess.Popen(unit_command("obs-pipeline-drain.service"), env=site_env, stdout=open(log, "wb"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        buf, ids, obs_id = _observe(monkeypatch, site_env)
        _finish(buf, ids, obs_id, log)
        # the README's check, with the site's settings and roles: a healthy site
        status = subprocess.run([str(Path(sys.executable).parent / "obs-pipeline"), "status", "--check", "--json"],
                                env=site_env, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stdout + status.stderr
        assert json.loads(status.stdout)["status"] == "healthy", status.stdout
        drain.send_signal(signal.SIGTERM)  # systemd's stop
        assert drain.wait(60) == 0, log.read_text()[-3000:]
    finally:
        stop_processes([drain])
    _applied_once(main_engine, ids, obs_id)


def test_the_replication_role_clones_main_into_a_standby_with_its_own_slot(site_roles, settings, stack_urls,
                                                                         main_engine, tmp_path):
    """The README's pg_basebackup for the site's replica, as main-setup.sql's replication role."""
    main = sa.engine.make_url(stack_urls["OBS_MAIN_DB_URL"])
    slot, folder = f"site_{settings.site}", tmp_path / "site_replica"
    cloned = subprocess.run([str(pg_bin_dir() / "pg_basebackup"), "-h", main.host, "-p", str(main.port),
                             "-U", f"obs_replication_{settings.site}", "-D", str(folder), "-R", "-X", "stream",
                             "-C", "-S", slot, "--checkpoint=fast"],
                            capture_output=True, text=True, timeout=600, env=clean_env())
    try:
        assert cloned.returncode == 0, cloned.stderr
        assert (folder / "standby.signal").exists()
        assert f"primary_slot_name = '{slot}'" in (folder / "postgresql.auto.conf").read_text()
    finally:
        with main_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                                 "WHERE slot_name = :s"), {"s": slot})


def test_the_redis_settings_are_taken_by_the_stacks_redis(tmp_path):
    """deploy/redis.conf, included in a redis.conf as a site would, on the Redis the stack runs."""
    port = pick_free_ports(1)[0]
    conf = tmp_path / "redis.conf"
    conf.write_text(f"include {DEPLOY / 'redis.conf'}\nport {port}\nbind 127.0.0.1\ndir {tmp_path}\n")
    server = subprocess.Popen([str(redis_server_path()), str(conf)], stdout=open(tmp_path / "redis.log", "wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    client = redis_lib.Redis(port=port)
    try:
        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis_lib.ConnectionError:
                return False
        assert wait_until(answers, 30, 0.1), (tmp_path / "redis.log").read_text()
        settings = {name: client.config_get(name)[name] for name in (
            "appendonly", "appendfsync", "save", "maxmemory-policy", "auto-aof-rewrite-percentage",
            "auto-aof-rewrite-min-size")}
        assert settings == {"appendonly": "yes", "appendfsync": "always", "save": "",
                            "maxmemory-policy": "noeviction", "auto-aof-rewrite-percentage": "1000",
                            "auto-aof-rewrite-min-size": str(2**30)}
    finally:
        client.close()
        server.terminate()
        server.wait(30)
