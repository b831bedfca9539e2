"""Observing scripts as astronomers write them: values straight from pandas and numpy, very large
bulk_creates, the wrong argument in the wrong place. Valid input reads back as written, buffered
and replicated alike; bad input is one line saying what to fix, with nothing buffered."""

from __future__ import annotations

import dataclasses

import pytest
import sqlalchemy as sa

from obs_pipeline.ingest import ConfigError, InvalidTransaction, TransactionBuffer
from obs_pipeline_tests.conftest import site_keys
from obs_pipeline_tests.test_cli import cli
from obs_pipeline_tests.test_cli_operations import spool_folder_gone_wrong
from obs_pipeline_tests.test_contract_review import drain_once, env  # noqa: F401  (env: a fixture)

OBS = {"obs_unit_id": 123, "start_time": "2025-01-01T00:00:00Z", "status": "running"}


@pytest.fixture
def buf(settings):
    buffer = TransactionBuffer(settings=settings)
    yield buffer
    buffer.close()


@pytest.mark.usefixtures("clean_db")
def test_a_pandas_timestamp_with_nanoseconds_reads_the_same_buffered_and_replicated(buf, env):
    """pd.Timestamp (a datetime subclass) writes its nanoseconds in isoformat(): the record was
    buffered as 03:00:00.000000999 and read so until replicated, then as 03:00:00 (the drain's
    check cut the nanoseconds off). Main rounds them to microseconds, and so does ingest now."""
    pd = pytest.importorskip("pandas")
    with buf.transaction() as tx:
        obs = tx.create("ExecutedObsUnit", {**OBS, "start_time": pd.Timestamp("2025-01-01 03:00:00.000000999", tz="UTC"),
                                            "end_time": pd.Timestamp("2025-01-01 04:00:00.000002400")})  # naive: UTC
    expected = {**OBS, "id": obs["id"], "start_time": "2025-01-01T03:00:00.000001+00:00",
                "end_time": "2025-01-01T04:00:00.000002+00:00"}
    assert buf.get("ExecutedObsUnit", obs["id"]) == expected
    drain_once(env)
    assert buf.status(tx.transaction_id) == "replicated"
    assert buf.get("ExecutedObsUnit", obs["id"]) == expected


@pytest.mark.usefixtures("clean_db")
def test_numpy_datetimes_from_an_array_are_taken_as_a_pandas_timestamp_is(buf, env, settings, redis_client):
    """An element of a datetime column's array (`df["t"].to_numpy()[0]`, np.datetime64) is no
    datetime to isinstance: refused as "is not an ISO-8601 datetime", in writes and filters.
    Taken now as its Timestamp is: naive as UTC, nanoseconds rounded as main rounds them; its
    NaT refused saying to give None."""
    np = pytest.importorskip("numpy")
    pd = pytest.importorskip("pandas")
    times = pd.DataFrame({"t": pd.to_datetime(["2025-01-01 03:00:00.000000999", "2025-01-01 04:00:00.0000024"])})
    start, end = times["t"].to_numpy()
    assert isinstance(start, np.datetime64)
    with buf.transaction() as tx:
        obs = tx.create("ExecutedObsUnit", {**OBS, "start_time": start, "end_time": end})
    expected = {**OBS, "id": obs["id"], "start_time": "2025-01-01T03:00:00.000001+00:00",
                "end_time": "2025-01-01T04:00:00.000002+00:00"}
    before = site_keys(redis_client, settings.site)
    with pytest.raises(InvalidTransaction, match=r"ExecutedObsUnit.end_time: .*NaT.* is not a time \(numpy's missing "
                                                 r"value\): give None for no value$"):
        buf.update("ExecutedObsUnit", obs["id"], {"end_time": np.datetime64("NaT")})
    assert site_keys(redis_client, settings.site) == before
    for _ in ("buffered", "replicated"):
        assert buf.get("ExecutedObsUnit", obs["id"]) == expected
        found = buf.search("ExecutedObsUnit", {"start_time": {">=": np.datetime64("2025-01-01T03:00:00.000001"),
                                                              "<": np.datetime64("2025-01-02")}})
        assert [r["id"] for r in found] == [obs["id"]]
        drain_once(env)
        assert buf.status(tx.transaction_id) == "replicated"


