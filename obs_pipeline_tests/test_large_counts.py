"""Redis calls whose size grows with the data, at the sizes a long outage reaches: a million
transactions spooled, a million dead letters, hundreds of thousands parked behind one holder.
Redis takes at most 1,048,576 arguments per command and resets the connection beyond; a script
holds every other client while it runs, and answers them BUSY past its lua-time-limit (5 s). Such
calls go in chunks; each test also runs with its chunk size lowered, to check the chunks'
seams at a size the suite runs in seconds."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid

import pytest
import redis
import sqlalchemy as sa

from obs_pipeline import buffer_store, dead_letters, query
from obs_pipeline.buffer_store import BufferStore, CacheWrites, Outcome
from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline.keys import SiteKeys
from obs_pipeline.model_registry import ModelRegistry
from obs_pipeline.wire import Transaction, written_ids
from obs_pipeline_tests.test_cli import dead_letters_of, dead_poison
from obs_pipeline_tests.test_reliability import an_update_failing_on_a_missing_obs_unit, due_now
from obs_pipeline_tests.workload import drain_until_settled

OBS = {"obs_unit_id": 123, "start_time": "2025-01-01T00:00:00Z", "status": "running"}
OVER_ONE_CALL = 1_048_576 + 1_000  # more values than one Redis command takes


# --- a read while a million transactions are spooled ---------------------------------------------

def written_while_redis_was_down(settings, tmp_path, write) -> list[str]:
    """The spool lines of what `write(buf)` buffers through ingest while Redis is down."""
    down = TransactionBuffer(settings=dataclasses.replace(
        settings, redis_url="redis://127.0.0.1:1/0", spool_dir=str(tmp_path / "down")))
    down.spool.start_flusher = lambda: None  # only read here: nothing pushes it to that Redis
    try:
        write(down)
        lines = down.spool.path.read_text().splitlines(keepends=True)
        down.spool.path.unlink()
    finally:
        down.close()
    return lines


def spooled_lines(settings, tmp_path, obs_id: str) -> list[str]:
    """A create of an observation, then two updates of `obs_id` (status "spooled", then "newer")."""
    def write(down):
        with down.transaction() as tx:
            tx.create("ExecutedObsUnit", OBS)
        down.update("ExecutedObsUnit", obs_id, {"status": "spooled"})
        down.update("ExecutedObsUnit", obs_id, {"status": "newer"})

    return written_while_redis_was_down(settings, tmp_path, write)


def clones(line: str, count: int) -> tuple[list[str], list[str]]:
    """`line` (a spooled create) again `count` times, each with a transaction and a record id of
    its own: (the lines, the record ids)."""
    entry = json.loads(line)
    tx_id, record_id = entry["id"], entry["created"][0][1]
    records = [str(uuid.uuid4()) for _ in range(count)]
    lines = [line.replace(tx_id, str(uuid.uuid4())).replace(record_id, new) for new in records]
    return lines, records


def push(store: BufferStore, line: str) -> None:
    """What the spool's push does with a line."""
    entry = json.loads(line)
    caches = CacheWrites(created=[tuple(c) for c in entry["created"]],
                         overlays=[tuple(o) for o in entry["overlays"]])
    store.buffer(entry["id"], entry["tx"], caches)


@pytest.mark.parametrize("creates, pushed, chunk", [
    (9, 6, 4),  # the status keys asked in three calls; the update that was pushed in the second
    pytest.param(OVER_ONE_CALL, 0, None, marks=pytest.mark.slow),
])
@pytest.mark.usefixtures("clean_db")
def test_a_search_with_more_spooled_than_one_redis_call_takes_reads_them_all(
        settings, tmp_path, monkeypatch, creates, pushed, chunk):
    """A search asks Redis, in its one read of the caches, which spooled transactions have been
    pushed by then (a status key each). With 1,049,577 spooled (an outage of days, Redis full)
    that was one call of as many keys: Redis reset the connection, and every search of the model
    failed, RedisUnreadable ('Connection reset by peer'). Now they are asked in calls of
    SPOOLED_KEYS_CHUNK, in one MULTI/EXEC with the read of the caches.

    Those pushed (a push whose offset could not be written, a full disk: the spool still lists
    them) are read from Redis, where a newer update of the record may be: the pushed update
    "spooled" must not be applied again over "newer", whichever call asked for its key."""
    if chunk:
        monkeypatch.setattr(query, "SPOOLED_KEYS_CHUNK", chunk)
    buf = TransactionBuffer(settings=settings)
    try:
        with buf.transaction() as tx:
            obs = tx.create("ExecutedObsUnit", OBS)
        template, spooled_update, newer_update = spooled_lines(settings, tmp_path, obs["id"])
        lines, records = clones(template, creates)
        lines.insert(pushed, spooled_update)
        for line in lines[:pushed + 1]:  # pushed, but still listed in the spool
            push(buf.store, line)
        push(buf.store, newer_update)  # another script's update, buffered after the push
        buf.spool.directory.mkdir(parents=True, exist_ok=True)
        buf.spool.path.write_text("".join(lines))

        found = buf.search("ExecutedObsUnit", {"obs_unit_id": 123})

        assert len(found) == creates + 1
        assert {row["id"] for row in found} == {*records, obs["id"]}
        statuses = {row["id"]: row["status"] for row in found}
        assert statuses.pop(obs["id"]) == "newer"
        assert set(statuses.values()) == {"running"}
    finally:
        buf.spool.path.unlink(missing_ok=True)
        buf.close()


