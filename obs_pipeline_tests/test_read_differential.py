"""Reads merge the replica with what is still buffered; these check the merge against what
main holds once drained, on the real stack:

1. Search filters give the same rows whether a record is buffered, overlaid or replicated:
   random rows of many column kinds (text, CHAR(n), enums, floats, REAL, NUMERIC, times with
   and without a zone, intervals, CITEXT, TIMESTAMP(0), ...), some replicated and then
   updated or deleted in the buffer, some only buffered; each random filter's answer before
   the drain equals its answer after it, when PostgreSQL alone answers. DIFF_EXAMPLES=300 in
   the environment looks harder.
2. While a drain applies and cleans, a record is read from its create to its delete: never
   missing, never twice, never after its delete.
3. A dead-lettered transaction's writes are read until it is discarded or retried.
"""

from __future__ import annotations

import dataclasses
import os
import uuid

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline_tests.workload import drain_until_settled

MODELS = "obs_pipeline_tests.unusual_models:Base"
EXAMPLES = int(os.environ.get("DIFF_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def odd_models(stack_urls, main_engine, replica_engine):
    from obs_pipeline.model_registry import ModelRegistry
    from obs_pipeline.schema import create_schema
    from obs_pipeline_tests.conftest import wait_for_replica
    from obs_pipeline_tests.unusual_models import SCHEMA

    with main_engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
    create_schema(main_engine, ModelRegistry.from_path(MODELS))
    wait_for_replica(main_engine, replica_engine)
    return MODELS


TEXT = "aAbBzZ é\t_~İ0"
VALUES = {
    "code": st.text(TEXT, max_size=5),
    "flag": st.text(TEXT, max_size=3),
    "label": st.text(TEXT, max_size=4),
    "grade": st.sampled_from(["low", "high"]),
    "mood": st.sampled_from(["calm", "busy"]),
    "seconds": st.one_of(st.integers(-3, 3), st.sampled_from([0.1, 0.2, 0.30000000000000004, 0.3, -0.0, 1e16,
                                                              2.5, 1e-7])),
    "ratio": st.sampled_from([0.1, 0.2, 0.3, 1.0, -2.5, 0.123456789, 3, 1e-3]),
    "amount": st.sampled_from([0.1, 1.005, 1.015, 2.675, -0.004, 0.005, 1.23, 1.234, 5, 99.999]),
    "at": st.sampled_from(["00:00:00", "12:30:00", "12:30:00.5", "23:59:59.999999", "12:30:00+02:00"]),
    "at_zone": st.sampled_from(["12:00:00+02:00", "10:00:00+00:00", "10:00:00", "23:00:00-03:00",
                                "00:00:00+00:00"]),
    "span": st.sampled_from(["PT1H", "P1D", "PT24H", "P-1DT23H59M59S", "PT0S", "PT0.5S", "P2DT1H"]),
}
ORDERED = {"code", "flag", "mood", "grade", "seconds", "ratio", "amount", "at", "at_zone", "span"}

rows = st.fixed_dictionaries({}, optional={name: st.none() | values for name, values in VALUES.items()})


@st.composite
def filters(draw):
    name = draw(st.sampled_from(sorted(VALUES)))
    values = VALUES[name]
    form = draw(st.sampled_from(["eq", "null", "list", "cmp", "cmp2"]))
    if form == "eq":
        return {name: draw(values)}
    if form == "null":
        return {name: draw(st.sampled_from([None, {"!=": None}, {"==": None}]))}
    if form == "list":
        return {name: draw(st.lists(st.none() | values, max_size=3))}
    ops = ["==", "!="] + (["<", "<=", ">", ">="] if name in ORDERED else [])
    if form == "cmp":
        return {name: {draw(st.sampled_from(ops)): draw(values)}}
    return {name: {draw(st.sampled_from(ops)): draw(values), draw(st.sampled_from(ops)): draw(values)}}


@hsettings(max_examples=EXAMPLES, deadline=None,
           suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(old=st.lists(rows, min_size=1, max_size=6), new=st.lists(rows, max_size=6),
       changes=st.lists(st.tuples(st.integers(0, 11), st.none() | rows), max_size=6),
       queries=st.lists(filters(), min_size=1, max_size=8))
def test_filters_answer_the_same_before_and_after_the_drain(odd_models, settings, old, new, changes, queries):
    odd = dataclasses.replace(settings, models=odd_models, site=f"d{uuid.uuid4().hex[:10]}")
    buf = TransactionBuffer(settings=odd)
    try:
        with buf.transaction() as tx:
            ids = [row["id"] for row in tx.bulk_create("Sample", old)]
        drain_until_settled(odd)
        if new:
            with buf.transaction() as tx:
                ids += [row["id"] for row in tx.bulk_create("Sample", new)]
        gone = set()
        for at, values in changes:  # updates and deletes of replicated and of buffered rows
            rid = ids[at % len(ids)]
            if rid in gone:
                continue
            if values is None:
                buf.delete("Sample", rid)
                gone.add(rid)
            elif values:
                buf.update("Sample", rid, values)

        def answers():
            return [buf.search("Sample", {"id": ids, **q}) for q in queries]
        before = answers()
        drain_until_settled(odd)
        after = answers()
        for query, was, now in zip(queries, before, after):
            assert was == now, query
    finally:
        buf.close()


def test_readers_see_each_record_from_its_create_to_its_delete_while_the_drain_cleans(settings, main_engine,
                                                                                    replica_engine, redis_client):
    """A writer creates records and deletes older ones (some before the drain took their create,
    some after), a drain applies and cleans all the while, readers search: a record created
    before a search began and not deleted before it ended is there once; one deleted before
    it began is not."""
    import random
    import threading
    import time

    from obs_pipeline.drain import Drain, DrainConfig
    from obs_pipeline_tests.test_query_properties import new_unit

    unit = new_unit(main_engine, replica_engine)
    writer = TransactionBuffer(settings=settings)
    created: dict[str, float] = {}   # id -> when its create returned
    deleting: dict[str, float] = {}  # id -> when its delete was called
    deleted: dict[str, float] = {}   # id -> when its delete returned
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[str] = []
    counts = {"searches": 0, "gets": 0}

    def write() -> None:
        rng = random.Random(7)
        try:
            for n in range(1500):
                if stop.is_set():
                    break
                alive = [rid for rid in created if rid not in deleting]
                if alive and rng.random() < 0.35:
                    rid = rng.choice(alive[-5:] if rng.random() < 0.5 else alive)
                    with lock:
                        deleting[rid] = time.monotonic()
                    writer.delete("ExecutedObsUnit", rid)
                    with lock:
                        deleted[rid] = time.monotonic()
                else:
                    with writer.transaction() as tx:
                        rid = tx.create("ExecutedObsUnit", {"obs_unit_id": unit, "start_time": "2025-01-01T00:00:00Z",
                                                            "status": f"s{n}"})["id"]
                    with lock:
                        created[rid] = time.monotonic()
        except Exception as error:  # noqa: BLE001
            failures.append(f"writer: {error!r}")
        finally:
            stop.set()

    def read(seed: int) -> None:
        rng = random.Random(seed)
        buf = TransactionBuffer(settings=settings)
        select = buf.query._select

        def slow_select(spec, stmt, *said):  # widen the gap between the cache read and the replica read
            time.sleep(rng.uniform(0, 0.01))
            return select(spec, stmt, *said)

        buf.query._select = slow_select
        try:
            while not stop.is_set() and len(failures) < 5:
                began = time.monotonic()
                with lock:
                    before = {rid for rid, at in created.items() if at < began}
                    gone_before = {rid for rid, at in deleted.items() if at < began}
                if rng.random() < 0.5:
                    rows = buf.search("ExecutedObsUnit", {"obs_unit_id": unit})
                    ended = time.monotonic()
                    found = [r["id"] for r in rows]
                    counts["searches"] += 1
                else:
                    pick = rng.choice(sorted(before)) if before else None
                    if pick is None:
                        continue
                    row = buf.get("ExecutedObsUnit", pick)
                    ended = time.monotonic()
                    found = [] if row is None else [row["id"]]
                    before = {pick}
                    gone_before &= before
                    counts["gets"] += 1
                with lock:
                    deleted_by_end = {rid for rid, at in deleting.items() if at < ended}
                if len(found) != len(set(found)):
                    failures.append(f"twice: {[r for r in found if found.count(r) > 1]}")
                missing = before - deleted_by_end - set(found)
                if missing:
                    failures.append(f"missing: {sorted(missing)[:3]}")
                back = gone_before & set(found)
                if back:
                    failures.append(f"deleted but shown: {sorted(back)[:3]}")
        except Exception as error:  # noqa: BLE001
            failures.append(f"reader: {error!r}")
        finally:
            buf.close()

    drain = Drain(settings, DrainConfig(batch_size=7, idle_poll_s=0.01))
    threads = [threading.Thread(target=drain.run, kwargs={"until_empty": False, "should_stop": stop.is_set}),
               threading.Thread(target=write), threading.Thread(target=read, args=(1,)),
               threading.Thread(target=read, args=(2,))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    drain.close()
    writer.close()
    assert not failures, failures[:5]
    assert counts["searches"] > 20 and counts["gets"] > 20, counts
    assert int(redis_client.hget(f"site:{settings.site}:stats", "replicated_total") or 0) > 0


FORMS_VALUES = {
    "Lettered": {"tag": st.text("aAbBéÉİiσΣς _", max_size=4)},
    "Coarse": {"at": st.sampled_from(["2025-01-01T00:00:00.5Z", "2025-01-01T00:00:00.4Z", "1999-12-31T23:59:59.5Z",
                                      "2000-01-01T00:00:00.5+01:00", "2025-01-01T00:00:01Z"]),
               "of_day": st.sampled_from(["12:00:00.5", "12:00:00.4", "23:59:59.6", "00:00:00", "12:00:01"]),
               "span": st.sampled_from(["PT0.5S", "PT1S", "PT0.4S", "P-1DT23H59M59.5S", "P1D", "PT24H"])},
    "Unscaled": {"amount": st.sampled_from([1.234, 1.23, 0.1, 0.30000000000000004, 1e20, -0.0, 7])},
    "Reading": {"gain": st.sampled_from([0.1, 0.123456789, 0.12345679, 1e-3 / 3, 30, 1e30]),
                "amount": st.sampled_from([1.234, 1.235, 1.225, -1.005, 0.0, 12345678.125]),
                "at": st.sampled_from(["12:30", "12:30:00+02:00", "23:59:59.5", "00:00:00"]),
                "at_zone": st.sampled_from(["12:00:00+02:00", "10:00:00+00:00", "10:00:00-01:30", "23:59:59+15:00"])},
}


@pytest.fixture(scope="module")
def forms_models(stack_urls, main_engine, replica_engine):
    from obs_pipeline.model_registry import ModelRegistry
    from obs_pipeline.schema import create_schema
    from obs_pipeline_tests.conftest import wait_for_replica
    from obs_pipeline_tests.test_read_forms import MODELS as FORMS

    with main_engine.begin() as conn:
        conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS citext"))
    create_schema(main_engine, ModelRegistry.from_path(FORMS))
    wait_for_replica(main_engine, replica_engine)
    return FORMS


@st.composite
def model_case(draw):
    model = draw(st.sampled_from(sorted(FORMS_VALUES)))
    values = FORMS_VALUES[model]
    row = st.fixed_dictionaries({}, optional={n: st.none() | v for n, v in values.items()})

    @st.composite
    def one_filter(draw):
        name = draw(st.sampled_from(sorted(values)))
        ops = ["==", "!=", "<", "<=", ">", ">="]
        form = draw(st.sampled_from(["eq", "list", "cmp"]))
        if form == "eq":
            return {name: draw(values[name])}
        if form == "list":
            return {name: draw(st.lists(st.none() | values[name], max_size=3))}
        return {name: {draw(st.sampled_from(ops)): draw(values[name]), draw(st.sampled_from(ops)): draw(values[name])}}
    return (model, draw(st.lists(row, min_size=1, max_size=5)), draw(st.lists(row, max_size=5)),
            draw(st.lists(st.tuples(st.integers(0, 9), st.none() | row), max_size=5)),
            # one or two columns: with two, an update may set one while the replica's row holds the other
            draw(st.lists(st.builds(lambda a, b: {**a, **b}, one_filter(), st.just({}) | one_filter()),
                          min_size=1, max_size=6)))


@hsettings(max_examples=EXAMPLES, deadline=None,
           suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=model_case())
def test_filters_on_rounded_folded_and_single_precision_columns_answer_the_same_after_the_drain(
        forms_models, settings, case):
    model, old, new, changes, queries = case
    odd = dataclasses.replace(settings, models=forms_models, site=f"f{uuid.uuid4().hex[:10]}")
    buf = TransactionBuffer(settings=odd)
    try:
        with buf.transaction() as tx:
            ids = [row["id"] for row in tx.bulk_create(model, old)]
        drain_until_settled(odd)
        if new:
            with buf.transaction() as tx:
                ids += [row["id"] for row in tx.bulk_create(model, new)]
        gone = set()
        for at, values in changes:
            rid = ids[at % len(ids)]
            if rid in gone:
                continue
            if values is None:
                buf.delete(model, rid)
                gone.add(rid)
            elif values:
                buf.update(model, rid, values)
        before = [buf.search(model, {"id": ids, **q}) for q in queries]
        drain_until_settled(odd)
        after = [buf.search(model, {"id": ids, **q}) for q in queries]
        for query, was, now in zip(queries, before, after):
            assert was == now, query
    finally:
        buf.close()


@pytest.mark.parametrize("then", ["discard", "retry"])
def test_a_dead_lettered_transactions_writes_are_read_until_it_is_discarded_or_retried(settings, redis_client,
                                                                                       main_engine, then):
    """README (Read): a dead-lettered transaction's writes stay visible until it is retried or
    discarded. A create main refuses (no obs unit 999), a file that uses it and an update of it
    (dead-lettered as blocked): read as buffered while dead; discarded, none of them is read
    and no cache is left; retried once the unit exists, they read the same from the replica."""
    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.model_registry import ModelRegistry
    from obs_pipeline_tests.test_smart_query import cache_keys

    unit = 900_000 + uuid.uuid4().int % 100_000
    buf = TransactionBuffer(settings=settings)
    with buf.transaction() as poison:
        obs = poison.create("ExecutedObsUnit", {"obs_unit_id": unit, "start_time": "2025-01-01T00:00:00Z",
                                                "status": "running"})
        pkg = poison.create("RawDataPackage", {"name": "poison", "executed_obs_unit_id": obs["id"]})
    with buf.transaction() as files:
        made = files.bulk_create("RawDataFile", [{"name": "p.fits", "raw_data_package_id": pkg["id"]}])
    finish = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})

    def reads():
        return (buf.get("ExecutedObsUnit", obs["id"]),
                buf.search("ExecutedObsUnit", {"obs_unit_id": unit, "status": "completed"}),
                [r["id"] for r in buf.search("RawDataFile", {"raw_data_package_id": pkg["id"]})])
    while_buffered = reads()
    assert while_buffered[0]["status"] == "completed" and while_buffered[1] == [while_buffered[0]]
    assert while_buffered[2] == [made[0]["id"]]
    drain_until_settled(settings, retry_base_s=0.02)
    assert {buf.status(t) for t in (poison.transaction_id, files.transaction_id, finish)} == {"failed"}
    assert reads() == while_buffered
    letters = DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models))
    if then == "discard":
        letters.discard([finish, files.transaction_id, poison.transaction_id])
        assert reads() == (None, [], [])
        assert cache_keys(redis_client, settings.site) == []
    else:
        with main_engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (:i, 'late')"), {"i": unit})
        letters.retry()
        assert reads() == while_buffered
        drain_until_settled(settings, retry_base_s=0.02)
        assert buf.status(finish) == "replicated"
        assert reads() == while_buffered
        assert cache_keys(redis_client, settings.site) == []
    buf.close()


