"""Read your writes (issue 4): get/search merge the replica with buffered creates, pending
updates (per column) and pending deletes; the read buffer is attributed per transaction;
events go out after commit; `wait` listens to them. Real stack (conftest.py)."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
import uuid

import pytest
import sqlalchemy as sa

from obs_pipeline.config import ConfigError, Settings
from obs_pipeline.drain import Drain, DrainConfig
from obs_pipeline.ingest import InvalidTransaction, TransactionBuffer
from obs_pipeline.keys import SiteKeys
from obs_pipeline.stack.osutil import wait_until
from obs_pipeline_tests.conftest import site_keys
from obs_pipeline_tests.test_walking_skeleton import drain_until_empty
from obs_pipeline_tests.workload import drain_steps, replay_paused

pytestmark = pytest.mark.usefixtures("clean_db")

T0 = "2025-01-01T00:00:00+00:00"


@pytest.fixture
def buf(settings):
    buffer = TransactionBuffer(settings=settings)
    yield buffer
    buffer.close()


def start_observation(buf: TransactionBuffer, unit: int = 123, start: str = T0, files: int = 2):
    with buf.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": unit, "start_time": start, "status": "running"})
        pkg = tx.create("RawDataPackage", {"name": f"pkg-{obs['id'][:8]}", "executed_obs_unit_id": obs["id"]})
        made = tx.bulk_create("RawDataFile", [{"name": f"f{i}.fits", "raw_data_package_id": pkg["id"]}
                                              for i in range(files)]) if files else []
    return obs, pkg, made, tx.transaction_id


def cache_keys(redis_client, site: str) -> list[str]:
    """Keys that hold buffered state for reads (must all be gone once everything replicated)."""
    kinds = (":buffered:", ":read_buffer:", ":index:", ":overlaid:", ":cache:ids:")
    return [k for k in site_keys(redis_client, site) if any(kind in k for kind in kinds)]


def ids_of(rows) -> list[str]:
    return sorted(r["id"] for r in rows)


# --- creates ----------------------------------------------------------------------------------

def test_buffered_creates_are_found_at_once_with_every_column(buf):
    obs, pkg, files, _ = start_observation(buf)
    got = buf.get("ExecutedObsUnit", obs["id"])
    assert got == {"id": obs["id"], "obs_unit_id": 123, "start_time": T0, "end_time": None, "status": "running"}
    assert list(got) == ["id", "obs_unit_id", "start_time", "end_time", "status"]
    assert buf.get("RawDataPackage", uuid.UUID(pkg["id"]))["name"] == pkg["name"]  # a UUID object works too
    assert ids_of(buf.search("RawDataFile", {"raw_data_package_id": pkg["id"]})) == ids_of(files)
    assert ids_of(buf.search("ExecutedObsUnit", {"obs_unit_id": [1, 123]})) == [obs["id"]]
    assert buf.search("ExecutedObsUnit", {"obs_unit_id": 1}) == []
    assert buf.get("ExecutedObsUnit", str(uuid.uuid4())) is None


def test_filters_equality_any_of_null_and_time_windows(buf, settings):
    early, *_ = start_observation(buf, unit=1, start="2025-01-01T00:00:00Z", files=0)
    middle, *_ = start_observation(buf, unit=2, start="2025-01-01T01:30:00+01:00", files=0)  # 00:30 UTC
    late, *_ = start_observation(buf, unit=3, start="2025-01-01T02:00:00Z", files=0)
    buf.update("ExecutedObsUnit", late["id"], {"end_time": "2025-01-01T03:00:00Z", "status": "completed"})
    drain_until_empty(settings)  # `early` and `late` on the replica, `middle` buffered again below
    middle2, *_ = start_observation(buf, unit=2, start="2025-01-01T00:45:00Z", files=0)

    def check() -> None:
        window = {"start_time": {">=": "2025-01-01T00:15:00Z", "<": "2025-01-01T02:00:00Z"}}
        assert ids_of(buf.search("ExecutedObsUnit", window)) == sorted([middle["id"], middle2["id"]])
        assert ids_of(buf.search("ExecutedObsUnit", {"start_time": {">": "2025-01-01T00:45:00+00:00"}})) == \
            [late["id"]]
        assert ids_of(buf.search("ExecutedObsUnit", {"end_time": None})) == \
            sorted([early["id"], middle["id"], middle2["id"]])
        assert ids_of(buf.search("ExecutedObsUnit", {"end_time": {"!=": None}})) == [late["id"]]
        assert ids_of(buf.search("ExecutedObsUnit", {"status": ["completed", "aborted"]})) == [late["id"]]
        assert ids_of(buf.search("ExecutedObsUnit", {"obs_unit_id": 2, "status": "running"})) == \
            sorted([middle["id"], middle2["id"]])
        assert ids_of(buf.search("ExecutedObsUnit", {"status": {"<": "running"}})) == [late["id"]]
        assert ids_of(buf.search("ExecutedObsUnit", {"obs_unit_id": [2, None]})) == \
            sorted([middle["id"], middle2["id"]])
        assert buf.search("ExecutedObsUnit", {"obs_unit_id": []}) == []
        assert len(buf.search("ExecutedObsUnit")) == 4

    check()               # replica rows and buffered rows mixed
    drain_until_empty(settings)
    check()               # all from the replica: the same answers


@pytest.mark.parametrize("filters,message", [
    ({"colour": "red"}, "has no column 'colour'"),
    ({"start_time": {"~": "2025-01-01T00:00:00Z"}}, "unknown operator '~'"),
    ({"start_time": {}}, "empty comparison"),
    ({"obs_unit_id": "abc"}, "is not an integer"),
    ({"start_time": {">=": "yesterday"}}, "not an ISO-8601 datetime"),
    ({"start_time": {"<": None}}, "matches nothing"),
    ("obs_unit_id = 1", "must be a dict"),
    ([], "must be a dict of column -> value, not list"),  # not "no filter": every record
    ("", "must be a dict of column -> value, not str"),
])
def test_bad_filters_raise_invalid_transaction(buf, filters, message):
    start_observation(buf, files=0)
    with pytest.raises(InvalidTransaction, match=message):
        buf.search("ExecutedObsUnit", filters)


def test_bad_model_or_id_raise_invalid_transaction(buf):
    with pytest.raises(InvalidTransaction, match="unknown model 'Telescope'"):
        buf.search("Telescope", {})
    with pytest.raises(InvalidTransaction, match="is not a UUID"):
        buf.get("ExecutedObsUnit", "uuid-1")


def test_smart_queries_refuse_to_start_without_a_replica(settings):
    buf = TransactionBuffer(settings=Settings(site=settings.site, redis_url=settings.redis_url,
                                              spool_dir=settings.spool_dir))
    try:
        with pytest.raises(ConfigError, match="OBS_REPLICA_DB_URL"):
            buf.get("ExecutedObsUnit", str(uuid.uuid4()))
        with pytest.raises(ConfigError, match="OBS_REPLICA_DB_URL"):
            buf.search("ExecutedObsUnit", {})
    finally:
        buf.close()


def test_datetimes_come_back_in_utc_whether_buffered_or_replicated(buf, settings):
    with buf.transaction() as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-06-01T14:00:00+02:00",
                                            "status": "running"})
    buf.update("ExecutedObsUnit", obs["id"], {"end_time": "2025-06-01T10:30:00.250000-02:00"})
    expected = {"start_time": "2025-06-01T12:00:00+00:00", "end_time": "2025-06-01T12:30:00.250000+00:00"}
    assert {k: buf.get("ExecutedObsUnit", obs["id"])[k] for k in expected} == expected
    drain_until_empty(settings)
    assert {k: buf.get("ExecutedObsUnit", obs["id"])[k] for k in expected} == expected


# --- the read buffer ----------------------------------------------------------------------------

def test_update_of_buffered_record_is_an_attributed_overlay_applied_per_column(buf, redis_client, settings):
    obs, *_ = start_observation(buf, files=0)
    tx1 = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
    tx2 = buf.update("ExecutedObsUnit", obs["id"], {"end_time": "2025-01-01T01:00:00Z"})
    got = buf.get("ExecutedObsUnit", obs["id"])
    assert (got["status"], got["end_time"], got["start_time"]) == ("completed", "2025-01-01T01:00:00+00:00", T0)
    keys = SiteKeys(settings.site)
    entries = [json.loads(e) for e in redis_client.lrange(keys.read_buffer("ExecutedObsUnit", obs["id"]), 0, -1)]
    assert [(e["tx"], e["op"], e["data"]) for e in entries] == [
        (tx1, "update", {"status": "completed"}), (tx2, "update", {"end_time": "2025-01-01T01:00:00+00:00"})]
    assert redis_client.lindex(keys.read_buffer("ExecutedObsUnit", obs["id"]), 0).startswith(b'{"tx":')
    # the buffered create itself is untouched: overlays are separate, per transaction
    assert json.loads(redis_client.get(keys.buffered("ExecutedObsUnit", obs["id"])))["status"] == "running"
    assert buf.search("ExecutedObsUnit", {"status": "running"}) == []
    assert ids_of(buf.search("ExecutedObsUnit", {"status": "completed"})) == [obs["id"]]


def test_update_and_delete_inside_the_creating_transaction(buf, settings, redis_client):
    with buf.transaction() as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": T0, "status": "running"})
        gone = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": T0, "status": "running"})
        tx.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
        tx.delete("ExecutedObsUnit", gone["id"])
    assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "completed"
    assert buf.get("ExecutedObsUnit", gone["id"]) is None
    assert [r["status"] for r in buf.search("ExecutedObsUnit", {"obs_unit_id": 1})] == ["completed"]
    drain_until_empty(settings)
    assert buf.get("ExecutedObsUnit", gone["id"]) is None
    assert [r["status"] for r in buf.search("ExecutedObsUnit", {"obs_unit_id": 1})] == ["completed"]
    assert cache_keys(redis_client, settings.site) == []


def test_delete_of_buffered_record_hides_it_then_it_never_reaches_the_replica(buf, settings, redis_client,
                                                                              replica_engine):
    obs, pkg, files, _ = start_observation(buf, files=3)
    buf.delete("RawDataFile", files[0]["id"])
    assert buf.get("RawDataFile", files[0]["id"]) is None
    assert ids_of(buf.search("RawDataFile", {"raw_data_package_id": pkg["id"]})) == ids_of(files[1:])
    with pytest.raises(InvalidTransaction, match="neither buffered nor on the replica"):
        buf.update("RawDataFile", files[0]["id"], {"name": "again.fits"})
    drain_until_empty(settings)
    assert buf.get("RawDataFile", files[0]["id"]) is None
    assert ids_of(buf.search("RawDataFile", {"raw_data_package_id": pkg["id"]})) == ids_of(files[1:])
    with replica_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM raw_data_file WHERE id = :i"),
                            {"i": files[0]["id"]}).scalar_one() == 0
    assert cache_keys(redis_client, settings.site) == []


def test_replicating_one_update_keeps_another_transactions_pending_overlay(buf, settings, redis_client):
    """Create, update 1 and update 2 buffered; drain one transaction at a time."""
    obs, *_ = start_observation(buf, files=0)
    tx1 = buf.update("ExecutedObsUnit", obs["id"], {"status": "stopping", "end_time": "2025-01-01T01:00:00Z"})
    tx2 = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
    keys = SiteKeys(settings.site)
    read_buffer = keys.read_buffer("ExecutedObsUnit", obs["id"])
    expected = {"status": "completed", "end_time": "2025-01-01T01:00:00+00:00"}

    def current():
        row = buf.get("ExecutedObsUnit", obs["id"])
        return {k: row[k] for k in expected}

    drain_steps(settings, 1)  # the create: replicated and cleaned, both overlays stay
    assert not redis_client.exists(keys.buffered("ExecutedObsUnit", obs["id"]))
    assert [json.loads(e)["tx"] for e in redis_client.lrange(read_buffer, 0, -1)] == [tx1, tx2]
    assert current() == expected                          # replica row + two overlays
    drain_steps(settings, 1)  # update 1: only its own overlay goes
    assert [json.loads(e)["tx"] for e in redis_client.lrange(read_buffer, 0, -1)] == [tx2]
    assert buf.status(tx1) == "replicated" and buf.status(tx2) == "pending"
    assert current() == expected                          # replica (update 1) + overlay of update 2
    assert ids_of(buf.search("ExecutedObsUnit", {"status": "completed"})) == [obs["id"]]
    assert buf.search("ExecutedObsUnit", {"status": "stopping"}) == []
    assert redis_client.sismember(keys.overlay_index("ExecutedObsUnit"), obs["id"])  # found by search through it
    assert not redis_client.sismember(keys.model_index("ExecutedObsUnit"), obs["id"])  # its create is replicated
    drain_steps(settings, 1)
    assert current() == expected
    assert cache_keys(redis_client, settings.site) == []


def test_two_transactions_overlaying_one_record_in_one_batch_are_cleaned_together(buf, settings, redis_client):
    obs, *_ = start_observation(buf, files=0)
    drain_until_empty(settings)
    buf.update("ExecutedObsUnit", obs["id"], {"status": "a"})
    buf.update("ExecutedObsUnit", obs["id"], {"status": "b"})
    buf.update("ExecutedObsUnit", obs["id"], {"status": "c"})
    drain_steps(settings, 1, batch_size=2)
    assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "c"
    assert len(redis_client.lrange(SiteKeys(settings.site).read_buffer("ExecutedObsUnit", obs["id"]), 0, -1)) == 1
    drain_steps(settings, 1, batch_size=2)
    assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "c"
    assert cache_keys(redis_client, settings.site) == []


# --- records already replicated -------------------------------------------------------------

def test_update_of_replicated_record_is_visible_at_once_and_found_by_new_value(buf, settings, redis_client):
    obs, pkg, files, _ = start_observation(buf)
    drain_until_empty(settings)
    assert cache_keys(redis_client, settings.site) == []
    buf.update("ExecutedObsUnit", obs["id"], {"status": "completed", "end_time": "2025-01-01T02:00:00Z"})
    buf.update("RawDataFile", files[0]["id"], {"name": "renamed.fits"})

    def check() -> None:
        assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "completed"
        assert ids_of(buf.search("ExecutedObsUnit", {"status": "completed"})) == [obs["id"]]  # replica says running
        assert buf.search("ExecutedObsUnit", {"status": "running"}) == []
        assert [r["status"] for r in buf.search("ExecutedObsUnit", {"obs_unit_id": 123})] == ["completed"]
        assert [r["status"] for r in buf.search("ExecutedObsUnit", {"end_time": {">": "2025-01-01T01:00:00Z"}})] \
            == ["completed"]
        names = sorted(r["name"] for r in buf.search("RawDataFile", {"raw_data_package_id": pkg["id"]}))
        assert names == ["f1.fits", "renamed.fits"]
        assert [r["id"] for r in buf.search("RawDataFile", {"name": "renamed.fits"})] == [files[0]["id"]]

    check()
    drain_until_empty(settings)
    check()
    assert cache_keys(redis_client, settings.site) == []


def test_delete_of_replicated_record_hides_it_at_once(buf, settings):
    obs, pkg, files, _ = start_observation(buf)
    drain_until_empty(settings)
    buf.delete("RawDataFile", files[1]["id"])
    for _ in range(2):
        assert buf.get("RawDataFile", files[1]["id"]) is None
        assert ids_of(buf.search("RawDataFile", {})) == [files[0]["id"]]
        assert ids_of(buf.search("RawDataFile", {"name": "f1.fits"})) == []
        drain_until_empty(settings)


def test_integer_primary_keys(buf, settings):
    with buf.transaction() as tx:
        tx.create("ObsUnit", {"id": 500, "name": "new unit"})
    buf.update("ObsUnit", 1, {"name": "renamed unit"})  # on the replica (clean_db)
    for _ in range(2):
        assert buf.get("ObsUnit", 500) == {"id": 500, "name": "new unit"}
        assert buf.get("ObsUnit", 1) == {"id": 1, "name": "renamed unit"}
        assert buf.search("ObsUnit", {"name": "renamed unit"}) == [{"id": 1, "name": "renamed unit"}]
        assert [r["id"] for r in buf.search("ObsUnit", {})] == [1, 2, 3, 123, 500]
        assert [r["id"] for r in buf.search("ObsUnit", {"id": {">=": 123}})] == [123, 500]
        drain_until_empty(settings)



def test_a_key_deleted_and_created_again_shows_the_new_record(buf, settings, redis_client):
    """An integer key is the caller's: a buffered delete, then a create with the same key. The
    pending delete must not hide the new record, and cleaning the first create must not take
    the second one's buffered record with it."""
    def check(expected_1: dict, expected_500: dict) -> None:
        assert buf.get("ObsUnit", 1) == expected_1
        assert buf.get("ObsUnit", 500) == expected_500
        assert buf.search("ObsUnit", {"id": [1, 500]}) == [expected_1, expected_500]
        assert buf.search("ObsUnit", {"name": expected_500["name"]}) == [expected_500]

    buf.delete("ObsUnit", 1)                                 # on the replica (clean_db)
    with buf.transaction() as tx:
        tx.create("ObsUnit", {"id": 1, "name": "unit 1 again"})
    with buf.transaction() as tx:
        tx.create("ObsUnit", {"id": 500, "name": "first"})
    buf.delete("ObsUnit", 500)
    with buf.transaction() as tx:
        tx.create("ObsUnit", {"id": 500, "name": "second"})
    buf.update("ObsUnit", 500, {"name": "second, renamed"})  # refused while the record was hidden
    one, five = {"id": 1, "name": "unit 1 again"}, {"id": 500, "name": "second, renamed"}
    check(one, five)
    for _ in range(6):  # one transaction at a time: each state in between, from caches and replica
        drain_steps(settings, 1)
        check(one, five)
    drain_until_empty(settings)
    check(one, five)
    assert cache_keys(redis_client, settings.site) == []