def test_pandas_nat_is_refused_in_one_line_naming_none_and_buffers_nothing(buf, settings, redis_client):
    pd = pytest.importorskip("pandas")
    with pytest.raises(InvalidTransaction) as raised:
        with buf.transaction() as tx:
            tx.create("ExecutedObsUnit", {**OBS, "end_time": pd.NaT})
    message = str(raised.value)
    assert "\n" not in message and "ExecutedObsUnit.end_time" in message and "give None" in message, message
    assert site_keys(redis_client, settings.site) == []


@pytest.mark.slow
@pytest.mark.usefixtures("clean_db")
def test_a_bulk_create_beyond_one_redis_call_is_refused_and_the_largest_that_fits_is_buffered(buf, settings,
                                                                                              redis_client):
    """Redis 6 takes at most 1,048,576 arguments per command and resets the connection beyond:
    ingest took that for a Redis gone away and spooled the transaction, which every push sent
    again, so that every later transaction of the site queued behind it in the spool for good
    (its status 'pending', nothing in Redis). Below that, the largest call (349,523 writes)
    took over 5 s on a slow host, past ingest's socket timeout: spooled too. Now refused at
    once beyond MAX_TRANSACTION_WRITES, one line; the largest bulk_create allowed still goes to
    Redis, as does the next transaction."""
    from obs_pipeline.buffer_store import MAX_CACHE_WRITES, MAX_TRANSACTION_WRITES

    package = "9c6e3a52-0000-4000-8000-000000000001"  # (no row: ingest does not check foreign keys)
    assert MAX_TRANSACTION_WRITES < MAX_CACHE_WRITES  # what fits in one Redis call
    rows = [{"name": f"f{i}.fits", "raw_data_package_id": package} for i in range(MAX_TRANSACTION_WRITES + 1)]
    with pytest.raises(InvalidTransaction) as raised:
        with buf.transaction() as tx:
            tx.bulk_create("RawDataFile", rows)
    message = str(raised.value)
    assert "\n" not in message and "split it into several transactions" in message, message
    assert site_keys(redis_client, settings.site) == [] and not buf.spool.exists()

    with buf.transaction() as largest:
        largest.bulk_create("RawDataFile", rows[:MAX_TRANSACTION_WRITES])
    with buf.transaction() as after:
        after.create("ExecutedObsUnit", OBS)
    assert not buf.spool.exists()  # both went to Redis, not to the spool
    queue = f"site:{settings.site}:transaction_buffer"
    assert redis_client.llen(queue) == 2
    assert redis_client.scard(f"site:{settings.site}:index:RawDataFile") == MAX_TRANSACTION_WRITES
    assert buf.status(largest.transaction_id) == buf.status(after.transaction_id) == "pending"


def test_the_step_that_takes_a_transaction_beyond_the_write_limit_is_refused_by_its_own_call(buf, settings,
                                                                                          redis_client):
    """A bulk_create of a million rows was validated, copied and encoded whole (12.8 s, 1.1 GB
    on the local stack) before the block's end refused the transaction; a script adding rows in
    a loop grew without bound until then. Refused now by the call that crosses the limit,
    before its rows are checked, and nothing of that step is kept: a script that catches the
    refusal still buffers what it added before, once."""
    from obs_pipeline.buffer_store import MAX_TRANSACTION_WRITES

    package = "9c6e3a52-0000-4000-8000-000000000001"  # (no row: ingest does not check foreign keys)
    rows = [{"name": f"f{i}.fits", "raw_data_package_id": package} for i in range(MAX_TRANSACTION_WRITES - 1)]
    reached = []
    with pytest.raises(InvalidTransaction) as raised:
        with buf.transaction() as tx:
            tx.bulk_create("RawDataFile", rows * 10)  # the rows are not looked at: refused at once
            reached.append("after bulk_create")
    message = str(raised.value)
    assert reached == [] and "\n" not in message and "split it into several transactions" in message, message
    assert site_keys(redis_client, settings.site) == [] and not buf.spool.exists()

    with buf.transaction() as tx:
        tx.bulk_create("RawDataFile", rows)
        last = tx.create("RawDataFile", {"name": "last.fits", "raw_data_package_id": package})  # the limit: kept
        with pytest.raises(InvalidTransaction, match="split it into several transactions"):
            tx.update("RawDataFile", last["id"], {"name": "renamed.fits"})  # one write beyond it
    queue = f"site:{settings.site}:transaction_buffer"
    assert redis_client.llen(queue) == 1 and buf.status(tx.transaction_id) == "pending"
    assert redis_client.scard(f"site:{settings.site}:index:RawDataFile") == MAX_TRANSACTION_WRITES
    assert buf.get("RawDataFile", last["id"])["name"] == "last.fits"


