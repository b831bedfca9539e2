"""The Dagster layer on the real stack: definitions, the job in process, the sensor, the daemon."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time

import pytest
import sqlalchemy as sa
from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Definitions,
    RunRequest,
    RunsFilter,
    SkipReason,
    build_sensor_context,
    instance_for_test,
)

from obs_pipeline.buffer_store import BufferStore
from obs_pipeline.dagster_defs.jobs import MAIN_ASSET, REPLICA_ASSET, SITE_TAG, drain_buffer
from obs_pipeline.dagster_defs.operations import HISTORY_JOBS, replica_replays
from obs_pipeline.dagster_defs.resources import ObsPipelineResource
from obs_pipeline.dagster_defs import sensors
from obs_pipeline.dagster_defs.sensors import buffer_sensor
from obs_pipeline.definitions import defs
from obs_pipeline.config import installed_script
from obs_pipeline.dev import dagster_environment, stop_processes
from obs_pipeline.keys import SiteKeys
from obs_pipeline_tests.conftest import wait_for_replica
from obs_pipeline_tests.examples import seed_example, seed_example_json
from obs_pipeline_tests.workload import replay_paused

pytestmark = pytest.mark.usefixtures("clean_db")


@pytest.fixture
def resource(settings) -> ObsPipelineResource:
    return ObsPipelineResource(site=settings.site, redis_url=settings.redis_url, main_db_url=settings.main_db_url,
                               replica_db_url=settings.replica_db_url)


def test_definitions_load():
    assert isinstance(defs, Definitions)  # contract section 5: obs_pipeline.definitions:defs
    job = defs.resolve_job_def("drain_buffer")
    assert job.executor_def.name == "in_process"
    assert defs.resolve_sensor_def("buffer_sensor").default_status == DefaultSensorStatus.RUNNING
    assert defs.resolve_sensor_def("buffer_sensor").job_name == "drain_buffer"  # what it launches
    # every job's runs are pruned, by a schedule that runs from the start
    assert {j.name for j in defs.get_repository_def().get_all_jobs()} <= set(HISTORY_JOBS)
    history = defs.resolve_schedule_def("prune_run_history_schedule")
    assert history.job_name == "prune_run_history" and history.default_status == DefaultScheduleStatus.RUNNING


def test_job_in_process_applies_replicates_and_reports_each_batch(settings, resource, redis_client, replica_engine):
    raw, tx, ids = seed_example_json(settings.site)
    redis_client.lpush(SiteKeys(settings.site).buffer, raw)

    result = drain_buffer.execute_in_process(
        resources={"obs_pipeline": resource},
        run_config={"ops": {"drain_batches": {"config": {"idle_exit_s": 0}}}})

    assert result.success
    batches = [m for m in result.asset_materializations_for_node("drain_batches") if m.asset_key == MAIN_ASSET]
    assert len(batches) == 1
    meta = {k: v.value for k, v in batches[0].metadata.items()}
    assert meta["transactions"] == 1 and meta["applied"] == 1 and meta["replicated"] == 1
    assert meta["rows_per_model"] == {"ExecutedObsUnit": 1, "RawDataPackage": 1, "RawDataFile": 2}
    assert meta["commit_lsn"] and meta["replay_lsn"] and meta["duration_s"] > 0
    with replica_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM raw_data_file WHERE raw_data_package_id = :p"),
                            {"p": ids["uuid-2"]}).scalar_one() == 2
    assert json.loads(redis_client.get(SiteKeys(settings.site).transaction(tx["transaction_id"])))["status"] \
        == "replicated"


def test_sensor_requests_a_run_only_when_there_is_work_and_none_in_flight(settings, resource, redis_client,
                                                                              monkeypatch):
    with instance_for_test() as instance:
        context = build_sensor_context(instance=instance, resources={"obs_pipeline": resource})
        assert isinstance(buffer_sensor(context), SkipReason)

        redis_client.lpush(SiteKeys(settings.site).buffer, seed_example_json(settings.site)[0])
        request = buffer_sensor(build_sensor_context(instance=instance, resources={"obs_pipeline": resource}))
        assert isinstance(request, RunRequest)
        assert request.tags[SITE_TAG] == settings.site

        run = instance.create_run_for_job(drain_buffer, tags={SITE_TAG: settings.site}, status=DagsterRunStatus.STARTED)
        skip = buffer_sensor(build_sensor_context(instance=instance, resources={"obs_pipeline": resource}))
        assert isinstance(skip, SkipReason) and "in flight" in skip.skip_message

        # a run that failed (its op retries spent): not relaunched at once, every tick, for ever
        instance.report_run_failed(run)
        skip = buffer_sensor(build_sensor_context(instance=instance, resources={"obs_pipeline": resource}))
        assert isinstance(skip, SkipReason) and f"{run.run_id} failed; the next in" in skip.skip_message
        monkeypatch.setattr(sensors, "FAILED_RUN_PAUSE_S", 0.0)  # the pause over
        assert isinstance(buffer_sensor(build_sensor_context(instance=instance, resources={"obs_pipeline": resource})),
                          RunRequest)


@pytest.mark.slow
def test_daemon_sensor_launches_a_run_that_drains(stack, settings, redis_client, replica_engine, tmp_path,
                                                 monkeypatch):
    """The real dagster-daemon, with the project's dagster.yaml (PostgreSQL storage on main)."""
    env = dagster_environment(stack, home=tmp_path / "dagster_home")
    env["OBS_SITE"] = settings.site
    daemon = subprocess.Popen([installed_script("dagster-daemon"), "run", "-m", "obs_pipeline.definitions"], env=env,
                              stdout=open(tmp_path / "daemon.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        raw, tx, ids = seed_example_json(settings.site)
        redis_client.lpush(SiteKeys(settings.site).buffer, raw)
        status_key = SiteKeys(settings.site).transaction(tx["transaction_id"])
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            status = redis_client.get(status_key)
            if status and json.loads(status)["status"] == "replicated":
                break
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("not replicated within 180 s; daemon log:\n" + (tmp_path / "daemon.log").read_text()[-3000:])
        monkeypatch.setenv("OBS_DAGSTER_PG_URL", env["OBS_DAGSTER_PG_URL"])
        instance = DagsterInstance.from_config(str(tmp_path / "dagster_home"))
        # the queue is read every second: a burst waits for the sensor's tick, not also 5 s for it
        assert instance.run_coordinator.inst_data.config_dict["dequeue_interval_seconds"] == 1
        runs = []
        while time.monotonic() < deadline and not any(r.status == DagsterRunStatus.SUCCESS for r in runs):
            runs = instance.get_runs(filters=RunsFilter(job_name="drain_buffer", tags={SITE_TAG: settings.site}))
            time.sleep(0.5)
        assert any(r.status == DagsterRunStatus.SUCCESS for r in runs), [r.status for r in runs]
        instance.dispose()
    finally:
        stop_processes([daemon])
    with replica_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit WHERE id = :i"),
                            {"i": ids["uuid-1"]}).scalar_one() == 1


def test_a_drain_run_launched_by_hand_counts_as_in_flight(settings, resource, redis_client):
    """A run of drain_buffer started from the launchpad has no site tag (only the sensor's runs
    have one): the sensor took the site for idle and launched a second run beside it, which
    waited out the lease and ended, to be followed by another, as long as the first one ran."""
    redis_client.lpush(SiteKeys(settings.site).buffer, seed_example_json(settings.site)[0])
    with instance_for_test() as instance:
        by_hand = instance.create_run_for_job(drain_buffer, status=DagsterRunStatus.STARTED)
        skip = buffer_sensor(build_sensor_context(instance=instance, resources={"obs_pipeline": resource}))
        assert isinstance(skip, SkipReason) and by_hand.run_id in skip.skip_message
        # another site's run (its own tag) does not hold this one back
        instance.report_run_failed(by_hand)
        instance.create_run_for_job(drain_buffer, tags={SITE_TAG: "another-site"}, status=DagsterRunStatus.STARTED)
        assert isinstance(buffer_sensor(build_sensor_context(instance=instance, resources={"obs_pipeline": resource})),
                          RunRequest)



def test_an_idle_tick_says_what_waits_to_retry_later(settings, resource, redis_client):
    """With only a retry not yet due, the tick's line was "buffer empty, nothing awaiting
    replication", as if the site had nothing left; it now says how many wait and when."""
    from obs_pipeline.drain import Drain, DrainConfig

    redis_client.lpush(SiteKeys(settings.site).buffer, json.dumps({"transaction_id": "waits-1", "steps": [
        {"step_id": "s", "operation": "update", "model_class": "ObsUnit", "conditions": {"id": 9931},
         "data": {"name": "not there yet"}}]}))
    drain = Drain(settings, DrainConfig(retry_base_s=100))
    try:
        drain.acquire()
        assert drain.step().retried == 1
    finally:
        drain.close()
    with instance_for_test() as instance:
        skip = _sensor(instance, resource)
    assert isinstance(skip, SkipReason), skip
    match = re.search(r"buffer empty, nothing awaiting replication; 1 transaction\(s\) wait to retry, "
                      r"the next due in (\d+) s$", skip.skip_message)
    assert match and 60 <= int(match.group(1)) <= 120, skip.skip_message

def _sensor(instance, resource):
    return buffer_sensor(build_sensor_context(instance=instance, resources={"obs_pipeline": resource}))


def test_the_pause_after_failed_runs_doubles_with_each_in_a_row(settings, resource, redis_client):
    """A cause that stays (OBS_MAIN_DB_URL missing from the daemon's environment, Redis full all
    night) failed a run, and the sensor launched the next 60 s later, and so on: about 1,400 red
    runs a day, more than prune_run_history deletes where main is far. The pause doubles with
    each failed run in a row, up to 300 s; a run whose worker was gone, or a run that succeeded
    (one launched by hand, without the site tag, once the cause was fixed), ends the streak."""
    redis_client.lpush(SiteKeys(settings.site).buffer, seed_example_json(settings.site)[0])

    def failed(**tags):
        run = instance.create_run_for_job(drain_buffer, tags={SITE_TAG: settings.site, **tags},
                                          status=DagsterRunStatus.STARTED)
        instance.report_run_failed(run)
        return run

    def next_in(run) -> int:
        skip = _sensor(instance, resource)
        assert isinstance(skip, SkipReason), skip
        match = re.search(rf"drain run {run.run_id} failed(, the last \d+ drain runs in a row)?; the next in (\d+) s",
                          skip.skip_message)
        assert match, skip.skip_message
        return int(match.group(2))

    with instance_for_test() as instance:
        waits = [next_in(failed()) for _ in range(6)]
        for wait, expected in zip(waits, [60, 120, 240, 300, 300, 300]):
            assert expected - 3 <= wait <= expected, waits
        assert "the last 6 drain runs in a row" in _sensor(instance, resource).skip_message

        gone = instance.create_run_for_job(drain_buffer, tags={SITE_TAG: settings.site}, status=DagsterRunStatus.STARTED)
        instance.add_run_tags(gone.run_id, {sensors.WORKER_GONE_TAG: gone.run_id})
        instance.report_run_failed(gone)
        assert isinstance(_sensor(instance, resource), RunRequest)  # no cause of its own
        assert 57 <= next_in(failed()) <= 60  # a streak of one again

        failed()
        time.sleep(1.1)  # (this instance's storage keeps creation times to the second)
        instance.create_run_for_job(drain_buffer, status=DagsterRunStatus.SUCCESS)  # by hand: no site tag
        assert isinstance(_sensor(instance, resource), RunRequest)


def test_a_run_by_hand_that_succeeded_between_failed_runs_ends_their_streak(settings, resource, redis_client):
    """A run launched by hand (no site tag) that succeeds ends the streak of failed runs. The
    sensor counted only its own runs: after three failed runs, one by hand that succeeded (the
    cause fixed), and then one more failed run of the sensor's (another cause), it waited 300 s,
    saying "the last 4 drain runs in a row" had failed; one had, since the success: 60 s."""
    redis_client.lpush(SiteKeys(settings.site).buffer, seed_example_json(settings.site)[0])

    def failed():
        run = instance.create_run_for_job(drain_buffer, tags={SITE_TAG: settings.site},
                                          status=DagsterRunStatus.STARTED)
        instance.report_run_failed(run)
        return run

    with instance_for_test() as instance:
        for _ in range(3):
            failed()
        time.sleep(1.1)  # (this instance's storage keeps creation times to the second)
        instance.create_run_for_job(drain_buffer, status=DagsterRunStatus.SUCCESS)  # by hand: no site tag
        time.sleep(1.1)
        run = failed()
        skip = _sensor(instance, resource)
    assert isinstance(skip, SkipReason), skip
    match = re.search(rf"drain run {run.run_id} failed; the next in (\d+) s", skip.skip_message)
    assert match and 57 <= int(match.group(1)) <= 60, skip.skip_message


@pytest.mark.slow
def test_with_the_replica_down_a_run_ends_saying_so_and_the_sensor_waits_for_it(
        stack, settings, resource, redis_client, main_engine, replica_engine):
    """A run polled a replica that was down for its whole budget (300 s), then the sensor
    launched the next one, for as long as the replica stayed down. It ends now once the replica
    has replayed nothing for replication_timeout_s, with a warning saying why, and the sensor
    launches no run until the replica has replayed what waits for it."""
    raw, tx, ids = seed_example_json(settings.site)
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, raw)
    config = {"ops": {"drain_batches": {"config": {"idle_exit_s": 0, "replication_timeout_s": 2, "budget_s": 60}}}}
    stack.stop_service("replica")
    try:
        with instance_for_test() as instance:
            began = time.monotonic()
            result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=config,
                                                     instance=instance)
            assert result.success and time.monotonic() - began < 30
            drained = result.output_for_node("drain_batches")
            assert drained["applied"] == 1 and "1 chunk(s) of committed transactions still await the replica" in \
                drained["stopped_because"]
            [warning] = [e.user_message for e in instance.all_logs(result.run_id)
                         if e.level == logging.WARNING and "drained" in (e.user_message or "")]
            assert "which replayed nothing for" in warning
            skip = _sensor(instance, resource)
            assert isinstance(skip, SkipReason), skip
            assert "1 committed batch(es) await the replica, which does not answer" in skip.skip_message
    finally:
        stack.start_service("replica")
    assert json.loads(redis_client.get(keys.transaction(tx["transaction_id"])))["status"] == "applied"
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit WHERE id = :i"),
                            {"i": ids["uuid-1"]}).scalar_one() == 1
    wait_for_replica(main_engine, replica_engine)
    with instance_for_test() as instance:
        assert isinstance(_sensor(instance, resource), RunRequest)  # replayed now: a run cleans
        assert drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=config,
                                               instance=instance).success
    assert json.loads(redis_client.get(keys.transaction(tx["transaction_id"])))["status"] == "replicated"
    assert not redis_client.exists(keys.awaiting_replication)


