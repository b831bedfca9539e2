"""Sensor `buffer_sensor`: launches `drain_buffer` when the site has work and no drain run is
in flight for it (the run queue's per-site limit and the drain lease back this up), and not
again within FAILED_RUN_PAUSE_S of a failed one: a run fails only once its op retries are
spent, so the cause (no main URL, a full Redis...) will not be gone a second later. The pause
doubles with each failed run in a row, up to FAILED_RUN_PAUSE_MAX_S: a cause that stays (a
setting missing from the daemon's environment, Redis full all night) made a failed run every
minute or so, over a thousand a day in the UI, more than prune_run_history deletes. After a run
that failed with main out of reach (FAILED_ON_TAG), main is asked at each tick meanwhile, and the
next starts as soon as it answers: the backlog of a long outage waited up to 300 s more. So that
pause grows on up to OUT_OF_REACH_PAUSE_MAX_S, not 300 s: a night without the link made a red
run every 9 minutes or so (4 of op retries, then the pause), hiding the runs that failed on
something else. Each tick of a pause notes it in the site's Redis (`drain_paused`, cleared as the
next run is launched), for `obs-pipeline status`, which said `drain idle` meanwhile. Nor while
another drain holds the site's lease (`obs-pipeline drain`), nor while all that is left is
committed batches the replica has not replayed: a run could only wait for them (a replica
that is down would otherwise get a run every few seconds).

A run whose worker died with its host (a reboot, the daemon's whole process group killed)
stays STARTED: nothing is left to report it, and the run queue's per-site limit would hold
every new run behind it until run monitoring's max runtime (900 s). Once the drain lease is
free and the run has logged nothing for DEAD_RUN_QUIET_S, the sensor marks it failed (run
retries relaunch it; else the sensor does at once). The lease fences a run wrongly taken for
dead: it cannot drain beside the next one.

Where committed batches await a replica that reports another timeline than the last
acknowledgement recorded, the sensor asks main which it writes (a failover since), at most every
MAIN_TIMELINE_RECHECK_S as the drain does, keeping main's answer in its cursor: asked at every
tick, a replica left on another timeline cost a far main a new connection a second, for hours.
It asks so too while they await a replica that has not replayed them: main writing another
timeline than recorded is a failover, and a failover to an asynchronous standby loses commits
whose LSNs the new timeline may not pass for long (it forked before them). Main is asked which
cluster it is as well: moved to a new initdb restored from a dump, it writes timeline 1 again,
and its replica refuses as a standby of another cluster. Where batches were committed on
another timeline or cluster than main's, a run settles it (Drain._settle_failover buffers
again what main lost, and records the rest on main's): one per failover by its run key, and one
more, FAILOVER_RUN_PAUSE_S after, for each that ended without settling it (main out of the run's
reach: failed, or done with nothing it could settle). Under one key for good, the daemon dropped
the next as a repeat, and the failover stayed unsettled until new work came."""

import contextlib
import json
import time
from datetime import timedelta
from typing import Callable

from dagster import DagsterInstance, DagsterRunStatus, DefaultSensorStatus, RunRequest, RunsFilter, SensorEvaluationContext, SkipReason, sensor

from obs_pipeline.buffer_store import redis_trouble
from obs_pipeline.config import ConfigError
from obs_pipeline.dagster_defs.jobs import FAILED_ON_TAG, MAIN_OUT_OF_REACH, SITE_TAG, drain_buffer
from obs_pipeline.dagster_defs.resources import ObsPipelineResource
from obs_pipeline.drain import MAIN_TIMELINE_RECHECK_S
from obs_pipeline.lsn import int_to_lsn

IN_FLIGHT = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
             DagsterRunStatus.STARTED]
