"""Columns whose values the replica gives in another form than the buffered JSON: a time of
day (psycopg2 gives a datetime.time), a single-precision float (PostgreSQL keeps about 7
digits), a NUMERIC(p, s) (rounded to s places), numbers in `jsonb`, and arrays of these. A
record must read the same while buffered and once replicated, and a search filter must
match it in both states alike."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy import ARRAY, JSON, REAL, Enum, Numeric, Time
from sqlalchemy.dialects.postgresql import CIDR, CITEXT, INET, INTERVAL, JSONB, MACADDR, TIME, TIMESTAMP, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from obs_pipeline.ingest import InvalidTransaction, TransactionBuffer
from obs_pipeline.column_values import interval_text, numeric_of, single_float
from obs_pipeline.keys import SiteKeys
from obs_pipeline.model_registry import ModelRegistry
from obs_pipeline.schema import create_schema
from obs_pipeline_tests.conftest import wait_for_replica
from obs_pipeline_tests.test_walking_skeleton import drain_until_empty
from obs_pipeline_tests.workload import drain_one_batch, drain_until_settled, replay_paused

MODELS = "obs_pipeline_tests.test_read_forms:Base"


class Base(DeclarativeBase):
    pass


class Reading(Base):
    __tablename__ = "read_forms_reading"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    at: Mapped[object] = mapped_column(Time, nullable=True)
    gain: Mapped[float] = mapped_column(REAL, nullable=True)
    at_zone: Mapped[object] = mapped_column(Time(timezone=True), nullable=True)
    doc: Mapped[object] = mapped_column(JSON, nullable=True)
    doc_b: Mapped[object] = mapped_column(JSONB, nullable=True)
    doc_sql_null: Mapped[object] = mapped_column(JSON(none_as_null=True), nullable=True)
    settings: Mapped[object] = mapped_column(JSONB, nullable=False, server_default=sa.text("'{}'"))
    amount: Mapped[object] = mapped_column(Numeric(10, 2), nullable=True)
    gains: Mapped[object] = mapped_column(ARRAY(REAL), nullable=True)
    amounts: Mapped[object] = mapped_column(ARRAY(Numeric(10, 2), dimensions=2), nullable=True)
    times: Mapped[object] = mapped_column(ARRAY(Time(timezone=True)), nullable=True)



class Band(enum.Enum):
    low = "l"
    high = "h"


class Graded(Base):
    """Enums of a Python enum class: the ORM's select gives its members, not labels."""
    __tablename__ = "read_forms_graded"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    band: Mapped[object] = mapped_column(Enum(Band, name="read_forms_band"), nullable=True)
    plain: Mapped[object] = mapped_column(Enum(Band, name="read_forms_plain", native_enum=False), nullable=True)
    bands: Mapped[object] = mapped_column(ARRAY(Enum(Band, name="read_forms_band")), nullable=True)


class Coarse(Base):
    """Times kept to whole seconds: PostgreSQL rounds the fraction it is given."""
    __tablename__ = "read_forms_coarse"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    at: Mapped[object] = mapped_column(TIMESTAMP(timezone=True, precision=0), nullable=True)
    of_day: Mapped[object] = mapped_column(TIME(precision=0), nullable=True)
    span: Mapped[object] = mapped_column(INTERVAL(precision=0), nullable=True)


class Fielded(Base):
    """Intervals of fields: PostgreSQL keeps only those (INTERVAL DAY drops the time of day)."""
    __tablename__ = "read_forms_fielded"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    days: Mapped[object] = mapped_column(INTERVAL(fields="day"), nullable=True)
    minutes: Mapped[object] = mapped_column(INTERVAL(fields="hour to minute"), nullable=True)
    years: Mapped[object] = mapped_column(INTERVAL(fields="year"), nullable=True)
    hours: Mapped[object] = mapped_column(ARRAY(INTERVAL(fields="day to hour")), nullable=True)


class Numbered(Base):
    """A NUMERIC(10, 2) key the site gives: the replica gives it as a Decimal, read as a float."""
    __tablename__ = "read_forms_numbered"

    key: Mapped[object] = mapped_column(Numeric(10, 2), primary_key=True, autoincrement=False)
    note: Mapped[object] = mapped_column(sa.Text, nullable=True)


class Stamped(Base):
    """A TIMESTAMP(0) key the site gives: PostgreSQL keeps it to whole seconds."""
    __tablename__ = "read_forms_stamped"

    at: Mapped[object] = mapped_column(TIMESTAMP(timezone=True, precision=0), primary_key=True)
    note: Mapped[object] = mapped_column(sa.Text, nullable=True)


class Clocked(Base):
    """A TIME(2) key: PostgreSQL keeps it to hundredths of a second."""
    __tablename__ = "read_forms_clocked"

    at: Mapped[object] = mapped_column(TIME(precision=2), primary_key=True)
    note: Mapped[object] = mapped_column(sa.Text, nullable=True)


class Spanned(Base):
    """An INTERVAL(0) key: PostgreSQL keeps it to whole seconds."""
    __tablename__ = "read_forms_spanned"

    at: Mapped[object] = mapped_column(INTERVAL(precision=0), primary_key=True)
    note: Mapped[object] = mapped_column(sa.Text, nullable=True)


class RealKeyed(Base):
    """A REAL key: PostgreSQL keeps it at single precision (0.1 as 0.10000000149011612)."""
    __tablename__ = "read_forms_real_keyed"

    key: Mapped[float] = mapped_column(REAL, primary_key=True, autoincrement=False)
    note: Mapped[object] = mapped_column(sa.Text, nullable=True)


class WideNumbered(Base):
    """A NUMERIC(38, 10) key: 28 digits before the point, 10 after (38 in all)."""
    __tablename__ = "read_forms_wide_numbered"

    key: Mapped[object] = mapped_column(Numeric(38, 10), primary_key=True, autoincrement=False)
    note: Mapped[object] = mapped_column(sa.Text, nullable=True)


class Unscaled(Base):
    """Numeric(scale=2) without a precision: SQLAlchemy writes it as plain NUMERIC (PostgreSQL
    takes a scale only after a precision), which keeps every digit it is given."""
    __tablename__ = "read_forms_unscaled"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    amount: Mapped[object] = mapped_column(Numeric(scale=2), nullable=True)


class UnscaledKeyed(Base):
    """A Numeric(scale=2) key: plain NUMERIC, as Unscaled's amount."""
    __tablename__ = "read_forms_unscaled_keyed"

    key: Mapped[object] = mapped_column(Numeric(scale=2), primary_key=True, autoincrement=False)
    note: Mapped[object] = mapped_column(sa.Text, nullable=True)

class Counted(Base):
    """NUMERIC(20, 0) and plain NUMERIC: integers past 2**53 kept exactly (nanoseconds, bytes)."""
    __tablename__ = "read_forms_counted"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    count: Mapped[object] = mapped_column(Numeric(20, 0), nullable=True)
    plain: Mapped[object] = mapped_column(Numeric, nullable=True)


class Timed(Base):
    """A NUMERIC(20, 0) key the site gives (a frame's time in nanoseconds)."""
    __tablename__ = "read_forms_timed"

    ns: Mapped[object] = mapped_column(Numeric(20, 0), primary_key=True, autoincrement=False)
    note: Mapped[object] = mapped_column(sa.Text, nullable=True)


class Lettered(Base):
    """CITEXT (PostgreSQL's extension): text kept as given, compared without case."""
    __tablename__ = "read_forms_lettered"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tag: Mapped[object] = mapped_column(CITEXT, nullable=True)


class Handled(Base):
    """A CITEXT key the site gives: main takes 'ABC' for the row 'abc'."""
    __tablename__ = "read_forms_handled"

    name: Mapped[object] = mapped_column(CITEXT, primary_key=True)
    note: Mapped[object] = mapped_column(sa.Text, nullable=True)


class Titled(Base):
    """A CITEXT key the site gives, with a unique label main enforces (ingest does not)."""
    __tablename__ = "read_forms_titled"

    name: Mapped[object] = mapped_column(CITEXT, primary_key=True)
    label: Mapped[object] = mapped_column(sa.Text, nullable=True, unique=True)


class Subtitled(Base):
    """A CITEXT foreign key: main takes 'abc' for the Titled row 'ABC'."""
    __tablename__ = "read_forms_subtitled"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    titled_name: Mapped[object] = mapped_column(CITEXT, sa.ForeignKey("read_forms_titled.name"), nullable=True)


class Addressed(Base):
    """INET, CIDR and MACADDR: main keeps an address, and writes it back in its own text
    (10.0.0.3/32 reads 10.0.0.3, 2001:DB8:0:0::1 reads 2001:db8::1, 08-00-2B-01-02-03 reads
    08:00:2b:01:02:03)."""
    __tablename__ = "read_forms_addressed"

    address: Mapped[object] = mapped_column(INET, primary_key=True)
    net: Mapped[object] = mapped_column(CIDR, nullable=True)
    seen: Mapped[object] = mapped_column(ARRAY(INET), nullable=True)
    note: Mapped[object] = mapped_column(sa.Text, nullable=True)


class Carded(Base):
    """A MACADDR key."""
    __tablename__ = "read_forms_carded"

    mac: Mapped[object] = mapped_column(MACADDR, primary_key=True)
    note: Mapped[object] = mapped_column(sa.Text, nullable=True)


@pytest.fixture
def forms(settings, main_engine, replica_engine):
    with main_engine.begin() as conn:
        conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS citext"))
    create_schema(main_engine, ModelRegistry.from_path(MODELS))
    wait_for_replica(main_engine, replica_engine)  # a first read of the replica needs the table
    return dataclasses.replace(settings, models=MODELS)


