"""Nothing lost, nothing doubled: faults injected into real processes on the real stack."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from obs_pipeline.buffer_store import BufferStore
from obs_pipeline.drain import Drain, DrainBusy, DrainConfig
from obs_pipeline.health import health_report
from obs_pipeline.ingest import InvalidTransaction, TransactionBuffer
from obs_pipeline.keys import SiteKeys
from obs_pipeline.stack.osutil import pick_free_ports, wait_until
from obs_pipeline_tests.conftest import wait_for_replica
from obs_pipeline_tests.workload import (assert_applied_exactly_once, buffer_observations, drain_one_batch,
                                         cancelled_once_while_sleeping, drain_until_settled, slow_file_inserts,
                                         with_statement_timeout)
from obs_pipeline_tests.workload import create_unit, push_raw, rename_unit, replay_paused
from obs_pipeline_tests.test_walking_skeleton import drain_until_empty

pytestmark = pytest.mark.usefixtures("clean_db")


def cli_env(settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OBS_SITE=settings.site, OBS_REDIS_URL=settings.redis_url, OBS_MAIN_DB_URL=settings.main_db_url,
               OBS_REPLICA_DB_URL=settings.replica_db_url)
    return env


def _queued_ids(redis_client, keys: SiteKeys) -> list[str]:
    """The transaction ids in the site's buffer, oldest (the drain's next) first."""
    return [json.loads(e)["transaction_id"] for e in reversed(redis_client.lrange(keys.buffer, 0, -1))]


def assert_queues_empty(redis_client, site: str) -> None:
    k = SiteKeys(site)
    assert redis_client.llen(k.buffer) == 0
    assert redis_client.llen(k.processing) == 0
    assert redis_client.zcard(k.retry) == 0
    assert redis_client.llen(k.failed) == 0, redis_client.lrange(k.failed, 0, 2)
    assert redis_client.zcard(k.awaiting_replication) == 0


@pytest.mark.slow
def test_kill_9_of_the_drain_at_random_moments_loses_and_doubles_nothing(settings, redis_client, main_engine):
    buf = TransactionBuffer(settings=settings)
    # 4,500 transactions: the 20 trials applied up to 2,920 of 3,000 on a quick host, and one
    # more would have found the buffer empty (its drain ended by itself, no kill)
    observations = buffer_observations(buf, 3000, finish_every=2)
    buf.close()
    rng = random.Random(20261122)
    env = cli_env(settings)
    cmd = [sys.executable, "-m", "obs_pipeline.cli", "drain", "--once", "--batch-size", "20", "--lease-ttl", "1.5"]
    stats = SiteKeys(settings.site).stats
    kills = left_claimed = 0
    ended = []  # trials whose drain ended before the kill: why
    for _ in range(20):
        # Kill at a random point of the claim/apply/acknowledge/replay/clean cycle: after a random
        # number of newly applied transactions, plus a few random milliseconds.
        start = int(redis_client.hget(stats, "applied_total") or 0)
        target = start + rng.randint(1, 120)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while proc.poll() is None and int(redis_client.hget(stats, "applied_total") or 0) < target:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        else:
            ended.append((proc.returncode, proc.stderr.read().decode()[-300:], start, target,
                          redis_client.hget(stats, "applied_total")))
        proc.wait()
        proc.stderr.close()
        left_claimed += redis_client.llen(SiteKeys(settings.site).processing) > 0
    assert kills == 20, ended  # every trial interrupted a drain at work
    assert left_claimed >= 3  # ... and several left a claimed batch for the next drain to reclaim
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert_applied_exactly_once(main_engine, observations)
    assert_queues_empty(redis_client, settings.site)


def test_a_second_drain_never_works_the_same_site_concurrently(settings):
    first, second = Drain(settings), Drain(settings)
    try:
        first.acquire()
        with pytest.raises(DrainBusy, match="another drain holds the lease"):
            second.acquire(wait_s=0)
    finally:
        first.close()
        second.close()



@pytest.mark.parametrize("fault", ["answered late", "connection closed"])
def test_a_drain_whose_acknowledgement_loses_redis_says_so_and_the_next_run_loses_and_doubles_nothing(
        settings, redis_client, main_engine, monkeypatch, fault):
    """The acknowledgement is a MULTI under WATCH on the lease: a socket timeout waiting for its
    EXEC (Redis applied it) or a connection Redis closed (it did not) is raised by redis-py as a
    WatchError, and the drain took it for its lease taken by another drain: it stopped, saying so,
    its lease held till its TTL. It is a Redis error like any other (the run ends with it); the
    next run finds the batch acknowledged or still in processing, and applies each once."""
    from obs_pipeline_tests.workload import exec_answered_late, kill_connection

    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 10, finish_every=2)  # 15 transactions, one batch
    buf.close()
    keys = SiteKeys(settings.site)
    drain = Drain(settings, DrainConfig(lease_ttl_s=60.0))
    execute = redis.client.Pipeline.execute
    armed = [True]

    def execute_losing_redis(pipe, *args, **kwargs):
        if armed[0] and pipe.watching and pipe.connection_pool is drain.redis.connection_pool:
            armed[0] = False
            if fault == "answered late":
                exec_answered_late(pipe)
            else:
                kill_connection(redis_client, pipe)
        return execute(pipe, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute_losing_redis)
    try:
        drain.acquire()
        with pytest.raises(redis.TimeoutError if fault == "answered late" else redis.ConnectionError):
            drain.step()
    finally:
        monkeypatch.undo()
        drain.close()
    assert not armed[0]
    redis_client.ping()  # (after the MULTI)
    assert redis_client.llen(keys.processing) == (0 if fault == "answered late" else 15)  # applied, or not
    assert redis_client.get(keys.lease) is None  # released as the run ended
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, observations)
    assert_queues_empty(redis_client, settings.site)
    ids = [o.start_tx for o in observations] + [o.finish_tx for o in observations if o.finish_tx]
    assert int(redis_client.hget(keys.stats, "applied_total")) == len(ids)
    check = TransactionBuffer(settings=settings)
    try:
        assert {check.status(i) for i in ids} == {"replicated"}
    finally:
        check.close()


def test_a_lease_whose_reply_is_lost_and_that_redis_py_sends_again_is_the_drains_own(settings, redis_client,
                                                                                     monkeypatch):
    """With a Redis URL asking redis-py to retry, a lease's SET NX whose reply was lost after
    Redis set it is sent again and answered "not set" (the key is there: its own): the drain
    said another drain held the site, and would have waited for its own lease's TTL. (The lease
    is set by a script now, ACQUIRE, which takes a lease holding its own token.)"""
    retrying = dataclasses.replace(settings, redis_url=settings.redis_url + "?retry_on_timeout=yes")
    drain = Drain(retrying, DrainConfig(lease_ttl_s=60.0))
    lease = SiteKeys(settings.site).lease
    sets: list[str] = []
    send_and_read = redis.Redis._send_command_parse_response

    def reply_lost_once(client, conn, command_name, *args, **options):
        reply = send_and_read(client, conn, command_name, *args, **options)
        if command_name == "EVALSHA" and args[1:4] == (drain.store._acquire.sha, 1, lease):
            sets.append(args[4])
            if len(sets) == 1:
                raise redis.TimeoutError("Timeout reading from socket")  # Redis set it; redis-py retries
        return reply

    monkeypatch.setattr(redis.Redis, "_send_command_parse_response", reply_lost_once)
    try:
        drain.acquire(wait_s=0)
        assert sets == [drain.token, drain.token]  # the lost one, sent again
        assert redis_client.get(lease).decode() == drain.token
    finally:
        monkeypatch.undo()
        drain.close()
    assert redis_client.get(lease) is None  # released: it was the drain's own


def test_a_lease_left_by_a_drain_of_the_same_owner_is_taken_back_and_no_other_drains_is(settings, redis_client):
    """A Dagster run's attempt that lost Redis could not release its lease, and the run's next
    attempt waited out its TTL; it takes it back now (its owner, the run, is the same), and the
    old token is fenced. Another owner's lease, or one without an owner, still keeps it out."""
    store = BufferStore(redis_client, settings.site)
    lease = SiteKeys(settings.site).lease
    left = store.acquire_lease(60, owner="dagster-run-1")
    assert left and left.startswith("dagster-run-1/")
    for other in ("dagster-run-2", "dagster-run", ""):  # ("dagster-run" is a prefix of its name, not it)
        assert store.acquire_lease(60, owner=other) is None, other
    taken = store.acquire_lease(60, owner="dagster-run-1")
    assert taken and taken != left and redis_client.get(lease).decode() == taken
    assert not store.renew_lease(left, 60)  # the attempt before it is fenced
    store.release_lease(left)
    assert redis_client.get(lease).decode() == taken
    store.release_lease(taken)
    anonymous = store.acquire_lease(60)
    assert anonymous and "/" not in anonymous
    assert store.acquire_lease(60, owner="dagster-run-1") is None and store.acquire_lease(60) is None
    store.release_lease(anonymous)
    assert redis_client.get(lease) is None


@pytest.mark.parametrize("mode", ["first", "extend", "next"])
def test_a_claim_whose_reply_is_lost_and_that_redis_py_sends_again_loses_reorders_and_doubles_nothing(
        settings, redis_client, main_engine, monkeypatch, mode):
    """A Redis URL asking redis-py to retry (`?retry_on_timeout=yes`, or `retry_on_error=`; some
    redis-py versions retry by default) has it send a command again after a socket timeout or a
    reset connection, a claim script that Redis has already run included. A claim run twice
    moved two chunks into `processing`, and the drain knew only the second: "first" finds the
    list it filled and reclaims it whole; "extend" left a chunk in the list that the
    acknowledgement trimmed as the batch's own, never applied; "next" applied a chunk of the
    prefetched batch before the older one it skipped. The reply is lost here once, after Redis
    ran the script."""
    from obs_pipeline import buffer_store

    monkeypatch.setattr(buffer_store, "CLAIM_CHUNK", 4)  # batches of 10: chunks of 4, 4, 2
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 20, finish_every=2)  # 30 transactions, three batches
    buf.close()
    buffered = [tx for o in observations for tx in (o.start_tx, o.finish_tx) if tx]
    keys = SiteKeys(settings.site)
    retrying = dataclasses.replace(settings, redis_url=settings.redis_url + "?retry_on_timeout=yes")
    drain = Drain(retrying, DrainConfig(batch_size=10, lease_ttl_s=60.0))
    sent: list[str] = []  # transaction ids in the order the drain sent them to main
    apply = drain.timeouts.apply
    monkeypatch.setattr(drain.timeouts, "apply", lambda txs: (sent.extend(t.transaction_id for t in txs), apply(txs))[1])
    claims: list[str] = []  # the mode of each claim script Redis answered
    send_and_read = redis.Redis._send_command_parse_response

    def reply_lost_once(client, conn, command_name, *args, **options):
        reply = send_and_read(client, conn, command_name, *args, **options)
        if command_name == "EVALSHA" and args[1] == drain.store._claim.sha:
            claims.append(args[3 + int(args[2]) + 3])  # ARGV[4]
            if claims.count(mode) == 1 and claims[-1] == mode:
                raise redis.TimeoutError("Timeout reading from socket")  # Redis ran it; redis-py retries
        return reply

    monkeypatch.setattr(redis.Redis, "_send_command_parse_response", reply_lost_once)
    try:
        summary = drain.run(until_empty=True)
    finally:
        drain.close()
    assert claims.count(mode) >= 2 and claims[claims.index(mode) + 1] == mode  # the lost one, sent again
    assert summary.stopped_because == "buffer empty", summary
    assert sent == buffered  # each once, in the order buffered
    assert_applied_exactly_once(main_engine, observations)
    assert_queues_empty(redis_client, settings.site)
    assert int(redis_client.hget(keys.stats, "applied_total")) == len(buffered)
    check = TransactionBuffer(settings=settings)
    try:
        assert {check.status(i) for i in buffered} == {"replicated"}
    finally:
        check.close()


def test_a_drain_whose_lease_cannot_be_released_still_closes_its_connection_to_main(
        settings, redis_client, main_engine, monkeypatch, caplog):
    """Drain.close() released the lease first: with Redis gone at that moment, its error
    skipped the rest, and the connection to main stayed open (a Dagster op retry makes a new
    Drain in the same process). The lease is now left to expire by its TTL, saying so."""
    buf = TransactionBuffer(redis_url=settings.redis_url, site=settings.site)
    try:
        buffer_observations(buf, 1)
    finally:
        buf.close()
    drain = Drain(settings, DrainConfig(lease_ttl_s=60.0))
    drain.acquire()
    assert drain.step() is not None  # main was connected to
    backend = drain.main._conn.get_backend_pid()
    monkeypatch.setattr(drain.store, "release_lease", _redis_gone)
    with caplog.at_level(logging.WARNING, logger="obs_pipeline.drain"):
        drain.close()  # does not raise
    assert redis_client.pttl(SiteKeys(settings.site).lease) > 0  # still held, for its TTL
    assert any("could not release the drain lease" in r.getMessage() and "expires within 60 s" in r.getMessage()
               for r in caplog.records), caplog.text
    assert wait_until(lambda: _backend_gone(main_engine, backend), timeout=10), "the drain's connection to main stayed open"


def test_a_run_that_fails_with_redis_gone_at_its_end_reports_its_own_error(settings, monkeypatch):
    """run() released the lease in its `finally`: with Redis gone then, the ConnectionError of
    the release replaced the error that had ended the run."""
    drain = Drain(settings, DrainConfig(lease_ttl_s=60.0))
    try:
        def step() -> None:
            monkeypatch.setattr(drain.store, "release_lease", _redis_gone)
            raise RuntimeError("the run's own error")

        monkeypatch.setattr(drain, "step", step)
        with pytest.raises(RuntimeError, match="the run's own error"):
            drain.run(until_empty=True, budget_s=30)
    finally:
        monkeypatch.undo()
        drain.close()


def _redis_gone(token: str) -> None:
    raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

def _backend_gone(main_engine, pid: int) -> bool:
    with main_engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"),
                            {"pid": pid}).scalar_one() == 0

@pytest.mark.slow
def test_main_stopped_for_30_s_mid_drain(stack, settings, redis_client, main_engine, replica_engine):
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 600, finish_every=1)
    buf.close()
    drain = Drain(settings, DrainConfig(batch_size=25, backoff_max_s=2.0, replication_timeout_s=2.0))
    batches, transient = [], []
    worker = threading.Thread(target=lambda: drain.run(
        until_empty=True, budget_s=240, on_batch=batches.append, on_transient=lambda e, b: transient.append(e)))
    worker.start()
    try:
        while not batches:
            time.sleep(0.01)
        stack.stop_service("main", mode="immediate")
        time.sleep(30)
    finally:
        stack.start_service("main")
    worker.join(timeout=240)
    drain.close()
    assert not worker.is_alive()
    assert transient, "the outage was not noticed"
    wait_for_replica(main_engine, replica_engine)
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, observations)
    assert_queues_empty(redis_client, settings.site)


@pytest.mark.parametrize("how", ["restart", "kill_after_fsync"])
def test_redis_restart_between_buffering_and_draining_loses_nothing(stack, settings, redis_client, main_engine, how):
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 300)
    buf.close()
    if how == "kill_after_fsync":
        time.sleep(1.5)  # appendfsync everysec: what is a second old is on disk
    try:
        stack.stop_service("redis", mode="fast" if how == "restart" else "kill")
    finally:
        stack.start_service("redis")
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, observations)
    assert_queues_empty(redis_client, settings.site)


def _wait_for_rewrite(redis_client) -> None:
    deadline = time.monotonic() + 60
    while redis_client.info("persistence")["aof_rewrite_in_progress"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis_client.info("persistence")["aof_last_bgrewrite_status"] == "ok"


def test_the_drain_compacts_the_aof_and_a_redis_killed_after_it_loses_nothing(stack, settings, redis_client,
                                                                             main_engine, monkeypatch):
    """The drain asks for BGREWRITEAOF when it runs out of work (thresholds lowered so this
    small Redis qualifies); a second rewrite is taken with a backlog buffered, then Redis is
    killed and restarted from the rewritten file: every transaction lands once."""
    from obs_pipeline import buffer_store
    monkeypatch.setattr(buffer_store, "AOF_COMPACT_MIN_BYTES", 1)
    monkeypatch.setattr(buffer_store, "AOF_COMPACT_FILE_PER_MEMORY", 0)
    buf = TransactionBuffer(settings=settings)
    drained_first = buffer_observations(buf, 100)
    forks_before = int(redis_client.info("stats")["total_forks"])
    drain = Drain(settings, DrainConfig(batch_size=50, aof_check_s=0))
    try:
        summary = drain.run(until_empty=True)
    finally:
        drain.close()
    assert summary.aof_compactions >= 1
    assert int(redis_client.info("stats")["total_forks"]) > forks_before
    _wait_for_rewrite(redis_client)
    backlog = buffer_observations(buf, 200)
    buf.close()
    assert BufferStore(redis_client, settings.site).compact_aof() is True  # the backlog is in the rewritten file
    _wait_for_rewrite(redis_client)
    time.sleep(1.5)  # appendfsync everysec: what is a second old is on disk
    try:
        stack.stop_service("redis", mode="kill")
    finally:
        stack.start_service("redis")
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, drained_first + backlog)
    assert_queues_empty(redis_client, settings.site)


def test_replica_down_keeps_caches_and_applied_status_until_it_replays(stack, settings, redis_client, main_engine):
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 50)
    keys = SiteKeys(settings.site)
    drain = Drain(settings, DrainConfig(replication_timeout_s=0.5))
    try:
        stack.stop_service("replica")
        drain.run(until_empty=True, budget_s=4)
        assert buf.status(observations[0].start_tx) == "applied"
        assert redis_client.exists(keys.buffered("ExecutedObsUnit", observations[0].obs_id)) == 1
        # nothing of a transaction not yet replicated may expire
        for key in [keys.buffered("ExecutedObsUnit", observations[-1].obs_id),
                    keys.cached_id("RawDataPackage", observations[-1].package_id),
                    keys.transaction(observations[-1].start_tx), keys.read_buffer("ExecutedObsUnit", observations[0].obs_id)]:
            assert redis_client.ttl(key) == -1, key
        assert redis_client.zcard(keys.awaiting_replication) >= 1
    finally:
        stack.start_service("replica")
    drain.run(until_empty=True, budget_s=60)
    drain.close()
    assert buf.status(observations[0].start_tx) == "replicated"
    assert redis_client.exists(keys.buffered("ExecutedObsUnit", observations[0].obs_id)) == 0
    assert not list(redis_client.scan_iter(match=f"site:{settings.site}:buffered:*"))
    assert not list(redis_client.scan_iter(match=f"site:{settings.site}:read_buffer:*"))
    assert_applied_exactly_once(main_engine, observations)
    buf.close()


@contextlib.contextmanager
def _replica_out(stack, replica_engine, how: str):
    """The replica stopped, or its replay paused (it answers, lagging), inside the block."""
    if how == "replay paused":
        with replay_paused(replica_engine):
            yield
        return
    stack.stop_service("replica")
    try:
        yield
    finally:
        stack.start_service("replica")


@pytest.mark.parametrize("how", ["stopped", "replay paused"])
def test_what_is_buffered_while_a_batch_waits_for_the_replica_goes_to_main_at_once(
        how, stack, settings, redis_client, main_engine, replica_engine):
    """A batch that is not full waits, up to replication_timeout_s, for the replica to replay it
    (to clean its caches at once). With the replica down or lagging that wait held back what was
    buffered meanwhile: in a drill with the replica stopped, transactions reached main up to 9 s
    late (the default 10 s), for as long as it was down. The wait ends once work waits to be
    claimed; what it waited for is cleaned by a later step, and nothing is applied twice."""
    buf = TransactionBuffer(settings=settings)
    first = buffer_observations(buf, 1)
    drain = Drain(settings, DrainConfig(replication_timeout_s=60))
    stepping = concurrent.futures.ThreadPoolExecutor(1)
    try:
        with _replica_out(stack, replica_engine, how):
            drain.acquire()
            step = stepping.submit(drain.step)
            assert wait_until(lambda: buf.status(first[0].finish_tx) == "applied", 30)  # now waiting for its replay
            second = buffer_observations(buf, 1)
            report = step.result(timeout=30)  # (not the 60 s of replication_timeout_s)
            assert (report.transactions, report.replicated) == (2, 0)
            step = stepping.submit(drain.step)
            assert wait_until(lambda: buf.status(second[0].finish_tx) == "applied", 30)
            with main_engine.connect() as conn:  # on main while the replica is still out
                assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit WHERE id = :i"),
                                    {"i": second[0].obs_id}).scalar_one() == 1
            assert redis_client.zcard(SiteKeys(settings.site).awaiting_replication) >= 1
        assert step.result(timeout=60).transactions == 2  # its wait ends with the replay
        drain.store.release_lease(drain.token)  # (taken again by the run)
        drain.run(until_empty=True, budget_s=60)
    finally:
        stepping.shutdown(wait=True)
        drain.close()
    assert [buf.status(o.start_tx) for o in first + second] == ["replicated"] * 2
    assert_applied_exactly_once(main_engine, first + second)
    assert_queues_empty(redis_client, settings.site)
    assert not list(redis_client.scan_iter(match=f"site:{settings.site}:buffered:*"))
    buf.close()


def test_poison_transaction_is_dead_lettered_with_its_dependents_and_retry_all_applies_them(
        settings, redis_client, main_engine):
    buf = TransactionBuffer(settings=settings)
    good = buffer_observations(buf, 333, finish_every=2)  # 500 transactions
    with buf.transaction(endpoint="start_observation") as poison:  # obs unit 999 does not exist on main
        bad = poison.create("ExecutedObsUnit", {"obs_unit_id": 999, "start_time": "2025-01-01T00:00:00Z",
                                                "status": "running"})
        bad_pkg = poison.create("RawDataPackage", {"name": "poison", "executed_obs_unit_id": bad["id"]})
    with buf.transaction(endpoint="record_files") as files:
        files.bulk_create("RawDataFile", [{"name": "p.fits", "raw_data_package_id": bad_pkg["id"]}])
    finish = buf.update("ExecutedObsUnit", bad["id"], {"status": "completed"})
    good += buffer_observations(buf, 333, finish_every=2)
    keys = SiteKeys(settings.site)

    drain_until_settled(settings, retry_base_s=0.05)

    assert_applied_exactly_once(main_engine, good)
    failed = {e["transaction_id"]: e for e in map(json.loads, redis_client.lrange(keys.failed, 0, -1))}
    assert set(failed) == {poison.transaction_id, files.transaction_id, finish}
    assert "ForeignKeyViolation" in failed[poison.transaction_id]["failure"]["reason"]
    assert failed[poison.transaction_id]["failure"]["attempts"] == 4  # first try + max_retries 3
    assert failed[files.transaction_id]["failure"]["reason"] == f"blocked by {poison.transaction_id}"
    assert failed[finish]["failure"]["reason"].startswith("blocked by ")
    assert buf.status(poison.transaction_id) == "failed"

    with main_engine.begin() as conn:  # the operator fixes the cause
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (999, 'late unit')"))
    listed = subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "list"], env=cli_env(settings),
                            capture_output=True, text=True, check=True).stdout
    assert poison.transaction_id in listed and "blocked by" in listed
    subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "retry", "--all"], env=cli_env(settings),
                   check=True)
    drain_until_settled(settings, retry_base_s=0.05)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :i"),
                            {"i": bad["id"]}).scalar_one() == "completed"
        assert conn.execute(sa.text("SELECT count(*) FROM raw_data_file WHERE raw_data_package_id = :p"),
                            {"p": bad_pkg["id"]}).scalar_one() == 1
    assert_queues_empty(redis_client, settings.site)
    buf.close()


def test_a_reply_slower_than_ingests_polling_is_still_read(settings, redis_client):
    """Ingest polls for Redis's reply for a fraction of a millisecond, then blocks: a Redis busy
    for a second with another client's script answers late, and the transaction is buffered once."""
    from obs_pipeline import buffer_store
    busy = "local t = redis.call('TIME') repeat local n = redis.call('TIME') until (n[1] - t[1]) * 1e6 + n[2] - t[2] > 1000000"
    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as warm_up:  # connect first, so only the reply can be late
        warm_up.create("ObsUnit", {"id": 901, "name": "warm-up"})
    blocker = threading.Thread(target=redis_client.eval, args=(busy, 0))
    blocker.start()

    def script_running() -> bool:  # Redis answers no one while it runs (it ends within lua-time-limit)
        probe = redis.Redis.from_url(settings.redis_url, socket_timeout=0.1, socket_connect_timeout=0.1)
        try:
            probe.ping()
            return False
        except redis.TimeoutError:
            return True
        finally:
            probe.close()

    # (a fixed 0.3 s for the thread's EVAL to reach Redis was not always enough on a loaded machine)
    assert wait_until(script_running, 10, interval=0.01)  # it runs for about 0.9 s more
    began = time.monotonic()
    with buf.transaction() as tx:
        tx.create("ObsUnit", {"id": 902, "name": "late reply"})
    waited = time.monotonic() - began
    blocker.join()
    buf.close()
    assert waited > 0.1 > buffer_store.REPLY_SPIN_S
    queue = [json.loads(e)["transaction_id"] for e in redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1)]
    assert queue == [tx.transaction_id, warm_up.transaction_id]


def test_a_call_interrupted_while_it_waits_for_its_reply_leaves_no_reply_for_the_next(settings, redis_client,
                                                                                       monkeypatch):
    """Ctrl-C in a notebook while ingest polls for Redis's reply: the reply stayed unread on the
    thread's connection, and the next call read it as its own. So the next call, refused by a
    full Redis, said it had buffered its transaction (the refusal went to the call after it):
    the transaction was in neither Redis nor the spool, lost."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    buffer_observations(buf, 1, finish_every=0)  # connected
    real_await = BufferStore._await_reply

    def interrupted(self, conn):
        monkeypatch.setattr(BufferStore, "_await_reply", real_await)
        raise KeyboardInterrupt

    monkeypatch.setattr(BufferStore, "_await_reply", interrupted)
    with pytest.raises(KeyboardInterrupt):
        buffer_observations(buf, 1, finish_every=0)  # sent, so buffered; its reply not read
    limit = redis_client.config_get("maxmemory")["maxmemory"]
    redis_client.config_set("maxmemory", 1)
    try:
        refused = buffer_observations(buf, 1, finish_every=0)
        assert buf.spool.pending() == 1 and buf.status(refused[0].start_tx) == "pending"
    finally:
        redis_client.config_set("maxmemory", limit)
    assert buf.spool.flush()
    queue = [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.buffer, 0, -1)]
    assert len(queue) == 3 and queue[0] == refused[0].start_tx
    buf.close()


def test_redis_down_during_ingest_spools_and_pushes_in_order(stack, settings, redis_client, main_engine):
    buf = TransactionBuffer(settings=settings)
    before = buffer_observations(buf, 20)
    time.sleep(1.5)  # appendfsync everysec: what is a second old is on disk, and survives the kill
    try:
        stack.stop_service("redis", mode="kill")
        began = time.monotonic()
        during = buffer_observations(buf, 30)  # start, then finish depending on it: order matters
        assert time.monotonic() - began < 10
        assert buf.spool.pending() == 30 + 15
        assert buf.status(during[0].start_tx) == "pending"
    finally:
        stack.start_service("redis")
    after = buffer_observations(buf, 10)  # flushes the spool first, then buffers these
    assert buf.spool.pending() == 0
    queue = [json.loads(e)["transaction_id"] for e in reversed(redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1))]
    expected = [t for o in during + after for t in (o.start_tx, o.finish_tx) if t]
    assert [t for t in queue if t in set(expected)] == expected
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, before + during + after)
    buf.close()


def test_a_full_redis_refuses_ingest_and_the_spool_keeps_it_until_there_is_room(settings, redis_client, main_engine):
    """A Redis at its `maxmemory` (noeviction) refuses ingest's script at its first write: ingest
    spools the transactions to disk, nothing of them is half-written, the health report says
    what to do, and once Redis has room they are pushed in order and applied once."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    before = buffer_observations(buf, 5)
    limit = redis_client.config_get("maxmemory")["maxmemory"]
    redis_client.config_set("maxmemory", 1)
    try:
        during = buffer_observations(buf, 6)
        assert buf.spool.pending() == 6 + 3
        assert buf.status(during[0].start_tx) == "pending"
        assert not redis_client.exists(keys.transaction(during[0].start_tx))
        assert not redis_client.keys(f"{keys.prefix}buffered:ExecutedObsUnit:{during[0].obs_id}")
        problems = health_report(BufferStore(redis_client, settings.site), None, None)["problems"]
        assert any("Redis is" in p and "full" in p and "raise maxmemory" in p for p in problems), problems
    finally:
        redis_client.config_set("maxmemory", limit)
    after = buffer_observations(buf, 4)  # pushes the spool first, then these
    assert buf.spool.pending() == 0
    queue = _queued_ids(redis_client, keys)
    expected = [t for o in before + during + after for t in (o.start_tx, o.finish_tx) if t]
    assert queue == expected
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, before + during + after)
    buf.close()


@contextlib.contextmanager
def redis_refusing_writes(redis_client, how: str, scratch):
    """Redis refuses writes until the block ends: it cannot persist (MISCONF: its RDB save
    failed, as on a full disk; here its folder is gone), it is a replica (READONLY, as after
    a failover; here of a master that does not answer, so it keeps its data), or it has fewer
    good replicas than its `min-replicas-to-write` (NOREPLICAS: its replica is down or lags;
    here it has none)."""
    if how == "noreplicas":
        redis_client.config_set("min-replicas-to-write", 1)
        try:
            yield
        finally:
            redis_client.config_set("min-replicas-to-write", 0)
        return
    if how == "readonly":
        redis_client.execute_command("REPLICAOF", "127.0.0.1", str(pick_free_ports(1)[0]))
        try:
            yield
        finally:
            redis_client.execute_command("REPLICAOF", "NO", "ONE")
        return
    saved = redis_client.config_get("dir")["dir"], redis_client.config_get("save")["save"]
    gone = scratch / "redis-dir-gone"
    gone.mkdir()
    try:
        redis_client.config_set("save", "3600 1")  # MISCONF needs save points (stop-writes-on-bgsave-error)
        redis_client.config_set("dir", str(gone))
        gone.rmdir()
        redis_client.bgsave()
        assert wait_until(lambda: redis_client.info("persistence")["rdb_last_bgsave_status"] == "err", 30)
        yield
    finally:
        redis_client.config_set("dir", saved[0])
        redis_client.config_set("save", saved[1])  # no save points: writes are taken again


