"""Operators' view in Dagster: dead letters as events and a failing check, the retry job,
main outages as op retries, pruning of applied-id records, and of Dagster's own history."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from dagster import (
    AssetObservation,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    Failure,
    FilesystemIOManager,
    RunRequest,
    instance_for_test,
    job,
    op,
)
from dagster._core.definitions.run_request import InstigatorType
from dagster._core.remote_origin import InProcessCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

from obs_pipeline.buffer_store import BufferStore
from obs_pipeline.dagster_defs import operations
from obs_pipeline.dagster_defs.jobs import MAIN_ASSET, drain_buffer
from obs_pipeline.dagster_defs.operations import (
    discard_dead_letters,
    no_dead_letters,
    prune_applied_transactions,
    prune_run_history,
    retry_dead_letters,
)
from obs_pipeline.dagster_defs.resources import ObsPipelineResource
from obs_pipeline.dev import DAGSTER_YAML, dagster_environment
from obs_pipeline.drain import Drain, DrainConfig
from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline.keys import SiteKeys
from obs_pipeline_tests.examples import seed_example
# (imported inside a test, deep in its stack, Python 3.11's compiler failed on test_cli.py: "AST
# constructor recursion depth mismatch")
from obs_pipeline_tests.test_cli import dead_poison_and_its_dependent
from obs_pipeline_tests.test_reliability import (cli_env, copy_blocked_behind_a_dead_update, due_now,
                                                 replicated_observation)
from obs_pipeline_tests.workload import drain_until_settled

pytestmark = pytest.mark.usefixtures("clean_db")
FAST = {"ops": {"drain_batches": {"config": {"idle_exit_s": 0, "retry_base_s": 0.05,
                                             "transient_retry_wait_s": 0.5}}}}


@pytest.fixture
def resource(settings) -> ObsPipelineResource:
    return ObsPipelineResource(site=settings.site, redis_url=settings.redis_url, main_db_url=settings.main_db_url,
                               replica_db_url=settings.replica_db_url)


def test_dead_letter_is_an_event_fails_the_check_and_the_retry_job_requeues_it(
        settings, resource, redis_client, main_engine):
    doc, ids = seed_example(settings.site, obs_unit_id=4242)  # no such obs unit on main yet
    doc["max_retries"] = 0
    redis_client.lpush(SiteKeys(settings.site).buffer, json.dumps(doc))

    result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST)
    assert result.success
    observations = [e.event_specific_data.asset_observation for e in result.all_events
                    if e.event_type == DagsterEventType.ASSET_OBSERVATION]
    assert isinstance(observations[0], AssetObservation)
    assert observations[0].metadata["dead_lettered"].value == 1
    listed = observations[0].metadata["dead_letters"].value
    assert listed.startswith(doc["transaction_id"] + ": ") and "ForeignKeyViolation" in listed
    assert not no_dead_letters(obs_pipeline=resource).passed

    with main_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (4242, 'fixed')"))
    assert retry_dead_letters.execute_in_process(
        resources={"obs_pipeline": resource},
        run_config={"ops": {"requeue_dead_letters": {"config": {"all": True}}}}).success
    assert drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST).success
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM raw_data_file WHERE raw_data_package_id = :p"),
                            {"p": ids["uuid-2"]}).scalar_one() == 2
    assert no_dead_letters(obs_pipeline=resource).passed


def test_a_batch_main_applied_nothing_of_is_an_observation_and_the_run_still_counts_it(
        settings, resource, redis_client, monkeypatch):
    """A batch whose every transaction main refused (dead-lettered) was a materialization of
    main_database, "0 applied, 0 replicated": the UI said main's data changed. It is one
    observation, saying what became of them, and an op retry after it (main unreachable)
    still counts it in the run's summary, as every batch is counted."""
    from obs_pipeline.apply import MainDatabase, TransientError

    keys = SiteKeys(settings.site)
    poison, _ = seed_example(settings.site, obs_unit_id=4242)  # no such obs unit: main refuses it
    poison["max_retries"] = 0
    good, _ = seed_example(settings.site)
    for doc in (poison, good):  # (claimed oldest first)
        redis_client.lpush(keys.buffer, json.dumps(doc))
    apply_batch, cut = MainDatabase.apply_batch, []

    def main_unreachable_once_at_the_good_one(self, transactions, *args, **kwargs):
        if not cut and any(t.transaction_id == good["transaction_id"] for t in transactions):
            cut.append(True)
            raise TransientError("server closed the connection unexpectedly")
        return apply_batch(self, transactions, *args, **kwargs)

    monkeypatch.setattr(MainDatabase, "apply_batch", main_unreachable_once_at_the_good_one)
    with DagsterInstance.ephemeral() as instance:
        result = drain_buffer.execute_in_process(
            resources={"obs_pipeline": resource}, instance=instance,
            run_config={"ops": {"drain_batches": {"config": {"idle_exit_s": 0, "batch_size": 1, "retry_base_s": 0.05,
                                                             "transient_retry_wait_s": 0.1}}}})
        # (the result's own events are its last attempt's)
        events = [e.dagster_event for e in instance.all_logs(result.run_id)
                  if e.dagster_event and e.step_key == "drain_batches"]
    assert result.success and cut
    materialized = [e.event_specific_data.materialization for e in events
                    if e.event_type == DagsterEventType.ASSET_MATERIALIZATION]
    observed = [e.event_specific_data.asset_observation for e in events
                if e.event_type == DagsterEventType.ASSET_OBSERVATION]
    main = [m for m in materialized if m.asset_key == MAIN_ASSET]
    assert [m.metadata["applied"].value for m in main] == [1], [m.metadata for m in main]
    [nothing] = [o for o in observed if "applied" in o.metadata]  # the dead batch's own event
    assert nothing.asset_key == MAIN_ASSET and nothing.description == "nothing applied: 1 dead-lettered"
    assert (nothing.metadata["applied"].value, nothing.metadata["dead_lettered"].value) == (0, 1)
    assert nothing.metadata["transactions"].value == 1  # the count, as on a materialization
    assert nothing.metadata["dead_letters"].value.startswith(poison["transaction_id"] + ": ")
    drained = result.output_for_node("drain_batches")
    assert (drained["applied"], drained["dead_lettered"], drained["transient_errors"]) == (1, 1, 1), drained
    assert drained["batches"] == len(materialized) + 1, drained  # each batch's one event
    assert redis_client.llen(keys.failed) == 1


def test_the_dead_letter_check_counts_the_list_without_reading_it(settings, resource, redis_client):
    """The check read every letter to count them: a backlog dead-lettered whole (a schema main
    refuses, a million transactions of a long outage) sent Dagster's process gigabytes for two
    figures. It asks Redis for the length and the oldest letter alone."""
    keys = SiteKeys(settings.site)
    for n in range(3):  # the oldest first: each pushed at the head
        redis_client.lpush(keys.failed, json.dumps({"transaction_id": f"dead-{n}",
                                                    "failure": {"reason": f"reason {n}", "kind": "invalid"}}))
    redis_client.config_resetstat()
    result = no_dead_letters(obs_pipeline=resource)
    ranges = redis_client.info("commandstats").get("cmdstat_lrange", {}).get("calls", 0)
    assert (result.passed, result.metadata["failed"].value, result.metadata["first"].value, ranges) == (
        False, 3, "reason 0", 0)


@pytest.mark.slow
def test_main_unreachable_shows_as_op_retries_then_succeeds(stack, settings, resource, redis_client, main_engine):
    doc, ids = seed_example(settings.site)
    redis_client.lpush(SiteKeys(settings.site).buffer, json.dumps(doc))
    stack.stop_service("main")
    restarter = threading.Timer(4.0, lambda: stack.start_service("main"))
    restarter.start()
    try:
        result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST)
    finally:
        restarter.join()
    assert result.success
    retries = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
    assert retries, "the outage should surface as op retries"
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit WHERE id = :i"),
                            {"i": ids["uuid-1"]}).scalar_one() == 1
    assert redis_client.llen(SiteKeys(settings.site).failed) == 0


def _kept_for_the_next_run(redis_client, keys, buf, ids: list[str], resource) -> None:
    """After a run that failed on main (out of reach, or a URL naming what is not main's):
    nothing claimed, lost or dead-lettered, the statuses `pending` (they said "processing" until
    the next run), the lease free; the next run, against main, applies each."""
    assert redis_client.llen(keys.buffer) + redis_client.llen(keys.processing) == len(ids)
    assert redis_client.llen(keys.failed) == 0 and not redis_client.exists(keys.lease)
    assert [buf.status(tx_id) for tx_id in ids] == ["pending"] * len(ids)
    assert drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST).success
    assert [buf.status(tx_id) for tx_id in ids] == ["replicated"] * len(ids)


@pytest.mark.parametrize("budget_s", [300, 1], ids=["within its budget", "past its budget"])
def test_main_unreachable_at_every_op_retry_fails_the_run_in_one_line_and_keeps_the_batch(settings, resource,
                                                                                         redis_client, main_engine,
                                                                                         budget_s):
    """A main the drain cannot reach while Dagster's storage answers (a wrong port in
    OBS_MAIN_DB_URL, a firewall between them) spent the op's 8 retries, and the run failed on
    Dagster's "Exceeded max_retries of 8", naming neither main nor what to check; a retry that
    came after the run's budget (slow connects to a main that drops packets: 10 s each) stopped
    before it tried, and the run ended green, "drained 0 transactions in 0 batches (time budget
    spent)", the sensor launching the next at once. Either way the run fails in one line now; the transactions
    stay buffered, "pending" (not "processing", which said a drain applied them, until the next
    run), and a run against main applies each once."""
    from obs_pipeline.ingest import TransactionBuffer
    from obs_pipeline_tests.workload import assert_applied_exactly_once, buffer_observations

    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 3)
    ids = [tx for o in observations for tx in (o.start_tx, o.finish_tx) if tx]
    unreachable = _with_main_unreachable(resource)
    config = {"ops": {"drain_batches": {"config": {**FAST["ops"]["drain_batches"]["config"], "budget_s": budget_s,
                                                   "transient_retry_wait_s": 0.01 if budget_s > 1 else 0.4}}}}
    try:
        result = drain_buffer.execute_in_process(resources={"obs_pipeline": unreachable}, run_config=config,
                                                 raise_on_error=False)
        assert not result.success
        retries = len([e for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY])
        assert retries == 8 if budget_s > 1 else 0 < retries < 8, retries
        [failure] = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
        message = failure.event_specific_data.error.message
        assert f"site {settings.site}: main unreachable (" in message, message
        closed_port = sa.engine.make_url(unreachable.main_db_url).port
        assert (f"port {closed_port} failed: Connection refused) at each of the run's {retries + 1} attempts; is "
                "OBS_MAIN_DB_URL right and main up? The transactions stay buffered for the next run" in message), message
        assert "\n" not in message.strip()
        _kept_for_the_next_run(redis_client, keys, buf, ids, resource)
    finally:
        buf.close()
    assert_applied_exactly_once(main_engine, observations)


def test_main_unreachable_again_after_the_run_drained_backs_off_afresh_with_all_its_op_retries(
        settings, resource, redis_client, main_engine, tmp_path):
    """A link that drops often: the run rides out one outage (5 op retries), drains once main
    answers, and the link drops again. The run's op retries counted every outage in it: the
    second began at "op retry 6 of 8", its longest waits (main back, the drain still waited up
    to 60 s), and the run failed at its 8th in all, though main had answered between. Counted
    since the run last drained a batch, each outage backs off from the shortest wait with all 8."""
    from obs_pipeline.stack.osutil import pick_free_ports
    from obs_pipeline.stack.proxy_process import start_proxy, stop_proxy

    keys = SiteKeys(settings.site)
    main_url = sa.engine.make_url(resource.main_db_url)
    port, = pick_free_ports(1)
    pidfile, log = tmp_path / "main-proxy.json", tmp_path / "main-proxy.log"
    linked = ObsPipelineResource(**{**resource.__dict__, "main_db_url": main_url.set(port=port).render_as_string(
        hide_password=False)})
    first, second = seed_example(settings.site)[0], seed_example(settings.site)[0]
    redis_client.lpush(keys.buffer, json.dumps(first))
    config = {"ops": {"drain_batches": {"config": {**FAST["ops"]["drain_batches"]["config"], "idle_exit_s": 10,
                                                   "transient_retry_wait_s": 0.05}}}}
    with instance_for_test() as instance:
        def outages(run_id: str) -> list[str]:  # main's op-retry observations, in order
            return [e.dagster_event.event_specific_data.asset_observation.description
                    for e in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_OBSERVATION)
                    if "main unreachable" in (e.dagster_event.event_specific_data.asset_observation.description
                                              or "")]

        def link() -> None:  # down for 5 op retries, up until the first is applied, down for 5 more
            deadline = time.monotonic() + 60
            for retries in (5, 10):
                while time.monotonic() < deadline:
                    runs = instance.get_runs()
                    if runs and (len(outages(runs[0].run_id)) >= retries or runs[0].is_finished):
                        break
                    time.sleep(0.01)
                start_proxy(port, main_url.port, 0, pidfile, log)
                if retries == 5:
                    while time.monotonic() < deadline and buf.status(first["transaction_id"]) != "replicated":
                        time.sleep(0.01)
                    stop_proxy(pidfile)
                    redis_client.lpush(keys.buffer, json.dumps(second))

        buf = TransactionBuffer(settings=settings)
        try:
            result = _beside(link, lambda: drain_buffer.execute_in_process(
                resources={"obs_pipeline": linked}, instance=instance, run_config=config, raise_on_error=False))
        finally:
            stop_proxy(pidfile)
            buf.close()
        said = outages(result.run_id)
    assert result.success, said
    numbers = [int(re.search(r": op retry (\d) of 8 in [0-9.]+ s$", line).group(1)) for line in said]
    again = numbers.index(1, 1)  # the second outage's first: from the shortest wait
    assert numbers == [*range(1, again + 1), *range(1, len(numbers) - again + 1)], said
    assert again >= 5 and len(numbers) - again >= 5, said  # 10 or more in all, past the 8 of one outage
    assert said[again].endswith("op retry 1 of 8 in 0.05 s"), said
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit WHERE id IN (:a, :b)"), {
            "a": first["steps"][0]["data"]["id"], "b": second["steps"][0]["data"]["id"]}).scalar_one() == 2
    assert redis_client.llen(keys.failed) == 0
    assert redis_client.llen(keys.buffer) + redis_client.llen(keys.processing) == 0


