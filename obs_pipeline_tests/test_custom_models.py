"""`OBS_MODELS`: a site's own schema is validated, buffered, drained and read like the built-in one."""

from __future__ import annotations

import dataclasses
import random

import pytest
import sqlalchemy as sa

from obs_pipeline.ingest import InvalidTransaction, TransactionBuffer
from obs_pipeline_tests.test_cli import cli

MODELS = "obs_pipeline_tests.custom_models:Base"


@pytest.fixture
def custom(settings):
    return dataclasses.replace(settings, models=MODELS)


@pytest.mark.parametrize("row, message", [
    ({"settings": {"gain": object()}}, "not JSON-serialisable"),
    ({"settings": {"gain": float("nan")}}, "not JSON-serialisable"),
    ({"settings": [1, {"nested": float("inf")}]}, "not JSON-serialisable"),
])
def test_a_json_column_refuses_what_json_cannot_hold_and_buffers_nothing(custom, redis_client, row, message):
    buf = TransactionBuffer(settings=custom)
    with pytest.raises(InvalidTransaction, match=message):
        with buf.transaction() as tx:
            tx.create("Instrument", {"code": 1, "name": "cam", **row})
    assert not list(redis_client.scan_iter(match=f"site:{custom.site}:*"))
    buf.close()


@pytest.mark.parametrize("column, value, message", [
    ("seconds", float("nan"), "not a finite number"), ("seconds", "1.5", "is not a number"),
    ("ok", "yes", "is not a boolean"), ("instrument_code", 1.0, "is not an integer"),
])
def test_typed_columns_of_a_schema_of_its_own_refuse_wrong_values(custom, column, value, message):
    buf = TransactionBuffer(settings=custom)
    with pytest.raises(InvalidTransaction, match=message):
        with buf.transaction() as tx:
            tx.create("Exposure", {"instrument_code": 1, "started": "2025-01-01T00:00:00Z", "seconds": 1.0,
                                   column: value})
    buf.close()


def test_a_schema_of_its_own_from_db_init_to_the_replica(custom, main_engine, replica_engine):
    """`db init` creates its tables, ingest validates against it, `drain --once` applies it and
    smart queries read it back from the replica, all chosen by OBS_MODELS alone."""
    env = {"OBS_SITE": custom.site, "OBS_REDIS_URL": custom.redis_url, "OBS_MAIN_DB_URL": custom.main_db_url,
           "OBS_REPLICA_DB_URL": custom.replica_db_url, "OBS_MODELS": MODELS}
    init = cli("db", "init", env=env)
    assert init.returncode == 0 and "11 models" in init.stderr, init.stderr
    code = random.randrange(10**6, 10**9)
    buf = TransactionBuffer(settings=custom)
    with buf.transaction() as tx:
        tx.create("Instrument", {"code": code, "name": "cam", "settings": {"gain": 2.5, "modes": ["a", "b"]}})
        exposure = tx.create("Exposure", {"instrument_code": code, "started": "2025-01-01T02:00:00+02:00",
                                          "seconds": 1.5, "ok": True, "logged": "2025-01-01T02:00:00+02:00"})
    note = buf.update("Exposure", exposure["id"], {"note": "after", "ok": False})
    expected = {"id": exposure["id"], "instrument_code": code, "started": "2025-01-01T00:00:00+00:00",
                "seconds": 1.5, "ok": False, "note": "after", "logged": "2025-01-01T00:00:00+00:00"}
    assert buf.get("Exposure", exposure["id"]) == expected  # buffered, with its overlay
    drained = cli("drain", "--once", env=env)
    assert drained.returncode == 0 and "drained 2 transactions" in drained.stderr, drained.stderr
    assert buf.status(tx.transaction_id) == buf.status(note) == "replicated"
    with main_engine.connect() as conn:
        # a timestamp without time zone keeps the instant in UTC: PostgreSQL drops an offset
        # written to it (02:00+02:00 was stored as 02:00, and read back as 02:00 UTC)
        logged = conn.execute(sa.text("SELECT logged::text FROM custom_exposure WHERE id = :i"),
                              {"i": exposure["id"]}).scalar_one()
        assert logged == "2025-01-01 00:00:00"
        row = conn.execute(sa.text("SELECT i.settings::text, e.seconds, e.ok, e.note FROM custom_exposure e "
                                   "JOIN custom_instrument i ON i.code = e.instrument_code WHERE e.id = :i"),
                           {"i": exposure["id"]}).one()
    assert (row[0].replace(" ", ""), row[1], row[2], row[3]) == ('{"gain":2.5,"modes":["a","b"]}', 1.5, False, "after")
    assert buf.get("Exposure", exposure["id"]) == expected  # now from the replica
    assert buf.get("Instrument", code)["settings"] == {"gain": 2.5, "modes": ["a", "b"]}
    assert [r["id"] for r in buf.search("Exposure", {"instrument_code": code, "ok": False})] == [exposure["id"]]
    buf.close()


