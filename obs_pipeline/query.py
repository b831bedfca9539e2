"""Smart queries: the replica merged with what is still buffered (read your writes).

Order of reads, and why a reader never sees a record vanish or go back in time:

1. One Lua script reads, atomically, the buffered creates of the model (through its index
   `index:{model}`) and the pending overlays (through `overlaid:{model}`, the ids whose read
   buffer is not empty). No cleanup runs half-way through it, so a record is never seen
   without an overlay that was cleaned together with it, and an id cleaned between reading
   the index and reading its record cannot happen.
2. Then one replica statement. Whatever the caches no longer held at step 1 was replayed by
   the replica before it was cleaned, so the later replica read has it, or something newer.

Transactions in ingest's local spool (Redis could not take them: down, full, not answering)
are read first, before step 1, and go on top of the caches: while anything is spooled, ingest
appends behind it, so nothing in Redis is newer. Step 1 also tells which of them have a status
key in Redis by then (pushed since, perhaps cleaned too): those are left out, Redis or the
replica has them. While Redis does not answer, `get` answers from the spool alone for a record
a spooled transaction created or deleted (Redis can hold nothing newer of it); any other read
raises RedisUnreadable, one line.

Merging, per id: a pending delete hides the record, unless a create of the same key (a key
the caller gave, not one ingest generated) comes after it in the read buffer; a buffered create is the
record (the replica copy, if there is one, can only be newer by writes buffered after step
1); otherwise the replica row. Pending updates are applied on top, per column, in buffering
order; a create in the read buffer starts the record again. An
overlay the replica has already replayed is applied again harmlessly: updates set values.
Hence each column shows a value at least as new as at step 1, and step 1 comes after every
earlier read of the same reader: reads are monotonic (as long as the drain applies one
record's transactions in buffering order, which it does).

Filters: equality, a list for "any of" (None in it matches null), None for IS NULL, and
`{op: value}` comparisons (`==`, `!=`, `<`, `<=`, `>`, `>=`; ordering only on ordered
columns). The replica runs them as SQL; buffered records are tested in Python with the same
semantics (datetimes compared as instants, text by code point as `COLLATE "C"` does, a
native enum by its labels' declared order, a `time with time zone` by instant then offset,
a `real` at single precision: see _key).
Unknown columns or operators raise InvalidTransaction, as do values of the wrong type.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import functools
import json
import operator
import struct
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import redis
import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql

from obs_pipeline import forks
from obs_pipeline import spool as spool_module
from obs_pipeline.buffer_store import BufferStore, redis_unavailable
from obs_pipeline.config import ConfigError, stack_env_hint
from obs_pipeline.column_values import (fraction_step, interval_text, parse_interval, round_micros, round_seconds,
                                        single_float)
from obs_pipeline.model_registry import ColumnSpec, InvalidTransaction, ModelRegistry, ModelSpec, is_single_precision
from obs_pipeline.wire import record_id

_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}
_ORDERED_KINDS = {"int", "float", "str", "datetime", "date", "time", "timetz", "interval", "uuid"}
_UTC = dt.timezone.utc

# The buffered state of records of one model, read atomically (see the module docstring).
# ARGV[1] key prefix, ARGV[2] model, ARGV[3..] ids (none: the whole model, through its indexes);
# KEYS: status keys of spooled transactions. Returns {records, overlays, known}: a JSON array of
# the created records still buffered (each holds its own id), a JSON array of [id, [overlay, ...]]
# for the ids with pending overlays, and 1 or 0 per KEYS, for a status key that exists or not.
# The script holds Redis while it runs, so it does as little as it can: raw JSON is passed
# through, never decoded; the records come from one native SORT ... GET over the model index
# (one GET per id if the prefix holds SORT's `*` or `->`, or if Redis is full: SORT may write,
# and Redis at its maxmemory refuses it), and only the read buffers of
# the ids in the overlay index are read.
_READ_BUFFERED = """
local prefix, model = ARGV[1], ARGV[2]
local created = prefix .. 'buffered:' .. model .. ':'
local overlaid = prefix .. 'read_buffer:' .. model .. ':'
local recs, ovls = {}, {}
local function overlays_of(id)
  local o = redis.call('LRANGE', overlaid .. id, 0, -1)
  if #o > 0 then ovls[#ovls + 1] = '[' .. cjson.encode(id) .. ',[' .. table.concat(o, ',') .. ']]' end