@pytest.mark.parametrize("at, gain", [("12:30", 0.123456789), ("23:59:59.5", 1e-3 / 3), ("00:00:00+02:00", 30)])
def test_time_and_real_columns_read_the_same_buffered_and_replicated(forms, at, gain):
    buf = TransactionBuffer(settings=forms)
    with buf.transaction() as tx:
        rid = tx.create("Reading", {"at": at, "gain": gain})["id"]
    buffered = buf.get("Reading", rid)
    assert buf.search("Reading", {"id": rid}) == [buffered]
    drain_until_empty(forms)
    replicated = buf.get("Reading", rid)
    assert buffered == replicated, (buffered, replicated)
    buf.close()


FILTERS = [  # each with the row's id (the table is shared by the session's tests)
    {"gain": 0.1}, {"gain": 0.10000000149011612}, {"gain": [0.1, 7]}, {"gain": {"<=": 0.1}}, {"gain": {">": 0.1}},
    {"gain": {"<": 0.1}}, {"gain": {">=": 0.10000000000000001}},
    {"at": "12:00:00"}, {"at": "12:00:00+05:00"}, {"at": {">": "11:59:59"}},
    {"at_zone": "12:00:00+02:00"}, {"at_zone": "10:00:00+00:00"}, {"at_zone": ["10:00:00Z", "12:00:00+02:00"]},
    {"at_zone": {"<": "10:00:00+00:00"}}, {"at_zone": {">": "10:00:00+00:00"}}, {"at_zone": {">=": "10:00:00"}},
]


def test_filters_on_time_and_real_columns_match_the_same_rows_buffered_and_replicated(forms):
    """A REAL column keeps 0.1 as 0.10000000149011612, which PostgreSQL compares with a
    filter's 0.1 as doubles (not equal), and a buffered row compared in Python as given
    (equal); PostgreSQL orders `time with time zone` by instant, then offset (12:00+02 is not
    10:00+00, and sorts before it), Python's time calls them equal."""
    buf = TransactionBuffer(settings=forms)
    with buf.transaction() as tx:
        rid = tx.create("Reading", {"at": "12:00:00", "gain": 0.1, "at_zone": "12:00:00+02:00"})["id"]
    buffered = {str(f): [r["id"] for r in buf.search("Reading", {"id": rid, **f})] for f in FILTERS}
    drain_until_empty(forms)
    replicated = {str(f): [r["id"] for r in buf.search("Reading", {"id": rid, **f})] for f in FILTERS}
    assert buffered == replicated
    assert replicated[str({"gain": 0.1})] == [rid]  # the value the row reads as finds it
    buf.close()



DOCS = [None, 1e16, 1.5e300, -0.0, 1e-7, 100.0, 10**30, "text", [1.0, 2e20, None, {"b": 1, "a": -1.25e17}]]


def test_json_columns_read_the_same_buffered_and_replicated(forms, main_engine):
    """`jsonb` keeps numbers as `numeric`: a float buffered as 1.5e+300 came back the integer
    15000...0 (not equal to it), 1e+16 as 10000000000000000. A None is written as JSON null,
    as the ORM writes it (test_a_json_null_is_written...): it reads None in both states."""
    buf = TransactionBuffer(settings=forms)
    with buf.transaction() as tx:
        rows = tx.bulk_create("Reading", [{"doc": doc, "doc_b": doc} for doc in DOCS])
    ids = [row["id"] for row in rows]
    buffered = [buf.get("Reading", rid) for rid in ids]
    drain_until_empty(forms)
    replicated = [buf.get("Reading", rid) for rid in ids]
    assert [(r["doc"], r["doc_b"]) for r in buffered] == [(r["doc"], r["doc_b"]) for r in replicated]
    assert [[type(r["doc_b"]) for r in rows] for rows in (buffered, replicated)] == [
        [type(None), int, int, float, float, float, int, str, list]] * 2
    assert replicated[0]["doc"] is None and replicated[2]["doc"] == 1.5e300  # `json` keeps the text
    with main_engine.connect() as conn:
        nulls = conn.execute(sa.text("SELECT doc IS NULL, doc_b IS NULL FROM read_forms_reading WHERE id = :i"),
                             {"i": ids[0]}).one()
    assert tuple(nulls) == (False, False)
    buf.close()


def test_a_json_null_is_written_as_the_orm_writes_it(forms, main_engine, redis_client):
    """A None given for a `JSON`/`JSONB` column: the ORM writes JSON `null` (none_as_null=False,
    SQLAlchemy's default), or SQL NULL where the type says none_as_null=True. The drain wrote SQL
    NULL always: main's `IS NULL` found the site's rows and not the ORM's, and a NOT NULL column
    with a default refused the whole transaction. Created and updated, each row on main is
    compared with the one the ORM writes; both read None, buffered and replicated."""
    from sqlalchemy.orm import Session

    values = {"doc": None, "doc_b": None, "doc_sql_null": None, "settings": None}
    buf = TransactionBuffer(settings=forms)
    with buf.transaction() as tx:
        created = tx.create("Reading", values)["id"]
        updated = tx.create("Reading", {"doc": {"a": 1}, "doc_b": [1], "doc_sql_null": 2, "settings": {"b": 2}})["id"]
    drain_until_empty(forms)  # then an UPDATE of its own, not folded into the insert
    buf.update("Reading", updated, values)
    buffered = [buf.get("Reading", rid) for rid in (created, updated)]
    drain_until_empty(forms)
    assert not redis_client.llen(f"site:{forms.site}:failed_transactions")
    by_orm = uuid.uuid4()
    with Session(main_engine) as session:
        session.add(Reading(id=by_orm, **values))
        session.commit()

    def on_main(rid) -> tuple:
        with main_engine.connect() as conn:
            return tuple(conn.execute(sa.text(
                "SELECT doc IS NULL, doc::text, doc_b IS NULL, doc_b::text, doc_sql_null IS NULL, settings::text "
                "FROM read_forms_reading WHERE id = :i"), {"i": str(rid)}).one())

    assert on_main(by_orm) == (False, "null", False, "null", True, "null")
    assert on_main(created) == on_main(updated) == on_main(by_orm)
    replicated = [buf.get("Reading", rid) for rid in (created, updated)]
    assert [{k: r[k] for k in values} for r in buffered + replicated] == [values] * 4
    buf.close()


def test_a_nul_in_a_json_value_is_refused_at_ingest_and_a_backslash_u0000_is_text(forms, main_engine,
                                                                                   redis_client):
    """jsonb (and PostgreSQL's text) cannot hold a NUL: ingest's check for one never fired, as
    json.dumps writes it as the escape \\u0000, and main refused the whole transaction in the
    drain. Now it is refused at once, and a producer's entry dead-lettered with that line; the
    six characters backslash-u-0-0-0-0 are text like any other."""
    import json

    buf = TransactionBuffer(settings=forms)
    for doc in ({"note": "a\x00b"}, ["\x00"], {"k\x00": 1}):
        with pytest.raises(InvalidTransaction, match=r"^create of Reading: Reading\.doc_b: text may not contain NUL "
                                                     r"characters$"):
            with buf.transaction() as tx:
                tx.create("Reading", {"doc_b": doc})
    assert not redis_client.keys(f"site:{forms.site}:*")
    with buf.transaction() as tx:
        rid = tx.create("Reading", {"doc_b": {"note": "\\u0000 and \\\\u0000"}})["id"]
    bad = str(uuid.uuid4())
    redis_client.lpush(f"site:{forms.site}:transaction_buffer", json.dumps({"transaction_id": bad, "steps": [
        {"step_id": "s", "operation": "create", "model_class": "Reading", "data": {"id": str(uuid.uuid4()),
                                                                                   "doc_b": {"n": "\x00"}}}]}))
    drain_until_empty(forms)
    failed = [json.loads(e) for e in redis_client.lrange(f"site:{forms.site}:failed_transactions", 0, -1)]
    assert [(f["transaction_id"], f["failure"]["reason"]) for f in failed] == [
        (bad, f"transaction {bad}, step s: Reading.doc_b: text may not contain NUL characters")]
    with main_engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT doc_b->>'note' FROM read_forms_reading WHERE id = :i"),
                              {"i": rid}).scalar_one()
    assert stored == "\\u0000 and \\\\u0000" == buf.get("Reading", rid)["doc_b"]["note"]
    buf.close()


AMOUNTS = [1.234, 1.235, -1.235, 2.5, 12, 0.005, -0.001]


def _amounts_and_matches(buf, model: str, ids: list, filters: list) -> tuple[list, dict]:
    """Each record's amount, and which of them each filter on the amount finds (by place)."""
    amounts = [buf.get(model, rid)["amount"] for rid in ids]
    found = {str(f): sorted(ids.index(r["id"]) for r in buf.search(model, {"id": ids, "amount": f}))
             for f in filters}
    return amounts, found


def _rows_and_matches(buf, model: str, ids: list, filters: list[dict]) -> tuple[list, dict]:
    """Each record without its id, and which of them each filter finds (by place)."""
    rows = [{k: v for k, v in buf.get(model, rid).items() if k != "id"} for rid in ids]
    found = {str(f): sorted(ids.index(r["id"]) for r in buf.search(model, {"id": ids, **f})) for f in filters}
    return rows, found


def test_numeric_columns_read_and_filter_the_same_buffered_and_replicated(forms):
    """NUMERIC(10, 2) keeps 1.234 as 1.23 (1.235 as 1.24, half away from zero): buffered, a
    record read 1.234 and {"amount": 1.234} found it; replicated, 1.23, and it did not. -0.001
    is 0.00 (numeric has no negative zero): it read -0.0 while buffered, 0.0 once replicated."""
    buf = TransactionBuffer(settings=forms)
    with buf.transaction() as tx:
        rows = tx.bulk_create("Reading", [{"amount": amount} for amount in AMOUNTS])
    ids = [row["id"] for row in rows]
    filters = [1.234, 1.23, {">=": 1.234}, {"<": 1.235}, {">": 1.235}, [1.24, 0.01], 0.005, {"<=": -1.24}]
    buffered = _amounts_and_matches(buf, "Reading", ids, filters)
    drain_until_empty(forms)
    replicated = _amounts_and_matches(buf, "Reading", ids, filters)
    assert buffered == replicated, (buffered, replicated)
    assert replicated[0] == [1.23, 1.24, -1.24, 2.5, 12.0, 0.01, 0.0]
    assert [repr(a) for a in buffered[0]] == [repr(a) for a in replicated[0]], (buffered, replicated)  # -0.0 == 0.0
    buf.close()


