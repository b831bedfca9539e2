"""The drain's batch pipeline on the real stack: the next batch is claimed while main applies
the current one, inserts travel as one array per column, and Redis work goes in few commands.
Each test checks that nothing is lost or doubled when that machinery is cut short."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from obs_pipeline.apply import TransientError
from obs_pipeline.drain import Drain, DrainConfig
from obs_pipeline.ingest import InvalidTransaction, TransactionBuffer
from obs_pipeline.keys import SiteKeys
from obs_pipeline_tests.test_cli import cli
from obs_pipeline_tests.test_reliability import replicated_observation
from obs_pipeline_tests.workload import (assert_applied_exactly_once, buffer_observations,
                                         drain_one_batch, drain_until_settled, push_raw, rename_unit,
                                         create_unit, replay_paused)

pytestmark = pytest.mark.usefixtures("clean_db")


def statuses(redis_client, site: str, ids: list[str]) -> list[str]:
    keys = SiteKeys(site)
    return [json.loads(raw)["status"] for raw in redis_client.mget([keys.transaction(i) for i in ids])]


def test_the_next_batch_is_claimed_while_main_applies_and_survives_a_drain_that_dies(settings, redis_client,
                                                                                   main_engine):
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 30, finish_every=0)
    buf.close()
    keys = SiteKeys(settings.site)

    first = Drain(settings, DrainConfig(batch_size=10))
    first.acquire()
    report = first.step()
    assert report.applied == 10
    # the second batch was claimed during the first one's apply: it waits in the processing
    # list, its statuses untouched until its own turn
    claimed = [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.processing, 0, -1)]
    assert sorted(claimed) == sorted(o.start_tx for o in observations[10:20])
    assert set(statuses(redis_client, settings.site, claimed)) == {"pending"}
    assert set(statuses(redis_client, settings.site, [o.start_tx for o in observations[:10]])) <= {"applied",
                                                                                                 "replicated"}
    first.close()  # the drain goes away with a batch claimed and not applied

    second = Drain(settings, DrainConfig(batch_size=10))
    second.acquire()
    reclaimed = second.step()
    assert reclaimed.reclaimed and reclaimed.applied == 10
    second.close()
    drain_until_settled(settings, batch_size=10)
    assert_applied_exactly_once(main_engine, observations)
    assert redis_client.llen(keys.processing) == 0 and redis_client.llen(keys.buffer) == 0


def test_a_failed_apply_gives_back_the_prefetched_batch_with_its_own(settings, redis_client, main_engine):
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 40, finish_every=2)  # 60 transactions
    buf.close()
    drain = Drain(settings, DrainConfig(batch_size=10))
    real_apply, calls = drain.main.apply_batch, []

    def link_drops_on_batches_2_to_4(txs):
        calls.append(len(txs))
        if 2 <= len(calls) <= 4:
            raise TransientError("server closed the connection unexpectedly")
        return real_apply(txs)

    drain.main.apply_batch = link_drops_on_batches_2_to_4
    drain.acquire()
    assert drain.step().applied == 10
    for _ in range(3):
        with pytest.raises(TransientError):
            drain.step()
        # the failed batch and the one prefetched behind it are both still claimed, and no more:
        # a retried batch claims nothing behind it, so failures do not grow it
        assert redis_client.llen(SiteKeys(settings.site).processing) == 20
    assert calls == [10, 10, 20, 20]
    report = drain.step()
    assert report.reclaimed and report.transactions == 20 and report.applied == 20
    drain.close()
    drain_until_settled(settings, batch_size=10)
    assert_applied_exactly_once(main_engine, observations)


def test_a_bulk_create_of_thousands_of_rows_is_buffered_applied_and_cleaned(settings, redis_client, main_engine,
                                                                           replica_engine):
    """Lua's unpack() takes a few thousand values at most: the scripts go in parts."""
    buf = TransactionBuffer(settings=settings)
    with buf.transaction(endpoint="big_package") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "running"})
        pkg = tx.create("RawDataPackage", {"name": "big", "executed_obs_unit_id": obs["id"]})
        files = tx.bulk_create("RawDataFile", [{"name": f"f{i:05d}.fits", "raw_data_package_id": pkg["id"]}
                                               for i in range(3000)])
    keys = SiteKeys(settings.site)
    assert redis_client.scard(keys.model_index("RawDataFile")) == 3000
    assert buf.get("RawDataFile", files[2999]["id"])["name"] == "f02999.fits"
    drain_until_settled(settings)
    assert buf.wait(tx.transaction_id, until="replicated", timeout=30)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM raw_data_file")).scalar_one() == 3000
    assert redis_client.scard(keys.model_index("RawDataFile")) == 0
    assert not redis_client.exists(keys.buffered("RawDataFile", files[0]["id"]),
                                   keys.cached_id("RawDataFile", files[2999]["id"]))
    assert buf.get("RawDataFile", files[2999]["id"])["name"] == "f02999.fits"  # now from the replica
    buf.close()


ODD_TEXT = ['say "hi"', "back\\slash", "{braces}", "a,b", "NULL", "null", "", " lead and trail ", "it's",
            "line\nbreak", "tab\there", "ünïcödé ✓", "\\\"", "}", "{", "(1,2)"]


def test_text_values_arrive_exactly_through_the_array_encoding(settings, main_engine):
    """Inserts travel as one PostgreSQL array literal per column: quoting, NULL and the array
    syntax's own characters must come out as they went in."""
    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00+02:00",
                                            "status": "NULL"})
        pkg = tx.create("RawDataPackage", {"name": 'pkg "quoted"', "executed_obs_unit_id": obs["id"]})
        tx.bulk_create("RawDataFile", [{"name": name, "raw_data_package_id": pkg["id"]} for name in ODD_TEXT])
    buf.close()
    drain_until_settled(settings)
    with main_engine.connect() as conn:
        names = sorted(conn.execute(sa.text("SELECT name FROM raw_data_file")).scalars())
        status, end_time, start = conn.execute(sa.text(
            "SELECT status, end_time, extract(epoch FROM start_time) FROM executed_obs_unit")).one()
        package = conn.execute(sa.text("SELECT name FROM raw_data_package")).scalar_one()
    assert names == sorted(ODD_TEXT)
    assert status == "NULL" and end_time is None  # the text "NULL" is text; a missing value is NULL
    assert float(start) == 1735682400.0  # 2025-01-01T00:00:00+02:00
    assert package == 'pkg "quoted"'


def test_threads_share_one_buffer_and_every_transaction_lands_once(settings, redis_client, main_engine):
    """Ingest takes no lock while nothing is spooled: threads of one script buffer concurrently."""
    from concurrent.futures import ThreadPoolExecutor

    buf = TransactionBuffer(settings=settings)
    with ThreadPoolExecutor(max_workers=4) as pool:
        per_thread = list(pool.map(lambda unit: buffer_observations(buf, 25, finish_every=3), range(4)))
    buf.close()
    observations = [o for chunk in per_thread for o in chunk]
    assert redis_client.llen(SiteKeys(settings.site).buffer) == 100 + sum(1 for o in observations if o.finish_tx)
    drain_until_settled(settings, batch_size=30)
    assert_applied_exactly_once(main_engine, observations)


def test_array_literals_round_trip_any_text_through_postgresql(main_engine):
    """Property: whatever text (no NUL, no lone surrogate: validation refuses both) goes into an array literal comes
    back out of PostgreSQL's array parser unchanged, NULL as NULL."""
    from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

    from obs_pipeline.batch_sql import _array_literal

    texts = st.lists(st.one_of(st.none(), st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)))),
                     min_size=1, max_size=20)
    with main_engine.connect() as conn:
        @hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(values=texts)
        def round_trip(values):
            back = conn.execute(sa.text("SELECT unnest(CAST(:a AS TEXT[]))"), {"a": _array_literal(values)}).scalars()
            assert list(back) == values

        round_trip()


def test_a_lone_surrogate_is_refused_at_ingest_and_dead_lettered_from_a_raw_producer(settings, redis_client,
                                                                                    main_engine):
    """JSON can spell "\\ud800", UTF-8 cannot: such text would stop every batch it is in."""
    buf = TransactionBuffer(settings=settings)
    with pytest.raises(InvalidTransaction, match="lone surrogate"):
        with buf.transaction() as tx:
            tx.create("ObsUnit", {"id": 7, "name": "bad \ud800 name"})
    keys = SiteKeys(settings.site)
    assert redis_client.llen(keys.buffer) == 0
    raw = json.dumps({"transaction_id": "raw-surrogate", "steps": [
        {"step_id": "s1", "operation": "create", "model_class": "ObsUnit", "data": {"id": 7, "name": "bad \ud800"}}]})
    redis_client.lpush(keys.buffer, raw)
    observations = buffer_observations(buf, 3, finish_every=0)
    buf.close()
    drain_until_settled(settings)
    failed = [json.loads(e) for e in redis_client.lrange(keys.failed, 0, -1)]
    assert [f["transaction_id"] for f in failed] == ["raw-surrogate"]
    assert "lone surrogate" in failed[0]["failure"]["reason"]
    assert_applied_exactly_once(main_engine, observations)


def test_a_prefetched_transaction_that_depends_on_a_failed_one_is_held_back(settings, redis_client):
    """The next batch is parsed before the current one's outcome is known: whether one of its
    transactions must wait behind a transaction that just failed is decided at its own turn."""
    buf = TransactionBuffer(settings=settings)
    with buf.transaction(endpoint="poison") as poison:
        obs = poison.create("ExecutedObsUnit", {"obs_unit_id": 31337, "start_time": "2025-01-01T00:00:00Z",
                                                "status": "running"})  # no such obs unit: FK violation
    buffer_observations(buf, 9, finish_every=0)      # batch 1: the poison and 9 good ones
    dependent = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
    buffer_observations(buf, 9, finish_every=0)      # batch 2: the dependent and 9 good ones
    drain = Drain(settings, DrainConfig(batch_size=10))
    drain.acquire()
    try:
        first = drain.step()
        assert first.retried == 1 and first.applied == 9
        assert buf.status(dependent) == "pending"  # prefetched during the first batch's apply
        second = drain.step()
        assert second.held == 1 and second.applied == 9
        assert buf.status(dependent) == "pending"
        assert buf.status(poison.transaction_id) == "pending"
        assert redis_client.zcard(SiteKeys(settings.site).retry) == 2
    finally:
        drain.close()
        buf.close()


