"""`obs-pipeline` as operators use it: exit status, one-line errors, the health report."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from obs_pipeline.apply import StatementTimeout
from obs_pipeline.buffer_store import BufferStore
from obs_pipeline.drain import Drain, DrainConfig
from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline.keys import SiteKeys
from obs_pipeline_tests.conftest import wait_for_replica
from obs_pipeline_tests.examples import seed_example, seed_example_json
from obs_pipeline_tests.workload import (assert_applied_exactly_once, buffer_observations, drain_one_batch,
                                         drain_until_settled, slow_file_inserts, with_statement_timeout)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OBS_")}
    return subprocess.run([sys.executable, "-m", "obs_pipeline.cli", *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def env(settings) -> dict[str, str]:
    return {"OBS_SITE": settings.site, "OBS_REDIS_URL": settings.redis_url, "OBS_MAIN_DB_URL": settings.main_db_url,
            "OBS_REPLICA_DB_URL": settings.replica_db_url}


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def place_or_id(line: str) -> str:
    """A `failed list` line's first field, `#N` for a letter shown as `#N@digest` (no usable id)."""
    field = line.split("\t")[0]
    return re.sub(r"^(#\d+)@[0-9a-f]{8}$", r"\1", field)


def test_drain_without_main_url_refuses_with_a_clear_line(env):
    """The line says how to set it with this installation's command (a bare `obs-pipeline`
    ran nothing in a shell without the venv on PATH)."""
    del env["OBS_MAIN_DB_URL"]
    line = one_line_error(cli("drain", "--once", env=env))
    script = Path(sys.executable).parent / "obs-pipeline"
    assert line == ("obs-pipeline: error: OBS_MAIN_DB_URL is not set: the drain needs the main database "
                    f"(e.g. `eval \"$({script} stack env)\"` for the local stack)"), line


@pytest.mark.parametrize("args, message", [
    (["failed"], "the following arguments are required: action"),
    (["drain", "--batch-size", "many"], "argument --batch-size: invalid value 'many': give transactions per batch"),
    (["stack", "explode"], "argument action: invalid choice: 'explode'"),
])
def test_a_usage_error_is_one_line_too(args, message):
    line = one_line_error(cli(*args))
    assert line.startswith("obs-pipeline") and message in line and "-h" in line, line


@pytest.mark.parametrize("where", ["before", "after"])
def test_v_gives_the_traceback_before_or_after_the_command(env, where):
    """Every error line says `-v` gives the traceback; after the command (where one adds it to the
    line that failed) it was a usage error: "unrecognized arguments: -v"."""
    del env["OBS_MAIN_DB_URL"]
    args = ["-v", "drain", "--once"] if where == "before" else ["drain", "--once", "-v"]
    result = cli(*args, env=env)
    assert result.returncode != 0 and "Traceback" in result.stderr, result.stderr
    assert "ConfigError: OBS_MAIN_DB_URL is not set" in result.stderr


@pytest.mark.parametrize("command", [["status"], ["drain", "--once"]])
@pytest.mark.parametrize("name, value, message", [
    ("OBS_MAIN_DB_URL", "garbage", "OBS_MAIN_DB_URL is not a database URL"),
    ("OBS_REPLICA_DB_URL", "garbage", "OBS_REPLICA_DB_URL is not a database URL"),
    ("OBS_REPLICA_DB_URL", "mysql://u:secret@host/db", "OBS_REPLICA_DB_URL must name PostgreSQL"),
    ("OBS_MAIN_DB_URL", "postgresql://u:secret@127.0.0.1:5432x/obs", "OBS_MAIN_DB_URL is not a database URL"),
    ("OBS_REPLICA_DB_URL", "postgresql+pg8000://u:secret@127.0.0.1/obs",
     "OBS_REPLICA_DB_URL names the driver pg8000: obs-pipeline talks to PostgreSQL through psycopg2"),
    ("OBS_MAIN_DB_URL", "postgresql+psycopg2x://u:secret@127.0.0.1/obs",
     "OBS_MAIN_DB_URL names the driver psycopg2x: obs-pipeline talks to PostgreSQL through psycopg2"),
    ("OBS_MAIN_DB_URL", "postgresql://u:secret@127.0.0.1/obs?sslmod=require",
     'OBS_MAIN_DB_URL gives libpq an option it does not know ("sslmod")'),
])
def test_a_malformed_database_url_names_its_variable(env, command, name, value, message):
    """It said "Could not parse SQLAlchemy URL from given URL string" (which of the two?) or "No
    module named 'MySQLdb'"; the line names the variable, and never prints a password. So for a
    port that is no number, another driver than psycopg2 and an option libpq does not know: they
    said "invalid literal for int() with base 10: '5432x'", "No module named 'pg8000'" and
    'invalid dsn: invalid connection option "sslmod"' (after `drain` had claimed a batch), or,
    with the buffer empty, nothing (the drain never connected: exit 0)."""
    env[name] = value
    line = one_line_error(cli(*command, env=env))
    assert message in line and "secret" not in line, line


def test_redis_unreachable_is_one_actionable_line(env):
    env["OBS_REDIS_URL"] = "redis://127.0.0.1:1/0"
    assert "Redis unreachable" in one_line_error(cli("status", env=env))


@pytest.mark.usefixtures("clean_db")
def test_a_redis_user_without_the_drain_s_commands_is_one_line_naming_the_variable(env, settings, redis_client):
    """A Redis user of OBS_REDIS_URL allowed reads only (a monitor's, given to the drain): `drain`
    said Redis's own "this user has no permissions to run the 'set' command", naming neither
    Redis nor the variable. Nothing is claimed."""
    user = f"reader_{settings.site}"
    redis_client.execute_command("ACL", "SETUSER", user, "on", ">secret", "~*", "+@read", "+ping", "+select")
    try:
        url = settings.redis_url.replace("redis://", f"redis://{user}:secret@", 1)
        redis_client.lpush(SiteKeys(settings.site).buffer, seed_example_json(settings.site)[0])
        line = one_line_error(cli("drain", "--once", env={**env, "OBS_REDIS_URL": url}))
        assert line.startswith("obs-pipeline: error: Redis refuses the user of OBS_REDIS_URL a command obs-pipeline "
                               "needs (this user has no permissions to run the '"), line
        assert line.endswith("): give that user read and write on the site's keys and scripting (ACL SETUSER), or "
                             "give OBS_REDIS_URL a user that has them"), line
        assert "secret" not in line
        assert redis_client.llen(SiteKeys(settings.site).buffer) == 1
    finally:
        redis_client.execute_command("ACL", "DELUSER", user)


def test_db_init_with_main_down_is_one_actionable_line(env):
    """It said only 'connection to server at "127.0.0.1", port 1 failed: Connection refused'."""
    env["OBS_MAIN_DB_URL"] = "postgresql+psycopg2://postgres@127.0.0.1:1/obs"
    line = one_line_error(cli("db", "init", env=env))
    assert line.startswith("obs-pipeline: error: main unreachable (connection to server at"), line
    assert line.endswith("; is OBS_MAIN_DB_URL right and the stack up (`obs-pipeline stack status`)?"), line


def test_stack_env_on_a_folder_without_a_stack(tmp_path):
    """The hint names the folder: `stack up` alone would set up a stack in ./.obs-stack instead."""
    line = one_line_error(cli("stack", "env", "--dir", str(tmp_path / "none")))
    assert f"run `obs-pipeline stack up --dir {tmp_path / 'none'}` first" in line, line


def test_stack_status_and_down_on_a_folder_without_a_stack_say_so(tmp_path):
    """From the wrong working folder (./.obs-stack) or with a mistyped --dir, `stack status` printed
    every service "running": false with exit 0 (the stack looked dead, and `stack up` would have
    made a second one), and `stack down` exited 0 saying nothing, the real stack still up."""
    folder = tmp_path / "typo"
    line = one_line_error(cli("stack", "status", "--dir", str(folder)))
    assert line == (f"obs-pipeline: error: no local stack in {folder}: give its folder with --dir (or OBS_STACK_DIR), "
                    f"or make one with `obs-pipeline stack up --dir {folder}`"), line
    line = one_line_error(cli("stack", "down", "--dir", str(folder)))
    assert line == (f"obs-pipeline: error: no local stack in {folder}: nothing stopped; give its folder with --dir "
                    "(or OBS_STACK_DIR)"), line
    assert not folder.exists()


def test_stack_up_in_a_folder_it_cannot_use_is_one_line_saying_so(tmp_path):
    """It said '[Errno 17] File exists: ...' or '[Errno 20] Not a directory: ...'."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    line = one_line_error(cli("stack", "up", "--dir", str(afile)))
    assert f"the stack folder {afile} is a file, not a folder: choose another folder (--dir)" in line, line
    line = one_line_error(cli("stack", "up", "--dir", str(afile / "sub")))
    assert f"cannot create the stack folder {afile / 'sub'} (Not a directory): choose another folder" in line, line
    assert afile.read_text() == "mine"


def test_stack_start_proxy_without_a_latency_names_the_command_that_sets_one(stack):
    """It said 'run `up(main_latency_ms=N)` first', the Python API, to an operator at the shell."""
    line = one_line_error(cli("stack", "start", "proxy", "--dir", str(stack.directory)))
    assert line == ("obs-pipeline: error: no latency proxy configured: run `obs-pipeline stack up --main-latency-ms N "
                    f"--dir {stack.directory}` first"), line


def test_stack_up_names_the_env_command_for_its_folder(stack):
    """`stack up --dir D` tells the operator how to use the stack: that command must find it (it
    said `stack env` without the folder, which looks in ./.obs-stack)."""
    result = cli("stack", "up", "--dir", str(stack.directory))
    assert result.returncode == 0, result.stderr
    assert f"obs-pipeline stack env --dir {stack.directory}" in result.stderr, result.stderr


@pytest.mark.parametrize("action", ["up", "down", "status", "env"])
def test_a_service_named_to_a_whole_stack_action_is_a_usage_line_and_does_nothing(action, tmp_path, monkeypatch,
                                                                                 capsys):
    """`stack down replica` (meant: `stack stop replica`, for a drill) took the whole stack down,
    main and Redis that scripts were using: the service was accepted and ignored. (In process,
    with the stack's methods replaced: it must never reach a real stack.)"""
    from obs_pipeline import cli as cli_module
    from obs_pipeline.stack import LocalStack

    called = []
    for method in ("up", "down", "status", "env", "stop_service", "start_service"):
        monkeypatch.setattr(LocalStack, method, lambda self, *a, _m=method, **k: called.append(_m))
    with pytest.raises(SystemExit) as exited:
        cli_module.main(["stack", action, "replica", "--dir", str(tmp_path)])
    assert exited.value.code == 2 and called == [], called
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"obs-pipeline stack: error: `stack {action}` acts on the whole stack and takes no service: "
                   "`stack stop replica` or `stack start replica` act on one (see `obs-pipeline stack -h`)"], err


@pytest.mark.parametrize("args, flag, owner", [
    (["start", "replica", "--main-latency-ms", "100"], "--main-latency-ms", "up"),
    (["stop", "proxy", "--main-latency-ms", "100"], "--main-latency-ms", "up"),
    (["env", "--redis-appendfsync", "always"], "--redis-appendfsync", "up"),
    (["stop", "redis", "--redis-appendfsync", "always"], "--redis-appendfsync", "up"),
    (["start", "redis", "--mode", "kill"], "--mode", "stop"),
    (["up", "--mode", "immediate"], "--mode", "stop"),
])
def test_a_stack_flag_the_action_does_not_use_is_a_usage_line_and_does_nothing(
        stack, args, flag, owner):
    """`stack start replica --main-latency-ms 100` (the operator wanted main 100 ms away),
    `stack stop redis --redis-appendfsync always`, `stack up --mode immediate`: each did its
    action, ignored the flag and exited 0, and nothing said that the flag had done nothing."""
    before, saved = stack.status(), stack.config_path.read_text()
    try:
        result = cli("stack", *args, "--dir", str(stack.directory))
        assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
        assert result.stderr.splitlines() == [
            f"obs-pipeline stack: error: `stack {args[0]}` takes no {flag}: it is for "
            f"`stack {owner}` (see `obs-pipeline stack -h`)"], result.stderr
        after = stack.status()
        assert {n: s["pid"] for n, s in after.items()} == {n: s["pid"] for n, s in before.items()}
        assert stack.config_path.read_text() == saved
    finally:
        stack.up()


def test_stack_env_prints_export_lines(stack):
    out = cli("stack", "env", "--dir", str(stack.directory)).stdout
    assert all(re.match(r"export [A-Z_]+=\S", line) for line in out.splitlines()), out  # contract section 1
    names = {line.split("=")[0].removeprefix("export ") for line in out.splitlines()}
    assert {"OBS_REDIS_URL", "OBS_MAIN_DB_URL", "OBS_REPLICA_DB_URL", "OBS_SITE", "OBS_MODELS"} <= names


