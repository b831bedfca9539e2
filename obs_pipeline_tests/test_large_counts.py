"""Redis calls whose size grows with the data, at the sizes a long outage reaches: a million
transactions spooled, a million dead letters, hundreds of thousands parked behind one holder.
Redis takes at most 1,048,576 arguments per command and resets the connection beyond; a script
holds every other client while it runs, and answers them BUSY past its lua-time-limit (5 s). Such
calls go in chunks; each test also runs with its chunk size lowered, to check the chunks'
seams at a size the suite runs in seconds."""

from __future__ import annotations

import dataclasses
import json
import uuid

import pytest

from obs_pipeline import dead_letters, query
from obs_pipeline.buffer_store import BufferStore, CacheWrites
from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline.keys import SiteKeys
from obs_pipeline_tests.test_cli import dead_letters_of, dead_poison
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

        requeued = dead_letters_of(settings, redis_client).retry([poison])

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