@pytest.mark.parametrize("field, value, named", [
    ("site", "a:b", "site name 'a:b' holds ':'"),
    ("redis_url", "redis://127.0.0.1:6379/abc", "OBS_REDIS_URL='redis://127.0.0.1:6379/abc' names the database 'abc'"),
])
def test_a_bad_site_or_redis_url_fails_the_tick_in_one_line(settings, redis_client, field, value, named):
    """A bad OBS_SITE or OBS_REDIS_URL (here the resource's own fields) fails the tick as Redis
    down does (the README's sensor section): one line naming the setting, no chained error,
    nothing in Redis touched."""
    redis_client.lpush(SiteKeys(settings.site).buffer, seed_example_json(settings.site)[0])
    before = sorted(redis_client.keys("*"))
    bad = ObsPipelineResource(**{"site": settings.site, "redis_url": settings.redis_url,
                                 "main_db_url": settings.main_db_url, "replica_db_url": settings.replica_db_url,
                                 field: value})
    with instance_for_test() as instance, pytest.raises(Exception) as tick:
        _sensor(instance, bad)
    assert named in str(tick.value) and len(str(tick.value).splitlines()) == 1, tick.value
    assert tick.value.__cause__ is None and tick.value.__suppress_context__ or tick.value.__context__ is None
    assert sorted(redis_client.keys("*")) == before