def test_a_rows_waiting_transactions_keep_their_order_in_redis(settings, redis_client):
    """held_ids keeps a row's head, waiting:{row} those behind it (redis_scripts.ROW_QUEUES): a
    claim takes the head where the row has none, else a place in the queue, its own if it has
    one (dead or live); the head's successor takes its place when it leaves; one queued leaves
    from the middle; a requeued dead letter is revived, or renamed, in its place."""
    from obs_pipeline.buffer_store import BufferStore, Outcome

    keys = SiteKeys(settings.site)
    store = BufferStore(redis_client, settings.site)
    token = store.acquire_lease(30)

    def state() -> tuple[str | None, list[str]]:
        head = redis_client.hget(keys.held_ids, "r")
        return (head.decode() if head else None), [m.decode() for m in redis_client.zrange(keys.waiting("r"), 0, -1)]

    outcome = Outcome(places={"H": 0, "A": 1, "B": 2, "C": 3})
    for tx_id in ("C", "A", "H", "B"):  # decided on out of order (C parked before A failed): sent in batch order
        outcome.claim({"r"}, tx_id)
    store.acknowledge(token, outcome)
    assert state() == ("H", ["A", "B", "C"])
    store.hold({"B": {"r"}, "!A": {"r"}}, redis_client)  # dead-lettered where it waits; B again: no second place
    assert state() == ("H", ["!A", "B", "C"])
    store.unhold({"B": {"r"}})  # left from the middle (a dropped copy)
    store.unhold({"H": {"r"}})
    assert state() == ("!A", ["C"])
    store.revive({"A": {"r"}}, redis_client)
    assert state() == ("A", ["C"])
    store.hold({"!A": {"r"}, "!C": {"r"}}, redis_client)
    store.rename([("N", "C", {"r"})], redis_client)  # C requeued under a new id (a producer reused its id)
    store.unhold({"A": {"r"}}, dead_only=True)  # a discarded dead letter
    assert state() == ("N", [])
    store.unhold({"N": {"r"}})
    assert state() == (None, []) and not redis_client.exists(keys.waiting("r"))
    store.release_lease(token)


def test_a_letter_requeued_while_another_of_its_id_stays_listed_goes_right_ahead_of_that_ones_dead_mark(
        settings, redis_client):
    """`failed retry` of one of two letters under one id (a producer reused it) where both write a
    row: the requeued one's mark goes live right ahead of the id's dead mark, which stays the
    listed letter's, as the row's head or in its place in the row's queue; once the requeued one
    leaves (applied) the dead mark is next, still ahead of what came after it."""
    from obs_pipeline.buffer_store import BufferStore

    keys = SiteKeys(settings.site)
    store = BufferStore(redis_client, settings.site)

    def state(row: str) -> tuple[str | None, list[str]]:
        head = redis_client.hget(keys.held_ids, row)
        return (head.decode() if head else None), [m.decode() for m in redis_client.zrange(keys.waiting(row), 0, -1)]

    for mark in ("!X", "W"):  # the id's dead mark the head, a newer write behind it
        store.hold({mark: {"r"}}, redis_client)
    for mark in ("H", "A", "!X", "B"):  # the id's dead mark in the row's queue
        store.hold({mark: {"s"}}, redis_client)
    store.revive_ahead({"X": {"r", "s"}}, redis_client)
    assert state("r") == ("X", ["!X", "W"])
    assert state("s") == ("H", ["A", "X", "!X", "B"])
    for leaving in ("H", "A"):
        store.unhold({leaving: {"s"}})
    store.unhold({"X": {"r", "s"}})  # the requeued one applied
    assert (state("r"), state("s")) == (("!X", ["W"]), ("!X", ["B"]))
    store.unhold({"X": {"r", "s"}}, dead_only=True)  # the listed one discarded
    assert (state("r"), state("s")) == (("W", []), ("B", []))


def test_cleanup_chunks_of_a_batch_are_cleaned_in_batch_order(settings, redis_client):
    """The chunks of one batch share a score (its commit LSN); a sorted set orders them by their
    bytes. Were that order not the batch's, an update's overlay could be cleaned before the
    record's create, and a reader in between would see the create without the update."""
    from obs_pipeline.buffer_store import CLEANUP_CHUNK, BufferStore, Outcome

    store = BufferStore(redis_client, settings.site)
    token = store.acquire_lease(30)
    first_id, later_id = "ffffffff-0000-4000-8000-000000000000", "00000000-0000-4000-8000-000000000000"
    cleanup = [{"c": [["ExecutedObsUnit", first_id if i == 0 else f"{i:08d}-0000-4000-8000-000000000001"]],
                "o": [], "t": [f"tx{i}"]} for i in range(CLEANUP_CHUNK)]
    cleanup.append({"c": [["ExecutedObsUnit", later_id]], "o": [], "t": ["tx-last"]})  # sorts first by bytes
    store.acknowledge(token, Outcome(commit_lsn=1234, cleanup=cleanup, claimed=0))
    members = [json.loads(m) for m in redis_client.zrange(SiteKeys(settings.site).awaiting_replication, 0, -1)]
    assert [m["t"][0] for m in members] == ["tx0", "tx-last"]
    assert store.clean_replicated(1234)[0][:2] == ["tx0", "tx1"]
    store.release_lease(token)


def test_a_chunk_the_replica_does_not_show_is_kept_with_every_later_one(settings, redis_client):
    """clean_replicated cleans a chunk only where the replica lacks none of its ids (asked once
    per pass): a replay past a commit's position lacks it where the replica replays another
    server's WAL, and its caches are then all the site has of it. What follows it waits too (in
    commit order, as ever); the chunks it lacks are returned, for the drain to ask main about. A
    replica that does not answer (None) cleans nothing."""
    from obs_pipeline.buffer_store import BufferStore, Outcome

    store = BufferStore(redis_client, settings.site)
    keys = SiteKeys(settings.site)
    token = store.acquire_lease(30)
    for lsn, tx_id in ((100, "tx-a"), (200, "tx-b"), (300, "tx-c")):
        store.acknowledge(token, Outcome(commit_lsn=lsn, cleanup=[{"c": [], "o": [], "t": [tx_id]}], claimed=0))
    asked = []

    def replica_lacking(*missing):
        return lambda ids: asked.append(ids) or set(missing) & set(ids)

    assert store.clean_replicated(300, lambda ids: None) == ([], [])
    cleaned, unseen = store.clean_replicated(300, replica_lacking("tx-b"))
    assert asked == [["tx-a", "tx-b", "tx-c"]]
    assert cleaned == ["tx-a"] and [(record["t"], record["lsn"]) for record, _ in unseen] == [(["tx-b"], 200)]
    assert [json.loads(m)["t"] for m in redis_client.zrange(keys.awaiting_replication, 0, -1)] == [["tx-b"], ["tx-c"]]
    assert statuses(redis_client, settings.site, ["tx-a"]) == ["replicated"]
    assert redis_client.exists(keys.transaction("tx-b"), keys.transaction("tx-c")) == 0  # not cleaned
    assert store.clean_replicated(300, replica_lacking()) == (["tx-b", "tx-c"], [])
    assert redis_client.zcard(keys.awaiting_replication) == 0
    store.release_lease(token)


def test_a_waiting_copy_is_found_by_its_exact_id_whatever_its_characters(settings, redis_client):
    """The drain asks whether a copy of a transaction it dead-letters waits in `retry` with a
    scan matching the id at the start of our JSON. A producer's id may hold a glob pattern's
    characters (`*`, `?`, `[`, a backslash), a quote, non-ASCII text: only that id matches, in
    whatever status the entry was written."""
    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.wire import Transaction

    store = BufferStore(redis_client, settings.site)
    step = {"step_id": "s1", "operation": "create", "model_class": "ObsUnit", "data": {"id": 1}}
    waiting = ["obs-1", "obs-[1]", 'a\\b"c', "obs-ñ-1"]
    for n, tx_id in enumerate(waiting):
        tx = Transaction.from_dict({"transaction_id": tx_id, "steps": [step]})
        tx.status = ("pending", "processing")[n % 2]
        redis_client.zadd(SiteKeys(settings.site).retry, {tx.to_json(): n})
    assert all(store.waits_to_retry(tx_id) for tx_id in waiting)
    others = ("obs-*", "obs-?", "obs-[1-9]", "obs-", "obs-1 ", "a\\b", 'b"c', "obs-ñ", "s1",
              "pending")
    assert [tx_id for tx_id in others if store.waits_to_retry(tx_id)] == []


def test_a_status_never_turns_back_from_replicated(settings, redis_client):
    """A transaction pushed twice is cleaned ("replicated") after its first copy; its second copy
    passing through a later batch must not make it "processing" or "applied" again, nor an
    applied one "processing" or "pending"."""
    from obs_pipeline.buffer_store import BufferStore, Outcome

    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 2, finish_every=0)
    buf.close()
    replicated, pending = observations[0].start_tx, observations[1].start_tx
    keys = SiteKeys(settings.site)
    store = BufferStore(redis_client, settings.site)
    token = store.acquire_lease(30)  # the first copy committed and cleaned: its short "replicated" record
    store.acknowledge(token, Outcome(commit_lsn=1234, cleanup=[{"c": [], "o": [], "t": [replicated]}], claimed=0))
    assert store.clean_replicated(1234) == ([replicated], [])
    store.release_lease(token)
    assert store.set_status([replicated, pending, "never-buffered"], "processing") == ["never-buffered"]
    assert statuses(redis_client, settings.site, [replicated, pending]) == ["replicated", "processing"]
    store.set_status([replicated, pending], "applied")
    assert statuses(redis_client, settings.site, [replicated, pending]) == ["replicated", "applied"]
    # a drain that main refused puts its batch's "processing" back to "pending": never "applied"
    store.set_status([replicated, pending], "pending")
    assert statuses(redis_client, settings.site, [replicated, pending]) == ["replicated", "applied"]
    full = json.loads(redis_client.get(keys.transaction(pending)))
    assert full["steps"] and full["transaction_id"] == pending  # the rest of the JSON untouched


def test_the_drain_raises_the_collectors_threshold_only_while_it_runs(settings, main_engine):
    """To GC_THRESHOLD, so that parsed batches are not scanned again and again, and back to the
    process's own when it stops."""
    import gc

    from obs_pipeline.drain import GC_THRESHOLD

    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 5)
    buf.close()
    before = gc.get_threshold()
    during = []
    drain = Drain(settings, DrainConfig())
    try:
        drain.run(until_empty=True, on_batch=lambda report: during.append(gc.get_threshold()))
    finally:
        drain.close()
    assert during and all(t == (GC_THRESHOLD, *before[1:]) for t in during) and GC_THRESHOLD > before[0]
    assert gc.get_threshold() == before
    assert_applied_exactly_once(main_engine, observations)


def test_a_status_never_turns_back_from_applied_to_processing(settings, redis_client):
    """Found by review: a transaction pushed twice went from "applied" back to "processing" when
    its second copy was claimed before the replica replayed the first (a script polling
    status() saw it go backwards). Both layouts: our fixed slot, and a producer's own JSON."""
    from obs_pipeline.buffer_store import BufferStore

    buf = TransactionBuffer(settings=settings)
    ours = buffer_observations(buf, 1, finish_every=0)[0].start_tx
    buf.close()
    keys = SiteKeys(settings.site)
    foreign = "0c1e4b1e-0000-4000-8000-00000000f0e2"
    redis_client.set(keys.transaction(foreign), json.dumps({"transaction_id": foreign, "status": "pending"}))
    store = BufferStore(redis_client, settings.site)
    store.set_status([ours, foreign], "applied")
    store.mark_processing([ours, foreign], lambda tx_id: "{}")
    assert statuses(redis_client, settings.site, [ours, foreign]) == ["applied", "applied"]
    store.set_status([ours, foreign], "replicated")  # and on from there as before
    assert statuses(redis_client, settings.site, [ours, foreign]) == ["replicated", "replicated"]