@pytest.mark.parametrize("first", ["replicated", "buffered"])
def test_a_generated_key_deleted_and_created_again_with_it_given_shows_the_new_record(
        buf, settings, redis_client, main_engine, replica_engine, first):
    """A uuid key is generated, but a script may give it: delete an observation (replicated, or
    still buffered), then create it again under the same id. Its pending delete must not hide
    the new record, at any stage until it is replicated, and the create's overlay is cleaned."""
    with buf.transaction() as tx:  # (no package: main would refuse the delete)
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 123, "start_time": T0, "status": "running"})
    if first == "replicated":
        drain_until_empty(settings)
    buf.delete("ExecutedObsUnit", obs["id"])
    assert buf.get("ExecutedObsUnit", obs["id"]) is None
    given = obs["id"] if first == "replicated" else uuid.UUID(obs["id"])  # as text, or as a UUID
    with buf.transaction() as tx:
        again = tx.create("ExecutedObsUnit", {"id": given, "obs_unit_id": 1, "start_time": "2025-01-02T00:00:00Z",
                                              "status": "again"})
    assert again["id"] == obs["id"]
    expected = {"id": obs["id"], "obs_unit_id": 1, "start_time": "2025-01-02T00:00:00+00:00", "end_time": None,
                "status": "again"}
    def check(stage: str) -> None:
        assert buf.get("ExecutedObsUnit", obs["id"]) == expected, stage
        assert buf.search("ExecutedObsUnit", {"id": obs["id"]}) == [expected], stage
        assert buf.search("ExecutedObsUnit", {"status": "again"}) == [expected], stage
        assert buf.search("ExecutedObsUnit", {"obs_unit_id": 1}) == [expected], stage
        assert buf.search("ExecutedObsUnit", {"obs_unit_id": 123}) == [], stage  # not the deleted one
        assert buf.search("ExecutedObsUnit", {"status": "running"}) == [], stage

    check("buffered")
    keys = SiteKeys(settings.site)
    read_buffer = keys.read_buffer("ExecutedObsUnit", obs["id"])
    assert [json.loads(e)["op"] for e in redis_client.lrange(read_buffer, 0, -1)] == ["delete", "create"]
    pending = 2 if first == "replicated" else 3
    with replay_paused(replica_engine):  # applied on main, the replica behind: caches kept
        drain = Drain(settings, DrainConfig(batch_size=1, replication_timeout_s=0.3))
        try:
            drain.acquire()
            drain.step()
        finally:
            drain.close()
        check("first applied, not replayed")
    for step in range(pending):  # one transaction at a time, each state in between
        drain_steps(settings, 1)
        check(f"after drain step {step + 1}")
    drain_until_empty(settings)
    check("drained")
    assert [k for k in cache_keys(redis_client, settings.site) if obs["id"] in k] == []
    assert not redis_client.sismember(keys.overlay_index("ExecutedObsUnit"), obs["id"])
    assert not redis_client.sismember(keys.model_index("ExecutedObsUnit"), obs["id"])
    assert cache_keys(redis_client, settings.site) == []
    with main_engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id::text, obs_unit_id, status FROM executed_obs_unit")).all()
    assert rows == [(obs["id"], 1, "again")]

