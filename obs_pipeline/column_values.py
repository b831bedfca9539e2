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


def seconds(value: Any, refusal: str, least: float = -math.inf, finite: bool = False) -> float:
    """Seconds given by a caller (wait's timeout, DrainConfig's pauses) as a float: any real
    number (np.float32, a Fraction, a Decimal), but a bool or NaN, at least `least`, and finite
    if asked; else ValueError starting with `refusal`."""
    if isinstance(value, (numbers.Real, decimal.Decimal)) and not isinstance(value, bool):
        try:
            as_float = float(value)
        except (ValueError, OverflowError):  # a signalling NaN, a Fraction beyond a float
            as_float = math.nan
        if least <= as_float and (as_float < math.inf or not finite):  # (NaN is neither)
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
               float_bits: int = 64) -> Callable[[Any], float]:
    """A float column that names a row (its key, or a foreign key to one) takes the value main
    stores: a float, rounded to a NUMERIC(p, s)'s s places, or a REAL's single precision (as
    it reads: 0.123456789 as 0.12345679). Records are filed under their key's text, and the
    replica's row reads as "5.0", "1.23" or "0.12345679": kept as given (5, 1.234,
    0.123456789), a buffered record, its overlays and its replicated row went under different
    ids."""
    step = None if numeric is None else decimal.Decimal(1).scaleb(-numeric[1])
    # as numeric_of's: the default context's 28 digits refuse a NUMERIC(38, 10)'s 1e20 rounded
    exact = None if numeric is None else decimal.Context(prec=numeric[0] + abs(numeric[1]) + 330)

    def check(value: Any) -> float:
        value = convert(value)
        if step is not None:
            value = decimal.Decimal(repr(value)).quantize(step, rounding=decimal.ROUND_HALF_UP, context=exact)
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
        return network_text(value, type_) if value.__class__ is str else value
    return check


_DIGITS, _HEX_DIGITS = "0123456789", "0123456789abcdefABCDEF"
_C_SPACE = " \t\n\v\f\r"  # C's isspace, which sscanf skips
_NETWORK_EXAMPLES = {"inet": "192.168.0.1, 10.0.0.0/8 or 2001:db8::1/64", "cidr": "10.0.0.0/8, 10/8 or 2001:db8::/32",
                     "macaddr": "08:00:2b:01:02:03"}


_MACADDR_OUT = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")  # macaddr_out's text


class _Refused(ValueError):
    """Text PostgreSQL's input function refuses for that type."""


def network_text(text: str, type_: str) -> str:
    """An address as PostgreSQL writes it back (its inet_out, cidr_out or macaddr_out; `type_`
    "inet", "cidr" or "macaddr"), read as its input function reads it (network_in, macaddr_in,
    ported below): its shorthands too (a CIDR's 10/8 or classful 10 is 10.0.0.0/8, 010.0.0.1 is
    10.0.0.1, 8:0:2b:1:2:3 is 08:00:2b:01:02:03). A MAC address in lower case, its bytes parted
    by colons; an IPv4 address dotted; IPv6 in lower case with its longest run of two or more
    zero groups (the first of equals) as ::, and ::a.b.c.d or ::ffff:a.b.c.d for an IPv4 address
    in IPv6; the mask length unless it covers the whole address (always, for a CIDR). Text
    PostgreSQL refuses, and a CIDR with bits set right of its mask, is a ValueError in one line:
    main would refuse the transaction, and the drain dead-letter it hours later."""
    if type_ == "macaddr":
        if _MACADDR_OUT.fullmatch(text):  # as written back already (most values; 3x quicker than reading it)
            return text
        octets = _macaddr_in(text)
        if octets is None:
            raise ValueError(f"{text!r} is not a MAC address PostgreSQL's macaddr takes "
                             f"(e.g. {_NETWORK_EXAMPLES['macaddr']})")
        return ":".join(f"{octet:02x}" for octet in octets)
    cidr = type_ == "cidr"
    try:
        if ":" in text:  # as network_in tells the families apart
            packed, bits = _ipv6_in(text)
        else:
            packed, bits = _ipv4_cidr_in(text) if cidr else _ipv4_inet_in(text)
    except _Refused:
        raise ValueError(f"{text!r} is not an address PostgreSQL's {type_} takes (e.g. {_NETWORK_EXAMPLES[type_]})") \
            from None
    shown = ".".join(map(str, packed)) if len(packed) == 4 else _ipv6_text(packed)
    if cidr:
        size = len(packed) * 8
        number = int.from_bytes(packed, "big")
        if number & ((1 << (size - bits)) - 1):  # main refuses it; the drain dead-lettered it hours later
            network = (number >> (size - bits) << (size - bits)).to_bytes(len(packed), "big")
            meant = (".".join(map(str, network)) if len(network) == 4 else _ipv6_text(network)) + f"/{bits}"
            raise ValueError(f"{text!r} has bits set right of its mask: a CIDR names a network, such as {meant!r}")
    return shown if bits == len(packed) * 8 and not cidr else f"{shown}/{bits}"


