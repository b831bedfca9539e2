"""A site's schema with column types and layouts the built-in one does not have, for
test_unusual_schemas.py: text of limited length (VARCHAR(n), CHAR(n) also as a primary key, a non-native enum),
arrays, a float, a single-precision float (REAL, and an array of FLOAT(24)), a decimal, a time of day (also with its time zone), an interval, a native enum, binary data, a TypeDecorator, and
tables in a PostgreSQL schema of their own with an integer key the site gives and a
self-referencing foreign key; attributes whose columns are named otherwise (mapped_column("name", ...));
a TypeDecorator over a type this project does not know (INET);
a table mapped by two classes (under the same attribute names, and under others);
and models this cannot write (a primary key of two columns, inheritance, a type that converts values as
SQLAlchemy binds or reads them)."""

from __future__ import annotations

import json
import uuid

from sqlalchemy import (ARRAY, CHAR, REAL, Enum, Float, ForeignKey, Integer, Interval, LargeBinary, Numeric, String,
                        Text, Time, TypeDecorator, Uuid)
from sqlalchemy.dialects.postgresql import INET, INT4RANGE
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA = "odd_schema"


class Base(DeclarativeBase):
    pass


class Label(TypeDecorator):
    """A site's own type over VARCHAR(4) (one that only names a Python type, say)."""
    impl = String(4)
    cache_ok = True


class Sample(Base):
    __tablename__ = "odd_sample"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    code: Mapped[str | None] = mapped_column(String(5), nullable=True)
    flag: Mapped[str | None] = mapped_column(CHAR(3), nullable=True)
    grade: Mapped[str | None] = mapped_column(Enum("low", "high", name="odd_grade", native_enum=False), nullable=True)
    mood: Mapped[str | None] = mapped_column(Enum("calm", "busy", name="odd_mood"), nullable=True)
    tags: Mapped[list | None] = mapped_column(ARRAY(Text), nullable=True)
    counts: Mapped[list | None] = mapped_column(ARRAY(Integer), nullable=True)
    refs: Mapped[list | None] = mapped_column(ARRAY(Uuid), nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    ratio: Mapped[float | None] = mapped_column(REAL, nullable=True)
    levels: Mapped[list | None] = mapped_column(ARRAY(Float(precision=24)), nullable=True)
    amount: Mapped[object | None] = mapped_column(Numeric(10, 2), nullable=True)
    tallies: Mapped[list | None] = mapped_column(ARRAY(Numeric(4, 1)), nullable=True)
    moods: Mapped[list | None] = mapped_column(ARRAY(Enum("calm", "busy", name="odd_mood")), nullable=True)
    at: Mapped[object | None] = mapped_column(Time, nullable=True)
    at_zone: Mapped[object | None] = mapped_column(Time(timezone=True), nullable=True)
    span: Mapped[object | None] = mapped_column(Interval, nullable=True)
    blob: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    label: Mapped[str | None] = mapped_column(Label, nullable=True)


class Address(TypeDecorator):
    """A site's own type over a type this project does not know (PostgreSQL's INET)."""
    impl = INET
    cache_ok = True


class Host(Base):
    """A site's type over INET, read as PostgreSQL reads an address; and a column of a type this
    project knows nothing of (a range): its values are main's to check."""
    __tablename__ = "odd_host"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    address: Mapped[str | None] = mapped_column(Address, nullable=True)
    window: Mapped[object | None] = mapped_column(INT4RANGE, nullable=True)


class Code(Base):
    """A CHAR(n) primary key."""
    __tablename__ = "odd_code"

    code: Mapped[str] = mapped_column(CHAR(4), primary_key=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)


class Station(Base):
    """In a schema of its own; an integer key the site gives; a parent of its own table."""
    __tablename__ = "station"
    __table_args__ = {"schema": SCHEMA}

    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    parent_number: Mapped[int | None] = mapped_column(ForeignKey(f"{SCHEMA}.station.number"), nullable=True)


class CodeNote(Base):
    """Code's table mapped by a second class, under the same attribute names: one model, two names."""
    __table__ = Code.__table__


class Reading(Base):
    """A primary key of two columns."""
    __tablename__ = "odd_reading"

    station: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    taken: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)


class Event(Base):
    """Single-table inheritance: the ORM writes `kind` for each class."""
    __tablename__ = "odd_event"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "event"}


class Alarm(Event):
    __mapper_args__ = {"polymorphic_identity": "alarm"}


def _slug(context) -> str:
    """A default computed from the row, as SQLAlchemy gives it: keyed by column, not attribute."""
    return f"{context.get_current_parameters()['unit_title']}-slug"


class Unit(Base):
    """Attributes whose columns are named otherwise, as `mapped_column("name", ...)` makes them
    (the script, like the ORM, uses the attribute): two named after each other's columns, a
    key the site gives, a foreign key to its own table, a REAL (read in a form of its own), a
    name that needs quoting, a constant and a computed default, a unique column."""
    __tablename__ = "odd_unit"

    number: Mapped[int] = mapped_column("unit_number", Integer, primary_key=True, autoincrement=False)
    title: Mapped[str] = mapped_column("unit_title", String(20), nullable=False, unique=True)
    low: Mapped[int | None] = mapped_column("high", Integer, nullable=True)
    high: Mapped[int | None] = mapped_column("low", Integer, nullable=True)
    parent: Mapped[int | None] = mapped_column("parent_number", ForeignKey("odd_unit.unit_number"), nullable=True)
    ratio: Mapped[float | None] = mapped_column("unit ratio %", REAL, nullable=True)
    kind: Mapped[str] = mapped_column("unit_kind", Text, default="plain")
    slug: Mapped[str | None] = mapped_column("unit_slug", Text, default=_slug)


class UnitByColumn(Base):
    """Unit's table mapped again, its attributes named as its columns are (Unit's are not)."""
    __table__ = Unit.__table__


class Visit(Base):
    """A generated uuid key whose column is named otherwise, and a foreign key to Unit."""
    __tablename__ = "odd_visit"

    id: Mapped[uuid.UUID] = mapped_column("visit_id", Uuid, primary_key=True)
    unit: Mapped[int | None] = mapped_column("unit_number", ForeignKey("odd_unit.unit_number"), nullable=True)
    at: Mapped[object | None] = mapped_column("visited_at", Time, nullable=True)


class Lower(TypeDecorator):
    """Text stored lower-cased: the ORM writes process_bind_param's value."""
    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else value.lower()


class JsonText(TypeDecorator):
    """A value stored as its JSON text, read back decoded."""
    impl = Text
    cache_ok = True

    def process_bind_param(self, value: object, dialect: Dialect) -> str | None:
        return None if value is None else json.dumps(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> object:
        return None if value is None else json.loads(value)


class Word(Base):
    """A TypeDecorator that converts what it binds."""
    __tablename__ = "odd_word"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    word: Mapped[str | None] = mapped_column(Lower, nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)


class Packed(Base):
    """A TypeDecorator that converts what it binds and what it reads, in an array and alone."""
    __tablename__ = "odd_packed"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    values: Mapped[list | None] = mapped_column(ARRAY(JsonText), nullable=True)
    value: Mapped[object | None] = mapped_column(JsonText, nullable=True)
