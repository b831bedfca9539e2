"""The buffer is a trust boundary: garbage pushed into it never crashes the drain, never
reaches main, and is always dead-lettered with a reason."""

from __future__ import annotations

import json
import uuid

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from obs_pipeline.buffer_store import BufferStore
from obs_pipeline.config import Settings
from obs_pipeline.dead_letters import DeadLetters
from obs_pipeline.drain import Drain, DrainConfig
from obs_pipeline.keys import SiteKeys
from obs_pipeline.model_registry import ModelRegistry
from obs_pipeline_tests.examples import seed_example
from obs_pipeline_tests.workload import drain_one_batch, drain_until_settled

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)

# Values that are wrong for the column at that path (never a valid replacement).
WRONG = {
    "id": st.sampled_from(["uuid-1", "", "not-a-uuid", 12, None, [], {}]),
    "obs_unit_id": st.one_of(st.text(max_size=5), st.floats(), st.booleans(), st.just(2 ** 40), st.just(987654),
                             st.lists(st.integers(), max_size=2)),
    "start_time": st.one_of(st.text(max_size=8).filter(lambda t: not t[:4].isdigit()), st.integers(), st.none()),
    "status": st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2), st.just("a\x00b")),
    "name": st.one_of(st.integers(), st.none(), st.just({"$gt": ""})),
    "executed_obs_unit_id": st.one_of(st.just(str(uuid.UUID(int=7))), st.text(max_size=5), st.integers()),
}


@st.composite
def garbage(draw):
    kind = draw(st.sampled_from(["bytes", "json", "wrong_value", "missing", "unknown_column", "unknown_model",
                                 "injection", "bad_operation", "bad_dependency", "bad_steps"]))
    doc, _ = seed_example()
    doc["max_retries"] = 0  # what the database refuses is dead-lettered at once here
    steps = doc["steps"]
    if kind == "bytes":
        return draw(st.binary(max_size=60)) + b"\xff"
    if kind == "json":
        value = draw(json_values)
        return json.dumps(value if not isinstance(value, dict) else {**value, "steps": "x"})
    if kind == "wrong_value":
        index = draw(st.sampled_from([0, 1]))
        column = draw(st.sampled_from([c for c in steps[index]["data"] if c in WRONG]))
        steps[index]["data"][column] = draw(WRONG[column])
    elif kind == "missing":
        column = draw(st.sampled_from(["obs_unit_id", "start_time", "status"]))
        del steps[0]["data"][column]
    elif kind == "unknown_column":
        steps[draw(st.sampled_from([0, 1]))]["data"][draw(st.text(min_size=1, max_size=10).filter(
            lambda c: c not in ("id", "name", "obs_unit_id", "start_time", "end_time", "status",
                                "executed_obs_unit_id")))] = 1
    elif kind == "unknown_model":
        steps[0]["model_class"] = draw(st.text(max_size=12).filter(lambda m: m not in (
            "ObsUnit", "ExecutedObsUnit", "RawDataPackage", "RawDataFile")))
    elif kind == "injection":
        steps[0]["model_class"] = "ExecutedObsUnit; DROP TABLE obs_unit; --"
        steps[1]["data"]['name", "x") VALUES (1); DROP TABLE obs_unit; --'] = "x"
    elif kind == "bad_operation":
        steps[0]["operation"] = draw(st.one_of(st.text(max_size=8), st.integers(), st.none()))
    elif kind == "bad_dependency":
        steps[2]["dependencies"] = [draw(st.text(max_size=6).filter(lambda d: d not in ("step1", "step2", "step3")))]
    elif kind == "bad_steps":
        doc["steps"] = draw(st.one_of(st.just([]), st.lists(json_values.filter(lambda v: not isinstance(v, dict)),
                                                            min_size=1, max_size=3)))
    return json.dumps(doc)


