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
from obs_pipeline_tests.conftest import wait_for_replica
from obs_pipeline_tests.test_walking_skeleton import drain_until_empty

MODELS = "obs_pipeline_tests.test_read_forms:Base"


class Base(DeclarativeBase):
    pass


class Reading(Base):
    __tablename__ = "read_forms_reading"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    at: Mapped[object] = mapped_column(Time, nullable=True)
    gain: Mapped[float] = mapped_column(REAL, nullable=True)
    at_zone: Mapped[object] = mapped_column(Time(timezone=True), nullable=True)


@pytest.fixture
def forms(settings, main_engine, replica_engine):
    create_schema(main_engine, ModelRegistry.from_path(MODELS))
    wait_for_replica(main_engine, replica_engine)  # a first read of the replica needs the table
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


FILTERS = [  # each with the row's id (the table is shared by the session's tests)
    {"gain": 0.1}, {"gain": 0.10000000149011612}, {"gain": [0.1, 7]}, {"gain": {"<=": 0.1}}, {"gain": {">": 0.1}},
    {"gain": {"<": 0.1}}, {"gain": {">=": 0.10000000000000001}},
    {"at": "12:00:00"}, {"at": "12:00:00+05:00"}, {"at": {">": "11:59:59"}},
    {"at_zone": "12:00:00+02:00"}, {"at_zone": "10:00:00+00:00"}, {"at_zone": ["10:00:00Z", "12:00:00+02:00"]},
    {"at_zone": {"<": "10:00:00+00:00"}}, {"at_zone": {">": "10:00:00+00:00"}}, {"at_zone": {">=": "10:00:00"}},
]


def test_filters_on_time_and_real_columns_match_the_same_rows_buffered_and_replicated(forms):
    """A REAL column keeps 0.1 as 0.10000000149011612, which PostgreSQL compares with a
    filter's 0.1 as doubles (not equal), and a buffered row compared in Python as given
    (equal); PostgreSQL orders `time with time zone` by instant, then offset (12:00+02 is not
    10:00+00, and sorts before it), Python's time calls them equal."""
    buf = TransactionBuffer(settings=forms)
    with buf.transaction() as tx:
        rid = tx.create("Reading", {"at": "12:00:00", "gain": 0.1, "at_zone": "12:00:00+02:00"})["id"]
    buffered = {str(f): [r["id"] for r in buf.search("Reading", {"id": rid, **f})] for f in FILTERS}
    drain_until_empty(forms)
    replicated = {str(f): [r["id"] for r in buf.search("Reading", {"id": rid, **f})] for f in FILTERS}
    assert buffered == replicated
    assert replicated[str({"gain": 0.1})] == [rid]  # the value the row reads as finds it
    buf.close()