@pytest.mark.parametrize("how", ["misconf", "readonly", "noreplicas"])
def test_a_redis_that_refuses_writes_for_a_while_has_ingest_spool_them(settings, redis_client, main_engine,
                                                                        tmp_path, how):
    """A Redis that cannot persist (MISCONF), has become a replica (READONLY) or lacks the good
    replicas its `min-replicas-to-write` asks for (NOREPLICAS) refuses ingest's
    script at its first write, as a full one does. Ingest raised its ResponseError, and the
    observation was lost; now the calls succeed via the spool, nothing of them is in Redis, and
    once Redis takes writes again they are pushed in order and applied once."""
    keys = SiteKeys(settings.site)

    def while_refused(buf, during) -> None:
        assert buf.status(during[0].start_tx) == "pending"
        assert not redis_client.exists(keys.transaction(during[0].start_tx))

    _spooled_while(redis_refusing_writes(redis_client, how, tmp_path), while_refused, settings, redis_client,
                   main_engine)


def _spooled_while(refusing, check, settings, redis_client, main_engine) -> None:
    """Observations buffered before, while `refusing` (a context manager) holds and after: those
    of the middle are spooled (`check(buf, during)` runs then), then pushed in order by the first
    call after it, and all are applied once."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    before = buffer_observations(buf, 2)
    with refusing:
        during = buffer_observations(buf, 4)  # 4 starts, 2 finishes: updates of spooled creates
        assert buf.spool.pending() == 4 + 2
        check(buf, during)
    after = buffer_observations(buf, 2)  # pushes the spool first, then these
    assert buf.spool.pending() == 0
    queue = _queued_ids(redis_client, keys)
    assert queue == [t for o in before + during + after for t in (o.start_tx, o.finish_tx) if t]
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, before + during + after)
    buf.close()


@contextlib.contextmanager
def redis_refusing_every_command(redis_client, how: str):
    """Redis answers every command with an error until the block ends: another client's script
    runs past `lua-time-limit` (BUSY; here 0.1 s, the script loops until SCRIPT KILL), or it is a
    replica cut off from its master with `replica-serve-stale-data no` (MASTERDOWN)."""
    if how == "masterdown":
        redis_client.config_set("replica-serve-stale-data", "no")
        redis_client.execute_command("REPLICAOF", "127.0.0.1", str(pick_free_ports(1)[0]))
        try:
            yield
        finally:
            redis_client.execute_command("REPLICAOF", "NO", "ONE")
            redis_client.config_set("replica-serve-stale-data", "yes")
        return
    limit = redis_client.config_get("lua-time-limit")["lua-time-limit"]
    redis_client.config_set("lua-time-limit", 100)
    looping = redis.Redis(connection_pool=redis_client.connection_pool, single_connection_client=True)
    loop = threading.Thread(target=_eval_quietly, args=(looping, "while true do end"), daemon=True)
    loop.start()
    try:
        assert wait_until(lambda: _busy(redis_client), 10)
        yield
    finally:
        assert wait_until(lambda: _script_killed(redis_client), 10)
        loop.join(10)
        looping.close()
        redis_client.config_set("lua-time-limit", limit)


def _eval_quietly(client, script: str) -> None:
    with contextlib.suppress(redis.ResponseError):
        client.eval(script, 0)


def _busy(client) -> bool:
    try:
        client.ping()
    except redis.ResponseError as error:
        return str(error).startswith("BUSY ")
    return False


def _script_killed(client) -> bool:
    with contextlib.suppress(redis.ResponseError):  # NOTBUSY: the script has ended already
        client.script_kill()
    return client.ping()


@pytest.mark.parametrize("how", ["busy", "masterdown"])
def test_a_redis_that_refuses_every_command_for_a_while_has_ingest_spool_them(settings, redis_client, main_engine,
                                                                               how):
    """A Redis busy with another client's script past its time limit (BUSY), or a replica cut off
    from its master that serves no stale data (MASTERDOWN), refuses every command before running
    it. Ingest raised its ResponseError, the observation lost, and so did a finish's check and
    status(); now they are handled as while Redis is down: the calls succeed via the spool,
    status() answers from it, and once Redis answers the spool is pushed in order, applied once."""
    def while_refused(buf, during) -> None:
        assert buf.status(during[0].start_tx) == "pending" and buf.status(during[0].finish_tx) == "pending"

    _spooled_while(redis_refusing_every_command(redis_client, how), while_refused, settings, redis_client,
                   main_engine)


def test_a_spool_that_cannot_take_a_transaction_says_so_in_one_line_and_keeps_nothing_of_it(
        settings, redis_client, tmp_path, monkeypatch):
    """Redis does not answer and the spool cannot take the transaction either: its folder cannot
    be made (a file is in the way), or fsync fails after the line was written. The call raised
    the bare OSError ('[Errno 20] Not a directory: ...'), and after the failed fsync the line
    stayed in the spool: the transaction the script was told had failed was pushed later all
    the same. Now one line that says the transaction was not buffered and why, and no line."""
    from obs_pipeline.ingest import SpoolError

    down = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{pick_free_ports(1)[0]}/0")
    blocked = TransactionBuffer(settings=dataclasses.replace(down, spool_dir=str(tmp_path / "a-file" / "spool")))
    (tmp_path / "a-file").write_text("")  # after: one there already refuses the buffer (Spool.unusable)
    with pytest.raises(SpoolError) as refused:
        with blocked.transaction() as tx:
            tx.create("ObsUnit", {"id": 960, "name": "no spool folder"})
    message = str(refused.value)
    assert "\n" not in message and f"transaction {tx.transaction_id} was not buffered" in message, message
    assert "Redis cannot take it" in message and "Not a directory" in message and "OBS_SPOOL_DIR" in message, message
    blocked.close()

    buf = TransactionBuffer(settings=down)
    with buf.transaction() as spooled:
        spooled.create("ObsUnit", {"id": 961, "name": "spooled"})
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    with pytest.raises(SpoolError, match="Input/output error") as refused:
        with buf.transaction() as failed:
            failed.create("ObsUnit", {"id": 962, "name": "fsync failed"})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert "\n" not in str(refused.value)
    assert buf.spool.pending() == 1 and not buf.spool.holds(failed.transaction_id)
    buf.close()
    up = TransactionBuffer(settings=settings)  # the same spool, Redis answering: pushes what it holds
    assert up.spool.flush()
    queue = [json.loads(e)["transaction_id"] for e in redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1)]
    assert queue == [spooled.transaction_id]
    up.close()


@pytest.fixture
def no_flusher_thread(monkeypatch):
    """The process may start no more threads (a container's pids limit, say) for the spool's
    flusher, until the function returned is called."""
    real_start = threading.Thread.start

    def start_unless_flusher(thread):
        if thread.name == "obs-spool-flusher":
            raise RuntimeError("can't start new thread")
        return real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_unless_flusher)
    return lambda: monkeypatch.setattr(threading.Thread, "start", real_start)


def test_a_spooled_transaction_whose_flusher_cannot_start_is_still_spooled_and_pushed_once(
        settings, redis_client, main_engine, no_flusher_thread, caplog):
    """The process may start no more threads (a container's pids limit, say) when a transaction
    is spooled: the line was written and fsync'd, then starting the background flusher raised
    RuntimeError ("can't start new thread") out of the call, and a script told its observation
    had failed buffers it again (applied twice). Now the call returns with one warning (the
    script's only sign that nothing pushes the spool meanwhile): the next call, the exit or
    `spool push` pushes it."""
    caplog.set_level(logging.WARNING, logger="obs_pipeline.spool")
    down = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{pick_free_ports(1)[0]}/0")
    buf = TransactionBuffer(settings=down)
    spooled = buffer_observations(buf, 2)  # 2 starts + 1 finish, all in the spool
    no_flusher_thread()  # threads may start again
    assert buf.spool.pending() == 3
    warned = [r.getMessage() for r in caplog.records if r.name == "obs_pipeline.spool"
              and r.levelno == logging.WARNING and "no background flusher" in r.getMessage()]
    assert warned == [f"no background flusher for the spool {buf.spool.path} (can't start new thread): the next call "
                      "pushes it"] * 3, caplog.text  # one for each spooled call
    buf.close()
    up = TransactionBuffer(settings=settings)  # the same spool, Redis answering
    after = buffer_observations(up, 1)  # pushes the spool first, then this
    assert not up.spool.exists()
    queue = [json.loads(e)["transaction_id"] for e in reversed(redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1))]
    assert queue == [t for o in spooled + after for t in (o.start_tx, o.finish_tx) if t]
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, spooled + after)
    up.close()


def test_status_and_a_new_buffer_answer_while_the_flusher_cannot_start(settings, no_flusher_thread):
    """Found by review: while the process may start no more threads, status() of a spooled
    transaction (and a TransactionBuffer made with a spool left) raised RuntimeError from
    starting the flusher, though the buffering call had returned: a script polling status()
    after its observation failed there. They answer as the call did: the spool holds it."""
    down = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{pick_free_ports(1)[0]}/0")
    buf = TransactionBuffer(settings=down)
    spooled = buffer_observations(buf, 1, finish_every=0)
    assert buf.status(spooled[0].start_tx) == "pending"
    again = TransactionBuffer(settings=down)  # a spool is left: it starts the flusher
    assert again.status(spooled[0].start_tx) == "pending"
    assert buf.spool.pending() == 1
    again.close()
    buf.close()


def test_a_long_redis_outage_does_not_make_each_call_read_the_whole_spool(settings, redis_client, main_engine,
                                                                           monkeypatch):
    """While Redis does not answer, every call first tries to push the spool, and status() looks
    for its transaction in it. Both parsed every spooled transaction, so each call cost more
    than the last: 40 ms with 1,000 spooled, 0.1 s with 5,000 (and 330 s to spool those 5,000).
    Now a push parses the line it pushes and status() only lines with the id in them."""
    from obs_pipeline import spool as spool_module

    down = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{pick_free_ports(1)[0]}/0")
    buf = TransactionBuffer(settings=down)
    spooled = buffer_observations(buf, 150)  # 150 starts + 75 finishes
    real_loads, parsed = json.loads, []

    def counting_loads(text, *args, **kwargs):
        if (text.encode() if isinstance(text, str) else text).startswith(b'{"id": '):  # a spool line
            parsed.append(text)
        return real_loads(text, *args, **kwargs)

    monkeypatch.setattr(spool_module.json, "loads", counting_loads)
    last = buffer_observations(buf, 1, finish_every=0)
    assert len(parsed) <= 1, len(parsed)  # the line it tried to push
    parsed.clear()
    assert buf.status(spooled[70].start_tx) == "pending"
    assert len(parsed) == 1, len(parsed)
    monkeypatch.setattr(spool_module.json, "loads", real_loads)
    assert buf.spool.pending() == 150 + 75 + 1
    buf.close()
    up = TransactionBuffer(settings=settings)  # the same spool, Redis answering
    assert up.spool.flush() and up.spool.pending() == 0
    queue = [json.loads(e)["transaction_id"] for e in reversed(redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1))]
    assert queue == [t for o in spooled + last for t in (o.start_tx, o.finish_tx) if t]
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, spooled + last)
    up.close()


def _buffering_fails_while_set(monkeypatch) -> threading.Event:
    """An event: while it is set, BufferStore.buffer raises ConnectionError (Redis down to
    ingest and to a push of the spool), the rest of Redis answering."""
    real_buffer, down = BufferStore.buffer, threading.Event()

    def buffer_unless_down(self, *args):
        if down.is_set():
            raise redis.ConnectionError("Redis is down (test)")
        return real_buffer(self, *args)

    monkeypatch.setattr(BufferStore, "buffer", buffer_unless_down)
    return down


def test_a_spool_line_pushed_again_after_a_crash_is_buffered_once(settings, redis_client, main_engine, monkeypatch):
    """A crash between pushing a spooled transaction and recording that it was pushed makes the
    next flush push it again: it must not be queued twice."""
    from obs_pipeline.spool import Spool

    down = _buffering_fails_while_set(monkeypatch)
    buf = TransactionBuffer(settings=settings)
    down.set()
    spooled = buffer_observations(buf, 3)  # 3 starts + 2 finishes, all in the spool
    assert buf.spool.pending() == 5
    down.clear()
    real_offset = Spool._write_offset
    monkeypatch.setattr(Spool, "_write_offset", lambda self, value: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError, match="crash"):
        buf.spool.flush()  # the first line reached Redis; its offset did not reach the disk
    monkeypatch.setattr(Spool, "_write_offset", real_offset)
    assert buf.spool.flush() and buf.spool.pending() == 0
    queue = [json.loads(e)["transaction_id"] for e in redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1)]
    assert sorted(queue) == sorted(t for o in spooled for t in (o.start_tx, o.finish_tx) if t)
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, spooled)
    buf.close()


def test_a_spool_whose_progress_cannot_be_written_is_still_pushed(settings, redis_client, main_engine, monkeypatch):
    """Redis is back and the spool is pushed, but the script's disk is full: the offset (how far
    the spool is pushed) cannot be written. The push stopped there, and with it every call of
    every script of the site (each found the spool and failed on it, though Redis could take
    them all). A line pushed again is harmless, so the push goes on; the spool is removed."""
    from obs_pipeline.spool import Spool

    real_buffer, down = BufferStore.buffer, threading.Event()
    monkeypatch.setattr(BufferStore, "buffer", lambda self, *args: (_ for _ in ()).throw(
        redis.ConnectionError("Redis is down (test)")) if down.is_set() else real_buffer(self, *args))
    buf = TransactionBuffer(settings=settings)
    down.set()
    spooled = buffer_observations(buf, 2)  # 2 starts + 1 finish
    down.clear()
    monkeypatch.setattr(Spool, "_write_offset", lambda self, value: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    after = buffer_observations(buf, 1)  # pushes the spool first, then this
    assert buf.spool.pending() == 0 and not buf.spool.exists()
    queue = [json.loads(e)["transaction_id"] for e in reversed(redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1))]
    assert queue == [t for o in spooled + after for t in (o.start_tx, o.finish_tx) if t]
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, spooled + after)
    buf.close()


def test_a_transaction_pushed_again_after_it_replicated_changes_nothing(settings, redis_client, monkeypatch):
    """A push retried after its reply timed out (the script ran) arrives when the transaction
    may be long replicated and its record updated since: it must not come back as pending nor
    bring its buffered create back over the newer row."""
    pushed = []
    real_buffer = BufferStore.buffer
    monkeypatch.setattr(BufferStore, "buffer", lambda self, *args: (pushed.append(args), real_buffer(self, *args))[1])
    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as start:
        obs = start.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                               "status": "running"})
    finish = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
    drain_until_settled(settings)
    assert buf.status(start.transaction_id) == buf.status(finish) == "replicated"
    keys = SiteKeys(settings.site)
    before = sorted(redis_client.scan_iter(match=f"{keys.prefix}*"))
    real_buffer(buf.store, *pushed[0])  # the start, pushed again
    assert sorted(redis_client.scan_iter(match=f"{keys.prefix}*")) == before
    assert redis_client.llen(keys.buffer) == 0
    assert buf.status(start.transaction_id) == "replicated"
    assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "completed"
    buf.close()


def test_the_spool_is_pushed_on_a_pooled_connection_never_on_a_scripts_own(settings, redis_client, monkeypatch):
    """Each thread of a script buffers on a connection of its own, without a lock. The spool's
    background flusher must not push on one of those: two threads sending on one socket at
    once would garble both requests."""
    real_buffer, down = BufferStore.buffer, threading.Event()
    monkeypatch.setattr(BufferStore, "buffer", lambda self, *args: (_ for _ in ()).throw(
        redis.ConnectionError("Redis is down (test)")) if down.is_set() else real_buffer(self, *args))
    buf = TransactionBuffer(settings=settings)
    used_from: list[str] = []
    owner: dict = {}

    def script() -> None:  # a script's thread: spools one observation on its own connection
        store = buf._store_of_this_thread()
        conn = store.redis.connection
        real_send = conn.send_packed_command
        conn.send_packed_command = lambda *a, **k: (used_from.append(threading.current_thread().name),
                                                    real_send(*a, **k))[1]
        owner["name"] = threading.current_thread().name
        down.set()
        buffer_observations(buf, 1, finish_every=0)
        down.clear()
        spooled.set()
        flushed.wait(30)  # alive, its connection still its own, while the spool is pushed

    spooled, flushed = threading.Event(), threading.Event()
    worker = threading.Thread(target=script, name="script-thread")
    worker.start()
    try:
        assert spooled.wait(30) and buf.spool.pending() == 1
        assert buf.spool.flush() and buf.spool.pending() == 0  # as the flusher thread does
    finally:
        flushed.set()
        worker.join(30)
    assert redis_client.llen(SiteKeys(settings.site).buffer) == 1
    assert set(used_from) <= {owner["name"]}, used_from
    buf.close()


def test_close_closes_the_connection_of_every_thread_that_buffered_and_a_later_call_opens_one_again(
        settings, redis_client):
    """Each thread buffers on a connection of its own (_store_of_this_thread). close() closes
    them all, those of a thread pool still alive included: with redis-py 5.0.0, which
    `redis>=5.0` admits, it closed none (its Redis.close() left the pool connected), and they
    stayed open until garbage collection. A thread that buffers after close() is served as
    the calling thread always was: on a new connection, which the next close() closes."""
    buf = TransactionBuffer(settings=settings)
    barrier = threading.Barrier(4)

    def buffer_one(_) -> tuple[str, str]:  # (this thread's connection as CLIENT LIST names it, transaction id)
        barrier.wait()  # four threads at once, each on its own connection
        start = buffer_observations(buf, 1, finish_every=0)[0].start_tx
        return "%s:%s" % buf._store_of_this_thread().redis.connection._sock.getsockname()[:2], start

    def still_open(addresses: set[str]) -> set[str]:
        return addresses & {client["addr"] for client in redis_client.client_list()}

    def all_closed(addresses: set[str]) -> bool:
        """Redis drops a client once it reads the closed socket: a CLIENT LIST just after may
        still name it (1 of 3 runs failed so). Left open, they stay for as long as the threads."""
        return wait_until(lambda: not still_open(addresses), 5)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # its threads live on across close()
        made = dict(pool.map(buffer_one, range(4)))
        assert len(made) == 4 and still_open(set(made)) == set(made)
        buf.close()
        assert all_closed(set(made)), still_open(set(made))
        after = dict(pool.map(buffer_one, range(4)))
        assert [buf.status(tx) for tx in after.values()] == ["pending"] * 4
        assert still_open(set(after)) == set(after)
        buf.close()
        assert all_closed(set(after)), still_open(set(after))
    assert [buf.status(tx) for tx in made.values()] == ["pending"] * 4
    buf.close()


def test_a_block_whose_steps_several_threads_add_at_once_gets_distinct_step_ids_and_applies_every_step_once(
        settings, main_engine, monkeypatch):
    """Threads may share a block's `tx`. Its step id was taken from the number of steps so
    far, and the step appended after: two threads adding at once got one id. Each call now
    adds its step whole, under the block's lock. Here making a Step yields the thread, as the
    scheduler may at any moment (without that, 8 threads x 100 creates left 28, 0 and 3
    steps sharing an id in three runs)."""
    from obs_pipeline import ingest

    real_step = ingest.Step
    monkeypatch.setattr(ingest, "Step", lambda *args: (time.sleep(0.0001), real_step(*args))[1])
    buf = TransactionBuffer(settings=settings)
    threads, each = 8, 25
    barrier, added = threading.Barrier(threads), []

    def add(thread: int) -> None:
        barrier.wait()
        for i in range(each):
            obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                                "status": "running"})
            pkg = tx.create("RawDataPackage", {"name": f"pkg{thread}-{i}", "executed_obs_unit_id": obs["id"]})
            added.append((obs["id"], pkg["id"]))

    with buf.transaction(endpoint="threads") as tx:
        workers = [threading.Thread(target=add, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
    steps = json.loads(buf.store.status_json(tx.transaction_id))["steps"]
    ids = [step["step_id"] for step in steps]
    assert len(steps) == 2 * threads * each and len(added) == threads * each
    assert len(set(ids)) == len(ids), f"{len(ids) - len(set(ids))} steps share an id with another"
    assert set(ids) == {f"step{n}" for n in range(1, len(steps) + 1)}
    drain_until_settled(settings)
    assert buf.status(tx.transaction_id) in ("applied", "replicated")
    with main_engine.connect() as conn:
        packages = dict(conn.execute(sa.text(
            "SELECT id::text, executed_obs_unit_id::text FROM raw_data_package")).all())
        observations = conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit")).scalar_one()
    assert packages == {pkg: obs for obs, pkg in added} and observations == threads * each
    buf.close()


def test_threads_of_one_block_writing_one_key_and_their_own_buffer_each_step_once_and_apply_the_block_whole(
        settings, main_engine, monkeypatch):
    """Threads sharing a block's `tx`, behind a barrier, each: create one key given alike (one
    create wins, the others are refused as created twice), update a record on the replica and
    one the block created, create a key of its own and update it. The block is buffered with
    every step once, ids distinct and each thread's steps in its order; reads inside the block
    see none of it (it is buffered as it ends), reads after it the last update of each key in
    step order, and the drain applies it whole, as the reads said. (Making a Step yields the
    thread, as in the step-id test above.)"""
    from obs_pipeline import ingest

    real_step = ingest.Step
    monkeypatch.setattr(ingest, "Step", lambda *args: (time.sleep(0.0001), real_step(*args))[1])
    buf = TransactionBuffer(settings=settings)
    on_replica, made_in_block, contested = 900, 901, 902
    with buf.transaction(endpoint="before") as earlier:  # the record every thread updates: on the replica
        earlier.create("ObsUnit", {"id": on_replica, "name": "before the block"})
    drain_until_settled(settings)
    before = buf.get("ObsUnit", on_replica)
    assert before == {"id": on_replica, "name": "before the block"}, before

    threads, each = 8, 10
    barrier, won, refused, errors, seen_inside = threading.Barrier(threads), [], [], [], []

    def write(thread: int) -> None:
        try:
            barrier.wait()
            try:
                tx.create("ObsUnit", {"id": contested, "name": f"contested by {thread}"})
                won.append(thread)
            except InvalidTransaction as refusal:
                refused.append(str(refusal))
            for i in range(each):
                tx.update("ObsUnit", on_replica, {"name": f"{on_replica} by {thread}-{i}"})
                tx.update("ObsUnit", made_in_block, {"name": f"{made_in_block} by {thread}-{i}"})
                own = tx.create("ObsUnit", {"id": 1000 + thread * each + i, "name": f"own {thread}-{i}"})
                tx.update("ObsUnit", own["id"], {"name": f"own {thread}-{i} updated"})
                seen_inside.append((buf.get("ObsUnit", on_replica), buf.get("ObsUnit", made_in_block),
                                    buf.get("ObsUnit", own["id"])))
        except BaseException as error:  # noqa: BLE001 - reported by the test's thread
            errors.append(error)

    with buf.transaction(endpoint="threads") as tx:
        tx.create("ObsUnit", {"id": made_in_block, "name": "made in the block"})
        workers = [threading.Thread(target=write, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
    assert not errors, errors
    assert len(won) == 1 and len(refused) == threads - 1, (won, refused)
    assert all(f"ObsUnit {contested} is created twice in this transaction" in r for r in refused), refused
    assert seen_inside == [(before, None, None)] * (threads * each), "a read inside the block saw part of it"

    steps = json.loads(buf.store.status_json(tx.transaction_id))["steps"]
    ids = [step["step_id"] for step in steps]
    assert len(steps) == 2 + 4 * threads * each
    assert ids == [f"step{n}" for n in range(1, len(steps) + 1)], "step ids not distinct, or not in order"

    def written(step: dict) -> tuple:
        key = step["conditions"]["id"] if step["operation"] == "update" else step["data"]["id"]
        return step["operation"], key, step["data"]["name"]

    expected = {("create", made_in_block, "made in the block"), ("create", contested, f"contested by {won[0]}")}
    for thread in range(threads):
        for i in range(each):
            own = 1000 + thread * each + i
            expected |= {("update", on_replica, f"{on_replica} by {thread}-{i}"),
                         ("update", made_in_block, f"{made_in_block} by {thread}-{i}"),
                         ("create", own, f"own {thread}-{i}"), ("update", own, f"own {thread}-{i} updated")}
    writes = [written(step) for step in steps]
    assert len(set(writes)) == len(writes) and set(writes) == expected
    creator = {key: step["step_id"] for step, (op, key, _) in zip(steps, writes) if op == "create"}
    for step, (op, key, name) in zip(steps, writes):
        if op == "update":  # an update depends on the create of its record in the block, if any
            assert step.get("dependencies", []) == ([creator[key]] if key in creator else []), step
    for thread in range(threads):  # each thread's updates of one key in the order it made them
        mine = [name for op, key, name in writes if op == "update" and key == on_replica
                and name.startswith(f"{on_replica} by {thread}-")]
        assert mine == [f"{on_replica} by {thread}-{i}" for i in range(each)]
    last = {key: name for _, key, name in writes}  # each key's last write, in step order

    def read_back() -> dict:
        keys = [on_replica, made_in_block, contested] + [1000 + n for n in range(threads * each)]
        return {key: (buf.get("ObsUnit", key) or {}).get("name") for key in keys}

    assert read_back() == last
    drain_until_empty(settings)
    assert buf.status(tx.transaction_id) in ("applied", "replicated")
    with main_engine.connect() as conn:
        on_main = dict(conn.execute(sa.text("SELECT id, name FROM obs_unit WHERE id >= :first"),
                                    {"first": on_replica}).all())  # (clean_db's own units are below)
    assert on_main == last
    drain_until_settled(settings)
    assert buf.status(tx.transaction_id) == "replicated" and read_back() == last
    buf.close()


def test_a_step_another_thread_is_adding_as_the_block_ends_is_buffered_with_it(settings, main_engine, monkeypatch):
    """A step another thread was adding as the block ended was left out: the end buffered
    the steps so far, and the step went in after, its call returning as if it were kept.
    The end now waits for a step being added (one added after it is refused, as before)."""
    from obs_pipeline import ingest

    real_step, inside, go_on = ingest.Step, threading.Event(), threading.Event()

    def step_held_in_the_adder(*args):
        if threading.current_thread().name == "adder":
            inside.set()
            go_on.wait(10)
        return real_step(*args)

    monkeypatch.setattr(ingest, "Step", step_held_in_the_adder)
    buf = TransactionBuffer(settings=settings)
    added = []
    with buf.transaction(endpoint="threads") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "running"})
        adder = threading.Thread(name="adder", target=lambda: added.append(tx.create(
            "RawDataPackage", {"name": "pkg", "executed_obs_unit_id": obs["id"]})))
        adder.start()
        assert inside.wait(10)
        threading.Timer(0.3, go_on.set).start()  # the adder finishes its step while the block ends
    adder.join(10)
    assert len(added) == 1
    steps = json.loads(buf.store.status_json(tx.transaction_id))["steps"]
    assert [step["model_class"] for step in steps] == ["ExecutedObsUnit", "RawDataPackage"]
    drain_until_settled(settings)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT id::text FROM raw_data_package")).scalars().all() == [added[0]["id"]]
    with pytest.raises(InvalidTransaction, match="has ended with its `with` block"):
        tx.create("RawDataPackage", {"name": "late", "executed_obs_unit_id": obs["id"]})
    buf.close()


@pytest.mark.parametrize("failure", ["noperm", "unreadable"])
def test_the_spools_flusher_survives_an_unexpected_failure_and_still_pushes_the_spool(
        settings, redis_client, main_engine, monkeypatch, caplog, failure):
    """The background flusher retried only Redis not answering: any other failure of a push
    (Redis refusing it with NOPERM, an OSError reading the spool) ended the thread, and it
    started again only when something new was spooled, so a script that only waited after an
    outage never saw its spooled transactions pushed. Now it logs one warning per distinct
    failure, backs off and goes on. (Nothing here calls status(), which starts a flusher.)"""
    from obs_pipeline import spool as spool_module

    monkeypatch.setattr(spool_module, "RETRY_INTERVAL_S", 0.05)
    caplog.set_level(logging.WARNING, logger="obs_pipeline.spool")
    real_buffer, down = BufferStore.buffer, threading.Event()
    real_lines = spool_module._counted_lines
    down.set()
    monkeypatch.setattr(BufferStore, "buffer", lambda self, *args: (_ for _ in ()).throw(
        redis.ConnectionError("Redis is down (test)")) if down.is_set() else real_buffer(self, *args))
    buf = TransactionBuffer(settings=settings)
    spooled = buffer_observations(buf, 3)
    assert buf.spool.pending() == 3 + 2
    injected = []

    def fail_three_times() -> None:
        injected.append(1)
        if failure == "noperm":
            raise redis.ResponseError("NOPERM this user has no permissions to run the 'evalsha' command (test)")
        raise OSError(5, "Input/output error (test)")

    down.clear()  # Redis answers again; the next three pushes fail otherwise
    if failure == "noperm":
        monkeypatch.setattr(BufferStore, "buffer", lambda self, *args: fail_three_times() if len(injected) < 3
                            else real_buffer(self, *args))
    else:
        monkeypatch.setattr(spool_module, "_counted_lines", lambda file, at: fail_three_times()
                            if len(injected) < 3 else real_lines(file, at))
    assert wait_until(lambda: len(injected) == 3, 30)
    assert wait_until(lambda: buf.spool.pending() == 0, 30), "the flusher died of the failure"
    warnings = [r.getMessage() for r in caplog.records if r.name == "obs_pipeline.spool"]
    assert len(warnings) == 1 and ("NOPERM" if failure == "noperm" else "Input/output error") in warnings[0], warnings
    queue = [json.loads(e)["transaction_id"] for e in reversed(redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1))]
    assert queue == [t for o in spooled for t in (o.start_tx, o.finish_tx) if t]
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, spooled)
    buf.close()


def test_a_redis_refusing_the_scripts_user_or_password_is_said_once_and_the_spool_keeps_its_transactions(
        settings, redis_client, main_engine, monkeypatch, caplog):
    """Redis refusing the script's credentials (a wrong or missing password in OBS_REDIS_URL, a
    user that does not exist: AuthenticationError, a redis.ConnectionError) was taken for Redis
    down: every call returned, its transaction spooled, status() said "pending", and the flusher
    retried every second for as long as the script ran, never saying why. Nothing told the
    operator that the script's observations reached only this host's disk. Now the flusher says
    it in one warning; the spool keeps them, and a script with the right URL pushes them in order."""
    from obs_pipeline import spool as spool_module

    monkeypatch.setattr(spool_module, "RETRY_INTERVAL_S", 0.05)
    caplog.set_level(logging.WARNING, logger="obs_pipeline.spool")
    host_port = settings.redis_url.split("//", 1)[1]
    refused = dataclasses.replace(settings, redis_url=f"redis://nobody:wrong@{host_port}")
    buf = TransactionBuffer(settings=refused)
    spooled = buffer_observations(buf, 2)  # 2 starts and a finish, spooled
    assert buf.status(spooled[0].start_tx) == "pending" and buf.spool.pending() == 3
    said = lambda: [r.getMessage() for r in caplog.records if r.name == "obs_pipeline.spool"]  # noqa: E731
    assert wait_until(lambda: said(), 10), "nothing said why the spool is not pushed"
    time.sleep(0.5)  # ten more tries of the flusher: still one warning
    assert said() == [f"Redis refuses this script's user or password (OBS_REDIS_URL): invalid username-password pair "
                      f"or user is disabled; its transactions stay spooled in {buf.spool.path}, pushed once Redis "
                      f"takes them, or by a script or `obs-pipeline spool push` with the right OBS_REDIS_URL"], said()
    buf.close()
    up = TransactionBuffer(settings=settings)  # the right URL, the same spool
    assert up.spool.flush() and up.spool.pending() == 0
    assert _queued_ids(redis_client, SiteKeys(settings.site)) == [
        t for o in spooled for t in (o.start_tx, o.finish_tx) if t]
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, spooled)
    up.close()


@contextlib.contextmanager
def silent_redis():
    """A port that accepts connections and reads what is sent but never answers (a hung
    Redis); yields (url, requests): each chunk of bytes received, as it arrives."""
    server = socket.create_server(("127.0.0.1", 0))
    requests: list[bytes] = []
    conns: list[socket.socket] = []

    def read(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                requests.append(chunk)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                conns.append(conn)
                threading.Thread(target=read, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"redis://127.0.0.1:{server.getsockname()[1]}/0", requests
    finally:
        server.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


def test_after_redis_did_not_answer_calls_spool_without_waiting_for_it_again(settings, redis_client, main_engine,
                                                                             monkeypatch):
    """A Redis that accepts connections but never answers cost each call its timeouts (about
    10 s: the call asked it before spooling, and an update asked it whether the record exists).
    Now, for REDIS_RETRY_AFTER_S after it did not answer, calls go to the spool without asking
    it (the flusher retries it); order is kept, and status() and an update of a spooled create
    still find it. Counted as requests reaching the socket, not as time."""
    from obs_pipeline import spool as spool_module

    monkeypatch.setattr(spool_module, "RETRY_INTERVAL_S", 600.0)  # its flusher stays out of the count
    monkeypatch.setattr(spool_module, "REDIS_RETRY_AFTER_S", 600.0)  # no clock in the test: the wait outlasts it
    with silent_redis() as (url, requests):
        buf = TransactionBuffer(settings=dataclasses.replace(settings, redis_url=url))
        first = buffer_observations(buf, 1, finish_every=0)  # waits for Redis once, then spooled
        assert requests, "the first call never reached the socket"
        reached = len(requests)
        later = buffer_observations(buf, 3)  # 3 starts, 2 finishes: updates of spooled creates
        assert buf.status(later[0].start_tx) == "pending" and buf.status(later[2].finish_tx) == "pending"
        assert len(requests) == reached, "a call asked the silent Redis again"
        assert buf.spool.pending() == 1 + 3 + 2
    buf.close()
    monkeypatch.setattr(spool_module, "RETRY_INTERVAL_S", 0.05)
    up = TransactionBuffer(settings=settings)  # Redis answering, the same spool (its flusher starts)
    assert up.spool.flush() and up.spool.pending() == 0
    queue = [json.loads(e)["transaction_id"] for e in reversed(redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1))]
    assert queue == [t for o in first + later for t in (o.start_tx, o.finish_tx) if t]
    # the flusher's first push that goes through ends the wait: calls go to Redis again at once
    real_buffer, timed_out = BufferStore.buffer, []
    monkeypatch.setattr(BufferStore, "buffer", lambda self, *args: (timed_out.append(1), (_ for _ in ()).throw(
        redis.TimeoutError("Timeout reading from socket (test)")))[1] if not timed_out else real_buffer(self, *args))
    again = buffer_observations(up, 1, finish_every=0)  # times out: spooled, and the flusher pushes it
    assert timed_out and wait_until(lambda: not up.spool.exists(), 30)
    assert not up.spool.redis_failed_recently()
    last = buffer_observations(up, 1, finish_every=0)
    assert not up.spool.exists()
    queue = [json.loads(e)["transaction_id"] for e in reversed(redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1))]
    assert queue[-2:] == [again[0].start_tx, last[0].start_tx]
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, first + later + again + last)
    up.close()


def test_a_wait_after_redis_did_not_answer_keeps_its_timeout_without_asking_it(settings, monkeypatch):
    """After Redis did not answer in time, status() of a spooled transaction answers "pending"
    from the spool without asking it, but wait() then subscribed to the events channel on the
    hung Redis all the same: its connection's handshake waited for the reply timeout, so
    wait(timeout=0.5) returned after 5 s (after 10 s where its own status() timed out first).
    Now it polls, as without pub/sub. Counted as requests reaching the socket, and as time."""
    from obs_pipeline import spool as spool_module

    monkeypatch.setattr(spool_module, "RETRY_INTERVAL_S", 600.0)  # its flusher stays out of the count
    monkeypatch.setattr(spool_module, "REDIS_RETRY_AFTER_S", 600.0)  # no clock in the test: the wait outlasts it
    with silent_redis() as (url, requests):
        buf = TransactionBuffer(settings=dataclasses.replace(settings, redis_url=url))
        spooled = buffer_observations(buf, 1, finish_every=0)  # waits for Redis once, then spooled
        assert buf.spool.redis_failed_recently() and buf.spool.pending() == 1
        time.sleep(0.2)
        reached = len(requests)
        began = time.monotonic()
        assert buf.wait(spooled[0].start_tx, until="applied", timeout=0.5) is False
        took = time.monotonic() - began
        time.sleep(0.2)
        assert len(requests) == reached, f"wait() asked the silent Redis: {requests[reached:]}"
        assert took < 2.0, f"wait(timeout=0.5) took {took:.1f} s"
        assert buf.status(spooled[0].start_tx) == "pending"
    buf.close()


def test_while_the_flusher_retries_a_hung_redis_no_call_waits_for_it(settings, redis_client, main_engine):
    """A hung Redis (SIGSTOP: the kernel still accepts connections, nothing answers). After the
    first call's timeout, calls spool without asking it while the flusher retries it. But the
    flusher's PING waits for its reply timeout (5 s) and renewed the wait when it timed out, every
    6 s (1 s apart, then 5 s), so the 5 s wait lapsed a second before each renewal: a call then
    asked the hung Redis itself and waited 5 s, holding the spool's lock (and every call of the
    site's scripts on this host with it). Now the wait lasts while the flusher's PING is out."""
    from obs_pipeline import spool as spool_module

    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    before = buffer_observations(buf, 1, finish_every=0)  # this thread's connection, open before the hang
    pid = redis_client.info("server")["process_id"]
    os.kill(pid, signal.SIGSTOP)
    try:
        first = buffer_observations(buf, 1, finish_every=0)  # waits for the reply timeout, then spooled
        assert buf.spool.redis_failed_recently() and buf.spool.pending() == 1
        # the moment the wait would lapse (while the flusher's PING is out), or a while
        wait_until(lambda: not buf.spool.redis_failed_recently(), spool_module.REDIS_RETRY_AFTER_S + 3, 0.02)
        began = time.monotonic()
        later = buffer_observations(buf, 2)  # 2 starts, 1 finish: an update of a spooled create
        took = time.monotonic() - began
        assert took < 2.5, f"3 calls took {took:.1f} s: one asked the hung Redis"  # (it waits 5 s; 3 fsyncs on a busy disk)
        assert buf.spool.pending() == 1 + 2 + 1
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wait_until(lambda: not buf.spool.exists(), 30)  # the flusher pushes it once Redis answers
    queue = _queued_ids(redis_client, keys)
    assert queue == [t for o in before + first + later for t in (o.start_tx, o.finish_tx) if t]
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, before + first + later)
    buf.close()


def test_a_script_that_finds_redis_hung_after_another_did_holds_none_of_its_calls(
        settings, redis_client, main_engine):
    """Two scripts of a site on one host share its spool. Redis hangs (SIGSTOP); the first
    script's call times out, and its calls then spool without asking Redis. The second script
    did not know yet: its next call found the spool and pushed it under the spool's lock,
    waiting for the reply timeout (5 s) with the lock held, so the first script's calls waited
    as long for the hung Redis. Now a call asks Redis outside the lock before it pushes."""
    keys = SiteKeys(settings.site)
    first, second = TransactionBuffer(settings=settings), TransactionBuffer(settings=settings)
    before = buffer_observations(first, 1, finish_every=0)
    theirs: list = []
    ready, go = threading.Event(), threading.Event()

    def second_script() -> None:  # its own thread, its connection open before the hang
        theirs.extend(buffer_observations(second, 1, finish_every=0))
        ready.set()
        assert go.wait(60)
        theirs.extend(buffer_observations(second, 1, finish_every=0))

    asking = threading.Thread(target=second_script)
    asking.start()
    assert ready.wait(30)
    pid = redis_client.info("server")["process_id"]
    os.kill(pid, signal.SIGSTOP)
    try:
        spooled = buffer_observations(first, 1, finish_every=0)  # waits for the reply timeout once
        assert first.spool.redis_failed_recently() and first.spool.pending() == 1
        go.set()
        time.sleep(1.0)
        assert asking.is_alive()  # the second script's call waits for the hung Redis
        began = time.monotonic()
        later = buffer_observations(first, 2)  # 2 starts, 1 finish
        took = time.monotonic() - began
        asking.join(30)
        assert took < 2.5, f"the first script's 3 calls took {took:.1f} s: they waited too"  # (5 s if they wait)
        assert len(theirs) == 2 and first.spool.pending() == 1 + 3 + 1
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wait_until(lambda: not first.spool.exists(), 30)  # pushed once Redis answers
    queue = [json.loads(e)["transaction_id"] for e in
             reversed(redis_client.lrange(keys.buffer, 0, -1))]
    everything = before + spooled + later + theirs
    assert sorted(queue) == sorted(t for o in everything for t in (o.start_tx, o.finish_tx) if t)
    assert queue.index(later[0].start_tx) < queue.index(later[0].finish_tx)
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, everything)
    first.close()
    second.close()


def test_a_transaction_that_uses_an_integer_key_created_by_a_poison_one_is_held_behind_it(
        settings, redis_client, main_engine):
    """Dependencies by foreign key, integer keys included: an execution of obs unit 950 waits
    behind the transaction that creates obs unit 950 and is dead-lettered with it as `blocked
    by`, instead of failing on its own foreign key until its retries are spent."""
    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as unit:
        unit.create("ObsUnit", {"id": 950, "name": "poison"})
    with buf.transaction() as execution:
        execution.create("ExecutedObsUnit", {"obs_unit_id": 950, "start_time": "2025-01-01T00:00:00Z",
                                             "status": "running"})
    independent = buffer_observations(buf, 2, finish_every=0)
    keys = SiteKeys(settings.site)
    with main_engine.begin() as conn:  # main refuses this unit's name: a permanent error
        conn.execute(sa.text("ALTER TABLE obs_unit ADD CONSTRAINT test_no_poison CHECK (name <> 'poison')"))
    try:
        drain_until_settled(settings, retry_base_s=0.05)
        failed = {e["transaction_id"]: e["failure"] for e in map(json.loads, redis_client.lrange(keys.failed, 0, -1))}
        assert set(failed) == {unit.transaction_id, execution.transaction_id}
        assert "CheckViolation" in failed[unit.transaction_id]["reason"]
        assert failed[execution.transaction_id]["reason"] == f"blocked by {unit.transaction_id}"
        assert failed[execution.transaction_id]["attempts"] == 1  # held, not retried on its own
    finally:
        with main_engine.begin() as conn:  # the operator fixes the cause
            conn.execute(sa.text("ALTER TABLE obs_unit DROP CONSTRAINT IF EXISTS test_no_poison"))
    subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "retry", unit.transaction_id],
                   env=cli_env(settings), check=True)  # requeues what it blocked too, after it
    drain_until_settled(settings, retry_base_s=0.05)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit WHERE obs_unit_id = 950")).scalar_one() == 1
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit WHERE id = ANY(CAST(:ids AS uuid[]))"),
                            {"ids": [o.obs_id for o in independent]}).scalar_one() == 2
    assert buf.status(unit.transaction_id) == buf.status(execution.transaction_id) == "replicated"
    assert_queues_empty(redis_client, settings.site)
    buf.close()


class _NoRedis:
    def ping(self):
        raise redis.ConnectionError("Redis is down (test)")


class _RedisDown:
    """A store whose Redis does not answer: the spool takes the transaction."""

    redis = _NoRedis()

    def buffer(self, *args):
        raise redis.ConnectionError("Redis is down (test)")


def _spool_line(tx_id: str) -> tuple:
    """A spool's buffer() arguments for a one-step transaction named tx_id."""
    from obs_pipeline.buffer_store import CacheWrites

    doc = {"transaction_id": tx_id, "steps": [{"step_id": "s1", "operation": "create", "model_class": "ObsUnit",
                                               "data": {"id": 1, "name": tx_id}}]}
    return tx_id, json.dumps(doc), CacheWrites()


