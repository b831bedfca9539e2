"""Smart queries: the replica merged with what is still buffered (read your writes).

Order of reads, and why a reader never sees a record vanish or go back in time:

1. One Lua script reads the model's index and, for each id, the buffered create and the
   pending overlays, atomically: no cleanup can run half-way through it, so a record is never
   seen without an overlay that was cleaned together with it.
2. Then one replica statement. Whatever the caches no longer held at step 1 had been replayed
   by the replica before it was cleaned, so the later replica read has it (or something newer).

Merging, per id: a pending delete hides the record; a buffered create is the record (the
replica copy, if any, is not newer); otherwise the replica row. Pending updates are applied
on top per column, in buffering order. Overlays that the replica already replayed are applied
again harmlessly: an update sets values, it does not add to them.

Filters: equality, a list for "any of", None for IS NULL, and `{op: value}` comparisons
(`==`, `!=`, `<`, `<=`, `>`, `>=`; ordering only on ordered columns). The replica runs them as
SQL, buffered records are checked in Python with the same semantics (text compared by code
point, as `COLLATE "C"` does). Unknown columns or operators raise InvalidTransaction.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import sqlalchemy as sa
from sqlalchemy import exc

from obs_pipeline.buffer_store import BufferStore
from obs_pipeline.config import ConfigError
from obs_pipeline.model_registry import ColumnSpec, InvalidTransaction, ModelRegistry, ModelSpec
from obs_pipeline.wire import record_id

_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}
_ORDERED_KINDS = {"int", "float", "str", "datetime", "date", "uuid"}
_PREFILTER_KINDS = {"int", "str", "uuid", "bool"}  # JSON forms compare exactly in Lua too
_UTC = dt.timezone.utc

# Buffered state of records of one model, read atomically (see the module docstring).
# ARGV[1] key prefix, ARGV[2] model, ARGV[3] prefilter JSON or '', ARGV[4..] ids (none: the whole
# index of the model). Returns one JSON array: [[id, created record or null, [overlay, ...]], ...];
# ids with no buffered state left are omitted. Prefilter {column: [allowed JSON values]}: a created
# record with no overlay whose value is none of them is left out (the answer stays a superset of
# the matches; Python applies the exact filters).
_READ_BUFFERED = """
local prefix, model = ARGV[1], ARGV[2]
local created = prefix .. 'buffered:' .. model .. ':'
local overlaid = prefix .. 'read_buffer:' .. model .. ':'
local pf = nil
if ARGV[3] ~= '' then pf = cjson.decode(ARGV[3]) end
local ids
if #ARGV > 3 then
  ids = {}
  for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('SMEMBERS', prefix .. 'index:' .. model)
end
local function keep(raw)
  local doc = cjson.decode(raw)
  for col, allowed in pairs(pf) do
    local v, ok = doc[col], false
    for _, a in ipairs(allowed) do
      if v == a then ok = true break end
    end
    if not ok then return false end
  end
  return true
