"""`defs`: what Dagster loads (workspace.yaml points here)."""

from dagster import Definitions

from obs_pipeline.dagster_defs.jobs import drain_buffer
from obs_pipeline.dagster_defs.resources import ObsPipelineResource
from obs_pipeline.dagster_defs.sensors import buffer_sensor

defs = Definitions(
    jobs=[drain_buffer],
    sensors=[buffer_sensor],
    resources={"obs_pipeline": ObsPipelineResource()},
)
