"""Operator jobs: requeue or discard dead-lettered transactions from the UI, prune applied-id records on
main (kept a week, those of a batch still in the processing list however old, and a week before
the oldest transaction still waiting), and prune Dagster's
own history of this project's runs (kept 30 days), which the sensor's runs would grow for ever."""

import os
import shutil
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import List

from dagster import (
    AssetCheckKey,
    AssetCheckResult,
    AssetCheckSeverity,
    Config,
    DagsterRunStatus,
    DefaultScheduleStatus,
    Failure,
    OpExecutionContext,
    RunsFilter,
    ScheduleDefinition,
    asset_check,
    in_process_executor,
    job,
    op,
)

import redis
import sqlalchemy as sa

from obs_pipeline.apply import describe, make_engine, refuse_standby, refused_by_configuration
from obs_pipeline.buffer_store import redis_trouble
from obs_pipeline.config import ConfigError
from obs_pipeline.dagster_defs.jobs import (
    DEAD_LETTER_CHECK,
    DEAD_LETTERS_LISTED,
    MAIN_ASSET,
    REPLICA_ASSET,
    REPLICA_CHECK,
    _max_runtime,
    _redis_trouble_in_one_line,
    dead_letter_check,
)
from obs_pipeline.dagster_defs.resources import ObsPipelineResource
from obs_pipeline.dead_letters import CannotBeRetried, ListKeepsChanging, RedisLostMidChange, UnknownTransaction
from obs_pipeline.health import NO_REPLAY_POSITION, REPLICA_STUCK_AFTER_S, replication_lag
from obs_pipeline.prune import what_to_keep
from obs_pipeline.schema import PRUNE_NOTHING, check_prune_days, prune_applied, prune_cutoff, too_many_days


def _dead_letters_or_one_line(obs_pipeline: ObsPipelineResource):
    """The site's dead letters; an OBS_* setting wrong (OBS_MODELS that does not load, a bad
    OBS_REDIS_URL) fails the run in its one line: it failed on the error's traceback."""
    try:
        return obs_pipeline.dead_letters()
    except ConfigError as error:
        raise Failure(description=str(error)) from error


class RetryDeadLettersConfig(Config):
    transaction_ids: List[str] = []
    all: bool = False


@op
def requeue_dead_letters(context: OpExecutionContext, config: RetryDeadLettersConfig,
                         obs_pipeline: ObsPipelineResource) -> dict:
    """Requeue in the original order, dependents after what they depend on (see dead_letters.py).
    With `all`, what it leaves listed (a spooled line Redis could not take, a letter without a
    usable id) is named in its output and metadata, by id and place, and why: it said only how
    many it requeued, the check still failing on letters nobody was told of. Those requeued under new
    ids (a producer had reused theirs) are named with the id they replace (`renamed`)."""
    if config.all == bool(config.transaction_ids):
        raise Failure(description="set either `all: true` or a list of `transaction_ids`")
    letters = _dead_letters_or_one_line(obs_pipeline)
    try:  # (what it left and renamed, as the retry's own reading found them)
        with _redis_trouble_in_one_line(letters.keys.site):  # Redis down, not answering or full: the drain's line
            ids, left, renamed = letters.requeue(None if config.all else config.transaction_ids)
            # the log and metadata list the first DEAD_LETTERS_LISTED, as a drain's run does: each
            # named every one, 17 MB an event with 100,000 letters left (the output keeps them all)
            new_ids = [f"{one['transaction_id']} (for {one['reused_id']})" for one in renamed]
            context.log.info(f"requeued {len(ids)} transaction(s): {', '.join(ids[:DEAD_LETTERS_LISTED])}"
                             + _and_more(len(ids))
                             + (f"; under new ids, as a producer had reused theirs: "
                                f"{', '.join(new_ids[:DEAD_LETTERS_LISTED])}{_and_more(len(new_ids))}"
                                if new_ids else ""))
            lines = [f"{kept['letter']}: {kept['why']}" for kept in left[:DEAD_LETTERS_LISTED]]
            if lines:
                context.log.warning(f"{len(left)} dead letter(s) stay listed, as they cannot be retried: "
                                    + "; ".join(lines) + _and_more(len(left), " (`obs-pipeline failed list` shows them)"))
            context.add_output_metadata({"requeued": len(ids), "left": len(left),
                                         "left_letters": "\n".join(lines) + _and_more(len(left), sep="\n..."),
                                         "renamed": "\n".join(new_ids[:DEAD_LETTERS_LISTED])
                                         + _and_more(len(new_ids), sep="\n...")})
            context.log_event(dead_letter_check(letters.store.redis.llen(letters.keys.failed)))
            return {"requeued": ids, "left": left, "renamed": renamed}
    except (UnknownTransaction, CannotBeRetried, ListKeepsChanging, RedisLostMidChange) as error:  # a mistyped
        # id, a spooled line Redis refused, a list the drain's runs change at every read (nothing changed: stop
        # the sensor a moment), Redis lost mid-way (it says whether the MULTI was sent): its line, not a traceback
        raise Failure(description=str(error)) from error
    finally:
        letters.store.redis.close()


