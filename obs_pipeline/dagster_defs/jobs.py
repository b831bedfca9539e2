"""Job `drain_buffer`: drain batches while there is work (up to a time budget), then make sure
everything committed is replayed by the replica and its caches are cleaned.

Each batch is reported as an asset materialization of the main database (one main committed
none of, all dead-lettered say, as an observation of it); each replication pass as one of the
site replica. Transient failures (main unreachable, the site's Redis down or full) surface as
op retries with exponential backoff, waited for in the op, unless Dagster's storage (on main) is
down too: then the drain retries the batch itself and the run goes on once main is back. A
crashed run is retried by the instance's run retries.
"""

import contextlib
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    Backoff,
    Config,
    DagsterEventType,
    DagsterExecutionInterruptedError,
    DagsterRunStatus,
    Failure,
    Jitter,
    OpExecutionContext,
    RetryPolicy,
    RetryRequested,
    in_process_executor,
    job,
    op,
)

import sqlalchemy as sa

from obs_pipeline.apply import TransientError
from obs_pipeline.buffer_store import BufferStore, redis_trouble
from obs_pipeline.config import ConfigError
from obs_pipeline.dagster_defs.resources import ObsPipelineResource
from obs_pipeline.drain import BACKGROUND_NICENESS, BatchReport, DrainBusy, DrainConfig
from obs_pipeline.health import REPLICA_STUCK_AFTER_S, oldest_batch_age_s, replica_behind

SITE_TAG = "obs_pipeline/site"
# on a drain run that failed because main was out of reach: buffer_sensor launches the next as
# soon as main answers, not after its pause for failed runs (for causes that stay)
FAILED_ON_TAG, MAIN_OUT_OF_REACH = "obs_pipeline/failed_on", "main out of reach"
MAIN_ASSET = AssetKey(["obs_pipeline", "main_database"])
REPLICA_ASSET = AssetKey(["obs_pipeline", "site_replica"])
TRANSIENT_RETRIES = 8
DEAD_LETTER_CHECK = "no_dead_letters"  # operations.no_dead_letters, on MAIN_ASSET
REPLICA_CHECK = "replica_replays"  # operations.replica_replays, on REPLICA_ASSET


def dead_letter_check(failed: int) -> AssetCheckEvaluation:
    """The no_dead_letters check's result, logged by the runs that change the dead-letter list:
    nothing else evaluates it (the asset is not materialized by an asset job)."""
    return AssetCheckEvaluation(asset_key=MAIN_ASSET, check_name=DEAD_LETTER_CHECK, passed=not failed,
                                severity=AssetCheckSeverity.WARN, metadata={"failed": failed})


@contextmanager
def _redis_trouble_in_one_line(site: str | Callable[[], str]):
    """Redis down, not answering or full fails the op or check in the drain's one line, naming
    the site (`site`, or how to read it where the settings are read only on failure): it failed
    on redis-py's traceback, naming no setting. Any other error passes unchanged."""
    try:
        yield
    except Exception as error:
        trouble = redis_trouble(error)
        if trouble is None:
            raise
        raise Failure(description=f"site {site() if callable(site) else site}: {trouble}") from error


class DrainRunConfig(Config):
    budget_s: float = 300.0      # then the run ends and the sensor launches a fresh one
    idle_exit_s: float = 5.0     # keep draining while work keeps arriving
    batch_size: int = 2000
    max_batch_size: int | None = None  # where main is far, batches grow up to this (None: 10000, or batch_size if more)
    lease_ttl_s: float = 60.0
    replication_timeout_s: float = 10.0  # also: the run ends once only the replica's replay is
    #                                      missing and it has replayed nothing for this long
    retry_base_s: float = 5.0
    timeout_attempts: int = 5  # a transaction main cancels this many times in a row, applied alone, is dead-lettered
    transient_retry_wait_s: float = 2.0  # op retry after main was unreachable: 2, 4, 8 ... s (max 60)
    aof_compaction: bool = True  # ask Redis to rewrite its AOF when idle and the file is mostly history