def test_the_sensor_waits_for_a_replica_that_lags_behind_what_waits_for_it(settings, resource, redis_client,
                                                                          replica_engine):
    """The replica answers but has not replayed the oldest committed batch (replay paused): a
    run could only wait for it, so the sensor says where the replica is and launches none."""
    redis_client.lpush(SiteKeys(settings.site).buffer, seed_example_json(settings.site)[0])
    config = {"ops": {"drain_batches": {"config": {"idle_exit_s": 0, "replication_timeout_s": 0.5,
                                                   "budget_s": 30}}}}
    with replay_paused(replica_engine), instance_for_test() as instance:
        drained = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=config,
                                                  instance=instance)
        assert drained.output_for_node("drain_batches")["replica_stalled"]
        skip = _sensor(instance, resource)
        assert isinstance(skip, SkipReason), skip
        assert "1 committed batch(es) await the replica, which has replayed up to " in skip.skip_message
    deadline = time.monotonic() + 30
    with instance_for_test() as instance:
        while not isinstance(_sensor(instance, resource), RunRequest):
            assert time.monotonic() < deadline, "the sensor launched no run after the replica replayed"
            time.sleep(0.1)


def test_a_drain_outside_dagster_holding_the_lease_gets_no_run_beside_it(settings, resource, redis_client):
    """`obs-pipeline drain` running beside Dagster holds the site's lease: the sensor launched a
    run at every tick with work, which waited out the lease (60 s), ended green with an info
    line, and was followed by the next, for as long as that drain ran."""
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, seed_example_json(settings.site)[0])
    store = BufferStore(redis_client, settings.site)
    token = store.acquire_lease(30)
    with instance_for_test() as instance:
        skip = _sensor(instance, resource)
        assert isinstance(skip, SkipReason)
        assert "the drain lease is held outside this Dagster's runs" in skip.skip_message
        # a run launched by hand all the same waits for the lease, then warns that it drained nothing
        result = drain_buffer.execute_in_process(
            resources={"obs_pipeline": resource}, instance=instance,
            run_config={"ops": {"drain_batches": {"config": {"idle_exit_s": 0, "lease_ttl_s": 0.5}}}})
        assert result.success and result.output_for_node("drain_batches")["applied"] == 0
        warnings = [e.user_message for e in instance.all_logs(result.run_id) if e.level == logging.WARNING]
        assert any(w.startswith("nothing drained: another drain holds the lease") for w in warnings), warnings
        # when the holder's lease (30 s) expires, not when this run's own would (it said 0 s)
        assert any(re.search(r"; it expires in (2\d|30) s unless that drain renews it: let it drain the site", w) for w in warnings), warnings
        store.release_lease(token)
        assert isinstance(_sensor(instance, resource), RunRequest)
    assert redis_client.llen(keys.buffer) == 1