@pytest.mark.usefixtures("clean_db")
def test_a_bulk_create_with_keys_of_the_callers_checks_them_in_one_read(buf, settings, redis_client):
    """Each given key of a bulk_create was looked up alone, in Redis and on the replica: 5,000
    ObsUnit rows took 10 s on the local stack, the largest allowed (50,000) over 100 s. Looked
    up together now, one replica query per bulk_create; a key taken on the replica or buffered
    is still refused with its own line, nothing buffered."""
    import sqlalchemy as sa

    statements = []
    sa.event.listen(buf.query.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    rows = [{"id": 5000 + i, "name": f"unit {i}"} for i in range(300)]
    with buf.transaction() as tx:
        tx.bulk_create("ObsUnit", rows)
    selects = [s for s in statements if "obs_unit" in s]
    assert len(selects) == 1, len(selects)
    assert buf.get("ObsUnit", 5299) == {"id": 5299, "name": "unit 299"}
    before = site_keys(redis_client, settings.site)
    for taken in (123, 5150):  # on the replica (conftest's obs units); buffered above
        with pytest.raises(InvalidTransaction, match=f"^ObsUnit {taken} exists already"):
            with buf.transaction() as tx:
                tx.bulk_create("ObsUnit", [{"id": 6000 + i, "name": "new"} for i in range(50)] +
                               [{"id": taken, "name": "taken"}])
        assert site_keys(redis_client, settings.site) == before


@pytest.mark.slow
@pytest.mark.usefixtures("clean_db")
def test_a_batch_of_large_bulk_creates_is_drained_and_its_caches_cleaned(buf, env, settings, redis_client,
                                                                         replica_engine):
    """Six transactions of 100,000 records each (the most one may write), 99,998 of them files,
    drained in one batch: the cleanup of their chunk was one DEL of 1,199,976 keys, which Redis
    6 refuses (beyond 1,048,576 arguments) by resetting the connection, so `drain --once`
    failed ('Redis unreachable') at every run, the statuses stayed 'applied' and the caches for
    good (seen with three of 180,000 files, before such transactions were refused at ingest).
    Now the cleanup's commands are split."""
    import sqlalchemy as sa

    from obs_pipeline.buffer_store import MAX_COMMAND_ARGS, MAX_TRANSACTION_WRITES

    files = MAX_TRANSACTION_WRITES - 2
    assert 6 * files * 2 > MAX_COMMAND_ARGS  # two keys a file to delete (three of 180,000: 1,080,000)
    ids = []
    for n in range(6):
        with buf.transaction() as tx:
            obs = tx.create("ExecutedObsUnit", OBS)
            package = tx.create("RawDataPackage", {"name": f"p{n}", "executed_obs_unit_id": obs["id"]})
            tx.bulk_create("RawDataFile", [{"name": f"f{i}.fits", "raw_data_package_id": package["id"]}
                                           for i in range(files)])
        ids.append(tx.transaction_id)
    drain_once(env)
    assert [buf.status(i) for i in ids] == ["replicated"] * 6
    assert redis_client.scard(f"site:{settings.site}:index:RawDataFile") == 0
    assert not list(redis_client.scan_iter(match=f"site:{settings.site}:buffered:*", count=10_000))
    assert redis_client.zcard(f"site:{settings.site}:awaiting_replication") == 0
    with replica_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM raw_data_file")).scalar_one() == 6 * files


def test_status_and_wait_given_the_transaction_itself_say_to_give_its_id(buf):
    """`buf.status(tx)` for `buf.status(tx.transaction_id)` answered None, as for an id never
    buffered, and `buf.wait(tx)` raised AttributeError ('encode'); the id itself still works."""
    with buf.transaction() as tx:
        tx.create("ExecutedObsUnit", OBS)
    for call in (lambda: buf.status(tx), lambda: buf.wait(tx, timeout=0.2), lambda: buf.wait(None, timeout=0.2)):
        with pytest.raises(ValueError, match=r"^a transaction id is a string \(tx.transaction_id") as raised:
            call()
        assert "\n" not in str(raised.value)
    assert buf.status(tx.transaction_id) == "pending"
    assert buf.wait(tx.transaction_id, until="pending", timeout=0.2) is True


@pytest.mark.usefixtures("clean_db")
def test_numpy_integers_from_a_dataframe_are_taken_as_integers_and_read_back_as_written(buf, env):
    """A value from a DataFrame or an array (np.int64) is no `int` to isinstance: an obs unit id
    or a key taken from one was refused as 'np.int64(123) is not an integer'."""
    np = pytest.importorskip("numpy")
    units = np.array([123, 7001], dtype=np.int64)
    with buf.transaction() as tx:
        unit = tx.create("ObsUnit", {"id": units[1], "name": "from a frame"})
        obs = tx.create("ExecutedObsUnit", {**OBS, "obs_unit_id": units[1]})
    assert type(unit["id"]) is int and type(obs["obs_unit_id"]) is int  # the caller's copies too
    buf.update("ObsUnit", np.int32(7001), {"name": "renamed"})
    expected = {**OBS, "id": obs["id"], "obs_unit_id": 7001, "start_time": "2025-01-01T00:00:00+00:00", "end_time": None}
    assert buf.get("ExecutedObsUnit", obs["id"]) == expected
    assert [r["id"] for r in buf.search("ExecutedObsUnit", {"obs_unit_id": units[1]})] == [obs["id"]]
    drain_once(env)
    assert buf.status(tx.transaction_id) == "replicated"
    assert buf.get("ExecutedObsUnit", obs["id"]) == expected
    assert buf.get("ObsUnit", np.uint16(7001)) == {"id": 7001, "name": "renamed"}
    assert [r["id"] for r in buf.search("ExecutedObsUnit", {"obs_unit_id": [units[0], units[1]]})] == [obs["id"]]


def test_numpy_floats_and_booleans_are_taken_in_a_schema_of_its_own(settings, env):
    """np.float32 and np.bool_ (a DataFrame's float32 and bool columns) were refused as 'is not a
    number' and 'is not a boolean'; a value a float does not hold exactly is still refused, as a
    Decimal's is."""
    import dataclasses
    import fractions

    np = pytest.importorskip("numpy")
    models = "obs_pipeline_tests.custom_models:Base"
    init = cli("db", "init", env={**env, "OBS_MODELS": models})
    assert init.returncode == 0, init.stderr
    buf = TransactionBuffer(settings=dataclasses.replace(settings, models=models))
    try:
        code = int(np.random.default_rng().integers(10**6, 10**9))
        with buf.transaction() as tx:
            tx.create("Instrument", {"code": code, "name": "cam"})
            exposure = tx.create("Exposure", {"instrument_code": np.int64(code), "started": "2025-01-01T00:00:00Z",
                                              "seconds": np.float32(1.25), "ok": np.bool_(True)})
        expected = {"id": exposure["id"], "instrument_code": code, "started": "2025-01-01T00:00:00+00:00",
                    "seconds": 1.25, "ok": True, "note": None, "logged": None}
        assert buf.get("Exposure", exposure["id"]) == expected
        assert [type(exposure[c]) for c in ("instrument_code", "seconds", "ok")] == [int, float, bool]
        for value in (fractions.Fraction(1, 3), np.float32("nan"), np.array([1.5])):
            with pytest.raises(InvalidTransaction, match="Exposure.seconds: .*(no exact float|not a finite|not a "
                                                         "number)"):
                buf.update("Exposure", exposure["id"], {"seconds": value})
        # (numpy 2 shows the value as np.True_, numpy 1, which pandas 2.2.0 and matplotlib 3.8 allow, as True)
        with pytest.raises(InvalidTransaction, match=r"Exposure.instrument_code: (np\.True_|True) is not an integer"):
            buf.update("Exposure", exposure["id"], {"instrument_code": np.bool_(True)})
        drain_once({**env, "OBS_MODELS": models})
        assert buf.status(tx.transaction_id) == "replicated"
        assert buf.get("Exposure", exposure["id"]) == expected
    finally:
        buf.close()


@pytest.mark.slow
def test_the_holds_of_failed_large_bulk_creates_are_acknowledged_on_the_real_redis(settings):
    """Two bulk_creates of 300,000 rows that main refuses (a foreign key, say) hold their 600,000
    rows while they wait to retry. The acknowledgement sent those holds as one script call of
    1.2 million arguments, beyond the 1,048,576 Redis 6 takes: Redis reset the connection, which
    inside the acknowledgement's WATCH read as the lease lost, so the batch stayed 'processing'
    and every drain run did the same (seen end to end with `drain --once`: 99 s a run). The
    drain's reads of those holds (`holders`) went past the limit as well. Both are split now."""
    import redis

    from obs_pipeline.buffer_store import MAX_COMMAND_ARGS, BufferStore, Outcome

    # (a client that waits: a million-argument call on a Redis that a test before this one left
    # rewriting its AOF can take more than redis-py's default 5 s)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=120)
    store = BufferStore(client, settings.site)
    token = store.acquire_lease(120)
    failed = {f"{n:08d}-0000-4000-8000-{i:012d}": f"tx{n}" for n in range(2) for i in range(300_000)}
    outcome = Outcome()
    for tx_id in ("tx0", "tx1"):
        outcome.claim({row for row, tx in failed.items() if tx == tx_id}, tx_id)
    store.acknowledge(token, outcome)
    assert client.hlen(f"site:{settings.site}:held_ids") == 600_000
    rows = sorted(failed) + sorted(failed)[:MAX_COMMAND_ARGS - 600_000]  # more ids than one HMGET takes
    assert store.holders(rows) == failed
    store.unhold({"tx0": {row for row, tx in failed.items() if tx == "tx0"}})
    assert client.hlen(f"site:{settings.site}:held_ids") == 300_000
    client.delete(f"site:{settings.site}:held_ids")
    client.close()


@pytest.mark.usefixtures("clean_db")
def test_a_model_given_as_its_mapped_class_is_taken_as_its_name(buf, env, settings, redis_client):
    """Seed 000's builder took the mapped class (`model_class=models.ExecutedObsUnit`), and scripts
    ported from it pass classes: they were refused as "unknown model <class ...>". A class of
    OBS_MODELS' base now names its model in every call; the wire keeps the name; a class of another
    base is one line, nothing buffered."""
    import json

    import sqlalchemy as sa
    from sqlalchemy import orm

    from obs_pipeline import models

    with buf.transaction() as tx:
        obs = tx.create(models.ExecutedObsUnit, OBS)
        pkg = tx.create(models.RawDataPackage, {"name": "by class", "executed_obs_unit_id": obs["id"]})
        files = tx.bulk_create(models.RawDataFile, [{"name": "a.fits", "raw_data_package_id": pkg["id"]}])
        tx.update(models.RawDataFile, files[0]["id"], {"name": "b.fits"})
    steps = json.loads(redis_client.get(f"site:{settings.site}:transaction:{tx.transaction_id}"))["steps"]
    assert [s["model_class"] for s in steps] == ["ExecutedObsUnit", "RawDataPackage", "RawDataFile", "RawDataFile"]
    buf.update(models.ExecutedObsUnit, obs["id"], {"status": "completed"})
    assert buf.get(models.ExecutedObsUnit, obs["id"])["status"] == "completed"
    drain_once(env)
    assert buf.get(models.RawDataFile, files[0]["id"])["name"] == "b.fits"
    assert [r["id"] for r in buf.search(models.RawDataPackage, {"executed_obs_unit_id": obs["id"]})] == [pkg["id"]]
    buf.delete(models.RawDataFile, files[0]["id"])
    assert buf.get(models.RawDataFile, files[0]["id"]) is None

    class Other(orm.DeclarativeBase):
        pass

    class ExecutedObsUnit(Other):  # the same name, another base: not a model of OBS_MODELS
        __tablename__ = "executed_obs_unit"
        id = sa.Column(sa.Integer, primary_key=True)

    before = site_keys(redis_client, settings.site)
    with pytest.raises(InvalidTransaction) as raised:
        with buf.transaction() as refused:
            refused.create(ExecutedObsUnit, OBS)
    message = str(raised.value)
    assert "\n" not in message and "not a class of the declarative base in OBS_MODELS" in message, message
    assert site_keys(redis_client, settings.site) == before


def test_a_pandas_series_given_for_one_value_is_refused_in_one_line_and_buffers_nothing(buf, settings, redis_client):
    """`df["id"]` for `row["id"]`: the error quoted the Series's repr, which runs over several
    lines (so does a DataFrame's, a 2-D array's); each is one line now, nothing buffered."""
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame([{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    with buf.transaction() as tx:
        obs = tx.create("ExecutedObsUnit", OBS)
    before = site_keys(redis_client, settings.site)

    def create(**values):
        with buf.transaction() as refused:
            refused.create("ExecutedObsUnit", {**OBS, **values})

    calls = [
        (lambda: create(obs_unit_id=frame["id"]), "ExecutedObsUnit.obs_unit_id: 0 1 1 2 Name: id, dtype: int64 is "
                                                  "not an integer"),
        (lambda: create(status=frame), "ExecutedObsUnit.status: id name 0 1 a 1 2 b is not a string"),
        (lambda: buf.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": frame["id"]}), "is not an integer"),
        (lambda: buf.update("ObsUnit", frame["id"], {"name": "x"}), "ObsUnit.id: 0 1 1 2 Name: id"),
        (lambda: buf.get("ObsUnit", frame[["id"]].to_numpy()), "ObsUnit.id: array([[1], [2]]) is not an integer"),
        (lambda: buf.search("ExecutedObsUnit", {"obs_unit_id": {">": frame["id"]}}), "is not an integer"),
        (lambda: buf.get(frame, 1), "unknown model id name 0 1 a 1 2 b (known: "),
        (lambda: buf.wait(tx.transaction_id, timeout=frame["id"]), "timeout must be a number of seconds, not 0 1"),
        (lambda: TransactionBuffer(settings=settings, max_retries=frame["id"]), "max_retries must be a whole number"),
    ]
    for call, part in calls:
        with pytest.raises(ValueError) as raised:
            call()
        message = str(raised.value)
        assert "\n" not in message and part in message, message
    assert site_keys(redis_client, settings.site) == before


@pytest.mark.usefixtures("clean_db")
def test_ids_held_in_an_array_a_series_a_range_or_a_dicts_keys_filter_as_any_of(buf, env):
    """A search took "any of" only as a list, tuple or set: the ids a script holds in a numpy
    array, a pandas Series or Index, a range or a dict's keys were refused ('array([1, 2]) is
    not an integer', the Series's over several lines). The same records, buffered and
    replicated."""
    np = pytest.importorskip("numpy")
    pd = pytest.importorskip("pandas")
    with buf.transaction() as tx:
        ids = sorted(tx.create("ExecutedObsUnit", {**OBS, "obs_unit_id": unit})["id"] for unit in (1, 2, 3))
    wanted = [np.array([1, 2]), pd.Series([1, 2]), pd.Index([1, 2]), range(1, 3), {1: "a", 2: "b"}.keys(),
              {"a": 1, "b": 2}.values()]
    for _ in ("buffered", "replicated"):
        for units in wanted:
            found = sorted(r["id"] for r in buf.search("ExecutedObsUnit", {"obs_unit_id": units}))
            expected = sorted(r["id"] for r in buf.search("ExecutedObsUnit", {"obs_unit_id": [1, 2]}))
            assert found == expected and len(found) == 2 and set(found) < set(ids), units
        drain_once(env)
        assert buf.status(tx.transaction_id) == "replicated"


def test_a_replica_url_sqlalchemy_cannot_load_is_one_line_naming_the_variable(settings, redis_client):
    """`postgres://` (SQLAlchemy knows only `postgresql://`) was taken until the first read:
    get, and the key check of a create that gives its key, raised SQLAlchemy's
    NoSuchModuleError ('Can't load plugin: sqlalchemy.dialects:postgres'), naming no
    variable. Now the same ConfigError as for main's URL, nothing buffered."""
    import dataclasses

    from obs_pipeline.config import ConfigError

    wrong = dataclasses.replace(settings, replica_db_url=settings.replica_db_url.replace("postgresql+psycopg2://",
                                                                                         "postgres://"))
    buffer = TransactionBuffer(settings=wrong)
    try:
        line = r"^OBS_REPLICA_DB_URL must name PostgreSQL \(postgresql\+psycopg2://\.\.\.\), not postgres$"
        with pytest.raises(ConfigError, match=line):
            buffer.get("ObsUnit", 123)
        with pytest.raises(ConfigError, match=line):
            with buffer.transaction() as tx:
                tx.create("ObsUnit", {"id": 9001, "name": "given key"})
        assert site_keys(redis_client, settings.site) == []
    finally:
        buffer.close()


@pytest.mark.usefixtures("clean_db")
def test_a_model_whose_table_or_column_the_replica_lacks_is_one_line_saying_what_to_run(buf, settings, redis_client):
    """A model added to OBS_MODELS without `db init` since (or a column added to a model, not to
    its table): every get and search of it, and a create that gives its key (checked on the
    replica), raised SQLAlchemy's page of UndefinedTable / UndefinedColumn. Now one line
    naming the table and what to do, nothing buffered; the other models read as before."""
    import dataclasses

    from obs_pipeline.config import ConfigError

    buffer = TransactionBuffer(settings=dataclasses.replace(settings, models="obs_pipeline_tests.unmigrated_models:Base"))
    try:
        no_table = (r"^reading Telescope: the site's replica \(OBS_REPLICA_DB_URL\) has no table unmigrated_telescope "
                    r"\(relation \"unmigrated_telescope\" does not exist\): run `obs-pipeline db init` with this "
                    r"OBS_MODELS, which creates it on main$")
        no_column = (r"^reading ObsUnit: the site's replica \(OBS_REPLICA_DB_URL\) lacks a column of its table obs_unit "
                     r"that OBS_MODELS maps \(column obs_unit.priority does not exist\): add the column")

        def create_telescope():
            with buffer.transaction() as tx:
                tx.create("Telescope", {"id": 1, "name": "main"})

        for call, line in ((lambda: buffer.get("Telescope", 1), no_table),
                           (lambda: buffer.search("Telescope", {"name": "main"}), no_table),
                           (create_telescope, no_table),
                           (lambda: buffer.get("ObsUnit", 123), no_column),
                           (lambda: buffer.search("ObsUnit", {}), no_column)):
            with pytest.raises(ConfigError, match=line):
                call()
        assert site_keys(redis_client, settings.site) == []
    finally:
        buffer.close()
    assert buf.get("ObsUnit", 123) == {"id": 123, "name": "unit 123"}


@pytest.mark.usefixtures("clean_db")
def test_a_replica_role_without_select_is_one_line_saying_what_to_grant(settings, main_engine, replica_engine,
                                                                        redis_client):
    """OBS_REPLICA_DB_URL naming a role that may not read the models' tables (the readers' role
    made without deploy/main-setup.sql's GRANT): get, search, an update's check of its id and a
    create that gives its key raised SQLAlchemy's ProgrammingError, "permission denied for table
    obs_unit", over several lines. Now one line naming the variable and the grant, nothing
    buffered."""
    import dataclasses

    from obs_pipeline.config import ConfigError
    from obs_pipeline_tests.conftest import wait_for_replica

    role = f"noread_{settings.site}"
    with main_engine.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN"))
    wait_for_replica(main_engine, replica_engine)
    url = sa.engine.make_url(settings.replica_db_url).set(username=role).render_as_string(hide_password=False)
    buffer = TransactionBuffer(settings=dataclasses.replace(settings, replica_db_url=url))
    try:
        line = (r"^reading ObsUnit: the site's replica refuses the role of OBS_REPLICA_DB_URL \(permission denied for "
                r"table obs_unit\): grant it SELECT on the models' tables on main \(deploy/main-setup.sql\); the "
                r"replica replays the grant$")

        def create_with_its_key():
            with buffer.transaction() as tx:
                tx.create("ObsUnit", {"id": 9002, "name": "given key"})

        for call in (lambda: buffer.get("ObsUnit", 123), lambda: buffer.search("ObsUnit", {"name": "unit 1"}),
                     lambda: buffer.update("ObsUnit", 123, {"name": "renamed"}), create_with_its_key):
            with pytest.raises(ConfigError, match=line):
                call()
        assert site_keys(redis_client, settings.site) == []
    finally:
        buffer.close()
        with main_engine.begin() as conn:
            conn.execute(sa.text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"))
            conn.execute(sa.text(f"DROP ROLE {role}"))


@pytest.mark.parametrize("layout", ["file", "under a file", "spool file", "lock file"])
def test_a_spool_folder_no_script_could_spool_in_is_refused_as_the_buffer_is_made(settings, redis_client, tmp_path,
                                                                                 layout):
    """OBS_SPOOL_DIR a file, or a folder where the spool keeps a file: a script ran as if all
    were well until Redis could not take a transaction, then lost it to a SpoolError saying
    "[Errno 21] Is a directory" or "[Errno 20] Not a directory". Refused now as the buffer is
    made, in one line naming OBS_SPOOL_DIR; nothing buffered."""
    folder, line = spool_folder_gone_wrong(settings, tmp_path, layout)
    with pytest.raises(ConfigError) as refused:
        TransactionBuffer(settings=dataclasses.replace(settings, spool_dir=str(folder)))
    assert str(refused.value) == line
    assert site_keys(redis_client, settings.site) == []


def test_a_rediss_url_of_a_redis_without_tls_is_refused_at_the_first_write_and_nothing_is_spooled(
        settings, redis_client, tmp_path):
    """rediss:// given for a Redis that serves no TLS: its TLS handshake goes unanswered, which
    ingest took for Redis down: every transaction was spooled, for a push that could never get
    through, and the script was told it had buffered. The server answers a plain PING, so this
    is the URL, not an outage: one line naming OBS_REDIS_URL, nothing spooled or buffered."""
    url = "rediss://" + settings.redis_url.removeprefix("redis://")
    buf = TransactionBuffer(settings=dataclasses.replace(settings, redis_url=url))
    try:
        with pytest.raises(ConfigError) as refused:
            with buf.transaction() as tx:
                tx.create("ExecutedObsUnit", OBS)
        line = str(refused.value)
        assert line.startswith("Redis at ") and "serves no TLS, and OBS_REDIS_URL is rediss:// (TLS): give redis:// " \
                                                 "for it" in line and "\n" not in line, line
        assert not buf.spool.exists()
    finally:
        buf.close()
    assert site_keys(redis_client, settings.site) == [] and not list(tmp_path.glob("**/*.jsonl"))
