"""Sensor `buffer_sensor`: launches `drain_buffer` when the site has work and no drain run is
in flight for it (the run queue's per-site limit and the drain lease back this up), and not
again within FAILED_RUN_PAUSE_S of a failed one: a run fails only once its op retries are
spent, so the cause (no main URL, a full Redis...) will not be gone a second later."""

import time

from dagster import DagsterRunStatus, DefaultSensorStatus, RunRequest, RunsFilter, SensorEvaluationContext, SkipReason, sensor

from obs_pipeline.dagster_defs.jobs import SITE_TAG, drain_buffer
from obs_pipeline.dagster_defs.resources import ObsPipelineResource

IN_FLIGHT = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
             DagsterRunStatus.STARTED]
FAILED_RUN_PAUSE_S = 60.0


@sensor(job=drain_buffer, default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=1)
def buffer_sensor(context: SensorEvaluationContext, obs_pipeline: ObsPipelineResource):
    store = obs_pipeline.buffer_store()
    try:
        if not store.has_work():
            return SkipReason(f"site {store.keys.site}: buffer empty, nothing awaiting replication")
    finally:
        store.redis.close()
    site = store.keys.site
    # a run launched by hand (the launchpad) has no site tag: it may be draining this site too
    running = [r for r in context.instance.get_run_records(
        filters=RunsFilter(job_name=drain_buffer.name, statuses=IN_FLIGHT), limit=50)
        if r.dagster_run.tags.get(SITE_TAG, site) == site]
    if running:
        return SkipReason(f"site {site}: drain run {running[0].dagster_run.run_id} is in flight")
    last = context.instance.get_run_records(
        filters=RunsFilter(job_name=drain_buffer.name, tags={SITE_TAG: site}), limit=1)
    if last and last[0].dagster_run.status == DagsterRunStatus.FAILURE and last[0].end_time:
        wait = FAILED_RUN_PAUSE_S - (time.time() - last[0].end_time)
        if wait > 0:
            return SkipReason(f"site {site}: drain run {last[0].dagster_run.run_id} failed; "
                              f"the next in {wait:.0f} s (see that run's log)")
    return RunRequest(tags={SITE_TAG: site})
