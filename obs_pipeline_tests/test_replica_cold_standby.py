"""OBS_REPLICA_DB_URL naming a standby with `hot_standby = off`: it streams main's WAL and
refuses every connection ("the database system is not accepting connections", "Hot standby
mode is disabled"). `status`, the drain and reads said "replica unreachable" or "cannot be
read: ... not accepting connections", which sends an operator after a server that is up; they
say what to do now, and otherwise behave as with a replica that is down."""

from __future__ import annotations

import dataclasses
import json
import uuid

import pytest
import sqlalchemy as sa

from obs_pipeline.ingest import ReplicaUnreadable, TransactionBuffer
from obs_pipeline.keys import SiteKeys
from obs_pipeline_tests.test_cli import cli, one_line_error

pytestmark = pytest.mark.usefixtures("clean_db")


def refusal_line(url: str) -> str:
    where = sa.engine.make_url(url)
    return (f"the replica at {where.host}:{where.port}/{where.database} (OBS_REPLICA_DB_URL) is a standby with "
            'hot_standby off (it refuses every connection: "Hot standby mode is disabled"): set hot_standby = on '
            "in its postgresql.conf and restart it")


@pytest.fixture
def cold(settings, cold_standby_url):
    return dataclasses.replace(settings, replica_db_url=cold_standby_url)


def _env(settings) -> dict[str, str]:
    return {"OBS_SITE": settings.site, "OBS_REDIS_URL": settings.redis_url, "OBS_MAIN_DB_URL": settings.main_db_url,
            "OBS_REPLICA_DB_URL": settings.replica_db_url}


def test_status_says_to_turn_hot_standby_on(cold):
    expected = refusal_line(cold.replica_db_url)
    report = json.loads(cli("status", "--json", env=_env(cold)).stdout)
    assert report["status"] == "unhealthy"
    assert report["problems"] == [expected]
    assert report["replication_lag"]["main_lsn"] and report["replication_lag"]["replica_lsn"] is None
    line = one_line_error(cli("status", "--check", env=_env(cold)))
    assert line == f"obs-pipeline: site {cold.site} is unhealthy: {expected}", line


def test_the_drain_commits_and_says_once_why_it_cannot_see_replay(cold, main_engine, redis_client):
    """The drain goes on applying (what it did before); its log and `drain --once`'s last line
    say what to do, once, instead of nothing (the replay wait swallowed the refusal)."""
    buf = TransactionBuffer(settings=cold)
    tx_ids = []
    for n in range(2):
        with buf.transaction(endpoint="start_observation") as tx:
            tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": f"2025-01-01T0{n}:00:00Z",
                                          "status": "running"})
        tx_ids.append(tx.transaction_id)
    result = cli("drain", "--once", "--replication-timeout", "1", env=_env(cold))
    assert result.returncode == 0, result.stderr
    expected = refusal_line(cold.replica_db_url)
    logged = [line for line in result.stderr.splitlines() if "committed batches wait for its replay" in line]
    assert len(logged) == 1 and expected in logged[0], result.stderr
    assert "replica unreachable" not in result.stderr
    assert result.stderr.rstrip().endswith(f"{expected})"), result.stderr
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit")).scalar() == 2
    assert [buf.status(t) for t in tx_ids] == ["applied", "applied"]
    assert redis_client.zcard(SiteKeys(cold.site).awaiting_replication) >= 1  # caches kept for a later drain


def test_reads_answer_from_the_buffer_and_say_what_to_do_for_the_rest(cold):
    buf = TransactionBuffer(settings=cold)
    with buf.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "running"})
    assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "running"  # buffered: no replica needed
    expected = f"reading ExecutedObsUnit needs the site's replica, but {refusal_line(cold.replica_db_url)}"
    with pytest.raises(ReplicaUnreadable) as unread:
        buf.get("ExecutedObsUnit", str(uuid.uuid4()))
    assert str(unread.value) == expected
    with pytest.raises(ReplicaUnreadable) as unread:
        buf.search("ExecutedObsUnit", {"obs_unit_id": 1})
    assert str(unread.value) == expected


def test_a_dagster_run_commits_and_the_sensor_says_what_to_do(cold):
    """The run ends with the line in its stop reason; the sensor, which launches no run while
    the replica has not replayed, said "does not answer or reports no replay position (is
    OBS_REPLICA_DB_URL a primary?)"."""
    from dagster import SkipReason, build_sensor_context, instance_for_test

    from obs_pipeline.dagster_defs.jobs import drain_buffer
    from obs_pipeline.dagster_defs.resources import ObsPipelineResource
    from obs_pipeline.dagster_defs.sensors import buffer_sensor

    buf = TransactionBuffer(settings=cold)
    with buf.transaction(endpoint="start_observation") as tx:
        tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z", "status": "running"})
    resource = ObsPipelineResource(site=cold.site, redis_url=cold.redis_url, main_db_url=cold.main_db_url,
                                   replica_db_url=cold.replica_db_url)
    expected = refusal_line(cold.replica_db_url)
    config = {"ops": {"drain_batches": {"config": {"idle_exit_s": 0, "replication_timeout_s": 1, "budget_s": 60}}}}
    with instance_for_test() as instance:
        result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=config,
                                                 instance=instance)
        assert result.success
        drained = result.output_for_node("drain_batches")
        assert drained["applied"] == 1 and drained["stopped_because"].endswith(expected), drained
        skip = buffer_sensor(build_sensor_context(instance=instance, resources={"obs_pipeline": resource}))
        assert isinstance(skip, SkipReason), skip
        assert f"which refuses every connection: {expected}" in skip.skip_message, skip.skip_message
    assert buf.status(tx.transaction_id) == "applied"
