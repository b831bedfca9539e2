"""Which models may be written, and how each column's values are checked and converted.

Built once from the declarative base named by `OBS_MODELS`. Ingest uses it to reject bad
input before anything is buffered; the drain uses it again on whatever it reads from Redis
(a trust boundary) and to turn JSON values into bound parameters. Nothing from a payload
ever becomes SQL text: only mapped tables and columns found here.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import sqltypes

from obs_pipeline import column_values as values
from obs_pipeline.config import ConfigError


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
    # CITEXT (PostgreSQL's extension): text kept as given, compared without case ('ABC' = 'abc'),
    # in filters and as a key, buffered as on the replica
    case_insensitive: bool = False
    # A foreign key main compares without case (it, or the key it references, is CITEXT): its
    # value names its row in any case, as dependency tracking names rows (wire.record_key)
    foreign_key_folds: bool = False
    # NUMERIC(p, s): (p, s). Main rounds a value to s places and refuses one that then needs more
    # than p - s digits before the point: refused at once
    numeric: tuple[int, int] | None = None
    # NUMERIC of any size (not a float type): main keeps its values exactly, and compares them so
    # (filters compare a buffered value so too), and a key of it must be a number a float holds
    exact_numeric: bool = False
    # TIMESTAMP(p), TIME(p), INTERVAL(p): the microseconds main rounds their seconds to (fraction_step)
    fraction_step: int | None = None
    # INTERVAL of fields (INTERVAL DAY, HOUR TO MINUTE): the microseconds main cuts its time of day
    # to (column_values.interval_unit), an array's elements' too: taken so cut, as main stores it
    interval_unit: int | None = None
    # JSON/JSONB whose None the ORM writes as JSON `null` (none_as_null=False, SQLAlchemy's
    # default): None is a value there, taken by a NOT NULL column too
    json_null: bool = False
    item: str | None = None  # an array's element kind (int_bits, max_length ... choices are its elements')
    # a site's TypeDecorator (kind "any") over a type of a scalar kind: that kind. Its values are
    # buffered as given (main casts them), but a filter's must be of it: the replica compares
    # the column as its impl and refuses another type of value (`character varying = integer`)
    impl_kind: str | None = None
    # INET, CIDR or MACADDR ("inet", "cidr", "macaddr"; a site's type over one too, an array's
    # elements'): taken in the text main writes back (column_values.network_text), as keys are
    # filed under their text
    network: str | None = None
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
            item = values.one_of(self.choices) if self.choices is not None else values.converter(
                self.item or "any", self.int_bits, self.float_bits, self.max_length, self.padded, self.numeric,
                self.interval_unit)
            convert = values.array_of(item if self.network is None else values.network_of(item, self.network))
        elif self.choices is not None:
            convert = values.one_of(self.choices)
        else:
            convert = values.converter(self.kind, self.int_bits, self.float_bits, self.max_length, self.padded,
                               self.numeric, self.interval_unit)
            if self.network is not None:
                convert = values.network_of(convert, self.network)
        if self.kind == "float" and (self.primary_key or self.foreign_key):
            convert = values.float_key(convert, self.numeric, self.float_bits, self.exact_numeric)
        elif self.fraction_step is not None and (self.primary_key or self.foreign_key):
            convert = values.fraction_key(convert, self.kind, self.fraction_step)
        object.__setattr__(self, "convert", convert)
        object.__setattr__(self, "check", values.checker(convert, nullable=not self.not_null))

    @property
    def not_null(self) -> bool:
        return (self.required or self.primary_key) and not self.json_null

    def to_python(self, value: Any) -> Any:
        """JSON form -> the Python value bound to the statement."""
        if value is None:
            return None
        return values.TO_PYTHON[self.kind](value)


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
    # Columns main fills itself, refusing any value but DEFAULT (GENERATED ALWAYS AS (...)
    # STORED, GENERATED ALWAYS AS IDENTITY): a create or update giving one is refused where its
    # values are checked (wire.normalize_values), and they read None until replicated
    generated: frozenset[str] = frozenset()
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


class DeleteEffect(NamedTuple):
    """What main does, as the models declare it, to a row of `model` whose `column` references
    (`references`, a column of the deleted row's model) a deleted row: `action` "CASCADE"
    deletes it, "SET NULL" empties the column."""
    model: str
    column: str
    references: str
    action: str


class ModelRegistry:
    def __init__(self, models: dict[str, ModelSpec], metadata: sa.MetaData, refused: dict[str, str] | None = None,
                 classes: dict[type, str] | None = None):
        self.models = models
        self.metadata = metadata
        self.refused = refused or {}  # mapped classes that cannot be written here -> why
        self.classes = classes or {}  # the mapped classes -> their model names (see model())
        self.table_order = {t.fullname: i for i, t in enumerate(metadata.sorted_tables)}
        self._delete_effects: dict[str, tuple[DeleteEffect, ...]] | None = None  # (delete_effects)

    def delete_effects(self, model: str) -> tuple[DeleteEffect, ...]:
        """What a delete of a row of `model` does to the rows of other models that reference it
        (ON DELETE CASCADE or SET NULL, single-column foreign keys, as the models declare them):
        reads show a buffered delete with them (ingest.TransactionBuilder.delete)."""
        if self._delete_effects is None:
            self._delete_effects = _delete_effects(self.models)
        return self._delete_effects.get(model, ())

    @classmethod
    def from_base(cls, base: Any) -> "ModelRegistry":
        models, refused, classes = {}, {}, {}
        mapped: dict[sa.Table, tuple[str, dict[sa.Column, str]]] = {}  # a table's first model, its attributes
        for mapper in sorted(base.registry.mappers, key=lambda m: m.class_.__name__):  # (a set: its order varies)
            name, table = mapper.class_.__name__, mapper.local_table
            classes[mapper.class_] = name
            if table in mapped and not mapper.inherits:  # a table mapped again (`__table__ = Other.__table__`)
                first, keys = mapped[table]
                if first in refused:
                    refused[name] = refused[first]
                elif _attributes(mapper, table) == keys:
                    # one model under both names: its records filed under one, read through either
                    # (each its own, a create through one read None through the other)
                    models[name] = models[first]
                else:
                    refused[name] = (f"it maps table {table.fullname}, as model {first!r} does, under other "
                                     f"attribute names: write it through {first!r}, or give both classes the "
                                     "same attribute names")
            elif not isinstance(table, sa.Table):
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
                pk = next(iter(table.primary_key.columns))
                if converting is not None:
                    refused[name] = converting
                elif _main_fills(pk):
                    # main would refuse every key given, and a row cannot be buffered without one
                    refused[name] = (f"its primary key {keys[pk]!r} is {_main_fills(pk)}: main numbers its rows "
                                     "itself, and a row's key must be known when it is buffered (give keys to an "
                                     "Identity() BY DEFAULT key, or use a UUID key)")
                else:
                    models[name] = _model_spec(name, table, keys)
            if isinstance(table, sa.Table) and table not in mapped and not mapper.inherits:
                mapped[table] = (name, _attributes(mapper, table))
        return cls(models, base.metadata, refused, classes)

    @classmethod
    def from_path(cls, path: str) -> "ModelRegistry":
        """`module:Base`, as in OBS_MODELS. One that does not load is a ConfigError, as every other
        setting's: a wrong setting, not bad input to a script (InvalidTransaction)."""
        module_name, _, attr = path.partition(":")
        if not module_name or not attr:
            raise ConfigError(f"OBS_MODELS={path!r} is not of the form module:Base (e.g. obs_pipeline.models:Base)")
        try:
            base = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:  # noqa: BLE001 - the module's own error too (a SyntaxError, a failing import in it)
            first = str(exc).strip().splitlines()
            raise ConfigError(f"OBS_MODELS={path!r} cannot be loaded: "
                              f"{first[0] if first else type(exc).__name__}") from exc
        if not isinstance(getattr(base, "registry", None), orm.registry) or not isinstance(
                getattr(base, "metadata", None), sa.MetaData):
            raise ConfigError(f"OBS_MODELS={path!r} is not a SQLAlchemy declarative base: give the class "
                              "your models derive from, as module:Base (e.g. obs_pipeline.models:Base)")
        return cls.from_base(base)

    def model(self, name: Any) -> ModelSpec:
        """A model by its name (the wire's model_class), or by its mapped class, as seed 000's
        builder took it (`model_class=models.ExecutedObsUnit`)."""
        if not isinstance(name, str) and isinstance(name, type):
            if name not in self.classes:
                raise InvalidTransaction(f"unknown model {name.__name__} ({name.__module__}): not a class of the "
                                         f"declarative base in OBS_MODELS (known: {', '.join(sorted(self.models))})")
            name = self.classes[name]
        spec = self.models.get(name) if isinstance(name, str) else None
        if spec is None:
            if isinstance(name, str) and name in self.refused:
                raise InvalidTransaction(f"model {name!r} cannot be written through obs-pipeline: {self.refused[name]}")
            raise InvalidTransaction(  # (a DataFrame given for the name: its repr folded onto the line)
                f"unknown model {values.shown(name)} (known: {', '.join(sorted(self.models))})"
            )
        return spec

    def model_for_table(self, table_name: str) -> ModelSpec | None:
        for spec in self.models.values():
            if spec.table.name == table_name:
                return spec
        return None


def _delete_effects(models: dict[str, ModelSpec]) -> dict[str, tuple[DeleteEffect, ...]]:
    specs = list({id(spec): spec for spec in models.values()}.values())  # (a table mapped twice: one spec)
    by_table = {spec.table: spec for spec in reversed(specs)}
    effects: dict[str, list[DeleteEffect]] = {}
    for child in specs:
        for name, column in child.sql_columns.items():
            for fk in column.foreign_keys:
                action = (fk.ondelete or "").upper()
                constraint = fk.constraint
                if action not in ("CASCADE", "SET NULL") or constraint is None or len(constraint.columns) != 1:
                    continue
                try:
                    target = fk.column
                except sa.exc.SQLAlchemyError:  # its table is not in the metadata: not known
                    continue
                parent = by_table.get(target.table)
                references = next((n for n, c in parent.sql_columns.items() if c is target), None) if parent else None
                if references is not None:
                    effects.setdefault(parent.name, []).append(DeleteEffect(child.name, name, references, action))
    return {model: tuple(found) for model, found in effects.items()}


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
            # (a UserDefinedType has no process_bind_param: a TypeDecorator's hook)
            owner = next((c for c in type(type_).__mro__ if method in vars(c)), None)
            if owner is not None and owner.__module__ != "sqlalchemy.sql.type_api":
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
            case_insensitive=isinstance(column.type, postgresql.CITEXT),
            foreign_key_folds=fk is not None and (isinstance(column.type, postgresql.CITEXT)
                                                  or _references_citext(fk)),
            numeric=_numeric_size(item if item is not None else column.type),
            exact_numeric=kind == "float" and _is_numeric(column.type),
            fraction_step=values.fraction_step(column.type),
            interval_unit=values.interval_unit(item if item is not None else column.type),
            item=_kind(item) if item is not None else None,
            impl_kind=_impl_kind(column.type) if kind == "any" else None,
            network=_network(item if item is not None else column.type),
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
        generated=frozenset(keys[c] for c in table.columns if _main_fills(c)),
    )


