"""Issue 4: an observation starts, records files and finishes while main is unreachable;
get and search show it, finished, with its files, at every step. Once main is back and the
drain has run, the same answers come from the replica and the read caches are empty.

Two ways main is unreachable: the drain does not run at all, or it runs against a stopped
main (transient errors, retried). The `stack` fixture is shared by the whole session: main is
always started again, and the replica streaming again, before the test ends.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid

import pytest
import redis
import sqlalchemy as sa

from obs_pipeline.buffer_store import BufferStore
from obs_pipeline.drain import Drain, DrainConfig
from obs_pipeline.model_registry import InvalidTransaction
from obs_pipeline.ingest import RedisUnreadable, TransactionBuffer
from obs_pipeline_tests.conftest import wait_for_replica
from obs_pipeline_tests.test_smart_query import cache_keys
from obs_pipeline_tests.test_walking_skeleton import drain_until_empty

pytestmark = pytest.mark.usefixtures("clean_db")

START = "2025-03-01T23:59:00Z"
END = "2025-03-02T00:09:30Z"


def observe_and_check(buf: TransactionBuffer) -> dict:
    """Start -> files -> finish, checking reads after each step; returns the final answers."""
    with buf.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 123, "start_time": START, "status": "running"})
        pkg = tx.create("RawDataPackage", {"name": "obs_123_package", "executed_obs_unit_id": obs["id"]})
    assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "running"
    assert [r["id"] for r in buf.search("ExecutedObsUnit", {"obs_unit_id": 123, "status": "running"})] == [obs["id"]]
    assert buf.search("RawDataFile", {"raw_data_package_id": pkg["id"]}) == []

    with buf.transaction(endpoint="record_files") as tx:
        files = tx.bulk_create("RawDataFile", [{"name": f"obs_123_{i:03d}.fits", "raw_data_package_id": pkg["id"]}
                                               for i in range(3)])
    assert sorted(r["name"] for r in buf.search("RawDataFile", {"raw_data_package_id": pkg["id"]})) == \
        [f["name"] for f in files]
    assert buf.get("RawDataFile", files[2]["id"])["raw_data_package_id"] == pkg["id"]

    buf.update("ExecutedObsUnit", obs["id"], {"status": "completed", "end_time": END}, endpoint="finish_observation")
    buf.delete("RawDataFile", files[1]["id"], endpoint="discard_bad_file")
    return answers(buf, obs["id"], pkg["id"])


def answers(buf: TransactionBuffer, obs_id: str, pkg_id: str) -> dict:
    got = {
        "obs": buf.get("ExecutedObsUnit", obs_id),
        "by_unit": buf.search("ExecutedObsUnit", {"obs_unit_id": 123}),
        "completed_in_window": buf.search("ExecutedObsUnit", {
            "status": "completed", "end_time": {">=": "2025-03-02T00:00:00Z", "<": "2025-03-02T01:00:00Z"}}),
        "still_running": buf.search("ExecutedObsUnit", {"status": "running"}),
        "package": buf.get("RawDataPackage", pkg_id),
        "files": buf.search("RawDataFile", {"raw_data_package_id": pkg_id}),
    }
    assert got["obs"] == {"id": obs_id, "obs_unit_id": 123, "start_time": "2025-03-01T23:59:00+00:00",
                          "end_time": "2025-03-02T00:09:30+00:00", "status": "completed"}
    assert got["by_unit"] == [got["obs"]] and got["completed_in_window"] == [got["obs"]]
    assert got["still_running"] == []
    assert [f["name"] for f in sorted(got["files"], key=lambda f: f["name"])] == \
        ["obs_123_000.fits", "obs_123_002.fits"]
    return got


def test_observation_while_the_drain_does_not_run(settings, redis_client):
    buf = TransactionBuffer(settings=settings)
    try:
        before = observe_and_check(buf)
        assert cache_keys(redis_client, settings.site)  # all of it is still only in Redis
        drain_until_empty(settings)
        assert answers(buf, before["obs"]["id"], before["package"]["id"]) == before
        assert cache_keys(redis_client, settings.site) == []
    finally:
        buf.close()


def test_observation_while_the_drain_runs_against_a_stopped_main(stack, settings, redis_client, main_engine,
                                                                  replica_engine):
    buf = TransactionBuffer(settings=settings)
    drain = Drain(settings, DrainConfig(batch_size=10, backoff_initial_s=0.2, backoff_max_s=0.5,
                                        idle_poll_s=0.05))
    errors: list[str] = []
    stop = threading.Event()
    result = {}

    def run_drain() -> None:
        # idle grace: the drain may start before the first transaction is buffered
        result["summary"] = drain.run(until_empty=True, idle_exit_s=1.0, budget_s=120, should_stop=stop.is_set,
                                      on_transient=lambda error, _: errors.append(error))

    worker = threading.Thread(target=run_drain)
    stack.stop_service("main")
    try:
        worker.start()
        before = observe_and_check(buf)
        time.sleep(2.0)  # let the drain hit the stopped main a few times
        assert errors, "the drain never noticed that main is down"
        assert answers(buf, before["obs"]["id"], before["package"]["id"]) == before  # still from the caches
    finally:
        stack.start_service("main")  # also waits until the replica streams again
        main_engine.dispose()        # pooled connections died with the old main
    try:
        worker.join(timeout=90)
        assert not worker.is_alive(), "the drain did not finish once main was back"
        assert result["summary"].stopped_because == "buffer empty", result["summary"]
        assert result["summary"].transient_errors >= 1
        wait_for_replica(main_engine, replica_engine)
        assert answers(buf, before["obs"]["id"], before["package"]["id"]) == before
        assert cache_keys(redis_client, settings.site) == []
    finally:
        stop.set()
        worker.join(timeout=30)
        drain.close()
        buf.close()


def test_status_and_wait_while_redis_is_down(stack, settings):
    """A transaction spooled because Redis is down is "pending"; wait() times out cleanly (no
    pub/sub to listen to: it polls) and works again once Redis is back and the spool flushed."""
    buf = TransactionBuffer(settings=settings)
    stack.stop_service("redis")
    try:
        with buf.transaction() as tx:
            tx.create("ObsUnit", {"id": 900, "name": "spooled"})
        renamed = buf.update("ObsUnit", 1, {"name": "renamed"})  # checked against the replica alone
        assert buf.status(tx.transaction_id) == "pending" and buf.status(renamed) == "pending"
        began = time.monotonic()
        assert not buf.wait(tx.transaction_id, until="applied", timeout=0.5)
        assert time.monotonic() - began < 3
    finally:
        stack.start_service("redis")
    try:
        assert buf.spool.flush()
        drain_until_empty(settings)
        assert buf.wait(tx.transaction_id, timeout=5) and buf.wait(renamed, timeout=5)
        assert buf.get("ObsUnit", 900) == {"id": 900, "name": "spooled"}
        assert buf.get("ObsUnit", 1) == {"id": 1, "name": "renamed"}
    finally:
        buf.close()


def test_an_observation_started_before_redis_went_away_can_still_be_finished(stack, settings, main_engine):
    """The start is buffered in Redis; Redis then goes away before the finish. The finish
    cannot be checked against Redis, and the record is not on the replica yet: it used to be
    refused ("neither buffered nor on the replica") and the finish lost. It is spooled instead
    and applied after the start."""
    import sqlalchemy as sa

    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as start:
        obs = start.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                               "status": "running"})
    stack.stop_service("redis")  # a clean stop: the start is in its AOF
    try:
        finish = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed",
                                                            "end_time": "2025-01-01T00:10:00Z"})
        assert buf.spool.pending() == 1 and buf.status(finish) == "pending"
    finally:
        stack.start_service("redis")
    try:
        assert buf.spool.flush()
        drain_until_empty(settings)
        assert buf.wait(finish, timeout=10)
        with main_engine.connect() as conn:
            assert conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :i"),
                                {"i": obs["id"]}).scalar_one() == "completed"
    finally:
        buf.close()


def test_a_spool_pushed_between_looking_in_redis_and_in_the_spool_is_still_found(settings, main_engine, monkeypatch):
    """Redis is back, and the spool's flusher (or another script of the site) pushes the spool
    just after the script asked Redis about one of its transactions and before it looked in the
    spool: it was found in neither. status() said None (an unknown id), the finish of an
    observation whose start was spooled was refused ('neither buffered nor on the replica'), and
    a create of an integer key spooled already was let through (main refuses it later)."""
    import sqlalchemy as sa

    real_buffer, down = BufferStore.buffer, threading.Event()
    monkeypatch.setattr(BufferStore, "buffer", lambda self, *args: (_ for _ in ()).throw(
        redis.ConnectionError("Redis is down (test)")) if down.is_set() else real_buffer(self, *args))
    buf = TransactionBuffer(settings=settings)

    def pushed_after(real):  # Redis answers, then the spool is pushed, as its flusher does
        def look(*args):
            found = real(*args)
            if buf.spool.pending():
                assert buf.spool.flush()
            return found
        return look

    def spooled(build):
        down.set()
        with buf.transaction() as tx:
            made = build(tx)
        down.clear()
        assert buf.spool.pending() == 1
        return tx.transaction_id, made

    monkeypatch.setattr(buf.store, "status_json", pushed_after(buf.store.status_json))
    # (ingest's checks of a key read through get_checked)
    monkeypatch.setattr(buf.query, "get_checked", pushed_after(buf.query.get_checked))
    def start(tx):
        return tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": START, "status": "running"})

    first, _ = spooled(start)
    assert buf.status(first) == "pending"
    _, obs = spooled(start)
    finish = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed", "end_time": END})
    spooled(lambda tx: tx.create("ObsUnit", {"id": 990, "name": "spooled"}))
    with pytest.raises(InvalidTransaction, match="exists already"):
        with buf.transaction() as again:
            again.create("ObsUnit", {"id": 990, "name": "twice"})
    drain_until_empty(settings)
    assert buf.wait(finish, until="applied", timeout=10)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :i"),
                            {"i": obs["id"]}).scalar_one() == "completed"
        assert conn.execute(sa.text("SELECT name FROM obs_unit WHERE id = 990")).scalar_one() == "spooled"
    buf.close()


def test_after_redis_did_not_answer_reads_fail_at_once_instead_of_waiting_for_it_again(settings, monkeypatch):
    """A Redis that accepts connections but never answers cost every get and search its socket
    timeout (5 s each), and ingest's breaker was not consulted. Now the read that times out
    fails with one line and starts that breaker (spool.REDIS_RETRY_AFTER_S): the reads after it
    fail at once without asking Redis, and ingest's calls spool without asking it either.
    Counted as requests reaching the socket."""
    from obs_pipeline import spool as spool_module
    from obs_pipeline_tests.test_reliability import silent_redis
    from obs_pipeline_tests.workload import buffer_observations

    monkeypatch.setattr(spool_module, "RETRY_INTERVAL_S", 600.0)  # its flusher stays out of the count
    monkeypatch.setattr(spool_module, "REDIS_RETRY_AFTER_S", 600.0)  # no clock in the test
    with silent_redis() as (url, requests):
        buf = TransactionBuffer(settings=dataclasses.replace(settings, redis_url=url))
        buf.redis.connection_pool.connection_kwargs["socket_timeout"] = 0.5  # a shorter hang, the same failure
        with pytest.raises(RedisUnreadable, match=r"^reading ExecutedObsUnit needs what is buffered in the site's "
                                                  r"Redis \(OBS_REDIS_URL\), which does not answer: Timeout"):
            buf.get("ExecutedObsUnit", str(uuid.uuid4()))
        time.sleep(0.2)
        reached = len(requests)
        monkeypatch.setattr(buf.spool, "_redis_failed_at", None)  # the wait over: a wait() that times out starts it too
        with pytest.raises(redis.TimeoutError):
            buf.wait(str(uuid.uuid4()), timeout=30)
        time.sleep(0.2)
        assert len(requests) > reached, "wait() never reached the socket"
        reached = len(requests)
        assert reached, "the first read never reached the socket"
        for read in (lambda: buf.get("ExecutedObsUnit", str(uuid.uuid4())),
                     lambda: buf.search("RawDataFile", {}),
                     lambda: buf.search_frame("ExecutedObsUnit", {"obs_unit_id": 1})):
            with pytest.raises(RedisUnreadable, match="which did not answer a moment ago; it is asked again within"):
                read()
        buffer_observations(buf, 1, finish_every=0)  # ingest: spooled without waiting either
        time.sleep(0.2)
        assert len(requests) == reached, "a read asked the silent Redis again"
        assert buf.spool.pending() == 1
        buf.close()


def test_search_works_while_redis_is_full(settings, redis_client):
    """A Redis at its `maxmemory` refuses SORT (it may write, with STORE), which search used to
    read a model's buffered creates: every search failed with 'OOM command not allowed' while
    Redis was full, though a search writes nothing. It reads them one GET each then."""
    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 123, "start_time": START, "status": "running"})
        pkg = tx.create("RawDataPackage", {"name": "obs_123_package", "executed_obs_unit_id": obs["id"]})
        tx.bulk_create("RawDataFile", [{"name": f"f{i}.fits", "raw_data_package_id": pkg["id"]} for i in range(2)])
    buf.update("ExecutedObsUnit", obs["id"], {"status": "completed", "end_time": END})
    limit = redis_client.config_get("maxmemory")["maxmemory"]
    redis_client.config_set("maxmemory", 1)
    try:
        assert [(r["id"], r["status"]) for r in buf.search("ExecutedObsUnit", {"obs_unit_id": 123})] == \
            [(obs["id"], "completed")]
        assert sorted(r["name"] for r in buf.search("RawDataFile", {"raw_data_package_id": pkg["id"]})) == \
            ["f0.fits", "f1.fits"]
    finally:
        redis_client.config_set("maxmemory", limit)
    buf.close()


def test_what_went_to_the_spool_is_read_back_while_redis_is_full_or_down(stack, settings, redis_client):
    """Read your writes while Redis cannot take them. A script whose transactions went to the
    spool (Redis full, then stopped) read none of them back: get said None for the observation
    it had just created, search left it out, an update or delete of a record buffered before
    did not show, and a key deleted in the spool could not be created again ('exists already').
    Now the spool goes on top of the caches. While Redis is down, get answers for a record the
    spool created or deleted; any other read says in one line that it needs Redis. Once the
    spool is pushed and drained, the same answers come from the replica."""
    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as tx:  # in Redis
        before = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": START, "status": "running"})
        tx.create("ObsUnit", {"id": 990, "name": "buffered"})
    limit = redis_client.config_get("maxmemory")["maxmemory"]
    redis_client.config_set("maxmemory", 1)  # full: ingest's script is refused, the spool takes it
    try:
        with buf.transaction() as tx:
            obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 123, "start_time": START, "status": "running"})
            pkg = tx.create("RawDataPackage", {"name": "obs_123_package", "executed_obs_unit_id": obs["id"]})
            files = tx.bulk_create("RawDataFile", [{"name": f"f{i}.fits", "raw_data_package_id": pkg["id"]}
                                                   for i in range(3)])
        buf.update("ExecutedObsUnit", obs["id"], {"status": "completed", "end_time": END})
        buf.update("ExecutedObsUnit", before["id"], {"status": "aborted"})
        buf.delete("RawDataFile", files[1]["id"])
        buf.delete("ObsUnit", 990)
        with buf.transaction() as tx:
            tx.create("ObsUnit", {"id": 990, "name": "again"})
        assert buf.spool.pending() == 6

        def check() -> None:
            done = buf.get("ExecutedObsUnit", obs["id"])
            assert done == {"id": obs["id"], "obs_unit_id": 123, "start_time": "2025-03-01T23:59:00+00:00",
                            "end_time": "2025-03-02T00:09:30+00:00", "status": "completed"}
            assert buf.search("ExecutedObsUnit", {"obs_unit_id": 123}) == [done]
            assert buf.search("ExecutedObsUnit", {"status": "running"}) == []
            assert buf.get("ExecutedObsUnit", before["id"])["status"] == "aborted"
            assert buf.search("ExecutedObsUnit", {"status": "aborted"}) == [buf.get("ExecutedObsUnit", before["id"])]
            assert sorted(f["name"] for f in buf.search("RawDataFile", {"raw_data_package_id": pkg["id"]})) == \
                ["f0.fits", "f2.fits"]
            assert buf.get("RawDataFile", files[1]["id"]) is None
            assert buf.get("ObsUnit", 990) == {"id": 990, "name": "again"}
            assert buf.search("ObsUnit", {"name": "again"}) == [{"id": 990, "name": "again"}]

        check()
        stack.stop_service("redis")
        try:
            assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "completed"  # created in the spool
            assert buf.get("RawDataFile", files[1]["id"]) is None  # deleted in the spool
            assert buf.get("ObsUnit", 990) == {"id": 990, "name": "again"}  # deleted and created again there
            for read in (lambda: buf.get("ExecutedObsUnit", before["id"]),  # only updated in the spool
                         lambda: buf.search("RawDataFile", {"raw_data_package_id": pkg["id"]})):
                with pytest.raises(RedisUnreadable, match=r"^reading \w+ needs what is buffered in the site's Redis "
                                                          r"\(OBS_REDIS_URL\), which does not answer: \S"):
                    read()
        finally:
            stack.start_service("redis")
    finally:
        redis_client.config_set("maxmemory", limit)
    try:
        assert buf.spool.flush()
        check()  # now from Redis
        drain_until_empty(settings)
        assert cache_keys(redis_client, settings.site) == []
        check()  # now from the replica
    finally:
        buf.close()


def test_a_generated_key_deleted_and_created_again_with_it_given_through_the_spool(settings, redis_client,
                                                                                 main_engine):
    """The delete and the create again of a uuid key, both spooled (Redis full): the spooled
    transaction keeps which create was overlaid, so that once pushed and drained its overlay is
    cleaned with it."""
    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 123, "start_time": START, "status": "running"})
    drain_until_empty(settings)
    expected = {"id": obs["id"], "obs_unit_id": 1, "start_time": "2025-03-02T00:09:30+00:00", "end_time": None,
                "status": "again"}

    def check() -> None:
        assert buf.get("ExecutedObsUnit", obs["id"]) == expected
        assert buf.search("ExecutedObsUnit", {"status": "again"}) == [expected]
        assert buf.search("ExecutedObsUnit", {"obs_unit_id": 123}) == []

    limit = redis_client.config_get("maxmemory")["maxmemory"]
    redis_client.config_set("maxmemory", 1)  # full: the spool takes them
    try:
        buf.delete("ExecutedObsUnit", obs["id"])
        with buf.transaction() as tx:
            tx.create("ExecutedObsUnit", {"id": obs["id"], "obs_unit_id": 1, "start_time": END, "status": "again"})
        assert buf.spool.pending() == 2
        check()  # from the spool
    finally:
        redis_client.config_set("maxmemory", limit)
    try:
        assert buf.spool.flush()
        check()  # from Redis
        drain_until_empty(settings)
        assert cache_keys(redis_client, settings.site) == []
        check()  # from the replica
        with main_engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id::text, status FROM executed_obs_unit")).all()
        assert rows == [(obs["id"], "again")]
    finally:
        buf.close()


def test_a_spool_pushed_while_a_read_looks_neither_hides_nor_rolls_back_a_write(settings, redis_client, monkeypatch):
    """The spool's flusher pushes the spool between a read's look at the spool and its look at
    Redis, and the script buffers a newer update of the same record right after: the read must
    show the newer update, not the spooled one applied again on top of it (nor miss either)."""
    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as tx:
        obs = [tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": START, "status": "running"})["id"]
               for _ in range(2)]
    read_redis, armed = buf.query._read_redis, []

    def pushed_first(*args):
        if armed:
            armed.clear()
            assert buf.spool.flush()
            buf.update("ExecutedObsUnit", args[1][0] if args[1] else obs[1], {"status": "completed"})
        return read_redis(*args)

    monkeypatch.setattr(buf.query, "_read_redis", pushed_first)
    limit = redis_client.config_get("maxmemory")["maxmemory"]
    for rid, read in ((obs[0], lambda: buf.get("ExecutedObsUnit", obs[0])),
                      (obs[1], lambda: buf.search("ExecutedObsUnit", {"id": obs[1]})[0])):
        redis_client.config_set("maxmemory", 1)
        try:
            buf.update("ExecutedObsUnit", rid, {"status": "paused"})
        finally:
            redis_client.config_set("maxmemory", limit)
        assert buf.spool.pending() == 1
        armed.append(1)
        assert read()["status"] == "completed"
        assert not armed and not buf.spool.exists()
    buf.close()


def test_a_record_created_and_deleted_in_the_spool_is_gone_for_ingest_checks(settings, redis_client, main_engine):
    """A record created and then deleted while Redis was full (both in the spool): get said None,
    but ingest's checks asked only whether the spool had created it, not whether it was still
    there. An update of it was spooled as of a known record (main refused it in the drain, hours
    later: dead-lettered), and a create of its key again, which is valid, was refused ('exists
    already'). Now the checks ask what reads see: the update is refused in one line, nothing is
    spooled for it, and the create again goes through to main."""
    buf = TransactionBuffer(settings=settings)
    keys = BufferStore(redis_client, settings.site).keys
    limit = redis_client.config_get("maxmemory")["maxmemory"]
    redis_client.config_set("maxmemory", 1)  # full: the spool takes them
    try:
        with buf.transaction() as tx:
            obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": START, "status": "running"})
            tx.create("ObsUnit", {"id": 991, "name": "first"})
        buf.delete("ExecutedObsUnit", obs["id"])
        buf.delete("ObsUnit", 991)
        assert buf.get("ExecutedObsUnit", obs["id"]) is None and buf.get("ObsUnit", 991) is None
        with pytest.raises(InvalidTransaction,
                           match=rf"^ExecutedObsUnit {obs['id']} is neither buffered nor on the replica$"):
            buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
        with buf.transaction() as tx:
            tx.create("ObsUnit", {"id": 991, "name": "again"})
        assert buf.spool.pending() == 4
        assert buf.get("ObsUnit", 991) == {"id": 991, "name": "again"}
    finally:
        redis_client.config_set("maxmemory", limit)
    try:
        assert buf.spool.flush()
        drain_until_empty(settings)
        assert redis_client.llen(keys.failed) == 0
        with main_engine.connect() as conn:
            assert conn.execute(sa.text("SELECT name FROM obs_unit WHERE id = 991")).all() == [("again",)]
            assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit WHERE id = :id"),
                                {"id": obs["id"]}).scalar_one() == 0
    finally:
        buf.close()


def test_a_transaction_pushed_from_a_spool_still_holding_others_is_not_pending_while_redis_is_down(
        stack, settings, redis_client, monkeypatch):
    """Two transactions spooled while Redis was full; the flusher pushed the first and stopped
    at the second (Redis refused it), so the spool file keeps both lines and its offset says the
    first is pushed. The first drains and replicates; then Redis goes down. `status` of the first
    said "pending" (the spool's lookup ignored the offset): a replicated transaction reported as
    not yet sent. It is no longer the spool's to answer for: status says Redis cannot be read,
    and only the second is "pending". Once Redis is back, the second is pushed and both drain."""
    buf = TransactionBuffer(settings=settings)
    limit = redis_client.config_get("maxmemory")["maxmemory"]
    redis_client.config_set("maxmemory", 1)  # full: the spool takes them
    try:
        with buf.transaction() as first:
            first.create("ObsUnit", {"id": 981, "name": "pushed"})
        with buf.transaction() as second:
            second.create("ObsUnit", {"id": 982, "name": "still spooled"})
        buffer = BufferStore.buffer

        def refuse_the_second(store, tx_id, tx_json, caches):
            if tx_id == second.transaction_id:
                raise redis.ConnectionError("refused for the test")
            return buffer(store, tx_id, tx_json, caches)

        monkeypatch.setattr(BufferStore, "buffer", refuse_the_second)
    finally:
        redis_client.config_set("maxmemory", limit)
    assert not buf.spool.flush() and buf.spool.pending() == 1
    drain_until_empty(settings)
    assert buf.status(first.transaction_id) == "replicated"
    stack.stop_service("redis")
    try:
        with pytest.raises(redis.ConnectionError):
            buf.status(first.transaction_id)
        assert buf.status(second.transaction_id) == "pending"
    finally:
        stack.start_service("redis")
    monkeypatch.undo()
    try:
        assert buf.spool.flush()
        drain_until_empty(settings)
        assert buf.status(first.transaction_id) == buf.status(second.transaction_id) == "replicated"
        assert buf.get("ObsUnit", 982) == {"id": 982, "name": "still spooled"}
    finally:
        buf.close()


def test_while_the_replica_is_down_updates_are_buffered_and_reads_say_why_in_one_line(stack, settings):
    """The site's replica stopped (a restart, a full disk). An update of a record that is on the
    replica only (the finish of an observation whose start has replicated) checks that the
    record exists, through a read: the update failed with the replica's connection error and
    was not buffered. It is buffered now, unchecked, as while Redis does not answer; and a read
    that needs the replica raises ReplicaUnreadable, one line, instead of SQLAlchemy's several."""
    from obs_pipeline.ingest import ReplicaUnreadable

    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": START, "status": "running"})
    stack.stop_service("replica")
    try:
        renamed = buf.update("ObsUnit", 1, {"name": "renamed"})  # on the replica only
        assert buf.status(renamed) == "pending"
        assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "running"  # buffered: no replica needed
        for read in (lambda: buf.get("ObsUnit", 2), lambda: buf.search("ObsUnit", {"name": "unit 2"})):
            with pytest.raises(ReplicaUnreadable) as error:
                read()
            assert str(error.value).startswith("reading ObsUnit needs the site's replica (OBS_REPLICA_DB_URL), "
                                               "which cannot be read: ") and "\n" not in str(error.value)
    finally:
        stack.start_service("replica")
    try:
        drain_until_empty(settings)
        assert buf.wait(renamed, timeout=10)
        assert buf.get("ObsUnit", 1) == {"id": 1, "name": "renamed"}
    finally:
        buf.close()


def test_a_replica_restarted_behind_what_the_drain_cleaned_is_waited_for_and_not_read_short(
        stack, settings, main_engine, replica_engine, monkeypatch):
    """The drain cleans a commit's caches once the replica has replayed it, and reads then take
    the record from the replica. A replica that restarts (here it crashes, and its replay of
    commits is held back an hour: a long WAL to replay again) opens for queries at its last
    restartpoint's consistent state, behind what was cleaned: a record created, replicated and
    cleaned read None, its search nothing, and an update of it was refused as unknown. Reads
    wait for the replica to catch up (query.REPLICA_CATCH_UP_S), then say so in one line; once
    it has, they read the record."""
    from obs_pipeline import query
    from obs_pipeline.ingest import ReplicaUnreadable

    monkeypatch.setattr(query, "REPLICA_CATCH_UP_S", 0.5, raising=False)
    with main_engine.begin() as conn:
        conn.execute(sa.text("CHECKPOINT"))
    wait_for_replica(main_engine, replica_engine)
    with replica_engine.connect() as conn:
        conn.execute(sa.text("CHECKPOINT"))  # the replica's restartpoint, before the writes below
    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 123, "start_time": START, "status": "running"})
    finish = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed", "end_time": END})
    drain_until_empty(settings)
    assert buf.status(finish) == "replicated"
    expected = {"id": obs["id"], "obs_unit_id": 123, "start_time": "2025-03-01T23:59:00+00:00",
                "end_time": "2025-03-02T00:09:30+00:00", "status": "completed"}
    assert buf.get("ExecutedObsUnit", obs["id"]) == expected
    settings_file = stack.directory / "postgres" / "replica" / "postgresql.auto.conf"
    kept = settings_file.read_text()
    stack.stop_service("replica", mode="immediate")
    try:
        settings_file.write_text(kept + "recovery_min_apply_delay = '1h'\n")
        _, replica, _ = stack._services(stack._require(), stack._pg_user(create=False))
        replica.start()  # (start_service waits for it to catch up with main)
        reads = {"get": lambda: buf.get("ExecutedObsUnit", obs["id"]),
                 "search": lambda: buf.search("ExecutedObsUnit", {"obs_unit_id": 123})}
        for name, read in reads.items():
            with pytest.raises(ReplicaUnreadable) as error:
                print(f"{name} read {read()!r}")
            line = str(error.value)
            assert line.startswith("reading ExecutedObsUnit needs the site's replica (OBS_REPLICA_DB_URL) to have "
                                   "replayed main's WAL up to ") and "\n" not in line, line
        # an update's check that the record exists is a read too: it was refused as "neither
        # buffered nor on the replica"; buffered unchecked now, as while the replica is down
        archived = buf.update("ExecutedObsUnit", obs["id"], {"status": "archived"})
        assert buf.status(archived) == "pending"
    finally:
        stack.stop_service("replica", mode="fast")
        settings_file.write_text(kept)
        stack.start_service("replica")
    try:
        expected["status"] = "archived"
        assert buf.get("ExecutedObsUnit", obs["id"]) == expected
        assert buf.search("ExecutedObsUnit", {"obs_unit_id": 123}) == [expected]
        drain_until_empty(settings)
        assert buf.status(archived) == "replicated"
        assert buf.get("ExecutedObsUnit", obs["id"]) == expected
    finally:
        buf.close()