FAILED_RUN_PAUSE_S = 60.0  # after a failed run; doubled for each failed run before it, in a row
FAILED_RUN_PAUSE_MAX_S = 300.0  # the most a site waits for its drain once the cause is gone
# after a run that failed with main out of reach: main is asked at each tick meanwhile, so the
# pause keeps no backlog once main answers, and a night's outage makes a red run every 34 minutes or so
OUT_OF_REACH_PAUSE_MAX_S = 1800.0
FAILED_RUNS_COUNTED = 10  # read of the site's last runs (from the 4th in a row the pause is the cap; 6th, main out of reach)
# A live run without the lease is quiet for at most an op retry's wait (60 s at most): longer,
# with the lease free, and its worker is gone.
DEAD_RUN_QUIET_S = 75.0
# A run relaunched behind a dead worker waits quietly for its lease to expire (lease_ttl_s), then
# takes it within a poll (0.5 s): past this margin beyond its lease_ttl_s, it is not waiting.
LEASE_WAIT_MARGIN_S = 15.0
WILL_RETRY_TAG = "dagster/will_retry"  # "true" on a failed run that the instance's run retries relaunch
AUTO_RETRY_RUN_ID_TAG = "dagster/auto_retry_run_id"  # on that run once its retry is created
# its run id, on a run the sensor marked failed for that (a retry of it inherits the tag, not the id)
WORKER_GONE_TAG = "obs_pipeline/worker_gone"
FAILOVER_TAG = "obs_pipeline/failover"  # "SITE:OLD:NEW" (timelines; CLUSTER/TIMELINE each if main moved) on a run launched to settle it
FAILOVER_RUN_PAUSE_S = 60.0  # after such a run that ended with the failover unsettled


class SiteRedisTrouble(Exception):
    """The tick could not read the site's Redis: it fails, saying why in one line."""


@contextlib.contextmanager
def _reading(store):
    """Reads of the site's Redis: its trouble a red tick in one line (the next looks again), the
    connection closed after (a tick a second would otherwise hold one each)."""
    try:
        yield
    except Exception as error:
        trouble = redis_trouble(error)
        if trouble is None:
            raise
        raise SiteRedisTrouble(f"site {store.keys.site}: {trouble}") from None
    finally:
        store.redis.close()


def _quiet_for(instance: DagsterInstance, record) -> float:
    """Seconds since the run last logged anything (or started, or was created)."""
    events = instance.get_records_for_run(record.dagster_run.run_id, limit=1, ascending=False).records
    last = max([e.event_log_entry.timestamp for e in events]
               + [record.start_time or 0.0, record.create_timestamp.timestamp()])
    return time.time() - last


def _quiet_limit(run) -> float:
    """How long a live run may be quiet with the lease free: an op retry's wait, or, with a
    lease_ttl_s beyond it in its config, its wait for a dead worker's lease, which a tick in the
    poll after the lease expired would otherwise take for a dead run."""
    try:
        lease_ttl_s = float(run.run_config["ops"]["drain_batches"]["config"]["lease_ttl_s"])
    except (KeyError, TypeError, ValueError):  # the default's (60 s) is within DEAD_RUN_QUIET_S
        return DEAD_RUN_QUIET_S
    return max(DEAD_RUN_QUIET_S, lease_ttl_s + LEASE_WAIT_MARGIN_S)


def _dead_runs(instance: DagsterInstance, running: list, lease_free: bool) -> list:
    """The STARTED runs whose worker is gone: the lease is free and they have logged nothing for long."""
    if not lease_free:
        return []
    return [r for r in running if r.dagster_run.status == DagsterRunStatus.STARTED
            and _quiet_for(instance, r) > _quiet_limit(r.dagster_run)]


def _retry_pending(run) -> bool:
    """A failed run that run retries will relaunch but have not yet: their daemon looks every 5 s,
    and a run launched by the sensor meanwhile would be a second one, queued behind the retry."""
    return run.tags.get(WILL_RETRY_TAG) == "true" and not run.tags.get(AUTO_RETRY_RUN_ID_TAG)


def _failed_run_pause(recent: list, succeeded: int | None = None,
                      cap_s: float = FAILED_RUN_PAUSE_MAX_S) -> tuple[float, int]:
    """The pause after the site's last run, newest first in `recent`, and how many failed in a
    row. A run whose worker was gone (the sensor marked it failed) failed on no cause of its own:
    no pause after it, and it ends a streak. So does a success (`succeeded`: the storage id of
    the site's newest, by hand too, which is not in `recent`): the runs before it do not count."""
    streak = 0
    for record in recent:
        run = record.dagster_run
        if (run.status != DagsterRunStatus.FAILURE or run.tags.get(WORKER_GONE_TAG) == run.run_id
                or (succeeded is not None and record.storage_id < succeeded)):
            break
        streak += 1
    if not streak:
        return 0.0, 0
    return min(FAILED_RUN_PAUSE_S * 2 ** (streak - 1), cap_s), streak