end
local out = {}
for _, id in ipairs(ids) do
  local rec = redis.call('GET', created .. id)
  local ovl = redis.call('LRANGE', overlaid .. id, 0, -1)
  if (rec or #ovl > 0) and (pf == nil or #ovl > 0 or keep(rec)) then
    out[#out + 1] = '[' .. cjson.encode(id) .. ',' .. (rec or 'null') .. ',[' .. table.concat(ovl, ',') .. ']]'
  end
end
return '[' .. table.concat(out, ',') .. ']'
"""


@dataclass
class Buffered:
    """What the caches hold for one record."""
    created: dict[str, Any] | None          # the record as created, while its create is buffered
    overlays: list[dict[str, Any]] = field(default_factory=list)  # pending updates/deletes, in order

    @property
    def deleted(self) -> bool:
        return any(o.get("op") == "delete" for o in self.overlays)

    def touches(self, columns: set[str]) -> bool:
        return any(columns.intersection(o.get("data") or ()) for o in self.overlays)


@dataclass
class _Filters:
    sql: list[Any]                                       # clauses for the replica
    tests: list[Callable[[dict[str, Any]], bool]]        # the same, on JSON-form rows
    prefilter: dict[str, list[Any]]                      # equality sets for the Lua script
    columns: set[str]

    def match(self, row: dict[str, Any]) -> bool:
        return all(test(row) for test in self.tests)


class SmartQuery:
    def __init__(self, store: BufferStore, registry: ModelRegistry, replica_url: str | None):
        self.store = store
        self.registry = registry
        self.replica_url = replica_url
        self._engine: sa.Engine | None = None
        self._read = store.redis.register_script(_READ_BUFFERED)

    @property
    def engine(self) -> sa.Engine | None:
        if self._engine is None and self.replica_url:
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
        state = self.buffered(spec, [rid]).get(rid)          # 1. caches
        if state is not None and state.deleted:
            return None
        if state is not None and state.created is not None:
            return _overlay(spec, state.created, state.overlays)
        pk = spec.table.c[spec.primary_key]
        rows = self._select(spec, sa.select(spec.table).where(pk == _pk(spec, value)))  # 2.
        base = rows.get(rid)
        if base is None:
            return None
        return _overlay(spec, base, state.overlays) if state is not None else base

    def search(self, model: str, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        spec = self.registry.model(model)
        compiled = _compile(spec, filters or {})
        self._require_replica()
        buffered = self.buffered(spec, None, compiled.prefilter)   # 1. caches
        out: dict[str, dict[str, Any]] = {}
        by_id: list[str] = []        # overlay-only records whose overlays may change a filtered column
        overlaid: dict[str, Buffered] = {}
        hidden: set[str] = set()
        for rid, state in buffered.items():
            if state.deleted:
                hidden.add(rid)
            elif state.created is not None:
                row = _overlay(spec, state.created, state.overlays)
                if compiled.match(row):
                    out[rid] = row
            else:
                overlaid[rid] = state
                if compiled.sql and state.touches(compiled.columns):
                    by_id.append(rid)
        stmt = sa.select(spec.table)
        if compiled.sql:
            where = sa.and_(*compiled.sql)
            if by_id:
                pk = spec.table.c[spec.primary_key]
                where = sa.or_(where, pk.in_([_pk(spec, i) for i in by_id]))
            stmt = stmt.where(where)
        recheck = set(by_id)
        for rid, row in self._select(spec, stmt).items():      # 2. replica
            if rid in hidden or rid in buffered and buffered[rid].created is not None:
                continue
            state = overlaid.get(rid)
            if state is not None:
                row = _overlay(spec, row, state.overlays)
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
        data = {}
        for name, column in spec.columns.items():
            values = [row[name] for row in rows]
            data[name] = _series(pd, column, values)
        return pd.DataFrame(data, columns=list(spec.columns))

    # --- internals ----------------------------------------------------------------------------
    def buffered(self, spec: ModelSpec, ids: list[str] | None,
                 prefilter: dict[str, list[Any]] | None = None) -> dict[str, Buffered]:
        """id -> buffered state, for these ids or (None) every id in the model's index."""
        if ids is not None and not ids:
            return {}
        raw = self._read(args=[self.store.keys.prefix, spec.name,
                               json.dumps(prefilter, separators=(",", ":")) if prefilter else "", *(ids or ())])
        entries = json.loads(raw)
        return {str(rid): Buffered(created, overlays) for rid, created, overlays in entries}

    def _require_replica(self) -> None:
        if not self.replica_url:
            raise ConfigError("OBS_REPLICA_DB_URL is not set: smart queries (get/search) need the site's read "
                              "replica (e.g. `eval \"$(obs-pipeline stack env)\"` for the local stack)")

    def _select(self, spec: ModelSpec, stmt: sa.Select) -> dict[str, dict[str, Any]]:
        names = [c.key for c in spec.table.columns]
        convert = [_FROM_DB.get(spec.columns[n].kind, _same) for n in names]
        pk_index = names.index(spec.primary_key)
        for attempt in (1, 2):
            try:
                with self.engine.connect() as conn:
                    rows = conn.execute(stmt).all()
                break
            except exc.OperationalError as error:
                # A hot standby may cancel a query that conflicts with replay: try once more.
                if attempt == 2 or getattr(error.orig, "pgcode", None) != "40001":
                    raise
        out = {}
        for row in rows:
            record = {n: (None if v is None else f(v)) for n, f, v in zip(names, convert, row)}
            out[str(record[names[pk_index]])] = record
        return out


# --- merging --------------------------------------------------------------------------------

def _overlay(spec: ModelSpec, record: dict[str, Any], overlays: list[dict[str, Any]]) -> dict[str, Any]:
    """Every column of the model, pending updates applied per column, datetimes in UTC."""
    merged = {name: record.get(name) for name in spec.columns}
    for entry in overlays:
        if entry.get("op") == "update":
            for name, value in (entry.get("data") or {}).items():
                if name in merged:
                    merged[name] = value
    for name, column in spec.columns.items():
        if column.kind == "datetime":
            value = merged[name]
            if isinstance(value, str) and not value.endswith("+00:00"):
                merged[name] = _utc_iso(value)
    return merged


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


_FROM_DB: dict[str, Callable[[Any], Any]] = {
    "uuid": str,
    "datetime": _datetime_from_db,
    "date": lambda v: v.isoformat() if isinstance(v, dt.date) else v,
    "float": lambda v: float(v) if isinstance(v, decimal.Decimal) else v,
}


def _sort_key(spec: ModelSpec) -> Callable[[str], Any]:
    return int if spec.columns[spec.primary_key].kind == "int" else str


def _pk(spec: ModelSpec, value: Any) -> Any:
    """An id (as given, or the text form the index holds) -> the value bound to the statement."""
    column = spec.columns[spec.primary_key]
    if column.kind == "int" and isinstance(value, str):
        value = int(value)
    return column.to_python(column.check(value))


# --- filters --------------------------------------------------------------------------------

def _key(column: ColumnSpec) -> Callable[[Any], Any]:
    """JSON form -> a value that compares like the database compares the column."""
    if column.kind == "datetime":
        return _parse_utc
    if column.kind == "date":
        return lambda v: dt.date.fromisoformat(v) if isinstance(v, str) else v
    if column.kind == "float":
        return float
    return _same  # uuid (canonical lower-case text sorts like the bytes), int, str, bool, any


def _parse_utc(value: Any) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_UTC)


def _compile(spec: ModelSpec, filters: Any) -> _Filters:
    """Check the filters (unknown columns and operators are errors) and build the SQL clauses,
    the Python tests that agree with them, and the equality prefilter for the Lua script."""
    if not isinstance(filters, dict):
        raise InvalidTransaction(f"search filters on {spec.name} must be a dict of column -> value, "
                                 f"not {type(filters).__name__}")
    compiled = _Filters([], [], {}, set())
    for name, condition in filters.items():
        col = spec.column(name)
        if col.kind == "json":
            raise InvalidTransaction(f"search on {spec.name}.{name}: JSON columns cannot be filtered on")
        column, key = spec.table.c[name], _key(col)
        compiled.columns.add(name)
        try:
            if isinstance(condition, dict):
                if not condition:
                    raise InvalidTransaction(f"search on {spec.name}.{name}: empty comparison {{}}")
                for op, value in condition.items():
                    _comparison(spec, name, col, column, key, op, value, compiled)
            elif isinstance(condition, (list, tuple, set, frozenset)):
                values = [col.check(v) for v in condition if v is not None]
                with_null = any(v is None for v in condition)
                targets = {key(v) for v in values}
                clause = column.in_([col.to_python(v) for v in values])
                compiled.sql.append(sa.or_(clause, column.is_(None)) if with_null else clause)
                compiled.tests.append(lambda row, n=name, k=key, t=targets, z=with_null:
                                      (z if row.get(n) is None else k(row[n]) in t))
                if not with_null and col.kind in _PREFILTER_KINDS:
                    compiled.prefilter[name] = values
            else:
                _comparison(spec, name, col, column, key, "==", condition, compiled)
        except ValueError as error:
            if isinstance(error, InvalidTransaction):
                raise
            raise InvalidTransaction(f"search on {spec.name}.{name}: {error}") from None
    return compiled


def _comparison(spec: ModelSpec, name: str, col: ColumnSpec, column: Any, key: Callable[[Any], Any], op: Any,
                value: Any, compiled: _Filters) -> None:
    if op not in _COMPARISONS:
        raise InvalidTransaction(f"search on {spec.name}.{name}: unknown operator {op!r} "
                                 f"(use one of {', '.join(_COMPARISONS)})")
    if value is None:
        if op not in ("==", "!="):
            raise InvalidTransaction(f"search on {spec.name}.{name}: {op} null matches nothing; use == or !=")
        compiled.sql.append(column.is_(None) if op == "==" else column.is_not(None))
        compiled.tests.append((lambda row, n=name: row.get(n) is None) if op == "==" else
                              (lambda row, n=name: row.get(n) is not None))
        return
    if op not in ("==", "!=") and col.kind not in _ORDERED_KINDS:
        raise InvalidTransaction(f"search on {spec.name}.{name}: {op} needs an ordered column "
                                 f"({col.kind} is not); use == or a list")
    checked = col.check(value)
    target, compare = key(checked), _COMPARISONS[op]
    bound = col.to_python(checked)
    sql_column = column.collate("C") if col.kind == "str" and op not in ("==", "!=") else column
    compiled.sql.append(compare(sql_column, bound))
    compiled.tests.append(lambda row, n=name, k=key, t=target, c=compare:
                          row.get(n) is not None and c(k(row[n]), t))
    if op == "==" and col.kind in _PREFILTER_KINDS:
        compiled.prefilter[name] = [checked]


def _series(pd: Any, column: ColumnSpec, values: list[Any]) -> Any:
    if column.kind == "datetime":
        return pd.to_datetime(pd.Series(values, dtype="object"), utc=True, format="ISO8601")
    if column.kind in ("uuid", "str"):
        return pd.Series(values, dtype="string")
    if column.kind == "int":
        return pd.Series(values, dtype="Int64")
    if column.kind == "float":
        return pd.Series(values, dtype="Float64")
    if column.kind == "bool":
        return pd.Series(values, dtype="boolean")
    if column.kind == "date":
        return pd.to_datetime(pd.Series(values, dtype="object"), format="ISO8601")
    return pd.Series(values, dtype="object")