@pytest.fixture
def custom_schema(custom, main_engine, replica_engine):
    from obs_pipeline.model_registry import ModelRegistry
    from obs_pipeline.schema import create_schema
    from obs_pipeline_tests.conftest import wait_for_replica

    create_schema(main_engine, ModelRegistry.from_path(MODELS))
    wait_for_replica(main_engine, replica_engine)
    return custom


JSON_VALUES = ["42", 7, True, "hello", None, [1, "a"], {"k": "v", "n": None}, 2.5]


def test_a_json_column_keeps_each_value_as_it_was_given(custom_schema, main_engine):
    """A JSON column's string "42" is the JSON text "42", not the number; scalars as well as
    objects arrive as they were buffered, by insert and by update, and read back the same."""
    import json

    from obs_pipeline_tests.workload import drain_until_settled

    buf = TransactionBuffer(settings=custom_schema)
    base = random.randrange(10**6, 10**9)
    codes = [base + i for i in range(len(JSON_VALUES))]
    with buf.transaction() as tx:
        tx.bulk_create("Instrument", [{"code": c, "name": "i", "settings": v} for c, v in zip(codes, JSON_VALUES)])
    updated = buf.update("Instrument", codes[-1], {"settings": "now text"})
    drain_until_settled(custom_schema)
    assert buf.status(tx.transaction_id) == buf.status(updated) == "replicated"
    expected = JSON_VALUES[:-1] + ["now text"]
    with main_engine.connect() as conn:
        stored = dict(conn.execute(sa.text("SELECT code, settings::text FROM custom_instrument WHERE code = ANY(:c)"),
                                   {"c": codes}).all())
    assert [None if stored[c] is None else json.loads(stored[c]) for c in codes] == expected
    assert [buf.get("Instrument", c)["settings"] for c in codes] == expected
    buf.close()


def test_a_json_value_changed_by_the_script_after_its_step_is_buffered_as_it_was_checked(custom_schema,
                                                                                       main_engine):
    """Found by review: a JSON column's value and the transaction's metadata were kept as the
    script's own objects until the `with` block ended. A script that reuses one dict for each
    instrument's settings, changing it between creates, buffered every row with the last
    contents (main stored them so), and what it put in after the check (a NaN) was never
    checked. Each value is buffered as it was when its step was added and checked."""
    import json

    from obs_pipeline_tests.workload import drain_until_settled

    buf = TransactionBuffer(settings=custom_schema)
    base = random.randrange(10**6, 10**9)
    shared, metadata = {"gain": 1, "modes": ["a"]}, {"night": "first"}
    with buf.transaction(metadata=metadata) as tx:
        for i in range(3):
            shared["gain"] = i + 1
            shared["modes"].append(f"m{i}")
            tx.create("Instrument", {"code": base + i, "name": "i", "settings": shared})
        shared["gain"] = float("nan")  # after the last check: never checked
        metadata["night"] = "changed"
    expected = [{"gain": i + 1, "modes": ["a", *(f"m{j}" for j in range(i + 1))]} for i in range(3)]
    assert [buf.get("Instrument", base + i)["settings"] for i in range(3)] == expected
    raw = buf.store.redis.get(buf.store.keys.transaction(tx.transaction_id))
    assert json.loads(raw)["metadata"] == {"night": "first"}
    drain_until_settled(custom_schema)
    assert buf.status(tx.transaction_id) == "replicated"
    with main_engine.connect() as conn:
        stored = dict(conn.execute(sa.text("SELECT code, settings::text FROM custom_instrument WHERE code = ANY(:c)"),
                                   {"c": [base + i for i in range(3)]}).all())
    assert [json.loads(stored[base + i]) for i in range(3)] == expected
    buf.close()


def test_a_column_whose_name_needs_quoting_is_created_and_updated(custom_schema, main_engine):
    from obs_pipeline_tests.workload import drain_until_settled

    buf = TransactionBuffer(settings=custom_schema)
    with buf.transaction() as tx:
        note = tx.create("Note", {"odd name %": "first"})
    drain_until_settled(custom_schema)  # on main: the update below is an UPDATE, not folded into the insert
    buf.update("Note", note["id"], {"odd name %": "second"})
    drain_until_settled(custom_schema)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text('SELECT "odd name %" FROM custom_note WHERE id = :i'),
                            {"i": note["id"]}).scalar_one() == "second"
    assert buf.get("Note", note["id"]) == {"id": note["id"], "odd name %": "second"}
    buf.close()


def test_a_deferred_foreign_key_violation_is_pinned_on_its_transaction(custom_schema, redis_client, main_engine):
    """A foreign key checked at COMMIT fails the whole batch there; the careful path checks
    constraints statement by statement so that bisection finds the transaction (before, the
    careful path's COMMIT failed too, and every drain run died on the same batch)."""
    import json

    from obs_pipeline.keys import SiteKeys
    from obs_pipeline_tests.workload import drain_until_settled

    buf = TransactionBuffer(settings=custom_schema)
    code = random.randrange(10**6, 10**9)
    with buf.transaction() as tx:
        tx.create("Instrument", {"code": code, "name": "cam"})

    def exposure(instrument: int) -> str:
        with buf.transaction() as t:
            t.create("Exposure", {"instrument_code": instrument, "started": "2025-01-01T00:00:00Z", "seconds": 1.0})
        return t.transaction_id

    good = [exposure(code) for _ in range(5)]
    poison = exposure(code + 1)  # no such instrument
    good += [exposure(code) for _ in range(5)]
    drain_until_settled(custom_schema, retry_base_s=0.05)
    assert all(buf.status(t) == "replicated" for t in good)
    failed = [json.loads(e) for e in redis_client.lrange(SiteKeys(custom_schema.site).failed, 0, -1)]
    assert [f["transaction_id"] for f in failed] == [poison]
    assert "ForeignKeyViolation" in failed[0]["failure"]["reason"]
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM custom_exposure WHERE instrument_code = :c"),
                            {"c": code}).scalar_one() == 10
    buf.close()


