"""Search filters, as SQL for the replica and as Python tests of buffered records.

Filters: equality, a list (or a set, a numpy array, a Series: _any_of) for "any of" (None in
it matches null), None for IS NULL, and `{op: value}` comparisons (`==`, `!=`, `<`, `<=`,
`>`, `>=`; ordering only on ordered columns). The replica runs them as SQL; buffered records
are tested in Python with the same semantics (datetimes compared as instants, text by code
point as `COLLATE "C"` does, CHAR(n) without its trailing spaces, a native enum by its labels'
declared order, a `time with time zone` by instant then offset, a `real` at single precision,
CITEXT lower-cased as the database's lower() does: see key_of).
Unknown columns or operators raise InvalidTransaction, as do values of the wrong type.
"""

from __future__ import annotations

import datetime as dt
import functools
import operator
from collections.abc import KeysView, ValuesView
from dataclasses import dataclass, field
from typing import Any, Callable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from obs_pipeline.column_values import fraction_step, kind_check, one_line_text, round_micros
from obs_pipeline.model_registry import ColumnSpec, InvalidTransaction, ModelSpec, is_single_precision
from obs_pipeline.read_forms import (as_real, datetime_rounded, interval_rounded, numeric_exact, numeric_places,
                                     parse_utc, unchanged)

_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}
_ORDERED_KINDS = {"int", "float", "str", "datetime", "date", "time", "timetz", "interval", "uuid"}
_UTC = dt.timezone.utc


@dataclass
class Filters:
    sql: list[Any]                                       # clauses for the replica
    tests: list[Callable[[dict[str, Any]], bool]]        # the same, on JSON-form rows
    unchecked: list[str] = field(default_factory=list)   # of types whose values only main knows
    column_sql: dict[str, list[Any]] = field(default_factory=dict)  # the clauses, by the column they test
    column_tests: dict[str, list[Callable[[dict[str, Any]], bool]]] = field(default_factory=dict)

    @property
    def columns(self) -> KeysView[str]:
        """The filtered columns: column_sql's keys, so that the two cannot disagree."""
        return self.column_sql.keys()

    def match(self, row: dict[str, Any]) -> bool:
        for test in self.tests:
            if not test(row):
                return False
        return True

    def match_columns(self, row: dict[str, Any], names: Any) -> bool:
        """The tests of the named columns only: a merged row's columns that hold buffered
        values (the replica's own are in their read form, which is not always what main
        compares: a TIME(0)'s 24:00:00 reads 00:00:00)."""
        return all(test(row) for name in names for test in self.column_tests.get(name, ()))

    def verdicts(self) -> list[tuple[str, Any]]:
        """(column, one SQL boolean of its clauses): what the replica says of each column's
        filter on its own row, selected beside it."""
        return [(name, sa.and_(*clauses)) for name, clauses in self.column_sql.items()]


