"""How reads show a column's values: a replica row and a buffered record in one form.

A record is buffered as the JSON its transaction wrote, and read from the replica as psycopg2
gives it; both are shown as the buffered JSON form (uuids and datetimes as ISO text), rounded
as main stores the column (NUMERIC(p, s), TIMESTAMP(p), REAL), so that a row reads the same
before and after the drain and merging by key never doubles a record.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import functools
import struct
import uuid
from typing import Any, Callable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from obs_pipeline.column_values import (fraction_step, interval_text, numeric_size, parse_interval, round_seconds,
                                       single_float)
from obs_pipeline.model_registry import ColumnSpec, ModelSpec, is_single_precision

_UTC = dt.timezone.utc


def read_forms(spec: ModelSpec) -> tuple[tuple[str, Callable[[Any], Any]], ...]:
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
        return functools.partial(datetime_rounded if isinstance(type_, sa.DateTime) else interval_rounded, step=step)
    if is_single_precision(type_):
        return _single_float
    places = numeric_places(type_)
    if places is not None:
        return functools.partial(numeric_rounded, places=places)
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


def numeric_places(type_: sa.types.TypeEngine) -> decimal.Decimal | None:
    """The places a NUMERIC(p, s) column keeps (Decimal('0.01') for s = 2; NUMERIC(p) keeps
    none); None for a NUMERIC that rounds nothing (a scale without a precision too), and for a
    float: the size ingest's range check takes (column_values.numeric_size)."""
    size = numeric_size(type_)
    return None if size is None else decimal.Decimal(1).scaleb(-size[1])


# Digits enough for any float, or NUMERIC(1000, s), rounded to a scale PostgreSQL allows (1,000
# places): decimal's default context holds 28, and a NUMERIC(38, 10)'s 1e20 rounded needs 31
# (quantize refused it, and the replica's row read as its Decimal: under another key's text).
_QUANTIZING = decimal.Context(prec=2400)


def numeric_rounded(value: Any, places: decimal.Decimal) -> Any:
    """A number as a NUMERIC(p, s) column keeps it: its decimal text rounded to s places, half
    away from zero, as PostgreSQL rounds (1.235 -> 1.24); read as a float like the column's
    other values (psycopg2 gives the replica's as a Decimal). + 0.0: numeric has no negative
    zero (-0.001 is 0.00), and -0.0 read so while buffered."""
    try:
        exact = value if isinstance(value, decimal.Decimal) else decimal.Decimal(repr(value))
        return float(exact.quantize(places, decimal.ROUND_HALF_UP, context=_QUANTIZING)) + 0.0
    except (decimal.InvalidOperation, ValueError, TypeError):  # beyond the column (main refuses it), or not a number
        return value


def numeric_exact(value: Any, places: decimal.Decimal | None = None) -> Any:
    """A number as a NUMERIC column compares it, for filters: exactly (its decimal text, as
    the drain sends it), rounded to s places for a NUMERIC(p, s), half away from zero. Compared
    as floats, a buffered 2**53 + 1 matched == 2**53, which the replica's row did not."""
    try:
        exact = value if isinstance(value, decimal.Decimal) else decimal.Decimal(repr(value))
        return exact if places is None else exact.quantize(places, decimal.ROUND_HALF_UP, context=_QUANTIZING)
    except (decimal.InvalidOperation, ValueError, TypeError):  # not a number: main refuses it
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


def datetime_rounded(value: Any, step: int) -> Any:
    """A TIMESTAMP(p)'s value (ISO text, or the replica's datetime) as ISO text in UTC, its
    seconds rounded to p places as PostgreSQL stores it: counted from 2000-01-01, so that
    1999-12-31T23:59:59.5 rounds to :59 in a TIMESTAMP(0) and 2000-01-01T00:00:00.5 to :01."""
    try:
        return round_seconds(parse_utc(value), step).isoformat()
    except (ValueError, TypeError, OverflowError):  # not a datetime, or rounded beyond year 9999: as it is
        return _datetime_from_db(value)


def interval_rounded(value: Any, step: int) -> Any:
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


def datetime_columns(spec: ModelSpec) -> list[str]:
    return [name for name, column in spec.columns.items() if column.kind == "datetime"]


def float_columns(spec: ModelSpec) -> list[str]:
    return [name for name, column in spec.columns.items() if column.kind == "float"]


def utc_iso(value: str) -> str:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return value
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=_UTC)).astimezone(_UTC).isoformat()


def _datetime_from_db(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=_UTC)).astimezone(_UTC).isoformat()
    return value


def unchanged(value: Any) -> Any:
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


def from_db(column: ColumnSpec) -> Callable[[Any], Any]:
    """A replica value -> its JSON form, as buffered. SQLAlchemy reads an Enum of a Python enum
    class as the class's members (an array's elements too): they read as their labels."""
    if column.choices is not None and any(isinstance(choice, enum.Enum) for choice in column.choices):
        label = functools.partial(_label, labels=column.choices)
        return functools.partial(_each, form=label) if column.kind == "array" else label
    return _FROM_DB.get(column.kind, unchanged)


def _label(value: Any, labels: dict[Any, str]) -> Any:
    return labels.get(value, value) if isinstance(value, enum.Enum) else value


def sort_key(spec: ModelSpec) -> Callable[[str], Any]:
    return int if spec.columns[spec.primary_key].kind == "int" else str


def bound_key(spec: ModelSpec, value: Any) -> Any:
    """An id (as given, or the text form the index holds) -> the value bound to the statement;
    a REAL key at single precision, as a filter's value (as_real): bound as 0.1, it is not
    the row's 0.1 (`real '0.1' = 0.1` is false), and get said None once replicated."""
    column = spec.columns[spec.primary_key]
    if column.kind in ("int", "float") and isinstance(value, str):
        value = int(value) if column.kind == "int" else float(value)
    value = column.to_python(column.check(value))
    return as_real(value) if column.float_bits == 32 else value


def as_real(value: Any) -> float:
    """A number as a `real` column holds it (single precision), as the double PostgreSQL
    compares it as. Filter values are taken so too (in SQL as well): 0.1 finds the row that
    reads 0.1, which PostgreSQL would not (`real '0.1' = 0.1` is false)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except (OverflowError, struct.error):  # beyond `real`: no row holds it, compare as it is
        return float(value)


def parse_utc(value: Any) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_UTC)
