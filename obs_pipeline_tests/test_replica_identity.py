"""OBS_REPLICA_DB_URL naming a standby of another cluster (a replica re-created from another
main's base backup, main moved to a new cluster by dump and restore while the site's replica
still follows the old one, a URL copied from another site): its replay LSN says nothing of
main's commits. Numerically larger, the drain took it for the replay of every batch and cleaned
caches whose rows that replica never gets: reads at the site lost the records."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import sqlalchemy as sa

from obs_pipeline.drain import Drain, DrainConfig, DrainSummary
from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline.keys import SiteKeys
from obs_pipeline.model_registry import ModelRegistry
from obs_pipeline.schema import create_schema
from obs_pipeline_tests.conftest import OBS_UNIT_IDS, wait_for_replica
from obs_pipeline_tests.workload import replay_paused

pytestmark = pytest.mark.usefixtures("clean_db")

FOREIGN_WAL_START = "000000010000000500000000"  # 5/0: past main's LSNs, and past 32 bits


@pytest.fixture(scope="module")
def foreign_standby_url(stack):
    """The `obs` database on a hot standby of another primary (its own initdb, the schema and
    obs units as on main), whose WAL starts at 5/0, far past main's."""
    from obs_pipeline.stack.osutil import pick_free_ports, wait_until
    from obs_pipeline.stack.postgres import HOST, PgServer

    user = stack._pg_user(create=False)
    folder = stack.directory / "postgres"
    ports = pick_free_ports(2)
    other = PgServer("other_main", folder / "other_main", ports[0], stack.log_path("other_main"),
                     stack.log_path("pg_ctl"), user)
    standby = PgServer("other_standby", folder / "other_standby", ports[1], stack.log_path("other_standby"),
                       stack.log_path("pg_ctl"), user)
    try:
        other.init_primary()
        other._tool("pg_resetwal", ["-l", FOREIGN_WAL_START, str(other.datadir)], "pg_resetwal")
        other.start()
        other.ensure_databases(["obs"])
        engine = sa.create_engine(f"postgresql+psycopg2://postgres@{HOST}:{other.port}/obs")
        create_schema(engine, ModelRegistry.from_path("obs_pipeline.models:Base"))
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES " +
                                 ", ".join(f"({i}, 'unit {i}')" for i in OBS_UNIT_IDS)))
            target = conn.execute(sa.text("SELECT pg_current_wal_flush_lsn()")).scalar()
        engine.dispose()
        standby.clone_from(other)
        standby.set_upstream(other.port)
        standby.start()
        url = f"postgresql+psycopg2://postgres@{HOST}:{standby.port}/obs"
        replica = sa.create_engine(url)

        def replayed() -> bool:
            with replica.connect() as conn:
                return conn.execute(sa.text("SELECT pg_last_wal_replay_lsn() >= :t"), {"t": target}).scalar()

        assert wait_until(replayed, 60), "the foreign standby did not replay its primary's schema"
        replica.dispose()
        yield url
    finally:
        standby.stop(mode="immediate")
        other.stop(mode="immediate")


