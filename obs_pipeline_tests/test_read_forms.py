"""Columns whose values the replica gives in another form than the buffered JSON: a time of
day (psycopg2 gives a datetime.time) and a single-precision float (PostgreSQL keeps about 7
digits). A record must read the same while buffered and once replicated."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
from sqlalchemy import REAL, Time
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline.model_registry import ModelRegistry
from obs_pipeline.schema import create_schema
from obs_pipeline_tests.test_walking_skeleton import drain_until_empty

MODELS = "obs_pipeline_tests.test_read_forms:Base"


class Base(DeclarativeBase):
    pass


class Reading(Base):
    __tablename__ = "read_forms_reading"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    at: Mapped[object] = mapped_column(Time, nullable=True)
    gain: Mapped[float] = mapped_column(REAL, nullable=True)


@pytest.fixture
def forms(settings, main_engine):
    create_schema(main_engine, ModelRegistry.from_path(MODELS))
    return dataclasses.replace(settings, models=MODELS)


@pytest.mark.parametrize("at, gain", [("12:30", 0.123456789), ("23:59:59.5", 1e-3 / 3), ("00:00:00+02:00", 30)])
def test_time_and_real_columns_read_the_same_buffered_and_replicated(forms, at, gain):
    buf = TransactionBuffer(settings=forms)
    with buf.transaction() as tx:
        rid = tx.create("Reading", {"at": at, "gain": gain})["id"]
    buffered = buf.get("Reading", rid)
    assert buf.search("Reading", {"id": rid}) == [buffered]
    drain_until_empty(forms)
    replicated = buf.get("Reading", rid)
    assert buffered == replicated, (buffered, replicated)
    buf.close()