def _ipv4_inet_in(text: str) -> tuple[bytes, int]:
    """PostgreSQL's inet_net_pton_ipv4 (an INET's IPv4 text): dotted decimal octets, leading zeros
    read as decimal, fewer than four only with a mask length that fits them (10/8: 10.0.0.0/8)."""
    octets, n = [], len(text)
    ch, i = (text[0] if n else ""), 1
    while ch and ch in _DIGITS:
        value = 0
        while True:
            value = value * 10 + int(ch)
            if value > 255:
                raise _Refused
            ch, i = (text[i], i + 1) if i < n else ("", i + 1)
            if not (ch and ch in _DIGITS):
                break
        if len(octets) == 4:
            raise _Refused
        octets.append(value)
        if ch in ("", "/"):
            break
        if ch != ".":
            raise _Refused
        ch, i = (text[i], i + 1) if i < n else ("", i + 1)
    bits = -1
    if ch == "/" and i < n and text[i] in _DIGITS and octets:
        bits, ch = _decimal_bits(text, i, 32)
    if ch != "":
        raise _Refused
    if bits == -1:
        if len(octets) != 4:
            raise _Refused
        bits = 32
    if not octets or bits < 0 or bits // 8 > len(octets):  # (network_in refuses a negative one)
        raise _Refused
    return bytes(octets + [0] * (4 - len(octets))), bits


def _decimal_bits(text: str, i: int, most: int) -> tuple[int, str]:
    """The mask length's digits from text[i] to the end (nothing may follow them): (bits, "").
    Read into a C int as PostgreSQL reads them, wrapping past 32 bits (/ and 5,000 nines is -1,
    which it then takes for no mask length at all)."""
    end, bits = i, 0
    while end < len(text) and text[end] in _DIGITS:
        bits = (bits * 10 + ord(text[end]) - 48) & 0xFFFFFFFF
        end += 1
    bits = bits - (1 << 32) if bits >= 1 << 31 else bits
    if end != len(text) or bits > most:
        raise _Refused
    return bits, ""


