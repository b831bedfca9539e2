"""Properties of smart queries on the real stack (issue 4).

1. Random interleavings of creates, updates, deletes and drain steps: get and search always
   equal a plain dict model of the expected state.
2. Monotonic reads: while a drain applies and cleans thousands of transactions, readers that
   poll get/search never see a record they saw vanish, or an older version of it.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
import uuid
from typing import Any

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from obs_pipeline.config import Settings
from obs_pipeline.drain import Drain, DrainConfig
from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline_tests.conftest import site_keys, wait_for_replica
from obs_pipeline_tests.test_smart_query import cache_keys

UTC = dt.timezone.utc
T0 = dt.datetime(2025, 1, 1, tzinfo=UTC)
STATUSES = ["running", "completed", "aborted"]
OFFSETS = [dt.timezone.utc, dt.timezone(dt.timedelta(hours=2)), dt.timezone(dt.timedelta(hours=-1, minutes=-30))]


def new_unit(main_engine, replica_engine) -> int:
    """A fresh obs unit on main (and the replica): each example's records hang off their own."""
    unit = 10_000 + uuid.uuid4().int % (2**31 - 10_001)  # not `random`: hypothesis seeds it
    with main_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (:i, 'property')"), {"i": unit})
    wait_for_replica(main_engine, replica_engine)
    return unit


def site_settings(stack_urls, spool_dir) -> Settings:
    return Settings(site=f"p{uuid.uuid4().hex[:10]}", redis_url=stack_urls["OBS_REDIS_URL"],
                    main_db_url=stack_urls["OBS_MAIN_DB_URL"], replica_db_url=stack_urls["OBS_REPLICA_DB_URL"],
                    spool_dir=str(spool_dir))


def forget_site(client, site: str) -> None:
    keys = site_keys(client, site)
    if keys:
        client.delete(*keys)


def utc_iso(value: str | None) -> str | None:
    return None if value is None else dt.datetime.fromisoformat(value).astimezone(UTC).isoformat()


def when(minutes: float, offset: int) -> str:
    return (T0 + dt.timedelta(minutes=minutes)).astimezone(OFFSETS[offset]).isoformat()


# --- 1. the model --------------------------------------------------------------------------------

times = st.builds(when, st.integers(0, 180), st.integers(0, len(OFFSETS) - 1))
operations = st.lists(st.one_of(
    st.tuples(st.just("create"), st.sampled_from(STATUSES), times, st.booleans()),
    st.tuples(st.just("update"), st.integers(0, 99), st.one_of(
        st.fixed_dictionaries({"status": st.sampled_from(STATUSES)}),
        st.fixed_dictionaries({"end_time": st.none() | times}),
        st.fixed_dictionaries({"status": st.sampled_from(STATUSES), "end_time": st.none() | times}))),
    st.tuples(st.just("delete"), st.integers(0, 99)),
    st.tuples(st.just("drain_step"), st.integers(1, 3)),
    st.tuples(st.just("drain_all")),
), min_size=8, max_size=24)