def test_a_run_being_canceled_that_holds_the_lease_is_named_by_the_sensor(settings, resource, redis_client):
    """A terminated run keeps the lease until main answers the batch it has in flight (a row
    lock can hold that for minutes): every tick meanwhile said the lease was "held outside this
    Dagster's runs in flight (`obs-pipeline drain`, or a run that died)", sending the operator
    after a drain that does not exist. It names the run being canceled now."""
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, seed_example_json(settings.site)[0])
    store = BufferStore(redis_client, settings.site)
    with instance_for_test() as instance:
        run = instance.create_run_for_job(drain_buffer, tags={SITE_TAG: settings.site}, status=DagsterRunStatus.STARTED)
        token = store.acquire_lease(30)  # its drain's, letting main finish
        instance.report_run_canceling(run)
        skip = _sensor(instance, resource)
        assert isinstance(skip, SkipReason)
        assert skip.skip_message.startswith(f"site {settings.site}: drain run {run.run_id} is being canceled and holds "
                                            "the drain lease until main answers the batch it has in flight"), skip
        store.release_lease(token)
        instance.report_run_canceled(run)
        assert isinstance(_sensor(instance, resource), RunRequest)  # it let go: the next starts at once
    assert redis_client.llen(keys.buffer) == 1


def _sensor_clock(monkeypatch) -> list[float]:
    """The sensor's clock (time.time in sensors), moved by hand for the ticks that must find a
    run alive: how long it has been quiet is then what the test says, not that plus however long
    a busy machine took over the ticks (a limit of 1 s here; a tick took up to 0.3 s on a loaded
    2-core machine). Set back to the real one (`monkeypatch.setattr(sensors, "time", time)`)
    before a tick that fails a run: the pause after it counts from its end, on the real clock."""
    import types

    clock = [time.time()]
    fake = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    fake.time = lambda: clock[0]
    monkeypatch.setattr(sensors, "time", fake)
    return clock


@pytest.mark.parametrize("run_retries", [False, True])
def test_a_started_run_whose_worker_is_gone_is_failed_and_draining_resumes(settings, resource, redis_client,
                                                                           monkeypatch, run_retries):
    """A run whose worker died with its host (a reboot, the daemon's process group killed)
    stayed STARTED: the sensor skipped it as in flight, and the queue's per-site limit held any
    new run, until monitoring's max runtime (900 s). With the drain lease free and the run quiet
    for DEAD_RUN_QUIET_S, the sensor now marks it failed; run retries or the sensor relaunch."""
    monkeypatch.setattr(sensors, "DEAD_RUN_QUIET_S", 1.0)
    redis_client.lpush(SiteKeys(settings.site).buffer, seed_example_json(settings.site)[0])
    store = BufferStore(redis_client, settings.site)
    with instance_for_test(overrides={"run_retries": {"enabled": run_retries, "max_retries": 3}}) as instance:
        run = instance.create_run_for_job(drain_buffer, tags={SITE_TAG: settings.site}, status=DagsterRunStatus.STARTED)
        clock = _sensor_clock(monkeypatch)
        skip = _sensor(instance, resource)  # just started: alive
        assert isinstance(skip, SkipReason) and "in flight" in skip.skip_message
        token = store.acquire_lease(30)
        clock[0] += 1.5
        skip = _sensor(instance, resource)  # quiet, but holding the lease: alive (draining a long batch)
        assert isinstance(skip, SkipReason) and "in flight" in skip.skip_message
        store.release_lease(token)
        instance.report_engine_event("still here", run)
        clock[0] = time.time()
        skip = _sensor(instance, resource)  # the lease between op retries, but it logs: alive
        assert isinstance(skip, SkipReason) and "in flight" in skip.skip_message
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED

        monkeypatch.setattr(sensors, "time", time)
        time.sleep(1.5)  # lease free and quiet: its worker is gone
        decision = _sensor(instance, resource)
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
        [failure] = [e.dagster_event.message for e in instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_FAILURE)]
        assert "its worker is gone" in failure
        if run_retries:  # the instance relaunches it, not the sensor beside it
            assert isinstance(decision, SkipReason) and "run retries relaunch it" in decision.skip_message
        else:  # no failed-run pause: the run failed on no cause of its own
            assert isinstance(decision, RunRequest) and decision.tags[SITE_TAG] == settings.site
            assert isinstance(_sensor(instance, resource), RunRequest)
            # its retry inherits its tags; when that fails on a cause of its own, the pause holds
            retry = instance.create_run_for_job(drain_buffer, tags=instance.get_run_by_id(run.run_id).tags,
                                                status=DagsterRunStatus.STARTED)
            instance.report_run_failed(retry)
            skip = _sensor(instance, resource)
            assert isinstance(skip, SkipReason) and f"{retry.run_id} failed; the next in" in skip.skip_message