def test_a_replica_of_another_cluster_never_has_the_drain_clean_caches_and_the_right_one_does(
        settings, foreign_standby_url, main_engine, redis_client, caplog):
    foreign = dataclasses.replace(settings, replica_db_url=foreign_standby_url)
    buf = TransactionBuffer(settings=foreign)
    with buf.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "running"})
    keys = SiteKeys(settings.site)
    drain = Drain(foreign, DrainConfig(replication_timeout_s=0.5))
    with caplog.at_level(logging.WARNING, logger="obs_pipeline.drain"):
        try:
            summary = drain.run(until_empty=True, replica_patience_s=1.0, budget_s=30)
        finally:
            drain.close()
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit")).scalar() == 1
    assert buf.get("ExecutedObsUnit", obs["id"]) is not None  # the site still reads it, from its caches
    assert buf.status(tx.transaction_id) == "applied"
    assert redis_client.exists(keys.buffered("ExecutedObsUnit", obs["id"])) == 1
    assert redis_client.zcard(keys.awaiting_replication) == 1
    assert summary.replica_stalled and "another cluster" in summary.stopped_because, summary.stopped_because
    said = [r.getMessage() for r in caplog.records if "another cluster" in r.getMessage()]
    assert len(said) == 1 and "OBS_REPLICA_DB_URL" in said[0], said
    buf.close()

    buf = TransactionBuffer(settings=settings)  # the site's own replica: cleaned once, read from it
    drain = Drain(settings, DrainConfig(replication_timeout_s=10))
    try:
        drain.run(until_empty=True, budget_s=30)
    finally:
        drain.close()
    assert buf.status(tx.transaction_id) == "replicated"
    assert redis_client.exists(keys.buffered("ExecutedObsUnit", obs["id"])) == 0
    assert redis_client.zcard(keys.awaiting_replication) == 0
    assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "running"
    assert int(redis_client.hget(keys.stats, "replicated_total")) == 1
    buf.close()


def test_status_says_the_replica_is_of_another_cluster(settings, foreign_standby_url, redis_client):
    """It said healthy, with no lag: the foreign replay position was past every batch, while
    the drain (fixed) cleans none of them."""
    from obs_pipeline_tests.test_cli import cli, one_line_error

    env = {"OBS_SITE": settings.site, "OBS_REDIS_URL": settings.redis_url, "OBS_MAIN_DB_URL": settings.main_db_url,
           "OBS_REPLICA_DB_URL": foreign_standby_url}
    buf = TransactionBuffer(settings=dataclasses.replace(settings, replica_db_url=foreign_standby_url))
    with buf.transaction(endpoint="start_observation") as tx:
        tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z", "status": "running"})
    buf.close()
    assert cli("drain", "--once", "--replication-timeout", "0.5", env=env).returncode == 0
    report = json.loads(cli("status", "--json", env=env).stdout)
    assert report["status"] == "unhealthy", report
    assert len(report["problems"]) == 1 and "is a standby of another cluster" in report["problems"][0], report
    assert report["replication_lag"]["awaiting_batches"] == 1, report
    line = one_line_error(cli("status", "--check", env=env))
    assert line.startswith(f"obs-pipeline: site {settings.site} is unhealthy: the replica at ") and \
        "OBS_REPLICA_DB_URL" in line, line


def _drain(settings, **run) -> DrainSummary:
    drain = Drain(settings, DrainConfig(replication_timeout_s=run.pop("replication_timeout_s", 0.2)))
    try:
        return drain.run(until_empty=True, budget_s=30, **run)
    finally:
        drain.close()


def _applied_not_cleaned(settings, replica_engine, main_engine) -> tuple[TransactionBuffer, str, str]:
    """One transaction committed and acknowledged while replay was paused, then replayed: only
    a drain's cleanup is missing. (buffer, its id, its record's id)"""
    buf = TransactionBuffer(settings=settings)
    with buf.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "running"})
    with replay_paused(replica_engine):
        _drain(settings, replica_patience_s=0.5)
    assert buf.status(tx.transaction_id) == "applied"
    wait_for_replica(main_engine, replica_engine)
    return buf, tx.transaction_id, obs["id"]