class Scenario:
    def __init__(self, buf: TransactionBuffer, drain: Drain, unit: int):
        self.buf, self.drain, self.unit = buf, drain, unit
        self.model: dict[str, dict[str, Any]] = {}   # id -> expected row
        self.ever: list[str] = []                      # every id created, deleted ones included

    def apply(self, op: tuple) -> None:
        kind, *args = op
        alive = sorted(self.model)
        if kind == "create":
            status, start, and_update = args
            with self.buf.transaction(endpoint="create") as tx:
                row = tx.create("ExecutedObsUnit", {"obs_unit_id": self.unit, "start_time": start, "status": status})
                if and_update:  # an update inside the creating transaction
                    tx.update("ExecutedObsUnit", row["id"], {"status": "completed"})
            self.model[row["id"]] = {"id": row["id"], "obs_unit_id": self.unit, "start_time": utc_iso(start),
                                     "end_time": None, "status": "completed" if and_update else status}
            self.ever.append(row["id"])
        elif kind == "update" and alive:
            rid, values = alive[args[0] % len(alive)], args[1]
            self.buf.update("ExecutedObsUnit", rid, values)
            self.model[rid].update({k: utc_iso(v) if k == "end_time" else v for k, v in values.items()})
        elif kind == "delete" and alive:
            rid = alive[args[0] % len(alive)]
            self.buf.delete("ExecutedObsUnit", rid)
            del self.model[rid]
        elif kind == "drain_step":
            self.drain.batch_size = args[0]  # what the next claim takes
            self.drain.step()
        elif kind == "drain_all":
            self.drain_all()

    def drain_all(self) -> None:
        deadline = time.monotonic() + 30
        while self.drain.store.has_work():
            assert time.monotonic() < deadline, "drain did not settle"
            self.drain.step()

    def check(self) -> None:
        for rid in self.ever:
            assert self.buf.get("ExecutedObsUnit", rid) == self.model.get(rid), rid
        rows = sorted(self.model.values(), key=lambda r: r["id"])
        assert self.buf.search("ExecutedObsUnit", {"obs_unit_id": self.unit}) == rows
        for status in ("running", "completed"):
            assert self.buf.search("ExecutedObsUnit", {"obs_unit_id": self.unit, "status": status}) == \
                [r for r in rows if r["status"] == status]
        low, high = T0 + dt.timedelta(minutes=30), T0 + dt.timedelta(minutes=120)
        window = {"obs_unit_id": self.unit, "start_time": {">=": low.isoformat(), "<": high.isoformat()}}
        assert self.buf.search("ExecutedObsUnit", window) == \
            [r for r in rows if low <= dt.datetime.fromisoformat(r["start_time"]) < high]
        ended = {"obs_unit_id": self.unit, "end_time": {">": (T0 + dt.timedelta(minutes=90)).isoformat()}}
        assert self.buf.search("ExecutedObsUnit", ended) == \
            [r for r in rows if r["end_time"] and dt.datetime.fromisoformat(r["end_time"]) > high - dt.timedelta(
                minutes=30)]
        assert self.buf.search("ExecutedObsUnit", {"obs_unit_id": self.unit, "end_time": None}) == \
            [r for r in rows if r["end_time"] is None]