def _newest_success(instance: DagsterInstance, site: str, oldest) -> int | None:
    """The storage id of the site's newest drain run (a run launched by hand has no site tag)
    that succeeded, if created since the `oldest` run looked at: what failed the runs before it
    is fixed, they end no streak. Counted by the sensor's runs alone, a run by hand that succeeded
    between failed ones did not end their streak (4 in a row, 300 s, where 1 had failed since)."""
    later = instance.get_run_records(filters=RunsFilter(job_name=drain_buffer.name, statuses=[DagsterRunStatus.SUCCESS],
                                                        created_after=oldest.create_timestamp - timedelta(seconds=1)),
                                     limit=20)
    return next((r.storage_id for r in later if r.dagster_run.tags.get(SITE_TAG, site) == site), None)


def _retries_not_due(store) -> str:
    """What waits to retry later, for an idle tick's line: "buffer empty" alone read as if the
    site had nothing left, while main's refusals wait their back-off (up to an hour)."""
    depths = store.depths()
    if not depths["retry"]:
        return ""
    due_in = max(0.0, depths["first_retry_due"] - time.time())
    return f"; {depths['retry']} transaction(s) wait to retry, the next due in {due_in:.0f} s"


def _site_runs(instance: DagsterInstance, site: str, statuses: list) -> list:
    """The site's drain runs in these statuses, newest first. A run launched by hand (the
    launchpad) has no site tag: it may be draining this site too."""
    return [r for r in instance.get_run_records(filters=RunsFilter(job_name=drain_buffer.name, statuses=statuses),
                                                limit=50)
            if r.dagster_run.tags.get(SITE_TAG, site) == site]


def _kept_main_identity(cursor: str | None, recorded: tuple[int | None, int | None]) -> tuple[bool, tuple[int, int] | None]:
    """Whether the cursor keeps an answer of main's (ObsPipelineResource.main_identity) asked less
    than MAIN_TIMELINE_RECHECK_S ago, with the same cluster and timeline recorded, and that
    answer. A cursor of another shape (none yet, an earlier version's, reset from the UI) keeps
    none."""
    try:
        kept = json.loads(cursor) if cursor else {}
        answer, age = kept["main_identity"], time.time() - float(kept["main_identity_asked_at"])
        fresh = (kept["recorded"] == list(recorded) and 0 <= age < MAIN_TIMELINE_RECHECK_S  # (a clock set back: asked again)
                 and (answer is None or len(answer) == 2 and all(type(x) is int for x in answer)))
    except (ValueError, TypeError, KeyError):
        return False, None
    return fresh, tuple(answer) if answer is not None else None


def _main_identity_at_most_every_recheck(context: SensorEvaluationContext, obs_pipeline: ObsPipelineResource,
                                         recorded: tuple[int | None, int | None]) -> Callable[[], tuple[int, int] | None]:
    """How a tick learns which cluster main is and which timeline it writes (ObsPipelineResource.
    replica_position asks only where the replica's timeline is not the recorded one): main's
    answer as the cursor keeps it, else main's now, kept for the next ticks. Another cluster or
    timeline recorded since (new commits) asks main again."""
    answered: list[tuple[int, int] | None] = []  # this tick's answer: asked at most once a tick

    def ask() -> tuple[int, int] | None:
        if answered:
            return answered[0]
        fresh, answer = _kept_main_identity(context.cursor, recorded)
        if not fresh:
            asked_at = time.time()
            answer = obs_pipeline.main_identity()
            context.update_cursor(json.dumps({"main_identity": answer, "main_identity_asked_at": asked_at,
                                              "recorded": list(recorded)}))
        answered.append(answer)
        return answer
    return ask


