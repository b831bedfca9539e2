"""The local stack on real processes: PostgreSQL main + streaming replica + Redis + latency proxy.

The module imports the `stack` fixture itself, so it gets its own session stack even when
conftest.py provides one: its stop/down/latency tests never disturb other test modules.
Tests share that stack and put back whatever they stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis
import sqlalchemy as sa

from obs_pipeline.stack import LocalStack, StackError
from obs_pipeline.stack.osutil import pick_free_ports, pid_alive, port_is_free, read_pid
from obs_pipeline.stack.proxy_process import start_proxy, stop_proxy
from obs_pipeline_tests.stack_fixtures import live_processes, stack  # noqa: F401 - session fixture

WAIT = 30  # seconds for anything that polls


def run(url: str, sql: str, **params):
    """Execute one statement in its own autocommit connection; returns the first column of the first row."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            result = conn.execute(sa.text(sql), params)
            return result.scalar() if result.returns_rows else None
    finally:
        engine.dispose()


def eventually(predicate, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except Exception:  # noqa: BLE001 - e.g. table not replicated yet, server restarting
            pass
        time.sleep(0.05)
    return False


def redis_client(stack) -> redis.Redis:  # noqa: F811
    return redis.Redis.from_url(stack.env()["OBS_REDIS_URL"], socket_timeout=5)


@pytest.fixture(scope="module")
def probe(stack):  # noqa: F811
    """A table on main to write marker rows into; returns a function that inserts one and returns its key."""
    run(stack.main_direct_url, "CREATE TABLE IF NOT EXISTS stack_probe (k text PRIMARY KEY)")

    def insert(url: str | None = None) -> str:
        key = uuid.uuid4().hex
        run(url or stack.main_direct_url, "INSERT INTO stack_probe VALUES (:k)", k=key)
        return key

    return insert


def on_replica(stack, key: str) -> bool:  # noqa: F811
    url = stack.env()["OBS_REPLICA_DB_URL"]
    return eventually(lambda: run(url, "SELECT count(*) FROM stack_probe WHERE k = :k", k=key) == 1)


def test_never_set_up_dir(tmp_path):
    local = LocalStack(tmp_path / "nothing")
    with pytest.raises(StackError, match=r"no local stack in .*nothing: run `obs-pipeline stack up --dir .*nothing` first"):
        local.env()
    with pytest.raises(StackError):
        local.start_service("main")
    status = local.status()
    assert set(status) == {"main", "replica", "redis", "proxy"}
    assert not any(s["running"] for s in status.values())
    local.down()  # harmless
    assert not (tmp_path / "nothing").exists()


def test_services_accept_connections(stack):  # noqa: F811
    env = stack.env()
    assert set(env) == {"OBS_REDIS_URL", "OBS_MAIN_DB_URL", "OBS_REPLICA_DB_URL", "OBS_DAGSTER_PG_URL"}
    assert run(env["OBS_MAIN_DB_URL"], "SELECT 1") == 1
    assert run(stack.main_direct_url, "SELECT current_database()") == "obs"
    # dagster-postgres builds a SQLAlchemy engine from it: it must name the psycopg2 driver
    assert run(env["OBS_DAGSTER_PG_URL"], "SELECT current_database()") == "dagster"
    assert run(env["OBS_REPLICA_DB_URL"], "SELECT pg_is_in_recovery()") is True
    assert run(env["OBS_MAIN_DB_URL"], "SHOW fsync") == "on"
    assert redis_client(stack).ping()
    status = stack.status()
    assert all(status[name]["running"] for name in ("main", "replica", "redis"))
    assert not status["proxy"]["running"] and status["proxy"]["latency_ms"] == 0
    ports = [status[name]["port"] for name in status]
    assert len(set(ports)) == 4 and not {5432, 6379} & set(ports)
    assert redis_client(stack).config_get("appendonly")["appendonly"] == "yes"


def test_row_on_main_reaches_replica(stack, probe):  # noqa: F811
    key = probe()
    assert on_replica(stack, key)
    assert stack.status()["replica"]["replay_lsn"]


@pytest.mark.parametrize("spelled", ["through a symlink", "with .."])
def test_the_stack_s_folder_spelled_otherwise_finds_its_running_servers(stack, tmp_path, spelled):  # noqa: F811
    """`--dir ../.obs-stack` from a subfolder, or a path through a symlink ($PWD): PostgreSQL's
    servers were found by `-D <folder as typed>` in their command lines, so `status` showed main
    and the replica down, `down` left them running (and exited 0), and `up` or `dev` said their
    ports were taken by them. Each server's folder is compared as a folder now, however spelled."""
    if spelled == "through a symlink":
        other = tmp_path / "link"
        other.symlink_to(stack.directory)
    else:
        other = stack.directory / "logs" / ".."
    seen, spelled_so = stack.status(), LocalStack(other).status()
    assert {n: (seen[n]["running"], seen[n]["pid"]) for n in ("main", "replica")} == {
        n: (spelled_so[n]["running"], spelled_so[n]["pid"]) for n in ("main", "replica")}
    assert spelled_so["main"]["running"] and spelled_so["replica"]["running"], spelled_so


@pytest.mark.parametrize("service", ["redis", "main"])
def test_a_running_service_s_port_moved_in_stack_json_is_refused_by_up(stack, service):  # noqa: F811
    """stack.json edited while its services run: a new port for Redis, and `up` took the running
    Redis (found by its port) for stopped and started a second one on the same data folder and
    AOF, which `down` then stopped alone (the first kept running, its writes lost at the next
    rewrite); a new one for main, and `up` waited 60 s for main on it, then failed quoting main's
    log line 'ready to accept connections'. Refused now in one line, at once, nothing started."""
    config = json.loads(stack.config_path.read_text())
    old, new = config["ports"][service], pick_free_ports(1)[0]
    before = stack.status()[service]["pid"]
    moved = {**config, "ports": {**config["ports"], service: new}}
    stack.config_path.write_text(json.dumps(moved))
    try:
        started = time.monotonic()
        with pytest.raises(StackError) as refused:
            stack.up()
        took = time.monotonic() - started
        with pytest.raises(StackError) as refused_too:
            stack.start_service(service)  # (`stack start redis`)
    finally:
        stack.config_path.write_text(json.dumps(config))
    label = {"redis": "Redis", "main": "main PostgreSQL"}[service]
    assert str(refused.value) == (
        f"{label} of this stack runs on port {old} (pid {before}), and {stack.config_path} now gives {new}: put "
        f"{old} back in that file, stop the stack (obs-pipeline stack down --dir {stack.directory}), then move "
        "the port"), str(refused.value)
    assert str(refused_too.value) == str(refused.value)
    assert took < 30, took  # (it waited 60 s for main)
    assert port_is_free(new)
    assert stack.status()[service]["pid"] == before


def test_up_again_is_a_fast_noop(stack):  # noqa: F811
    pids = {name: s["pid"] for name, s in stack.status().items()}
    started = time.monotonic()
    stack.up()
    assert time.monotonic() - started < 10  # nothing restarted (a PostgreSQL start alone takes longer)
    assert {name: s["pid"] for name, s in stack.status().items()} == pids


def test_saved_port_taken_by_another_process(stack):  # noqa: F811
    port = stack.status()["redis"]["port"]
    stack.stop_service("redis")
    squatter = socket.socket()
    try:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen(1)
        with pytest.raises(StackError, match=f"port {port} saved for redis in .*stack.json is in use") as refused:
            stack.up()
        # who holds it, and what to do that keeps the data (it said: delete the stack's folder)
        assert f"in use by pid {os.getpid()} (" in str(refused.value), refused.value
        assert "delete" not in str(refused.value)
        assert f"give redis another free port in that file, then `obs-pipeline stack up --dir {stack.directory}`" \
            in str(refused.value)
    finally:
        squatter.close()
        stack.up()
    assert redis_client(stack).ping()


def test_stop_and_start_redis_and_replica(stack, probe):  # noqa: F811
    client = redis_client(stack)
    client.set("stack:survivor", "yes")
    stack.stop_service("redis")
    assert not stack.status()["redis"]["running"]
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(stack.env()["OBS_REDIS_URL"], socket_timeout=1, retry=None).ping()
    stack.start_service("redis")
    assert redis_client(stack).get("stack:survivor") == b"yes"

    stack.stop_service("replica")
    assert not stack.status()["replica"]["running"]
    key = probe()  # written while the replica is down: the slot keeps the WAL for it
    assert run(stack.main_direct_url, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'obs_replica'") == 1
    stack.start_service("replica")
    assert on_replica(stack, key)


@pytest.mark.parametrize("name, said", [
    ("replica", "`obs-pipeline stack up --dir .*` clones it afresh from main"),
    ("main", "put it back: `obs-pipeline stack up --dir .*` would make a new, empty main"),
])
def test_starting_a_service_whose_data_folder_is_gone_is_one_line_saying_so(stack, probe, name, said):  # noqa: F811
    """`stack start replica` with the replica's data folder gone said '[Errno 2] No such file or
    directory: .../postgresql.auto.conf' (a FileNotFoundError from the Python API); `stack start
    main` quoted the last line of main's log, 'database system is shut down', from its last stop."""
    datadir = stack.directory / "postgres" / name
    aside = datadir.with_name(name + ".aside")
    stack.stop_service(name)
    datadir.rename(aside)
    try:
        with pytest.raises(StackError, match=rf"^{name}'s data folder {datadir} is gone: {said}"):
            stack.start_service(name)
        assert not stack.status()[name]["running"]
    finally:
        aside.rename(datadir)
        stack.up()
    assert on_replica(stack, probe())


def test_a_redis_that_exits_as_it_starts_is_said_at_once(stack):  # noqa: F811
    """Redis that cannot read its AOF (damaged) exits as it starts: `up` polled PING for
    READY_TIMEOUT (60 s), then said 'redis not answering PING ... after 60s', as of a hung server."""
    client = redis_client(stack)
    client.set("stack:kept-through-a-damaged-aof", "yes")
    aof = stack.directory / "redis" / "appendonly.aof"
    stack.stop_service("redis")
    original = aof.read_bytes()
    try:
        aof.write_bytes(b"!not an AOF\r\n" + original)
        started = time.monotonic()
        with pytest.raises(StackError, match=r"^redis exited as it started on 127\.0\.0\.1:\d+: .*Bad file format "
                                             r"reading the append only file"):
            stack.up()
        assert time.monotonic() - started < 20
    finally:
        aof.write_bytes(original)
        stack.up()
    assert redis_client(stack).get("stack:kept-through-a-damaged-aof") == b"yes"


def test_redis_appendfsync_always_survives_kill(stack):  # noqa: F811
    LocalStack(stack.directory, redis_appendfsync="always").up()
    try:
        assert redis_client(stack).config_get("appendfsync")["appendfsync"] == "always"
        redis_client(stack).set("stack:fsynced", "1")
        stack.stop_service("redis", mode="kill")
        stack.start_service("redis")
        assert redis_client(stack).get("stack:fsynced") == b"1"
    finally:
        LocalStack(stack.directory, redis_appendfsync="everysec").up()
    assert redis_client(stack).config_get("appendfsync")["appendfsync"] == "everysec"


def test_redis_rewrites_its_aof_on_its_own_only_as_a_backstop(stack):  # noqa: F811
    from obs_pipeline.stack.redis_server import AOF_REWRITE
    client = redis_client(stack)
    assert client.config_get("auto-aof-rewrite-percentage")["auto-aof-rewrite-percentage"] == "1000"
    client.config_set("auto-aof-rewrite-percentage", 100)  # as a Redis with the defaults
    LocalStack(stack.directory).up()  # `up` on a running stack puts the settings back
    assert {name: client.config_get(name)[name] for name in AOF_REWRITE} == AOF_REWRITE


def test_redis_loading_a_large_aof_is_waited_for_not_reported_dead(tmp_path, monkeypatch):
    """A Redis restarted on a large AOF (a long outage's backlog) answers LOADING until it has
    read the file. `up` gave up after READY_TIMEOUT with 'redis not answering PING', and an `up`
    meanwhile failed on 'LOADING Redis is loading the dataset in memory'. (READY_TIMEOUT is made
    shorter than the load here, instead of an AOF of GBs.)"""
    import subprocess

    from obs_pipeline.stack import redis_server
    from obs_pipeline.stack.binaries import redis_server_path
    from obs_pipeline.stack.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis", pick_free_ports(1)[0], tmp_path / "redis.log")
    server.folder.mkdir()
    server.start()
    try:
        with server.client(timeout=60) as conn:
            conn.execute_command("DEBUG", "POPULATE", 1_000_000, "k", 100)
            conn.execute_command("BGREWRITEAOF")
            assert eventually(lambda: conn.info("persistence")["aof_rewrite_in_progress"] == 0, 120)
        server.stop()
        monkeypatch.setattr(redis_server, "READY_TIMEOUT", 0.2)
        server.start()
        with server.client() as conn:
            assert conn.dbsize() == 1_000_000
        server.stop("kill")
        assert eventually(lambda: port_is_free(server.port))
        # started by hand, as a first `up` would, then a second `up` while it loads
        subprocess.run([str(redis_server_path()), str(server.conf)], cwd=server.folder, check=True)
        assert eventually(lambda: server.pid is not None)
        # what a command says meanwhile: its line was "Redis unreachable (...); is ... the stack up?"
        from obs_pipeline.buffer_store import redis_trouble

        with server.client() as conn:
            with pytest.raises(redis.BusyLoadingError) as loading:
                conn.ping()
        assert redis_trouble(loading.value) == (
            "Redis is loading its data into memory (restarted; seconds per million keys) and answers nothing "
            "until it is done; wait, then run this again (`obs-pipeline stack status`)")
        server.start()
        with server.client() as conn:
            assert conn.dbsize() == 1_000_000
    finally:
        server.stop("kill")


def test_main_crash_and_restart(stack, probe):  # noqa: F811
    from obs_pipeline.apply import ReplicaDatabase

    before = probe()
    stack.stop_service("main", mode="immediate")
    assert not stack.status()["main"]["running"]
    stack.start_service("main")
    assert run(stack.main_direct_url, "SELECT count(*) FROM stack_probe WHERE k = :k", k=before) == 1
    assert on_replica(stack, probe())
    # A primary that crash-recovered answers pg_last_wal_replay_lsn() with the end of that
    # recovery: named as the replica by mistake, it must still read as no replica (None).
    engine = sa.create_engine(stack.main_direct_url)
    try:
        assert run(stack.main_direct_url, "SELECT pg_last_wal_replay_lsn() IS NOT NULL") is True
        assert ReplicaDatabase(engine).replay_lsn() is None
    finally:
        engine.dispose()


def test_up_after_kill_9_comes_back_though_a_stale_pid_names_another_live_process(stack, probe):  # noqa: F811
    """Every server SIGKILLed leaves its pidfile; after a reboot the pid in main's postmaster.pid
    may name another live process of the same user. PostgreSQL takes that for a server running
    on the folder and refused to start: `up` failed with 'HINT: Is another postmaster (PID N)
    running in data directory ...?' until one found and removed the file by hand."""
    import subprocess

    from obs_pipeline.stack.osutil import user_kwargs

    key = probe()
    assert on_replica(stack, key)
    redis_client(stack).set("stack:kept", "across-kill-9")
    redis_client(stack).execute_command("BGREWRITEAOF")  # on disk whatever the fsync timing
    assert eventually(lambda: redis_client(stack).info("persistence")["aof_rewrite_in_progress"] == 0)
    stand_in = subprocess.Popen(["sleep", "300"], **user_kwargs(stack._pg_user(create=False)))
    try:
        before = stack.status()
        for name in ("replica", "main", "redis"):
            os.kill(before[name]["pid"], 9)
        assert eventually(lambda: not any(pid_alive(before[n]["pid"]) for n in ("main", "replica", "redis")))
        lock = stack.directory / "postgres" / "main" / "postmaster.pid"
        lines = lock.read_text().splitlines(keepends=True)
        lock.write_text("".join([f"{stand_in.pid}\n", *lines[1:]]))  # the reused pid
        stack.up()
        assert_kept(stack, key, b"across-kill-9", probe)
        assert stand_in.poll() is None  # not touched
    finally:
        stand_in.kill()
        stand_in.wait()
        stack.up()


def test_a_replica_of_a_main_made_anew_is_one_line_and_kept(tmp_path):
    """With main's data folder deleted, `up` made a new main and started the old replica, which
    can never stream from it ('database system identifier differs'): it failed after 60 s with
    'replica not streaming ...: waiting for WAL to become available'. Now at once, saying what
    to do; the replica (the old main's last copy) is not touched. Redis is up all the same:
    scripts buffer into it alone (it was started last, and stayed down)."""
    import shutil

    local = LocalStack(tmp_path / "stack")
    local.up()
    local.down()
    replica_dir = local.directory / "postgres" / "replica"
    shutil.rmtree(local.directory / "postgres" / "main")
    try:
        with pytest.raises(StackError, match=r"^the replica in .* is a copy of another main .*: stop it "
                                             r"\(`obs-pipeline stack stop replica --dir .*`\), move .* away "
                                             r"\(it holds that main's data\), then `obs-pipeline stack up --dir "):
            local.up()
        assert (replica_dir / "PG_VERSION").is_file() and not local.status()["replica"]["running"]
        assert local.status()["redis"]["running"] and redis_client(local).ping()
        shutil.move(replica_dir, tmp_path / "old-replica")
        local.up()  # as the line says: a fresh clone
        assert run(local.env()["OBS_REPLICA_DB_URL"], "SELECT pg_is_in_recovery()") is True
    finally:
        local.down()


def test_down_stops_everything_and_up_keeps_data(stack, probe):  # noqa: F811
    key = probe()
    assert on_replica(stack, key)
    redis_client(stack).set("stack:kept", "across-down")
    before = stack.status()
    stack.down()
    after = stack.status()
    assert not any(s["running"] for s in after.values())
    for name in ("main", "replica", "redis"):
        assert not pid_alive(before[name]["pid"])
        assert port_is_free(before[name]["port"])
    stack.down()  # twice is harmless
    stack.up()
    assert_kept(stack, key, b"across-down", probe)


def assert_kept(stack, key: str, kept: bytes, probe) -> None:  # noqa: F811
    """After a restart: main and the replica still have the probe row, Redis its key, and
    replication works again."""
    for url in (stack.main_direct_url, stack.env()["OBS_REPLICA_DB_URL"]):
        assert run(url, "SELECT count(*) FROM stack_probe WHERE k = :k", k=key) == 1, url
    assert redis_client(stack).get("stack:kept") == kept
    assert on_replica(stack, probe())


def _best_round_trip(url: str) -> float:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            timings = []
            for _ in range(3):
                started = time.perf_counter()
                conn.execute(sa.text("SELECT 1")).scalar()
                timings.append(time.perf_counter() - started)
            return min(timings)
    finally:
        engine.dispose()


def test_latency_proxy_delays_main_and_carries_replication(stack, probe):  # noqa: F811
    main_port = stack.status()["main"]["port"]
    wal_sender_port = "SELECT sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming'"
    try:
        stack.up(main_latency_ms=100)
        env, status = stack.env(), stack.status()
        proxy = status["proxy"]
        assert proxy["running"] and proxy["latency_ms"] == 100
        assert f":{proxy['port']}/obs" in env["OBS_MAIN_DB_URL"]
        assert f":{main_port}/dagster" in env["OBS_DAGSTER_PG_URL"]  # dagster never goes through the proxy
        assert _best_round_trip(env["OBS_MAIN_DB_URL"]) >= 0.19
        assert _best_round_trip(stack.main_direct_url) < 0.1
        assert run(env["OBS_REPLICA_DB_URL"], wal_sender_port) == proxy["port"]
        assert on_replica(stack, probe(env["OBS_MAIN_DB_URL"]))
        stack.up()  # None keeps the saved latency and the running proxy
        assert stack.status()["proxy"]["pid"] == proxy["pid"]
    finally:
        stack.up(main_latency_ms=0)
    assert not stack.status()["proxy"]["running"]
    assert f":{main_port}/obs" in stack.env()["OBS_MAIN_DB_URL"]
    assert run(stack.env()["OBS_REPLICA_DB_URL"], wal_sender_port) == main_port
    assert on_replica(stack, probe())


@pytest.mark.parametrize("latency", [-5, 10**6, 99999999999, 2.5, "abc", float("nan")])
def test_a_main_latency_no_link_has_is_refused_before_anything_changes(stack, latency):  # noqa: F811
    """A huge latency was saved, the proxy started with it, and the replica (which streams
    through it) never connected: `up` failed after a minute with 'replica not streaming', and so
    did every later `up`, with Redis not started."""
    saved, pids = stack.config_path.read_text(), {name: s["pid"] for name, s in stack.status().items()}
    try:
        with pytest.raises(ValueError, match=r"^main latency must be a whole number of milliseconds from 0 to "
                                             r"5000 \(each way; 0 removes the proxy\), not "):
            stack.up(main_latency_ms=latency)
        assert stack.config_path.read_text() == saved
        assert {name: s["pid"] for name, s in stack.status().items()} == pids
    finally:
        if stack.config_path.read_text() != saved:
            stack.up(main_latency_ms=0)


def test_an_up_that_fails_keeps_the_settings_it_was_given_out_of_the_stack(stack):  # noqa: F811
    """`up --main-latency-ms 50` that fails (here main refuses to start) saved 50 all the same,
    before it started anything: the next plain `up` put the proxy between main and the replica
    and the drain's URL behind it, a latency the operator had asked for in a command that was
    refused. The settings are saved only by an `up` that succeeds."""
    saved = stack.config_path.read_text()
    auto_conf = stack.directory / "postgres" / "main" / "postgresql.auto.conf"
    original = auto_conf.read_text()
    stack.stop_service("main")
    try:
        auto_conf.write_text(original + "shared_buffers = 'plenty'\n")  # main cannot start
        with pytest.raises(StackError, match=r"^main PostgreSQL: start on .* failed"):
            LocalStack(stack.directory, redis_appendfsync="always").up(main_latency_ms=50)
        assert stack.config_path.read_text() == saved
        auto_conf.write_text(original)  # the cause fixed, a plain `up`
        stack.up()
        assert not stack.status()["proxy"]["running"]
        assert f":{stack.status()['main']['port']}/obs" in stack.env()["OBS_MAIN_DB_URL"]
        assert redis_client(stack).config_get("appendfsync")["appendfsync"] == "everysec"
    finally:
        auto_conf.write_text(original)
        if stack.config_path.read_text() != saved:
            LocalStack(stack.directory, redis_appendfsync="everysec").up(main_latency_ms=0)
        stack.up()


def test_a_main_that_cannot_start_is_said_with_the_reason_not_the_shutdown_line(stack):  # noqa: F811
    """PostgreSQL that fails as it starts (a library it cannot load here; a full disk during its
    recovery alike) logs the reason as FATAL, then 'database system is shut down': the line
    quoted that last one, which says nothing of why."""
    auto_conf = stack.directory / "postgres" / "main" / "postgresql.auto.conf"
    original = auto_conf.read_text()
    stack.stop_service("main")
    try:
        auto_conf.write_text(original + "shared_preload_libraries = 'no_such_lib'\n")
        with pytest.raises(StackError, match=r'^main PostgreSQL: start on .* failed \(exit 1\): .*FATAL: +could '
                                             r'not access file "no_such_lib"'):
            stack.up()
    finally:
        auto_conf.write_text(original)
        stack.up()


def test_a_pg_tool_that_removes_what_it_made_is_said_with_its_error(tmp_path):
    """initdb and pg_basebackup end a failure with 'removing data directory ...': the reason
    (a full disk, here) is the FATAL or error line before it."""
    from obs_pipeline.stack.errors import log_tail

    log = tmp_path / "pg_ctl.log"
    log.write_text("\n$ initdb -D main.partial\nrunning bootstrap script ... ok\n"
                   "performing post-bootstrap initialization ... 2026-12-05 14:49:04.906 UTC [11467] FATAL:  could "
                   'not write to file "base/4/1247": No space left on device\n'
                   "2026-12-05 14:49:04.906 UTC [11467] STATEMENT:  CREATE DATABASE template0\n\t\n"
                   "child process exited with exit code 1\n"
                   'initdb: removing data directory "main.partial"\n')
    assert "No space left on device" in log_tail(log)
    log.write_text("\n$ pg_basebackup -D replica.partial\n"
                   "pg_basebackup: error: could not write to file \"replica.partial/base/5/1259\": No space left "
                   "on device\npg_basebackup: removing contents of data directory \"replica.partial\"\n")
    assert log_tail(log).startswith("pg_basebackup: error: could not write")
    log.write_text("[7] LOG:  received fast shutdown request\n[9] FATAL:  terminating connection due to "
                   "administrator command\n[7] LOG:  database system is shut down\n")
    assert log_tail(log) == "[7] LOG:  database system is shut down"  # a stop asked for: no reason to give
    with open(log, "a") as fh:  # then a start that fails in its recovery
        fh.write("[20] LOG:  redo starts at 0/2000028\n[21] FATAL:  could not write to file \"pg_wal/xlogtemp.21\": "
                 "No space left on device\n[20] LOG:  shutting down due to startup process failure\n"
                 "[20] LOG:  database system is shut down\n")
    assert log_tail(log).startswith("[21] FATAL:  could not write to file")
    log.write_text("\n$ pg_ctl stop\npg_ctl: PID file does not exist\n")
    assert log_tail(log) == "pg_ctl: PID file does not exist"


def test_a_replica_that_pauses_its_replay_is_one_line_saying_what_to_raise(stack, probe):  # noqa: F811
    """main restarted with a max_connections above the replica's: the replica pauses its replay
    ('hot standby is not possible because of insufficient parameter settings') and waits for
    ever, and the drain's wait for the replica with it. `up` said 'local stack up'; a later
    `up` or `stack start main` waited 60 s for a stream the paused replica never restarts, and
    said 'replica not streaming'. Now the line names the setting, and what it says to do works."""
    replica_conf = stack.directory / "postgres" / "replica" / "postgresql.conf"
    original = replica_conf.read_text()
    run(stack.main_direct_url, "ALTER SYSTEM SET max_connections = 250")
    try:
        stack.stop_service("main")
        with pytest.raises(StackError, match=r"^replica PostgreSQL paused its replay at .*: max_connections = 200 is "
                                             r"a lower setting than on the primary server, where its value was 250"):
            stack.up()
        replica_conf.write_text(original + "max_connections = 250\n")  # as the line says
        stack.stop_service("replica")
        stack.start_service("replica")
        assert on_replica(stack, probe())
    finally:
        run(stack.main_direct_url, "ALTER SYSTEM RESET max_connections")
        stack.stop_service("main")
        stack.up()
        replica_conf.write_text(original)
        stack.stop_service("replica")
        stack.up()
    assert on_replica(stack, probe())


def test_a_log_whose_last_message_runs_over_several_lines_is_said_from_its_first(tmp_path):
    """libpq's messages run over several lines, the later ones indented: a replica that did not
    stream was said with 'no COPY in progress' or 'before or while processing the request.'."""
    from obs_pipeline.stack.errors import log_tail

    log = tmp_path / "replica.log"
    log.write_text("2026-12-05 14:55:01.908 UTC [12673] LOG:  waiting for WAL to become available at 0/3000560\n"
                   "2026-12-05 14:55:02.908 UTC [12682] FATAL:  could not receive data from WAL stream: server "
                   "closed the connection unexpectedly\n\t\tThis probably means the server terminated abnormally\n"
                   "\t\tbefore or while processing the request.\n\tno COPY in progress\n")
    assert log_tail(log).startswith("2026-12-05 14:55:02.908 UTC [12682] FATAL:  could not receive data from WAL "
                                    "stream: server closed the connection unexpectedly")


def test_a_main_port_moved_in_stack_json_is_followed_by_the_running_proxy(stack, probe):  # noqa: F811
    """main stopped, its port taken meanwhile, and moved in stack.json as the port-conflict line
    says: the latency proxy, still running, forwarded to the old port, so the replica streamed
    from nothing (`up` failed after 60 s), and the drain's URL reached whatever held that port."""
    saved = stack.config_path.read_text()
    try:
        stack.up(main_latency_ms=20)
        stack.stop_service("main")
        cfg = json.loads(stack.config_path.read_text())
        cfg["ports"]["main"] = pick_free_ports(1)[0]
        stack.config_path.write_text(json.dumps(cfg))
        stack.up()
        assert json.loads((stack.directory / "proxy.pid").read_text())["target"] == f"127.0.0.1:{cfg['ports']['main']}"
        key = probe(stack.env()["OBS_MAIN_DB_URL"])  # through the proxy, to main
        assert run(stack.main_direct_url, "SELECT count(*) FROM stack_probe WHERE k = :k", k=key) == 1
        assert on_replica(stack, key)
    finally:
        stack.stop_service("main")
        stack.config_path.write_text(saved)
        stack.up(main_latency_ms=0)


def _replica_upstream_port(stack) -> int:  # noqa: F811
    """The port the replica's primary_conninfo names (main's, or the latency proxy's)."""
    conf = (stack.directory / "postgres" / "replica" / "postgresql.auto.conf").read_text()
    [line] = [ln for ln in conf.splitlines() if ln.startswith("primary_conninfo")]
    return int(line.split("port=")[1].split()[0])


def test_a_replica_that_exits_as_it_starts_is_said_at_once(stack):  # noqa: F811
    """pg_ctl reports a standby that exits during startup as "server shut down because of
    recovery target settings" and exits 0: `up` then waited READY_TIMEOUT (60 s) for it to
    accept connections before it said why. Now the line comes as soon as the server is gone."""
    replica_conf = stack.directory / "postgres" / "replica" / "postgresql.auto.conf"
    stack.stop_service("replica")
    original = replica_conf.read_text()
    try:
        replica_conf.write_text(original + "shared_buffers = 'plenty'\n")  # it cannot start
        started = time.monotonic()
        with pytest.raises(StackError, match=r"^replica PostgreSQL exited as it started on "
                           r"127\.0\.0\.1:\d+: .*FATAL: .*contains errors"):
            stack.up()
        assert time.monotonic() - started < 20
    finally:
        replica_conf.write_text(original)
        stack.up()
    assert stack.status()["replica"]["running"]


@pytest.mark.parametrize("latency_before", [0, 100])
def test_an_up_that_fails_leaves_the_running_services_as_they_were(
        stack, latency_before):  # noqa: F811
    """`up --main-latency-ms 50 --redis-appendfsync always` that fails once the proxy has started
    (here the replica cannot start) wrote the settings back, but left the proxy running at 50
    (or restarted at 50 from 100), the replica's conninfo on it, and Redis's live appendfsync at
    always, until the next `up`. A failed `up` now sets back what it changed in running services."""
    replica_conf = stack.directory / "postgres" / "replica" / "postgresql.auto.conf"
    try:
        stack.up(main_latency_ms=latency_before)
        before = stack.status()
        saved, upstream = stack.config_path.read_text(), _replica_upstream_port(stack)
        stack.stop_service("replica")
        original = replica_conf.read_text()
        replica_conf.write_text(original + "shared_buffers = 'plenty'\n")  # it cannot start
        try:
            with pytest.raises(StackError, match=r"^replica PostgreSQL exited as it started"):
                LocalStack(stack.directory, redis_appendfsync="always").up(main_latency_ms=50)
            after = stack.status()
            assert stack.config_path.read_text() == saved
            assert redis_client(stack).config_get("appendfsync")["appendfsync"] == "everysec"
            assert _replica_upstream_port(stack) == upstream
            assert after["proxy"]["running"] == before["proxy"]["running"], after["proxy"]
            if latency_before:
                proxy = json.loads((stack.directory / "proxy.pid").read_text())
                assert proxy["delay_ms"] == latency_before, proxy
            for name in ("main", "redis"):
                assert after[name]["pid"] == before[name]["pid"], name
        finally:
            replica_conf.write_text(original)
        stack.up()
        streaming = "SELECT sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming'"
        assert run(stack.env()["OBS_REPLICA_DB_URL"], streaming) == upstream
    finally:
        LocalStack(stack.directory, redis_appendfsync="everysec").up(main_latency_ms=0)


@pytest.mark.parametrize("edit, said", [
    (lambda cfg: cfg["ports"].update(redis=str(cfg["ports"]["redis"])), "gives redis the port '"),
    (lambda cfg: cfg["ports"].update(redis=70000), "the port 70000, not a whole number from 1 to "),
    (lambda cfg: cfg["ports"].pop("proxy"), "gives proxy no port"),
    (lambda cfg: cfg["ports"].update(redis=cfg["ports"]["main"]), "gives redis main's port "),
    (lambda cfg: cfg.update(main_latency_ms=-5), "gives main_latency_ms -5, not a whole number "),
], ids=["text", "out of range", "missing", "main's", "latency"])
def test_a_stack_json_edited_wrong_is_one_line_saying_what_and_starts_nothing(tmp_path, edit, said):
    """A port taken by another program is to be changed in stack.json (the line says so). A port
    edited wrong said "'str' object cannot be interpreted as an integer", "bind(): port must be
    0-65535." or "'proxy'" (a KeyError), naming neither the file nor the service; and one given
    main's port started Redis on it, so main could not start, and that Redis, on a port no
    longer its own, was left running where `down` did not find it."""
    local = LocalStack(tmp_path / "stack")
    local.up()
    local.down()
    good = json.loads(local.config_path.read_text())
    cfg = json.loads(local.config_path.read_text())
    edit(cfg)
    local.config_path.write_text(json.dumps(cfg))
    try:
        for action in (local.up, local.env, local.down):
            with pytest.raises(StackError) as refused:
                action()
            line = str(refused.value)
            assert line.startswith(f"{local.config_path} ") and said in line, line
            assert "\n" not in line
            assert line.endswith(": fix it in that file"), line
        assert not any(s["running"] for s in local.status().values())
        assert all(port_is_free(port) for port in good["ports"].values())
    finally:
        local.config_path.write_text(json.dumps(good))
        local.down()
        stray = read_pid(local.directory / "redis" / "redis.pid")  # one that down no longer finds
        if pid_alive(stray, "127.0.0.1:"):
            os.kill(stray, 9)


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_proxy_pipelines_delay_without_capping_throughput(tmp_path):
    """40 chunks through a 100 ms proxy: ~0.2 s + send time, not 40 x 0.1 s of serial sleeps."""
    server, echo_port = _echo_server()
    listen_port = pick_free_ports(1)[0]
    pidfile = tmp_path / "proxy.pid"
    start_proxy(listen_port, echo_port, 100, pidfile, tmp_path / "proxy.log")
    payload = [bytes([i]) * 65536 for i in range(40)]
    received = bytearray()
    try:
        with socket.create_connection(("127.0.0.1", listen_port)) as client:
            client.settimeout(10)
            started = time.perf_counter()

            def send():
                for chunk in payload:
                    client.sendall(chunk)
                    time.sleep(0.005)

            sender = threading.Thread(target=send)
            sender.start()
            first = None
            while len(received) < 40 * 65536:
                received += client.recv(1 << 20)
                first = first or time.perf_counter() - started
            elapsed = time.perf_counter() - started
            sender.join()
    finally:
        stop_proxy(pidfile)
        server.close()
    assert bytes(received) == b"".join(payload)
    assert first >= 0.19  # delayed in both directions
    assert elapsed < 3.0  # pipelined: serial per-chunk sleeping would take >= 4 s
    assert not pidfile.exists()


def test_a_server_is_known_by_its_own_address_not_by_its_binarys_name(stack, tmp_path, monkeypatch):  # noqa: F811
    """OBS_REDIS_SERVER may name a build not called redis-server (valkey-server, say): `status`
    and `down` must still find it (they looked for "redis-server" in its command line, took it
    for stopped and left it running). And a stale pid file naming another stack's Redis is not
    this stack's Redis."""
    import os

    from obs_pipeline.stack.binaries import redis_server_path
    from obs_pipeline.stack.redis_server import RedisServer

    renamed = tmp_path / "kv-server"
    renamed.symlink_to(redis_server_path())
    monkeypatch.setenv("OBS_REDIS_SERVER", str(renamed))
    server = RedisServer(tmp_path / "redis", pick_free_ports(1)[0], tmp_path / "redis.log")
    server.folder.mkdir()
    server.start()
    pid = server.pid
    try:
        assert pid is not None and server.running
        server.stop()
        assert not pid_alive(pid) and not server.running
    finally:
        if pid_alive(pid):
            os.kill(pid, 9)
    other = stack.status()["redis"]["pid"]  # another Redis, alive, on another port
    server.pidfile.write_text(f"{other}\n")
    assert server.pid is None and not server.running


def test_a_stack_folder_pg_ctl_cannot_pass_on_is_refused_in_one_line(tmp_path):
    with pytest.raises(StackError, match=r"has \$ in its path") as info:
        LocalStack(tmp_path / "price$5").up()
    assert "\n" not in str(info.value) and not (tmp_path / "price$5").exists()


def test_a_first_up_cut_short_during_initdb_is_redone_by_the_next(tmp_path):
    """initdb writes PG_VERSION early: a first `up` killed meanwhile left a data directory that
    counted as initialized (and lacked the stack's settings). It is built aside and renamed
    whole now; what a cut-short run leaves aside is wiped by the next `up`."""
    stack = LocalStack(tmp_path / "stack")
    leftover = stack.directory / "postgres" / "main.partial"
    leftover.mkdir(parents=True)
    (leftover / "PG_VERSION").write_text("18\n")  # as far as that initdb got
    try:
        stack.up()
        assert run(stack.main_direct_url, "SHOW hot_standby_feedback") == "on"  # the stack's settings
        assert not leftover.exists()
    finally:
        stack.down()


def _cloning(folder) -> list[int]:
    """The pg_basebackup processes writing a replica into `folder`."""
    def clones(entry) -> bool:
        argv = (entry / "cmdline").read_bytes().split(b"\0")
        return argv[0].endswith(b"pg_basebackup") and any(str(folder).encode() in a for a in argv)
    return sorted(live_processes(clones))


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_an_up_stopped_by_a_signal_while_it_clones_the_replica_leaves_no_clone_running(tmp_path, sig):
    """`timeout` (SIGTERM to the command, not to its process group) or a closing terminal stopped a
    first `stack up` while pg_basebackup cloned the replica: Python died at once, the clone ran
    on, holding the replica's slot on main, and an `up` run again meanwhile failed (`replication
    slot "obs_replica" already exists`), having wiped the folder the clone was writing into. The
    clone is stopped with the command now, as by Ctrl-C (exit 130)."""
    import signal
    import subprocess
    import sys

    folder = tmp_path / "stack"
    up = subprocess.Popen([sys.executable, "-m", "obs_pipeline.cli", "stack", "up", "--dir", str(folder)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _cloning(folder) and up.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert _cloning(folder), up.communicate()[1]
        up.send_signal(getattr(signal, sig))
        assert up.wait(timeout=60) == 130, up.communicate()[1]
        assert _cloning(folder) == []
        stack = LocalStack(folder)
        stack.up()  # at once: the slot is free
        assert run(stack.env()["OBS_REPLICA_DB_URL"], "SELECT pg_is_in_recovery()") is True
    finally:
        for pid in _cloning(folder):
            os.kill(pid, 9)
        if up.poll() is None:
            up.kill()
        LocalStack(folder).down()


def test_the_users_pg_variables_for_another_server_do_not_reach_the_stacks_connections(stack, monkeypatch):  # noqa: F811
    """A user with PGSSLMODE=require or PGTARGETSESSIONATTRS=read-write set for the real
    database: the stack's own control connections must not take them up (the replica, read
    only, would never answer "read-write"; a server without SSL never "require")."""
    from obs_pipeline.stack.postgres import PgServer

    monkeypatch.setenv("PGSSLMODE", "require")
    monkeypatch.setenv("PGTARGETSESSIONATTRS", "read-write")
    replica = stack.status()["replica"]
    server = PgServer("replica", stack.directory / "postgres" / "replica", replica["port"],
                      stack.log_path("replica"), stack.log_path("replica"), None)
    assert server.query("SELECT pg_is_in_recovery()") == (True,)


@pytest.fixture
def full_disk(tmp_path):
    """A small tmpfs in tmp_path/"disk" and a function that fills it up; unmounted at the end.
    Skipped where this user cannot mount (mounting needs root, or CAP_SYS_ADMIN)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here to fill a disk")

    def fill() -> None:
        with open(disk / "filler", "ab", buffering=0) as fh:
            with contextlib.suppress(OSError):
                while fh.write(b"\0" * 4096):
                    pass
        with pytest.raises(OSError):  # full indeed
            (disk / "probe").write_bytes(b"\0" * 4096)
        (disk / "probe").unlink(missing_ok=True)

    try:
        yield disk, fill
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_first_up_on_a_full_disk_is_one_line_naming_stack_json_and_leaves_no_temp_file(full_disk):
    """_save on a full disk said a bare '[Errno 28] No space left on device' and left an empty
    stack.json.tmp."""
    disk, fill = full_disk
    local = LocalStack(disk / "stack")
    local.make_folder()
    fill()
    with pytest.raises(StackError, match=r"^cannot write .*/stack/stack\.json: No space left on device$"):
        local.up()
    assert sorted(p.name for p in local.directory.iterdir()) == [".stack.lock"]


def test_a_redis_whose_pidfile_was_deleted_is_still_found_and_stopped(tmp_path):
    """With redis/redis.pid deleted (by hand, a cleanup script) while Redis ran, `stack down`
    stopped nothing and said nothing: Redis was left running, `status` said it was not."""
    from obs_pipeline.stack.redis_server import RedisServer

    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", pick_free_ports(1)[0], tmp_path / "redis.log")
    server.start()
    pid = server.pid
    try:
        server.pidfile.unlink()
        assert server.pid == pid
        server.stop()
        assert not pid_alive(pid)
        assert port_is_free(server.port)
    finally:
        if pid_alive(pid, f"127.0.0.1:{server.port}"):
            os.kill(pid, 9)


def test_a_redis_that_exits_before_writing_its_pidfile_is_said_at_once(tmp_path):
    """Its port taken by another program between the check and the start, Redis exits before it
    writes its pidfile: `up` waited READY_TIMEOUT (60 s) and said 'not answering PING'."""
    from obs_pipeline.stack.redis_server import RedisServer

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        (tmp_path / "redis").mkdir()
        server = RedisServer(tmp_path / "redis", taken.getsockname()[1], tmp_path / "redis.log")
        started = time.monotonic()
        with pytest.raises(StackError, match=r"^redis exited as it started on 127\.0\.0\.1:\d+: "
                                             r".*Failed listening on port \d+ \(TCP\)"):
            server.start()
        assert time.monotonic() - started < 20
    finally:
        taken.close()


def test_stopping_a_proxy_that_exits_meanwhile_is_no_error(tmp_path, monkeypatch):
    """stop_proxy read the pidfile twice: a proxy exiting (and removing its pidfile) between the
    reads made it raise FileNotFoundError; and one gone before the SIGTERM, ProcessLookupError."""
    from obs_pipeline.stack import proxy_process

    listen, target = pick_free_ports(2)
    pidfile = tmp_path / "proxy.pid"
    pid = start_proxy(listen, target, 5, pidfile, tmp_path / "proxy.log")
    real_pid_alive = proxy_process.pid_alive

    def exits_right_after_the_check(pid_, needle=None):
        alive = real_pid_alive(pid_, needle)
        if alive and pidfile.exists():
            os.kill(pid_, 15)
            assert eventually(lambda: not pidfile.exists() and not real_pid_alive(pid_, needle))
        return alive

    monkeypatch.setattr(proxy_process, "pid_alive", exits_right_after_the_check)
    try:
        stop_proxy(pidfile)
    finally:
        monkeypatch.undo()
        if pid_alive(pid, f"--listen {listen} "):
            os.kill(pid, 9)
    # (gone: an exiting process has no command line before it is gone, and the check above,
    # by its command line, may see it gone first: the last assertion failed so on a slow host)
    assert not pidfile.exists() and eventually(lambda: not pid_alive(pid))


def test_a_proxy_stopped_as_it_starts_removes_its_pidfile(tmp_path):
    """The proxy wrote its pidfile, then started its event loop and only there took SIGTERM as a
    stop: a SIGTERM between the two (a `stack stop` right after `up`, on a loaded host) killed it
    at once, its pidfile left behind (the test above then waited 30 s for it to go, in vain).
    Here its start is made slow (2 s before its loop) to hold that moment open."""
    listen, target = pick_free_ports(2)
    pidfile = tmp_path / "proxy.pid"
    slow_start = ("import asyncio, sys, time; from obs_pipeline.stack import latency_proxy; real = asyncio.run; "
                  "asyncio.run = lambda coro: (time.sleep(2), real(coro))[1]; "
                  f"sys.exit(latency_proxy.main(['--listen', '{listen}', '--target', '127.0.0.1:{target}', "
                  f"'--delay-ms', '5', '--pidfile', '{pidfile}']))")
    proc = subprocess.Popen([sys.executable, "-c", slow_start], stderr=subprocess.DEVNULL)
    try:
        assert eventually(pidfile.exists, timeout=20)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (code, pidfile.exists()) == (0, False)


@pytest.mark.parametrize("value", [True, False])
def test_a_main_latency_of_true_or_false_is_refused(value):
    """checked_latency(True) was taken for 1 ms (True == 1), from the API or from stack.json."""
    from obs_pipeline.stack.local_stack import checked_latency

    with pytest.raises(ValueError, match=r"^main latency must be a whole number"):
        checked_latency(value)


def test_a_main_that_crashes_in_its_shutdown_is_said_by_stop(tmp_path):
    """A main that crashed during its shutdown checkpoint (a full disk: PANIC), pg_ctl still says
    'server stopped' and exits 0: `stack down` exited 0 and said nothing, the cluster left to
    recover at its next start. Made here by killing its checkpointer as it shuts down."""
    import signal
    import subprocess

    from obs_pipeline.stack.osutil import chown, open_prefixes, pg_run_user
    from obs_pipeline.stack.postgres import PgServer

    user = pg_run_user()
    if user:
        chown(tmp_path, user)
        open_prefixes(tmp_path)
    server = PgServer("main", tmp_path / "main", pick_free_ports(1)[0], tmp_path / "main.log",
                      tmp_path / "pg_ctl.log", user)
    server.init_primary()
    server.start()
    try:
        checkpointer = int(subprocess.run(["pgrep", "-P", str(server.pid), "-f", "checkpointer"],
                                          capture_output=True, text=True, check=True).stdout.split()[0])
        os.kill(checkpointer, signal.SIGSTOP)
        raised = []

        def stop() -> None:
            try:
                server.stop()
            except StackError as error:
                raised.append(str(error))

        stopping = threading.Thread(target=stop)
        stopping.start()
        assert eventually(lambda: "received fast shutdown request" in server.log.read_text())
        os.kill(checkpointer, signal.SIGKILL)
        stopping.join(WAIT)
        assert not server.running
        assert len(raised) == 1 and raised[0].startswith("main PostgreSQL crashed as it stopped"), raised
        server.start()  # it recovers from its WAL
        server.stop()  # and stops cleanly then: no error
    finally:
        if server.running:
            server.stop("immediate")
