"""Two scripts create a record with the same key of their own (ObsUnit 42) at the same moment.

Both passed ingest's check (the key is neither buffered nor on the replica), then both were
buffered: the second's record overwrote the first's caches, reads showed it, and the first
observation's data was hidden until the drain dead-lettered the second, hours later; its script
had been told "buffered". The buffer script now checks again, atomically with its writes, that
each key the check found free still is: the create whose script runs second is refused in one
line, the check's own, and nothing of it is buffered.

The race is made deterministic by nesting the blocks: both creates are checked before either
block ends (buffers).
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import sqlalchemy as sa

from obs_pipeline.buffer_store import BufferStore
from obs_pipeline.ingest import InvalidTransaction, TransactionBuffer
from obs_pipeline.keys import SiteKeys
from obs_pipeline_tests.test_smart_query import cache_keys
from obs_pipeline_tests.test_walking_skeleton import drain_until_empty

pytestmark = pytest.mark.usefixtures("clean_db")


def taken(key: int) -> str:
    return f"ObsUnit {key} exists already (buffered or on the replica): update it, or create it with another key"


def obs_unit_names(main_engine, key: int) -> list[str]:
    with main_engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text("SELECT name FROM obs_unit WHERE id = :id"), {"id": key})]


def test_two_scripts_creating_one_key_at_once_the_later_buffer_is_refused_whole(settings, redis_client, main_engine):
    """Both creates pass the check; the block that ends second is refused with the check's own
    line and buffers nothing (no status, no queue entry, no caches, not its other rows either):
    reads show the first, and the drain applies the first, with nothing dead-lettered."""
    first, second = TransactionBuffer(settings=settings), TransactionBuffer(settings=settings)
    keys = SiteKeys(settings.site)
    try:
        with pytest.raises(InvalidTransaction) as info:
            with second.transaction(endpoint="late") as late:
                late.create("ObsUnit", {"id": 4242, "name": "late"})  # checked: free
                late.create("ObsUnit", {"id": 4243, "name": "late's other row"})
                with first.transaction(endpoint="early") as early:
                    early.create("ObsUnit", {"id": 4242, "name": "early"})  # checked: free too
                # `early` is buffered; `late` ends now
        assert str(info.value) == taken(4242)
        assert not late.committed
        assert redis_client.exists(keys.transaction(late.transaction_id)) == 0
        assert redis_client.llen(keys.buffer) == 1
        assert json.loads(redis_client.lindex(keys.buffer, 0))["transaction_id"] == early.transaction_id
        assert json.loads(redis_client.get(keys.buffered("ObsUnit", "4242")))["name"] == "early"
        assert redis_client.llen(keys.read_buffer("ObsUnit", "4242")) == 1
        assert redis_client.exists(keys.buffered("ObsUnit", "4243"), keys.cached_id("ObsUnit", "4243"),
                                   keys.read_buffer("ObsUnit", "4243")) == 0
        assert first.get("ObsUnit", 4242) == {"id": 4242, "name": "early"}
        assert second.get("ObsUnit", 4243) is None
        assert second.status(late.transaction_id) is None
        drain_until_empty(settings)
        assert redis_client.llen(keys.failed) == 0
        assert obs_unit_names(main_engine, 4242) == ["early"] and obs_unit_names(main_engine, 4243) == []
        assert first.status(early.transaction_id) == "replicated"
        assert cache_keys(redis_client, settings.site) == []
    finally:
        first.close()
        second.close()


def test_a_key_deleted_then_created_again_by_two_scripts_at_once_is_created_once(settings, redis_client,
                                                                               main_engine):
    """A buffered delete makes the key free again: two scripts that both see it free both pass
    the check; the first create goes (delete, then create: reads show it), the second is
    refused. Without a race a delete then a create of the key still goes through."""
    buf, other = TransactionBuffer(settings=settings), TransactionBuffer(settings=settings)
    keys = SiteKeys(settings.site)
    try:
        with buf.transaction() as tx:
            tx.create("ObsUnit", {"id": 4250, "name": "first"})
            tx.create("ObsUnit", {"id": 4251, "name": "first"})
        buf.delete("ObsUnit", 4250)
        buf.delete("ObsUnit", 4251)
        with buf.transaction() as tx:  # no race: a delete then a create again
            tx.create("ObsUnit", {"id": 4251, "name": "again"})
        with pytest.raises(InvalidTransaction) as info:
            with other.transaction(endpoint="late") as late:
                late.create("ObsUnit", {"id": 4250, "name": "late"})
                with buf.transaction(endpoint="early") as early:
                    early.create("ObsUnit", {"id": 4250, "name": "early"})
        assert str(info.value) == taken(4250)
        assert redis_client.exists(keys.transaction(late.transaction_id)) == 0
        assert buf.get("ObsUnit", 4250) == {"id": 4250, "name": "early"}
        assert buf.get("ObsUnit", 4251) == {"id": 4251, "name": "again"}
        assert [e["op"] for e in map(_overlay, redis_client.lrange(keys.read_buffer("ObsUnit", "4250"), 0, -1))] == \
            ["create", "delete", "create"]
        drain_until_empty(settings)
        assert redis_client.llen(keys.failed) == 0
        assert obs_unit_names(main_engine, 4250) == ["early"] and obs_unit_names(main_engine, 4251) == ["again"]
    finally:
        buf.close()
        other.close()


def test_a_delete_cleaned_between_the_check_and_the_buffer_does_not_refuse_the_create(settings, redis_client,
                                                                                    main_engine):
    """The check sees the key free through a buffered delete; the drain applies and cleans that
    delete before the block ends (its read buffer empty again): the key is still free, and the
    create goes through."""
    buf = TransactionBuffer(settings=settings)
    try:
        with buf.transaction() as tx:
            tx.create("ObsUnit", {"id": 4260, "name": "first"})
        drain_until_empty(settings)
        buf.delete("ObsUnit", 4260)
        with buf.transaction() as tx:
            tx.create("ObsUnit", {"id": 4260, "name": "again"})  # checked: deleted, free
            drain_until_empty(settings)  # the delete applied, replayed and cleaned
            assert cache_keys(redis_client, settings.site) == []
        assert buf.get("ObsUnit", 4260) == {"id": 4260, "name": "again"}
        drain_until_empty(settings)
        assert obs_unit_names(main_engine, 4260) == ["again"]
    finally:
        buf.close()


def test_a_transaction_pushed_again_is_not_refused_as_taking_its_own_key(settings, redis_client, monkeypatch):
    """A push retried after its reply was lost (or a spool line pushed again after a crash) finds
    its status key: the script leaves it as it is, as before, and does not take the key its own
    first push created for another's."""
    buf = TransactionBuffer(settings=settings)
    keys = SiteKeys(settings.site)
    sent = []
    buffer = buf.spool.buffer

    def recorded(store, *args):
        sent.append(args)
        return buffer(store, *args)

    monkeypatch.setattr(buf.spool, "buffer", recorded)
    try:
        with buf.transaction() as tx:
            tx.create("ObsUnit", {"id": 4270, "name": "once"})
        (tx_id, tx_json, caches), = sent
        assert caches.checked == [("ObsUnit", "4270")]
        BufferStore(redis_client, settings.site).buffer(tx_id, tx_json, caches)  # no error: there already
        assert redis_client.llen(keys.buffer) == 1
        assert redis_client.llen(keys.read_buffer("ObsUnit", "4270")) == 1
        from obs_pipeline.buffer_store import KeyTaken

        other = dataclasses.replace(caches, created=[], overlays=[])
        with pytest.raises(KeyTaken, match=f"^{re.escape(taken(4270))}$"):  # another transaction checking the key
            BufferStore(redis_client, settings.site).buffer("another", tx_json, other)
        assert redis_client.exists(keys.transaction("another")) == 0
    finally:
        buf.close()


