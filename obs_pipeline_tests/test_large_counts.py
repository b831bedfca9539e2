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

from obs_pipeline import query
from obs_pipeline.buffer_store import BufferStore, CacheWrites
from obs_pipeline.ingest import TransactionBuffer

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
