"""Smart queries: the replica merged with what is still buffered (read your writes).

Order of reads, and why a reader never sees a record vanish or go back in time:

1. One Lua script reads, atomically, the buffered creates of the model (through its index
   `index:{model}`) and the pending overlays (through `overlaid:{model}`, the ids whose read
   buffer is not empty). No cleanup runs half-way through it, so a record is never seen
   without an overlay that was cleaned together with it, and an id cleaned between reading
   the index and reading its record cannot happen.
2. Then one replica statement. Whatever the caches no longer held at step 1 was replayed by
   the replica before it was cleaned, so the later replica read has it, or something newer;
   unless the replica restarted since and replays its WAL again: step 1 also reads how far the
   drain has cleaned, and the statement waits for the replica to have replayed that (_caught_up).

Transactions in ingest's local spool (Redis could not take them: down, full, not answering)
are read first, before step 1, and go on top of the caches: while anything is spooled, ingest
appends behind it, so nothing in Redis is newer. Step 1 also tells which of them have a status
key in Redis by then (pushed since, perhaps cleaned too): those are left out, Redis or the
replica has them; so are copies of transactions discarded since (their push drops them).
(More of them than one call takes are asked in further calls, in one MULTI/EXEC with step 1:
still one instant.) While Redis does not answer, `get` answers from
the spool alone for a record a spooled transaction created or deleted (Redis can hold nothing
newer of it); any other read raises RedisUnreadable, one line.

Merging, per id: a pending delete hides the record, unless a create of the same key (a key
the caller gave, not one ingest generated) comes after it in the read buffer; a buffered create is the
record (the replica copy, if there is one, can only be newer by writes buffered after step
1); otherwise the replica row. Pending updates are applied on top, per column, in buffering
order; a create in the read buffer starts the record again. An
overlay the replica has already replayed is applied again harmlessly: updates set values.
Hence each column shows a value at least as new as at step 1, and step 1 comes after every
earlier read of the same reader: reads are monotonic (as long as the drain applies one
record's transactions in buffering order, which it does).

Filters: read_filters. How values are shown, the same for both sources: read_forms. A merged
row is filtered before its read form, on its values as buffered (what main will compare); a
replica row's columns that no pending write sets, by the replica's own SQL (search).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import redis
import sqlalchemy as sa
from sqlalchemy import exc

from obs_pipeline import forks
from obs_pipeline import spool as spool_module
from obs_pipeline.buffer_store import BufferStore, redis_unavailable
from obs_pipeline.column_values import ascii_lower, unicode_lower
from obs_pipeline.config import ConfigError, postgresql_url, stack_env_hint
from obs_pipeline.lsn import REPLAY_SQL, int_to_lsn, lsn_to_int
from obs_pipeline.model_registry import ModelRegistry, ModelSpec
from obs_pipeline.read_filters import Filters, compile_filters, refused_key, refused_value, series
from obs_pipeline.read_forms import (bound_key, datetime_columns, float_columns, from_db, read_forms, sort_key,
                                     utc_iso)
from obs_pipeline.wire import record_id


# Is a spooled transaction Redis's to answer for (1) or the spool's (0)? Its status key exists
# (pushed since); or, without one, its id is `discarded:{id}` (SiteKeys.discarded): an earlier
# push reached Redis, its reply lost, and the operator discarded the transaction since; the push
# drops this copy (scripts.BUFFER), and read from the spool it showed what will never be applied.
_KNOWN_OF = """
local function known_of(prefix, status)
  if redis.call('EXISTS', status) == 1 then return 1 end
  return redis.call('EXISTS', prefix .. 'discarded:' .. string.sub(status, #prefix + #'transaction:' + 1))
end
"""


# The buffered state of records of one model, read atomically (see the module docstring).
# ARGV[1] key prefix, ARGV[2] model, ARGV[3..] ids (none: the whole model, through its indexes);
# KEYS: status keys of spooled transactions. Returns {records, overlays, known, cleaned}: a JSON
# array of the created records still buffered (each holds its own id), a JSON array of [id,
# [overlay, ...]] for the ids with pending overlays, 1 or 0 per KEYS, for a transaction Redis
# answers for or not (_KNOWN_OF), and how far the replica must have replayed for what the caches
# no longer hold (stats' cleaned_lsn, '' for none: see _caught_up).
# The script holds Redis while it runs, so it does as little as it can: raw JSON is passed
# through, never decoded; the records come from one native SORT ... GET over the model index
# (one GET per id if the prefix holds SORT's `*` or `->`, or if Redis is full: SORT may write,
# and Redis at its maxmemory refuses it), and only the read buffers of
# the ids in the overlay index are read.
_READ_BUFFERED = _KNOWN_OF + """
local prefix, model = ARGV[1], ARGV[2]
local created = prefix .. 'buffered:' .. model .. ':'
local overlaid = prefix .. 'read_buffer:' .. model .. ':'
local recs, ovls = {}, {}
local function overlays_of(id)
  local o = redis.call('LRANGE', overlaid .. id, 0, -1)
  if #o > 0 then ovls[#ovls + 1] = '[' .. cjson.encode(id) .. ',[' .. table.concat(o, ',') .. ']]' end
end
if #ARGV > 2 then
  for i = 3, #ARGV do
    local rec = redis.call('GET', created .. ARGV[i])
    if rec then recs[#recs + 1] = rec end
    overlays_of(ARGV[i])
  end
else
  local index = prefix .. 'index:' .. model
  local found
  if not (string.find(created, '*', 1, true) or string.find(created, '->', 1, true)) then
    found = redis.pcall('SORT', index, 'BY', 'nosort', 'GET', created .. '*')
  end
  if not found or found.err then  -- SORT may write (STORE): a full Redis refuses it, not GET
    found = {}
    for _, id in ipairs(redis.call('SMEMBERS', index)) do found[#found + 1] = redis.call('GET', created .. id) end
  end
  for _, rec in ipairs(found) do
    if rec then recs[#recs + 1] = rec end
  end
  for _, id in ipairs(redis.call('SMEMBERS', prefix .. 'overlaid:' .. model)) do overlays_of(id) end
end
local known = {}
for i = 1, #KEYS do known[i] = known_of(prefix, KEYS[i]) end
local cleaned = redis.call('HGET', prefix .. 'stats', 'cleaned_lsn') or ''
return {'[' .. table.concat(recs, ',') .. ']', '[' .. table.concat(ovls, ',') .. ']', known, cleaned}
"""


# Status keys of spooled transactions asked per script call. A long outage may spool more than
# the 1,048,576 arguments a call takes (Redis resets the connection beyond: every search of the
# model failed, RedisUnreadable); the rest goes in calls of _KNOWN, in the same MULTI/EXEC.
SPOOLED_KEYS_CHUNK = 10_000

# 1 or 0 per KEYS (_READ_BUFFERED's `known`, continued); ARGV[1] the key prefix.
_KNOWN = _KNOWN_OF + """
local known = {}
for i = 1, #KEYS do known[i] = known_of(ARGV[1], KEYS[i]) end
return known
"""


# How long a read waits for a replica behind what the drain cleaned (SmartQuery._caught_up).
REPLICA_CATCH_UP_S = 5.0
_REPLAYED = "obs_pipeline_replayed"  # in a replica connection's info: (its system identifier, or False for no
#                                      standby; the highest replay LSN seen on it)


def _cleaned_through(text: Any) -> tuple[int | None, int] | None:
    """stats' cleaned_lsn ("<system identifier>:<16 hex digits>") as (identifier or None, LSN)."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    cluster, _, lsn = (text or "").partition(":")
    try:
        return (int(cluster) if cluster else None), int(lsn, 16)
    except ValueError:
        return None


class RedisUnreadable(redis.ConnectionError):
    """A read needs what is buffered in the site's Redis, and Redis does not answer."""


class ReplicaUnreadable(exc.OperationalError):
    """A read needs the site's replica, and it cannot be read (down, refusing, cancelling): the
    driver's error in one line, SQLAlchemy's own message runs over several."""

    def __init__(self, line: str, error: exc.OperationalError):
        super().__init__(error.statement, error.params, error.orig, hide_parameters=True)
        self.line = line

    def __str__(self) -> str:
        return self.line


class ReplicaBehind(ReplicaUnreadable):
    """The replica has not replayed what the drain cleaned from the caches (see
    SmartQuery._caught_up): read now, it would miss those records or show older values."""

    def __init__(self, line: str):
        super().__init__(line, exc.OperationalError(None, None, RuntimeError(line)))


def _unreadable(what: str, engine: sa.Engine, error: exc.OperationalError) -> ReplicaUnreadable:
    """ReplicaUnreadable in one line: the driver's error, or what to do where the replica is a
    standby with hot_standby off (it said "not accepting connections", as if it were down)."""
    from obs_pipeline.apply import hot_standby_off, replica_hot_standby_off

    if hot_standby_off(error):
        return ReplicaUnreadable(f"{what} needs the site's replica, but {replica_hot_standby_off(engine.url)}", error)
    return ReplicaUnreadable(f"{what} needs the site's replica (OBS_REPLICA_DB_URL), which cannot be read: "
                             f"{' '.join(str(error.orig).split())}", error)


@dataclass
class Buffered:
    """What the caches held, at one instant, for records of one model."""
    created: dict[str, dict[str, Any]]         # id -> record as created, while its create is buffered
    overlays: dict[str, list[dict[str, Any]]]  # id -> pending updates/deletes, in buffering order
    cleaned: tuple[int | None, int] | None = None  # (main's system identifier, LSN): what the replica
    #                                            must have replayed for what the caches no longer hold

    def deleted(self, rid: str) -> bool:
        """A pending delete hides the record unless a create of the same key comes after it."""
        for entry in reversed(self.overlays.get(rid, ())):
            op = entry.get("op")
            if op == "delete":
                return True
            if op == "create":
                return False
        return False


class SmartQuery:
    def __init__(self, store: BufferStore, registry: ModelRegistry, replica_url: str | None,
                 spool: spool_module.Spool | None = None):
        self.store = store
        self.registry = registry
        self.replica_url = replica_url
        self.spool = spool  # ingest's: its circuit breaker (see _read_redis)
        self._engine: sa.Engine | None = None
        self._engine_lock = threading.Lock()
        self._fold_case: Callable[[str], str] | None = None  # see fold_case
        self._read = store.redis.register_script(_READ_BUFFERED)
        forks.renew_in_forked_children(self)

    def _after_fork_in_child(self) -> None:
        """In a forked child (see obs_pipeline.forks): the engine's pooled connections are the
        parent's; the child's pool starts empty, leaving them open for the parent (SQLAlchemy's
        way for a child process: dispose(close=False))."""
        self._engine_lock = threading.Lock()
        if self._engine is not None:
            self._engine.dispose(close=False)

    @property
    def engine(self) -> sa.Engine | None:
        if self._engine is not None or not self.replica_url:
            return self._engine
        with self._engine_lock:  # readers in several threads share one pool
            if self._engine is not None:
                return self._engine
            kwargs: dict[str, Any] = {}
            if self.replica_url.startswith("postgresql"):
                kwargs["connect_args"] = {"options": "-c timezone=UTC", "connect_timeout": 5}
            # Autocommit: one statement, one snapshot, no ROLLBACK round trip per read.
            self._engine = sa.create_engine(self.replica_url, pool_size=2, max_overflow=4, pool_pre_ping=True,
                                            isolation_level="AUTOCOMMIT", **kwargs)
            return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # --- public -------------------------------------------------------------------------------
    def get(self, model: str, record_id_: Any) -> dict[str, Any] | None:
        spec = self.registry.model(model)
        where = f"get of {spec.name}"
        return self.get_checked(spec, record_id(spec, record_id_, where), where)

    def get_checked(self, spec: ModelSpec, value: Any, where: str) -> dict[str, Any] | None:
        """`get` of a key already checked (wire.record_id); `where` (`update of Host`) begins
        the line of a key the replica refuses."""
        if spec.columns[spec.primary_key].case_insensitive:
            return self._get_in_any_case(spec, value)
        rid = str(value)
        self._require_replica()
        state = self.buffered(spec, [rid])                   # 1. caches
        if state.deleted(rid):
            return None
        overlays = state.overlays.get(rid, [])
        created = next(iter(state.created.values()), None)
        if created is not None:
            return _merge(spec, created, overlays)
        pk = spec.sql_columns[spec.primary_key]
        try:
            base = self._select(spec, sa.select(spec.table).where(pk == bound_key(spec, value)), None,
                                state.cleaned).get(rid)  # 2. replica
        except (exc.ProgrammingError, exc.DataError) as error:
            refused = refused_key(spec, value, error, where)
            if refused is None:
                raise
            raise refused from None
        if base is None:
            return None
        return _merge(spec, base, overlays) if overlays else base

    def taken_keys(self, spec: ModelSpec, values: list[Any]) -> list[Any]:
        """Those of these keys (checked, not CITEXT) that get_checked would find: one read of the
        caches and one query of the replica for all (a bulk_create's given keys, each looked up
        alone, cost 2 ms a row)."""
        rids = [str(v) for v in values]
        self._require_replica()
        state = self.buffered(spec, rids)
        taken = {rid for rid in rids if rid in state.created and not state.deleted(rid)}
        ask = [v for v, rid in zip(values, rids) if rid not in state.created and not state.deleted(rid)]
        if ask:
            pk = spec.sql_columns[spec.primary_key]
            taken.update(self._select(spec, sa.select(spec.table).where(pk.in_([bound_key(spec, v) for v in ask])),
                                      None, state.cleaned))
        return [v for v, rid in zip(values, rids) if rid in taken]

    def search(self, model: str, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        spec = self.registry.model(model)
        filters = {} if filters is None else filters
        fold_case = self.fold_case() if _filters_citext(spec, filters) else None
        compiled = compile_filters(spec, filters, fold_case)
        self._require_replica()
        state = self.buffered(spec, None)                    # 1. caches
        hidden = {rid for rid in state.overlays if state.deleted(rid)}
        datetimes, floats = datetime_columns(spec), float_columns(spec)
        out: dict[str, dict[str, Any]] = {}
        match = compiled.match
        for rid, record in state.created.items():
            overlays = state.overlays.get(rid)
            if overlays is None:  # filters hold on the record as stored: merge only what matches
                if match(record):
                    out[rid] = _merge(spec, record, (), datetimes, floats)
            elif rid not in hidden:
                row = _merged(spec, record, overlays, datetimes, floats)
                if match(row):  # on the values as buffered, which main compares, not as read
                    out[rid] = _in_read_form(spec, row)
        # Records on the replica with pending updates: if an update sets a filtered column (or a
        # create after a delete sets them all), the replica row may match only once updated, so
        # fetch those by id too and test in Python.
        by_id = [rid for rid, overlays in state.overlays.items()
                 if rid not in state.created and rid not in hidden and compiled.sql
                 and any(o.get("op") == "create" or not compiled.columns.isdisjoint(o.get("data") or ())
                         for o in overlays)]
        # What the replica's SQL says of each filtered column, beside its row: the columns the
        # buffer does not set are judged on main's values, not on their read form.
        verdicts = compiled.verdicts() if by_id else []
        stmt = sa.select(spec.table, *(clause.label(None) for _, clause in verdicts))
        if compiled.sql:
            where = sa.and_(*compiled.sql)
            if by_id:
                where = sa.or_(where, spec.sql_columns[spec.primary_key].in_([bound_key(spec, i) for i in by_id]))
            stmt = stmt.where(where)
        recheck = set(by_id)
        said: dict[str, tuple[Any, ...]] = {}
        try:
            replicated = self._select(spec, stmt, said, state.cleaned)  # 2. replica
        except (exc.ProgrammingError, exc.DataError) as error:
            refused = refused_value(spec, compiled, error)
            if refused is None:
                raise
            raise refused from None
        for rid, row in replicated.items():
            if rid in hidden or rid in state.created:
                continue
            overlays = state.overlays.get(rid)
            if overlays:
                row = _merged(spec, row, overlays, datetimes, floats)
                if rid in recheck and not _matches_merged(compiled, row, overlays, verdicts, said[rid]):
                    continue
                row = _in_read_form(spec, row)
            out[rid] = row
        return [out[k] for k in sorted(out, key=sort_key(spec))]

    def search_frame(self, model: str, filters: dict[str, Any] | None = None):
        """`search` as a DataFrame: datetimes tz-aware (UTC), uuids and text as strings,
        integers as nullable Int64, one column per model column even when empty."""
        import pandas as pd

        spec = self.registry.model(model)
        rows = self.search(model, filters)
        data = {name: series(pd, column, [row[name] for row in rows]) for name, column in spec.columns.items()}
        return pd.DataFrame(data, columns=list(spec.columns))

    def fold_case(self) -> Callable[[str], str]:
        """How the database lower-cases text, and so compares CITEXT: A-Z alone under the C
        locale (ascii_lower), every letter under another (unicode_lower). Asked of the replica
        once (main's copy: the same locale), by the one letter that tells them apart."""
        if self._fold_case is None:
            self._require_replica()
            probe = sa.text("SELECT lower(chr(201)) = chr(233)")  # É -> é?
            try:
                with self.engine.connect() as conn:
                    folds_every_letter = conn.execute(probe).scalar_one()
            except exc.OperationalError as error:
                raise _unreadable("comparing CITEXT", self.engine, error) from error
            self._fold_case = unicode_lower if folds_every_letter else ascii_lower
        return self._fold_case

    # --- internals ----------------------------------------------------------------------------
    def _get_in_any_case(self, spec: ModelSpec, key: str) -> dict[str, Any] | None:
        """A CITEXT key names its record in any case, buffered as on main ('ABC' finds 'abc';
        get said None for both): a search by the key, which reads every buffered record of the
        model. The record under the key's own text first, if there are several."""
        found = self.search(spec.name, {spec.primary_key: key})
        exact = [row for row in found if row[spec.primary_key] == key]
        return (exact or found or [None])[0]

    def buffered(self, spec: ModelSpec, ids: list[str] | None) -> Buffered:
        """What the caches hold for these ids or (None) for every id in the model's index, and
        on top what the spool holds for them (see the module docstring)."""
        if ids is not None and not ids:
            return Buffered({}, {})
        spooled = self._spooled(spec, ids)  # before Redis: a line pushed in between is known there
        try:
            records, overlays, known, cleaned = self._read_redis(spec, ids, [tx["id"] for tx in spooled])
        except RedisUnreadable:
            alone = _with_spooled(Buffered({}, {}), spooled)
            if ids is not None and all(rid in alone.created or alone.deleted(rid) for rid in ids):
                return alone  # created or deleted by a spooled transaction: Redis holds nothing newer
            raise
        pk = spec.primary_key
        created = {}
        for record in json.loads(records):
            if isinstance(record, dict) and record.get(pk) is not None:
                created[str(record[pk])] = record
        pending = {str(rid): entries for rid, entries in json.loads(overlays)}
        for rid, entries in pending.items():
            if rid not in created:  # its buffered record went with the cleanup of an earlier create of the key
                made = next((e.get("data") for e in entries if e.get("op") == "create"), None)
                if isinstance(made, dict):
                    created[rid] = made
        return _with_spooled(Buffered(created, pending, _cleaned_through(cleaned)),
                             [tx for tx, there in zip(spooled, known) if not there])

    def _spooled(self, spec: ModelSpec, ids: list[str] | None) -> list[dict[str, Any]]:
        """The spooled transactions, not pushed yet, that write these ids (None: any record of
        the model), oldest first, each {"id", "created": [(id, record JSON)], "overlays": [(id,
        overlay JSON)]} with only those writes."""
        if self.spool is None or not self.spool.exists():
            return []
        wanted = None if ids is None else set(ids)
        out = []
        for tx in self.spool.unpushed(json.dumps(ids[0] if wanted is not None and len(wanted) == 1 else spec.name)):
            if spool_module.stale_copy(tx):  # a week-old copy of what Redis took: its push never buffers it
                continue
            writes = {part: [(rid, value) for model, rid, value in tx[part]
                             if model == spec.name and (wanted is None or rid in wanted)]
                      for part in ("created", "overlays")}
            if writes["created"] or writes["overlays"]:
                out.append({"id": tx["id"], **writes})
        return out

    def _read_redis(self, spec: ModelSpec, ids: list[str] | None, spooled_tx_ids: list[str]) -> list[Any]:
        """The buffered state, from Redis. After Redis did not answer in time, it is not asked
        again for spool.REDIS_RETRY_AFTER_S (ingest's breaker: a hung Redis cost every read its
        socket timeout); a read that times out starts that wait as ingest's calls do."""
        spool = self.spool
        if spool is not None and spool.redis_failed_recently():
            raise RedisUnreadable(f"reading {spec.name} needs what is buffered in the site's Redis (OBS_REDIS_URL), "
                                  f"which did not answer a moment ago; it is asked again within "
                                  f"{spool_module.REDIS_RETRY_AFTER_S:g} s")
        keys = [self.store.keys.transaction(t) for t in spooled_tx_ids]
        args = [self.store.keys.prefix, spec.name, *(ids or ())]
        try:
            if len(keys) <= SPOOLED_KEYS_CHUNK:
                return self._read(keys=keys, args=args)
            return self._read_in_parts(keys, args)
        except redis.RedisError as error:
            if not redis_unavailable(error):
                raise
            if spool is not None:
                spool.note_redis_failure(error)
            raise RedisUnreadable(f"reading {spec.name} needs what is buffered in the site's Redis (OBS_REDIS_URL), "
                                  f"which does not answer: {' '.join(str(error).split())}") from error

    def _read_in_parts(self, keys: list[str], args: list[Any]) -> list[Any]:
        """_READ_BUFFERED with the first SPOOLED_KEYS_CHUNK status keys, then _KNOWN with the rest,
        in one MULTI/EXEC: Redis runs them back to back, so no push from the spool lands between
        the caches read and a status key asked (it would be read twice, or not at all)."""
        pipe = self.store.redis.pipeline(transaction=True)
        for part in range(0, len(keys), SPOOLED_KEYS_CHUNK):
            chunk = keys[part:part + SPOOLED_KEYS_CHUNK]
            if part == 0:
                pipe.eval(_READ_BUFFERED, len(chunk), *chunk, *args)
            else:
                pipe.eval(_KNOWN, len(chunk), *chunk, args[0])
        (records, overlays, known, cleaned), *rest = pipe.execute()
        return [records, overlays, known + [flag for flags in rest for flag in flags], cleaned]

    def _caught_up(self, conn: sa.Connection, spec: ModelSpec, cleaned: tuple[int | None, int] | None) -> None:
        """Before a replica read, on its connection: the replica has replayed the commits whose
        caches the drain cleaned (it cleans only once they are replayed, and a replica's replay
        never goes back while it runs; but a replica restarted replays its WAL again from its
        last restartpoint, and its queries open before that ends: a record created, replicated
        and cleaned read None, an update an older value). Waits up to REPLICA_CATCH_UP_S, then
        raises ReplicaBehind. A connection lives no longer than its server: the replay seen on
        it is kept with it, and a read asks again only once the drain has cleaned past that.
        Not checked where the server is no standby, or one of another cluster than the cleanup's."""
        if cleaned is None:
            return
        cluster, needed = cleaned
        deadline, delay = None, 0.002
        while True:
            standby, replayed = conn.info.get(_REPLAYED, (None, -1))
            if standby is False or cluster is not None and standby not in (None, cluster) or replayed >= needed:
                return
            if deadline is None:
                deadline = time.monotonic() + REPLICA_CATCH_UP_S
            elif time.monotonic() >= deadline:
                raise ReplicaBehind(f"reading {spec.name} needs the site's replica (OBS_REPLICA_DB_URL) to have "
                                    f"replayed main's WAL up to {int_to_lsn(needed)}, whose records the buffer no "
                                    f"longer holds, and it is at {int_to_lsn(replayed)} (restarted, and replaying "
                                    f"its WAL again?): waited {REPLICA_CATCH_UP_S:g} s; read again once it has "
                                    "caught up")
            else:
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
            lsn, system = conn.execute(sa.text(REPLAY_SQL)).one()
            conn.info[_REPLAYED] = (False, -1) if lsn is None else (int(system), lsn_to_int(lsn))

    def _require_replica(self) -> None:
        if not self.replica_url:
            raise ConfigError("OBS_REPLICA_DB_URL is not set: smart queries (get/search) need the site's read "
                              f"replica (e.g. {stack_env_hint()} for the local stack)")
        if self._engine is None:  # (`postgres://...` raised SQLAlchemy's NoSuchModuleError, naming no variable)
            postgresql_url("OBS_REPLICA_DB_URL", self.replica_url)

    def _select(self, spec: ModelSpec, stmt: sa.Select, said: dict[str, tuple[Any, ...]] | None = None,
                cleaned: tuple[int | None, int] | None = None) -> dict[str, dict[str, Any]]:
        """id -> row in read form; `said`: filled with id -> what the statement selects after
        the table's columns (see search); `cleaned`: Buffered.cleaned, how far the replica must
        have replayed first (_caught_up)."""
        names = list(spec.sql_columns)  # by attribute, in the table's order, as the select gives them
        forms = dict(read_forms(spec))
        convert = [forms.get(n) or from_db(spec.columns[n]) for n in names]
        pk = spec.primary_key
        for attempt in (1, 2):
            try:
                with self.engine.connect() as conn:
                    self._caught_up(conn, spec, cleaned)
                    rows = conn.execute(stmt).all()
                break
            except ReplicaBehind:
                raise
            except exc.OperationalError as error:
                # A hot standby may cancel a query that conflicts with replay: try once more.
                if attempt == 2 or getattr(error.orig, "pgcode", None) != "40001":
                    raise _unreadable(f"reading {spec.name}", self.engine, error) from error
            except exc.ProgrammingError as error:
                missing = _replica_setup_refusal(spec, error)
                if missing is None:
                    raise
                raise missing from None
        out = {}
        width = len(names)
        for row in rows:
            record = {n: (None if v is None else f(v)) for n, f, v in zip(names, convert, row)}
            out[str(record[pk])] = record
            if said is not None and len(row) > width:
                said[str(record[pk])] = tuple(row[width:])
        return out


_UNDEFINED_TABLE, _UNDEFINED_COLUMN, _INSUFFICIENT_PRIVILEGE = "42P01", "42703", "42501"


def _replica_setup_refusal(spec: ModelSpec, error: exc.ProgrammingError) -> ConfigError | None:
    """A model of OBS_MODELS whose table, or one of whose columns, the replica lacks (`db init`
    not run since the model was added; a column added to the model, not to main's table), or a
    readers' role not granted SELECT on it, as one line saying what to do; None for another
    error (a row-level security policy refuses no SELECT: it hides rows). It was SQLAlchemy's page of
    UndefinedTable from every read of the model, and from a create that gives its key."""
    code = getattr(error.orig, "pgcode", None)
    first = (str(error.orig).strip().splitlines() or [type(error.orig).__name__])[0]
    if code == _INSUFFICIENT_PRIVILEGE and first.startswith("permission denied for "):
        return ConfigError(f"reading {spec.name}: the site's replica refuses the role of OBS_REPLICA_DB_URL ({first}): "
                           "grant it SELECT on the models' tables on main (deploy/main-setup.sql); the replica "
                           "replays the grant")
    if code not in (_UNDEFINED_TABLE, _UNDEFINED_COLUMN):
        return None
    table = spec.table.fullname
    if code == _UNDEFINED_TABLE:
        return ConfigError(f"reading {spec.name}: the site's replica (OBS_REPLICA_DB_URL) has no table {table} "
                           f"({first}): run `obs-pipeline db init` with this OBS_MODELS, which creates it on main")
    return ConfigError(f"reading {spec.name}: the site's replica (OBS_REPLICA_DB_URL) lacks a column of its table "
                       f"{table} that OBS_MODELS maps ({first}): add the column to the table on main (`db init` "
                       "creates missing tables, not columns), or drop it from the model")


def _filters_citext(spec: ModelSpec, filters: Any) -> bool:
    """Do the filters name a CITEXT column (whose comparison needs SmartQuery.fold_case)?"""
    return isinstance(filters, dict) and any(
        name in spec.columns and spec.columns[name].case_insensitive for name in filters)


# --- merging --------------------------------------------------------------------------------

def _with_spooled(state: Buffered, spooled: list[dict[str, Any]]) -> Buffered:
    """Spooled transactions on top of `state`, in spool order: they come after it."""
    for tx in spooled:
        for rid, record in tx["created"]:
            state.created[rid] = json.loads(record)
        for rid, entry in tx["overlays"]:
            state.overlays.setdefault(rid, []).append(json.loads(entry))
    return state


def _merge(spec: ModelSpec, record: dict[str, Any], overlays: Any,
           datetimes: list[str] | None = None, floats: list[str] | None = None) -> dict[str, Any]:
    """The merged row (see _merged) in its read form."""
    return _in_read_form(spec, _merged(spec, record, overlays, datetimes, floats))


def _merged(spec: ModelSpec, record: dict[str, Any], overlays: Any,
            datetimes: list[str] | None = None, floats: list[str] | None = None) -> dict[str, Any]:
    """Every column of the model in order, pending updates applied per column, datetimes in UTC,
    floats as floats (JSON may hold 30 for 30.0; the replica gives a float). Buffered values
    are as buffered: filters test them so (main compares what it stores, and a TIME(0)'s
    23:59:59.6 is 24:00:00 there, which the read form shows as 00:00:00)."""
    merged = dict.fromkeys(spec.columns)
    merged.update(record)
    for entry in overlays:
        op = entry.get("op")
        if op == "update":
            merged.update(entry.get("data") or ())
        elif op == "create":  # the key created again after a delete: nothing before it counts
            merged = dict.fromkeys(spec.columns)
            merged.update(entry.get("data") or ())
    if len(merged) != len(spec.columns):  # a key that is no column (a foreign writer): drop it
        merged = {name: merged[name] for name in spec.columns}
    for name in datetime_columns(spec) if datetimes is None else datetimes:
        value = merged[name]
        if value.__class__ is str and value[-6:] != "+00:00":
            merged[name] = utc_iso(value)
    for name in float_columns(spec) if floats is None else floats:
        if merged[name].__class__ is int:
            merged[name] = float(merged[name])
    return merged


def _in_read_form(spec: ModelSpec, row: dict[str, Any]) -> dict[str, Any]:
    """A merged row's values as the replica shows them (read_forms), in place."""
    for name, form in read_forms(spec):
        if row[name] is not None:
            row[name] = form(row[name])
    return row


def _matches_merged(compiled: Filters, row: dict[str, Any], overlays: list[dict[str, Any]],
                    verdicts: list[tuple[str, Any]], said: tuple[Any, ...]) -> bool:
    """Does a replica row merged with its pending writes match the filters as main would say?
    Each filtered column the buffer sets is tested in Python on the buffered value; each it
    leaves is taken from the replica's SQL verdict, selected with the row (its read form may
    differ from what main compares: 24:00:00 reads as 00:00:00)."""
    buffered = _buffered_columns(overlays)
    for (name, _), replica_says in zip(verdicts, said):
        if buffered is None or name in buffered:
            if not compiled.match_columns(row, (name,)):
                return False
        elif not replica_says:  # false, or null (a comparison with a null column)
            return False
    return True


def _buffered_columns(overlays: list[dict[str, Any]]) -> set[str] | None:
    """The columns pending writes set, or None for all of them (a create after a delete)."""
    names: set[str] = set()
    for entry in overlays:
        if entry.get("op") == "create":
            return None
        names.update(entry.get("data") or ())
    return names