def test_a_run_that_lost_redis_takes_back_its_own_lease_when_redis_is_back(stack, settings, resource, redis_client,
                                                                           main_engine):
    """The site's Redis restarted while a run drained: the attempt that met it could not release
    the lease (Redis down), which Redis's AOF kept, and the run's next attempt waited it out,
    its whole TTL (60 s by default; a drill by hand: 66 s undrained after Redis was back). The
    run's own lease, left by an attempt that has ended, is taken back at once; another drain's
    still fences it (the tests of the lease, and of two drains, stand)."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    config = {"ops": {"drain_batches": {"config": {**FAST["ops"]["drain_batches"]["config"], "idle_exit_s": 8,
                                                   "lease_ttl_s": 120}}}}
    said: dict[str, object] = {}

    def start(unit: int) -> str:
        with buf.transaction(endpoint="start_observation") as tx:
            tx.create("ExecutedObsUnit", {"obs_unit_id": unit, "start_time": "2025-01-01T00:00:00Z", "status": "running"})
        return tx.transaction_id

    def redis_restarted() -> None:
        before = start(1)
        said["before"] = buf.wait(before, "replicated", timeout=60)
        said["lease held"] = bool(redis_client.exists(keys.lease))
        stack.stop_service("redis")  # (a clean stop: the lease is in its AOF, with its expiry)
        try:
            time.sleep(1)
        finally:
            stack.start_service("redis")
        after, began = start(2), time.monotonic()
        said["after"] = buf.wait(after, "replicated", timeout=45)  # the lease's TTL is 120 s
        said["took"] = time.monotonic() - began

    try:
        result = _beside(redis_restarted, lambda: drain_buffer.execute_in_process(
            resources={"obs_pipeline": resource}, run_config=config, raise_on_error=False))
    finally:
        buf.close()
    assert said["before"] and said["lease held"], said
    assert said["after"], said
    assert result.success
    assert [e for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY], "Redis was lost"
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit")).scalar_one() == 2
    assert not redis_client.exists(keys.lease, keys.processing)


def test_after_a_run_failed_on_main_out_of_reach_the_next_starts_as_soon_as_main_answers(settings, resource,
                                                                                         redis_client, main_engine):
    """The pause after failed runs (60 s, doubling up to 300 s) is for causes that stay (a setting
    missing, Redis full all night); a run that failed because main was out of reach was followed
    only after it too, so after a long outage main's backlog waited up to 5 minutes more once
    the link was back. The run says why it failed (a tag); while main does not answer the sensor
    keeps the pause, saying it looks at each tick, and once main answers it launches the next."""
    from dagster import SkipReason, build_sensor_context

    from obs_pipeline.dagster_defs.jobs import SITE_TAG
    from obs_pipeline.dagster_defs.sensors import buffer_sensor

    keys = SiteKeys(settings.site)
    doc, ids = seed_example(settings.site)
    redis_client.lpush(keys.buffer, json.dumps(doc))
    unreachable = _with_main_unreachable(resource)
    config = {"ops": {"drain_batches": {"config": {**FAST["ops"]["drain_batches"]["config"],
                                                   "transient_retry_wait_s": 0.01}}}}
    with instance_for_test() as instance:
        failed = drain_buffer.execute_in_process(resources={"obs_pipeline": unreachable}, instance=instance,
                                                 run_config=config, tags={SITE_TAG: settings.site},
                                                 raise_on_error=False)
        assert not failed.success

        def tick(with_resource):
            return buffer_sensor(build_sensor_context(instance=instance, resources={"obs_pipeline": with_resource}))

        still = tick(unreachable)
        assert isinstance(still, SkipReason), still
        assert re.search(rf"drain run {failed.run_id} failed with main out of reach; the next once main answers "
                         r"\(looked at each tick\), or in (\d+) s", still.skip_message), still.skip_message
        assert isinstance(tick(resource), RunRequest)  # main answers: at once, not 60 s later
        # a run that failed on another cause keeps its pause, main answering or not
        other = instance.create_run_for_job(drain_buffer, tags={SITE_TAG: settings.site},
                                            status=DagsterRunStatus.STARTED)
        instance.report_run_failed(other)
        paused = tick(resource)
        assert isinstance(paused, SkipReason) and f"drain run {other.run_id} failed" in paused.skip_message, paused
        assert "once main answers" not in paused.skip_message, paused.skip_message
    assert redis_client.llen(keys.buffer) + redis_client.llen(keys.processing) == 1  # kept for the next run
    assert drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST).success
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit WHERE id = :i"),
                            {"i": ids["uuid-1"]}).scalar_one() == 1


def test_in_a_long_outage_of_main_failed_runs_come_ever_further_apart(settings, resource, redis_client):
    """Main out of reach all night (the link down for hours) failed a run every 9 minutes or so:
    8 op retries (4 minutes), the pause capped at 300 s, the next run: about 7 red runs an hour
    in the UI, hiding any that failed on something else. The sensor asks main at each tick during
    the pause after such a run and launches the next as soon as it answers, so that pause may
    grow further, up to 30 minutes, without keeping the backlog a moment once the link is back."""
    from dagster import SkipReason, build_sensor_context

    from obs_pipeline.dagster_defs.jobs import FAILED_ON_TAG, MAIN_OUT_OF_REACH, SITE_TAG
    from obs_pipeline.dagster_defs.sensors import buffer_sensor

    redis_client.lpush(SiteKeys(settings.site).buffer, json.dumps(seed_example(settings.site)[0]))
    unreachable = _with_main_unreachable(resource)
    with instance_for_test() as instance:
        def next_in(**tags) -> int:
            run = instance.create_run_for_job(drain_buffer, tags={SITE_TAG: settings.site, **tags},
                                              status=DagsterRunStatus.STARTED)
            instance.report_run_failed(run)
            skip = buffer_sensor(build_sensor_context(instance=instance, resources={"obs_pipeline": unreachable}))
            assert isinstance(skip, SkipReason), skip
            match = re.search(rf"drain run {run.run_id} failed[^;]*; the next (?:once main answers \(looked at "
                              r"each tick\), or )?in (\d+) s", skip.skip_message)
            assert match, skip.skip_message
            return int(match.group(1))

        waits = [next_in(**{FAILED_ON_TAG: MAIN_OUT_OF_REACH}) for _ in range(7)]
        for wait, expected in zip(waits, [60, 120, 240, 480, 960, 1800, 1800]):
            assert expected - 3 <= wait <= expected, waits
        assert 297 <= next_in() <= 300, "a run that failed on another cause keeps the 300 s cap"


def test_status_says_the_drain_is_paused_after_a_failed_run_why_and_until_when(settings, resource, redis_client,
                                                                           main_engine, replica_engine):
    """In the sensor's pause after a failed run (up to 30 minutes in a long outage of main) no run
    is in flight, and `obs-pipeline status` said `drain idle`, as if nothing would drain the site:
    the sensor notes its pause in Redis, status shows the drain paused, why and until when, and
    the note goes once the sensor launches the next run."""
    from dagster import RunRequest, SkipReason, build_sensor_context

    from obs_pipeline.dagster_defs.jobs import FAILED_ON_TAG, MAIN_OUT_OF_REACH, SITE_TAG
    from obs_pipeline.dagster_defs.sensors import buffer_sensor
    from obs_pipeline.health import health_report

    redis_client.lpush(SiteKeys(settings.site).buffer, json.dumps(seed_example(settings.site)[0]))
    store = BufferStore(redis_client, settings.site)
    unreachable = _with_main_unreachable(resource)
    with instance_for_test() as instance:
        def tick(resource_now, **tags):
            run = instance.create_run_for_job(drain_buffer, tags={SITE_TAG: settings.site, **tags},
                                              status=DagsterRunStatus.STARTED)
            instance.report_run_failed(run)
            return run.run_id, buffer_sensor(build_sensor_context(instance=instance,
                                                                  resources={"obs_pipeline": resource_now}))

        def drain_report() -> dict:
            return health_report(store, main_engine, replica_engine)["background_processor"]

        first, skip = tick(unreachable, **{FAILED_ON_TAG: MAIN_OUT_OF_REACH})
        assert isinstance(skip, SkipReason), skip
        report = drain_report()
        assert report["status"] == "paused", report  # before: "idle", waiting None
        assert re.fullmatch(rf"drain run {first} failed with main out of reach: the next run once main answers, "
                            r"or in (59|60) s", report["waiting"]), report
        second, skip = tick(unreachable, **{FAILED_ON_TAG: MAIN_OUT_OF_REACH})
        assert re.fullmatch(rf"drain run {second} failed with main out of reach, the last 2 drain runs in a row: "
                            r"the next run once main answers, or in 1[12]\d s", drain_report()["waiting"])
        # and a note of a run terminated as it waited for its op retry, left to expire (75 s at most)
        store.note_drain_waiting("drain run r0: main unreachable (refused): op retry 3 of 8", 60.0)
        _, launched = tick(resource, **{FAILED_ON_TAG: MAIN_OUT_OF_REACH})  # main answers: the next at once
        assert isinstance(launched, RunRequest), launched
        assert drain_report()["status"] == "idle", drain_report()
        assert not redis_client.exists(SiteKeys(settings.site).drain_paused, SiteKeys(settings.site).drain_waiting)
        other, skip = tick(resource)  # failed on another cause: no end but the pause's own
        assert re.fullmatch(rf"drain run {other} failed, the last 4 drain runs in a row: the next run in (29\d|300) s",
                            drain_report()["waiting"]), skip
    assert drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST).success  # by hand
    assert drain_report()["status"] == "idle" and not redis_client.exists(SiteKeys(settings.site).drain_paused)


def test_status_says_a_run_waiting_for_its_op_retry_with_main_out_of_reach_is_running_and_why(
        settings, resource, redis_client, main_engine, replica_engine, monkeypatch):
    """Between its op retries a run holds no lease (a run that is not trying keeps no other drain
    out), and `obs-pipeline status` said `drain idle` for the whole of an outage, as if nothing
    drained the site: the run notes its wait in Redis for the wait's length, and status shows
    the drain running, waiting, why and how long. The run's failure, its retries spent, ends it."""
    from obs_pipeline.dagster_defs import jobs
    from obs_pipeline.health import health_report

    monkeypatch.setattr(jobs, "TRANSIENT_RETRIES", 1)
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, json.dumps(seed_example(settings.site)[0]))
    store = BufferStore(redis_client, settings.site)
    config = {"ops": {"drain_batches": {"config": {**FAST["ops"]["drain_batches"]["config"],
                                                   "transient_retry_wait_s": 4.0}}}}
    seen = []

    def watch():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(p["status"] == "running" for p in seen):
            seen.append(health_report(store, main_engine, replica_engine)["background_processor"])
            time.sleep(0.2)

    result = _beside(watch, lambda: drain_buffer.execute_in_process(
        resources={"obs_pipeline": _with_main_unreachable(resource)}, run_config=config, raise_on_error=False))
    assert not result.success
    waiting = next((p for p in seen if p["status"] == "running"), None)
    assert waiting is not None, seen[-3:]
    assert re.fullmatch(rf"drain run {result.run_id}: main unreachable \(.+\): op retry 1 of 1, the next attempt "
                        r"in \d+ s", waiting["waiting"]), waiting
    after = health_report(store, main_engine, replica_engine)["background_processor"]
    assert (after["status"], after["waiting"]) == ("idle", None), after  # the run failed: nothing waits
    assert redis_client.llen(keys.buffer) + redis_client.llen(keys.processing) == 1  # kept for the next run


def test_op_retries_count_each_cause_since_the_run_last_drained_a_batch_and_say_so():
    """The counts drain_batches' op retries and its failure line go by (a Dagster run's events
    read in order: see the test above for them on a real run)."""
    from obs_pipeline.dagster_defs.jobs import OpRetries

    retries = OpRetries()
    for cause in ["TransientError", "RedisTrouble", "TransientError"]:
        retries.retried(cause)
    assert (retries.main, retries.redis, retries.attempts) == (2, 1, 4)
    assert retries.main_unreachable_at() == "at 3 of the run's 4 attempts"
    retries.drained()
    retries.retried("TransientError")
    retries.retried(None)  # a cause Dagster did not record: an attempt, no cause's
    assert (retries.main, retries.redis, retries.attempts) == (1, 0, 3)
    assert retries.main_unreachable_at() == "at 2 of the 3 attempts since the run last drained a batch"
    retries.drained()
    assert retries.main_unreachable_at() == "at the one attempt since the run last drained a batch"
    assert OpRetries().main_unreachable_at() == "at the run's one attempt"


@pytest.mark.parametrize("trouble", ["down", "full"])
def test_redis_down_or_full_fails_the_tick_or_the_run_in_one_line_and_loses_nothing(
        stack, settings, resource, redis_client, main_engine, trouble):
    """With the site's Redis down, the sensor's tick and the run failed on redis-py's own error
    (a page of stack naming no setting; the run's said "Exceeded max_retries of 3"), and so did
    the run with Redis full (its claim is a write). Each says in one line which site's Redis and
    what to do, the run's failure too (its error said "Exceeded max_retries of 3", the line only
    in the failure's description); the run after Redis is back drains all, once."""
    from dagster import build_sensor_context

    from obs_pipeline.dagster_defs.sensors import SiteRedisTrouble, buffer_sensor

    doc, ids = seed_example(settings.site)
    redis_client.lpush(SiteKeys(settings.site).buffer, json.dumps(doc))
    limit = redis_client.config_get("maxmemory")["maxmemory"]
    if trouble == "down":
        stack.stop_service("redis")  # a clean stop: the entry is in its AOF
        expected, hint = f"site {settings.site}: Redis unreachable (", "is OBS_REDIS_URL right"
    else:
        redis_client.config_set("maxmemory", 1)
        expected, hint = f"site {settings.site}: Redis is full (its maxmemory is reached)", "raise maxmemory"
    try:
        with instance_for_test() as instance:
            context = build_sensor_context(instance=instance, resources={"obs_pipeline": resource})
            if trouble == "down":
                with pytest.raises(SiteRedisTrouble) as tick:
                    buffer_sensor(context)
                assert str(tick.value).startswith(expected) and hint in str(tick.value), tick.value
                assert tick.value.__cause__ is None and len(str(tick.value).splitlines()) == 1
            else:  # reading needs no room: the tick launches the run, which says why it cannot claim
                assert isinstance(buffer_sensor(context), RunRequest)
        result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST,
                                                 raise_on_error=False)
    finally:
        if trouble == "down":
            stack.start_service("redis")
        else:
            redis_client.config_set("maxmemory", limit)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    description = failure.event_specific_data.user_failure_data.description
    assert description.startswith(expected) and hint in description, description
    message = failure.event_specific_data.error.message
    assert description in message, message
    assert "\n" not in message.strip()
    retries = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
    assert len(retries) == 3  # the op's retry policy still waits for Redis to come back

    assert drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST).success
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM obs_pipeline_applied WHERE transaction_id = :t"),
                            {"t": doc["transaction_id"]}).scalar_one() == 1
        assert conn.execute(sa.text("SELECT count(*) FROM raw_data_file WHERE raw_data_package_id = :p"),
                            {"p": ids["uuid-2"]}).scalar_one() == 2
    assert redis_client.llen(SiteKeys(settings.site).failed) == 0


def test_redis_lost_after_the_drain_fails_the_report_in_one_line(settings, resource, redis_client, monkeypatch):
    """Redis gone between the two ops (the drain done): report_replication failed the run on
    redis-py's own error, a page of stack naming no setting, where every other step says which
    site's Redis and what to check. It says so in that line now; what the drain did stands."""
    import redis as redis_lib

    doc, _ = seed_example(settings.site)
    redis_client.lpush(SiteKeys(settings.site).buffer, json.dumps(doc))

    def redis_gone(self):
        raise redis_lib.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(BufferStore, "depths", redis_gone)  # (read by report_replication, not the drain)
    result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST,
                                             raise_on_error=False)
    assert not result.success and result.output_for_node("drain_batches")["applied"] == 1
    [failure] = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    assert failure.step_key == "report_replication"
    message = failure.event_specific_data.error.message
    assert (f"site {settings.site}: Redis unreachable (Error 111 connecting to 127.0.0.1:6379. Connection refused.); "
            "is OBS_REDIS_URL right" in message), message
    assert "\n" not in message.strip()
    assert json.loads(redis_client.get(SiteKeys(settings.site).transaction(doc["transaction_id"])))["status"] \
        == "replicated"


@pytest.mark.slow
def test_a_run_rides_out_main_down_with_dagsters_storage_on_it(stack, settings, resource, redis_client, main_engine,
                                                             tmp_path, monkeypatch):
    """Dagster's storage is on main (dagster.yaml). With main down for 20 s mid-run, the op
    retry's own event could not be written: the run failed (the sensor waited 60 s before the
    next), and a budget spent during the outage would have failed it too. The drain now retries
    the batch itself while the storage does not answer, and the run ends once main is back."""
    env = dagster_environment(stack, home=tmp_path / "dagster_home")
    monkeypatch.setenv("OBS_DAGSTER_PG_URL", env["OBS_DAGSTER_PG_URL"])
    doc, ids = seed_example(settings.site)
    keys = SiteKeys(settings.site)

    def outage():
        time.sleep(3)  # the run is idle, waiting for work
        stack.stop_service("main")
        redis_client.lpush(keys.buffer, json.dumps(doc))
        time.sleep(20)  # the budget (10 s) is spent meanwhile
        stack.start_service("main")

    instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
    outage_thread = threading.Thread(target=outage)
    outage_thread.start()
    try:
        result = drain_buffer.execute_in_process(
            resources={"obs_pipeline": resource}, instance=instance, raise_on_error=False,
            run_config={"ops": {"drain_batches": {"config": {"idle_exit_s": 60, "budget_s": 10}}}})
    finally:
        outage_thread.join()
    try:
        assert result.success
        assert result.output_for_node("drain_batches")["stopped_because"] == "time budget spent"
        assert instance.get_run_record_by_id(result.run_id).dagster_run.status == DagsterRunStatus.SUCCESS
        # its budget spent, it left the batch for the next run, which applies it once
        assert drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, instance=instance,
                                               run_config=FAST).success
    finally:
        instance.dispose()
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit WHERE id = :i"),
                            {"i": ids["uuid-1"]}).scalar_one() == 1
    assert redis_client.llen(keys.buffer) + redis_client.llen(keys.processing) == 0