def _drain_config(config: DrainRunConfig) -> DrainConfig:
    return DrainConfig(batch_size=config.batch_size, max_batch_size=config.max_batch_size,
                       lease_ttl_s=config.lease_ttl_s,
                       replication_timeout_s=config.replication_timeout_s, retry_base_s=config.retry_base_s,
                       timeout_attempts=config.timeout_attempts,
                       niceness=BACKGROUND_NICENESS,  # the run worker is a process of its own
                       aof_check_s=DrainConfig.aof_check_s if config.aof_compaction else None)


MAX_RUNTIME_TAGS = ("dagster/max_runtime", "dagster/max_runtime_seconds")  # what run monitoring reads


def _max_runtime(context: OpExecutionContext) -> tuple[float, str] | None:
    """How long run monitoring lets this run live, and what says so (None: no limit)."""
    if not context.instance.run_monitoring_enabled:
        return None
    tag = next((t for t in MAX_RUNTIME_TAGS if context.run.tags.get(t)), None)
    if tag is None:
        seconds = float(context.instance.run_monitoring_max_runtime_seconds or 0)
        return (seconds, "run_monitoring.max_runtime_seconds in dagster.yaml") if seconds else None
    try:
        seconds = float(context.run.tags[tag])
    except ValueError:  # monitoring ignores it too
        return None
    return (seconds, f"the run's {tag} tag") if seconds else None


def _check_run_config(config: DrainRunConfig, max_runtime: tuple[float, str] | None) -> None:
    """Times that make no sense, in one line (a budget of 0 drains nothing, run after run). A
    run may outlast its budget by a lease wait and the batch in hand; past its max runtime,
    monitoring kills it mid-batch (the run fails, its batch waits for the lease to expire)."""
    for name, positive in (("budget_s", True), ("transient_retry_wait_s", True), ("idle_exit_s", False)):
        value = getattr(config, name)
        if not (value > 0 if positive else value >= 0):  # NaN too
            raise ValueError(f"{name} must be {'more than 0' if positive else '0 or more'} seconds, not {value:g}")
    if max_runtime is None:
        return
    limit, source = max_runtime
    beyond = config.lease_ttl_s + config.replication_timeout_s
    if config.budget_s + beyond > limit:
        fix = (f"lower budget_s to {limit - beyond:g} or less" if limit > beyond
               else "lower lease_ttl_s and replication_timeout_s, or raise the max runtime")
        raise ValueError(f"budget_s {config.budget_s:g} s + lease_ttl_s + replication_timeout_s ({beyond:g} s: a "
                         f"lease wait, the batch in hand) outlasts the run's max runtime of {limit:g} s ({source}), "
                         f"after which monitoring kills it mid-batch: {fix}")


def _storage_answers(context: OpExecutionContext) -> bool:
    """Whether Dagster's own storage answers. It is on main (dagster.yaml): while main is down,
    every event the run writes, an op retry's included, fails the run after a few seconds."""
    try:
        context.instance.get_run_record_by_id(context.run_id)
    except Exception:  # noqa: BLE001 - DagsterPostgresException, OperationalError, ...
        return False
    return True


DEAD_LETTERS_LISTED = 50  # per batch, in its observation and warning (the count is always whole)
NO_ID = "(no usable transaction_id, `obs-pipeline failed list` shows it as #N)"  # a producer's entry


