"""Fast unit tests of pure logic: folding, the wire format's checks, error sorting."""

from __future__ import annotations

import json

import psycopg2
import pytest
from sqlalchemy import exc

from obs_pipeline.apply import fold, is_transient
from obs_pipeline.lsn import int_to_lsn, lsn_to_int, timeline_of_wal_file
from obs_pipeline.model_registry import InvalidTransaction, ModelRegistry
from obs_pipeline.wire import RowWrite, Step, Transaction, created_ids, referenced_ids, steps_in_order, validate
from obs_pipeline_tests.examples import seed_example

REGISTRY = ModelRegistry.from_path("obs_pipeline.models:Base")


def w(op, rid, **values):
    return RowWrite("ExecutedObsUnit", op, rid, values)


def test_fold_create_then_updates_becomes_one_insert():
    out = fold([w("insert", "a", status="running", obs_unit_id=1), w("update", "a", status="done"),
                w("update", "a", end_time="t")])
    assert out == [w("insert", "a", status="done", obs_unit_id=1, end_time="t")]


def test_fold_updates_merge_and_delete_wins():
    assert fold([w("update", "a", status="x"), w("update", "a", end_time="t")]) == [
        w("update", "a", status="x", end_time="t")]
    # main must still see a create or update of a row deleted in the same batch: it may refuse it
    assert fold([w("update", "a", status="x"), w("delete", "a")]) == [w("update", "a", status="x"), w("delete", "a")]
    assert fold([w("insert", "a", status="x"), w("update", "a", end_time="t"), w("delete", "a"),
                 w("delete", "a")]) == [w("insert", "a", status="x", end_time="t"), w("delete", "a")]
    assert fold([w("insert", "a", status="x"), w("delete", "a"), w("insert", "a", status="x")]) is None
    # an update of a row deleted before it finds no row: not folded away
    assert fold([w("insert", "a", status="x"), w("delete", "a"), w("update", "a", status="y")]) is None
    assert fold([w("delete", "a"), w("update", "a", status="y")]) is None


def test_fold_never_hides_a_value_main_may_refuse_behind_another_transactions_update():
    refusable = {"ExecutedObsUnit": (frozenset({"obs_unit_id"}), frozenset({"obs_unit_id", "status"}))}
    t1, t2 = "t1", "t2"
    start = RowWrite("ExecutedObsUnit", "insert", "a", {"obs_unit_id": 31337, "status": "running"}, t1)
    # another transaction changing the foreign key: main must see t1's value first
    assert fold([start, RowWrite("ExecutedObsUnit", "update", "a", {"obs_unit_id": 1}, t2)], refusable) is None
    # the same transaction, or a column main takes whatever passed validation: folded
    same = fold([start, RowWrite("ExecutedObsUnit", "update", "a", {"obs_unit_id": 1}, t1)], refusable)
    assert same == [RowWrite("ExecutedObsUnit", "insert", "a", {"obs_unit_id": 1, "status": "running"}, t1)]
    finish = fold([start, RowWrite("ExecutedObsUnit", "update", "a", {"status": "done"}, t2),
                   RowWrite("ExecutedObsUnit", "update", "a", {"obs_unit_id": 31337}, t2)], refusable)
    assert finish == [RowWrite("ExecutedObsUnit", "insert", "a", {"obs_unit_id": 31337, "status": "done"}, None)]
    # a null main refuses in a NOT NULL column (one with a default may be given one)
    nulled = RowWrite("ExecutedObsUnit", "insert", "a", {"obs_unit_id": 1, "status": None}, t1)
    assert fold([nulled, RowWrite("ExecutedObsUnit", "update", "a", {"status": "x"}, t2)], refusable) is None


def test_fold_refuses_recreate_after_delete_and_double_insert():
    assert fold([w("delete", "a"), w("insert", "a", status="x")]) is None
    assert fold([w("insert", "a", status="x"), w("insert", "a", status="y")]) is None


def test_fold_keeps_first_touch_order_of_rows():
    out = fold([w("insert", "b", status="1"), w("insert", "a", status="1"), w("update", "b", status="2")])
    assert [x.record_id for x in out] == ["b", "a"]


def test_lsn_round_trip():
    assert lsn_to_int("0/3000060") == 0x3000060
    assert lsn_to_int("1A/FF") == (0x1A << 32) + 0xFF
    assert int_to_lsn(lsn_to_int("16/B374D848")) == "16/B374D848"


def test_the_timeline_is_the_wal_file_name_s_first_8_hex_digits():
    assert timeline_of_wal_file("0000001A000000030000004F") == 26
    assert timeline_of_wal_file("000000010000000000000001") == 1
    assert timeline_of_wal_file(None) is None  # a standby writes none


def _dbapi_error(pgcode):
    orig = psycopg2.Error("boom")
    error = exc.DBAPIError("stmt", {}, orig)
    error.orig = type("E", (), {"pgcode": pgcode, "__str__": lambda s: "boom"})()
    return error


@pytest.mark.parametrize("code,transient", [("08006", True), ("57P01", True), ("25006", True), ("40001", True),
                                            ("23503", False), ("23505", False), ("22P02", False), (None, False)])
def test_error_sorting(code, transient):
    assert is_transient(_dbapi_error(code)) is transient


def test_connection_errors_are_transient():
    assert is_transient(exc.OperationalError("stmt", {}, psycopg2.OperationalError("server closed the connection")))
    assert is_transient(ConnectionRefusedError())


