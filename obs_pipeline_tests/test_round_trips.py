"""Round trips to main per batch do not grow with the batch (design point 8)."""

from __future__ import annotations

import pytest

from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline_tests.workload import buffer_observations, drain_one_batch

pytestmark = pytest.mark.usefixtures("clean_db")


def one_batch(settings, observations: int) -> tuple[int, float]:
    buf = TransactionBuffer(settings=settings)
    buffer_observations(buf, observations, finish_every=1)  # start + finish per observation
    buf.close()
    report = drain_one_batch(settings, batch_size=10_000)
    assert report.applied == 2 * observations
    return report.round_trips, report.writes_before_fold / report.writes_after_fold


def test_round_trips_are_constant_in_the_batch_size_and_finishes_fold_into_starts(settings):
    small, small_fold = one_batch(settings, 5)
    large, large_fold = one_batch(settings, 400)
    assert small == large, (small, large)
    assert small == 1  # BEGIN, applied ids, writes, COMMIT, flush LSN: one script
    # each observation: 1 + 1 + 2 files inserted, then the finish update folded into the insert
    assert small_fold == large_fold == pytest.approx(5 / 4)


def test_a_poison_transaction_costs_logarithmic_round_trips(settings, main_engine):
    """Bisection under savepoints isolates it; the other transactions of the batch commit."""
    import sqlalchemy as sa

    buf = TransactionBuffer(settings=settings)
    buffer_observations(buf, 100, finish_every=0)
    with buf.transaction() as poison:
        poison.create("ExecutedObsUnit", {"obs_unit_id": 31337, "start_time": "2025-01-01T00:00:00Z",
                                          "status": "running"})
    buffer_observations(buf, 100, finish_every=0)
    buf.close()
    report = drain_one_batch(settings, batch_size=10_000)
    assert report.applied == 200 and report.retried == 1
    # fast try, rollback, careful BEGIN, 2 scripts per bisection level (log2 201 < 8), COMMIT
    assert report.round_trips <= 3 + 2 * 8 + 1, report.round_trips
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit")).scalar_one() == 200