def test_while_main_is_down_the_drain_cleans_what_the_replica_of_the_recorded_main_replayed(
        stack, settings, redis_client, main_engine, replica_engine):
    """The acknowledgement records main's system identifier with the commits it names, so a
    run that cannot reach main still cleans them once (it cleaned them before the identity check
    too). Batches no acknowledgement named (a drain of an earlier version) wait for main's own
    answer: nothing is cleaned while main does not answer, the stop reason says so, reads still
    find the record, and the next run that reaches main cleans it once."""
    keys = SiteKeys(settings.site)
    recorded, recorded_tx, _ = _applied_not_cleaned(settings, replica_engine, main_engine)
    assert redis_client.hget(keys.stats, "main_system_identifier") is not None
    stack.stop_service("main")
    try:
        summary = _drain(settings, replica_patience_s=1.0)
        assert summary.replicated == 1 and summary.stopped_because == "buffer empty", summary
        assert recorded.status(recorded_tx) == "replicated"
    finally:
        stack.start_service("main")

    unrecorded, unrecorded_tx, unrecorded_obs = _applied_not_cleaned(settings, replica_engine, main_engine)
    redis_client.hdel(keys.stats, "main_system_identifier")  # as a drain of an earlier version left it
    stack.stop_service("main")
    try:
        summary = _drain(settings, replica_patience_s=1.0)
        assert "replays main's WAL until main answers" in summary.stopped_because, summary.stopped_because
        assert unrecorded.status(unrecorded_tx) == "applied"
        assert redis_client.zcard(keys.awaiting_replication) == 1
        assert unrecorded.get("ExecutedObsUnit", unrecorded_obs)["status"] == "running"
    finally:
        stack.start_service("main")
    summary = _drain(settings, replication_timeout_s=10)
    assert summary.replicated == 1 and summary.stopped_because == "buffer empty", summary
    assert unrecorded.status(unrecorded_tx) == "replicated"
    assert redis_client.zcard(keys.awaiting_replication) == 0
    assert redis_client.exists(keys.buffered("ExecutedObsUnit", unrecorded_obs)) == 0
    assert unrecorded.get("ExecutedObsUnit", unrecorded_obs)["status"] == "running"
    assert int(redis_client.hget(keys.stats, "replicated_total")) == 2
    recorded.close()
    unrecorded.close()


def test_the_sensor_launches_no_run_for_a_replica_of_another_cluster(settings, foreign_standby_url):
    """Its replay position, of other WAL and larger, passed for the replay of the oldest batch:
    the sensor launched a run at each tick, each waiting replication_timeout_s to clean nothing."""
    from dagster import SkipReason, build_sensor_context, instance_for_test

    from obs_pipeline.dagster_defs.resources import ObsPipelineResource
    from obs_pipeline.dagster_defs.sensors import buffer_sensor

    foreign = dataclasses.replace(settings, replica_db_url=foreign_standby_url)
    buf = TransactionBuffer(settings=foreign)
    with buf.transaction(endpoint="start_observation") as tx:
        tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z", "status": "running"})
    _drain(foreign, replica_patience_s=0.5)
    assert buf.status(tx.transaction_id) == "applied"
    buf.close()
    resource = ObsPipelineResource(site=foreign.site, redis_url=foreign.redis_url, main_db_url=foreign.main_db_url,
                                   replica_db_url=foreign.replica_db_url)
    with instance_for_test() as instance:
        skip = buffer_sensor(build_sensor_context(instance=instance, resources={"obs_pipeline": resource}))
    assert isinstance(skip, SkipReason), skip
    assert "which replays other WAL: the replica at " in skip.skip_message, skip.skip_message
    assert "is a standby of another cluster" in skip.skip_message, skip.skip_message


def test_the_replica_replays_check_fails_for_a_replica_of_another_cluster(settings, foreign_standby_url):
    from obs_pipeline.dagster_defs.operations import replica_replays
    from obs_pipeline.dagster_defs.resources import ObsPipelineResource

    resource = ObsPipelineResource(site=settings.site, redis_url=settings.redis_url, main_db_url=settings.main_db_url,
                                   replica_db_url=foreign_standby_url)
    result = replica_replays(obs_pipeline=resource)
    assert not result.passed
    assert "is a standby of another cluster" in result.description, result.description