def test_seed_example_validates_and_orders_steps():
    doc, ids = seed_example()
    tx = validate(Transaction.from_dict(doc), REGISTRY)
    assert [s.step_id for s in steps_in_order(tx)] == ["step1", "step2", "step3"]
    assert created_ids(tx, REGISTRY) == set(ids.values())
    # its obs unit, by foreign key, and whether the rows it creates exist (see existence_key)
    assert referenced_ids(tx, REGISTRY) == {"obs_unit:123"} | {f"exists {i}" for i in ids.values()}


def test_dependencies_are_reordered_and_checked():
    doc, _ = seed_example()
    doc["steps"] = list(reversed(doc["steps"]))
    tx = validate(Transaction.from_dict(doc), REGISTRY)
    assert [s.step_id for s in steps_in_order(tx)] == ["step1", "step2", "step3"]
    doc["steps"][0]["dependencies"] = ["nope"]
    with pytest.raises(InvalidTransaction, match="depends on unknown step 'nope'"):
        validate(Transaction.from_dict(doc), REGISTRY)


def _order(*steps: tuple[str, list[str]]) -> list[int]:
    """steps_in_order of steps given as (step_id, dependencies), as their listed places."""
    tx = Transaction("t", "e", "s", "", steps=[
        Step(step_id, "create", "ObsUnit", {"n": place}, {}, deps, None) for place, (step_id, deps) in enumerate(steps)])
    return [step.data["n"] for step in steps_in_order(tx)]


@pytest.mark.parametrize("steps, order", [
    # a producer reusing a step id (seed 000's builder takes it from its caller): as listed
    ([("file", []), ("file", ["file"]), ("file", ["file"])], [0, 1, 2]),
    ([("x", []), ("y", ["x"]), ("x", ["y"])], [0, 1, 2]),  # a dependency means the steps listed before
    ([("f", ["f"]), ("f", [])], [1, 0]),  # none listed before it: the other steps of that id
    # children listed first: each waits for its parents (both packages of one id)
    ([("file", ["pkg"]), ("pkg", ["obs"]), ("pkg", ["obs"]), ("obs", [])], [3, 1, 2, 0]),
])
def test_steps_sharing_an_id_keep_their_listed_order_where_it_is_valid(steps, order):
    assert _order(*steps) == order


@pytest.mark.parametrize("steps", [
    [("a", ["b"]), ("b", ["a"])],
    [("a", ["a"])],  # its own id, and no other step has it
    [("a", []), ("b", ["c"]), ("c", ["b"])],
])
def test_steps_that_depend_on_each_other_in_a_cycle_are_refused(steps):
    with pytest.raises(InvalidTransaction, match="steps depend on each other in a cycle"):
        _order(*steps)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.pop("transaction_id"), "transaction_id is missing"),
    (lambda d: d.update(steps=[]), "non-empty list"),
    (lambda d: d["steps"][0].update(operation="upsert"), "operation 'upsert'"),
    (lambda d: d["steps"][0].update(model_class="Telescope"), "unknown model 'Telescope'"),
    (lambda d: d["steps"][0].update(model_class="ObsUnit; DROP TABLE obs_unit"), "unknown model"),
    (lambda d: d["steps"][0]["data"].update(colour="red"), "no column 'colour'"),
    (lambda d: d["steps"][0]["data"].update(obs_unit_id="1"), "is not an integer"),
    (lambda d: d["steps"][0]["data"].update(id="uuid-1"), "is not a UUID"),
    (lambda d: d["steps"][0]["data"].update(status="a\x00b"), "NUL"),
    (lambda d: d["steps"][2].update(data={}), "bulk_create needs"),
    (lambda d: d["steps"][0].update(operation="update", conditions={}), "needs conditions"),
    (lambda d: d.update(retry_count=-1), "retry_count"),
])
def test_malformed_transactions_are_rejected_with_a_reason(mutate, message):
    doc, _ = seed_example()
    mutate(doc)
    with pytest.raises(InvalidTransaction, match=message.replace("(", r"\(")):
        validate(Transaction.from_json(json.dumps(doc)), REGISTRY)


def test_unknown_extra_fields_are_ignored():
    doc, _ = seed_example()
    doc["priority"] = "high"
    doc["steps"][0]["comment"] = "x"
    assert validate(Transaction.from_dict(doc), REGISTRY).transaction_id == doc["transaction_id"]


def test_an_old_redis_is_refused_with_one_clear_line():
    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.config import ConfigError

    class OldRedis:
        def register_script(self, script):
            return None

        def info(self, section):
            return {"redis_version": "6.0.16"}

    with pytest.raises(ConfigError, match=r"^the site's Redis is 6\.0\.16; obs-pipeline needs Redis 6\.2 or newer"):
        BufferStore(OldRedis(), "site").require_redis()
    OldRedis.info = lambda self, section: {"redis_version": "7.0.15"}
    BufferStore(OldRedis(), "site").require_redis()  # no error


@pytest.mark.parametrize("persistence, used_memory, asks", [
    ({"aof_enabled": 1, "aof_current_size": 900 * 2**20}, 100 * 2**20, True),    # 9x the data: history
    ({"aof_enabled": 1, "aof_current_size": 700 * 2**20}, 100 * 2**20, False),   # 7x: not yet worth a fork
    ({"aof_enabled": 1, "aof_current_size": 60 * 2**20}, 1 * 2**20, False),      # under 64 MB
    ({"aof_enabled": 0, "aof_current_size": 0}, 1, False),                        # AOF off
    ({"aof_enabled": 1, "aof_current_size": 2**30, "aof_rewrite_in_progress": 1}, 1, False),
    ({"aof_enabled": 1, "aof_current_size": 2**30, "rdb_bgsave_in_progress": 1}, 1, False),
])
def test_the_aof_is_compacted_only_when_the_file_is_mostly_history(persistence, used_memory, asks):
    from obs_pipeline.buffer_store import BufferStore

    class Redis:
        asked = 0

        def register_script(self, script):
            return None

        def info(self, section):
            return persistence if section == "persistence" else {"used_memory": used_memory}

        def bgrewriteaof(self):
            Redis.asked += 1

    assert BufferStore(Redis(), "site").compact_aof() is asks
    assert Redis.asked == int(asks)