def _value_key(column: ColumnSpec, type_: sa.types.TypeEngine, key: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The key of a filter's value: the row's, but a NUMERIC(p, s) column's rows are rounded
    to s places, and a TIMESTAMP(p)'s, TIME(p)'s or INTERVAL(p)'s seconds to p places, and the
    value is not (PostgreSQL compares `amount >= 1.234` as given)."""
    if column.exact_numeric:
        return numeric_exact
    return key_of(column, type_, rounded=False) if fraction_step(type_) is not None else key


def key_of(column: ColumnSpec, type_: sa.types.TypeEngine, rounded: bool = True,
           fold_case: Callable[[str], str] | None = None) -> Callable[[Any], Any]:
    """JSON form -> a value that compares like the database compares the column; `rounded`:
    a row's, whose TIMESTAMP(p), TIME(p) or INTERVAL(p) seconds the column keeps to p places;
    `fold_case`: how the database lower-cases CITEXT (ascii_lower, or unicode_lower), which it
    compares lower-cased (by code point under COLLATE "C", which ordering filters use)."""
    if column.case_insensitive:
        if fold_case is None:
            raise ValueError(f"{column.name} is CITEXT: compiled without the database's fold_case")
        return fold_case
    if column.padded:
        return _unpadded
    step = fraction_step(type_) if rounded else None
    if _native_enum(type_):
        return functools.partial(_enum_order, order={label: i for i, label in enumerate(type_.enums)})
    if column.kind == "datetime":
        return parse_utc if step is None else lambda v: parse_utc(datetime_rounded(v, step))
    if column.kind == "date":
        return lambda v: dt.date.fromisoformat(v) if isinstance(v, str) else v
    if column.kind == "time":
        return functools.partial(_time_order, step=step)
    if column.kind == "timetz":
        return functools.partial(_timetz_order, step=step)
    if column.kind == "float":
        if is_single_precision(type_):
            return as_real
        if column.exact_numeric:
            return functools.partial(numeric_exact, places=numeric_places(type_))
        return float
    if column.kind == "interval":
        return column.to_python if step is None else lambda v: column.to_python(interval_rounded(v, step))
    return unchanged  # uuid (canonical lower-case text sorts like the bytes), int, str, bool, any


def _unpadded(value: Any) -> Any:
    """CHAR(n) text as PostgreSQL compares it, without its trailing spaces: "ab" sorts before
    "ab\t" (compared padded, "ab " came after it, a tab being below a space)."""
    return value.rstrip(" ") if value.__class__ is str else value


def _native_enum(type_: sa.types.TypeEngine) -> bool:
    """A PostgreSQL enum type: ordered by its labels' declared order, not as text (and no
    collation applies to it); a non-native Enum is VARCHAR, ordered as text."""
    return isinstance(type_, sa.Enum) and bool(type_.native_enum)


def _enum_order(value: Any, order: dict[str, int]) -> int:
    """A native enum's label -> its place in the declaration, as PostgreSQL compares them."""
    return order.get(value, len(order))


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


def compile_filters(spec: ModelSpec, filters: Any,
                    fold_case: Callable[[str], str] | None = None) -> Filters:
    """Check the filters (unknown columns and operators are errors) and build the SQL clauses
    and the Python tests that agree with them (one test per column, parsing a value once).
    `fold_case`: see key_of, needed for a CITEXT column."""
    if not isinstance(filters, dict):
        raise InvalidTransaction(f"search filters on {spec.name} must be a dict of column -> value, "
                                 f"not {type(filters).__name__}")
    compiled = Filters([], [])
    for name, condition in filters.items():
        col = spec.column(name)
        if col.kind in ("json", "array"):
            raise InvalidTransaction(f"search on {spec.name}.{name}: {col.kind.upper()} columns cannot be filtered on")
        column = spec.sql_columns[name]
        key = key_of(col, column.type, fold_case=fold_case)
        value_key = _value_key(col, column.type, key)
        first_sql, first_test = len(compiled.sql), len(compiled.tests)
        if col.kind == "any" and col.impl_kind is None:
            compiled.unchecked.append(name)
        try:
            if isinstance(condition, dict):
                if not condition:
                    raise InvalidTransaction(f"search on {spec.name}.{name}: empty comparison {{}}")
                ops = []
                for op, value in condition.items():
                    ops.extend(_comparison(spec, name, col, column, value_key, op, value, compiled))
                if ops:
                    compiled.tests.append(_test(name, key, ops))
            elif _any_of(condition):
                condition = list(condition)
                values = [_checked(col, v) for v in condition if v is not None]
                with_null = any(v is None for v in condition)
                clause = column.in_([_bound(col, value_key, v) for v in values])
                compiled.sql.append(sa.or_(clause, column.is_(None)) if with_null else clause)
                if key is unchanged and col.kind == "any":  # any JSON value, a dict or a list too
                    found = _members([*values, *([None] if with_null else [])])
                    compiled.tests.append(lambda row, n=name, f=found: f(row.get(n)))
                elif key is unchanged:
                    targets = {value_key(v) for v in values}
                    targets |= {None} if with_null else set()
                    compiled.tests.append(lambda row, n=name, t=frozenset(targets): row.get(n) in t)
                else:
                    targets = {value_key(v) for v in values}
                    compiled.tests.append(lambda row, n=name, k=key, t=targets, z=with_null:
                                          (z if row.get(n) is None else k(row[n]) in t))
            else:
                ops = _comparison(spec, name, col, column, value_key, "==", condition, compiled)
                if ops:
                    compiled.tests.append(_test(name, key, ops))
        except ValueError as error:
            if isinstance(error, InvalidTransaction):
                raise
            raise InvalidTransaction(f"search on {spec.name}.{name}: {one_line_text(str(error))}") from None
        compiled.column_sql[name] = compiled.sql[first_sql:]
        compiled.column_tests[name] = compiled.tests[first_test:]
    return compiled