def test_two_scripts_sharing_the_sites_spool_never_lose_each_others_lines(settings, redis_client, tmp_path):
    """Two observing scripts of one site on one host spool to the same file. While one pushes
    the spool to Redis, the other spools a new line: that line must survive the push (the
    pushing script deleted the file it had read, with the new line in it)."""
    from obs_pipeline.spool import Spool

    store = BufferStore(redis_client, settings.site)
    pushed_one, go = threading.Event(), threading.Event()

    class SlowStore:  # pushes like the real store; holds on after the first push
        def buffer(self, *args):
            store.buffer(*args)
            pushed_one.set()
            assert go.wait(30)

    first, second = Spool(tmp_path, settings.site, flush_store=SlowStore()), Spool(tmp_path, settings.site, flush_store=store)
    for tx_id in ("a1", "a2"):
        first.buffer(_RedisDown(), *_spool_line(tx_id))
    second.buffer(_RedisDown(), *_spool_line("b1"))
    assert first.pending() == second.pending() == 3
    pusher = threading.Thread(target=first.flush)
    pusher.start()
    assert pushed_one.wait(30)
    spooler = threading.Thread(target=second.buffer, args=(_RedisDown(), *_spool_line("b2")))
    spooler.start()
    time.sleep(0.3)
    assert spooler.is_alive()  # waits for the push's slice to end (spool.PUSH_SLICE_S)
    go.set()
    pusher.join(30)
    spooler.join(30)
    # b2 was appended between two slices: that push took it too, or it waits for the next
    assert second.pending() <= 1
    assert second.flush() and second.pending() == 0
    queue = [json.loads(e)["transaction_id"] for e in reversed(redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1))]
    assert queue == ["a1", "a2", "b1", "b2"]


@pytest.mark.parametrize("given", ["spool", "./spool", "~/spool", "XDG_STATE_HOME relative"])
def test_a_spool_folder_given_relative_stays_where_it_was_when_the_script_changes_folder(
        settings, redis_client, tmp_path, monkeypatch, given):
    """A script gives OBS_SPOOL_DIR (or spool_dir=) relative to its folder, or as ~/...; it spools
    during an outage, then changes folder (os.chdir into its data folder, say). The spool's path
    was taken against each call's folder: status() said None for what it had spooled, the next
    lines went to another file, pushed ahead of the first (which only a `spool push` run from the
    old folder would find), and `~` was a folder named `~`. The folder is fixed as the buffer is
    made; a relative XDG_STATE_HOME is ignored, as its specification says."""
    from obs_pipeline.spool import Spool

    home, start, elsewhere = tmp_path / "home", tmp_path / "start", tmp_path / "elsewhere"
    for folder in (home, start, elsewhere):
        folder.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_STATE_HOME", "state")
    monkeypatch.chdir(start)
    down = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{pick_free_ports(1)[0]}/0",
                               spool_dir=None if given.startswith("XDG") else given)
    expected = {"~/spool": home / "spool", "XDG_STATE_HOME relative": home / ".local/state/obs-pipeline/spool"
                }.get(given, start / "spool")
    buf = TransactionBuffer(settings=down)

    def observation() -> str:
        with buf.transaction() as tx:
            tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z", "status": "x"})
        return tx.transaction_id

    try:
        first = observation()
        monkeypatch.chdir(elsewhere)
        assert buf.status(first) == "pending"
        second = observation()
    finally:
        buf.close()
    spool = Spool(expected, settings.site, flush_store=BufferStore(redis_client, settings.site))
    assert [entry["id"] for entry in spool.unpushed()] == [first, second]
    assert spool.push() == 2
    assert _queued_ids(redis_client, SiteKeys(settings.site)) == [first, second]
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in start.iterdir()) == (
        ["spool"] if expected == start / "spool" else [])


def _write_spool(spool, tx_ids: list[str]) -> None:
    """A spool holding one line per id, as the spool writes them (thousands at once: appending
    them one fsync'd call at a time would take minutes)."""
    lines = []
    for tx_id in tx_ids:
        _, tx_json, caches = _spool_line(tx_id)
        lines.append(json.dumps({"id": tx_id, "tx": tx_json, "created": caches.created,
                                 "overlays": caches.overlays}) + "\n")
    spool.directory.mkdir(parents=True, exist_ok=True)
    spool.path.write_text("".join(lines))


def _write_offset_after(spool, lines: int) -> None:
    """The spool's offset as a push that pushed its first `lines` lines (none blank) left it."""
    from obs_pipeline import spool as spool_module

    with open(spool.path, "rb") as file:
        end = sum(len(line) for line in file.readlines()[:lines])
        spool._write_offset(spool_module._Offset(lines, end, spool_module._head_digest(file, end)))


def test_a_call_during_a_long_push_of_the_spool_waits_about_one_slice_and_still_goes_behind_it(
        settings, redis_client, tmp_path, monkeypatch):
    """After a long outage, pushing the spool takes seconds (about 0.4 ms a line). The push held
    the spool's lock throughout, and every call of every script of the site on the host waited
    for all of it (1.9 s behind a 5,000-line push). It holds the lock a slice at a time
    (spool.PUSH_SLICE_S): a call made meanwhile by another script waits about a slice, not the
    push, and its transaction still lands behind everything spooled before it, each once."""
    from obs_pipeline import spool as spool_module
    from obs_pipeline.spool import Spool

    monkeypatch.setattr(spool_module, "PUSH_SLICE_S", 0.02, raising=False)
    keys, count = SiteKeys(settings.site), 3000
    store = BufferStore(redis_client, settings.site)
    its_own_store = BufferStore(redis.Redis.from_url(settings.redis_url), settings.site)
    pushing = Spool(tmp_path, settings.site, flush_store=store)
    _write_spool(pushing, [f"old{i}" for i in range(count)])
    timing: dict = {}

    def push() -> None:
        started = time.monotonic()
        timing["pushed"] = pushing.push()
        timing["push_s"] = time.monotonic() - started

    pusher = threading.Thread(target=push)
    pusher.start()
    try:
        assert wait_until(lambda: redis_client.llen(keys.buffer) >= count // 10, 30)
        other_script = Spool(tmp_path, settings.site, flush_store=store)
        started = time.monotonic()
        other_script.buffer(its_own_store, *_spool_line("late"))
        waited = time.monotonic() - started
        during_the_push = pusher.is_alive()
    finally:
        pusher.join(60)
    assert not pusher.is_alive() and "push_s" in timing, timing
    assert waited < 0.25 * timing["push_s"], (f"the call waited {waited:.2f} s behind a push of "
                                              f"{timing['push_s']:.2f} s")
    assert during_the_push  # (it was made while the push went on, and returned before its end)
    assert wait_until(lambda: not pushing.exists(), 30)
    queue = [json.loads(e)["transaction_id"]
             for e in reversed(redis_client.lrange(keys.buffer, 0, -1))]
    assert queue == [f"old{i}" for i in range(count)] + ["late"]


# A push of the spool (argv[3], site and Redis from the environment) in a process of its own
# that SIGKILLs itself, in slices of 5 ms: `between_slices`, as its slice number argv[2] is
# about to start (its offset written, the lock held); `mid_slice`, once its line number argv[2]
# is in Redis and before its offset is written.
_SPOOL_PUSH_KILLED = r"""
import os, signal, sys
import redis
from obs_pipeline import spool
from obs_pipeline.buffer_store import BufferStore
from obs_pipeline.spool import Spool

where, at, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
spool.PUSH_SLICE_S = 0.005
counted = [0]
if where == "between_slices":
    real_slice = Spool._push_slice_locked

    def slice_unless_killed(self, *args):
        counted[0] += 1
        if counted[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_slice(self, *args)

    Spool._push_slice_locked = slice_unless_killed
else:
    real_buffer = BufferStore.buffer

    def buffer_then_killed(self, *args):
        real_buffer(self, *args)
        counted[0] += 1
        if counted[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)

    BufferStore.buffer = buffer_then_killed
site = os.environ["OBS_SITE"]
store = BufferStore(redis.Redis.from_url(os.environ["OBS_REDIS_URL"]), site)
Spool(folder, site, flush_store=store).push()
"""


@pytest.mark.parametrize("where", ["between_slices", "mid_slice"])
def test_a_push_of_the_spool_killed_between_or_within_its_slices_loses_and_doubles_nothing(
        settings, redis_client, tmp_path, where):
    """kill -9 of a process pushing the spool in slices, after some slices: the offset written
    after each line says how far it got, the lock dies with it, and the next push resumes there.
    A line in Redis whose offset was not written yet is pushed again and buffered once."""
    from obs_pipeline.spool import Spool

    keys, count = SiteKeys(settings.site), 400
    spool = Spool(tmp_path, settings.site, flush_store=BufferStore(redis_client, settings.site))
    _write_spool(spool, [f"tx{i}" for i in range(count)])
    at = 6 if where == "between_slices" else 150
    argv = [sys.executable, "-c", _SPOOL_PUSH_KILLED, where, str(at), str(tmp_path)]
    killed = subprocess.run(argv, env=cli_env(settings), capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    in_redis, offset = redis_client.llen(keys.buffer), int(spool.offset_path.read_text())
    assert 0 < offset < count and spool.pending() == count - offset
    if where == "between_slices":  # every line pushed has its offset written
        assert in_redis == offset
    else:  # the last line pushed has not
        assert in_redis == at and offset == at - 1
    assert spool.push() == count - offset and not spool.exists()
    queue = [json.loads(e)["transaction_id"]
             for e in reversed(redis_client.lrange(keys.buffer, 0, -1))]
    assert queue == [f"tx{i}" for i in range(count)]


def test_a_spool_moved_aside_during_a_push_leaves_no_offset_that_skips_the_next_spools_lines(
        settings, redis_client, tmp_path):
    """A push that Redis stopped partway (full: maxmemory reached) leaves the spool's offset
    (how many lines were pushed). Moved aside by hand then (rotated, kept for later), the file
    went, its offset stayed, and it counted the lines of the next spool file: the next push
    took that file's first lines for pushed, and removed a file holding fewer, unpushed."""
    from obs_pipeline.spool import Spool

    keys = SiteKeys(settings.site)
    store = BufferStore(redis_client, settings.site)
    limit = redis_client.config_get("maxmemory")["maxmemory"]

    class FullAfterFourLines:  # the real store; Redis is full from the fifth line on
        redis = store.redis

        def __init__(self):
            self.pushed = 0

        def buffer(self, *args):
            if self.pushed == 4:
                redis_client.config_set("maxmemory", 1)
            store.buffer(*args)
            self.pushed += 1

    try:
        pushing = Spool(tmp_path, settings.site, flush_store=FullAfterFourLines())
        _write_spool(pushing, [f"old{i}" for i in range(10)])
        assert not pushing.flush() and pushing.offset_path.read_text() == "4"
        pushing.path.rename(tmp_path / "moved-aside.jsonl")  # its six unpushed lines are the operator's now
        script = Spool(tmp_path, settings.site, flush_store=store)
        for tx_id in ("new0", "new1", "new2"):
            script.buffer(store, *_spool_line(tx_id))  # Redis full: spooled
        assert [tx["id"] for tx in script.unpushed()] == ["new0", "new1", "new2"]
    finally:
        redis_client.config_set("maxmemory", limit)
    assert script.flush() and not script.exists()
    queue = _queued_ids(redis_client, keys)
    assert queue == ["old0", "old1", "old2", "old3", "new0", "new1", "new2"]


@pytest.mark.parametrize("spooled_after, offset_written", [(2, True), (3, True), (3, False)])
def test_a_spool_truncated_in_place_after_a_partial_push_has_its_new_lines_pushed(
        settings, redis_client, main_engine, monkeypatch, caplog, spooled_after, offset_written):
    """A push that Redis stopped partway (it hung) leaves the spool's offset: 3 of its 5 lines
    pushed. The file then truncated in place, the same inode (an operator's `: > site.jsonl`,
    logrotate's `copytruncate`), and new lines spooled while Redis still hangs (calls then spool
    without a push), the offset counted the lines of the file's new content: the next push took
    its first 3 lines for pushed and removed the file whole, as it held no more, though each of
    their calls had returned (5 lines after 3 observations: it pushed their last 2 alone). The
    offset applies only to the content it counted: one warning, and the new lines are pushed, in
    order, each once. So with no offset written (a full disk), where the push's own process knows
    how far it got in the file."""
    from obs_pipeline import spool as spool_module
    from obs_pipeline.spool import Spool

    # no push between the truncation and the lines spooled after it but the test's own: the
    # flusher waits, and calls spool without asking Redis (as for 5 s after it hung)
    monkeypatch.setattr(spool_module, "RETRY_INTERVAL_S", 3600.0)
    monkeypatch.setattr(spool_module, "REDIS_RETRY_AFTER_S", 3600.0)
    caplog.set_level(logging.WARNING, logger="obs_pipeline.spool")
    keys, real_buffer = SiteKeys(settings.site), BufferStore.buffer
    hung, taken, hangs_after = threading.Event(), [], [3]

    def buffer_unless_hung(self, *args):  # Redis hangs (to buffering) again after `hangs_after` lines
        if hung.is_set() or len(taken) == hangs_after[0]:
            hung.set()
            raise redis.TimeoutError("Timeout reading from socket (test)")
        real_buffer(self, *args)
        taken.append(args[0])

    monkeypatch.setattr(BufferStore, "buffer", buffer_unless_hung)
    if not offset_written:
        monkeypatch.setattr(Spool, "_write_offset", lambda self, value: (_ for _ in ()).throw(
            OSError(28, "No space left on device")))
    buf = TransactionBuffer(settings=settings)
    hung.set()
    before = buffer_observations(buf, 3)  # 3 starts + 2 finishes, all spooled
    assert buf.spool.pending() == 5
    hung.clear()
    assert not buf.spool.flush()  # 3 pushed, then Redis hangs again
    assert buf.spool.pending() == (2 if offset_written else 5)
    inode = os.stat(buf.spool.path).st_ino
    os.truncate(buf.spool.path, 0)  # its 2 unpushed lines are the operator's now
    after = buffer_observations(buf, spooled_after)  # 2 starts + 1 finish: as many lines as the offset counts
    assert os.stat(buf.spool.path).st_ino == inode
    new_txs = [t for o in after for t in (o.start_tx, o.finish_tx) if t]
    read = [tx["id"] for tx in buf.spool.unpushed()], buf.spool.pending()
    hangs_after[0] = None
    hung.clear()
    assert buf.spool.flush() and not buf.spool.exists()
    queue = _queued_ids(redis_client, keys)
    assert queue == taken[:3] + new_txs
    assert read == (new_txs, len(new_txs))  # reads of the spool ignored the offset too
    warnings = [r.getMessage() for r in caplog.records if r.name == "obs_pipeline.spool"]
    assert len(warnings) == offset_written and all("truncated" in w for w in warnings), warnings
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, before[:2] + after)  # (the third's start was cut off)
    buf.close()


def test_an_offset_in_the_format_of_an_earlier_version_still_counts_the_pushed_lines(settings, redis_client,
                                                                                     tmp_path):
    """A spool partly pushed by an earlier version, whose offset file holds the count alone (a
    site upgraded during an outage): the lines it counts are not pushed again."""
    from obs_pipeline.spool import Spool

    spool = Spool(tmp_path, settings.site, flush_store=BufferStore(redis_client, settings.site))
    _write_spool(spool, [f"tx{i}" for i in range(5)])
    spool.offset_path.write_text("2")
    assert [tx["id"] for tx in spool.unpushed()] == ["tx2", "tx3", "tx4"] and spool.pending() == 3
    assert spool.push() == 3 and not spool.exists()
    queue = [json.loads(e)["transaction_id"] for e in reversed(redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1))]
    assert queue == ["tx2", "tx3", "tx4"]


def _earlier_versions_unpushed(spool) -> list[str]:
    """The ids an earlier version's script reads as not pushed yet, as it reads them (its
    Spool._offset and Spool.unpushed): every line counted, the offset file a bare count."""
    offset = int(Path(spool.offset_path).read_text() or 0)
    lines = [line for line in spool.path.read_bytes().splitlines() if line.strip()]
    return [json.loads(line)["id"] for index, line in enumerate(lines) if index >= offset]