def test_a_dead_letter_without_an_id_is_named_as_such_in_the_runs_event(settings, resource, redis_client):
    """A producer's entry without a usable transaction_id was listed as "None: <reason>" in
    the run's observation and warning (both made of the same lines); `failed list` names it by
    its place."""
    redis_client.lpush(SiteKeys(settings.site).buffer, json.dumps({"steps": [
        {"step_id": "s", "operation": "create", "model_class": "ObsUnit", "data": {"id": 9932, "name": "no id"}}]}))
    result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST)
    assert result.success
    observations = [e.event_specific_data.asset_observation for e in result.all_events
                    if e.event_type == DagsterEventType.ASSET_OBSERVATION]
    listed = observations[0].metadata["dead_letters"].value
    assert listed.startswith("(no usable transaction_id, `obs-pipeline failed list` shows it as #N): "
                             "transaction_id is missing"), listed

def test_prune_removes_only_this_sites_old_applied_records(settings, resource, main_engine):
    """Several sites may share main; one that was down longer than the week keeps its records
    (a batch it reclaims skips what they say was applied)."""
    with main_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO obs_pipeline_applied (transaction_id, site, applied_at) VALUES "
                             "('old', :s, now() - interval '10 days'), ('new', :s, now() - interval '1 day'), "
                             "('other-old', 'another-site', now() - interval '10 days')"), {"s": settings.site})
    assert prune_applied_transactions.execute_in_process(resources={"obs_pipeline": resource}).success
    with main_engine.connect() as conn:
        left = sorted(r[0] for r in conn.execute(sa.text("SELECT transaction_id FROM obs_pipeline_applied")))
    assert left == ["new", "other-old"]
    refused = prune_applied_transactions.execute_in_process(
        resources={"obs_pipeline": resource}, raise_on_error=False,
        run_config={"ops": {"prune_applied_records": {"config": {"older_than_days": 0}}}})
    assert not refused.success  # 0 days would forget what a reclaimed batch needs


def test_prune_keeps_the_records_of_a_batch_still_in_processing(settings, resource, redis_client, main_engine):
    """A drain that died between main's COMMIT and its acknowledgement leaves the batch in the
    processing list, for the next drain to reclaim; its records say what to skip. A site whose
    drain stayed down past older_than_days (Redis down for a week, the daemon's schedules
    running) had them pruned: the reclaimed batch was applied again, and its creates
    dead-lettered on their own primary keys."""
    keys = SiteKeys(settings.site)
    doc, _ = seed_example(settings.site)
    doc["max_retries"] = 0
    redis_client.lpush(keys.buffer, json.dumps(doc))
    assert drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST).success
    redis_client.lpush(keys.processing, json.dumps(doc))  # as the claim left it, unacknowledged
    with main_engine.begin() as conn:
        conn.execute(sa.text("UPDATE obs_pipeline_applied SET applied_at = now() - interval '10 days' "
                             "WHERE transaction_id = :t"), {"t": doc["transaction_id"]})
    assert prune_applied_transactions.execute_in_process(resources={"obs_pipeline": resource}).success
    with main_engine.connect() as conn:
        kept = conn.execute(sa.text("SELECT transaction_id FROM obs_pipeline_applied")).scalars().all()
    assert kept == [doc["transaction_id"]]
    assert drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST).success
    assert redis_client.llen(keys.failed) == 0 and redis_client.llen(keys.processing) == 0



def test_prune_keeps_the_records_of_a_batch_still_awaiting_the_replica(settings, resource, redis_client, main_engine):
    """A committed batch waits for the replica (down for longer than older_than_days): should main
    fail over, the drain asks the new main which of its ids it holds, and buffers the others again
    (Drain._settle_failover). Pruned, its ids read as lost: applied again, its creates were
    dead-lettered on their own keys."""
    keys = SiteKeys(settings.site)
    with main_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO obs_pipeline_applied (transaction_id, site, applied_at) VALUES "
                             "('waits', :s, now() - interval '10 days'), ('done', :s, now() - interval '10 days')"),
                     {"s": settings.site})
    record = {"n": "000000000", "c": [], "o": [], "t": ["waits"], "at": 0, "lsn": 1, "tl": 1}
    redis_client.zadd(keys.awaiting_replication, {json.dumps(record): 1})
    try:
        assert prune_applied_transactions.execute_in_process(resources={"obs_pipeline": resource}).success
    finally:
        redis_client.delete(keys.awaiting_replication)
    with main_engine.connect() as conn:
        kept = conn.execute(sa.text("SELECT transaction_id FROM obs_pipeline_applied WHERE site = :s"),
                            {"s": settings.site}).scalars().all()
    assert kept == ["waits"]


def _applied_then_failing(settings, redis_client) -> tuple:
    """An update applied ("started"), the JSON of its status key (a producer's copy of it), a
    later update applied ("completed"), and a later one main refuses until obs unit 31337 exists:
    (buffer, observation, the first's id, its copy, the refused one's id)."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    done = buf.update("ExecutedObsUnit", obs["id"], {"status": "started"})
    copy = redis_client.get(keys.transaction(done))
    buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
    drain_until_settled(settings)
    failing = buf.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": 31337})  # no such unit yet
    return buf, obs, done, copy, failing


def _records_applied_ten_days_ago(main_engine, settings) -> None:
    with main_engine.begin() as conn:
        conn.execute(sa.text("UPDATE obs_pipeline_applied SET applied_at = now() - interval '10 days' "
                             "WHERE site = :s"), {"s": settings.site})


def _records_kept_then_unit_mended(main_engine) -> set[str]:
    """The applied-id records the prune kept; then the obs unit the failing update names is made."""
    with main_engine.begin() as conn:
        kept = set(conn.execute(sa.text("SELECT transaction_id FROM obs_pipeline_applied")).scalars())
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'mended')"))
    return kept


def _unit_and_status(main_engine, obs_id: str) -> tuple:
    with main_engine.connect() as conn:
        return tuple(conn.execute(sa.text("SELECT obs_unit_id, status FROM executed_obs_unit WHERE id = :i"),
                                  {"i": obs_id}).one())


@pytest.mark.parametrize("holder_dead", [True, False], ids=["blocker dead-lettered", "holder waiting to retry"])
def test_prune_keeps_the_record_of_an_applied_transaction_whose_copy_waits_behind_a_failing_one(
        settings, resource, redis_client, main_engine, holder_dead):
    """A producer pushes an applied update again (its reply was lost) after a later update of
    the row began to fail: the copy is held behind it, parked in the retry set, or dead-lettered
    as blocked by it once its retries are spent. Neither is in the buffer or the processing list,
    so a prune more than `older_than_days` after the original was applied dropped its record;
    when the failing update was mended (retried from the dead letters, or its next attempt), the
    copy came back through the drain and was applied a second time: the row's status went back
    from the later "completed" to the copy's "started"."""
    keys = SiteKeys(settings.site)
    buf, obs, done, copy, failing = _applied_then_failing(settings, redis_client)
    drain = Drain(settings, DrainConfig(retry_base_s=60))
    try:
        drain.acquire()
        if holder_dead:
            copy_blocked_behind_a_dead_update(drain, redis_client, keys, failing, copy)
        else:
            assert drain.step().retried == 1
            redis_client.lpush(keys.buffer, copy)
            assert drain.step().held == 1
    finally:
        drain.close()
    _records_applied_ten_days_ago(main_engine, settings)
    assert prune_applied_transactions.execute_in_process(resources={"obs_pipeline": resource}).success
    kept = _records_kept_then_unit_mended(main_engine)
    if holder_dead:
        subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "retry", failing],
                       env=cli_env(settings), check=True, capture_output=True)
    else:
        due_now(redis_client, keys, failing)
    drain_until_settled(settings, retry_base_s=0.05)
    assert _unit_and_status(main_engine, obs["id"]) == (31337, "completed")
    assert done in kept
    assert redis_client.llen(keys.failed) == 0
    buf.close()


def test_prune_keeps_the_record_of_a_copy_the_drain_holds_back_while_the_prune_reads(
        settings, resource, redis_client, main_engine, monkeypatch):
    """A copy of an applied update (a producer's retried push, as old as its original) waits in
    the buffer, the week since its original's apply past, and the drain claims it and holds it
    behind a failing update of its row while the prune reads: after the ids of the lists (the
    retry set did not hold it yet), before the oldest waiting entries (the buffer no longer
    did). Its record was pruned, and the copy applied again once the failing update was mended:
    the row's status went back from "completed" to the copy's "started"."""
    from obs_pipeline.buffer_store import BufferStore

    keys = SiteKeys(settings.site)
    buf, obs, done, copy, failing = _applied_then_failing(settings, redis_client)
    copy = json.loads(copy)
    copy["timestamp"] = _stamp(10.5)  # the original's, applied 10 days ago (below)
    drain = Drain(settings, DrainConfig(retry_base_s=60))
    read_awaiting = BufferStore.awaiting_ids

    def the_drain_holding_the_copy_meanwhile(store):
        awaiting = read_awaiting(store)
        assert drain.step().held == 1
        return awaiting

    try:
        drain.acquire()
        assert drain.step().retried == 1
        redis_client.lpush(keys.buffer, json.dumps(copy))
        _records_applied_ten_days_ago(main_engine, settings)
        monkeypatch.setattr(BufferStore, "awaiting_ids", the_drain_holding_the_copy_meanwhile)
        assert prune_applied_transactions.execute_in_process(resources={"obs_pipeline": resource}).success
    finally:
        drain.close()
    kept = _records_kept_then_unit_mended(main_engine)
    assert done in kept
    due_now(redis_client, keys, failing)
    drain_until_settled(settings, retry_base_s=0.05)
    assert _unit_and_status(main_engine, obs["id"]) == (31337, "completed")
    assert redis_client.llen(keys.failed) == 0
    buf.close()


def test_prune_keeps_the_record_of_a_dead_letter_retried_and_held_back_while_the_prune_reads(
        settings, resource, redis_client, main_engine, monkeypatch):
    """A copy of an applied update, dead-lettered as blocked by a failing update of its row, is
    retried with it (`failed retry`) while the prune reads the dead-letter list, and the drain
    claims both, the failing one failing again and the copy held behind it in the retry set: the
    list, read again as the retry changed it, no longer held the copy, and the retry set had
    been read before. Its record was pruned, and the copy applied again once the failing update
    was mended: the row's status went back from "completed" to "started"."""
    from obs_pipeline import dead_letters

    keys = SiteKeys(settings.site)
    buf, obs, done, copy, failing = _applied_then_failing(settings, redis_client)
    drain = Drain(settings, DrainConfig(retry_base_s=60))
    read_pages, reads = dead_letters._raw_pages, []

    def retried_and_claimed_meanwhile(client, key):
        reads.append(key)
        yield from read_pages(client, key)
        if len(reads) == 1:
            subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "retry", failing],
                           env=cli_env(settings), check=True, capture_output=True)
            drain.batch_size = 1  # one at a time: a copy in the failing one's batch is skipped there
            assert drain.step().retried == 1
            assert drain.step().held == 1

    try:
        drain.acquire()
        copy_blocked_behind_a_dead_update(drain, redis_client, keys, failing, copy)
        _records_applied_ten_days_ago(main_engine, settings)
        monkeypatch.setattr(dead_letters, "_raw_pages", retried_and_claimed_meanwhile)
        assert prune_applied_transactions.execute_in_process(resources={"obs_pipeline": resource}).success
    finally:
        drain.close()
    kept = _records_kept_then_unit_mended(main_engine)
    assert len(reads) == 2
    assert done in kept
    due_now(redis_client, keys, failing)
    drain_until_settled(settings, retry_base_s=0.05)
    assert _unit_and_status(main_engine, obs["id"]) == (31337, "completed")
    assert redis_client.llen(keys.failed) == 0
    buf.close()


def _listed_with_aged_records(settings, redis_client, main_engine, count: int) -> list[str]:
    """`count` dead letters (the oldest first), each the copy of a transaction applied 10 days ago."""
    ids = [f"listed-{n}" for n in range(count)]
    for tx_id in ids:
        redis_client.lpush(SiteKeys(settings.site).failed, json.dumps(
            {"transaction_id": tx_id, "steps": [], "failure": {"reason": "blocked by another"}}))
    with main_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO obs_pipeline_applied (transaction_id, site, applied_at) "
                             "SELECT unnest(CAST(:ids AS text[])), :s, now() - interval '10 days'"),
                     {"ids": ids, "s": settings.site})
    return ids


def test_prune_reads_the_dead_letters_again_when_a_retry_shifted_them_under_its_read(
        settings, resource, redis_client, main_engine, monkeypatch):
    """The list is read in pages from its oldest end; a letter retried (or discarded) while it is
    read moves those not yet read into pages already read, and one of them was not read: its
    record would be pruned. The read is made again until the list stood still through it."""
    from obs_pipeline import dead_letters

    ids = _listed_with_aged_records(settings, redis_client, main_engine, 5)
    monkeypatch.setattr(dead_letters, "LIST_PAGE", 2)
    read_pages, reads = dead_letters._raw_pages, []

    def retried_after_the_first_page(client, key):
        reads.append(key)
        for place, page in enumerate(read_pages(client, key)):
            yield page
            if len(reads) == 1 and place == 0:
                redis_client.rpop(key)  # the oldest letter, read already, leaves the list

    monkeypatch.setattr(dead_letters, "_raw_pages", retried_after_the_first_page)
    assert prune_applied_transactions.execute_in_process(resources={"obs_pipeline": resource}).success
    with main_engine.connect() as conn:
        kept = set(conn.execute(sa.text("SELECT transaction_id FROM obs_pipeline_applied")).scalars())
    assert kept == set(ids[1:]) and len(reads) == 2


def test_prune_with_a_dead_letter_list_changing_at_every_read_fails_in_one_line_and_prunes_nothing(
        settings, resource, redis_client, main_engine, monkeypatch):
    from obs_pipeline import dead_letters

    ids = _listed_with_aged_records(settings, redis_client, main_engine, 2)
    with main_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO obs_pipeline_applied (transaction_id, site, applied_at) VALUES "
                             "('old', :s, now() - interval '10 days')"), {"s": settings.site})
    read_pages = dead_letters._raw_pages

    def dead_lettering_meanwhile(client, key):
        yield from read_pages(client, key)
        redis_client.lpush(key, json.dumps({"transaction_id": str(uuid.uuid4()), "steps": [],
                                            "failure": {"reason": "dead-lettered meanwhile"}}))

    monkeypatch.setattr(dead_letters, "_raw_pages", dead_lettering_meanwhile)
    result = prune_applied_transactions.execute_in_process(resources={"obs_pipeline": resource},
                                                           raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE)
    message = failure.event_specific_data.error.message.strip()
    assert "\n" not in message and "changed each of the 20 times it was read" in message, message
    assert message.endswith("nothing pruned (the records of the transactions it lists are kept, and it could not "
                            "be read whole): the next prune tries again"), message
    with main_engine.connect() as conn:
        kept = set(conn.execute(sa.text("SELECT transaction_id FROM obs_pipeline_applied")).scalars())
    assert kept == set(ids) | {"old"}


def _stamp(days_ago: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(days=days_ago)).isoformat()