def _report_batch(context: OpExecutionContext, site: str, report: BatchReport) -> None:
    """One event per batch: a materialization of main where main committed some of it (or found
    it committed: an answer lost, which no event reported), else an observation saying why, as
    a materialization said main's data changed; a pass that only cleaned, one of the replica.
    Its dead letters: one observation (the batch's own, where main committed none) and one
    warning for all: each Dagster event is a new connection to its storage, on main, far away
    (about a second at 250 ms), so one per dead letter could stall the drain for minutes."""
    meta = {"site": site, **{k: v for k, v in report.metadata().items() if not isinstance(v, dict)}}
    meta["rows_per_model"] = report.rows_per_model
    if report.writes_after_fold:
        meta["fold_ratio"] = round(report.writes_before_fold / report.writes_after_fold, 3)
    dead = len(report.dead_lettered)
    listed = [f"{d['transaction_id'] or NO_ID}: {d['reason']}" for d in report.dead_lettered[:DEAD_LETTERS_LISTED]]
    more = dead - len(listed)
    # the listing has its own key: under `transactions` it took the batch's count's place, a text
    # where the key is an int on every other event of a batch
    listing = {"site": site, "transactions": report.transactions, "dead_lettered": dead,
               "dead_letters": "\n".join(listed) + (f"\n... and {more} more" if more else "")}
    if report.transactions and not (report.applied or report.already_applied):
        why = ", ".join(f"{n} {what}" for n, what in ((dead, "dead-lettered"), (report.retried, "to retry"),
                                                      (report.held, "parked")) if n)
        context.log_event(AssetObservation(asset_key=MAIN_ASSET, metadata={**meta, **(listing if dead else {})},
                                           description="nothing applied" + (f": {why}" if why else "")))
    else:
        context.log_event(AssetMaterialization(asset_key=MAIN_ASSET if report.transactions else REPLICA_ASSET,
                                               metadata=meta,
                                               description=f"{report.applied} applied, {report.replicated} replicated"))
        if dead:
            context.log_event(AssetObservation(asset_key=MAIN_ASSET, metadata=listing))
    if dead:
        context.log.warning(f"dead-lettered {dead} transaction(s): " + "; ".join(listed)
                            + (f"; and {more} more" if more else "") + " (`obs-pipeline failed list`)")


SUMMED = ("batches", "applied", "already_applied", "dead_lettered", "replicated")  # over the op's attempts
RETRIED = "transient_errors"  # also summed: an attempt's, on the observation of main its op retry logs


@dataclass
class OpRetries:
    """This op's retries since the run last drained a batch, each cause its own: main's 8 and
    Redis's 3 bound one outage, and its backoff starts from the shortest wait again once main
    has answered. They counted the whole run: on a link that drops often its second outage
    began at "op retry 6 of 8" (waits of 32 and 60 s, main back meanwhile), and the run failed at
    its 8th in all. Dagster counts the op's attempts as one (context.retry_number): after 4
    retries for main one Redis error failed the run at once, after Redis's 3 main had 5."""

    main: int = 0
    redis: int = 0
    attempts: int = 1  # since the run last drained a batch, this one included
    after_a_batch: bool = False

    def retried(self, cause: str | None) -> None:
        self.attempts += 1
        self.main += cause == TransientError.__name__
        self.redis += cause == RedisTrouble.__name__

    def drained(self) -> None:
        self.main = self.redis = 0
        self.attempts, self.after_a_batch = 1, True

    def main_unreachable_at(self) -> str:
        """'at each of the run's 9 attempts', 'at 9 of the 12 attempts since the run last drained a batch'."""
        tries = self.main + 1
        counted = "each of" if tries == self.attempts else f"{tries} of"
        if self.attempts == 1:  # (a try past the budget)
            return "at the one attempt since the run last drained a batch" if self.after_a_batch else "at the run's one attempt"
        if self.after_a_batch:
            return f"at {counted} the {self.attempts} attempts since the run last drained a batch"
        return f"at {counted} the run's {self.attempts} attempts"