def _ipv4_cidr_in(text: str) -> tuple[bytes, int]:
    """PostgreSQL's inet_cidr_pton_ipv4 (a CIDR's IPv4 text): dotted decimal octets or 0x and hex
    digits, and a mask length; without one, the network's class gives it (10: 10.0.0.0/8,
    192.168: 192.168.0.0/24), widened to the octets given."""
    octets, n = [], len(text)
    if text[:2] in ("0x", "0X") and n > 2 and text[2] in _HEX_DIGITS:
        i, nibbles = 2, ""
        while i < n and text[i] in _HEX_DIGITS:
            nibbles += text[i]
            i += 1
        if len(nibbles) > 8:
            raise _Refused
        octets = list(bytes.fromhex(nibbles + "0" * (len(nibbles) % 2)))
        ch, i = (text[i], i + 1) if i < n else ("", i + 1)
    elif n and text[0] in _DIGITS:
        i = 0
        while True:
            value = 0
            while i < n and text[i] in _DIGITS:
                value = value * 10 + int(text[i])
                if value > 255:
                    raise _Refused
                i += 1
            if len(octets) == 4:
                raise _Refused
            octets.append(value)
            ch, i = (text[i], i + 1) if i < n else ("", i + 1)
            if ch in ("", "/"):
                break
            if ch != "." or not (i < n and text[i] in _DIGITS):
                raise _Refused
    else:
        raise _Refused
    bits = -1
    if ch == "/" and i < n and text[i] in _DIGITS and octets:
        bits, ch = _decimal_bits(text, i, 32)
    if ch != "" or not octets:
        raise _Refused
    if bits == -1:
        first = octets[0]
        bits = 32 if first >= 240 else 8 if first >= 224 else 24 if first >= 192 else 16 if first >= 128 else 8
        bits = max(bits, len(octets) * 8)
        if bits == 8 and first == 224:
            bits = 4
    if bits < 0:  # (network_in refuses it)
        raise _Refused
    return bytes(octets + [0] * (4 - len(octets))), bits


def _ipv6_in(text: str) -> tuple[bytes, int]:
    """PostgreSQL's inet_cidr_pton_ipv6 (INET's and CIDR's IPv6 text): up to four hex digits a
    group, one ::, an IPv4 address last (its octets without leading zeros), a mask length
    without leading zeros up to 128."""
    out, colon_at, n = bytearray(), None, len(text)
    i = 0
    if text.startswith(":"):
        if text[1:2] != ":":
            raise _Refused
        i = 1
    token, value, digits, saw = i, 0, 0, False
    bits = -1
    while i < n:
        ch = text[i]
        i += 1
        if ch in _HEX_DIGITS:
            value = value << 4 | int(ch, 16)
            digits += 1
            if digits > 4:
                raise _Refused
            saw = True
            continue
        if ch == ":":
            token = i
            if not saw:
                if colon_at is not None:
                    raise _Refused
                colon_at = len(out)
                continue
            if i == n or len(out) + 2 > 16:
                raise _Refused
            out += value.to_bytes(2, "big")
            saw, digits, value = False, 0, 0
            continue
        if ch == "." and len(out) + 4 <= 16:
            v4 = _ipv6_tail_v4(text[token:])
            if v4 is not None:
                out += v4[0]
                bits, saw = v4[1], False
                i = n
                break
        if ch == "/":
            bits = _ipv6_bits(text[i:])
            if bits is not None:
                break
        raise _Refused
    if saw:
        if len(out) + 2 > 16:
            raise _Refused
        out += value.to_bytes(2, "big")
    if bits == -1:
        bits = 128
    if colon_at is not None:
        if len(out) == 16:
            raise _Refused
        out[colon_at:colon_at] = bytes(16 - len(out))
    if len(out) != 16:
        raise _Refused
    return bytes(out), bits


def _ipv6_bits(text: str) -> int | None:
    """PostgreSQL's getbits: a mask length of digits without leading zeros, up to 128."""
    if not text or any(c not in _DIGITS for c in text) or len(text) > 1 and text[0] == "0" or len(text) > 3 \
            or int(text) > 128:
        return None
    return int(text)


def _ipv6_tail_v4(text: str) -> tuple[bytes, int] | None:
    """PostgreSQL's getv4: the IPv4 address ending an IPv6 one (octets without leading zeros,
    at most four, an empty one read as 0, fewer padded with zeros) and its mask length, or -1."""
    octets, value, count = [], 0, 0
    for at, ch in enumerate(text):
        if ch in _DIGITS:
            if count and value == 0:
                return None
            count += 1
            value = value * 10 + int(ch)
            if value > 255:
                return None
        elif ch in "./":
            if len(octets) > 3:
                return None
            octets.append(value)
            if ch == "/":
                bits = _ipv6_bits(text[at + 1:])
                return None if bits is None else (bytes(octets + [0] * (4 - len(octets))), bits)
            value, count = 0, 0
        else:
            return None
    if count == 0 or len(octets) > 3:
        return None
    octets.append(value)
    return bytes(octets + [0] * (4 - len(octets))), -1