def test_a_run_waiting_for_a_dead_workers_longer_lease_is_not_taken_for_dead(settings, resource, redis_client,
                                                                            monkeypatch):
    """A run relaunched behind a dead worker waits quietly for its lease, lease_ttl_s: with one
    beyond DEAD_RUN_QUIET_S in its config, a tick just after the lease expired (the run takes it
    within 0.5 s) marked the live run failed. Its quiet limit is its lease_ttl_s and a margin."""
    monkeypatch.setattr(sensors, "DEAD_RUN_QUIET_S", 1.0)
    monkeypatch.setattr(sensors, "LEASE_WAIT_MARGIN_S", 0.5)
    redis_client.lpush(SiteKeys(settings.site).buffer, seed_example_json(settings.site)[0])
    with instance_for_test() as instance:
        run = instance.create_run_for_job(
            drain_buffer, tags={SITE_TAG: settings.site}, status=DagsterRunStatus.STARTED,
            run_config={"ops": {"drain_batches": {"config": {"lease_ttl_s": 2.5}}}})
        clock = _sensor_clock(monkeypatch)
        clock[0] += 1.5  # quiet beyond DEAD_RUN_QUIET_S, the lease free: still within its lease wait
        skip = _sensor(instance, resource)
        assert isinstance(skip, SkipReason) and "in flight" in skip.skip_message
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED
        monkeypatch.setattr(sensors, "time", time)
        time.sleep(3.5)  # and beyond it (2.5 s + 0.5 s since its creation): gone
        _sensor(instance, resource)
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
        [failure] = [e.dagster_event.message for e in instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_FAILURE)]
        assert "logged nothing for over 3 s" in failure


def test_a_run_waiting_longer_than_its_lease_for_the_replica_is_not_taken_for_dead(settings, resource, redis_client,
                                                                                  replica_engine, monkeypatch):
    """A run whose replication_timeout_s is longer than its lease_ttl_s, its last batch waiting
    for a replica that lags: the lease lapsed mid-wait, and the sensor, finding it free and the
    run quiet past its limit, marked the live run failed (its worker gone) for another to drain
    beside it. The wait renews the lease: the run stays in flight, and drains the batch once."""
    import threading

    monkeypatch.setattr(sensors, "DEAD_RUN_QUIET_S", 1.0)
    monkeypatch.setattr(sensors, "LEASE_WAIT_MARGIN_S", 0.5)  # its quiet limit: 1 s + 0.5 s
    redis_client.lpush(SiteKeys(settings.site).buffer, seed_example_json(settings.site)[0])
    ticks: list = []
    with replay_paused(replica_engine), instance_for_test() as instance:
        # a tick 3 s in: the batch committed, waiting for its replay, the run quiet since it began
        tick = threading.Timer(3.0, lambda: ticks.append(_sensor(instance, resource)))
        tick.start()
        result = drain_buffer.execute_in_process(
            resources={"obs_pipeline": resource}, instance=instance, raise_on_error=False,
            run_config={"ops": {"drain_batches": {"config": {"idle_exit_s": 0, "lease_ttl_s": 1.0,
                                                              "replication_timeout_s": 5.0}}}})
        tick.join()
        assert [e.dagster_event.message for e in instance.all_logs(result.run_id, of_type=DagsterEventType.RUN_FAILURE)
                ] == []
        [decision] = ticks
        assert isinstance(decision, SkipReason) and "in flight" in decision.skip_message, decision
        assert result.success and result.output_for_node("drain_batches")["applied"] == 1
    assert not redis_client.exists(SiteKeys(settings.site).lease)


def _replica_events(result) -> tuple[list, list, list]:
    """The run's materializations and observations of the site replica, and its replica_replays evaluations."""
    materialized = [e for e in result.all_events if e.event_type == DagsterEventType.ASSET_MATERIALIZATION
                    and e.event_specific_data.materialization.asset_key == REPLICA_ASSET]
    observed = [e.event_specific_data.asset_observation for e in result.all_events
                if e.event_type == DagsterEventType.ASSET_OBSERVATION
                and e.event_specific_data.asset_observation.asset_key == REPLICA_ASSET]
    checks = [e.event_specific_data for e in result.all_events if e.event_type == DagsterEventType.ASSET_CHECK_EVALUATION
              and e.event_specific_data.check_name == "replica_replays"]
    return materialized, observed, checks