@pytest.mark.usefixtures("clean_db")
@hsettings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payloads=st.lists(garbage(), min_size=10, max_size=40))
def test_garbage_in_the_buffer_is_dead_lettered_and_never_reaches_main(stack_urls, redis_client, main_engine,
                                                                       payloads):
    site = f"fuzz{uuid.uuid4().hex[:8]}"
    keys = SiteKeys(site)
    pipe = redis_client.pipeline()
    for payload in payloads:
        pipe.lpush(keys.buffer, payload)
    pipe.execute()
    drain = Drain(Settings(site=site, redis_url=stack_urls["OBS_REDIS_URL"], main_db_url=stack_urls["OBS_MAIN_DB_URL"],
                           replica_db_url=stack_urls["OBS_REPLICA_DB_URL"]), DrainConfig(batch_size=7))
    try:
        summary = drain.run(until_empty=True, budget_s=60)
    finally:
        drain.close()
    assert summary.stopped_because == "buffer empty"
    failed = [json.loads(e) for e in redis_client.lrange(keys.failed, 0, -1)]
    assert len(failed) == len(payloads)
    assert all(f["failure"]["reason"].strip() for f in failed)
    assert redis_client.llen(keys.buffer) == redis_client.llen(keys.processing) == 0
    with main_engine.connect() as conn:
        for table in ("executed_obs_unit", "raw_data_package", "raw_data_file", "obs_pipeline_applied"):
            assert conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one() == 0, table
        assert conn.execute(sa.text("SELECT count(*) FROM obs_unit")).scalar_one() == 4


@pytest.mark.usefixtures("clean_db")
def test_garbage_is_dead_lettered_even_while_main_is_down(stack, settings, redis_client):
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, b"\xff not json", json.dumps({"transaction_id": "x", "steps": []}))
    stack.stop_service("main")
    try:
        report = drain_one_batch(settings, replication_timeout_s=0.2)
    finally:
        stack.start_service("main")
    assert len(report.dead_lettered) == 2
    assert redis_client.llen(keys.failed) == 2 and redis_client.llen(keys.processing) == 0


def _drain_raw(settings, redis_client, *payloads: str | bytes) -> tuple[list[dict], list[str]]:
    """Push `payloads` as a bare producer would, with a good seed transaction after each; drain
    until settled; return the dead letters (oldest first) after checking the good ones applied."""
    keys = SiteKeys(settings.site)
    good = []
    for payload in payloads:
        redis_client.lpush(keys.buffer, payload)
        tx, ids = seed_example(settings.site)
        redis_client.lpush(keys.buffer, json.dumps(tx))
        good.append(ids["uuid-1"])
    drain_until_settled(settings)
    assert redis_client.llen(keys.buffer) == redis_client.llen(keys.processing) == 0
    return [json.loads(e) for e in reversed(redis_client.lrange(keys.failed, 0, -1))], good


@pytest.mark.usefixtures("clean_db")
def test_a_step_id_given_twice_is_applied_with_every_step_not_left_out(settings, redis_client, main_engine):
    """Two steps of one id: the second was left out of the step order, so it was never checked
    and never applied (a bulk_create's third file lost without a word), and its cache footprint
    stopped every drain run when its model was unknown. Then such transactions were
    dead-lettered; but seed 000's builder takes step ids from its caller and its executor
    applies steps in their order, so a producer reusing one is drained: every step applied and
    checked, the one of an unknown model dead-lettering its transaction."""
    dropped, ids = seed_example(settings.site)
    third = str(uuid.uuid4())
    dropped["steps"].append({"step_id": "step3", "operation": "create", "model_class": "RawDataFile",
                             "data": {"id": third, "name": "file3.fits", "raw_data_package_id": ids["uuid-2"]}})
    poison, _ = seed_example(settings.site)
    poison["steps"].append({"step_id": "step1", "operation": "create", "model_class": "NoSuchModel", "data": {}})
    unnamed, unnamed_ids = seed_example(settings.site)  # a step without an id is named step<N>: here step2 twice
    unnamed["steps"][0]["step_id"] = "step2"
    unnamed["steps"][1].pop("step_id")
    unnamed["steps"][1]["dependencies"] = []
    failed, good = _drain_raw(settings, redis_client, *(json.dumps(t) for t in (dropped, poison, unnamed)))
    assert [f["transaction_id"] for f in failed] == [poison["transaction_id"]]
    assert failed[0]["failure"]["reason"].startswith(
        f"transaction {poison['transaction_id']}, step step1: unknown model 'NoSuchModel'")
    with main_engine.connect() as conn:
        assert sorted(conn.execute(sa.text("SELECT id::text FROM executed_obs_unit")).scalars()) == sorted(
            good + [ids["uuid-1"], unnamed_ids["uuid-1"]])
        assert conn.execute(sa.text("SELECT count(*) FROM raw_data_file WHERE raw_data_package_id = :p"),
                            {"p": ids["uuid-2"]}).scalar_one() == 3
        assert conn.execute(sa.text("SELECT count(*) FROM raw_data_file")).scalar_one() == 2 * len(good) + 5