def test_stack_env_lines_give_a_shell_the_values_as_they_are(stack, tmp_path):
    """Found by review: OBS_SITE and OBS_MODELS, taken from the caller's environment, were
    printed unquoted: `eval "$(obs-pipeline stack env)"` split a site name with a space
    ("export OBS_SITE=north dome": OBS_SITE=north, and `dome` exported empty) and ran what a
    value held (`$(...)`). Each value is quoted for the shell now."""
    site, models = "north dome $(touch pwned)", "my_models:Base"
    (tmp_path / "my_models.py").write_text("from obs_pipeline.models import Base\n")  # (a refused one prints none)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    out = cli("stack", "env", "--dir", str(stack.directory),
              env={"OBS_SITE": site, "OBS_MODELS": models, "PYTHONPATH": path}).stdout
    shell = subprocess.run(["bash", "-c", 'eval "$1" && printf "%s\\n" "$OBS_SITE" "$OBS_MODELS" "$OBS_REDIS_URL"',
                            "-", out], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.splitlines() == [site, models, stack.env()["OBS_REDIS_URL"]]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("models, message", [
    ("garbage", "OBS_MODELS='garbage' is not of the form module:Base (e.g. obs_pipeline.models:Base)"),
    ("site_models_missing:Base", "OBS_MODELS='site_models_missing:Base' cannot be loaded: No module named "
                                 "'site_models_missing'"),
    ("os:path", "OBS_MODELS='os:path' is not a SQLAlchemy declarative base: give the class your models derive "
                "from, as module:Base (e.g. obs_pipeline.models:Base)"),
])
def test_stack_env_refuses_a_wrong_obs_models_in_one_line_and_prints_no_exports(stack, models, message):
    """`stack env` printed an OBS_MODELS from the environment as given, exit 0, where every
    command that loads the models (db init, drain, failed, simulate, dev) refuses it: once
    eval'd, the shell held a setting nothing could use. Refused now as they refuse it, as a
    wrong OBS_SITE is, with no export line printed."""
    result = cli("stack", "env", "--dir", str(stack.directory), env={"OBS_MODELS": models})
    assert one_line_error(result) == f"obs-pipeline: error: {message}"
    assert result.stdout == ""


def test_stack_env_prints_the_defaults_for_an_empty_obs_site_and_obs_models(stack):
    """An empty OBS_SITE or OBS_MODELS is the default to every command (Settings.from_env), but
    `stack env` exported it as given, `export OBS_SITE=''`: once eval'd, a script or `redis-cli`
    reading $OBS_SITE saw no site where every command used `observatory`. It prints the
    defaults now, the lines an unset OBS_SITE and OBS_MODELS get."""
    unset = cli("stack", "env", "--dir", str(stack.directory))
    empty = cli("stack", "env", "--dir", str(stack.directory), env={"OBS_SITE": "", "OBS_MODELS": ""})
    assert empty.returncode == 0, empty.stderr
    lines = empty.stdout.splitlines()
    assert "export OBS_SITE=observatory" in lines and "export OBS_MODELS=obs_pipeline.models:Base" in lines, lines
    assert empty.stdout == unset.stdout


@pytest.mark.usefixtures("clean_db")
def test_status_json_has_the_seed_health_shape(env, redis_client, settings):
    redis_client.lpush(SiteKeys(settings.site).buffer, json.dumps(seed_example(settings.site)[0]))
    report = json.loads(cli("status", "--json", env=env).stdout)
    assert report["transaction_buffer"]["size"] == 1
    assert report["transaction_buffer"]["failed"] == 0  # contract section 6: the seed's failed count
    assert report["transaction_buffer"]["oldest_pending_seconds"] > 0
    assert {"status", "last_run", "transactions_processed"} <= set(report["background_processor"])
    assert {"seconds", "main_lsn", "replica_lsn", "bytes"} <= set(report["replication_lag"])
    assert cli("drain", "--once", env=env).returncode == 0
    after = json.loads(cli("status", "--json", env=env).stdout)
    assert after["transaction_buffer"]["size"] == 0
    assert after["background_processor"]["transactions_processed"] == 1
    assert after["status"] == "healthy"


def test_status_text_says_why_a_drain_run_waits_and_until_when(env, redis_client, settings):
    """The text report's drain line with a drain run waiting for its op retry (the note is the
    run's: see test_dagster_operations for a real run's), and after the wait, the note gone."""
    store = BufferStore(redis_client, settings.site)
    store.note_drain_waiting("drain run r1: main unreachable (refused): op retry 2 of 8", 30.0)
    line = next(l for l in cli("status", env=env).stdout.splitlines() if l.startswith("  drain "))
    assert re.fullmatch(r"  drain running \(drain run r1: main unreachable \(refused\): op retry 2 of 8, the next "
                        r"attempt in (29|30) s\), last run never, processed 0", line), line
    store.note_drain_waiting("drain run r1: main unreachable (refused): op retry 2 of 8", 0.0)
    line = next(l for l in cli("status", env=env).stdout.splitlines() if l.startswith("  drain "))
    assert "op retry 2 of 8, the next attempt due now (Dagster starting it))" in line, line  # (it said "in 0 s")
    store.clear_drain_notes()
    line = next(l for l in cli("status", env=env).stdout.splitlines() if l.startswith("  drain "))
    assert line == "  drain idle, last run never, processed 0", line


def test_status_text_says_the_sensor_pauses_after_a_failed_run_and_until_when(env, redis_client, settings):
    """The text report's drain line during the sensor's pause after a failed run (the note is the
    sensor's: see test_dagster_operations for a real tick's): it said `drain idle`."""
    store = BufferStore(redis_client, settings.site)
    store.note_drain_paused("drain run r1 failed with main out of reach, the last 2 drain runs in a row", 120.0, True)
    line = next(l for l in cli("status", env=env).stdout.splitlines() if l.startswith("  drain "))
    assert re.fullmatch(r"  drain paused \(drain run r1 failed with main out of reach, the last 2 drain runs in a "
                        r"row: the next run once main answers, or in (119|120) s\), last run never, processed 0",
                        line), line
    store.note_drain_paused("drain run r1 failed", 0.0, False)
    line = next(l for l in cli("status", env=env).stdout.splitlines() if l.startswith("  drain "))
    assert "(drain run r1 failed: the next run due now (the sensor launching it))" in line, line
    redis_client.set(SiteKeys(settings.site).drain_paused, "not json")  # a note, not a record: no error
    line = next(l for l in cli("status", env=env).stdout.splitlines() if l.startswith("  drain "))
    assert line == "  drain idle, last run never, processed 0", line


@pytest.mark.usefixtures("clean_db")
def test_status_last_run_is_the_drains_last_batch_even_one_that_only_dead_lettered(env, redis_client, settings):
    """`last run` was the last time a batch applied something: a drain whose every transaction
    main refused (dead-lettered) read "last run never", as if no drain ran at all."""
    doc, _ = seed_example(settings.site, obs_unit_id=999_999)  # no such obs unit: main refuses it
    doc["max_retries"] = 0  # dead-lettered by the first refusal
    redis_client.lpush(SiteKeys(settings.site).buffer, json.dumps(doc))
    before = time.time()
    assert cli("drain", "--once", env=env).returncode == 0
    report = json.loads(cli("status", "--json", env=env).stdout)
    processor = report["background_processor"]
    assert (processor["transactions_processed"], processor["dead_lettered_total"]) == (0, 1), processor
    assert report["transaction_buffer"]["failed"] == 1, report  # the dead letter, as the seed's report counts it
    assert processor["last_run"] is not None, processor
    assert before - 1 <= dt.datetime.fromisoformat(processor["last_run"]).timestamp() <= time.time()
    assert f"last run {processor['last_run']}," in cli("status", env=env).stdout


@pytest.mark.usefixtures("clean_db")
def test_status_lag_counts_only_the_batches_the_replica_has_not_replayed(env, redis_client, settings, main_engine,
                                                                        replica_engine):
    """A batch the replica has replayed waits only for a drain to clean its caches (a `drain
    --once` whose replica caught up after its --replication-timeout). It was counted as lag: the
    report said 'replication lag 500 s, 0 bytes (..., 1 chunks awaiting replay)' with the replica
    at main's position, where the README has the age of the oldest batch not replayed."""
    import time

    from obs_pipeline.lsn import int_to_lsn, lsn_to_int

    with main_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (4343, 'a commit') ON CONFLICT DO NOTHING"))
        replayed = conn.execute(sa.text("SELECT pg_current_wal_flush_lsn()::text")).scalar_one()
    wait_for_replica(main_engine, replica_engine)
    keys = SiteKeys(settings.site)

    def awaiting(lsn: int, age_s: float) -> None:  # a chunk as the drain's acknowledgement records it
        record = {"n": "000000000", "c": [], "o": [], "t": [], "at": time.time() - age_s, "lsn": int_to_lsn(lsn)}
        redis_client.zadd(keys.awaiting_replication, {json.dumps(record): lsn})

    awaiting(lsn_to_int(replayed), 500)
    lag = json.loads(cli("status", "--json", env=env).stdout)["replication_lag"]
    assert (lag["seconds"], lag["awaiting_batches"], lag["replica_behind_oldest_batch"]) == (0, 0, False), lag
    awaiting(lsn_to_int(replayed) + (1 << 40), 30)  # a commit the replica has not reached
    lag = json.loads(cli("status", "--json", env=env).stdout)["replication_lag"]
    assert 30 <= lag["seconds"] < 120 and lag["awaiting_batches"] == 1 and lag["replica_behind_oldest_batch"], lag


@pytest.mark.usefixtures("clean_db")
def test_failed_show_discard_and_unknown_ids(env, redis_client, settings):
    doc, _ = seed_example(settings.site)
    doc["steps"][0]["model_class"] = "Telescope"
    redis_client.lpush(SiteKeys(settings.site).buffer, json.dumps(doc))
    assert cli("drain", "--once", env=env).returncode == 0
    shown = json.loads(cli("failed", "show", doc["transaction_id"], env=env).stdout)
    assert "unknown model 'Telescope'" in shown["failure"]["reason"]
    assert "no dead-lettered transaction 'nope'" in one_line_error(cli("failed", "show", "nope", env=env))
    assert "takes one transaction id" in one_line_error(cli("failed", "discard", env=env))
    discarded = cli("failed", "discard", doc["transaction_id"], env=env)
    assert discarded.returncode == 0 and discarded.stderr == f"discarded {doc['transaction_id']}\n", discarded.stderr
    assert cli("failed", "list", env=env).stdout == ""
    report = json.loads(cli("status", "--json", env=env).stdout)
    assert report["transaction_buffer"]["failed"] == 0


@pytest.mark.usefixtures("clean_db")
def test_discard_removes_its_overlays_and_keeps_others(env, settings, redis_client):
    from obs_pipeline.drain import Drain, DrainConfig
    from obs_pipeline.ingest import TransactionBuffer

    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as start:
        obs = start.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                               "status": "running"})
    drain = Drain(settings, DrainConfig())
    drain.run(until_empty=True, budget_s=30)
    drain.close()
    assert buf.status(start.transaction_id) == "replicated"
    # two pending updates of the replicated record; the first can never be applied
    bad = buf.update("ExecutedObsUnit", obs["id"], {"status": "bad"})
    good = buf.update("ExecutedObsUnit", obs["id"], {"end_time": "2025-01-01T01:00:00Z"})
    keys = SiteKeys(settings.site)
    entries = redis_client.lrange(keys.buffer, 0, -1)
    redis_client.delete(keys.buffer)
    letter = json.dumps({**json.loads(entries[1]), "status": "failed", "failure": {"reason": "test"}})
    redis_client.rpush(keys.failed, letter)  # dead-lettered as the drain does it: its status too
    redis_client.set(keys.transaction(bad), letter)
    redis_client.lpush(keys.buffer, entries[0])  # only `good` stays queued
    assert cli("failed", "discard", bad, env=env).returncode == 0
    record = buf.get("ExecutedObsUnit", obs["id"])
    assert record["status"] == "running" and record["end_time"] == "2025-01-01T01:00:00+00:00"
    assert [e["id"] for e in buf.search("ExecutedObsUnit", {"status": "running"})] == [obs["id"]]
    assert redis_client.llen(keys.read_buffer("ExecutedObsUnit", obs["id"])) == 1
    assert buf.status(good) == "pending"
    buf.close()


def test_the_cli_drain_runs_behind_the_scripts_at_a_lower_cpu_priority(settings, monkeypatch):
    """Observing scripts, Redis and the replica share the site machine with the drain; when
    the CPU is short, a catching-up drain is what should wait."""
    import os

    from obs_pipeline import cli
    from obs_pipeline.drain import BACKGROUND_NICENESS, Drain

    seen = []
    real_run = Drain.run

    def run_and_look(self, **kwargs):
        summary = real_run(self, **kwargs)
        seen.append(os.getpriority(os.PRIO_PROCESS, 0))
        return summary

    monkeypatch.setattr(Drain, "run", run_and_look)
    for name, value in (("OBS_SITE", settings.site), ("OBS_REDIS_URL", settings.redis_url),
                        ("OBS_MAIN_DB_URL", settings.main_db_url), ("OBS_REPLICA_DB_URL", settings.replica_db_url)):
        monkeypatch.setenv(name, value)
    before = os.getpriority(os.PRIO_PROCESS, 0)
    import threading
    result = {}
    worker = threading.Thread(target=lambda: result.update(code=cli.main(["drain", "--once"])))
    worker.start()  # a thread of its own: on Linux a niceness belongs to the thread that set it
    worker.join(60)
    assert result.get("code") == 0
    assert seen == [max(before, BACKGROUND_NICENESS)]
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the test's own thread is untouched


@pytest.mark.parametrize("flags, check_every_s", [([], 30.0), (["--no-aof-compaction"], None)])
def test_the_cli_drain_compacts_the_aof_unless_told_not_to(settings, monkeypatch, flags, check_every_s):
    from obs_pipeline import cli
    from obs_pipeline.drain import Drain

    seen = []
    real_run = Drain.run
    monkeypatch.setattr(Drain, "run", lambda self, **kwargs: (seen.append(self.config.aof_check_s),
                                                              real_run(self, **kwargs))[1])
    for name, value in (("OBS_SITE", settings.site), ("OBS_REDIS_URL", settings.redis_url),
                        ("OBS_MAIN_DB_URL", settings.main_db_url), ("OBS_REPLICA_DB_URL", settings.replica_db_url)):
        monkeypatch.setenv(name, value)
    assert cli.main(["drain", "--once", *flags]) == 0
    assert seen == [check_every_s]


def buffer_one_and_see_the_queue(settings, redis_client, obs_unit_id: int) -> tuple[SiteKeys, list]:
    """One transaction buffered; the site's keys and its queue as it is now."""
    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as tx:
        tx.create("ObsUnit", {"id": obs_unit_id, "name": "stays buffered"})
    buf.close()
    keys = SiteKeys(settings.site)
    return keys, redis_client.lrange(keys.buffer, 0, -1)


def test_a_drain_against_a_full_redis_is_one_actionable_line_and_changes_nothing(env, settings, redis_client):
    keys, queued = buffer_one_and_see_the_queue(settings, redis_client, 950)
    limit = redis_client.config_get("maxmemory")["maxmemory"]
    redis_client.config_set("maxmemory", 1)
    try:
        line = one_line_error(cli("drain", "--once", env=env))
    finally:
        redis_client.config_set("maxmemory", limit)
    assert "Redis is full" in line and "raise maxmemory" in line, line
    assert redis_client.lrange(keys.buffer, 0, -1) == queued and not redis_client.exists(keys.processing, keys.lease)


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "argument --batch-size: invalid value '0': give transactions per batch, a whole number "
                            "of 1 or more"),
    (["--batch-size", "5000", "--max-batch-size", "100"],
     "argument --max-batch-size: 100 is below --batch-size 5000: give 5000 or more, or leave it out"),
    (["--lease-ttl", "0"], "argument --lease-ttl: invalid value '0': give seconds, a number from 0.001 to 86400"),
    (["--replication-timeout", "-1"],
     "argument --replication-timeout: invalid value '-1': give seconds, a number from 0 to 86400"),
    (["--replication-timeout", "inf"],  # was taken: the drain waited for the replica for ever
     "argument --replication-timeout: invalid value 'inf': give seconds, a number from 0 to 86400"),
])
def test_a_bad_batch_size_is_one_clear_line_and_changes_nothing(env, settings, redis_client, flags, message):
    keys, queued = buffer_one_and_see_the_queue(settings, redis_client, 951)
    result = cli("drain", "--once", *flags, env=env)
    assert result.returncode == 2, result.stderr  # a usage error, as `--batch-size x` is
    assert one_line_error(result) == f"obs-pipeline drain: error: {message} (see `obs-pipeline drain -h`)"
    assert redis_client.lrange(keys.buffer, 0, -1) == queued and not redis_client.exists(keys.processing, keys.lease)


@pytest.mark.usefixtures("clean_db")
def test_drain_once_returns_while_the_replica_is_down_and_a_later_one_cleans(stack, env, settings, redis_client,
                                                                            main_engine):
    """`drain --once` must come back when the buffer is empty even if the replica cannot
    replay (it used to wait for ever): the rows are on main, the caches stay until a later
    drain sees the replay."""
    import sqlalchemy as sa

    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "running"})
    keys = SiteKeys(settings.site)
    stack.stop_service("replica")
    try:
        result = cli("drain", "--once", "--replication-timeout", "2", env=env)
        assert result.returncode == 0, result.stderr
        assert "drained 1 transactions" in result.stderr and "still await the replica" in result.stderr
        assert buf.status(tx.transaction_id) == "applied"
        assert redis_client.exists(keys.buffered("ExecutedObsUnit", obs["id"])) == 1
        with main_engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit WHERE id = :i"),
                                {"i": obs["id"]}).scalar_one() == 1
    finally:
        stack.start_service("replica")
    again = cli("drain", "--once", env=env)
    assert again.returncode == 0 and "(buffer empty)" in again.stderr, again.stderr
    assert buf.status(tx.transaction_id) == "replicated"
    assert redis_client.exists(keys.buffered("ExecutedObsUnit", obs["id"]), keys.awaiting_replication) == 0
    buf.close()


@pytest.mark.usefixtures("clean_db")
def test_dead_letters_without_a_usable_id_are_shown_and_discarded_by_their_place(env, redis_client, settings):
    """Garbage from a producer is dead-lettered with no id (or one that cannot be typed); an
    operator must still be able to look at it and remove it, or the site stays degraded."""
    keys = SiteKeys(settings.site)
    for raw in (b"not json at all", b'["a", "list"]', json.dumps({"transaction_id": "nul\u0000id", "steps": []})):
        redis_client.lpush(keys.buffer, raw)
    assert cli("drain", "--once", env=env).returncode == 0
    listed = cli("failed", "list", env=env).stdout.splitlines()
    assert [place_or_id(line) for line in listed] == ["#1", "#2", "#3"], listed
    assert json.loads(cli("failed", "show", "#2", env=env).stdout)["failure"]["kind"] == "invalid"
    assert "no dead-lettered transaction '#4'" in one_line_error(cli("failed", "show", "#4", env=env))
    assert "has no usable transaction id and cannot be retried" in one_line_error(cli("failed", "retry", "#1", env=env))
    for _ in range(3):
        assert cli("failed", "discard", "#1", env=env).returncode == 0
    assert redis_client.llen(keys.failed) == 0
    assert json.loads(cli("status", "--json", env=env).stdout)["status"] == "healthy"


@pytest.mark.usefixtures("clean_db")
def test_a_place_that_is_no_whole_number_of_the_list_is_one_line_and_changes_nothing(env, redis_client, settings):
    """`#²` (str.isdigit() takes a superscript two for a digit, int() does not) and a place of
    5,000 digits (past the digits int() reads) are no place in the list: `failed show`, `retry`
    and `discard` said `invalid literal for int() with base 10: '²'`, or `Exceeds the limit
    (4300 digits) for integer string conversion`, naming neither the letter nor the list."""
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, b"not json at all")
    assert cli("drain", "--once", env=env).returncode == 0
    before = redis_client.lrange(keys.failed, 0, -1)
    for place in ("#\u00b2", "#" + "9" * 5000):
        for action in ("show", "retry", "discard"):
            line = one_line_error(cli("failed", action, place, env=env))
            assert f"no dead-lettered transaction {place!r}" in line, (action, line[:200])
    assert redis_client.lrange(keys.failed, 0, -1) == before


@pytest.mark.usefixtures("clean_db")
def test_retry_says_which_letters_it_cannot_retry_and_leaves_them_listed(env, redis_client, settings):
    """`failed retry --all` left the letters without a usable id listed without a word
    ("requeued 1 transaction(s)"), the site still degraded; and `failed retry #N` of a spooled line
    Redis could not take, without a usable id, said only to discard it, not that its steps may
    have to be buffered again (what its letter and a retry by id say)."""
    keys = SiteKeys(settings.site)
    doc, _ = seed_example(settings.site)
    doc["steps"][0]["model_class"] = "Telescope"
    redis_client.lpush(keys.buffer, json.dumps(doc))
    redis_client.lpush(keys.buffer, b"not json at all")
    assert cli("drain", "--once", env=env).returncode == 0
    spool_dir = Path(settings.spool_dir)
    spool_dir.mkdir(mode=0o700)
    (spool_dir / f"{settings.site}.jsonl").write_text("a hand's edit cut short\n")
    env = {**env, "OBS_SPOOL_DIR": settings.spool_dir}
    assert cli("spool", "push", env=env).returncode == 0
    listed = [[place_or_id(line), *line.split("\t")[1:3]] for line in cli("failed", "list", env=env).stdout.splitlines()]
    assert listed == [[doc["transaction_id"], doc["endpoint"], "invalid"], ["#2", "None", "invalid"],
                      ["#3", "None", "refused_spool_line"]], listed
    before = redis_client.lrange(keys.failed, 0, -1)
    line = one_line_error(cli("failed", "retry", "#3", env=env))
    assert line.startswith("obs-pipeline: error: dead letter #3 is a spooled line Redis could not take, and cannot be "
                           "retried: `obs-pipeline failed show #3` shows it and why; "), line
    assert "buffer the steps still wanted again" in line, line
    assert "has no usable transaction id" in one_line_error(cli("failed", "retry", "#2", env=env))
    assert redis_client.lrange(keys.failed, 0, -1) == before and redis_client.llen(keys.buffer) == 0
    retried = cli("failed", "retry", "--all", env=env)
    assert [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.buffer, 0, -1)] == [doc["transaction_id"]]
    assert redis_client.lrange(keys.failed, 0, -1) == before[:2]  # (newest first: the two without an id)
    garbage, spooled = (line.split("\t")[0] for line in cli("failed", "list", env=env).stdout.splitlines())
    assert retried.returncode == 0 and retried.stderr.splitlines() == [  # each named as `failed list` shows it now
        f"requeued 1 transaction(s); 2 dead letter(s) stay listed, as they cannot be retried: {garbage}: no usable "
        f"transaction id, so nothing to requeue it under (`obs-pipeline failed show {garbage}`, then `obs-pipeline "
        f"failed discard {garbage}`); {spooled}: a spooled line Redis could not take, and would refuse again "
        f"(`obs-pipeline failed show {spooled}`: check its rows as they are now, buffer the steps still wanted "
        f"again, then `obs-pipeline failed discard {spooled}`)"], retried.stderr
    assert (place_or_id(garbage), place_or_id(spooled)) == ("#1", "#2")


def retry_all_after(meanwhile, env: dict[str, str], monkeypatch) -> None:
    """`failed retry --all` in this process, `meanwhile()` run just before the retry reads the list
    (after anything the CLI reads first): what a drain does between the two."""
    from obs_pipeline import cli as cli_module
    from obs_pipeline.dead_letters import DeadLetters

    real_requeue = DeadLetters.requeue

    def requeue_after(self, *args, **kwargs):
        meanwhile()
        return real_requeue(self, *args, **kwargs)

    monkeypatch.setattr(DeadLetters, "requeue", requeue_after)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli_module.main(["failed", "retry", "--all"]) == 0


