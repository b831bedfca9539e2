"""What the prune of main's applied-id records must keep, read from the site's Redis before it
deletes (schema.prune_applied deletes; the Dagster schedule runs it daily): a copy of an applied
transaction is skipped by its record, and applied again without it."""

from __future__ import annotations

from datetime import datetime

from obs_pipeline.buffer_store import BufferStore
from obs_pipeline.dead_letters import listed_ids
from obs_pipeline.health import oldest_waiting


def ids_that_may_come_back(store: BufferStore) -> set[str]:
    """The ids of the transactions the drain may take again without the buffer, whose records a
    prune keeps however old. The processing list is read before and after the retry set, as a
    transaction goes from one to the other both ways (held, then claimed when due); the
    dead-letter list (a retried letter comes back) and the batches awaiting the replica (a
    failover of main) after. Both are read again after the dead-letter list, which may take
    seconds: a letter retried meanwhile and held back by the drain (in the retry set again) was
    in none of them. The buffer's own are kept by age (schema.prune_cutoff)."""
    def held() -> set[str]:
        return store.processing_ids() | store.retry_ids() | store.processing_ids()

    return held() | listed_ids(store) | held() | store.awaiting_ids()


def what_to_keep(store: BufferStore) -> tuple[set[str], dict[str, datetime | None]]:
    """ids_that_may_come_back, and the oldest entries waiting (health.oldest_waiting, for
    schema.prune_cutoff) read both before and after them, the earlier of each (an unreadable one
    stays unreadable). Read only after, a copy in the buffer that the drain held back to retry
    or dead-lettered while the ids were read (a long dead-letter list) was in neither: its record
    was pruned, and the copy applied again. Read only before, a letter retried meanwhile (back in
    the buffer) would be."""
    before = oldest_waiting(store)
    ids = ids_that_may_come_back(store)
    after = oldest_waiting(store)
    waiting = {}
    for where in before.keys() | after.keys():
        stamps = [readings[where] for readings in (before, after) if where in readings]
        waiting[where] = None if None in stamps else min(stamps)
    return ids, waiting
