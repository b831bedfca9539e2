"""DrainConfig.idle_poll_s = 0 (poll without pausing) while a committed batch awaits the
replica: each idle step waited replication_timeout_s for its replay instead (`timeout_s or
replication_timeout_s` took the 0 for "not given"), so newly buffered work waited that long."""

from __future__ import annotations

import time

import pytest

from obs_pipeline.drain import Drain, DrainConfig
from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline_tests.workload import replay_paused

pytestmark = pytest.mark.usefixtures("clean_db")


def test_an_idle_step_with_idle_poll_0_does_not_wait_the_replication_timeout(settings, replica_engine):
    buf = TransactionBuffer(settings=settings)
    with buf.transaction(endpoint="start_observation") as tx:
        tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z", "status": "running"})
    drain = Drain(settings, DrainConfig(idle_poll_s=0, replication_timeout_s=3))
    try:
        with replay_paused(replica_engine):
            drain.acquire()
            report = drain.step()  # applied; its replay waited for (up to 3 s): the replica is paused
            assert report is not None and report.applied == 1 and report.replicated == 0, report
            began = time.monotonic()
            assert drain.step() is None  # nothing to claim, nothing replayed to clean
            took = time.monotonic() - began
        assert took < 2.0, f"an idle step with idle_poll_s=0 took {took:.1f} s"  # (the bug: 3 s)
        assert buf.status(tx.transaction_id) == "applied"
    finally:
        drain.close()
        buf.close()