@pytest.mark.parametrize("backlog_days, pruned_old", [
    (10.5, True),   # the backlog began before the original was applied
    (9.0, True),    # after it: the copy waits behind entries newer than the original's record
    (None, False),  # its oldest entry has no readable timestamp: nothing pruned
], ids=["backlog from before the original", "backlog from after the original", "no readable timestamp"])
def test_prune_keeps_the_record_of_a_transaction_whose_copy_waits_behind_an_old_backlog(
        settings, resource, redis_client, main_engine, backlog_days, pruned_old):
    """A transaction applied, then pushed again (a producer's retried push), its copy waiting in
    the buffer behind a backlog older than older_than_days (the drain down for over a week, the
    daily prune running before it caught up): its record was pruned, and the copy applied again,
    its creates dead-lettered on their own keys. Records are kept older_than_days before the
    oldest transaction still waiting, not only before now; where that one's age is unknown,
    nothing is pruned."""
    keys = SiteKeys(settings.site)
    doc, _ = seed_example(settings.site)
    doc["max_retries"], doc["timestamp"] = 0, _stamp(11)
    redis_client.lpush(keys.buffer, json.dumps(doc))
    assert drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST).success
    with main_engine.begin() as conn:
        conn.execute(sa.text("UPDATE obs_pipeline_applied SET applied_at = now() - interval '10 days' "
                             "WHERE transaction_id = :t"), {"t": doc["transaction_id"]})
        conn.execute(sa.text("INSERT INTO obs_pipeline_applied (transaction_id, site, applied_at) VALUES "
                             "('long-ago', :s, now() - interval '30 days')"), {"s": settings.site})
    backlog = {"transaction_id": "backlog-1", "max_retries": 0, "steps": [
        {"step_id": "s1", "operation": "create", "model_class": "ObsUnit", "data": {"id": 9951, "name": "late"}}]}
    if backlog_days is not None:
        backlog["timestamp"] = _stamp(backlog_days)
    redis_client.lpush(keys.buffer, json.dumps(backlog), json.dumps(doc))  # the backlog oldest, then the copy

    result = prune_applied_transactions.execute_in_process(resources={"obs_pipeline": resource})
    assert result.success
    with main_engine.connect() as conn:
        kept = set(conn.execute(sa.text("SELECT transaction_id FROM obs_pipeline_applied")).scalars())
    assert drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST).success
    assert [json.loads(letter)["failure"]["reason"][:120] for letter in redis_client.lrange(keys.failed, 0, -1)] == []
    assert redis_client.llen(keys.buffer) == 0
    assert kept == {doc["transaction_id"]} | (set() if pruned_old else {"long-ago"})
    said = result.output_for_node("prune_applied_records")
    assert said["pruned"] == (1 if pruned_old else 0) and said["moved_back"], said
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM obs_unit WHERE id = 9951")).scalar_one() == 1


def test_prune_with_the_sites_redis_down_fails_in_one_line_and_prunes_nothing(settings, resource, main_engine):
    """It cannot know which records a batch left in processing still needs: it keeps them all."""
    from obs_pipeline.stack.osutil import pick_free_ports

    with main_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO obs_pipeline_applied (transaction_id, site, applied_at) VALUES "
                             "('old', :s, now() - interval '10 days')"), {"s": settings.site})
    down = ObsPipelineResource(**{**resource.__dict__, "redis_url": f"redis://127.0.0.1:{pick_free_ports(1)[0]}/0"})
    result = prune_applied_transactions.execute_in_process(resources={"obs_pipeline": down}, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE)
    message = failure.event_specific_data.error.message
    assert message.startswith(f"dagster._core.definitions.events.Failure: site {settings.site}: Redis unreachable ("), \
        message
    assert "nothing pruned" in message.splitlines()[0], message
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT transaction_id FROM obs_pipeline_applied")).scalars().all() == ["old"]


@pytest.mark.parametrize("hot", [True, False], ids=["hot standby", "hot_standby off"])
def test_the_prune_job_on_a_standby_fails_in_the_drains_one_line(settings, resource, request, hot):
    """On a hot standby the DELETE failed with "cannot execute DELETE in a read-only transaction",
    on one with hot_standby off the connect with "the database system is not accepting
    connections", each under "Error occurred while executing op": which server, and what to do?"""
    url = settings.replica_db_url if hot else request.getfixturevalue("cold_standby_url")
    standby = ObsPipelineResource(**{**resource.__dict__, "main_db_url": url})
    result = prune_applied_transactions.execute_in_process(resources={"obs_pipeline": standby},
                                                           raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE)
    where = sa.engine.make_url(url)
    what = ("a read-only standby (pg_is_in_recovery)" if hot else
            'a standby with hot_standby off (it refuses every connection: "Hot standby mode is disabled")')
    assert failure.event_specific_data.error.message.startswith(
        f"dagster._core.definitions.events.Failure: main at {where.host}:{where.port}/{where.database} is {what}: "
        "point OBS_MAIN_DB_URL at the primary"), failure.event_specific_data.error.message


@pytest.mark.parametrize("job, op_config, message", [
    (retry_dead_letters, {"requeue_dead_letters": {"config": {}}},
     "set either `all: true` or a list of `transaction_ids`"),
    (retry_dead_letters, {"requeue_dead_letters": {"config": {"transaction_ids": ["no-such-id"]}}},
     "no dead-lettered transaction 'no-such-id' at site "),
    (discard_dead_letters, {"drop_dead_letters": {"config": {"transaction_ids": []}}},
     "list the `transaction_ids` to discard (`obs-pipeline failed list` shows them)"),
    (discard_dead_letters, {"drop_dead_letters": {"config": {"transaction_ids": ["no-such-id"]}}},
     "no dead-lettered transaction 'no-such-id' at site "),
    (prune_applied_transactions, {"prune_applied_records": {"config": {"older_than_days": 0}}},
     "older_than_days must be at least 1"),
    (prune_run_history, {"delete_old_runs": {"config": {"older_than_days": 0}}},
     "older_than_days must be at least 1, not 0: the last day's runs are what an operator looks at"),
    # beyond a date either can compute: 'interval out of range' from main (psycopg2's DataError
    # under the op's traceback, the statement quoted), 'cannot convert float infinity to integer'
    (prune_applied_transactions, {"prune_applied_records": {"config": {"older_than_days": math.inf}}},
     "older_than_days must be at most 36500 (100 years), not inf"),
    (prune_applied_transactions, {"prune_applied_records": {"config": {"older_than_days": 1e7}}},
     "older_than_days must be at most 36500 (100 years), not 1e+07"),
    (prune_run_history, {"delete_old_runs": {"config": {"older_than_days": math.inf}}},
     "older_than_days must be at most 36500 (100 years), not inf"),
])
def test_an_operator_jobs_mistake_fails_it_with_its_reason_on_top(resource, job, op_config, message):
    """A mistyped id or a bad config in the retry or prune job failed its run with 'Error
    occurred while executing op ...' on top, the reason only in the exception's cause below."""
    result = job.execute_in_process(resources={"obs_pipeline": resource}, raise_on_error=False,
                                    run_config={"ops": op_config})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE)
    assert message in failure.event_specific_data.error.message


def test_a_batch_of_many_dead_letters_is_one_observation_and_one_warning(settings, resource, redis_client):
    """Each Dagster event is a connection to its storage on main, a second or so over the real
    link: 60 dead letters must not be 120 events."""
    keys = SiteKeys(settings.site)
    for i in range(60):
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": f"bad-{i}", "steps": "none"}))
    with DagsterInstance.ephemeral() as instance:
        result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST,
                                                 instance=instance)
        assert result.success
        warnings = [e for e in instance.all_logs(result.run_id)
                    if e.level == logging.WARNING and "dead-lettered" in (e.user_message or "")]
    observations = [e.event_specific_data.asset_observation for e in result.all_events
                    if e.event_type == DagsterEventType.ASSET_OBSERVATION]
    assert len(observations) == 1 and observations[0].metadata["dead_lettered"].value == 60
    assert observations[0].metadata["dead_letters"].value.endswith("... and 10 more")
    assert len(warnings) == 1 and warnings[0].user_message.startswith("dead-lettered 60 transaction(s): bad-")
    assert redis_client.llen(keys.failed) == 60


def test_a_batch_dead_lettered_whole_counts_its_transactions_and_lists_them_under_their_own_key(
        settings, resource, redis_client):
    """The observation of a batch main committed none of took its dead letters' listing over its
    metadata, the listing's `transactions` (a text) over the batch's count: the key was an int on
    materializations and a text here, and the count was lost. The listing is `dead_letters`."""
    keys = SiteKeys(settings.site)
    for i in range(3):
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": f"all-dead-{i}", "steps": "none"}))
    result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST)
    assert result.success
    [observed] = [e.event_specific_data.asset_observation for e in result.all_events
                  if e.event_type == DagsterEventType.ASSET_OBSERVATION]
    assert observed.description == "nothing applied: 3 dead-lettered"
    assert (observed.metadata["transactions"].value, observed.metadata["applied"].value,
            observed.metadata["dead_lettered"].value) == (3, 0, 3), observed.metadata
    listed = observed.metadata["dead_letters"].value.split("\n")
    assert sorted(line.split(": ")[0] for line in listed) == [f"all-dead-{i}" for i in range(3)], listed
    assert redis_client.llen(keys.failed) == 3


def test_a_batch_applied_in_part_lists_its_dead_letters_beside_its_count(settings, resource, redis_client):
    """Main applied some of the batch: its materialization counts it, and the observation after it
    lists the dead letters under `dead_letters`; its `transactions`, as everywhere, the count."""
    keys = SiteKeys(settings.site)
    good, _ = seed_example(settings.site)
    for doc in (good, {"transaction_id": "partly-dead", "steps": "none"}):
        redis_client.lpush(keys.buffer, json.dumps(doc))
    result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST)
    assert result.success
    [materialized] = [e.event_specific_data.materialization for e in result.all_events
                      if e.event_type == DagsterEventType.ASSET_MATERIALIZATION
                      and e.event_specific_data.materialization.asset_key == MAIN_ASSET]
    assert (materialized.metadata["transactions"].value, materialized.metadata["applied"].value,
            materialized.metadata["dead_lettered"].value) == (2, 1, 1), materialized.metadata
    [observed] = [e.event_specific_data.asset_observation for e in result.all_events
                  if e.event_type == DagsterEventType.ASSET_OBSERVATION]
    assert "applied" not in observed.metadata  # not a batch's own event: _earlier_attempts counts none of it
    assert (observed.metadata["transactions"].value, observed.metadata["dead_lettered"].value) == (2, 1)
    assert observed.metadata["dead_letters"].value.startswith("partly-dead: "), observed.metadata


def test_the_drain_runs_aof_compaction_is_a_run_config_switch():
    from obs_pipeline.dagster_defs.jobs import DrainRunConfig, _drain_config
    from obs_pipeline.drain import DrainConfig

    assert _drain_config(DrainRunConfig()).aof_check_s == DrainConfig.aof_check_s
    assert _drain_config(DrainRunConfig(aof_compaction=False)).aof_check_s is None


@pytest.mark.parametrize("op_config, unset, message", [
    ({"batch_size": 0}, None, "batch_size must be a whole number of transactions >= 1, not 0"),
    ({"budget_s": 0}, None, "budget_s must be more than 0 seconds, not 0"),
    ({"transient_retry_wait_s": -2}, None, "transient_retry_wait_s must be more than 0 seconds, not -2"),
    ({"idle_exit_s": -1}, None, "idle_exit_s must be 0 or more seconds, not -1"),
    ({"replication_timeout_s": -10}, None, "replication_timeout_s must be 0 or more seconds, and finite, not -10.0"),
    ({"replication_timeout_s": float("inf")}, None,  # it waited for the replica for ever
     "replication_timeout_s must be 0 or more seconds, and finite, not inf"),
    ({"lease_ttl_s": float("inf")}, None,  # an OverflowError's traceback at the lease's SET PX
     "lease_ttl_s must be 0.001 to 86400 s (the lease's Redis expiry), not inf"),
    ({"lease_ttl_s": 1e12}, None,  # an OverflowError's traceback waiting for main (timestamp out of range)
     "lease_ttl_s must be 0.001 to 86400 s (the lease's Redis expiry), not 1000000000000.0"),
    ({"retry_base_s": -5}, None, "retry_base_s must be 0 or more seconds, and finite, not -5.0"),
    ({}, "main_db_url", "OBS_MAIN_DB_URL is not set"),
    ({}, "main role", 'role "no_such_role" does not exist'),
    ({}, "redis database name", "names the database 'obs': Redis databases are numbers"),
    # a driver obs-pipeline does not use: a traceback (No module named 'psycopg'; pg8000's
    # paramstyle in psycopg2's mogrify, a batch claimed) and "Exceeded max_retries of 3"
    ({}, "main driver pg8000", "OBS_MAIN_DB_URL names the driver pg8000: obs-pipeline talks to PostgreSQL through "
                               "psycopg2 (postgresql+psycopg2://... or postgresql://...)"),
    ({}, "replica driver psycopg", "OBS_REPLICA_DB_URL names the driver psycopg: obs-pipeline talks to PostgreSQL "
                                   "through psycopg2"),
])
def test_a_bad_run_config_or_setting_fails_the_run_at_once_saying_why(settings, resource, redis_client, monkeypatch,
                                                                      op_config, unset, message):
    """A mistake in the run config or the OBS_* settings is not fixed by waiting: the run fails
    at once, its failure saying what is wrong (it was retried three times, 15 s or so, and the
    run's failure said only "Exceeded max_retries of 3"), and nothing is claimed."""
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, json.dumps(seed_example(settings.site)[0]))
    if unset == "main role":  # main refuses the role: a wrong URL, not an outage
        url = sa.engine.make_url(settings.main_db_url).set(username="no_such_role")
        resource = ObsPipelineResource(**{**resource.__dict__,
                                          "main_db_url": url.render_as_string(hide_password=False)})
    elif unset and " driver " in unset:  # e.g. "main driver pg8000"
        server, _, driver = unset.split()
        field = f"{server}_db_url"
        url = sa.engine.make_url(getattr(settings, field)).set(drivername=f"postgresql+{driver}")
        resource = ObsPipelineResource(**{**resource.__dict__, field: url.render_as_string(hide_password=False)})
    elif unset == "redis database name":  # redis-py would quietly drain database 0
        resource = ObsPipelineResource(**{**resource.__dict__, "redis_url": settings.redis_url.rsplit("/", 1)[0] + "/obs"})
    elif unset:
        monkeypatch.delenv("OBS_MAIN_DB_URL", raising=False)
        resource = ObsPipelineResource(**{**resource.__dict__, unset: None})
    result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, raise_on_error=False,
                                             run_config={"ops": {"drain_batches": {"config": op_config}}})
    assert not result.success
    assert not [e for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
    failure = next(e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE)
    assert message in failure.event_specific_data.error.message
    assert redis_client.llen(keys.buffer) + redis_client.llen(keys.processing) == 1  # left for a later drain
    assert not redis_client.exists(keys.lease)


@pytest.mark.parametrize("budget_s", [1e-9, 0.001])
def test_a_run_whose_budget_is_spent_as_it_starts_still_drains_a_batch(settings, resource, redis_client, budget_s):
    """A budget_s above 0 but shorter than the run takes to start (1e-9, a millisecond; or a few
    seconds where the daemon is slow to start it) ended the run green having drained nothing,
    "drained 0 transactions in 0 batches (time budget spent)", and the sensor, work still
    buffered, launched the next at once, to do the same. A run drains one batch whatever its
    budget (as an op retry tries main and Redis once), then stops for it."""
    keys = SiteKeys(settings.site)
    for _ in range(3):
        redis_client.lpush(keys.buffer, json.dumps(seed_example(settings.site)[0]))
    config = {"ops": {"drain_batches": {"config": {**FAST["ops"]["drain_batches"]["config"], "budget_s": budget_s,
                                                   "batch_size": 1}}}}
    result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=config)
    drained = result.output_for_node("drain_batches")
    assert (drained["batches"], drained["applied"], drained["stopped_because"]) == (1, 1, "time budget spent"), drained
    assert redis_client.llen(keys.buffer) + redis_client.llen(keys.processing) == 2  # for the next run
    assert redis_client.llen(keys.failed) == 0 and not redis_client.exists(keys.lease)


