"""The built-in schema (contract §2). Class name = `model_class` on the wire."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Integer, Text
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class ObsUnit(Base):
    __tablename__ = "obs_unit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)


class ExecutedObsUnit(Base):
    __tablename__ = "executed_obs_unit"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    obs_unit_id: Mapped[int] = mapped_column(ForeignKey("obs_unit.id"), nullable=False, index=True)
    start_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    end_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    status: Mapped[str] = mapped_column(Text, nullable=False)


class RawDataPackage(Base):
    __tablename__ = "raw_data_package"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    executed_obs_unit_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("executed_obs_unit.id"), nullable=False, index=True
    )


class RawDataFile(Base):
    __tablename__ = "raw_data_file"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    raw_data_package_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("raw_data_package.id"), nullable=False, index=True
    )
