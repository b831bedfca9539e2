"""The whole path on real services: buffer -> drain -> main -> replica -> caches cleaned."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys

import pytest
import sqlalchemy as sa

from obs_pipeline.drain import Drain, DrainConfig
from obs_pipeline.ingest import InvalidTransaction, TransactionBuffer
from obs_pipeline.keys import SiteKeys
from obs_pipeline_tests.conftest import site_keys
from obs_pipeline_tests.examples import seed_example_json

pytestmark = pytest.mark.usefixtures("clean_db")


def drain_until_empty(settings, **config) -> None:
    """One drain run until the buffer is empty, and nothing left waiting to retry: a run stops
    at "buffer empty" with a transaction in `retry` (main refused it for now), and a test that
    then checks what is absent would pass on a write that simply had not happened yet."""
    drain = Drain(settings, DrainConfig(**config))
    try:
        summary = drain.run(until_empty=True, budget_s=60)
        retrying = drain.redis.zrange(drain.store.keys.retry, 0, -1)
    finally:
        drain.close()
    assert summary.stopped_because == "buffer empty", summary
    assert retrying == [], f"waiting to retry after the drain: {retrying}"


def replica_count(replica_engine, table: str, where: str = "true") -> int:
    with replica_engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE {where}")).scalar_one()


def test_seed_example_pushed_with_bare_lpush_is_applied_replicated_and_cleaned(
        settings, redis_client, replica_engine, main_engine):
    raw, tx, ids = seed_example_json(settings.site)
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, raw)  # an existing producer: queue entry only

    drain_until_empty(settings)

    assert replica_count(replica_engine, "executed_obs_unit", f"id = '{ids['uuid-1']}'") == 1
    assert replica_count(replica_engine, "raw_data_package", f"executed_obs_unit_id = '{ids['uuid-1']}'") == 1
    assert replica_count(replica_engine, "raw_data_file", f"raw_data_package_id = '{ids['uuid-2']}'") == 2
    with main_engine.connect() as conn:
        applied = conn.execute(sa.text("SELECT count(*) FROM obs_pipeline_applied WHERE transaction_id = :t"),
                               {"t": tx["transaction_id"]}).scalar_one()
    assert applied == 1
    status = json.loads(redis_client.get(keys.transaction(tx["transaction_id"])))
    assert status["status"] == "replicated"
    # Only the status (with its TTL), the drain's counters and its last claim's token remain.
    assert site_keys(redis_client, settings.site) == sorted([keys.transaction(tx["transaction_id"]), keys.stats,
                                                             keys.last_claim])


def test_transaction_buffer_end_to_end(settings, redis_client, replica_engine):
    buf = TransactionBuffer(settings=settings)
    with buf.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 123, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "running"})
        pkg = tx.create("RawDataPackage", {"name": "obs_123_package", "executed_obs_unit_id": obs["id"]})
        files = tx.bulk_create("RawDataFile", [{"name": "file1.fits", "raw_data_package_id": pkg["id"]},
                                               {"name": "file2.fits", "raw_data_package_id": pkg["id"]}])
    keys = SiteKeys(settings.site)
    assert buf.status(tx.transaction_id) == "pending"
    assert redis_client.llen(keys.buffer) == 1
    for model, rid in [("ExecutedObsUnit", obs["id"]), ("RawDataPackage", pkg["id"]),
                       ("RawDataFile", files[0]["id"])]:
        assert redis_client.exists(keys.buffered(model, rid), keys.cached_id(model, rid)) == 2
    stored = json.loads(redis_client.get(keys.transaction(tx.transaction_id)))
    assert [s["dependencies"] for s in stored["steps"]] == [[], ["step1"], ["step2"]]

    drain_until_empty(settings)

    assert buf.status(tx.transaction_id) == "replicated"
    assert buf.wait(tx.transaction_id, until="replicated", timeout=1)
    assert replica_count(replica_engine, "raw_data_file", f"raw_data_package_id = '{pkg['id']}'") == 2
    for model, rid in [("ExecutedObsUnit", obs["id"]), ("RawDataFile", files[1]["id"])]:
        assert redis_client.exists(keys.buffered(model, rid), keys.cached_id(model, rid)) == 0
    buf.close()


BAD_INPUTS = [
    ("unknown model", lambda tx: tx.create("Telescope", {"name": "x"}), "unknown model 'Telescope'"),
    ("unknown column", lambda tx: tx.create("ObsUnit", {"id": 9, "name": "x", "colour": "red"}),
     "no column 'colour'"),
    ("wrong type", lambda tx: tx.create("ExecutedObsUnit", {"obs_unit_id": "abc", "start_time": "2025-01-01T00:00:00Z",
                                                            "status": "running"}), "is not an integer"),
    ("the same key twice in one transaction", lambda tx: tx.bulk_create("ObsUnit", [{"id": 601, "name": "a"},
                                                                                   {"id": 601, "name": "b"}]),
     "ObsUnit 601 is created twice in this transaction"),
    ("integer beyond the column", lambda tx: tx.create("ObsUnit", {"id": 2**31, "name": "x"}),
     "2147483648 is out of range for a 32-bit integer column"),
    ("bad datetime", lambda tx: tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "yesterday",
                                                              "status": "running"}), "not an ISO-8601 datetime"),
    ("datetime beyond year 1 in UTC", lambda tx: tx.create("ExecutedObsUnit", {
        "obs_unit_id": 1, "start_time": "0001-01-01T00:00:00+01:00", "status": "running"}),
     "'0001-01-01T00:00:00+01:00' is outside years 1-9999 once in UTC"),
    ("missing required column", lambda tx: tx.create("RawDataPackage", {"name": "p"}),
     "missing required column(s) executed_obs_unit_id"),
    ("an object where text belongs", lambda tx: tx.create("RawDataPackage", {"name": object(),
                                                                      "executed_obs_unit_id": None}),
     "is not a string"),
    ("update of unknown id", lambda tx: tx.update("ExecutedObsUnit", "8f3e1c8e-7a43-4f0e-9d8e-0c1f5a7b9d21",
                                                  {"status": "done"}), "neither buffered nor on the replica"),
    ("delete of unknown id", lambda tx: tx.delete("RawDataFile", "8f3e1c8e-7a43-4f0e-9d8e-0c1f5a7b9d21"),
     "neither buffered nor on the replica"),
    ("bad id", lambda tx: tx.update("ExecutedObsUnit", "uuid-1", {"status": "done"}),  # as the call's other errors
     "update of ExecutedObsUnit: ExecutedObsUnit.id: 'uuid-1' is not a UUID"),  # (it read "ExecutedObsUnit id: ...")
]


@pytest.mark.parametrize("name,action,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error_and_buffers_nothing(settings, redis_client, name, action, message):
    buf = TransactionBuffer(settings=settings)
    with pytest.raises(InvalidTransaction) as info:
        with buf.transaction(endpoint="bad") as tx:
            tx.create("ObsUnit", {"id": 77, "name": "fine step before the bad one"})
            action(tx)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert site_keys(redis_client, settings.site) == []
    buf.close()


def _start(tx) -> tuple[dict, dict]:
    obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z", "status": "running"})
    return obs, tx.create("RawDataPackage", {"name": "p", "executed_obs_unit_id": obs["id"]})


def _update_the_package_id_as_an_observation(tx):
    _, pkg = _start(tx)
    tx.update("ExecutedObsUnit", pkg["id"], {"status": "completed"})


def _update_after_delete(tx):
    obs, _ = _start(tx)
    tx.delete("ExecutedObsUnit", obs["id"])
    tx.update("ExecutedObsUnit", obs["id"], {"status": "completed"})


def _delete_twice(tx):
    _, pkg = _start(tx)
    tx.delete("RawDataPackage", pkg["id"])
    tx.delete("RawDataPackage", pkg["id"])


IN_BLOCK_MISSING = [
    ("another model's id created in the block", _update_the_package_id_as_an_observation,
     "neither buffered nor on the replica"),
    ("update after a delete in the block", _update_after_delete, "is deleted earlier in this transaction"),
    ("delete after a delete in the block", _delete_twice, "is deleted earlier in this transaction"),
]


@pytest.mark.parametrize("name,action,message", IN_BLOCK_MISSING, ids=[b[0] for b in IN_BLOCK_MISSING])
def test_an_update_or_delete_in_a_block_of_a_record_that_is_not_there_is_refused(settings, redis_client, name,
                                                                                  action, message):
    """tx.update/tx.delete took any id created earlier in the block, whatever its model, and
    one deleted earlier in it: the whole transaction (its good creates too) was buffered, and
    the drain dead-lettered it ("no executed_obs_unit row ... to update"). The contract refuses
    an update or delete of a record neither buffered nor on the replica, inside a block too."""
    buf = TransactionBuffer(settings=settings)
    with pytest.raises(InvalidTransaction, match=message) as info:
        with buf.transaction(endpoint="bad") as tx:
            action(tx)
    assert "\n" not in str(info.value)
    assert site_keys(redis_client, settings.site) == []
    buf.close()


@pytest.mark.usefixtures("clean_db")
def test_a_create_of_a_key_that_exists_is_refused_at_once(settings, redis_client):
    """Obs unit 1 is on the replica, obs unit 700 only buffered: creating either again is an
    error now, not a dead letter later (main's unique key) with the buffered copy hiding the
    real row from reads meanwhile. A key that is free is fine."""
    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as tx:
        tx.create("ObsUnit", {"id": 700, "name": "buffered"})
    for key in (1, 700):
        with pytest.raises(InvalidTransaction, match=f"ObsUnit {key} exists already"):
            with buf.transaction() as again:
                again.create("ObsUnit", {"id": key, "name": "again"})
    with buf.transaction() as fresh:
        fresh.create("ObsUnit", {"id": 701, "name": "new"})
    assert redis_client.llen(SiteKeys(settings.site).buffer) == 2
    buf.close()


def test_exception_inside_block_buffers_nothing(settings, redis_client):
    buf = TransactionBuffer(settings=settings)
    with pytest.raises(RuntimeError):
        with buf.transaction() as tx:
            tx.create("ObsUnit", {"id": 78, "name": "x"})
            raise RuntimeError("script failed half-way")
    assert site_keys(redis_client, settings.site) == []
    buf.close()


@pytest.mark.parametrize("endpoint, message", [
    (None, "endpoint must be a string, not NoneType"),
    (5, "endpoint must be a string, not int"),
    (["start"], "endpoint must be a string, not list"),
    (b"start", "endpoint must be a string, not bytes"),
    ("start\x00", "endpoint 'start\\x00': text may not contain NUL characters"),
    ("start\ud800", "endpoint 'start\\ud800': text is not valid Unicode (a lone surrogate)"),
])
def test_an_endpoint_that_is_not_text_is_refused_and_buffers_nothing(settings, redis_client, endpoint, message):
    """The wire format's `endpoint` is text (the existing system's model reads a str). Ingest
    buffered `"endpoint": null`, a number or a list as they came, and bytes raised a bare
    TypeError from the JSON writer."""
    buf = TransactionBuffer(settings=settings)
    with pytest.raises(InvalidTransaction, match=re.escape(message)):
        with buf.transaction(endpoint=endpoint) as tx:
            tx.create("ObsUnit", {"id": 883, "name": "x"})
    assert site_keys(redis_client, settings.site) == []
    buf.close()


@pytest.mark.parametrize("ended_by", ["commit", "exception"])
def test_a_transaction_whose_block_has_ended_refuses_more_steps(settings, redis_client, ended_by):
    """`tx.create` after the block returned a record with an id and buffered nothing, and a
    second `with tx:` was dropped as a duplicate of the first: the script believed its
    observation recorded. Both now raise InvalidTransaction in one line."""
    buf = TransactionBuffer(settings=settings)
    tx = buf.transaction()
    with pytest.raises(RuntimeError) if ended_by == "exception" else contextlib.nullcontext():
        with tx:
            tx.create("ObsUnit", {"id": 880, "name": "in the block"})
            if ended_by == "exception":
                raise RuntimeError("script failed half-way")
    before = site_keys(redis_client, settings.site)
    with pytest.raises(InvalidTransaction, match="has ended") as info:
        tx.create("ObsUnit", {"id": 881, "name": "after the block"})
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidTransaction, match="has ended"):
        with tx:
            tx.create("ObsUnit", {"id": 882, "name": "in the block again"})
    with pytest.raises(InvalidTransaction, match="has ended"):
        tx.delete("ObsUnit", 880)
    assert site_keys(redis_client, settings.site) == before
    buf.close()


def test_a_block_entered_again_while_it_is_open_is_refused_and_buffers_nothing(settings, redis_client):
    """`with tx:` inside its own open block (a helper given `tx` that opens the block again):
    the inner block ended the transaction, and when its body raised and the script caught it,
    the outer block's end buffered the transaction, the failed inner block's step included,
    though an exception inside a block buffers nothing. Now the inner `with` is refused in one
    line, and the outer block, ended by that, buffers nothing."""
    buf = TransactionBuffer(settings=settings)
    try:
        with pytest.raises(InvalidTransaction, match="is open already") as info:
            with buf.transaction() as tx:
                tx.create("ObsUnit", {"id": 886, "name": "outer"})
                try:
                    with tx:
                        tx.create("ObsUnit", {"id": 887, "name": "inner, failed"})
                        raise RuntimeError("the helper failed")
                except RuntimeError:
                    pass
        assert "\n" not in str(info.value)
        assert site_keys(redis_client, settings.site) == []
        assert buf.status(tx.transaction_id) is None
    finally:
        buf.close()


@pytest.mark.usefixtures("clean_db")
def test_steps_added_before_the_block_are_refused_and_the_block_then_buffers(settings, redis_client):
    """`tx = buf.transaction(); tx.create(...)` without a `with` block returned the record with
    its id and buffered nothing, ever (the block's end buffers a transaction): the script
    believed its observation recorded. Now one line saying to use the block, nothing kept;
    the same builder in a block then buffers as usual."""
    buf = TransactionBuffer(settings=settings)
    try:
        tx = buf.transaction()
        for call in (lambda: tx.create("ObsUnit", {"id": 884, "name": "outside"}),
                     lambda: tx.bulk_create("ObsUnit", [{"id": 885, "name": "outside"}]),
                     lambda: tx.update("ObsUnit", 123, {"name": "outside"}),
                     lambda: tx.delete("ObsUnit", 123)):
            with pytest.raises(InvalidTransaction, match=r"steps are added inside its `with` block") as info:
                call()
            assert "\n" not in str(info.value)
        assert site_keys(redis_client, settings.site) == []
        with tx:
            tx.create("ObsUnit", {"id": 884, "name": "inside"})
        assert buf.status(tx.transaction_id) == "pending"
        assert buf.get("ObsUnit", 884) == {"id": 884, "name": "inside"}
    finally:
        buf.close()


def test_ingest_import_is_light():
    code = "import sys, obs_pipeline.ingest; print(sorted(m for m in ('dagster', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_status_changes_touch_only_the_transaction_status(settings, redis_client):
    """Statuses are rewritten in place by Lua while the transaction waits; a step's own
    `status` column and an endpoint that contains the same text must stay as they were. Once
    replicated, the status key shrinks to a short record (the rows are on the replica)."""
    buf = TransactionBuffer(settings=settings)
    with buf.transaction(endpoint='odd "status":"pending" endpoint') as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "pending"})
    key = SiteKeys(settings.site).transaction(tx.transaction_id)
    assert buf.store.set_status([tx.transaction_id, "no-such-transaction"], "processing") == ["no-such-transaction"]
    doc = json.loads(redis_client.get(key))
    assert doc["status"] == "processing"
    assert doc["endpoint"] == 'odd "status":"pending" endpoint'
    assert doc["steps"][0]["data"]["status"] == "pending"
    assert redis_client.get(SiteKeys(settings.site).transaction("no-such-transaction")) is None

    drain_until_empty(settings)
    doc = json.loads(redis_client.get(key))
    assert doc["status"] == "replicated" and doc["transaction_id"] == tx.transaction_id
    assert doc["commit_lsn"].count("/") == 1 and "steps" not in doc
    assert redis_client.get(key).endswith(b'"commit_lsn":"' + doc["commit_lsn"].encode() + b'"}')  # no "\/" 
    assert 0 < redis_client.ttl(key) <= 7 * 24 * 3600
    assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "pending"
    buf.close()


def test_ingest_after_redis_forgot_its_scripts_buffers_once(settings, redis_client):
    """Ingest calls its script by SHA on the thread's own connection; a Redis that lost its
    scripts (restarted, SCRIPT FLUSH) answers NOSCRIPT, and the call loads the script and
    buffers the transaction once, not spooled and not twice."""
    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as first:
        first.create("ObsUnit", {"id": 900, "name": "before"})
    redis_client.script_flush()
    with buf.transaction() as second:
        second.create("ObsUnit", {"id": 901, "name": "after"})
    keys = SiteKeys(settings.site)
    queued = [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.buffer, 0, -1)]
    assert queued == [second.transaction_id, first.transaction_id]
    assert buf.status(second.transaction_id) == "pending" and buf.spool.pending() == 0
    assert json.loads(redis_client.get(keys.buffered("ObsUnit", "901")))["name"] == "after"
    buf.close()


@pytest.mark.parametrize("replica", [True, False], ids=["with a replica", "without a replica"])
@pytest.mark.parametrize("call", [
    lambda buf, outer, rid: buf.update("ExecutedObsUnit", rid, {"status": "completed"}),
    lambda buf, outer, rid: buf.delete("ExecutedObsUnit", rid),
    lambda buf, outer, rid: _in_another_block(buf, rid),
], ids=["buf.update", "buf.delete", "another block's tx.update"])
def test_a_record_an_open_block_creates_is_written_in_that_block_not_beside_it(
        settings, redis_client, main_engine, replica, call):
    """`buf.update(...)` (or another block's step) of a record the still-open block created is
    buffered as a transaction of its own before the block's end buffers the create: the drain
    applied the update first, to no row, and dead-lettered it (without a replica it was taken;
    with one, the line said the record was "neither buffered nor on the replica"). Now one line
    naming the open transaction and what to write, nothing buffered; the block still buffers its
    create, and the drain applies it once."""
    import dataclasses

    buf = TransactionBuffer(settings=settings if replica else dataclasses.replace(settings, replica_db_url=None))
    try:
        with buf.transaction() as tx:
            obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                                "status": "running"})
            with pytest.raises(InvalidTransaction, match=rf"ExecutedObsUnit {obs['id']} is created by transaction "
                                                         rf"{tx.transaction_id}, whose `with` block is still open") as info:
                call(buf, tx, obs["id"])
            assert "\n" not in str(info.value)
            assert site_keys(redis_client, settings.site) == []  # nothing buffered beside the block
        assert len(redis_client.lrange(SiteKeys(settings.site).buffer, 0, -1)) == 1  # the block's transaction
    finally:
        buf.close()
    drain_until_empty(settings)
    assert redis_client.llen(SiteKeys(settings.site).failed) == 0
    with main_engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :id"), {"id": obs["id"]}).all()
    assert rows == [("running",)]


def _in_another_block(buf, rid) -> None:
    with buf.transaction() as other:
        other.update("ExecutedObsUnit", rid, {"status": "completed"})