@pytest.mark.parametrize("check", ["no_dead_letters", "replica_replays"])
@pytest.mark.parametrize("trouble, message", [
    ("redis down", "site {site}: Redis unreachable (Error 111 connecting to 127.0.0.1:{port}. Connection refused.); "
                   "is OBS_REDIS_URL right and the stack up (`obs-pipeline stack status`)?"),
    ("redis database name", "OBS_REDIS_URL='{redis_url}' names the database 'obs': Redis databases are numbers"),
    ("replica_db_url", "OBS_REPLICA_DB_URL is not set: replication tracking and smart queries need the site's read "
                       "replica"),
], ids=["redis down", "redis database name", "replica_db_url unset"])
def test_a_check_evaluated_on_demand_that_cannot_judge_fails_in_one_line(settings, resource, redis_client, monkeypatch,
                                                                         check, trouble, message):
    """Evaluated from the UI with an OBS_* setting unset or wrong, or the site's Redis down, the
    checks failed on the error's traceback (redis-py's ConnectionError, ConfigError), naming
    neither the site nor what to check. They fail in the drain's one line now; nothing changes."""
    from obs_pipeline.stack.osutil import pick_free_ports

    port = pick_free_ports(1)[0]
    url = {"redis down": f"redis://127.0.0.1:{port}/0",
           "redis database name": settings.redis_url.rsplit("/", 1)[0] + "/obs"}.get(trouble)
    if trouble == "replica_db_url":
        monkeypatch.delenv("OBS_REPLICA_DB_URL", raising=False)
        broken = ObsPipelineResource(**{**resource.__dict__, "replica_db_url": None})
    else:
        broken = ObsPipelineResource(**{**resource.__dict__, "redis_url": url})
    if check == "no_dead_letters" and trouble == "replica_db_url":
        assert no_dead_letters(obs_pipeline=broken).passed  # it needs no replica
        return
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, json.dumps(seed_example(settings.site)[0]))
    with pytest.raises(Failure) as failed:
        getattr(operations, check)(obs_pipeline=broken)
    expected = message.format(site=settings.site, port=port, redis_url=url)
    assert failed.value.description.startswith(expected), failed.value.description
    assert "\n" not in failed.value.description
    assert redis_client.llen(keys.buffer) == 1 and not redis_client.exists(keys.lease)


@pytest.mark.parametrize("hot", [True, False], ids=["hot standby", "hot_standby off"])
def test_a_main_url_naming_a_standby_fails_the_run_in_one_line_and_dead_letters_nothing(
        settings, resource, redis_client, main_engine, request, hot):
    """The standby refused the batch's INSERT with 25006 (one with hot_standby off, the connect:
    57P03), sorted as transient: the op was retried 8 times as "main unreachable", a minute or
    more, and the next run did the same. It fails at once saying which server and what to do;
    the transactions stay buffered, `pending`, the lease free, and a run against the real main
    applies each once."""
    from obs_pipeline.ingest import TransactionBuffer
    from obs_pipeline_tests.workload import assert_applied_exactly_once, buffer_observations

    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 3, finish_every=2)
    ids = [tx for o in observations for tx in (o.start_tx, o.finish_tx) if tx]
    url = settings.replica_db_url if hot else request.getfixturevalue("cold_standby_url")
    standby = ObsPipelineResource(**{**resource.__dict__, "main_db_url": url})
    try:
        result = drain_buffer.execute_in_process(resources={"obs_pipeline": standby},
                                                 run_config=FAST, raise_on_error=False)
        assert not result.success
        events = [e.event_type for e in result.all_events]
        assert DagsterEventType.STEP_UP_FOR_RETRY not in events, events
        failure = next(e for e in result.all_events
                       if e.event_type == DagsterEventType.STEP_FAILURE).event_specific_data.error
        where = sa.engine.make_url(url)
        what = ("a read-only standby (pg_is_in_recovery)" if hot else
                'a standby with hot_standby off (it refuses every connection: "Hot standby mode is disabled")')
        assert (f"main at {where.host}:{where.port}/{where.database} is {what}: point OBS_MAIN_DB_URL at the "
                "primary; the transactions stay buffered until then" in failure.message), failure
        _kept_for_the_next_run(redis_client, keys, buf, ids, resource)
    finally:
        buf.close()
    assert_applied_exactly_once(main_engine, observations)
    assert redis_client.llen(keys.failed) == 0


def test_a_main_url_naming_a_database_without_the_schema_fails_the_run_in_one_line(
        settings, resource, redis_client, main_engine):
    """OBS_MAIN_DB_URL naming another database of main's server than the pipeline's (`/postgres`),
    or one `obs-pipeline db init` was never run on: the batch's first statement found no
    obs_pipeline_applied, and the run failed after 3 op retries on Dagster's "Exceeded max_retries
    of 3", the batch claimed, and so did the sensor's next run. It fails at once now saying which
    database and what to do; the transactions stay buffered, `pending`, and apply once later."""
    from obs_pipeline.ingest import TransactionBuffer
    from obs_pipeline_tests.workload import assert_applied_exactly_once, buffer_observations

    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 2)
    ids = [tx for o in observations for tx in (o.start_tx, o.finish_tx) if tx]
    empty = f"empty_{settings.site}"
    server = sa.create_engine(main_engine.url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{empty}"'))
    url = main_engine.url.set(database=empty)
    try:
        result = drain_buffer.execute_in_process(
            resources={"obs_pipeline": ObsPipelineResource(**{**resource.__dict__, "main_db_url": url.render_as_string(
                hide_password=False)})}, run_config=FAST, raise_on_error=False)
        assert not result.success
        assert not [e for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
        failure = next(e for e in result.all_events
                       if e.event_type == DagsterEventType.STEP_FAILURE).event_specific_data.error.message
        assert failure.startswith(
            f"dagster._core.definitions.events.Failure: main at {url.host}:{url.port}/{empty} has no "
            "obs_pipeline_applied table: OBS_MAIN_DB_URL names another database than the pipeline's, or "
            "`obs-pipeline db init` was not run on it; the transactions stay buffered until then"), failure
        _kept_for_the_next_run(redis_client, keys, buf, ids, resource)
    finally:
        buf.close()
        with server.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{empty}" WITH (FORCE)'))
        server.dispose()
    assert_applied_exactly_once(main_engine, observations)


@pytest.mark.parametrize("tags, op_config, message", [
    ({}, {"budget_s": 1000}, "budget_s 1000 s + lease_ttl_s + replication_timeout_s (70 s: a lease wait, the batch "
     "in hand) outlasts the run's max runtime of 900 s (run_monitoring.max_runtime_seconds in dagster.yaml), after "
     "which monitoring kills it mid-batch: lower budget_s to 830 or less"),
    ({"dagster/max_runtime": "200"}, {}, "outlasts the run's max runtime of 200 s (the run's dagster/max_runtime "
     "tag), after which monitoring kills it mid-batch: lower budget_s to 130 or less"),
    ({}, {"budget_s": 850, "lease_ttl_s": 600, "replication_timeout_s": 300},
     "lower lease_ttl_s and replication_timeout_s, or raise the max runtime"),
])
def test_a_budget_the_run_cannot_live_through_is_refused_in_one_line(settings, resource, redis_client,
                                                                     tags, op_config, message):
    """Run monitoring kills a run past its max runtime (900 s in dagster.yaml, or the run's
    dagster/max_runtime tag): a budget_s of 1000 was accepted, and the run was killed mid-batch,
    failed, and its batch waited out the lease. It fails at once now, saying what to lower."""
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, json.dumps(seed_example(settings.site)[0]))
    with instance_for_test(overrides={"run_monitoring": {"enabled": True, "max_runtime_seconds": 900}}) as instance:
        result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, instance=instance,
                                                 tags=tags, raise_on_error=False,
                                                 run_config={"ops": {"drain_batches": {"config": op_config}}})
        assert not result.success
        assert not [e for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
        failure = next(e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE)
        assert message in failure.event_specific_data.error.message
        assert "\n" not in failure.event_specific_data.error.message.strip()
        assert redis_client.llen(keys.buffer) == 1 and not redis_client.exists(keys.processing, keys.lease)
        # what fits runs
        fits = {"ops": {"drain_batches": {"config": {"budget_s": 60, "idle_exit_s": 0}}}}
        assert drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, instance=instance,
                                               tags=tags, run_config=fits).success
    assert redis_client.llen(keys.buffer) == 0


def test_each_drain_and_retry_run_evaluates_the_no_dead_letters_check(settings, resource, redis_client, main_engine):
    """Nothing evaluated the check but an operator's click: it said nothing (or "passed", from an
    old click) while dead letters waited. Each drain run and each retry run evaluate it now."""
    def evaluations(result):
        return [e.event_specific_data for e in result.all_events  # (a drain run evaluates replica_replays too)
                if e.event_type == DagsterEventType.ASSET_CHECK_EVALUATION
                and e.event_specific_data.check_name == "no_dead_letters"]

    doc, ids = seed_example(settings.site, obs_unit_id=4243)  # no such obs unit on main yet
    doc["max_retries"] = 0
    redis_client.lpush(SiteKeys(settings.site).buffer, json.dumps(doc))
    with DagsterInstance.ephemeral() as instance:
        drained = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST,
                                                  instance=instance)
        [check] = evaluations(drained)
        assert check.check_name == "no_dead_letters" and check.asset_key == no_dead_letters.check_key.asset_key
        assert not check.passed and check.metadata["failed"].value == 1
        [record] = instance.event_log_storage.get_asset_check_execution_history(no_dead_letters.check_key, limit=5)
        assert record.run_id == drained.run_id and record.status.value == "FAILED"  # what the UI shows

    with main_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (4243, 'fixed')"))
    retried = retry_dead_letters.execute_in_process(
        resources={"obs_pipeline": resource}, run_config={"ops": {"requeue_dead_letters": {"config": {"all": True}}}})
    assert [c.passed for c in evaluations(retried)] == [True]
    assert [c.passed for c in evaluations(drain_buffer.execute_in_process(resources={"obs_pipeline": resource},
                                                                          run_config=FAST))] == [True]


def test_the_discard_job_drops_the_letters_named_all_or_none_and_evaluates_the_check(
        settings, resource, redis_client, main_engine):
    """Operators work dead letters in the UI; discarding one took the CLI. The job drops every
    letter named, with its status, caches and dead marks, in one MULTI: a list with an id not in
    the dead-letter list fails the run and drops none (not the ids before it)."""
    keys = SiteKeys(settings.site)
    docs = []
    for unit in (4244, 4245):  # no such obs units on main: both dead-lettered
        doc, _ = seed_example(settings.site, obs_unit_id=unit)
        doc["max_retries"] = 0
        redis_client.lpush(keys.buffer, json.dumps(doc))
        docs.append(doc)
    assert drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST).success
    first, second = (doc["transaction_id"] for doc in docs)
    assert redis_client.llen(keys.failed) == 2 and redis_client.hlen(keys.held_ids) > 0

    def discard(ids):
        return discard_dead_letters.execute_in_process(
            resources={"obs_pipeline": resource}, raise_on_error=False,
            run_config={"ops": {"drop_dead_letters": {"config": {"transaction_ids": ids}}}})

    def check_passed(result):
        return [e.event_specific_data.passed for e in result.all_events
                if e.event_type == DagsterEventType.ASSET_CHECK_EVALUATION]

    refused = discard([first, "no-such-id"])
    assert not refused.success
    assert redis_client.llen(keys.failed) == 2 and redis_client.exists(keys.transaction(first))

    dropped = discard([first])
    assert dropped.success and check_passed(dropped) == [False]  # the second is still listed
    assert dropped.output_for_node("drop_dead_letters") == {"discarded": {first: 1}, "blocked_left": []}
    assert not redis_client.exists(keys.transaction(first)) and redis_client.exists(keys.transaction(second))
    assert [json.loads(raw)["transaction_id"] for raw in redis_client.lrange(keys.failed, 0, -1)] == [second]

    dropped = discard([second, second])  # one letter named twice (a place names only what has no usable id)
    assert dropped.success and check_passed(dropped) == [True]
    assert redis_client.llen(keys.failed) == 0 and redis_client.hlen(keys.held_ids) == 0
    assert not redis_client.exists(keys.transaction(second))
    assert drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, run_config=FAST).success
    with main_engine.connect() as conn:  # discarded: neither reached main
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit")).scalar_one() == 0


@pytest.mark.usefixtures("clean_db")
def test_the_discard_job_names_the_letters_blocked_by_what_it_dropped(settings, resource, redis_client):
    """The job's log said only what went; a letter dead-lettered as blocked by it stays listed,
    now named in a warning and its output (`blocked_left`), as `failed discard` names it."""
    keys = SiteKeys(settings.site)
    blocker, dependent = dead_poison_and_its_dependent(settings)
    with DagsterInstance.ephemeral() as instance:
        result = discard_dead_letters.execute_in_process(
            resources={"obs_pipeline": resource}, instance=instance,
            run_config={"ops": {"drop_dead_letters": {"config": {"transaction_ids": [blocker]}}}})
        warned = [e.user_message for e in instance.all_logs(result.run_id) if e.level == logging.WARNING]
    assert result.success
    assert result.output_for_node("drop_dead_letters") == {"discarded": {blocker: 1}, "blocked_left": [dependent]}
    assert warned == [f"1 dead letter(s) blocked by what was discarded stay listed, to retry or discard on their "
                      f"own: {dependent}"], warned
    assert [json.loads(raw)["transaction_id"] for raw in redis_client.lrange(keys.failed, 0, -1)] == [dependent]


# --- Dagster's own history ---------------------------------------------------------------------

@pytest.fixture
def site_instance(stack, tmp_path, monkeypatch):
    """A Dagster instance as a site has it (the project's dagster.yaml, storage on main), in a
    database of its own: once the prune's clock moves on, the session's other runs would be old too."""
    env = dagster_environment(stack, home=tmp_path / "dagster_home")
    url = sa.engine.make_url(env["OBS_DAGSTER_PG_URL"])
    name = f"dagster_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    monkeypatch.setenv("OBS_DAGSTER_PG_URL", url.set(database=name).render_as_string(hide_password=False))
    instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
    try:
        yield instance
    finally:
        instance.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def age_the_runs_so_far(monkeypatch, days: float) -> None:
    """The prune's clock moves `days` on from now: runs created so far are that old, later ones
    younger (its cutoff and PostgreSQL's timestamps come from this host's clock: a margin of 1 s)."""
    time.sleep(1)
    now = datetime.now(timezone.utc)
    time.sleep(1)
    monkeypatch.setattr(operations, "_now", lambda: now + timedelta(days=days))


@op
def another_op():
    pass


@job
def another_job():  # another code location's, in the same instance
    another_op()


def origin(job_def) -> RemoteJobOrigin:
    """Where the run queue loads a queued run's job from (a queued run must say)."""
    location = InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name="obs_pipeline.definitions"))
    return RemoteJobOrigin(RemoteRepositoryOrigin(location, "__repository__"), job_def.name)


def prune_history(instance, **config):
    return prune_run_history.execute_in_process(instance=instance, raise_on_error=False,
                                                run_config={"ops": {"delete_old_runs": {"config": config}}})


def logged(instance, run_id: str) -> list[str]:
    return [e.user_message for e in instance.all_logs(run_id) if e.user_message.startswith("deleted ")]


def test_prune_run_history_deletes_old_finished_runs_with_their_events_and_outputs(resource, site_instance,
                                                                                   monkeypatch):
    """Run records, their event logs on main and their pickled outputs on the site machine grew
    for ever, a drain run or more a minute."""
    instance = site_instance
    drained = drain_buffer.execute_in_process(resources={"obs_pipeline": resource, "io_manager": FilesystemIOManager()},
                                              instance=instance, run_config=FAST)
    outputs = Path(instance.storage_directory()) / drained.run_id
    assert (outputs / "drain_batches" / "result").is_file()  # where the fs io manager puts them
    assert (outputs / "compute_logs").is_dir()  # and the compute log manager the run's stdout and stderr
    assert instance.all_logs(drained.run_id)
    S = DagsterRunStatus
    old = [drained.run_id] + [instance.create_run_for_job(j, status=s).run_id for j, s in [
        (retry_dead_letters, S.FAILURE), (prune_applied_transactions, S.CANCELED), (prune_run_history, S.SUCCESS)]]
    in_flight = [instance.create_run_for_job(drain_buffer, status=s, remote_job_origin=origin(drain_buffer)).run_id
                 for s in (S.QUEUED, S.NOT_STARTED, S.STARTING, S.STARTED, S.CANCELING)]
    not_ours = instance.create_run_for_job(another_job, status=S.SUCCESS).run_id
    age_the_runs_so_far(monkeypatch, days=30)
    # a recent drain run evaluates the checks again: the old one no longer holds their latest state
    recent = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, instance=instance,
                                             run_config=FAST).run_id

    result = prune_history(instance)
    assert result.success
    assert [r for r in old if instance.get_run_record_by_id(r)] == []
    assert instance.all_logs(drained.run_id) == [] and not outputs.exists()
    kept = [*in_flight, not_ours, recent, result.run_id]
    assert [r for r in kept if instance.get_run_record_by_id(r) is None] == []
    [message] = logged(instance, result.run_id)
    assert message.startswith("deleted 4 finished run(s) older than 30 days (created before ")
    assert "stopped" not in message