CHECKS_AFTER_CLEANUP = {
    "get: overlay on a replicated row": lambda buf, r: buf.get("ExecutedObsUnit", r["obs"])["status"] == "completed",
    "search by the overlaid column": lambda buf, r: [x["id"] for x in buf.search(
        "ExecutedObsUnit", {"status": "completed", "obs_unit_id": r["unit"]})] == [r["obs"]],
    "search hides the pending delete": lambda buf, r: ids_of(buf.search(
        "RawDataFile", {"raw_data_package_id": r["pkg"]})) == [r["kept"]],
    "search: buffered create + overlay on a replicated row": lambda buf, r: sorted(x["name"] for x in buf.search(
        "RawDataPackage", {"executed_obs_unit_id": r["obs"]})) == ["later", "renamed"],
    "get: delete pending": lambda buf, r: buf.get("RawDataFile", r["deleted"]) is None,
}


@pytest.mark.parametrize("name", list(CHECKS_AFTER_CLEANUP))
def test_cleanup_between_the_cache_read_and_the_replica_read(buf, settings, monkeypatch, name):
    """The drain applies, replays and cleans right after a reader read the caches, before it
    reads the replica: the reader must still see the latest state, nothing older, nothing lost."""
    obs, pkg, files, _ = start_observation(buf, unit=2)
    drain_until_empty(settings)
    buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})  # overlay on a replicated row
    buf.delete("RawDataFile", files[0]["id"])
    with buf.transaction() as tx:
        tx.create("RawDataPackage", {"name": "later", "executed_obs_unit_id": obs["id"]})
        tx.update("RawDataPackage", pkg["id"], {"name": "renamed"})
    records = {"obs": obs["id"], "unit": 2, "pkg": pkg["id"], "kept": files[1]["id"], "deleted": files[0]["id"]}
    original = type(buf.query)._select
    cleaned = []

    def select_after_cleanup(self, spec, stmt, *said):
        if not cleaned:
            drain_until_empty(settings)
            cleaned.append(True)
        return original(self, spec, stmt, *said)

    monkeypatch.setattr(type(buf.query), "_select", select_after_cleanup)
    assert CHECKS_AFTER_CLEANUP[name](buf, records)
    assert cleaned or name == "get: delete pending"  # a pending delete needs no replica read
    monkeypatch.undo()
    assert CHECKS_AFTER_CLEANUP[name](buf, records)  # and from the replica alone