# redis_client is only a connection: sharing it across examples is fine
@hsettings(max_examples=25, deadline=None,
           suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_get_and_search_equal_a_model_under_random_interleavings(ops, stack_urls, main_engine, replica_engine,
                                                                 redis_client, tmp_path_factory):
    settings = site_settings(stack_urls, tmp_path_factory.mktemp("spool"))
    buf = TransactionBuffer(settings=settings)
    drain = Drain(settings, DrainConfig(batch_size=1))
    try:
        drain.acquire()
        scenario = Scenario(buf, drain, new_unit(main_engine, replica_engine))
        for op in ops:
            scenario.apply(op)
            scenario.check()
        scenario.drain_all()
        scenario.check()
        assert cache_keys(redis_client, settings.site) == []
    finally:
        drain.close()
        buf.close()
        forget_site(redis_client, settings.site)


# --- 2. monotonic reads ------------------------------------------------------------------------

def older_columns(seen: dict[str, str], row: dict[str, Any]) -> list[str]:
    """Columns of `row` older than already seen: each of status and end_time only goes up."""
    return [k for k in ("status", "end_time") if (row[k] or "") < seen.get(k, "")]


def test_readers_never_see_a_record_vanish_or_go_back_while_the_drain_cleans(
        stack_urls, main_engine, replica_engine, redis_client, tmp_path_factory):
    """A writer keeps creating records and updating the newest ones (as observations start and
    finish), a drain applies and cleans in batches, two readers poll get (mostly the newest
    records) and search. Every record a reader looks up was buffered before: it must be there,
    and no column may go back to a value older than one that reader saw."""
    initial, hot, operations, budget_s = 50, 20, 3_000, 20.0
    min_gets, min_searches = 500, 20  # the writer goes on past `operations` until readers read this much
    settings = site_settings(stack_urls, tmp_path_factory.mktemp("spool"))
    unit = new_unit(main_engine, replica_engine)
    writer_buf = TransactionBuffer(settings=settings)
    with writer_buf.transaction() as tx:
        ids = [r["id"] for r in tx.bulk_create("ExecutedObsUnit", [
            {"obs_unit_id": unit, "start_time": T0.isoformat(), "status": "v000000"} for _ in range(initial)])]
    latest = {rid: {"status": "v000000", "end_time": None} for rid in ids}
    stop, writing_done = threading.Event(), threading.Event()
    failures: list[str] = []
    stats = {"gets": 0, "searches": 0, "written": 0, "created": initial, "replicated_while_writing": 0}

    def write() -> None:
        rng = random.Random(1)
        began = time.monotonic()
        try:
            n = 0
            while time.monotonic() - began < budget_s and not stop.is_set() and (
                    n < operations or stats["gets"] < min_gets or stats["searches"] < min_searches):
                n += 1
                if rng.random() < 0.15:
                    with writer_buf.transaction() as tx:
                        rid = tx.create("ExecutedObsUnit", {"obs_unit_id": unit, "start_time": T0.isoformat(),
                                                            "status": f"v{n:06d}"})["id"]
                    latest[rid] = {"status": f"v{n:06d}", "end_time": None}
                    ids.append(rid)  # only once buffered: readers take it from here
                    stats["created"] += 1
                else:
                    pick = rng.random()
                    rid = rng.choice(ids[-3:] if pick < 0.4 else ids[-hot:] if pick < 0.8 else ids)
                    # counter-like columns that only go up; one or the other, so that an overlay
                    # does not hide an older value of the column it does not set
                    column = rng.choice(["status", "end_time"])
                    value = f"v{n:06d}" if column == "status" else (T0 + dt.timedelta(seconds=n)).isoformat()
                    writer_buf.update("ExecutedObsUnit", rid, {column: value})
                    latest[rid][column] = value
                stats["written"] = n
            stats["replicated_while_writing"] = int(redis_client.hget(f"site:{settings.site}:stats",
                                                                      "replicated_total") or 0)
        except Exception as error:  # noqa: BLE001 - reported by the main thread
            failures.append(f"writer: {error!r}")
        finally:
            writing_done.set()

    def read(seed: int) -> None:
        rng = random.Random(seed)
        buf = TransactionBuffer(settings=settings)
        seen: dict[str, dict[str, str]] = {}
        select = buf.query._select

        def slow_select(spec, stmt, *said):
            # A slow replica or a descheduled reader: widen the gap between the cache read and
            # the replica read, so that the drain's replay -> clean falls inside it now and then.
            time.sleep(rng.uniform(0, 0.015))
            rows = select(spec, stmt, *said)
            time.sleep(rng.uniform(0, 0.015))
            return rows

        buf.query._select = slow_select

        def saw(rid: str, row: dict | None, how: str) -> None:
            if row is None:
                failures.append(f"{how}: {rid} missing (seen before: {seen.get(rid)})")
                return
            older = older_columns(seen.get(rid, {}), row)
            if older:
                failures.append(f"{how}: {rid} went back in {older}: saw {seen[rid]}, now {row}")
            seen[rid] = {k: max(row[k] or "", seen.get(rid, {}).get(k, "")) for k in ("status", "end_time")}

        try:
            while not stop.is_set() and len(failures) < 5:
                known = list(ids)  # all buffered before this read starts
                if rng.random() < 0.1:
                    rows = {r["id"]: r for r in buf.search("ExecutedObsUnit", {"obs_unit_id": unit})}
                    for rid in known:
                        saw(rid, rows.get(rid), "search")
                    stats["searches"] += 1
                else:
                    pick = rng.random()  # mostly the newest: their creates are still buffered
                    rid = rng.choice(known[-3:] if pick < 0.5 else known[-hot:] if pick < 0.9 else known)
                    saw(rid, buf.get("ExecutedObsUnit", rid), "get")
                    stats["gets"] += 1
        except Exception as error:  # noqa: BLE001
            failures.append(f"reader: {error!r}")
        finally:
            buf.close()

    drain = Drain(settings, DrainConfig(batch_size=100, idle_poll_s=0.01))
    threads = [threading.Thread(target=drain.run, kwargs={"until_empty": False, "should_stop": stop.is_set}),
               threading.Thread(target=write), threading.Thread(target=read, args=(2,)),
               threading.Thread(target=read, args=(3,))]
    for thread in threads:
        thread.start()
    try:
        assert writing_done.wait(budget_s + 15)
        deadline = time.monotonic() + 30
        while cache_keys(redis_client, settings.site) and time.monotonic() < deadline and not failures:
            time.sleep(0.1)
        time.sleep(0.3)  # readers go on a little on the replica alone
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        drain.close()
    try:
        assert not failures, failures[:5]
        assert cache_keys(redis_client, settings.site) == []
        assert stats["written"] >= 1_000 and stats["gets"] >= min_gets and stats["searches"] >= min_searches, stats
        assert stats["replicated_while_writing"] > 0, stats  # the drain cleaned while readers read
        final = {r["id"]: r for r in writer_buf.search("ExecutedObsUnit", {"obs_unit_id": unit})}
        assert {rid: {k: row[k] for k in ("status", "end_time")} for rid, row in final.items()} == latest
    finally:
        writer_buf.close()
        forget_site(redis_client, settings.site)