def test_a_replica_that_replays_nothing_is_not_reported_as_materialized(settings, resource, redis_client,
                                                                        replica_engine):
    """With replay paused the run materialized site_replica all the same (no description, its
    batch awaiting): the UI showed a fresh replica. It is now an observation saying why, and
    the replica_replays check fails; a run once the replica replays materializes it again."""
    redis_client.lpush(SiteKeys(settings.site).buffer, seed_example_json(settings.site)[0])
    config = {"ops": {"drain_batches": {"config": {"idle_exit_s": 0, "replication_timeout_s": 0.5,
                                                   "budget_s": 30}}}}
    with replay_paused(replica_engine), instance_for_test() as instance:
        stalled = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=config,
                                                  instance=instance)
    materialized, observed, [check] = _replica_events(stalled)
    assert not materialized
    assert "1 chunk(s) of committed transactions still await the replica" in observed[0].description
    assert not check.passed and "still await the replica" in check.description
    assert check.metadata["awaiting_replication_batches"].value == 1

    wait_for_replica_to_clean = time.monotonic() + 30
    while True:
        with instance_for_test() as instance:
            cleaned = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=config,
                                                      instance=instance)
        if not cleaned.output_for_node("drain_batches")["replica_stalled"]:
            break
        assert time.monotonic() < wait_for_replica_to_clean, "the replica replayed nothing after its resume"
    materialized, observed, [check] = _replica_events(cleaned)
    assert materialized and not observed and check.passed

    # evaluated on demand: as `status` judges it, a batch unreplayed for long fails it
    assert replica_replays(obs_pipeline=resource).passed
    store = BufferStore(redis_client, settings.site)
    record = {"n": "000000000", "c": [], "o": [], "t": [], "at": time.time() - 600, "lsn": 2**62}
    redis_client.zadd(store.keys.awaiting_replication, {json.dumps(record): 2**62})
    stuck = replica_replays(obs_pipeline=resource)
    # 600 s and the time the check took (601 s after a stall of half a second)
    assert not stuck.passed and re.search(r"has not replayed a batch committed 6[01]\d s ago", stuck.description), \
        stuck.description
    redis_client.zrem(store.keys.awaiting_replication, json.dumps(record))


def test_the_replica_check_fails_where_the_replica_url_names_a_primary(settings, resource, redis_client):
    """OBS_REPLICA_DB_URL naming main, a server not in recovery, gives no replay position: `status`
    calls the site degraded at once, and no batch committed would ever be replayed and cleaned,
    yet the check evaluated on demand passed (until a batch had waited 120 s)."""
    from obs_pipeline.health import health_report

    primary = ObsPipelineResource(**{**resource.__dict__, "replica_db_url": settings.main_db_url})
    main = sa.create_engine(settings.main_db_url)
    try:
        [problem] = health_report(BufferStore(redis_client, settings.site), main, main)["problems"]
    finally:
        main.dispose()
    check = replica_replays(obs_pipeline=primary)
    assert not check.passed and check.description == problem, (check, problem)
    assert replica_replays(obs_pipeline=resource).passed  # the real replica


@pytest.mark.parametrize("replica", ["down", "a primary"])
def test_a_run_with_nothing_awaiting_replay_does_not_report_a_replica_that_does_not_answer_healthy(
        settings, resource, redis_client, replica):
    """A run whose batch main committed none of (dead-lettered whole), nothing awaiting replay,
    never asked the replica: with the replica down (or OBS_REPLICA_DB_URL naming a primary) it
    materialized site_replica and passed replica_replays, where `status` and the check
    evaluated on demand fail at once. It judges the replica as they do now."""
    from obs_pipeline.dagster_defs import jobs
    from obs_pipeline.stack.osutil import pick_free_ports

    url = (sa.engine.make_url(settings.replica_db_url).set(port=pick_free_ports(1)[0]).render_as_string(
        hide_password=False) if replica == "down" else settings.main_db_url)
    bad = ObsPipelineResource(**{**resource.__dict__, "replica_db_url": url})
    poison, _ = seed_example(settings.site, obs_unit_id=4242)  # no such obs unit: main refuses it
    poison["max_retries"] = 0
    redis_client.lpush(SiteKeys(settings.site).buffer, json.dumps(poison))
    result = drain_buffer.execute_in_process(resources={"obs_pipeline": bad},
                                             run_config={"ops": {"drain_batches": {"config": {"idle_exit_s": 0}}}})
    assert result.output_for_node("drain_batches")["dead_lettered"] == 1
    assert redis_client.zcard(SiteKeys(settings.site).awaiting_replication) == 0
    on_demand = replica_replays(obs_pipeline=bad)
    assert not on_demand.passed
    materialized, observed, [check] = _replica_events(result)
    assert not check.passed and not materialized, check
    assert check.description == observed[0].description == jobs.REPLICA_SILENT, check