def test_a_status_changes_in_place_in_its_slot_and_other_layouts_are_rewritten(settings, redis_client):
    """Our status keys start with a fixed-width status slot, changed in place (the rest of the
    JSON stays byte for byte); a key in another layout (the existing system's producer writes
    its own) is rewritten, and both read back as the status asked for."""
    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.wire import STATUS_HEADER_LEN

    buf = TransactionBuffer(settings=settings)
    ours = buffer_observations(buf, 1, finish_every=0)[0].start_tx
    buf.close()
    keys = SiteKeys(settings.site)
    foreign = "0c1e4b1e-0000-4000-8000-00000000f0e1"
    foreign_json = json.dumps({"transaction_id": foreign, "endpoint": "e", "status": "pending", "steps": [
        {"step_id": "s1", "operation": "create", "model_class": "ObsUnit", "data": {"status": "pending"}}]})
    redis_client.set(keys.transaction(foreign), foreign_json)
    before = redis_client.get(keys.transaction(ours))
    assert before.startswith(b'{"status":"pending"   ,') and len(before.split(b",")[0]) + 1 == STATUS_HEADER_LEN
    store = BufferStore(redis_client, settings.site)
    for status in ("processing", "applied"):
        assert store.set_status([ours, foreign], status) == []
        after = redis_client.get(keys.transaction(ours))
        assert after[STATUS_HEADER_LEN:] == before[STATUS_HEADER_LEN:] and len(after) == len(before)
        assert statuses(redis_client, settings.site, [ours, foreign]) == [status, status]
    doc = json.loads(redis_client.get(keys.transaction(foreign)))
    assert doc["steps"][0]["data"]["status"] == "pending" and doc["endpoint"] == "e"


def test_a_claim_larger_than_one_lua_call_keeps_the_buffer_order(settings, redis_client):
    """A batch is claimed in CLAIM_CHUNK-entry calls sent together: oldest first, nothing
    claimed twice or skipped, the rest left in the buffer in order."""
    from obs_pipeline.buffer_store import CLAIM_CHUNK, BufferStore

    keys = SiteKeys(settings.site)
    entries = [json.dumps({"transaction_id": f"tx{i:05d}"}) for i in range(2 * CLAIM_CHUNK + 37)]
    for entry in entries:
        redis_client.lpush(keys.buffer, entry)  # as producers do: the oldest ends up at the right
    store = BufferStore(redis_client, settings.site)
    token = store.acquire_lease(30)
    claim = store.claim(token, 2 * CLAIM_CHUNK + 10)
    assert claim.entries == entries[:2 * CLAIM_CHUNK + 10] and not claim.reclaimed
    assert redis_client.lrange(keys.processing, 0, -1)[::-1] == [e.encode() for e in claim.entries]
    rest = store.claim(token, 5 * CLAIM_CHUNK, after_unacknowledged=True)
    assert rest.entries == entries[2 * CLAIM_CHUNK + 10:]
    assert redis_client.llen(keys.buffer) == 0
    store.release_lease(token)


def test_a_chunk_cleaned_twice_is_counted_and_announced_once(settings, redis_client):
    """A drain that lost its lease may clean the chunk the new lease holder cleans: the caches go
    either way, but only one of them counts the transactions replicated and announces them."""
    from obs_pipeline.buffer_store import BufferStore, Outcome

    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 3, finish_every=0)
    buf.close()
    keys = SiteKeys(settings.site)
    store = BufferStore(redis_client, settings.site)
    token = store.acquire_lease(30)
    ids = [o.start_tx for o in observations]
    cleanup = [{"c": [["ExecutedObsUnit", o.obs_id], ["RawDataPackage", o.package_id]], "o": [], "t": [o.start_tx]}
               for o in observations]
    store.acknowledge(token, Outcome(commit_lsn=77, cleanup=cleanup, claimed=0))
    member = redis_client.zrange(keys.awaiting_replication, 0, -1)[0]
    record = json.loads(member)
    events = redis_client.pubsub()
    events.subscribe(keys.events)
    assert events.get_message(timeout=5)["type"] == "subscribe"
    assert store._clean_chunks([(record, member), (record, member)]) == [True, False]
    assert int(redis_client.hget(keys.stats, "replicated_total")) == 3
    assert statuses(redis_client, settings.site, ids) == ["replicated"] * 3
    assert not redis_client.exists(*[keys.buffered("ExecutedObsUnit", o.obs_id) for o in observations])
    assert not redis_client.sismember(keys.model_index("RawDataPackage"), observations[0].package_id)
    announced = [json.loads(m["data"]) for m in iter(lambda: events.get_message(timeout=1), None)]
    assert announced == [{"event": "replicated", "transaction_ids": ids}]
    events.close()
    store.release_lease(token)


def test_the_cleanup_survives_a_connection_redis_dropped_and_an_error_reply_leaves_none_unread(settings,
                                                                                             redis_client):
    """The cleanup sends its commands packed by hiredis on a pooled connection. One that Redis
    has closed (a restart, a timeout) is retried through redis-py's pipeline and its reconnect;
    an error reply raises, and the connection with replies left unread is not reused."""
    import redis

    from obs_pipeline.buffer_store import BufferStore, Outcome
    from obs_pipeline.model_registry import ModelRegistry
    from obs_pipeline.wire import Transaction, cache_footprint

    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 3, finish_every=0)
    buf.close()
    keys = SiteKeys(settings.site)
    registry = ModelRegistry.from_path(settings.models)
    txs = [Transaction.from_json(e) for e in redis_client.lrange(keys.buffer, 0, -1)]
    cached = [keys.buffered(m, rid) for tx in txs for m, rid in cache_footprint(tx, registry)["c"]]
    assert len(cached) == 3 * 4 and redis_client.exists(*cached) == len(cached)

    client = redis.Redis.from_url(settings.redis_url)
    store = BufferStore(client, settings.site)
    token = store.acquire_lease(30)
    store.acknowledge(token, Outcome(commit_lsn=1234, claimed=0,
                                     cleanup=[cache_footprint(tx, registry) for tx in txs]))
    redis_client.client_kill_filter(_id=client.client_id())  # the pooled connection, closed by Redis
    assert sorted(store.clean_replicated(1234)[0]) == sorted(o.start_tx for o in observations)
    assert redis_client.zcard(keys.awaiting_replication) == 0
    assert redis_client.exists(*cached) == 0
    assert statuses(redis_client, settings.site, [o.start_tx for o in observations]) == ["replicated"] * 3

    # dropped mid-request: Redis closes the connection after the first reply, before the rest ran
    counter = keys.prefix + "counter"
    kill_itself = ("CLIENT", "KILL", "ID", client.client_id(), "SKIPME", "no")
    replies = store._send_all([kill_itself, ("INCR", counter), ("GET", counter)])
    assert replies[1:] == [1, b"1"]  # sent again on a new connection: the INCR ran once
    with pytest.raises(redis.ResponseError):
        store._send_all([("SET", keys.prefix + "probe", "x"), ("INCR", keys.prefix + "probe"), ("PING",)])
    assert client.get(keys.prefix + "probe") == b"x" and client.ping()  # no stale reply read as this one's
    client.delete(keys.prefix + "probe", counter)
    store.release_lease(token)
    client.close()


def test_a_cleanup_whose_reply_was_lost_runs_again_and_leaves_newer_writes_of_its_records(
        settings, redis_client, main_engine, monkeypatch):
    """The cleanup's connection drops after Redis ran it, before its reply: the drain sends it
    again (redis-py's reconnect), so it runs twice. In between, newer transactions wrote the
    records it cleans: a key deleted and created again in one transaction, another deleted and
    created again by two, an update of a generated key. The second run deletes the created
    records' keys whole (the newer create's buffered record with them), but only the cleaned
    transaction's own overlays; a create of a key the caller gave is in the read buffer too, so
    reads still show every newer write, and each is cleaned with its own transaction."""
    import redis

    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.stack.osutil import wait_until
    from obs_pipeline_tests.test_smart_query import cache_keys

    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as first:
        obs = first.create("ExecutedObsUnit", {"obs_unit_id": 1, "status": "first",
                                               "start_time": "2025-01-01T00:00:00Z"})
        first.create("ObsUnit", {"id": 600, "name": "600 first"})
        first.create("ObsUnit", {"id": 601, "name": "601 first"})

    def write_newer() -> None:
        with buf.transaction() as tx:
            tx.delete("ObsUnit", 600)
            tx.create("ObsUnit", {"id": 600, "name": "600 again"})
        buf.delete("ObsUnit", 601)
        with buf.transaction() as tx:
            tx.create("ObsUnit", {"id": 601, "name": "601 again"})
        buf.update("ExecutedObsUnit", obs["id"], {"status": "newer"})

    real_send_all = BufferStore._send_all
    lost = []

    def send_all_reply_lost(self, commands):
        if lost or ("MULTI",) not in commands:
            return real_send_all(self, commands)
        pool = self.redis.connection_pool
        conn = pool.get_connection()  # the one the cleanup takes next
        send = conn.send_packed_command

        def reply_lost(*args, **kwargs):
            conn.disconnect()  # the replies with it
            lost.append(True)
            raise redis.ConnectionError("Connection closed by server. (test: before the reply)")

        def send_then_drop(command, check_health=True):
            send(command, check_health)
            ran = wait_until(lambda: not redis_client.zcard(keys.awaiting_replication), 10)
            assert ran, "Redis did not run the cleanup"
            write_newer()
            conn.read_response = reply_lost

        conn.send_packed_command = send_then_drop
        pool.release(conn)
        try:
            return real_send_all(self, commands)
        finally:
            for patched in ("send_packed_command", "read_response"):
                conn.__dict__.pop(patched, None)

    monkeypatch.setattr(BufferStore, "_send_all", send_all_reply_lost)
    expected = {600: {"id": 600, "name": "600 again"}, 601: {"id": 601, "name": "601 again"}}

    def check(stage: str) -> None:
        assert {i: buf.get("ObsUnit", i) for i in expected} == expected, stage
        assert buf.search("ObsUnit", {"id": list(expected)}) == list(expected.values()), stage
        assert buf.search("ObsUnit", {"name": ["600 first", "601 first"]}) == [], stage
        assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "newer", stage
        newer = buf.search("ExecutedObsUnit", {"status": "newer"})
        assert [r["id"] for r in newer] == [obs["id"]], stage

    try:
        drain_one_batch(settings, batch_size=10)
        assert lost, "the cleanup's reply was not lost"
        assert buf.status(first.transaction_id) == "replicated"
        # the second run took the newer create's buffered record: reads do without it
        assert not redis_client.exists(keys.buffered("ObsUnit", "600"))
        check("cleaned twice, newer writes buffered")
        drain = Drain(settings, DrainConfig(batch_size=1))
        try:
            drain.acquire()
            for step in range(4):  # one newer transaction at a time: each state in between
                drain.step()
                check(f"after drain step {step + 1}")
        finally:
            drain.close()
        drain_until_settled(settings)
        check("all replicated")
    finally:
        buf.close()
    assert cache_keys(redis_client, settings.site) == []
    assert _obs_units(main_engine, [600, 601]) == {600: "600 again", 601: "601 again"}