@pytest.mark.usefixtures("clean_db")
def test_retry_all_names_the_letters_its_own_reading_of_the_list_left(env, redis_client, settings, monkeypatch,
                                                                     capsys):
    """`failed retry --all` counted the letters it left from a read of the list before the retry's
    own: letters a drain dead-lettered in between stayed listed unsaid ("requeued 1
    transaction(s)"), the site still degraded. It says how many the retry left and names them, as
    `failed list` shows them then, and why each stays (as Dagster's retry_dead_letters does), the
    first cli.LEFT_NAMED of them: a producer's garbage may be thousands."""
    from obs_pipeline import cli as cli_module

    keys = SiteKeys(settings.site)
    doc, _ = seed_example(settings.site)
    doc["steps"][0]["model_class"] = "Telescope"  # dead-lettered with its id: retried
    redis_client.lpush(keys.buffer, json.dumps(doc))
    assert cli("drain", "--once", env=env).returncode == 0
    def garbage_dead_lettered() -> None:  # by a drain, between the CLI's reads
        redis_client.lpush(keys.buffer, *[f"not json at all {n}" for n in range(cli_module.LEFT_NAMED + 1)])
        assert cli("drain", "--once", env=env).returncode == 0

    retry_all_after(garbage_dead_lettered, env, monkeypatch)
    said = capsys.readouterr().err
    listed = cli("failed", "list", env=env).stdout.splitlines()
    assert [place_or_id(line) for line in listed] == [f"#{n}" for n in range(1, 12)], listed
    named = "; ".join(f"{ref}: no usable transaction id, so nothing to requeue it under (`obs-pipeline failed show "
                      f"{ref}`, then `obs-pipeline failed discard {ref}`)" for ref in [line.split("\t")[0]
                                                                                  for line in listed][:10])
    assert said.splitlines() == [f"requeued 1 transaction(s); 11 dead letter(s) stay listed, as they cannot be "
                                 f"retried: {named}; and 1 more (`obs-pipeline failed list` shows them)"], said
    assert [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.buffer, 0, -1)] == [doc["transaction_id"]]


@pytest.mark.usefixtures("clean_db")
def test_retry_says_which_ids_are_new_from_its_own_reading_of_the_list(env, redis_client, settings, monkeypatch,
                                                                       capsys):
    """`failed retry --all` told which requeued ids were new ids for reused ones from a read of the
    list before the retry's own: a letter a drain dead-lettered in between, requeued under its own
    id, was said to be "under new ids, as a producer had reused theirs". DeadLetters.requeue says
    which (`renamed`), from the reading it requeues."""

    keys = SiteKeys(settings.site)

    def push(tx_id: str, model: str, unit: int) -> None:
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": tx_id, "max_retries": 0, "steps": [
            {"step_id": "s1", "operation": "create", "model_class": model, "data": {"id": unit, "name": tx_id}}]}))

    push("bad-first", "Telescope", 9971)  # an unknown model: dead-lettered under its id
    push("reused-1", "ObsUnit", 9972)     # applied; its id comes back with other steps below
    assert cli("drain", "--once", env=env).returncode == 0
    def dead_lettered_between() -> None:  # by a drain, between the CLI's reads
        push("bad-between", "Telescope", 9973)
        push("reused-1", "ObsUnit", 9974)
        assert cli("drain", "--once", env=env).returncode == 0

    retry_all_after(dead_lettered_between, env, monkeypatch)
    said = capsys.readouterr().err
    queued = [json.loads(entry) for entry in redis_client.lrange(keys.buffer, 0, -1)]
    new_id = next(tx["transaction_id"] for tx in queued if tx.get("metadata", {}).get("reused_id") == "reused-1")
    assert sorted(tx["transaction_id"] for tx in queued) == sorted(["bad-first", "bad-between", new_id])
    assert said.splitlines() == [f"requeued 3 transaction(s); under new ids, as a producer had reused theirs: "
                                 f"{new_id}"], said


@pytest.mark.usefixtures("clean_db")
def test_a_dead_letter_that_is_not_utf8_is_listed_shown_and_discarded(env, redis_client, settings):
    """A letter with bytes that are not UTF-8 (a hand's edit, a list another producer wrote) made
    `failed list`, `show`, `retry` and `discard` of every letter exit 1 with "'utf-8' codec can't
    decode byte 0xff ...", and `status`, which reads the letters for its advice: the list could
    not be cleared with the tool. It is shown escaped and removed exactly, the others kept."""
    keys = SiteKeys(settings.site)
    doc, _ = seed_example(settings.site)
    doc["steps"][0]["model_class"] = "Telescope"
    redis_client.lpush(keys.buffer, json.dumps(doc))
    assert cli("drain", "--once", env=env).returncode == 0
    odd = b'{"transaction_id":"obs-\xff-1","endpoint":"caf\xe9","failure":{"reason":"by hand","kind":"invalid"}}'
    redis_client.lpush(keys.failed, odd)
    assert "2 dead-lettered" in cli("status", env=env).stderr
    listed = cli("failed", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [[place_or_id(line), *line.split("\t")[1:3]] for line in listed.stdout.splitlines()] == [
        [doc["transaction_id"], doc["endpoint"], "invalid"], ["#2", "caf\\udce9", "invalid"]], listed.stdout
    assert json.loads(cli("failed", "show", "#2", env=env).stdout)["transaction_id"] == "obs-\udcff-1"
    discarded = cli("failed", "discard", "#2", env=env)
    assert discarded.returncode == 0, discarded.stderr
    assert redis_client.lrange(keys.failed, 0, -1) == [redis_client.lindex(keys.failed, 0)] and \
        json.loads(redis_client.lindex(keys.failed, 0))["transaction_id"] == doc["transaction_id"]
    assert cli("failed", "retry", doc["transaction_id"], env=env).returncode == 0
    assert redis_client.llen(keys.failed) == 0 and redis_client.llen(keys.buffer) == 1


def test_spool_push_names_the_spool_it_emptied(env, settings, tmp_path):
    """Run as another user (sudo: its own default folder) or with another OBS_SPOOL_DIR, `spool
    push` said "pushed 0 ...; the spool of site S is empty" while the scripts' spool, which
    `status` had named, still waited: the line names the file it looked at."""
    scripts_spool = spooled_by_a_script(tmp_path, settings.site)
    elsewhere = tmp_path / "roots-own"
    pushed = cli("spool", "push", env={**env, "OBS_SPOOL_DIR": str(elsewhere)})
    assert pushed.returncode == 0 and pushed.stderr.splitlines() == [
        f"pushed 0 spooled transaction(s) to Redis, in order; the spool of site {settings.site} in "
        f"{elsewhere / (settings.site + '.jsonl')} is empty"], pushed.stderr
    assert scripts_spool.exists()


def test_dead_letters_that_are_no_json_object_or_whose_failure_is_none_are_listed_and_discarded(
        env, redis_client, settings):
    """A letter that is JSON but no object (`[1, 2]`), or whose `failure` is no object (a hand's,
    another producer's list), made every `failed` command, and `status`, exit 1 with "'list'
    object has no attribute 'get'" ('str' ...): the list could not be cleared with the tool."""
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.failed, b"[1, 2]", json.dumps({"transaction_id": "by-hand", "failure": "just text"}))
    status = cli("status", env=env)
    assert status.returncode == 0 and "2 dead-lettered" in status.stderr, status.stderr
    listed = cli("failed", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [place_or_id(line) for line in listed.stdout.splitlines()] == ["#1", "by-hand"], listed.stdout
    assert json.loads(cli("failed", "show", "#1", env=env).stdout)["raw"] == "[1, 2]"
    assert cli("failed", "discard", "#1", env=env).returncode == 0
    assert cli("failed", "retry", "by-hand", env=env).returncode == 0
    assert redis_client.llen(keys.failed) == 0
    assert [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.buffer, 0, -1)] == ["by-hand"]


def test_a_place_that_moved_onto_a_transaction_listed_by_its_id_changes_nothing(env, redis_client, settings):
    """`failed list` shows two letters without an id as #1 and #2, and a transaction by its id.
    `failed discard #1`, then `failed discard #2`, as listed: the second named the transaction,
    which had moved up to place 2, and dropped it. A place names only what the list shows by it."""
    keys = SiteKeys(settings.site)
    doc, _ = seed_example(settings.site)
    doc["steps"][0]["model_class"] = "Telescope"
    redis_client.lpush(keys.buffer, b"garbage one", b"garbage two", json.dumps(doc))
    assert cli("drain", "--once", env=env).returncode == 0
    listed = [place_or_id(line) for line in cli("failed", "list", env=env).stdout.splitlines()]
    assert listed == ["#1", "#2", doc["transaction_id"]], listed
    assert cli("failed", "discard", "#1", env=env).returncode == 0
    before = redis_client.lrange(keys.failed, 0, -1)
    for action in ("discard", "retry"):
        assert one_line_error(cli("failed", action, "#2", env=env)) == (
            f"obs-pipeline: error: #2 is the place of transaction '{doc['transaction_id']}', which `obs-pipeline "
            f"failed list` names by its id (places move as letters leave the list); nothing was changed: {action} "
            "it by its id")
    assert redis_client.lrange(keys.failed, 0, -1) == before and redis_client.llen(keys.buffer) == 0
    assert json.loads(redis_client.get(keys.transaction(doc["transaction_id"])))["status"] == "failed"


@pytest.mark.usefixtures("clean_db")
def test_a_letter_without_an_id_is_named_by_its_digest_as_places_move(env, redis_client, settings):
    """Three letters without an id, listed as #1, #2, #3. `failed discard #1`, then `failed
    discard #2` as listed: the second dropped the third letter, which had moved up to place 2,
    and left the one meant. `failed list` shows each with its digest (`#2@3f2a9c1e`), which
    names that letter wherever it moves; once it has left the list it names nothing."""
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, b"garbage one", b"garbage two", b"garbage three")
    assert cli("drain", "--once", env=env).returncode == 0
    shown = [line.split("\t")[0] for line in cli("failed", "list", env=env).stdout.splitlines()]
    assert [re.fullmatch(r"#(\d)@[0-9a-f]{8}", name).group(1) for name in shown] == ["1", "2", "3"], shown
    raws = [json.loads(cli("failed", "show", name, env=env).stdout)["raw"] for name in shown]
    assert raws == ["garbage one", "garbage two", "garbage three"], raws
    for name in shown[:2]:  # as listed before either went
        discarded = cli("failed", "discard", name, env=env)
        assert discarded.returncode == 0 and f"discarded {name}" in discarded.stderr, discarded.stderr
    left = [json.loads(raw)["raw"] for raw in redis_client.lrange(keys.failed, 0, -1)]
    assert left == ["garbage three"], left
    before = redis_client.lrange(keys.failed, 0, -1)
    assert one_line_error(cli("failed", "discard", shown[0], env=env)) == (
        f"obs-pipeline: error: no dead letter '{shown[0]}' at site {settings.site}: it has left the list "
        "(see `obs-pipeline failed list`)")
    assert redis_client.lrange(keys.failed, 0, -1) == before


def test_a_dead_letter_whose_id_looks_like_a_place_is_found_by_its_id(env, redis_client, settings):
    """A producer's transaction id may be any text, "#2" too, and `failed list` shows it as it
    is: `failed discard '#2'` discarded the second letter of the list instead, another
    transaction, lost, while the one named stayed."""
    keys = SiteKeys(settings.site)
    step = {"step_id": "s1", "operation": "create", "model_class": "NoSuchModel", "data": {}}
    for raw in (b"not json at all", json.dumps({"transaction_id": "keep-me", "steps": [step]}),
                json.dumps({"transaction_id": "#2", "steps": [step]})):
        redis_client.lpush(keys.buffer, raw)
    assert cli("drain", "--once", env=env).returncode == 0
    assert [place_or_id(line) for line in cli("failed", "list", env=env).stdout.splitlines()] == ["#1", "keep-me", "#2"]
    assert json.loads(cli("failed", "show", "#2", env=env).stdout)["transaction_id"] == "#2"
    assert cli("failed", "discard", "#2", env=env).returncode == 0
    assert [place_or_id(line) for line in cli("failed", "list", env=env).stdout.splitlines()] == ["#1", "keep-me"]
    assert json.loads(cli("failed", "show", "#2", env=env).stdout)["transaction_id"] == "keep-me"  # now its place