def test_a_numeric_of_a_scale_without_a_precision_keeps_every_digit_buffered_and_replicated(forms, main_engine):
    """Numeric(scale=2) is plain NUMERIC in PostgreSQL (SQLAlchemy writes no scale without a
    precision): main keeps 1.234. Reads rounded it to 2 places all the same, buffered and
    replicated (1.23, not what main holds), and filters matched otherwise buffered than
    replicated: {"amount": 1.234} found the replica's row and not the buffered record (the
    record was compared rounded, the row as stored), {"amount": 1.23} the other way round."""
    buf = TransactionBuffer(settings=forms)
    given = [1.234, 1.235, 0.001]
    with buf.transaction() as tx:
        ids = [tx.create("Unscaled", {"amount": amount})["id"] for amount in given]
    filters = [1.234, 1.23, {">=": 1.234}, {"<": 1.235}, [1.24, 0.001], 0.0]
    buffered = _amounts_and_matches(buf, "Unscaled", ids, filters)
    drain_until_empty(forms)
    replicated = _amounts_and_matches(buf, "Unscaled", ids, filters)
    assert buffered == replicated, (buffered, replicated)
    with main_engine.connect() as conn:
        on_main = [float(conn.execute(sa.text("SELECT amount FROM read_forms_unscaled WHERE id = :i"),
                                      {"i": rid}).scalar_one()) for rid in ids]
    assert replicated[0] == on_main == given
    buf.close()


BIG = 2**53 + 1  # the first integer a float does not hold: as one, it is 2**53


def test_numeric_filters_on_integers_past_2_53_match_the_same_buffered_and_replicated(forms):
    """Main keeps NUMERIC values exactly, and the replica compares them so; a buffered record's
    were compared as floats: 2**53 + 1 matched == 2**53 while buffered and not once replicated,
    and > 2**53 the other way round. (Reads give them as floats, as documented.)"""
    buf = TransactionBuffer(settings=forms)
    values = [BIG, 2**53, 1735689600000000001, 7]
    with buf.transaction() as tx:
        ids = [tx.create("Counted", {"count": v, "plain": v})["id"] for v in values]
    filters = [{column: f} for column in ("count", "plain") for f in (
        2**53, BIG, {">": 2**53}, {"<": BIG}, {">=": BIG}, [BIG, 1735689600000000000], 1735689600000000000,
        {"!=": 2**53}, 7, 7.0)]
    buffered = _rows_and_matches(buf, "Counted", ids, filters)[1]
    drain_until_empty(forms)
    replicated = _rows_and_matches(buf, "Counted", ids, filters)[1]
    assert buffered == replicated, (buffered, replicated)
    assert replicated["{'count': 9007199254740992}"] == [1] and replicated["{'plain': {'>': 9007199254740992}}"] == [0, 2]
    buf.close()


@pytest.mark.parametrize("model, key", [("Timed", "ns"), ("UnscaledKeyed", "key")])
def test_a_numeric_key_a_float_does_not_hold_is_refused_not_changed(forms, main_engine, model, key):
    """A NUMERIC key is filed, and read, as a float; one of more digits than a float's text
    keeps was taken as its float: main stored 1735689600000000000 for the 1735689600000000001
    given, and another key, 1735689600000000002, was refused as "created twice" in the same
    transaction, "exists already" in a later one. Refused now, saying what main would keep; a key
    a float's text holds is kept."""
    buf = TransactionBuffer(settings=forms)
    with pytest.raises(InvalidTransaction) as refused:
        with buf.transaction() as tx:
            tx.create(model, {key: 1735689600000000001, "note": "not kept"})
    assert str(refused.value) == (
        f"create of {model}: {model}.{key}: 1735689600000000001 would not be kept as given: a NUMERIC key is filed "
        "and read as a float, which main would keep as 1735689600000000000; give it 15 significant digits or "
        "fewer, or make the column an integer (BIGINT)"), str(refused.value)
    kept = 1735689600000000000 + uuid.uuid4().int % 10**6 * 10**8  # (11 significant digits)
    with buf.transaction() as tx:
        tx.create(model, {key: kept, "note": "kept"})
    drain_until_empty(forms)
    table = {"Timed": "read_forms_timed", "UnscaledKeyed": "read_forms_unscaled_keyed"}[model]
    with main_engine.connect() as conn:
        notes = conn.execute(sa.text(f"SELECT {key}::text, note FROM {table} WHERE {key} >= 1735689600000000000")).all()
    assert (str(kept), "kept") in [(k.split(".")[0], n) for k, n in notes] and "not kept" not in [n for _, n in notes]
    assert buf.get(model, kept)["note"] == "kept"
    buf.close()


def test_a_numeric_key_of_a_scale_without_a_precision_names_its_record_the_same_buffered_and_replicated(forms):
    """A Numeric(scale=2) key of 1.234 (plain NUMERIC: main keeps 1.234): the buffered record,
    filed under "1.234", read its key as 1.23, and the replica's row was read, and filed, under
    "1.23": once replicated, get(1.234) said None."""
    buf = TransactionBuffer(settings=forms)
    key, note = uuid.uuid4().int % 10**6 * 10 + 1.234, f"u{uuid.uuid4().hex[:8]}"
    with buf.transaction() as tx:
        made = tx.create("UnscaledKeyed", {"key": key, "note": note})
    expected = {"key": key, "note": note}
    buffered = buf.get("UnscaledKeyed", key), buf.search("UnscaledKeyed", {"note": note})
    drain_until_empty(forms)
    replicated = buf.get("UnscaledKeyed", key), buf.search("UnscaledKeyed", {"note": note})
    assert buffered == replicated == (expected, [expected]), (buffered, replicated)
    assert made["key"] == key
    buf.close()


def test_array_elements_read_the_same_buffered_and_replicated(forms):
    """An array's elements read as the element type's values do: REAL, NUMERIC(p, s) and time
    elements read as given while buffered and in PostgreSQL's form once replicated."""
    buf = TransactionBuffer(settings=forms)
    values = {"gains": [0.123456789, None, 30],
              "amounts": [[1.234, None], [1.235, 2]], "times": ["12:30", "23:59:59.5+02:00"]}
    with buf.transaction() as tx:
        rid = tx.create("Reading", values)["id"]
    buffered = buf.get("Reading", rid)
    drain_until_empty(forms)
    replicated = buf.get("Reading", rid)
    assert {k: buffered[k] for k in values} == {k: replicated[k] for k in values}, (buffered, replicated)
    assert replicated["gains"] == [0.12345679, None, 30.0]
    buf.close()


def test_enum_of_a_python_enum_class_reads_its_label_buffered_and_replicated(forms):
    """An Enum(SomeEnum) column read as the label while buffered, and as the enum's member
    once replicated (SQLAlchemy's select converts it): a record changed type after the drain,
    was no longer JSON, and search_frame showed "Band.high"."""
    buf = TransactionBuffer(settings=forms)
    with buf.transaction() as tx:
        rid = tx.create("Graded", {"band": Band.high, "plain": "low", "bands": [Band.low, None, "high"]})["id"]

    def read() -> tuple:
        return (buf.get("Graded", rid), buf.search("Graded", {"id": rid, "band": Band.high}),
                buf.search("Graded", {"id": rid, "plain": ["low"]}),
                buf.search_frame("Graded", {"id": rid})[["band", "plain"]].values.tolist())

    buffered = read()
    drain_until_empty(forms)
    replicated = read()
    assert buffered == replicated, (buffered, replicated)
    assert replicated[0] == {"id": rid, "band": "high", "plain": "low", "bands": ["low", None, "high"]}
    assert replicated[3] == [["high", "low"]]
    buf.close()


def test_a_native_enum_is_ordered_by_its_labels_declared_order_buffered_and_replicated(forms):
    """PostgreSQL orders a native enum by the order its labels were declared in (Band: low,
    then high), a non-native one (VARCHAR) as text. `{"band": {"<": "high"}}` failed on the
    replica with a raw ProgrammingError (`collations are not supported by type ...`: the
    statement compared it COLLATE "C", as text), and buffered records were tested as text."""
    buf = TransactionBuffer(settings=forms)
    with buf.transaction() as tx:
        ids = [tx.create("Graded", {"band": band, "plain": band})["id"] for band in ("low", "high")]
    filters = [{"band": {"<": "high"}}, {"band": {">": "low"}}, {"band": {">=": "low", "<=": "high"}},
               {"band": {"!=": "low"}}, {"band": ["high"]}, {"plain": {"<": "low"}}]

    def read() -> dict:
        return {str(f): sorted(ids.index(r["id"]) for r in buf.search("Graded", {"id": ids, **f})) for f in filters}

    buffered = read()
    drain_until_empty(forms)
    replicated = read()
    assert buffered == replicated == {str(f): found for f, found in zip(filters, ([0], [1], [0, 1], [1], [1], [1]))}
    buf.close()