def test_an_offset_this_version_writes_is_read_by_an_earlier_versions_scripts_during_an_upgrade(
        settings, redis_client, tmp_path, caplog):
    """Scripts of one site on one host share the spool, and the package upgraded while they run
    leaves scripts of the earlier version running beside new ones. The earlier version reads the
    offset file as `int(text or 0)`: one holding more than a count made each of its calls that
    looked at the spool raise ValueError, an observing script's transaction refused. The count
    stays alone in it; what this version checks it by is in a file of its own, used only while
    it is of the same count: a crash between the two writes, or an earlier version's push (which
    writes the count alone), leaves it of another count, and the count is read as before."""
    from obs_pipeline.spool import Spool

    caplog.set_level(logging.WARNING, logger="obs_pipeline.spool")
    store = BufferStore(redis_client, settings.site)

    class DownAfterTwoLines:  # the real store; Redis does not answer from the third line on
        redis = store.redis

        def __init__(self):
            self.pushed = 0

        def buffer(self, *args):
            if self.pushed == 2:
                raise redis.ConnectionError("Redis is down (test)")
            store.buffer(*args)
            self.pushed += 1

    spool = Spool(tmp_path, settings.site, flush_store=DownAfterTwoLines())
    _write_spool(spool, [f"tx{i}" for i in range(5)])
    assert not spool.flush()  # 2 pushed
    assert _earlier_versions_unpushed(spool) == ["tx2", "tx3", "tx4"]
    assert [tx["id"] for tx in spool.unpushed()] == ["tx2", "tx3", "tx4"]
    # an earlier version's push goes on (its count alone), or this one's crashed after its check
    checked_two = spool.offset_check_path.read_text()
    spool.offset_path.write_text("3")
    assert [tx["id"] for tx in spool.unpushed()] == ["tx3", "tx4"] and spool.pending() == 2
    spool.offset_path.write_text("2")
    spool.offset_check_path.write_text(checked_two.replace("2 ", "3 ", 1))  # a check of 3 lines, the count 2
    assert [tx["id"] for tx in spool.unpushed()] == ["tx2", "tx3", "tx4"]
    spool.offset_check_path.write_bytes(b"\0" * 40)  # zeros after a power loss: no check
    assert [tx["id"] for tx in spool.unpushed()] == ["tx2", "tx3", "tx4"]
    assert not [r for r in caplog.records if r.name == "obs_pipeline.spool"]  # no check taken for stale
    spool._flush_store = store
    assert spool.flush() and not spool.exists()
    assert not spool.offset_path.exists() and not spool.offset_check_path.exists()
    queue = [json.loads(e)["transaction_id"] for e in reversed(redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1))]
    assert queue == ["tx0", "tx1", "tx2", "tx3", "tx4"]


@pytest.mark.parametrize("damaged", [b"\0" * 8, b"", b"4 1234 \xff-not-a-count", b"-3"])
def test_a_damaged_offset_file_does_not_fail_the_calls_and_the_spool_is_pushed_from_its_first_line(
        settings, redis_client, tmp_path, caplog, damaged):
    """An offset file zero-filled by a power loss (its write replaced it, not fsync'd), or holding
    anything but a count, raised ValueError from every call that looked at the spool, in every
    script of the site on the host, until an operator removed it. It is taken for no offset, with
    one warning (a line pushed again is harmless): the push removes it and pushes every line."""
    from obs_pipeline.spool import Spool

    caplog.set_level(logging.WARNING, logger="obs_pipeline.spool")
    store = BufferStore(redis_client, settings.site)
    spool = Spool(tmp_path, settings.site, flush_store=store)
    _write_spool(spool, [f"tx{i}" for i in range(3)])
    spool.offset_path.write_bytes(damaged)
    assert [tx["id"] for tx in spool.unpushed()] == ["tx0", "tx1", "tx2"] and spool.pending() == 3
    assert spool.summary()["pending"] == 3
    spool.buffer(store, *_spool_line("tx3"))  # a call: pushes the spool first, then this
    assert not spool.exists() and not spool.offset_path.exists()
    queue = [json.loads(e)["transaction_id"] for e in reversed(redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1))]
    assert queue == ["tx0", "tx1", "tx2", "tx3"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "obs_pipeline.spool"]
    assert len(warnings) == (damaged != b""), warnings  # an empty one is no offset, as it always was


def test_a_spool_line_cut_short_by_a_crash_is_not_taken_for_a_transaction(settings, redis_client, tmp_path):
    """A crash in the middle of writing a spool line: that call never returned, so the line is
    no spooled transaction; it must not stop every later push with a JSON error, nor swallow
    the next line spooled after it."""
    from obs_pipeline.buffer_store import CacheWrites
    from obs_pipeline.spool import Spool

    spool = Spool(tmp_path, settings.site, flush_store=BufferStore(redis_client, settings.site))
    doc = {"transaction_id": "whole", "steps": [{"step_id": "s1", "operation": "create", "model_class": "ObsUnit",
                                                 "data": {"id": 1, "name": "x"}}]}
    spool.path.parent.mkdir(parents=True, exist_ok=True)
    spool.path.write_text(json.dumps({"id": "whole", "tx": json.dumps(doc), "created": [], "overlays": []})
                          + "\n" + '{"id": "cut", "tx": "{\\"transa')
    assert spool.pending() == 1

    after = {"transaction_id": "after", "steps": doc["steps"]}  # spooled next: not glued onto the fragment
    spool.buffer(_RedisDown(), "after", json.dumps(after), CacheWrites())
    assert spool.pending() == 2
    assert spool.flush() and not spool.path.exists()
    queue = [json.loads(e)["transaction_id"] for e in redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1)]
    assert queue == ["after", "whole"]


# An observing script (site from the environment, Redis at argv[1]: nothing listens there, spool
# folder argv[2]) that spools three observations, prints each id once its call returned, and is
# SIGKILLed in the middle of writing the fourth's line: half of it is on disk.
_SCRIPT_KILLED_MID_APPEND = r"""
import os, signal, sys
from obs_pipeline.ingest import TransactionBuffer

buf = TransactionBuffer(redis_url=sys.argv[1], spool_dir=sys.argv[2])
for i in range(4):
    if i == 3:
        real_write = os.write

        def half_then_killed(fd, data):
            real_write(fd, bytes(data)[:len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

        os.write = half_then_killed
    with buf.transaction(endpoint="start_observation") as tx:
        print(tx.transaction_id, flush=True)  # (the fourth's id, before the call that is killed)
        tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z", "status": "running"})
"""


@pytest.mark.parametrize("found_by", ["push", "next_append"])
def test_a_script_killed_mid_append_loses_and_doubles_no_line_before_it_and_its_cut_line_is_warned_of(
        settings, redis_client, tmp_path, caplog, found_by):
    """kill -9 of a script while it writes a spool line: the lines spooled before it are pushed
    once each, and its half line is dropped (its call never returned). It was dropped silently,
    by the next append or by the push that removed the spool: nobody learnt that the script's
    last observation, which it may have taken for recorded, was not. One warning names it."""
    from obs_pipeline.spool import Spool

    caplog.set_level(logging.WARNING, logger="obs_pipeline.spool")
    folder = tmp_path / "spool"
    nothing_there = f"redis://127.0.0.1:{pick_free_ports(1)[0]}/0"
    killed = subprocess.run([sys.executable, "-c", _SCRIPT_KILLED_MID_APPEND, nothing_there, str(folder)],
                            env=cli_env(settings), capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    *spooled, cut = killed.stdout.split()
    assert len(spooled) == 3
    spool = Spool(folder, settings.site, flush_store=BufferStore(redis_client, settings.site))
    assert not spool.path.read_bytes().endswith(b"\n")  # (the half line is there)
    assert [entry["id"] for entry in spool.unpushed()] == spooled
    if found_by == "next_append":
        spool.buffer(_RedisDown(), *_spool_line("after"))
        spooled.append("after")
    assert spool.push() == len(spooled) and not spool.exists()
    assert _queued_ids(redis_client, SiteKeys(settings.site)) == spooled
    warnings = [r.getMessage() for r in caplog.records if r.name == "obs_pipeline.spool"]
    assert len(warnings) == 1 and "ends in a line cut short" in warnings[0] and f"transaction {cut}" in warnings[0], \
        warnings


# An observing script (site from the environment, Redis at argv[1], spool folder argv[2]) whose
# signal handler buffers the observation as aborted, as a script's SIGTERM handler does. With
# nothing listening at argv[1], the signal comes while its main thread is inside the spool (argv[3]):
# appending a line (the spool's lock held, the line fsync'd), pushing the spool before its next line
# (the lock held), or reading it for status(). `anywhere`: a signal every 10 ms while it buffers
# 300 observations (every 1 ms, 2,000, with Redis up), and more until the handler has buffered 20,
# wherever the main thread is. It prints each
# call's endpoint and id at its end, in the order the calls returned. argv[5] "second": the handler
# buffers through a TransactionBuffer of its own, made in it (a library's, say).
_SCRIPT_SIGNALLED_INSIDE_THE_SPOOL = r"""
import os, signal, sys
from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline.spool import Spool

buf = TransactionBuffer(redis_url=sys.argv[1], spool_dir=sys.argv[2])
where, redis_up, its_own = sys.argv[3], sys.argv[4] == "up", sys.argv[5] == "second"
returned, busy, sent = [], [], []


def observation(endpoint, through=None):
    with (through or buf).transaction(endpoint=endpoint) as tx:
        tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z", "status": endpoint})
    returned.append(f"{endpoint} {tx.transaction_id}")  # (printed at the end: a print in a handler can interrupt one)
    return tx.transaction_id


def aborted(signum, frame):
    if not busy:  # (one at a time, as a script's handler of one signal is)
        busy.append(1)
        observation("aborted", TransactionBuffer(redis_url=sys.argv[1], spool_dir=sys.argv[2]) if its_own else None)
        busy.clear()


def signalled_once(real):
    def call(*args, **kwargs):
        result = real(*args, **kwargs)
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGALRM))  # (its handler runs as this returns)
        return result
    return call


signal.signal(signal.SIGALRM, aborted)
if where == "anywhere":
    every = 0.001 if redis_up else 0.01  # (a spooled call takes milliseconds: its fsync)
    signal.setitimer(signal.ITIMER_REAL, every, every)
    own = 0
    while own < (2000 if redis_up else 300) or len(returned) - own < 20:  # (and 20 of the handler's at least)
        observation("next")
        own += 1
    signal.setitimer(signal.ITIMER_REAL, 0)
elif where == "appending":
    os.fsync = signalled_once(os.fsync)
    observation("start")
else:
    first = observation("start")
    Spool._offset_in = signalled_once(Spool._offset_in)
    if where == "pushing":
        observation("next")
    else:
        assert buf.status(first) == "pending"
print("\n".join(returned), flush=True)
"""


@pytest.mark.parametrize("where, redis_up, handler_buffer", [
    ("appending", False, "the script's"), ("pushing", False, "the script's"), ("reading", False, "the script's"),
    ("anywhere", False, "the script's"), ("anywhere", True, "the script's"), ("appending", False, "a second"),
    ("pushing", False, "a second"), ("reading", False, "a second"), ("anywhere", False, "a second")])
def test_a_signal_handler_that_buffers_while_its_thread_is_inside_the_spool_neither_hangs_nor_loses_it(
        settings, redis_client, tmp_path, where, redis_up, handler_buffer):
    """A script's signal handler buffers the observation as aborted. Python runs it in the main
    thread, inside whatever that thread was doing. Redis down, that was appending to the spool,
    or pushing or reading it, with the spool's lock held: the handler's call waited for that lock
    for ever, and the script hung, holding the flock that every script of the site on the host
    takes to spool. Redis up, the interrupted call was waiting for Redis's reply, and the
    handler's sent its own on the same connection: `RuntimeError: concurrent poll() invocation`
    out of the script's call. Now it is buffered as the interrupted call leaves the spool: every
    call is kept, once, in order. So with a second TransactionBuffer of the site made in the
    handler: its spool, another object, took a flock of its own on the lock file, and waited for
    the script's for ever."""
    from obs_pipeline.spool import Spool

    folder = tmp_path / "spool"
    url = settings.redis_url if redis_up else f"redis://127.0.0.1:{pick_free_ports(1)[0]}/0"
    try:
        script = subprocess.run([sys.executable, "-c", _SCRIPT_SIGNALLED_INSIDE_THE_SPOOL, url, str(folder), where,
                                 "up" if redis_up else "down", handler_buffer.split()[-1]], env=cli_env(settings),
                                capture_output=True,
                                text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the script hung in its signal handler ({where})")
    assert script.returncode == 0, script.stderr
    printed = [line.split() for line in script.stdout.splitlines()]
    spool = Spool(folder, settings.site, flush_store=BufferStore(redis_client, settings.site))
    assert spool.push() == (0 if redis_up else len(printed)) and not spool.exists()
    queue = _queued_ids(redis_client, SiteKeys(settings.site))
    if where == "anywhere":  # a handler's call returned before the call it interrupted, and is buffered after it
        assert sorted(queue) == sorted(tx_id for _, tx_id in printed)
        own = [tx_id for name, tx_id in printed if name == "next"]
        assert [tx_id for tx_id in queue if tx_id in set(own)] == own
        assert sum(name == "aborted" for name, _ in printed) >= 20, script.stdout
        return
    expected = ["start", "next", "aborted"] if where == "pushing" else ["start", "aborted"]
    assert sorted(name for name, _ in printed) == sorted(expected), script.stdout
    assert queue == [dict(printed)[name] for name in expected]


# A timer's handler looks a host up (a connect does) while the main thread's first lookup is under
# way; argv[1]: what the script imports first. Prints the handler's errors, or "ok".
_SCRIPT_LOOKUP_IN_A_HANDLER = r"""
import importlib, signal, socket, sys
importlib.import_module(sys.argv[1])
errors = []


def handler(signum, frame):
    try:
        socket.getaddrinfo("127.0.0.1", 1)
    except LookupError as error:
        errors.append(repr(error))


signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.0003, 0.0003)
socket.getaddrinfo("127.0.0.1", 1)
signal.setitimer(signal.ITIMER_REAL, 0)
print(errors[0] if errors else "ok")
"""


def test_a_signal_handler_s_first_connect_inside_the_main_thread_s_finds_the_idna_codec_loaded():
    """A host name is encoded with the `idna` codec, imported at a process's first lookup (its
    first connect). A script's signal handler that buffers while that import is under way found
    it half-loaded: `LookupError: unknown encoding: idna` out of the handler's call (the `anywhere`
    case of the test above failed so, now and then). Importing ingest loads the codec."""
    said = [subprocess.run([sys.executable, "-c", _SCRIPT_LOOKUP_IN_A_HANDLER, "obs_pipeline.ingest"],
                           capture_output=True, text=True, timeout=60) for _ in range(3)]
    assert [(run.returncode, run.stdout.strip()) for run in said] == [(0, "ok")] * 3, [r.stderr for r in said]


def test_a_spool_line_whose_blocks_a_power_loss_left_unwritten_is_not_taken_for_a_transaction(
        settings, redis_client, tmp_path):
    """A power loss while a spool line is fsync'd can leave it whole in length, newline included,
    with zeros where blocks were not written yet (a file system reads unwritten blocks as zeros):
    that call never returned, so it is no transaction. It stopped every push with a JSON error
    (every call of the site's scripts on the host raised it, and get() too), for good once a line
    was spooled after it. Now it is skipped, as a line cut short is."""
    from obs_pipeline.buffer_store import CacheWrites
    from obs_pipeline.spool import Spool

    spool = Spool(tmp_path, settings.site, flush_store=BufferStore(redis_client, settings.site))
    doc = {"transaction_id": "whole", "steps": [{"step_id": "s1", "operation": "create", "model_class": "ObsUnit",
                                                 "data": {"id": 1, "name": "x"}}]}
    line = json.dumps({"id": "zeroed", "tx": json.dumps({**doc, "transaction_id": "zeroed"}), "created": [],
                       "overlays": []})
    spool.path.parent.mkdir(parents=True, exist_ok=True)
    spool.path.write_bytes((json.dumps({"id": "whole", "tx": json.dumps(doc), "created": [], "overlays": []}) + "\n"
                            + line[:20] + "\0" * (len(line) - 30) + line[-10:] + "\n").encode())

    after = {"transaction_id": "after", "steps": doc["steps"]}  # spooled after it, after a restart
    spool.buffer(_RedisDown(), "after", json.dumps(after), CacheWrites())
    assert spool.pending() == 2 and not spool.holds("zeroed")
    assert [tx["id"] for tx in spool.unpushed()] == ["whole", "after"]
    assert spool.flush() and not spool.path.exists()
    queue = [json.loads(e)["transaction_id"] for e in redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1)]
    assert queue == ["after", "whole"]


@pytest.mark.parametrize("tx_id", ["a-usable-id", None])
def test_a_spooled_line_set_aside_whose_reply_is_lost_and_that_redis_py_sends_again_is_listed_once(
        settings, redis_client, monkeypatch, tx_id):
    """With a Redis URL asking redis-py to retry, the set-aside script whose reply was lost after
    Redis ran it is sent again. A line with a usable id was answered "listed already" (its status
    is the letter): the push neither counted it nor said so; one without was listed twice."""
    keys = SiteKeys(settings.site)
    client = redis.Redis.from_url(settings.redis_url + "?retry_on_timeout=yes")
    store = BufferStore(client, settings.site)
    letter = '{"status":"failed"   ,"transaction_id":null,"failure":{"kind":"refused_spool_line","failed_at":1}}'
    evals: list[str] = []
    send_and_read = redis.Redis._send_command_parse_response

    def reply_lost_once(conn_client, conn, command_name, *args, **options):
        reply = send_and_read(conn_client, conn, command_name, *args, **options)
        if conn_client is client and command_name == "EVAL" and "refused_spool_line" in args[1]:
            evals.append(args[1])
            if len(evals) == 1:
                raise redis.TimeoutError("Timeout reading from socket")  # Redis ran it; redis-py retries
        return reply

    monkeypatch.setattr(redis.Redis, "_send_command_parse_response", reply_lost_once)
    try:
        assert store.set_aside_spooled(tx_id, letter, "digest-1") is True  # listed by this call
    finally:
        monkeypatch.undo()
        client.close()
    assert len(evals) == 2  # the lost one, sent again
    assert redis_client.lrange(keys.failed, 0, -1) == [letter.encode()]
    assert int(redis_client.hget(keys.stats, "dead_lettered_total")) == 1


def test_a_spooled_line_the_buffer_script_cannot_take_is_dead_lettered_and_the_push_goes_on(
        settings, redis_client, main_engine, monkeypatch, caplog):
    """A spooled line that is not the buffer script's arguments (another version's layout, a
    hand's edit) is refused each time it is pushed. It stopped the push at that line for good:
    every later call of every script of the site raised its error or spooled behind it, until
    someone edited the spool. Now it leaves the spool for the dead-letter list (kind
    `refused_spool_line`, the line in it), the push goes on in order, the finish that depended
    on it is never applied (dead-lettered: no row to update), and `failed retry` refuses it in
    one line."""
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.model_registry import ModelRegistry

    down = _buffering_fails_while_set(monkeypatch)
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    down.set()
    before = buffer_observations(buf, 2, finish_every=1)
    victim = buffer_observations(buf, 1, finish_every=1)[0]
    after = buffer_observations(buf, 2, finish_every=1)
    assert buf.spool.pending() == 5 * 2
    lines = buf.spool.path.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):  # the start as another layout has it: the transaction as an object
        entry = json.loads(line)
        if entry["id"] == victim.start_tx:
            lines[i] = json.dumps({**entry, "tx": json.loads(entry["tx"])}) + "\n"
    buf.spool.path.write_text("".join(lines))
    down.clear()
    with caplog.at_level(logging.WARNING, logger="obs_pipeline.spool"):
        assert buf.spool.flush() and not buf.spool.exists()
    queue = _queued_ids(redis_client, keys)
    expected = [t for o in before for t in (o.start_tx, o.finish_tx)] + [victim.finish_tx] + [
        t for o in after for t in (o.start_tx, o.finish_tx)]
    assert queue == expected  # in order, the refused line left out
    letters = DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models)).list()
    assert [letter.transaction_id for letter in letters] == [victim.start_tx]
    refused = letters[0]
    assert refused.doc["failure"]["kind"] == "refused_spool_line"
    assert '"tx"' in refused.reason and "cannot be retried" in refused.reason
    assert json.loads(refused.doc["spool_line"])["tx"]["transaction_id"] == victim.start_tx
    assert buf.status(victim.start_tx) == "failed"
    assert sum(victim.start_tx in r.getMessage() and "failed show" in r.getMessage()
               for r in caplog.records) == 1, caplog.text

    drain_until_settled(settings, retry_base_s=0.05)
    assert_applied_exactly_once(main_engine, before + after)
    with main_engine.connect() as conn:  # nothing of the refused one, nor of the finish that depended on it
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit WHERE id = :i"),
                            {"i": victim.obs_id}).scalar_one() == 0
    failed = {e["transaction_id"]: e for e in map(json.loads, redis_client.lrange(keys.failed, 0, -1))}
    assert set(failed) == {victim.start_tx, victim.finish_tx}
    assert "to update" in failed[victim.finish_tx]["failure"]["reason"]

    retry = subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "retry", victim.start_tx],
                           env=cli_env(settings), capture_output=True, text=True)
    assert retry.returncode == 1 and len(retry.stderr.strip().splitlines()) == 1, retry.stderr
    assert "cannot be retried" in retry.stderr and "failed discard" in retry.stderr
    every = subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "retry", "--all"],
                           env=cli_env(settings), capture_output=True, text=True, check=True)
    start = victim.start_tx
    assert every.stderr.splitlines() == [  # the refused line named, as it stays listed
        f"requeued 1 transaction(s); 1 dead letter(s) stay listed, as they cannot be retried: {start}: a spooled "
        f"line Redis could not take, and would refuse again (`obs-pipeline failed show {start}`: check its rows as "
        f"they are now, buffer the steps still wanted again, then `obs-pipeline failed discard {start}`)"], every.stderr
    assert [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.failed, 0, -1)] == [victim.start_tx]
    subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "discard", victim.start_tx],
                   env=cli_env(settings), check=True, capture_output=True)
    assert redis_client.llen(keys.failed) == 0 and buf.status(victim.start_tx) is None
    buf.close()


def test_a_spooled_line_too_large_for_redis_is_kept_beside_the_spool_and_the_push_goes_on(
        settings, redis_client, tmp_path):
    """A line larger than Redis's `proto-max-bulk-len` (1 MB at least: a managed Redis's may be
    that low), spooled while Redis was down, is refused however often it is pushed: "Protocol
    error: invalid bulk length", or, as often, its connection reset while it is sent (read as
    Redis gone away: the push stopped there for good). It is checked against the limit before it
    is sent, and goes to the dead-letter list too, whole in a side file beside the spool (a letter
    that held it would be refused alike); a crash before the push recorded that sets it aside
    again, and it is listed once."""
    from obs_pipeline.spool import Spool

    spool = Spool(tmp_path, settings.site, flush_store=BufferStore(redis_client, settings.site))
    big = {"transaction_id": "big", "metadata": {"observing_log": "x" * 1_100_000},
           "steps": [{"step_id": "s1", "operation": "create", "model_class": "ObsUnit", "data": {"id": 1, "name": "b"}}]}
    for tx_id, tx_json in (("a1", _spool_line("a1")[1]), ("big", json.dumps(big)), ("a2", _spool_line("a2")[1])):
        spool.buffer(_RedisDown(), tx_id, tx_json, _spool_line(tx_id)[2])
    limit = redis_client.config_get("proto-max-bulk-len")["proto-max-bulk-len"]
    redis_client.config_set("proto-max-bulk-len", 1024 * 1024)
    try:
        spooled = spool.path.read_bytes()
        assert spool.flush() and not spool.path.exists()
        assert spool.set_aside == 1  # (`obs-pipeline spool push` says how many)
        spool.path.write_bytes(spooled)  # as a push that crashed after setting big aside left it
        _write_offset_after(spool, 1)
        assert spool.flush() and not spool.path.exists() and spool.set_aside == 1
    finally:
        redis_client.config_set("proto-max-bulk-len", limit)
    keys = SiteKeys(settings.site)
    assert _queued_ids(redis_client, keys) == ["a1", "a2"]
    letters = [json.loads(e) for e in redis_client.lrange(keys.failed, 0, -1)]
    assert [letter["transaction_id"] for letter in letters] == ["big"]
    assert "over Redis's proto-max-bulk-len of 1048576" in letters[0]["failure"]["reason"]
    kept = letters[0]["spool_line_file"]
    assert os.path.dirname(kept) == str(tmp_path)
    with open(kept) as side:
        assert json.loads(json.loads(side.readline())["tx"]) == big


def test_a_spooled_bulk_create_whose_arguments_together_pass_client_query_buffer_limit_is_pushed(
        settings, redis_client, main_engine, monkeypatch):
    """Redis measures `client-query-buffer-limit` against what its query buffer holds at once:
    one argument (with its CRLF), never the arguments of a command together (6.2 and 7.0 take an
    EVALSHA of two 700 kB arguments under a limit of 1 MB). A bulk_create spooled during an
    outage, whose transaction and cache writes were 1.2 MB together but each far under the limit,
    was dead-lettered as over it (`refused_spool_line`, which cannot be retried): an observation
    lost that Redis takes whole, as it took the same call before the outage."""
    down = _buffering_fails_while_set(monkeypatch)
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    down.set()
    with buf.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "running"})
        pkg = tx.create("RawDataPackage", {"name": "big", "executed_obs_unit_id": obs["id"]})
        tx.bulk_create("RawDataFile", [{"name": f"f{j}_" + "n" * 500 + ".fits", "raw_data_package_id": pkg["id"]}
                                       for j in range(1000)])
    entry = json.loads(buf.spool.path.read_bytes())
    parts = [entry["tx"]] + [part for item in entry["created"] + entry["overlays"] for part in item]
    sizes = [len(part.encode()) for part in parts]
    assert max(sizes) < 1024 * 1024 < sum(sizes)  # each far under the limit, together over it
    limit = redis_client.config_get("client-query-buffer-limit")["client-query-buffer-limit"]
    redis_client.config_set("client-query-buffer-limit", 1024 * 1024)
    try:
        down.clear()
        assert buf.spool.flush() and not buf.spool.exists()
    finally:
        redis_client.config_set("client-query-buffer-limit", limit)
    assert [json.loads(e).get("failure", {}).get("reason") for e in redis_client.lrange(keys.failed, 0, -1)] == []
    assert buf.spool.set_aside == 0 and buf.status(tx.transaction_id) == "pending"
    drain_until_settled(settings)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM raw_data_file WHERE raw_data_package_id = :p"),
                            {"p": pkg["id"]}).scalar_one() == 1000
    buf.close()


def test_a_spooled_argument_that_with_its_crlf_passes_client_query_buffer_limit_is_set_aside(
        settings, redis_client, tmp_path):
    """Redis counts an argument's CRLF in its query buffer: under a `client-query-buffer-limit`
    of 1 MB, an argument of 1 MB less one byte has its connection reset while it is sent. The
    check before the push took it for one that fits, and every push stopped at it (read as Redis
    gone away) for good; it is set aside as one too large."""
    from obs_pipeline.spool import Spool

    spool = Spool(tmp_path, settings.site, flush_store=BufferStore(redis_client, settings.site))
    limit = 1024 * 1024
    big = {"transaction_id": "edge", "metadata": {"observing_log": ""},
           "steps": [{"step_id": "s1", "operation": "create", "model_class": "ObsUnit", "data": {"id": 1, "name": "b"}}]}
    big["metadata"]["observing_log"] = "x" * (limit - 1 - len(json.dumps(big)))
    assert len(json.dumps(big)) == limit - 1
    for tx_id, tx_json in (("a1", _spool_line("a1")[1]), ("edge", json.dumps(big)), ("a2", _spool_line("a2")[1])):
        spool.buffer(_RedisDown(), tx_id, tx_json, _spool_line(tx_id)[2])
    before = redis_client.config_get("client-query-buffer-limit")["client-query-buffer-limit"]
    redis_client.config_set("client-query-buffer-limit", limit)
    try:
        assert spool.flush() and not spool.path.exists() and spool.set_aside == 1
    finally:
        redis_client.config_set("client-query-buffer-limit", before)
    keys = SiteKeys(settings.site)
    assert _queued_ids(redis_client, keys) == ["a1", "a2"]
    letters = [json.loads(e) for e in redis_client.lrange(keys.failed, 0, -1)]
    assert [letter["transaction_id"] for letter in letters] == ["edge"]
    assert "over Redis's client-query-buffer-limit of 1048576" in letters[0]["failure"]["reason"]


def test_a_later_update_of_a_row_a_refused_spooled_line_updates_is_applied_and_its_letter_says_so(
        settings, redis_client, main_engine, monkeypatch):
    """A refused spooled line holds no row, as a transaction the drain dead-letters does: a later
    spooled update of a row it updated is pushed and applied without it (a row it created is
    another matter: what uses it finds no row). Its letter told the operator to buffer its steps
    again if still wanted, which writes the older values over the newer: it says now that later
    writes went on without it, and to check its rows first."""
    down = _buffering_fails_while_set(monkeypatch)
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = buffer_observations(buf, 1, finish_every=0)[0]
    drain_until_settled(settings)
    assert buf.wait(obs.start_tx, "replicated", timeout=30)
    down.set()
    first = buf.update("ExecutedObsUnit", obs.obs_id, {"status": "completed", "end_time": "2025-01-01T01:00:00Z"})
    later = buf.update("ExecutedObsUnit", obs.obs_id, {"status": "archived"})
    lines = buf.spool.path.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):  # the first as another layout has it: its transaction an object
        entry = json.loads(line)
        if entry["id"] == first:
            lines[i] = json.dumps({**entry, "tx": json.loads(entry["tx"])}) + "\n"
    buf.spool.path.write_text("".join(lines))
    down.clear()
    assert buf.spool.flush() and buf.spool.set_aside == 1
    drain_until_settled(settings)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status, end_time FROM executed_obs_unit WHERE id = :i"),
                            {"i": obs.obs_id}).one() == ("archived", None)
    assert buf.status(later) == "replicated" and buf.status(first) == "failed"
    letters = [json.loads(e) for e in redis_client.lrange(keys.failed, 0, -1)]
    assert [letter["transaction_id"] for letter in letters] == [first]
    reason = letters[0]["failure"]["reason"]
    assert "went on without it" in reason and "check" in reason, reason
    from obs_pipeline.dead_letters import CannotBeRetried, DeadLetters
    from obs_pipeline.model_registry import ModelRegistry

    with pytest.raises(CannotBeRetried, match="went on without it, so check its rows"):
        DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models)).retry([first])
    buf.close()