def _macaddr_in(text: str) -> list[int] | None:
    """PostgreSQL's macaddr_in: the first of its sscanf formats that reads six numbers and
    nothing but whitespace after them; None if none does, or a number is not a byte."""
    for pattern in _MACADDR_FORMATS:
        found = _sscanf_hex(text, pattern)
        if found is not None:
            return found if all(0 <= octet <= 255 for octet in found) else None
    return None


# macaddr_in's formats, in its order: (width of each %x, None for none; the separator after it)
_MACADDR_FORMATS = [[(None, ":")] * 5 + [(None, "")], [(None, "-")] * 5 + [(None, "")],
                    [(2, ""), (2, ""), (2, ":"), (2, ""), (2, ""), (2, "")],
                    [(2, ""), (2, ""), (2, "-"), (2, ""), (2, ""), (2, "")],
                    [(2, ""), (2, "."), (2, ""), (2, "."), (2, ""), (2, "")],
                    [(2, ""), (2, "-"), (2, ""), (2, "-"), (2, ""), (2, "")],
                    [(2, "")] * 6]


def _sscanf_hex(text: str, pattern: list[tuple[int | None, str]]) -> list[int] | None:
    """glibc's sscanf(text, "%x<sep>%x...%1s") where it matches six numbers and no more: each %x
    skips whitespace, takes a sign and 0x, then hex digits (within its width), and is stored as
    a C int (strtoul's value cut to 32 bits: -1 and 0x100000008 are not bytes, -0 is 0)."""
    numbers, i, n = [], 0, len(text)
    for width, separator in pattern:
        while i < n and text[i] in _C_SPACE:
            i += 1
        left = width if width is not None else n + 3
        sign = 1
        if i < n and left and text[i] in "+-":
            sign, i, left = (-1 if text[i] == "-" else 1), i + 1, left - 1
        zero = i < n and left and text[i] == "0"  # (read as a digit: "0x" alone is 0)
        if zero:
            i, left = i + 1, left - 1
            if i < n and left and text[i] in "xX":
                i, left = i + 1, left - 1
        begin = i
        while i < n and left and text[i] in _HEX_DIGITS:
            i, left = i + 1, left - 1
        digits = "0" * zero + text[begin:i]
        if not digits:
            return None
        value = int(digits, 16)
        value = (1 << 64) - 1 if value >= 1 << 64 else (-value if sign < 0 else value) % (1 << 64)
        value &= 0xFFFFFFFF
        numbers.append(value - (1 << 32) if value >= 1 << 31 else value)
        if separator:
            if text[i:i + 1] != separator:
                return None
            i += 1
    return numbers if text[i:].strip(_C_SPACE) == "" else None


def _ipv6_text(packed: bytes) -> str:
    """PostgreSQL's inet_net_ntop_ipv6 (Python's ipaddress writes ::ffff:1.2.3.4 as
    ::ffff:102:304 before 3.13, and ::1.2.3.4 as ::102:304)."""
    words = [packed[i] << 8 | packed[i + 1] for i in range(0, 16, 2)]
    best_base, best_len, base = -1, 0, -1
    for i, word in enumerate(words + [1]):  # (a last non-zero word closes a trailing run)
        if word == 0:
            base = i if base == -1 else base
        elif base != -1:
            if i - base > best_len:
                best_base, best_len = base, i - base
            base = -1
    if best_len < 2:
        best_base = -1
    if best_base == 0 and (best_len == 6 or best_len == 5 and words[5] == 0xFFFF):
        return ("::" if best_len == 6 else "::ffff:") + ".".join(str(byte) for byte in packed[12:])
    if best_base == -1:
        return ":".join(f"{word:x}" for word in words)
    head = ":".join(f"{word:x}" for word in words[:best_base])
    tail = ":".join(f"{word:x}" for word in words[best_base + best_len:])
    return f"{head}::{tail}"


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