def test_a_wide_numeric_key_is_taken_as_main_takes_it(forms):
    """Found by review: a NUMERIC(38, 10) key of 1e20 (within the column's 28 digits before the
    point) was rounded to its scale in decimal's default 28-digit context, which needs 31 here:
    the create raised a bare decimal.InvalidOperation, not buffered, though main stores it."""
    buf = TransactionBuffer(settings=forms)
    # (rows stay from test to test: a fresh key, a float whose shortest text is its exact value)
    key = float(10**20 + uuid.uuid4().int % 10**4 * 256 * 10**6)
    with buf.transaction() as tx:
        assert tx.create("WideNumbered", {"key": key, "note": "wide"})["key"] == key
    buffered = buf.get("WideNumbered", key)
    drain_until_empty(forms)
    assert buffered == buf.get("WideNumbered", key) == {"key": key, "note": "wide"}
    buf.close()


def test_a_numeric_key_names_its_record_the_same_buffered_and_replicated(forms):
    """A NUMERIC key given as an integer (5), or with more places than the column keeps
    (1.234): the buffered record was filed under "5" and "1.234", the replica's row under
    "5.0" and "1.23". Once replicated, get(5) and get(1.234) said None, an update of either was
    refused as unknown, and a search whose filter an update of such a row sets raised a bare
    ValueError ('5.0' is not a number)."""
    buf = TransactionBuffer(settings=forms)
    base = uuid.uuid4().int % 10**6 * 10  # (rows stay from test to test: a fresh key each time)
    keys, note = (base, base + 1.234), f"n{base}"
    with buf.transaction() as tx:
        made = [tx.create("Numbered", {"key": key, "note": note})["key"] for key in keys]
    expected = [{"key": float(base), "note": note}, {"key": base + 1.23, "note": note}]

    def read(note: str) -> tuple[list, list]:
        return [buf.get("Numbered", key) for key in keys], buf.search("Numbered", {"note": note})

    def from_filter() -> list:  # a key's filter value is rounded as the key is (README, Read)
        return [r["key"] for r in buf.search("Numbered", {"note": note, "key": {">=": base + 1.234}})]

    buffered, buffered_found = read(note), from_filter()
    drain_until_empty(forms)
    assert buffered == read(note) == ([{**row, "note": note} for row in expected], expected)
    assert buffered_found == from_filter() == [base + 1.23]
    assert made == [row["key"] for row in expected]
    for key in keys:  # overlays on the replicated rows
        buf.update("Numbered", key, {"note": note + "+"})
    assert read(note + "+") == ([{**row, "note": note + "+"} for row in expected],) * 2
    assert buf.search("Numbered", {"note": note}) == []
    drain_until_empty(forms)
    assert read(note + "+") == ([{**row, "note": note + "+"} for row in expected],) * 2
    buf.close()


def test_a_numeric_key_that_rounds_to_minus_zero_names_its_record_the_same_buffered_and_replicated(
        forms, main_engine, replica_engine):
    """Found by review: a NUMERIC(10, 2) key of -0.001 rounds to -0.00, which PostgreSQL's
    numeric keeps as 0.00 (it has no negative zero). The key was taken as the float -0.0, so
    the buffered record was filed under "-0.0" and the replica's row under "0.0": once replayed
    and before the cleanup a search showed the row twice; once cleaned, get(-0.001) said None
    and an update of it was refused as "neither buffered nor on the replica"."""
    with main_engine.begin() as conn:  # (rows stay from test to test: this key is always 0)
        conn.execute(sa.text("DELETE FROM read_forms_numbered WHERE key = 0"))
    wait_for_replica(main_engine, replica_engine)
    buf = TransactionBuffer(settings=forms)
    note = f"z{uuid.uuid4().hex[:8]}"
    with buf.transaction() as tx:
        tx.create("Numbered", {"key": -0.001, "note": note})
    expected = {"key": 0.0, "note": note}

    def read(note: str) -> tuple[list, list]:
        return [buf.get("Numbered", key) for key in (-0.001, 0)], buf.search("Numbered", {"note": note})

    assert read(note) == ([expected, expected], [expected])
    _drain_unclean(forms, main_engine, replica_engine)
    assert read(note) == ([expected, expected], [expected])  # replayed, still buffered
    drain_until_empty(forms)
    assert read(note) == ([expected, expected], [expected])  # cleaned
    buf.update("Numbered", -0.001, {"note": note + "+"})
    drain_until_empty(forms)
    assert read(note + "+") == ([{**expected, "note": note + "+"}] * 2, [{**expected, "note": note + "+"}])
    assert str(buf.get("Numbered", 0)["key"]) == "0.0"
    buf.close()


COARSE = [("2025-01-01T00:00:00.6Z", "12:00:00.6", "PT1.6S"),
          ("1999-12-31T23:59:59.5Z", "23:59:59.6", "P-1DT23H59M59.5S"),  # (before PostgreSQL's epoch: down)
          ("2000-01-01T00:00:00.5Z", "00:00:00.4", "P1DT23H59M59.5S")]


def test_timestamp_time_and_interval_of_a_precision_read_and_filter_the_same_buffered_and_replicated(forms):
    """TIMESTAMP(0), TIME(0) and INTERVAL(0) keep whole seconds, rounded half away from zero:
    buffered, a record read 00:00:00.6 and {"at": "...00:00:01Z"} missed it; replicated, it
    read 00:00:01 and that filter found it. A TIME(0)'s 23:59:59.6 is 24:00:00, after every
    other time, though psycopg2 reads it 00:00:00."""
    buf = TransactionBuffer(settings=forms)
    with buf.transaction() as tx:
        ids = [tx.create("Coarse", {"at": at, "of_day": of_day, "span": span})["id"] for at, of_day, span in COARSE]
    filters = [{"at": "2025-01-01T00:00:01Z"}, {"at": "2025-01-01T00:00:00.6Z"}, {"at": {">": "2025-01-01T00:00:00.7Z"}},
               {"at": ["1999-12-31T23:59:59Z", "2000-01-01T00:00:01Z"]}, {"of_day": "12:00:01"},
               {"of_day": {"<": "00:00:00.1"}}, {"of_day": "00:00:00"}, {"of_day": {">": "23:59:59"}},
               {"span": "PT2S"}, {"span": {">=": "P2D"}}, {"span": "PT0S"}, {"span": {">": "PT1.6S"}}]
    buffered = _rows_and_matches(buf, "Coarse", ids, filters)
    drain_until_empty(forms)
    replicated = _rows_and_matches(buf, "Coarse", ids, filters)
    assert buffered == replicated, (buffered, replicated)
    assert replicated[0] == [{"at": "2025-01-01T00:00:01+00:00", "of_day": "12:00:01", "span": "PT2S"},
                             {"at": "1999-12-31T23:59:59+00:00", "of_day": "00:00:00", "span": "PT0S"},
                             {"at": "2000-01-01T00:00:01+00:00", "of_day": "00:00:00", "span": "P2D"}]
    buf.close()


def test_an_interval_of_fields_reads_and_filters_the_same_buffered_and_replicated(forms, main_engine):
    """An INTERVAL of fields keeps only those, as PostgreSQL stores it: P1DT5H7M8.5S is P1D in
    an INTERVAL DAY, P1DT5H7M in an INTERVAL HOUR TO MINUTE, nothing (PT0S) in an INTERVAL
    YEAR. Ingest took the value as given: buffered, the record read P1DT5H7M8.5S and
    {"days": "P1D"} missed it; replicated, it read P1D and that filter found it."""
    buf = TransactionBuffer(settings=forms)
    given = [dt.timedelta(days=1, hours=5, minutes=7, seconds=8.5), "P-1DT23H59M59S"]
    with buf.transaction() as tx:
        ids = [tx.create("Fielded", {"days": v, "minutes": v, "years": v, "hours": [v, None]})["id"] for v in given]
    filters = [{"days": "P1D"}, {"days": "P-1D"}, {"minutes": "P1DT5H7M"}, {"minutes": {">": "P-1DT23H59M"}},
               {"years": "PT0S"}, {"days": {">=": "P1DT1S"}}]
    buffered = _rows_and_matches(buf, "Fielded", ids, filters)
    drain_until_empty(forms)
    replicated = _rows_and_matches(buf, "Fielded", ids, filters)
    assert buffered == replicated, (buffered, replicated)
    assert replicated[0] == [{"days": "P1D", "minutes": "P1DT5H7M", "years": "PT0S", "hours": ["P1DT5H", None]},
                             {"days": "P-1D", "minutes": "P-1DT23H59M", "years": "PT0S", "hours": ["P-1DT23H", None]}]
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT days, minutes FROM read_forms_fielded WHERE id = :i"),
                            {"i": ids[0]}).one() == (dt.timedelta(days=1), dt.timedelta(days=1, hours=5, minutes=7))
    buf.close()


def _drain_unclean(settings, main_engine, replica_engine) -> None:
    """One drain step applied on main while the replica did not replay it (its caches kept),
    then the replica let replay it: the row is on the replica and still buffered, as between a
    drain's replay and its cleanup."""
    with replay_paused(replica_engine):
        drain_one_batch(settings, replication_timeout_s=0.3)
    wait_for_replica(main_engine, replica_engine)


def _fresh_seconds() -> int:
    """(rows stay from test to test: a fresh key each time, within one day)"""
    return uuid.uuid4().int % 80_000 + 1_000