def _earlier_attempts(context: OpExecutionContext) -> tuple[dict[str, int], OpRetries]:
    """What this op's earlier attempts drained, from their batches' events (one each, see
    _report_batch), and how often main failed them, from their op retries' observations: an
    op retry (main unreachable) starts a new summary, and the run's output, log line and
    applied_this_run counted its last attempt alone. With them, the op retries since its last
    batch, from their retry events' causes (TransientError, RedisTrouble). Read once, on a retry only."""
    totals, retries = dict.fromkeys((*SUMMED, RETRIED), 0), OpRetries()
    if not context.retry_number:
        return totals, retries
    step_key = str(context.op_handle)  # the step key of a top-level op
    for entry in context.instance.all_logs(context.run_id, of_type={DagsterEventType.ASSET_MATERIALIZATION,
                                                                    DagsterEventType.ASSET_OBSERVATION,
                                                                    DagsterEventType.STEP_UP_FOR_RETRY}):
        if entry.step_key != step_key or entry.dagster_event is None:
            continue
        if entry.dagster_event.event_type == DagsterEventType.STEP_UP_FOR_RETRY:
            cause = getattr(getattr(entry.dagster_event.event_specific_data, "error", None), "cause", None)
            retries.retried(cause.cls_name if cause is not None else None)
            continue
        if entry.asset_materialization is not None:
            metadata = entry.asset_materialization.metadata
        elif entry.asset_observation is not None:
            metadata = entry.asset_observation.metadata
        else:
            continue
        # a batch's event carries its counts (an observation: main committed none of it); other
        # observations are an applied batch's dead letters, counted on its materialization, or
        # an op retry's
        batch = entry.asset_materialization is not None or "applied" in metadata
        totals["batches"] += batch
        if batch and (entry.asset_materialization is None or entry.asset_materialization.asset_key == MAIN_ASSET):
            retries.drained()  # (not a pass that only cleaned: the replica's)
        names = SUMMED[1:] if batch else (RETRIED,)
        for name in names:
            value = metadata.get(name)
            totals[name] += int(value.value) if value is not None and value.value is not None else 0
    return totals, retries


TERMINATED = ("interrupted (the run was terminated): the drain stopped and released its lease; a batch it had "
              "claimed and not committed is taken back by the next drain")


REDIS_RETRIES = 3  # Redis down, not answering or full: op retries after 2, 6, 14 s (+-2 s)
# Its waits, and drain_batches' retry policy for any other error (a Failure saying what to do
# has none). Redis trouble was left to the policy, waited for in Dagster's executor (see drain_batches).
OP_RETRY_POLICY = RetryPolicy(max_retries=REDIS_RETRIES, delay=2, backoff=Backoff.EXPONENTIAL,
                              jitter=Jitter.PLUS_MINUS)


# What Dagster is told of drain_batches' retries, which it counts together, over the whole run:
# the op keeps each cause's own count since the run last drained a batch (OpRetries) and fails
# the run first, in its line; a run that drains between outages may have many more, and its
# budget ends it (a try past it that fails ends the run). This bound is Dagster's, never reached.
MAX_OP_RETRIES = 10_000


class RedisTrouble(Exception):
    """The site's Redis down, not answering or full: the cause of an op retry of drain_batches,
    its one line the message (the retry event shows it, as main's shows its TransientError)."""


@op(retry_policy=OP_RETRY_POLICY)
def drain_batches(context: OpExecutionContext, config: DrainRunConfig, obs_pipeline: ObsPipelineResource) -> dict:
    """Claim, apply, acknowledge, await replay and clean, batch after batch, until empty or budget."""
    try:
        try:
            return _drain_batches(context, config, obs_pipeline)
        except RetryRequested as retry:  # main unreachable or Redis trouble: the wait for the op retry
            # is the op's own. Waited in Dagster's executor, an interrupt without a termination
            # request (`dev` stopped) was raised as the retry began, before this op could end the
            # run CANCELED: it ended FAILURE ("interrupted unexpectedly"), and the next
            # buffer_sensor, taking it for a failure with a cause, launched no drain for 60 s.
            time.sleep(retry.seconds_to_wait)
            raise RetryRequested(max_retries=retry.max_retries, seconds_to_wait=0) from retry.__cause__
    except (DagsterExecutionInterruptedError, KeyboardInterrupt) as interrupt:
        # Terminate interrupts the run worker. Under the in-process executor the retry policy
        # takes an interrupt for a failure and retries the op (dagster-io/dagster#15026): the
        # drain started again and the run went on. A Failure without retries ends it; a run
        # being terminated then ends CANCELED.
        _cancel_if_stopped_from_outside(context)
        raise Failure(description=TERMINATED, allow_retries=False) from interrupt