def test_a_redis_that_refuses_bgrewriteaof_is_left_to_its_own_schedule():
    import redis as redis_py

    from obs_pipeline.buffer_store import BufferStore

    class ManagedRedis:
        def register_script(self, script):
            return None

        def info(self, section):
            return {"aof_enabled": 1, "aof_current_size": 2**31} if section == "persistence" else {"used_memory": 1}

        def bgrewriteaof(self):
            raise redis_py.ResponseError("unknown command 'BGREWRITEAOF'")

    assert BufferStore(ManagedRedis(), "site").compact_aof() is False


# --- batch sizing by main's round trip ---------------------------------------------------------

def test_batches_stay_at_their_size_where_main_is_near_and_grow_where_it_is_far():
    from obs_pipeline.drain import batch_size_for

    # 2,000 transactions in 0.2 s: 100 us each. Near (0.2 ms round trip): no reason to grow.
    assert batch_size_for(0.0002, 0.2, 2000, least=2000, most=10_000) == 2000
    # under 5 ms a batch keeps its size even where the rule would grow it (a tiny batch, a busy machine)
    assert batch_size_for(0.004, 0.005, 10, least=10, most=10_000) == 10
    assert batch_size_for(0.005, 0.006, 10, least=10, most=10_000) == 200
    # 50 ms: the round trip is a fifth of the apply at 4 x 0.05 / 100 us = 2,000 transactions
    assert batch_size_for(0.05, 0.25, 2000, least=1000, most=10_000) == 2000
    # 250 ms with 2,000 costing 0.25 s + 0.2 s: 10,000 wanted, 8,000 allowed
    assert batch_size_for(0.25, 0.45, 2000, least=2000, most=8000) == 8000
    # rounded up to hundreds
    assert batch_size_for(0.01, 0.11, 1000, least=100, most=10_000) == 400


@pytest.mark.parametrize("round_trip, apply_s, transactions, expected", [
    (None, 0.5, 2000, 2000),    # never connected (nothing measured): the configured size
    (0.25, 0.5, 0, 2000),       # nothing applied: no figure per transaction
    (0.25, 0.24, 2000, 10_000),  # the batch cost no more than its round trip: the largest allowed
])
def test_batch_sizing_without_a_usable_measurement(round_trip, apply_s, transactions, expected):
    from obs_pipeline.drain import batch_size_for

    assert batch_size_for(round_trip, apply_s, transactions, least=2000, most=10_000) == expected


def test_a_run_sizes_its_first_claims_by_the_link_its_last_run_saw():
    from obs_pipeline.drain import batch_size_for, batch_size_for_link

    # the figures batch_size_for works out of a batch, given as the last run left them
    assert batch_size_for_link(0.25, 100e-6, least=2000, most=8000) == batch_size_for(
        0.25, 0.45, 2000, least=2000, most=8000) == 8000
    assert batch_size_for_link(0.01, 100e-6, least=100, most=10_000) == 400
    assert batch_size_for_link(0.25, None, least=2000, most=10_000) == 2000   # no cost known
    assert batch_size_for_link(0.0002, 100e-6, least=2000, most=10_000) == 2000  # near: its size
    assert batch_size_for_link(0.25, -1e-6, least=2000, most=10_000) == 10_000  # cost no more than the link


def test_a_runs_first_claim_is_small_where_a_full_ones_parse_outlasts_a_batchs_round_trips():
    from obs_pipeline.drain import first_claim_size

    # 50 ms, 4,700 parsed at 60 us: 0.28 s against 2 round trips, 0.1 s; 10,000 waiting take 3
    # batches from 2,000 as from 4,700 -> start at batch_size
    assert first_claim_size(4700, 2000, 0.05, 2, 60e-6, backlog=10_000) == 2000
    assert first_claim_size(4700, 2000, 0.05, 2, 60e-6, backlog=9_000) == 4700  # 3 batches, not 2
    # 250 ms, 50,000 waiting: from 2,000 a sixth batch of 10,000's 5 -> full-sized from the start
    assert first_claim_size(10_000, 2000, 0.25, 1, 60e-6, backlog=50_000) == 10_000
    assert first_claim_size(10_000, 2000, 0.25, 1, 60e-6, backlog=42_000) == 2000  # 5 batches either way
    assert first_claim_size(10_000, 2000, 0.25, 2, 20e-6, backlog=42_000) == 10_000  # 0.2 s against 0.5 s
    assert first_claim_size(2000, 2000, 0.05, 2, 1.0, backlog=10_000) == 2000  # no larger size to save on
    assert first_claim_size(4700, 2000, 0.05, 2, 60e-6, backlog=1_500) == 4700  # one claim takes it all
    assert first_claim_size(4700, 2000, 0.05, None, 60e-6, backlog=10_000) == 4700  # an earlier version's link
    assert first_claim_size(4700, 2000, 0.05, 2, None, backlog=10_000) == 4700