@pytest.mark.usefixtures("clean_db")
def test_json_nested_too_deeply_is_dead_lettered_and_the_drain_goes_on(settings, redis_client, main_engine):
    """The stdlib's parser raises RecursionError, not ValueError, past about 1,000 levels, and
    the drain read entries with it to name and keep what it dead-letters: each such entry
    stopped every drain run at its batch. 1,010 levels: orjson parses it, then the step is bad.
    Each is kept as its raw text: the stdlib writes the dead letter."""
    deep = "[" * 100_000
    deep_steps = '{"transaction_id": "deep-steps", "steps": ' + "[" * 5_000 + "]" * 5_000 + "}"
    orjson_deep = '{"transaction_id": "orjson-deep", "steps": [' + "[" * 1_010 + "]" * 1_010 + "]}"
    failed, good = _drain_raw(settings, redis_client, deep, deep_steps, orjson_deep)
    assert len(failed) == 3
    assert all("nested too deeply" in f["failure"]["reason"] for f in failed[:2])
    assert failed[2]["failure"]["reason"] == "transaction orjson-deep, step 1: a step must be a JSON object"
    assert [f["raw"] for f in failed] == [deep, deep_steps, orjson_deep]  # as the stdlib cannot read them
    with main_engine.connect() as conn:
        assert sorted(conn.execute(sa.text("SELECT id::text FROM executed_obs_unit")).scalars()) == sorted(good)


@pytest.mark.usefixtures("clean_db")
def test_metadata_ingest_would_refuse_is_dead_lettered_not_a_stopped_drain(settings, redis_client, main_engine):
    """Ingest refuses metadata that is not strict JSON; the drain took a raw producer's as it
    came, and wrote it back with the transaction's status (orjson, then the stdlib for what
    orjson cannot write). NaN beside an integer beyond 64 bits, or 1,010 levels of nesting,
    made that write raise: every drain run stopped at the batch, its main commit never
    acknowledged. Now such metadata is dead-lettered with the reason, as at ingest, and what
    uses its rows is blocked with it."""
    nan, nan_ids = seed_example(settings.site)
    nan_json = json.dumps({**nan, "metadata": {"seeing": float("nan"), "exposure_ns": 2 ** 70}})
    finish = {"transaction_id": str(uuid.uuid4()), "steps": [  # what it created is dead with it
        {"step_id": "s1", "operation": "update", "model_class": "ExecutedObsUnit",
         "conditions": {"id": nan_ids["uuid-1"]}, "data": {"status": "completed"}}]}
    deep, _ = seed_example(settings.site)
    deep_json = json.dumps(deep)[:-1] + ', "metadata": {"x": ' + "[" * 1_010 + "]" * 1_010 + "}}"
    failed, good = _drain_raw(settings, redis_client, nan_json, json.dumps(finish), deep_json)
    assert [f["failure"]["reason"] for f in failed] == [
        f"transaction {nan['transaction_id']}: metadata: value is not JSON-serialisable: "
        "Out of range float values are not JSON compliant",
        f"transaction {deep['transaction_id']}: metadata: value is nested too deeply (more than about 1,000 levels)",
        f"blocked by {nan['transaction_id']}"]
    assert [f.get("transaction_id") for f in failed] == [nan["transaction_id"], None, finish["transaction_id"]]
    assert failed[1]["raw"] == deep_json  # the stdlib, which writes dead letters, cannot read it
    with main_engine.connect() as conn:
        assert sorted(conn.execute(sa.text("SELECT id::text FROM executed_obs_unit")).scalars()) == sorted(good)
    # an operator's retry requeues it as it is (our own writing of it raised the same error)
    letters = DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models))
    assert letters.retry([nan["transaction_id"]]) == [nan["transaction_id"], finish["transaction_id"]]
    requeued = json.loads(redis_client.lindex(SiteKeys(settings.site).buffer, -1))
    assert requeued["transaction_id"] == nan["transaction_id"] and requeued["metadata"]["exposure_ns"] == 2 ** 70


