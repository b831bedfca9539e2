"""Which models may be written, and how each column's values are checked and converted.

Built once from the declarative base named by `OBS_MODELS`. Ingest uses it to reject bad
input before anything is buffered; the drain uses it again on whatever it reads from Redis
(a trust boundary) and to turn JSON values into bound parameters. Nothing from a payload
ever becomes SQL text: only mapped tables and columns found here.
"""

from __future__ import annotations

import datetime as dt
import decimal
import importlib
import json
import math
import numbers
import re
import struct
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.sql import sqltypes


class InvalidTransaction(ValueError):
    """Bad input: nothing was buffered (at ingest) or the transaction is dead-lettered (drain)."""


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    kind: str  # "uuid" | "int" | "float" | "str" | "bool" | "datetime" | "date" | "time" | "timetz"
    #       | "interval" | "json" | "array" | "binary" | "any"
    required: bool  # must be given on create
    primary_key: bool
    foreign_key: str | None  # the table it references, with its schema if it has one ("x.station")
    int_bits: int = 64       # an integer column's size in PostgreSQL: values beyond it are refused at once
    float_bits: int = 64     # a float column's: 32 for REAL, whose range (about 3.4e38) is far smaller
    max_length: int | None = None  # a text column's length (VARCHAR(n), CHAR(n)): longer text is refused at once
    padded: bool = False  # CHAR(n): PostgreSQL stores, and reads give, its text padded with spaces to n
    # NUMERIC(p, s): (p, s). Main rounds a value to s places and refuses one that then needs more
    # than p - s digits before the point: refused at once
    numeric: tuple[int, int] | None = None
    # TIMESTAMP(p), TIME(p), INTERVAL(p): the microseconds main rounds their seconds to (fraction_step)
    fraction_step: int | None = None
    # JSON/JSONB whose None the ORM writes as JSON `null` (none_as_null=False, SQLAlchemy's
    # default): None is a value there, taken by a NOT NULL column too
    json_null: bool = False
    item: str | None = None  # an array's element kind (int_bits, max_length ... choices are its elements')
    # an enum's: what the ORM takes for it (its labels, and its Python enum's members) -> the label
    choices: dict[Any, str] | None = field(default=None, compare=False)
    # check(value) -> the JSON form of `value`, or ValueError saying what is wrong. A closure
    # made once per column (no dispatch on `kind` per call).
    check: Callable[[Any], Any] = field(init=False, repr=False, compare=False)
    # check without its test for None (which `check` refuses, or gives back if the column is
    # nullable): what wire.normalize_values calls, having tested for None itself, for every
    # value of every transaction, at ingest and in the drain
    convert: Callable[[Any], Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind == "array":
            convert = _array_of(_one_of(self.choices) if self.choices is not None else _convert(
                self.item or "any", self.int_bits, self.float_bits, self.max_length, self.padded, self.numeric))
        elif self.choices is not None:
            convert = _one_of(self.choices)
        else:
            convert = _convert(self.kind, self.int_bits, self.float_bits, self.max_length, self.padded,
                               self.numeric)
        if self.kind == "float" and (self.primary_key or self.foreign_key):
            convert = _float_key(convert, self.numeric, self.float_bits)
        elif self.fraction_step is not None and (self.primary_key or self.foreign_key):
            convert = _fraction_key(convert, self.kind, self.fraction_step)
        object.__setattr__(self, "convert", convert)
        object.__setattr__(self, "check", _checker(convert, nullable=not self.not_null))

    @property
    def not_null(self) -> bool:
        return (self.required or self.primary_key) and not self.json_null

    def to_python(self, value: Any) -> Any:
        """JSON form -> the Python value bound to the statement."""
        if value is None:
            return None
        return _TO_PYTHON[self.kind](value)


def _convert(kind: str, int_bits: int, float_bits: int, max_length: int | None,
             padded: bool, numeric: tuple[int, int] | None = None) -> Callable[[Any], Any]:
    if kind == "float" and numeric is not None:
        return _numeric_of(*numeric)
    if kind == "int":
        return _int_of(int_bits)
    if kind == "float" and float_bits == 32:
        return _single_float_json
    if kind == "str" and max_length is not None:
        return _str_of(max_length, padded)
    return _TO_JSON[kind]


def _checker(convert: Callable[[Any], Any], nullable: bool) -> Callable[[Any], Any]:
    if nullable:
        return lambda value: None if value is None else convert(value)

    def check_not_null(value: Any) -> Any:
        if value is None:
            raise ValueError("may not be null")
        return convert(value)
    return check_not_null


@dataclass(frozen=True)
class ModelSpec:
    name: str
    table: sa.Table
    columns: dict[str, ColumnSpec]
    primary_key: str
    generated_id: bool  # uuid primary key: ingest pre-generates it
    # column -> the JSON form of its constant default (a Python scalar `default=`, or a literal
    # `server_default=`): what main stores for a create that leaves the column out. Creates get
    # it when their values are checked (wire.normalize_values), at ingest and in the drain, so
    # that the buffered record reads as the replicated row will.
    defaults: dict[str, Any] = field(default_factory=dict)
    # What SQLAlchemy computes in Python when it writes a row (see _python_side): column -> a
    # function of the row's checked values giving the value for a create that leaves the column
    # out (a callable `default=`) or an update that does not set it (an `onupdate=` constant or
    # callable). Filled like `defaults` (wire.normalize_values); empty for most models.
    computed_defaults: dict[str, Callable[[dict[str, Any]], Any]] = field(default_factory=dict)
    onupdates: dict[str, Callable[[dict[str, Any]], Any]] = field(default_factory=dict)
    # An `onupdate=` that is an SQL expression (func.now()): main evaluates it in an UPDATE, so
    # the drain never folds this model's updates into the insert of the same row.
    main_onupdate: bool = False
    # attribute -> its column in `table`. The script names the mapped attribute, as with the ORM;
    # `mapped_column("obs_unit_id")` for `obs_id` names the column otherwise (its Column.key too),
    # so statements and replica reads go through this, never `table.c[attribute]`.
    sql_columns: dict[str, sa.Column] = field(default_factory=dict)
    # name -> ColumnSpec.convert, and the columns that may not be null: ColumnSpec.check in two
    # parts, so that normalize_values makes one call a value, not two (the wrapper testing for
    # None was ~500 instructions a value, in every transaction at ingest and in the drain)
    converters: dict[str, Callable[[Any], Any]] = field(init=False, repr=False, compare=False)
    not_null: frozenset[str] = field(init=False, repr=False, compare=False)
    required_on_create: frozenset[str] = field(init=False, repr=False, compare=False)
    attributes: tuple[str, ...] = field(init=False, repr=False, compare=False)  # sql_columns' keys, made once

    def __post_init__(self) -> None:
        if not self.sql_columns:
            object.__setattr__(self, "sql_columns", {c.key: c for c in self.table.columns})
        object.__setattr__(self, "attributes", tuple(self.sql_columns))
        object.__setattr__(self, "converters", {name: c.convert for name, c in self.columns.items()})
        object.__setattr__(self, "not_null", frozenset(name for name, c in self.columns.items() if c.not_null))
        object.__setattr__(self, "required_on_create", frozenset(
            c.name for c in self.columns.values() if c.required or (c.primary_key and not self.generated_id)))

    def column(self, name: str) -> ColumnSpec:
        try:
            return self.columns[name]
        except KeyError:
            raise InvalidTransaction(
                f"{self.name} has no column {name!r} (columns: {', '.join(self.columns)})"
            ) from None


class ModelRegistry:
    def __init__(self, models: dict[str, ModelSpec], metadata: sa.MetaData, refused: dict[str, str] | None = None):
        self.models = models
        self.metadata = metadata
        self.refused = refused or {}  # mapped classes that cannot be written here -> why
        self.table_order = {t.fullname: i for i, t in enumerate(metadata.sorted_tables)}

    @classmethod
    def from_base(cls, base: Any) -> "ModelRegistry":
        models, refused = {}, {}
        for mapper in base.registry.mappers:
            name, table = mapper.class_.__name__, mapper.local_table
            if not isinstance(table, sa.Table):
                refused[name] = "it is not mapped to one table"
            elif len(table.primary_key.columns) != 1:
                refused[name] = (f"its primary key has {len(table.primary_key.columns)} columns "
                                 f"({', '.join(c.key for c in table.primary_key.columns)}); one is needed")
            elif mapper.inherits is not None and not mapper.concrete or mapper.polymorphic_on is not None:
                # the ORM writes the parent's table too, or the discriminator column: rows written
                # here without them would be rows of another class, or of none
                refused[name] = "it is mapped with inheritance, whose rows the ORM writes in ways this does not"
            else:
                keys = _attributes(mapper, table)
                converting = _converting_type(table, keys)
                if converting is not None:
                    refused[name] = converting
                else:
                    models[name] = _model_spec(name, table, keys)
        return cls(models, base.metadata, refused)

    @classmethod
    def from_path(cls, path: str) -> "ModelRegistry":
        """`module:Base`, as in OBS_MODELS."""
        module_name, _, attr = path.partition(":")
        if not module_name or not attr:
            raise InvalidTransaction(f"OBS_MODELS={path!r} is not of the form module:Base")
        try:
            base = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:  # noqa: BLE001 - the module's own error too (a SyntaxError, a failing import in it)
            first = str(exc).strip().splitlines()
            raise InvalidTransaction(f"OBS_MODELS={path!r} cannot be loaded: "
                                     f"{first[0] if first else type(exc).__name__}") from exc
        if not isinstance(getattr(base, "registry", None), orm.registry) or not isinstance(
                getattr(base, "metadata", None), sa.MetaData):
            raise InvalidTransaction(f"OBS_MODELS={path!r} is not a SQLAlchemy declarative base: give the class "
                                     "your models derive from, as module:Base (e.g. obs_pipeline.models:Base)")
        return cls.from_base(base)

    def model(self, name: Any) -> ModelSpec:
        spec = self.models.get(name) if isinstance(name, str) else None
        if spec is None:
            if isinstance(name, str) and name in self.refused:
                raise InvalidTransaction(f"model {name!r} cannot be written through obs-pipeline: {self.refused[name]}")
            raise InvalidTransaction(
                f"unknown model {name!r} (known: {', '.join(sorted(self.models))})"
            )
        return spec

    def model_for_table(self, table_name: str) -> ModelSpec | None:
        for spec in self.models.values():
            if spec.table.name == table_name:
                return spec
        return None


def _attributes(mapper: orm.Mapper, table: sa.Table) -> dict[sa.Column, str]:
    """Each column's mapped attribute, which the script names as it would with the ORM (a
    column the mapper leaves out keeps its key)."""
    out = {}
    for column in table.columns:
        try:
            out[column] = mapper.get_property_by_column(column).key
        except orm.exc.UnmappedColumnError:
            out[column] = column.key
    return out


# What a type of the site's own (a TypeDecorator, a UserDefinedType) may define to change the
# values SQLAlchemy binds or reads; the generic ones, in sqlalchemy.sql.type_api, change nothing.
_CONVERSIONS = ("process_bind_param", "process_result_value", "bind_processor", "result_processor",
                "bind_expression", "column_expression")


def _converting_type(table: sa.Table, keys: dict[sa.Column, str]) -> str | None:
    """Why the model cannot be written, if a column's type (an array's element's) converts
    values where SQLAlchemy binds or reads them: the ORM writes process_bind_param(value) and
    reads process_result_value(row), and obs-pipeline buffers JSON, writes it with its own
    statements and merges reads of both. A type whose kind this project knows (sa.Interval) is
    converted here; a pure impl wrapper (impl = String(4)) converts nothing and is kept."""
    for column in table.columns:
        type_ = column.type.item_type if isinstance(column.type, sqltypes.ARRAY) else column.type
        if not isinstance(type_, (sa.TypeDecorator, sa.types.UserDefinedType)) or _kind(type_) != "any":
            continue
        for method in _CONVERSIONS:
            owner = next(c for c in type(type_).__mro__ if method in vars(c))
            if owner.__module__ != "sqlalchemy.sql.type_api":
                return (f"its attribute {keys[column]!r} is of a type ({type(type_).__name__}) with its own {method}, "
                        "which the ORM applies and obs-pipeline would not (it buffers, writes and reads values as given)")
    return None


def _model_spec(name: str, table: sa.Table, keys: dict[sa.Column, str]) -> ModelSpec:
    columns = {}
    for column in table.columns:
        key = keys[column]
        kind = _kind(column.type)
        item = column.type.item_type if kind == "array" else None  # the element's type sizes it
        has_default = column.default is not None or column.server_default is not None
        fk = next(iter(column.foreign_keys), None)
        columns[key] = ColumnSpec(
            name=key,
            kind=kind,
            required=not column.nullable and not has_default and not column.primary_key,
            primary_key=column.primary_key,
            foreign_key=_referenced_table(fk) if fk is not None else None,
            int_bits=_int_bits(item if item is not None else column.type),
            float_bits=32 if is_single_precision(item if item is not None else column.type) else 64,
            max_length=_max_length(item if item is not None else column.type),
            padded=isinstance(item if item is not None else column.type, sqltypes.CHAR),
            numeric=_numeric_size(item if item is not None else column.type),
            fraction_step=fraction_step(column.type),
            item=_kind(item) if item is not None else None,
            choices=_enum_choices(item if item is not None else column.type),
            json_null=kind == "json" and not column.type.none_as_null,
        )
    pk = next(iter(table.primary_key.columns))
    defaults = {}
    for column in table.columns:
        value = _constant_default(column, columns[keys[column]])
        if value is not _NO_DEFAULT:
            defaults[keys[column]] = value
    computed, onupdates = {}, {}
    for column in table.columns:
        if keys[column] not in defaults:
            default = _python_side(column, columns, keys, column.default, "default")
            if default is not None:
                computed[keys[column]] = default
        onupdate = _python_side(column, columns, keys, column.onupdate, "onupdate")
        if onupdate is not None:
            onupdates[keys[column]] = onupdate
    return ModelSpec(
        name=name,
        table=table,
        columns=columns,
        primary_key=keys[pk],
        generated_id=columns[keys[pk]].kind == "uuid",
        defaults=defaults,
        computed_defaults=computed,
        onupdates=onupdates,
        main_onupdate=any(c.onupdate is not None and not (c.onupdate.is_scalar or c.onupdate.is_callable)
                          for c in table.columns),
        sql_columns={key: column for column, key in keys.items()},
    )


class _OutsideSqlAlchemy(AttributeError):
    pass


class _RowContext:
    """What a default taking SQLAlchemy's execution context (`def f(context)`) gets outside
    SQLAlchemy: the row's parameters, as Python values (`get_current_parameters()`,
    `current_parameters`), and `current_column`. The rest of a context (its connection, its
    dialect) exists only inside an execution: asking for it raises."""

    def __init__(self, row: dict[str, Any], columns: dict[str, ColumnSpec], column: sa.Column,
                 column_keys: dict[str, str]):
        self._row, self._columns, self.current_column, self._keys = row, columns, column, column_keys

    @property
    def current_parameters(self) -> dict[str, Any]:
        """Keyed by column (Column.key), as SQLAlchemy's are, not by attribute."""
        return {self._keys[name]: self._columns[name].to_python(value) for name, value in self._row.items()}

    def get_current_parameters(self, isolate_multiinsert_groups: bool = True) -> dict[str, Any]:
        return self.current_parameters

    def __getattr__(self, name: str) -> Any:
        raise _OutsideSqlAlchemy(name)


def _python_side(column: sa.Column, columns: dict[str, ColumnSpec], keys: dict[sa.Column, str], default: Any,
                 what: str) -> Callable[[dict[str, Any]], Any] | None:
    """How to evaluate, outside SQLAlchemy, a `default=`/`onupdate=` that SQLAlchemy computes in
    Python when it writes a row: a constant, or a callable. None for no default, and for one
    main evaluates (an SQL expression such as func.now(), a sequence): SQLAlchemy renders that
    into the batch's insert and update statements, and a buffered record reads it as null (an
    onupdate: the previous value) until the row is replicated.

    Evaluated where a create or update is checked (wire.normalize_values): at ingest, when the
    script records the observation, so that the buffered record reads as main will store it and
    a `datetime.now` default is the observation's time, not the drain's; and by the drain's own
    check, for an existing producer's entry that left the column out. A default for a create
    that leaves the column out, an onupdate for an update that does not set it, as the ORM does.
    A callable taking SQLAlchemy's execution context gets a _RowContext: one computed from the
    row's values works as under SQLAlchemy; one that needs more (the connection) cannot be
    evaluated outside SQLAlchemy, and says so in a ValueError naming the column: that create or
    update is refused at ingest, or dead-lettered by the drain with that line, and the rest goes
    on (refusing the model at load would stop even the writes that give the column)."""
    if default is None or not (default.is_scalar or default.is_callable):
        return None
    if default.is_scalar:
        value = default.arg
        return lambda row: value
    function = default.arg  # SQLAlchemy's: always takes the context (it wraps one that takes none)
    column_keys = {key: c.key for c, key in keys.items()}

    def evaluate(row: dict[str, Any]) -> Any:
        try:
            return function(_RowContext(row, columns, column, column_keys))
        except _OutsideSqlAlchemy as missing:
            raise ValueError(f"its {what} needs SQLAlchemy's execution context (context.{missing}), which "
                             "exists only inside SQLAlchemy: give the column a value") from None
        except Exception as error:  # noqa: BLE001 - the site's code: its failure is this write's
            raise ValueError(f"its {what} raised {error!r}") from None
    return evaluate


_NO_DEFAULT = object()
_PG_BOOLEANS = {"t": True, "true": True, "y": True, "yes": True, "on": True, "1": True,
                "f": False, "false": False, "n": False, "no": False, "off": False, "0": False}


_QUOTED_LITERAL = re.compile(r"'((?:[^']|'')*)'(?:\s*::\s*[a-z_ ]+)?", re.IGNORECASE)
_BARE_LITERAL = re.compile(r"[-+]?[0-9]+(?:\.[0-9]+)?|true|false", re.IGNORECASE)


def _literal_server_default(arg: Any) -> str | None:
    """The text of a server default that is a literal: a plain string (server_default="new"), or
    SQL text that is a quoted string, a number or a boolean (text("'new'"), text("0")); None
    for anything PostgreSQL computes."""
    if isinstance(arg, str):
        return arg
    if not isinstance(arg, sa.TextClause):
        return None
    sql = arg.text.strip()
    quoted = _QUOTED_LITERAL.fullmatch(sql)
    if quoted:
        return quoted.group(1).replace("''", "'")
    return sql if _BARE_LITERAL.fullmatch(sql) else None


def _constant_default(column: sa.Column, spec: ColumnSpec) -> Any:
    """The JSON form of the value main stores when a create leaves `column` out, if it is a
    constant: a Python scalar default, or a server default given as a plain string (a literal,
    which PostgreSQL casts to the column's type). An SQL expression (now(), a sequence) or a
    callable cannot be known before main runs it: _NO_DEFAULT."""
    try:
        if column.default is not None:
            if not getattr(column.default, "is_scalar", False):
                return _NO_DEFAULT
            return spec.check(column.default.arg)
        text = _literal_server_default(getattr(column.server_default, "arg", None))
        if text is None:
            return _NO_DEFAULT
        if spec.kind == "int":
            return spec.check(int(text.strip()))
        if spec.kind == "float":
            return spec.check(float(text.strip()))
        if spec.kind == "bool":
            return spec.check(_PG_BOOLEANS[text.strip().lower()])
        if spec.kind == "json":
            return spec.check(json.loads(text))
        if spec.kind in ("str", "uuid", "datetime", "date", "time", "timetz"):
            return spec.check(text)  # 'now', 'today' and the like fail the check: not constants
    except (ValueError, KeyError, TypeError):
        pass
    return _NO_DEFAULT


def _numeric_size(type_: sqltypes.TypeEngine) -> tuple[int, int] | None:
    """(precision, scale) of NUMERIC(p, s) / NUMERIC(p) (scale 0); None for NUMERIC alone, which
    takes any size, and for Float, whose precision counts bits."""
    type_ = getattr(type_, "impl_instance", type_)  # a TypeDecorator's: the column's own
    if isinstance(type_, sqltypes.Numeric) and not isinstance(type_, sqltypes.Float) and type_.precision:
        return type_.precision, type_.scale or 0
    return None


def _int_bits(type_: sqltypes.TypeEngine) -> int:
    if isinstance(type_, sqltypes.BigInteger):
        return 64
    if isinstance(type_, sqltypes.SmallInteger):
        return 16
    return 32 if isinstance(type_, sqltypes.Integer) else 64


def is_single_precision(type_: sqltypes.TypeEngine) -> bool:
    """REAL, or FLOAT(p) with p <= 24, which PostgreSQL makes a REAL."""
    return isinstance(type_, sqltypes.Float) and not isinstance(type_, sqltypes.Double) and (
        isinstance(type_, sqltypes.REAL) or (type_.precision or 53) <= 24)


def _referenced_table(fk: sa.ForeignKey) -> str:
    """The fullname of the table a foreign key points at, as dependency tracking names its rows
    (wire.record_key): "x.station" for a table in schema x, not "x" (the first part of the
    key's "x.station.number")."""
    try:
        return fk.column.table.fullname
    except sa.exc.SQLAlchemyError:  # its table is not in the metadata: the key as written
        return fk.target_fullname.rpartition(".")[0]


def _enum_choices(type_: sqltypes.TypeEngine) -> dict[Any, str] | None:
    """An Enum column's labels, and its Python enum's members mapped to theirs, as SQLAlchemy
    maps them (the member names, or what `values_callable` gives, in the members' order)."""
    if not isinstance(type_, sqltypes.Enum):
        return None
    choices: dict[Any, str] = {label: label for label in type_.enums}
    if type_.enum_class is not None:
        choices.update(zip(type_.enum_class.__members__.values(), type_.enums))
    return choices


def _max_length(type_: sqltypes.TypeEngine) -> int | None:
    if isinstance(type_, sqltypes.String) and not isinstance(type_, sqltypes.Enum):
        return type_.length or (1 if isinstance(type_, sqltypes.CHAR) else None)  # CHAR alone is CHAR(1)
    return None


def _kind(type_: sqltypes.TypeEngine) -> str:
    if isinstance(type_, sqltypes.ARRAY):
        return "array"
    if isinstance(type_, sqltypes._Binary):
        return "binary"
    if isinstance(type_, sqltypes.Uuid) or type(type_).__name__ == "UUID":
        return "uuid"
    if isinstance(type_, sqltypes.Boolean):
        return "bool"
    if isinstance(type_, sqltypes.Integer):
        return "int"
    if isinstance(type_, (sqltypes.Float, sqltypes.Numeric)):
        return "float"
    if isinstance(type_, sqltypes.DateTime):
        return "datetime"
    if isinstance(type_, sqltypes.Date):
        return "date"
    if isinstance(type_, sqltypes.Time):
        return "timetz" if type_.timezone else "time"
    if isinstance(type_, sqltypes._AbstractInterval):  # sa.Interval, postgresql.INTERVAL
        return "interval"
    if isinstance(type_, sqltypes.String):
        return "str"
    if isinstance(type_, sqltypes.JSON):
        return "json"
    return "any"


# --- value conversion ---------------------------------------------------------------------

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
        raise ValueError(f"{value!r} has no exact float (a float column's values are buffered and read as floats)")
    if isinstance(value, numbers.Real) and not _is_bool(value):  # numpy's np.float32, np.int64 (np.float64 is a float)
        if isinstance(value, numbers.Integral):
            return _float_json(int(value))
        number = float(value)
        if number == value or not math.isfinite(number):
            return _float_json(number)
        raise ValueError(f"{value!r} has no exact float (a float column's values are buffered and read as floats)")
    raise ValueError(f"{value!r} is not a number")


def _float_key(convert: Callable[[Any], Any], numeric: tuple[int, int] | None,
               float_bits: int = 64) -> Callable[[Any], float]:
    """A float column that names a row (its key, or a foreign key to one) takes the value main
    stores: a float, rounded to a NUMERIC(p, s)'s s places, or a REAL's single precision (as
    it reads: 0.123456789 as 0.12345679). Records are filed under their key's text, and the
    replica's row reads as "5.0", "1.23" or "0.12345679": kept as given (5, 1.234,
    0.123456789), a buffered record, its overlays and its replicated row went under different
    ids."""
    step = None if numeric is None else decimal.Decimal(1).scaleb(-numeric[1])
    # as _numeric_of's: the default context's 28 digits refuse a NUMERIC(38, 10)'s 1e20 rounded
    exact = None if numeric is None else decimal.Context(prec=numeric[0] + abs(numeric[1]) + 330)

    def check(value: Any) -> float:
        value = convert(value)
        if step is not None:
            value = decimal.Decimal(repr(value)).quantize(step, rounding=decimal.ROUND_HALF_UP, context=exact)
        return single_float(float(value)) if float_bits == 32 else float(value)
    return check


def _fraction_key(convert: Callable[[Any], Any], kind: str, step: int) -> Callable[[Any], str]:
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


def _numeric_of(precision: int, scale: int) -> Callable[[Any], float | int]:
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


def _array_of(item: Callable[[Any], Any]) -> Callable[[Any], list]:
    """A list of values of the element's kind, or null; lists in it are further dimensions."""
    def check(value: Any) -> list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{value!r} is not a list")
        try:
            return [None if v is None else check(v) if isinstance(v, (list, tuple)) else item(v) for v in value]
        except RecursionError:
            raise ValueError("the list is nested too deeply") from None
    return check


def _one_of(choices: dict[Any, str]) -> Callable[[Any], str]:
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


def _parse_datetime(value: Any) -> dt.datetime:
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
    """`value` if the stdlib can write it as strict JSON (no NaN) holding text a database can
    store (no NUL, no lone surrogate, in keys or values), else ValueError."""
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
    return value


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

_TO_PYTHON: dict[str, Callable[[Any], Any]] = {
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