def test_a_dead_run_that_run_retries_relaunch_gets_no_second_run_from_the_next_tick(settings, resource, redis_client,
                                                                                    monkeypatch):
    """The tick that marked a dead run failed skipped for the run retries, but the next tick
    (a second later; their daemon looks every 5 s) launched a run of its own: two runs queued
    for the site, one after the other. Until the retry exists, or the pause is over, it skips."""
    monkeypatch.setattr(sensors, "DEAD_RUN_QUIET_S", 1.0)
    redis_client.lpush(SiteKeys(settings.site).buffer, seed_example_json(settings.site)[0])
    with instance_for_test(overrides={"run_retries": {"enabled": True, "max_retries": 3}}) as instance:
        run = instance.create_run_for_job(drain_buffer, tags={SITE_TAG: settings.site}, status=DagsterRunStatus.STARTED)
        time.sleep(1.5)  # lease free and quiet: its worker is gone
        skip = _sensor(instance, resource)
        assert isinstance(skip, SkipReason) and "run retries relaunch it" in skip.skip_message
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
        skip = _sensor(instance, resource)  # the next tick, before the retry daemon's
        assert isinstance(skip, SkipReason) and "run retries relaunch it" in skip.skip_message, skip
        # the retry daemon relaunches it: in flight
        retry = instance.create_run_for_job(drain_buffer, tags=instance.get_run_by_id(run.run_id).tags,
                                            status=DagsterRunStatus.STARTED)
        instance.add_run_tags(run.run_id, {"dagster/auto_retry_run_id": retry.run_id})
        skip = _sensor(instance, resource)
        assert isinstance(skip, SkipReason) and f"{retry.run_id} is in flight" in skip.skip_message
        # it fails too, and run retries give up (will_retry false): no retry to wait for, only
        # the failed-run pause, then the sensor launches one
        instance.report_run_failed(retry)
        instance.add_run_tags(retry.run_id, {"dagster/will_retry": "false"})
        skip = _sensor(instance, resource)
        assert isinstance(skip, SkipReason) and f"drain run {retry.run_id} failed; the next in" in skip.skip_message, skip
        monkeypatch.setattr(sensors, "FAILED_RUN_PAUSE_S", 0.0)
        assert isinstance(_sensor(instance, resource), RunRequest)
        # run retries said they would relaunch it but have not within the pause: the sensor does
        instance.add_run_tags(retry.run_id, {"dagster/will_retry": "true"})
        assert isinstance(_sensor(instance, resource), RunRequest)
        monkeypatch.setattr(sensors, "FAILED_RUN_PAUSE_S", 60.0)  # within it, it waits for them
        skip = _sensor(instance, resource)
        assert isinstance(skip, SkipReason) and f"drain run {retry.run_id} failed, and run retries relaunch it" \
            in skip.skip_message, skip



def test_a_run_that_spent_its_budget_while_the_replica_replays_nothing_fails_the_check(
        settings, resource, redis_client, main_engine, replica_engine, monkeypatch):
    """Under steady work a run ends by its budget and never idles, so it never saw the replica
    replay nothing: each such run materialized site_replica and passed replica_replays while
    `status` called the replica stuck. It now judges as `status` does (a committed batch not
    replayed for REPLICA_STUCK_AFTER_S, here 0 s)."""
    from obs_pipeline.dagster_defs import jobs

    monkeypatch.setattr(jobs, "REPLICA_STUCK_AFTER_S", 0.0)  # any batch not replayed by the end
    redis_client.lpush(SiteKeys(settings.site).buffer, seed_example_json(settings.site)[0])
    config = {"ops": {"drain_batches": {"config": {"idle_exit_s": 0, "replication_timeout_s": 5, "budget_s": 2.5}}}}
    with replay_paused(replica_engine), instance_for_test() as instance:
        result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=config,
                                                 instance=instance)
        # the run's line, as README quotes it (a warning: the replica has not replayed the batch)
        lines = [e.user_message for e in instance.all_logs(result.run_id) if e.user_message.startswith("drained ")]
        assert lines == ["drained 1 transactions in 1 batches (time budget spent)"], lines
    assert result.output_for_node("drain_batches")["stopped_because"] == "time budget spent"
    materialized, observed, [check] = _replica_events(result)
    assert not materialized and not check.passed
    assert re.fullmatch(r"the replica has not replayed a batch committed \d+ s ago", check.description), check.description
    assert observed[0].description == check.description
    wait_for_replica(main_engine, replica_engine)  # replaying again: the next run finds it healthy
    healthy = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=config)
    materialized, observed, [check] = _replica_events(healthy)
    assert materialized and not observed and check.passed

def test_a_replica_of_another_cluster_is_called_stuck_though_its_position_is_past_the_batch(
        settings, resource, redis_client, main_engine, replica_engine, monkeypatch):
    """report_replication judged a batch stuck by the replica's replay position alone, with
    no look at whose WAL it replays: a standby of another cluster (or on another timeline)
    past the batch's commit LSN passed replica_replays, while `status` and the run's own
    awaiting_replication_batches count said it replays none of it. Here the acknowledgement's
    recorded cluster is made another's after the replica replayed the batch (its caches not
    yet cleaned); the report runs after an op that answers as a run that spent its budget."""
    from dagster import job, op
    from obs_pipeline.buffer_store import MAIN_CLUSTER_FIELD
    from obs_pipeline.dagster_defs import jobs

    monkeypatch.setattr(jobs, "REPLICA_STUCK_AFTER_S", 0.0)
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, seed_example_json(settings.site)[0])
    config = {"ops": {"drain_batches": {"config": {"idle_exit_s": 0, "replication_timeout_s": 5, "budget_s": 2.5}}}}
    with replay_paused(replica_engine):
        drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=config)
    wait_for_replica(main_engine, replica_engine)
    assert redis_client.zcard(keys.awaiting_replication) == 1

    @op
    def spent_its_budget() -> dict:
        return {"stopped_because": "time budget spent", "applied": 1}

    @job
    def report_only():
        jobs.report_replication(spent_its_budget())

    def report() -> tuple[list, list]:
        materialized, _, checks = _replica_events(report_only.execute_in_process(resources={"obs_pipeline": resource}))
        return checks, materialized
    [check], materialized = report()  # the replica replayed the batch: only its cleanup waits
    assert check.passed and materialized
    real = redis_client.hget(keys.stats, MAIN_CLUSTER_FIELD)
    redis_client.hset(keys.stats, MAIN_CLUSTER_FIELD, int(real) + 1)
    [check], materialized = report()
    assert not check.passed and not materialized, check
    assert re.fullmatch(r"the replica has not replayed a batch committed \d+ s ago", check.description), check
    assert check.metadata["awaiting_replication_batches"].value == 1