def _and_more(count: int, then: str = "", sep: str = ";") -> str:
    """What follows the first DEAD_LETTERS_LISTED of `count` names: how many more."""
    more = count - DEAD_LETTERS_LISTED
    return f"{sep} and {more} more{then}" if more > 0 else ""


@job(executor_def=in_process_executor)
def retry_dead_letters():
    requeue_dead_letters()


class DiscardDeadLettersConfig(Config):
    transaction_ids: List[str]  # no `all`: each letter dropped for good is one an operator has read


@op
def drop_dead_letters(context: OpExecutionContext, config: DiscardDeadLettersConfig,
                      obs_pipeline: ObsPipelineResource) -> dict:
    """`obs-pipeline failed discard` of each, in one MULTI: an id not listed changes nothing. The
    letters blocked by those dropped stay listed, and are named (`blocked_left`), as the CLI
    names them: the log said only what went."""
    if not config.transaction_ids:
        raise Failure(description="list the `transaction_ids` to discard (`obs-pipeline failed list` shows them)")
    letters = _dead_letters_or_one_line(obs_pipeline)
    try:
        with _redis_trouble_in_one_line(letters.keys.site):  # as in requeue_dead_letters
            counts, blocked = letters.discard(config.transaction_ids)
            context.log.info("discarded " + ", ".join(
                ref + (f" ({n} letters: copies of one push)" if n > 1 else "")
                for ref, n in zip(config.transaction_ids, counts)))
            if blocked:
                context.log.warning(f"{len(blocked)} dead letter(s) blocked by what was discarded stay listed, to "
                                    f"retry or discard on their own: {', '.join(blocked[:DEAD_LETTERS_LISTED])}"
                                    + _and_more(len(blocked), " (`obs-pipeline failed list` shows them)"))
            context.log_event(dead_letter_check(letters.store.redis.llen(letters.keys.failed)))
            return {"discarded": dict(zip(config.transaction_ids, counts)), "blocked_left": blocked}
    except (UnknownTransaction, ListKeepsChanging, RedisLostMidChange) as error:  # as in requeue_dead_letters
        raise Failure(description=str(error)) from error
    finally:
        letters.store.redis.close()


@job(executor_def=in_process_executor)
def discard_dead_letters():
    drop_dead_letters()


class PruneConfig(Config):
    older_than_days: float = 7.0


