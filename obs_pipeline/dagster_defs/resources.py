"""One ConfigurableResource for the pipeline's external systems.

Every field falls back to the OBS_* environment variables when left unset, read when a run
or sensor asks, so `defs` loads on a machine where nothing is configured yet.
"""


from typing import Callable, Optional

import redis
import sqlalchemy as sa
from dagster import ConfigurableResource

from obs_pipeline.apply import RecordedTimeline, ReplicaDatabase, applied_records_refused, make_engine
from obs_pipeline.buffer_store import BufferStore
from obs_pipeline.config import ConfigError, Settings
from obs_pipeline.dead_letters import DeadLetters
from obs_pipeline.model_registry import ModelRegistry
from obs_pipeline.drain import Drain, DrainConfig
from obs_pipeline.lsn import MAIN_TIMELINE_EXPRESSION, timeline_of_wal_file



class ObsPipelineResource(ConfigurableResource):
    """The site's Redis buffer, the main database and the site replica."""

    site: Optional[str] = None
    redis_url: Optional[str] = None
    main_db_url: Optional[str] = None
    replica_db_url: Optional[str] = None
    models: Optional[str] = None

    def settings(self) -> Settings:
        return Settings.from_env(site=self.site, redis_url=self.redis_url, main_db_url=self.main_db_url,
                                 replica_db_url=self.replica_db_url, models=self.models)

    def buffer_store(self) -> BufferStore:
        settings = self.settings()
        client = redis.Redis.from_url(settings.require_redis(), socket_timeout=5, socket_connect_timeout=2)
        return BufferStore(client, settings.site)

    def dead_letters(self) -> DeadLetters:
        return DeadLetters(self.buffer_store(), ModelRegistry.from_path(self.settings().models))

    def drain(self, config: DrainConfig, owner: str = "") -> Drain:
        return Drain(self.settings(), config, owner)

    def replica_replay_lsn(self) -> int | None:
        """How far the replica has replayed; None if it does not answer or reports no position."""
        return self.replica_position()[0]

    def replica_position(self, main_cluster: int | None = None, main_timeline: int | None = None,
                         ask_main: Callable[[], tuple[int, int] | None] | None = None) -> tuple[int | None, str | None]:
        """replica_replay_lsn, and for the sensor's skip reason what to do where the replica
        refuses every connection (ReplicaDatabase.refusal: hot_standby off) or, given
        `main_cluster` (BufferStore.main_cluster), is a standby of another cluster, or given
        `main_timeline` (BufferStore.main_timeline), replays another timeline: its replay
        position, of other WAL, launched a run at each tick that could clean nothing. Where the
        replica's timeline is not `main_timeline` (as the last acknowledgement recorded it), main
        is asked, by `ask_main` if given (the sensor's keeps main's answer a while), else by
        main_identity: a failover since, with no new work, moved it (the run that cleans was
        never launched, the skip reason blaming the replica). And where the replica's role may
        not read obs_pipeline_applied (applied_records_refused): the drain cleans nothing it
        cannot check there, and a run was launched at each tick, to end saying so."""
        def timeline() -> int | None:
            if replica.timeline == main_timeline:
                return main_timeline
            now = (ask_main or self.main_identity)()
            return now[1] if now is not None else RecordedTimeline(main_timeline)

        replica = ReplicaDatabase(make_engine(self.settings().require_replica(), "obs-pipeline sensor"),
                                  main_cluster=(lambda: main_cluster) if main_cluster is not None else None,
                                  main_timeline=timeline if main_timeline is not None else None)
        replayed = None
        try:
            replayed = replica.replay_lsn()
            if replayed is not None:  # may the drain check that it has a batch's ids before cleaning?
                replica.missing_among([])
        except sa.exc.SQLAlchemyError as error:
            if replayed is not None and (refused := applied_records_refused(error)):
                return replayed, refused
            return None, f"refuses every connection: {replica.refusal}" if replica.refusal else None
        finally:
            replica.engine.dispose()
        return replayed, f"replays other WAL: {replica.refusal}" if replica.refusal else None

    def main_identity(self) -> tuple[int, int] | None:
        """Which cluster main is (its system identifier) and which timeline it writes now; None
        if it is not set, does not answer or is a standby."""
        try:
            engine = make_engine(self.settings().require_main(), "obs-pipeline sensor")
        except ConfigError:
            return None
        try:
            with engine.connect() as conn:
                cluster, wal_file = conn.execute(sa.text(
                    "SELECT (SELECT system_identifier FROM pg_control_system()), " + MAIN_TIMELINE_EXPRESSION)).one()
        except sa.exc.SQLAlchemyError:
            return None
        finally:
            engine.dispose()
        timeline = timeline_of_wal_file(wal_file)
        return (int(cluster), timeline) if timeline is not None else None