def _any_of(condition: Any) -> bool:
    """Is a filter's value a collection, meaning "any of"? A list, tuple or set, and what a
    script holds ids in besides: a range, a dict's keys or values, a 1-D numpy array, a pandas
    Series or Index (refused as 'array([...]) is not an integer')."""
    if isinstance(condition, (list, tuple, set, frozenset, range, KeysView, ValuesView)):
        return True
    return getattr(condition, "ndim", None) == 1 and callable(getattr(condition, "tolist", None))


def _members(values: list[Any]) -> Callable[[Any], bool]:
    """`value in values` for a column of a type only main knows, which holds, and is filtered
    by, any JSON value: a set of them raised `TypeError: unhashable type` from every search
    with a dict or a list among the filter's values or in a buffered record. Hashable values
    are looked up by hash, the rest by equality (a dict or a list equals no hashable value)."""
    table, rest = set(), []
    for value in values:
        try:
            table.add(value)
        except TypeError:
            rest.append(value)

    def contains(value: Any) -> bool:
        try:
            return value in table or value in rest
        except TypeError:
            return value in rest
    return contains


def _test(name: str, key: Callable[[Any], Any], ops: list[tuple[Callable[[Any, Any], bool], Any]]
          ) -> Callable[[dict[str, Any]], bool]:
    """A row test for comparisons of one column (never true for null)."""
    if key is unchanged and len(ops) == 1 and ops[0][0] is operator.eq:
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
                value: Any, compiled: Filters) -> list[tuple[Callable[[Any, Any], bool], Any]]:
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
    checked = _checked(col, value)
    compare = _COMPARISONS[op]
    as_text = col.kind == "str" and op not in ("==", "!=") and not _native_enum(column.type)
    sql_column = column.collate("C") if as_text else column
    compiled.sql.append(compare(sql_column, _bound(col, key, checked)))
    return [(compare, key(checked))]


def _checked(col: ColumnSpec, value: Any) -> Any:
    """A filter's value as the column's check gives it; for a site's TypeDecorator over a known
    type (kind "any", buffered as given), also of its impl's kind: the replica compares it as
    that and refused another with a raw ProgrammingError (`character varying = integer`)."""
    if col.impl_kind is not None:
        kind_check(col.impl_kind)(value)
    return col.check(value)


# What the replica answers to a filter's value it cannot compare with a column: a data
# exception (class 22: `invalid input syntax for type inet`), no such operator, a type mismatch,
# an ambiguous operator, no such cast (a list, sent as an array, to a range: `cannot cast type
# text[] to int4range`); or no code at all, psycopg2's own refusal to send it (`can't adapt`)
_REFUSED_VALUE_CODES = ("22", "42883", "42804", "42725", "42846")