def test_prune_run_history_keeps_the_runs_holding_an_idle_sites_latest_materializations_and_checks(
        settings, resource, redis_client, site_instance, monkeypatch):
    """A site idle for a month (a telescope in maintenance): its last drain run was deleted with
    the rest, and the UI showed its assets never materialized and the dead-letter check never
    evaluated, a dead letter waiting for an operator among what went. That run is kept until a
    newer run holds the assets' and checks' latest state; the old runs around it still go (the
    record queries step past a kept run: with one record a query, they found it for ever)."""
    from obs_pipeline.dagster_defs.jobs import MAIN_ASSET, REPLICA_ASSET

    instance = site_instance
    monkeypatch.setattr(operations, "HISTORY_CHUNK", 1)
    S = DagsterRunStatus
    before = instance.create_run_for_job(drain_buffer, status=S.SUCCESS).run_id

    def drain_one() -> str:
        doc, _ = seed_example(settings.site)
        redis_client.lpush(SiteKeys(settings.site).buffer, json.dumps(doc))
        run = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, instance=instance, run_config=FAST)
        assert run.success
        return run.run_id

    def holders() -> set[str]:
        return {instance.get_latest_materialization_event(key).run_id for key in (MAIN_ASSET, REPLICA_ASSET)} | {
            instance.get_latest_asset_check_evaluation_record(key).run_id
            for key in no_dead_letters.check_keys | operations.replica_replays.check_keys}

    last_work = drain_one()
    assert holders() == {last_work}
    after = [instance.create_run_for_job(drain_buffer, status=S.SUCCESS).run_id for _ in range(2)]
    age_the_runs_so_far(monkeypatch, days=30)

    assert prune_history(instance).success
    assert [r for r in [before, last_work, *after] if instance.get_run_record_by_id(r)] == [last_work]
    assert holders() == {last_work}

    newer = drain_one()
    age_the_runs_so_far(monkeypatch, days=30)  # the newer run is old too, but holds the latest state now
    assert prune_history(instance).success
    assert instance.get_run_record_by_id(last_work) is None and instance.get_run_record_by_id(newer)
    assert holders() == {newer}


def test_prune_run_history_stops_at_its_caps_oldest_first_and_a_bad_config_changes_nothing(site_instance,
                                                                                           monkeypatch):
    """One run must not go on for ever (run monitoring would fail it at 900 s): it stops at
    max_runs or budget_s, saying so, and the next run goes on where it stopped."""
    instance = site_instance
    monkeypatch.setattr(operations, "HISTORY_CHUNK", 1)  # and the record queries follow the deletions
    runs = [instance.create_run_for_job(drain_buffer, status=DagsterRunStatus.SUCCESS).run_id for _ in range(5)]
    folders = [Path(instance.storage_directory()) / r for r in runs]
    for folder in folders:
        (folder / "drain_batches").mkdir(parents=True)
        (folder / "drain_batches" / "result").write_bytes(b"pickled")
    age_the_runs_so_far(monkeypatch, days=30)

    def left() -> list[str]:
        return [r for r in runs if instance.get_run_record_by_id(r)]

    for config, message in [
        ({"older_than_days": 0.5}, "older_than_days must be at least 1, not 0.5: "),
        ({"max_runs": 0}, "max_runs must be at least 1, not 0"),
        ({"budget_s": 0}, "budget_s must be more than 0 seconds, not 0"),
        ({"budget_s": 800}, "budget_s 800 s + 120 s (the run's start and end, the deletion in hand) outlasts the "
         "run's max runtime of 900 s (run_monitoring.max_runtime_seconds in dagster.yaml), after which monitoring "
         "fails it: lower budget_s to 780 or less"),
    ]:
        refused = prune_history(instance, **config)
        assert not refused.success
        failure = next(e for e in refused.all_events if e.event_type == DagsterEventType.STEP_FAILURE)
        assert message in failure.event_specific_data.error.message
        assert "\n" not in failure.event_specific_data.error.message.strip()
        assert left() == runs and all(f.exists() for f in folders)

    capped = prune_history(instance, max_runs=2)
    assert capped.success and left() == runs[2:]  # the oldest first
    assert [f.exists() for f in folders] == [False, False, True, True, True]
    [message] = logged(instance, capped.run_id)
    assert message.startswith("deleted 2 finished run(s) ")
    assert message.endswith("; stopped at max_runs (2), the rest are left for the next run")

    spent = prune_history(instance, budget_s=0.001)  # one a run at least
    assert spent.success and left() == runs[3:]
    assert logged(instance, spent.run_id)[0].endswith("stopped at budget_s (0.001 s), the rest are left for the next run")

    rest = prune_history(instance)
    assert rest.success and left() == [] and not any(f.exists() for f in folders)
    assert logged(instance, rest.run_id)[0].startswith("deleted 2 finished run(s) ")
    assert prune_history(instance).success  # the refused and capped prune runs are recent: kept
    assert instance.get_run_record_by_id(capped.run_id) is not None


def test_the_instance_keeps_schedule_and_sensor_ticks_for_a_bounded_time(site_instance):
    """Dagster keeps every tick but skipped sensor ticks for ever. One number of days for the
    sensor's ticks: the daemon purges each number after each tick, a DELETE on main."""
    assert set(site_instance.get_tick_retention_settings(InstigatorType.SENSOR).values()) == {7}
    assert set(site_instance.get_tick_retention_settings(InstigatorType.SCHEDULE).values()) == {90}
    assert (Path(__file__).parents[1] / "dagster.yaml").read_text() == DAGSTER_YAML.read_text()  # the image's copy


def test_a_run_whose_op_was_retried_counts_what_every_attempt_drained(settings, resource, redis_client, monkeypatch):
    """Main unreachable after a first batch, and again at the retry: each op retry started a new
    summary, and the run's output, its log line and report_replication's applied_this_run
    counted the last attempt alone (1 of 2 applied), its transient_errors too (0 of 2). They
    count the whole run now."""
    from obs_pipeline.apply import MainDatabase, TransientError

    keys = SiteKeys(settings.site)
    ids = []
    for _ in range(2):
        doc, _ = seed_example(settings.site)
        ids.append(doc["transaction_id"])
        redis_client.lpush(keys.buffer, json.dumps(doc))
    apply_batch, calls = MainDatabase.apply_batch, []

    def second_call_finds_main_unreachable(self, transactions):
        calls.append(len(transactions))
        if len(calls) in (2, 3):
            raise TransientError("server closed the connection unexpectedly")
        return apply_batch(self, transactions)

    monkeypatch.setattr(MainDatabase, "apply_batch", second_call_finds_main_unreachable)
    with DagsterInstance.ephemeral() as instance:
        result = drain_buffer.execute_in_process(
            resources={"obs_pipeline": resource}, instance=instance,
            run_config={"ops": {"drain_batches": {"config": {"idle_exit_s": 0, "batch_size": 1,
                                                             "transient_retry_wait_s": 0.1}}}})
        assert result.success
        assert len([e for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]) == 2
        drained = result.output_for_node("drain_batches")
        assert drained["applied"] == 2 and drained["batches"] >= 2, drained
        assert drained["transient_errors"] == 2, drained
        [replica] = [e.event_specific_data.materialization for e in result.all_events
                     if e.event_type == DagsterEventType.ASSET_MATERIALIZATION and e.step_key == "report_replication"]
        assert replica.metadata["applied_this_run"].value == 2
        assert any(f"drained 2 transactions in {drained['batches']} batches" in (e.user_message or "")
                   for e in instance.all_logs(result.run_id))
    assert all(json.loads(redis_client.get(keys.transaction(i)))["status"] == "replicated" for i in ids)


@pytest.mark.parametrize("lost", ["commit's answer", "acknowledgement"])
def test_a_batch_committed_before_an_op_retry_is_counted_by_the_run(settings, resource, redis_client, main_engine,
                                                                     monkeypatch, lost):
    """Main committed a batch and then its answer was lost (the link dropped), or Redis dropped
    the acknowledgement after it: the op retry found the batch applied on main and applied
    nothing twice, but the run said "drained 0 transactions in 1 batches", applied_this_run 0,
    of the batch it had committed. It counts what it found applied already now."""
    import redis as redis_lib

    from obs_pipeline.apply import MainDatabase, TransientError
    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.ingest import TransactionBuffer
    from obs_pipeline_tests.workload import assert_applied_exactly_once, buffer_observations

    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 4)
    ids = [tx for o in observations for tx in (o.start_tx, o.finish_tx) if tx]
    calls = []
    if lost == "commit's answer":
        apply_batch = MainDatabase.apply_batch

        def answer_lost(self, transactions, *args, **kwargs):
            result = apply_batch(self, transactions, *args, **kwargs)
            calls.append(len(transactions))
            if len(calls) == 1:
                raise TransientError("server closed the connection unexpectedly")
            return result
        monkeypatch.setattr(MainDatabase, "apply_batch", answer_lost)
    else:
        acknowledge = BufferStore.acknowledge

        def acknowledgement_lost(self, token, outcome):
            calls.append(outcome)
            if len(calls) == 1:
                raise redis_lib.ConnectionError("Connection closed by server.")
            return acknowledge(self, token, outcome)
        monkeypatch.setattr(BufferStore, "acknowledge", acknowledgement_lost)
    with DagsterInstance.ephemeral() as instance:
        result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, instance=instance,
                                                 run_config=FAST)
        assert result.success
        assert [e for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
        drained = result.output_for_node("drain_batches")
        assert (drained["applied"], drained.get("already_applied", 0)) == (0, len(ids)), drained
        [replica] = [e.event_specific_data.materialization for e in result.all_events
                     if e.event_type == DagsterEventType.ASSET_MATERIALIZATION and e.step_key == "report_replication"]
        assert replica.metadata["applied_this_run"].value == 0
        assert replica.metadata["already_applied_this_run"].value == len(ids)
        assert any(f"drained 0 transactions in 1 batches, and found {len(ids)} applied already" in (e.user_message or "")
                   for e in instance.all_logs(result.run_id))
    assert [buf.status(tx_id) for tx_id in ids] == ["replicated"] * len(ids)
    buf.close()
    assert_applied_exactly_once(main_engine, observations)


def test_a_batch_acknowledged_before_redis_was_lost_is_counted_by_the_run(settings, resource, redis_client, main_engine,
                                                                         monkeypatch):
    """Main committed a batch and Redis took its acknowledgement, then Redis was lost as the
    drain marked it applied: the op retry had nothing left to find of it (acknowledged), and the
    run said "drained 0 transactions", applied_this_run 0, with no event of the batch main
    committed in it. It is counted and reported as the batch it is."""
    import redis as redis_lib

    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.ingest import TransactionBuffer
    from obs_pipeline_tests.workload import assert_applied_exactly_once, buffer_observations

    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 4)
    ids = [tx for o in observations for tx in (o.start_tx, o.finish_tx) if tx]
    set_status, lost = BufferStore.set_status, []

    def lost_as_the_batch_is_marked_applied(self, transaction_ids, status):
        if status == "applied" and not lost:
            lost.append(status)
            raise redis_lib.ConnectionError("Connection closed by server.")
        return set_status(self, transaction_ids, status)
    monkeypatch.setattr(BufferStore, "set_status", lost_as_the_batch_is_marked_applied)
    with DagsterInstance.ephemeral() as instance:
        result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, instance=instance,
                                                 run_config=FAST)
        assert result.success and lost
        assert [e for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
        drained = result.output_for_node("drain_batches")
        assert drained["applied"] + drained.get("already_applied", 0) == len(ids), drained
        main = [e.asset_materialization for e in instance.all_logs(result.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)
                if e.asset_materialization.asset_key == MAIN_ASSET]
        assert sum(m.metadata["applied"].value for m in main) == drained["applied"] > 0, [m.metadata for m in main]
    assert [buf.status(tx_id) for tx_id in ids] == ["replicated"] * len(ids)
    buf.close()
    assert_applied_exactly_once(main_engine, observations)


def test_a_retry_run_that_finds_the_list_changing_fails_saying_what_to_do(settings, resource, redis_client,
                                                                         monkeypatch):
    """The sensor's drain runs dead-letter as they go: a retry_dead_letters run that found the
    list changed at each of its reads failed with "Error occurred while executing op", the
    reason (stop the drain a moment, nothing was changed) only in the cause below."""
    from obs_pipeline.dead_letters import DeadLetters

    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.failed, json.dumps({**seed_example(settings.site)[0],
                                                "failure": {"reason": "x", "kind": "permanent"}}))
    read = DeadLetters.list

    def a_drain_dead_letters_meanwhile(self, client=None):
        letters = read(self, client)
        redis_client.lpush(keys.failed, json.dumps({"transaction_id": f"bad-{uuid.uuid4()}",
                                                    "failure": {"reason": "unreadable", "kind": "invalid"}}))
        return letters

    monkeypatch.setattr(DeadLetters, "list", a_drain_dead_letters_meanwhile)
    result = retry_dead_letters.execute_in_process(
        resources={"obs_pipeline": resource}, raise_on_error=False,
        run_config={"ops": {"requeue_dead_letters": {"config": {"all": True}}}})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE)
    message = failure.event_specific_data.error.message
    assert f"the dead-letter list of site {settings.site} changed each of the 20 times" in message, message
    assert "Error occurred while executing op" not in message
    assert redis_client.llen(keys.buffer) == 0 and redis_client.llen(keys.failed) == 21  # nothing requeued


def test_a_retry_run_of_a_spooled_line_redis_could_not_take_fails_in_its_line_and_keeps_it(
        settings, resource, redis_client):
    """A `refused_spool_line` letter cannot be retried (pushed again it is refused again): the
    CLI says so in one line; the retry job failed with "Error occurred while executing op"."""
    keys = SiteKeys(settings.site)
    letter = {"transaction_id": "obs-1", "spool_line": "{not json",
              "failure": {"reason": "the spooled line cannot be pushed to Redis", "kind": "refused_spool_line"}}
    redis_client.lpush(keys.failed, json.dumps(letter))
    result = retry_dead_letters.execute_in_process(
        resources={"obs_pipeline": resource}, raise_on_error=False,
        run_config={"ops": {"requeue_dead_letters": {"config": {"transaction_ids": ["obs-1"]}}}})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE)
    message = failure.event_specific_data.error.message
    assert "dead letter obs-1 is a spooled line Redis could not take, and cannot be retried" in message, message
    assert "Error occurred while executing op" not in message
    assert redis_client.llen(keys.buffer) == 0 and redis_client.llen(keys.failed) == 1  # nothing requeued