@pytest.mark.parametrize("config, message", [
    ({"batch_size": 0}, "batch_size must be a whole number of transactions >= 1, not 0"),
    ({"batch_size": "2000"}, "batch_size must be a whole number of transactions >= 1, not '2000'"),
    ({"batch_size": 5000, "max_batch_size": 2000}, "max_batch_size must be a whole number >= batch_size (5000), not 2000"),
])
def test_a_bad_batch_size_is_one_clear_error(config, message):
    from obs_pipeline.drain import DrainConfig

    with pytest.raises(ValueError) as raised:
        DrainConfig(**config)
    assert str(raised.value) == message


def test_numpy_counts_and_seconds_are_taken_as_ints_and_floats():
    """A batch size from a DataFrame or an array (np.int64) is no `int` to isinstance: it was
    refused as 'batch_size must be a whole number ... not np.int64(500)'. Any Integral is taken,
    as an int, and any real number of seconds as a float."""
    import decimal

    np = pytest.importorskip("numpy")
    from obs_pipeline.drain import DrainConfig

    config = DrainConfig(batch_size=np.int64(500), max_batch_size=np.int32(4000), timeout_attempts=np.uint8(3),
                         niceness=np.int16(10), lease_ttl_s=np.float32(1.5), retry_base_s=np.int64(5),
                         idle_poll_s=decimal.Decimal("0.25"), aof_check_s=np.float64(30))
    counts = (config.batch_size, config.max_batch_size, config.timeout_attempts, config.niceness)
    assert counts == (500, 4000, 3, 10) and {type(c) for c in counts} == {int}
    seconds = (config.lease_ttl_s, config.retry_base_s, config.idle_poll_s, config.aof_check_s)
    assert seconds == (1.5, 5.0, 0.25, 30.0) and {type(s) for s in seconds} == {float}
    assert config.largest_batch == 4000


@pytest.mark.parametrize("config, message", [
    ({"batch_size": True}, "batch_size must be a whole number of transactions >= 1, not True"),
    ({"max_batch_size": 2500.0}, "max_batch_size must be a whole number >= batch_size (2000), not 2500.0"),
    ({"niceness": 40}, "niceness must be a whole number from -20 to 19, not 40"),
    ({"lease_ttl_s": "60"}, "lease_ttl_s must be 0.001 to 86400 s (the lease's Redis expiry), not '60'"),
    ({"idle_poll_s": -0.2}, "idle_poll_s must be 0 or more seconds, and finite, not -0.2"),
    ({"backoff_initial_s": float("nan")}, "backoff_initial_s must be 0 or more seconds, and finite, not nan"),
    ({"backoff_max_s": False}, "backoff_max_s must be 0 or more seconds, and finite, not False"),
    ({"aof_check_s": "30"}, "aof_check_s must be 0 or more seconds, and finite, or None, not '30'"),
])
def test_a_drain_setting_of_the_wrong_kind_is_refused_in_one_line_before_the_run(config, message):
    """Each was taken, and failed the run later (time.sleep: 'sleep length must be
    non-negative', with the lease held), or raised a TypeError comparing text with a float; a
    bool was taken for a count."""
    from obs_pipeline.drain import DrainConfig

    with pytest.raises(ValueError) as raised:
        DrainConfig(**config)
    assert str(raised.value) == message


def test_the_largest_batch_defaults_to_the_far_size_or_the_batch_size_if_larger():
    from obs_pipeline.drain import FAR_BATCH_SIZE, DrainConfig

    assert DrainConfig().largest_batch == FAR_BATCH_SIZE == 10_000
    assert DrainConfig(batch_size=20_000).largest_batch == 20_000
    assert DrainConfig(batch_size=100, max_batch_size=100).largest_batch == 100


def test_dependencies_follow_each_models_key_and_foreign_keys_and_keep_tables_apart():
    """A schema of its own (OBS_MODELS): primary keys not named `id`, integer keys in two
    tables. A row is named by its table and key, so that instrument 5 and run 5 are not taken
    for one another; UUIDs stand alone, as they are unique anyway."""
    import sqlalchemy as sa
    from sqlalchemy.orm import DeclarativeBase

    class Base(DeclarativeBase):
        pass

    class Instrument(Base):
        __tablename__ = "instrument"
        code = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.Text, nullable=False)

    class Run(Base):
        __tablename__ = "run"
        run_no = sa.Column(sa.Integer, primary_key=True)
        instrument_code = sa.Column(sa.Integer, sa.ForeignKey("instrument.code"), nullable=False)
        note = sa.Column(sa.Text)

    registry = ModelRegistry.from_base(Base)

    def tx(*steps):
        return validate(Transaction.from_dict({"transaction_id": "t", "steps": [
            {"step_id": f"s{i}", **step} for i, step in enumerate(steps)]}), registry)

    creates_instrument = tx({"operation": "create", "model_class": "Instrument", "data": {"code": 5, "name": "cam"}})
    creates_run = tx({"operation": "create", "model_class": "Run", "data": {"run_no": 5, "instrument_code": 5}})
    updates_run = tx({"operation": "update", "model_class": "Run", "conditions": {"run_no": 5},
                      "data": {"note": "0b8a0c7e-55b4-4a8e-9a43-5a4d2c3e9f10"}})
    assert created_ids(creates_instrument, registry) == {"instrument:5"}
    assert referenced_ids(creates_instrument, registry) == {"exists instrument:5"}  # behind a delete of it only
    assert created_ids(creates_run, registry) == {"run:5"}
    assert referenced_ids(creates_run, registry) == {"instrument:5", "exists run:5"}  # not run 5, which it creates
    assert referenced_ids(updates_run, registry) == {"run:5", "0b8a0c7e-55b4-4a8e-9a43-5a4d2c3e9f10"}
    both = tx({"operation": "create", "model_class": "Instrument", "data": {"code": 6, "name": "spec"}},
              {"operation": "create", "model_class": "Run", "data": {"run_no": 9, "instrument_code": 6}})
    assert referenced_ids(both, registry) == {"exists instrument:6", "exists run:9"}  # what it creates is not
    created_then_updated = tx({"operation": "create", "model_class": "Run", "data": {"run_no": 7, "instrument_code": 5}},
                              {"operation": "update", "model_class": "Run", "conditions": {"run_no": 7},
                               "data": {"note": "x"}})
    assert referenced_ids(created_then_updated, registry) == {"instrument:5", "exists run:7"}
    # a row it deletes and then creates again is one it uses: another transaction's, until the delete
    deleted_then_created = tx({"operation": "delete", "model_class": "Run", "conditions": {"run_no": 5}},
                              {"operation": "create", "model_class": "Run", "data": {"run_no": 5, "instrument_code": 5}})
    assert referenced_ids(deleted_then_created, registry) == {"run:5", "instrument:5", "exists run:5"}