@pytest.mark.parametrize("model, given, stored", [
    ("Stamped", lambda s: f"{dt.datetime(2025, 1, 1) + dt.timedelta(seconds=s)}.6Z",
     lambda s: (dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=s + 1)).isoformat()),
    ("Clocked", lambda s: f"{dt.time(s // 3600, s // 60 % 60, s % 60)}.456789",
     lambda s: dt.time(s // 3600, s // 60 % 60, s % 60, 460_000).isoformat()),
    ("Spanned", lambda s: f"PT{s}.6S", lambda s: interval_text(dt.timedelta(seconds=s + 1)))])
def test_a_key_of_a_precision_names_its_record_the_same_buffered_and_replicated(forms, main_engine, replica_engine,
                                                                               model, given, stored):
    """A TIMESTAMP(0) key given as 00:00:00.6, a TIME(2) key as 12:00:00.456789, an INTERVAL(0)
    key as PT1.6S: main keeps 00:00:01, 12:00:00.46 and PT2S, and the replica's row was filed under that text, the buffered
    record under the key as given. Once replayed and before the cleanup, a search showed the
    row twice; once cleaned, get(key as given) said None and an update of it was refused as
    unknown. The key is now taken as main stores it, as a NUMERIC key is."""
    buf = TransactionBuffer(settings=forms)
    seconds = _fresh_seconds()
    key, pk, note = given(seconds), "at", f"n{seconds}-{uuid.uuid4().hex[:6]}"
    with buf.transaction() as tx:
        made = tx.create(model, {pk: key, "note": note})
    expected = {pk: stored(seconds), "note": note}

    def read(note: str) -> tuple:
        return buf.get(model, key), buf.search(model, {"note": note})

    assert read(note) == (expected, [expected])
    _drain_unclean(forms, main_engine, replica_engine)
    assert read(note) == (expected, [expected])  # replayed, still buffered
    drain_until_empty(forms)
    assert read(note) == (expected, [expected])  # cleaned
    buf.update(model, key, {"note": note + "+"})
    assert read(note + "+") == ({**expected, "note": note + "+"}, [{**expected, "note": note + "+"}])
    drain_until_empty(forms)
    assert read(note + "+") == ({**expected, "note": note + "+"}, [{**expected, "note": note + "+"}])
    assert made == expected  # what the create gave back names the row too
    buf.close()


def test_an_update_or_delete_of_a_real_keyed_row_reaches_it_on_main(forms, main_engine, redis_client):
    """A producer's update and delete of rows whose REAL keys are 0.1 past an integer (as the
    rows read). The drain's statements bound the key as a numeric, which PostgreSQL compares with
    the row's real as doubles: the update passed the check that its row exists (which casts the
    keys to REAL), changed nothing and was reported applied; the delete deleted nothing."""
    import json

    buf = TransactionBuffer(settings=forms)
    base = uuid.uuid4().int % 10**5 * 2  # (rows stay from test to test: fresh keys)
    kept, gone = base + 0.1, base + 1.1
    with buf.transaction() as tx:
        tx.bulk_create("RealKeyed", [{"key": kept, "note": "a"}, {"key": gone, "note": "a"}])
    drain_until_empty(forms)
    for tx_id, step in ((str(uuid.uuid4()), {"operation": "update", "data": {"note": "b"}, "conditions": {"key": kept}}),
                        (str(uuid.uuid4()), {"operation": "delete", "conditions": {"key": gone}})):
        redis_client.lpush(f"site:{forms.site}:transaction_buffer", json.dumps(
            {"transaction_id": tx_id, "steps": [{"step_id": "s", "model_class": "RealKeyed", **step}]}))
    drain_until_empty(forms)
    assert not redis_client.llen(f"site:{forms.site}:failed_transactions")
    with main_engine.connect() as conn:
        on_main = conn.execute(sa.text("SELECT key, note FROM read_forms_real_keyed "
                                       "WHERE key IN (CAST(:k AS REAL), CAST(:g AS REAL))"), {"k": kept, "g": gone}).all()
    assert [(round(k, 4), note) for k, note in on_main] == [(kept, "b")]
    buf.close()


def test_a_real_key_names_its_record_the_same_buffered_and_replicated(forms, main_engine, replica_engine):
    """REAL keys given as 0.123456789 past an integer (main keeps about 7 digits: the row reads
    0.1234568 past it) and 0.1 past one (it reads so, but is 0.10000000149011612 past it): the
    buffered record was filed under the key as given, the replica's row under what it reads.
    Once replayed and before the cleanup, a search showed the first row twice; once cleaned,
    get(key) said None for both (the statement bound the key as a numeric, compared as doubles),
    and an update of either was refused as unknown."""
    buf = TransactionBuffer(settings=forms)
    base = uuid.uuid4().int % 10**3 * 2  # (rows stay from test to test: fresh keys, 7 digits in all)
    keys, note = (base + 0.123456789, base + 1.1), f"r{base}-{uuid.uuid4().hex[:6]}"
    with buf.transaction() as tx:
        made = [tx.create("RealKeyed", {"key": key, "note": note})["key"] for key in keys]
    stored = [single_float(key) for key in keys]

    def read(note: str) -> tuple[list, list]:
        return ([buf.get("RealKeyed", key) for key in keys],
                sorted(buf.search("RealKeyed", {"note": note}), key=lambda row: row["key"]))

    def expected(note: str) -> tuple[list, list]:
        rows = [{"key": key, "note": note} for key in stored]
        return rows, rows

    assert read(note) == expected(note)
    _drain_unclean(forms, main_engine, replica_engine)
    assert read(note) == expected(note)  # replayed, still buffered
    drain_until_empty(forms)
    assert read(note) == expected(note)  # cleaned
    for key in keys:
        buf.update("RealKeyed", key, {"note": note + "+"})
    assert read(note + "+") == expected(note + "+")
    drain_until_empty(forms)
    assert read(note + "+") == expected(note + "+")
    assert made == stored and stored[0] != keys[0]
    buf.close()


def test_caches_filed_under_a_key_form_of_an_earlier_version_are_cleaned(forms, redis_client, monkeypatch):
    """A NUMERIC key buffered by ingest before d3f75e5 was filed under its text as given ("5");
    the drain, checking the transaction now, names the key 5.0 and cleaned the caches under
    "5.0" only: those under "5" stayed for good, and a search returned the row twice, its stale
    buffered values too after a later update. The cleanup now also names the key as pushed."""
    buf = TransactionBuffer(settings=forms)
    key, note = uuid.uuid4().int % 10**6 * 10, f"old{uuid.uuid4().hex[:6]}"
    # ingest as it was: the key's check without the key's rounding (column_values.float_key)
    monkeypatch.setitem(buf.registry.model("Numbered").converters, "key", numeric_of(10, 2))
    with buf.transaction() as tx:
        tx.create("Numbered", {"key": key, "note": note})
    monkeypatch.undo()
    legacy = [f"site:{forms.site}:{kind}:Numbered:{key}" for kind in ("buffered", "cache:ids", "read_buffer")]
    assert all(redis_client.exists(k) for k in legacy)  # filed under "5", not "5.0"
    drain_until_empty(forms)
    assert [k for k in legacy if redis_client.exists(k)] == []
    assert not {str(key)} & {m.decode() for m in redis_client.smembers(f"site:{forms.site}:index:Numbered")}
    assert buf.search("Numbered", {"note": note}) == [{"key": float(key), "note": note}]
    buf.update("Numbered", key, {"note": note + "+"})
    drain_until_empty(forms)
    assert buf.search("Numbered", {"note": note}) == []
    assert buf.search("Numbered", {"note": note + "+"}) == [{"key": float(key), "note": note + "+"}]
    buf.close()


# The stack's databases are of the C locale: lower(), and so CITEXT, folds A-Z alone
CITEXT_FILTERS = [{"tag": "ABC"}, {"tag": "abc"}, {"tag": ["aBC", "x"]}, {"tag": {"!=": "ABC"}},
                  {"tag": {"<": "ABD"}}, {"tag": {">=": "ABC", "<=": "abc"}}, {"tag": {">": "["}},
                  {"tag": {"<": "a_"}}, {"tag": "ÀBC"}, {"tag": "àBC"}]


def test_citext_compares_without_case_buffered_as_replicated(forms):
    """CITEXT compares text lower-cased as the database's lower() does ('ABC' = 'abc'; by code
    point under COLLATE "C", which ordering filters use): the replica found 'Abc' by "ABC",
    a buffered record was compared as given and was not, and `{">": "["}` found it only
    while buffered. Under the C locale only A-Z are lower-cased: "ÀBC" finds 'àbc' in
    neither state, "àBC" in both."""
    buf = TransactionBuffer(settings=forms)
    with buf.transaction() as tx:
        ids = [row["id"] for row in tx.bulk_create("Lettered", [{"tag": "Abc"}, {"tag": "àbc"}])]

    def found() -> dict:
        return {str(f): sorted(ids.index(r["id"]) for r in buf.search("Lettered", {"id": ids, **f}))
                for f in CITEXT_FILTERS}
    buffered = found()
    drain_until_empty(forms)
    replicated = found()
    assert buffered == replicated, (buffered, replicated)
    assert replicated[str({"tag": "ABC"})] == [0] and replicated[str({"tag": {">": "["}})] == [0, 1]
    assert replicated[str({"tag": "ÀBC"})] == [] and replicated[str({"tag": "àBC"})] == [1]
    assert [buf.get("Lettered", rid)["tag"] for rid in ids] == ["Abc", "àbc"]  # kept as given
    buf.close()


def test_a_citext_key_names_its_record_in_any_case_buffered_as_replicated(forms, redis_client):
    """Main takes 'ABC' for the row of a CITEXT key 'abc'. get("ABC") said None, buffered and
    replicated; a create of "ABC" was taken (and main refused it later, the transaction
    dead-lettered), and so were two creates of one key in two cases in one block; an update by
    "ABC" was refused as of no record. Now the key names its record in any case, buffered as
    on main: get finds it, a create is refused at once, and an update is filed under the
    record's own key, where reads merge it while it is buffered."""
    buf = TransactionBuffer(settings=forms)
    key = f"Key{uuid.uuid4().hex[:8]}"
    with buf.transaction() as tx:
        tx.create("Handled", {"name": key})
    twice = rf"^Handled {key}X is created twice in this transaction$"
    with pytest.raises(InvalidTransaction, match=twice):
        with buf.transaction() as tx:
            tx.create("Handled", {"name": key + "x"})
            tx.create("Handled", {"name": key + "X"})
    buf.update("Handled", key.upper(), {"note": "seen"})

    def reads() -> list:
        with pytest.raises(InvalidTransaction, match=rf"^Handled {key.lower()} exists already"):
            with buf.transaction() as again:
                again.create("Handled", {"name": key.lower()})
        return [buf.get("Handled", k) for k in (key, key.upper(), key.lower())]
    buffered = reads()
    drain_until_empty(forms)
    replicated = reads()
    assert buffered == replicated == [{"name": key, "note": "seen"}] * 3, (buffered, replicated)
    assert buf.get("Handled", key + "x") is None
    with buf.transaction() as tx:  # the key deleted, and created again in another case
        tx.delete("Handled", key.lower())
        tx.create("Handled", {"name": key.upper(), "note": "again"})
    buffered = [buf.get("Handled", k) for k in (key, key.upper())]
    drain_until_empty(forms)
    replicated = [buf.get("Handled", k) for k in (key, key.upper())]
    again = {"name": key.upper(), "note": "again"}
    assert buffered == replicated == [again, again], (buffered, replicated)
    assert buf.status(tx.transaction_id) == "replicated"
    assert not redis_client.llen(f"site:{forms.site}:failed_transactions")
    buf.close()


@pytest.mark.parametrize("case", ["lower", "given"])
def test_a_citext_foreign_key_in_another_case_holds_the_child_behind_its_failed_parent(forms, redis_client, case):
    """A child whose CITEXT foreign key names a buffered parent's key in another case ('abc'
    for 'ABC') depends on it as with the key in its own case: the parent dead-lettered (main
    refuses its label, taken), the child is dead-lettered as blocked by it. It was named by
    the key as given, so no dependency: the child went to main alone and failed there on its
    own (or applied, against a row of that key in another case)."""
    buf = TransactionBuffer(settings=forms)
    key, label = f"Par{uuid.uuid4().hex[:8]}", f"label {uuid.uuid4().hex}"
    with buf.transaction() as taken:
        taken.create("Titled", {"name": key + "t", "label": label})
    drain_until_empty(forms)
    with buf.transaction() as parent:
        parent.create("Titled", {"name": key, "label": label})  # main refuses: the label is taken
    with buf.transaction() as child:
        child.create("Subtitled", {"titled_name": key.lower() if case == "lower" else key})
    drain_until_settled(forms, retry_base_s=0.05)
    failed = {f["transaction_id"]: f["failure"]["reason"]
              for f in map(json.loads, redis_client.lrange(SiteKeys(forms.site).failed, 0, -1))}
    assert "UniqueViolation" in failed[parent.transaction_id]
    assert failed.get(child.transaction_id) == f"blocked by {parent.transaction_id}", failed.get(child.transaction_id)
    with buf.transaction() as both:  # in one block too: the child's step depends on the parent's
        both.create("Titled", {"name": key + "B"})
        both.create("Subtitled", {"titled_name": key.lower() + "b" if case == "lower" else key + "B"})
    assert [step.dependencies for step in both._tx.steps] == [[], ["step1"]]
    buf.close()


def test_an_update_of_a_citext_row_deleted_earlier_in_the_batch_by_another_case_is_refused(
        forms, redis_client, main_engine):
    """A producer deletes the row 'key', the next transaction of the batch updates 'KEY' (main's
    one row). Folded per row by the key's text, they were two rows: the update went before the
    delete (a table's deletes go last), found the row and was reported applied, though main
    refuses it in their order (no row to update)."""
    buf = TransactionBuffer(settings=forms)
    key = f"key{uuid.uuid4().hex[:8]}"
    with buf.transaction() as tx:
        tx.create("Handled", {"name": key})
    drain_until_empty(forms)
    keys = SiteKeys(forms.site)
    for tx_id, step in [("delete", {"operation": "delete", "conditions": {"name": key}}),
                        ("update-deleted", {"operation": "update", "conditions": {"name": key.upper()},
                                            "data": {"note": "gone"}})]:
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": f"{tx_id}-{key}", "steps": [
            {"step_id": "s1", "model_class": "Handled", "data": {}, **step}]}))
    drain_until_settled(forms, retry_base_s=0.05)
    failed = {f["transaction_id"]: f["failure"]["reason"]
              for f in map(json.loads, redis_client.lrange(keys.failed, 0, -1))}
    assert failed == {f"update-deleted-{key}": f"no read_forms_handled row {key.upper()} to update"}, failed
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM read_forms_handled WHERE name = :k"),
                            {"k": key}).scalar_one() == 0
    buf.close()


