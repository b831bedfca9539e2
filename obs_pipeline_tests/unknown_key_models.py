"""Models keyed by a column of a type this project does not know, for test_unusual_schemas.py:
PostgreSQL's INET, and a site's own UserDefinedType (a MACADDR). Their keys are taken as
given and checked by PostgreSQL alone."""

from __future__ import annotations

from sqlalchemy import Text
from sqlalchemy.dialects.postgresql import INET
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import UserDefinedType


class Base(DeclarativeBase):
    pass


class MacAddress(UserDefinedType):
    """A site's own type that only names its SQL type."""
    cache_ok = True

    def get_col_spec(self, **kw: object) -> str:
        return "MACADDR"


class Node(Base):
    __tablename__ = "unknown_key_node"

    address: Mapped[str] = mapped_column(INET, primary_key=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)


class Card(Base):
    __tablename__ = "unknown_key_card"

    mac: Mapped[str] = mapped_column(MacAddress, primary_key=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