def test_a_generated_key_pays_no_check(settings, redis_client, monkeypatch):
    """Only creates whose key the caller gave are checked again by the script."""
    buf = TransactionBuffer(settings=settings)
    sent = []
    buffer = buf.spool.buffer
    monkeypatch.setattr(buf.spool, "buffer", lambda store, *args: (sent.append(args), buffer(store, *args)))
    try:
        with buf.transaction() as tx:
            tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-03-01T00:00:00Z", "status": "x"})
        assert sent[0][2].checked == []
    finally:
        buf.close()


def test_a_spooled_create_whose_key_was_taken_before_its_push_is_dead_lettered(settings, redis_client, main_engine,
                                                                               tmp_path, monkeypatch):
    """A script checks ObsUnit 4280 (free) and spools its create (Redis full); a script on
    another host then buffers a create of 4280 directly. Pushed, the spooled line is refused:
    it goes to the dead-letter list (refused_spool_line, the reason naming the key; status
    failed), nothing of it is buffered, and the line spooled after it is pushed: nothing lost,
    nothing doubled, the spool not stopped."""
    here = TransactionBuffer(settings=settings)
    elsewhere = TransactionBuffer(settings=dataclasses.replace(settings, spool_dir=str(tmp_path / "other-host")))
    monkeypatch.setattr(here.spool, "start_flusher", lambda: None)  # pushed below, after `direct`
    keys = SiteKeys(settings.site)
    limit = redis_client.config_get("maxmemory")["maxmemory"]
    redis_client.config_set("maxmemory", 1)  # full: the spool takes them
    try:
        with here.transaction(endpoint="spooled") as spooled:
            spooled.create("ObsUnit", {"id": 4280, "name": "spooled"})
        with here.transaction(endpoint="after") as after:
            after.create("ObsUnit", {"id": 4281, "name": "after"})
        assert here.spool.pending() == 2
    finally:
        redis_client.config_set("maxmemory", limit)
    try:
        with elsewhere.transaction(endpoint="direct") as direct:
            direct.create("ObsUnit", {"id": 4280, "name": "direct"})
        assert here.spool.flush()
        assert not here.spool.exists()
        letters = [json.loads(letter) for letter in redis_client.lrange(keys.failed, 0, -1)]
        assert [(letter["transaction_id"], letter["failure"]["kind"]) for letter in letters] == \
            [(spooled.transaction_id, "refused_spool_line")]
        reason = letters[0]["failure"]["reason"]
        assert taken(4280) in reason and "\n" not in reason
        assert here.status(spooled.transaction_id) == "failed"
        assert [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.buffer, 0, -1)] == \
            [after.transaction_id, direct.transaction_id]
        assert redis_client.llen(keys.read_buffer("ObsUnit", "4280")) == 1
        assert here.get("ObsUnit", 4280) == {"id": 4280, "name": "direct"}
        assert here.get("ObsUnit", 4281) == {"id": 4281, "name": "after"}
        drain_until_empty(settings)
        assert redis_client.llen(keys.failed) == 1
        assert obs_unit_names(main_engine, 4280) == ["direct"] and obs_unit_names(main_engine, 4281) == ["after"]
    finally:
        here.close()
        elsewhere.close()