@pytest.mark.usefixtures("clean_db")
def test_failed_list_prints_a_producers_text_as_one_printable_line(env, redis_client, settings):
    """A raw producer's endpoint, step id or transaction id may hold a lone surrogate, a newline or
    a tab. `failed list` stopped at the first letter holding a surrogate ("'utf-8' codec can't
    encode character"), for as long as it was listed, and a newline split a letter over lines.
    Now each letter is one line, its text escaped, and the id as shown finds it."""
    keys = SiteKeys(settings.site)
    step = {"step_id": "s\udc80\nx", "operation": "create", "model_class": "ObsUnit", "data": {"id": 5, "name": 7}}
    redis_client.lpush(keys.buffer, json.dumps({"transaction_id": "tab\tid", "endpoint": "end\ud800\npoint",
                                                "steps": [step]}))
    redis_client.lpush(keys.buffer, b"not json at all")
    assert cli("drain", "--once", env=env).returncode == 0
    listed = cli("failed", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [[place_or_id(line), *line.split("\t")[1:]] for line in listed.stdout.splitlines()] == [
        ["tab\\tid", "end\\ud800\\npoint", "invalid",
         "transaction tab\\tid, step s\\udc80\\nx: ObsUnit.name: 7 is not a string"],
        ["#2", "None", "invalid", "not valid JSON: Expecting value: line 1 column 1 (char 0)"]]
    assert json.loads(cli("failed", "show", "tab\\tid", env=env).stdout)["transaction_id"] == "tab\tid"
    assert cli("failed", "discard", "tab\\tid", env=env).returncode == 0
    assert cli("failed", "list", env=env).stdout.splitlines()[0].startswith("#1@")


def test_failed_list_on_a_terminal_that_is_not_utf8_shows_every_letter_and_takes_ids_back(env, redis_client,
                                                                                          settings):
    """On an ASCII terminal (PYTHONIOENCODING=ascii; a Latin-1 one for text beyond it) `failed list`
    printed the letters before the first one holding text it could not show, then stopped with
    "'ascii' codec can't encode character '\\xf1'" and exit 1: the rest unseen, for as long as that
    letter was listed. Now such text is escaped, and the id as printed finds the letter."""
    keys = SiteKeys(settings.site)
    letter = {"steps": [], "failure": {"reason": "r", "kind": "invalid"}}
    redis_client.lpush(keys.failed, json.dumps({**letter, "transaction_id": "obs-\u00f1-1", "endpoint": "f\u00fcr"}),
                       json.dumps({**letter, "transaction_id": "after-it", "endpoint": "e"}))
    ascii_env = {**env, "PYTHONIOENCODING": "ascii"}
    listed = cli("failed", "list", env=ascii_env)
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    assert listed.stdout.splitlines() == ["obs-\\xf1-1\tf\\xfcr\tinvalid\tr", "after-it\te\tinvalid\tr"]
    shown = cli("failed", "show", "obs-\\xf1-1", env=ascii_env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["transaction_id"] == "obs-\u00f1-1", shown.stderr
    assert cli("failed", "discard", "obs-\\xf1-1", env=ascii_env).returncode == 0
    assert [json.loads(raw)["transaction_id"] for raw in redis_client.lrange(keys.failed, 0, -1)] == ["after-it"]


@pytest.mark.usefixtures("clean_db")
def test_discard_also_clears_the_dead_mark_its_rows_left_for_dependents(env, redis_client, settings):
    """A dead-lettered transaction marks the rows it creates as dead, so that dependents are
    blocked. Discarded, it must take the marks with it: while any mark stays, every batch looks
    up the references of every transaction it holds. The dependent, blocked and still listed,
    waits in the row's queue behind it and takes the row's mark: a newer update of the row is
    blocked by it, not applied before it is retried; discarded too, nothing holds the row."""
    from obs_pipeline_tests.workload import drain_until_settled

    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as poison:
        obs = poison.create("ExecutedObsUnit", {"obs_unit_id": 31337, "start_time": "2025-01-01T00:00:00Z",
                                                "status": "running"})  # no such obs unit
    dependent = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
    buf.close()
    keys = SiteKeys(settings.site)
    drain_until_settled(settings, retry_base_s=0.05)
    assert redis_client.llen(keys.failed) == 2 and redis_client.hkeys(keys.held_ids) in (  # the row, whether it exists
        [obs["id"].encode(), b"exists " + obs["id"].encode()], [b"exists " + obs["id"].encode(), obs["id"].encode()])
    assert cli("failed", "discard", poison.transaction_id, env=env).returncode == 0
    assert redis_client.llen(keys.failed) == 1
    assert redis_client.hgetall(keys.held_ids) == {obs["id"].encode(): b"!" + dependent.encode()}
    # what it blocked stays, and the list says why it may go now
    listed = cli("failed", "list", env=env).stdout.strip().splitlines()
    assert len(listed) == 1 and listed[0].startswith(dependent), listed
    assert listed[0].endswith(f"blocked by {poison.transaction_id} ({poison.transaction_id} is no longer "
                              "dead-lettered: retry or discard this one)"), listed
    assert cli("failed", "discard", dependent, env=env).returncode == 0
    assert redis_client.llen(keys.failed) == 0 and redis_client.hlen(keys.held_ids) == 0
    assert list(redis_client.scan_iter(keys.waiting("*"))) == []


@pytest.mark.usefixtures("clean_db")
def test_retrying_a_letter_whose_blocker_is_still_listed_is_refused_and_changes_nothing(env, redis_client,
                                                                                        settings):
    """`failed retry B`, B dead-lettered as blocked by A and A still listed: B was requeued, said
    "requeued 1 transaction(s)", and the drain dead-lettered it again at once, blocked by A's dead
    mark (nothing but A's retry or discard frees its row). Refused in one line naming A and what
    to do, nothing changed; `failed retry A` requeues both, in order."""
    keys = SiteKeys(settings.site)
    blocker, dependent = dead_poison_and_its_dependent(settings)
    before = (redis_client.lrange(keys.failed, 0, -1), redis_client.hgetall(keys.held_ids),
              redis_client.mget([keys.transaction(blocker), keys.transaction(dependent)]))
    assert [json.loads(raw)["failure"]["reason"] for raw in before[0]][0] == f"blocked by {blocker}"
    line = one_line_error(cli("failed", "retry", dependent, env=env))
    assert line == (f"obs-pipeline: error: dead letter {dependent} is blocked by {blocker}, which is still "
                    f"dead-lettered: retried alone it would be dead-lettered again behind it; nothing was changed: "
                    f"`obs-pipeline failed retry {blocker}` requeues both, in order, once its cause is fixed (or "
                    f"`failed discard {blocker}` first)"), line
    assert (redis_client.lrange(keys.failed, 0, -1), redis_client.hgetall(keys.held_ids),
            redis_client.mget([keys.transaction(blocker), keys.transaction(dependent)])) == before
    assert redis_client.llen(keys.buffer) == 0
    retried = cli("failed", "retry", blocker, env=env)
    assert retried.stderr == "requeued 2 transaction(s)\n", retried.stderr
    assert [json.loads(raw)["transaction_id"] for raw in redis_client.lrange(keys.buffer, 0, -1)] == [
        dependent, blocker]  # the blocker at the consuming end


@pytest.mark.usefixtures("clean_db")
def test_discarding_a_letter_others_are_blocked_by_says_they_stay_listed(env, redis_client, settings):
    """`failed discard A` said `discarded A`, and nothing of B, dead-lettered as blocked by A: B
    stays listed (its row is free now: it may apply when retried, or fail on its own), and an
    operator who took the line for the end of it left B there. The line names what stays."""
    keys = SiteKeys(settings.site)
    blocker, dependent = dead_poison_and_its_dependent(settings)
    discarded = cli("failed", "discard", blocker, env=env)
    assert discarded.returncode == 0 and discarded.stderr == (
        f"discarded {blocker}; 1 dead letter(s) blocked by it stay listed, to retry or discard on their own: "
        f"{dependent}\n"), discarded.stderr
    assert [json.loads(raw)["transaction_id"] for raw in redis_client.lrange(keys.failed, 0, -1)] == [dependent]


def test_retries_left_waiting_with_no_drain_make_the_site_degraded(settings, redis_client, main_engine,
                                                                   replica_engine):
    """With the drain stopped and only a retrying transaction left (the buffer empty, so no
    "oldest pending"), the site read "healthy" for ever. Now the first retry, due and not taken,
    makes it degraded, saying what to check; a drain that takes it (and schedules it again)
    clears it."""
    import time

    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.drain import Drain, DrainConfig
    from obs_pipeline.health import health_report

    missing = "8f3e1c8e-7a43-4f0e-9d8e-0c1f5a7b9d21"
    redis_client.lpush(SiteKeys(settings.site).buffer, json.dumps({"transaction_id": "update-of-nothing", "steps": [
        {"step_id": "s", "operation": "update", "model_class": "ExecutedObsUnit", "data": {"status": "done"},
         "conditions": {"id": missing}}]}))

    def drain_once(retry_base_s: float) -> None:
        drain = Drain(settings, DrainConfig(retry_base_s=retry_base_s))
        try:
            drain.acquire()
            drain.step()
        finally:
            drain.close()

    drain_once(0.05)  # it fails, and is due again within 0.1 s
    store = BufferStore(redis_client, settings.site)
    time.sleep(1.2)
    report = health_report(store, main_engine, replica_engine, stale_after_s=1.0)
    assert report["status"] == "degraded", report
    [problem] = [p for p in report["problems"] if "retried" in p]
    overdue = report["transaction_buffer"]["retry_overdue_seconds"]
    assert overdue > 1.0
    # the seconds said are the report's own: about 1.15 here, 2 on a machine that stalls the test 0.35 s
    said = re.match(r"1 transaction\(s\) wait to be retried, the first due (\d+) s ago: no drain has taken it", problem)
    assert said and abs(int(said.group(1)) - overdue) <= 0.501, (problem, overdue)
    assert report["transaction_buffer"]["oldest_pending_seconds"] is None  # what said nothing before
    drain_once(30)  # taken, failed again, due in 30 s
    report = health_report(store, main_engine, replica_engine, stale_after_s=1.0)
    assert report["status"] == "healthy", report
    assert report["transaction_buffer"]["retry_overdue_seconds"] == 0.0


def test_a_replica_that_stopped_replaying_makes_the_site_degraded(settings, redis_client, main_engine,
                                                                  replica_engine):
    """Caches are cleaned only after replay: a replica that accepts connections but replays
    nothing (its WAL receiver broken, replay paused, or a primary named as the replica) must
    show in the health report, not leave it "healthy" while Redis fills."""
    import time

    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.health import health_report

    store = BufferStore(redis_client, settings.site)
    assert health_report(store, main_engine, replica_engine)["status"] == "healthy"
    record = {"n": "000000000", "c": [], "o": [], "t": [], "at": time.time() - 600, "lsn": 2**62}
    redis_client.zadd(store.keys.awaiting_replication, {json.dumps(record): 2**62})
    report = health_report(store, main_engine, replica_engine)
    assert report["status"] == "degraded"
    # 600 s and the time the report took (601 s after a stall of half a second)
    assert any(re.search(r"has not replayed a batch committed 6[01]\d s ago", p) for p in report["problems"]), \
        report["problems"]
    redis_client.delete(store.keys.awaiting_replication)
    replayed = {**record, "lsn": 1}  # as old, but replayed: it only waits for a drain to clean it
    redis_client.zadd(store.keys.awaiting_replication, {json.dumps(replayed): 1})
    assert not any("has not replayed" in p for p in health_report(store, main_engine, replica_engine)["problems"])
    redis_client.delete(store.keys.awaiting_replication)
    wrong = health_report(store, main_engine, main_engine)  # a primary given as the replica
    assert wrong["status"] == "degraded" and any("may name a primary" in p for p in wrong["problems"])


def dead_poison(settings) -> tuple[str, str]:
    """One transaction dead-lettered for good reason (no such obs unit), its caches and dead
    mark left in Redis as the drain leaves them: (transaction id, the record id it creates)."""
    from obs_pipeline_tests.workload import drain_until_settled

    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as poison:
        obs = poison.create("ExecutedObsUnit", {"obs_unit_id": 31337, "start_time": "2025-01-01T00:00:00Z",
                                                "status": "running"})
    buf.close()
    drain_until_settled(settings, retry_base_s=0.05)
    return poison.transaction_id, obs["id"]


def dead_poison_and_its_dependent(settings) -> tuple[str, str]:
    """dead_poison, and an update of its record dead-lettered behind it (`blocked by` it): their
    transaction ids."""
    from obs_pipeline_tests.workload import drain_until_settled

    blocker, obs_id = dead_poison(settings)
    buf = TransactionBuffer(settings=settings)
    dependent = buf.update("ExecutedObsUnit", obs_id, {"status": "completed"})
    buf.close()
    drain_until_settled(settings, retry_base_s=0.05)
    return blocker, dependent


def dead_letters_of(settings, client):
    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.model_registry import ModelRegistry

    return DeadLetters(BufferStore(client, settings.site), ModelRegistry.from_path(settings.models))


def test_discarding_many_letters_at_once_keeps_the_others_in_their_order(settings, redis_client):
    """More than ten letters go by writing the list anew (as a large retry does): the ones not
    named stay, oldest first, and each named one's status goes with it."""
    keys = SiteKeys(settings.site)
    ids = []
    for unit in range(14):
        doc, _ = seed_example(settings.site, obs_unit_id=unit)
        doc.update(status="failed", failure={"reason": "test", "kind": "permanent"})
        redis_client.lpush(keys.failed, json.dumps(doc))  # the drain pushes the newest at the head
        redis_client.set(keys.transaction(doc["transaction_id"]), json.dumps(doc))
        ids.append(doc["transaction_id"])
    letters = dead_letters_of(settings, redis_client)
    named = ids[1:13:2] + ids[2:13:2]  # twelve of fourteen, out of order
    assert letters.discard(named).counts == [1] * 12
    assert [letter.transaction_id for letter in letters.list()] == [ids[0], ids[13]]
    assert [bool(redis_client.exists(keys.transaction(i))) for i in ids] == [True] + [False] * 12 + [True]


@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize("first, then", [("discard", "retry"), ("retry", "discard"), ("retry", "retry")])
def test_two_operators_acting_on_one_dead_letter_at_once_do_it_once(settings, redis_client, monkeypatch,
                                                                   first, then):
    """`failed retry` and `failed discard` (or the Dagster retry job) on the same letter at the
    same moment: the one that read the list before the other changed it must not act on what
    it read. Found by review: a retry after a discard requeued the discarded transaction (main
    got it, without its caches); a discard after a retry deleted the status and caches of a
    transaction queued again (and main still got it); two retries queued it twice."""
    import redis as redis_lib

    from obs_pipeline.dead_letters import UnknownTransaction

    tx_id, obs_id = dead_poison(settings)
    keys = SiteKeys(settings.site)
    other = dead_letters_of(settings, redis_lib.Redis.from_url(settings.redis_url))
    ours = dead_letters_of(settings, redis_lib.Redis.from_url(settings.redis_url))
    execute = redis_lib.client.Pipeline.execute
    armed = [True]

    def execute_after_the_other(pipe, *args, **kwargs):
        """The other operator acts just before ours reaches Redis with what it read."""
        if armed[0] and pipe.transaction and pipe.connection_pool is ours.store.redis.connection_pool:
            armed[0] = False
            getattr(other, first)([tx_id])
        return execute(pipe, *args, **kwargs)

    monkeypatch.setattr(redis_lib.client.Pipeline, "execute", execute_after_the_other)
    try:
        getattr(ours, then)([tx_id])
    except UnknownTransaction:
        pass  # it was gone from the list by then: the right answer
    assert not armed[0]
    monkeypatch.undo()
    queued = [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.buffer, 0, -1)]
    assert redis_client.llen(keys.failed) == 0
    if first == "discard":
        assert queued == [] and redis_client.get(keys.transaction(tx_id)) is None
        assert redis_client.get(keys.buffered("ExecutedObsUnit", obs_id)) is None
    else:
        assert queued == [tx_id]
        assert json.loads(redis_client.get(keys.transaction(tx_id)))["status"] == "pending"
        assert redis_client.get(keys.buffered("ExecutedObsUnit", obs_id)) is not None
    # discarded: no mark left; requeued: its dead mark is a live hold until it is applied
    # (its rows, and whether the rows it creates exist: `exists <row>`)
    assert set(redis_client.hvals(keys.held_ids)) == (set() if first == "discard" else {tx_id.encode()})


def _letter_state(redis_client, keys, tx_id) -> tuple[int, list[str], str | None]:
    """(letters of `tx_id` listed, ids queued in the buffer, its status)."""
    listed = [raw for raw in redis_client.lrange(keys.failed, 0, -1) if json.loads(raw)["transaction_id"] == tx_id]
    queued = [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.buffer, 0, -1)]
    status = redis_client.get(keys.transaction(tx_id))
    return len(listed), queued, json.loads(status)["status"] if status else None


@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize("action", ["retry", "discard"])
def test_a_retry_or_discard_redis_applied_past_the_socket_timeout_says_so_and_acts_once(settings, redis_client,
                                                                                       monkeypatch, action):
    """`failed retry --all` of a million letters: Redis ran the MULTI, past the CLI's 5 s socket
    timeout. redis-py raises a timeout while a pipeline WATCHes as a WatchError, which the retry
    took for the list changed: it read the list again and acted on what was left (here: "no
    dead-lettered transaction", the letter requeued); with a million, 20 reads, then "a drain is
    dead-lettering as it goes". It must say Redis did not answer and that it may have applied it."""
    import redis as redis_lib

    from obs_pipeline.dead_letters import RedisLostMidChange
    from obs_pipeline_tests.workload import exec_answered_late

    tx_id, _ = dead_poison(settings)
    keys = SiteKeys(settings.site)
    ours = dead_letters_of(settings, redis_lib.Redis.from_url(settings.redis_url, socket_timeout=5))
    execute = redis_lib.client.Pipeline.execute
    armed = [True]

    def execute_answered_late(pipe, *args, **kwargs):
        if armed[0] and pipe.watching and pipe.connection_pool is ours.store.redis.connection_pool:
            armed[0] = False
            exec_answered_late(pipe)
        return execute(pipe, *args, **kwargs)

    monkeypatch.setattr(redis_lib.client.Pipeline, "execute", execute_answered_late)
    with pytest.raises(RedisLostMidChange) as lost:
        getattr(ours, action)([tx_id])
    monkeypatch.undo()
    line = str(lost.value)
    assert line.startswith("Redis did not answer in time (Timeout reading from ") and line.endswith(
        f") after the {action} was sent to it: Redis may have applied it; check `obs-pipeline failed list` (site "
        f"{settings.site}) before running it again"), line
    redis_client.ping()  # (after the MULTI)
    assert _letter_state(redis_client, keys, tx_id) == ((0, [tx_id], "pending") if action == "retry" else (0, [], None))


@pytest.mark.usefixtures("clean_db")
def test_a_retry_gives_its_multi_a_socket_timeout_that_grows_with_it(settings, redis_client, monkeypatch):
    """The CLI's client times out after 5 s, and Redis ran the MULTI of `retry --all` with a
    million letters for longer: the retry waits for it in proportion to what it sends
    (EXEC_S_PER_ARGUMENT, raised here so that a MULTI of one letter is given seconds), and the
    connection has the client's own timeout again after it."""
    import redis as redis_lib

    from obs_pipeline import dead_letters
    from obs_pipeline_tests.workload import HOLD_REDIS

    tx_id, _ = dead_poison(settings)
    keys = SiteKeys(settings.site)
    ours = dead_letters_of(settings, redis_lib.Redis.from_url(settings.redis_url, socket_timeout=0.3))
    monkeypatch.setattr(dead_letters, "EXEC_S_PER_ARGUMENT", 0.5)
    execute = redis_lib.client.Pipeline.execute

    def execute_held(pipe, *args, **kwargs):
        if pipe.watching and pipe.connection_pool is ours.store.redis.connection_pool:
            pipe.eval(HOLD_REDIS, 0, 1.0)  # Redis takes 1 s over this MULTI
        return execute(pipe, *args, **kwargs)

    monkeypatch.setattr(redis_lib.client.Pipeline, "execute", execute_held)
    assert ours.retry([tx_id]) == [tx_id]
    monkeypatch.undo()
    assert _letter_state(redis_client, keys, tx_id) == (0, [tx_id], "pending")
    with pytest.raises(redis_lib.TimeoutError):  # on the same pooled connection: 0.3 s again
        ours.store.redis.eval(HOLD_REDIS, 0, 0.6)


@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize("moment", ["read", "exec"])
def test_a_retry_whose_connection_redis_closed_says_so_and_is_not_sent_again(settings, redis_client, monkeypatch,
                                                                            moment):
    """The connection reset while the retry WATCHes the list, as it reads it or as it sends its
    MULTI: redis-py raises that as a WatchError, and the retry read the list again and sent its
    MULTI a second time, unsaid. Had Redis run the first (a reset after it, see above), the second
    acted on what was left. It must stop with one line saying whether the MULTI was sent, and
    having run nothing twice; run again, it requeues the letter once."""
    import redis as redis_lib

    from obs_pipeline.dead_letters import DeadLetters, RedisLostMidChange
    from obs_pipeline_tests.workload import kill_connection

    tx_id, _ = dead_poison(settings)
    keys = SiteKeys(settings.site)
    ours = dead_letters_of(settings, redis_lib.Redis.from_url(settings.redis_url, socket_timeout=5))
    execute, read = redis_lib.client.Pipeline.execute, DeadLetters.list
    armed = [True]

    def execute_on_a_closed_connection(pipe, *args, **kwargs):
        if moment == "exec" and armed[0] and pipe.watching and pipe.connection_pool is ours.store.redis.connection_pool:
            armed[0] = False
            kill_connection(redis_client, pipe)
        return execute(pipe, *args, **kwargs)

    def read_on_a_closed_connection(letters, client=None):
        if moment == "read" and armed[0] and client is not None:
            armed[0] = False
            kill_connection(redis_client, client)
        return read(letters, client)

    monkeypatch.setattr(redis_lib.client.Pipeline, "execute", execute_on_a_closed_connection)
    monkeypatch.setattr(DeadLetters, "list", read_on_a_closed_connection)
    with pytest.raises(RedisLostMidChange) as lost:
        ours.retry([tx_id])
    monkeypatch.undo()
    line = str(lost.value)
    assert line.startswith("the connection to Redis was lost (") and "\n" not in line, line
    assert line.endswith("after the retry was sent to it: Redis may have applied it; check `obs-pipeline failed "
                         f"list` (site {settings.site}) before running it again" if moment == "exec" else
                         f"while the retry read the dead-letter list of site {settings.site}; nothing was changed: "
                         "run it again"), line
    assert _letter_state(redis_client, keys, tx_id) == (1, [], "failed")  # Redis closed it before the MULTI came
    assert ours.retry([tx_id]) == [tx_id]
    assert _letter_state(redis_client, keys, tx_id) == (0, [tx_id], "pending")


class Killed(BaseException):
    """The operator's command dies here (kill -9, a lost link): nothing more reaches Redis."""


@pytest.mark.usefixtures("clean_db")
def test_a_discard_that_dies_after_its_first_write_can_be_finished(settings, redis_client, monkeypatch):
    """Found by review: discard removed the letter in one call and its dead marks and caches in
    two more. Dying in between left the marks in held_ids for ever (every later transaction of
    those rows dead-lettered as blocked by a transaction no longer listed) and the discarded
    record visible to reads, and a second discard could not find the letter to finish."""
    import redis as redis_lib

    from obs_pipeline.dead_letters import UnknownTransaction

    tx_id, obs_id = dead_poison(settings)
    keys = SiteKeys(settings.site)
    assert redis_client.hlen(keys.held_ids) == 2  # the row it creates, and that row's existence
    letters = dead_letters_of(settings, redis_lib.Redis.from_url(settings.redis_url))
    execute, send = redis_lib.client.Pipeline.execute, redis_lib.connection.Connection.send_packed_command
    wrote = [False]

    def execute_and_die_after(pipe, *args, **kwargs):
        replies = execute(pipe, *args, **kwargs)
        wrote[0] = wrote[0] or pipe.transaction
        return replies

    def send_unless_dead(conn, *args, **kwargs):
        if wrote[0]:
            raise Killed()
        return send(conn, *args, **kwargs)

    monkeypatch.setattr(redis_lib.client.Pipeline, "execute", execute_and_die_after)
    monkeypatch.setattr(redis_lib.connection.Connection, "send_packed_command", send_unless_dead)
    try:
        letters.discard([tx_id])
    except Killed:
        pass
    monkeypatch.undo()
    try:  # the operator runs it again
        dead_letters_of(settings, redis_client).discard([tx_id])
    except UnknownTransaction:
        pass
    assert redis_client.llen(keys.failed) == 0
    assert redis_client.hlen(keys.held_ids) == 0
    assert redis_client.get(keys.buffered("ExecutedObsUnit", obs_id)) is None
    assert redis_client.get(keys.transaction(tx_id)) is None


