"""The pipeline's own table on main, and `db init`.

`obs_pipeline_applied` records each applied transaction id in the same database transaction
as its rows: a batch reclaimed after a crash skips what already committed (effectively once).
With the id goes the digest of the transaction's steps as pushed: an id that comes back with
other steps is a producer reusing it, dead-lettered, not skipped as done (it would be lost).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Iterable

import sqlalchemy as sa

from obs_pipeline.model_registry import ModelRegistry

pipeline_metadata = sa.MetaData()

applied_transactions = sa.Table(
    "obs_pipeline_applied",
    pipeline_metadata,
    sa.Column("transaction_id", sa.Text, primary_key=True),
    sa.Column("site", sa.Text, nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("steps_digest", sa.Text, nullable=True),  # json_codec.digest of the steps; NULL: recorded before it was
    sa.Index("obs_pipeline_applied_at", "applied_at"),
)


# create_schema's pg_advisory_xact_lock (per database): any fixed bigint does; this one is b"obs_pipe"
SCHEMA_LOCK_KEY = int.from_bytes(b"obs_pipe", "big")


def create_schema(engine: sa.Engine, registry: ModelRegistry) -> None:
    """Create the models' tables and the pipeline's own; harmless when they exist. A table of
    the pipeline's made by an earlier version gets the columns added since. One caller at a
    time per database (a lock held until COMMIT): create_all checks, then creates, and of two
    `db init`s at once (dev's and an operator's, two sites' drains) the second failed with
    'duplicate key value violates unique constraint "pg_type_typname_nsp_index"'."""
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        registry.metadata.create_all(conn)
        pipeline_metadata.create_all(conn)
        conn.execute(sa.text(f"ALTER TABLE {applied_transactions.name} ADD COLUMN IF NOT EXISTS steps_digest text"))


SIMULATED_MODELS = ("ExecutedObsUnit", "RawDataPackage", "RawDataFile")  # what `simulate` buffers


def has_demo_obs_units(registry: ModelRegistry) -> bool:
    """Whether the models have the obs_unit table (id, name) that `db init --demo-data` fills
    and `simulate` observes: a site's own models (OBS_MODELS) need not."""
    table = registry.metadata.tables.get("obs_unit")
    return table is not None and {"id", "name"} <= set(table.c.keys())


def can_simulate(registry: ModelRegistry) -> bool:
    """Whether `simulate` can observe with these models (obs_pipeline.models' own do)."""
    return has_demo_obs_units(registry) and all(name in registry.models for name in SIMULATED_MODELS)


def cannot_simulate(registry: ModelRegistry, models: str, what: str) -> str | None:
    """Why `what` (`simulate`, dev's `--simulate`) cannot observe with the models of OBS_MODELS
    `models`, for its one line before it starts (else None): the simulator failed at its first
    block, "unknown model 'ExecutedObsUnit'"."""
    if can_simulate(registry):
        return None
    return (f"{what} observes the demo models (obs_unit, {', '.join(SIMULATED_MODELS)}), which the models of "
            f"OBS_MODELS ({models}) do not have")


PRUNE_MIN_DAYS = 1.0  # a batch claimed and applied but not yet acknowledged must still find its records
# the most days a prune keeps, here and for the run history: beyond, a date before it cannot be computed
# (main: "interval out of range", "timestamp out of range"; Python: timedelta's overflow); 100 years
PRUNE_MAX_DAYS = 36500.0


def too_many_days(older_than_days: float) -> str | None:
    """Why `older_than_days` is too large to prune by, in one line, or None."""
    if older_than_days > PRUNE_MAX_DAYS:
        return f"older_than_days must be at most {PRUNE_MAX_DAYS:g} (100 years), not {older_than_days:g}"
    return None


def check_prune_days(older_than_days: float) -> None:
    """A ValueError, one line, for an `older_than_days` prune_applied refuses."""
    if not older_than_days >= PRUNE_MIN_DAYS:
        raise ValueError(f"older_than_days must be at least {PRUNE_MIN_DAYS:g}, not {older_than_days!r}: "
                         "a reclaimed batch skips what is recorded, and would apply again what is not")
    if too_many_days(older_than_days):
        raise ValueError(too_many_days(older_than_days))


def prune_applied(conn: sa.Connection, older_than_days: float, site: str, keep: Iterable[str] = (),
                  before: datetime | None = None) -> int:
    """Drop this site's applied-id records older than any batch that could still be reclaimed
    (other sites that share main keep theirs: one may have been down for longer). `keep`: the
    ids in the site's processing list (BufferStore.processing_ids), kept however old: a drain
    that died after COMMIT left them there, and the next would apply them again; and those of
    batches awaiting the replica (BufferStore.awaiting_ids): after a failover of main, an id it
    does not hold is applied again (Drain._settle_failover). `before`
    (prune_cutoff): none applied at or after it is dropped either, however old."""
    check_prune_days(older_than_days)
    conditions = [
        applied_transactions.c.site == site,
        applied_transactions.c.transaction_id.not_in(sorted(set(keep))),
        applied_transactions.c.applied_at < sa.func.now() - sa.text("make_interval(secs => :s)").bindparams(
            s=older_than_days * 86400),
    ]
    if before is not None:
        conditions.append(applied_transactions.c.applied_at < before)
    return conn.execute(applied_transactions.delete().where(*conditions)).rowcount


PRUNE_NOTHING = datetime.min.replace(tzinfo=timezone.utc)  # prune_cutoff's cutoff where nothing may be pruned


def prune_cutoff(older_than_days: float, waiting: dict[str, datetime | None]) -> tuple[datetime | None, str | None]:
    """Where a prune must stop while transactions still wait (health.oldest_waiting: the oldest of
    the processing list and of the buffer, by list): `older_than_days` before the oldest of them
    where that is earlier than `older_than_days` before now, and why, for the operator; (None,
    None) where now's cutoff stands. A copy of an applied transaction (a producer's retried push) waiting behind a
    backlog older than the week was applied again once its record was pruned, its creates
    dead-lettered on their own keys. Measured from the oldest waiting entry, not from now, the
    window covers a copy pushed within `older_than_days` of its original's apply however long the
    drain was down, and a producer's clock ahead of main's. An entry without a readable timestamp
    may be of any age: the cutoff is then PRUNE_NOTHING (nothing is pruned) until the drain takes
    it, at its next batch."""
    named = {"processing": "processing list", "buffer": "buffer"}
    unreadable = [named.get(where, where) for where, stamp in waiting.items() if stamp is None]
    if unreadable:
        return PRUNE_NOTHING, (
            f"the oldest transaction waiting in the site's {' and '.join(unreadable)} has no readable timestamp: "
            "its age is unknown, and it could be the copy of any transaction applied (the first prune after a "
            "drain has taken it goes on)")
    if not waiting:
        return None, None
    where, oldest = min(waiting.items(), key=lambda item: item[1])
    try:
        before = oldest - timedelta(days=older_than_days)
    except OverflowError:  # a producer's year 1
        before = PRUNE_NOTHING
    if before >= datetime.now(timezone.utc) - timedelta(days=older_than_days):
        return None, None
    return before, (f"the oldest transaction waiting in the site's {named.get(where, where)} is from "
                    f"{oldest.isoformat()}: records applied {older_than_days:g} days before it or later are kept, "
                    "as a copy of theirs waiting behind it must still find them")