# --- a retry beside a million dead letters -------------------------------------------------------

@pytest.mark.parametrize("others, chunk", [
    (30, 4),
    pytest.param(OVER_ONE_CALL, None, marks=pytest.mark.slow),
])
@pytest.mark.usefixtures("clean_db")
def test_a_retry_beside_more_dead_letters_than_one_redis_call_takes_keeps_them_in_order(
        settings, redis_client, monkeypatch, others, chunk):
    """`failed retry X`, X having blocked 11 others, with 1,049,576 more letters listed (a
    producer pushed as many unreadable entries, dead-lettered without an id): the retry writes
    the list anew without the 12, and did so with one LPUSH of every letter kept, which Redis
    refused by resetting the connection. Inside the retry's WATCH that read as the list changed:
    it read the million letters again, 20 times (12.5 minutes), then said a drain was
    dead-lettering as it went, with no drain running; nothing was requeued. Now the list is
    written in LPUSHes of REWRITE_CHUNK letters, in the same MULTI.

    (One read here: the list does not change, and 20 reads of a million letters take minutes.)"""
    monkeypatch.setattr(dead_letters, "READS", 1)
    if chunk:
        monkeypatch.setattr(dead_letters, "REWRITE_CHUNK", chunk)
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, "garbage from a producer, 0")
    poison, obs_id = dead_poison(settings)
    buf = TransactionBuffer(settings=settings)
    blocked = [buf.update("ExecutedObsUnit", obs_id, {"status": f"update {n}"}) for n in range(11)]
    buf.close()
    drain_until_settled(settings, retry_base_s=0.05)
    garbage = redis_client.lindex(keys.failed, -1).decode()  # the oldest: dead-lettered as invalid
    assert redis_client.llen(keys.failed) == 13 and '"raw":"garbage from a producer, 0"' in garbage
    oldest_first = [garbage.replace("producer, 0", f"producer, {n}") for n in range(others)]
    try:
        for part in range(1, others, 10_000):
            redis_client.lpush(keys.failed, *oldest_first[part:part + 10_000])

        cli_like = redis.Redis.from_url(settings.redis_url, socket_timeout=5)  # as `failed retry` has it
        try:  # (its MULTI gets more: dead_letters.EXEC_S_PER_ARGUMENT)
            requeued = dead_letters_of(settings, cli_like).retry([poison])
        finally:
            cli_like.close()

        assert requeued == [poison, *blocked]
        assert redis_client.llen(keys.failed) == others
        for part in range(0, others, 100_000):  # the others as they were: the newest at the head
            size = min(100_000, others - part)
            assert redis_client.lrange(keys.failed, -part - size, -part - 1) == [
                letter.encode() for letter in reversed(oldest_first[part:part + size])]
        assert redis_client.lrange(keys.buffer, 0, -1)[::-1] == [
            redis_client.get(keys.transaction(tx_id)) for tx_id in requeued]
    finally:
        redis_client.delete(keys.failed, keys.buffer)


# --- hundreds of thousands parked behind one holder ----------------------------------------------

def parked_behind(settings, tmp_path, drain, holder: str, obs_id: str, count: int,
                  updates_at: set[int]) -> list[str]:
    """`count` transactions parked behind `holder`, as the drain parks them (its acknowledgements,
    10,000 a batch), each a package of the observation `obs_id`, which `holder` updates; those at
    `updates_at` update its status instead (the row is the holder's: they hold nothing). Returns
    their members of the retry set, in the order they were parked."""
    registry = ModelRegistry.from_path(settings.models)

    def write(down):
        with down.transaction() as tx:
            tx.create("RawDataPackage", {"name": "obs_123", "executed_obs_unit_id": obs_id})
        down.update("ExecutedObsUnit", obs_id, {"status": "parked"})

    templates = []
    for line in written_while_redis_was_down(settings, tmp_path, write):
        tx = Transaction.from_json(json.loads(line)["tx"])
        tx.metadata = {**tx.metadata, "held_by": holder}
        created = tx.steps[0].records()[0]["id"] if tx.steps[0].operation == "create" else None
        templates.append((tx.to_json(), written_ids(tx, registry), tx.transaction_id, created))
    members = []
    for part in range(0, count, 10_000):
        outcome = Outcome()
        for n in range(part, min(count, part + 10_000)):
            tx_json, rows, old_id, package = templates[n in updates_at]
            tx_id = str(uuid.uuid4())
            tx_json = tx_json.replace(old_id, tx_id)
            if package:  # a package of its own, which it holds
                new_package = str(uuid.uuid4())
                tx_json = tx_json.replace(package, new_package)
                rows = {row.replace(package, new_package) for row in rows}
                outcome.claim(rows, tx_id)
            outcome.park.append((holder, tx_id, rows, tx_json))
            members.append(tx_json)
        drain.store.acknowledge(drain.token, outcome)
    return members