def refused_value(spec: ModelSpec, compiled: Filters, error: Exception
                  ) -> InvalidTransaction | None:
    """The replica's refusal of a search's statement as one line, if a filtered column of a
    type only main knows can be to blame (the other columns' values were checked here); None
    for any other error, which is not the filter's."""
    first = _refusal(error) if compiled.unchecked else None
    if first is None:
        return None
    columns = ", ".join(f"{spec.name}.{name}" for name in compiled.unchecked)
    return InvalidTransaction(f"search on {columns}: the replica cannot compare the filter's value "
                              f"with the column: {first}")


def refused_key(spec: ModelSpec, value: Any, error: Exception, where: str) -> InvalidTransaction | None:
    """The replica's refusal of a key of a type only main knows (kind "any": taken as given,
    not checked here) as one line naming the model, the column and its type; None for any
    other error. It was SQLAlchemy's page of it (`invalid input syntax for type inet`,
    `operator does not exist: inet = integer`, `can't adapt type 'dict'`)."""
    column = spec.columns[spec.primary_key]
    first = _refusal(error) if column.kind == "any" else None
    if first is None:
        return None
    type_ = spec.sql_columns[spec.primary_key].type
    return InvalidTransaction(f"{where}: {spec.name}.{column.name} is of type {type_name(type_)}, which obs-pipeline "
                              f"does not check, and the replica cannot compare the key {value!r} with it: {first}; "
                              "give the key as the text PostgreSQL takes for that type")


def _refusal(error: Exception) -> str | None:
    """The first line of the replica's refusal of a value it cannot compare with a column, or
    None for any other error."""
    if not isinstance(error, (sa.exc.ProgrammingError, sa.exc.DataError)):
        return None
    code = getattr(error.orig, "pgcode", None)
    if code is not None and not code.startswith(_REFUSED_VALUE_CODES):
        return None
    return (str(error.orig).strip().splitlines() or [type(error.orig).__name__])[0]


def type_name(type_: sa.types.TypeEngine) -> str:
    """A column type as a site reads it: its class, and the SQL type it is where that differs
    (a TypeDecorator's or a UserDefinedType's: `Address (INET)`)."""
    try:
        sql = type_.compile(dialect=postgresql.dialect())
    except Exception:  # noqa: BLE001 - a site's type that cannot say (get_col_spec missing)
        return type(type_).__name__
    return sql if sql == type(type_).__name__ else f"{type(type_).__name__} ({sql})"


def _bound(col: ColumnSpec, key: Callable[[Any], Any], value: Any) -> Any:
    """A filter value bound to the replica's statement: for a `real` column, at single
    precision, as the Python test takes it (see as_real); a NUMERIC's exactly (as a float,
    2**53 + 1 was sent as 2**53)."""
    return key(value) if key is as_real or key is numeric_exact else col.to_python(value)


def series(pd: Any, column: ColumnSpec, values: list[Any]) -> Any:
    # Datetimes and dates at microseconds, as PostgreSQL keeps them, built from Python's: pandas
    # before 3.0 parses text to nanoseconds, years 1677-2262 only, and search_frame raised
    # OutOfBoundsDatetime for a row of 9999-12-31 (ingest takes years 1-9999).
    if column.kind == "datetime":
        stamps = [None if v is None else parse_utc(v) for v in values]  # (naive: UTC, as to_datetime(utc=True))
        return pd.Series(pd.array(stamps, dtype=pd.DatetimeTZDtype(unit="us", tz="UTC")))
    if column.kind == "date":
        days = [dt.datetime.fromisoformat(v) if isinstance(v, str) else v for v in values]
        return pd.Series(pd.array(days, dtype="datetime64[us]"))
    if column.kind in ("uuid", "str"):
        return pd.Series(values, dtype="string")
    if column.kind == "int":
        return pd.Series(values, dtype="Int64")
    if column.kind == "float":
        return pd.Series(values, dtype="Float64")
    if column.kind == "bool":
        return pd.Series(values, dtype="boolean")
    return pd.Series(values, dtype="object")