def test_a_refused_spooled_line_set_aside_again_after_a_crash_is_listed_once(settings, redis_client, tmp_path):
    """A push that crashed after a line was set aside, before it recorded its progress, sets the
    line aside again. Only a status key that was that letter said so: a line without a usable id
    (a hand's edit cut short) has none, and a line whose id already had a status (another
    transaction's, a producer reusing the id) keeps that one, so each was listed again at every
    such crash (one `#N` more to discard each time). Each line is listed once, and discarding
    its letter leaves nothing of it behind."""
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.model_registry import ModelRegistry
    from obs_pipeline.spool import Spool

    spool = Spool(tmp_path, settings.site, flush_store=BufferStore(redis_client, settings.site))
    for tx_id in ("a1", "a2"):
        spool.buffer(_RedisDown(), *_spool_line(tx_id))
    first, last = spool.path.read_bytes().splitlines(keepends=True)
    cut = first[:len(first) // 2] + b"\n"
    reused = json.dumps({"id": "reused", "tx": {"transaction_id": "reused"}, "created": [], "overlays": []}) + "\n"
    spooled = first + cut + reused.encode() + last
    keys = SiteKeys(settings.site)
    other = '{"status":"pending","transaction_id":"reused","steps":[]}'
    redis_client.set(keys.transaction("reused"), other)  # an earlier transaction of the id
    spool.path.write_bytes(spooled)
    assert spool.flush() and spool.set_aside == 2
    for crashed_after in (2, 3):  # as a push killed after setting each aside left the spool
        spool.path.write_bytes(spooled)
        _write_offset_after(spool, crashed_after - 1)
        assert spool.flush() and not spool.path.exists()
    assert spool.set_aside == 2
    letters = DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models))
    assert [(letter.transaction_id, letter.refused_spool_line) for letter in letters.list()] == [
        (None, True), ("reused", True)]
    assert redis_client.get(keys.transaction("reused")).decode() == other  # the earlier one's, kept
    assert _queued_ids(redis_client, keys) == ["a1", "a2"]
    letters.discard(["#1"])
    letters.discard(["reused"])  # (by its id, as `failed list` shows it: a place names it no more)
    assert letters.list() == [] and redis_client.get(keys.transaction("reused")).decode() == other
    assert not list(redis_client.scan_iter(f"{keys.prefix}set_aside:*"))


def test_reads_while_a_spooled_line_cannot_be_read_answer_from_the_others(settings, redis_client, monkeypatch):
    """While Redis cannot take transactions, status() and get() read the spool. A line there that
    is not the spool's (a hand's edit gone wrong: cut JSON with the record's id in it) made them
    raise its JSON error until it was pushed (and the push then stopped at it). They skip it now,
    as the push sets it aside."""
    down = _buffering_fails_while_set(monkeypatch)
    buf = TransactionBuffer(settings=settings)
    down.set()
    spooled = buffer_observations(buf, 1, finish_every=0)[0]
    with open(buf.spool.path, "rb+") as spool_file:  # a copy of the line, cut short by a hand
        line = spool_file.readline()
        spool_file.seek(0, os.SEEK_END)
        spool_file.write(line[:len(line) // 2] + b"\n")
    assert buf.status(spooled.start_tx) == "pending"
    assert buf.get("ExecutedObsUnit", spooled.obs_id)["status"] == "running"
    down.clear()
    assert buf.spool.flush() and not buf.spool.exists()
    assert buf.status(spooled.start_tx) == "pending"  # pushed; the cut copy dead-lettered
    assert [json.loads(e)["failure"]["kind"] for e in redis_client.lrange(SiteKeys(settings.site).failed, 0, -1)] == [
        "refused_spool_line"]
    buf.close()


@pytest.mark.parametrize("same_batch", [False, True])
def test_an_update_held_back_by_a_failure_is_not_overtaken_by_a_newer_update_of_the_row(
        settings, redis_client, main_engine, same_batch):
    """Two updates of one replicated record: the first fails (its obs unit does not exist yet),
    the second is fine. The second must wait behind the first: applied first, it was later
    overwritten by the first's retry (the older write won), and reads went back to the first's
    values when the second was cleaned. Once the cause is fixed, retrying the first applies
    both, in order."""
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    first = buf.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": 31337, "status": "aborted"})
    if not same_batch:  # the first fails and waits to retry; the second comes in a later batch
        assert drain_one_batch(settings, retry_base_s=1.0).retried == 1
    second = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
    drain_until_settled(settings, retry_base_s=0.05)
    keys = SiteKeys(settings.site)
    failed = {f["transaction_id"]: f["failure"]["reason"] for f in map(json.loads, redis_client.lrange(keys.failed, 0, -1))}
    assert set(failed) == {first, second} and failed[second] == f"blocked by {first}", failed
    assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "completed"  # the latest write, still
    with main_engine.begin() as conn:  # the operator fixes the cause and retries the first
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
    subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "retry", first], env=cli_env(settings),
                   check=True)
    drain_until_settled(settings, retry_base_s=0.05)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT obs_unit_id, status FROM executed_obs_unit WHERE id = :i"),
                            {"i": obs["id"]}).one() == (31337, "completed")
    assert buf.status(first) == buf.status(second) == "replicated"
    assert redis_client.hlen(keys.held_ids) == 0
    assert_queues_empty(redis_client, settings.site)
    buf.close()


def test_two_held_transactions_of_one_row_applied_together_leave_no_hold_behind(settings, redis_client, main_engine):
    """Two updates parked behind a failing one come due together once it is applied, and are
    applied in one batch: both release the row. Releases were kept per row, the second
    overwrote the first, and the row stayed held by a transaction that was done: every later
    update of it waited for ever."""
    keys = SiteKeys(settings.site)
    with an_update_failing_on_a_missing_obs_unit(settings) as (buf, obs, first, drain):
        buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
        buf.update("ExecutedObsUnit", obs["id"], {"status": "checked"})
        assert drain.step().held == 2
        with main_engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
        due_now(redis_client, keys, first)
        assert drain.step().applied == 1  # the first; the two parked behind it come due
        assert drain.step().applied == 2
    assert redis_client.hlen(keys.held_ids) == 0, redis_client.hgetall(keys.held_ids)
    third = buf.update("ExecutedObsUnit", obs["id"], {"status": "aborted"})
    drain_until_settled(settings)
    assert buf.status(third) == "replicated"
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :i"),
                            {"i": obs["id"]}).scalar_one() == "aborted"
    buf.close()


def test_a_holder_dead_lettered_in_the_batch_of_one_it_holds_back_still_blocks_it(settings, redis_client, main_engine):
    """The held transaction comes due just before its holder's last retry, and both are claimed
    in one batch, the held one first. It was held again, marking the row as its own in the
    batch's outcome; the holder, dead-lettered next, could then not turn its mark into a dead
    one: held_ids kept naming it as waiting to retry, and the held update was looked at again
    every 30 s for ever (the retry zset never emptied) instead of being dead-lettered as blocked."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    first = buf.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": 31337})  # no such unit
    drain = Drain(settings, DrainConfig(retry_base_s=60))

    def due_in_order(*ids):
        order = {tx_id: n for n, tx_id in enumerate(ids)}
        members = redis_client.zrange(keys.retry, 0, -1)
        redis_client.zadd(keys.retry, {m: order.get(json.loads(m)["transaction_id"], 1e12) for m in members})

    try:
        drain.acquire()
        assert drain.step().retried == 1
        second = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
        assert drain.step().held == 1
        for _ in range(2):  # the first's retries 2 and 3, alone
            due_in_order(first)
            assert drain.step().retried == 1
        due_in_order(second, first)  # the held one due just before its holder's last attempt
        report = drain.step()
        assert report.held == 1 and [d["transaction_id"] for d in report.dead_lettered] == [first]
        assert redis_client.hget(keys.held_ids, f"{obs['id']}") == f"!{first}".encode()
        due_in_order(second)
        report = drain.step()
        assert [d["reason"] for d in report.dead_lettered] == [f"blocked by {first}"]
    finally:
        drain.close()
    assert redis_client.zcard(keys.retry) == 0
    buf.close()


@pytest.mark.parametrize("fixed_first", ["its holder", "the other holder"])
def test_an_update_of_two_rows_two_retrying_transactions_hold_is_not_overtaken_by_newer_updates_of_either(
        settings, redis_client, main_engine, fixed_first):
    """An update of rows A and R, each held by an update waiting to retry. It was parked behind
    one of them and marked neither row: a newer update of the other row was parked behind that
    row's holder only, and once that holder was applied (its cause fixed first) the newer update
    was applied before the older one, which main then applied over it. No dead letter, no
    operator: main kept the older value. It now waits in the other row's queue too."""
    keys = SiteKeys(settings.site)
    with two_rows_and_a_drain(settings) as (buf, a_obs, r_obs, drain):
        units = {buf.update("ExecutedObsUnit", r_obs["id"], {"obs_unit_id": 31337}): 31337,  # no such units yet
                 buf.update("ExecutedObsUnit", a_obs["id"], {"obs_unit_id": 31338}): 31338}
        assert drain.step().retried == 2
        with buf.transaction() as older:
            older.update("ExecutedObsUnit", a_obs["id"], {"status": "aborted"})
            older.update("ExecutedObsUnit", r_obs["id"], {"status": "aborted"})
        assert drain.step().held == 1
        buf.update("ExecutedObsUnit", r_obs["id"], {"status": "completed"})
        buf.update("ExecutedObsUnit", a_obs["id"], {"status": "checked"})
        assert drain.step().held == 2
        waiting = {json.loads(m)["transaction_id"]: json.loads(m)["metadata"]
                   for m in redis_client.zrange(keys.retry, 0, -1)}
        behind = waiting[older.transaction_id]["held_by"]
        for holder in sorted(units, key=lambda h: (h == behind) == (fixed_first == "the other holder")):
            with main_engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (:u, 'late unit')"), {"u": units[holder]})
            due_now(redis_client, keys, holder)
            while drain.step() is not None:
                pass
    drain_until_settled(settings, retry_base_s=0.05)
    assert_rows_end_as(settings, redis_client, main_engine, {a_obs["id"]: "checked", r_obs["id"]: "completed"})
    buf.close()


def test_an_update_of_two_rows_that_two_others_hold_is_not_overtaken_by_newer_updates_of_either(
        settings, redis_client, main_engine):
    """An update of rows A and R, with A held by H (waiting to retry) and R by the dead letter B.
    It waited behind one of them and marked neither row, both another's: a newer update of the
    other row waited only for that one. Parked behind H, the newer update of R was dead-lettered
    as blocked by B ahead of it, and `failed retry B` applied the two in the list's order, the
    older last; dead-lettered as blocked by B, the newer update of A was applied once H was, and
    `failed retry B` applied the older one over it. Either way main kept an older value of one
    row. It is now dead-lettered at once (B is ahead of it) and waits in A's queue too."""
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.model_registry import ModelRegistry

    keys = SiteKeys(settings.site)
    with two_rows_and_a_drain(settings) as (buf, a_obs, r_obs, drain):
        blocker = buf.update("ExecutedObsUnit", r_obs["id"], {"obs_unit_id": 31337})  # no such unit
        report = drain.step()
        while not report.dead_lettered:  # its retries spent: R dead, B's
            due_now(redis_client, keys, blocker)
            report = drain.step()
        holder = buf.update("ExecutedObsUnit", a_obs["id"], {"obs_unit_id": 31338})  # no such unit yet
        assert drain.step().retried == 1
        with buf.transaction() as older:
            older.update("ExecutedObsUnit", a_obs["id"], {"status": "aborted"})
            older.update("ExecutedObsUnit", r_obs["id"], {"status": "aborted"})
        assert drain.step().transactions == 1
        buf.update("ExecutedObsUnit", r_obs["id"], {"status": "completed"})
        buf.update("ExecutedObsUnit", a_obs["id"], {"status": "checked"})
        while redis_client.llen(keys.buffer):
            drain.step()
    with main_engine.begin() as conn:  # H's cause fixed
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31338, 'late unit')"))
    due_now(redis_client, keys, holder)
    drain_until_settled(settings, retry_base_s=0.05)
    with main_engine.begin() as conn:  # B's cause fixed: the operator retries it, with what it blocked
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
    DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models)).retry([blocker])
    drain_until_settled(settings, retry_base_s=0.05)
    assert_rows_end_as(settings, redis_client, main_engine, {a_obs["id"]: "checked", r_obs["id"]: "completed"})
    buf.close()


def test_an_update_parked_behind_one_holder_is_not_overtaken_in_its_batch_by_a_newer_update_of_its_other_row(
        settings, redis_client, main_engine):
    """One batch: H (waiting to retry, the head of row R, due now and applied), then T (updates A
    and R; A held by K, waiting to retry: T is parked behind K), then U (updates R). U's row was
    held by H, ahead of it in the batch, and nothing was parked behind H: U was applied, and T,
    applied once K was, overwrote it with the older value. T now waits in R's queue, and U
    behind it."""
    keys = SiteKeys(settings.site)
    with two_rows_and_a_drain(settings) as (buf, a_obs, r_obs, drain):
        k = buf.update("ExecutedObsUnit", a_obs["id"], {"obs_unit_id": 31338})  # no such units yet
        h = buf.update("ExecutedObsUnit", r_obs["id"], {"obs_unit_id": 31337})
        assert drain.step().retried == 2
        with main_engine.begin() as conn:  # H's cause fixed: it is due, ahead of T and U
            conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
        due_now(redis_client, keys, h)
        with buf.transaction() as older:
            older.update("ExecutedObsUnit", a_obs["id"], {"status": "aborted"})
            older.update("ExecutedObsUnit", r_obs["id"], {"status": "aborted"})
        buf.update("ExecutedObsUnit", r_obs["id"], {"status": "completed"})
        report = drain.step()
        assert (report.transactions, report.applied, report.held) == (3, 1, 2)
    with main_engine.begin() as conn:  # K's cause fixed
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31338, 'late unit')"))
    due_now(redis_client, keys, k)
    drain_until_settled(settings, retry_base_s=0.05)
    assert_rows_end_as(settings, redis_client, main_engine, {a_obs["id"]: "aborted", r_obs["id"]: "completed"})
    buf.close()


# (updates, share naming a missing unit, chance a step adds one, chance retries are made due now,
# chance the operator discards a dead letter, chance the operator retries them all)
OPERATORS = {"retrying now and then": (16, 0.25, 0.2, 0.4, 0.0, 0.1),
             "discarding now and then": (18, 0.4, 0.1, 0.7, 0.35, 0.15)}


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("operator", OPERATORS)
def test_updates_held_back_by_failures_reach_main_in_the_order_they_were_buffered(
        settings, redis_client, main_engine, operator, seed):
    """Updates of one to three of three rows, some naming a unit main does not have yet (they
    wait to retry, and what writes their rows waits behind them), buffered and drained in random
    steps, the missing units added at random moments; those whose retries run out are
    dead-lettered (with what they block), and the operator retries them now and then, or also
    discards one now and then (what it blocked stays listed), and retries them at the end. Each
    row ends with its last update buffered that was not discarded, and nothing is left in a row's
    head or queue (a discarded head's place goes to the next in its queue)."""
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.model_registry import ModelRegistry

    updates, failing, adding, due, discarding, retrying = OPERATORS[operator]
    rng = random.Random(seed + 1000 * bool(discarding))
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    rows = [str(replicated_observation(settings, buf)["id"]) for _ in range(3)]
    missing = [41000 + 100 * bool(discarding) + 10 * seed + i for i in range(3)]
    writes: list[tuple[str, dict[str, str]]] = []
    discarded: set[str] = set()
    letters = DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models))
    drain = Drain(settings, DrainConfig(retry_base_s=60))
    try:
        drain.acquire()
        for i in range(updates):
            with buf.transaction() as tx:
                wrote = {}
                for row in rng.sample(rows, rng.choice([1, 1, 2, 3])):
                    values = {"status": f"s{i}"}
                    if rng.random() < failing:
                        values["obs_unit_id"] = rng.choice(missing)
                    tx.update("ExecutedObsUnit", row, values)
                    wrote[row] = values["status"]
            writes.append((tx.transaction_id, wrote))
            for _ in range(rng.choice([0, 1, 1, 2])):
                drain.step()
            if rng.random() < adding:
                add_unit(main_engine, rng.choice(missing))
            if rng.random() < due:
                retries_due_now(redis_client, keys)
            listed = letters.list() if redis_client.llen(keys.failed) else []
            if listed and rng.random() < discarding:
                victim = rng.choice(listed).transaction_id
                letters.discard([victim])
                discarded.add(victim)
            elif listed and rng.random() < retrying:
                letters.retry()  # before every cause is fixed
    finally:
        drain.close()
    settle_with_every_cause_fixed(settings, redis_client, main_engine, letters, missing)
    last = {}
    for tx_id, wrote in writes:
        if tx_id not in discarded:
            last.update(wrote)
    assert_rows_end_as(settings, redis_client, main_engine, {row: last.get(row, "running") for row in rows})
    buf.close()


def test_a_newer_update_waits_behind_a_blocked_letter_whose_blocker_was_discarded(settings, redis_client, main_engine):
    """P (an update naming a unit main does not have) is dead-lettered, then D (a later update of
    its row) as blocked by it. The operator discards P: D stays listed, and its row was free, so
    a newer update N was applied at once, and `failed retry D` then applied the older D over it.
    D now takes the row's mark (next in its queue): N is blocked by D, and retried with it, after it."""
    keys = SiteKeys(settings.site)
    with a_row_its_letters_and_a_drain(settings, redis_client) as (buf, obs, letters, drain):
        drain.acquire()
        poison = buf.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": 31337})  # no such unit
        report = drain.step()
        while not report.dead_lettered:
            due_now(redis_client, keys, poison)
            report = drain.step()
        older = buf.update("ExecutedObsUnit", obs["id"], {"status": "aborted"})
        assert [d["reason"] for d in drain.step().dead_lettered] == [f"blocked by {poison}"]
        letters.discard([poison])
        newer = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
        assert [d["reason"] for d in drain.step().dead_lettered] == [f"blocked by {older}"]
    assert letters.retry([older]) == [older, newer]
    drain_until_settled(settings, retry_base_s=0.05)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :i"), {"i": obs["id"]}).scalar() == "completed"
    assert_queues_empty(redis_client, settings.site)
    assert_no_holds(redis_client, keys)
    buf.close()


@contextlib.contextmanager
def a_row_its_letters_and_a_drain(settings, redis_client):
    """A replicated observation, the site's dead letters and a drain (its retries a minute apart):
    (buffer, observation, DeadLetters, drain)."""
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.model_registry import ModelRegistry

    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    letters = DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models))
    drain = Drain(settings, DrainConfig(retry_base_s=60))
    try:
        yield buf, obs, letters, drain
    finally:
        drain.close()


@contextlib.contextmanager
def two_rows_and_a_drain(settings):
    """Two replicated observations (rows A and R), and a drain holding the lease whose retries
    come a minute apart (the tests make them due): (buffer, A, R, drain)."""
    buf = TransactionBuffer(settings=settings)
    a_obs, r_obs = replicated_observation(settings, buf), replicated_observation(settings, buf)
    drain = Drain(settings, DrainConfig(retry_base_s=60))
    try:
        drain.acquire()
        yield buf, a_obs, r_obs, drain
    finally:
        drain.close()


def assert_rows_end_as(settings, redis_client, main_engine, statuses: dict) -> None:
    """Main holds these statuses (observation id -> status), and nothing waits or holds a row."""
    with main_engine.connect() as conn:
        assert dict(conn.execute(sa.text("SELECT id::text, status FROM executed_obs_unit WHERE id::text IN :ids")
                                 .bindparams(sa.bindparam("ids", expanding=True)),
                                 {"ids": [str(i) for i in statuses]}).all()) == {str(i): v for i, v in statuses.items()}
    assert_queues_empty(redis_client, settings.site)
    assert_no_holds(redis_client, SiteKeys(settings.site))


def add_unit(main_engine, unit: int) -> None:
    """The obs unit an update named before main had it (its cause fixed)."""
    with main_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (:u, 'late unit') ON CONFLICT DO NOTHING"),
                     {"u": unit})


def retries_due_now(redis_client, keys: SiteKeys) -> None:
    """Every transaction waiting to retry is due now (not those parked behind another: +inf)."""
    waiting = {m: 0 for m, score in redis_client.zrange(keys.retry, 0, -1, withscores=True) if score != float("inf")}
    if waiting:
        redis_client.zadd(keys.retry, waiting)


def settle_with_every_cause_fixed(settings, redis_client, main_engine, letters, units: list[int]) -> None:
    """The missing units added, then drained until settled, the dead letters retried in between."""
    keys = SiteKeys(settings.site)
    for unit in units:
        add_unit(main_engine, unit)
    for _ in range(8):
        retries_due_now(redis_client, keys)
        drain_until_settled(settings, retry_base_s=0.05)
        if not redis_client.llen(keys.failed):
            return
        letters.retry()


def assert_no_holds(redis_client, keys: SiteKeys) -> None:
    """Nothing waits, so nothing holds a row or waits in a row's queue."""
    assert redis_client.hgetall(keys.held_ids) == {}
    assert list(redis_client.scan_iter(keys.waiting("*"))) == []


def test_a_copy_of_an_applied_transaction_blocked_by_a_dead_letter_keeps_its_replicated_status(
        settings, redis_client, main_engine):
    """A producer pushes an applied transaction again (its reply was lost, say) after a later
    update of the same row was dead-lettered: the copy is dead-lettered as blocked by it. The
    acknowledgement wrote the copy's dead letter over the status key whole: the transaction,
    committed and replicated, read 'failed' (and its status key lost its week's TTL)."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    done = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
    copy = redis_client.get(keys.transaction(done))
    drain_until_settled(settings)
    assert buf.status(done) == "replicated"
    first = buf.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": 31337})  # no such unit
    drain = Drain(settings, DrainConfig(retry_base_s=60))
    try:
        drain.acquire()
        copy_blocked_behind_a_dead_update(drain, redis_client, keys, first, copy)
    finally:
        drain.close()
    assert buf.status(done) == "replicated"
    assert redis_client.ttl(keys.transaction(done)) > 0
    buf.close()


def copy_blocked_behind_a_dead_update(drain, redis_client, keys, first, copy):
    """`first`'s retries are spent (dead-lettered), then a producer's `copy` of an applied
    transaction writing its row is pushed, and dead-lettered as blocked by it."""
    for _ in range(3):
        assert drain.step().retried == 1
        due_now(redis_client, keys, first)
    assert [d["transaction_id"] for d in drain.step().dead_lettered] == [first]
    redis_client.lpush(keys.buffer, copy)
    assert [d["reason"] for d in drain.step().dead_lettered] == [f"blocked by {first}"]


@pytest.mark.parametrize("replayed", [True, False])
def test_discarding_a_copy_of_an_applied_transaction_keeps_its_status_and_caches(
        settings, redis_client, main_engine, replica_engine, replayed):
    """The copy of an applied transaction, dead-lettered as blocked (as above), stays listed. Its
    `failed discard` deleted the id's status key, which is the applied transaction's: status()
    said None for good and wait() timed out; before the replica replayed it, the discard also
    removed its overlay, and reads went back to the replica's older row. Only the copy's letter
    goes; the blocker's dead mark stays."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    done = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
    copy = redis_client.get(keys.transaction(done))
    status = "replicated" if replayed else "applied"
    with contextlib.ExitStack() as paused:
        if replayed:
            drain_until_settled(settings)
        else:  # applied on main, not replayed yet: its overlay is what reads show
            paused.enter_context(replay_paused(replica_engine))
        drain = Drain(settings, DrainConfig(retry_base_s=60, replication_timeout_s=0.2))
        try:
            drain.acquire()
            if not replayed:
                assert drain.step().applied == 1
            first = buf.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": 31337})  # no such unit
            copy_blocked_behind_a_dead_update(drain, redis_client, keys, first, copy)
        finally:
            drain.close()
        assert buf.status(done) == status
        subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "discard", done],
                       env=cli_env(settings), check=True)
        read = buf.get("ExecutedObsUnit", obs["id"])["status"]
        assert (buf.status(done), read) == (status, "completed")
        assert buf.wait(done, until=status, timeout=1)
        letters = redis_client.lrange(keys.failed, 0, -1)
        assert [json.loads(e)["transaction_id"] for e in letters] == [first]
        assert set(redis_client.hvals(keys.held_ids)) == {f"!{first}".encode()}
    buf.close()


def _an_update_and_its_reused_id(buf, obs, drain, redis_client, first_dead: bool):
    """An update of `obs` that fails for now (its obs unit 31337 is not there yet), and a
    producer's reuse of its id for another update of the row ("reused"), pushed behind it: the
    drain's first step dead-letters the reused one and the first waits to retry; `first_dead`:
    its retries are then spent and it is dead-lettered too. Returns the id and the row's mark in
    held_ids, the first's (live, or dead)."""
    keys = SiteKeys(buf.site)
    first = buf.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": 31337, "status": "first"})
    reused = json.loads(redis_client.get(keys.transaction(first)))
    reused["steps"][0]["data"] = {"status": "reused"}
    redis_client.lpush(keys.buffer, json.dumps(reused))
    drain.acquire()
    report = drain.step()
    assert report.retried == 1, report
    assert [d["transaction_id"] for d in report.dead_lettered] == [first], report
    if not first_dead:
        return first, first.encode()
    for _ in range(2):
        due_now(redis_client, keys, first)
        assert drain.step().retried == 1
    due_now(redis_client, keys, first)
    assert [d["transaction_id"] for d in drain.step().dead_lettered] == [first]
    return first, f"!{first}".encode()


def _obs_unit_and_status(main_engine, record_id):
    """(obs_unit_id, status) of an ExecutedObsUnit on main."""
    with main_engine.connect() as conn:
        query = sa.text("SELECT obs_unit_id, status FROM executed_obs_unit WHERE id = :i")
        return tuple(conn.execute(query, {"i": record_id}).one())


@pytest.mark.parametrize("first_dead", [False, True])
def test_discarding_a_reused_ids_letter_keeps_the_hold_of_the_first_transaction_of_that_id(
        settings, redis_client, main_engine, first_dead):
    """A producer reuses the id of an update that fails for now (its obs unit is not there yet)
    for another update of the same row, in the same batch: the second is dead-lettered as
    reused, and the row's mark is the first's, waiting to retry (or, its retries spent, dead
    and listed too). `failed discard` of the reused one removed that mark (it released its rows
    under the id they share): a newer update of the row was applied at once, and the first,
    applied after the fix, overwrote it (main kept the older write). The discard releases only
    the letter's own dead marks, and none on a row the other letter of the id writes."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    drain = Drain(settings, DrainConfig(retry_base_s=60))
    try:
        # two letters under the id if the first is dead: the reused one is named by its place
        first, mark = _an_update_and_its_reused_id(buf, obs, drain, redis_client, first_dead)
        letters = reversed(redis_client.lrange(keys.failed, 0, -1))  # oldest first, as listed
        kinds = [json.loads(e)["failure"]["kind"] for e in letters]
        assert kinds == (["reused_id", "permanent"] if first_dead else ["reused_id"])
        named = "#1" if first_dead else first
        assert redis_client.hgetall(keys.held_ids) == {obs["id"].encode(): mark}
        subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "discard", named],
                       env=cli_env(settings), check=True)
        assert redis_client.llen(keys.failed) == (1 if first_dead else 0)
        assert redis_client.hgetall(keys.held_ids) == {obs["id"].encode(): mark}
        newer = buf.update("ExecutedObsUnit", obs["id"], {"status": "newer"})
        report = drain.step()
        if first_dead:
            assert [d["reason"] for d in report.dead_lettered] == [f"blocked by {first}"], report
        else:
            assert report.held == 1, report
    finally:
        drain.close()
    with main_engine.begin() as conn:  # the cause is fixed: the first goes, then the newer
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
    if first_dead:
        subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "retry", first],
                       env=cli_env(settings), check=True)
    else:
        due_now(redis_client, keys, first)
    drain_until_settled(settings, retry_base_s=0.05)
    row = _obs_unit_and_status(main_engine, obs["id"])
    assert row == (31337, "newer")  # the older write first, the newer last
    assert buf.status(first) == buf.status(newer) == "replicated"
    assert redis_client.hlen(keys.held_ids) == 0
    assert_queues_empty(redis_client, settings.site)
    buf.close()

@pytest.mark.parametrize("then", ["discard", "retry"])
def test_a_buffered_transaction_dead_lettered_as_reused_leaves_none_of_its_caches(
        settings, redis_client, main_engine, then):
    """An update fails for now (its obs unit is not there yet) and waits to retry; a producer
    reuses its id for an update of another row, which is applied first. Due again, the first is
    dead-lettered as reused: nothing of it is applied under that id. Its overlay stayed for good:
    the applied one's cleanup removes that id's entries from its own row only, a discard leaves a
    reused id's caches alone (they were taken for the applied one's), and a retry requeues it
    under a new id, whose cleanup removes that new id's entries. Reads showed a status main never
    had; after the retry, its value over a later update once that had replicated."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    first = buf.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": 31337, "status": "first"})
    drain = Drain(settings, DrainConfig(retry_base_s=60))
    try:
        drain.acquire()
        assert drain.step().retried == 1
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": first, "steps": [
            {"step_id": "s1", "operation": "update", "model_class": "ObsUnit",
             "conditions": {"id": 2}, "data": {"name": "the id reused"}}]}))
        assert drain.step().applied == 1
        with main_engine.begin() as conn:  # the first's cause is fixed: it comes due
            conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
        due_now(redis_client, keys, first)
        assert [d["transaction_id"] for d in drain.step().dead_lettered] == [first]
    finally:
        drain.close()
    drain_until_settled(settings)
    letters = [json.loads(e) for e in redis_client.lrange(keys.failed, 0, -1)]
    assert [letter["failure"]["kind"] for letter in letters] == ["reused_id"]
    subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", then, first],
                   env=cli_env(settings), check=True)
    if then == "retry":
        drain_until_settled(settings)
        later = buf.update("ExecutedObsUnit", obs["id"], {"status": "later"})
        drain_until_settled(settings)
        assert buf.status(later) == "replicated"
    expected = (31337, "later") if then == "retry" else (1, "running")
    with main_engine.connect() as conn:
        query = sa.text("SELECT obs_unit_id, status FROM executed_obs_unit WHERE id = :i")
        assert conn.execute(query, {"i": obs["id"]}).one() == expected
    read = buf.get("ExecutedObsUnit", obs["id"])
    assert (read["obs_unit_id"], read["status"]) == expected
    assert redis_client.lrange(keys.read_buffer("ExecutedObsUnit", obs["id"]), 0, -1) == []
    assert_queues_empty(redis_client, settings.site)
    buf.close()