end
if #ARGV > 2 then
  for i = 3, #ARGV do
    local rec = redis.call('GET', created .. ARGV[i])
    if rec then recs[#recs + 1] = rec end
    overlays_of(ARGV[i])
  end
else
  local index = prefix .. 'index:' .. model
  local found
  if not (string.find(created, '*', 1, true) or string.find(created, '->', 1, true)) then
    found = redis.pcall('SORT', index, 'BY', 'nosort', 'GET', created .. '*')
  end
  if not found or found.err then  -- SORT may write (STORE): a full Redis refuses it, not GET
    found = {}
    for _, id in ipairs(redis.call('SMEMBERS', index)) do found[#found + 1] = redis.call('GET', created .. id) end
  end
  for _, rec in ipairs(found) do
    if rec then recs[#recs + 1] = rec end
  end
  for _, id in ipairs(redis.call('SMEMBERS', prefix .. 'overlaid:' .. model)) do overlays_of(id) end
end
local known = {}
for i = 1, #KEYS do known[i] = redis.call('EXISTS', KEYS[i]) end
return {'[' .. table.concat(recs, ',') .. ']', '[' .. table.concat(ovls, ',') .. ']', known}
"""


class RedisUnreadable(redis.ConnectionError):
    """A read needs what is buffered in the site's Redis, and Redis does not answer."""


class ReplicaUnreadable(exc.OperationalError):
    """A read needs the site's replica, and it cannot be read (down, refusing, cancelling): the
    driver's error in one line, SQLAlchemy's own message runs over several."""

    def __init__(self, line: str, error: exc.OperationalError):
        super().__init__(error.statement, error.params, error.orig, hide_parameters=True)
        self.line = line

    def __str__(self) -> str:
        return self.line


@dataclass
class Buffered:
    """What the caches held, at one instant, for records of one model."""
    created: dict[str, dict[str, Any]]         # id -> record as created, while its create is buffered
    overlays: dict[str, list[dict[str, Any]]]  # id -> pending updates/deletes, in buffering order

    def deleted(self, rid: str) -> bool:
        """A pending delete hides the record unless a create of the same key comes after it."""
        for entry in reversed(self.overlays.get(rid, ())):
            op = entry.get("op")
            if op == "delete":
                return True
            if op == "create":
                return False
        return False


@dataclass
class _Filters:
    sql: list[Any]                                       # clauses for the replica
    tests: list[Callable[[dict[str, Any]], bool]]        # the same, on JSON-form rows
    columns: set[str]

    def match(self, row: dict[str, Any]) -> bool:
        for test in self.tests:
            if not test(row):
                return False
        return True


class SmartQuery:
    def __init__(self, store: BufferStore, registry: ModelRegistry, replica_url: str | None,
                 spool: spool_module.Spool | None = None):
        self.store = store
        self.registry = registry
        self.replica_url = replica_url
        self.spool = spool  # ingest's: its circuit breaker (see _read_redis)
        self._engine: sa.Engine | None = None
        self._engine_lock = threading.Lock()
        self._read = store.redis.register_script(_READ_BUFFERED)
        forks.renew_in_forked_children(self)

    def _after_fork_in_child(self) -> None:
        """In a forked child (see obs_pipeline.forks): the engine's pooled connections are the
        parent's; the child's pool starts empty, leaving them open for the parent (SQLAlchemy's
        way for a child process: dispose(close=False))."""
        self._engine_lock = threading.Lock()
        if self._engine is not None:
            self._engine.dispose(close=False)

    @property
    def engine(self) -> sa.Engine | None:
        if self._engine is not None or not self.replica_url:
            return self._engine
        with self._engine_lock:  # readers in several threads share one pool
            if self._engine is not None:
                return self._engine
            kwargs: dict[str, Any] = {}
            if self.replica_url.startswith("postgresql"):
                kwargs["connect_args"] = {"options": "-c timezone=UTC", "connect_timeout": 5}
            # Autocommit: one statement, one snapshot, no ROLLBACK round trip per read.
            self._engine = sa.create_engine(self.replica_url, pool_size=2, max_overflow=4, pool_pre_ping=True,
                                            isolation_level="AUTOCOMMIT", **kwargs)
            return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # --- public -------------------------------------------------------------------------------
    def get(self, model: str, record_id_: Any) -> dict[str, Any] | None:
        spec = self.registry.model(model)
        value = record_id(spec, record_id_, f"get of {spec.name}")
        rid = str(value)
        self._require_replica()
        state = self.buffered(spec, [rid])                   # 1. caches
        if state.deleted(rid):
            return None
        overlays = state.overlays.get(rid, [])
        created = next(iter(state.created.values()), None)
        if created is not None:
            return _merge(spec, created, overlays)
        pk = spec.sql_columns[spec.primary_key]
        base = self._select(spec, sa.select(spec.table).where(pk == _pk(spec, value))).get(rid)  # 2. replica
        if base is None:
            return None
        return _merge(spec, base, overlays) if overlays else base

    def search(self, model: str, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        spec = self.registry.model(model)
        compiled = _compile(spec, {} if filters is None else filters)
        self._require_replica()
        state = self.buffered(spec, None)                    # 1. caches
        hidden = {rid for rid in state.overlays if state.deleted(rid)}
        datetimes, floats = _datetime_columns(spec), _float_columns(spec)
        out: dict[str, dict[str, Any]] = {}
        match = compiled.match
        for rid, record in state.created.items():
            overlays = state.overlays.get(rid)
            if overlays is None:  # filters hold on the record as stored: merge only what matches
                if match(record):
                    out[rid] = _merge(spec, record, (), datetimes, floats)
            elif rid not in hidden:
                row = _merge(spec, record, overlays, datetimes, floats)
                if match(row):
                    out[rid] = row
        # Records on the replica with pending updates: if an update sets a filtered column, the
        # replica row may match only once updated, so fetch those by id too and test in Python.
        by_id = [rid for rid, overlays in state.overlays.items()
                 if rid not in state.created and rid not in hidden and compiled.sql
                 and any(compiled.columns.intersection(o.get("data") or ()) for o in overlays)]
        stmt = sa.select(spec.table)
        if compiled.sql:
            where = sa.and_(*compiled.sql)
            if by_id:
                where = sa.or_(where, spec.sql_columns[spec.primary_key].in_([_pk(spec, i) for i in by_id]))
            stmt = stmt.where(where)
        recheck = set(by_id)
        for rid, row in self._select(spec, stmt).items():     # 2. replica
            if rid in hidden or rid in state.created:
                continue
            overlays = state.overlays.get(rid)
            if overlays:
                row = _merge(spec, row, overlays, datetimes, floats)
            if rid in recheck and not compiled.match(row):
                continue
            out[rid] = row
        return [out[k] for k in sorted(out, key=_sort_key(spec))]

    def search_frame(self, model: str, filters: dict[str, Any] | None = None):
        """`search` as a DataFrame: datetimes tz-aware (UTC), uuids and text as strings,
        integers as nullable Int64, one column per model column even when empty."""
        import pandas as pd

        spec = self.registry.model(model)
        rows = self.search(model, filters)
        data = {name: _series(pd, column, [row[name] for row in rows]) for name, column in spec.columns.items()}
        return pd.DataFrame(data, columns=list(spec.columns))

    # --- internals ----------------------------------------------------------------------------
    def buffered(self, spec: ModelSpec, ids: list[str] | None) -> Buffered:
        """What the caches hold for these ids or (None) for every id in the model's index, and
        on top what the spool holds for them (see the module docstring)."""
        if ids is not None and not ids:
            return Buffered({}, {})
        spooled = self._spooled(spec, ids)  # before Redis: a line pushed in between is known there
        try:
            records, overlays, known = self._read_redis(spec, ids, [tx["id"] for tx in spooled])
        except RedisUnreadable:
            alone = _with_spooled(Buffered({}, {}), spooled)
            if ids is not None and all(rid in alone.created or alone.deleted(rid) for rid in ids):
                return alone  # created or deleted by a spooled transaction: Redis holds nothing newer
            raise
        pk = spec.primary_key
        created = {}
        for record in json.loads(records):
            if isinstance(record, dict) and record.get(pk) is not None:
                created[str(record[pk])] = record
        pending = {str(rid): entries for rid, entries in json.loads(overlays)}
        for rid, entries in pending.items():
            if rid not in created:  # its buffered record went with the cleanup of an earlier create of the key
                made = next((e.get("data") for e in entries if e.get("op") == "create"), None)
                if isinstance(made, dict):
                    created[rid] = made
        return _with_spooled(Buffered(created, pending), [tx for tx, there in zip(spooled, known) if not there])

    def _spooled(self, spec: ModelSpec, ids: list[str] | None) -> list[dict[str, Any]]:
        """The spooled transactions, not pushed yet, that write these ids (None: any record of
        the model), oldest first, each {"id", "created": [(id, record JSON)], "overlays": [(id,
        overlay JSON)]} with only those writes."""
        if self.spool is None or not self.spool.exists():
            return []
        wanted = None if ids is None else set(ids)
        out = []
        for tx in self.spool.unpushed(json.dumps(ids[0] if wanted is not None and len(wanted) == 1 else spec.name)):
            writes = {part: [(rid, value) for model, rid, value in tx[part]
                             if model == spec.name and (wanted is None or rid in wanted)]
                      for part in ("created", "overlays")}
            if writes["created"] or writes["overlays"]:
                out.append({"id": tx["id"], **writes})
        return out

    def _read_redis(self, spec: ModelSpec, ids: list[str] | None, spooled_tx_ids: list[str]) -> list[Any]:
        """The buffered state, from Redis. After Redis did not answer in time, it is not asked
        again for spool.REDIS_RETRY_AFTER_S (ingest's breaker: a hung Redis cost every read its
        socket timeout); a read that times out starts that wait as ingest's calls do."""
        spool = self.spool
        if spool is not None and spool.redis_failed_recently():
            raise RedisUnreadable(f"reading {spec.name} needs what is buffered in the site's Redis (OBS_REDIS_URL), "
                                  f"which did not answer a moment ago; it is asked again within "
                                  f"{spool_module.REDIS_RETRY_AFTER_S:g} s")
        try:
            return self._read(keys=[self.store.keys.transaction(t) for t in spooled_tx_ids],
                              args=[self.store.keys.prefix, spec.name, *(ids or ())])
        except redis.RedisError as error:
            if not redis_unavailable(error):
                raise
            if spool is not None:
                spool.note_redis_failure(error)
            raise RedisUnreadable(f"reading {spec.name} needs what is buffered in the site's Redis (OBS_REDIS_URL), "
                                  f"which does not answer: {' '.join(str(error).split())}") from error

    def _require_replica(self) -> None:
        if not self.replica_url:
            raise ConfigError("OBS_REPLICA_DB_URL is not set: smart queries (get/search) need the site's read "
                              f"replica (e.g. {stack_env_hint()} for the local stack)")

    def _select(self, spec: ModelSpec, stmt: sa.Select) -> dict[str, dict[str, Any]]:
        names = list(spec.sql_columns)  # by attribute, in the table's order, as the select gives them
        forms = dict(_read_forms(spec))
        convert = [forms.get(n) or _from_db(spec.columns[n]) for n in names]
        pk = spec.primary_key
        for attempt in (1, 2):
            try:
                with self.engine.connect() as conn:
                    rows = conn.execute(stmt).all()
                break
            except exc.OperationalError as error:
                # A hot standby may cancel a query that conflicts with replay: try once more.
                if attempt == 2 or getattr(error.orig, "pgcode", None) != "40001":
                    raise ReplicaUnreadable(f"reading {spec.name} needs the site's replica (OBS_REPLICA_DB_URL), which "
                                            f"cannot be read: {' '.join(str(error.orig).split())}", error) from error
        out = {}
        for row in rows:
            record = {n: (None if v is None else f(v)) for n, f, v in zip(names, convert, row)}
            out[str(record[pk])] = record
        return out


# --- merging --------------------------------------------------------------------------------

def _with_spooled(state: Buffered, spooled: list[dict[str, Any]]) -> Buffered:
    """Spooled transactions on top of `state`, in spool order: they come after it."""
    for tx in spooled:
        for rid, record in tx["created"]:
            state.created[rid] = json.loads(record)
        for rid, entry in tx["overlays"]:
            state.overlays.setdefault(rid, []).append(json.loads(entry))
    return state


def _merge(spec: ModelSpec, record: dict[str, Any], overlays: Any,
           datetimes: list[str] | None = None, floats: list[str] | None = None) -> dict[str, Any]:
    """Every column of the model in order, pending updates applied per column, datetimes in UTC,
    floats as floats (JSON may hold 30 for 30.0; the replica gives a float)."""
    merged = dict.fromkeys(spec.columns)
    merged.update(record)
    for entry in overlays:
        op = entry.get("op")
        if op == "update":
            merged.update(entry.get("data") or ())
        elif op == "create":  # the key created again after a delete: nothing before it counts
            merged = dict.fromkeys(spec.columns)
            merged.update(entry.get("data") or ())
    if len(merged) != len(spec.columns):  # a key that is no column (a foreign writer): drop it
        merged = {name: merged[name] for name in spec.columns}
    for name in _datetime_columns(spec) if datetimes is None else datetimes:
        value = merged[name]
        if value.__class__ is str and value[-6:] != "+00:00":
            merged[name] = _utc_iso(value)
    for name in _float_columns(spec) if floats is None else floats:
        if merged[name].__class__ is int:
            merged[name] = float(merged[name])
    for name, form in _read_forms(spec):
        if merged[name] is not None:
            merged[name] = form(merged[name])
    return merged


def _read_forms(spec: ModelSpec) -> tuple[tuple[str, Callable[[Any], Any]], ...]:
    """(attribute, read form) of the model's columns that have one (see _table_read_forms)."""
    return _table_read_forms(spec.table, spec.attributes)


@functools.lru_cache(maxsize=None)
def _table_read_forms(table: sa.Table, keys: tuple[str, ...]) -> tuple[tuple[str, Callable[[Any], Any]], ...]:
    """Columns the replica gives in another form than their JSON: a time of day (a
    datetime.time), a single-precision float (PostgreSQL keeps about 7 digits), a decimal
    rounded to its column's scale, and numbers in `jsonb`. Buffered and replicated values are
    both brought to what the replica shows."""
    forms = []
    for column, key in zip(table.columns, keys):  # keys: the columns' attributes, in the table's order
        form = _read_form(column.type)
        if form is not None:
            forms.append((key, form))
    return tuple(forms)


def _read_form(type_: sa.types.TypeEngine) -> Callable[[Any], Any] | None:
    """The read form of one type's values (an array's: its elements'), or None for none."""
    if isinstance(type_, sa.ARRAY):
        form = _read_form(type_.item_type)
        return None if form is None else functools.partial(_each, form=form)
    step = fraction_step(type_)
    if isinstance(type_, sa.Time):
        return functools.partial(_time_of_day, zone=bool(type_.timezone), step=step)
    if step is not None:
        return functools.partial(_datetime_rounded if isinstance(type_, sa.DateTime) else _interval_rounded, step=step)
    if is_single_precision(type_):
        return _single_float
    places = _numeric_places(type_)
    if places is not None:
        return functools.partial(_rounded, places=places)
    if isinstance(type_, postgresql.JSONB):
        return _jsonb_form
    return None


def _each(value: Any, form: Callable[[Any], Any]) -> Any:
    """An array's elements in their read form; lists in it are further dimensions."""
    if not isinstance(value, list):
        return value
    return [None if v is None else _each(v, form) if isinstance(v, list) else form(v) for v in value]


def _jsonb_form(value: Any) -> Any:
    """A JSON value as `jsonb` keeps it: numbers are `numeric`, so a float written with an
    exponent (1e+16 and up) comes back an integer (10000000000000000; 1.5e+300 is not even
    equal to the float), and -0.0 is 0.0. Keys and the rest are as given."""
    if value.__class__ is float:
        if value == 0.0:
            return 0.0
        text = repr(value)
        return int(decimal.Decimal(text)) if "e+" in text else value
    if isinstance(value, dict):
        return {k: _jsonb_form(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonb_form(v) for v in value]
    return value


def _numeric_places(type_: sa.types.TypeEngine) -> decimal.Decimal | None:
    """The places a NUMERIC(p, s) column keeps (Decimal('0.01') for s = 2; NUMERIC(p) keeps
    none); None for a NUMERIC that rounds nothing, and for a float."""
    if not isinstance(type_, sa.Numeric) or isinstance(type_, sa.Float):
        return None
    scale = type_.scale if type_.scale is not None else 0 if type_.precision is not None else None
    return None if scale is None else decimal.Decimal(1).scaleb(-scale)


# Digits enough for any float, or NUMERIC(1000, s), rounded to a scale PostgreSQL allows (1,000
# places): decimal's default context holds 28, and a NUMERIC(38, 10)'s 1e20 rounded needs 31
# (quantize refused it, and the replica's row read as its Decimal: under another key's text).
_QUANTIZING = decimal.Context(prec=2400)


def _rounded(value: Any, places: decimal.Decimal) -> Any:
    """A number as a NUMERIC(p, s) column keeps it: its decimal text rounded to s places, half
    away from zero, as PostgreSQL rounds (1.235 -> 1.24); read as a float like the column's
    other values (psycopg2 gives the replica's as a Decimal)."""
    try:
        exact = value if isinstance(value, decimal.Decimal) else decimal.Decimal(repr(value))
        return float(exact.quantize(places, decimal.ROUND_HALF_UP, context=_QUANTIZING))
    except (decimal.InvalidOperation, ValueError, TypeError):  # beyond the column (main refuses it), or not a number
        return value


def _time_of_day(value: Any, zone: bool, step: int | None = None) -> Any:
    """ISO text; `time` without a zone drops one given (text Python cannot parse is left as is);
    a TIME(p)'s seconds rounded to p places (23:59:59.6 in a TIME(0) reads 00:00:00, as
    psycopg2 reads PostgreSQL's 24:00:00)."""
    if isinstance(value, str):
        try:
            value = dt.time.fromisoformat(value)
        except ValueError:
            return value
    if not isinstance(value, dt.time):
        return value
    if step is not None:
        value = round_seconds(value, step)
    return (value if zone else value.replace(tzinfo=None)).isoformat()


def _datetime_rounded(value: Any, step: int) -> Any:
    """A TIMESTAMP(p)'s value (ISO text, or the replica's datetime) as ISO text in UTC, its
    seconds rounded to p places as PostgreSQL stores it: counted from 2000-01-01, so that
    1999-12-31T23:59:59.5 rounds to :59 in a TIMESTAMP(0) and 2000-01-01T00:00:00.5 to :01."""
    try:
        return round_seconds(_parse_utc(value), step).isoformat()
    except (ValueError, TypeError, OverflowError):  # not a datetime, or rounded beyond year 9999: as it is
        return _datetime_from_db(value)


def _interval_rounded(value: Any, step: int) -> Any:
    """An INTERVAL(p)'s value (ISO text, or the replica's timedelta) as ISO text, its seconds
    rounded to p places: the time after the days, as main keeps the timedelta it is given."""
    try:
        return interval_text(round_seconds(parse_interval(value), step))
    except (ValueError, TypeError, OverflowError):
        return value


def _single_float(value: Any) -> Any:
    """As `real` keeps it (column_values.single_float)."""
    try:
        return single_float(value)
    except (OverflowError, struct.error, TypeError):  # beyond `real` (main refuses it), or not a number
        return value


def _datetime_columns(spec: ModelSpec) -> list[str]:
    return [name for name, column in spec.columns.items() if column.kind == "datetime"]


def _float_columns(spec: ModelSpec) -> list[str]:
    return [name for name, column in spec.columns.items() if column.kind == "float"]


def _utc_iso(value: str) -> str:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return value
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=_UTC)).astimezone(_UTC).isoformat()


def _datetime_from_db(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=_UTC)).astimezone(_UTC).isoformat()
    return value


def _same(value: Any) -> Any:
    return value


def _array_from_db(value: Any) -> Any:
    """An array's elements in their JSON form, as buffered (a uuid as text, a time as ISO text)."""
    if isinstance(value, list):
        return [_array_from_db(v) for v in value]
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime):
        return _datetime_from_db(value)
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return interval_text(value)
    if isinstance(value, decimal.Decimal):
        return float(value)
    return value


_FROM_DB: dict[str, Callable[[Any], Any]] = {
    "uuid": str,
    "datetime": _datetime_from_db,
    "date": lambda v: v.isoformat() if isinstance(v, dt.date) else v,
    "float": lambda v: float(v) if isinstance(v, decimal.Decimal) else v,
    "interval": lambda v: interval_text(v) if isinstance(v, dt.timedelta) else v,
    "array": _array_from_db,
}


def _from_db(column: ColumnSpec) -> Callable[[Any], Any]:
    """A replica value -> its JSON form, as buffered. SQLAlchemy reads an Enum of a Python enum
    class as the class's members (an array's elements too): they read as their labels."""
    if column.choices is not None and any(isinstance(choice, enum.Enum) for choice in column.choices):
        label = functools.partial(_label, labels=column.choices)
        return functools.partial(_each, form=label) if column.kind == "array" else label
    return _FROM_DB.get(column.kind, _same)


def _label(value: Any, labels: dict[Any, str]) -> Any:
    return labels.get(value, value) if isinstance(value, enum.Enum) else value


def _sort_key(spec: ModelSpec) -> Callable[[str], Any]:
    return int if spec.columns[spec.primary_key].kind == "int" else str


def _pk(spec: ModelSpec, value: Any) -> Any:
    """An id (as given, or the text form the index holds) -> the value bound to the statement;
    a REAL key at single precision, as a filter's value (_as_real): bound as 0.1, it is not
    the row's 0.1 (`real '0.1' = 0.1` is false), and get said None once replicated."""
    column = spec.columns[spec.primary_key]
    if column.kind in ("int", "float") and isinstance(value, str):
        value = int(value) if column.kind == "int" else float(value)
    value = column.to_python(column.check(value))
    return _as_real(value) if column.float_bits == 32 else value


# --- filters --------------------------------------------------------------------------------

def _value_key(column: ColumnSpec, type_: sa.types.TypeEngine, key: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The key of a filter's value: the row's, but a NUMERIC(p, s) column's rows are rounded
    to s places, and a TIMESTAMP(p)'s, TIME(p)'s or INTERVAL(p)'s seconds to p places, and the
    value is not (PostgreSQL compares `amount >= 1.234` as given)."""
    if column.kind == "float" and _numeric_places(type_) is not None:
        return float
    return _key(column, type_, rounded=False) if fraction_step(type_) is not None else key


def _key(column: ColumnSpec, type_: sa.types.TypeEngine, rounded: bool = True) -> Callable[[Any], Any]:
    """JSON form -> a value that compares like the database compares the column; `rounded`:
    a row's, whose TIMESTAMP(p), TIME(p) or INTERVAL(p) seconds the column keeps to p places."""
    step = fraction_step(type_) if rounded else None
    if _native_enum(type_):
        return functools.partial(_enum_order, order={label: i for i, label in enumerate(type_.enums)})
    if column.kind == "datetime":
        return _parse_utc if step is None else lambda v: _parse_utc(_datetime_rounded(v, step))
    if column.kind == "date":
        return lambda v: dt.date.fromisoformat(v) if isinstance(v, str) else v
    if column.kind == "time":
        return functools.partial(_time_order, step=step)
    if column.kind == "timetz":
        return functools.partial(_timetz_order, step=step)
    if column.kind == "float":
        if is_single_precision(type_):
            return _as_real
        places = _numeric_places(type_)
        return float if places is None else functools.partial(_rounded, places=places)
    if column.kind == "interval":
        return column.to_python if step is None else lambda v: column.to_python(_interval_rounded(v, step))
    return _same  # uuid (canonical lower-case text sorts like the bytes), int, str, bool, any


def _native_enum(type_: sa.types.TypeEngine) -> bool:
    """A PostgreSQL enum type: ordered by its labels' declared order, not as text (and no
    collation applies to it); a non-native Enum is VARCHAR, ordered as text."""
    return isinstance(type_, sa.Enum) and bool(type_.native_enum)


def _enum_order(value: Any, order: dict[str, int]) -> int:
    """A native enum's label -> its place in the declaration, as PostgreSQL compares them."""
    return order.get(value, len(order))


def _as_real(value: Any) -> float:
    """A number as a `real` column holds it (single precision), as the double PostgreSQL
    compares it as. Filter values are taken so too (in SQL as well): 0.1 finds the row that
    reads 0.1, which PostgreSQL would not (`real '0.1' = 0.1` is false)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except (OverflowError, struct.error):  # beyond `real`: no row holds it, compare as it is
        return float(value)


def _time_order(value: Any, step: int | None = None) -> int:
    """`time` holds no offset: one in a buffered value is dropped, as PostgreSQL drops it. The
    microseconds of the day, rounded to `step` as a TIME(p) keeps them: 23:59:59.6 in a
    TIME(0) is 24:00:00, after every other time (psycopg2 reads it as 00:00:00)."""
    parsed = dt.time.fromisoformat(value) if isinstance(value, str) else value
    micros = ((parsed.hour * 60 + parsed.minute) * 60 + parsed.second) * 1_000_000 + parsed.microsecond
    return micros if step is None else round_micros(micros, step)


def _timetz_order(value: Any, step: int | None = None) -> tuple[int, int]:
    """`time with time zone` as PostgreSQL orders it: by instant, then by offset, so that
    12:00+02 and 10:00+00 are not equal and 12:00+02 sorts first (Python's time calls them
    equal). A time without an offset is in UTC, as ingest buffers it."""
    parsed = dt.time.fromisoformat(value) if isinstance(value, str) else value
    offset = (parsed.utcoffset() or dt.timedelta(0)) // dt.timedelta(microseconds=1)
    return _time_order(parsed, step) - offset, -offset


def _parse_utc(value: Any) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_UTC)


def _compile(spec: ModelSpec, filters: Any) -> _Filters:
    """Check the filters (unknown columns and operators are errors) and build the SQL clauses
    and the Python tests that agree with them (one test per column, parsing a value once)."""
    if not isinstance(filters, dict):
        raise InvalidTransaction(f"search filters on {spec.name} must be a dict of column -> value, "
                                 f"not {type(filters).__name__}")
    compiled = _Filters([], [], set())
    for name, condition in filters.items():
        col = spec.column(name)
        if col.kind in ("json", "array"):
            raise InvalidTransaction(f"search on {spec.name}.{name}: {col.kind.upper()} columns cannot be filtered on")
        column = spec.sql_columns[name]
        key = _key(col, column.type)
        value_key = _value_key(col, column.type, key)
        compiled.columns.add(name)
        try:
            if isinstance(condition, dict):
                if not condition:
                    raise InvalidTransaction(f"search on {spec.name}.{name}: empty comparison {{}}")
                ops = []
                for op, value in condition.items():
                    ops.extend(_comparison(spec, name, col, column, value_key, op, value, compiled))
                if ops:
                    compiled.tests.append(_test(name, key, ops))
            elif isinstance(condition, (list, tuple, set, frozenset)):
                values = [col.check(v) for v in condition if v is not None]
                with_null = any(v is None for v in condition)
                clause = column.in_([_bound(col, value_key, v) for v in values])
                compiled.sql.append(sa.or_(clause, column.is_(None)) if with_null else clause)
                targets = {value_key(v) for v in values}
                if key is _same:
                    targets |= {None} if with_null else set()
                    compiled.tests.append(lambda row, n=name, t=frozenset(targets): row.get(n) in t)
                else:
                    compiled.tests.append(lambda row, n=name, k=key, t=targets, z=with_null:
                                          (z if row.get(n) is None else k(row[n]) in t))
            else:
                ops = _comparison(spec, name, col, column, value_key, "==", condition, compiled)
                if ops:
                    compiled.tests.append(_test(name, key, ops))
        except ValueError as error:
            if isinstance(error, InvalidTransaction):
                raise
            raise InvalidTransaction(f"search on {spec.name}.{name}: {error}") from None
    return compiled


def _test(name: str, key: Callable[[Any], Any], ops: list[tuple[Callable[[Any, Any], bool], Any]]
          ) -> Callable[[dict[str, Any]], bool]:
    """A row test for comparisons of one column (never true for null)."""
    if key is _same and len(ops) == 1 and ops[0][0] is operator.eq:
        target = ops[0][1]
        return lambda row: row.get(name) == target

    def test(row: dict[str, Any]) -> bool:
        value = row.get(name)
        if value is None:
            return False
        value = key(value)
        for compare, target in ops:
            if not compare(value, target):
                return False
        return True
    return test


def _comparison(spec: ModelSpec, name: str, col: ColumnSpec, column: Any, key: Callable[[Any], Any], op: Any,
                value: Any, compiled: _Filters) -> list[tuple[Callable[[Any, Any], bool], Any]]:
    """Add the SQL clause; return the (compare, target) pair for the Python test, or none for
    a null check (its test is added here)."""
    if op not in _COMPARISONS:
        raise InvalidTransaction(f"search on {spec.name}.{name}: unknown operator {op!r} "
                                 f"(use one of {', '.join(_COMPARISONS)})")
    if value is None:
        if op not in ("==", "!="):
            raise InvalidTransaction(f"search on {spec.name}.{name}: {op} null matches nothing; use == or !=")
        compiled.sql.append(column.is_(None) if op == "==" else column.is_not(None))
        compiled.tests.append((lambda row, n=name: row.get(n) is None) if op == "==" else
                              (lambda row, n=name: row.get(n) is not None))
        return []
    if op not in ("==", "!=") and col.kind not in _ORDERED_KINDS:
        raise InvalidTransaction(f"search on {spec.name}.{name}: {op} needs an ordered column "
                                 f"({col.kind} is not); use == or a list")
    checked = col.check(value)
    compare = _COMPARISONS[op]
    as_text = col.kind == "str" and op not in ("==", "!=") and not _native_enum(column.type)
    sql_column = column.collate("C") if as_text else column
    compiled.sql.append(compare(sql_column, _bound(col, key, checked)))
    return [(compare, key(checked))]


def _bound(col: ColumnSpec, key: Callable[[Any], Any], value: Any) -> Any:
    """A filter value bound to the replica's statement: for a `real` column, at single
    precision, as the Python test takes it (see _as_real)."""
    return key(value) if key is _as_real else col.to_python(value)


def _series(pd: Any, column: ColumnSpec, values: list[Any]) -> Any:
    if column.kind == "datetime":  # microseconds, as PostgreSQL keeps them, whatever pandas would infer
        return pd.to_datetime(pd.Series(values, dtype="object"), utc=True, format="ISO8601").astype(
            pd.DatetimeTZDtype(unit="us", tz="UTC"))
    if column.kind in ("uuid", "str"):
        return pd.Series(values, dtype="string")
    if column.kind == "int":
        return pd.Series(values, dtype="Int64")
    if column.kind == "float":
        return pd.Series(values, dtype="Float64")
    if column.kind == "bool":
        return pd.Series(values, dtype="boolean")
    if column.kind == "date":
        return pd.to_datetime(pd.Series(values, dtype="object"), format="ISO8601").astype("datetime64[us]")
    return pd.Series(values, dtype="object")
