"""What observing scripts import: build a transaction, validate it, buffer it in Redis.

    buf = TransactionBuffer.from_env()
    with buf.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {...})          # obs["id"] is usable at once
    buf.wait(tx.transaction_id, until="replicated")

Leaving the block validates the whole transaction and buffers it atomically, in one round
trip. Light on purpose: no dagster, no pandas (pandas only inside `search_frame`).
"""

from __future__ import annotations

# A connect's lookup encodes the host with this codec, imported at a process's first: a script's
# signal handler that buffered while the main thread's first connect imported it found it
# half-loaded (`LookupError: unknown encoding: idna` out of the handler's call). Loaded with ingest.
import encodings.idna  # noqa: F401
import itertools
import json
import threading
import time
from typing import Any

import redis
from sqlalchemy import exc as sa_exc

from obs_pipeline import forks, json_codec
from obs_pipeline.buffer_store import (MAX_TRANSACTION_WRITES, BufferStore, CacheWrites, KeyTaken, overlay_entry,
                                       redis_unavailable, refuse_a_redis_without_tls)
from obs_pipeline.config import ConfigError, Settings
from obs_pipeline.column_values import CANONICAL_UUID, ascii_lower, seconds, shown, whole_number
from obs_pipeline.model_registry import DeleteEffect, InvalidTransaction, ModelRegistry, ModelSpec
from obs_pipeline.query import RedisUnreadable, ReplicaUnreadable, SmartQuery
from obs_pipeline.redis_connections import redis_from_url
from obs_pipeline.spool import Spool, SpoolError
from obs_pipeline.wire import (STATUSES, Step, Transaction, new_transaction, new_uuid, normalize_values, record_id,
                               record_key, validate)

__all__ = ["TransactionBuffer", "TransactionBuilder", "InvalidTransaction", "ConfigError", "SpoolError",
           "RedisUnreadable", "ReplicaUnreadable"]

_ORDER = {s: i for i, s in enumerate(STATUSES[:4])}  # pending < processing < applied < replicated
_UNKNOWN = object()  # _taken_among: Redis or the replica could not tell
_WAIT_RECHECK_S = 0.5  # wait(): read the status again at least this often (events can be missed)