@op
def prune_applied_records(context: OpExecutionContext, config: PruneConfig, obs_pipeline: ObsPipelineResource) -> dict:
    """The site's applied-id records older than `older_than_days`, but those of the transactions
    the drain may take again without the buffer (ids_that_may_come_back), and none applied
    `older_than_days` before the oldest transaction still waiting or later (schema.prune_cutoff;
    both read by prune.what_to_keep): the log and the output say when that moved the cutoff back,
    and why."""
    engine = store = None
    try:  # an OBS_* setting unset or wrong (the schedule's daemon): its line, as the drain's run says it
        check_prune_days(config.older_than_days)  # before anything is asked: a bad config is said as such
        settings = obs_pipeline.settings()
        engine = make_engine(settings.require_main())
        store = obs_pipeline.buffer_store()
        refuse_standby(engine, schema=True)
        try:  # read before the DELETE: a batch claimed meanwhile is newer than the records pruned
            keep, waiting = what_to_keep(store)
            before, why = prune_cutoff(config.older_than_days, waiting)
        except redis.RedisError as error:  # not known: pruning could drop what a reclaimed batch needs
            trouble = redis_trouble(error) or (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise Failure(description=f"site {settings.site}: {trouble}; nothing "
                                      "pruned (the records of a batch left in its processing list are kept, and "
                                      "that list could not be read)") from error
        except ListKeepsChanging as error:
            raise Failure(description=f"{error}; nothing pruned (the records of the transactions it lists "
                                      "are kept, and it could not be read whole): the next prune tries again") \
                from error
        with engine.begin() as conn:
            removed = prune_applied(conn, config.older_than_days, settings.site, keep, before)
    except (ValueError, ConfigError) as error:  # too few days, main a standby: its line, not a wrapped traceback
        raise Failure(description=str(error)) from error
    except sa.exc.OperationalError as error:  # main refused or lost: the DELETE's transaction did not commit
        main = "main refuses the connection" if refused_by_configuration(error) else "main unreachable"
        raise Failure(description=f"site {settings.site}: {main} ({describe(error)}); is OBS_MAIN_DB_URL right "
                                  "and main up? Nothing pruned") from error
    finally:
        if engine is not None:
            engine.dispose()
        if store is not None:
            store.redis.close()
    done = (f"pruned {removed} applied-transaction records of site {settings.site} "
            f"older than {config.older_than_days:g} days")
    if why is None:
        context.log.info(done)
    elif before == PRUNE_NOTHING:
        context.log.warning(f"pruned none of the applied-transaction records of site {settings.site}, as {why}")
    else:
        context.log.warning(f"{done} and applied before {before.isoformat()}: the cutoff moved back, as {why}")
    cutoff = "" if before in (None, PRUNE_NOTHING) else before.isoformat()
    context.add_output_metadata({"pruned": removed, "cutoff_moved_back_to": cutoff, "moved_back": why or ""})
    return {"pruned": removed, "cutoff_moved_back_to": cutoff or None, "moved_back": why}


@job(executor_def=in_process_executor)
def prune_applied_transactions():
    prune_applied_records()


prune_schedule = ScheduleDefinition(job=prune_applied_transactions, cron_schedule="17 3 * * *",
                                    default_status=DefaultScheduleStatus.RUNNING)


# Runs of these jobs are pruned: every job of `defs` (test_dagster checks it), with the implicit
# asset job that runs a check evaluated from the UI. Other jobs' runs in the instance are left alone.
HISTORY_JOBS = ("drain_buffer", "retry_dead_letters", "discard_dead_letters", "prune_applied_transactions",
                "prune_run_history",
                "__ASSET_JOB")
FINISHED = [DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]
HISTORY_CHUNK = 100  # run records read at a time
HISTORY_MIN_DAYS = 1.0
HISTORY_MARGIN_S = 120.0  # the run's own start and end, and the deletion in hand, beyond budget_s


class PruneHistoryConfig(Config):
    older_than_days: float = 30.0
    max_runs: int = 500       # deleted per run at most; the next run goes on
    budget_s: float = 600.0   # then the run ends, within run monitoring's max runtime (900 s)


def _now() -> datetime:
    """The clock that ages runs (tests move it)."""
    return datetime.now(timezone.utc)


def _check_history_config(config: PruneHistoryConfig, max_runtime: tuple[float, str] | None) -> None:
    """A config that would delete what an operator still looks at, or outlast the run's max
    runtime (monitoring would fail the run mid-deletion, every hour), in one line."""
    if not config.older_than_days >= HISTORY_MIN_DAYS:  # NaN too
        raise ValueError(f"older_than_days must be at least {HISTORY_MIN_DAYS:g}, not {config.older_than_days:g}: "
                         "the last day's runs are what an operator looks at when something fails")
    if too_many_days(config.older_than_days):
        raise ValueError(too_many_days(config.older_than_days))
    if config.max_runs < 1:
        raise ValueError(f"max_runs must be at least 1, not {config.max_runs}")
    if not config.budget_s > 0:
        raise ValueError(f"budget_s must be more than 0 seconds, not {config.budget_s:g}")
    if max_runtime is not None and config.budget_s + HISTORY_MARGIN_S > max_runtime[0]:
        limit, source = max_runtime
        raise ValueError(f"budget_s {config.budget_s:g} s + {HISTORY_MARGIN_S:g} s (the run's start and end, the "
                         f"deletion in hand) outlasts the run's max runtime of {limit:g} s ({source}), after which "
                         f"monitoring fails it: lower budget_s to {max(limit - HISTORY_MARGIN_S, 0):g} or less")


def _remove_run_folder(context: OpExecutionContext, run_id: str) -> None:
    """<storage>/<run_id> on this machine: the fs io manager's pickled outputs
    (<run_id>/<op>/result) and the default compute log manager's stdout/stderr."""
    folder = os.path.join(context.instance.storage_directory(), run_id)
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:  # a run that stored nothing here (or another host's run)
        pass
    except OSError as error:  # its record is gone: no later run will try again
        context.log.warning(f"could not remove {folder}: {error}")


def _runs_holding_latest_state(instance) -> set[str]:
    """The runs whose events are the project's assets' last materializations and its checks'
    last evaluations. Deleted with an idle site's old runs, the UI would show its assets never
    materialized, and a failing check (a dead letter still waiting for an operator) never
    evaluated."""
    held = {event.run_id for key in (MAIN_ASSET, REPLICA_ASSET)
            if (event := instance.get_latest_materialization_event(key)) is not None}
    for check_key in (AssetCheckKey(MAIN_ASSET, DEAD_LETTER_CHECK), AssetCheckKey(REPLICA_ASSET, REPLICA_CHECK)):
        if (record := instance.get_latest_asset_check_evaluation_record(check_key)) is not None:
            held.add(record.run_id)
    return held


def _old_run_ids(instance, cutoff: datetime, keep: set[str]):
    """Finished runs of HISTORY_JOBS created before cutoff, oldest first for each job, but those
    in `keep`. The caller deletes each before the next query, which so finds the next ones
    after the last kept one (a cursor naming a deleted run would find nothing)."""
    for job_name in HISTORY_JOBS:
        after = None
        while True:
            records = instance.get_run_records(RunsFilter(job_name=job_name, statuses=FINISHED, created_before=cutoff),
                                               limit=HISTORY_CHUNK, ascending=True, cursor=after)
            for record in records:
                if record.dagster_run.run_id in keep:
                    after = record.dagster_run.run_id
                else:
                    yield record.dagster_run.run_id
            if len(records) < HISTORY_CHUNK:
                break


@op
def delete_old_runs(context: OpExecutionContext, config: PruneHistoryConfig) -> None:
    """Old finished runs, with their events (instance.delete_run) and local folder. Each deletion
    is several connections to the storage on main, about 9 s at 250 ms each way: a run stops at
    max_runs or budget_s, and the next hour's goes on. Runs in flight or queued are never touched,
    nor those holding the assets' and checks' latest state."""
    try:
        _check_history_config(config, _max_runtime(context))
    except ValueError as error:  # its line, not a wrapped traceback
        raise Failure(description=str(error)) from error
    cutoff = _now() - timedelta(days=config.older_than_days)
    deadline = time.monotonic() + config.budget_s
    deleted, stopped = 0, None
    for run_id in _old_run_ids(context.instance, cutoff, _runs_holding_latest_state(context.instance)):
        if deleted >= config.max_runs:
            stopped = f"max_runs ({config.max_runs})"
        elif deleted and time.monotonic() >= deadline:  # at least one a run: it makes progress
            stopped = f"budget_s ({config.budget_s:g} s)"
        if stopped:
            break
        context.instance.delete_run(run_id)
        _remove_run_folder(context, run_id)
        deleted += 1
    done = (f"deleted {deleted} finished run(s) older than {config.older_than_days:g} days (created before "
            f"{cutoff:%Y-%m-%d %H:%M} UTC), with their events and local folders")
    if stopped:  # a warning: said every hour, runs come faster than they go
        context.log.warning(f"{done}; stopped at {stopped}, the rest are left for the next run")
    else:
        context.log.info(done)


@job(executor_def=in_process_executor)
def prune_run_history():
    delete_old_runs()


history_schedule = ScheduleDefinition(job=prune_run_history, cron_schedule="47 * * * *",
                                      default_status=DefaultScheduleStatus.RUNNING)


@contextmanager
def _evaluated_or_one_line(obs_pipeline: ObsPipelineResource):
    """A check evaluated from the UI that cannot judge (an OBS_* setting unset or wrong, the
    site's Redis down, not answering or full) fails in the one line the drain's run gives: it
    failed on the error's traceback, naming no setting. Not a failed check: nothing was judged."""
    try:
        with _redis_trouble_in_one_line(lambda: obs_pipeline.settings().site):
            yield
    except (ValueError, ConfigError, sa.exc.ArgumentError) as error:  # as _drain_batches reads them
        raise Failure(description=str(error).strip().splitlines()[0]) from error


@asset_check(asset=MAIN_ASSET, name=DEAD_LETTER_CHECK, description="No dead-lettered transactions wait for an operator")
def no_dead_letters(obs_pipeline: ObsPipelineResource) -> AssetCheckResult:
    with _evaluated_or_one_line(obs_pipeline):
        dead_letters = obs_pipeline.dead_letters()
        try:
            failed, oldest = dead_letters.count_and_oldest()
        finally:
            dead_letters.store.redis.close()
    return AssetCheckResult(passed=not failed, severity=AssetCheckSeverity.WARN,
                            metadata={"failed": failed, "first": oldest.reason if oldest else ""})


@asset_check(asset=REPLICA_ASSET, name=REPLICA_CHECK,
             description="The site replica replays what main committed (as `obs-pipeline status` judges it)")
def replica_replays(obs_pipeline: ObsPipelineResource) -> AssetCheckResult:
    """Evaluated here on demand, and by every drain_buffer run (failing when it ended because the
    replica replayed nothing). A batch just committed is not yet replayed: it fails only past
    REPLICA_STUCK_AFTER_S, with a database that does not answer, or with a "replica" that reports
    no replay position (a primary: `status` is degraded at once, and nothing would ever be
    replayed; the check passed until a batch had waited REPLICA_STUCK_AFTER_S)."""
    with _evaluated_or_one_line(obs_pipeline):
        settings = obs_pipeline.settings()
        main_url, replica_url = settings.require_main(), settings.require_replica()
        store = obs_pipeline.buffer_store()
        main, replica = make_engine(main_url), make_engine(replica_url)
        try:
            lag = replication_lag(store, main, replica)
        finally:
            store.redis.close()
            main.dispose()
            replica.dispose()
    unplaced = not lag.get("error") and lag.get("replica_lsn") is None
    stuck = bool(lag.get("error")) or (lag["seconds"] > REPLICA_STUCK_AFTER_S and lag["replica_behind_oldest_batch"])
    return AssetCheckResult(
        passed=not (stuck or unplaced), severity=AssetCheckSeverity.WARN,
        description=lag.get("error") or (f"the replica has not replayed a batch committed {lag['seconds']:.0f} s ago"
                                         if stuck else NO_REPLAY_POSITION if unplaced else None),
        metadata={"awaiting_replication_batches": lag["awaiting_batches"], "seconds": lag["seconds"],
                  "replica_lsn": lag.get("replica_lsn") or ""})