def test_transaction_ids_no_database_or_redis_key_can_hold_are_dead_lettered_and_the_drain_goes_on(
        settings, redis_client, main_engine):
    """A producer's id with a NUL, a lone surrogate, or a byte that is not UTF-8: psycopg2
    cannot quote the first for the applied-id record, Redis key names cannot carry the others.
    Each stopped every drain run at the same batch; now each is dead-lettered without its id."""
    keys = SiteKeys(settings.site)
    step = {"step_id": "s1", "operation": "create", "model_class": "ObsUnit", "data": {"id": 77, "name": "x"}}
    redis_client.lpush(keys.buffer, json.dumps({"transaction_id": "nul\u0000id", "steps": [step]}))
    redis_client.lpush(keys.buffer, json.dumps({"transaction_id": "lone\udc80", "steps": [step]}))
    redis_client.lpush(keys.buffer, b'{"transaction_id":"byte\xff","steps":[]}')
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 3, finish_every=0)
    buf.close()
    drain_until_settled(settings)
    failed = [json.loads(e) for e in redis_client.lrange(keys.failed, 0, -1)]
    assert len(failed) == 3
    assert all("transaction_id is missing or not a non-empty string" in f["failure"]["reason"] for f in failed)
    assert_applied_exactly_once(main_engine, observations)


def test_a_value_the_batch_sql_cannot_carry_fails_its_transaction_not_the_drain(settings, redis_client, main_engine,
                                                                              monkeypatch):
    """Whatever validation lets through, building a batch's SQL may still refuse a value (psycopg2
    raises ValueError for a NUL). That is the transaction's error: the others of its batch are
    applied, it is retried and dead-lettered with the reason, and the drain goes on."""
    from obs_pipeline import batch_sql

    real = batch_sql._array_literal

    def refuse_boom(values):
        if "boom" in values:
            raise ValueError("A string literal cannot contain NUL (0x00) characters.")
        return real(values)

    monkeypatch.setattr(batch_sql, "_array_literal", refuse_boom)
    buf = TransactionBuffer(settings=settings)
    before = buffer_observations(buf, 10, finish_every=0)
    with buf.transaction() as bad:
        bad.create("ObsUnit", {"id": 78, "name": "boom"})
    after = buffer_observations(buf, 10, finish_every=0)
    buf.close()
    drain_until_settled(settings, retry_base_s=0.05)
    failed = [json.loads(e) for e in redis_client.lrange(SiteKeys(settings.site).failed, 0, -1)]
    assert [f["transaction_id"] for f in failed] == [bad.transaction_id]
    assert failed[0]["failure"]["reason"].startswith("cannot be written as SQL: ValueError(")
    assert_applied_exactly_once(main_engine, before + after)


def test_a_create_that_main_refuses_is_not_hidden_by_a_delete_of_the_same_row_in_the_batch(
        settings, redis_client, main_engine):
    """Obs unit 1 exists on main. A producer creates it again, then deletes it, in one batch.
    Folded to nothing, both were reported applied and the row stayed; now main sees the create,
    refuses it, and both are dead-lettered (the delete uses the row the create makes)."""
    keys = SiteKeys(settings.site)

    def push(tx_id: str, step: dict) -> None:
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": tx_id, "steps": [{"step_id": "s1", **step}]}))

    push("create-again", {"operation": "create", "model_class": "ObsUnit", "data": {"id": 1, "name": "again"}})
    push("delete-it", {"operation": "delete", "model_class": "ObsUnit", "conditions": {"id": 1}})
    drain_until_settled(settings, retry_base_s=0.05)
    failed = {f["transaction_id"]: f["failure"]["reason"] for f in map(json.loads, redis_client.lrange(keys.failed, 0, -1))}
    assert set(failed) == {"create-again", "delete-it"}
    assert "UniqueViolation" in failed["create-again"] and failed["delete-it"] == "blocked by create-again"
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT name FROM obs_unit WHERE id = 1")).scalar_one() == "unit 1"


def test_a_create_of_a_key_a_failing_transaction_deletes_waits_behind_it_and_is_retried_with_it(
        settings, redis_client, main_engine):
    """Obs unit 2 exists on main. One transaction deletes it and fails (its observation names obs
    unit 31337, which main does not have); the next creates unit 2 again (ingest lets it: the key
    is deleted in the buffer). The create was not held back (a row a transaction creates was never
    one it "uses"): it went to main ahead of the delete, failed on the key, spent its own retries
    and was dead-lettered as `UniqueViolation`, not as blocked by the delete; `failed retry` of the
    delete, once fixed, did not take it along, and the unit created again was lost. Now it waits
    behind the delete, is dead-lettered as blocked by it, and goes with it."""
    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.model_registry import ModelRegistry

    keys = SiteKeys(settings.site)
    start = {"id": str(uuid.uuid4()), "obs_unit_id": 31337, "start_time": "2025-01-01T00:00:00Z", "status": "running"}
    redis_client.lpush(keys.buffer, json.dumps({"transaction_id": "delete-and-observe", "steps": [
        {"step_id": "s1", "operation": "delete", "model_class": "ObsUnit", "conditions": {"id": 2}},
        {"step_id": "s2", "operation": "create", "model_class": "ExecutedObsUnit", "data": start}]}))
    redis_client.lpush(keys.buffer, json.dumps({"transaction_id": "create-again", "steps": [
        {"step_id": "s1", "operation": "create", "model_class": "ObsUnit", "data": {"id": 2, "name": "again"}}]}))
    drain_until_settled(settings, retry_base_s=0.05)
    failed = {f["transaction_id"]: f["failure"]["reason"] for f in map(json.loads, redis_client.lrange(keys.failed, 0, -1))}
    assert set(failed) == {"delete-and-observe", "create-again"}, failed
    assert "ForeignKeyViolation" in failed["delete-and-observe"]
    assert failed["create-again"] == "blocked by delete-and-observe", failed
    with main_engine.begin() as conn:  # the operator's fix: the obs unit the observation names
        assert conn.execute(sa.text("SELECT name FROM obs_unit WHERE id = 2")).scalar_one() == "unit 2"
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late')"))
    letters = DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models))
    assert letters.retry(["delete-and-observe"]) == ["delete-and-observe", "create-again"]
    drain_until_settled(settings, retry_base_s=0.05)
    assert redis_client.llen(keys.failed) == 0
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT name FROM obs_unit WHERE id = 2")).scalar_one() == "again"
        assert conn.execute(sa.text("SELECT obs_unit_id FROM executed_obs_unit")).all() == [(31337,)]


def test_a_write_main_refuses_is_not_folded_away_by_a_later_transaction_of_the_batch(
        settings, redis_client, main_engine):
    """Folded per row, main saw only the net row: a transaction whose write it refuses was
    reported applied when a later one in the batch overwrote that value or deleted the row, and
    an update of a row deleted before it in the batch was dropped and reported applied. Every
    transaction must be applied whole, as it would be on its own, or not at all."""
    keys = SiteKeys(settings.site)

    def push(tx_id: str, operation: str, model: str, rid, data: dict | None = None) -> None:
        step = {"step_id": "s1", "operation": operation, "model_class": model, "data": data or {}}
        if operation == "create":
            step["data"] = {"id": rid, **data}
        else:
            step["conditions"] = {"id": rid}
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": tx_id, "steps": [step]}))

    start = {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z", "status": "running"}
    obs, ghost = "0b5e1c8e-7a43-4f0e-9d8e-0c1f5a7b9d21", "8f3e1c8e-7a43-4f0e-9d8e-0c1f5a7b9d21"
    push("doomed", "create", "ObsUnit", 990, {"name": "doomed"})
    drain_until_settled(settings)
    # one batch: an update main refuses (no obs unit 31337) overwritten by the next transaction;
    # an update of a row that exists nowhere, then its delete; a delete, then an update
    push("start", "create", "ExecutedObsUnit", obs, start)
    push("refused", "update", "ExecutedObsUnit", obs, {"obs_unit_id": 31337, "status": "refused"})
    push("repoint", "update", "ExecutedObsUnit", obs, {"obs_unit_id": 2})
    push("ghost-update", "update", "ExecutedObsUnit", ghost, {"status": "done"})
    push("ghost-delete", "delete", "ExecutedObsUnit", ghost)
    push("delete", "delete", "ObsUnit", 990)
    push("update-deleted", "update", "ObsUnit", 990, {"name": "gone"})
    drain_until_settled(settings, retry_base_s=0.05)
    failed = letter_reasons(redis_client, keys)
    assert set(failed) == {"refused", "repoint", "ghost-update", "ghost-delete", "update-deleted"}, failed
    assert "ForeignKeyViolation" in failed["refused"] and failed["repoint"] == "blocked by refused"
    assert failed["ghost-update"] == f"no executed_obs_unit row {ghost} to update"
    assert failed["ghost-delete"] == "blocked by ghost-update"
    assert failed["update-deleted"] == "no obs_unit row 990 to update"
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT obs_unit_id, status FROM executed_obs_unit")).all() == [(1, "running")]
        assert conn.execute(sa.text("SELECT count(*) FROM obs_unit WHERE id = 990")).scalar_one() == 0
        applied = {t for (t,) in conn.execute(sa.text("SELECT transaction_id FROM obs_pipeline_applied"))}
    assert applied == {"doomed", "start", "delete"}



def test_a_transaction_held_back_in_the_batch_holds_none_of_those_ahead_of_it(settings, redis_client, main_engine):
    """An update main refuses (no such row), then three updates of another row that cannot be
    folded together (each repoints its obs unit), then a transaction that uses the refused
    one's row and writes the other. Held back, the last claimed the other row for the refused
    one; the careful path's split then checked the three again and held them back too, behind
    a transaction they do not use: dead-lettered with it as `blocked by`. Only what comes
    after a held-back transaction waits for it."""
    keys = SiteKeys(settings.site)
    ghost = "8f3e1c8e-7a43-4f0e-9d8e-0c1f5a7b9d21"
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    buf.close()

    def update(rid: str, data: dict) -> dict:
        return {"step_id": f"s{rid[:4]}", "operation": "update", "model_class": "ExecutedObsUnit", "data": data,
                "conditions": {"id": rid}}

    for tx_id, steps in [("refused", [update(ghost, {"status": "x"})]),
                         ("first", [update(obs["id"], {"obs_unit_id": 2})]),
                         ("second", [update(obs["id"], {"obs_unit_id": 1})]),
                         ("third", [update(obs["id"], {"obs_unit_id": 2, "status": "third"})]),
                         ("held", [update(ghost, {"status": "y"}), update(obs["id"], {"status": "held"})])]:
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": tx_id, "steps": steps}))
    drain_until_settled(settings, retry_base_s=0.05)
    failed = letter_reasons(redis_client, keys)
    assert failed == {"refused": f"no executed_obs_unit row {ghost} to update", "held": "blocked by refused"}, failed
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT obs_unit_id, status FROM executed_obs_unit WHERE id = :id"),
                            {"id": obs["id"]}).one() == (2, "third")