@pytest.mark.usefixtures("clean_db")
def test_a_blocker_retried_while_the_drain_applies_its_dependent_takes_the_dependent_along(
        settings, redis_client, main_engine, monkeypatch):
    """Found by review: the drain reads the dead marks before main applies a batch and writes its
    decisions after. An operator's `failed retry` of a dead transaction in between requeued it,
    but its update, read as blocked by it, was dead-lettered after it ("blocked by" a transaction
    that then applied), the update never reached main, and its dead mark on the row then
    dead-lettered every later update of that row. Now the retry keeps the marks as live holds
    and the drain, seeing a mark it decided on change, claims the batch again."""
    import sqlalchemy as sa

    from obs_pipeline.drain import Drain, DrainConfig
    from obs_pipeline_tests.workload import drain_until_settled

    tx_id, obs_id = dead_poison(settings)
    buf = TransactionBuffer(settings=settings)
    finish = buf.update("ExecutedObsUnit", obs_id, {"status": "completed"})
    with main_engine.begin() as conn:  # the operator fixes the cause ...
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
    drain = Drain(settings, DrainConfig(retry_base_s=0.05))
    acknowledge = drain.store.acknowledge
    retried = []

    def retried_while_main_applied(token, outcome):  # ... and retries it while the update is applied
        if not retried:
            retried.extend(dead_letters_of(settings, redis_client).retry([tx_id]))
        return acknowledge(token, outcome)

    monkeypatch.setattr(drain.store, "acknowledge", retried_while_main_applied)
    try:
        drain.run(until_empty=True, budget_s=30)
    finally:
        drain.close()
    assert retried == [tx_id]
    drain_until_settled(settings, retry_base_s=0.05)
    keys = SiteKeys(settings.site)
    assert redis_client.lrange(keys.failed, 0, -1) == [] and redis_client.hlen(keys.held_ids) == 0
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :i"),
                            {"i": obs_id}).scalar_one() == "completed"
    assert buf.status(tx_id) == buf.status(finish) == "replicated"
    assert not redis_client.keys(keys.prefix + "parked:*")
    buf.close()


def test_stack_env_with_a_service_down_still_prints_and_says_so(stack):
    """It printed the lines and exit 0 without a word: a script run with them spooled to disk
    (Redis down) or failed on the replica, and nothing said the stack was not up."""
    stack.stop_service("redis")
    try:
        result = cli("stack", "env", "--dir", str(stack.directory))
    finally:
        stack.start_service("redis")
    assert result.returncode == 0 and "export OBS_REDIS_URL=" in result.stdout, result.stderr
    assert result.stderr.splitlines() == [
        f"obs-pipeline: note: redis of the local stack in {stack.directory} not running: "
        f"`obs-pipeline stack up --dir {stack.directory}`"], result.stderr
    assert cli("stack", "env", "--dir", str(stack.directory)).stderr == ""


@pytest.mark.parametrize("down", ["replica", "main"])
def test_status_with_a_database_down_names_it_still_shows_the_other_and_exits_4(stack, env, down):
    """With the replica stopped, `status` said only "database unreachable: ... port N ..." and
    dropped main's LSN, read a moment before; the operator could not tell which database was down.
    And it exited 0, as for a healthy site: a monitoring script could not see the outage."""
    stack.stop_service(down)
    try:
        result = cli("status", "--json", "--check", env=env)
        text = cli("status", "--check", env=env)
    finally:
        stack.start_service(down)
    report = json.loads(result.stdout)
    other = "main" if down == "replica" else "replica"
    assert report["status"] == "unhealthy"
    assert report["replication_lag"][f"{other}_lsn"] and report["replication_lag"][f"{down}_lsn"] is None
    variable = f"OBS_{down.upper()}_DB_URL"
    assert len(report["problems"]) == 1 and report["problems"][0].startswith(f"{down} unreachable ({variable}): ")
    for each in (result, text):
        assert each.returncode == 4
        assert one_line_error(each).startswith(f"obs-pipeline: site {env['OBS_SITE']} is unhealthy: {down} unreachable")
    assert text.stdout.startswith(f"site {env['OBS_SITE']}: unhealthy ({down} unreachable ({variable}): ")


@pytest.mark.usefixtures("clean_db")
def test_status_exits_0_when_healthy_and_3_when_degraded(env, redis_client, settings):
    """A monitoring script can rely on `status --check`'s exit status: it was 0 whatever the
    report said (a dead letter waiting for an operator, an unreachable database). Without
    --check the report given is a success, exit 0 (a script with `set -e` stopped at every
    dead letter), with the same line on stderr."""
    healthy = cli("status", "--check", env=env)
    assert healthy.returncode == 0 and healthy.stderr == "", healthy.stderr
    healthy = cli("status", env=env)
    assert "oldest pending none" in healthy.stdout and "None" not in healthy.stdout, healthy.stdout  # was "None s"
    redis_client.lpush(SiteKeys(settings.site).buffer, b"not json at all")
    assert cli("drain", "--once", env=env).returncode == 0
    for args in (["status"], ["status", "--json"], ["status", "--check"], ["status", "--json", "--check"]):
        degraded = cli(*args, env=env)
        assert degraded.returncode == (3 if "--check" in args else 0), degraded.stderr
        assert degraded.stderr.splitlines() == [  # with what to do, as the other problems say
            f"obs-pipeline: site {settings.site} is degraded: 1 dead-lettered: see `obs-pipeline failed list` and "
            "`failed show ID`; 1 has no usable transaction id (#N@digest in `failed list`) and cannot be retried: "
            "`failed discard #N@digest` as listed"]
    assert json.loads(degraded.stdout)["status"] == "degraded"
    assert cli("failed", "discard", "#1", env=env).returncode == 0
    assert cli("status", "--check", env=env).returncode == 0


def test_status_check_with_redis_down_exits_4_as_unhealthy(env, settings):
    """A monitor's `status --check` exited 1 with Redis down, the exit it gets for a check that
    could not run (a usage error is 2): the site's worst state (scripts spool to disk, nothing
    drains) read as the monitor's own fault. With --check it is 4, unhealthy, in one line;
    without it, 1 as for every command that left no report."""
    from obs_pipeline.stack.osutil import pick_free_ports

    down = {**env, "OBS_REDIS_URL": f"redis://127.0.0.1:{pick_free_ports(1)[0]}/0"}
    for args, code in ((["status"], 1), (["status", "--check"], 4), (["status", "--json", "--check"], 4)):
        result = cli(*args, env=down)
        assert result.returncode == code and result.stdout == "", (args, result.returncode, result.stdout)
        line = one_line_error(result)
        assert line.startswith(f"obs-pipeline: site {settings.site} is unhealthy: Redis unreachable ("
                               if code == 4 else "obs-pipeline: error: Redis unreachable ("), (args, line)


def test_a_redis_refusing_the_url_s_user_or_password_is_said_so_not_unreachable(env, settings):
    """A wrong password (or user) in OBS_REDIS_URL: every command said `Redis unreachable (invalid
    username-password pair ...); is OBS_REDIS_URL right and the stack up?`, sending the operator
    to the network and the stack, which answered. It says which setting to fix."""
    host_port = settings.redis_url.split("//", 1)[1]
    refused = {**env, "OBS_REDIS_URL": f"redis://nobody:wrong@{host_port}"}
    for args, code in ((["status"], 1), (["status", "--check"], 4), (["failed", "list"], 1), (["drain", "--once"], 1)):
        result = cli(*args, env=refused)
        assert result.returncode == code, (args, result.returncode, result.stderr)
        line = one_line_error(result)
        assert line.endswith("Redis refuses OBS_REDIS_URL's user or password (invalid username-password pair or user "
                             "is disabled.): give the right ones in OBS_REDIS_URL "
                             "(redis://USER:PASSWORD@HOST:PORT/DB, or redis://:PASSWORD@... for the default user)"), \
            (args, line)


def test_status_check_exits_3_when_the_replica_url_names_a_primary(env, settings):
    """OBS_REPLICA_DB_URL naming a primary (here the stack's main) answers, but reports no replay
    position: no replay will ever clean a batch's caches. `status` calls the site degraded and
    says so, and `status --check` exits 3 (README, Operations)."""
    from obs_pipeline.health import NO_REPLAY_POSITION

    env = {**env, "OBS_REPLICA_DB_URL": settings.main_db_url}
    for args in (["status"], ["status", "--check"], ["status", "--json", "--check"]):
        result = cli(*args, env=env)
        assert result.returncode == (3 if "--check" in args else 0), result.stderr
        assert result.stderr.splitlines() == [f"obs-pipeline: site {settings.site} is degraded: {NO_REPLAY_POSITION}"]
    assert NO_REPLAY_POSITION == "the replica reports no replay position: OBS_REPLICA_DB_URL may name a primary"
    report = json.loads(result.stdout)
    assert report["status"] == "degraded" and report["problems"] == [NO_REPLAY_POSITION], report
    assert report["replication_lag"]["replica_lsn"] is None
    text = cli("status", "--check", env=env).stdout
    assert text.startswith(f"site {settings.site}: degraded ({NO_REPLAY_POSITION})\n"), text


@pytest.mark.usefixtures("clean_db")
def test_status_advises_for_the_kinds_of_dead_letters_listed(env, redis_client, settings):
    """`status` told an operator to `failed retry` every dead letter, but `failed retry` refuses a
    spooled line Redis could not take (refused_spool_line: its steps must be buffered again, after
    a look at its rows) and a letter without a usable id: followed, the advice failed each time.
    Each step the advice gives now works, and the site ends healthy."""
    keys = SiteKeys(settings.site)
    doc, _ = seed_example(settings.site)
    doc["steps"][0]["model_class"] = "Telescope"  # dead-lettered by the drain, with its id
    redis_client.lpush(keys.buffer, json.dumps(doc))
    assert cli("drain", "--once", env=env).returncode == 0
    spool_dir = Path(settings.spool_dir)  # a line of another layout (the transaction as an object)
    spool_dir.mkdir(mode=0o700)
    refused_id = "spooled-other-layout"
    (spool_dir / f"{settings.site}.jsonl").write_text(
        json.dumps({"id": refused_id, "tx": {"transaction_id": refused_id, "steps": []}}) + "\n")
    env = {**env, "OBS_SPOOL_DIR": settings.spool_dir}
    assert cli("spool", "push", env=env).returncode == 0
    assert [[place_or_id(line), *line.split("\t")[1:3]] for line in cli("failed", "list", env=env).stdout.splitlines()] == [
        [doc["transaction_id"], doc["endpoint"], "invalid"], [refused_id, "None", "refused_spool_line"]]
    site = f"obs-pipeline: site {settings.site} is degraded: "
    refused = ("1 is a spooled line Redis could not take (refused_spool_line), which cannot be retried: check its "
               "rows as they are now, buffer the steps still wanted again, then `failed discard ID`")
    assert cli("status", env=env).stderr.splitlines() == [
        f"{site}2 dead-lettered: see `obs-pipeline failed list` and `failed show ID`; {refused}; the others: "
        "`failed retry ID` (or `--all`) once the cause is fixed, or `failed discard ID`"]
    assert "cannot be retried" in one_line_error(cli("failed", "retry", refused_id, env=env))
    assert cli("failed", "retry", "--all", env=env).returncode == 0  # the other one, as advised
    assert [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.buffer, 0, -1)] == [doc["transaction_id"]]
    redis_client.delete(keys.buffer)  # (the example's timestamp is old: its age would be a problem too)
    assert cli("status", env=env).stderr.splitlines() == [
        f"{site}1 dead-lettered: see `obs-pipeline failed list` and `failed show ID`; {refused}"]
    assert cli("failed", "discard", refused_id, env=env).returncode == 0
    assert cli("status", "--check", env=env).returncode == 0


@pytest.mark.usefixtures("clean_db")
def test_status_fits_its_advice_to_large_dead_letters_without_reading_them(env, redis_client, settings):
    """The advice's kinds were read by sending status the newest 1,000 letters whole: a few
    bulk_creates dead-lettered are tens of megabytes, for a monitor every minute, against the
    CLI's 5 s socket timeout. A large letter's kind is looked at in Redis; the advice is the same,
    among the letters looked at until KINDS_BYTES (4 MB: Redis waits meanwhile) is passed, the newest 3."""
    keys = SiteKeys(settings.site)
    doc, _ = seed_example(settings.site)
    letter = {**doc, "metadata": {"padding": "x" * 4_000_000}, "status": "failed",
              "failure": {"reason": "too large for main", "kind": "permanent"}}
    redis_client.lpush(keys.failed, *[json.dumps({**letter, "transaction_id": f"large-{i}"}) for i in range(5)])
    spool_dir = Path(settings.spool_dir)
    spool_dir.mkdir(mode=0o700)
    (spool_dir / f"{settings.site}.jsonl").write_text("y" * 100_000 + "\n")  # a hand's edit: refused, 100 KB
    env = {**env, "OBS_SPOOL_DIR": settings.spool_dir}
    assert cli("spool", "push", env=env).returncode == 0
    assert len(redis_client.lindex(keys.failed, 0)) > 100_000  # the line is in its letter
    before = redis_client.info("stats")["total_net_output_bytes"]
    status = cli("status", env=env)
    sent = redis_client.info("stats")["total_net_output_bytes"] - before
    assert status.stderr.splitlines() == [
        f"obs-pipeline: site {settings.site} is degraded: 6 dead-lettered: see `obs-pipeline failed list` and "
        "`failed show ID`; 1 of the newest 3 is a spooled line Redis could not take (refused_spool_line), which "
        "cannot be retried: "
        "check its rows as they are now, buffer the steps still wanted again, then `failed discard ID`; the "
        "others: `failed retry ID` (or `--all`) once the cause is fixed, or `failed discard ID`"], status.stderr
    assert sent < 1_000_000, sent


def test_status_for_a_redis_user_allowed_only_reads_still_reports(env, redis_client, settings):
    """A monitor's Redis user may be allowed reads only: the kinds of the dead letters are read
    by a script (EVAL), and status exited 1 with "this user has no permissions to run the 'eval'
    command": the report stands, with the advice of old."""
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.failed, b"not json at all")
    user, password = f"monitor-{settings.site}", "secret-of-the-monitor"
    redis_client.execute_command("ACL", "SETUSER", user, "on", f">{password}", f"~site:{settings.site}:*",
                                 "+@read", "+info", "+ping", "+hello", "+client")
    try:
        url = settings.redis_url.replace("redis://", f"redis://{user}:{password}@", 1)
        status = cli("status", "--check", env={**env, "OBS_REDIS_URL": url})
    finally:
        redis_client.execute_command("ACL", "DELUSER", user)
    assert status.returncode == 3 and status.stderr.splitlines() == [
        f"obs-pipeline: site {settings.site} is degraded: 1 dead-lettered: see `obs-pipeline failed list` and "
        "`failed show ID`, then `failed retry ID` (or `--all`) once the cause is fixed, or `failed discard ID`"], \
        status.stderr
    assert status.stdout.startswith(f"site {settings.site}: degraded"), status.stdout


@pytest.mark.usefixtures("clean_db")
def test_status_with_a_deeply_nested_entry_next_in_line_still_reports(env, redis_client, settings):
    """A producer's entry nested past the JSON parser's depth (the drain dead-letters it as
    `nested too deeply`) at the head of the queue or in processing: `status` read its age and
    exited 1 with `obs-pipeline: error: maximum recursion depth exceeded while decoding a JSON
    array from a unicode string`, no report, until a drain had taken it."""
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, "[" * 100_000)
    for where in ("buffer", "processing"):
        for args in (["status"], ["status", "--json"]):
            result = cli(*args, env=env)
            assert result.returncode == 0 and result.stderr == "", (where, result.stderr)
        report = json.loads(result.stdout)
        assert report["status"] == "healthy", report["problems"]
        assert report["transaction_buffer"]["oldest_pending_seconds"] is None
        assert report["transaction_buffer"]["size" if where == "buffer" else "processing"] == 1
        redis_client.lmove(keys.buffer, keys.processing, "RIGHT", "LEFT")
    redis_client.lmove(keys.processing, keys.buffer, "RIGHT", "LEFT")
    assert cli("drain", "--once", env=env).returncode == 0
    assert "nested too deeply" in cli("failed", "list", env=env).stdout
    assert cli("status", env=env).returncode == 0


@pytest.mark.usefixtures("clean_db")
def test_status_oldest_pending_is_read_past_a_processing_entry_without_a_timestamp(env, redis_client, settings):
    """A producer's entry without a readable timestamp left in processing (its drain died)
    stood for the whole backlog: 'oldest pending none' and healthy, with a transaction of
    2025 waiting in the buffer behind it."""
    keys = SiteKeys(settings.site)
    stampless, _ = seed_example(settings.site)
    del stampless["timestamp"]
    redis_client.lpush(keys.processing, json.dumps(stampless))
    redis_client.lpush(keys.buffer, json.dumps(seed_example(settings.site)[0]))  # of 2025-01-01
    report = json.loads(cli("status", "--json", env=env).stdout)
    assert report["transaction_buffer"]["oldest_pending_seconds"] > 86400, report["transaction_buffer"]
    assert any(p.startswith("oldest pending transaction is ") for p in report["problems"]), report["problems"]


@pytest.mark.usefixtures("clean_db")
def test_status_oldest_pending_is_the_buffers_with_a_local_spool_waiting(env, redis_client, settings, tmp_path):
    """`transaction_buffer.oldest_pending_seconds` is the age of the oldest transaction in Redis's
    buffer (or processing list); the spool has its own, `local_spool.oldest_seconds`. With
    transactions waiting in the local spool, status reported the spool's oldest age there
    instead: an empty buffer showed `oldest pending 600.0 s`, and a buffer holding a transaction
    two minutes old beside a spooled one ten minutes old showed ten minutes."""
    import datetime as dt

    def stamp(seconds_ago: float) -> str:
        return (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds_ago)).isoformat()

    spooled, _ = seed_example(settings.site)
    spooled["timestamp"] = stamp(600)
    (tmp_path / f"{settings.site}.jsonl").write_text(json.dumps(
        {"id": spooled["transaction_id"], "tx": json.dumps(spooled), "created": [], "overlays": []}) + "\n")
    env = {**env, "OBS_SPOOL_DIR": str(tmp_path)}
    report = json.loads(cli("status", "--json", env=env).stdout)
    assert report["local_spool"]["pending"] == 1 and report["local_spool"]["oldest_seconds"] >= 600, report
    assert report["transaction_buffer"]["size"] == 0
    assert report["transaction_buffer"]["oldest_pending_seconds"] is None, report["transaction_buffer"]
    assert "oldest pending none\n" in cli("status", env=env).stdout
    buffered, _ = seed_example(settings.site)
    buffered["timestamp"] = stamp(120)
    redis_client.lpush(SiteKeys(settings.site).buffer, json.dumps(buffered))
    report = json.loads(cli("status", "--json", env=env).stdout)
    assert 120 <= report["transaction_buffer"]["oldest_pending_seconds"] < 300, report["transaction_buffer"]
    assert report["local_spool"]["oldest_seconds"] >= 600, report["local_spool"]


