"""Every Redis key the pipeline uses, in one place.

The first six names are fixed by the contract (shared with the existing producer and with
operators' shells); the rest are this project's own and are listed in the README.

The Lua scripts in redis_scripts.py and query.py build per-record names from `prefix` (they
run inside Redis): a name changed here must change there too. The integration tests check the
keys those scripts write and delete through this class.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SiteKeys:
    site: str

    @property
    def prefix(self) -> str:
        return f"site:{self.site}:"

    # --- contract (seed 000 / 001 layout) -------------------------------------------------
    @property
    def buffer(self) -> str:
        """List: producers LPUSH transaction JSON, the drain claims from the right."""
        return f"{self.prefix}transaction_buffer"

    def transaction(self, transaction_id: str) -> str:
        """String: the transaction JSON with its current `status`."""
        return f"{self.prefix}transaction:{transaction_id}"

    def cached_id(self, model: str, record_id: str) -> str:
        return f"{self.prefix}cache:ids:{model}:{record_id}"

    def buffered(self, model: str, record_id: str) -> str:
        """String: the record as created by a buffered transaction."""
        return f"{self.prefix}buffered:{model}:{record_id}"

    def read_buffer(self, model: str, record_id: str) -> str:
        """List: pending updates/deletes of the record in buffering order, each entry JSON starting
        with `{"tx":<transaction id>,` so cleanup removes exactly one transaction's contribution."""
        return f"{self.prefix}read_buffer:{model}:{record_id}"

    @property
    def failed(self) -> str:
        """List: dead-lettered transaction JSON with `failure` details."""
        return f"{self.prefix}failed_transactions"

    # --- this project's own ---------------------------------------------------------------
    @property
    def processing(self) -> str:
        """List: the batch the lease holder has claimed and not yet committed."""
        return f"{self.prefix}processing"

    @property
    def last_claim(self) -> str:
        """String: the last claim call's token and how many entries it moved, so that the same
        call sent again answers those instead of moving more (see redis_scripts.CLAIM)."""
        return f"{self.prefix}last_claim"

    @property
    def lease(self) -> str:
        """String with PX expiry: token of the drain that owns the site."""
        return f"{self.prefix}drain_lease"

    @property
    def drain_waiting(self) -> str:
        """String with PX expiry: why a drain run that holds no lease waits for its next attempt
        (an op retry, main out of reach), until a little past that attempt."""
        return f"{self.prefix}drain_waiting"

    @property
    def drain_paused(self) -> str:
        """String (JSON) with PX expiry: why the sensor launches no drain run for now (the pause
        after a failed one), and whether main answering ends it; until a little past the pause."""
        return f"{self.prefix}drain_paused"

    @property
    def awaiting_replication(self) -> str:
        """Sorted set: committed batches scored by commit LSN, until the replica replays them."""
        return f"{self.prefix}awaiting_replication"

    @property
    def retry(self) -> str:
        """Sorted set: transactions that failed permanently, scored by next attempt time."""
        return f"{self.prefix}retry"

    @property
    def held_ids(self) -> str:
        """Hash: row -> the first transaction waiting to retry (or parked) that writes it ("!" +
        id if dead-lettered): the row's head. Transactions that use such a row wait behind it."""
        return f"{self.prefix}held_ids"

    def waiting(self, row: str) -> str:
        """Sorted set: the other transactions waiting to write `row`, behind its head in held_ids,
        scored in the order they came ("!" + id if dead-lettered); see redis_scripts.ROW_QUEUES."""
        return f"{self.prefix}waiting:{row}"

    def set_aside(self, line_digest: str) -> str:
        """String: a spooled line set aside as a dead letter (spool.Spool._set_aside), by its
        digest, while its letter is listed: a push that crashed before it recorded its progress
        sets the line aside again, and lists it once."""
        return f"{self.prefix}set_aside:{line_digest}"

    def discarded(self, transaction_id: str) -> str:
        """String with the expiry of a final status (REPLICATED_STATUS_TTL_S): a transaction whose
        letter `failed discard` dropped with its status key, as the space-separated digests of the
        steps dropped (wire.listed_steps_digest). A copy pushed after the discard (a spooled line
        whose push's reply was lost, a producer pushing again) is not buffered (scripts.BUFFER) nor
        applied (Drain): with the status key gone, the id was unknown and the copy was applied."""
        return f"{self.prefix}discarded:{transaction_id}"

    @property
    def discarded_lately(self) -> str:
        """String with the same expiry, set again by each discard: while it exists, the drain
        looks up the `discarded` keys of the ids it claims (without it, one EXISTS a batch)."""
        return f"{self.prefix}discarded_lately"

    def parked(self, holder: str) -> str:
        """List: what is held behind `holder`, in the order it was held, each entry a JSON array
        [its retry-zset member (transaction JSON), its id, the rows it writes]; those members are
        scored +inf in the retry zset until `holder` is applied or dead-lettered."""
        return f"{self.prefix}parked:{holder}"

    @property
    def unparking(self) -> str:
        """List: holders applied or dead-lettered whose parked lists are still being made due,
        oldest first (see redis_scripts.UNPARK); with `unparking_score`, the next due score."""
        return f"{self.prefix}unparking"

    @property
    def unparking_score(self) -> str:
        return f"{self.prefix}unparking_score"

    def model_index(self, model: str) -> str:
        """Set: ids of records of `model` whose create is buffered (`search` reads their records
        through it); records with pending updates or deletes are in `overlay_index`."""
        return f"{self.prefix}index:{model}"

    def overlay_index(self, model: str) -> str:
        """Set: ids of records of `model` with a non-empty read buffer; `search` reads only these
        read buffers instead of one per indexed id."""
        return f"{self.prefix}overlaid:{model}"

    @property
    def timeouts(self) -> str:
        """Hash, after statement or lock timeouts on main: `piece` -> how many transactions the
        drain applies per main transaction; `alone:{id}` -> how many times in a row that
        transaction timed out applied alone; `attempts` -> the drain's timeout_attempts, for
        `status`. Gone once batches go through whole again."""
        return f"{self.prefix}timeouts"

    @property
    def stats(self) -> str:
        """Hash: drain counters and last-run facts for `obs-pipeline status`."""
        return f"{self.prefix}stats"

    @property
    def link(self) -> str:
        """Hash: what the drain's last full batch showed of main: `round_trip_s`, and where main
        is far `apply_s_per_transaction`; the next run sizes its first claims by it."""
        return f"{self.prefix}link"

    @property
    def events(self) -> str:
        """Pub/sub channel: `applied` / `replicated` announcements, published after commit."""
        return f"{self.prefix}events"