def test_discarding_a_letter_whose_copy_waits_to_retry_keeps_that_copys_hold_status_and_caches(
        settings, redis_client, main_engine):
    """A producer pushes a dead-lettered transaction again (all it knew was that its push timed
    out): the copy, claimed, fails too and waits to retry; the row's mark is its live hold, and
    the id's status ("pending") and overlay are its. `failed discard` of the first's letter
    removed all three: status() said None, reads lost the update, and a newer update of the row
    overtook the copy (main kept the older write)."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    first = buf.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": 31337, "status": "first"})
    copy = redis_client.get(keys.transaction(first))
    drain = Drain(settings, DrainConfig(retry_base_s=60))
    try:
        drain.acquire()
        for _ in range(3):
            assert drain.step().retried == 1
            due_now(redis_client, keys, first)
        assert [d["transaction_id"] for d in drain.step().dead_lettered] == [first]
        redis_client.lpush(keys.buffer, copy)
        assert drain.step().retried == 1  # the copy: not blocked by its id's own dead mark
        assert redis_client.hgetall(keys.held_ids) == {obs["id"].encode(): first.encode()}
        subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "discard", first],
                       env=cli_env(settings), check=True)
        assert redis_client.llen(keys.failed) == 0
        read = buf.get("ExecutedObsUnit", obs["id"])["status"]
        assert (buf.status(first), read) == ("pending", "first")
        assert redis_client.hgetall(keys.held_ids) == {obs["id"].encode(): first.encode()}
        newer = buf.update("ExecutedObsUnit", obs["id"], {"status": "newer"})
        assert drain.step().held == 1
    finally:
        drain.close()
    with main_engine.begin() as conn:  # the cause is fixed: the copy goes, then the newer
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
    due_now(redis_client, keys, first)
    drain_until_settled(settings, retry_base_s=0.05)
    row = _obs_unit_and_status(main_engine, obs["id"])
    assert row == (31337, "newer")
    assert buf.status(first) == buf.status(newer) == "replicated"
    assert redis_client.hlen(keys.held_ids) == 0
    assert_queues_empty(redis_client, settings.site)
    buf.close()


@pytest.mark.parametrize("first", ["waiting", "dead", "dead, retry --all"])
def test_retrying_a_reused_ids_letter_keeps_the_first_transaction_of_that_id_ahead_of_it(
        settings, redis_client, main_engine, first):
    """As above, the reused update is dead-lettered while the first of the id waits to retry (or,
    its retries spent, is listed too). `failed retry` of the reused letter removed the first's
    mark of the row (live, or dead and still listed: it released its rows under the id they
    share) and gave the row to the requeued one under its new id: that one was applied at once
    (or together with the first, ahead of it) and the first, applied after it, overwrote it
    (main kept the older write). The retry now releases only the letter's own dead marks, and
    none on a row the first's letter still writes: the requeued one waits (or is blocked)
    behind the first of the id."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    drain = Drain(settings, DrainConfig(retry_base_s=60))
    try:
        first_id, mark = _an_update_and_its_reused_id(buf, obs, drain, redis_client,
                                                      first != "waiting")
        letters = reversed(redis_client.lrange(keys.failed, 0, -1))  # oldest first, as listed
        kinds = [json.loads(e)["failure"]["kind"] for e in letters]
        assert kinds == (["reused_id"] if first == "waiting" else ["reused_id", "permanent"])
        named = {"waiting": [first_id], "dead": ["#1"], "dead, retry --all": ["--all"]}[first]
        subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "retry", *named],
                       env=cli_env(settings), check=True)
        if first == "dead, retry --all":  # requeued too: its mark is live again
            mark = first_id.encode()
        assert redis_client.hgetall(keys.held_ids) == {obs["id"].encode(): mark}  # the first's
        report = drain.step()
        if first == "dead":
            assert [d["reason"] for d in report.dead_lettered] == [f"blocked by {first_id}"], report
        else:  # (both requeued, the reused one first as listed) it waits behind the first
            assert (report.applied, report.held) == (0, 1), report
    finally:
        drain.close()
    with main_engine.begin() as conn:  # the cause is fixed: the first goes, then the reused
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
    if first != "dead":
        due_now(redis_client, keys, first_id)
    else:
        subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "retry", first_id],
                       env=cli_env(settings), check=True)
    drain_until_settled(settings, retry_base_s=0.05)
    row = _obs_unit_and_status(main_engine, obs["id"])
    assert row == (31337, "reused")  # the first's write, then the reused one's
    assert buf.status(first_id) == "replicated"
    assert redis_client.hlen(keys.held_ids) == 0
    assert_queues_empty(redis_client, settings.site)
    buf.close()


@pytest.mark.parametrize("newer_comes", ["once the first is applied", "while the first waits to retry"])
def test_retrying_the_first_of_an_ids_two_letters_alone_keeps_the_reused_ones_dead_mark_on_their_row(
        settings, redis_client, main_engine, newer_comes):
    """The reused update is dead-lettered in the batch of the first of its id, which then dies
    too: two letters under one id, one dead mark of their row ("!" + id). `failed retry` of the
    first alone (by its place) made that mark live, the first's, without looking whether the
    other letter of the id still writes the row (as `failed discard` and a retry under a new id
    look): applied, the first released the row while the reused letter was still listed, a newer
    update of the row was applied at once, and the reused one's retry then applied the older
    write over it (main kept 'reused'). The retried one now goes first in the row's order, the
    listed letter's dead mark right behind it: the newer update is blocked by that one, and
    requeued with it, after it."""
    keys = SiteKeys(settings.site)
    with a_row_its_letters_and_a_drain(settings, redis_client) as (buf, obs, letters, drain):
        first_id, _ = _an_update_and_its_reused_id(buf, obs, drain, redis_client, first_dead=True)
        assert [(letter.transaction_id, letter.kind) for letter in letters.list()] == [
            (first_id, "reused_id"), (first_id, "permanent")]
        subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "retry", "#2"],
                       env=cli_env(settings), check=True)
        assert [letter.kind for letter in letters.list()] == ["reused_id"]
        if newer_comes == "while the first waits to retry":
            assert drain.step().retried == 1  # its cause is not fixed yet
            newer = buf.update("ExecutedObsUnit", obs["id"], {"status": "newer"})
            assert drain.step().held == 1, "parked behind the first"
    with main_engine.begin() as conn:  # the first's cause is fixed: it is applied
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
    if newer_comes == "while the first waits to retry":
        due_now(redis_client, keys, first_id)
    drain_until_settled(settings, retry_base_s=0.05)
    assert _obs_unit_and_status(main_engine, obs["id"])[0] == 31337
    if newer_comes == "once the first is applied":
        newer = buf.update("ExecutedObsUnit", obs["id"], {"status": "newer"})
        drain_until_settled(settings, retry_base_s=0.05)
    assert [(letter.transaction_id, letter.reason) for letter in letters.list()][1:] == [
        (newer, f"blocked by {first_id}")]  # behind the listed letter of the id, not applied before it
    # the reused letter, by its id now that it is the id's only one (with what it blocks)
    subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "retry", first_id],
                   env=cli_env(settings), check=True)
    drain_until_settled(settings, retry_base_s=0.05)
    assert _obs_unit_and_status(main_engine, obs["id"]) == (31337, "newer")  # the newest write, last
    assert buf.status(first_id) == buf.status(newer) == "replicated"
    assert redis_client.llen(keys.failed) == 0
    assert_queues_empty(redis_client, settings.site)
    assert_no_holds(redis_client, keys)
    buf.close()


# Known, not fixed: a producer's reuse of an id shares that id's marks (they are kept by id), so
# a reused id's letter, requeued under a new id, has no place of its own in the row's order.
REUSED_ID_HAS_NO_PLACE_OF_ITS_OWN = pytest.mark.xfail(
    strict=True, reason="not fixed: a reused id's marks are its first transaction's (marks are kept by id)")


@REUSED_ID_HAS_NO_PLACE_OF_ITS_OWN
@pytest.mark.parametrize("retried", ["--all", "#1, then the first"])
def test_a_reused_ids_letter_requeued_behind_its_dead_first_is_not_overtaken_by_a_newer_update_blocked_after_it(
        settings, redis_client, main_engine, retried):
    """The reused update is dead-lettered in the batch of the first of its id, which then dies
    too; a newer update of the row is dead-lettered as blocked by the first, behind its dead mark
    (which the reused letter shares). Retried, the reused letter under its new id was put last in
    the row's queue, behind the newer update: the newer was applied first, and the reused one, buffered
    before it, then overwrote it (main kept the older write)."""
    keys = SiteKeys(settings.site)
    with a_row_its_letters_and_a_drain(settings, redis_client) as (buf, obs, letters, drain):
        first_id, _ = _an_update_and_its_reused_id(buf, obs, drain, redis_client, first_dead=True)
        newer = buf.update("ExecutedObsUnit", obs["id"], {"status": "newer"})
        assert [d["reason"] for d in drain.step().dead_lettered] == [f"blocked by {first_id}"]
    with main_engine.begin() as conn:  # the cause is fixed
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
    if retried == "--all":
        letters.retry()
    else:  # the reused one alone (blocked by the first again), then the first, with what it blocks
        letters.retry(["#1"])
        drain_until_settled(settings, retry_base_s=0.05)
        letters.retry([first_id])
    drain_until_settled(settings, retry_base_s=0.05)
    assert _obs_unit_and_status(main_engine, obs["id"]) == (31337, "newer")  # the newest write, last
    assert buf.status(first_id) == buf.status(newer) == "replicated"
    assert_queues_empty(redis_client, settings.site)
    assert_no_holds(redis_client, keys)
    buf.close()


@pytest.mark.parametrize("first_retried", [
    pytest.param("the older", marks=REUSED_ID_HAS_NO_PLACE_OF_ITS_OWN),
    "the newer"])
def test_two_reused_ids_letters_retried_one_at_a_time_apply_in_the_order_they_were_buffered(
        settings, redis_client, main_engine, first_retried):
    """A producer reuses an applied update's id twice, for two more updates of its row: two
    `reused_id` letters under one id, their dead marks one ("!" + id). The operator retries one
    alone (by its place), then the other. The older retried first waited under its new id behind
    that mark, the newer letter's now, and was dead-lettered as blocked by the id; the newer's
    retry requeued both, the newer first: main kept the older write."""
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.model_registry import ModelRegistry

    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    first = buf.update("ExecutedObsUnit", obs["id"], {"status": "first"})
    pushed = redis_client.get(keys.transaction(first))
    drain_until_settled(settings)
    for status in ("reused once", "reused twice"):
        reused = json.loads(pushed)
        reused["steps"][0]["data"] = {"status": status}
        reused = {k: reused[k] for k in ("transaction_id", "steps")}
        redis_client.lpush(keys.buffer, json.dumps(reused))
        drain_until_settled(settings)
    assert [json.loads(f)["failure"]["kind"] for f in redis_client.lrange(keys.failed, 0, -1)] == ["reused_id"] * 2
    letters = DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models))
    letters.retry(["#1" if first_retried == "the older" else "#2"])
    drain_until_settled(settings)
    for _ in range(2):  # the oldest listed, with what it blocks
        listed = letters.list()
        if listed:
            letters.retry([listed[0].transaction_id])
            drain_until_settled(settings)
    assert _obs_unit_and_status(main_engine, obs["id"])[1] == "reused twice"  # the newest write, last
    assert_queues_empty(redis_client, settings.site)
    assert_no_holds(redis_client, keys)
    buf.close()


@pytest.mark.xfail(strict=True, reason="not fixed: a reuse passes its id's live mark (marks are kept by id)")
def test_a_reuse_of_a_waiting_updates_id_for_its_row_is_not_applied_ahead_of_it(settings, redis_client, main_engine):
    """An update fails for now and waits to retry (the row's head, its live mark the id); a raw
    producer reuses its id for a newer update of the same row, in a later batch. The reuse passes
    the row's head as its own (RowOrder.blocker: the head's id is its id) and is applied at once,
    under that id; the first, due again, is dead-lettered as reused, and its retry under a new id
    applies the older write last (main keeps 'first')."""
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.model_registry import ModelRegistry

    keys = SiteKeys(settings.site)
    with an_update_failing_on_a_missing_obs_unit(settings, status="first") as (buf, obs, first, drain):
        reused = json.loads(redis_client.get(keys.transaction(first)))
        reused = {"transaction_id": first, "steps": reused["steps"]}
        reused["steps"][0]["data"] = {"status": "reused"}
        redis_client.lpush(keys.buffer, json.dumps(reused))
        drain.step()
    with main_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
    due_now(redis_client, keys, first)
    drain_until_settled(settings, retry_base_s=0.05)
    letters = DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models))
    if letters.list():
        letters.retry()
        drain_until_settled(settings, retry_base_s=0.05)
    assert _obs_unit_and_status(main_engine, obs["id"]) == (31337, "reused")
    assert_queues_empty(redis_client, settings.site)
    assert_no_holds(redis_client, keys)
    buf.close()


def test_a_reused_id_in_one_batch_does_not_take_the_first_of_its_id_past_an_older_update_of_its_row(
        settings, redis_client, main_engine):
    """An older rename of obs unit 3 fails for now (it also renames unit 930, not there yet) and
    waits to retry, holding the row. A raw producer then pushes obs-9 (rename unit 3 to "newer")
    and obs-9 again, with other steps (make unit 922), claimed in one batch. The rows each uses
    were kept by id: the second's replaced the first's, so the first was not held back behind
    the older rename; applied at once, the older one, applied later, overwrote it, and the
    newer rename was lost. Held back now, it is dead-lettered as reused once due (the second,
    applied under the id, took the id's record), and `failed retry` applies it last."""
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.model_registry import ModelRegistry

    keys = SiteKeys(settings.site)
    drain = Drain(settings, DrainConfig(batch_size=10, retry_base_s=0.5))
    try:
        drain.acquire()
        push_raw(redis_client, settings.site, "older", rename_unit(3, "older"), rename_unit(930, "older"))
        assert drain.step().retried == 1
        push_raw(redis_client, settings.site, "obs-9", rename_unit(3, "newer"))
        push_raw(redis_client, settings.site, "obs-9", create_unit(922, "second"))
        drain.step()
    finally:
        drain.close()
    add_unit(main_engine, 930)
    drain_until_settled(settings, retry_base_s=0.05)
    letters = [json.loads(f) for f in redis_client.lrange(keys.failed, 0, -1)]
    assert [(f["transaction_id"], f["failure"]["kind"], f["steps"][0]["data"]) for f in letters] == [
        ("obs-9", "reused_id", {"name": "newer"})]
    DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models)).retry()
    drain_until_settled(settings, retry_base_s=0.05)
    with main_engine.connect() as conn:
        units = dict(conn.execute(sa.text("SELECT id, name FROM obs_unit WHERE id IN (3, 922, 930)")).all())
    assert units == {3: "newer", 922: "second", 930: "older"}
    assert_queues_empty(redis_client, settings.site)
    assert_no_holds(redis_client, keys)


@pytest.mark.xfail(strict=True, reason="not fixed: a reused id's dead marks go when the first of the id is applied")
def test_a_reused_ids_letter_still_blocks_a_newer_update_once_the_first_of_its_id_is_applied(
        settings, redis_client, main_engine):
    """The reused update is dead-lettered in the batch of the first of its id, which waits to
    retry; its dead mark of the row merged into the first's live one (marks are kept by id). The
    first is applied, and its release took the row's mark away: a newer update of the row was
    applied at once, and the reused one's retry, under a new id, then applied the older write
    over it (main keeps 'reused')."""
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.model_registry import ModelRegistry

    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    drain = Drain(settings, DrainConfig(retry_base_s=60))
    try:
        first_id, _ = _an_update_and_its_reused_id(buf, obs, drain, redis_client, first_dead=False)
    finally:
        drain.close()
    with main_engine.begin() as conn:  # the first's cause is fixed: it is applied
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
    due_now(redis_client, keys, first_id)
    drain_until_settled(settings, retry_base_s=0.05)
    newer = buf.update("ExecutedObsUnit", obs["id"], {"status": "newer"})
    drain_until_settled(settings, retry_base_s=0.05)
    DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models)).retry()
    drain_until_settled(settings, retry_base_s=0.05)
    assert _obs_unit_and_status(main_engine, obs["id"]) == (31337, "newer")  # the newest write, last
    assert buf.status(newer) == "replicated"
    assert_queues_empty(redis_client, settings.site)
    assert_no_holds(redis_client, keys)
    buf.close()


@pytest.mark.parametrize("how", ["blocked", "blocked, newer in its batch", "retries spent",
                                 "retries spent, newer in its batch"])
def test_a_copy_dead_lettered_while_another_waits_to_retry_leaves_that_ones_hold_and_status(
        settings, redis_client, main_engine, how):
    """A producer pushes a transaction again while the first push fails for now and waits to
    retry (the row's mark is its live hold, the id's status its "pending"). The copy is
    dead-lettered: blocked by a dead letter of a row it uses; or, failing too, it waits to retry
    beside the first, whose retries run out first. Marks and statuses are kept by id: the dead
    letter turned the waiting one's hold into a dead mark and its status into "failed", and a
    newer update of the row (later, or in the batch of the last attempt) was dead-lettered as
    blocked by a transaction still to be applied. The waiting one keeps both, the newer update
    waits behind it, and the dead copy's letter stays listed (retried, it is found applied and
    changes nothing)."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    first = buf.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": 31337, "status": "first"})
    copy = redis_client.get(keys.transaction(first))  # as it was pushed

    def due_most_tried() -> None:  # the first push's entry, not the copy's
        members = redis_client.zrange(keys.retry, 0, -1)
        redis_client.zadd(keys.retry, {max(members, key=lambda m: json.loads(m)["retry_count"]): 0})

    in_its_batch = how.endswith("in its batch")  # the newer update claimed with the copy's last try
    drain = Drain(settings, DrainConfig(retry_base_s=60))
    try:
        drain.acquire()
        assert drain.step().retried == 1
        if how.startswith("blocked"):  # a create of the obs unit the drain finds invalid (no name)
            step = {"step_id": "s1", "operation": "create", "model_class": "ObsUnit",
                    "data": {"id": 31337}}
            doomed = {"transaction_id": "doomed-unit", "steps": [step]}
            redis_client.lpush(keys.buffer, json.dumps(doomed))
            assert [d["transaction_id"] for d in drain.step().dead_lettered] == ["doomed-unit"]
            redis_client.lpush(keys.buffer, copy)
            if in_its_batch:  # held in the batch behind the copy, which holds the row there too
                newer = buf.update("ExecutedObsUnit", obs["id"], {"status": "newer"})
            report = drain.step()
            assert [d["reason"] for d in report.dead_lettered] == ["blocked by doomed-unit"], report
            assert report.held == (1 if in_its_batch else 0), report
        else:
            due_most_tried()
            assert drain.step().retried == 1
            redis_client.lpush(keys.buffer, copy)
            assert drain.step().retried == 1  # the copy, not held by its own id's mark
            assert redis_client.zcard(keys.retry) == 2
            due_most_tried()
            assert drain.step().retried == 1
            due_most_tried()
            if in_its_batch:  # applied behind the first, held back with it
                newer = buf.update("ExecutedObsUnit", obs["id"], {"status": "newer"})
            report = drain.step()
            assert [d["transaction_id"] for d in report.dead_lettered] == [first], report
        assert redis_client.zcard(keys.retry) == (2 if in_its_batch else 1)
        assert redis_client.hget(keys.held_ids, obs["id"]) == first.encode()  # still live
        assert buf.status(first) == "pending"
        letters = [json.loads(e) for e in redis_client.lrange(keys.failed, 0, -1)]
        assert letters[0]["transaction_id"] == first  # the copy's, the newest
        if not in_its_batch:
            newer = buf.update("ExecutedObsUnit", obs["id"], {"status": "newer"})
            assert drain.step().held == 1  # behind the one still to be applied
    finally:
        drain.close()
    with main_engine.begin() as conn:  # the cause is fixed: the waiting one goes, then the newer
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
    if how.startswith("blocked"):
        subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "discard",
                        "doomed-unit"], env=cli_env(settings), check=True)
    due_now(redis_client, keys, first)
    drain_until_settled(settings, retry_base_s=0.05)
    assert buf.status(first) == buf.status(newer) == "replicated"
    subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "retry", first],
                   env=cli_env(settings), check=True)
    drain_until_settled(settings, retry_base_s=0.05)
    with main_engine.connect() as conn:
        query = sa.text("SELECT obs_unit_id, status FROM executed_obs_unit WHERE id = :i")
        assert conn.execute(query, {"i": obs["id"]}).one() == (31337, "newer")
        query = sa.text("SELECT count(*) FROM obs_pipeline_applied WHERE transaction_id = :i")
        assert conn.execute(query, {"i": first}).scalar_one() == 1
    assert buf.status(first) == "replicated"
    assert redis_client.hlen(keys.held_ids) == 0
    assert_queues_empty(redis_client, settings.site)
    buf.close()


def test_a_copy_dead_lettered_while_the_first_push_waits_in_its_rows_queue_leaves_that_ones_place_and_status(
        settings, redis_client, main_engine):
    """As above, but the first push (it updates rows A and B, held by H and K, which wait to
    retry) is parked behind one of them and waits in the other's queue, not at its head. Only
    heads were looked at for a copy's holds: the copy's dead letter turned the first's places into
    dead marks and its status into "failed", and a newer update of the other row, claimed with its
    holder (applied: its cause fixed), was dead-lettered as blocked by the first, still to be
    applied. The first keeps both; the newer waits behind it."""
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.model_registry import ModelRegistry

    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    a_obs, b_obs = replicated_observation(settings, buf), replicated_observation(settings, buf)
    units = {buf.update("ExecutedObsUnit", a_obs["id"], {"obs_unit_id": 31338}): (31338, a_obs["id"]),  # no such
             buf.update("ExecutedObsUnit", b_obs["id"], {"obs_unit_id": 31339}): (31339, b_obs["id"])}  # units yet
    drain = Drain(settings, DrainConfig(retry_base_s=60))
    try:
        drain.acquire()
        assert drain.step().retried == 2
        with buf.transaction() as first:
            first.update("ExecutedObsUnit", a_obs["id"], {"status": "first", "obs_unit_id": 31337})
            first.update("ExecutedObsUnit", b_obs["id"], {"status": "first"})
        copy = redis_client.get(keys.transaction(first.transaction_id))  # as it was pushed
        assert drain.step().held == 1
        behind = json.loads(redis_client.zrange(keys.retry, -1, -1)[0])["metadata"]["held_by"]
        other = next(h for h in units if h != behind)  # its row's queue holds the first
        step = {"step_id": "s1", "operation": "create", "model_class": "ObsUnit", "data": {"id": 31337}}
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": "doomed-unit", "steps": [step]}))
        assert [d["transaction_id"] for d in drain.step().dead_lettered] == ["doomed-unit"]  # invalid: no name
        redis_client.lpush(keys.buffer, copy)
        assert [d["reason"] for d in drain.step().dead_lettered] == ["blocked by doomed-unit"]
        assert buf.status(first.transaction_id) == "pending"
        assert redis_client.zrange(keys.waiting(str(units[other][1])), 0, -1) == [first.transaction_id.encode()]
        letters = DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models))
        letters.discard(["doomed-unit"])  # the operator: the unit is made by hand instead
        with main_engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'by hand'), (:u, 'late unit')"),
                         {"u": units[other][0]})
        due_now(redis_client, keys, other)
        newer = buf.update("ExecutedObsUnit", units[other][1], {"status": "newer"})  # claimed with its holder
        report = drain.step()
        assert (report.applied, report.held, report.dead_lettered) == (1, 1, []), report
    finally:
        drain.close()
    with main_engine.begin() as conn:  # the other holder's cause fixed
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (:u, 'late unit')"), {"u": units[behind][0]})
    due_now(redis_client, keys, behind)
    drain_until_settled(settings, retry_base_s=0.05)
    assert buf.status(first.transaction_id) == buf.status(newer) == "replicated"
    letters.retry([first.transaction_id])  # the copy's letter: found applied, it changes nothing
    drain_until_settled(settings, retry_base_s=0.05)
    with main_engine.connect() as conn:
        assert dict(conn.execute(sa.text("SELECT id::text, status FROM executed_obs_unit WHERE id IN (:o, :b)"),
                                 {"o": units[other][1], "b": units[behind][1]}).all()) == {
            str(units[other][1]): "newer", str(units[behind][1]): "first"}
    assert_queues_empty(redis_client, settings.site)
    assert_no_holds(redis_client, keys)
    buf.close()


def test_a_copy_reclaimed_ahead_of_the_retry_it_copies_releases_that_ones_row(settings, redis_client, main_engine,
                                                                               monkeypatch):
    """T waits to retry, holding its row; a producer's copy of it is claimed (its cause fixed
    meanwhile), T comes due as the next batch is prefetched, and main cancels the copy's batch
    (lock_timeout: another session locks the row). Claimed again, the processing list is one
    batch, the copy ahead of T's retry: T's entry was dropped as pushed twice, and the copy,
    applied, did not let go of the row (only a transaction that waited does): T's mark stayed,
    and every later update of the row was parked behind it for ever."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    first = buf.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": 31337, "status": "first"})  # no such unit
    copy = redis_client.get(keys.transaction(first))  # as it was pushed
    drain = Drain(with_statement_timeout(settings, 300, "lock_timeout"),
                  DrainConfig(batch_size=1, retry_base_s=60, backoff_initial_s=0.1))
    try:
        drain.acquire()
        assert drain.step().retried == 1
        assert drain.step() is None  # (the batch prefetched behind it: empty)
        with main_engine.begin() as conn:  # T's cause fixed
            conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
        redis_client.lpush(keys.buffer, copy)
        real_mark = drain.store.mark_processing

        def mark_processing(ids, full_json):  # T due just as the next batch is prefetched
            due_now(redis_client, keys, first)
            return real_mark(ids, full_json)

        monkeypatch.setattr(drain.store, "mark_processing", mark_processing)
        with main_engine.connect() as blocker:
            blocker.execute(sa.text("SELECT id FROM executed_obs_unit WHERE id = :i FOR UPDATE"), {"i": obs["id"]})
            with pytest.raises(Exception, match="lock timeout"):
                drain.step()
            blocker.commit()
        monkeypatch.undo()
        assert redis_client.llen(keys.processing) == 2  # the copy, then T's retry
        assert drain.step().applied == 1
        assert redis_client.hgetall(keys.held_ids) == {}
        newer = buf.update("ExecutedObsUnit", obs["id"], {"status": "newer"})
        assert drain.step().applied == 1
    finally:
        drain.close()
    drain_until_settled(settings, retry_base_s=0.05)
    assert buf.status(first) == buf.status(newer) == "replicated"
    assert _obs_unit_and_status(main_engine, obs["id"]) == (31337, "newer")
    assert_queues_empty(redis_client, settings.site)
    assert_no_holds(redis_client, keys)
    buf.close()


def test_an_invalid_entry_under_the_id_of_one_waiting_to_retry_leaves_that_ones_hold_and_status(
        settings, redis_client, main_engine):
    """A producer reuses the id of an update that waits to retry, holding its row, for an entry the
    drain finds invalid (a column the model lacks) that updates the same row. Dead-lettered, its
    letter was written over the waiting one's status: status() said "failed" for a transaction
    still to be applied (and applied later). The waiting one keeps its status and its hold (a dead
    claim of the invalid entry leaves out the rows it holds live); the newer waits behind it."""
    keys = SiteKeys(settings.site)
    with an_update_failing_on_a_missing_obs_unit(settings) as (buf, obs, first, drain):
        step = {"step_id": "s1", "operation": "update", "model_class": "ExecutedObsUnit", "record_id": obs["id"],
                "data": {"no_such_column": 1}}
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": first, "steps": [step]}))
        assert [d["transaction_id"] for d in drain.step().dead_lettered] == [first]
        assert buf.status(first) == "pending"
        assert redis_client.hgetall(keys.held_ids) == {str(obs["id"]).encode(): first.encode()}
        newer = buf.update("ExecutedObsUnit", obs["id"], {"status": "newer"})
        assert drain.step().held == 1
    with main_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
    due_now(redis_client, keys, first)
    drain_until_settled(settings, retry_base_s=0.05)
    assert _obs_unit_and_status(main_engine, obs["id"]) == (31337, "newer")
    assert buf.status(newer) == "replicated"
    assert_no_holds(redis_client, keys)
    buf.close()


def test_an_invalid_entry_of_a_new_id_does_not_scan_the_retry_set_for_its_id(settings, redis_client, monkeypatch):
    """Only an id whose status says it waits may have an entry in `retry`: the look-up scans the
    whole set (BufferStore.waits_to_retry), and made once for each invalid entry it cost a burst
    of garbage a full scan of every parked transaction each. A fresh id's status key says pending,
    never having waited: no scan, and its letter is its status."""
    keys = SiteKeys(settings.site)
    with an_update_failing_on_a_missing_obs_unit(settings) as (buf, obs, first, drain):
        scanned = []
        monkeypatch.setattr(BufferStore, "waits_to_retry", lambda store, tx_id: scanned.append(tx_id) or False)
        fresh = str(uuid.uuid4())
        step = {"step_id": "s1", "operation": "update", "model_class": "ExecutedObsUnit", "record_id": obs["id"],
                "data": {"no_such_column": 1}}
        buf.redis.set(keys.transaction(fresh), json.dumps({"transaction_id": fresh, "status": "pending",
                                                           "retry_count": 0, "steps": [step]}))
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": fresh, "steps": [step]}))
        assert [d["transaction_id"] for d in drain.step().dead_lettered] == [fresh]
        assert scanned == [] and buf.status(fresh) == "failed"
        assert redis_client.hgetall(keys.held_ids) == {str(obs["id"]).encode(): first.encode()}