def test_status_shows_the_drains_pieces_after_timeouts_on_main_and_nothing_without(env, redis_client, settings):
    """After main cancelled the drain's statements (its statement_timeout or lock_timeout) the
    drain applies batches in pieces and counts the transactions that timed out alone, in Redis;
    `status` did not say so, and an operator could not tell why the drain was slow, nor that a
    transaction was on its way to the dead letters. Two lines, what to check on main; the site
    stays healthy (the drain goes on by itself). Nothing of it once the key is gone."""
    store = BufferStore(redis_client, settings.site)
    store.save_timeouts(4, {"tx-1": 2})  # no attempts saved (as before the drain saved them): the default's 5
    role = sa.engine.make_url(settings.main_db_url).username
    text = cli("status", "--check", env=env)
    assert text.returncode == 0 and text.stderr == "", text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == f"site {settings.site}: healthy", text.stdout
    assert lines[3:5] == [
        "  drain timeouts: batches applied in pieces of 4 transactions after statement/lock timeouts on main "
        "(doubling at each batch that goes through, until whole again); timed out alone: tx-1 2 of 5 times in a row "
        "(dead-lettered at 5)",
        "    if it goes on: check main's statement_timeout and lock_timeout for the drain's role "
        f"(ALTER ROLE {role} SET statement_timeout = ...), and pg_stat_activity on main for a session holding a "
        "lock the drain waits for; main's log names a session that cancels the drain's statements "
        "(pg_cancel_backend)"], text.stdout
    report = json.loads(cli("status", "--json", env=env).stdout)
    shown = report["drain_timeouts"]
    assert (shown["piece"], shown["timed_out_alone"], shown["timeout_attempts"]) == (4, {"tx-1": 2}, 5), shown
    assert shown["note"] in lines[3] and shown["check"] in lines[4]
    assert report["status"] == "healthy" and report["problems"] == [], report
    store.save_timeouts(None, {})  # batches whole again: the drain deletes the key
    assert not redis_client.exists(SiteKeys(settings.site).timeouts)
    text = cli("status", env=env).stdout
    assert len(text.splitlines()) == 5 and "timeout" not in text and "pieces" not in text, text
    assert "drain_timeouts" not in json.loads(cli("status", "--json", env=env).stdout)


@pytest.mark.usefixtures("clean_db")
def test_status_shows_what_a_real_statement_timeout_left_until_batches_go_whole_again(env, settings, main_engine):
    """A real drain on a real statement timeout (0.3 s for the drain's role; one file takes main
    1 s to insert): the batch times out whole, then its slow transaction alone, twice. `status`
    says pieces of 1 and that transaction's 2 of 3, the drain's own timeout_attempts (a Dagster
    run config's, say: `status` said "of 5", the default, and "dead-lettered at 5" of one a
    timeout away from it); once the cause is gone and a batch goes through, the counts end and
    the pieces double (2); once batches go whole, nothing."""
    buf = TransactionBuffer(settings=settings)
    try:
        observations = buffer_observations(buf, 2, finish_every=0)  # 2 transactions, one batch
        slow = observations[1]
        with slow_file_inserts(main_engine, 1.0, name="f1_0.fits"):
            for _ in range(3):  # whole, then alone twice (the first piece commits)
                with pytest.raises(StatementTimeout):
                    drain_one_batch(with_statement_timeout(settings, 300), batch_size=10, timeout_attempts=3)
        text = cli("status", env=env).stdout
        assert ("  drain timeouts: batches applied in pieces of 1 transaction after statement/lock timeouts on main"
                in text), text
        assert f"; timed out alone: {slow.start_tx} 2 of 3 times in a row (dead-lettered at 3)\n" in text, text
        assert json.loads(cli("status", "--json", env=env).stdout)["drain_timeouts"]["timeout_attempts"] == 3
        drain_one_batch(settings, batch_size=10)  # the cause gone: it goes through
        text = cli("status", env=env).stdout
        assert "batches applied in pieces of 2 transactions after" in text and "timed out alone" not in text, text
        more = buffer_observations(buf, 8, finish_every=0)
    finally:
        buf.close()
    drain_until_settled(settings, batch_size=4)  # pieces of 2, then 4: whole batches
    text = cli("status", env=env).stdout
    assert "drain timeouts" not in text and "pieces" not in text, text
    assert_applied_exactly_once(main_engine, observations + more)


def test_a_drain_beside_one_holding_the_lease_says_what_to_do(env, settings, redis_client):
    """It said only "another drain holds the lease ...; it expires in 60 s unless that drain renews
    it": not that this one did nothing, nor what the operator could do about it."""
    keys = SiteKeys(settings.site)
    redis_client.set(keys.lease, "another-drains-token", px=60_000)
    try:
        line = one_line_error(cli("drain", env=env))
    finally:
        assert redis_client.get(keys.lease) == b"another-drains-token"  # untouched
        redis_client.delete(keys.lease)
    assert line.startswith(f"obs-pipeline: error: another drain holds the lease of site '{settings.site}'"), line
    assert line.endswith("unless that drain renews it: let it drain the site, or stop it (`obs-pipeline dev`, another "
                         "`obs-pipeline drain`, Dagster's buffer_sensor) and run this again"), line


@pytest.mark.parametrize("wrong", ["role", "database"])
def test_a_main_url_main_refuses_is_one_line_not_a_drain_retrying_for_ever(env, settings, redis_client, wrong):
    """Main answering "role/database does not exist" is a wrong OBS_MAIN_DB_URL, not an outage:
    `drain --once` retried it as transient, backing off for ever (and Dagster for minutes, then
    again every minute). It stops with one line; the transactions stay buffered, their statuses
    `pending`, not `processing` (which said a drain was applying them until the next run)."""
    import sqlalchemy as sa

    from obs_pipeline.ingest import TransactionBuffer

    url = sa.engine.make_url(env["OBS_MAIN_DB_URL"])
    url = url.set(username="no_such_role") if wrong == "role" else url.set(database="no_such_database")
    env["OBS_MAIN_DB_URL"] = url.render_as_string(hide_password=False)
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    buffered = []
    for n in range(3):
        with buf.transaction() as tx:
            tx.create("ExecutedObsUnit", {"obs_unit_id": n, "start_time": "2025-01-01T00:00:00Z", "status": "running"})
        buffered.append(tx.transaction_id)
    redis_client.lpush(keys.buffer, json.dumps(pushed := seed_example(settings.site)[0]))  # no status key of its own
    base = {k: v for k, v in os.environ.items() if not k.startswith("OBS_")}
    result = subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "drain", "--once"], env={**base, **env},
                            capture_output=True, text=True, timeout=60)
    line = one_line_error(result)
    assert "OBS_MAIN_DB_URL" in line and f"no_such_{wrong}" in line and "does not exist" in line, line
    assert redis_client.llen(keys.buffer) + redis_client.llen(keys.processing) == 4
    assert not redis_client.exists(keys.lease)
    assert [buf.status(tx_id) for tx_id in [*buffered, pushed["transaction_id"]]] == ["pending"] * 4
    buf.close()


@pytest.mark.parametrize("option, refused", [
    ({"sslmode": "bogus"}, 'invalid sslmode value: "bogus"'),
    ({"target_session_attrs": "primary-only"}, 'invalid target_session_attrs value: "primary-only"'),
    ({"hostaddr": "not-an-address"}, 'could not parse network address "not-an-address"'),
])
def test_a_main_url_option_libpq_refuses_is_one_line_not_a_drain_retrying_for_ever(env, settings, redis_client,
                                                                                   option, refused):
    """An option value libpq refuses before it asks main anything (a typo in `?sslmode=`) is a
    wrong OBS_MAIN_DB_URL, as a role main does not know is: `drain --once` took it for main
    unreachable and retried for ever ("retrying the same batch in 30.0 s"). It stops with one
    line naming the variable and libpq's reason; the transactions stay buffered, `pending`."""
    env["OBS_MAIN_DB_URL"] = sa.engine.make_url(env["OBS_MAIN_DB_URL"]).update_query_dict(option) \
        .render_as_string(hide_password=False)
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    try:
        buffered = [o.start_tx for o in buffer_observations(buf, 3, finish_every=0)]
        line = one_line_error(cli("drain", "--once", env=env, timeout=30))
        assert "OBS_MAIN_DB_URL" in line and refused in line, line
        assert redis_client.llen(keys.buffer) + redis_client.llen(keys.processing) == len(buffered)
        assert not redis_client.exists(keys.lease)
        assert [buf.status(tx_id) for tx_id in buffered] == ["pending"] * len(buffered)
    finally:
        buf.close()


@pytest.fixture(params=[True, False], ids=["hot standby", "hot_standby off"])
def standby_as_main(request, env: dict[str, str]) -> str:
    """`env` with OBS_MAIN_DB_URL naming a standby (as after a failover that demoted main, or a
    URL copied from the wrong line): the site's streaming replica, a hot standby, or one with
    hot_standby off, which refuses every connection; the line that names it."""
    hot = request.param
    env["OBS_MAIN_DB_URL"] = env["OBS_REPLICA_DB_URL"] if hot else request.getfixturevalue("cold_standby_url")
    url = sa.engine.make_url(env["OBS_MAIN_DB_URL"])
    what = ("a read-only standby (pg_is_in_recovery)" if hot else
            'a standby with hot_standby off (it refuses every connection: "Hot standby mode is disabled")')
    return f"main at {url.host}:{url.port}/{url.database} is {what}: point OBS_MAIN_DB_URL at the primary"


@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize("once", [True, False])
def test_a_main_url_naming_a_standby_stops_the_drain_in_one_line_and_dead_letters_nothing(
        env, standby_as_main, settings, redis_client, main_engine, once):
    """A hot standby refuses the batch's INSERT with 25006 (read_only_sql_transaction), which the
    drain sorted as transient: `drain --once` said "main unreachable" and retried for ever, as
    a service did; one with hot_standby off refuses the connect (57P03, sorted the same). No
    retry fixes either, and the transactions are not at fault: the drain stops with one line
    naming the standby and the fix, dead-letters nothing, releases its lease, leaves the
    statuses `pending`; a drain against the real main then applies each exactly once."""
    expected = standby_as_main
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 3, finish_every=2)
    ids = [tx for o in observations for tx in (o.start_tx, o.finish_tx) if tx]
    try:
        base = {k: v for k, v in os.environ.items() if not k.startswith("OBS_")}
        command = [sys.executable, "-m", "obs_pipeline.cli", "drain", *(["--once"] if once else [])]
        result = subprocess.run(command, env={**base, **env}, capture_output=True, text=True,
                                timeout=60)
        line = one_line_error(result)
        stays = "the transactions stay buffered until then"
        assert line == f"obs-pipeline: error: {expected}; {stays}", line
        assert redis_client.llen(keys.buffer) + redis_client.llen(keys.processing) == len(ids)
        assert redis_client.llen(keys.failed) == 0 and redis_client.zcard(keys.retry) == 0
        assert not redis_client.exists(keys.lease)
        assert [buf.status(tx_id) for tx_id in ids] == ["pending"] * len(ids)
        drain_until_settled(settings)
        assert [buf.status(tx_id) for tx_id in ids] == ["replicated"] * len(ids)
    finally:
        buf.close()
    assert_applied_exactly_once(main_engine, observations)
    assert redis_client.llen(keys.failed) == 0


@pytest.fixture
def weak_role(settings, main_engine):
    """A login role of main's with no privileges on its tables: OBS_MAIN_DB_URL for it, and a
    function granting it some (dropped at the end)."""
    role = f"weak_{settings.site}"
    url = sa.engine.make_url(settings.main_db_url).set(username=role)
    with main_engine.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN"))

    def grant(tables: str) -> None:
        with main_engine.begin() as conn:
            conn.execute(sa.text(f"GRANT ALL ON {tables} TO {role}"))

    try:
        yield url.render_as_string(hide_password=False), grant
    finally:
        with main_engine.begin() as conn:
            conn.execute(sa.text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"))
            conn.execute(sa.text(f"DROP OWNED BY {role}"))
            conn.execute(sa.text(f"DROP ROLE {role}"))


@pytest.mark.usefixtures("clean_db")
def test_a_drain_role_without_privileges_on_a_model_table_stops_in_one_line_and_dead_letters_nothing(
        env, weak_role, settings, redis_client, main_engine):
    """Main refusing the drain's role a table ("permission denied for table executed_obs_unit",
    42501) was charged to each transaction as its data's fault: retried, then the whole backlog
    dead-lettered (each `drain --once` exited 0); refused obs_pipeline_applied, the drain exited
    with the batch left `processing`. No retry fixes a missing GRANT, and the transactions are
    not at fault: the drain stops in one line naming the privilege and the fix, dead-letters
    nothing, leaves the statuses `pending`; granted, it applies each once."""
    url, grant = weak_role
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 3, finish_every=2)
    ids = [tx for o in observations for tx in (o.start_tx, o.finish_tx) if tx]
    try:
        weak = {**env, "OBS_MAIN_DB_URL": url}
        for refused in ("obs_pipeline_applied", "executed_obs_unit", "executed_obs_unit"):
            line = one_line_error(cli("drain", "--once", env=weak))
            assert line == (f"obs-pipeline: error: main refuses the drain's role (InsufficientPrivilege: permission "
                            f"denied for table {refused}): grant the role in OBS_MAIN_DB_URL SELECT, INSERT, UPDATE "
                            "and DELETE on the models' tables and obs_pipeline_applied (USAGE on their sequences); "
                            "the transactions stay buffered until then"), line
            assert redis_client.llen(keys.failed) == 0 and redis_client.zcard(keys.retry) == 0
            assert not redis_client.exists(keys.lease)
            assert [buf.status(tx_id) for tx_id in ids] == ["pending"] * len(ids)
            grant("obs_pipeline_applied")
        grant("ALL TABLES IN SCHEMA public")
        result = cli("drain", "--once", env=weak)
        assert result.returncode == 0, result.stderr
        assert [buf.status(tx_id) for tx_id in ids] == ["replicated"] * len(ids)
    finally:
        buf.close()
    assert_applied_exactly_once(main_engine, observations)
    assert redis_client.llen(keys.failed) == 0


def test_db_init_by_a_role_that_may_not_change_main_s_tables_says_whose_to_use(env, weak_role):
    """`db init` as a role that does not own the tables (or may not create them) said only
    PostgreSQL's "must be owner of table obs_pipeline_applied", naming neither the variable nor
    what to do."""
    url, _ = weak_role
    line = one_line_error(cli("db", "init", env={**env, "OBS_MAIN_DB_URL": url}))
    assert line == ("obs-pipeline: error: main refuses `db init` the role in OBS_MAIN_DB_URL (InsufficientPrivilege: "
                    "must be owner of table obs_pipeline_applied): run it as the role that owns the tables and may "
                    "create tables in their schema (the one that made them, or postgres)"), line


@pytest.mark.usefixtures("clean_db")
def test_a_row_level_security_refusal_is_the_transaction_s_own_and_the_drain_goes_on(
        env, weak_role, settings, redis_client, main_engine):
    """A row-level security policy refuses rows with the same SQLSTATE (42501, "new row violates
    row-level security policy"): that is the transaction's data, not the role's privileges, so
    it is charged to that transaction alone, and the others apply."""
    url, grant = weak_role
    grant("ALL TABLES IN SCHEMA public")
    keys = SiteKeys(settings.site)
    with main_engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE raw_data_file ENABLE ROW LEVEL SECURITY"))
        conn.execute(sa.text("CREATE POLICY no_bad_files ON raw_data_file USING (true) WITH CHECK (name <> 'bad.fits')"))
    buf = TransactionBuffer(settings=settings)
    try:
        good = buffer_observations(buf, 2, finish_every=0)
        with buf.transaction(endpoint="start_observation") as tx:
            obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                                "status": "running"})
            pkg = tx.create("RawDataPackage", {"name": "refused", "executed_obs_unit_id": obs["id"]})
            tx.create("RawDataFile", {"name": "bad.fits", "raw_data_package_id": pkg["id"]})
        result = cli("drain", "--once", env={**env, "OBS_MAIN_DB_URL": url})
        assert result.returncode == 0, result.stderr
        assert [buf.status(o.start_tx) for o in good] == ["replicated"] * 2
        assert buf.status(tx.transaction_id) == "pending" and redis_client.zcard(keys.retry) == 1
    finally:
        buf.close()
        with main_engine.begin() as conn:
            conn.execute(sa.text("DROP POLICY no_bad_files ON raw_data_file"))
            conn.execute(sa.text("ALTER TABLE raw_data_file DISABLE ROW LEVEL SECURITY"))
    assert_applied_exactly_once(main_engine, good)


@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize("model, record, refusal, fix, undo", [
    ("Telescope", {"id": 1, "name": "main"},
     "main has no table of a model of OBS_MODELS (UndefinedTable: relation \"unmigrated_telescope\" does not exist): "
     "run `obs-pipeline db init` with this OBS_MODELS, which creates it",
     None, "DROP TABLE unmigrated_telescope"),
    ("ObsUnit", {"id": 9001, "name": "unit 9001", "priority": 1},
     "main lacks a column OBS_MODELS maps (UndefinedColumn: column \"priority\" of relation \"obs_unit\" does not "
     "exist): add the column to the table on main (`db init` creates missing tables, not columns), or drop it from "
     "the model", "ALTER TABLE obs_unit ADD COLUMN priority integer",
     "DELETE FROM obs_unit WHERE id = 9001; ALTER TABLE obs_unit DROP COLUMN priority"),
], ids=["a table", "a column"])
def test_a_model_whose_table_or_column_main_lacks_stops_the_drain_in_one_line_and_dead_letters_nothing(
        env, settings, redis_client, main_engine, replica_engine, model, record, refusal, fix, undo):
    """A model added to OBS_MODELS without `db init` since (or a column added to a model, not to
    its table): main refused each of its transactions (42P01, 42703), charged to each as its
    data's fault, retried, then dead-lettered. The transactions are not at fault: the drain stops
    in one line saying what to do, dead-letters nothing; once main has it, each applies once."""
    import dataclasses

    models = "obs_pipeline_tests.unmigrated_models:Base"
    keys = SiteKeys(settings.site)
    # (buffered unchecked against the replica, which lacks it too: ingest refuses a given key it cannot look up)
    buf = TransactionBuffer(settings=dataclasses.replace(settings, models=models, replica_db_url=None))
    try:
        with buf.transaction() as tx:
            tx.create(model, record)
        site = {**env, "OBS_MODELS": models}
        for _ in range(2):
            line = one_line_error(cli("drain", "--once", env=site))
            assert line == f"obs-pipeline: error: {refusal}; the transactions stay buffered until then", line
            assert redis_client.llen(keys.failed) == 0 and redis_client.zcard(keys.retry) == 0
            assert buf.status(tx.transaction_id) == "pending"
        if fix:
            with main_engine.begin() as conn:
                conn.execute(sa.text(fix))
        else:
            assert cli("db", "init", env=site).returncode == 0
        try:
            result = cli("drain", "--once", env=site)
            assert result.returncode == 0, result.stderr
            assert buf.status(tx.transaction_id) == "replicated"
            table = "unmigrated_telescope" if model == "Telescope" else "obs_unit"
            with main_engine.connect() as conn:
                assert conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE id = :i"),
                                    {"i": record["id"]}).scalar() == 1
        finally:
            with main_engine.begin() as conn:  # (as the other tests expect main)
                conn.execute(sa.text(undo))
            wait_for_replica(main_engine, replica_engine)
    finally:
        buf.close()
    assert redis_client.llen(keys.failed) == 0