# --- pandas ---------------------------------------------------------------------------------------

def test_search_frame_dtypes(buf, settings):
    pd = pytest.importorskip("pandas")
    replicated, *_ = start_observation(buf, files=0)
    buf.update("ExecutedObsUnit", replicated["id"], {"end_time": "2025-01-01T01:00:00Z", "status": "completed"})
    drain_until_empty(settings)
    buffered, *_ = start_observation(buf, start="2025-01-01T02:00:00+02:00", files=0)
    frame = buf.search_frame("ExecutedObsUnit", {"obs_unit_id": 123})
    assert list(frame.columns) == ["id", "obs_unit_id", "start_time", "end_time", "status"]
    assert len(frame) == 2
    assert str(frame["id"].dtype) == "string" and str(frame["status"].dtype) == "string"
    assert str(frame["obs_unit_id"].dtype) == "Int64"
    for name in ("start_time", "end_time"):
        assert isinstance(frame[name].dtype, pd.DatetimeTZDtype) and str(frame[name].dt.tz) == "UTC"
    by_id = frame.set_index("id")
    assert by_id.loc[buffered["id"], "start_time"] == pd.Timestamp("2025-01-01T00:00:00Z")
    assert pd.isna(by_id.loc[buffered["id"], "end_time"])
    assert by_id.loc[replicated["id"], "end_time"] == pd.Timestamp("2025-01-01T01:00:00Z")
    assert set(frame["id"]) == {replicated["id"], buffered["id"]}

    empty = buf.search_frame("ExecutedObsUnit", {"obs_unit_id": 2})
    assert len(empty) == 0 and list(empty.columns) == list(frame.columns)
    assert [str(t) for t in empty.dtypes] == [str(t) for t in frame.dtypes]
    units = buf.search_frame("ObsUnit")
    assert str(units["id"].dtype) == "Int64" and str(units["name"].dtype) == "string"