def test_retry_delays_double_with_jitter_and_stop_at_an_hour():
    """A producer may set its own retry_count and max_retries: 2 ** 1100 seconds overflowed a
    float and stopped the drain at that transaction, every run."""
    from obs_pipeline.drain import RETRY_DELAY_MAX_S, retry_delay

    for n, base in ((1, 5.0), (2, 10.0), (3, 20.0)):
        assert 0.8 * base <= retry_delay(5.0, n) <= 1.2 * base
    for n in (12, 1100, 10**6):
        assert 0.8 * RETRY_DELAY_MAX_S <= retry_delay(5.0, n) <= 1.2 * RETRY_DELAY_MAX_S


def test_a_row_held_by_one_transaction_is_never_taken_by_another():
    from obs_pipeline.wire import claim_rows

    holders = {"r1": "tx1", "r2": "!tx9"}
    claim_rows(holders, {"r1", "r2", "r3"}, "tx2")          # behind tx1 and tx9: only r3 is free
    assert holders == {"r1": "tx1", "r2": "!tx9", "r3": "tx2"}
    claim_rows(holders, {"r1", "r3"}, "!tx1")               # tx1 dead-lettered: its own row only
    assert holders == {"r1": "!tx1", "r2": "!tx9", "r3": "tx2"}


def test_a_transaction_writes_what_it_creates_updates_and_deletes():
    from obs_pipeline.wire import written_ids

    doc, ids = seed_example()
    doc["steps"].append({"step_id": "step4", "operation": "update", "model_class": "ObsUnit",
                         "conditions": {"id": 5}, "data": {"name": "renamed"}})
    doc["steps"].append({"step_id": "step5", "operation": "delete", "model_class": "RawDataFile",
                         "conditions": {"id": "0b8a0c7e-55b4-4a8e-9a43-5a4d2c3e9f10"}})
    tx = validate(Transaction.from_dict(doc), REGISTRY)
    # and whether a row exists, where it creates or deletes it (see existence_key)
    assert written_ids(tx, REGISTRY) == set(ids.values()) | {f"exists {i}" for i in ids.values()} | {
        "obs_unit:5", "0b8a0c7e-55b4-4a8e-9a43-5a4d2c3e9f10", "exists 0b8a0c7e-55b4-4a8e-9a43-5a4d2c3e9f10"}


def test_a_transaction_id_must_be_text_a_key_can_hold_and_not_a_dead_mark():
    from obs_pipeline.wire import is_storable_id

    assert is_storable_id("58b0b150-666d-4179-8f20-d38f8246e22f") and is_storable_id("legacy-42")
    for bad in ("", "x" * 201, "nul\x00", "lone\udc80", "!looks-dead", 42, None):
        assert not is_storable_id(bad), bad


def test_overlaid_creates_survive_every_rewrite_and_are_cleaned_as_listed():
    """Which given uuid keys ingest overlaid (`overlaid_creates`) must reach every path that
    cleans a transaction's caches: the drain's parse, a retry or park (to_json), a dead letter
    requeued or discarded. Only the listed rows get an overlay to clean."""
    from types import SimpleNamespace

    from obs_pipeline.dead_letters import DeadLetter, DeadLetters, _parse
    from obs_pipeline.drain import _failed_entry
    from obs_pipeline.keys import SiteKeys
    from obs_pipeline.wire import cache_footprint

    doc, ids = seed_example()
    doc["overlaid_creates"] = {"RawDataFile": [ids["uuid-4"]]}
    tx = validate(Transaction.from_json(json.dumps(doc)), REGISTRY)
    overlays = [["RawDataFile", ids["uuid-4"], doc["transaction_id"]]]
    assert cache_footprint(tx, REGISTRY)["o"] == overlays
    assert len(cache_footprint(tx, REGISTRY)["c"]) == 4
    again = Transaction.from_json(tx.to_json())
    assert again.overlaid_creates == doc["overlaid_creates"]
    raw = _failed_entry(tx.to_dict(), "boom", kind="permanent")
    letter = DeadLetter(raw)
    assert cache_footprint(validate(_parse(letter.doc), REGISTRY), REGISTRY)["o"] == overlays  # discard
    letters = DeadLetters(SimpleNamespace(keys=SiteKeys("s")), REGISTRY)
    requeued, _, _ = letters._requeued(letter)
    assert cache_footprint(validate(Transaction.from_json(requeued), REGISTRY), REGISTRY)["o"] == overlays
    # without the field (every other producer, a generated key): nothing in the JSON, no overlay
    del doc["overlaid_creates"]
    plain = Transaction.from_json(json.dumps(doc))
    assert "overlaid_creates" not in plain.to_json() and cache_footprint(plain, REGISTRY)["o"] == []
    # another shape is a producer's own field (the contract ignores unknown fields): no overlay
    for other in ([ids["uuid-4"]], {"RawDataFile": ids["uuid-4"]}, {"RawDataFile": [1]}, "yes"):
        theirs = validate(Transaction.from_dict({**doc, "overlaid_creates": other}), REGISTRY)
        assert theirs.overlaid_creates is None and cache_footprint(theirs, REGISTRY)["o"] == []
        assert "overlaid_creates" not in theirs.to_json()