def _cancel_if_stopped_from_outside(context: OpExecutionContext) -> None:
    """An interrupt that no termination request explains (the run is not CANCELING) is a signal
    to the run worker's processes: `obs-pipeline dev` stopped (Ctrl-C, SIGTERM), the daemon's
    service stopped. The run then ended FAILURE, and the next buffer_sensor took it for a
    failure with a cause and launched no drain for 60 s. Reported canceling, it ends CANCELED.
    Called once the drain has let go (main answered): a worker killed before that stays STARTED,
    for the sensor to find dead."""
    try:
        run = context.instance.get_run_by_id(context.run_id)
        if run is not None and run.status not in (DagsterRunStatus.CANCELING,
                                                  DagsterRunStatus.CANCELED):
            context.instance.report_run_canceling(run, message=(
                "obs-pipeline: the run worker was interrupted without a termination request "
                "(its daemon stopped: `obs-pipeline dev` stopped, or the daemon's service): "
                "ending the run as canceled"))
    except Exception:  # noqa: BLE001 - Dagster's storage (on main) down: the run cannot end at all
        pass


def _drain_batches(context: OpExecutionContext, config: DrainRunConfig, obs_pipeline: ObsPipelineResource) -> dict:
    earlier, retries = _earlier_attempts(context)
    try:  # a bad run config or OBS_* setting: waiting will not fix it, so no op retries
        _check_run_config(config, _max_runtime(context))
        drain = obs_pipeline.drain(_drain_config(config), owner=f"dagster-run-{context.run_id}")  # its attempts'
    except (ValueError, ConfigError, sa.exc.ArgumentError) as error:
        raise Failure(description=str(error).strip().splitlines()[0], allow_retries=False) from error
    site = drain.settings.site
    with contextlib.suppress(Exception):  # an earlier attempt's note that it waited, the sensor's pause (Redis down: the run says so below)
        drain.store.clear_drain_notes()

    # The budget is the run's, not this attempt's: every op retry (a link down) would start it
    # anew, and a run past the instance's max_runtime_seconds is killed mid-batch.
    record = context.instance.get_run_record_by_id(context.run_id)
    started = record.start_time if record is not None and record.start_time else time.time()
    deadline = time.monotonic() + max(0.0, config.budget_s - (time.time() - started))
    # Each attempt tries main and Redis once, a batch, whatever the budget: stopped before it tried,
    # a retry that came after the budget ended the run green, "drained 0 transactions in 0 batches
    # (time budget spent)", main or Redis unreachable all along, and the sensor launched the next
    # at once; so did a run whose budget was spent as it started (a budget_s of 1e-9, or shorter
    # than the daemon took to start it), the work still buffered, run after run.
    # A try past the budget that fails too ends the run on its cause (below), not on more retries.
    try_owed, tried_past_budget = True, False
    # as the drain's summary counts them, which an op retry loses: said on the retry's observation
    transient_errors = 0

    def budget_spent() -> bool:  # not while Dagster's storage is down: the run could not record its end
        nonlocal try_owed, tried_past_budget
        if try_owed:  # (asked before the attempt's first batch)
            try_owed, tried_past_budget = False, time.monotonic() >= deadline
            return False
        return time.monotonic() >= deadline and _storage_answers(context)

    def on_batch(report: BatchReport) -> None:
        if report.transactions:  # a batch, not a pass that only cleaned: the next outage starts afresh
            retries.drained()
        _report_batch(context, site, report)

    def on_timeout(line: str, backoff: float) -> None:
        nonlocal transient_errors
        transient_errors += 1
        context.log.warning(line)

    def on_transient(error: str, backoff: float) -> None:
        nonlocal transient_errors
        transient_errors += 1
        if not _storage_answers(context):  # the op retry's own event would fail the run: the drain
            # retries the batch itself, and the run goes on once main is back
            context.log.warning(f"main unreachable ({error}), and Dagster's storage with it: "
                                f"retrying the batch in {backoff:.1f} s")
            return
        # past the retries (a RetryRequested fails the run on Dagster's "Exceeded max_retries of 8",
        # which names neither main nor what to check), or a try past the budget failed too
        if retries.main >= TRANSIENT_RETRIES or tried_past_budget:
            with contextlib.suppress(Exception):  # (without it, the sensor's pause alone)
                context.instance.add_run_tags(context.run_id, {FAILED_ON_TAG: MAIN_OUT_OF_REACH})
            raise Failure(description=f"site {site}: main unreachable ({error}) {retries.main_unreachable_at()}; is "
                                      "OBS_MAIN_DB_URL right and main up? The transactions stay buffered for the "
                                      "next run",
                          allow_retries=False) from TransientError(error)
        wait = min(config.transient_retry_wait_s * 2 ** retries.main, 60)
        retry = f"op retry {retries.main + 1} of {TRANSIENT_RETRIES} in {wait:g} s"
        context.log_event(AssetObservation(asset_key=MAIN_ASSET, description=f"main unreachable ({error}): {retry}",
                                           metadata={"site": site, RETRIED: transient_errors}))
        with contextlib.suppress(Exception):  # for `status`: the run lets go of the lease as it waits
            drain.store.note_drain_waiting(f"drain run {context.run_id}: main unreachable ({error}): op retry "
                                           f"{retries.main + 1} of {TRANSIENT_RETRIES}", wait)
        raise RetryRequested(max_retries=MAX_OP_RETRIES, seconds_to_wait=wait) from TransientError(error)

    try:
        summary = drain.run(until_empty=True, idle_exit_s=config.idle_exit_s, should_stop=budget_spent,
                            lease_wait_s=config.lease_ttl_s, replica_patience_s=config.replication_timeout_s,
                            on_batch=on_batch, on_transient=on_transient,
                            # main answers: the drain retries in smaller pieces within the run (op
                            # retries would end the run after 8 halvings, red, and start the next)
                            on_timeout=on_timeout)
    except DrainBusy as busy:  # nothing drained: the operator who launched it should see why
        context.log.warning(f"nothing drained: {busy}")
        return {**earlier, "stopped_because": "another drain holds the lease", "lease_busy": True}
    except ConfigError as error:  # a Redis too old for the claim
        raise Failure(description=str(error), allow_retries=False) from error
    except Exception as error:  # Redis down, not answering or full: one line, and op retries
        trouble = redis_trouble(error)
        if trouble is None:
            raise
        line = f"site {site}: {trouble}"
        # past the retries, the run fails on this line without retries (a Failure past the
        # retry policy's retries failed it on Dagster's "Exceeded max_retries of 3", which names
        # neither Redis nor what to check, the line only in its description)
        if retries.redis >= REDIS_RETRIES:
            raise Failure(description=line, allow_retries=False) from error
        wait = OP_RETRY_POLICY.calculate_delay(retries.redis + 1)
        context.log.warning(f"{line}: op retry {retries.redis + 1} of {REDIS_RETRIES} in {wait:.1f} s")
        cause = RedisTrouble(line)
        cause.__cause__ = error
        raise RetryRequested(max_retries=MAX_OP_RETRIES, seconds_to_wait=wait) from cause
    finally:
        drain.close()
    for name, value in earlier.items():
        setattr(summary, name, getattr(summary, name) + value)
    if summary.stopped_because == "asked to stop":  # by budget_spent, the only one who asks
        summary.stopped_because = "time budget spent"
    # (an attempt whose COMMIT's answer, or the acknowledgement after it, was lost leaves its batch
    # to the next attempt, which finds it applied: the line says so)
    if summary.lease_lost:  # said at INFO, as if the run had drained the site: two drains met
        context.log.warning(f"{summary.drained_line()}, then stopped: {summary.stopped_because} "
                            f"({summary.lease_lost}); that drain works the site now and takes back what this "
                            "run had not acknowledged (`obs-pipeline drain` beside Dagster, or this run paused "
                            "longer than its lease_ttl_s and taken for dead)")
    else:
        (context.log.warning if summary.replica_stalled else context.log.info)(
            f"{summary.drained_line()} ({summary.stopped_because})")
    return summary.__dict__


