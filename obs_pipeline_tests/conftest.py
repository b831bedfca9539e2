"""Fixtures: one real local stack (PostgreSQL primary + streaming replica + Redis) per test
session, started from the project's own stack code; each test gets its own site (its own
Redis keys) and empty tables."""

from __future__ import annotations

import uuid

import pytest
import redis as redis_lib
import sqlalchemy as sa

from obs_pipeline.lsn import lsn_to_int
from obs_pipeline.config import Settings
from obs_pipeline.model_registry import ModelRegistry
from obs_pipeline.schema import applied_transactions, create_schema
from obs_pipeline_tests.stack_fixtures import cold_standby_url, stack, starting_standby_url  # noqa: F401

OBS_UNIT_IDS = (1, 2, 3, 123)


@pytest.fixture(scope="session")
def stack_urls(stack):  # noqa: F811
    env = stack.env()
    engine, replica = sa.create_engine(env["OBS_MAIN_DB_URL"]), sa.create_engine(env["OBS_REPLICA_DB_URL"])
    create_schema(engine, ModelRegistry.from_path("obs_pipeline.models:Base"))
    wait_for_replica(engine, replica)  # a session's first test may read the replica (ingest checks a key there)
    engine.dispose()
    replica.dispose()
    return env


@pytest.fixture(scope="session")
def main_engine(stack_urls):
    engine = sa.create_engine(stack_urls["OBS_MAIN_DB_URL"], pool_pre_ping=True)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def replica_engine(stack_urls):
    engine = sa.create_engine(stack_urls["OBS_REPLICA_DB_URL"], pool_pre_ping=True, connect_args={"options": "-c timezone=UTC"})
    yield engine
    engine.dispose()


@pytest.fixture
def site():
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(stack_urls, site, tmp_path) -> Settings:
    return Settings(site=site, redis_url=stack_urls["OBS_REDIS_URL"], main_db_url=stack_urls["OBS_MAIN_DB_URL"],
                    replica_db_url=stack_urls["OBS_REPLICA_DB_URL"], spool_dir=str(tmp_path / "spool"))


@pytest.fixture
def redis_client(stack_urls):
    client = redis_lib.Redis.from_url(stack_urls["OBS_REDIS_URL"])
    yield client
    client.close()


@pytest.fixture
def clean_db(main_engine, replica_engine):
    """Empty tables on main (and, once replayed, on the replica), with a few obs units."""
    registry = ModelRegistry.from_path("obs_pipeline.models:Base")
    tables = ", ".join(t.name for t in registry.metadata.sorted_tables) + ", " + applied_transactions.name
    with main_engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {tables} CASCADE"))
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES " +
                             ", ".join(f"({i}, 'unit {i}')" for i in OBS_UNIT_IDS)))
    wait_for_replica(main_engine, replica_engine)


def wait_for_replica(main_engine, replica_engine, timeout: float = 30.0) -> None:
    import time

    with main_engine.connect() as conn:
        target = lsn_to_int(conn.execute(sa.text("SELECT pg_current_wal_flush_lsn()::text")).scalar_one())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with replica_engine.connect() as conn:
            replay = conn.execute(sa.text("SELECT pg_last_wal_replay_lsn()::text")).scalar()
        if replay and lsn_to_int(replay) >= target:
            return
        time.sleep(0.02)
    raise AssertionError("replica did not catch up with main")


def site_keys(client, site: str) -> list[str]:
    return sorted(k.decode() for k in client.scan_iter(match=f"site:{site}:*", count=1000))