def test_a_transaction_valid_by_its_deferred_foreign_key_is_applied_beside_a_poison_one(custom_schema,
                                                                                        redis_client, main_engine):
    """One transaction creates an exposure, then the instrument it names: valid, as the foreign
    key is checked at commit (initially deferred). Its batch also holds a poison transaction, so
    it goes the careful way, where the drain made every constraint immediate to pin a violation
    on its transaction: alone, in its own order, the exposure was refused (ForeignKeyViolation)
    and the valid transaction was charged a retry, dead-lettered once it had none left. Now
    deferred constraints are checked at the end of each transaction's savepoint, and are
    deferred again for the next: both such transactions, one on either side of the poison one,
    are applied in that batch, the poison one alone is dead-lettered."""
    import json

    from obs_pipeline.keys import SiteKeys
    from obs_pipeline_tests.workload import drain_one_batch, drain_until_settled

    buf = TransactionBuffer(settings=custom_schema, max_retries=0)
    code = random.randrange(10**6, 10**9)

    def exposure_then_instrument(code: int):
        with buf.transaction() as tx:
            exposure = tx.create("Exposure", {"instrument_code": code, "started": "2025-01-01T00:00:00Z",
                                              "seconds": 1.0})
            tx.create("Instrument", {"code": code, "name": "cam"})
        return tx.transaction_id, exposure["id"]

    first = exposure_then_instrument(code)
    with buf.transaction() as poison:
        poison.create("Exposure", {"instrument_code": code + 2, "started": "2025-01-01T00:00:00Z", "seconds": 1.0})
    second = exposure_then_instrument(code + 1)  # after the poison one's savepoint: the modes are back
    report = drain_one_batch(custom_schema, retry_base_s=0.05)
    assert (report.transactions, report.applied) == (3, 2), report
    drain_until_settled(custom_schema, retry_base_s=0.05)
    failed = {f["transaction_id"]: f["failure"]["reason"]
              for f in map(json.loads, redis_client.lrange(SiteKeys(custom_schema.site).failed, 0, -1))}
    assert list(failed) == [poison.transaction_id], failed
    assert "ForeignKeyViolation" in failed[poison.transaction_id]
    assert [buf.status(first[0]), buf.status(second[0])] == ["replicated", "replicated"]
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT instrument_code, id::text FROM custom_exposure WHERE instrument_code "
                                    "BETWEEN :c AND :c + 2 ORDER BY 1"), {"c": code}).all() == [
            (code, first[1]), (code + 1, second[1])]
        assert conn.execute(sa.text("SELECT count(*) FROM obs_pipeline_applied WHERE transaction_id IN (:a, :b)"),
                            {"a": first[0], "b": second[0]}).scalar_one() == 2
    buf.close()


def test_a_deferred_check_passed_by_its_part_is_not_run_again_by_a_later_one(custom_schema, redis_client,
                                                                                    main_engine):
    """A constraint trigger checked at commit refuses an exposure of a closed instrument. In
    order, an exposure of an open instrument is applied, then the instrument is closed: both
    valid. Beside a poison transaction, the careful path checked each part's deferred
    constraints in a savepoint it rolled back, which left the checks pending, to run again at
    the next part's check: the exposure's saw the instrument closed by that part, which was
    blamed for it (RaiseException: instrument ... is closed), charged a retry, dead-lettered
    with none left (and, with no part after it, the COMMIT failed, and the drain with it).
    Each part's checks now run once, as it ends."""
    import json

    from obs_pipeline.keys import SiteKeys
    from obs_pipeline_tests.workload import drain_one_batch, drain_until_settled

    buf = TransactionBuffer(settings=custom_schema, max_retries=0)
    code = random.randrange(10**6, 10**9)
    with buf.transaction() as tx:
        tx.create("Instrument", {"code": code, "name": "open"})
    drain_until_settled(custom_schema)
    with main_engine.begin() as conn:
        conn.execute(sa.text("CREATE FUNCTION obs_test_open() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF "
                             "(SELECT name FROM custom_instrument WHERE code = NEW.instrument_code) = 'closed' THEN "
                             "RAISE EXCEPTION 'instrument % is closed', NEW.instrument_code; END IF; RETURN NULL; "
                             "END $$"))
        conn.execute(sa.text("CREATE CONSTRAINT TRIGGER obs_test_open AFTER INSERT ON custom_exposure DEFERRABLE "
                             "INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION obs_test_open()"))
    try:
        with buf.transaction() as exposure:
            made = exposure.create("Exposure", {"instrument_code": code, "started": "2025-01-01T00:00:00Z",
                                                "seconds": 1.0})
        closed = buf.update("Instrument", code, {"name": "closed"})
        with buf.transaction() as poison:
            poison.create("Exposure", {"instrument_code": code + 1, "started": "2025-01-01T00:00:00Z", "seconds": 1.0})
        report = drain_one_batch(custom_schema, retry_base_s=0.05)
        drain_until_settled(custom_schema, retry_base_s=0.05)
    finally:
        with main_engine.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER IF EXISTS obs_test_open ON custom_exposure"))
            conn.execute(sa.text("DROP FUNCTION IF EXISTS obs_test_open()"))
    assert (report.transactions, report.applied) == (3, 2), report
    failed = {f["transaction_id"]: f["failure"]["reason"]
              for f in map(json.loads, redis_client.lrange(SiteKeys(custom_schema.site).failed, 0, -1))}
    assert list(failed) == [poison.transaction_id], failed
    assert [buf.status(exposure.transaction_id), buf.status(closed)] == ["replicated", "replicated"]
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT id::text FROM custom_exposure WHERE instrument_code = :c"),
                            {"c": code}).all() == [(made["id"],)]
    buf.close()