@op
def report_replication(context: OpExecutionContext, drained: dict, obs_pipeline: ObsPipelineResource) -> None:
    """Record how far the replica is behind, for the UI. A run that ended because the replica
    replayed nothing is no materialization of it (the UI would show a fresh, healthy replica):
    an observation, and the replica_replays check failing, saying so. A run that never had the
    lease did not look at the replica: an observation, and no evaluation of the check (a pass
    would hide the failure of the run before it). Nor did one that lost it mid-run: it stopped
    before its batches were replayed and cleaned, and the drain that took it goes on."""
    store = obs_pipeline.buffer_store()
    busy = drained.get("lease_busy", False) or bool(drained.get("lease_lost"))
    try:
        with _redis_trouble_in_one_line(store.keys.site):  # Redis lost since the drain ended: as drain_batches says it
            depths = store.depths()
            replayed, silent = (_replica_replayed(store, obs_pipeline) if depths["awaiting_replication"] or not busy
                                else (None, None))
            awaiting = store.awaiting_replication(after=replayed)[0] if depths["awaiting_replication"] else 0
            metadata = {
                "site": store.keys.site,
                "awaiting_replication_batches": awaiting,
                "buffer": depths["buffer"], "failed": depths["failed"], "retrying": depths["retry"],
                "applied_this_run": drained.get("applied", 0),
                "already_applied_this_run": drained.get("already_applied", 0),  # see _drain_batches
            }
            why = ((drained.get("stopped_because") or "the replica replays nothing")
                   if drained.get("replica_stalled") else None)
            if why is None and not busy:
                why = (_replica_stuck(store, replayed) if depths["awaiting_replication"] else None) or silent
            if why or busy:
                context.log_event(AssetObservation(asset_key=REPLICA_ASSET, metadata=metadata,
                                                   description=why or drained.get("stopped_because")))
            else:
                context.log_event(AssetMaterialization(asset_key=REPLICA_ASSET, metadata=metadata))
            if not busy:
                context.log_event(AssetCheckEvaluation(
                    asset_key=REPLICA_ASSET, check_name=REPLICA_CHECK, passed=not why, severity=AssetCheckSeverity.WARN,
                    description=why, metadata={"awaiting_replication_batches": awaiting}))
            context.log_event(dead_letter_check(depths["failed"]))
    finally:
        store.redis.close()