def test_dead_letters_read_whole_keep_their_bytes_not_their_parsed_documents():
    """`failed retry --all` and `failed discard` read the whole list: kept parsed, each letter of
    1.4 KB held 6.5 KB more (a retry of 200,000 took 3.3 GB; a backlog dead-lettered whole can be
    a million). A letter keeps its bytes, its id, reason and kind; its document is parsed when
    asked for. (A bound on what is held, with a wide margin: no timing.)"""
    import tracemalloc

    from obs_pipeline.dead_letters import _letters
    from obs_pipeline.drain import _failed_entry

    reason = 'main refused the batch: UndefinedColumn: column "start_time" of relation "executed_obs_unit" does not exist'
    raws = [_failed_entry(seed_example()[0], reason, kind="permanent", attempts=5).encode() for _ in range(2000)]
    tracemalloc.start()
    try:
        letters = _letters(raws)  # the list as LRANGE reads it (newest first): oldest first
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_letter = held / len(raws)
    assert per_letter < 1024, f"{per_letter:.0f} bytes held per letter of {len(raws[0])}, besides its bytes"
    docs = [json.loads(raw) for raw in reversed(raws)]
    assert [letter.transaction_id for letter in letters] == [doc["transaction_id"] for doc in docs]
    assert [letter.raw for letter in letters] == raws[::-1]
    assert letters[0].doc == docs[0] and letters[0].failure == docs[0]["failure"]
    assert (letters[0].reason, letters[0].kind, letters[0].summary()["attempts"]) == (reason, "permanent", 5)


@pytest.mark.parametrize("code, text, kind", [
    ("57014", "canceling statement due to statement timeout", "statement timeout"),
    ("55P03", "canceling statement due to lock timeout", "lock timeout"),
    ("57014", "canceling statement due to user request", "statement cancelled"),
    ("57P01", "terminating connection due to administrator command", None),  # transient, not a timeout
    ("23505", "duplicate key value violates unique constraint", None),
])
def test_what_cancelled_a_statement_on_main(code, text, kind):
    from obs_pipeline.apply import is_transient, timeout_kind

    class Error(Exception):
        pgcode = code

    assert timeout_kind(Error(text)) == kind
    assert kind is None or is_transient(Error(text))  # retried, never charged to a transaction


@pytest.mark.parametrize("attempts", [0, -1, 2.5, "5"])
def test_timeout_attempts_is_a_whole_number_of_at_least_one(attempts):
    from obs_pipeline.drain import DrainConfig

    with pytest.raises(ValueError, match="timeout_attempts must be a whole number >= 1"):
        DrainConfig(timeout_attempts=attempts)


class _MainCancelling:
    """A stand-in for main that cancels any batch of more than `most` transactions, and every
    one holding a transaction of `slow`, as its statement_timeout would."""

    def __init__(self, most: int, slow: set[str] = frozenset()):
        from sqlalchemy.engine import make_url
        self.most, self.slow, self.committed = most, slow, []
        self.url = make_url("postgresql://drainer@main/obs")

    def apply_batch(self, txs, blocked=None, ahead=()):
        from obs_pipeline.apply import BatchResult, StatementTimeout
        if len(txs) > self.most or any(tx.transaction_id in self.slow for tx in txs):
            raise StatementTimeout("canceling statement due to statement timeout", "statement timeout")
        self.committed.extend(tx.transaction_id for tx in txs)
        return BatchResult(applied=list(txs))

    def applied_already(self, txs):
        from obs_pipeline.apply import BatchResult
        return BatchResult(already_applied=[tx for tx in txs if tx.transaction_id in self.committed])


class _TimeoutsKept:
    def __init__(self):
        self.saved = (None, {})

    def timeouts(self):
        return self.saved[0], dict(self.saved[1])

    def save_timeouts(self, piece, alone, attempts=None):
        self.saved = (piece, dict(alone))


def _drain_with_retries(pieces, txs):
    """What Drain.step does with TimeoutPieces: apply; on a timeout, halve and claim again."""
    from obs_pipeline.apply import StatementTimeout
    sizes = []
    for _ in range(50):
        pieces.load()
        try:
            result = pieces.apply(txs)
        except StatementTimeout as timeout:
            pieces.timed_out(timeout)
            sizes.append(pieces.piece)
            continue
        if pieces.in_effect:
            pieces.passed(batch_size=len(txs))
        return result, sizes
    raise AssertionError("never went through")


def test_timeouts_halve_the_pieces_until_they_fit_then_double_back_to_whole_batches():
    from obs_pipeline.timeout_pieces import TimeoutPieces
    txs = [Transaction.from_json(json.dumps(seed_example()[0])) for _ in range(16)]
    main, store = _MainCancelling(most=3), _TimeoutsKept()
    result, sizes = _drain_with_retries(TimeoutPieces(store, main, REGISTRY, attempts=5), txs)
    assert sizes == [8, 4, 2]  # 16 -> 8 -> 4 -> 2: the first size under main's limit
    assert main.committed == [tx.transaction_id for tx in txs]  # each once, in order
    assert [tx.transaction_id for tx in result.applied] == main.committed[-len(result.applied):]
    assert store.saved == (4, {})  # one batch went through: pieces of 4 next time
    # a new Drain (the next run) starts from what was kept: 4 is cancelled, 2 fits, then 4, 8, whole
    nxt = [Transaction.from_json(json.dumps(seed_example()[0])) for _ in range(16)]
    pieces = TimeoutPieces(store, main, REGISTRY, attempts=5)
    _, sizes = _drain_with_retries(pieces, nxt)
    assert sizes == [2] and store.saved == (4, {})
    main.most = 100
    for piece in (8, None):
        _drain_with_retries(pieces, [Transaction.from_json(json.dumps(seed_example()[0])) for _ in range(16)])
        assert store.saved == (piece, {})


