"""Operator jobs: requeue dead-lettered transactions from the UI, and prune applied-id
records on main (kept a week: far longer than any batch can wait to be reclaimed)."""

from typing import List

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    Config,
    DefaultScheduleStatus,
    Failure,
    OpExecutionContext,
    ScheduleDefinition,
    asset_check,
    in_process_executor,
    job,
    op,
)

from obs_pipeline.apply import make_engine
from obs_pipeline.dagster_defs.jobs import (
    DEAD_LETTER_CHECK,
    MAIN_ASSET,
    REPLICA_ASSET,
    REPLICA_CHECK,
    dead_letter_check,
)
from obs_pipeline.dagster_defs.resources import ObsPipelineResource
from obs_pipeline.dead_letters import UnknownTransaction
from obs_pipeline.health import REPLICA_STUCK_AFTER_S, replication_lag
from obs_pipeline.schema import prune_applied


class RetryDeadLettersConfig(Config):
    transaction_ids: List[str] = []
    all: bool = False


@op
def requeue_dead_letters(context: OpExecutionContext, config: RetryDeadLettersConfig,
                         obs_pipeline: ObsPipelineResource) -> None:
    """Requeue in the original order, dependents after what they depend on (see dead_letters.py)."""
    if config.all == bool(config.transaction_ids):
        raise Failure(description="set either `all: true` or a list of `transaction_ids`")
    letters = obs_pipeline.dead_letters()
    try:
        ids = letters.retry(None if config.all else config.transaction_ids)
    except UnknownTransaction as error:  # a mistyped id: its line, not a wrapped traceback
        raise Failure(description=str(error)) from error
    context.log.info(f"requeued {len(ids)} transaction(s): {', '.join(ids)}")
    context.log_event(dead_letter_check(letters.store.redis.llen(letters.keys.failed)))


@job(executor_def=in_process_executor)
def retry_dead_letters():
    requeue_dead_letters()


class PruneConfig(Config):
    older_than_days: float = 7.0


@op
def prune_applied_records(context: OpExecutionContext, config: PruneConfig, obs_pipeline: ObsPipelineResource) -> None:
    settings = obs_pipeline.settings()
    engine = make_engine(settings.require_main())
    try:
        with engine.begin() as conn:
            removed = prune_applied(conn, config.older_than_days, settings.site)
    except ValueError as error:  # too few days: its line, not a wrapped traceback
        raise Failure(description=str(error)) from error
    finally:
        engine.dispose()
    context.log.info(f"pruned {removed} applied-transaction records of site {settings.site} "
                     f"older than {config.older_than_days} days")


@job(executor_def=in_process_executor)
def prune_applied_transactions():
    prune_applied_records()


prune_schedule = ScheduleDefinition(job=prune_applied_transactions, cron_schedule="17 3 * * *",
                                    default_status=DefaultScheduleStatus.RUNNING)


@asset_check(asset=MAIN_ASSET, name=DEAD_LETTER_CHECK, description="No dead-lettered transactions wait for an operator")
def no_dead_letters(obs_pipeline: ObsPipelineResource) -> AssetCheckResult:
    letters = obs_pipeline.dead_letters().list()
    return AssetCheckResult(
        passed=not letters, severity=AssetCheckSeverity.WARN,
        metadata={"failed": len(letters), "first": letters[0].summary()["reason"] if letters else ""})


@asset_check(asset=REPLICA_ASSET, name=REPLICA_CHECK,
             description="The site replica replays what main committed (as `obs-pipeline status` judges it)")
def replica_replays(obs_pipeline: ObsPipelineResource) -> AssetCheckResult:
    """Evaluated here on demand, and by every drain_buffer run (failing when it ended because the
    replica replayed nothing). A batch just committed is not yet replayed: it fails only past
    REPLICA_STUCK_AFTER_S, or with a database that does not answer."""
    settings = obs_pipeline.settings()
    store = obs_pipeline.buffer_store()
    main, replica = make_engine(settings.require_main()), make_engine(settings.require_replica())
    try:
        lag = replication_lag(store, main, replica)
    finally:
        store.redis.close()
        main.dispose()
        replica.dispose()
    stuck = bool(lag.get("error")) or (lag["seconds"] > REPLICA_STUCK_AFTER_S and lag["replica_behind_oldest_batch"])
    return AssetCheckResult(
        passed=not stuck, severity=AssetCheckSeverity.WARN,
        description=lag.get("error") or (f"the replica has not replayed a batch committed {lag['seconds']:.0f} s ago"
                                         if stuck else None),
        metadata={"awaiting_replication_batches": lag["awaiting_batches"], "seconds": lag["seconds"],
                  "replica_lsn": lag.get("replica_lsn") or ""})