@pytest.mark.parametrize("parked, chunk", [
    (7, 2),
    pytest.param(300_000, None, marks=pytest.mark.slow),
])
@pytest.mark.usefixtures("clean_db")
def test_transactions_parked_behind_a_holder_come_due_in_order_without_holding_redis(
        settings, redis_client, main_engine, tmp_path, monkeypatch, parked, chunk):
    """A holder applied at last, with 300,000 transactions parked behind it: one UNPARK script
    made them all due, holding Redis 7 s, every other client answered BUSY after 5 s (ingest
    spooled, reads failed). Now UNPARK_CHUNK per call, the first in the acknowledgement's MULTI,
    the rest right after: each comes due after the one parked before it, and the first parked
    that writes the holder's row takes its mark, as in one call."""
    if chunk:
        monkeypatch.setattr(buffer_store, "UNPARK_CHUNK", chunk)
    keys = SiteKeys(settings.site)
    updates_at = {3, parked - 5}
    with an_update_failing_on_a_missing_obs_unit(settings) as (buf, obs, holder, drain):
        members = parked_behind(settings, tmp_path, drain, holder, obs["id"], parked, updates_at)
        with main_engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
        due_now(redis_client, keys, holder)
        waits, errors, done = [], [], threading.Event()

        def another_client() -> None:
            client = redis.Redis.from_url(settings.redis_url, socket_timeout=60)
            while not done.is_set():
                began = time.monotonic()
                try:
                    client.ping()
                except redis.RedisError as error:
                    errors.append(str(error))
                waits.append(time.monotonic() - began)
                time.sleep(0.005)
            client.close()

        pinger = threading.Thread(target=another_client)
        pinger.start()
        try:
            assert drain.step().applied == 1
        finally:
            done.set()
            pinger.join()
    try:
        assert errors == [] and max(waits) < 2.0, (errors[:1], max(waits))
        due = redis_client.zrange(keys.retry, 0, -1, withscores=True)
        assert [member.decode() for member, _ in due] == members  # in the order they were parked
        assert all(score < time.time() + parked for _, score in due)
        first_update = json.loads(members[min(updates_at)])["transaction_id"]
        assert redis_client.hget(keys.held_ids, obs["id"]) == first_update.encode()
        assert not redis_client.exists(keys.parked(holder), keys.unparking, keys.unparking_score)
    finally:
        redis_client.delete(keys.retry, keys.held_ids)


@pytest.mark.usefixtures("clean_db")
def test_a_drain_that_dies_while_it_makes_parked_transactions_due_leaves_the_rest_to_the_next(
        settings, redis_client, main_engine, monkeypatch):
    """The acknowledgement makes the first UNPARK_CHUNK due; a drain that dies before the rest
    leaves them queued (`unparking`), and the next drain makes them due as it starts, after
    those: the five updates parked behind the holder are applied in their order."""
    monkeypatch.setattr(buffer_store, "UNPARK_CHUNK", 2)
    keys = SiteKeys(settings.site)
    with an_update_failing_on_a_missing_obs_unit(settings) as (buf, obs, holder, drain):
        updates = [buf.update("ExecutedObsUnit", obs["id"], {"status": f"s{n}"}) for n in range(5)]
        assert drain.step().held == 5
        with main_engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (31337, 'late unit')"))
        due_now(redis_client, keys, holder)

        def dies(*_):
            raise RuntimeError("the drain died here")

        monkeypatch.setattr(drain.store, "finish_unparking", dies)
        with pytest.raises(RuntimeError, match="died here"):
            drain.step()
    assert redis_client.lrange(keys.unparking, 0, -1) == [holder.encode()]
    assert redis_client.llen(keys.parked(holder)) == 3
    drain_until_settled(settings, retry_base_s=60)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :i"),
                            {"i": obs["id"]}).scalar_one() == "s4"
    assert [buf.status(tx_id) for tx_id in updates] == ["replicated"] * 5
    assert redis_client.hlen(keys.held_ids) == 0
    assert not redis_client.exists(keys.parked(holder), keys.unparking, keys.unparking_score)
    buf.close()