# --- events and wait ----------------------------------------------------------------------------

def test_events_are_published_only_after_commit_and_after_replay(buf, settings, main_engine, replica_engine):
    """Whenever `applied` arrives the transactions are committed on main; whenever
    `replicated` arrives their rows are on the replica."""
    pubsub = buf.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(SiteKeys(settings.site).events)
    seen: list[tuple[str, list[str], int]] = []
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            message = pubsub.get_message(timeout=0.1)
            if message is None:
                continue
            event = json.loads(message["data"])
            ids = event["transaction_ids"]
            engine = main_engine if event["event"] == "applied" else replica_engine
            with engine.connect() as conn:  # checked the moment the event arrives
                found = conn.execute(sa.text("SELECT count(*) FROM obs_pipeline_applied "
                                             "WHERE transaction_id = ANY(:ids)"), {"ids": ids}).scalar_one()
            seen.append((event["event"], ids, found))

    listener = threading.Thread(target=listen)
    listener.start()
    try:
        time.sleep(0.2)
        tx_ids = [start_observation(buf, files=1)[3] for _ in range(5)]
        drain_until_empty(settings, batch_size=2)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sum(len(s[1]) for s in seen if s[0] == "replicated") < 5:
            time.sleep(0.05)
    finally:
        done.set()
        listener.join()
        pubsub.close()
    for kind in ("applied", "replicated"):
        announced = [i for event, ids, _ in seen if event == kind for i in ids]
        assert sorted(announced) == sorted(tx_ids), kind
    assert all(found == len(ids) for _, ids, found in seen), seen