@pytest.fixture
def unicode_forms(forms, main_engine, replica_engine):
    """`forms` in a database of another locale than the stack's C: PostgreSQL's builtin
    C.UTF-8, whose lower() folds every letter (as a libc locale's does), made once a session."""
    database = "read_forms_unicode"
    with main_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        made = sa.text("SELECT 1 FROM pg_database WHERE datname = :d")
        if conn.execute(made, {"d": database}).scalar() is None:
            conn.execute(sa.text(f"CREATE DATABASE {database} TEMPLATE template0 ENCODING 'UTF8' "
                                 "LOCALE_PROVIDER builtin BUILTIN_LOCALE 'C.UTF-8'"))
    urls = {name: sa.make_url(getattr(forms, name)).set(database=database)
            .render_as_string(hide_password=False) for name in ("main_db_url", "replica_db_url")}
    engine = sa.create_engine(urls["main_db_url"])
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS citext"))
        create_schema(engine, ModelRegistry.from_path(MODELS))
    finally:
        engine.dispose()
    wait_for_replica(main_engine, replica_engine)  # (one WAL for every database of the cluster)
    return dataclasses.replace(forms, **urls)


UNICODE_CITEXT_FILTERS = [{"tag": "ÉMILE"}, {"tag": "istanbul"}, {"tag": "οδοσ"},
                          {"tag": ["İSTANBUL", "ΟΔΟΣ"]}, {"tag": {"<": "éz"}}, {"tag": "i̇stanbul"}]


def test_citext_folds_every_letter_where_the_database_does(unicode_forms):
    """Where lower() folds every letter (a database of another locale than C), CITEXT does too,
    one letter at a time: 'Émile' = 'ÉMILE', 'İstanbul' = 'istanbul', 'ΟΔΟΣ' = 'οδοσ'; buffered
    records are compared alike (Python's str.lower() would make İ two letters, and a last Σ ς)."""
    buf = TransactionBuffer(settings=unicode_forms)
    with buf.transaction() as tx:
        rows = tx.bulk_create("Lettered", [{"tag": tag} for tag in ("Émile", "İstanbul", "ΟΔΟΣ")])
    ids = [row["id"] for row in rows]

    def found() -> dict:
        return {str(f): sorted(ids.index(r["id"]) for r in buf.search("Lettered", {"id": ids, **f}))
                for f in UNICODE_CITEXT_FILTERS}
    buffered = found()
    drain_until_empty(unicode_forms)
    replicated = found()
    assert buffered == replicated, (buffered, replicated)
    assert list(replicated.values()) == [[0], [1], [2], [1, 2], [0, 1], []]
    buf.close()


@pytest.mark.parametrize("given, stored", [
    (lambda a, b: f"10.{a}.{b}.3/32", lambda a, b: f"10.{a}.{b}.3"),
    (lambda a, b: f"2001:0DB8:{a:x}:{b:x}:0:0:0:1/128", lambda a, b: f"2001:db8:{a:x}:{b:x}::1"),
    (lambda a, b: f"::FFFF:10.{a}.{b}.4", lambda a, b: f"::ffff:10.{a}.{b}.4")])
def test_an_inet_key_and_network_values_read_as_main_writes_them(forms, main_engine, replica_engine, given, stored):
    """INET and CIDR values are kept by main as addresses and read back in PostgreSQL's own
    text: 10.0.0.3/32 as 10.0.0.3, upper-case or zero-padded IPv6 in lower case with its
    longest run of zeros as ::. They were buffered as given: an INET key's record was filed
    under the given text and the replica's row under main's, so get and an update by main's
    text said None / refused the key while buffered, a search showed the row twice once
    replayed and before the cleanup, and get of the key as given said None once cleaned; a
    CIDR or INET[] value read one way buffered and another replicated, and a filter by main's
    text missed the buffered record. They are now taken as main writes them."""
    buf = TransactionBuffer(settings=forms)
    # Fresh keys (rows stay from test to test), never 0: a zero group would join the run main
    # writes as :: (2001:db8:38:0::1 is 2001:db8:38::1), which the texts below spell by hand.
    a, b = 1 + uuid.uuid4().int % 250, 1 + uuid.uuid4().int % 250
    key, note = given(a, b), f"a{a}.{b}-{uuid.uuid4().hex[:6]}"
    net, seen = f"2001:DB8:{a:X}::/48", ["10.0.0.1/32", "::FFFF:1.2.3.4", None]
    with buf.transaction() as tx:
        made = tx.create("Addressed", {"address": key, "net": net, "seen": seen, "note": note})
    expected = {"address": stored(a, b), "net": f"2001:db8:{a:x}::/48", "seen": ["10.0.0.1", "::ffff:1.2.3.4", None],
                "note": note}

    def read(note: str) -> tuple:
        return (buf.get("Addressed", key), buf.get("Addressed", stored(a, b)), buf.search("Addressed", {"note": note}),
                buf.search("Addressed", {"address": [key], "net": net}))

    def wanted(note: str) -> tuple:
        row = {**expected, "note": note}
        return row, row, [row], [row]

    assert read(note) == wanted(note)
    _drain_unclean(forms, main_engine, replica_engine)
    assert read(note) == wanted(note)  # replayed, still buffered
    drain_until_empty(forms)
    assert read(note) == wanted(note)  # cleaned
    buf.update("Addressed", stored(a, b), {"note": note + "+"})
    assert read(note + "+") == wanted(note + "+")
    drain_until_empty(forms)
    assert read(note + "+") == wanted(note + "+")
    assert made == expected  # what the create gave back names the row too
    buf.close()