def test_a_transaction_timing_out_alone_is_given_up_after_its_attempts_and_the_rest_applied_once():
    from obs_pipeline.timeout_pieces import TimeoutPieces
    txs = [Transaction.from_json(json.dumps(seed_example()[0])) for _ in range(4)]
    slow = txs[2].transaction_id
    main, store = _MainCancelling(most=100, slow={slow}), _TimeoutsKept()
    result, sizes = _drain_with_retries(TimeoutPieces(store, main, REGISTRY, attempts=3), txs)
    # whole -> 2 (the first half commits) -> alone, counted twice; the 3rd time alone it is given up
    assert sizes == [2, 1, 1, 1]
    assert [tx.transaction_id for tx, _ in result.timed_out] == [slow]
    reason = result.timed_out[0][1]
    assert reason.startswith("statement timeout on main 3 times in a row, applied alone") and "ALTER ROLE drainer " \
        "SET statement_timeout" in reason and reason.endswith(f"`obs-pipeline failed retry {slow}`"), reason
    assert sorted(main.committed) == sorted(tx.transaction_id for tx in txs if tx.transaction_id != slow)
    assert len(main.committed) == 3
    assert store.saved == (2, {})  # the batch went through: pieces doubled from 1, the count in a row ended


@pytest.mark.parametrize("kind, advice", [
    ("statement timeout", "raise statement_timeout (ALTER ROLE drainer SET statement_timeout = ...)"),
    ("lock timeout", "holds a lock it needs: end it (pg_stat_activity, pg_locks) or raise lock_timeout"),
    ("statement cancelled", "something on main cancels the drain's statements (pg_cancel_backend"),
])
def test_a_transaction_given_up_after_timeouts_is_told_what_to_do_for_what_cancelled_it(kind, advice):
    """A statement that an administrator or a watchdog cancelled (57014 "due to user request")
    is no timeout: raising statement_timeout would not help."""
    from obs_pipeline.apply import StatementTimeout
    from obs_pipeline.timeout_pieces import TimeoutPieces

    tx = Transaction.from_json(json.dumps(seed_example()[0]))
    reason = TimeoutPieces(_TimeoutsKept(), _MainCancelling(most=0), REGISTRY, attempts=5)._reason(
        StatementTimeout("canceling statement", kind), tx)
    assert reason.startswith(f"{kind} on main 5 times in a row, applied alone") and advice in reason, reason
    assert reason.endswith(f"then `obs-pipeline failed retry {tx.transaction_id}`"), reason
    assert ("statement_timeout" in reason) == (kind == "statement timeout"), reason


class _Channel:
    """A stand-in for a pub/sub subscription that hands out the given messages, then nothing."""

    def __init__(self, *payloads: bytes):
        self.messages = [{"type": "message", "data": p} for p in payloads]

    def get_message(self, ignore_subscribe_messages: bool, timeout: float):
        return self.messages.pop(0) if self.messages else None


@pytest.mark.parametrize("payloads, event", [
    ([b'{"event": "applied", "transaction_ids": ["tx-1"]}'], "applied"),
    ([b'{"event": "applied", "transaction_ids": ["tx-10"]}', b'{"event": "replicated", "transaction_ids": ["tx-1"]}'],
     "replicated"),  # tx-10 holds "tx-1" but does not name it
    ([b'{"event": "applied", "transaction_ids": ["tx-10"]}'], None),
    ([b'{"event": "applied", "transaction_ids": "tx-1"}'], None),  # not a list: no substring match
    ([b'not json but tx-1'], None),
])
def test_wait_takes_an_event_that_names_the_transaction_for_its_word(payloads, event):
    from obs_pipeline.ingest import TransactionBuffer

    assert TransactionBuffer._sleep_until_event(_Channel(*payloads), "tx-1", 0.05) == event


def test_a_date_column_takes_numpy_days_and_refuses_their_times_and_nat():
    """A datetime64 of a day is its date (it was 'not an ISO-8601 date'); one with a time of
    day would lose it, and NaT is no date: refused, the NaT saying to give None."""
    np = pytest.importorskip("numpy")
    from obs_pipeline.column_values import converter

    date = converter("date", 64, 64, None, False)
    assert date(np.datetime64("2025-01-02")) == "2025-01-02"
    with pytest.raises(ValueError, match=r"is not an ISO-8601 date$"):
        date(np.datetime64("2025-01-02T03"))
    with pytest.raises(ValueError, match=r"is not a date \(numpy's missing value\): give None for no value$"):
        date(np.datetime64("NaT"))