def test_wait_wakes_on_events(buf, settings):
    _, _, _, tx_id = start_observation(buf)
    calls = []
    original = buf.status
    buf.status = lambda t: calls.append(t) or original(t)
    drainer = threading.Timer(1.0, drain_until_empty, args=(settings,))
    began = time.monotonic()
    drainer.start()
    try:
        assert buf.wait(tx_id, until="replicated", timeout=20)
    finally:
        drainer.join()
    assert time.monotonic() - began < 10
    # status is read at start, on our events and every 0.5 s: not a busy poll
    assert len(calls) <= 2 * (time.monotonic() - began) / 0.5 + 6, len(calls)
    assert buf.wait(tx_id, until="applied", timeout=0)


def test_status_is_applied_once_main_committed_while_the_replica_lags(buf, settings, main_engine, replica_engine):
    """The last batch of a drain (not full) waits for the replica to replay it before it is
    cleaned. Its transactions are committed on main meanwhile: they read "applied", and
    wait(until="applied") returns, however long the replica lags (they read "processing"
    until the wait ended, replication_timeout_s later)."""
    _, _, _, tx_id = start_observation(buf, files=0)
    drain = Drain(settings, DrainConfig(replication_timeout_s=60))
    stepping = threading.Thread(target=drain.step)
    try:
        with replay_paused(replica_engine):
            drain.acquire()
            stepping.start()
            assert buf.wait(tx_id, until="applied", timeout=20)
            # wait() takes the drain's "applied" event, published as it acknowledges the batch; it
            # sets the status just after: within moments, not replication_timeout_s (60 s) later
            assert wait_until(lambda: buf.status(tx_id) == "applied", 5, interval=0.01), buf.status(tx_id)
            assert stepping.is_alive()  # still waiting for the paused replica
            with main_engine.connect() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM obs_pipeline_applied WHERE transaction_id = :t"),
                                    {"t": tx_id}).scalar_one() == 1
    finally:
        if stepping.ident is not None:
            stepping.join(120)
        drain.close()
    assert buf.status(tx_id) == "replicated"


def test_a_record_is_read_right_after_a_drain_step_when_main_commits_asynchronously(buf, settings):
    """Main with `synchronous_commit = off` (a DBA's setting for its database or role): COMMIT
    returns before the commit is flushed, and the flush LSN read right after it can precede the
    commit. The replica had replayed that LSN already, so the drain cleaned the caches of rows
    the replica did not have yet: a record created a moment before read None (18 reads of 20),
    and a main that crashed then lost transactions the buffer had let go."""
    joiner = "&" if "?" in settings.main_db_url else "?"
    asynchronous = dataclasses.replace(settings, main_db_url=f"{settings.main_db_url}{joiner}"
                                                             "options=-csynchronous_commit%3Doff")
    drain = Drain(asynchronous, DrainConfig())
    try:
        drain.acquire()
        for _ in range(10):
            obs, *_ = start_observation(buf, files=0)
            drain.step()  # applied, replay awaited, cleaned
            assert buf.get("ExecutedObsUnit", obs["id"]) is not None
    finally:
        drain.close()