def test_a_write_after_its_rows_cascading_delete_in_the_same_batch_is_not_applied_unseen(custom_schema,
                                                                                          redis_client, main_engine):
    """An instrument is deleted (its readings with it: ON DELETE CASCADE); later transactions
    create a reading of it and update one of its readings. In order, main refuses both (no
    instrument; no row to update). Before, the batch folded them with the delete last: main took
    the insert and the update, then the cascade deleted both rows, and the two transactions
    were reported replicated with nothing of theirs on main."""
    import json

    from obs_pipeline.keys import SiteKeys
    from obs_pipeline_tests.workload import drain_until_settled

    buf = TransactionBuffer(settings=custom_schema)
    code = random.randrange(10**6, 10**9)
    with buf.transaction() as setup:
        setup.create("Instrument", {"code": code, "name": "cam"})
        old = setup.create("Reading", {"instrument_code": code, "value": 1.0})
    drain_until_settled(custom_schema)
    with buf.transaction() as gone:
        gone.delete("Instrument", code)
    with buf.transaction() as late:
        late.create("Reading", {"instrument_code": code, "value": 2.0})
    unchecked = TransactionBuffer(settings=dataclasses.replace(custom_schema, replica_db_url=None))
    updated = unchecked.update("Reading", old["id"], {"value": 3.0})  # (ingest refuses it: see the test below)
    unchecked.close()
    drain_until_settled(custom_schema, retry_base_s=0.05)
    assert buf.status(gone.transaction_id) == "replicated"
    failed = {f["transaction_id"]: f["failure"]["reason"]
              for f in map(json.loads, redis_client.lrange(SiteKeys(custom_schema.site).failed, 0, -1))}
    assert [buf.status(late.transaction_id), buf.status(updated)] == ["failed", "failed"], failed
    assert "ForeignKeyViolation" in failed[late.transaction_id]
    assert failed[updated] == f"no custom_reading row {old['id']} to update"
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM custom_reading WHERE instrument_code = :c"),
                            {"c": code}).scalar_one() == 0
    buf.close()


def test_a_buffered_delete_hides_what_its_cascades_delete_and_reads_what_they_set_null(custom_schema, redis_client):
    """The models declare ON DELETE CASCADE (an instrument's readings, and their calibrations)
    and SET NULL (its remarks). A buffered delete of the instrument hid the instrument alone:
    until the delete was replayed, its readings and their calibrations read as before, and its
    remarks still named it; and ingest, checking against the same reads, took an update of a
    reading the delete takes away, which the drain then dead-lettered (no row to update). Reads
    now agree before and after the drain, the update is refused, and the cascades' caches go
    with the delete's."""
    from obs_pipeline.keys import SiteKeys
    from obs_pipeline_tests.workload import drain_until_settled

    buf = TransactionBuffer(settings=custom_schema)
    keys = SiteKeys(custom_schema.site)
    code = random.randrange(10**6, 10**9)
    with buf.transaction() as setup:
        setup.create("Instrument", {"code": code, "name": "cam"})
        reading = setup.create("Reading", {"instrument_code": code, "value": 1.0})
        calibration = setup.create("Calibration", {"reading_id": reading["id"], "factor": 2.0})
        remark = setup.create("Remark", {"instrument_code": code, "text": "replicated"})
    drain_until_settled(custom_schema)
    with buf.transaction() as more:  # buffered, not on the replica yet
        buffered_reading = more.create("Reading", {"instrument_code": code, "value": 5.0})
        buffered_remark = more.create("Remark", {"instrument_code": code, "text": "buffered"})
    remarks = [remark["id"], buffered_remark["id"]]

    def reads() -> dict:
        return {"readings": buf.search("Reading", {"instrument_code": code}),
                "reading": [buf.get("Reading", r["id"]) for r in (reading, buffered_reading)],
                "calibration": buf.get("Calibration", calibration["id"]),
                "calibrations": buf.search("Calibration", {"reading_id": [reading["id"]]}),
                "remarks": sorted((r["text"], r["instrument_code"]) for r in buf.search("Remark", {"id": remarks})),
                "without": sorted(r["text"] for r in buf.search("Remark", {"id": remarks, "instrument_code": None})),
                "with": buf.search("Remark", {"instrument_code": code})}

    gone = buf.delete("Instrument", code)
    for model, rid, values in [("Reading", reading["id"], {"value": 3.0}),
                               ("Reading", buffered_reading["id"], {"value": 3.0}),
                               ("Calibration", calibration["id"], {"factor": 3.0})]:
        with pytest.raises(InvalidTransaction, match=f"{model} {rid} is neither buffered nor on the replica"):
            buf.update(model, rid, values)
    assert buf.update("Remark", remark["id"], {"text": "kept"})  # set null, not deleted
    buffered = reads()
    drain_until_settled(custom_schema)
    assert buf.status(gone) == "replicated"
    replicated = reads()
    assert buffered == replicated, (buffered, replicated)
    assert replicated == {"readings": [], "reading": [None, None], "calibration": None, "calibrations": [],
                          "remarks": [("buffered", None), ("kept", None)], "without": ["buffered", "kept"], "with": []}
    assert redis_client.llen(keys.failed) == 0
    assert redis_client.exists(*(key for m, r in [
        ("Reading", reading["id"]), ("Reading", buffered_reading["id"]), ("Calibration", calibration["id"]),
        ("Remark", remark["id"]), ("Remark", buffered_remark["id"])] for key in (keys.buffered(m, r), keys.read_buffer(m, r)))) == 0
    buf.close()