@pytest.mark.parametrize("operator", ["retries all", "discards it"])
@pytest.mark.parametrize("waited", ["to retry", "parked behind another"])
@pytest.mark.parametrize("revised", ["ColumnGone", "ModelRenamed"])
def test_a_waiting_update_the_revised_models_refuse_is_dead_lettered_with_its_rows_held_dead(
        settings, redis_client, main_engine, revised, waited, operator):
    """An update waits (to retry, or parked behind another row's holder, then made due by UNPARK),
    holding its rows, with a newer update parked behind it; the operator revises the models file
    (obs_pipeline_tests.revised_models: a column it sets gone, or its model renamed) and a drain
    runs. It is dead-lettered as invalid; its rows, worked out under the revised models, were
    none where its model was unknown: its marks stayed live, held by a transaction that no drain
    would ever apply or dead-letter again, and once it was discarded every later write of its rows
    waited behind it for ever. Its marks are dead: what comes after it is blocked by it, and once
    the models are restored, everything is applied in order (its letter retried or discarded)."""
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.model_registry import ModelRegistry

    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    a_obs, obs = replicated_observation(settings, buf), replicated_observation(settings, buf)
    parked = waited == "parked behind another"
    drain = Drain(settings, DrainConfig(retry_base_s=60))
    try:
        drain.acquire()
        if parked:  # A's holder waits to retry; the update of A and R waits behind it
            holder = buf.update("ExecutedObsUnit", a_obs["id"], {"obs_unit_id": 31338})  # no such unit yet
            assert drain.step().retried == 1
            with buf.transaction() as tx:
                tx.update("ExecutedObsUnit", a_obs["id"], {"obs_unit_id": 31337, "status": "first"})
                tx.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": 31337, "status": "first"})
            first = tx.transaction_id
            assert drain.step().held == 1
        else:
            first = buf.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": 31337, "status": "first"})  # no such unit
            assert drain.step().retried == 1
        behind = buf.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": 2})
        assert drain.step().held == 1
        if parked:  # the holder is applied: the update comes due, the first waiter for A and R
            add_unit(main_engine, 31338)
            due_now(redis_client, keys, holder)
            assert drain.step().applied == 1
        else:
            due_now(redis_client, keys, first)
    finally:
        drain.close()
    rows = {str(obs["id"])} | ({str(a_obs["id"])} if parked else set())
    assert redis_client.hgetall(keys.held_ids) == {row.encode(): first.encode() for row in rows}
    revised_settings = dataclasses.replace(settings, models=f"obs_pipeline_tests.revised_models:{revised}")
    drain = Drain(revised_settings, DrainConfig(retry_base_s=60))
    try:
        drain.acquire()
        report = drain.step()
        assert [d["transaction_id"] for d in report.dead_lettered] == [first], report
        assert json.loads(redis_client.lindex(keys.failed, 0))["failure"]["kind"] == "invalid"
        assert redis_client.hgetall(keys.held_ids) == {row.encode(): f"!{first}".encode() for row in rows}
        report = drain.step()  # the one parked behind it: blocked by it (or invalid too)
        assert [d["transaction_id"] for d in report.dead_lettered] == [behind], report
    finally:
        drain.close()
    # the models file restored
    newer = buf.update("ExecutedObsUnit", obs["id"], {"status": "newer"})
    drain = Drain(settings, DrainConfig(retry_base_s=60))
    try:
        drain.acquire()
        assert [d["reason"] for d in drain.step().dead_lettered] == [f"blocked by {first}"]
    finally:
        drain.close()
    letters = DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models))
    add_unit(main_engine, 31337)
    if operator == "discards it":
        letters.discard([first])
    letters.retry()
    drain_until_settled(settings, timeout_s=30, retry_base_s=0.05)
    assert _obs_unit_and_status(main_engine, obs["id"]) == (2, "newer")
    if parked:
        assert _obs_unit_and_status(main_engine, a_obs["id"]) == ((31337, "first") if operator == "retries all"
                                                                  else (31338, "running"))
    assert buf.status(behind) == buf.status(newer) == "replicated"
    assert buf.status(first) == ("replicated" if operator == "retries all" else None)
    assert_queues_empty(redis_client, settings.site)
    assert_no_holds(redis_client, keys)
    buf.close()


def test_a_waiting_update_the_revised_models_refuse_turns_its_place_in_its_rows_queue_dead(
        settings, redis_client, main_engine):
    """As above, but the refused update waits in its row's queue, behind an older update that
    also waits to retry (both failed in one batch): its place there stayed live, and became the
    row's head once the older one was applied. Turned dead, the newer update behind it is blocked
    by it, and applied after it once the models are restored and its letter retried."""
    keys = SiteKeys(settings.site)
    with a_row_its_letters_and_a_drain(settings, redis_client) as (buf, obs, letters, drain):
        older = buf.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": 31338, "status": "older"})  # no such unit
        first = buf.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": 31337, "status": "first"})  # ... yet
        drain.acquire()
        assert drain.step().retried == 2
        assert redis_client.zrange(keys.waiting(str(obs["id"])), 0, -1) == [first.encode()]
    revised = Drain(dataclasses.replace(settings, models="obs_pipeline_tests.revised_models:ModelRenamed"),
                    DrainConfig(retry_base_s=60))
    try:
        due_now(redis_client, keys, first)
        revised.acquire()
        assert [d["transaction_id"] for d in revised.step().dead_lettered] == [first]
        assert redis_client.zrange(keys.waiting(str(obs["id"])), 0, -1) == [f"!{first}".encode()]
    finally:
        revised.close()
    add_unit(main_engine, 31338)  # the models file restored; the older one's cause fixed
    due_now(redis_client, keys, older)
    drain_until_settled(settings, timeout_s=30, retry_base_s=0.05)
    newer = buf.update("ExecutedObsUnit", obs["id"], {"status": "newer"})
    drain_until_settled(settings, timeout_s=30, retry_base_s=0.05)
    assert buf.status(newer) == "failed"  # blocked by the refused one
    add_unit(main_engine, 31337)
    letters.retry()
    drain_until_settled(settings, timeout_s=30, retry_base_s=0.05)
    assert _obs_unit_and_status(main_engine, obs["id"]) == (31337, "newer")
    assert buf.status(first) == buf.status(newer) == "replicated"
    assert_queues_empty(redis_client, settings.site)
    assert_no_holds(redis_client, keys)
    buf.close()


@pytest.mark.parametrize("newer_as", ["Execution", "ExecutedObsUnit"])
def test_an_update_of_a_model_the_models_file_lacks_holds_its_row_dead_from_its_first_claim(
        settings, redis_client, main_engine, newer_as):
    """An update buffered under a model the models file no longer has (ExecutedObsUnit, renamed
    Execution in obs_pipeline_tests.revised_models) is dead-lettered as invalid at its first claim,
    never having waited. Its rows, worked out from its steps, were none (its model unknown): it
    held nothing, so a newer update of the row (under the model's current name, or its old one once
    the models file was restored) was applied at once, and `failed retry` of the letter, the models
    file restored, then wrote the older value over it. A UUID names its row whatever the model: the
    letter holds it dead, the newer update waits behind it (blocked by it), and retried they are
    applied in their order (the newer under the models that name it)."""
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.model_registry import ModelRegistry

    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    older = buf.update("ExecutedObsUnit", obs["id"], {"status": "older"})
    renamed = dataclasses.replace(settings, models="obs_pipeline_tests.revised_models:ModelRenamed")
    drain_until_settled(renamed, timeout_s=30)
    assert buf.status(older) == "failed"
    newer_settings = renamed if newer_as == "Execution" else settings
    writer = TransactionBuffer(settings=newer_settings)
    newer = writer.update(newer_as, obs["id"], {"status": "newer"})
    drain_until_settled(newer_settings, timeout_s=30)
    # the operator restores the models file, the letter's cause, and retries it (with what it blocked)
    store = BufferStore(redis_client, settings.site)
    DeadLetters(store, ModelRegistry.from_path(settings.models)).retry([older])
    drain_until_settled(settings, timeout_s=30)
    if newer_as == "Execution":  # taken along, invalid under the restored models: retried under its own
        DeadLetters(store, ModelRegistry.from_path(renamed.models)).retry()
        drain_until_settled(renamed, timeout_s=30)
    assert _obs_unit_and_status(main_engine, obs["id"]) == (1, "newer")
    assert buf.status(older) == writer.status(newer) == "replicated"
    assert_queues_empty(redis_client, settings.site)
    assert_no_holds(redis_client, keys)
    writer.close()
    buf.close()


def test_two_updates_held_behind_one_failure_are_applied_in_their_order(settings, redis_client, main_engine):
    """Two updates of a row wait behind an older failing one. They were looked at again each on
    its own schedule (1, 2, 4 ... 30 s from when it was first held), so once the failing one was
    applied, the newer, held for less long, came due first and was applied before the older,
    which then overwrote it: main kept the older write."""
    keys = SiteKeys(settings.site)
    with an_update_failing_on_a_missing_obs_unit(settings) as (buf, obs, first, drain):
        older = buf.update("ExecutedObsUnit", obs["id"], {"status": "older"})
        assert drain.step().held == 1
        for _ in range(2):  # the older is looked at while the first still waits: held again
            due_now(redis_client, keys, older)
            assert drain.step().held == 1
        newer = buf.update("ExecutedObsUnit", obs["id"], {"status": "newer"})
        assert drain.step().held == 1
        with main_engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
        due_now(redis_client, keys, first)
        assert drain.step().applied == 1
    drain_until_settled(settings, retry_base_s=60)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :i"),
                            {"i": obs["id"]}).scalar_one() == "newer"
    assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "newer"
    assert buf.status(older) == buf.status(newer) == "replicated"
    assert redis_client.hlen(keys.held_ids) == 0
    assert_queues_empty(redis_client, settings.site)
    buf.close()


def test_a_new_update_claimed_with_the_holder_waits_behind_those_parked_before_it(settings, redis_client, main_engine):
    """An update parked behind a failing one, then a newer update of the row claimed in the same
    batch as the failing one's retry (found in review): the newer went through behind its holder,
    and the older, released after, overwrote it. It now waits behind what was parked first, and
    the first waiter released takes the row's mark, so a batch claimed meanwhile waits too."""
    keys = SiteKeys(settings.site)
    with an_update_failing_on_a_missing_obs_unit(settings) as (buf, obs, first, drain):
        older = buf.update("ExecutedObsUnit", obs["id"], {"status": "older"})
        assert drain.step().held == 1
        with main_engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
        newer = buf.update("ExecutedObsUnit", obs["id"], {"status": "newer"})  # claimed with first, behind it
        due_now(redis_client, keys, first)
        report = drain.step()
        assert report.applied == 1 and report.held == 1
        assert older.encode() in redis_client.hvals(keys.held_ids), redis_client.hgetall(keys.held_ids)
    drain_until_settled(settings, retry_base_s=60)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :i"),
                            {"i": obs["id"]}).scalar_one() == "newer"
    assert buf.status(first) == buf.status(older) == buf.status(newer) == "replicated"
    assert redis_client.hlen(keys.held_ids) == 0 and not redis_client.keys(keys.prefix + "parked:*")
    assert_queues_empty(redis_client, settings.site)
    buf.close()


@contextlib.contextmanager
def an_update_failing_on_a_missing_obs_unit(settings, status: str | None = None):
    """A replicated observation whose update (to obs unit 31337, not there yet; and to `status`
    if given) has failed once and waits in retry, and the drain that tried it, holding the lease:
    the tests hold later updates of the row behind that update."""
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    values = {"obs_unit_id": 31337} | ({"status": status} if status else {})
    first = buf.update("ExecutedObsUnit", obs["id"], values)  # no such unit yet
    drain = Drain(settings, DrainConfig(retry_base_s=60))
    try:
        drain.acquire()
        assert drain.step().retried == 1
        yield buf, obs, first, drain
    finally:
        drain.close()


def replicated_observation(settings, buf: TransactionBuffer) -> dict:
    """An executed obs unit created, drained and replicated: a row whose updates the tests hold back."""
    with buf.transaction() as start:
        obs = start.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                               "status": "running"})
    drain_until_settled(settings)
    return obs


def due_now(redis_client, keys: SiteKeys, tx_id: str) -> None:
    """Make this transaction's entry in the retry set due now, whatever its score was."""
    redis_client.zadd(keys.retry, {m: 0 for m in redis_client.zrange(keys.retry, 0, -1)
                                   if json.loads(m)["transaction_id"] == tx_id})


# --- forked children (multiprocessing's fork start method, as observing scripts use it) ------------

def _forked(target, *args):
    """Run target(conn, *args) in a child forked from this process; the child reports on `conn`
    and ends with os._exit (never pytest's teardown). Returns the process and the parent's end."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()

    def main() -> None:
        try:
            target(child_end, *args)
        except BaseException:  # noqa: BLE001 -- told to the parent, which fails the test
            import traceback

            try:
                child_end.send(("error", traceback.format_exc()))
            except Exception:  # noqa: BLE001
                pass
        finally:
            os._exit(0)

    proc = ctx.Process(target=main, name="forked-script", daemon=True)
    proc.start()
    child_end.close()
    return proc, parent_end


def _from_child(proc, conn, timeout: float, what: str):
    """The child's next report within `timeout`, or the test fails (and the child is killed)."""
    if not conn.poll(timeout):
        proc.kill()
        proc.join(10)
        pytest.fail(f"the forked child did not report within {timeout:g} s: {what}")
    try:
        reply = conn.recv()
    except EOFError:
        proc.join(10)
        pytest.fail(f"the forked child ended without reporting ({what}): exit code {proc.exitcode}")
    if reply[0] == "error":
        pytest.fail(f"the forked child failed ({what}):\n{reply[1]}")
    return reply


def _buffer_and_read_back(buf: TransactionBuffer, unit: int, count: int) -> tuple[list, list]:
    """`count` observations of obs unit `unit` (every other one finished), buffered back to back,
    each transaction's status read at once (its call returned: it is in Redis); then each record
    read back (from Redis), and the obs unit's row (from the replica). Returns what was wrong."""
    observations, wrong = [], []
    for i in range(count):
        obs = buffer_observations(buf, 1, finish_every=1 if i % 2 == 0 else 0, obs_unit_id=unit)[0]
        for tx_id in (obs.start_tx, obs.finish_tx):
            if tx_id and (status := buf.status(tx_id)) != "pending":
                wrong.append(("status", tx_id, status))
        observations.append(obs)
    for obs in observations:
        got = buf.get("ExecutedObsUnit", obs.obs_id)
        expected = [obs.obs_id, unit, "completed" if obs.finish_tx else "running"]
        if [(got or {}).get(k) for k in ("id", "obs_unit_id", "status")] != expected:
            wrong.append(("get", obs.obs_id, got))
        row = buf.get("ObsUnit", unit)
        if (row or {}).get("name") != f"unit {unit}":
            wrong.append(("replica", unit, row))
    return observations, wrong


def test_a_forked_child_and_its_parent_ingest_and_read_concurrently_without_crossing_replies(
        settings, redis_client, main_engine):
    """A script buffers (its thread's own Redis connection now exists) and reads (the replica's
    pool holds a connection), then forks a worker; both buffer and read back their own records
    at once. The child sent on its parent's sockets, so one process could read the other's
    replies: a record, a status or a row of the other's, or garbage."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    before, wrong = _buffer_and_read_back(buf, 1, 1)
    assert not wrong and buf._thread.store is not None and buf.query._engine is not None

    def child(conn) -> None:
        conn.send(("connection", buf._store_of_this_thread().redis.client_id()))
        assert conn.recv() == "go"
        mine, wrong_ = _buffer_and_read_back(buf, 2, 400)
        buf.close()  # the child's own connections: never the parent's
        import gc

        gc.collect()
        conn.send(("done", mine, wrong_))

    proc, conn = _forked(child)
    try:
        _, childs_client = _from_child(proc, conn, 20, "the Redis client id of its thread's connection")
        assert childs_client != buf._store_of_this_thread().redis.client_id(), "the child sends on the parent's socket"
        conn.send("go")
        parents, wrong = _buffer_and_read_back(buf, 1, 400)
        assert not wrong, (len(wrong), wrong[:3])
        _, childs, childs_wrong = _from_child(proc, conn, 120, "buffering and reading back 400 observations")
        assert not childs_wrong, (len(childs_wrong), childs_wrong[:3])
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
    after, wrong = _buffer_and_read_back(buf, 1, 2)  # the parent's connections, untouched by the child
    assert not wrong, wrong
    everything = before + parents + childs + after
    expected = [t for o in everything for t in (o.start_tx, o.finish_tx) if t]
    queue = [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.buffer, 0, -1)]
    assert len(queue) == len(expected) and set(queue) == set(expected)  # each buffered once
    assert not buf.spool.exists()
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, everything)
    buf.close()


def test_a_child_forked_while_a_thread_holds_the_spools_locks_spools_and_pushes_its_transaction(
        stack, settings, redis_client, main_engine):
    """Redis is down: the parent spooled a transaction and its flusher runs. A child forked while
    another thread holds the spool's thread locks (as the flusher does while it pushes) got
    them copied held, for ever: its ingest hung; and its flusher flag copied set, so it never
    started a flusher of its own. The parent keeps its lock held until the child's flusher has
    pushed the spool: only the child can push it."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    before = buffer_observations(buf, 1, finish_every=0)  # this thread's connection, open before the fork
    holding, release = threading.Event(), threading.Event()

    def hold_the_spools_locks() -> None:
        with buf.spool._shared.lock, buf.spool._flusher_lock:
            holding.set()
            release.wait(120)

    holder = threading.Thread(target=hold_the_spools_locks, daemon=True)
    proc = None
    try:
        # a clean stop: a kill loses what Redis took in the last second (appendfsync everysec), `before`
        stack.stop_service("redis")
        spooled = buffer_observations(buf, 1, finish_every=0)
        assert buf.spool.pending() == 1 and buf.spool._flusher_running
        holder.start()
        assert holding.wait(10)

        def child(conn) -> None:
            mine = buffer_observations(buf, 1, finish_every=0, obs_unit_id=2)
            conn.send(("spooled", mine, buf.spool.pending()))
            assert conn.recv() == "redis is up"
            client = redis.Redis.from_url(settings.redis_url)
            pushed = wait_until(lambda: not buf.spool.exists()
                                and client.exists(keys.transaction(mine[0].start_tx)), 30, 0.05)
            conn.send(("pushed", pushed))

        proc, conn = _forked(child)
        _, mine, pending = _from_child(proc, conn, 20, "its ingest waits for a lock copied held from the parent")
        assert pending == 2
        stack.start_service("redis")
        conn.send("redis is up")
        _, pushed = _from_child(proc, conn, 60, "its spool pushed once Redis is back")
        assert pushed, "the child's flusher did not push its spool"
    finally:
        stack.start_service("redis")  # (nothing if it runs)
        release.set()
        if holder.ident is not None:
            holder.join(10)
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(10)
    assert wait_until(lambda: not buf.spool._flusher_running, 10)  # the parent's flusher found it pushed
    queue = _queued_ids(redis_client, keys)
    assert queue == [o.start_tx for o in before + spooled + mine]  # in order, each once
    after = buffer_observations(buf, 1, finish_every=0)  # the parent's own connection, on the restarted Redis
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, before + spooled + mine + after)
    buf.close()


def test_a_child_forked_while_a_push_holds_the_spools_file_lock_does_not_keep_that_lock(
        stack, settings, redis_client, main_engine):
    """A child forked while a thread of its parent holds the site's spool lock (the `flock` on
    `{site}.lock`, as a push does) inherits the lock file's descriptor. The parent released
    the lock by closing its descriptor, which does not release it while the child's copy is
    open: the child, waiting for the lock, then waited for ever (and so did every script of the
    site on the host). The child waits for the parent's push, as any script does, no longer."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    holding, release = threading.Event(), threading.Event()

    def push_in_progress() -> None:
        with buf.spool._locked():
            holding.set()
            release.wait(120)

    holder = threading.Thread(target=push_in_progress, daemon=True)
    proc = None
    try:
        stack.stop_service("redis", mode="kill")
        spooled = buffer_observations(buf, 1, finish_every=0)
        holder.start()
        assert holding.wait(10)

        def child(conn) -> None:
            mine = buffer_observations(buf, 1, finish_every=0, obs_unit_id=2)
            conn.send(("spooled", mine))
            conn.recv()  # alive, with whatever it inherited, until the parent has pushed

        proc, conn = _forked(child)
        assert not conn.poll(0.5), "the child did not wait for the parent's push"
        release.set()
        holder.join(10)
        _, mine = _from_child(proc, conn, 20, "its ingest waits for the spool's file lock after the parent released it")
        stack.start_service("redis")
        pusher = threading.Thread(target=buf.spool.flush, daemon=True)
        pusher.start()
        pusher.join(20)
        assert not pusher.is_alive(), "the parent cannot take its spool's lock again"
        assert not buf.spool.exists()
        conn.send("done")
    finally:
        stack.start_service("redis")
        release.set()
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(10)
    queue = _queued_ids(redis_client, keys)
    assert queue == [o.start_tx for o in spooled + mine]
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, spooled + mine)
    buf.close()


def test_a_new_spool_and_its_folders_are_made_durable_and_removed_in_a_safe_order(settings, redis_client, tmp_path,
                                                                                  monkeypatch):
    """A file's fsync does not make its name durable, only its folder's fsync does (POSIX): after
    a power loss, the first line spooled in an outage, whose call returned, could be gone with
    its file, or the spool's folder with it. And a push removes the spool before its progress file:
    were only the second removal kept, the spool's pushed lines would be taken for untried by the
    next push (applied again a week later: test_expiries.py); an offset left without its spool is
    dropped by the next spool's first line."""
    from obs_pipeline.spool import Spool

    synced: list[tuple[str, bool, bool]] = []  # (path, progress file there, spool there) at each fsync
    real_fsync = os.fsync
    spool = Spool(tmp_path / "spools" / "site", settings.site, flush_store=BufferStore(redis_client, settings.site))

    def recording_fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), spool.offset_path.exists() or spool.offset_check_path.exists(),
                       spool.path.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)

    spool.buffer(_RedisDown(), *_spool_line("first"))
    folders = {str(tmp_path), str(tmp_path / "spools"), str(spool.directory)}
    assert folders <= {path for path, _, _ in synced}  # each new folder in its parent, the file in its folder
    assert [path for path, _, _ in synced].index(str(spool.path)) < [path for path, _, _ in synced].index(
        str(spool.directory))  # the line first, then its file's name
    synced.clear()
    spool.buffer(_RedisDown(), *_spool_line("second"))
    assert [path for path, _, _ in synced] == [str(spool.path)]  # an existing spool: its line alone
    synced.clear()
    assert spool.flush() and not spool.path.exists()
    folder_syncs = [(offset, there) for path, offset, there in synced if path == str(spool.directory)]
    assert folder_syncs == [(True, False)]  # between the spool's removal and the progress file's
    assert len(redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1)) == 2


# A drain in a process of its own that SIGKILLs itself at one point of its cycle (argv[1]), or
# the first time it gets there, SIGSTOPs itself (argv[2] "stop"). Batches of 10 with 3
# transactions per cleanup chunk, so a batch's cleanup is several MULTI/EXECs; the lease lives
# 1.5 s, so the next drain takes over soon after the death.
_DRAIN_KILLED_AT = r"""
import os, signal, sys, threading
from obs_pipeline import apply, buffer_store
from obs_pipeline.buffer_store import BufferStore
from obs_pipeline.config import Settings
from obs_pipeline.drain import Drain, DrainConfig

point, stops = sys.argv[1], sys.argv[2:] == ["stop"]
def die(stopped=[]):
    if not stopped:
        stopped.append(stops)
        os.kill(os.getpid(), signal.SIGSTOP if stops else signal.SIGKILL)
buffer_store.CLEANUP_CHUNK = 3

def wrap(name, before=None, after=None):
    real = getattr(BufferStore, name)
    def wrapped(self, *args, **kwargs):
        if before and before(*args):
            die()
        out = real(self, *args, **kwargs)
        if after and after(*args):
            die()
        return out
    setattr(BufferStore, name, wrapped)

if point == "claimed":  # the first batch in `processing`, not yet sent to main
    wrap("claim", after=lambda *a: True)
elif point == "applying":  # main has the whole script and commits it after the drain is gone
    apply._FLUSHED_COMMIT = b"SELECT pg_sleep(3);\n" + apply._FLUSHED_COMMIT
    real_run = apply.MainDatabase._run
    def run(self, cur, parts):
        threading.Timer(0.5, die).start()
        return real_run(self, cur, parts)
    apply.MainDatabase._run = run
elif point == "committed":  # main committed the batch; its acknowledgement never reaches Redis
    wrap("acknowledge", before=lambda *a: True)
elif point == "acknowledged":  # acknowledged with its commit LSN; statuses not yet "applied"
    wrap("acknowledge", after=lambda *a: True)
elif point == "cleaning":  # the first chunk of a cleanup done, the next one's MULTI sent half
    real_send = BufferStore._send_all
    def send_all(self, commands):
        if commands[0] != ("MULTI",):
            return real_send(self, commands)
        first_exec = commands.index(("EXEC",))
        conn = self.redis.connection_pool.get_connection()
        conn.send_packed_command(conn.pack_commands(commands[:first_exec + 4]))
        for _ in range(first_exec + 1):
            conn.read_response()  # the first chunk's EXEC has run
        die()
    BufferStore._send_all = send_all
Drain(Settings.from_env(), DrainConfig(batch_size=10, lease_ttl_s=1.5, aof_check_s=None)).run(until_empty=True)
"""


@pytest.mark.parametrize("point", ["claimed", "applying", "committed", "acknowledged", "cleaning"])
def test_a_drain_killed_at_each_point_of_its_cycle_loses_and_doubles_nothing(settings, redis_client, main_engine,
                                                                            point):
    """The kill -9 test above stops the drain at random moments; this one at each point of the
    cycle in turn, and checks that it got there: after its claim; while main applies the batch
    (main commits it after the drain died, and the next drain's apply waits on those uncommitted
    ids, then skips them); after main's COMMIT, before the acknowledgement; after it (the commit
    LSN is stored in the acknowledgement itself), before the statuses become "applied"; and in
    the middle of a cleanup. The next drain finishes the work: every transaction applied and
    counted once, every status "replicated", nothing left behind."""
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 30, finish_every=2)  # 45 transactions
    buf.close()
    keys = SiteKeys(settings.site)
    killed = subprocess.run([sys.executable, "-c", _DRAIN_KILLED_AT, point], env=cli_env(settings),
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with main_engine.connect() as conn:
        committed = conn.execute(sa.text("SELECT count(*) FROM obs_pipeline_applied")).scalar_one()
    acknowledged = int(redis_client.hget(keys.stats, "applied_total") or 0)
    if point == "claimed":
        assert committed == 0 and redis_client.llen(keys.processing) == 10
    elif point == "applying":
        assert committed == 0 and redis_client.llen(keys.processing) >= 10  # the COMMIT is still to come
    elif point == "committed":
        assert committed == 10 and acknowledged == 0 and redis_client.llen(keys.processing) >= 10
    elif point == "acknowledged":
        assert committed >= 10 and acknowledged == committed
        assert redis_client.zcard(keys.awaiting_replication) >= 1
    else:
        assert acknowledged >= 10 and 1 <= int(redis_client.hget(keys.stats, "replicated_total") or 0) < acknowledged
    drain_until_settled(settings, batch_size=10)
    assert_applied_exactly_once(main_engine, observations)
    assert_queues_empty(redis_client, settings.site)
    ids = [o.start_tx for o in observations] + [o.finish_tx for o in observations if o.finish_tx]
    stats = redis_client.hgetall(keys.stats)
    assert int(stats[b"applied_total"]) == int(stats[b"replicated_total"]) == len(ids)  # counted once
    check = TransactionBuffer(settings=settings)
    try:
        assert {check.status(i) for i in ids} == {"replicated"}
    finally:
        check.close()
    assert not list(redis_client.scan_iter(match=f"site:{settings.site}:buffered:*"))
    assert not list(redis_client.scan_iter(match=f"site:{settings.site}:read_buffer:*"))


def _aof_tail(stack):
    """The AOF file that takes Redis's writes now: appendonly.aof (Redis 6), or in Redis 7's
    appendonlydir the last `type i` file of its manifest."""
    from pathlib import Path

    folder = Path(stack.directory) / "redis"
    if not (folder / "appendonlydir").exists():
        return folder / "appendonly.aof"
    lines = (folder / "appendonlydir" / "appendonly.aof.manifest").read_text().splitlines()
    return folder / "appendonlydir" / [line.split()[1] for line in lines if line.split()[-2:] == ["type", "i"]][-1]


def test_a_redis_that_comes_back_without_its_last_writes_mid_drain_loses_and_doubles_nothing(
        stack, settings, redis_client, main_engine):
    """Redis is killed while the drain runs and comes back from an AOF that lacks its last second
    (appendfsync everysec): it forgot that the drain acknowledged a batch main has committed and
    claimed the next one. The drain, still running, reconnects to it and goes on with what it
    holds in memory (the batch it prefetched). Each transaction is applied once, and every one
    is cleaned and "replicated" in the end."""
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 30, finish_every=2)  # 45 transactions
    buf.close()
    keys = SiteKeys(settings.site)
    lost = {}

    def on_batch(report) -> None:  # between two batches of the run
        if report.applied and "kept" not in lost:  # the next batch was claimed meanwhile
            time.sleep(1.5)  # appendfsync everysec: all of this is on disk
            lost["aof"] = _aof_tail(stack)
            lost["kept"] = lost["aof"].stat().st_size
        elif report.applied and "restarted" not in lost:  # committed, acknowledged, the third claimed
            assert redis_client.llen(keys.processing) == 10
            stack.stop_service("redis", mode="kill")
            assert _aof_tail(stack) == lost["aof"]
            os.truncate(lost["aof"], lost["kept"])  # what Redis wrote since is lost
            stack.start_service("redis")
            lost["restarted"] = int(redis_client.hget(keys.stats, "applied_total"))

    drain = Drain(settings, DrainConfig(batch_size=10, aof_check_s=None))
    try:
        summary = drain.run(until_empty=True, budget_s=60, on_batch=on_batch)
    finally:
        drain.close()
    assert lost["restarted"] == 10  # Redis forgot the second batch's acknowledgement
    assert summary.stopped_because == "buffer empty", summary
    drain_until_settled(settings, batch_size=10)
    assert_applied_exactly_once(main_engine, observations)
    assert_queues_empty(redis_client, settings.site)
    ids = [o.start_tx for o in observations] + [o.finish_tx for o in observations if o.finish_tx]
    check = TransactionBuffer(settings=settings)
    try:
        assert {i: check.status(i) for i in ids if check.status(i) != "replicated"} == {}
    finally:
        check.close()
    assert not list(redis_client.scan_iter(match=f"site:{settings.site}:buffered:*"))
    assert not list(redis_client.scan_iter(match=f"site:{settings.site}:read_buffer:*"))