def test_wait_rechecks_status_when_an_event_is_missed(buf, settings, redis_client):
    _, _, _, tx_id = start_observation(buf, files=0)
    key = SiteKeys(settings.site).transaction(tx_id)

    def mark_replicated_silently() -> None:
        doc = json.loads(redis_client.get(key))
        doc["status"] = "replicated"
        redis_client.set(key, json.dumps(doc))  # no PUBLISH

    timer = threading.Timer(0.3, mark_replicated_silently)
    began = time.monotonic()
    timer.start()
    try:
        assert buf.wait(tx_id, until="replicated", timeout=10)
    finally:
        timer.join()
    assert time.monotonic() - began < 5  # re-checked within about 0.5 s, not at the timeout


def test_wait_times_out_on_unknown_and_fails_fast_on_failed(buf, settings, redis_client):
    began = time.monotonic()
    assert not buf.wait(str(uuid.uuid4()), timeout=0.3)
    assert 0.3 <= time.monotonic() - began < 5
    _, _, _, tx_id = start_observation(buf, files=0)
    key = SiteKeys(settings.site).transaction(tx_id)
    doc = json.loads(redis_client.get(key))
    doc["status"] = "failed"
    redis_client.set(key, json.dumps(doc))
    began = time.monotonic()
    assert not buf.wait(tx_id, timeout=10)
    assert time.monotonic() - began < 5  # at once, not at the timeout
    with pytest.raises(ValueError, match="until must be one of"):
        buf.wait(tx_id, until="done")


@pytest.mark.parametrize("until, timeout, message", [
    (["replicated"], 1.0, "until must be one of .* not \\['replicated'\\]"),
    ("applied", None, "timeout must be a number of seconds, not None"),
    ("applied", "5", "timeout must be a number of seconds, not '5'"),
    ("applied", float("nan"), "timeout must be a number of seconds, not nan"),
])
def test_wait_refuses_bad_arguments_in_one_line(buf, until, timeout, message):
    _, _, _, tx_id = start_observation(buf, files=0)
    with pytest.raises(ValueError, match=message) as refused:
        buf.wait(tx_id, until=until, timeout=timeout)
    assert "\n" not in str(refused.value)


def test_wait_takes_any_real_number_of_seconds(buf):
    """numpy's scalars (np.int64 from a DataFrame or an array, np.float32), a Fraction and a
    Decimal are no int or float to isinstance: wait() refused them, 'timeout must be a number
    of seconds, not np.int64(5)'."""
    import decimal
    import fractions

    np = pytest.importorskip("numpy")
    _, _, _, tx_id = start_observation(buf, files=0)
    taken = (np.int64(5), np.float32(0.5), np.uint8(0), fractions.Fraction(1, 4), decimal.Decimal(1))
    for timeout in taken:
        assert buf.wait(tx_id, until="pending", timeout=timeout) is True
    began = time.monotonic()
    assert buf.wait(tx_id, until="replicated", timeout=np.float32(0.3)) is False  # waited that long
    assert 0.29 <= time.monotonic() - began < 5
    for timeout in (np.bool_(True), True, decimal.Decimal("NaN"), np.float64("nan"), "5"):
        with pytest.raises(ValueError, match=r"^timeout must be a number of seconds, not ") as no:
            buf.wait(tx_id, timeout=timeout)
        assert "\n" not in str(no.value)


def test_max_retries_takes_a_whole_number_and_refuses_the_rest_at_once(settings, redis_client):
    """TransactionBuffer(max_retries=np.int64(2)) failed every block's end with 'Object of type
    int64 is not JSON serializable'; 2.5, -1, "3" and True were buffered as every transaction's
    `max_retries`, for the drain to dead-letter each one ('retry_count/max_retries must be
    integers >= 0')."""
    np = pytest.importorskip("numpy")
    counted = TransactionBuffer(settings=settings, max_retries=np.int64(2))
    try:
        with counted.transaction() as tx:
            tx.create("ObsUnit", {"id": 9001, "name": "counted"})
        status_key = SiteKeys(settings.site).transaction(tx.transaction_id)
        stored = json.loads(redis_client.get(status_key))
        assert stored["max_retries"] == 2
    finally:
        counted.close()
    for value in (2.5, -1, "3", True, None):
        message = rf"^max_retries must be a whole number >= 0, not {re.escape(repr(value))}$"
        with pytest.raises(ValueError, match=message):
            TransactionBuffer(settings=settings, max_retries=value)


# --- many buffered records ---------------------------------------------------------------------