def test_a_delete_cascades_to_rows_its_own_block_created(custom_schema, redis_client):
    """A block creates an instrument and a reading of it, then deletes the instrument: main
    deletes the reading with it. A later step of the block naming the reading is refused, as
    one naming the instrument is, and reads show neither, buffered or replicated."""
    from obs_pipeline_tests.workload import drain_until_settled

    buf = TransactionBuffer(settings=custom_schema)
    code = random.randrange(10**6, 10**9)
    with buf.transaction() as tx:
        buf_instrument = tx.create("Instrument", {"code": code, "name": "short-lived"})
        reading = tx.create("Reading", {"instrument_code": buf_instrument["code"], "value": 1.0})
        tx.delete("Instrument", code)
        with pytest.raises(InvalidTransaction, match=f"Reading {reading['id']} is deleted earlier in this transaction"):
            tx.update("Reading", reading["id"], {"value": 2.0})
    buffered = buf.get("Reading", reading["id"]), buf.search("Reading", {"instrument_code": code})
    drain_until_settled(custom_schema)
    assert buf.status(tx.transaction_id) == "replicated"
    assert buffered == (buf.get("Reading", reading["id"]), buf.search("Reading", {"instrument_code": code})) == (
        None, [])
    buf.close()


def test_a_transaction_that_frees_a_unique_value_and_takes_it_again_is_applied(custom_schema, redis_client,
                                                                              main_engine):
    """Delete the slot labelled x, create another labelled x: in its own order this is valid,
    but the folded statements insert before they delete and the unique key refuses that. The
    transaction alone is tried again in its own order instead of being dead-lettered."""
    import json

    from obs_pipeline.keys import SiteKeys
    from obs_pipeline_tests.workload import drain_until_settled

    buf = TransactionBuffer(settings=custom_schema)
    label = f"x{random.randrange(10**9)}"
    with buf.transaction() as first:
        old = first.create("Slot", {"label": label})
    drain_until_settled(custom_schema)
    with buf.transaction() as swap:
        swap.delete("Slot", old["id"])
        new = swap.create("Slot", {"label": label})
    drain_until_settled(custom_schema, retry_base_s=0.05)
    assert redis_client.llen(SiteKeys(custom_schema.site).failed) == 0, [
        json.loads(e)["failure"] for e in redis_client.lrange(SiteKeys(custom_schema.site).failed, 0, -1)]
    assert buf.status(swap.transaction_id) == "replicated"
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT id::text FROM custom_slot WHERE label = :l"), {"l": label}).all() == [
            (new["id"],)]
    buf.close()


def test_columns_left_to_their_constant_defaults_read_alike_buffered_or_replicated(custom_schema):
    """A create that leaves out columns with a constant default (server_default="new", a
    Python default=0) reads, while buffered, what main stores: the buffered record said None
    (in NOT NULL columns) and search by the default found nothing until it was replicated; a
    Python default reached the drain's insert as a missing parameter. A default that main
    computes (now()) cannot be known before: None until replicated."""
    from obs_pipeline_tests.workload import drain_until_settled

    buf = TransactionBuffer(settings=custom_schema)
    with buf.transaction() as tx:
        task = tx.create("Task", {"title": "t"})
        given = tx.create("Task", {"title": "g", "state": "given", "priority": 1, "tries": 2})
    constant = {"state": "new", "priority": 3, "urgent": False, "tries": 0, "kind": "it's", "weight": 1.5}

    def check() -> None:
        got = buf.get("Task", task["id"])
        assert {k: got[k] for k in constant} == constant
        assert {k: buf.get("Task", given["id"])[k] for k in ("state", "priority", "urgent", "tries")} == \
            {"state": "given", "priority": 1, "urgent": False, "tries": 2}
        assert [r["id"] for r in buf.search("Task", {"id": [task["id"], given["id"]], "state": "new", "priority": 3,
                                                     "urgent": False, "tries": 0})] == [task["id"]]

    check()
    drain_until_settled(custom_schema)
    assert buf.status(tx.transaction_id) == "replicated"
    check()
    assert buf.get("Task", task["id"])["queued"] is not None  # now(), on main
    buf.close()