def _failover_run(instance: DagsterInstance, site: str, old: tuple[int | None, int],
                  new: tuple[int, int]) -> RunRequest | SkipReason:
    """The run that settles main's failover from (cluster, timeline) `old` to `new` (its chunks
    still wait): one, and one more FAILOVER_RUN_PAUSE_S after each that ended, keyed so that the
    daemon drops a repeat. (A failed one also holds the next for the failed-run pause, checked
    before.) Main moved to another cluster (a new initdb restored from a dump) may write the
    same timeline number: the clusters tell the two apart."""
    if old[0] in (None, new[0]):
        change, what = f"{old[1]}:{new[1]}", f"main's failover from timeline {old[1]} to {new[1]}"
    else:
        change = f"{old[0]}/{old[1]}:{new[0]}/{new[1]}"
        what = f"main's move from cluster {old[0]} (timeline {old[1]}) to cluster {new[0]} (timeline {new[1]})"
    failover = f"{site}:{change}"
    ended = instance.get_run_records(filters=RunsFilter(job_name=drain_buffer.name, tags={FAILOVER_TAG: failover},
                                                        statuses=[DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE,
                                                                  DagsterRunStatus.CANCELED]))
    if ended:
        last = ended[0]
        wait = FAILOVER_RUN_PAUSE_S - (time.time() - (last.end_time or last.update_timestamp.timestamp()))
        if wait > 0:
            return SkipReason(f"site {site}: drain run {last.dagster_run.run_id} ended "
                              f"({last.dagster_run.status.value}) with {what} "
                              f"unsettled (main out of its reach? see its log); the next in {wait:.0f} s")
    return RunRequest(run_key=f"{site}:failover:{change}" + (f":after-{len(ended)}-runs" if ended else ""),
                      tags={SITE_TAG: site, FAILOVER_TAG: failover})


@sensor(job=drain_buffer, default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=1)
def buffer_sensor(context: SensorEvaluationContext, obs_pipeline: ObsPipelineResource):
    store = obs_pipeline.buffer_store()
    decision = _tick(context, obs_pipeline, store)
    if isinstance(decision, RunRequest):  # the pause noted for `status` (_pause_noted) is over
        with contextlib.suppress(SiteRedisTrouble), _reading(store):
            store.clear_drain_notes()
    return decision


def _pause_noted(store, skip: SkipReason, why: str, wait: float, until_main_answers: bool) -> SkipReason:
    """The skip of a tick in the pause after a failed run, the pause noted in Redis for `obs-pipeline
    status`, which said `drain idle` (no run in flight, and status does not read Dagster)."""
    with contextlib.suppress(SiteRedisTrouble), _reading(store):  # a note: the tick's answer is the skip
        store.note_drain_paused(why, wait, until_main_answers)
    return skip