def test_a_replica_role_that_may_not_read_the_applied_records_keeps_caches_and_says_what_to_grant(
        settings, redis_client, main_engine, replica_engine, caplog):
    """The cleanup asks the site's replica which of a batch's ids it shows (obs_pipeline_applied)
    before it cleans their caches. A readers' role made without deploy/main-setup.sql's GRANT
    may not read that table: nothing is cleaned (reads keep showing the buffered records), and
    the drain says so in one line naming the variable and the grant, once however many times it
    looks, and so does the reason it stops; the sensor launches no run for it (each would idle,
    then end saying so), and says why, as does `status`. Granted, the sensor launches one and it
    cleans."""
    from dagster import RunRequest, SkipReason, build_sensor_context, instance_for_test

    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.dagster_defs.resources import ObsPipelineResource
    from obs_pipeline.dagster_defs.sensors import buffer_sensor
    from obs_pipeline.health import health_report

    role = f"noapplied_{settings.site}"
    with main_engine.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN"))
    try:
        buf, tx_id, obs_id = _applied_not_cleaned(settings, replica_engine, main_engine)
        url = sa.engine.make_url(settings.replica_db_url).set(username=role).render_as_string(hide_password=False)
        refused = dataclasses.replace(settings, replica_db_url=url)
        resource = ObsPipelineResource(site=refused.site, redis_url=refused.redis_url,
                                       main_db_url=refused.main_db_url, replica_db_url=refused.replica_db_url)
        with caplog.at_level(logging.WARNING, logger="obs_pipeline.drain"):
            summary = _drain(refused, idle_exit_s=1.0, replica_patience_s=2.0)
        assert summary.replicated == 0 and buf.status(tx_id) == "applied"
        assert summary.stopped_because.endswith(  # (a Dagster run's end says it too)
            "grant it SELECT on obs_pipeline_applied on main (deploy/main-setup.sql); the replica replays the grant"), \
            summary.stopped_because
        assert buf.get("ExecutedObsUnit", obs_id)["status"] == "running"  # the buffered record, kept
        said = [r.getMessage() for r in caplog.records if "OBS_REPLICA_DB_URL" in r.getMessage()]
        assert said == [
            "the site's replica refuses the role of OBS_REPLICA_DB_URL (permission denied for table "
            "obs_pipeline_applied): grant it SELECT on obs_pipeline_applied on main (deploy/main-setup.sql); the "
            "replica replays the grant; caches kept"], said
        refused_engine = sa.create_engine(url)
        try:  # `status` says so too (it said healthy)
            report = health_report(BufferStore(redis_client, settings.site), main_engine, refused_engine)
        finally:
            refused_engine.dispose()
        assert report["status"] == "degraded" and report["problems"] == [
            said[0].removesuffix("; caches kept") + "; until then no drain cleans a batch's caches (1 chunk(s) of "
            "committed transactions waiting)"], report["problems"]
        with instance_for_test() as instance:  # nor does the sensor launch a run at each tick to say it
            skip = buffer_sensor(build_sensor_context(instance=instance, resources={"obs_pipeline": resource}))
        assert isinstance(skip, SkipReason), skip
        assert skip.skip_message == (
            f"site {settings.site}: 1 committed batch(es) await their cleanup, which a drain cannot do: {said[0]}"
            .removesuffix("; caches kept")), skip.skip_message
        with main_engine.begin() as conn:
            conn.execute(sa.text(f"GRANT SELECT ON obs_pipeline_applied TO {role}"))
        wait_for_replica(main_engine, replica_engine)
        with instance_for_test() as instance:
            assert isinstance(buffer_sensor(build_sensor_context(instance=instance, resources={
                "obs_pipeline": resource})), RunRequest)
        assert _drain(refused).replicated == 1 and buf.status(tx_id) == "replicated"
        buf.close()
    finally:
        with main_engine.begin() as conn:
            conn.execute(sa.text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"))
            conn.execute(sa.text(f"DROP OWNED BY {role}"))
            conn.execute(sa.text(f"DROP ROLE {role}"))
