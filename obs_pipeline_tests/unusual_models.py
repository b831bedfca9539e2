"""A site's schema with column types and layouts the built-in one does not have, for
test_unusual_schemas.py: text of limited length (VARCHAR(n), CHAR(n) also as a primary key, a non-native enum),
arrays, a float, a single-precision float (REAL, and an array of FLOAT(24)), a decimal, a time of day (also with its time zone), an interval, a native enum, binary data, a TypeDecorator, and
tables in a PostgreSQL schema of their own with an integer key the site gives and a
self-referencing foreign key; and models this cannot write (a primary key of two columns,
inheritance)."""

from __future__ import annotations

import uuid

from sqlalchemy import (ARRAY, CHAR, REAL, Enum, Float, ForeignKey, Integer, Interval, LargeBinary, Numeric, String,
                        Text, Time, TypeDecorator, Uuid)
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