def _main_fills(column: sa.Column) -> str | None:
    """How main fills `column` itself, refusing any value given for it; None if it takes one."""
    if column.computed is not None:
        return "GENERATED ALWAYS AS (...)"
    if column.identity is not None and column.identity.always:
        return "GENERATED ALWAYS AS IDENTITY"
    return None


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


# Kinds whose values have one JSON form, a filter's value can be checked against
_SCALAR_KINDS = frozenset({"uuid", "int", "float", "str", "bool", "datetime", "date", "time", "timetz",
                           "interval"})


def _impl_kind(type_: sqltypes.TypeEngine) -> str | None:
    """The scalar kind of a TypeDecorator's impl (String(4): "str"); None for another type, or
    an impl this project does not know either (INET), or one of JSON, arrays or bytes."""
    if not isinstance(type_, sa.TypeDecorator):
        return None
    kind = _kind(type_.impl_instance)
    return kind if kind in _SCALAR_KINDS else None


def _network(type_: sqltypes.TypeEngine) -> str | None:
    """"inet", "cidr" or "macaddr" for PostgreSQL's INET, CIDR or MACADDR, a site's
    TypeDecorator over one, or a site's UserDefinedType of that SQL type (see
    ColumnSpec.network); None for another type."""
    type_ = getattr(type_, "impl_instance", type_)
    for name, class_ in (("cidr", postgresql.CIDR), ("inet", postgresql.INET), ("macaddr", postgresql.MACADDR)):
        if isinstance(type_, class_):
            return name
    if isinstance(type_, sa.types.UserDefinedType):  # one that only names its SQL type
        try:
            name = str(type_.get_col_spec()).strip().lower()
        except Exception:  # noqa: BLE001 - a site's type that cannot say
            return None
        return name if name in ("cidr", "inet", "macaddr") else None
    return None


def _is_numeric(type_: sqltypes.TypeEngine) -> bool:
    """NUMERIC of any size (a TypeDecorator's impl too), not a float type."""
    type_ = getattr(type_, "impl_instance", type_)
    return isinstance(type_, sqltypes.Numeric) and not isinstance(type_, sqltypes.Float)


def _numeric_size(type_: sqltypes.TypeEngine) -> tuple[int, int] | None:
    """column_values.numeric_size of the column's own type (a TypeDecorator's impl)."""
    return values.numeric_size(getattr(type_, "impl_instance", type_))


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


def _references_citext(fk: sa.ForeignKey) -> bool:
    """Is the key a foreign key points at CITEXT (main then compares it without case)?"""
    try:
        return isinstance(fk.column.type, postgresql.CITEXT)
    except sa.exc.SQLAlchemyError:  # its table is not in the metadata: not known
        return False


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