def _address_spellings(count: int) -> list[str]:
    """Ways a script may write addresses: IPv4, IPv6 with runs of zero groups (compressed or
    not, zero-padded, in either case), IPv4 inside IPv6, with and without mask lengths (some
    zero-padded, some setting bits right of the mask, some beyond the address)."""
    import ipaddress
    import random

    pick = random.Random(20261205)
    out = []
    for _ in range(count):
        if pick.random() < 0.3:
            address = ipaddress.IPv4Address(bytes(pick.choice((0, 1, 10, 255, pick.randrange(256))) for _ in range(4)))
            text = str(address)
        else:
            words = [0 if pick.random() < 0.55 else pick.choice((1, 0xFFFF, pick.randrange(1 << 16))) for _ in range(8)]
            if pick.random() < 0.2:
                words[:6] = [0, 0, 0, 0, 0, pick.choice((0, 0xFFFF))]
            address = ipaddress.IPv6Address(b"".join(word.to_bytes(2, "big") for word in words))
            text = pick.choice((str(address), address.exploded,
                                ":".join(f"{word:x}" for word in words)))
            if pick.random() < 0.2 and words[:5] == [0] * 5 and words[5] in (0, 0xFFFF):
                text = ("::ffff:" if words[5] else "::") + str(ipaddress.IPv4Address(address.packed[12:]))
            text = "".join(c.upper() if pick.random() < 0.5 else c for c in text)
        if pick.random() < 0.6:
            bits = pick.randrange(address.max_prefixlen + 2)
            text += pick.choice((f"/{bits}", f"/0{bits}"))
        out.append(text)
    return out


def _mac_spellings(count: int) -> list[str]:
    """MAC addresses in macaddr's documented forms, in either case, and some in forms it refuses
    (separators mixed)."""
    import random

    pick = random.Random(20261205)
    out = []
    for _ in range(count):
        octets = bytes(pick.randrange(256) for _ in range(6)).hex()
        digits = "".join(c.upper() if pick.random() < 0.5 else c for c in octets)
        pairs, quads = [digits[i:i + 2] for i in range(0, 12, 2)], [digits[i:i + 4] for i in range(0, 12, 4)]
        out.append(pick.choice((":".join(pairs), "-".join(pairs), f"{digits[:6]}:{digits[6:]}",
                                f"{digits[:6]}-{digits[6:]}", ".".join(quads), "-".join(quads), digits,
                                ":".join(pairs[:3]) + "-" + ":".join(pairs[3:]), f"{quads[0]}.{quads[1]}-{quads[2]}")))
    return out


@pytest.mark.parametrize("types, spellings", [(("inet", "cidr"), _address_spellings(2000)),
                                              (("macaddr",), _mac_spellings(500))])
def test_network_text_is_taken_as_main_writes_it(replica_engine, types, spellings):
    """What ingest files an INET, CIDR or MACADDR value under (column_values.network_text) is
    the text PostgreSQL writes the value back in, for thousands of spellings; one PostgreSQL
    refuses is refused (test_a_network_spelling_is_taken_as_main_writes_it_or_refused_as_main_refuses_it
    holds the stricter check), never made into another."""
    from obs_pipeline.network_input import network_text

    columns = ", ".join(f"CASE WHEN pg_input_is_valid(v, '{t}') THEN CAST(v AS {t}) END" for t in types)
    query = sa.text(f"SELECT {columns} FROM unnest(CAST(:spellings AS text[])) WITH ORDINALITY AS s(v, n) ORDER BY n")
    with replica_engine.connect() as conn:
        written = conn.execute(query, {"spellings": spellings}).all()
    def taken(text: str, type_: str) -> str | None:  # None: refused, as main refuses it (a CIDR's host bits)
        try:
            return network_text(text, type_)
        except ValueError:
            return None

    wrong = [(text, type_, main, taken(text, type_)) for text, row in zip(spellings, written)
             for type_, main in zip(types, row) if taken(text, type_) != (main or text) and
             not (taken(text, type_) is None and main is None)]
    assert wrong == []
    for column in range(len(types)):  # most spellings are taken, and written otherwise than given
        assert sum(row[column] is not None and row[column] != text for text, row in zip(spellings, written)) > 300


def test_a_cidr_with_bits_set_right_of_its_mask_is_refused_at_ingest_in_one_line(forms, redis_client, replica_engine):
    """A CIDR names a network: main refuses 10.0.0.3/24 ("Value has bits set to right of mask"),
    so the transaction was buffered, and dead-lettered by the drain hours later. Ingest now
    refuses it in one line, naming the network meant, and buffers nothing; the spellings
    PostgreSQL takes (10.0.0.0/24) are taken."""
    from obs_pipeline.network_input import network_text

    spellings = _address_spellings(2000)
    with replica_engine.connect() as conn:
        valid = conn.execute(sa.text("SELECT pg_input_is_valid(v, 'cidr') FROM unnest(CAST(:s AS text[])) "
                                     "WITH ORDINALITY AS s(v, n) ORDER BY n"), {"s": spellings}).scalars().all()
    refused = []
    for text, ok in zip(spellings, valid):
        try:
            network_text(text, "cidr")
        except ValueError as error:
            refused.append((text, ok, str(error)))
    assert refused and not [r for r in refused if r[1]]  # only what PostgreSQL refuses too
    assert len(refused) > 100, len(refused)
    buf = TransactionBuffer(settings=forms)
    keys = SiteKeys(forms.site)
    before = redis_client.llen(keys.buffer)
    with pytest.raises(InvalidTransaction) as error:
        with buf.transaction() as tx:
            tx.create("Addressed", {"address": f"10.9.{uuid.uuid4().int % 250}.7", "net": "10.1.2.3/24"})
    assert str(error.value) == ("create of Addressed: Addressed.net: '10.1.2.3/24' has bits set right of its mask: "
                                "a CIDR names a network, such as '10.1.2.0/24'"), str(error.value)
    assert redis_client.llen(keys.buffer) == before
    buf.close()



@pytest.mark.parametrize("row, said", [
    ({"net": 167772160}, "Addressed.net: 167772160 is not an address PostgreSQL's cidr takes (e.g. 10.0.0.0/8, 10/8 "
                         "or 2001:db8::/32)"),
    ({"note": "x", "seen": [{"ip": "10.0.0.1"}]},
     "Addressed.seen: {'ip': '10.0.0.1'} is not an address PostgreSQL's inet takes (e.g. 192.168.0.1, 10.0.0.0/8 "
     "or 2001:db8::1/64)"),
    ({"net": ["10.1.2.0/24"]}, "Addressed.net: ['10.1.2.0/24'] is not an address PostgreSQL's cidr takes (e.g. "
                               "10.0.0.0/8, 10/8 or 2001:db8::/32)"),
])
def test_a_network_value_that_is_not_text_is_refused_at_ingest_in_one_line(forms, redis_client, row, said):
    """An INET, CIDR or MACADDR value is text: a number, an object or a list (for one address)
    was buffered as it was, and main refused it hours later, dead-lettering the transaction.
    Ingest now refuses it in one line and buffers nothing."""
    buf = TransactionBuffer(settings=forms)
    keys = SiteKeys(forms.site)
    before = redis_client.llen(keys.buffer)
    with pytest.raises(InvalidTransaction) as error:
        with buf.transaction() as tx:
            tx.create("Addressed", {"address": f"10.8.{uuid.uuid4().int % 250}.7", **row})
    assert str(error.value) == f"create of Addressed: {said}", str(error.value)
    assert redis_client.llen(keys.buffer) == before
    with pytest.raises(InvalidTransaction, match=r"^create of Carded: Carded.mac: 8 is not a MAC address PostgreSQL's macaddr takes"):
        with buf.transaction() as tx:
            tx.create("Carded", {"mac": 8})
    assert redis_client.llen(keys.buffer) == before
    buf.close()

def _shorthand_spellings(count: int) -> list[str]:
    """PostgreSQL's own IPv4 shorthands (10/8, 10.1/16, a CIDR's classful 10 or 192.168, octets
    with leading zeros 010.0.0.1, a trailing dot, a CIDR in hex 0x0a01/16) and near misses; IPv6
    near misses (a zone, five hex digits, ::1.2.3 or 1..2 in its IPv4 part, /064, /129, two ::)."""
    import random

    pick = random.Random(20261206)
    out = []
    for _ in range(count):
        if pick.random() < 0.6:
            octets = [pick.choice((0, 1, 10, 127, 128, 192, 224, 240, 255, 256, pick.randrange(256)))
                      for _ in range(pick.choice((1, 1, 2, 3, 4, 4, 5)))]
            parts = [pick.choice((str(o), f"0{o}", f"00{o}")) if pick.random() < 0.2 else str(o) for o in octets]
            text = ".".join(parts)
            if pick.random() < 0.1:
                text = "0x" + "".join(f"{o % 256:02x}" for o in octets)[:pick.randrange(1, 9)]
                text = "".join(c.upper() if pick.random() < 0.5 else c for c in text)
            if pick.random() < 0.05:
                text += "."
            if pick.random() < 0.7:
                bits = pick.choice((0, 4, 7, 8, 9, 12, 16, 20, 24, 28, 31, 32, 33, pick.randrange(40)))
                text += pick.choice((f"/{bits}", f"/{bits}", f"/0{bits}", "/", f"/ {bits}"))
            if pick.random() < 0.03:
                text = pick.choice((" ", "")) + text + pick.choice((" ", "x", ""))
        else:
            words = [f"{pick.choice((0, 1, 0xFFFF, pick.randrange(1 << 16))):x}" for _ in range(8)]
            text = pick.choice((":".join(words), ":".join(words[:3]) + "::" + ":".join(words[5:]),
                                "::" + ":".join(words[6:]), ":".join(words[:5]) + "::", "::ffff:1.2.3.4",
                                "::1.2.3.4", "::1.2.3", "::1..2.3", "::01.2.3.4", "::256.1.1.1", "1::2::3",
                                ":".join(words) + "::", "::" + ":".join(words), "fe80::1%eth0", "12345::1",
                                ":1::", "1:", "::", ":::", "::0001:0db8:00:0000"))
            if pick.random() < 0.5:
                text += pick.choice(("/0", "/64", "/064", "/128", "/129", "/96", "/00", "/"))
            text = "".join(c.upper() if pick.random() < 0.3 else c for c in text)
        out.append(text)
    return out