@pytest.mark.usefixtures("clean_db")
def test_a_retried_invalid_transaction_dead_lettered_again_takes_what_it_blocked_along(settings, redis_client,
                                                                                      main_engine):
    """`failed retry` of a transaction that does not validate (nothing about it changed) requeues
    it and what it blocked, its dead marks live holds again. The drain dead-letters it again at
    parse, but only the dead-lettering of a valid one let go of what was parked behind it: its
    dependent, parked behind it in that batch, waited in `retry` for ever."""
    keys = SiteKeys(settings.site)
    bad, ids = seed_example(settings.site)
    bad["steps"][0]["data"]["no_such_column"] = 1
    finish = {"transaction_id": str(uuid.uuid4()), "steps": [
        {"step_id": "s1", "operation": "update", "model_class": "ExecutedObsUnit",
         "conditions": {"id": ids["uuid-1"]}, "data": {"status": "completed"}}]}
    failed, good = _drain_raw(settings, redis_client, json.dumps(bad), json.dumps(finish))
    reasons = [f["failure"]["reason"] for f in failed]
    assert reasons[1] == f"blocked by {bad['transaction_id']}" and "no_such_column" in reasons[0]
    letters = DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models))
    assert letters.retry([bad["transaction_id"]]) == [bad["transaction_id"], finish["transaction_id"]]
    drain_until_settled(settings, timeout_s=30)
    assert redis_client.zcard(keys.retry) == 0
    again = [json.loads(e) for e in reversed(redis_client.lrange(keys.failed, 0, -1))]
    assert [(f["transaction_id"], f["failure"]["reason"]) for f in again] == [
        (bad["transaction_id"], reasons[0]), (finish["transaction_id"], reasons[1])]
    with main_engine.connect() as conn:
        assert sorted(conn.execute(sa.text("SELECT id::text FROM executed_obs_unit")).scalars()) == sorted(good)


@pytest.mark.usefixtures("clean_db")
def test_an_unknown_model_is_dead_lettered_naming_its_transaction_and_step(settings, redis_client):
    """Every other reason a raw producer's transaction is refused for names it and the step; an
    unknown model said only "unknown model 'Nope' (known: ...)"."""
    tx, _ = seed_example(settings.site)
    tx["steps"][1]["model_class"] = "RawDataPackages"
    untyped, _ = seed_example(settings.site)
    untyped["steps"][2]["model_class"] = ["RawDataFile"]
    failed, _ = _drain_raw(settings, redis_client, json.dumps(tx), json.dumps(untyped))
    assert [f["failure"]["reason"] for f in failed] == [
        f"transaction {tx['transaction_id']}, step step2: unknown model 'RawDataPackages' "
        "(known: ExecutedObsUnit, ObsUnit, RawDataFile, RawDataPackage)",
        f"transaction {untyped['transaction_id']}, step step3: model_class must be a string"]