def test_a_producers_create_that_leaves_out_a_column_with_a_python_default_is_applied(custom_schema, redis_client):
    """An existing producer pushes only the queue entry; its create leaves out `tries`, whose
    default (default=0) is SQLAlchemy's, not the database's. The drain's insert named the
    column's default as a parameter it did not have: KeyError 'tries' out of the apply, the
    batch back in the processing list, and every drain after it stopped on the same batch."""
    import json
    import uuid

    from obs_pipeline.keys import SiteKeys
    from obs_pipeline_tests.workload import drain_until_settled

    task_id = str(uuid.uuid4())
    tx_id = str(uuid.uuid4())
    redis_client.lpush(SiteKeys(custom_schema.site).buffer, json.dumps({
        "transaction_id": tx_id, "endpoint": "producer", "site": custom_schema.site, "status": "pending",
        "steps": [{"step_id": "step1", "operation": "create", "model_class": "Task",
                   "data": {"id": task_id, "title": "pushed"}}]}))
    drain_until_settled(custom_schema)
    buf = TransactionBuffer(settings=custom_schema)
    assert buf.status(tx_id) == "replicated"
    assert {k: buf.get("Task", task_id)[k] for k in ("title", "state", "tries")} == \
        {"title": "pushed", "state": "new", "tries": 0}
    assert redis_client.llen(SiteKeys(custom_schema.site).failed) == 0
    buf.close()


def test_a_float_column_reads_as_a_float_whether_buffered_or_replicated(custom_schema):
    """A float column given an integer (valid JSON for a number) is a float on the replica:
    reads of the buffered record must give the same type, not an int that becomes a float
    once replicated."""
    from obs_pipeline_tests.workload import drain_until_settled

    buf = TransactionBuffer(settings=custom_schema)
    code = random.randrange(10**6, 10**9)
    with buf.transaction() as tx:
        tx.create("Instrument", {"code": code, "name": "cam"})
        made = tx.bulk_create("Exposure", [{"instrument_code": code, "started": "2025-01-01T00:00:00Z",
                                            "seconds": 30} for _ in range(2)])
    buf.update("Exposure", made[1]["id"], {"seconds": 45})
    for _ in range(2):  # buffered, then from the replica
        rows = buf.search("Exposure", {"instrument_code": code})
        got = sorted((r["seconds"], type(r["seconds"])) for r in rows)
        assert got == [(30.0, float), (45.0, float)]
        assert type(buf.get("Exposure", made[0]["id"])["seconds"]) is float
        assert type(buf.get("Exposure", made[1]["id"])["seconds"]) is float
        drain_until_settled(custom_schema)
    buf.close()


def _entry_on_main(main_engine, entry_id: str) -> dict:
    with main_engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM custom_entry WHERE id = :i"), {"i": entry_id}).mappings().one()
    return dict(row)


def _instant(value):
    import datetime as dt

    return None if value is None else dt.datetime.fromisoformat(value) if isinstance(value, str) else value