def _replica_replayed(store: BufferStore, obs_pipeline: ObsPipelineResource) -> tuple[int | None, str | None]:
    """How far the replica has replayed main's WAL, as `status` asks it, and, where that is None
    (it does not answer, reports no replay position, or replays other WAL: a standby of another
    cluster, or on another timeline than the last acknowledgement recorded, main not on it
    either), why, in one line: `status` and the check evaluated on demand fail on that at once.
    Asked once a report, whatever awaits the replica: for the chunks awaiting replay (`status`'s
    `chunks awaiting replay`: one the replica has replayed, waiting only for a drain to clean it,
    is not one) and for whether the replica is stuck (it read the bare position: a replica of
    another cluster past the batch's LSN passed the check). Asked only while batches awaited it,
    a run with none (its batch dead-lettered whole) materialized site_replica and passed the
    check with the replica down; so did one ended by its budget before REPLICA_STUCK_AFTER_S."""
    try:
        replayed, refusal = obs_pipeline.replica_position(store.main_cluster(), store.main_timeline())
    except ConfigError as error:  # no replica URL: nothing says what it replayed
        return None, str(error).strip().splitlines()[0]
    if replayed is not None:
        return replayed, None
    return None, f"the replica {refusal}" if refusal else REPLICA_SILENT


REPLICA_SILENT = ("the replica does not answer or reports no replay position (is it down, or does "
                  "OBS_REPLICA_DB_URL name a primary?)")


def _replica_stuck(store: BufferStore, replayed: int | None) -> str | None:
    """Why the replica needs a look, as `status` and the on-demand check judge it (a committed
    batch it has not replayed, `replayed` being _replica_replayed's answer, for
    REPLICA_STUCK_AFTER_S), or None. A run that ends by its budget under steady work never
    idles, so it never sees the replica replay nothing: each such run reported a stopped
    replica fresh and healthy."""
    age = oldest_batch_age_s(store)
    if age <= REPLICA_STUCK_AFTER_S:
        return None
    count, lowest = store.awaiting_replication()
    if not replica_behind(count, lowest, replayed):
        return None
    return f"the replica has not replayed a batch committed {age:.0f} s ago"


@job(executor_def=in_process_executor, tags={"obs_pipeline/kind": "drain"})
def drain_buffer():
    report_replication(drain_batches())
