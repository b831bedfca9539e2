"""Reusable pytest fixtures that run the real local stack (import them from conftest.py).

    from obs_pipeline_tests.stack_fixtures import stack, stack_env  # noqa: F401
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

import pytest
import sqlalchemy as sa

from obs_pipeline.stack import LocalStack
from obs_pipeline.stack.osutil import pid_alive


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """One LocalStack (main + replica + redis) per test session, in its own tmp folder; down at the end."""
    local = LocalStack(tmp_path_factory.mktemp("stack"))
    try:
        local.up()
        yield local
    finally:
        local.down()


@pytest.fixture
def stack_env(stack, monkeypatch):
    """`stack.env()` exported into os.environ for one test (OBS_REDIS_URL, OBS_MAIN_DB_URL, ...)."""
    env = stack.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@contextlib.contextmanager
def second_standby(stack, name: str, wal: str, conf: str, refusal: str):
    """The URL of `obs` on another standby of the stack's main, cloned as the replica is
    (pg_basebackup -R, without a slot; `wal`: its -X), `conf` appended to its settings, once it
    refuses a connect with `refusal` (PgServer.start waits for a `SELECT 1` such a server never
    answers); stopped at the end."""
    import psycopg2

    from obs_pipeline.stack.errors import StackError
    from obs_pipeline.stack.osutil import chown, pick_free_ports, wait_until
    from obs_pipeline.stack.postgres import HOST, PgServer

    user = stack._pg_user(create=False)
    server = PgServer(name, stack.directory / "postgres" / name, pick_free_ports(1)[0], stack.log_path(name),
                      stack.log_path("pg_ctl"), user)
    server._tool("pg_basebackup", ["-D", str(server.datadir), "-h", HOST, "-p",
                                   str(sa.engine.make_url(stack.main_direct_url).port), "-U", "postgres", "-R",
                                   "-X", wal, "--checkpoint=fast"], "pg_basebackup from main")
    with open(server.datadir / "postgresql.auto.conf", "a") as auto:  # (its last line of a setting wins)
        auto.write(conf)
    server.log.touch()
    chown(server.log, user)
    try:
        server._tool("pg_ctl", ["-D", str(server.datadir), "-W", "-l", str(server.log), "-o", server._options(),
                                "start"], "start", log=server.log)

        def refuses() -> bool:
            try:
                server.connect("obs").close()
            except psycopg2.OperationalError as error:
                return refusal in str(error)
            raise StackError(f"{name} accepted a connection")

        if not wait_until(refuses, 60):
            raise StackError(f"{name} did not refuse connections with {refusal!r} (see {server.log})")
        yield f"postgresql+psycopg2://postgres@{HOST}:{server.port}/obs"
    finally:
        server.stop(mode="immediate")


@pytest.fixture(scope="session")
def cold_standby_url(stack):
    """A standby with `hot_standby = off`: it refuses every connection ("the database system is
    not accepting connections", "Hot standby mode is disabled"), as a site's standby set up so
    does when a wrong OBS_MAIN_DB_URL names it."""
    with second_standby(stack, "cold_standby", "stream", "hot_standby = off\n",
                        "Hot standby mode is disabled") as url:
        yield url


@pytest.fixture(scope="session")
def starting_standby_url(stack):
    """A server that says "the database system is starting up" (57P03) to every connection, as
    main does while it starts or recovers from a crash: a standby cloned without its WAL, whose
    upstream is a closed port, waits for its checkpoint record for ever."""
    from obs_pipeline.stack.osutil import pick_free_ports

    closed = pick_free_ports(1)[0]
    with second_standby(stack, "starting_standby", "none", f"primary_conninfo = 'host=127.0.0.1 port={closed} "
                                                           "user=postgres'\n",
                        "the database system is starting up") as url:
        yield url


def live_processes(matches: Callable[[Path], bool]) -> set[int]:
    """Live processes but this one whose /proc entry `matches` (one that ends meanwhile, or is
    another user's, is passed over)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if matches(entry) and pid_alive(int(entry.name)):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found
