"""How one column's values are checked and converted: JSON form in, the value main stores out.

Each check takes what a script or a producer gave (JSON, or a Python value a script holds:
a datetime, a Decimal, numpy's scalars) and returns the JSON form the buffer keeps, refusing
what main would refuse later, in the drain, where the transaction could only be dead-lettered.
A key takes exactly the value main stores (rounded as main rounds it): records are filed
under their key's text, and the replica's row must land under the same text. Pure functions
(only fraction_step looks at a SQLAlchemy type): model_registry builds each column's check
from these, and reads (query) round and show values with the same ones.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import numbers
import re
import struct
import sys
import uuid
from typing import Any, Callable

from sqlalchemy.sql import sqltypes

from obs_pipeline import json_codec
from obs_pipeline.network_input import network_text


def converter(kind: str, int_bits: int, float_bits: int, max_length: int | None,
             padded: bool, numeric: tuple[int, int] | None = None,
             interval_unit: int | None = None) -> Callable[[Any], Any]:
    if kind == "interval" and interval_unit is not None:
        return lambda value: interval_text(truncate_interval(parse_interval(value), interval_unit))
    if kind == "float" and numeric is not None:
        return numeric_of(*numeric)
    if kind == "int":
        return _int_of(int_bits)
    if kind == "float" and float_bits == 32:
        return _single_float_json
    if kind == "str" and max_length is not None:
        return _str_of(max_length, padded)
    return _TO_JSON[kind]


def one_line_text(text: str) -> str:
    """`text` folded onto one line if it runs over several (a pandas Series's repr does)."""
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


def shown(value: Any) -> str:
    """repr(value) for a one-line message."""
    return one_line_text(repr(value))


def whole_number(value: Any, refusal: str, least: int = 0, most: int | None = None) -> int:
    """A count given by a caller (ingest's max_retries, DrainConfig's sizes) as an int: any
    Integral, np.int64 from a DataFrame or an array too (no `int` to isinstance), but a bool;
    else ValueError starting with `refusal`."""
    if (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least
            and (most is None or value <= most)):
        return int(value)
    raise ValueError(f"{refusal}, not {shown(value)}")


def seconds(value: Any, refusal: str, least: float = -math.inf, finite: bool = False,
            most: float = math.inf) -> float:
    """Seconds given by a caller (wait's timeout, DrainConfig's pauses) as a float: any real
    number (np.float32, a Fraction, a Decimal), but a bool or NaN, from `least` to `most`, and
    finite if asked; else ValueError starting with `refusal`."""
    if isinstance(value, (numbers.Real, decimal.Decimal)) and not isinstance(value, bool):
        try:
            as_float = float(value)
        except (ValueError, OverflowError):  # a signalling NaN, a Fraction beyond a float
            as_float = math.nan
        if least <= as_float <= most and (as_float < math.inf or not finite):  # (NaN is neither)
            return as_float
    raise ValueError(f"{refusal}, not {shown(value)}")


def checker(convert: Callable[[Any], Any], nullable: bool) -> Callable[[Any], Any]:
    if nullable:
        return lambda value: None if value is None else convert(value)

    def check_not_null(value: Any) -> Any:
        if value is None:
            raise ValueError("may not be null")
        return convert(value)
    return check_not_null


CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


_is_canonical_uuid = CANONICAL_UUID.fullmatch


def _uuid_json(value: Any) -> str:
    if isinstance(value, str):  # (no class is both a str and a UUID)
        if _is_canonical_uuid(value):  # fast path: already canonical
            return value
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    elif isinstance(value, uuid.UUID):
        return str(value)
    raise ValueError(f"{value!r} is not a UUID")


def _int_json(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and not _is_bool(value):  # numpy's integers (np.int64 from a DataFrame)
        return int(value)
    raise ValueError(f"{value!r} is not an integer")


def _is_bool(value: Any) -> bool:
    """A bool, or numpy's (np.bool_, np.True_), which is no `bool` to isinstance; numpy is not imported."""
    if isinstance(value, bool):
        return True
    dtype = getattr(value, "dtype", None)
    return getattr(dtype, "kind", None) == "b" and getattr(value, "shape", None) == ()


def _int_of(bits: int) -> Callable[[Any], int]:
    """An integer that fits the column (PostgreSQL refuses the rest, later, in the drain)."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def check(value: Any) -> int:
        value = _int_json(value)
        if not low <= value <= high:
            raise ValueError(f"{value!r} is out of range for a {bits}-bit integer column")
        return value
    return check


def _float_json(value: Any) -> float | int:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number (JSON has no NaN or infinity)")
        if isinstance(value, int) and not -sys.float_info.max <= value <= sys.float_info.max:
            # (reads give a float column's values as floats: this one has none)
            raise ValueError("the integer is beyond the range of a float (about 1.8e308)")
        return value
    if isinstance(value, decimal.Decimal):  # what the ORM gives a Numeric column: JSON and reads keep a float
        if value.is_finite() and decimal.Decimal(repr(float(value))) == value:
            return float(value)
        raise ValueError(f"{value!r} has more digits than a float keeps (a float column's values are buffered "
                         "and read as floats)")
    if isinstance(value, numbers.Real) and not _is_bool(value):  # numpy's np.float32, np.int64 (np.float64 is a float)
        if isinstance(value, numbers.Integral):
            return _float_json(int(value))
        number = float(value)
        if number == value or not math.isfinite(number):
            return _float_json(number)
        raise ValueError(f"{value!r} has no exact float (a float column's values are buffered and read as floats)")
    raise ValueError(f"{value!r} is not a number")


def float_key(convert: Callable[[Any], Any], numeric: tuple[int, int] | None,
               float_bits: int = 64, exact_numeric: bool = False) -> Callable[[Any], float]:
    """A float column that names a row (its key, or a foreign key to one) takes the value main
    stores: a float, rounded to a NUMERIC(p, s)'s s places, or a REAL's single precision (as
    it reads: 0.123456789 as 0.12345679). Records are filed under their key's text, and the
    replica's row reads as "5.0", "1.23" or "0.12345679": kept as given (5, 1.234,
    0.123456789), a buffered record, its overlays and its replicated row went under different
    ids. A NUMERIC key (`exact_numeric`) a float does not hold is refused: main keeps NUMERIC
    exactly, and took the float sent for 1735689600000000001 (1735689600000000000), while another
    key given, ...002, was refused as "created twice"."""
    step = None if numeric is None else decimal.Decimal(1).scaleb(-numeric[1])
    # as numeric_of's: the default context's 28 digits refuse a NUMERIC(38, 10)'s 1e20 rounded
    exact = None if numeric is None else decimal.Context(prec=numeric[0] + abs(numeric[1]) + 330)

    def check(value: Any) -> float:
        value = given = convert(value)
        if step is not None:
            value = decimal.Decimal(repr(value)).quantize(step, rounding=decimal.ROUND_HALF_UP, context=exact)
        if exact_numeric:  # main keeps the float's text (repr), which the drain sends
            sent = decimal.Decimal(repr(float(value)))
            if sent != (value if isinstance(value, decimal.Decimal) else decimal.Decimal(repr(value))):
                raise ValueError(f"{given!r} would not be kept as given: a NUMERIC key is filed and read as a float, "
                                 f"which main would keep as {sent:f}; give it 15 significant digits or fewer, or "
                                 "make the column an integer (BIGINT)")
        # + 0.0: -0.0 as 0.0 (a NUMERIC has no negative zero, -0.001 in a NUMERIC(10, 2) is 0.00,
        # and -0 = 0 for a REAL or a double too): filed under "-0.0", the row read "0.0"
        return (single_float(float(value)) if float_bits == 32 else float(value)) + 0.0
    return check


def fraction_key(convert: Callable[[Any], Any], kind: str, step: int) -> Callable[[Any], str]:
    """A TIMESTAMP(p), TIME(p) or INTERVAL(p) column that names a row takes the value main
    stores: its seconds rounded to p places. Records are filed under their key's text, and the
    replica's row reads rounded (00:00:01): kept as given (00:00:00.6), a buffered record, its
    overlays and its replicated row went under different ids."""
    parse = {"datetime": dt.datetime.fromisoformat, "interval": parse_interval}.get(kind, dt.time.fromisoformat)
    write = interval_text if kind == "interval" else _isoformat

    def check(value: Any) -> str:
        return write(round_seconds(parse(convert(value)), step))
    return check


def _isoformat(value: dt.datetime | dt.time) -> str:
    return value.isoformat()


def network_of(convert: Callable[[Any], Any], type_: str) -> Callable[[Any], Any]:
    """An INET, CIDR or MACADDR column (`type_`; an array's elements too) takes its text as main
    writes it back (network_text): records are filed under their key's text, and the replica's
    row reads 10.0.0.3 where 10.0.0.3/32 was given (a search showed the row twice once
    replayed, get said None); a value read one way buffered and another replicated, and
    filters missed it."""
    def check(value: Any) -> Any:
        value = convert(value)
        return None if value is None else network_text(value, type_)  # (text only: see network_text)
    return check


# Main reads a REAL's value from its text (the repr the drain sends) and refuses one that rounds
# to infinity or, not being 0, to 0 ("value out of range"): at or beyond halfway past REAL's
# largest value, at or below halfway to its smallest.
_SINGLE_OVERFLOW = decimal.Decimal(2 ** 128 - 2 ** 103)
_SINGLE_UNDERFLOW = decimal.Decimal(2.0 ** -150)


def _single_float_json(value: Any) -> float | int:
    """A number a REAL column takes: the drain would otherwise have main refuse the whole
    transaction, hours after the script could have been told."""
    value = _float_json(value)
    if value and not 1.5e-45 < abs(value) < 3.4e38:  # (most values: no exact look needed)
        size = decimal.Decimal(repr(abs(value)))
        if size >= _SINGLE_OVERFLOW or size <= _SINGLE_UNDERFLOW:
            raise ValueError(f"{value!r} is out of range for a REAL (single-precision) column: PostgreSQL takes "
                             "0 and magnitudes from about 1e-45 to 3.4e38")
    return value


def single_float(value: float) -> float:
    """As `real` keeps it: single precision, shown with the fewest digits that give it back."""
    single = struct.unpack("f", struct.pack("f", value))[0]
    for digits in range(1, 10):
        shown = float(f"{single:.{digits}g}")
        if struct.unpack("f", struct.pack("f", shown))[0] == single:
            return shown
    return single


def numeric_of(precision: int, scale: int) -> Callable[[Any], float | int]:
    """A number a NUMERIC(p, s) column takes: main rounds the text the drain sends (repr) to s
    places, half away from zero, and refuses one that then needs more than p - s digits before
    the point ("numeric field overflow"). Refused at once, not dead-lettered hours after the
    script could have been told. The value is kept as given: main rounds it, reads round it
    alike (query.py)."""
    step = decimal.Decimal(1).scaleb(-scale)
    limit = decimal.Decimal(1).scaleb(precision - scale)
    exact = decimal.Context(prec=precision + abs(scale) + 330)  # enough for any float: quantize alone rounds

    def check(value: Any) -> float | int:
        value = _float_json(value)
        if abs(decimal.Decimal(repr(value)).quantize(step, rounding=decimal.ROUND_HALF_UP, context=exact)) >= limit:
            places = f"{scale} decimal place{'s' if scale != 1 else ''}" if scale >= 0 else f"{-scale} zeros"
            raise ValueError(f"{value!r} is out of range for a NUMERIC({precision}, {scale}) column: PostgreSQL "
                             f"takes magnitudes below {limit:,f} once rounded to {places}")
        return value
    return check


def _str_json(value: Any) -> str:
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("text may not contain NUL characters")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON): no database can store it
                raise ValueError(f"{value!r} is not valid Unicode text (a lone surrogate)") from None
        return value
    raise ValueError(f"{value!r} is not a string")


def _str_of(length: int, padded: bool) -> Callable[[Any], str]:
    """Text that fits a VARCHAR(n) or CHAR(n) column, as PostgreSQL stores it: longer text is
    refused, but for trailing spaces, which it drops; CHAR(n) pads it with spaces to n."""
    def check(value: Any) -> str:
        value = _str_json(value)
        if len(value) > length:
            if value[length:].strip(" "):
                raise ValueError(f"text of {len(value)} characters is longer than the column's {length}")
            value = value[:length]
        return value.ljust(length) if padded else value
    return check


def array_of(item: Callable[[Any], Any]) -> Callable[[Any], list]:
    """A list of values of the element's kind, or null; lists in it are further dimensions."""
    def check(value: Any) -> list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{value!r} is not a list")
        try:
            return [None if v is None else check(v) if isinstance(v, (list, tuple)) else item(v) for v in value]
        except RecursionError:
            raise ValueError("the list is nested too deeply") from None
    return check


def one_of(choices: dict[Any, str]) -> Callable[[Any], str]:
    """An enum's label. Main refuses anything else for a native enum, later, in the drain; a
    non-native enum's column would store it, for the ORM to fail on when it reads the row."""
    labels = ", ".join(dict.fromkeys(choices.values()))

    def check(value: Any) -> str:
        try:
            return choices[value]
        except (KeyError, TypeError):  # (TypeError: unhashable, a list say)
            raise ValueError(f"{value!r} is not one of the enum's labels ({labels})") from None
    return check


def _bool_json(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if _is_bool(value):  # numpy's np.True_
        return bool(value)
    raise ValueError(f"{value!r} is not a boolean")


def _iso(value: Any, type_: type, what: str) -> Any:
    """`value` if it is a `type_`, or parsed from ISO-8601 text; else one line naming `what`."""
    if isinstance(value, type_):
        return value
    if isinstance(value, str):
        try:
            return type_.fromisoformat(value)
        except ValueError:
            pass
    raise ValueError(f"{value!r} is not an ISO-8601 {what}")


def _is_datetime64(value: Any) -> bool:
    """numpy's datetime64 (an element of a datetime column's array: `df["t"].to_numpy()[0]`),
    which is no datetime to isinstance; numpy is not imported."""
    dtype = getattr(value, "dtype", None)
    return getattr(dtype, "kind", None) == "M" and getattr(value, "shape", None) == ()


_BEYOND_MICROS = re.compile(r"\.[0-9]{6}([0-9]+)$")


def _numpy_datetime(value: Any) -> dt.datetime:
    """A datetime64 as a naive datetime (UTC, as naive times are), its nanoseconds rounded to
    microseconds as main rounds them (half to even), as a pandas Timestamp's are. Its NaT is no
    time at all; a year or a month alone is no datetime."""
    if value != value:  # NaT equals nothing, itself included
        raise ValueError(f"{value!r} is not a time (numpy's missing value): give None for no value")
    text = str(value)
    try:
        parsed = dt.datetime.fromisoformat(text)  # (which cuts a fraction to microseconds)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO-8601 datetime") from None
    beyond = _BEYOND_MICROS.search(text)
    if beyond:
        digits = beyond.group(1)
        rest, half = int(digits), 5 * 10 ** (len(digits) - 1)
        if rest > half or rest == half and parsed.microsecond % 2:
            parsed += dt.timedelta(microseconds=1)
    return parsed


def _parse_datetime(value: Any) -> dt.datetime:
    if _is_datetime64(value):
        value = _numpy_datetime(value)
    parsed = _iso(value, dt.datetime, "datetime")
    if parsed.__class__ is not dt.datetime:  # a subclass: pandas' Timestamp, say
        parsed = _plain_datetime(parsed)
    # Naive times are taken as UTC: the site clock and the wire format are UTC.
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def _plain_datetime(value: dt.datetime) -> dt.datetime:
    """A datetime subclass as a datetime. pandas' Timestamp writes its nanoseconds in
    isoformat(): buffered so, it read .000000999 until replicated and .000001 after, as main
    rounds them (the drain's check cut them to .000000); they are rounded here, as main does
    (half to even, PostgreSQL's rint). Its NaT (a datetime to isinstance) is no time at all."""
    if value != value:  # NaT equals nothing, itself included
        raise ValueError(f"{value!r} is not a time (pandas' missing value): give None for no value")
    plain = dt.datetime(value.year, value.month, value.day, value.hour, value.minute, value.second,
                        value.microsecond, value.tzinfo, fold=getattr(value, "fold", 0))
    nanos = getattr(value, "nanosecond", 0)
    if nanos > 500 or nanos == 500 and plain.microsecond % 2:
        plain += dt.timedelta(microseconds=1)
    return plain


# What _datetime_json writes: UTC, to the second or to the microsecond (isoformat leaves out a
# fraction of 0); or the same with Z for +00:00.
_CANONICAL_UTC = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.(?!0{6})[0-9]{6})?(?:\+00:00|Z)")


def _datetime_json(value: Any) -> str:
    """In UTC: a `timestamp without time zone` column drops the offset of what it is given
    (02:00+02:00 would be stored as 02:00), and reads take its values as UTC.

    Text already in that form (every datetime the drain reads from a transaction ingest wrote),
    or in it but for a Z, is only checked to be a real date and time, not written again: 1.2 us
    a value instead of 4.0 (isoformat() of an aware datetime alone takes 2.8)."""
    if value.__class__ is str and _CANONICAL_UTC.fullmatch(value):
        try:
            dt.datetime.fromisoformat(value)  # (not the 30th of February)
        except ValueError:
            pass  # refused below, with the usual message
        else:
            return value if value[-1] != "Z" else value[:-1] + "+00:00"
    try:
        return _parse_datetime(value).astimezone(dt.timezone.utc).isoformat()
    except OverflowError:
        raise ValueError(f"{value!r} is outside years 1-9999 once in UTC") from None


def _parse_date(value: Any) -> dt.date:
    if isinstance(value, dt.datetime):  # a date too, to isinstance: the time of day would be dropped
        raise ValueError(f"{value!r} is not an ISO-8601 date")
    if _is_datetime64(value):  # a day's ('2025-01-01') is its date; one with a time of day is refused
        if value != value:
            raise ValueError(f"{value!r} is not a date (numpy's missing value): give None for no value")
        try:
            return dt.date.fromisoformat(str(value))
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO-8601 date") from None
    return _iso(value, dt.date, "date")


def _parse_time(value: Any, with_zone: bool) -> dt.time:
    """A time of day, as PostgreSQL stores it: without its offset in a TIME column (PostgreSQL
    drops it), with one in a TIME WITH TIME ZONE column (UTC if none is given)."""
    parsed = _iso(value, dt.time, "time of day")
    if not with_zone:
        return parsed.replace(tzinfo=None)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


# A TIME WITH TIME ZONE's offset, as PostgreSQL takes it: whole seconds, under 16 hours either way
_TIMETZ_OFFSET_LIMIT = dt.timedelta(hours=16)


def _timetz_json(value: Any) -> str:
    """A time of day with its offset, which main must take: Python's go up to ±23:59:59.999999."""
    parsed = _parse_time(value, True)
    offset = parsed.utcoffset()
    if offset is None:  # a ZoneInfo: no offset without a date, and main would take its own zone's
        raise ValueError(f"{value!r} has a time zone whose offset depends on the date: give a fixed offset "
                         "(+01:00) for a TIME WITH TIME ZONE column")
    if offset.microseconds or not -_TIMETZ_OFFSET_LIMIT < offset < _TIMETZ_OFFSET_LIMIT:
        raise ValueError(f"{value!r} has an offset PostgreSQL refuses: a TIME WITH TIME ZONE takes offsets of "
                         "whole seconds within ±15:59:59")
    return parsed.isoformat()


# ISO-8601 duration text of weeks, days, hours, minutes and (to the microsecond) seconds, each
# with its own sign as PostgreSQL reads it: what a timedelta is, and what `interval_text` writes.
_DURATION = re.compile(r"P(?!$)(?:([-+]?\d+)W)?(?:([-+]?\d+)D)?"
                       r"(?:T(?=[-+\d])(?:([-+]?\d+)H)?(?:([-+]?\d+)M)?(?:([-+]?\d+(?:\.\d{1,6})?)S)?)?")


def parse_interval(value: Any) -> dt.timedelta:
    if isinstance(value, dt.timedelta):
        return value
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a duration: give a datetime.timedelta, or ISO-8601 duration text of "
                         "weeks, days, hours, minutes and seconds (P1DT2H30M, PT0.5S)")
    weeks, days, hours, minutes, seconds = (decimal.Decimal(f or 0) for f in match.groups())
    try:
        return dt.timedelta(weeks=int(weeks), days=int(days), hours=int(hours), minutes=int(minutes),
                            seconds=int(seconds), microseconds=int(seconds % 1 * 1_000_000))
    except OverflowError:
        raise ValueError(f"{value!r} is beyond a timedelta's ±999999999 days") from None


def interval_text(value: dt.timedelta) -> str:
    """The JSON form of an interval: ISO-8601 text, which main takes as the ORM's timedelta
    (its days, then the rest as a time of day) and reads give back, buffered or replicated."""
    hours, rest = divmod(value.seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    fraction = f".{value.microseconds:06d}".rstrip("0") if value.microseconds else ""
    time = "".join(f"{n}{unit}" for n, unit in ((hours, "H"), (minutes, "M")) if n)
    time += f"{seconds}{fraction}S" if seconds or fraction else ""
    if not (value.days or time):
        return "PT0S"
    return "P" + (f"{value.days}D" if value.days else "") + (f"T{time}" if time else "")


PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)  # PostgreSQL counts a timestamp's microseconds from here
_DAY_US = 86_400_000_000


def numeric_size(type_: sqltypes.TypeEngine) -> tuple[int, int] | None:
    """(precision, scale) of NUMERIC(p, s) / NUMERIC(p) (scale 0); None for NUMERIC alone, which
    takes any size (a scale without a precision too: SQLAlchemy writes plain NUMERIC then), and
    for Float, whose precision counts bits. Ingest's range check and reads' rounding both ask it."""
    if isinstance(type_, sqltypes.Numeric) and not isinstance(type_, sqltypes.Float) and type_.precision:
        return type_.precision, type_.scale or 0
    return None


def fraction_step(type_: sqltypes.TypeEngine) -> int | None:
    """The microseconds to which a TIMESTAMP(p), TIME(p) or INTERVAL(p) column rounds its
    seconds (10 ** (6 - p)); None for one that keeps all six places."""
    if isinstance(type_, sqltypes.Interval):  # (a TypeDecorator: PostgreSQL's INTERVAL(second_precision))
        places = type_.second_precision
    elif isinstance(type_, (sqltypes.DateTime, sqltypes.Time, sqltypes._AbstractInterval)):
        places = getattr(type_, "precision", None)
    else:
        return None
    return None if places is None or places >= 6 else 10 ** (6 - places)


# What an INTERVAL of fields keeps of a time of day, by its last field: its microseconds cut to
# whole hours or minutes, none of it (DAY), or nothing at all (YEAR, MONTH: no days either)
_INTERVAL_UNITS = {"year": 0, "month": 0, "day": _DAY_US, "hour": 3_600_000_000, "minute": 60_000_000}


def interval_unit(type_: sqltypes.TypeEngine) -> int | None:
    """What PostgreSQL keeps of an INTERVAL of fields (`INTERVAL(fields="day")`, "hour to
    minute"): its time of day cut to this many microseconds (0: no days or time either); None
    for one without fields, or whose fields end in SECOND, which keeps it all."""
    fields = getattr(type_, "fields", None) if isinstance(type_, sqltypes._AbstractInterval) else None
    return _INTERVAL_UNITS.get(fields.split()[-1].lower()) if isinstance(fields, str) and fields.split() else None


def truncate_interval(value: dt.timedelta, unit: int) -> dt.timedelta:
    """A timedelta as an INTERVAL of fields keeps it (see interval_unit): its days, and its time
    of day cut toward zero to `unit`, as PostgreSQL cuts the time of the text the drain sends
    (days, then a time of day of 0 or more: interval_text)."""
    if not unit:
        return dt.timedelta(0)
    rest = value.seconds * 1_000_000 + value.microseconds
    return dt.timedelta(days=value.days, microseconds=rest - rest % unit)


def round_micros(micros: int, step: int) -> int:
    """Half away from zero, as PostgreSQL rounds the microseconds it keeps to a precision."""
    rounded = (abs(micros) + step // 2) // step * step
    return rounded if micros >= 0 else -rounded


def round_seconds(value: Any, step: int) -> Any:
    """An aware datetime, a time or a timedelta with its seconds rounded to `step` microseconds,
    as PostgreSQL stores a TIMESTAMP(p), TIME(p) or INTERVAL(p): a timestamp counted from
    2000-01-01 (1999-12-31T23:59:59.5 rounds to :59 in a TIMESTAMP(0), 2000-01-01T00:00:00.5 to
    :01), a time within its day (a TIME(0)'s 23:59:59.6 is 24:00:00, which a time holds as
    00:00:00, as psycopg2 reads it), an interval's time after its days."""
    if isinstance(value, dt.datetime):
        micros = (value - PG_EPOCH) // dt.timedelta(microseconds=1)
        return PG_EPOCH + dt.timedelta(microseconds=round_micros(micros, step))
    if isinstance(value, dt.timedelta):
        rest = value.seconds * 1_000_000 + value.microseconds
        return dt.timedelta(days=value.days, microseconds=round_micros(rest, step))
    micros = ((value.hour * 60 + value.minute) * 60 + value.second) * 1_000_000 + value.microsecond
    micros = round_micros(micros, step) % _DAY_US
    return dt.time(micros // 3_600_000_000, micros // 60_000_000 % 60, micros // 1_000_000 % 60,
                   micros % 1_000_000, tzinfo=value.tzinfo)


def _binary_json(value: Any) -> Any:
    """Bytes have no JSON form, and text would reach main as bytes the script did not mean: a
    binary column can only be left out or null."""
    raise ValueError(f"{type(value).__name__} values cannot be buffered for a binary column: leave it out or null")


# \u0000 in JSON text, not a literal backslash before "u0000" (written "\\u0000"): jsonb and
# PostgreSQL's text refuse the NUL, and main refused the whole transaction in the drain.
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def json_value(value: Any) -> Any:
    """A copy of `value` as JSON reads it back, if the stdlib can write it as strict JSON (no
    NaN) holding text a database can store (no NUL, no lone surrogate, in keys or values), else
    ValueError. A copy: a script that changes its dict after the step (one dict reused for each
    row) would change what is buffered, unchecked."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"value is not JSON-serialisable: {exc}") from None
    except RecursionError:
        raise ValueError("value is nested too deeply (more than about 1,000 levels)") from None
    if "\\u0000" in text and _ESCAPED_NUL.search(text):  # (json.dumps writes a NUL as the escape)
        raise ValueError("text may not contain NUL characters")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text is not valid Unicode (a lone surrogate)") from None
    return value if value is None or value.__class__ in _JSON_SCALARS else json_codec.loads(text)


_JSON_SCALARS = (str, int, float, bool)


_TO_JSON: dict[str, Callable[[Any], Any]] = {
    "uuid": _uuid_json,
    "int": _int_json,
    "float": _float_json,
    "str": _str_json,
    "bool": _bool_json,
    "datetime": _datetime_json,
    "date": lambda v: _parse_date(v).isoformat(),
    "time": lambda v: _parse_time(v, False).isoformat(),
    "timetz": _timetz_json,
    "interval": lambda v: interval_text(parse_interval(v)),
    "json": json_value,
    "binary": _binary_json,
    "any": json_value,
}

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """Text with A-Z lower-cased and nothing else, as lower() (and so CITEXT) folds case in a
    database of the C locale; any other locale lower-cases the rest too (unicode_lower)."""
    return text.translate(_ASCII_LOWER)


def unicode_lower(text: str) -> str:
    """Each character lower-cased alone (Unicode's simple mapping), as lower() folds case in a
    database of another locale (libc's towlower, PostgreSQL's builtin C.UTF-8). str.lower()
    differs: İ becomes two characters, and Σ at a word's end ς."""
    if text.isascii():
        return text.lower()
    return "".join("i" if c == "\u0130" else c.lower() for c in text)


def kind_check(kind: str) -> Callable[[Any], Any]:
    """The check of a kind's values without any column's limits (length, bits, places)."""
    return _TO_JSON[kind]


TO_PYTHON: dict[str, Callable[[Any], Any]] = {
    "uuid": uuid.UUID,
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "datetime": _parse_datetime,
    "date": _parse_date,
    "time": lambda v: _parse_time(v, False),
    "timetz": lambda v: _parse_time(v, True),
    "interval": parse_interval,
    "json": lambda v: v,
    "array": lambda v: v,
    "binary": lambda v: v,
    "any": lambda v: v,
}