def test_a_failure_ahead_of_a_held_back_transaction_keeps_the_row_they_both_write(settings, redis_client, main_engine):
    """In one batch: an update main refuses for now (no row g1), an update of another row, one
    of obs unit row X that also fails for now (no row g2), then one that uses g1 and updates X.
    The last, held back behind the first, was listed failed before the third (the careful
    path checked it before the third failed) and took the mark on X: once g1 came and the
    first applied, it was applied too, and the third, applied later, overwrote the newer X."""
    keys = SiteKeys(settings.site)
    g1, g2 = "8f3e1c8e-7a43-4f0e-9d8e-0c1f5a7b9d21", "9f3e1c8e-7a43-4f0e-9d8e-0c1f5a7b9d22"
    buf = TransactionBuffer(settings=settings)
    start = {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z", "status": "running"}
    with buf.transaction() as tx:
        x, y = tx.create("ExecutedObsUnit", start), tx.create("ExecutedObsUnit", start)
    buf.close()
    drain_until_settled(settings)

    def update(rid: str, status: str) -> dict:
        return {"step_id": f"u{rid[:4]}", "operation": "update", "model_class": "ExecutedObsUnit",
                "data": {"status": status}, "conditions": {"id": rid}}

    def create(rid: str) -> dict:
        return {"step_id": "c", "operation": "create", "model_class": "ExecutedObsUnit", "data": {"id": rid, **start}}

    for tx_id, steps, retries in [("refused", [update(g1, "refused")], 50), ("other", [update(y["id"], "other")], 50),
                                  ("third", [update(x["id"], "third"), update(g2, "third")], 50),
                                  ("held", [update(g1, "held"), update(x["id"], "held")], 50),
                                  ("make-g1", [create(g1)], 50)]:
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": tx_id, "steps": steps, "max_retries": retries}))
    drain = Drain(settings, DrainConfig(retry_base_s=0.05))
    try:
        drain.run(until_empty=False, budget_s=3)  # g1 is there: "refused" applies on its retry
    finally:
        drain.close()
    redis_client.lpush(keys.buffer, json.dumps({"transaction_id": "make-g2", "steps": [create(g2)]}))
    drain_until_settled(settings, retry_base_s=0.05)
    assert not redis_client.llen(keys.failed), redis_client.lrange(keys.failed, 0, -1)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :id"),
                            {"id": x["id"]}).scalar_one() == "held"

def test_a_transaction_ahead_of_a_reused_id_in_the_batch_is_applied(settings, redis_client, main_engine):
    """A producer reuses an applied id for an update of a row; the transaction just ahead of it
    in the batch updates the same row. The reused id's claim on the row held back the one
    ahead of it too: dead-lettered as `blocked by` it, its update lost. It is applied."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "running"})
    buf.close()

    def push(tx_id: str, status: str) -> None:
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": tx_id, "steps": [
            {"step_id": "s1", "operation": "update", "model_class": "ExecutedObsUnit", "data": {"status": status},
             "conditions": {"id": obs["id"]}}]}))

    push("counter-1", "first")
    drain_until_settled(settings)
    push("ahead", "ahead")
    push("counter-1", "reused")
    drain_until_settled(settings, retry_base_s=0.05)
    failed = letter_reasons(redis_client, keys)
    assert set(failed) == {"counter-1"} and "a producer reused the id" in failed["counter-1"], failed
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :id"),
                            {"id": obs["id"]}).scalar_one() == "ahead"

def test_rows_main_runs_triggers_on_get_each_write_of_the_batch_in_order(settings, main_engine):
    """Main keeps an audit trail of executed_obs_unit (a row trigger on update). Folded per row,
    a start and its two updates in one batch were one insert: the trigger saw none of the
    updates. The drain asks main which tables it runs row triggers on: their rows' updates stay
    statements of their own, in the order the transactions made them (grouped by columns, the
    later update of a row could go first and leave its earlier value)."""
    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as first:
        other = first.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                                 "status": "running"})
    drain_until_settled(settings)
    with main_engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE obs_test_audit (seq serial, id uuid, status text, end_time timestamptz)"))
        conn.execute(sa.text("CREATE FUNCTION obs_test_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                             "INSERT INTO obs_test_audit (id, status, end_time) VALUES (NEW.id, NEW.status, "
                             "NEW.end_time); RETURN NEW; END $$"))
        conn.execute(sa.text("CREATE TRIGGER obs_test_audit AFTER UPDATE ON executed_obs_unit FOR EACH ROW "
                             "EXECUTE FUNCTION obs_test_audit()"))
    try:
        done = {"end_time": "2025-01-01T01:00:00Z", "status": "completed"}
        buf.update("ExecutedObsUnit", other["id"], done)  # (its columns, first)
        with buf.transaction() as start:
            obs = start.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                                   "status": "running"})
        buf.update("ExecutedObsUnit", obs["id"], {"status": "paused"})
        buf.update("ExecutedObsUnit", obs["id"], {**done, "end_time": "2025-01-01T02:00:00Z"})
        report = drain_one_batch(settings)
        assert (report.transactions, report.applied) == (4, 4), report
        with main_engine.connect() as conn:
            audit = conn.execute(sa.text("SELECT id::text, status, end_time::text FROM obs_test_audit "
                                         "ORDER BY seq")).all()
            rows = dict(conn.execute(sa.text("SELECT id::text, status || ' ' || end_time::text FROM "
                                             "executed_obs_unit")).all())
    finally:
        with main_engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE IF EXISTS obs_test_audit"))
            conn.execute(sa.text("DROP TRIGGER IF EXISTS obs_test_audit ON executed_obs_unit"))
            conn.execute(sa.text("DROP FUNCTION IF EXISTS obs_test_audit()"))
        buf.close()
    assert audit == [(other["id"], "completed", "2025-01-01 01:00:00+00"), (obs["id"], "paused", None),
                     (obs["id"], "completed", "2025-01-01 02:00:00+00")]
    assert rows == {other["id"]: "completed 2025-01-01 01:00:00+00", obs["id"]: "completed 2025-01-01 02:00:00+00"}



def letter_reasons(redis_client, keys: SiteKeys) -> dict[str, str]:
    """The dead letters' reasons, by transaction id."""
    return {f["transaction_id"]: f["failure"]["reason"] for f in map(json.loads, redis_client.lrange(keys.failed, 0, -1))}


@contextlib.contextmanager
def a_check_on_main(main_engine, name: str, condition: str):
    """A CHECK on executed_obs_unit that main has and the models do not declare, for the block."""
    with main_engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE executed_obs_unit ADD CONSTRAINT {name} CHECK ({condition}) NOT VALID"))
    try:
        yield
    finally:
        with main_engine.begin() as conn:
            conn.execute(sa.text(f"ALTER TABLE executed_obs_unit DROP CONSTRAINT IF EXISTS {name}"))


def test_a_value_a_constraint_only_main_has_refuses_is_not_folded_away_by_a_later_update(settings, redis_client,
                                                                                         main_engine):
    """Main checks executed_obs_unit.status with a constraint the models do not declare (added
    on main). An update main refuses, overwritten by the next transaction's update of the row
    in the same batch, was folded into it: main saw only the later value, and both were
    reported applied. The drain asks main which columns its constraints name."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    try:
        with a_check_on_main(main_engine, "obs_test_status", "status <> 'refused'"):
            refused = buf.update("ExecutedObsUnit", obs["id"], {"status": "refused"})
            later = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
            drain_until_settled(settings, retry_base_s=0.05)
    finally:
        buf.close()
    failed = letter_reasons(redis_client, keys)
    assert set(failed) == {refused, later}, failed
    assert "CheckViolation" in failed[refused] and failed[later] == f"blocked by {refused}", failed
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :id"),
                            {"id": obs["id"]}).scalar_one() == "running"


@pytest.mark.parametrize("first", ["an update", "a create"])
def test_a_value_a_constraint_over_two_columns_refuses_is_not_folded_with_a_later_update_of_the_other(
        settings, redis_client, main_engine, first):
    """Main checks two columns together ("completed" needs an end time). A transaction that sets
    status "completed" (an update, or the create of the row) without an end time is refused by
    main in order; the next transaction, in the same batch, sets the end time. Folded, the two
    went as one write main took, and both were reported applied, where one per batch dead-letters
    the first (and the second, blocked by it): only a later write of the same column was kept
    apart."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    try:
        with a_check_on_main(main_engine, "obs_test_done", "status <> 'completed' OR end_time IS NOT NULL"):
            if first == "an update":
                refused = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
                row = obs["id"]
            else:
                with buf.transaction() as tx:
                    row = tx.create("ExecutedObsUnit", {"obs_unit_id": obs["obs_unit_id"], "status": "completed",
                                                        "start_time": "2025-01-01T00:00:00Z"})["id"]
                refused = tx.transaction_id
            later = buf.update("ExecutedObsUnit", row, {"end_time": "2025-01-01T01:00:00Z"})
            drain_until_settled(settings, retry_base_s=0.05)
    finally:
        buf.close()
    failed = letter_reasons(redis_client, keys)
    assert set(failed) == {refused, later}, failed
    assert "CheckViolation" in failed[refused] and failed[later] == f"blocked by {refused}", failed
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status, end_time FROM executed_obs_unit WHERE id = :id"),
                            {"id": row}).all() == ([("running", None)] if first == "an update" else [])


@pytest.mark.parametrize("beside", ["nothing", "a transaction main refuses"])
def test_a_transaction_main_takes_only_in_the_batch_order_is_applied_whatever_else_is_in_its_batch(
        settings, redis_client, main_engine, beside):
    """One transaction deletes an executed obs unit, then its package: main refuses that order
    (the package still references the unit), and takes the batch's order (children's deletes
    first). Alone in its batch, or in one that went whole, it was applied; beside a transaction
    main refuses, the batch was applied one transaction at a time, each in its own step order:
    it failed (ForeignKeyViolation), was retried with the other each time, and was dead-lettered
    with it. Its fate hung on what else was in its batch.
    A transaction applied alone now goes in the batch's order too before it is refused."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as setup:
        obs = setup.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                               "status": "running"})
        package = setup.create("RawDataPackage", {"name": "p", "executed_obs_unit_id": obs["id"]})
        other = setup.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                                 "status": "running"})
    drain_until_settled(settings)
    with buf.transaction() as both:
        both.delete("ExecutedObsUnit", obs["id"])
        both.delete("RawDataPackage", package["id"])
    if beside != "nothing":  # another row: an obs unit main lacks (retried with it, as it came with it)
        refused = buf.update("ExecutedObsUnit", other["id"], {"obs_unit_id": 999_999_999})
    drain_until_settled(settings, retry_base_s=0.05)
    buf.close()
    failed = letter_reasons(redis_client, keys)
    assert set(failed) == (set() if beside == "nothing" else {refused}), failed
    with main_engine.connect() as conn:
        left = conn.execute(sa.text("SELECT (SELECT count(*) FROM executed_obs_unit WHERE id = :o), "
                                    "(SELECT count(*) FROM raw_data_package WHERE id = :p)"),
                            {"o": obs["id"], "p": package["id"]}).one()
        applied = conn.execute(sa.text("SELECT count(*) FROM obs_pipeline_applied WHERE transaction_id = :t"),
                               {"t": both.transaction_id}).scalar_one()
    assert (tuple(left), applied) == ((0, 0), 1)


def test_a_create_a_cascade_only_main_has_deletes_is_not_sent_before_the_delete(settings, redis_client, main_engine):
    """Main's foreign key from raw_data_package to executed_obs_unit deletes packages ON DELETE
    CASCADE, which the models do not declare. In one batch: the delete of an executed obs unit,
    then a package of it, which main refuses in that order. Folded, the package went first and
    the cascade took it: reported applied, nothing of it on main. The drain asks main which of
    its foreign keys cascade."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    buf.close()
    fkey = "raw_data_package_executed_obs_unit_id_fkey"
    with main_engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE raw_data_package DROP CONSTRAINT {fkey}, ADD CONSTRAINT {fkey} FOREIGN "
                             "KEY (executed_obs_unit_id) REFERENCES executed_obs_unit (id) ON DELETE CASCADE"))
    package = str(uuid.uuid4())
    try:
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": "delete-obs", "steps": [
            {"step_id": "s1", "operation": "delete", "model_class": "ExecutedObsUnit", "data": {},
             "conditions": {"id": obs["id"]}}]}))
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": "package-of-deleted", "steps": [
            {"step_id": "s1", "operation": "create", "model_class": "RawDataPackage",
             "data": {"id": package, "name": "late", "executed_obs_unit_id": obs["id"]}}]}))
        drain_until_settled(settings, retry_base_s=0.05)
    finally:
        with main_engine.begin() as conn:
            conn.execute(sa.text(f"ALTER TABLE raw_data_package DROP CONSTRAINT {fkey}, ADD CONSTRAINT {fkey} "
                                 "FOREIGN KEY (executed_obs_unit_id) REFERENCES executed_obs_unit (id)"))
    failed = letter_reasons(redis_client, keys)
    assert set(failed) == {"package-of-deleted"} and "ForeignKeyViolation" in failed["package-of-deleted"], failed