_PAST_MIDNIGHT = "23:59:59.6"  # in a TIME(0): 24:00:00 on main, which psycopg2 and the reads show as 00:00:00
_LATER = "2025-01-01T00:00:01+00:00"


@pytest.mark.parametrize("condition", ["00:00:00", {">": "23:59:59"}], ids=["eq-midnight", "after-23:59:59"])
@pytest.mark.parametrize("where", ["update-of-replicated", "update-of-buffered-create", "replicated-then-other-update"])
def test_a_time_that_rounds_past_midnight_is_filtered_the_same_buffered_and_replicated(forms_models, settings,
                                                                                      where, condition):
    """Found by the hypothesis test above (CI of 9b7b235): in a TIME(0), 23:59:59.6 is 24:00:00
    on main, which the reads show as 00:00:00. A filter compares what main stores: the row is
    not at 00:00:00 and is after 23:59:59. Buffered, the merged row was filtered in its read
    form (found by == 00:00:00, missed by > 23:59:59) and the answer changed at the drain. The
    three places such a value can be: an update of a replicated row; an update of a row still
    buffered as created (filtered with its updates merged); and the replica's row itself, with
    an update to another filtered column (the replica's 24:00:00 arrives as 00:00:00)."""
    odd = dataclasses.replace(settings, models=forms_models, site=f"f{uuid.uuid4().hex[:10]}")
    buf = TransactionBuffer(settings=odd)
    filters = {"of_day": condition}
    try:
        with buf.transaction() as tx:
            first = {"of_day": _PAST_MIDNIGHT} if where == "replicated-then-other-update" else {}
            [rid] = [row["id"] for row in tx.bulk_create("Coarse", [first])]
        if where != "update-of-buffered-create":
            drain_until_settled(odd)
        if where == "replicated-then-other-update":
            buf.update("Coarse", rid, {"at": _LATER})
            filters["at"] = _LATER
        else:
            buf.update("Coarse", rid, {"of_day": _PAST_MIDNIGHT, "at": _LATER})
        expected = [] if condition == "00:00:00" else [{"id": rid, "at": _LATER, "of_day": "00:00:00", "span": None}]
        assert buf.search("Coarse", {"id": [rid], **filters}) == expected
        drain_until_settled(odd)
        assert buf.search("Coarse", {"id": [rid], **filters}) == expected
    finally:
        buf.close()