def _drain_while_the_obs_unit_is_locked(main_engine, settings, hold_s: float, config, budget_s: float):
    """One drain run until empty while another session holds obs unit 1's row lock (FOR UPDATE,
    which each insert's foreign key check waits on) for its first `hold_s` seconds; returns its
    summary, batch reports and the transient errors it was told of."""
    reports, transient = [], []
    with main_engine.connect() as blocker:
        blocker.execute(sa.text("SELECT id FROM obs_unit WHERE id = 1 FOR UPDATE"))
        release = threading.Timer(hold_s, blocker.commit)
        release.start()
        drain = Drain(settings, config)
        try:
            summary = drain.run(until_empty=True, budget_s=budget_s, on_batch=reports.append,
                                on_transient=lambda error, backoff: transient.append(error))
        finally:
            drain.close()
            release.join()
    return summary, reports, transient


def test_a_statement_timeout_on_main_retries_the_batch_in_pieces_and_spends_no_retry(settings, redis_client,
                                                                                  main_engine):
    """Main cancels the batch's statement at its `statement_timeout` (SQLSTATE 57014): here the
    drain's role has 0.3 s, and another session holds the obs unit's row lock (FOR UPDATE) that
    each insert's foreign key check waits on, for 2 s. The transaction is rolled back, the batch
    retried in smaller pieces, with backoff, no transaction charged a retry; once the lock goes, each is
    applied once."""
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 20, finish_every=2)  # 30 transactions
    buf.close()
    summary, reports, transient = _drain_while_the_obs_unit_is_locked(
        main_engine, with_statement_timeout(settings, 300), 2.0,
        DrainConfig(batch_size=10, backoff_initial_s=0.2, backoff_max_s=0.4), budget_s=60)
    assert transient and all("QueryCanceled" in e and "statement timeout" in e for e in transient), transient
    assert summary.stopped_because == "buffer empty", summary
    assert sum(r.applied for r in reports) == 30 and not any(r.retried or r.dead_lettered for r in reports), reports
    assert_applied_exactly_once(main_engine, observations)
    assert_queues_empty(redis_client, settings.site)


def test_a_drain_interrupted_while_main_applies_keeps_the_lease_until_main_answers(settings, redis_client,
                                                                                 main_engine):
    """Ctrl-C (or Dagster ending the run) while main applies a batch, here held up by another
    session's row lock: the drain waits for main's answer before it lets go of the lease. It let
    go at once, while its batch was still being applied, and another drain (the sensor's next
    run) could claim that batch and apply it beside it. The interrupt still ends the run; the
    next drain finds the batch applied: each transaction once."""
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 6, finish_every=2)  # 9 transactions
    buf.close()
    keys = SiteKeys(settings.site)
    seen: dict = {}
    main_thread = threading.main_thread().ident
    drain = Drain(settings, DrainConfig(batch_size=100))

    def interrupt_then_look(blocker) -> None:
        def main_says(sql: str) -> int:
            with main_engine.connect() as conn:  # (pg_stat_activity is read once per transaction)
                return conn.execute(sa.text(sql)).scalar_one()

        try:
            assert wait_until(lambda: main_says("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                                                "'Lock' AND application_name = 'obs-pipeline drain'") > 0, timeout=30)
            signal.pthread_kill(main_thread, signal.SIGINT)  # Ctrl-C, while the drain waits on main
            time.sleep(1.0)
            seen["lease"] = redis_client.get(keys.lease)
            seen["token"] = drain.token
            seen["applied"] = main_says("SELECT count(*) FROM obs_pipeline_applied")
        finally:
            blocker.commit()  # the lock goes: main applies the batch

    # Ctrl-C as in a terminal: pytest started with `&` from a script (a CI step, nohup) inherits
    # SIGINT ignored, and the drain ran to the end uninterrupted ("DID NOT RAISE")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    with main_engine.connect() as blocker:
        blocker.execute(sa.text("SELECT id FROM obs_unit WHERE id = 1 FOR UPDATE"))
        looker = threading.Thread(target=interrupt_then_look, args=(blocker,))
        looker.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                drain.run(until_empty=True, budget_s=60)
        finally:
            looker.join()
            drain.close()
            signal.signal(signal.SIGINT, previous)
    assert seen["applied"] == 0, seen  # main was still applying when the lease was looked at
    assert seen["token"] and seen["lease"] == seen["token"].encode(), seen
    assert redis_client.get(keys.lease) is None  # let go once main answered
    drain_until_settled(settings, batch_size=100)
    assert_applied_exactly_once(main_engine, observations)
    assert_queues_empty(redis_client, settings.site)


def test_a_batch_too_large_for_mains_statement_timeout_is_applied_in_smaller_pieces(settings, redis_client,
                                                                                    main_engine, caplog):
    """Main takes 10 ms to insert each file (a trigger) and the drain's role has a
    statement_timeout of 0.3 s: a batch of 60 transactions (80 files, 0.8 s) never commits
    whole. Retried as it was, it timed out for ever and nothing behind it drained, the log
    saying "main unreachable". It is retried in halves, each piece its own commit, down to what
    main applies in time: each transaction once, none charged a retry or dead-lettered. Once
    batches go through again they grow back, to whole batches."""
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 40, finish_every=2)  # 60 transactions, 80 files
    buf.close()
    timed = with_statement_timeout(settings, 300)
    config = DrainConfig(batch_size=60, backoff_initial_s=0.05, backoff_max_s=0.2)
    reports, transient = [], []
    with slow_file_inserts(main_engine, 0.01), caplog.at_level(logging.WARNING, logger="obs_pipeline.drain"):
        drain = Drain(timed, config)
        try:
            summary = drain.run(until_empty=True, budget_s=20, on_batch=reports.append,
                                on_transient=lambda error, backoff: transient.append(error))
        finally:
            drain.close()
    assert summary.stopped_because == "buffer empty", summary
    assert transient and all("QueryCanceled" in e and "statement timeout" in e for e in transient), transient
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(m.startswith("statement timeout on main (QueryCanceled") and "in pieces of" in m for m in warned), warned
    assert not any("unreachable" in m for m in warned), warned
    assert sum(r.applied for r in reports) == 60 and not any(r.retried or r.dead_lettered for r in reports), reports
    assert max(r.pieces for r in reports) > 1, reports
    assert_applied_exactly_once(main_engine, observations)
    assert_queues_empty(redis_client, settings.site)
    keys = SiteKeys(settings.site)
    assert redis_client.exists(keys.timeouts)  # pieces of 30 next: a new Drain reads them
    # the cause gone: the next batch goes in pieces of 30, then batches are whole again
    more = buffer_observations(TransactionBuffer(settings=settings), 80, finish_every=2)  # 120 transactions
    reports.clear()
    drain = Drain(timed, config)
    try:
        drain.run(until_empty=True, budget_s=20, on_batch=reports.append)
    finally:
        drain.close()
    assert [r.pieces for r in reports if r.transactions] == [2, 1], reports
    assert not redis_client.exists(keys.timeouts)
    assert_applied_exactly_once(main_engine, observations + more)
    assert_queues_empty(redis_client, settings.site)


def test_a_transaction_that_times_out_alone_is_dead_lettered_and_the_rest_drains(settings, redis_client,
                                                                                 main_engine, caplog):
    """One start transaction's file takes main 1 s to insert (a trigger), past the drain's
    statement_timeout of 0.3 s however small the piece. Retried as it was, its batch timed out
    for ever and the whole queue stalled behind it. Pieces halve down to it alone; after it
    timed out alone `timeout_attempts` (3) times in a row it is dead-lettered with a reason to
    act on, its finish (which updates its row) with it as blocked, and everything else, in its
    batch and after, is applied once. With the cause gone, `failed retry` applies both once."""
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 20, finish_every=2)  # 30 transactions, 10 per batch
    buf.close()
    slow, others = observations[6], observations[:6] + observations[7:]  # its start is the first batch's last
    keys = SiteKeys(settings.site)
    with slow_file_inserts(main_engine, 1.0, name="f6_0.fits"), \
            caplog.at_level(logging.WARNING, logger="obs_pipeline.drain"):
        drain = Drain(with_statement_timeout(settings, 300),
                      DrainConfig(batch_size=10, backoff_initial_s=0.05, backoff_max_s=0.1, timeout_attempts=3))
        reports = []
        try:
            summary = drain.run(until_empty=True, budget_s=20, on_batch=reports.append)
        finally:
            drain.close()
        assert summary.stopped_because == "buffer empty", summary
        # pieces committed before a later one timed out: skipped when the batch is claimed again
        assert sum(r.already_applied for r in reports) > 0 and sum(r.applied + r.already_applied for r in reports) == 28
        failed = {f["transaction_id"]: f for f in map(json.loads, redis_client.lrange(keys.failed, 0, -1))}
        assert set(failed) == {slow.start_tx, slow.finish_tx}, failed
        failure = failed[slow.start_tx]["failure"]
        assert (failure["kind"], failure["attempts"]) == ("timeout", 3), failure
        assert failure["reason"].startswith("statement timeout on main 3 times in a row, applied alone (QueryCanceled: "
                                            "canceling statement due to statement timeout): "), failure
        assert "ALTER ROLE" in failure["reason"] and "SET statement_timeout" in failure["reason"], failure
        assert failure["reason"].endswith(f"then `obs-pipeline failed retry {slow.start_tx}`"), failure
        assert "\n" not in failure["reason"]
        assert failed[slow.finish_tx]["failure"]["reason"] == f"blocked by {slow.start_tx}"
        alone = [m for m in (r.getMessage() for r in caplog.records) if f"{slow.start_tx} timed out alone" in m]
        assert len(alone) == 2 and all(m.startswith("statement timeout on main") for m in alone), alone  # the 3rd: dead
        assert_applied_exactly_once(main_engine, others)
        check = TransactionBuffer(settings=settings)
        try:
            assert check.status(slow.start_tx) == check.status(slow.finish_tx) == "failed"
        finally:
            check.close()
        assert BufferStore(redis_client, settings.site).timeouts()[1] == {}  # no count left once it is dead
    retried = subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "retry", slow.start_tx],
                             env=cli_env(settings), capture_output=True, text=True, timeout=60)
    assert retried.returncode == 0, retried.stderr
    drain_until_settled(settings, batch_size=10)
    assert_applied_exactly_once(main_engine, observations)
    assert_queues_empty(redis_client, settings.site)
    check = TransactionBuffer(settings=settings)
    try:
        assert check.status(slow.start_tx) == check.status(slow.finish_tx) == "replicated"
    finally:
        check.close()


def test_a_lock_timeout_on_main_says_so_and_applies_everything_once_the_lock_goes(settings, redis_client,
                                                                                  main_engine, caplog):
    """Main's lock_timeout (SQLSTATE 55P03, 0.2 s for the drain's role) while another session
    holds the obs unit's row lock for 1 s: said as a lock timeout (it was "main unreachable"),
    the batch retried in smaller pieces, nothing charged a retry or dead-lettered; once the
    lock goes, each transaction is applied once."""
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 10, finish_every=2)  # 15 transactions
    buf.close()
    with caplog.at_level(logging.WARNING, logger="obs_pipeline.drain"):
        summary, reports, transient = _drain_while_the_obs_unit_is_locked(
            main_engine, with_statement_timeout(settings, 200, "lock_timeout"), 1.0,
            DrainConfig(batch_size=10, backoff_initial_s=0.1, backoff_max_s=0.2), budget_s=20)
    assert summary.stopped_because == "buffer empty", summary
    assert transient and all("LockNotAvailable" in e and "lock timeout" in e for e in transient), transient
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned and all(m.startswith("lock timeout on main (LockNotAvailable") for m in warned), warned
    assert sum(r.applied for r in reports) == 15 and not any(r.retried or r.dead_lettered for r in reports), reports
    assert_applied_exactly_once(main_engine, observations)
    assert_queues_empty(redis_client, settings.site)


def test_an_administrators_cancel_of_the_drains_statement_on_main_is_retried_in_pieces_like_a_timeout(
        settings, redis_client, main_engine, caplog):
    """An administrator cancels the drain's batch statement on main (pg_cancel_backend of its
    session, found in pg_stat_activity by its application_name, while a trigger makes each file
    insert sleep: SQLSTATE 57014, "canceling statement due to user request"), once. Handled as
    main's statement timeout is: said as a cancelled statement, the batch claimed again and
    applied in pieces (halves), nothing charged a retry or dead-lettered; every transaction
    applied on main exactly once, the buffer empty, and batches whole again after it."""
    from obs_pipeline.drain import DRAIN_APPLICATION_NAME

    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 20, finish_every=2)  # 30 transactions, 40 files: one batch
    buf.close()
    ids = [o.start_tx for o in observations] + [o.finish_tx for o in observations if o.finish_tx]
    keys = SiteKeys(settings.site)
    reports, timeouts, transient = [], [], []
    with slow_file_inserts(main_engine, 0.05), caplog.at_level(logging.WARNING, logger="obs_pipeline.drain"), \
            cancelled_once_while_sleeping(main_engine, DRAIN_APPLICATION_NAME) as cancelled:
        drain = Drain(settings, DrainConfig(batch_size=30, backoff_initial_s=0.1, backoff_max_s=0.2))
        try:
            summary = drain.run(until_empty=True, budget_s=120, on_batch=reports.append,
                                on_timeout=lambda line, backoff: timeouts.append(line),
                                on_transient=lambda error, backoff: transient.append(error))
        finally:
            drain.close()
    assert len(cancelled) == 1 and cancelled[0][1] is True, cancelled  # it was there, active, and cancelled
    assert summary.stopped_because == "buffer empty", summary
    assert len(timeouts) == 1 and not transient, (timeouts, transient)
    assert timeouts[0].startswith("statement cancelled on main (QueryCanceled: canceling statement due to user "
                                  "request); retrying the batch in pieces of 15 transaction(s) in "), timeouts
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [m for m in warned if "on main" in m] == timeouts, warned
    assert not any("main unreachable" in m for m in warned), warned
    # nothing had committed (the cancel came mid-batch): claimed again, applied in two halves
    assert [(r.applied, r.already_applied, r.pieces, r.retried, r.dead_lettered)
            for r in reports if r.transactions] == [(30, 0, 2, 0, [])], reports
    assert_applied_exactly_once(main_engine, observations)
    with main_engine.connect() as conn:
        recorded = conn.execute(sa.text("SELECT transaction_id, count(*) FROM obs_pipeline_applied GROUP BY 1")).all()
    assert sorted(recorded) == sorted((i, 1) for i in ids)
    assert_queues_empty(redis_client, settings.site)  # (the failed list too: nothing dead-lettered)
    assert not redis_client.exists(keys.timeouts)  # the next batch goes whole again
    check = TransactionBuffer(settings=settings)
    try:
        assert {check.status(i) for i in ids} == {"replicated"}
    finally:
        check.close()


@pytest.mark.parametrize("pieces_by", ["saved piece size", "statement timeouts"])
def test_an_id_reused_in_a_batch_applied_in_pieces_applies_the_first_and_dead_letters_the_second(
        settings, redis_client, main_engine, pieces_by):
    """A producer reuses the id "reused-1" for two transactions with other steps (creating obs
    units 951, then 952) in one batch of 12 that main applies in pieces, the two copies in
    different pieces, with a transaction renaming 951 between them. As when the batch is
    applied whole: the first pushed is applied, the second dead-lettered as reused (kind
    reused_id; the id's status stays the applied one's), every other transaction applied once,
    nothing lost or doubled.

    Pieces come from the piece size a drain saved after earlier timeouts (6: the copies in the
    first and the second half), or from main's statement_timeout (2 s) and one file insert
    that sleeps past it until the second timeout: the batch whole times out, then its second
    half of 6 (the first half, with the first copy, committed), and the batch claimed again
    skips the first half (applied_already tells the first copy, applied, from the second, not)
    and applies the rest in pieces of 3.

    One difference from the whole batch: there the second copy's reason says its id "names
    another transaction ahead of it in the same batch"; in a later piece the first has
    committed, and it says the id "was applied already at <time>" (both true)."""
    from obs_pipeline.wire import Transaction

    keys = SiteKeys(settings.site)
    pushed: dict[str, list[str]] = {}

    def push(tx_id: str, *steps: dict) -> None:
        pushed.setdefault(tx_id, []).append(push_raw(redis_client, settings.site, tx_id, *steps))

    create = create_unit
    buf = TransactionBuffer(settings=settings)
    try:
        observations = buffer_observations(buf, 2)  # 0-2
        push("reused-1", create(951, "first"))  # 3
        observations += buffer_observations(buf, 2, finish_every=0)  # 4, 5
        push("uses-951", {"operation": "update", "model_class": "ObsUnit", "conditions": {"id": 951},
                          "data": {"name": "first, renamed"}})  # 6
        push("reused-1", create(952, "second, the id reused"))  # 7
        observations += buffer_observations(buf, 4, finish_every=0)  # 8-11 (file f2_0.fits: 10's alone)
    finally:
        buf.close()
    ids = [o.start_tx for o in observations] + [o.finish_tx for o in observations if o.finish_tx]
    buffered = _queued_ids(redis_client, keys)
    assert len(buffered) == 12 and buffered[3] == buffered[7] == "reused-1" and buffered[6] == "uses-951", buffered
    first, second = (Transaction.from_json(raw) for raw in pushed["reused-1"])
    assert first.steps_digest != second.steps_digest

    reports, timeouts = [], []
    config = DrainConfig(batch_size=12, backoff_initial_s=0.05, backoff_max_s=0.1)
    with contextlib.ExitStack() as slow:
        if pieces_by == "saved piece size":
            BufferStore(redis_client, settings.site).save_timeouts(6, {})
            drain_settings = settings
        else:
            slow.enter_context(slow_file_inserts(main_engine, 30, name="f2_0.fits"))
            drain_settings = with_statement_timeout(settings, 2000)

        def timed_out(line: str, backoff: float) -> None:
            timeouts.append(line)
            if len(timeouts) == 2:
                slow.close()  # the trigger goes: what is left goes through

        drain = Drain(drain_settings, config)
        try:
            summary = drain.run(until_empty=True, budget_s=120, on_batch=reports.append, on_timeout=timed_out)
        finally:
            drain.close()
    assert summary.stopped_because == "buffer empty", summary
    reason = ("its transaction_id was applied already at 20", "with other steps: a producer reused the id. Nothing "
              "of this one was applied; `obs-pipeline failed retry` requeues it under a new transaction_id")
    done = [(r.applied, r.already_applied, r.pieces, r.retried, [d["transaction_id"] for d in r.dead_lettered])
            for r in reports if r.transactions]
    if pieces_by == "saved piece size":
        assert timeouts == []
        assert done == [(11, 0, 2, 0, ["reused-1"])], reports
        assert BufferStore(redis_client, settings.site).timeouts() == (None, {})  # whole batches again
    else:
        assert [line.split("; ")[1].rsplit(" in ", 1)[0] for line in timeouts] == [
            "retrying the batch in pieces of 6 transaction(s)", "retrying the batch in pieces of 3 transaction(s)"
        ], timeouts
        assert all(line.startswith("statement timeout on main (QueryCanceled") for line in timeouts), timeouts
        # the first half (with the first copy) committed before the second half timed out: skipped
        assert done == [(5, 6, 2, 0, ["reused-1"])], reports
        assert BufferStore(redis_client, settings.site).timeouts() == (6, {})  # pieces of 6 next
    # main: the first copy applied, once; the second not; every other transaction once
    with main_engine.connect() as conn:
        units = dict(conn.execute(sa.text("SELECT id, name FROM obs_unit WHERE id IN (951, 952)")).all())
        recorded = conn.execute(sa.text("SELECT transaction_id, steps_digest FROM obs_pipeline_applied")).all()
    assert units == {951: "first, renamed"}
    assert sorted(i for i, _ in recorded) == sorted(ids + ["reused-1", "uses-951"])
    assert dict(recorded)["reused-1"] == first.steps_digest
    assert_applied_exactly_once(main_engine, observations, others=["reused-1", "uses-951"])
    # the second copy dead-lettered as reused, as pushed
    letters = [json.loads(e) for e in redis_client.lrange(keys.failed, 0, -1)]
    assert [(f["transaction_id"], f["failure"]["kind"]) for f in letters] == [("reused-1", "reused_id")], letters
    assert [step["data"] for step in letters[0]["steps"]] == [{"id": 952, "name": "second, the id reused"}], letters
    assert letters[0]["failure"]["reason"].startswith(reason[0]), letters
    assert letters[0]["failure"]["reason"].endswith(reason[1]), letters
    check = TransactionBuffer(settings=settings)
    try:  # the id's status is the applied one's
        assert {i: check.status(i) for i in ids + ["reused-1", "uses-951"]} == dict.fromkeys(
            ids + ["reused-1", "uses-951"], "replicated")
    finally:
        check.close()
    # what uses the second's row would be dead-lettered with it; the first's row is nobody's
    assert redis_client.hgetall(keys.held_ids) == {b"obs_unit:952": b"!reused-1", b"exists obs_unit:952": b"!reused-1"}
    redis_client.delete(keys.failed)
    assert_queues_empty(redis_client, settings.site)


@pytest.mark.parametrize("first_fails", ["for now", "by timing out alone"])
def test_an_id_reused_in_a_later_piece_after_the_first_failed_is_dead_lettered_not_applied(
        settings, redis_client, main_engine, first_fails):
    """A producer reuses the id "obs-9" in one batch that main applies in pieces of 2: the first
    "obs-9" (creates obs unit 921, renames unit 930 or 3) fails in the first piece, for now (no
    unit 930 yet) or for good (it times out alone: another session holds unit 3's row lock past
    the drain's lock_timeout, `timeout_attempts` 2); the second, other steps (creates 922),
    comes in a later piece. As when the batch is applied whole: the second is dead-lettered as
    reused (nothing of it applied), with what uses its row; the first keeps its status, and what
    uses its row waits for it (or is dead-lettered with it). Each piece asked only its own
    transactions and the applied record, in which the first was not: the second was applied under
    the id, its status "applied" over the first's, and the first, retried, was dead-lettered as
    reused instead. A copy of "dup-1" pushed twice (the same steps) is applied once."""
    from obs_pipeline.apply import reused_id_reason

    keys = SiteKeys(settings.site)

    def push(tx_id: str, *steps: dict) -> None:
        push_raw(redis_client, settings.site, tx_id, *steps)

    create, rename = create_unit, rename_unit
    waits_on = 930 if first_fails == "for now" else 3
    # the second dup-1 dropped as pushed twice: pieces [dup-1, obs-9], [uses-921, obs-9], [uses-922]
    push("dup-1", create(923, "pushed twice"))
    push("obs-9", create(921, "first"), rename(waits_on, "renamed by the first"))
    push("uses-921", rename(921, "first, renamed"))
    push("dup-1", create(923, "pushed twice"))
    push("obs-9", create(922, "second, the id reused"))
    push("uses-922", rename(922, "never"))
    BufferStore(redis_client, settings.site).save_timeouts(2, {})  # as a drain left them after timeouts
    reports = []
    if first_fails == "for now":
        drain = Drain(settings, DrainConfig(batch_size=6, retry_base_s=0.5))
        try:
            drain.acquire()
            reports.append(drain.step())
        finally:
            drain.close()
    else:
        with main_engine.connect() as blocker:
            blocker.execute(sa.text("SELECT id FROM obs_unit WHERE id = 3 FOR UPDATE"))
            drain = Drain(with_statement_timeout(settings, 200, "lock_timeout"),
                          DrainConfig(batch_size=6, backoff_initial_s=0.05, backoff_max_s=0.1, timeout_attempts=2))
            try:
                summary = drain.run(until_empty=True, budget_s=60, on_batch=reports.append)
            finally:
                drain.close()
            blocker.commit()
        assert summary.stopped_because == "buffer empty", summary
    # (timing out: pieces of 2, then 1; claimed again, dup-1, committed alone, is skipped)
    assert [(r.applied, r.already_applied, r.pieces) for r in reports if r.transactions] == [
        (1, 0, 3) if first_fails == "for now" else (0, 1, 3)], reports
    letters = {(f["transaction_id"], f["failure"]["kind"]): (f["failure"]["reason"], [s["data"] for s in f["steps"]])
               for f in map(json.loads, redis_client.lrange(keys.failed, 0, -1))}
    second_and_its_user = {
        ("obs-9", "reused_id"): (reused_id_reason(None), [{"id": 922, "name": "second, the id reused"}]),
        ("uses-922", "blocked"): ("blocked by obs-9", [{"name": "never"}])}
    if first_fails == "for now":
        assert letters == second_and_its_user, letters
    else:
        assert sorted(letters) == [("obs-9", "reused_id"), ("obs-9", "timeout"), ("uses-921", "blocked"),
                                   ("uses-922", "blocked")], letters
        assert {key: letters[key] for key in second_and_its_user} == second_and_its_user, letters
        assert letters[("obs-9", "timeout")][1] == [{"id": 921, "name": "first"}, {"name": "renamed by the first"}]
        assert letters[("uses-921", "blocked")][0] == "blocked by obs-9"
    with main_engine.connect() as conn:
        recorded = dict(conn.execute(sa.text("SELECT transaction_id, count(*) FROM obs_pipeline_applied "
                                             "GROUP BY 1")).all())
    assert recorded == {"dup-1": 1}, recorded
    assert _obs_unit_names(main_engine, [3, 921, 922, 923, 930]) == {3: "unit 3", 923: "pushed twice"}
    check = TransactionBuffer(settings=settings)
    try:  # the first's own status: waiting to retry, or its dead letter's
        assert [check.status(i) for i in ("obs-9", "dup-1")] == [
            "pending" if first_fails == "for now" else "failed", "replicated"]
    finally:
        check.close()
    if first_fails == "for now":  # its cause fixed: the first, then what uses its row, applied once
        push("makes-930", create(930, "now there"))
        drain_until_settled(settings, retry_base_s=0.05)
        assert _obs_unit_names(main_engine, [921, 922, 923, 930]) == {
            921: "first, renamed", 923: "pushed twice", 930: "renamed by the first"}
        check = TransactionBuffer(settings=settings)
        try:
            assert [check.status(i) for i in ("obs-9", "uses-921")] == ["replicated", "replicated"]
        finally:
            check.close()
        assert [(f["transaction_id"], f["failure"]["kind"]) for f in map(
            json.loads, reversed(redis_client.lrange(keys.failed, 0, -1)))] == [
            ("obs-9", "reused_id"), ("uses-922", "blocked")]


def _obs_unit_names(main_engine, ids: list[int]) -> dict[int, str]:
    with main_engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT id, name FROM obs_unit WHERE id = ANY(:ids)"), {"ids": ids}).all())


@pytest.mark.parametrize("path", ["fast", "careful"])
def test_a_commit_whose_reply_never_came_back_is_skipped_when_the_batch_is_retried(settings, redis_client,
                                                                                   main_engine, monkeypatch, path):
    """The connection to main is lost right after its COMMIT (main ends the drain's session as
    its next statement): the batch committed, the drain cannot know it, and retries it, with the
    batch prefetched behind it, as a transient error. What committed is skipped, not applied
    again, on the fast path and on the careful one (a poison transaction in the batch, charged one
    attempt per real attempt: 4 in the end, as without the cut)."""
    from obs_pipeline import apply
    from obs_pipeline.apply import MainDatabase

    buf = TransactionBuffer(settings=settings)
    poison = None
    if path == "careful":
        with buf.transaction() as poison:  # no such obs unit: the batch takes the careful path
            poison.create("ExecutedObsUnit", {"obs_unit_id": 31337, "start_time": "2025-01-01T00:00:00Z",
                                              "status": "running"})
    observations = buffer_observations(buf, 20, finish_every=2)
    buf.close()
    real_run, cut = MainDatabase._run, []

    def session_ended_after_commit(self, cur, parts):
        # (the fast path's script stops at its first error: with a poison, cut the careful path's last one)
        if not cut and parts[-2:] == [b"COMMIT", apply._FLUSH_LSN] and (parts[0] == b"BEGIN") == (path == "fast"):
            cut.append(cur.connection.get_backend_pid())
            parts = [*parts[:-1], b"SELECT pg_terminate_backend(pg_backend_pid())"]
        return real_run(self, cur, parts)

    monkeypatch.setattr(MainDatabase, "_run", session_ended_after_commit)
    transient = []
    drain = Drain(settings, DrainConfig(batch_size=10, backoff_initial_s=0.1, retry_base_s=0.05))
    try:
        drain.run(until_empty=True, budget_s=60, on_transient=lambda error, backoff: transient.append(error))
    finally:
        drain.close()
    assert cut and len(transient) == 1, transient
    drain_until_settled(settings, retry_base_s=0.05)
    assert_applied_exactly_once(main_engine, observations)
    keys = SiteKeys(settings.site)
    failed = [json.loads(e) for e in redis_client.lrange(keys.failed, 0, -1)]
    if poison is not None:
        assert [(f["transaction_id"], f["failure"]["attempts"]) for f in failed] == [(poison.transaction_id, 4)]
        redis_client.delete(keys.failed)
    assert_queues_empty(redis_client, settings.site)


@pytest.mark.parametrize("point", ["claimed", "committed"])
def test_a_drain_paused_past_its_lease_mid_batch_leaves_the_batch_to_the_next_and_doubles_nothing(
        settings, redis_client, main_engine, point):
    """A drain process stopped (SIGSTOP: a VM paused, swapping) with a batch claimed, or
    committed on main and not yet acknowledged, for longer than its 1.5 s lease. Another drain
    takes the site and drains all of it; then the first one wakes up (SIGCONT) and goes on from
    where it was: it applies nothing again, acknowledges nothing, and stops."""
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 30, finish_every=2)  # 45 transactions
    buf.close()
    keys = SiteKeys(settings.site)
    first = subprocess.Popen([sys.executable, "-c", _DRAIN_KILLED_AT, point, "stop"], env=cli_env(settings),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: open(f"/proc/{first.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T",
                          timeout=60), "the first drain never got there"
        with main_engine.connect() as conn:
            committed = conn.execute(sa.text("SELECT count(*) FROM obs_pipeline_applied")).scalar_one()
        assert committed == (10 if point == "committed" else 0) and redis_client.llen(keys.processing) >= 10
        time.sleep(2)  # its lease lapses
        drain_until_settled(settings, batch_size=10)  # the second drain
    finally:
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert "lease" in err, err
    assert_applied_exactly_once(main_engine, observations)
    assert_queues_empty(redis_client, settings.site)
    ids = [o.start_tx for o in observations] + [o.finish_tx for o in observations if o.finish_tx]
    assert int(redis_client.hget(keys.stats, "applied_total")) == len(ids)  # the first one acknowledged nothing
    check = TransactionBuffer(settings=settings)
    try:
        assert {check.status(i) for i in ids} == {"replicated"}
    finally:
        check.close()