def test_the_lease_is_renewed_while_main_takes_longer_than_it_to_apply_a_batch(settings, redis_client, monkeypatch):
    """A batch bisected over a far link can take minutes; the lease (here 1 s) must not lapse
    meanwhile, or the acknowledgement finds it gone and the work is done again."""
    from obs_pipeline.apply import MainDatabase

    real = MainDatabase.apply_batch
    monkeypatch.setattr(MainDatabase, "apply_batch", lambda self, txs: (time.sleep(2.5), real(self, txs))[1])
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 3, finish_every=0)
    buf.close()
    drain = Drain(settings, DrainConfig(lease_ttl_s=1.0))
    try:
        drain.acquire()
        report = drain.step()
    finally:
        drain.close()
    assert report.applied == 3
    assert all(TransactionBuffer(settings=settings).status(o.start_tx) in ("applied", "replicated") for o in observations)


def _another_drain_tries_for_the_lease(redis_client, site: str, at_s: float, run: Callable[[], Any]
                                       ) -> tuple[Any, list[str | None]]:
    """`run()`, with another drain trying for the site's lease `at_s` s in: its result, and what
    that drain got ([None]: refused; its token, released here, where it took the lease)."""
    import threading

    from obs_pipeline.buffer_store import BufferStore

    other = BufferStore(redis_client, site)
    taken: list[str | None] = []
    trier = threading.Timer(at_s, lambda: taken.append(other.acquire_lease(60.0)))
    trier.start()
    try:
        result = run()
    finally:
        trier.join()
        if taken and taken[0]:
            other.release_lease(taken[0])
    return result, taken


def test_the_lease_is_renewed_while_the_last_batch_waits_longer_than_it_for_the_replicas_replay(
        settings, redis_client, main_engine, replica_engine):
    """A replication_timeout_s longer than lease_ttl_s (a far, lagging replica given more time):
    the lease lapsed while the last batch waited for its replay, and another drain took the site
    beside this one (`obs-pipeline drain`; or, past 75 s, the sensor's next run, the sensor taking
    the run, quiet with the lease free, for dead). It is held until the wait ends, then released."""
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 3, finish_every=0)
    buf.close()
    drain = Drain(settings, DrainConfig(lease_ttl_s=1.0, replication_timeout_s=3.0))

    def one_step():
        drain.acquire()
        began = time.monotonic()
        return drain.step(), time.monotonic() - began

    try:
        with replay_paused(replica_engine):
            # another drain tries for the site 2 s in, the batch committed and waiting for its replay
            (report, waited), taken = _another_drain_tries_for_the_lease(redis_client, settings.site, 2.0, one_step)
    finally:
        drain.close()
    assert report.applied == 3 and waited >= 2.5, (report, waited)  # it did wait past the lease's TTL
    assert taken == [None], "another drain took the lease while this one waited for the replica"
    assert not redis_client.exists(SiteKeys(settings.site).lease)  # released at close
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, observations)


def test_the_lease_is_renewed_while_the_drain_backs_off_longer_than_it_after_main_went_away(
        settings, redis_client, main_engine):
    """main unreachable, the drain backing off 3 s before trying the batch again, its lease 1 s
    (`drain --lease-ttl 1`): the lease lapsed during the back-off, and another drain took the site
    beside this one. It is held until the drain stops, then released; the batch is applied once."""
    import dataclasses

    from obs_pipeline.stack.osutil import pick_free_ports

    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 2, finish_every=0)
    buf.close()
    gone = dataclasses.replace(settings, main_db_url=f"postgresql+psycopg2://obs@127.0.0.1:{pick_free_ports(1)[0]}/obs")
    drain = Drain(gone, DrainConfig(lease_ttl_s=1.0, backoff_initial_s=3.0, backoff_max_s=3.0))
    try:
        # another drain tries for the site 2 s in, this one backing off after main's refusal
        summary, taken = _another_drain_tries_for_the_lease(redis_client, settings.site, 2.0,
                                                            lambda: drain.run(budget_s=2.5))
    finally:
        drain.close()
    assert summary.transient_errors >= 1 and not summary.lease_lost, summary
    assert taken == [None], "another drain took the lease while this one backed off"
    assert not redis_client.exists(SiteKeys(settings.site).lease)  # released as it stopped
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, observations)


def test_the_lease_is_renewed_as_the_back_off_begins_after_main_took_most_of_it_to_time_out(
        settings, redis_client, main_engine):
    """main blackholed (it takes the connection and never answers: a far link down), so each try
    ends at its connect_timeout, 10 s, with nothing renewing the lease meanwhile, and the drain
    backs off; its lease 12 s (`drain --lease-ttl 12`). The back-off renewed first a third of the
    lease (4 s) after it began, 14 s after the step's renewal: the lease lapsed at 12 s and another
    drain took the site beside this one. The back-off renews as it begins."""
    import dataclasses
    import socket

    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 2, finish_every=0)
    buf.close()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the backlog and are never answered
    port = silent.getsockname()[1]
    gone = dataclasses.replace(settings, main_db_url=f"postgresql+psycopg2://obs@127.0.0.1:{port}/obs")
    drain = Drain(gone, DrainConfig(lease_ttl_s=12.0, backoff_initial_s=5.0, backoff_max_s=5.0))
    try:
        # another drain tries for the site 12.5 s in: this one timed out on main at 10 s and backs off
        summary, taken = _another_drain_tries_for_the_lease(redis_client, settings.site, 12.5,
                                                            lambda: drain.run(budget_s=13.0))
    finally:
        drain.close()
        silent.close()
    assert summary.transient_errors >= 1 and not summary.lease_lost, summary
    assert taken == [None], "another drain took the lease while this one backed off"
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, observations)


def test_a_drain_whose_lease_another_took_stops_and_leaves_the_batch_to_it(settings, redis_client, main_engine,
                                                                          monkeypatch):
    from obs_pipeline.apply import MainDatabase

    keys = SiteKeys(settings.site)
    real = MainDatabase.apply_batch

    def slow_apply(self, txs):
        redis_client.set(keys.lease, "another-drain", px=60_000)  # it took the site meanwhile
        time.sleep(1.5)
        return real(self, txs)

    monkeypatch.setattr(MainDatabase, "apply_batch", slow_apply)
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 3, finish_every=0)
    buf.close()
    drain = Drain(settings, DrainConfig(lease_ttl_s=1.5))
    try:
        summary = drain.run(until_empty=True, budget_s=60)
    finally:
        drain.close()
    assert summary.stopped_because == "another drain took the lease"
    assert redis_client.get(keys.lease) == b"another-drain" and redis_client.llen(keys.processing) == 3
    redis_client.delete(keys.lease)  # the other drain is gone; the next one takes the batch back
    monkeypatch.setattr(MainDatabase, "apply_batch", real)
    drain_until_settled(settings)
    assert_applied_exactly_once(main_engine, observations)


def test_an_update_of_a_row_whose_create_was_invalid_is_blocked_with_it(settings, redis_client):
    """A producer's create is dead-lettered as invalid; its next transaction updates that row.
    Applied, the update touched no row and was reported done, and it was lost once the create
    had been fixed and retried. It is blocked with the create instead, in one batch or two."""
    from obs_pipeline_tests.examples import seed_example

    keys = SiteKeys(settings.site)
    for split in (False, True):
        doc, ids = seed_example(settings.site)
        doc["steps"][0]["data"]["status"] = 5  # not text: invalid
        update = {"transaction_id": f"update-{split}", "steps": [{
            "step_id": "s1", "operation": "update", "model_class": "ExecutedObsUnit",
            "conditions": {"id": ids["uuid-1"]}, "data": {"status": "completed"}}]}
        redis_client.lpush(keys.buffer, json.dumps(doc))
        if split:
            drain_until_settled(settings)
        redis_client.lpush(keys.buffer, json.dumps(update))
        drain_until_settled(settings)
        failed = {f["transaction_id"]: f["failure"] for f in map(json.loads, redis_client.lrange(keys.failed, 0, -1))}
        assert failed[doc["transaction_id"]]["kind"] == "invalid"
        assert failed[update["transaction_id"]]["reason"] == f"blocked by {doc['transaction_id']}"


def test_a_held_transaction_is_not_looked_at_again_until_its_holder_is_done(settings, redis_client):
    """Held behind a transaction that retries in a minute (or an hour), a dependent put back for
    1 s each time kept the drain claiming it every second. It is parked (scored +inf) until its
    holder is applied or dead-lettered: the drain claims nothing meanwhile."""
    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as poison:
        obs = poison.create("ExecutedObsUnit", {"obs_unit_id": 31337, "start_time": "2025-01-01T00:00:00Z",
                                                "status": "running"})  # no such obs unit
    drain = Drain(settings, DrainConfig(retry_base_s=60))
    keys = SiteKeys(settings.site)
    try:
        drain.acquire()
        assert drain.step().retried == 1  # the poison waits a minute to retry
        dependent = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
        assert drain.step().held == 1
        due = next(s for m, s in redis_client.zrange(keys.retry, 0, -1, withscores=True)
                   if json.loads(m)["transaction_id"] == dependent)
        assert due == float("inf")
        assert drain.step() is None and redis_client.zcard(keys.retry) == 2
    finally:
        drain.close()
        buf.close()