def test_columns_sqlalchemy_computes_land_as_the_orm_would_write_them(custom_schema, main_engine, redis_client):
    """A site's model with a callable default (a lambda, uuid.uuid4, one that reads the row from
    SQLAlchemy's execution context), an SQL-expression default (func.now()) and onupdates (a
    callable, func.now(), a constant). The drain's statements named the Python-side ones as
    parameters the batch did not have: KeyError 'created' (then 'updated') out of the apply,
    the batch back in the processing list, every later drain stopped on it. Now a callable is
    evaluated when the script records the create or update (the buffered record reads as main
    will store it) and main evaluates the SQL expressions, on a later update as well as on an
    update folded with the create into the same batch."""
    import datetime as dt
    import json
    import uuid

    from obs_pipeline.keys import SiteKeys
    from obs_pipeline_tests.workload import drain_until_settled

    buf = TransactionBuffer(settings=custom_schema)
    before = dt.datetime.now(dt.timezone.utc)
    with buf.transaction() as tx:
        entry = tx.create("Entry", {"title": "a"})
        folded = tx.create("Entry", {"title": "f", "slug": "given"})
    made = buf.get("Entry", entry["id"])
    assert {k: made[k] for k in entry} == entry and {"created", "token", "slug", "revised"} <= entry.keys()
    assert before <= _instant(made["created"]) <= dt.datetime.now(dt.timezone.utc)
    assert str(uuid.UUID(made["token"])) == made["token"] != buf.get("Entry", folded["id"])["token"]
    assert (made["slug"], made["revised"], made["updated"], made["touched"]) == ("a-slug", False, None, None)
    assert made["stamped"] is None  # main's now(): not known before main runs it
    assert buf.get("Entry", folded["id"])["slug"] == "given"
    buf.update("Entry", folded["id"], {"title": "f2"})  # in the same batch as its create: folded
    drain_until_settled(custom_schema)
    assert buf.status(tx.transaction_id) == "replicated"
    assert redis_client.llen(SiteKeys(custom_schema.site).failed) == 0
    on_main = _entry_on_main(main_engine, entry["id"])
    assert (on_main["created"], str(on_main["token"]), on_main["slug"]) == \
        (_instant(made["created"]), made["token"], "a-slug")
    assert on_main["stamped"] is not None and (on_main["updated"], on_main["touched"], on_main["revised"]) == \
        (None, None, False)
    replicated = buf.get("Entry", entry["id"])
    assert {k: replicated[k] for k in ("created", "token", "slug", "revised")} == \
        {k: made[k] for k in ("created", "token", "slug", "revised")}
    assert replicated["stamped"] is not None
    f = _entry_on_main(main_engine, folded["id"])
    assert (f["title"], f["slug"], f["revised"]) == ("f2", "given", True)
    assert f["updated"] is not None and f["touched"] is not None

    changed = buf.update("Entry", entry["id"], {"title": "b"})
    pending = buf.get("Entry", entry["id"])
    assert (pending["title"], pending["revised"]) == ("b", True)
    assert _instant(pending["updated"]) >= _instant(made["created"])
    assert pending["touched"] is None  # main's now(), on main
    drain_until_settled(custom_schema)
    assert buf.status(changed) == "replicated"
    on_main = _entry_on_main(main_engine, entry["id"])
    assert (on_main["title"], on_main["revised"], on_main["updated"]) == ("b", True, _instant(pending["updated"]))
    assert on_main["touched"] is not None and on_main["created"] == _instant(made["created"])
    replicated = buf.get("Entry", entry["id"])
    assert (replicated["updated"], replicated["revised"]) == (pending["updated"], True)
    assert replicated["touched"] is not None
    assert redis_client.llen(SiteKeys(custom_schema.site).failed) == 0, [
        json.loads(e)["failure"] for e in redis_client.lrange(SiteKeys(custom_schema.site).failed, 0, -1)]
    buf.close()


def test_a_producers_create_and_update_leaving_out_computed_columns_are_applied(custom_schema, redis_client,
                                                                               main_engine):
    """An existing producer pushes only the queue entries, leaving out the columns SQLAlchemy
    would compute: the drain fills the callable default and onupdate when it checks them."""
    import json
    import uuid

    from obs_pipeline.keys import SiteKeys
    from obs_pipeline_tests.workload import drain_until_settled

    keys = SiteKeys(custom_schema.site)
    entry_id = str(uuid.uuid4())

    def push(operation: str, data: dict, conditions: dict | None = None) -> str:
        tx_id = str(uuid.uuid4())
        redis_client.lpush(keys.buffer, json.dumps({
            "transaction_id": tx_id, "endpoint": "producer", "site": custom_schema.site,
            "steps": [{"step_id": "step1", "operation": operation, "model_class": "Entry", "data": data,
                       "conditions": conditions or {}}]}))
        return tx_id

    created = push("create", {"id": entry_id, "title": "p"})
    drain_until_settled(custom_schema)
    buf = TransactionBuffer(settings=custom_schema)
    assert buf.status(created) == "replicated"
    row = _entry_on_main(main_engine, entry_id)
    assert None not in (row["created"], row["token"], row["stamped"]) and row["slug"] == "p-slug"
    assert (row["updated"], row["touched"], row["revised"]) == (None, None, False)
    updated = push("update", {"title": "q"}, {"id": entry_id})
    drain_until_settled(custom_schema)
    assert buf.status(updated) == "replicated"
    row = _entry_on_main(main_engine, entry_id)
    assert row["title"] == "q" and row["revised"] is True
    assert row["updated"] is not None and row["touched"] is not None
    got = buf.get("Entry", entry_id)
    assert got["updated"] is not None and got["touched"] is not None
    assert redis_client.llen(keys.failed) == 0
    buf.close()


def test_an_onupdate_that_reads_the_row_counts_every_update_of_the_batch(custom_schema, main_engine):
    """Main counts a revision in each UPDATE (onupdate=text("revision + 1")). Folded, a create and
    its two updates in one batch were an insert and one update (revision 1), and two updates of
    another row one update (revision 1 more): each update of such a model now goes on its own,
    in order, as it does for a transaction applied alone."""
    import uuid

    from obs_pipeline_tests.workload import drain_one_batch, drain_until_settled

    buf = TransactionBuffer(settings=custom_schema)
    with buf.transaction() as tx:
        old = tx.create("Counter", {"label": "old"})
    drain_until_settled(custom_schema)
    with buf.transaction() as tx:
        new = tx.create("Counter", {"label": "new"})
    for label in ("a", "b"):
        buf.update("Counter", new["id"], {"label": label})
        buf.update("Counter", old["id"], {"label": label})
    report = drain_one_batch(custom_schema)
    assert (report.transactions, report.applied) == (5, 5), report
    with main_engine.connect() as conn:
        rows = dict(conn.execute(sa.text("SELECT id, label || ' ' || revision FROM custom_counter WHERE id IN "
                                         "(:a, :b)"), {"a": old["id"], "b": new["id"]}).all())
    assert rows == {uuid.UUID(old["id"]): "b 2", uuid.UUID(new["id"]): "b 2"}
    buf.close()