def test_status_with_a_main_url_naming_a_standby_says_so_and_exits_4(env, standby_as_main):
    """It said "main unreachable (OBS_MAIN_DB_URL): recovery is in progress" (the flush LSN's
    55000 on a hot standby), or "... the database system is not accepting connections" (one with
    hot_standby off): main answers, and the fix is the URL."""
    expected = standby_as_main
    result = cli("status", "--json", "--check", env=env)
    report = json.loads(result.stdout)
    assert report["status"] == "unhealthy" and report["problems"] == [expected], report
    lag = report["replication_lag"]
    assert lag["main_lsn"] is None and lag["replica_lsn"]
    assert result.returncode == 4
    line = one_line_error(result)
    assert line == f"obs-pipeline: site {env['OBS_SITE']} is unhealthy: {expected}", line


def test_a_main_still_starting_up_stays_an_outage_the_drain_waits_out(env, settings, starting_standby_url):
    """The same SQLSTATE as hot_standby off (57P03), said while main starts or recovers from a
    crash: it passes by itself, so the drain retries the batch and `status` says main is
    unreachable, with main's words; neither takes it for a standby."""
    import dataclasses

    env["OBS_MAIN_DB_URL"] = starting_standby_url
    buf = TransactionBuffer(settings=settings)
    buffer_observations(buf, 1)
    buf.close()
    retried = []

    def stop_at_the_first_retry(error: str, backoff: float) -> None:
        retried.append(error)
        raise KeyboardInterrupt

    drain = Drain(dataclasses.replace(settings, main_db_url=starting_standby_url), DrainConfig())
    try:
        with pytest.raises(KeyboardInterrupt):
            drain.run(until_empty=True, on_transient=stop_at_the_first_retry)
    finally:
        drain.close()
    assert retried and "FATAL:  the database system is starting up" in retried[0], retried
    report = json.loads(cli("status", "--json", env=env).stdout)
    assert [p.split(": ", 1)[0] for p in report["problems"]] == ["main unreachable (OBS_MAIN_DB_URL)"], report
    assert "the database system is starting up" in report["problems"][0], report


def test_db_init_on_a_standby_is_the_drains_one_line(env, standby_as_main):
    """`db init` against a hot standby said "cannot execute ALTER TABLE in a read-only
    transaction" (which server, and what to do?); against one with hot_standby off "main
    unreachable (...): is OBS_MAIN_DB_URL right and the stack up". It is the drain's line, exit 1;
    a standby takes no write."""
    assert one_line_error(cli("db", "init", "--demo-data", env=env)) == f"obs-pipeline: error: {standby_as_main}"


SPOOLED = {"id": "tx-1", "tx": "{}", "created": [], "overlays": []}


def spooled_by_a_script(directory, site: str):
    """The spool file of `site` in `directory`, holding one line as a script spools it."""
    path = directory / f"{site}.jsonl"
    path.write_text(json.dumps(SPOOLED) + "\n")
    return path


@pytest.mark.parametrize("command", [["status"], ["failed", "list"], ["spool", "push"]])
def test_a_redis_that_does_not_answer_is_one_line_naming_redis(command, tmp_path):
    """A Redis that accepts connections but never answers (hung, swapping, SIGSTOPped) made every
    command say only "Timeout reading from socket": not which server, nor what to check; `status`
    dropped the count of what waits in this host's spool, which it gives for a Redis that is down."""
    from obs_pipeline_tests.test_reliability import silent_redis

    spooled_by_a_script(tmp_path, "observatory")
    with silent_redis() as (url, _):
        line = one_line_error(cli(*command, env={"OBS_REDIS_URL": url, "OBS_SPOOL_DIR": str(tmp_path)}))
    assert line.startswith("obs-pipeline: error: Redis did not answer in time (Timeout"), line
    assert "OBS_REDIS_URL" in line, line
    if command != ["failed", "list"]:
        assert "1 transaction(s)" in line and str(tmp_path) in line, line


@pytest.mark.usefixtures("clean_db")  # obs units for simulate
@pytest.mark.parametrize("command", [["status"], ["failed", "list"], ["drain", "--once"], ["simulate", "--count", "1"]])
def test_a_redis_database_the_server_has_not_is_one_line_naming_obs_redis_url(env, redis_client, tmp_path, command):
    """`/16` on a Redis of the default `databases 16` reads like any URL, and Redis refuses it
    at each connect: every command said only redis-py's "DB index is out of range", naming
    neither the setting nor what to give instead. Nothing is spooled either: not an outage."""
    databases = int(redis_client.config_get("databases")["databases"])
    env["OBS_REDIS_URL"] = f"{env['OBS_REDIS_URL'].rpartition('/')[0]}/{databases}"
    env["OBS_SPOOL_DIR"] = str(tmp_path / "spool")
    line = one_line_error(cli(*command, env=env))
    assert line == ("obs-pipeline: error: Redis has no database of the number OBS_REDIS_URL ends with (DB index is out "
                    "of range): give one below its `databases` setting (16 unless its redis.conf says otherwise)"), line
    assert not any((tmp_path / "spool").glob("*.jsonl"))


@pytest.mark.usefixtures("clean_db")  # the replica has the schema
@pytest.mark.parametrize("command", [["failed", "list"], ["drain", "--once"], ["db", "init"]])
@pytest.mark.parametrize("models, message", [
    ("os:path", "OBS_MODELS='os:path' is not a SQLAlchemy declarative base: give the class your models derive "
                "from, as module:Base (e.g. obs_pipeline.models:Base)"),
    ("site_models_raising:Base", "OBS_MODELS='site_models_raising:Base' cannot be loaded: needs SITE_CONFIG set"),
    ("site_models_bad_syntax:Base", "OBS_MODELS='site_models_bad_syntax:Base' cannot be loaded: invalid syntax"),
])
def test_a_wrong_obs_models_is_one_line_naming_it_and_changes_nothing(env, settings, redis_client, tmp_path,
                                                                     command, models, message):
    """OBS_MODELS naming something that is not a declarative base said "module 'posixpath' has no
    attribute 'registry'"; a models module failing at its import said only its own error ("needs
    SITE_CONFIG set", "invalid syntax (...)"), neither naming the variable to fix."""
    (tmp_path / "site_models_raising.py").write_text('raise RuntimeError("needs SITE_CONFIG set")\n')
    (tmp_path / "site_models_bad_syntax.py").write_text("def broken(:\n")
    keys, queued = buffer_one_and_see_the_queue(settings, redis_client, 952)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    line = one_line_error(cli(*command, env={**env, "OBS_MODELS": models, "PYTHONPATH": path}))
    assert line.startswith(f"obs-pipeline: error: {message}"), line
    assert redis_client.lrange(keys.buffer, 0, -1) == queued and not redis_client.exists(keys.processing, keys.lease)


@pytest.mark.usefixtures("clean_db")
def test_database_urls_without_a_driver_work(env, settings, redis_client, main_engine):
    """`postgresql://user@host/db`, the plain form, means psycopg 3 to SQLAlchemy 2.1, which is not
    installed: `status`, `db init` and `drain` stopped with "No module named 'psycopg'", naming
    neither the variable nor the fix. It means psycopg2, the driver obs-pipeline installs."""
    import sqlalchemy as sa

    for name in ("OBS_MAIN_DB_URL", "OBS_REPLICA_DB_URL"):
        env[name] = sa.engine.make_url(env[name]).set(drivername="postgresql").render_as_string(hide_password=False)
        assert env[name].startswith("postgresql://")
    keys, _ = buffer_one_and_see_the_queue(settings, redis_client, 953)
    for command in (["db", "init"], ["drain", "--once"], ["status", "--json"]):
        result = cli(*command, env=env)
        assert result.returncode == 0, (command, result.stderr)
    assert json.loads(result.stdout)["replication_lag"]["replica_lsn"]
    assert redis_client.llen(keys.buffer) == 0
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT name FROM obs_unit WHERE id = 953")).scalar_one() == "stays buffered"
    buf = TransactionBuffer(redis_url=env["OBS_REDIS_URL"], site=settings.site, replica_url=env["OBS_REPLICA_DB_URL"])
    try:  # a script's smart queries read the replica by the same URL
        assert buf.get("ObsUnit", 1) == {"id": 1, "name": "unit 1"}
    finally:
        buf.close()


# Options of an OBS_REDIS_URL that redis-py reads but that fail as each connection opens: they said
# "Timeout value out of range", "AbstractConnection.__init__() got an unexpected keyword argument
# 'ssl_cert_reqs'", "Invalid SSL Certificate Requirements Flag: bogus" and Redis's "Client names
# cannot contain spaces, newlines or special characters.", naming no setting
REDIS_OPTIONS_REFUSED = [
    ("redis://{host}/0?socket_timeout=-1", "OBS_REDIS_URL='redis://{host}/0?socket_timeout=-1' gives socket_timeout "
                                           "'-1': give a number of seconds above 0, or leave it out"),
    ("redis://{host}/0?socket_connect_timeout=0", "OBS_REDIS_URL='redis://{host}/0?socket_connect_timeout=0' gives "
                                                  "socket_connect_timeout '0': give a number of seconds above 0"),
    ("redis://{host}/0?ssl_cert_reqs=bogus", "OBS_REDIS_URL='redis://{host}/0?ssl_cert_reqs=bogus' gives ssl_cert_reqs, "
                                             "an option of TLS: give rediss:// for a Redis that serves TLS, or leave "
                                             "it out"),
    ("rediss://{host}/0?ssl_cert_reqs=bogus", "OBS_REDIS_URL='rediss://{host}/0?ssl_cert_reqs=bogus' gives an option "
                                              "redis-py refuses (Invalid SSL Certificate Requirements Flag: bogus): "
                                              "correct or remove it"),
    ("redis://{host}/0?client_name=has%20spaces", "OBS_REDIS_URL='redis://{host}/0?client_name=has%20spaces' gives "
                                                  "client_name 'has spaces', which Redis refuses: a client name is "
                                                  "printable ASCII without spaces"),
    ("redis://{host}/0?sokcet_timeout=5", "OBS_REDIS_URL='redis://{host}/0?sokcet_timeout=5' gives an option "
                                          "redis-py does not know ('sokcet_timeout'): correct or remove it"),
    # (said "Unknown subcommand or wrong number of arguments for 'MAINT_NOTIFICATIONS'", and "Redis unreachable
    # (Error 2 ... No such file or directory.)": taken for an outage, a script spooled for good)
    ("redis://{host}/0?health_check_interval=-1", "OBS_REDIS_URL='redis://{host}/0?health_check_interval=-1' gives "
                                                  "health_check_interval '-1': give a number of seconds, 0 or more, "
                                                  "or leave it out"),
    ("rediss://{host}/0?ssl_certfile=/nonexistent/client.crt", "OBS_REDIS_URL='rediss://{host}/0?ssl_certfile="
                                                               "/nonexistent/client.crt' gives ssl_certfile "
                                                               "'/nonexistent/client.crt', which is no file on this "
                                                               "machine: give the path of one this user can read"),
]


@pytest.mark.usefixtures("clean_db")  # the replica has the schema
@pytest.mark.parametrize("command", [["status"], ["failed", "list"], ["drain", "--once"], ["spool", "push"]])
@pytest.mark.parametrize("url, message", [
    ("localhost:6379", "OBS_REDIS_URL='localhost:6379' is not a Redis URL (Redis URL must specify one of the "
                       "following schemes"),
    ("redis://u:secret@127.0.0.1:notaport/0", "OBS_REDIS_URL='redis://***@127.0.0.1:notaport/0' is not a Redis URL "
                                              "(Port could not be cast to integer"),
    ("redis://{host}/obs", "OBS_REDIS_URL='redis://{host}/obs' names the database 'obs': Redis databases are numbers"),
] + REDIS_OPTIONS_REFUSED)
def test_a_malformed_redis_url_is_one_line_naming_it_and_changes_nothing(env, settings, redis_client, tmp_path,
                                                                         command, url, message):
    """A malformed OBS_REDIS_URL said redis-py's "Port could not be cast to integer value as ..."
    (which setting?), and a database that is not a number was quietly database 0, so `status`
    reported, and `drain` drained, whatever site keys database 0 holds."""
    spool = spooled_by_a_script(tmp_path, settings.site)
    keys, queued = buffer_one_and_see_the_queue(settings, redis_client, 954)
    host = env["OBS_REDIS_URL"].removeprefix("redis://").split("/")[0]
    redis_url, message = url.format(host=host), message.format(host=host)
    line = one_line_error(cli(*command, env={**env, "OBS_REDIS_URL": redis_url, "OBS_SPOOL_DIR": str(tmp_path)}))
    assert line.startswith(f"obs-pipeline: error: {message}") and "secret" not in line, line
    assert redis_client.lrange(keys.buffer, 0, -1) == queued and not redis_client.exists(keys.processing, keys.lease)
    assert spool.read_text() == json.dumps(SPOOLED) + "\n"


@pytest.mark.usefixtures("clean_db")  # the replica has the schema
@pytest.mark.parametrize("command", [["status"], ["drain", "--once"]])
def test_a_rediss_url_of_a_redis_without_tls_is_one_line_naming_the_variable(env, settings, redis_client, tmp_path,
                                                                             command):
    """rediss:// given for a Redis that serves no TLS: Redis takes TLS's hello for a command
    line never ended and answers nothing, and every command said "Redis did not answer in time
    (Timeout connecting to server); is it hung or overloaded?", which sent the operator to the
    server rather than to the URL's scheme."""
    keys, queued = buffer_one_and_see_the_queue(settings, redis_client, 955)
    url = "rediss://" + env["OBS_REDIS_URL"].removeprefix("redis://")
    line = one_line_error(cli(*command, env={**env, "OBS_REDIS_URL": url, "OBS_SPOOL_DIR": str(tmp_path)}))
    assert line.startswith("obs-pipeline: error: Redis did not complete TLS's handshake (OBS_REDIS_URL is rediss://: "
                           "TLS): "), line
    assert "a Redis without TLS answers none: give redis:// for it" in line, line
    assert redis_client.lrange(keys.buffer, 0, -1) == queued and not redis_client.exists(keys.processing, keys.lease)


@pytest.mark.parametrize("command", [["status"], ["failed", "list"], ["spool"]])
def test_an_installation_whose_redis_client_does_not_load_is_one_line_saying_to_reinstall(tmp_path, command):
    """A compiled dependency that no longer loads (hiredis after the venv's Python was upgraded,
    a package half-installed) made every command print two tracebacks: the error-line code
    imported the same module to word the error, and failed again. One line, what to do."""
    broken = tmp_path / "hiredis"
    broken.mkdir()
    (broken / "__init__.py").write_text('raise ImportError("hiredis was built for another Python")\n')
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    line = one_line_error(cli(*command, env={"PYTHONPATH": path}))
    assert line == ("obs-pipeline: error: hiredis was built for another Python: a package obs-pipeline needs is missing "
                    f"or does not load in this Python ({sys.executable}): reinstall obs-pipeline and its dependencies "
                    "there"), line


def test_failed_list_into_head_stops_quietly(env, settings, redis_client):
    """`obs-pipeline failed list | head` on a long list (what an operator types when thousands are
    dead-lettered) printed "obs-pipeline: error: [Errno 32] Broken pipe" and Python's "Exception
    ignored ... BrokenPipeError" lines once head had its lines."""
    keys = SiteKeys(settings.site)
    letter = {"transaction_id": None, "endpoint": "flood", "steps": [],
              "failure": {"reason": "x" * 200, "kind": "invalid"}}
    redis_client.lpush(keys.failed, *[json.dumps({**letter, "transaction_id": f"tx-{i:05d}"}) for i in range(3000)])
    base = {k: v for k, v in os.environ.items() if not k.startswith("OBS_")}
    done = subprocess.run(f"{sys.executable} -m obs_pipeline.cli failed list | head -2; exit ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", env={**base, **env}, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.splitlines() == [f"tx-{i:05d}\tflood\tinvalid\t{'x' * 200}" for i in range(2)], done.stdout
    assert done.stderr == "" and done.returncode == 141, done.stderr


@pytest.mark.usefixtures("clean_db")
def test_a_cli_drain_counts_what_it_found_applied_already(env, redis_client, settings, main_engine):
    """A transaction pushed again once applied (a producer's LPUSH retried after a timeout), or a
    batch whose acknowledgement a killed drain lost, is found applied by the next drain, which
    applies nothing twice. Its line said "drained 0 transactions in 1 batches" and no more, as
    if the batch it had taken held nothing (the Dagster run's line says it since 5c3b583)."""
    import sqlalchemy as sa

    keys = SiteKeys(settings.site)
    doc, ids = seed_example(settings.site)
    for expected in ("drained 1 transactions in 1 batches, 0 dead-lettered",
                     "drained 0 transactions in 1 batches, and found 1 applied already (committed before their "
                     "acknowledgement was lost, or pushed twice), 0 dead-lettered"):
        redis_client.lpush(keys.buffer, json.dumps(doc))  # the second time: pushed again, applied already
        drained = cli("drain", "--once", env=env)
        assert drained.returncode == 0 and expected in drained.stderr, drained.stderr
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit WHERE id = :i"),
                            {"i": ids["uuid-1"]}).scalar_one() == 1


@pytest.mark.usefixtures("clean_db")
def test_discard_of_a_transaction_dead_lettered_twice_drops_both_letters(env, redis_client, settings, main_engine):
    """A producer that pushes a transaction again (its LPUSH retried after a timeout) can have it
    dead-lettered twice. `failed discard ID` removed one letter: the id stayed listed, and a later
    `failed retry --all`, once the cause was fixed, had main apply the transaction the operator
    had discarded."""
    import sqlalchemy as sa

    from obs_pipeline_tests.workload import drain_until_settled

    keys = SiteKeys(settings.site)
    doc, ids = seed_example(settings.site, obs_unit_id=31337)  # no such obs unit: fails on main
    for _ in range(2):  # pushed again later, by a producer that does not know it was taken
        redis_client.lpush(keys.buffer, json.dumps(doc))
        drain_until_settled(settings, retry_base_s=0.05)
    assert [place_or_id(line) for line in cli("failed", "list", env=env).stdout.splitlines()] == \
        [doc["transaction_id"]] * 2
    discarded = cli("failed", "discard", doc["transaction_id"], env=env)
    assert discarded.returncode == 0, discarded.stderr
    assert discarded.stderr == f"discarded {doc['transaction_id']} (2 letters: copies of one push)\n", discarded.stderr
    assert cli("failed", "list", env=env).stdout == ""
    with main_engine.begin() as conn:  # the cause is fixed; the operator retries what is left
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
    assert cli("failed", "retry", "--all", env=env).returncode == 0
    drain_until_settled(settings, retry_base_s=0.05)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit WHERE id = :i"),
                            {"i": ids["uuid-1"]}).scalar_one() == 0
    assert redis_client.hlen(keys.held_ids) == 0 and redis_client.llen(keys.failed) == 0