def test_a_drain_whose_lease_expired_between_batches_and_was_taken_stops(settings, redis_client, main_engine):
    """The lease lapsed between two batches (the drain paused longer than its TTL) and another
    drain took it: this one stops as "another drain took the lease", leaving the rest to it,
    not with an error (it raised DrainBusy, which only the first acquire expects)."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 4, finish_every=0)
    buf.close()

    def another_takes_the_lease(report):
        redis_client.set(keys.lease, "another-drain", px=60_000)

    drain = Drain(settings, DrainConfig(batch_size=1, max_batch_size=1))
    try:
        summary = drain.run(until_empty=True, budget_s=60, on_batch=another_takes_the_lease)
    finally:
        drain.close()
    assert summary.stopped_because == "another drain took the lease" and summary.applied == 1
    assert redis_client.get(keys.lease) == b"another-drain"
    redis_client.delete(keys.lease)  # the other drain is gone; the next one drains the rest
    drain_until_settled(settings)
    check = TransactionBuffer(settings=settings)
    assert all(check.status(o.start_tx) == "replicated" for o in observations)
    check.close()
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit")).scalar_one() == 4


def test_an_update_of_a_row_main_does_not_have_is_dead_lettered_not_counted_applied(settings, redis_client,
                                                                                    main_engine):
    """A producer's update of a row that exists nowhere (pushed raw, or buffered with no replica
    to check against) updated 0 rows, and was reported applied: the write was lost without a
    word. It is now a failure of that transaction, retried and then dead-lettered with the
    table and the key, while the transactions beside it in the batch apply."""
    keys = SiteKeys(settings.site)
    missing = "8f3e1c8e-7a43-4f0e-9d8e-0c1f5a7b9d21"
    step = {"step_id": "s1", "operation": "update", "model_class": "ExecutedObsUnit",
            "data": {"status": "done"}, "conditions": {"id": missing}}
    buf = TransactionBuffer(settings=settings)
    observations = buffer_observations(buf, 3, finish_every=1)
    buf.close()
    redis_client.lpush(keys.buffer, json.dumps({"transaction_id": "ghost-update", "steps": [step]}))
    drain_until_settled(settings, retry_base_s=0.05)
    failed = [json.loads(e) for e in redis_client.lrange(keys.failed, 0, -1)]
    assert [f["transaction_id"] for f in failed] == ["ghost-update"]
    assert failed[0]["failure"]["reason"] == f"no executed_obs_unit row {missing} to update", failed[0]["failure"]
    assert "\n" not in failed[0]["failure"]["reason"]
    assert_applied_exactly_once(main_engine, observations)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM obs_pipeline_applied WHERE transaction_id = 'ghost-update'")
                            ).scalar_one() == 0



def test_an_update_of_a_row_another_session_on_main_deletes_meanwhile_is_dead_lettered(settings, redis_client,
                                                                                      main_engine):
    """Another session on main deletes a row (not yet committed) as the drain applies an update
    of it: the batch's check that the row exists saw it, the UPDATE waited on the row's lock and,
    the delete committed, updated 0 rows, and the update was reported applied, lost without a
    word. Main refuses it as of a row it no longer has, as if the delete had come first."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    with main_engine.connect() as deleter:
        deleter.execute(sa.text("DELETE FROM executed_obs_unit WHERE id = :id"), {"id": obs["id"]})
        update = buf.update("ExecutedObsUnit", obs["id"], {"status": "done"})  # the replica still has it
        commit = threading.Timer(1.0, deleter.commit)
        commit.start()
        try:
            drain_until_settled(settings, retry_base_s=0.05)
        finally:
            commit.join()
    buf.close()
    failed = letter_reasons(redis_client, keys)
    assert failed == {update: f"no executed_obs_unit row {obs['id']} to update"}, failed
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM obs_pipeline_applied WHERE transaction_id = :t"),
                            {"t": update}).scalar_one() == 0

def _obs_units(main_engine, ids: list[int]) -> dict[int, str]:
    with main_engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT id, name FROM obs_unit WHERE id = ANY(:ids)"), {"ids": ids}).all())


def test_an_id_a_producer_reuses_for_other_steps_is_dead_lettered_not_skipped_as_applied(
        settings, redis_client, main_engine):
    """A producer that makes ids from a counter starts again at 1 after a restart: the second
    "obs-1" was skipped as already applied, its observation lost without a word. Now it is
    dead-lettered saying so, in a later batch or in the same one; the first keeps its status and
    rows, a transaction using a row the second creates waits with it (blocked), and the same
    transaction pushed again (a producer's retry, a reclaim) is still applied once, quietly."""
    keys = SiteKeys(settings.site)

    def push(tx_id: str, unit: int, name: str, **spacing) -> None:
        step = {"step_id": "s1", "operation": "create", "model_class": "ObsUnit", "data": {"id": unit, "name": name}}
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": tx_id, "steps": [step]}, **spacing))

    def failed() -> dict[str, dict]:
        return {f["transaction_id"]: f["failure"] for f in map(json.loads, redis_client.lrange(keys.failed, 0, -1))}

    push("obs-1", 901, "first")
    drain_until_settled(settings)
    assert json.loads(redis_client.get(keys.transaction("obs-1")))["status"] == "replicated"

    push("obs-1", 902, "second, after a restart")  # reused in a later batch
    redis_client.lpush(keys.buffer, json.dumps({"transaction_id": "uses-902", "steps": [
        {"step_id": "s1", "operation": "update", "model_class": "ObsUnit", "conditions": {"id": 902},
         "data": {"name": "renamed"}}]}))
    push("obs-1", 901, "first", indent=2)  # the first again, spelled otherwise: not a reuse
    push("obs-7", 907, "seventh")
    push("obs-7", 908, "another seventh")  # reused within one batch
    drain_until_settled(settings, retry_base_s=0.05)

    letters = failed()
    assert set(letters) == {"obs-1", "uses-902", "obs-7"}, letters
    for tx_id in ("obs-1", "obs-7"):
        assert letters[tx_id]["kind"] == "reused_id"
        assert "a producer reused the id" in letters[tx_id]["reason"]
        assert letters[tx_id]["reason"].endswith("`obs-pipeline failed retry` requeues it under a new transaction_id")
    assert "applied already at 20" in letters["obs-1"]["reason"]  # when the first was applied
    assert letters["uses-902"]["reason"] == "blocked by obs-1"
    shown = {f["transaction_id"]: f for f in map(json.loads, redis_client.lrange(keys.failed, 0, -1))}
    assert shown["obs-1"]["steps"][0]["data"] == {"id": 902, "name": "second, after a restart"}
    assert shown["obs-7"]["steps"][0]["data"] == {"id": 908, "name": "another seventh"}
    assert _obs_units(main_engine, [901, 902, 907, 908]) == {901: "first", 907: "seventh"}
    for tx_id in ("obs-1", "obs-7"):  # the applied one's status, not "failed"
        assert json.loads(redis_client.get(keys.transaction(tx_id)))["status"] == "replicated"
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM obs_pipeline_applied WHERE transaction_id IN "
                                    "('obs-1', 'obs-7')")).scalar_one() == 2

    # the operator's way out, as the reason says: requeued under a new id, with what it blocked
    cli_env = {"OBS_SITE": settings.site, "OBS_REDIS_URL": settings.redis_url}
    requeued = cli("failed", "retry", "obs-1", env=cli_env)
    assert requeued.returncode == 0, requeued.stderr
    line = requeued.stderr.strip()
    assert line.startswith("requeued 2 transaction(s); under new ids, as a producer had reused theirs: "), line
    new_id = line.rsplit(": ", 1)[1]
    drain_until_settled(settings, retry_base_s=0.05)
    assert set(failed()) == {"obs-7"}
    assert _obs_units(main_engine, [901, 902]) == {901: "first", 902: "renamed"}  # in order: created, then renamed
    assert json.loads(redis_client.get(keys.transaction(new_id)))["status"] == "replicated"
    assert json.loads(redis_client.get(keys.transaction("obs-1")))["status"] == "replicated"
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM obs_pipeline_applied WHERE transaction_id = :i"),
                            {"i": new_id}).scalar_one() == 1
    # discarded instead: the applied one's status stays
    assert cli("failed", "discard", "obs-7", env=cli_env).returncode == 0
    assert failed() == {} and redis_client.hlen(keys.held_ids) == 0
    assert json.loads(redis_client.get(keys.transaction("obs-7")))["status"] == "replicated"


def test_a_reused_id_in_a_batch_dead_letters_what_uses_its_rows_and_parks_what_waits_on_the_first(
        settings, redis_client, main_engine):
    """Two transactions "obs-9" in one batch: the first fails for now (it updates a row that
    does not exist yet), the second, other steps under the same id, is dead-lettered as reused.
    What uses the first's row waits for it and is applied when it is; what uses the second's is
    dead-lettered with it. Both were "blocked by obs-9", and both were dead-lettered."""
    keys = SiteKeys(settings.site)

    def push(tx_id: str, *steps: dict) -> None:
        push_raw(redis_client, settings.site, tx_id, *steps)

    create, rename = create_unit, rename_unit
    push("obs-9", create(921, "first"), rename(930, "not there yet"))
    push("uses-921", rename(921, "first, renamed"))
    push("obs-9", create(922, "second, the id reused"))
    push("uses-922", rename(922, "never"))
    drain = Drain(settings, DrainConfig(retry_base_s=0.5))
    try:
        drain.acquire()
        drain.step()
    finally:
        drain.close()
    letters = {f["transaction_id"]: f["failure"] for f in map(json.loads, redis_client.lrange(keys.failed, 0, -1))}
    assert {tx_id: f["kind"] for tx_id, f in letters.items()} == {"obs-9": "reused_id", "uses-922": "blocked"}, letters
    assert letters["uses-922"]["reason"] == "blocked by obs-9"
    assert _obs_units(main_engine, [921, 922]) == {}

    push("makes-930", create(930, "now there"))
    drain_until_settled(settings, retry_base_s=0.05)
    assert _obs_units(main_engine, [921, 922, 930]) == {921: "first, renamed", 930: "not there yet"}
    assert set(map(lambda e: json.loads(e)["transaction_id"], redis_client.lrange(keys.failed, 0, -1))) == {
        "obs-9", "uses-922"}
    assert statuses(redis_client, settings.site, ["obs-9", "uses-921"]) == ["replicated", "replicated"]


def _two_letters_under_one_id(settings, redis_client, tx_id: str,
                              unit: int) -> tuple[str, Callable[[], list[tuple[str, str]]]]:
    """Dead-letter `tx_id` twice with other steps (a producer reused the id): the first updates an
    ExecutedObsUnit that is not there (for good: no retries), the second creates ObsUnit `unit`.
    Returns the missing row's id and a reader of the letters' (id, kind)."""
    keys = SiteKeys(settings.site)
    missing = str(uuid.uuid4())
    for steps in ([{"step_id": "s", "operation": "update", "model_class": "ExecutedObsUnit",
                    "conditions": {"id": missing}, "data": {"status": "done"}}],
                  [{"step_id": "s", "operation": "create", "model_class": "ObsUnit",
                    "data": {"id": unit, "name": "the id reused"}}]):
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": tx_id, "max_retries": 0, "steps": steps}))
    drain_until_settled(settings)

    def letters() -> list[tuple[str, str]]:
        return [(f["transaction_id"], f["failure"]["kind"])
                for f in map(json.loads, redis_client.lrange(keys.failed, 0, -1))]

    assert sorted(letters()) == [(tx_id, "permanent"), (tx_id, "reused_id")]
    return missing, letters


def _refused_by_id_then_the_reused_one_by_place(action: str, tx_id: str, letters, cli_env: dict) -> None:
    """`failed <action> <tx_id>` is refused in one line, changing nothing; `failed <action> #N` of
    the reused_id letter succeeds."""
    refused = cli("failed", action, tx_id, env=cli_env)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (f"obs-pipeline: error: 2 dead letters under transaction id '{tx_id}' hold different "
                                      f"steps (a producer reused the id): {action} one by its place in `obs-pipeline "
                                      "failed list` (#1, #2), after `failed show #N`"), refused.stderr
    assert sorted(letters()) == [(tx_id, "permanent"), (tx_id, "reused_id")]
    listed = cli("failed", "list", env=cli_env).stdout.splitlines()
    place = next(n for n, line in enumerate(listed, 1) if "\treused_id\t" in line)
    assert cli("failed", action, f"#{place}", env=cli_env).returncode == 0