def test_a_terminated_drain_run_stops_and_its_op_is_not_retried(settings, resource, redis_client):
    """Terminate (the UI's button) marks the run CANCELING and interrupts its worker (SIGINT).
    With the in-process executor, drain_batches' RetryPolicy took that interrupt for a failure
    and retried the op 2 s later (dagster-io/dagster#15026): the drain took the lease again and
    the run went on draining, to end SUCCESS. It stops now, once, and the run ends CANCELED."""
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, json.dumps(seed_example(settings.site)[0]))
    config = {"ops": {"drain_batches": {"config": {"idle_exit_s": 20, "budget_s": 60}}}}
    with instance_for_test() as instance:
        def terminate():
            deadline = time.monotonic() + 30
            while not redis_client.exists(keys.lease):  # the drain has started
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            time.sleep(0.5)
            [run] = instance.get_runs()
            instance.report_run_canceling(run)  # what the run launcher's terminate() does, then the
            os.kill(os.getpid(), signal.SIGINT)  # code server interrupts the run worker's main thread

        result = _beside(terminate, lambda: drain_buffer.execute_in_process(
            resources={"obs_pipeline": resource}, instance=instance, run_config=config, raise_on_error=False))
        events = [e.event_type for e in result.all_events if e.step_key == "drain_batches"]
        assert DagsterEventType.STEP_UP_FOR_RETRY not in events, events
        assert events.count(DagsterEventType.STEP_START) == 1
        assert instance.get_run_by_id(result.run_id).status == DagsterRunStatus.CANCELED
    assert not redis_client.exists(keys.lease)  # released: the next drain need not wait for it
    assert redis_client.llen(keys.buffer) + redis_client.llen(keys.processing) == 0  # drained before it


def test_a_statement_timeout_is_retried_in_pieces_within_the_run_not_as_op_retries(settings, resource, redis_client,
                                                                                   main_engine):
    """Main answers but cancels the batch (statement_timeout 0.3 s; a trigger makes each file
    insert take 10 ms, so 60 transactions with 80 files take 0.8 s whole). The drain halves
    its pieces itself, in the run. Each timeout was also an op retry, 2, 4, 8 ... s apart, and
    the run failed after 8 of them: a batch of 2,000 takes 11 halvings to reach one transaction
    and 5 timeouts alone to dead-letter it. Now: no op retry, a warning in the run's log per
    timeout, the run succeeds with everything applied once."""
    from obs_pipeline.ingest import TransactionBuffer
    from obs_pipeline_tests.workload import (assert_applied_exactly_once, buffer_observations, slow_file_inserts,
                                             with_statement_timeout)

    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 40, finish_every=2)  # 60 transactions, 80 files
    buf.close()
    timed = ObsPipelineResource(site=settings.site, redis_url=settings.redis_url,
                                main_db_url=with_statement_timeout(settings, 300).main_db_url,
                                replica_db_url=settings.replica_db_url)
    with slow_file_inserts(main_engine, 0.01), DagsterInstance.ephemeral() as instance:
        result = drain_buffer.execute_in_process(resources={"obs_pipeline": timed}, run_config=FAST,
                                                 instance=instance)
        warned = [e.user_message for e in instance.all_logs(result.run_id)
                  if e.level == logging.WARNING and "statement timeout on main" in (e.user_message or "")]
    assert result.success
    assert not [e for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
    assert warned and all("retrying the batch in pieces of" in m for m in warned), warned
    assert_applied_exactly_once(main_engine, observations)
    assert redis_client.llen(SiteKeys(settings.site).failed) == 0


def test_a_drain_run_terminated_while_main_applies_keeps_the_lease_until_main_answers(
        settings, resource, redis_client, main_engine):
    """Terminate (the UI's button) while main applies a batch, here held up by another
    session's row lock: the run's drain waits for main's answer, renewing the lease, before it
    lets go of it; meanwhile another drain (the sensor's next run) cannot claim that batch and
    apply it beside this one. The run ends CANCELED, its drain_batches failure saying why; the
    next drain finds the batch applied: each transaction once."""
    from obs_pipeline.dagster_defs.jobs import TERMINATED
    from obs_pipeline.drain import Drain, DrainBusy, DrainConfig
    from obs_pipeline.ingest import TransactionBuffer
    from obs_pipeline.stack.osutil import wait_until
    from obs_pipeline_tests.workload import (assert_applied_exactly_once, buffer_observations,
                                             drain_until_settled)

    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 6, finish_every=2)  # 9 transactions
    buf.close()
    keys = SiteKeys(settings.site)
    seen: dict = {}
    lease_ttl_s = 3  # the look below comes after it: the lease is there only if renewed
    config = {"ops": {"drain_batches": {"config": {"idle_exit_s": 0, "budget_s": 60,
                                                   "lease_ttl_s": lease_ttl_s}}}}

    def main_says(sql: str) -> int:
        with main_engine.connect() as conn:
            return conn.execute(sa.text(sql)).scalar_one()

    def another_drain_claims() -> str:
        other = Drain(settings, DrainConfig(lease_ttl_s=lease_ttl_s))
        try:
            other.acquire()
            return "took the lease"
        except DrainBusy:
            return "busy"
        finally:
            other.close()

    with instance_for_test() as instance:
        def terminate_then_look(blocker) -> None:
            try:
                assert wait_until(lambda: main_says(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND application_name = 'obs-pipeline drain'") > 0, timeout=30)
                [run] = instance.get_runs()
                instance.report_run_canceling(run)  # the run launcher's terminate(), then the code
                os.kill(os.getpid(), signal.SIGINT)  # server interrupts the worker's main thread
                time.sleep(lease_ttl_s + 1.0)
                seen["lease"] = redis_client.get(keys.lease)
                seen["another drain"] = another_drain_claims()
                seen["applied"] = main_says("SELECT count(*) FROM obs_pipeline_applied")
            finally:
                blocker.commit()  # the lock goes: main applies the batch

        with main_engine.connect() as blocker:
            blocker.execute(sa.text("SELECT id FROM obs_unit WHERE id = 1 FOR UPDATE"))
            looker = threading.Thread(target=terminate_then_look, args=(blocker,))
            looker.start()
            try:
                result = drain_buffer.execute_in_process(
                    resources={"obs_pipeline": resource}, instance=instance, run_config=config,
                    raise_on_error=False)
            finally:
                looker.join()
        assert seen["applied"] == 0, seen  # main was still applying when the lease was looked at
        assert seen["lease"] is not None and seen["another drain"] == "busy", seen
        assert instance.get_run_by_id(result.run_id).status == DagsterRunStatus.CANCELED
        events = [e for e in result.all_events if e.step_key == "drain_batches"]
        assert DagsterEventType.STEP_UP_FOR_RETRY not in [e.event_type for e in events]
        [failure] = [e for e in events if e.event_type == DagsterEventType.STEP_FAILURE]
        assert failure.event_specific_data.error.message.strip().endswith(TERMINATED), failure
    assert not redis_client.exists(keys.lease)  # let go once main answered
    drain_until_settled(settings, batch_size=100)
    assert_applied_exactly_once(main_engine, observations)
    for queue in (keys.buffer, keys.processing, keys.failed):
        assert redis_client.llen(queue) == 0, queue


@pytest.mark.parametrize("models, message", [
    ("obs_pipeline.models", "OBS_MODELS='obs_pipeline.models' is not of the form module:Base"),
    ("nosuch_module:Base", "OBS_MODELS='nosuch_module:Base' cannot be loaded: No module named 'nosuch_module'"),
    ("obs_pipeline.models:NoBase", "OBS_MODELS='obs_pipeline.models:NoBase' cannot be loaded: module "
                                   "'obs_pipeline.models' has no attribute 'NoBase'"),
    ("os:path", "OBS_MODELS='os:path' is not a SQLAlchemy declarative base"),
], ids=["malformed", "no module", "no attribute", "not a base"])
def test_a_wrong_obs_models_is_a_config_error_in_one_line_to_scripts_and_operator_jobs(
        settings, resource, redis_client, monkeypatch, models, message):
    """A bad OBS_MODELS raised InvalidTransaction, the error of bad input to a script, where every
    other setting raises ConfigError; and the retry and discard jobs failed on its traceback
    ("Error occurred while executing op"). A ConfigError now, one line naming OBS_MODELS, from
    the registry, TransactionBuffer.from_env, each operator job and the check; nothing changes."""
    from obs_pipeline.config import ConfigError
    from obs_pipeline.ingest import TransactionBuffer
    from obs_pipeline.model_registry import InvalidTransaction, ModelRegistry

    keys = SiteKeys(settings.site)
    doc = seed_example(settings.site)[0]
    redis_client.lpush(keys.failed, json.dumps({**doc, "failure": {"reason": "x", "kind": "permanent"}}))
    monkeypatch.setenv("OBS_MODELS", models)
    for make in (lambda: ModelRegistry.from_path(models),
                 lambda: TransactionBuffer.from_env(site=settings.site, redis_url=settings.redis_url)):
        with pytest.raises(ConfigError) as raised:
            make()
        assert not isinstance(raised.value, InvalidTransaction)
        assert str(raised.value).startswith(message) and "\n" not in str(raised.value), str(raised.value)
    broken = ObsPipelineResource(**{**resource.__dict__, "models": models})
    for run_job, op_config in ((retry_dead_letters, {"requeue_dead_letters": {"config": {"all": True}}}),
                               (discard_dead_letters, {"drop_dead_letters": {"config": {
                                   "transaction_ids": [doc["transaction_id"]]}}}),
                               (drain_buffer, FAST["ops"])):
        result = run_job.execute_in_process(resources={"obs_pipeline": broken}, raise_on_error=False,
                                        run_config={"ops": op_config})
        assert not result.success
        error = next(e for e in result.all_events
                     if e.event_type == DagsterEventType.STEP_FAILURE).event_specific_data.error
        assert error.message.startswith(f"dagster._core.definitions.events.Failure: {message}"), (run_job, error.message)
        assert "Error occurred while executing op" not in error.message
    with pytest.raises(Failure) as failed:
        no_dead_letters(obs_pipeline=broken)
    assert failed.value.description.startswith(message) and "\n" not in failed.value.description
    assert [json.loads(raw)["transaction_id"] for raw in redis_client.lrange(keys.failed, 0, -1)] == [
        doc["transaction_id"]]
    assert redis_client.llen(keys.buffer) == 0 and not redis_client.exists(keys.lease)


def test_a_retry_says_which_ids_are_new_for_reused_ones(settings, resource, redis_client):
    """retry_dead_letters requeued a `reused_id` letter under a new id, listed among the others in
    its output and log: which one was the reused id's, the operator could not tell. Its output
    (`renamed`: the new id and the reused one), metadata and log say so, as `failed retry` does."""
    keys = SiteKeys(settings.site)
    plain = {**seed_example(settings.site)[0], "failure": {"reason": "x", "kind": "permanent"}}
    reused = {"transaction_id": "obs-1", "steps": [{"step_id": "s1", "operation": "create", "model_class": "ObsUnit",
                                                    "data": {"id": 9981, "name": "second"}}],
              "failure": {"reason": "its transaction_id was applied already", "kind": "reused_id"}}
    for doc in (plain, reused):
        redis_client.lpush(keys.failed, json.dumps(doc))
    result = retry_dead_letters.execute_in_process(
        resources={"obs_pipeline": resource}, run_config={"ops": {"requeue_dead_letters": {"config": {"all": True}}}})
    assert result.success
    out = result.output_for_node("requeue_dead_letters")
    new_id = next(tx_id for tx_id in out["requeued"] if tx_id != plain["transaction_id"])
    assert out.get("renamed") == [{"transaction_id": new_id, "reused_id": "obs-1"}], out
    [output] = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_OUTPUT]
    assert output.event_specific_data.metadata["renamed"].value == f"{new_id} (for obs-1)"


def test_a_retry_of_thousands_lists_the_first_of_them_in_its_log_and_metadata(settings, resource, redis_client):
    """retry_dead_letters put every id it requeued in its log line, and every letter it left in a
    warning and in its metadata: 100,000 letters a producer's garbage left made each a 17 MB
    event (measured here), a million 170 MB, in Dagster's storage on main and on the run's page.
    They list the first DEAD_LETTERS_LISTED (50), then how many more, as a drain's run lists
    what it dead-lettered; the output keeps them all."""
    from obs_pipeline.dagster_defs.jobs import DEAD_LETTERS_LISTED

    keys = SiteKeys(settings.site)
    good = [{**seed_example(settings.site, obs_unit_id=n)[0], "failure": {"reason": "x", "kind": "permanent"}}
            for n in range(DEAD_LETTERS_LISTED + 5)]
    idless = [{"endpoint": f"e{n}", "failure": {"reason": "unreadable", "kind": "invalid"}}
              for n in range(DEAD_LETTERS_LISTED + 10)]
    redis_client.lpush(keys.failed, *[json.dumps(doc) for doc in good + idless])  # oldest first
    with DagsterInstance.ephemeral() as instance:
        result = retry_dead_letters.execute_in_process(
            resources={"obs_pipeline": resource}, instance=instance,
            run_config={"ops": {"requeue_dead_letters": {"config": {"all": True}}}})
        said = [(e.level, e.user_message) for e in instance.all_logs(result.run_id)
                if (e.user_message or "").startswith(("requeued ", f"{len(idless)} dead letter(s)"))]
    assert result.success
    out = result.output_for_node("requeue_dead_letters")
    assert out["requeued"] == [doc["transaction_id"] for doc in good] and len(out["left"]) == len(idless)
    [(_, requeued), (level, left)] = said
    assert requeued == (f"requeued {len(good)} transaction(s): "
                        + ", ".join(doc["transaction_id"] for doc in good[:DEAD_LETTERS_LISTED]) + "; and 5 more")
    named = [f"{kept['letter']}: {kept['why']}" for kept in out["left"][:DEAD_LETTERS_LISTED]]
    assert level == logging.WARNING and left == (
        f"{len(idless)} dead letter(s) stay listed, as they cannot be retried: " + "; ".join(named)
        + "; and 10 more (`obs-pipeline failed list` shows them)"), left
    [output] = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_OUTPUT]
    metadata = output.event_specific_data.metadata
    assert metadata["left"].value == len(idless) and metadata["requeued"].value == len(good)
    assert metadata["left_letters"].value == "\n".join(named) + "\n... and 10 more", metadata["left_letters"]


def test_a_retry_of_all_names_the_letters_it_leaves_and_why(settings, resource, redis_client):
    """retry_dead_letters with `all: true` said only how many it requeued: the letters it left
    listed (a spooled line Redis could not take, a letter without a usable id) went unnamed, the
    check still failing on them, and the operator left to find them. Its output and its
    metadata name each now, as `failed list` shows them after the run (by id, or `#N@digest`), and why."""
    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.model_registry import ModelRegistry

    keys = SiteKeys(settings.site)
    good = {**seed_example(settings.site)[0], "failure": {"reason": "x", "kind": "permanent"}}
    spooled = {"transaction_id": "obs-1", "spool_line": "{not json",
               "failure": {"reason": "the spooled line cannot be pushed to Redis", "kind": "refused_spool_line"}}
    idless = {"endpoint": "e", "failure": {"reason": "unreadable", "kind": "invalid"}}
    for doc in (spooled, good, idless):  # oldest first
        redis_client.lpush(keys.failed, json.dumps(doc))
    result = retry_dead_letters.execute_in_process(
        resources={"obs_pipeline": resource}, run_config={"ops": {"requeue_dead_letters": {"config": {"all": True}}}})
    assert result.success
    out = result.output_for_node("requeue_dead_letters")
    assert out["requeued"] == [good["transaction_id"]]
    handle = re.fullmatch(r"#2@([0-9a-f]{8})", out["left"][1]["letter"])
    assert handle is not None, out["left"]
    assert [(left["letter"], left["transaction_id"]) for left in out["left"]] == [
        ("obs-1", "obs-1"), (f"#2@{handle.group(1)}", None)]
    assert "a spooled line Redis could not take" in out["left"][0]["why"], out["left"]
    assert "no usable transaction id" in out["left"][1]["why"], out["left"]
    [output] = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_OUTPUT]
    metadata = output.event_specific_data.metadata
    assert metadata["requeued"].value == 1 and metadata["left"].value == 2, metadata
    lines = metadata["left_letters"].value.splitlines()
    assert [line.split(": ")[0] for line in lines] == ["obs-1", out["left"][1]["letter"]], lines
    listed = DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models)).list()
    assert [letter.transaction_id for letter in listed] == ["obs-1", None]  # the places named
    assert redis_client.llen(keys.buffer) == 1


def _drain_buffer_of_defs():
    """drain_buffer as the UI launches it (resources of `defs`, read from OBS_*): re-execution
    needs a job it can rebuild."""
    from obs_pipeline.definitions import defs
    return defs.get_job_def("drain_buffer")