@pytest.mark.parametrize("listed_before", [False, True])
def test_a_spooled_copy_of_a_discarded_transaction_is_not_read(settings, redis_client, main_engine, monkeypatch,
                                                                tmp_path, listed_before):
    """A script's push reaches Redis and its reply is lost: the transaction is spooled too, and the
    script's host reaches no Redis for a while. The one in Redis fails on main, is dead-lettered,
    and the operator discards it. The host is back: a script starts there and reads before its
    spool's flusher pushes (it waits spool.RETRY_INTERVAL_S first, and the push drops the copy).
    The discard had deleted the status key, so reads took the spooled copy for a transaction not
    pushed yet and put it on top of the caches: get and search showed the package it creates and
    the update it makes, which will never be applied, and an update of that package was let
    through (main has no such row). `listed_before`: a line pushed just before it is still listed
    (its offset could not be written: a full disk), and the read asks Redis about the copy in a
    call of its own (query.SPOOLED_KEYS_CHUNK)."""
    from obs_pipeline import query
    from obs_pipeline import spool as spool_module
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.keys import SiteKeys
    from obs_pipeline.model_registry import ModelRegistry
    from obs_pipeline_tests.test_expiries import _script_host_whose_reply_is_lost
    from obs_pipeline_tests.test_large_counts import push, written_while_redis_was_down
    from obs_pipeline_tests.test_reliability import _obs_unit_and_status, replicated_observation
    from obs_pipeline_tests.workload import drain_until_settled

    monkeypatch.setattr(spool_module, "RETRY_INTERVAL_S", 600.0)  # the flushers wait: the reads come first
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    kept, before = [], ""
    if listed_before:  # pushed just before, its offset not written
        monkeypatch.setattr(query, "SPOOLED_KEYS_CHUNK", 1)

        def earlier(down) -> None:
            with down.transaction() as t:
                t.create("RawDataPackage", {"name": "kept", "executed_obs_unit_id": obs["id"]})

        [before] = written_while_redis_was_down(settings, tmp_path, earlier)
        kept = [json.loads(before)["created"][0][1]]
        push(buf.store, before)
    real_buffer = BufferStore.buffer
    _script_host_whose_reply_is_lost(monkeypatch, buf)
    with buf.transaction() as tx:
        pkg = tx.create("RawDataPackage", {"name": "discarded", "executed_obs_unit_id": obs["id"]})
        tx.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": 31337, "status": "discarded"})  # no such unit
    assert buf.spool.pending() == 1 and redis_client.llen(keys.buffer) == 1 + len(kept)  # in Redis all the same
    buf.spool.path.write_text(before + buf.spool.path.read_text())
    drain_until_settled(settings, retry_base_s=0.05)  # its retries spent: dead-lettered
    assert [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.failed, 0, -1)] == [tx.transaction_id]
    DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models)).discard(
        [tx.transaction_id])
    buf.close()
    monkeypatch.setattr(BufferStore, "buffer", real_buffer)  # the host is back
    back = TransactionBuffer(settings=settings)
    assert back.spool.pending() == 1 + len(kept)

    def check() -> None:
        assert [r["id"] for r in back.search("RawDataPackage", {"executed_obs_unit_id": obs["id"]})] == kept
        assert back.get("RawDataPackage", pkg["id"]) is None
        assert back.get("ExecutedObsUnit", obs["id"])["status"] == "running"
        assert [r["status"] for r in back.search("ExecutedObsUnit", {"obs_unit_id": 1})] == ["running"]
        with pytest.raises(InvalidTransaction, match="is neither buffered nor on the replica"):
            back.update("RawDataPackage", pkg["id"], {"name": "renamed"})
        assert back.status(tx.transaction_id) is None  # as after any discard (it said "pending")
        assert not back.wait(tx.transaction_id, until="pending", timeout=0.1)

    try:
        check()  # the spooled copy not pushed yet
        assert back.spool.flush() and back.spool.pending() == 0  # the push drops it
        check()
        drain_until_settled(settings)
        assert _obs_unit_and_status(main_engine, obs["id"]) == (1, "running")
        assert redis_client.llen(keys.failed) == 0
    finally:
        back.close()