def test_a_run_that_never_had_the_lease_does_not_report_the_replica_healthy(settings, resource, redis_client,
                                                                           replica_engine):
    """A run that waited for the lease in vain drained nothing and never asked the replica, yet
    materialized site_replica and passed replica_replays: a replica that a run before had found
    replaying nothing showed fresh and healthy. It is an observation now, and the check keeps
    its last evaluation."""
    redis_client.lpush(SiteKeys(settings.site).buffer, seed_example_json(settings.site)[0])
    config = {"ops": {"drain_batches": {"config": {"idle_exit_s": 0, "replication_timeout_s": 0.5,
                                                   "budget_s": 30, "lease_ttl_s": 0.5}}}}
    store = BufferStore(redis_client, settings.site)
    with replay_paused(replica_engine), instance_for_test() as instance:
        stalled = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=config,
                                                  instance=instance)
        [check] = _replica_events(stalled)[2]
        assert not check.passed
        token = store.acquire_lease(30)
        try:
            busy = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=config,
                                                   instance=instance)
        finally:
            store.release_lease(token)
        assert busy.output_for_node("drain_batches")["stopped_because"] == "another drain holds the lease"
        materialized, observed, checks = _replica_events(busy)
        assert not materialized and not checks
        assert observed[0].description == "another drain holds the lease"
        [record] = instance.event_log_storage.get_asset_check_execution_history(replica_replays.check_key, limit=1)
        assert record.run_id == stalled.run_id and record.status.value == "FAILED"  # what the UI shows


def test_a_run_counts_the_chunks_awaiting_replay_as_status_does(settings, resource, redis_client, main_engine,
                                                              replica_engine):
    """`awaiting_replication_batches` on a run's report of site_replica counts what `status`
    counts as `chunks awaiting replay` (the README says they count the same): a chunk the
    replica has replayed, waiting only for a drain to clean its caches, is not one. It counted
    every chunk waiting: 1 beside status's 0, here on a run that found the lease held."""
    from obs_pipeline.health import health_report

    redis_client.lpush(SiteKeys(settings.site).buffer, seed_example_json(settings.site)[0])
    config = {"ops": {"drain_batches": {"config": {"idle_exit_s": 0, "replication_timeout_s": 0.5,
                                                   "budget_s": 30, "lease_ttl_s": 0.5}}}}
    store = BufferStore(redis_client, settings.site)
    with replay_paused(replica_engine), instance_for_test() as instance:
        drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=config, instance=instance)
    wait_for_replica(main_engine, replica_engine)  # replayed now; its caches wait for the next drain
    assert health_report(store, main_engine, replica_engine)["replication_lag"]["awaiting_batches"] == 0
    token = store.acquire_lease(30)
    try:
        with instance_for_test() as instance:
            busy = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=config,
                                                   instance=instance)
    finally:
        store.release_lease(token)
    [observed] = _replica_events(busy)[1]
    assert observed.metadata["awaiting_replication_batches"].value == 0


def test_a_run_that_lost_the_lease_mid_run_warns_and_does_not_report_the_replica(settings, resource, redis_client,
                                                                                 main_engine, monkeypatch):
    """Another drain took the lease while main applied the run's batch: the run said so only at
    INFO ("drained 0 transactions in 0 batches (another drain took the lease)"), the drain's own
    warning going to no Dagster log, and materialized site_replica and passed replica_replays as
    if it had drained the site. It warns now, naming what happened, and reports the replica as a
    run that never had the lease does; the batch is left to the drain that took it, applied once."""
    from obs_pipeline.apply import MainDatabase
    from obs_pipeline.ingest import TransactionBuffer
    from obs_pipeline_tests.workload import assert_applied_exactly_once, buffer_observations

    keys = SiteKeys(settings.site)
    real = MainDatabase.apply_batch

    def another_drain_takes_the_lease(self, txs, *args, **kwargs):
        redis_client.set(keys.lease, "another-drain", px=60_000)
        time.sleep(1.5)  # past a lease renewal (every lease_ttl_s / 3)
        return real(self, txs, *args, **kwargs)

    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 3, finish_every=0)
    buf.close()
    monkeypatch.setattr(MainDatabase, "apply_batch", another_drain_takes_the_lease)
    config = {"ops": {"drain_batches": {"config": {"idle_exit_s": 0, "lease_ttl_s": 1.5, "budget_s": 30}}}}
    with instance_for_test() as instance:
        result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=config,
                                                 instance=instance)
        assert result.success
        drained = result.output_for_node("drain_batches")
        assert drained["stopped_because"] == "another drain took the lease", drained
        warnings = [e.user_message for e in instance.all_logs(result.run_id)
                    if e.level == logging.WARNING and e.user_message.startswith("drained ")]
        assert warnings == [
            f"drained 0 transactions in 0 batches, then stopped: another drain took the lease (the drain lease of "
            f"site {settings.site} was taken while main applied a batch); that drain works the site now and takes "
            "back what this run had not acknowledged (`obs-pipeline drain` beside Dagster, or this run paused "
            "longer than its lease_ttl_s and taken for dead)"], warnings
    materialized, observed, checks = _replica_events(result)
    assert not materialized and not checks
    assert observed[0].description == "another drain took the lease"
    assert redis_client.get(keys.lease) == b"another-drain" and redis_client.llen(keys.processing) == 3

    redis_client.delete(keys.lease)  # that drain is gone: the next run takes the batch back
    monkeypatch.setattr(MainDatabase, "apply_batch", real)
    assert drain_buffer.execute_in_process(resources={"obs_pipeline": resource},
                                           run_config={"ops": {"drain_batches": {"config": {"idle_exit_s": 0}}}}).success
    assert_applied_exactly_once(main_engine, observations)