@pytest.mark.parametrize("window", ["all-buffered", "first-create-cleaned"])
def test_a_replicated_row_deleted_and_created_again_is_filtered_on_its_new_values(forms_models, settings,
                                                                                  redis_client, window):
    """A replicated row whose key is deleted and created again in the buffer, without the
    filtered column, is not found by the old value the replica's row still matches in SQL.
    "first-create-cleaned": the state after the first create's cleanup took the buffered
    record, where only the read buffer's create (ingest keeps it there for this) says so."""
    from obs_pipeline.keys import SiteKeys

    odd = dataclasses.replace(settings, models=forms_models, site=f"f{uuid.uuid4().hex[:10]}")
    buf = TransactionBuffer(settings=odd)
    rid, noon = str(uuid.uuid4()), "12:00:00"
    try:
        with buf.transaction() as tx:
            tx.create("Coarse", {"id": rid, "of_day": noon})
        drain_until_settled(odd)
        assert [row["id"] for row in buf.search("Coarse", {"of_day": noon}) if row["id"] == rid] == [rid]
        buf.delete("Coarse", rid)
        with buf.transaction() as tx:
            tx.create("Coarse", {"id": rid, "span": "PT1S"})
        if window == "first-create-cleaned":
            keys = SiteKeys(odd.site)
            assert redis_client.delete(keys.buffered("Coarse", rid)) == 1
            assert redis_client.srem(keys.model_index("Coarse"), rid) == 1
        found = [row for row in buf.search("Coarse", {"of_day": noon}) if row["id"] == rid]
        assert buf.get("Coarse", rid) == {"id": rid, "at": None, "of_day": None, "span": "PT1S"}
        drain_until_settled(odd)
        assert found == [row for row in buf.search("Coarse", {"of_day": noon}) if row["id"] == rid] == []
        assert buf.get("Coarse", rid) == {"id": rid, "at": None, "of_day": None, "span": "PT1S"}
    finally:
        buf.close()
