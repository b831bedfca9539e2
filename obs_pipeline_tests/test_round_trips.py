"""Round trips to main per batch do not grow with the batch (design point 8)."""

from __future__ import annotations

import pytest

from obs_pipeline.drain import Drain, DrainConfig
from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline_tests.workload import buffer_observations

pytestmark = pytest.mark.usefixtures("clean_db")


def one_batch(settings, observations: int) -> tuple[int, float]:
    buf = TransactionBuffer(settings=settings)
    buffer_observations(buf, observations, finish_every=1)  # start + finish per observation
    buf.close()
    drain = Drain(settings, DrainConfig(batch_size=10_000))
    try:
        drain.acquire()
        report = drain.step()
    finally:
        drain.close()
    assert report.applied == 2 * observations
    return report.round_trips, report.writes_before_fold / report.writes_after_fold


def test_round_trips_are_constant_in_the_batch_size_and_finishes_fold_into_starts(settings):
    small, small_fold = one_batch(settings, 5)
    large, large_fold = one_batch(settings, 400)
    assert small == large, (small, large)
    assert small <= 12
    # each observation: 1 + 1 + 2 files inserted, then the finish update folded into the insert
    assert small_fold == large_fold == pytest.approx(5 / 4)
