"""A schema of a site's own, for the tests of `OBS_MODELS`: an integer key not called `id`, a
foreign key to it checked at commit (deferred), column types the built-in schema does not have
(JSON, float, bool, a timestamp without time zone), a column whose name needs quoting, and
columns with defaults (constant ones, Python-side and server-side, and one main computes), and
columns whose default or onupdate SQLAlchemy computes (a callable, one taking its execution
context, an SQL expression, one that reads the row), and a foreign key whose parent's delete
cascades to its rows."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Boolean, Column, DateTime, Float, ForeignKey, Integer, Table, Text, func, text
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Instrument(Base):
    __tablename__ = "custom_instrument"

    code: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    settings: Mapped[Any] = mapped_column(JSON, nullable=True)


class Exposure(Base):
    __tablename__ = "custom_exposure"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    instrument_code: Mapped[int] = mapped_column(
        ForeignKey("custom_instrument.code", deferrable=True, initially="DEFERRED"), nullable=False)
    started: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    seconds: Mapped[float] = mapped_column(Float, nullable=False)
    ok: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    logged: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # timestamp without time zone


class Reading(Base):
    """Deleted by main with its instrument (ON DELETE CASCADE)."""
    __tablename__ = "custom_reading"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    instrument_code: Mapped[int] = mapped_column(ForeignKey("custom_instrument.code", ondelete="CASCADE"),
                                                 nullable=False)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)


class Calibration(Base):
    """Deleted by main with its reading (ON DELETE CASCADE): so with the reading's instrument."""
    __tablename__ = "custom_calibration"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    reading_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("custom_reading.id", ondelete="CASCADE"), nullable=False)
    factor: Mapped[float | None] = mapped_column(Float, nullable=True)


class Remark(Base):
    """Kept by main when its instrument is deleted, without it (ON DELETE SET NULL)."""
    __tablename__ = "custom_remark"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    instrument_code: Mapped[int | None] = mapped_column(ForeignKey("custom_instrument.code", ondelete="SET NULL"),
                                                        nullable=True)
    text: Mapped[str | None] = mapped_column(Text, nullable=True)


class Note(Base):
    __table__ = Table("custom_note", Base.metadata,
                      Column("id", UUID(as_uuid=True), primary_key=True),
                      Column("odd name %", Text, nullable=True))


class Slot(Base):
    __tablename__ = "custom_slot"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    label: Mapped[str] = mapped_column(Text, nullable=False, unique=True)


class Task(Base):
    __tablename__ = "custom_task"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    title: Mapped[str | None] = mapped_column(Text, nullable=True)
    state: Mapped[str] = mapped_column(Text, nullable=False, server_default="new")
    priority: Mapped[int] = mapped_column(Integer, nullable=False, server_default="3")
    urgent: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    kind: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'it''s'"))
    weight: Mapped[float] = mapped_column(Float, nullable=False, server_default=text("1.5"))
    tries: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    queued: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True,
                                                    server_default=func.now())


def _slug(context: Any) -> str:
    """A default that takes SQLAlchemy's execution context and reads the row's parameters."""
    return f"{context.get_current_parameters()['title']}-slug"


class Entry(Base):
    __tablename__ = "custom_entry"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    title: Mapped[str] = mapped_column(Text, nullable=False)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False,
                                              default=lambda: datetime.now(timezone.utc))
    token: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False, default=uuid.uuid4)
    slug: Mapped[str] = mapped_column(Text, nullable=False, default=_slug)
    stamped: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=func.now())
    updated: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True,
                                                     onupdate=datetime.utcnow)
    touched: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True,
                                                     onupdate=func.now())
    revised: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, onupdate=True)


class Counter(Base):
    """A revision main counts in each UPDATE: an onupdate (SQL) that reads the row."""
    __tablename__ = "custom_counter"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    label: Mapped[str | None] = mapped_column(Text, nullable=True)
    revision: Mapped[int] = mapped_column(Integer, nullable=False, default=0, onupdate=text("revision + 1"))


class Ticket(Base):
    """A default that needs SQLAlchemy's execution context for more than the row (its connection)."""
    __tablename__ = "custom_ticket"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    serial: Mapped[int] = mapped_column(
        Integer, nullable=False, default=lambda context: context.connection.scalar(text("SELECT 1")))
