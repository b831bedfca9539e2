"""The Dagster layer: thin wrappers around obs_pipeline.drain. Only this package imports dagster."""
