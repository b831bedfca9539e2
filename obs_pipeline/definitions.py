"""`defs`: what Dagster loads (workspace.yaml points here)."""

from dagster import AssetSpec, Definitions

from obs_pipeline.dagster_defs.jobs import MAIN_ASSET, REPLICA_ASSET, drain_buffer
from obs_pipeline.dagster_defs.operations import (
    discard_dead_letters,
    history_schedule,
    no_dead_letters,
    prune_applied_transactions,
    prune_run_history,
    prune_schedule,
    replica_replays,
    retry_dead_letters,
)
from obs_pipeline.dagster_defs.resources import ObsPipelineResource
from obs_pipeline.dagster_defs.sensors import buffer_sensor

defs = Definitions(
    assets=[
        AssetSpec(MAIN_ASSET, description="Buffered transactions committed to the main database"),
        AssetSpec(REPLICA_ASSET, description="Committed transactions replayed by the site replica, caches cleaned"),
    ],
    jobs=[drain_buffer, retry_dead_letters, discard_dead_letters, prune_applied_transactions, prune_run_history],
    sensors=[buffer_sensor],
    schedules=[prune_schedule, history_schedule],
    asset_checks=[no_dead_letters, replica_replays],
    resources={"obs_pipeline": ObsPipelineResource()},
)
