"""The built-in models as an operator may revise them while transactions wait, for
test_reliability.py: ExecutedObsUnit without its status column, or renamed (its class, the
wire's model_class, is Execution now; its table is the same; ObsUnit's class is renamed too, as
one module holds both bases)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Integer, Text
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class _ObsUnitColumns:
    __tablename__ = "obs_unit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)


class _ExecutionColumnsButStatus:
    __tablename__ = "executed_obs_unit"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    obs_unit_id: Mapped[int] = mapped_column(ForeignKey("obs_unit.id"), nullable=False, index=True)
    start_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    end_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ColumnGone(DeclarativeBase):
    pass


class ObsUnit(_ObsUnitColumns, ColumnGone):
    pass


class ExecutedObsUnit(_ExecutionColumnsButStatus, ColumnGone):
    """Without `status`."""


class ModelRenamed(DeclarativeBase):
    pass


class RenamedObsUnit(_ObsUnitColumns, ModelRenamed):
    pass


class Execution(_ExecutionColumnsButStatus, ModelRenamed):
    """ExecutedObsUnit under another name."""

    status: Mapped[str] = mapped_column(Text, nullable=False)
