"""What the prune of main's applied-id records must keep, read from the site's Redis before it
deletes (schema.prune_applied deletes; the Dagster schedule runs it daily): a copy of an applied
transaction is skipped by its record, and applied again without it."""

from __future__ import annotations

from obs_pipeline.buffer_store import BufferStore
from obs_pipeline.dead_letters import listed_ids


def ids_that_may_come_back(store: BufferStore) -> set[str]:
    """The ids of the transactions the drain may take again without the buffer, whose records a
    prune keeps however old. The processing list is read before and after the retry set, as a
    transaction goes from one to the other both ways (held, then claimed when due); the
    dead-letter list (a retried letter comes back) and the batches awaiting the replica (a
    failover of main) after. The buffer's own are kept by age (schema.prune_cutoff)."""
    return (store.processing_ids() | store.retry_ids() | store.processing_ids() | listed_ids(store)
            | store.awaiting_ids())
