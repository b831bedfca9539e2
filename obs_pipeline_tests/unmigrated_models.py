"""Models whose tables main (and so the replica) does not have as mapped, for
test_script_inputs.py: a model added to OBS_MODELS without `db init` since, and one with a
column added to the model but not to its table (the built-in obs_unit)."""

from __future__ import annotations

from sqlalchemy import Integer, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Telescope(Base):
    """Its table is never created."""
    __tablename__ = "unmigrated_telescope"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str | None] = mapped_column(Text, nullable=True)


class ObsUnit(Base):
    """obs_unit as the built-in models make it, and a column its table does not have."""
    __tablename__ = "obs_unit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    priority: Mapped[int | None] = mapped_column(Integer, nullable=True)