def _tick(context: SensorEvaluationContext, obs_pipeline: ObsPipelineResource, store) -> RunRequest | SkipReason:
    site = store.keys.site
    with _reading(store):
        work = store.work()
        claimable = work["buffer"] or work["processing"] or work["due_retries"]
        lowest = store.awaiting_replication()[1] if work["awaiting_replication"] and not claimable else None
        cluster = store.main_cluster() if lowest is not None else None
        timeline = store.main_timeline() if lowest is not None else None
        lease_left_s = store.lease_left_s()  # None: nobody holds it
        later = _retries_not_due(store) if not any(work.values()) else ""
    if not any(work.values()):
        return SkipReason(f"site {site}: buffer empty, nothing awaiting replication{later}")
    running = _site_runs(context.instance, site, IN_FLIGHT)
    dead = _dead_runs(context.instance, running, lease_free=lease_left_s is None)
    for record in dead:  # tagged first: the failed-run pause is for runs that failed on a cause
        context.instance.add_run_tags(record.dagster_run.run_id, {WORKER_GONE_TAG: record.dagster_run.run_id})
        context.instance.report_run_failed(record.dagster_run, (
            f"obs-pipeline: marked failed by buffer_sensor: its worker is gone (the drain lease of site {site} "
            f"is free and the run logged nothing for over {_quiet_limit(record.dagster_run):.0f} s: killed, or its host "
            "restarted); the next drain reclaims its batch"))
    retried = [r.dagster_run.run_id for r in dead
               if context.instance.get_run_by_id(r.dagster_run.run_id).tags.get(WILL_RETRY_TAG) == "true"]
    if retried:
        return SkipReason(f"site {site}: drain run {retried[0]} had died (lease free, nothing logged); "
                          "marked it failed, and run retries relaunch it")
    running = [r for r in running if r not in dead]
    if running:
        return SkipReason(f"site {site}: drain run {running[0].dagster_run.run_id} is in flight")
    last = context.instance.get_run_records(
        filters=RunsFilter(job_name=drain_buffer.name, tags={SITE_TAG: site}), limit=FAILED_RUNS_COUNTED)
    if last and last[0].dagster_run.status == DagsterRunStatus.FAILURE and last[0].end_time:
        failed, since = last[0].dagster_run, time.time() - last[0].end_time
        if _retry_pending(failed) and FAILED_RUN_PAUSE_S - since > 0:  # their daemon looks every 5 s
            return SkipReason(f"site {site}: drain run {failed.run_id} failed, and run retries relaunch it "
                              f"(the sensor does if they have not in {FAILED_RUN_PAUSE_S - since:.0f} s)")
        out_of_reach = failed.tags.get(FAILED_ON_TAG) == MAIN_OUT_OF_REACH
        cap_s = OUT_OF_REACH_PAUSE_MAX_S if out_of_reach else FAILED_RUN_PAUSE_MAX_S
        pause, streak = _failed_run_pause(last, cap_s=cap_s)
        if pause - since > 0:  # unless a run succeeded since (launched by hand, once fixed)
            pause, streak = _failed_run_pause(last, _newest_success(context.instance, site, last[-1]), cap_s)
        wait = pause - since
        # (none after a run whose worker was gone; after one that failed with main out of reach,
        # none once main answers: the backlog of a long outage waited up to 300 s more)
        if wait > 0 and not (out_of_reach and obs_pipeline.main_identity() is not None):
            in_a_row = (f", the last {streak}{' or more' if streak == len(last) == FAILED_RUNS_COUNTED else ''} "
                        "drain runs in a row" if streak > 1 else "")
            why = f"drain run {failed.run_id} failed{' with main out of reach' if out_of_reach else ''}{in_a_row}"
            if out_of_reach:
                return _pause_noted(store, SkipReason(
                    f"site {site}: {why}; the next once main answers (looked at each tick), or in {wait:.0f} s "
                    "(see that run's log; a run launched by hand starts at once)"), why, wait, True)
            return _pause_noted(store, SkipReason(
                f"site {site}: {why}; the next in {wait:.0f} s (see that run's log; the pause doubles with each "
                f"failed run, up to {FAILED_RUN_PAUSE_MAX_S:.0f} s; a run launched by hand starts at once)"),
                why, wait, False)
    if lease_left_s is not None:  # a drain outside this Dagster (`obs-pipeline drain`), or a run that died
        canceling = _site_runs(context.instance, site, [DagsterRunStatus.CANCELING])
        if canceling:  # terminated: it keeps the lease until main answers its batch in flight
            return SkipReason(f"site {site}: drain run {canceling[0].dagster_run.run_id} is being canceled and holds the "
                              f"drain lease until main answers the batch it has in flight ({lease_left_s:.0f} s more "
                              "unless renewed); the next run starts once it lets go")
        return SkipReason(f"site {site}: the drain lease is held outside this Dagster's runs in flight "
                          f"(`obs-pipeline drain`, or a run that died), for {lease_left_s:.0f} s more "
                          "unless renewed; a run would only wait for it")
    if lowest is not None:
        main_now = _main_identity_at_most_every_recheck(context, obs_pipeline, (cluster, timeline))
        try:
            replayed, refusal = obs_pipeline.replica_position(cluster, timeline, main_now)
        except ConfigError:  # the run fails on it, saying so in one line
            replayed, refusal = lowest, None
        if replayed is None or replayed < lowest:
            now = main_now() if timeline is not None else None  # (asked already where the replica's differs)
            if now is not None and (now[1] != timeline or cluster not in (None, now[0])):
                with _reading(store):
                    unsettled = store.chunks_off_timeline(now[1], now[0])
                if unsettled:
                    return _failover_run(context.instance, site, (cluster, timeline), now)
            where = (refusal if refusal else
                     "does not answer or reports no replay position (is OBS_REPLICA_DB_URL a primary?)"
                     if replayed is None else f"has replayed up to {int_to_lsn(replayed)}, the oldest is at "
                     f"{int_to_lsn(lowest)}")
            return SkipReason(f"site {site}: {work['awaiting_replication']} committed batch(es) await the replica, "
                              f"which {where}; a drain starts to clean their caches once it replays them")
        if refusal:  # replayed, but a drain could not check it has their ids (applied_records_refused)
            return SkipReason(f"site {site}: {work['awaiting_replication']} committed batch(es) await their cleanup, "
                              f"which a drain cannot do: {refusal}")
    return RunRequest(tags={SITE_TAG: site})