def test_a_default_that_needs_more_than_the_row_from_sqlalchemys_context_is_one_clear_line(
        custom_schema, redis_client, main_engine):
    """A default that uses SQLAlchemy's execution context beyond the row (its connection) cannot
    be evaluated outside SQLAlchemy: a create leaving it out is refused at ingest, naming the
    column, and an existing producer's such create is dead-lettered with that line; the drain
    goes on with what follows (it stopped on a KeyError before). Given, the column is written."""
    import json
    import uuid

    from obs_pipeline.keys import SiteKeys
    from obs_pipeline_tests.workload import drain_until_settled

    keys = SiteKeys(custom_schema.site)
    buf = TransactionBuffer(settings=custom_schema)
    with pytest.raises(InvalidTransaction, match=r"Ticket\.serial: its default needs SQLAlchemy's execution context"):
        with buf.transaction() as tx:
            tx.create("Ticket", {})
    assert not list(redis_client.scan_iter(match=f"site:{custom_schema.site}:*"))
    with buf.transaction() as given:
        ticket = given.create("Ticket", {"serial": 7})
    bad, good = str(uuid.uuid4()), str(uuid.uuid4())
    for tx_id, data in ((bad, {"id": str(uuid.uuid4())}), (good, {"id": str(uuid.uuid4()), "serial": 8})):
        redis_client.lpush(keys.buffer, json.dumps({
            "transaction_id": tx_id, "endpoint": "producer", "site": custom_schema.site,
            "steps": [{"step_id": "step1", "operation": "create", "model_class": "Ticket", "data": data}]}))
    drain_until_settled(custom_schema)
    assert buf.status(given.transaction_id) == buf.status(good) == "replicated"
    failed = [json.loads(e) for e in redis_client.lrange(keys.failed, 0, -1)]
    assert [f["transaction_id"] for f in failed] == [bad]
    assert "Ticket.serial: its default needs SQLAlchemy's execution context" in failed[0]["failure"]["reason"]
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT serial FROM custom_ticket WHERE id = :i"),
                            {"i": ticket["id"]}).scalar_one() == 7
    buf.close()


def test_a_producers_copy_of_a_discarded_update_the_drain_filled_an_onupdate_for_is_not_applied(
        custom_schema, redis_client, main_engine):
    """A producer that only LPUSHes pushes an update of an Entry (whose `updated` SQLAlchemy
    computes, onupdate=datetime.utcnow) again after its push's reply was lost. The first fails on
    main (no such row, for now), is dead-lettered and discarded; the row is created later. The
    drain filled `updated` when it checked each: the letter listed the first one's time, the
    copy got its own, the digests differed, and the copy was applied after the discard."""
    import json
    import uuid

    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.keys import SiteKeys
    from obs_pipeline.model_registry import ModelRegistry
    from obs_pipeline.redis_connections import redis_from_url
    from obs_pipeline_tests.test_reliability import assert_queues_empty
    from obs_pipeline_tests.workload import drain_until_settled

    keys = SiteKeys(custom_schema.site)
    entry_id, tx_id = str(uuid.uuid4()), "producer-entry-0001"
    pushed = json.dumps({"transaction_id": tx_id, "endpoint": "producer", "site": custom_schema.site,
                         "steps": [{"step_id": "s1", "operation": "update", "model_class": "Entry",
                                    "conditions": {"id": entry_id}, "data": {"title": "discarded"}}]})
    redis_client.lpush(keys.buffer, pushed)
    drain_until_settled(custom_schema, retry_base_s=0.05)  # its retries spent: dead-lettered
    assert [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.failed, 0, -1)] == [tx_id]
    store = BufferStore(redis_from_url(custom_schema.redis_url), custom_schema.site)
    DeadLetters(store, ModelRegistry.from_path(MODELS)).discard([tx_id])
    with main_engine.begin() as conn:  # the row it named is created later, for other reasons
        conn.execute(sa.text("INSERT INTO custom_entry (id, title, created, token, slug, stamped, revised) "
                             "VALUES (:i, 'kept', now(), gen_random_uuid(), 'kept-slug', now(), false)"),
                     {"i": entry_id})
    redis_client.lpush(keys.buffer, pushed)  # all the producer knew was that its push's reply was lost
    drain_until_settled(custom_schema, retry_base_s=0.05)
    assert _entry_on_main(main_engine, entry_id)["title"] == "kept"
    assert_queues_empty(redis_client, custom_schema.site)
    assert redis_client.get(keys.transaction(tx_id)) is None
    store.redis.close()