@pytest.mark.usefixtures("clean_db")
def test_retry_of_a_transaction_dead_lettered_twice_requeues_it_once_and_lists_neither(
        env, redis_client, settings, main_engine):
    """`failed retry ID` of a transaction dead-lettered twice (a producer pushed it again)
    requeued one letter and left the other listed: "retry" said done while `failed list` still
    showed it, and a later `retry --all` requeued it again."""
    import sqlalchemy as sa

    from obs_pipeline_tests.workload import drain_until_settled

    keys = SiteKeys(settings.site)
    doc, ids = seed_example(settings.site, obs_unit_id=31338)  # no such obs unit: fails on main
    for _ in range(2):
        redis_client.lpush(keys.buffer, json.dumps(doc))
        drain_until_settled(settings, retry_base_s=0.05)
    assert redis_client.llen(keys.failed) == 2
    with main_engine.begin() as conn:  # the cause is fixed
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31338, 'late unit')"))
    retried = cli("failed", "retry", doc["transaction_id"], env=env)
    assert retried.returncode == 0 and retried.stderr == "requeued 1 transaction(s)\n", retried.stderr
    assert cli("failed", "list", env=env).stdout == ""
    assert redis_client.llen(keys.buffer) == 1
    drain_until_settled(settings, retry_base_s=0.05)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit WHERE id = :i"),
                            {"i": ids["uuid-1"]}).scalar_one() == 1
    assert redis_client.hlen(keys.held_ids) == 0 and redis_client.llen(keys.failed) == 0

def test_simulate_without_a_replica_url_says_so(env, settings, redis_client):
    """It said "no ObsUnit rows on the replica: run `obs-pipeline db init --demo-data` first", which
    does not help: the replica was not named at all."""
    del env["OBS_REPLICA_DB_URL"]
    line = one_line_error(cli("simulate", "--count", "1", env=env))
    assert line.startswith("obs-pipeline: error: OBS_REPLICA_DB_URL is not set"), line
    assert redis_client.llen(SiteKeys(settings.site).buffer) == 0


@pytest.mark.parametrize("database, message", [
    ("unreachable", "replica unreachable (OBS_REPLICA_DB_URL): connection to server at \"127.0.0.1\", port 1 failed: "
                    "Connection refused"),
    ("postgres", "no obs_unit table on the replica (OBS_REPLICA_DB_URL): run `obs-pipeline db init --demo-data` first"),
])
def test_simulate_with_a_replica_it_cannot_read_names_it_and_buffers_nothing(env, settings, redis_client, database,
                                                                            message):
    """With the replica down it said only 'connection to server at "127.0.0.1", port ... failed:
    Connection refused' (which server? main is on loopback too), and on a database without the
    schema `relation "obs_unit" does not exist`: neither said what to do."""
    import sqlalchemy as sa

    url = sa.engine.make_url(env["OBS_REPLICA_DB_URL"])
    url = url.set(port=1) if database == "unreachable" else url.set(database=database)
    env["OBS_REPLICA_DB_URL"] = url.render_as_string(hide_password=False)
    line = one_line_error(cli("simulate", "--count", "1", env=env))
    assert line.startswith(f"obs-pipeline: error: {message}"), line
    if database == "unreachable":
        assert line.endswith("is OBS_REPLICA_DB_URL right and the stack up (`obs-pipeline stack status`)?"), line
    assert redis_client.llen(SiteKeys(settings.site).buffer) == 0


@pytest.mark.usefixtures("clean_db")
def test_retry_all_of_thousands_of_dead_letters_keeps_redis_answering(env, settings, redis_client, main_engine):
    """`failed retry --all` removed each letter with an LREM, each a scan of the list, all in one
    MULTI: 4,500 letters held Redis for 0.6-3.3 s, and every observing script's ingest waited
    (past its 5 s timeout it spools). Redis's latency monitor must see no command that long; every
    transaction is then applied once."""
    from obs_pipeline_tests.workload import assert_applied_exactly_once, buffer_observations, drain_until_settled

    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 3000)  # 4,500 transactions, then dead-lettered as the drain does
    buf.close()
    queued = list(reversed(redis_client.lrange(keys.buffer, 0, -1)))  # oldest first
    failure = {"reason": "a cause since fixed", "kind": "permanent", "attempts": 4, "failed_at": 0}
    redis_client.lpush(keys.failed, *[json.dumps({**json.loads(raw), "status": "failed", "failure": failure})
                                      for raw in queued])
    redis_client.delete(keys.buffer)
    threshold = redis_client.config_get("latency-monitor-threshold")["latency-monitor-threshold"]
    redis_client.config_set("latency-monitor-threshold", 100)  # ms: what took longer is recorded
    redis_client.execute_command("LATENCY", "RESET")
    try:
        result = cli("failed", "retry", "--all", env=env)
        events = redis_client.execute_command("LATENCY", "LATEST")
    finally:
        redis_client.config_set("latency-monitor-threshold", threshold)
    assert result.returncode == 0 and result.stderr == "requeued 4500 transaction(s)\n", result.stderr
    worst = {event[0].decode(): event[3] for event in events}  # name, when, latest, all-time max (ms)
    # (the one MULTI took 600 ms and more; now none reaches the monitor's 100 ms alone, but a 2-core host
    # busy with other work stretched one to 220)
    assert worst.get("command", 0) < 400, worst
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, observations)
    assert redis_client.llen(keys.failed) == 0 and redis_client.hlen(keys.held_ids) == 0


def test_every_failed_command_reads_a_long_list_a_page_at_a_time(env, settings, redis_client):
    """`failed list`, `show`, `discard` and `retry` each read the whole list in one LRANGE, and
    Redis, with every script's ingest, waits while it builds that reply: 300,000 letters (190 MB)
    held it 977 ms at each command (measured here; a backlog dead-lettered whole is a million).
    Every read is now LRANGEs of dead_letters.LIST_PAGE letters from the oldest end, and each
    command still sees the whole list, in order."""
    from obs_pipeline.dead_letters import LIST_PAGE

    keys = SiteKeys(settings.site)
    ids = [f"tx-{n:05d}" for n in range(2 * LIST_PAGE + 7)]  # oldest first
    letter = {"endpoint": "flood", "steps": [], "status": "failed",
              "failure": {"reason": "a cause since fixed", "kind": "permanent"}}
    for part in range(0, len(ids), 10_000):  # the drain pushes the newest at the head
        redis_client.lpush(keys.failed, *[json.dumps({**letter, "transaction_id": tx_id})
                                          for tx_id in ids[part:part + 10_000]])
    logged = {key: redis_client.config_get(key)[key] for key in ("slowlog-log-slower-than", "slowlog-max-len")}
    redis_client.config_set("slowlog-max-len", 100_000)
    redis_client.config_set("slowlog-log-slower-than", 0)  # every command, with its arguments
    redis_client.slowlog_reset()
    try:
        listed = cli("failed", "list", env=env)
        shown = cli("failed", "show", ids[0], env=env)
        discarded = cli("failed", "discard", ids[-1], env=env)
        retried = cli("failed", "retry", ids[LIST_PAGE], env=env)
        log = redis_client.slowlog_get(100_000)
    finally:
        for key, value in logged.items():
            redis_client.config_set(key, value)
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ids, listed.stderr
    assert json.loads(shown.stdout)["transaction_id"] == ids[0], shown.stderr
    assert discarded.stderr == f"discarded {ids[-1]}\n" and retried.stderr == "requeued 1 transaction(s)\n", \
        (discarded.stderr, retried.stderr)
    assert [json.loads(raw)["transaction_id"] for raw in redis_client.lrange(keys.buffer, 0, -1)] == [ids[LIST_PAGE]]
    assert [json.loads(raw)["transaction_id"] for raw in redis_client.lrange(keys.failed, 0, -1)][::-1] == [
        tx_id for tx_id in ids[:-1] if tx_id != ids[LIST_PAGE]]
    reads = [entry["command"].decode().split(" ") for entry in log
             if entry["command"].startswith(b"LRANGE " + keys.failed.encode() + b" ")]
    assert len(reads) >= 4 * 3, reads  # each command read every page
    for _, _, start, stop in reads:
        assert int(start) < 0 and int(stop) < 0 and int(stop) - int(start) < LIST_PAGE, reads


def test_failed_list_and_show_for_a_redis_user_allowed_only_reads(env, redis_client, settings):
    """A monitor's Redis user may be allowed reads only (see status, above): `failed list` and
    `show` read the list in pages under a WATCH, which such a user may not send; they read it
    without one, from its oldest end (letters the drain pushes at the head move no page)."""
    keys = SiteKeys(settings.site)
    ids = [f"tx-{n}" for n in range(5)]
    redis_client.lpush(keys.failed, *[json.dumps({"transaction_id": tx_id, "steps": []}) for tx_id in ids])
    user, password = f"monitor-{settings.site}", "secret-of-the-monitor"
    redis_client.execute_command("ACL", "SETUSER", user, "on", f">{password}", f"~site:{settings.site}:*",
                                 "+@read", "+info", "+ping", "+hello", "+client")
    try:
        monitor = {**env, "OBS_REDIS_URL": settings.redis_url.replace("redis://", f"redis://{user}:{password}@", 1)}
        listed = cli("failed", "list", env=monitor)
        shown = cli("failed", "show", ids[-1], env=monitor)
    finally:
        redis_client.execute_command("ACL", "DELUSER", user)
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ids, listed.stderr
    assert json.loads(shown.stdout)["transaction_id"] == ids[-1], shown.stderr


def test_failed_list_prints_each_page_as_it_reads_it(env, redis_client, settings):
    """`failed list` held every letter, parsed, before it printed the first: 200,000 letters of 900
    bytes took 1.27 GB and 7.7 s even for `failed list | head -1` (measured here; a million, about
    6 GB). It prints each page as it reads it, keeping only the ids it has seen, so `| head` stops
    after a page. A letter blocked by one not among those before it (a newer letter, not yet read)
    is told from one no longer listed by that one's status: `failed` while it is listed."""
    from obs_pipeline.dead_letters import LIST_PAGE

    keys = SiteKeys(settings.site)
    ids = [f"tx-{n:05d}" for n in range(5 * LIST_PAGE)]
    letter = {"endpoint": "flood", "steps": [], "failure": {"reason": "a cause", "kind": "permanent"}}
    # oldest first: a letter blocked by a newer one, still listed, and one blocked by a discarded one
    docs = [{**letter, "transaction_id": "blocked-by-newer", "failure": {"reason": "blocked by newer"}},
            {**letter, "transaction_id": "blocked-by-gone", "failure": {"reason": "blocked by gone"}},
            *[{**letter, "transaction_id": tx_id} for tx_id in ids], {**letter, "transaction_id": "newer"}]
    for part in range(0, len(docs), 10_000):
        redis_client.lpush(keys.failed, *[json.dumps(doc) for doc in docs[part:part + 10_000]])
    redis_client.set(keys.transaction("newer"), json.dumps({**docs[-1], "status": "failed"}))
    listed = cli("failed", "list", env=env)
    assert listed.stdout.splitlines()[:2] == [
        "blocked-by-newer\tflood\tNone\tblocked by newer",
        "blocked-by-gone\tflood\tNone\tblocked by gone (gone is no longer dead-lettered: retry or discard this one)"]
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()[2:]] == ids + ["newer"]
    logged = {key: redis_client.config_get(key)[key] for key in ("slowlog-log-slower-than", "slowlog-max-len")}
    redis_client.config_set("slowlog-max-len", 10_000)
    redis_client.config_set("slowlog-log-slower-than", 0)
    redis_client.slowlog_reset()
    try:
        base = {k: v for k, v in os.environ.items() if not k.startswith("OBS_")}
        done = subprocess.run(f"{sys.executable} -m obs_pipeline.cli failed list | head -1", shell=True,
                              executable="/bin/bash", env={**base, **env}, capture_output=True, text=True,
                              timeout=120)
        log = redis_client.slowlog_get(10_000)
    finally:
        for key, value in logged.items():
            redis_client.config_set(key, value)
    assert done.stdout.splitlines() == ["blocked-by-newer\tflood\tNone\tblocked by newer"], done.stdout
    reads = [entry for entry in log if entry["command"].startswith(b"LRANGE " + keys.failed.encode() + b" ")]
    assert len(reads) < 5, [entry["command"] for entry in reads]  # of 6 pages


def test_a_list_read_in_pages_while_a_retry_removes_letters_is_read_again(settings, redis_client, monkeypatch):
    """Read in pages, a list that a retry or discard shortens between two pages shifts the later
    ones, and a letter would be read twice and another missed (`failed show` of it saying it is
    not listed). The pages are read under a WATCH, and again if the list changed."""
    from obs_pipeline import dead_letters

    monkeypatch.setattr(dead_letters, "LIST_PAGE", 3)
    keys = SiteKeys(settings.site)
    ids = [f"tx-{n}" for n in range(8)]
    redis_client.lpush(keys.failed, *[json.dumps({"transaction_id": tx_id, "steps": []}) for tx_id in ids])
    read_pages = dead_letters._read_pages
    meanwhile = [lambda: redis_client.lrem(keys.failed, 1, json.dumps({"transaction_id": "tx-1", "steps": []})),
                 lambda: redis_client.lpush(keys.failed, json.dumps({"transaction_id": "newer", "steps": []}))]

    def pages_with_a_change_after_the_first(client, key):
        lrange = client.lrange
        calls = []

        def lrange_then_change(*args):
            page = lrange(*args)
            calls.append(args)
            if len(calls) == 1 and meanwhile:
                meanwhile.pop(0)()
            return page

        client.lrange = lrange_then_change
        try:
            return read_pages(client, key)
        finally:
            del client.lrange

    monkeypatch.setattr(dead_letters, "_read_pages", pages_with_a_change_after_the_first)
    listed = [letter.transaction_id for letter in dead_letters_of(settings, redis_client).list()]
    # read again after each change: the last read whole, in order
    assert listed == [tx_id for tx_id in ids if tx_id != "tx-1"] + ["newer"]
    assert meanwhile == []


@pytest.mark.usefixtures("clean_db")
def test_retry_all_while_a_drain_dead_letters_as_it_goes_ends(env, settings, redis_client, main_engine):
    """`failed retry --all` WATCHes the list and reads it again if it changed. Reading and preparing
    4,500 letters took over a second, and a drain dead-lettering a producer's garbage every batch
    changed the list before every read ended: the command never ended (it read again for minutes,
    at full CPU). It must end: having requeued every letter, or with one line saying why not,
    having changed nothing; then, the drain stopped, a retry requeues them and each applies once."""
    import signal
    import threading

    from obs_pipeline_tests.workload import assert_applied_exactly_once, buffer_observations, drain_until_settled

    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 3000)  # 4,500 transactions, then dead-lettered as the drain does
    buf.close()
    queued = list(reversed(redis_client.lrange(keys.buffer, 0, -1)))
    failure = {"reason": "a cause since fixed", "kind": "permanent", "attempts": 4, "failed_at": 0}
    redis_client.lpush(keys.failed, *[json.dumps({**json.loads(raw), "status": "failed", "failure": failure})
                                      for raw in queued])
    redis_client.delete(keys.buffer)
    base = {k: v for k, v in os.environ.items() if not k.startswith("OBS_")}
    drain = subprocess.Popen([sys.executable, "-m", "obs_pipeline.cli", "drain"], env={**base, **env},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stop = threading.Event()

    def garbage() -> None:  # a producer's bad entries, dead-lettered by the running drain every batch
        while not stop.wait(0.02):
            redis_client.lpush(keys.buffer, b"not json at all")

    flood = threading.Thread(target=garbage)
    flood.start()
    try:
        result = cli("failed", "retry", "--all", env=env)
    finally:
        stop.set()
        flood.join()
        drain.send_signal(signal.SIGTERM)
        drain.wait(60)
    if result.returncode != 0:  # it gave up: one line, and nothing changed
        assert one_line_error(result) == (
            f"obs-pipeline: error: the dead-letter list of site {settings.site} changed each of the 20 times this "
            "read it (a drain is dead-lettering as it goes); nothing was changed: stop the drain for a moment "
            "(the Dagster sensor, `obs-pipeline drain`), then run it again")
        assert not [e for e in redis_client.lrange(keys.buffer, 0, -1) if e != b"not json at all"]
        assert redis_client.llen(keys.failed) > 4500
        result = cli("failed", "retry", "--all", env=env)  # the drain stopped
    said = re.fullmatch(  # (the garbage stays listed, said: as many as the retry read then, the first 10 named)
        r"requeued 4500 transaction\(s\)(?:; ([0-9]+) dead letter\(s\) stay listed, as they cannot be retried: (.*))?\n",
        result.stderr)
    assert result.returncode == 0 and said, result.stderr
    if said[1]:
        left = int(said[1])
        assert len(re.findall(r"#[0-9]+@[0-9a-f]{8}: no usable transaction id", said[2])) == min(left, 10), said[2]
        assert said[2].endswith(f"; and {left - 10} more (`obs-pipeline failed list` shows them)") == (left > 10)
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, observations)
    letters = [json.loads(raw) for raw in redis_client.lrange(keys.failed, 0, -1)]
    assert letters and all(letter.get("raw") == "not json at all" for letter in letters)
    assert redis_client.hlen(keys.held_ids) == 0


@pytest.mark.parametrize("unset", [["OBS_MAIN_DB_URL"], ["OBS_REPLICA_DB_URL"], ["OBS_MAIN_DB_URL", "OBS_REPLICA_DB_URL"]])
def test_status_without_the_database_urls_does_not_say_healthy(env, unset):
    """Run without the site's database URLs (a monitor's cron job, a shell without `stack env`),
    `status` said "healthy" and exited 0 with main or the replica never asked: a site whose main
    was down looked fine."""
    for name in unset:
        del env[name]
    result = cli("status", "--check", env=env)
    assert result.returncode == 3, result.stderr
    assert "None" not in result.stdout, result.stdout  # (it printed "None bytes (main None, ...")
    problem = f"replication not checked: {' and '.join(unset)} not set"
    assert result.stdout.startswith(f"site {env['OBS_SITE']}: degraded ({problem}"), result.stdout
    assert one_line_error(result).startswith(f"obs-pipeline: site {env['OBS_SITE']} is degraded: {problem}")
