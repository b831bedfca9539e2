"""INET, CIDR and MACADDR text as PostgreSQL reads and writes it back, without asking it.

Ingest files records under their key's text, and reads compare buffered values with the
replica's: both must be the text main writes back (10.0.0.3/32 is 10.0.0.3, 10/8 a CIDR's
10.0.0.0/8, 8:0:2b:1:2:3 is 08:00:2b:01:02:03), and what main refuses must be refused at
ingest, not dead-lettered hours later. Python's ipaddress reads neither PostgreSQL's
shorthands nor its refusals the same way, so its input functions (network_in, macaddr_in)
and inet_net_ntop_ipv6 are ported here; the tests compare thousands of spellings with the
replica's own text.
"""

from __future__ import annotations

import re
from typing import Any

_DIGITS, _HEX_DIGITS = "0123456789", "0123456789abcdefABCDEF"
_C_SPACE = " \t\n\v\f\r"  # C's isspace, which sscanf skips
_NETWORK_EXAMPLES = {"inet": "192.168.0.1, 10.0.0.0/8 or 2001:db8::1/64", "cidr": "10.0.0.0/8, 10/8 or 2001:db8::/32",
                     "macaddr": "08:00:2b:01:02:03"}


def _not_taken(value: Any, type_: str) -> ValueError:
    what = "a MAC address" if type_ == "macaddr" else "an address"
    return ValueError(f"{value!r} is not {what} PostgreSQL's {type_} takes (e.g. {_NETWORK_EXAMPLES[type_]})")


_MACADDR_OUT = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")  # macaddr_out's text


class _Refused(ValueError):
    """Text PostgreSQL's input function refuses for that type."""


def network_text(text: Any, type_: str) -> str:
    """An address as PostgreSQL writes it back (its inet_out, cidr_out or macaddr_out; `type_`
    "inet", "cidr" or "macaddr"), read as its input function reads it (network_in, macaddr_in,
    ported below): its shorthands too (a CIDR's 10/8 or classful 10 is 10.0.0.0/8, 010.0.0.1 is
    10.0.0.1, 8:0:2b:1:2:3 is 08:00:2b:01:02:03). A MAC address in lower case, its bytes parted
    by colons; an IPv4 address dotted; IPv6 in lower case with its longest run of two or more
    zero groups (the first of equals) as ::, and ::a.b.c.d or ::ffff:a.b.c.d for an IPv4 address
    in IPv6; the mask length unless it covers the whole address (always, for a CIDR). Text
    PostgreSQL refuses, a value that is not text, and a CIDR with bits set right of its mask, is a
    ValueError in one line:
    main would refuse the transaction, and the drain dead-letter it hours later."""
    if not isinstance(text, str):  # a number, an object, a list: main refuses it hours later
        raise _not_taken(text, type_)
    if type_ == "macaddr":
        if _MACADDR_OUT.fullmatch(text):  # as written back already (most values; 3x quicker than reading it)
            return text
        octets = _macaddr_in(text)
        if octets is None:
            raise _not_taken(text, type_)
        return ":".join(f"{octet:02x}" for octet in octets)
    cidr = type_ == "cidr"
    try:
        if ":" in text:  # as network_in tells the families apart
            packed, bits = _ipv6_in(text)
        else:
            packed, bits = _ipv4_cidr_in(text) if cidr else _ipv4_inet_in(text)
    except _Refused:
        raise _not_taken(text, type_) from None
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