class TransactionBuilder:
    """One buffered transaction under construction; `tx` in `with buf.transaction() as tx`.

    Threads may share one: each call adds its step whole under the block's lock, and the
    block's end waits for a step being added. (Two threads adding at once got one step id,
    and a step added as the block ended was left out, its call returning as if kept.)"""

    def __init__(self, buffer: "TransactionBuffer", endpoint: str, metadata: dict[str, Any] | None):
        self._buffer = buffer
        self._tx = new_transaction(endpoint, buffer.site, buffer.max_retries, metadata)
        # re-entrant: a signal handler may add to the block its thread is adding to
        self._lock = threading.RLock()
        self._step_numbers = itertools.count(1)  # step1, step2, ...: one next() each, atomic
        # row -> step_id that creates it, the row named as the drain names it (wire.record_key:
        # table and key, a UUID alone): Station 7 and Unit 7 are two rows
        self._created: dict[str, str] = {}
        # Records created and deleted in this block, named by _record: an update or delete must
        # name a record of its own model that is still there, as outside a block (main refuses
        # it, later). _live: -> its key as created; _deleted: -> the step_id of the delete, which
        # a create of that key again depends on
        self._live: dict[tuple[str, str], Any] = {}
        self._deleted: dict[tuple[str, str], str] = {}
        # (model, key) of the creates whose key of the caller's the check found free: the buffer
        # script checks again that each still is, atomically with its writes (CacheWrites.checked)
        self._checked: list[tuple[str, str]] = []
        # (model, key, "delete" | "update", data, step_id): rows of other models its deletes take
        # with them or empty a key of (TransactionBuffer._delete_effects), overlaid for reads
        self._cascades: list[tuple[str, str, str, dict[str, Any], str]] = []
        self._writes = 0  # records the steps so far write, as _buffer_transaction counts them
        self.committed = False
        self._entered = False  # steps are buffered when the `with` block ends: one is needed
        self._ended = False

    @property
    def transaction_id(self) -> str:
        return self._tx.transaction_id

    def create(self, model: str | type, data: dict[str, Any]) -> dict[str, Any]:
        """Add a create step; returns the record with its pre-generated id. `model`: its name, or
        its mapped class (here and in every call that names a model)."""
        with self._lock:
            return dict(self._add_creates("create", model, [data])[0])  # the caller's copy (see _add_creates)

    def bulk_create(self, model: str | type, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not isinstance(model, str):
            model = self._buffer.registry.model(model).name
        if not isinstance(rows, list) or not rows:
            raise InvalidTransaction(f"bulk_create of {model} needs a non-empty list of rows")
        with self._lock:
            return [dict(r) for r in self._add_creates("bulk_create", model, rows)]

    def update(self, model: str | type, record_id_: Any, values: dict[str, Any]) -> None:
        spec = self._buffer.registry.model(model)
        model = spec.name
        with self._lock:
            rid = self._existing_id(spec.name, record_id_, f"update of {model}")
            data = normalize_values(spec, _as_dict(values, model), creating=False, where=f"update of {model} {rid}",
                                    record=rid)
            if not data:
                raise InvalidTransaction(f"update of {model} {rid} sets no column")
            self._count_writes(1)
            self._add_step("update", spec, data, {spec.primary_key: rid})
            self._writes += 1

    def delete(self, model: str | type, record_id_: Any) -> None:
        spec = self._buffer.registry.model(model)
        with self._lock:
            rid = self._existing_id(spec.name, record_id_, f"delete of {spec.name}")
            self._count_writes(1)
            step = self._add_step("delete", spec, {}, {spec.primary_key: rid})
            self._writes += 1
            self._deleted[self._record(spec, rid)] = step.step_id
            registry = self._buffer.registry
            for model, key, op, data in self._buffer._delete_effects(spec, step.conditions[spec.primary_key],
                                                                     self._tx.steps[:-1]):
                self._cascades.append((model, key, op, data, step.step_id))
                if op == "delete":  # a later step of the block naming it is refused, as main would
                    self._deleted.setdefault(self._record(registry.model(model), key), step.step_id)

    # --- internals ----------------------------------------------------------------------------
    def _add_creates(self, operation: str, model: str, rows: list[Any]) -> list[dict[str, Any]]:
        """The rows as buffered: the caller gets copies, so that the buffered rows stay as
        validated. (Copied by create and bulk_create: a comprehension for one row cost more than
        its copy.)"""
        spec = self._buffer.registry.model(model)
        model = spec.name
        pk, where = spec.primary_key, f"create of {model}"
        out = []
        given_uuids = None  # keys given for a generated-id model: overlaid as integer keys are
        again: list[str] = []  # the deletes earlier in the block of keys created again
        pending: set[tuple[str, str]] = set()  # the records of `out` whose key was given
        checked: list[tuple[str, str]] = []  # those the check found free (see self._checked)
        unknown: list[Any] = []  # given keys to look up in the caches and on the replica, together
        self._count_writes(len(rows) if spec.generated_id else 2 * len(rows))  # (at least) before rows are checked
        for row in rows:
            row = _as_dict(row, model)
            given = not (spec.generated_id and row.get(pk) is None)
            if not given:
                row = {**row, pk: new_uuid()}
            row = normalize_values(spec, row, creating=True, where=where)
            if given and pk in row:  # a key of the caller's: main would refuse a second one, later
                deleted_by = self._require_new(spec, row[pk], pending)
                if deleted_by is not None:
                    again.append(deleted_by)
                else:
                    unknown.append(row[pk])
                if spec.generated_id:
                    given_uuids = given_uuids or []
                    given_uuids.append(str(row[pk]))
            out.append(row)
        if unknown:
            checked.extend((spec.name, str(key)) for key in self._buffer._require_absent(spec, unknown, where))
        writes = len(out) + (len(given_uuids or ()) if spec.generated_id else len(out))  # a key given: its overlay
        self._count_writes(writes)
        step = self._add_step(operation, spec, out if operation == "bulk_create" else out[0], {}, again)
        self._checked.extend(checked)  # (once the step is in, as below)
        self._writes += writes
        if given_uuids:  # (once the step is in: a refused row leaves nothing behind)
            tx = self._tx
            if tx.overlaid_creates is None:
                tx.overlaid_creates = {}
            tx.overlaid_creates.setdefault(spec.name, []).extend(given_uuids)
        table, folds = spec.table.fullname, spec.columns[pk].case_insensitive
        for row in out:
            rid = str(row[pk])
            self._created[rid if spec.generated_id else record_key(table, rid, folds)] = step.step_id
            record = self._record(spec, row[pk])
            self._live[record] = row[pk]
            self._deleted.pop(record, None)  # there again
        return out

    def _count_writes(self, more: int) -> None:
        """Refuse the step that takes the transaction beyond MAX_TRANSACTION_WRITES, at its own
        call: a bulk_create of a million rows was checked, copied and encoded whole (12.8 s,
        1.1 GB) before the block's end refused it, and rows added in a loop grew without bound."""
        if self._writes + more > MAX_TRANSACTION_WRITES:
            self._require_open()  # (its line first: the step would be kept nowhere anyway)
            raise InvalidTransaction(too_many_writes(self.transaction_id, self._writes + more))

    def _record(self, spec: ModelSpec, rid: Any) -> tuple[str, str]:
        """How this block names a record: its model and key text; a CITEXT key lower-cased as
        main compares it, so that 'ABC' and 'abc' are one record here too."""
        if spec.columns[spec.primary_key].case_insensitive:
            return spec.name, self._buffer._fold_case(str(rid))
        return spec.name, str(rid)

    def _add_step(self, operation: str, spec: ModelSpec, data: Any, conditions: dict[str, Any],
                  after: list[str] | None = None) -> Step:
        """`after`: step ids it depends on besides the creates of the rows it uses."""
        self._require_open()
        deps = self._creators(spec, data, conditions) if self._created else set()
        if after:
            deps.update(after)
        # Step(step_id, operation, model_class, data, conditions, dependencies): positional, as
        # keyword arguments to a class cost a dict built and unpacked per call
        step = Step(f"step{next(self._step_numbers)}", operation, spec.name, data, conditions, sorted(deps))
        self._tx.steps.append(step)
        return step

    def _require_open(self) -> None:
        if self._ended:
            self._refuse_ended()
        if not self._entered:
            self._refuse_outside()

    def _creators(self, spec: ModelSpec, data: Any, conditions: dict[str, Any]) -> set[str]:
        """The steps that create the rows a step uses, as the drain counts uses
        (wire.referenced_ids): the row it updates or deletes, the rows its foreign-key columns
        point at, a UUID in any column. By table and key: a value 7 is Unit 7 only in a column
        that points at Unit (it made Station 7's create a dependency too, or instead)."""
        created, deps = self._created, set()
        folds = spec.columns[spec.primary_key].case_insensitive
        for value in conditions.values():
            step_id = created.get(value if spec.generated_id else record_key(spec.table.fullname, value, folds))
            if step_id is not None:
                deps.add(step_id)
        columns = spec.columns
        for row in data if isinstance(data, list) else (data,):
            for column, value in row.items():
                if value is None:
                    continue
                column = columns[column]
                if column.kind == "uuid":  # canonical text once checked: a UUID names its row alone
                    step_id = created.get(value)
                elif column.foreign_key is not None:
                    step_id = created.get(record_key(column.foreign_key, value, column.foreign_key_folds))
                elif value.__class__ is str and len(value) == 36 and CANONICAL_UUID.fullmatch(value):
                    step_id = created.get(value)
                else:
                    continue
                if step_id is not None:
                    deps.add(step_id)
        return deps

    def _require_new(self, spec: ModelSpec, rid: Any, pending: set[tuple[str, str]]) -> str | None:
        """A key of the caller's may be created once, unless the block deleted it before: a
        transaction is its steps in order (seed 000's executor runs them so, in one database
        transaction), and a later transaction may create a deleted key again too. Returns the
        step id of that delete, or None: then the caller asks whether it is buffered or on the
        replica (TransactionBuffer._require_absent). `pending`: the records of the step being
        added, to which this one's is added."""
        record = self._record(spec, rid)
        if record in pending:
            raise InvalidTransaction(f"{spec.name} {rid} is created twice in this transaction")
        pending.add(record)
        deleted_by = self._deleted.get(record)
        if deleted_by is not None:  # (the delete checked that it existed)
            return deleted_by
        if record in self._live:
            raise InvalidTransaction(f"{spec.name} {rid} is created twice in this transaction")
        return None

    def _existing_id(self, model: str, value: Any, where: str) -> Any:
        """The key of the record an update or delete names, as that record has it. A key refused
        as it is read says `where` too, as the call's other errors do (it read "Node id: ...")."""
        spec = self._buffer.registry.model(model)
        rid = record_id(spec, value, where)
        record = self._record(spec, rid)
        if record in self._deleted:
            raise InvalidTransaction(f"{model} {rid} is deleted earlier in this transaction")
        if record in self._live:
            return self._live[record]
        self._buffer._require_no_open_block_creates(record, rid, self, where)
        return self._buffer._require_exists(model, rid, where)

    def _commit(self) -> None:
        if not self._tx.steps:
            raise InvalidTransaction(f"transaction {self.transaction_id} ({self._tx.endpoint}) has no steps")
        validate(self._tx, self._buffer.registry, values_checked=True)  # each step was checked when added
        self._buffer._buffer_transaction(self._tx, self._checked, self._cascades)
        self.committed = True

    def _refuse_ended(self) -> None:
        """A step added after the block, or a second block, would be kept nowhere (the id is
        buffered once): the script would believe it recorded."""
        raise InvalidTransaction(f"transaction {self.transaction_id} has ended with its `with` block: "
                                 "start a new one with buf.transaction()")

    def _refuse_outside(self) -> None:
        """`tx = buf.transaction(); tx.create(...)` returned the record with its id and buffered
        nothing, ever: the block's end is what buffers a transaction."""
        raise InvalidTransaction(f"transaction {self.transaction_id}: steps are added inside its `with` block, which "
                                 "buffers them as it ends: write `with buf.transaction() as tx:` (nothing was buffered)")

    def __enter__(self) -> "TransactionBuilder":
        with self._lock:
            if self._ended:
                self._refuse_ended()
            if self._entered:
                # its end ended the transaction: the outer block's then buffered it, with the steps
                # of an inner block whose exception the script caught
                raise InvalidTransaction(f"transaction {self.transaction_id} is open already: add its steps in the "
                                         "block already open, or start another with buf.transaction()")
            self._entered = True
        self._buffer._open_blocks.add(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        with self._lock:  # after a step another thread is adding; any later one is refused as ended
            self._ended = True
        self._buffer._open_blocks.discard(self)
        if exc_type is None:
            self._commit()


class TransactionBuffer:
    def __init__(self, redis_url: str | None = None, site: str | None = None, replica_url: str | None = None,
                 *, models: str | None = None, max_retries: int = 3, spool_dir: str | None = None,
                 settings: Settings | None = None):
        settings = settings or Settings.from_env(redis_url=redis_url, site=site, replica_db_url=replica_url,
                                                 models=models, spool_dir=spool_dir)
        self.settings = settings
        self.site = settings.site
        self.max_retries = whole_number(max_retries, "max_retries must be a whole number >= 0")
        self.registry = ModelRegistry.from_path(settings.models)
        # connections that say so when their connect fails (spool._may_have_reached_redis)
        self.redis = redis_from_url(settings.require_redis(), socket_timeout=5, socket_connect_timeout=2)
        self.store = BufferStore(self.redis, self.site)
        self._thread = threading.local()  # each thread's own BufferStore, see _store_of_this_thread
        self._open_blocks: set[TransactionBuilder] = set()  # see _require_no_open_block_creates
        self.spool = Spool(settings.spool_dir, self.site, flush_store=self.store)
        unusable = self.spool.unusable(scripts_user=True)
        if unusable:  # said now, not as the next outage's transaction is lost to a SpoolError
            self.redis.close()
            raise ConfigError(unusable)
        self.spool.push_when_the_script_exits()  # what its forked children spool too
        if self.spool.exists():  # left by a script that ended during an outage: pushed in the background
            self.spool.start_flusher()
        self.query = SmartQuery(self.store, self.registry, settings.replica_db_url, self.spool)
        forks.renew_in_forked_children(self)  # (the spool and the query renew themselves)

    def _after_fork_in_child(self) -> None:
        """In a forked child (see obs_pipeline.forks): the threads' own connections are the
        parent's sockets; the child's threads open their own. (The pooled client `self.redis`
        renews its pool itself: redis-py checks the pid.)"""
        self._thread = threading.local()

    @classmethod
    def from_env(cls, **overrides: Any) -> "TransactionBuffer":
        return cls(**overrides)

    def close(self) -> None:
        """Closes every connection of the buffer's pool, each thread's own included (in use
        while its thread lives): redis-py before 5.0.1 left the pool connected at Redis.close(),
        so they stayed open until garbage collection. A later call connects again, as before."""
        self.query.close()
        self.redis.close()
        self.redis.connection_pool.disconnect()  # (in-use connections too: the threads' own)

    # --- writing ------------------------------------------------------------------------------
    def transaction(self, endpoint: str = "transaction", metadata: dict[str, Any] | None = None) -> TransactionBuilder:
        return TransactionBuilder(self, endpoint, metadata)

    def update(self, model: str, record_id_: Any, values: dict[str, Any], endpoint: str = "update") -> str:
        with self.transaction(endpoint=endpoint) as tx:
            tx.update(model, record_id_, values)
        return tx.transaction_id

    def delete(self, model: str, record_id_: Any, endpoint: str = "delete") -> str:
        with self.transaction(endpoint=endpoint) as tx:
            tx.delete(model, record_id_)
        return tx.transaction_id

    def _buffer_transaction(self, tx: Transaction, checked: list[tuple[str, str]],
                            cascades: list[tuple[str, str, str, dict[str, Any], str]] = ()) -> None:
        """`checked`: the creates' keys found free (CacheWrites.checked). A transaction of another
        script that buffered a create of one of them since the check makes the buffer script
        refuse this one, with the check's own line: both passed the check, and the second
        overwrote the first's caches (reads showed it until the drain dead-lettered it).
        `cascades`: what its deletes do to rows of other models (TransactionBuilder._cascades),
        overlaid after its steps' overlays, and named in the transaction for their cleanup
        (left out where they would pass MAX_TRANSACTION_WRITES: the delete is not refused for
        them, and reads show it alone, as before)."""
        caches = CacheWrites(checked=checked)
        created, overlays = caches.created, caches.overlays
        given_keys = tx.overlaid_creates
        for step in tx.steps:
            spec = self.registry.model(step.model_class)
            name, pk = spec.name, spec.primary_key
            if step.operation in ("create", "bulk_create"):
                # A key of the caller's may be created again after a buffered delete of it: the
                # create goes into the read buffer too, in order, so that reads know it comes
                # after that delete (and keep it when the first create is cleaned). A generated
                # key is new: only the uuids given (tx.overlaid_creates, for cache_footprint).
                every = not spec.generated_id
                given = set(given_keys.get(name) or ()) if given_keys and not every else None
                for row in step.records():
                    rid = str(row[pk])
                    created.append((name, rid, json_codec.dumps(row)))
                    if every or given and rid in given:
                        overlays.append((name, rid, overlay_entry(tx.transaction_id, "create", row, step.step_id)))
            else:
                overlays.append((name, str(step.conditions[pk]),
                                 overlay_entry(tx.transaction_id, step.operation, step.data, step.step_id)))
        if cascades and len(created) + len(overlays) + len(cascades) <= MAX_TRANSACTION_WRITES:
            named: dict[str, list[str]] = {}
            for model, key, op, data, step_id in cascades:
                overlays.append((model, key, overlay_entry(tx.transaction_id, op, data, step_id)))
                named.setdefault(model, []).append(key)
            tx.cascaded = named
        tx_json = tx.to_json()  # (with `cascaded`)
        if len(created) + len(overlays) > MAX_TRANSACTION_WRITES:
            # Redis would reset the connection (beyond MAX_CACHE_WRITES), or run the script for
            # seconds with every other script waiting: spooled as if Redis were down, it was
            # pushed again and again, and later transactions of the site waited behind it
            raise InvalidTransaction(too_many_writes(tx.transaction_id, len(created) + len(overlays)))
        try:
            self.spool.buffer(self._store_of_this_thread(), tx.transaction_id, tx_json, caches)
        except KeyTaken as taken:
            raise InvalidTransaction(str(taken)) from None

    def _store_of_this_thread(self) -> BufferStore:
        """A store on a connection of this thread's own: checking one out of redis-py's pool
        and back for each call cost 36 us, a tenth of an ingest. Threads keep one each, so
        their round trips still overlap. A forked child starts without them (_after_fork_in_child)."""
        store = getattr(self._thread, "store", None)
        if store is None:
            if self.spool.redis_failed_recently():
                return self.store  # the spool takes the transaction without trying Redis
            try:
                client = redis.Redis(connection_pool=self.redis.connection_pool, single_connection_client=True)
            except (redis.ConnectionError, redis.TimeoutError) as error:
                refuse_a_redis_without_tls(self.redis, error)  # the URL, not an outage: nothing spooled
                self.spool.note_redis_failure(error)
                return self.store  # Redis is down: the spool takes the transaction; try again next time
            store = self._thread.store = BufferStore(client, self.site)
        return store

    # --- reading ------------------------------------------------------------------------------
    def status(self, transaction_id: str) -> str | None:
        """"pending" | "processing" | "applied" | "replicated" | "failed", or None for an unknown id.
        A transaction spooled while Redis is unreachable is "pending"."""
        _require_id(transaction_id)
        spooled = self.spool.exists()
        if spooled:  # a script that only waits after an outage: its spool is pushed all the same
            self.spool.start_flusher()
            if self.spool.redis_failed_recently() and self.spool.holds(transaction_id):
                return "pending"  # Redis did not answer a moment ago: not asked again
        try:
            raw = self.store.status_json(transaction_id)
        except redis.RedisError as error:
            if not redis_unavailable(error):
                raise
            self.spool.note_redis_failure(error)  # a timeout: the next calls and reads do not wait for it again
            if self.spool.holds(transaction_id):
                return "pending"
            raise
        if raw is None:
            if self.spool.holds(transaction_id):  # (a copy of one discarded since: its push drops it)
                return None if self.store.was_discarded(transaction_id) else "pending"
            if not spooled:
                return None
            raw = self.store.status_json(transaction_id)  # pushed from the spool after Redis was asked
            if raw is None:
                return None
        try:
            return json.loads(raw).get("status")
        except (ValueError, AttributeError):
            return None

    def wait(self, transaction_id: str, until: str = "replicated", timeout: float = 30.0) -> bool:
        """True once the transaction reached `until` (or later); False on timeout or failure.

        Listens to the site's events channel (the drain publishes `applied` / `replicated` after
        each commit / replay): subscribe first, then read the status, then sleep on the channel.
        Messages can be missed (a reconnect, a channel without subscribers for a moment), so the
        status is read again at least every `_WAIT_RECHECK_S`; without pub/sub it is plain polling.
        """
        _require_id(transaction_id)
        if not isinstance(until, str) or until not in _ORDER:
            raise ValueError(f"until must be one of {', '.join(_ORDER)}, not {shown(until)}")
        deadline = time.monotonic() + max(0.0, seconds(timeout, "timeout must be a number of seconds"))
        status = self.status(transaction_id)  # already there: no subscription needed
        if status in _ORDER and _ORDER[status] >= _ORDER[until]:
            return True
        pubsub = self._subscribe()
        try:
            while True:
                status = self.status(transaction_id)
                if status in _ORDER and _ORDER[status] >= _ORDER[until]:
                    return True
                remaining = deadline - time.monotonic()
                if status == "failed" or remaining <= 0:
                    return False
                event = self._sleep_until_event(pubsub, transaction_id, min(_WAIT_RECHECK_S, remaining))
                if event in _ORDER and _ORDER[event] >= _ORDER[until]:
                    return True  # the drain's word: a far batch's status says `applied` a batch later
        finally:
            if pubsub is not None:
                try:
                    pubsub.close()
                except redis.RedisError:
                    pass

    def _subscribe(self) -> "redis.client.PubSub | None":
        """A subscription to the events channel, confirmed by the server; None if Redis refuses,
        or did not answer a moment ago (spool.REDIS_RETRY_AFTER_S): not asked again, wait() polls
        (a subscription's handshake with a hung Redis waited for its reply timeout, 5 s, whatever
        the wait's own timeout)."""
        if self.spool.redis_failed_recently():
            return None
        pubsub = self.redis.pubsub()
        try:
            pubsub.subscribe(self.store.keys.events)
            confirm_by = time.monotonic() + 1.0
            while time.monotonic() < confirm_by:
                message = pubsub.get_message(timeout=max(0.0, confirm_by - time.monotonic()))
                if message is not None and message.get("type") == "subscribe":
                    return pubsub
        except (redis.RedisError, OSError) as error:
            self.spool.note_redis_failure(error)  # a timeout: the next calls do not wait for it again
        try:
            pubsub.close()
        except redis.RedisError:
            pass
        return None

    @staticmethod
    def _sleep_until_event(pubsub: "redis.client.PubSub | None", transaction_id: str, seconds: float) -> str | None:
        """The event ("applied", "replicated") once one names the transaction, or None after
        `seconds`. The drain publishes "applied" with the commit's acknowledgement; where main
        is far it writes the status a batch later (drain.py, _mark_applied)."""
        end = time.monotonic() + seconds
        if pubsub is None:
            time.sleep(min(0.05, seconds))  # polling fallback
            return None
        needle = transaction_id.encode()
        try:
            while (left := end - time.monotonic()) > 0:
                message = pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
                if message is None or message.get("type") != "message" or needle not in message["data"]:
                    continue  # (another transaction's id may hold this one's)
                try:
                    event = json_codec.loads(message["data"])
                except ValueError:
                    return None  # not the drain's: read the status
                ids = event.get("transaction_ids") if isinstance(event, dict) else None
                if isinstance(ids, list) and transaction_id in ids:
                    return event.get("event") if isinstance(event.get("event"), str) else None
        except (redis.RedisError, OSError):
            time.sleep(max(0.0, min(0.05, end - time.monotonic())))
        return None

    def get(self, model: str, record_id_: Any) -> dict[str, Any] | None:
        return self.query.get(model, record_id_)

    def search(self, model: str, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return self.query.search(model, filters)

    def search_frame(self, model: str, filters: dict[str, Any] | None = None):
        """`search` as a pandas DataFrame (pandas is imported only here)."""
        return self.query.search_frame(model, filters)

    def _require_absent(self, spec: ModelSpec, keys: list[Any], where: str) -> list[Any]:
        """A create with a key the caller gives (an integer id, say) must not name a record that
        is buffered or on the replica: main would refuse it, and until then the buffered copy
        would hide the real row from reads. Unchecked without a replica, or while Redis does
        not answer (as for updates). Returns the keys the check found free: the buffer script
        then checks that they still are (another script may create one meanwhile). Several
        (a bulk_create's) are looked up together, but CITEXT keys (get's search, each)."""
        if self.settings.replica_db_url is None:
            return []
        if len(keys) > 1 and not spec.columns[spec.primary_key].case_insensitive:
            taken = self._taken_among(spec, keys)
            if taken is _UNKNOWN:
                return []
            if taken is not None:
                if taken:
                    raise InvalidTransaction(str(KeyTaken(spec.name, str(taken[0]))))
                return keys
        free = []
        for key in keys:
            known = self._is_known(spec.name, key, where)
            if known:
                raise InvalidTransaction(str(KeyTaken(spec.name, str(key))))
            if known is False:
                free.append(key)
        return free

    def _taken_among(self, spec: ModelSpec, keys: list[Any]) -> Any:
        """query.taken_keys, as _known_record asks: the keys taken; _UNKNOWN where that cannot be
        known (Redis does not answer, the replica cannot be read); None if the replica refuses
        a key: then each is asked alone, whose line names it."""
        if self.spool.exists() and self.spool.redis_failed_recently():
            return _UNKNOWN
        try:
            return self.query.taken_keys(spec, keys)
        except ReplicaUnreadable:
            return _UNKNOWN
        except (sa_exc.ProgrammingError, sa_exc.DataError):
            return None
        except redis.RedisError as error:
            if redis_unavailable(error):
                return _UNKNOWN
            raise

    def _require_no_open_block_creates(self, record: tuple[str, str], rid: Any, asking: TransactionBuilder,
                                       where: str) -> None:
        """A record a still-open block created is buffered as that block ends: an update or delete
        of it outside the block (buf.update, another block) would be buffered first, and main
        has no such row yet (with a replica it was refused as "neither buffered nor on the
        replica"; without one the drain retried it until the create was applied, or
        dead-lettered it)."""
        for block in list(self._open_blocks):  # (a copy: another thread's block may open or end meanwhile)
            if block is not asking and record in block._live:
                verb = where.split(" ", 1)[0]
                raise InvalidTransaction(f"{record[0]} {rid} is created by transaction {block.transaction_id}, whose "
                                         f"`with` block is still open and buffers it as it ends: write the {verb} "
                                         f"in that block (tx.{verb}); nothing was buffered")

    def _delete_effects(self, spec: ModelSpec, key: Any, steps: list[Step]) -> list[tuple[str, str, str, dict]]:
        """The rows a delete of `key` takes with it, or empties a key of, as main's foreign keys
        do (ModelRegistry.delete_effects), through every level: (model, key text, "delete" or
        "update", data). Found as reads find them (the replica's rows, what is buffered or
        spooled) and among the creates in `steps` (the block's, before the delete). Reads showed
        a buffered delete alone: its cascade's rows read as before until it was replayed, and an
        update of one was taken, then dead-lettered. None while the replica or Redis cannot be
        asked, or without a replica (reads show the delete alone then)."""
        if not self.registry.delete_effects(spec.name) or self.settings.replica_db_url is None:
            return []
        found: list[tuple[str, str, str, dict]] = []
        seen: set[tuple[str, str]] = {(spec.name, str(key))}
        level: list[tuple[ModelSpec, list[Any]]] = [(spec, [key])]
        try:
            while level:
                below: list[tuple[ModelSpec, list[Any]]] = []
                for parent, keys in level:
                    for effect in self.registry.delete_effects(parent.name):
                        child = self.registry.model(effect.model)
                        taken = []
                        for row in self._referencing(parent, keys, effect, steps):
                            child_key = row[child.primary_key]
                            if (child.name, str(child_key)) in seen:
                                continue
                            seen.add((child.name, str(child_key)))
                            if effect.action == "CASCADE":
                                found.append((child.name, str(child_key), "delete", {}))
                                taken.append(child_key)
                            else:
                                found.append((child.name, str(child_key), "update", {effect.column: None}))
                        if taken:
                            below.append((child, taken))
                level = below
        except (ReplicaUnreadable, RedisUnreadable, redis.RedisError, ConfigError, sa_exc.SQLAlchemyError):
            return []
        return found

    def _referencing(self, parent: ModelSpec, keys: list[Any], effect: DeleteEffect,
                     steps: list[Step]) -> list[dict[str, Any]]:
        """The rows of `effect.model` whose `effect.column` references one of the `parent` rows
        named by `keys`, as reads find them, and among the creates in `steps`."""
        values = keys if effect.references == parent.primary_key else [
            row[effect.references] for row in (self.query.get(parent.name, k) for k in keys)
            if row is not None and row[effect.references] is not None]
        if not values:
            return []
        texts = {str(v) for v in values}
        return self.query.search(effect.model, {effect.column: values}) + [
            row for step in steps if step.model_class == effect.model and step.operation in ("create", "bulk_create")
            for row in step.records() if str(row.get(effect.column)) in texts]

    def _require_exists(self, model: str, rid: Any, where: str) -> Any:
        """An update or delete must name a record that is buffered or on the replica. While
        Redis does not answer, a record that is on neither the replica nor the spool may still
        be buffered there (the observation started before Redis went away): the call is let
        through to the spool, as every call is then, rather than refused; so is one while the
        replica cannot be read. Without a replica it cannot be known: the drain will tell.

        Returns the record's key as it has it: a CITEXT key given in another case ('ABC')
        names the record 'abc' as on main, and its update is filed under 'abc', where reads
        merge it (filed under 'ABC', the record read without it until replicated)."""
        if self.settings.replica_db_url is None:
            return rid
        record = self._known_record(model, rid, where)
        if record is False:
            raise InvalidTransaction(f"{model} {rid} is neither buffered nor on the replica")
        spec = self.registry.model(model)
        if record is None or not spec.columns[spec.primary_key].case_insensitive:
            return rid
        return record[spec.primary_key]

    def _fold_case(self, text: str) -> str:
        """CITEXT's text lower-cased as main compares it (SmartQuery.fold_case); A-Z alone
        while the replica cannot be asked, or without one."""
        try:
            return self.query.fold_case()(text)
        except (ReplicaUnreadable, ConfigError):
            return ascii_lower(text)

    def _is_known(self, model: str, rid: Any, where: str) -> bool | None:
        record = self._known_record(model, rid, where)
        return None if record is None else record is not False

    def _known_record(self, model: str, rid: Any, where: str) -> dict[str, Any] | bool | None:
        """The record, if it is buffered, spooled or on the replica; False if it is not; None
        when that cannot be known: Redis does not answer, or did not a moment ago
        (spool.REDIS_RETRY_AFTER_S), or the replica cannot be read (the write is buffered
        unchecked rather than lost).

        As reads see it: the read puts the spool on top of the caches (a record the spool
        created, or deleted, or deleted and created again), and looks at the spool before
        Redis, so a line pushed in between is missed by neither. Asking the spool only whether
        it created the record took one it deleted afterwards for known: an update of it was
        spooled (and dead-lettered by main), and a create of its key again was refused."""
        if self.spool.exists() and self.spool.redis_failed_recently():
            return None
        try:
            record = self.query.get_checked(self.registry.model(model), rid, where)  # (`where`: see get_checked)
        except ReplicaUnreadable:
            return None
        except redis.RedisError as error:
            if redis_unavailable(error):
                return None
            raise
        return False if record is None else record


def too_many_writes(transaction_id: str, writes: int) -> str:
    return (f"transaction {transaction_id} writes {writes:,} records, more than the {MAX_TRANSACTION_WRITES:,} one "
            "transaction may (a create of a model whose key is not generated counts twice): split it into several "
            "transactions")


def _require_id(transaction_id: Any) -> None:
    """status() and wait() take the id as text: given the builder itself (`buf.status(tx)`),
    status answered None, as for an id never buffered, and wait() failed on 'encode'."""
    if not isinstance(transaction_id, str):
        raise ValueError(f"a transaction id is a string (tx.transaction_id, or what buf.update returned), "
                         f"not {type(transaction_id).__name__}")


def _as_dict(value: Any, model: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidTransaction(f"{model} values must be a dict, not {type(value).__name__}")
    return value