def test_search_frame_takes_every_datetime_and_date_that_ingest_takes():
    """Ingest takes years 1-9999 (an end time of 9999-12-31 for "open", say). pandas before 3.0
    (pyproject allows 2.2 and up) parses text to nanoseconds, which hold years 1677-2262 only:
    search_frame raised OutOfBoundsDatetime, a page of it, for any such row of the model. The
    columns are built at microseconds, as PostgreSQL keeps them, under either pandas."""
    import datetime as dt
    from types import SimpleNamespace

    pd = pytest.importorskip("pandas")
    from obs_pipeline.read_filters import series

    utc = dt.timezone.utc
    stamps = series(pd, SimpleNamespace(kind="datetime"), ["0001-01-01T00:00:00", None,
                                                           "9999-12-31T23:59:59.999999+00:00",
                                                           "2025-01-01T00:00:00.500000+00:00"])
    assert str(stamps.dtype) == "datetime64[us, UTC]"
    assert [None if pd.isna(v) else v.to_pydatetime() for v in stamps] == [
        dt.datetime(1, 1, 1, tzinfo=utc), None, dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=utc),
        dt.datetime(2025, 1, 1, 0, 0, 0, 500000, tzinfo=utc)]
    days = series(pd, SimpleNamespace(kind="date"), ["0001-01-01", "9999-12-31", None])
    assert str(days.dtype) == "datetime64[us]"
    assert [None if pd.isna(v) else v.date() for v in days] == [dt.date(1, 1, 1), dt.date(9999, 12, 31), None]
    assert str(series(pd, SimpleNamespace(kind="datetime"), []).dtype) == "datetime64[us, UTC]"
    assert str(series(pd, SimpleNamespace(kind="date"), []).dtype) == "datetime64[us]"


def test_filters_keep_each_columns_clauses_and_tests_apart():
    """search judges a replica row merged with pending updates column by column: the columns
    the buffer sets by their Python tests, the rest by the replica's SQL verdict (see
    query._matches_merged). Each column's clauses and tests are its own, and all of them
    together are the whole filter."""
    from obs_pipeline.read_filters import compile_filters

    spec = REGISTRY.model("ExecutedObsUnit")
    compiled = compile_filters(spec, {"obs_unit_id": {">": 1, "<": 5}, "status": ["a", None],
                                      "start_time": {"!=": None}})
    assert {name: len(clauses) for name, clauses in compiled.column_sql.items()} == {
        "obs_unit_id": 2, "status": 1, "start_time": 1}
    assert {name: len(tests) for name, tests in compiled.column_tests.items()} == {
        "obs_unit_id": 1, "status": 1, "start_time": 1}
    assert [c for cs in compiled.column_sql.values() for c in cs] == compiled.sql
    assert [t for ts in compiled.column_tests.values() for t in ts] == compiled.tests
    assert [name for name, _ in compiled.verdicts()] == ["obs_unit_id", "status", "start_time"]
    row = {"obs_unit_id": 9, "status": "a", "start_time": None}
    assert compiled.match_columns(row, ["status"])
    assert not compiled.match_columns(row, ["status", "obs_unit_id"])
    assert not compiled.match_columns(row, ["start_time"])
    assert not compiled.match(row)
    assert compiled.match({"obs_unit_id": 3, "status": None, "start_time": "2025-01-01T00:00:00Z"})
    assert str(compiled.verdicts()[0][1].compile()) == (
        "executed_obs_unit.obs_unit_id > :obs_unit_id_1 AND executed_obs_unit.obs_unit_id < :obs_unit_id_2")


# --- the order of those waiting to write a row (row_order) ----------------------------------------

def test_a_transaction_waits_for_the_head_of_its_row_unless_the_head_goes_before_it_in_the_batch():
    from obs_pipeline.row_order import RowOrder

    order = RowOrder({"r": "H"}, {})
    assert order.blocker("r", "X", ahead=set(), waited_on=set()) == "H"
    assert order.blocker("r", "X", ahead={"H"}, waited_on=set()) is None
    assert order.blocker("r", "X", ahead={"H"}, waited_on={"H"}) == "H"  # others parked behind H go first
    assert order.blocker("r", "H", ahead=set(), waited_on=set()) is None
    assert RowOrder({"r": "!X"}, {}).blocker("r", "X", ahead=set(), waited_on=set()) is None  # its own dead mark
    assert RowOrder({"r": "!H"}, {}).blocker("r", "X", ahead={"H"}, waited_on=set()) == "!H"
    assert order.blocker("s", "X", ahead=set(), waited_on=set()) is None  # nobody holds s


def test_a_transaction_waits_for_each_one_queued_before_it_that_is_not_applied_before_it_in_the_batch():
    from obs_pipeline.row_order import RowOrder

    order = RowOrder({"r": "H"}, {"r": ["A", "!B", "X", "C"]})
    assert order.blocker("r", "X", ahead={"H"}, waited_on=set()) == "A"
    assert order.blocker("r", "X", ahead={"H", "A"}, waited_on=set()) == "!B"  # a dead one is never passed
    assert order.blocker("r", "A", ahead={"H"}, waited_on=set()) is None
    assert order.blocker("r", "N", ahead={"H", "A"}, waited_on=set()) == "!B"  # one not queued comes last
    assert RowOrder({"r": "H"}, {"r": ["A", "X"]}).blocker("r", "N", ahead={"H", "A", "X"}, waited_on=set()) is None


def test_joining_a_rows_queue_keeps_a_transactions_place():
    from obs_pipeline.row_order import RowOrder

    order = RowOrder({"r": "H"}, {"r": ["A", "X", "B"]})
    order.join("r", "!X")  # dead-lettered where it waits: in its place
    order.join("r", "N")  # a newcomer: last
    order.join("s", "N")
    assert order.queues == {"r": ["A", "!X", "B", "N"], "s": ["N"]}
    assert order.blocker("r", "N", ahead={"H", "A", "B"}, waited_on=set()) == "!X"
    assert order.was_read("r", "X") and not order.was_read("r", "N")