def _overlay(raw: bytes) -> dict:
    return json.loads(raw)


def test_a_spooled_line_whose_checked_keys_are_not_pairs_is_set_aside(settings, redis_client, tmp_path):
    """A spooled line's "checked" (the keys its creates found free) is a list of [model, id]; a
    line with anything else there (a hand's edit) goes to the dead-letter list saying so, and the
    push goes on. A line without it (an earlier version's, or without such keys) is pushed."""
    from obs_pipeline.spool import Spool

    spool = Spool(tmp_path, settings.site, flush_store=BufferStore(redis_client, settings.site))
    keys = SiteKeys(settings.site)
    lines = [{"id": "bad", "tx": '{"transaction_id":"bad","steps":[]}', "created": [], "overlays": [],
              "checked": [["ObsUnit"]]},
             {"id": "plain", "tx": '{"transaction_id":"plain","steps":[]}', "created": [], "overlays": []}]
    spool.path.parent.mkdir(parents=True, exist_ok=True)
    spool.path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert spool.flush() and spool.set_aside == 1
    (letter,) = [json.loads(e) for e in redis_client.lrange(keys.failed, 0, -1)]
    assert letter["transaction_id"] == "bad"
    assert 'its "checked" is not a list of [model, id]' in letter["failure"]["reason"]
    assert [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.buffer, 0, -1)] == ["plain"]