def test_a_drain_run_re_executed_from_the_ui_applies_nothing_twice(settings, redis_client, main_engine, monkeypatch):
    """The UI's re-execute: from failure (report_replication failed, Redis lost after the drain)
    runs that op alone on the parent's output; all steps (of a run that succeeded) drains again.
    Neither applies a transaction a second time, and the lease is free after each."""
    from dagster import ReexecutionOptions, execute_job, reconstructable

    from obs_pipeline.buffer_store import BufferStore

    for name, value in (("OBS_SITE", settings.site), ("OBS_REDIS_URL", settings.redis_url),
                        ("OBS_MAIN_DB_URL", settings.main_db_url), ("OBS_REPLICA_DB_URL", settings.replica_db_url)):
        monkeypatch.setenv(name, value)
    keys = SiteKeys(settings.site)
    first, _ = seed_example(settings.site)
    redis_client.lpush(keys.buffer, json.dumps(first))
    job_ = reconstructable(_drain_buffer_of_defs)

    def applied() -> int:
        with main_engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM obs_pipeline_applied")).scalar_one()

    with instance_for_test() as instance:
        with monkeypatch.context() as lost:
            lost.setattr(BufferStore, "depths", lambda self: (_ for _ in ()).throw(
                __import__("redis").ConnectionError("Error 111 connecting. Connection refused.")))
            with execute_job(job_, instance, run_config=FAST, raise_on_error=False) as parent:
                assert not parent.success and parent.output_for_node("drain_batches")["applied"] == 1
        assert applied() == 1

        second, _ = seed_example(settings.site)  # buffered after the parent drained
        redis_client.lpush(keys.buffer, json.dumps(second))
        with execute_job(job_, instance, reexecution_options=ReexecutionOptions.from_failure(
                parent.run_id, instance)) as retried:
            assert retried.success
            steps = {e.step_key for e in retried.all_events if e.event_type == DagsterEventType.STEP_START}
            assert steps == {"report_replication"}
        assert applied() == 1 and redis_client.llen(keys.buffer) == 1  # nothing drained, nothing again

        def told(run_id: str, name: str) -> list[int]:  # what the run's materializations say under `name`
            events = [e.dagster_event for e in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)]
            return [m.metadata[name].value for m in (e.event_specific_data.materialization for e in events)
                    if name in m.metadata]

        # the parent's drain is told once over the two runs: its batch by the parent, the report
        # (failed in the parent before it logged anything) by the re-execution, from the parent's output
        assert (sum(told(parent.run_id, "applied")), told(retried.run_id, "applied")) == (1, [])
        assert (told(parent.run_id, "applied_this_run"), told(retried.run_id, "applied_this_run")) == ([], [1])

        for _ in range(2):  # all steps of a run that succeeded: drains what is new, once
            with execute_job(job_, instance, reexecution_options=ReexecutionOptions(
                    parent_run_id=retried.run_id)) as again:
                assert again.success, again
        assert applied() == 2 and redis_client.llen(keys.buffer) == 0
        assert not redis_client.exists(keys.lease)
        assert redis_client.llen(keys.failed) == 0
        for doc in (first, second):
            assert json.loads(redis_client.get(keys.transaction(doc["transaction_id"])))["status"] == "replicated"


@pytest.mark.parametrize("setting, message", [
    ("main_db_url unset", "OBS_MAIN_DB_URL is not set"),
    ("main role", 'main refuses the connection (OperationalError: connection to server at'),
    ("main not postgresql", "OBS_MAIN_DB_URL must name PostgreSQL"),
    ("main down", "main unreachable (OperationalError: connection to server at"),
    # ProgrammingError's traceback (relation "obs_pipeline_applied" does not exist)
    ("main's other database", "/postgres has no obs_pipeline_applied table: OBS_MAIN_DB_URL names another database"),
], ids=["main url unset", "main role", "main not postgresql", "main down", "main's other database"])
def test_the_prune_job_with_a_wrong_main_setting_fails_in_one_line_and_prunes_nothing(
        settings, resource, main_engine, monkeypatch, setting, message):
    """The schedule's run in a daemon whose OBS_MAIN_DB_URL is unset or wrong: the run says so
    on its first line, as drain_buffer does, not under 'Error occurred while executing op'."""
    with main_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO obs_pipeline_applied (transaction_id, site, applied_at) VALUES "
                             "('old', :s, now() - interval '10 days')"), {"s": settings.site})
    monkeypatch.delenv("OBS_MAIN_DB_URL", raising=False)
    if setting == "main_db_url unset":
        url = None
    elif setting == "main role":
        url = sa.engine.make_url(settings.main_db_url).set(username="no_such_role").render_as_string(
            hide_password=False)
    elif setting == "main down":
        from obs_pipeline.stack.osutil import pick_free_ports
        url = sa.engine.make_url(settings.main_db_url).set(port=pick_free_ports(1)[0]).render_as_string(
            hide_password=False)
    elif setting == "main's other database":  # the server's, without the pipeline's schema
        url = sa.engine.make_url(settings.main_db_url).set(database="postgres").render_as_string(hide_password=False)
    else:
        url = "mysql://127.0.0.1/obs"
    wrong = ObsPipelineResource(**{**resource.__dict__, "main_db_url": url})
    result = prune_applied_transactions.execute_in_process(resources={"obs_pipeline": wrong}, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE)
    first = failure.event_specific_data.error.message.strip().splitlines()[0]
    assert first.startswith("dagster._core.definitions.events.Failure: ") and message in first, \
        failure.event_specific_data.error.message
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT transaction_id FROM obs_pipeline_applied")).scalars().all() == ["old"]


@pytest.mark.parametrize("job, op_config", [
    (retry_dead_letters, {"requeue_dead_letters": {"config": {"all": True}}}),
    (retry_dead_letters, {"requeue_dead_letters": {"config": {"transaction_ids": ["some-id"]}}}),
    (discard_dead_letters, {"drop_dead_letters": {"config": {"transaction_ids": ["some-id"]}}}),
], ids=["retry all", "retry ids", "discard"])
def test_a_dead_letter_job_with_the_sites_redis_down_fails_in_one_line(settings, resource, job, op_config):
    """As the drain's run, the checks and the prune job say it: which site's Redis, and what to check."""
    from obs_pipeline.stack.osutil import pick_free_ports

    port = pick_free_ports(1)[0]
    down = ObsPipelineResource(**{**resource.__dict__, "redis_url": f"redis://127.0.0.1:{port}/0"})
    result = job.execute_in_process(resources={"obs_pipeline": down}, raise_on_error=False,
                                    run_config={"ops": op_config})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE)
    first = failure.event_specific_data.error.message.strip().splitlines()[0]
    assert first.startswith(f"dagster._core.definitions.events.Failure: site {settings.site}: Redis unreachable ("), \
        failure.event_specific_data.error.message


@pytest.mark.parametrize("requested", [True, False], ids=["terminated from the UI", "dev stopped"])
def test_a_drain_run_terminated_while_its_op_waits_to_retry_is_not_retried(settings, resource, redis_client,
                                                                           requested):
    """Terminate (the UI's button) while drain_batches waits for its op retry (main unreachable):
    the run ends CANCELED, its drain not started again, the batch left buffered, the lease free.
    So does a run whose worker is interrupted there without a termination request (`dev`
    stopped, the daemon's service): Dagster waited for the retry in its executor, the interrupt
    was raised as the retry began, before drain_batches could say so, and the run ended FAILURE,
    "Execution was interrupted unexpectedly" (where dev's stop promises CANCELED)."""
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, json.dumps(seed_example(settings.site)[0]))
    unreachable = _with_main_unreachable(resource)
    config = {"ops": {"drain_batches": {"config": {**FAST["ops"]["drain_batches"]["config"], "budget_s": 60,
                                                   "transient_retry_wait_s": 4}}}}
    with instance_for_test() as instance:
        def op_retry_said(run_id: str) -> bool:  # its observation, logged as the wait for it begins
            return any("op retry 1 of 8 in 4 s" in (e.dagster_event.event_specific_data.asset_observation.description
                                                    or "")
                       for e in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_OBSERVATION))

        result = _stopped_in_its_op_retry_wait(instance, op_retry_said, requested, lambda: (
            drain_buffer.execute_in_process(resources={"obs_pipeline": unreachable}, instance=instance,
                                            run_config=config, raise_on_error=False)))
        logs = [e for e in instance.all_logs(result.run_id) if e.dagster_event is not None]
        kinds = [e.dagster_event.event_type for e in logs]
        assert DagsterEventType.ASSET_OBSERVATION in kinds, kinds  # the op retry's
        after = kinds[kinds.index(DagsterEventType.ASSET_OBSERVATION) + 1:]
        # the op is not tried again: it neither claims nor asks main again (a second attempt that
        # reached main would log its own op-retry observation or a materialization)
        assert DagsterEventType.ASSET_OBSERVATION not in after and DagsterEventType.ASSET_MATERIALIZATION not in after
        assert instance.get_run_by_id(result.run_id).status == DagsterRunStatus.CANCELED, kinds
        assert kinds.count(DagsterEventType.STEP_START) == 1 and DagsterEventType.STEP_RESTARTED not in kinds, kinds
    assert not redis_client.exists(keys.lease)
    assert redis_client.llen(keys.buffer) + redis_client.llen(keys.processing) == 1
    assert redis_client.llen(keys.failed) == 0


def _stopped_in_its_op_retry_wait(instance, waiting, requested: bool, run):
    """`run()` (a drain_buffer run in this process), stopped once `waiting(run_id)` says its op
    waits for a retry: SIGINT to this process, as `dev` stopping sends it, after a termination
    request where `requested` (the UI's Terminate). Its result."""
    def stop():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            runs = instance.get_runs()
            if runs and waiting(runs[0].run_id):
                break
            time.sleep(0.05)
        else:
            return
        time.sleep(0.5)  # in the wait, before the retry starts
        if requested:
            instance.report_run_canceling(runs[0])
        os.kill(os.getpid(), signal.SIGINT)

    return _beside(stop, run)


def _with_main_unreachable(resource: ObsPipelineResource) -> ObsPipelineResource:
    """The resource, its main URL on a port nothing listens on."""
    from obs_pipeline.stack.osutil import pick_free_ports

    closed = sa.engine.make_url(resource.main_db_url).set(port=pick_free_ports(1)[0])
    return ObsPipelineResource(**{**resource.__dict__, "main_db_url": closed.render_as_string(hide_password=False)})


def _beside(side, run):
    """`run()`'s result, with `side()` in a thread of its own beside it (it stops the run, or
    changes what the run meets), joined before it returns."""
    thread = threading.Thread(target=side)
    thread.start()
    try:
        return run()
    finally:
        thread.join()


@pytest.mark.parametrize("requested", [True, False], ids=["terminated from the UI", "dev stopped"])
def test_a_drain_run_stopped_while_its_op_waits_to_retry_on_redis_ends_canceled(settings, resource, redis_client,
                                                                                   monkeypatch, requested):
    """As for main unreachable (above), so for the site's Redis down: stopped while drain_batches
    waits for its op retry, the run ends CANCELED, its drain not started again. That wait was
    the retry policy's, in Dagster's executor: stopped without a termination request (`dev`
    stopped), the run ended FAILURE, and the next buffer_sensor, taking it for a failure with a
    cause, launched no drain for 60 s; terminated from the UI, the retry began, to be
    interrupted at once."""
    from obs_pipeline.stack.osutil import pick_free_ports

    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, json.dumps(seed_example(settings.site)[0]))
    down = ObsPipelineResource(**{**resource.__dict__, "redis_url": f"redis://127.0.0.1:{pick_free_ports(1)[0]}/0"})
    # the first wait 4 s, its jitter at its top (2 s, +-2 s), time to stop the run in it
    monkeypatch.setattr("dagster._core.definitions.policy.random", lambda: 1.0)
    config = {"ops": {"drain_batches": {"config": {**FAST["ops"]["drain_batches"]["config"], "budget_s": 60}}}}
    with instance_for_test() as instance:
        def waiting(run_id: str) -> bool:  # the first attempt failed on Redis: Dagster's retry event
            # where its executor waits for the retry, the op's warning where the op does
            return bool(instance.all_logs(run_id, of_type=DagsterEventType.STEP_UP_FOR_RETRY)) or any(
                "op retry 1 of 3 in 4.0 s" in (e.user_message or "") for e in instance.all_logs(run_id))

        result = _stopped_in_its_op_retry_wait(instance, waiting, requested, lambda: (
            drain_buffer.execute_in_process(resources={"obs_pipeline": down}, instance=instance,
                                            run_config=config, raise_on_error=False)))
        kinds = [e.dagster_event.event_type for e in instance.all_logs(result.run_id) if e.dagster_event is not None]
        assert instance.get_run_by_id(result.run_id).status == DagsterRunStatus.CANCELED, kinds
        assert kinds.count(DagsterEventType.STEP_START) == 1 and DagsterEventType.STEP_RESTARTED not in kinds, kinds
    assert not redis_client.exists(keys.lease)
    assert redis_client.llen(keys.buffer) == 1 and redis_client.llen(keys.failed) == 0


@pytest.mark.parametrize("first", ["main", "redis"], ids=["main unreachable first", "Redis full first"])
def test_main_and_redis_each_have_their_own_op_retries_in_a_run(settings, resource, redis_client, first):
    """Main unreachable gets 8 op retries and the site's Redis down or full 3, whatever the
    other cause took in the run: they shared Dagster's one count of attempts, so after 4 retries
    for main one Redis error failed the run at once, and after Redis's 3 main got 5. Main stays
    unreachable (a closed port); Redis is full (maxmemory 1: the claim is refused) after main's
    4th retry, or until its own 3rd."""
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, json.dumps(seed_example(settings.site)[0]))
    unreachable = _with_main_unreachable(resource)
    config = {"ops": {"drain_batches": {"config": {**FAST["ops"]["drain_batches"]["config"], "budget_s": 120,
                                                   "transient_retry_wait_s": 0.2 if first == "main" else 0.01}}}}
    limit = redis_client.config_get("maxmemory")["maxmemory"]
    with instance_for_test() as instance:
        def said(run_id: str, text: str) -> bool:  # main's op-retry observation, or Redis's warning
            return any(text in (e.user_message or "") or text in (
                getattr(getattr(e.dagster_event, "event_specific_data", None), "asset_observation", None)
                and e.dagster_event.event_specific_data.asset_observation.description or "")
                for e in instance.all_logs(run_id))

        def switch():  # Redis full once main has had 4 retries, or no longer once Redis has had its 3
            text = "op retry 4 of 8" if first == "main" else "op retry 3 of 3"
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                runs = instance.get_runs()
                if runs and said(runs[0].run_id, text):
                    break
                time.sleep(0.02)
            redis_client.config_set("maxmemory", 1 if first == "main" else limit)

        if first == "redis":
            redis_client.config_set("maxmemory", 1)
        try:
            result = _beside(switch, lambda: drain_buffer.execute_in_process(
                resources={"obs_pipeline": unreachable}, instance=instance, run_config=config, raise_on_error=False))
        finally:
            redis_client.config_set("maxmemory", limit)
        events = [e.dagster_event for e in instance.all_logs(result.run_id) if e.dagster_event is not None]
    assert not result.success
    retries = len([e for e in events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY])
    main = len([e for e in events if e.event_type == DagsterEventType.ASSET_OBSERVATION
                and "main unreachable" in (e.event_specific_data.asset_observation.description or "")])
    [failure] = [e for e in events if e.event_type == DagsterEventType.STEP_FAILURE]
    message = failure.event_specific_data.error.message
    assert "\n" not in message.strip(), message
    if first == "main":  # its 4 retries (5 if Redis filled up late), then Redis's own 3
        assert (main in (4, 5), retries - main) == (True, 3), (main, retries, message)
        assert f"site {settings.site}: Redis is full (its maxmemory is reached)" in message, message
    else:  # Redis's 3, then main's own 8
        assert (retries - main, main) == (3, 8), (main, retries, message)
        assert (f"site {settings.site}: main unreachable (" in message
                and "at 9 of the run's 12 attempts; is OBS_MAIN_DB_URL right and main up?" in message), message
    assert not redis_client.exists(keys.lease)
    assert redis_client.llen(keys.buffer) + redis_client.llen(keys.processing) == 1
    assert redis_client.llen(keys.failed) == 0