def _mac_shorthand_spellings(count: int) -> list[str]:
    """MAC addresses as macaddr's input (sscanf: %x:%x:..., %2x%2x%2x:%2x%2x%2x and the rest)
    takes them beyond its documented forms: bytes of one digit (8:0:2b:1:2:3) or zero-padded to
    three, whitespace before a byte or at the end, a sign or 0x before a byte, eleven digits
    where the last byte has one; and near misses (seven bytes, a byte of 256, separators mixed)."""
    import random

    pick = random.Random(20261207)
    out = []
    for _ in range(count):
        octets = [pick.choice((0, 1, 8, 15, 16, 255, pick.randrange(256))) for _ in range(6)]
        form = pick.randrange(6)
        if form < 3:
            sep = pick.choice((":", "-", ":", ".", " "))
            fields = [pick.choice((f"{o:x}", f"{o:02x}", f"{o:03x}", f" {o:x}", f"0x{o:x}", f"+{o:x}", f"-{o:x}",
                                   f"{o:x}", f"{o:x}", "100", "100000000", "-0", "x"))
                      if pick.random() < 0.25 else pick.choice((f"{o:x}", f"{o:02x}")) for o in octets]
            text = sep.join(fields + ([f"{pick.randrange(256):x}"] if pick.random() < 0.05 else []))
        else:
            digits = "".join(f"{o:02x}" for o in octets)
            if pick.random() < 0.3:
                digits = digits[:pick.choice((10, 11, 11, 13))] + ("3" if pick.random() < 0.5 else "")
            cut = pick.choice((6, 4, 12))
            text = pick.choice((f"{digits[:6]}:{digits[6:]}", f"{digits[:6]}-{digits[6:]}",
                                f"{digits[:4]}.{digits[4:8]}.{digits[8:]}", f"{digits[:4]}-{digits[4:8]}-{digits[8:]}",
                                digits, f"{digits[:cut]} {digits[cut:]}"))
        if pick.random() < 0.15:
            text = pick.choice((" ", "\t", "")) + text + pick.choice((" ", "  ", "\n", "", "z", " z"))
        out.append("".join(c.upper() if pick.random() < 0.4 else c for c in text))
    return out


# mask lengths of many digits: leading zeros are read (/0024 is /24), a number past a C int wraps as
# PostgreSQL reads it (/4294967304 is /8; / and 5,000 nines is -1, no mask length), never int()'s
# own error past 4,300 digits
_LONG_MASKS = ["1.2.3.4/0000000024", "10/00008", "1.2.3.4/" + "9" * 5000, "10/" + "0" * 5000 + "8", "::1/" + "1" * 50,
               "::1/" + "0" * 5000, "1" * 5000, "0x" + "f" * 5000, "1.2.3.4/4294967296", "1.2.3.4/4294967295",
               "10/4294967304", "10/4294967295", "10.1/4294967295", "1.2.3.4/2147483648"]


@pytest.mark.parametrize("types, spellings", [(("inet", "cidr"),
                                               _address_spellings(2000) + _shorthand_spellings(3000) + _LONG_MASKS),
                                              (("macaddr",), _mac_spellings(500) + _mac_shorthand_spellings(2000))],
                         ids=["inet cidr", "macaddr"])
def test_a_network_spelling_is_taken_as_main_writes_it_or_refused_as_main_refuses_it(replica_engine, types,
                                                                                     spellings):
    """PostgreSQL's shorthands (10/8 for a CIDR is 10.0.0.0/8; 8:0:2b:1:2:3 is 08:00:2b:01:02:03)
    were buffered as given: a key filed under text the replica's row never reads, a filter by
    main's text missing the buffered record. And a spelling main refuses was buffered, to be
    dead-lettered hours later. Each is now taken in the text the replica writes back, or refused
    (ValueError, one line) exactly where PostgreSQL refuses it."""
    from obs_pipeline.network_input import network_text

    columns = ", ".join(f"CASE WHEN pg_input_is_valid(v, '{t}') THEN CAST(v AS {t}) END" for t in types)
    query = sa.text(f"SELECT {columns} FROM unnest(CAST(:spellings AS text[])) WITH ORDINALITY AS s(v, n) ORDER BY n")
    with replica_engine.connect() as conn:
        written = conn.execute(query, {"spellings": spellings}).all()

    def taken(text: str, type_: str) -> str | None:
        try:
            return network_text(text, type_)
        except ValueError as error:
            assert "\n" not in str(error) and repr(text)[:20] in str(error), str(error)
            return None

    wrong = [(text, type_, main, taken(text, type_)) for text, row in zip(spellings, written)
             for type_, main in zip(types, row) if taken(text, type_) != main]
    assert wrong[:20] == [] and len(wrong) == 0, len(wrong)
    for column in range(len(types)):  # many taken otherwise than given, many refused
        assert sum(row[column] is not None and row[column] != text for text, row in zip(spellings, written)) > 500
        assert sum(row[column] is None for row in written) > 200


@pytest.mark.parametrize("model, values, expected", [
    ("Addressed", {"address": "10.{n}/16", "net": "10/8"}, {"address": "10.{n}.0.0/16", "net": "10.0.0.0/8"}),
    ("Carded", {"mac": "8:0:2b:{n:x}:2:3"}, {"mac": "08:00:2b:{n:02x}:02:03"}),
], ids=["inet cidr", "macaddr"])
def test_a_shorthand_network_key_names_its_record_the_same_buffered_and_replicated(forms, main_engine, replica_engine,
                                                                                  redis_client, model, values,
                                                                                  expected):
    """A key given in PostgreSQL's shorthand (10.7/16, 8:0:2b:7:2:3) was filed under it while the
    replica's row read 10.7.0.0/16 or 08:00:2b:07:02:03: once cleaned, get of it said None, and
    an update by main's text was refused while buffered. A spelling main refuses (10/16: a mask
    longer than the octets given; a byte of 256) is refused at ingest in one line, nothing
    buffered."""
    buf = TransactionBuffer(settings=forms)
    n = uuid.uuid4().int % 200 + 20
    given = {k: v.format(n=n) for k, v in values.items()}
    stored = {k: v.format(n=n) for k, v in expected.items()}
    key = next(iter(given))
    note = f"s{uuid.uuid4().hex[:8]}"
    with buf.transaction() as tx:
        made = tx.create(model, {**given, "note": note})
    row = {**stored, "note": note}
    assert {k: made[k] for k in row} == row

    def read() -> tuple:
        return buf.get(model, given[key]), buf.get(model, stored[key]), buf.search(model, {"note": note})

    for _ in ("buffered", "cleaned"):
        got = read()
        assert [{k: g[k] for k in row} for g in (got[0], got[1], *got[2])] == [row] * 3, got
        drain_until_empty(forms)
    buf.update(model, stored[key], {"note": note + "+"})
    assert buf.get(model, given[key])["note"] == note + "+"
    keys = SiteKeys(forms.site)
    before = redis_client.llen(keys.buffer)
    bad = {"Addressed": {"address": "10/16"}, "Carded": {"mac": "8:0:2b:100:2:3"}}[model]
    with pytest.raises(InvalidTransaction) as error:
        with buf.transaction() as tx:
            tx.create(model, {**bad, "note": note})
    assert str(error.value).startswith(f"create of {model}: {model}.{key}: {next(iter(bad.values()))!r} is not"), \
        str(error.value)
    assert "\n" not in str(error.value) and redis_client.llen(keys.buffer) == before
    buf.close()


def test_a_macaddr_key_names_its_record_the_same_buffered_and_replicated(forms, main_engine, replica_engine):
    """A MACADDR key given as 08-00-2B-01-02-03 (main keeps 08:00:2b:01:02:03): as an INET key,
    the record was filed under the text given and the replica's row under main's; once
    cleaned, get of the key as given said None."""
    buf = TransactionBuffer(settings=forms)
    tail = uuid.uuid4().hex[:6]
    given = f"08-00-2B-{tail[:2].upper()}-{tail[2:4]}-{tail[4:].upper()}"
    stored, note = f"08:00:2b:{tail[:2]}:{tail[2:4]}:{tail[4:]}", f"m{tail}"
    with buf.transaction() as tx:
        made = tx.create("Carded", {"mac": given, "note": note})
    expected = {"mac": stored, "note": note}

    def read(note: str) -> tuple:
        return buf.get("Carded", given), buf.get("Carded", stored), buf.search("Carded", {"note": note})

    assert read(note) == (expected, expected, [expected])
    _drain_unclean(forms, main_engine, replica_engine)
    assert read(note) == (expected, expected, [expected])  # replayed, still buffered
    drain_until_empty(forms)
    assert read(note) == (expected, expected, [expected])  # cleaned
    buf.update("Carded", given, {"note": note + "+"})
    drain_until_empty(forms)
    assert read(note + "+") == ({**expected, "note": note + "+"},) * 2 + ([{**expected, "note": note + "+"}],)
    assert made == expected
    buf.close()