def test_discarding_by_an_id_two_letters_share_with_other_steps_is_refused_and_by_place_takes_one(
        settings, redis_client, main_engine):
    """A producer's reused id can leave two dead letters under one id with other steps (the
    first failing for good, the second reused). `failed discard <id>` dropped both: the
    operator lost an observation they had not looked at. It is now refused in one line naming
    their places; `failed discard #N` drops that one alone."""
    _, letters = _two_letters_under_one_id(settings, redis_client, "obs-3", 931)
    cli_env = {"OBS_SITE": settings.site, "OBS_REDIS_URL": settings.redis_url}
    _refused_by_id_then_the_reused_one_by_place("discard", "obs-3", letters, cli_env)
    assert letters() == [("obs-3", "permanent")]
    assert cli("failed", "discard", "obs-3", env=cli_env).returncode == 0
    assert letters() == [] and _obs_units(main_engine, [931]) == {}


def test_retrying_by_an_id_two_letters_share_with_other_steps_is_refused_and_by_place_takes_that_one(
        settings, redis_client, main_engine):
    """`failed retry #N` of one of two letters under one id requeued the other one (the first of
    the id in the list) and left #N dead-lettered; by id it took one of them unasked. By id it is
    now refused in one line naming their places, as discard is, and #N requeues that letter."""
    _, letters = _two_letters_under_one_id(settings, redis_client, "obs-4", 932)
    cli_env = {"OBS_SITE": settings.site, "OBS_REDIS_URL": settings.redis_url}
    _refused_by_id_then_the_reused_one_by_place("retry", "obs-4", letters, cli_env)
    assert letters() == [("obs-4", "permanent")]
    drain_until_settled(settings)
    assert _obs_units(main_engine, [932]) == {932: "the id reused"}
    assert letters() == [("obs-4", "permanent")]


def test_retry_all_requeues_each_letter_two_share_an_id_with(settings, redis_client, main_engine):
    """`failed retry --all` requeued one letter per id: of two a producer's reused id left, the
    second stayed dead-lettered, and the operator was told "requeued 1"."""
    missing, letters = _two_letters_under_one_id(settings, redis_client, "obs-4", 932)
    with main_engine.begin() as conn:  # the cause of the first is fixed
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (933, 'for obs-4')"))
        conn.execute(sa.text("INSERT INTO executed_obs_unit (id, obs_unit_id, start_time, status) "
                             "VALUES (:id, 933, now(), 'running')"), {"id": missing})
    cli_env = {"OBS_SITE": settings.site, "OBS_REDIS_URL": settings.redis_url}
    result = cli("failed", "retry", "--all", env=cli_env)
    assert result.returncode == 0 and result.stderr.startswith("requeued 2 transaction(s)"), result.stderr
    assert letters() == []
    drain_until_settled(settings)
    assert letters() == []
    assert _obs_units(main_engine, [932]) == {932: "the id reused"}
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :id"),
                            {"id": missing}).scalar_one() == "done"



def test_retry_all_of_two_reused_letters_under_one_id_leaves_no_dead_mark(settings, redis_client, main_engine):
    """A producer reused an applied id twice, each time for other steps: two `reused_id` letters
    under one id. `retry --all` moved their dead marks to the new ids keyed by the old id, so
    the first letter's mark stayed in held_ids for ever: every later write of its row was
    dead-lettered "blocked by" an id no longer listed."""
    keys = SiteKeys(settings.site)
    for unit, name in ((944, "applied"), (945, "reused once"), (946, "reused twice")):
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": "obs-44", "steps": [
            {"step_id": "s", "operation": "create", "model_class": "ObsUnit", "data": {"id": unit, "name": name}}]}))
        drain_until_settled(settings)
    assert [json.loads(f)["failure"]["kind"] for f in redis_client.lrange(keys.failed, 0, -1)] == ["reused_id"] * 2
    result = cli("failed", "retry", "--all", env={"OBS_SITE": settings.site, "OBS_REDIS_URL": settings.redis_url})
    assert result.returncode == 0 and result.stderr.startswith("requeued 2 transaction(s)"), result.stderr
    drain_until_settled(settings)
    assert _obs_units(main_engine, [944, 945, 946]) == {944: "applied", 945: "reused once", 946: "reused twice"}
    assert redis_client.hgetall(keys.held_ids) == {}
    for unit in (945, 946):  # and their rows take later writes
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": f"renames-{unit}", "steps": [
            {"step_id": "s", "operation": "update", "model_class": "ObsUnit", "conditions": {"id": unit},
             "data": {"name": "renamed"}}]}))
    drain_until_settled(settings)
    assert redis_client.llen(keys.failed) == 0
    assert _obs_units(main_engine, [945, 946]) == {945: "renamed", 946: "renamed"}


def test_a_reused_id_in_the_batch_of_the_first_leaves_none_of_the_firsts_caches(
        settings, redis_client, main_engine):
    """A producer reuses the id of a buffered update, for an update of another row, before the
    drain claims either: one batch holds both. The first is applied, the second dead-lettered as
    reused. The batch's cache footprints were kept by transaction id, so the second's replaced
    the first's: the cleanup removed the second's (it had none) and the first's overlay stayed
    for good. Once a later update of the row had replicated, reads still showed the first's."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    try:
        with buf.transaction() as start:
            obs = start.create("ExecutedObsUnit", {"obs_unit_id": 1, "status": "running",
                                                   "start_time": "2025-01-01T00:00:00Z"})
        drain_until_settled(settings)
        first = buf.update("ExecutedObsUnit", obs["id"], {"status": "first"})
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": first, "steps": [
            {"step_id": "s1", "operation": "update", "model_class": "ObsUnit",
             "conditions": {"id": 2}, "data": {"name": "the id reused"}}]}))
        drain_until_settled(settings)
        letters = [json.loads(e) for e in redis_client.lrange(keys.failed, 0, -1)]
        assert [(f["transaction_id"], f["failure"]["kind"]) for f in letters] == [
            (first, "reused_id")]
        assert buf.status(first) == "replicated"
        assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "first"
        later = buf.update("ExecutedObsUnit", obs["id"], {"status": "later"})
        drain_until_settled(settings)
        assert buf.status(later) == "replicated"
        assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "later"
        assert buf.search("ExecutedObsUnit", {"status": "first"}) == []
        assert redis_client.lrange(keys.read_buffer("ExecutedObsUnit", obs["id"]), 0, -1) == []
    finally:
        buf.close()
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :i"),
                            {"i": obs["id"]}).scalar_one() == "later"
    assert _obs_units(main_engine, [2]) == {2: "unit 2"}


def test_a_table_made_before_the_digest_is_drained_as_before_and_db_init_upgrades_it(
        settings, redis_client, main_engine, caplog):
    """An obs_pipeline_applied made by an earlier version has no steps_digest: the drain must
    not stop on it (it records ids alone, as then, and says once what to run); `db init`
    (create_schema) adds the column, and reuse is caught from then on."""
    from obs_pipeline.model_registry import ModelRegistry
    from obs_pipeline.schema import create_schema

    keys = SiteKeys(settings.site)
    push = lambda tx_id, unit, name: redis_client.lpush(keys.buffer, json.dumps({  # noqa: E731
        "transaction_id": tx_id, "steps": [{"step_id": "s1", "operation": "create", "model_class": "ObsUnit",
                                            "data": {"id": unit, "name": name}}]}))
    with main_engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE obs_pipeline_applied DROP COLUMN steps_digest"))
    try:
        push("old-1", 911, "recorded without digest")
        with caplog.at_level("WARNING", logger="obs_pipeline.drain"):
            drain_until_settled(settings)
        assert sum("no steps_digest column" in r.getMessage() and "obs-pipeline db init" in r.getMessage()
                   for r in caplog.records) == 1
        assert _obs_units(main_engine, [911]) == {911: "recorded without digest"}
    finally:
        create_schema(main_engine, ModelRegistry.from_path(settings.models))
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT steps_digest FROM obs_pipeline_applied WHERE transaction_id = 'old-1'")
                            ).scalar_one() is None
    push("old-1", 912, "reuse of an id recorded without digest")  # cannot be told: skipped, as before
    push("new-1", 913, "recorded with digest")
    drain_until_settled(settings)
    push("new-1", 914, "reuse")
    drain_until_settled(settings)
    assert {f["transaction_id"] for f in map(json.loads, redis_client.lrange(keys.failed, 0, -1))} == {"new-1"}
    assert _obs_units(main_engine, [911, 912, 913, 914]) == {911: "recorded without digest",
                                                             913: "recorded with digest"}


def test_a_hung_replica_does_not_hold_the_drain_past_its_replication_timeout(settings, clean_db, tmp_path):
    """The site's replica hangs (SIGSTOP of what serves its address: the kernel still takes the
    drain's query, nothing answers) while a running drain waits for its replay. The wait is
    bounded by replication_timeout_s (caches kept, a later pass cleans); the drain's pooled
    session to the replica blocked in its query for as long as the replica hung: the run never
    ended, nothing more was applied, and its lease lapsed for another drain to take."""
    import dataclasses
    import os
    import signal
    import threading

    from obs_pipeline.stack.osutil import pick_free_ports
    from obs_pipeline.stack.postgres import HOST
    from obs_pipeline.stack.proxy_process import proxy_pid, start_proxy, stop_proxy

    port, = pick_free_ports(1)
    pidfile = tmp_path / "replica-proxy.json"
    start_proxy(port, sa.engine.make_url(settings.replica_db_url).port, 0, pidfile, tmp_path / "replica-proxy.log")
    site = dataclasses.replace(settings, replica_db_url=f"postgresql+psycopg2://postgres@{HOST}:{port}/obs")
    drain = Drain(site, DrainConfig(replication_timeout_s=1.0, lease_ttl_s=3.0))
    pid = proxy_pid(pidfile)
    buf = TransactionBuffer(settings=settings)  # (ingest reads the replica directly)

    def start(unit: int) -> None:
        with buf.transaction(endpoint="start_observation") as tx:
            tx.create("ExecutedObsUnit", {"obs_unit_id": unit, "start_time": "2025-01-01T00:00:00Z",
                                          "status": "running"})

    try:
        start(1)
        summary = drain.run(until_empty=True, replica_patience_s=1.0, budget_s=30)  # (its replica session pooled)
        assert summary.replicated == 1, summary
        os.kill(pid, signal.SIGSTOP)
        start(2)
        ended = []
        worker = threading.Thread(target=lambda: ended.append(
            drain.run(until_empty=True, replica_patience_s=1.0, budget_s=30)), daemon=True)
        worker.start()
        worker.join(20)
        assert ended, "the drain still waits for a hung replica, 20 s on"
        assert ended[0].applied == 1 and ended[0].replica_stalled, ended[0]
    finally:
        os.kill(pid, signal.SIGCONT)
        drain.close()
        stop_proxy(pidfile)
        buf.close()