def test_search_with_ten_thousand_buffered_records_is_correct(buf, settings):
    """Correctness only; the latency is measured by obs_pipeline_tests/bench_search.py."""
    from obs_pipeline_tests.bench_search import buffer_records

    ids = buffer_records(buf, 10_000, per_tx=500, updated_every=5)  # 2,000 with a pending update
    with buf.transaction() as tx:
        for rid in ids[1:1000:10]:
            tx.delete("ExecutedObsUnit", rid)  # 100 pending deletes
    deleted = set(ids[1:1000:10])
    everything = buf.search("ExecutedObsUnit")
    assert len(everything) == 9_900 and not deleted & {r["id"] for r in everything}
    completed = buf.search("ExecutedObsUnit", {"status": "completed"})
    assert {r["id"] for r in completed} == set(ids[::5])
    unit = buf.search("ExecutedObsUnit", {"obs_unit_id": 123})
    assert {r["id"] for r in unit} == {rid for i, rid in enumerate(ids) if i % 4 == 3} - deleted
    window = buf.search("ExecutedObsUnit", {"start_time": {">=": "2025-01-01T01:00:00Z", "<": "2025-01-01T02:00:00Z"}})
    assert {r["id"] for r in window} == set(ids[3600:7200]) - deleted
    assert buf.get("ExecutedObsUnit", ids[5])["status"] == "completed"


def test_site_names_with_sort_pattern_characters(settings, redis_client):
    """The model-wide read uses SORT ... GET patterns; a site name holding `*` or `->` must not
    confuse it (the script falls back to one GET per id)."""
    site = f"odd*{uuid.uuid4().hex[:6]}->x"
    odd = TransactionBuffer(settings=Settings(site=site, redis_url=settings.redis_url,
                                              replica_db_url=settings.replica_db_url, spool_dir=settings.spool_dir))
    try:
        obs, pkg, files, _ = start_observation(odd)
        odd.update("RawDataFile", files[0]["id"], {"name": "renamed.fits"})
        assert sorted(r["name"] for r in odd.search("RawDataFile", {"raw_data_package_id": pkg["id"]})) == \
            ["f1.fits", "renamed.fits"]
        assert odd.get("ExecutedObsUnit", obs["id"])["status"] == "running"
    finally:
        odd.close()
        keys = [k for k in redis_client.scan_iter(count=1000) if k.startswith(f"site:{site}:".encode())]
        if keys:
            redis_client.delete(*keys)


def test_updates_parked_behind_a_retry_are_all_applied_before_a_newer_update_of_their_row(buf, settings, main_engine,
                                                                                          redis_client, monkeypatch):
    """An update main refuses for a while waits to retry, holding its row; the updates of the row
    buffered after it wait parked behind it. Once it is applied they all come due together, the
    first taking the row's mark. They were made due at scores after the acknowledgement's clock
    (1 ms apart), so a claim a moment later took the first, not the rest, then a newer update
    of the row from the buffer: that one was applied before them, main went back to an older
    value and kept it (a lost update), and reads showed the older value after the newer."""
    from obs_pipeline import buffer_store

    obs, *_ = start_observation(buf, files=0)
    drain_until_empty(settings)
    with main_engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS parking_gate (open boolean NOT NULL)"))
        conn.execute(sa.text("TRUNCATE parking_gate; INSERT INTO parking_gate VALUES (false)"))
        conn.execute(sa.text("CREATE OR REPLACE FUNCTION parking_gate() RETURNS trigger LANGUAGE plpgsql AS $$ "
                             "BEGIN IF NOT (SELECT open FROM parking_gate) THEN RAISE EXCEPTION 'gate closed'; "
                             "END IF; RETURN NEW; END $$"))
        conn.execute(sa.text("CREATE TRIGGER parking_gate BEFORE UPDATE ON executed_obs_unit "
                             "FOR EACH ROW EXECUTE FUNCTION parking_gate()"))
    drain = Drain(settings, DrainConfig(batch_size=100, retry_base_s=3600))
    try:
        drain.acquire()
        first = buf.update("ExecutedObsUnit", obs["id"], {"status": "first"})
        drain.step()  # refused: waits to retry (in an hour), holding the row
        for i in range(20):
            buf.update("ExecutedObsUnit", obs["id"], {"status": f"later {i:02d}"})
        drain.step()  # parked behind it
        with main_engine.begin() as conn:
            conn.execute(sa.text("UPDATE parking_gate SET open = true"))
        retry = SiteKeys(settings.site).retry
        member = next(m for m, due in redis_client.zrange(retry, 0, -1, withscores=True)
                      if first in m.decode() and due != float("inf"))
        redis_client.zadd(retry, {member: 0})  # due now
        clock = [time.time()]
        import types
        monkeypatch.setattr(buffer_store, "time", types.SimpleNamespace(
            time=lambda: clock[0], monotonic=time.monotonic, perf_counter=time.perf_counter, sleep=time.sleep))
        drain.step()  # applied: the 20 come due
        assert buf.status(first) in ("applied", "replicated")
        newest = buf.update("ExecutedObsUnit", obs["id"], {"status": "newest"})
        clock[0] += 0.0015  # the next claim, a moment later
        drain.step()
        monkeypatch.undo()
    finally:
        drain.close()
        with main_engine.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER IF EXISTS parking_gate ON executed_obs_unit"))
    drain_until_empty(settings)
    assert buf.status(newest) == "replicated"
    with main_engine.connect() as conn:
        on_main = conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :i"), {"i": obs["id"]}).scalar()
    assert (on_main, buf.get("ExecutedObsUnit", obs["id"])["status"]) == ("newest", "newest")
