"""All Redis operations of the buffer and the drain, each one round trip and atomic.

Ingest: queue entry, status, id cache, buffered record and overlays in one Lua call.
Drain: claim into a processing list under a lease (never pop-and-pray), acknowledge with a
write fenced by that lease, remember committed batches by commit LSN until the replica has
replayed them, then clean their caches, a MULTI/EXEC per chunk of 50 transactions.
"""

from __future__ import annotations

import json
import math
import os
import select
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, NamedTuple

import hiredis
import redis

from obs_pipeline import json_codec
from obs_pipeline import redis_scripts as scripts
from obs_pipeline.config import ConfigError
from obs_pipeline.keys import SiteKeys
from obs_pipeline.lsn import int_to_lsn
from obs_pipeline.wire import STATUS_HEADER_LEN, STATUS_OPENING, STATUS_SLOT, claim_rows, status_header, status_slot

MINIMUM_REDIS = (6, 2)
REPLICATED_STATUS_TTL_S = 7 * 24 * 3600  # `status()` answers "replicated" for a week
CLEANUP_CHUNK = 50  # transactions per cleanup record: one MULTI/EXEC holds Redis for a ms at most
STATUS_CHUNK = 200  # statuses rewritten per Lua call, for the same reason
REPLY_SPIN_S = 0.0002  # ingest polls this long for Redis's reply before it sleeps on the socket
CLAIM_CHUNK = 250   # entries moved to the processing list per Lua call, for the same reason
CLEAN_PASS = 100    # cleanup records read, and cleaned, per round trip
UNPARK_CHUNK = 1000  # parked transactions made due per Lua call, about 25 ms (scripts.UNPARK)
DRAIN_WAITING_MARGIN_S = 15.0  # a drain run's note that it waits outlives the wait by this (its start)
AOF_COMPACT_MIN_BYTES = 64 * 2**20  # compact_aof: an AOF this big (Redis's default rewrite minimum)
AOF_COMPACT_FILE_PER_MEMORY = 8     # ... and 8x the data it describes
# Redis 6 refuses a command of more arguments than this: it resets the connection, which reads
# as a Redis that went away (networking.c, "invalid multibulk length")
MAX_COMMAND_ARGS = 1024 * 1024
# ingest's script call (`buffer`): EVALSHA, its sha, 0, 5 arguments, then 3 per cache write and
# 2 per checked key (a create's, whose key of the caller's counts two cache writes)
MAX_CACHE_WRITES = (MAX_COMMAND_ARGS - 8) // 4
# ...but Redis runs that call as one script, every other client waiting: 349,523 writes took
# 3.5 s on a quick host and over 5 s on a slow one, past ingest's socket timeout (taken for a
# Redis gone away: spooled) and near lua-time-limit. One transaction writes at most this many
# records: about a second of Redis on a slow host.
MAX_TRANSACTION_WRITES = 100_000


class Link(NamedTuple):
    """What the last run's full batches showed of main (BufferStore.remember_link)."""
    round_trip_s: float
    apply_s_per_transaction: float | None
    parse_s_per_transaction: float | None = None
    round_trips: int | None = None


MAIN_CLUSTER_FIELD = "main_system_identifier"  # in `stats`: see BufferStore.main_cluster
MAIN_TIMELINE_FIELD = "main_timeline"  # in `stats`: see BufferStore.main_timeline


def redis_is_full(error: BaseException) -> bool:
    """Redis at its `maxmemory` refused a write: OutOfMemoryError, or, from inside a Lua script
    on Redis 6, the same reply wrapped in the script's error."""
    return isinstance(error, redis.exceptions.OutOfMemoryError) or (
        isinstance(error, redis.ResponseError) and "OOM command not allowed" in str(error))


def redis_trouble(error: BaseException) -> str | None:
    """One line an operator can act on when Redis is unreachable, loading, hung or full, or has
    not the database OBS_REDIS_URL names; None for any other error. redis-py's own is a page of
    stack that names no setting."""
    handshake = tls_handshake_failure(error)
    if handshake:  # before ConnectionError and TimeoutError: "is it hung?" sent the operator to the server
        return (f"Redis did not complete TLS's handshake (OBS_REDIS_URL is rediss://: TLS): {handshake}; a Redis "
                "without TLS answers none: give redis:// for it, or the port of its tls-port (one that serves TLS "
                "there may be hung: `obs-pipeline stack status`)")
    if isinstance(error, redis.BusyLoadingError):  # (a ConnectionError: "is the stack up?" sent the operator astray)
        return ("Redis is loading its data into memory (restarted; seconds per million keys) and answers nothing "
                "until it is done; wait, then run this again (`obs-pipeline stack status`)")
    if isinstance(error, redis.AuthenticationError):  # (a ConnectionError: "is the stack up?" sent the operator astray)
        return (f"Redis refuses OBS_REDIS_URL's user or password ({error}): give the right ones in OBS_REDIS_URL "
                "(redis://USER:PASSWORD@HOST:PORT/DB, or redis://:PASSWORD@... for the default user)")
    if isinstance(error, redis.ConnectionError):
        return f"Redis unreachable ({error}); is OBS_REDIS_URL right and the stack up (`obs-pipeline stack status`)?"
    if isinstance(error, redis.TimeoutError):  # it accepts connections but does not answer
        return (f"Redis did not answer in time ({error}); is it hung or overloaded? Is OBS_REDIS_URL right "
                "(`obs-pipeline stack status`)?")
    if isinstance(error, redis.ResponseError) and str(error) == "DB index is out of range":  # its SELECT, at connect
        return ("Redis has no database of the number OBS_REDIS_URL ends with (DB index is out of range): give one "
                "below its `databases` setting (16 unless its redis.conf says otherwise)")
    if redis_is_full(error):  # also a claim script refused mid-run
        return ("Redis is full (its maxmemory is reached) and refuses writes, the drain's claim among them; "
                "raise maxmemory (CONFIG SET maxmemory ..., and in redis.conf). Ingest spools to disk meanwhile")
    return None


def tls_handshake_failure(error: BaseException) -> str | None:
    """What failed, where the error is a rediss:// connection whose TLS handshake failed or
    went unanswered (redis-py says only "Timeout connecting to server", or "Error 1 connecting
    to ..."): a Redis without TLS takes the handshake's hello for a command line not yet ended,
    and answers nothing (or an error TLS cannot read). None for any other error, a certificate
    refused among them (its own line says so)."""
    import re
    import ssl

    seen = error
    for _ in range(5):  # redis-py raises its error from (or while handling) the socket's
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError) and not isinstance(seen, ssl.SSLCertVerificationError) or (
                isinstance(seen, (TimeoutError, socket.timeout)) and "handshake" in str(seen)):
            return re.sub(r"^_ssl\.c:\d+: ", "", str(seen))
        seen = seen.__cause__ or seen.__context__
    return None


def refuse_a_redis_without_tls(client: redis.Redis, error: BaseException) -> None:
    """ConfigError, naming OBS_REDIS_URL, where `client` is a rediss:// one whose TLS handshake
    failed (tls_handshake_failure) and the server answers a plain PING: a Redis without TLS,
    which the URL's scheme is wrong for. Ingest took it for Redis down and spooled every
    transaction, for a push that could never get through. Nothing where the server answers
    no PING either: a TLS Redis that hangs looks so, and its transactions are spooled."""
    handshake = tls_handshake_failure(error)
    if not handshake:
        return
    options = client.connection_pool.connection_kwargs
    if not options.get("host"):
        return
    address = (options["host"], int(options.get("port") or 6379))
    try:
        with socket.create_connection(address, timeout=1.0) as probe:
            probe.sendall(b"PING\r\n")
            answer = probe.recv(1)  # "+PONG", or "-NOAUTH ...": Redis's own protocol, no TLS
    except OSError:
        return
    if answer in (b"+", b"-"):
        raise ConfigError(f"Redis at {address[0]}:{address[1]} serves no TLS, and OBS_REDIS_URL is rediss:// (TLS): "
                          f"give redis:// for it, or the port of its tls-port (the TLS handshake: {handshake}); "
                          "nothing was buffered or spooled") from error


def entry_id(raw: Any) -> str | None:
    """The `transaction_id` of a queued entry (a list's entry, or a retry-set member with its
    score), or None where it has no usable one."""
    if isinstance(raw, tuple):
        raw = raw[0]
    try:
        tx_id = json.loads(raw).get("transaction_id")
    except (ValueError, AttributeError, RecursionError):
        return None
    return tx_id if isinstance(tx_id, str) else None


def lost_while_watching(error: redis.WatchError) -> BaseException | None:
    """The ConnectionError or TimeoutError behind this WatchError; None for a real conflict (a
    watched key changed). redis-py raises a connection reset or a socket timeout that happens
    while a pipeline WATCHes keys, the EXEC's reply awaited included, as a WatchError, raised as
    it handles that error (its `__context__`): taken for a conflict, a retry whose EXEC Redis
    had applied read the list again and acted on what was left, and a drain whose
    acknowledgement timed out said another drain had taken its lease. (Call it only on a
    WatchError from a pipeline not run inside an `except` clause: there, a conflict's context
    is the error being handled.)"""
    lost = error.__context__
    return lost if isinstance(lost, (redis.ConnectionError, redis.TimeoutError, socket.timeout)) else None


class RedisRefusesWrites(redis.ResponseError):
    """Redis refuses every write for now, and the script it refused kept nothing (the check is
    made at each write, so it refuses the first): it cannot persist (MISCONF: an RDB save or an
    AOF write failed, a full disk say), it is a read-only replica (READONLY: a failover), or it
    has fewer good replicas than its `min-replicas-to-write` (NOREPLICAS: a replica down or lagging).
    Or it refuses every command before running it, see redis_unavailable."""


_REFUSED_WRITES = ("MISCONF ", "READONLY ", "NOREPLICAS ")


def redis_refuses_writes(error: BaseException) -> bool:
    """MISCONF, READONLY or NOREPLICAS, on their own or, from inside a Lua script, wrapped in the
    script's error; or BUSY or MASTERDOWN (see redis_unavailable)."""
    if isinstance(error, (RedisRefusesWrites, redis.exceptions.ReadOnlyError)) or _refuses_every_command(error):
        return True
    text = str(error) if isinstance(error, redis.ResponseError) else ""
    return text.startswith(_REFUSED_WRITES) or any("-" + code in text for code in _REFUSED_WRITES)


def redis_unavailable(error: BaseException) -> bool:
    """Redis cannot be asked for now, and what it refused did nothing: it is unreachable or does
    not answer in time, or it answers every command with an error before running it (reads
    then do as while it is down)."""
    return isinstance(error, (redis.ConnectionError, redis.TimeoutError)) or _refuses_every_command(error)


def _refuses_every_command(error: BaseException) -> bool:
    """BUSY: another client's script runs past `lua-time-limit`; MASTERDOWN: a replica cut off
    from its master, with `replica-serve-stale-data no`."""
    return isinstance(error, redis.exceptions.MasterDownError) or (
        isinstance(error, redis.ResponseError) and str(error).startswith("BUSY "))


def _raise_as_cannot_take_it(error: redis.ResponseError) -> None:
    """Raise a script's refusal by a full Redis (Redis 6 wraps it in the script's error) as
    OutOfMemoryError, and one by a Redis refusing writes as RedisRefusesWrites: the spool takes
    (or keeps) the transaction. Anything else is left to the caller."""
    if redis_is_full(error) and not isinstance(error, redis.exceptions.OutOfMemoryError):
        raise redis.exceptions.OutOfMemoryError(str(error)) from error
    if redis_refuses_writes(error) and not isinstance(error, RedisRefusesWrites):
        raise RedisRefusesWrites(str(error)) from error


def _parts(items: list[Any], size: int) -> list[list[Any]]:
    """`items` in runs of at most `size`: a chunk of large transactions (six bulk_creates of
    100,000 rows) made a DEL of 1.2 million keys, which Redis refuses beyond MAX_COMMAND_ARGS by
    resetting the connection, at every attempt: their statuses stayed 'applied' and every drain
    run failed on that chunk. (The usual chunk, a few hundred keys, is one run, not copied.)"""
    if len(items) <= size:
        return [items]
    return [items[i:i + size] for i in range(0, len(items), size)]


def _eval_pairs(target: Any, script: str, keys: SiteKeys, args: list[Any]) -> None:
    """`script` (on held_ids, ARGV the key prefix then pairs, each independent of the others:
    HOLD, UNHOLD, REVIVE, REVIVE_AHEAD) over `args`, in calls within MAX_COMMAND_ARGS: the holds
    of two failed bulk_creates of 300,000 rows were one call of 1.2 million arguments, which Redis
    refused by resetting the connection; in the acknowledgement's WATCH that read as the lease
    lost, and the batch stayed 'processing'. No pairs, no call."""
    for part in _parts(args, (MAX_COMMAND_ARGS - 6) // 2 * 2) if args else []:
        target.eval(script, 1, keys.held_ids, keys.prefix, *part)


def _row_pairs(rows_of: dict[str, set[str]]) -> list[str]:
    """The (row, tx id) pairs of `rows_of` (tx id -> its rows), flat, as _eval_pairs takes them."""
    return [x for tx_id, rows in rows_of.items() for row in sorted(rows) for x in (row, tx_id)]


def _glob_escaped(text: str) -> str:
    """`text` matched as it is by a Redis glob pattern (SCAN's MATCH)."""
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)


def _timeouts_of(raw: dict[bytes, bytes]) -> tuple[int | None, dict[str, int], int | None]:
    """The timeouts hash: (piece size or None, {id: count}, the drain's timeout_attempts or
    None: a key written before the drain saved them)."""
    piece, alone, attempts = None, {}, None
    for field_, value in raw.items():
        name = field_.decode("utf-8", "surrogateescape")
        try:
            number = int(value)
        except ValueError:  # not ours: ignored, rewritten at the next change
            continue
        if name == "piece" and number >= 1:
            piece = number
        elif name == "attempts" and number >= 1:
            attempts = number
        elif name.startswith("alone:"):
            alone[name.removeprefix("alone:")] = number
    return piece, alone, attempts


class LeaseLost(RuntimeError):
    """Another drain owns the site now; this one must stop touching the processing list."""


class ProcessingChanged(RuntimeError):
    """The processing list's oldest entry is not the batch's: Redis lost writes the drain made
    (restarted from an AOF without its last second, a failover to a replica behind it) and came
    back while the drain ran. Trimming the batch's count from the list would drop entries of
    another batch without their outcome (main committed them: their statuses and caches stayed
    for ever); nothing is acknowledged, and the list is claimed again whole, as after a crash."""


class HoldsChanged(RuntimeError):
    """A dead mark that dead-lettered one of the batch's transactions as blocked changed (an
    operator retried or discarded its holder) while main applied the batch: nothing is
    acknowledged, and the batch is claimed again from the processing list, as after a crash."""


@dataclass
class CacheWrites:
    """What ingest writes beside the queue entry, built by the ingest module."""
    created: list[tuple[str, str, str]] = field(default_factory=list)   # (model, id, record JSON)
    overlays: list[tuple[str, str, str]] = field(default_factory=list)  # (model, id, overlay JSON)
    # (model, id) of the creates whose key of the caller's ingest found free: the buffer script
    # writes nothing unless each still is (scripts.BUFFER; a generated key cannot be taken)
    checked: list[tuple[str, str]] = field(default_factory=list)


class KeyTaken(ValueError):
    """A create's key that ingest found free was taken before the transaction reached Redis:
    another script buffered a create of it in between. Nothing of the transaction was buffered.
    The line is the one ingest's own check gives."""

    def __init__(self, model: str, record_id: str):
        super().__init__(f"{model} {record_id} exists already (buffered or on the replica): update it, "
                         "or create it with another key")
        self.model, self.record_id = model, record_id


@dataclass
class Claim:
    entries: list[str]   # raw JSON, oldest first
    reclaimed: bool      # left over by a drain that did not acknowledge it


@dataclass
class Outcome:
    """What the drain decided for a claimed batch, written at acknowledgement."""
    statuses: list[tuple[str, str]] = field(default_factory=list)       # (tx_id, status JSON)
    applied_ids: list[str] = field(default_factory=list)
    retry: list[tuple[float, str]] = field(default_factory=list)         # (due epoch, tx JSON)
    dead: list[tuple[str | None, str]] = field(default_factory=list)     # (tx_id, failed JSON)
    hold: dict[str, str] = field(default_factory=dict)     # row -> its head as this batch leaves it (claim)
    claims: list[tuple[int, str, str]] = field(default_factory=list)  # (place in the batch, row, value), see claim
    places: dict[str, int] = field(default_factory=dict)  # tx id -> its place in the batch (its first entry)
    release: dict[str, set[str]] = field(default_factory=dict)  # tx -> its rows whose marks go, see unhold
    park: list[tuple[str, str, set[str], str]] = field(default_factory=list)  # (holder, tx id, its rows, tx JSON), see scripts.UNPARK
    unpark: list[str] = field(default_factory=list)  # applied or dead: those parked behind them come due
    forget: list[str] = field(default_factory=list)  # status keys to delete: copies of discarded ones, dropped
    cleanup: list[dict[str, list]] = field(default_factory=list)  # per transaction: {"c", "o", "t"}
    commit_lsn: int | None = None
    main_cluster: int | None = None  # main's system identifier: the cluster whose WAL holds the commit
    main_timeline: int | None = None  # ... and the timeline of that WAL main wrote it on
    main_started: int | None = None  # ... and when the server that wrote it started: see chunks_off_timeline
    claimed: int = 0  # entries of the batch in the processing list (the oldest there)
    oldest: str | None = None  # the batch's oldest entry: still the list's oldest at acknowledgement
    dead_marks: dict[str, str] = field(default_factory=dict)  # row -> the "!" mark read from held_ids that
    #                                          dead-lettered a transaction as blocked: checked at acknowledgement
    dead_queued: dict[str, str] = field(default_factory=dict)  # row -> the same, read from its queue
    # ids of entries left out as pushed twice that had waited (to retry, parked): a copy claimed ahead
    # of one (a processing list claimed again whole) is the one applied, and lets go of its rows
    waited: set[str] = field(default_factory=set)

    def claim(self, rows: set[str], value: str, head: bool = True) -> None:
        """`value` (a transaction id, "!" + id once dead) waits to write `rows`: the head of each
        row nobody holds (`hold`), else in the row's queue (`head` False: it knows the rows are
        another's). Sent in batch order (hold_pairs): a transaction decided on after the apply (it
        failed) comes ahead of a later one of the batch parked before the apply."""
        if head:
            claim_rows(self.hold, rows, value)
        place = self.places.get(value.removeprefix("!"), len(self.places))
        self.claims.extend((place, row, value) for row in sorted(rows))

    def hold_pairs(self) -> list[str]:
        """The claims as scripts.HOLD's (row, value) pairs, in batch order."""
        return [x for _, row, value in sorted(self.claims, key=lambda c: c[0]) for x in (row, value)]


# A transaction buffered again after a failover lost its commit (metadata key; the value: the
# timeline or cluster's line of the settlement). It was applied once before whatever holds its
# rows now (a newer update of a row of it waiting to retry, parked or dead): it goes first in the
# order of every row it uses (requeue_lost), or it applied after the newer update and undid it.
LOST_IN_FAILOVER = "lost_in_failover"
# Beside it, the rows it only reads, of those it holds (metadata key; a sorted list), as the models
# named them when it was buffered again: dead-lettered, it lets go of them, and the models file
# revised meanwhile (its model renamed or gone) names none of its rows, nor tells which it reads.
LOST_READS = "lost_in_failover_reads"


def _pending_entry(raw: bytes | None, lost_on: str = "", reads: set[str] | None = None) -> str | None:
    """A transaction's status key (its whole JSON, "applied") as an entry to claim again,
    "pending", marked LOST_IN_FAILOVER (`lost_on`) and, given `reads`, LOST_READS; None if it
    holds no transaction (gone, or another record). The steps stay as they were, so their digest
    is the one main recorded with the id."""
    if raw is None:
        return None
    text = raw.decode("utf-8", "surrogateescape")
    try:
        doc = json_codec.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("steps"), list):
        return None
    metadata = doc.get("metadata") or {}
    if isinstance(metadata, dict):
        doc["metadata"] = {**metadata, LOST_IN_FAILOVER: lost_on, **({LOST_READS: sorted(reads)} if reads is not None
                                                                     else {})}
    slot = text[len(STATUS_OPENING):STATUS_HEADER_LEN - 1].rstrip(" ")
    if (text.startswith(STATUS_OPENING) and text[STATUS_HEADER_LEN - 1:STATUS_HEADER_LEN] == ","
            and slot.endswith('"') and slot[:-1].isalpha()):  # our layout: the status in its slot
        return status_header("pending") + json_codec.dumps({k: v for k, v in doc.items() if k != "status"})[1:]
    doc["status"] = "pending"
    return json_codec.dumps(doc)


def replicated_status(transaction_id: str, commit_lsn: str) -> str:
    """What a status key holds once the replica has replayed the transaction: the rows are on
    the replica, so only this short record stays (for a week)."""
    return (status_header("replicated") + '"transaction_id":' + json_codec.dumps(transaction_id)
            + ',"commit_lsn":"' + commit_lsn + '"}')  # an LSN is hex digits and a slash


def overlay_entry(transaction_id: str, operation: str, data: dict[str, Any], step_id: str) -> str:
    """A read-buffer list entry; starts with its overlay_mark so cleanup can find its own."""
    return overlay_mark(transaction_id) + json.dumps(
        {"op": operation, "data": data, "step": step_id}, separators=(",", ":"))[1:]


def overlay_mark(transaction_id: str) -> str:
    return '{"tx":' + json.dumps(transaction_id) + ","


class BufferStore:
    def __init__(self, client: redis.Redis, site: str):
        self.redis = client
        self.keys = SiteKeys(site)
        self._claim = client.register_script(scripts.CLAIM)
        self._acquire = client.register_script(scripts.ACQUIRE)
        self._renew = client.register_script(scripts.RENEW)
        self._release = client.register_script(scripts.RELEASE)
        self._buffer = client.register_script(scripts.BUFFER)
        self._poller: tuple[Any, Any] | None = None  # (socket, poll object) of ingest's connection

    # --- ingest -----------------------------------------------------------------------------
    def buffer(self, transaction_id: str, tx_json: str, caches: CacheWrites) -> bool:
        """Queue entry, status and caches in one Lua call: atomic, one round trip, one command
        to pack and parse. Measured against a MULTI/EXEC of the same commands packed by
        hiredis: that cost Redis ~20 us less per call, but this thread 13-17 us more (seven
        replies to read), and four threads sharing a buffer (the GIL) a quarter of their throughput.
        A full Redis (maxmemory) refuses the script at its first write, so nothing is written,
        and this raises OutOfMemoryError; one that cannot persist, is a read-only replica or
        lacks the replicas of its `min-replicas-to-write` refuses it likewise, and this raises
        RedisRefusesWrites (the spool takes the transaction in both cases). A transaction
        already buffered (its status key exists) is left as it is: pushing one again is harmless.
        One with a checked key (caches.checked) that another transaction took since ingest's
        check raises KeyTaken, and nothing of it is written. False, nothing written, for a copy of
        a transaction `failed discard` dropped (SiteKeys.discarded): the spool's push says so."""
        args = [self.keys.prefix, transaction_id, tx_json, len(caches.created), len(caches.checked)]
        for pair in caches.checked:
            args.extend(pair)
        for triple in caches.created:
            args.extend(triple)
        for triple in caches.overlays:
            args.extend(triple)
        try:
            reply = self._call_buffer_script(args)
        except redis.ResponseError as error:
            _raise_as_cannot_take_it(error)
            raise
        if isinstance(reply, list):  # a checked key taken since: nothing was written
            raise KeyTaken(*(part.decode("utf-8", "surrogateescape") if isinstance(part, bytes) else str(part)
                             for part in reply))
        return reply != 2

    def remember_discarded(self, transaction_id: str, steps_digest: str, pipe: Any) -> None:
        """Queue on `pipe` (the discard's MULTI, which deletes the id's status key) the id's
        `discarded` key, for as long as a final status is kept: a copy pushed since is not buffered
        nor applied (see SiteKeys.discarded). Appended: a producer's id reused for other steps may
        be discarded twice within that time."""
        k = self.keys
        pipe.append(k.discarded(transaction_id), " " + steps_digest)
        pipe.expire(k.discarded(transaction_id), REPLICATED_STATUS_TTL_S)
        pipe.set(k.discarded_lately, "1", ex=REPLICATED_STATUS_TTL_S)

    def was_discarded(self, transaction_id: str) -> bool:
        """Did `failed discard` drop a transaction of this id within the week (SiteKeys.discarded)?"""
        return bool(self.redis.exists(self.keys.discarded(transaction_id)))

    def discarded_steps(self, transaction_ids: list[str]) -> dict[str, set[str]]:
        """By id, the digests of the steps `failed discard` dropped under these ids (see
        remember_discarded); {} after one EXISTS where no discard was made for a week."""
        if not transaction_ids or not self.redis.exists(self.keys.discarded_lately):
            return {}
        values = [v for part in _parts(transaction_ids, MAX_COMMAND_ARGS - 1)
                  for v in self.redis.mget([self.keys.discarded(tx_id) for tx_id in part])]
        return {tx_id: set(v.decode().split()) for tx_id, v in zip(transaction_ids, values) if v}

    def set_aside_spooled(self, transaction_id: str | None, letter: str, line_digest: str) -> bool:
        """Dead-letter a spooled line the buffer script cannot take (see spool.py), with the status
        "failed" for a usable id that has none; False if it was already (scripts.SET_ASIDE_SPOOLED).
        Redis full or refusing writes raises as `buffer` does: the push stops, and the line waits."""
        try:
            return bool(self.redis.eval(scripts.SET_ASIDE_SPOOLED, 0, self.keys.prefix, transaction_id or "", letter,
                                        line_digest))
        except redis.ResponseError as error:
            _raise_as_cannot_take_it(error)
            raise

    def _call_buffer_script(self, args: list[Any]) -> Any:
        """The script call on the connection itself, packed by hiredis: redis-py's per-call
        machinery (retry wrapper, option filtering, reply callbacks) cost 20-30 us here, a tenth
        of an ingest, and its packer, in Python, 4 us more. Errors are the same: a lost
        connection raises ConnectionError (the spool takes the transaction)."""
        conn = self.redis.connection  # a single-connection client's own (ingest keeps one per thread)
        if conn is None:
            return self._buffer(args=args)
        try:
            conn.send_packed_command([hiredis.pack_command(("EVALSHA", self._buffer.sha, 0, *args))])
            try:
                self._await_reply(conn)
            except BaseException:  # a KeyboardInterrupt, say: the reply is still to come, and the
                conn.disconnect()  # next call would read it as its own (redis-py's reads do this too)
                raise
            return conn.read_response()
        except redis.exceptions.NoScriptError:  # a restarted Redis: the Script object loads it again
            return self._buffer(args=args)

    def _await_reply(self, conn: Any) -> None:
        """Poll for the reply for up to REPLY_SPIN_S, yielding the CPU between polls, before the
        blocking read: a thread that sleeps on the socket pays a wake-up when the reply comes
        (a loopback PING took 64-73 us blocking, 23-27 us polled, on this 2-core VM). Yielding
        lets anything else runnable on this core, Redis included, go first."""
        sock = conn._sock  # redis-py's socket of this connection (set once it has connected)
        if sock is None or REPLY_SPIN_S <= 0:
            return
        if self._poller is None or self._poller[0] is not sock:  # a new connection after a reconnect
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            self._poller = (sock, poller)
        poll = self._poller[1].poll
        give_up = time.perf_counter() + REPLY_SPIN_S
        while not poll(0) and time.perf_counter() < give_up:
            os.sched_yield()

    def status_json(self, transaction_id: str) -> str | None:
        raw = self.redis.get(self.keys.transaction(transaction_id))
        return raw.decode() if isinstance(raw, bytes) else raw

    def require_redis(self, at_least: tuple[int, int] = MINIMUM_REDIS) -> None:
        """Refuse an old Redis with one clear line, not a Lua error in the middle of a batch."""
        version = str(self.redis.info("server").get("redis_version", "0"))
        found = tuple(int(part) for part in (version.split(".") + ["0", "0"])[:2] if part.isdigit())
        if found < at_least:
            raise ConfigError(f"the site's Redis is {version}; obs-pipeline needs Redis "
                              f"{at_least[0]}.{at_least[1]} or newer (the claim uses LMOVE)")

    # --- lease ------------------------------------------------------------------------------
    def acquire_lease(self, ttl_s: float, owner: str = "") -> str | None:
        """A new token if the lease was free, or held by a drain of the same `owner` that has
        ended (its tokens are `owner/...`): a Dagster run's attempt that lost Redis could not
        release it, and the run's next attempt waited out its TTL. A drain of that owner must
        not still be running: each owner's drains run one after another (the run's attempts,
        `obs-pipeline drain`'s runs in its one process)."""
        prefix = f"{owner}/" if owner else ""
        token = prefix + uuid.uuid4().hex
        return token if self._acquire(keys=[self.keys.lease], args=[token, int(ttl_s * 1000), prefix]) else None

    def renew_lease(self, token: str, ttl_s: float) -> bool:
        return bool(self._renew(keys=[self.keys.lease], args=[token, int(ttl_s * 1000)]))

    def release_lease(self, token: str) -> None:
        self._release(keys=[self.keys.lease], args=[token])

    def lease_left_s(self) -> float | None:
        """Seconds until the drain lease expires unless its holder renews it; None when free."""
        left_ms = self.redis.pttl(self.keys.lease)  # -2: no such key
        return None if left_ms == -2 else max(left_ms, 0) / 1000

    def processing_ids(self, chunk: int = 1000) -> set[str]:
        """The transaction ids in the processing list (a batch claimed, maybe committed on main
        and not acknowledged: a drain that reclaims it skips what obs_pipeline_applied records),
        read `chunk` entries per call; an entry without a usable id is skipped."""
        ids: set[str] = set()
        start = 0
        while True:
            entries = self.redis.lrange(self.keys.processing, start, start + chunk - 1)
            start += chunk
            ids.update(filter(None, map(entry_id, entries)))
            if len(entries) < chunk:
                return ids

    def retry_ids(self) -> set[str]:
        """The transaction ids in the retry set: waiting for their next attempt, or parked behind
        a transaction that fails (scored +inf). The drain claims them from there again, never
        through the buffer: a copy of an applied transaction held there must still find its
        record (a prune keeps it). A scan returns every member there for its whole length."""
        return set(filter(None, map(entry_id, self.redis.zscan_iter(self.keys.retry, count=1000,
                                                                    score_cast_func=lambda _: None))))

    def _awaiting_records(self, start: int = 0, stop: int = -1) -> list[tuple[dict[str, Any], bytes]]:
        """The chunk records of `awaiting_replication`'s members `start` to `stop` (ZRANGE's
        indexes: commit and batch order), parsed, each with its member (what ZREM takes)."""
        return [(json_codec.loads(member), member)
                for member in self.redis.zrange(self.keys.awaiting_replication, start, stop)]

    def awaiting_ids(self) -> set[str]:
        """The transaction ids of the committed chunks awaiting the replica: should main fail over
        before it has them, the drain asks the new main for these (Drain._settle_failover), and
        buffers again those it does not hold; a prune must keep their records. One read of the
        whole set: read in pages, a chunk the drain cleaned in between would move one not yet
        read back into a page already read, and it would be missed."""
        return {tx_id for record, _ in self._awaiting_records() for tx_id in record.get("t") or ()}

    def lease_holder(self) -> str | None:
        raw = self.redis.get(self.keys.lease)
        return raw.decode() if raw else None

    def note_drain_waiting(self, why: str, wait_s: float) -> None:
        """A drain run that let go of the lease to wait `wait_s` for its next attempt (a Dagster op
        retry) says so, for `status`, which said `idle` all through an outage of main."""
        self._note(self.keys.drain_waiting, why, wait_s)

    def drain_waiting(self) -> tuple[str, float] | None:
        """The note above and the seconds until that attempt (0 once due); None when none waits."""
        noted = self._noted(self.keys.drain_waiting)
        return (noted[0].decode(errors="replace"), noted[1]) if noted else None

    def note_drain_paused(self, why: str, wait_s: float, until_main_answers: bool) -> None:
        """The sensor, pausing after a failed drain run, says so for `status`, which said `idle`
        (the pause is Dagster's, which status does not read); `until_main_answers`: main
        answering ends it (the run failed with main out of reach)."""
        self._note(self.keys.drain_paused, json.dumps({"why": why, "until_main_answers": until_main_answers}), wait_s)

    def drain_paused(self) -> tuple[str, float, bool] | None:
        """The note above, the seconds left of the pause (0 once over) and whether main answering
        ends it; None when none is noted (or it is unreadable: a note, not a record)."""
        noted = self._noted(self.keys.drain_paused)
        if noted is None:
            return None
        try:
            note = json.loads(noted[0])
            return str(note["why"]), noted[1], bool(note["until_main_answers"])
        except (TypeError, ValueError, KeyError):
            return None

    def _note(self, key: str, value: str, wait_s: float) -> None:
        """A note for `status` that outlives the wait it tells of by DRAIN_WAITING_MARGIN_S."""
        self.redis.set(key, value, px=max(1, round((wait_s + DRAIN_WAITING_MARGIN_S) * 1000)))

    def _noted(self, key: str) -> tuple[bytes, float] | None:
        """A note (_note) and the seconds left of its wait (0 once over), in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            raw, left_ms = pipe.get(key).pttl(key).execute()
        return (raw, max(0.0, left_ms / 1000 - DRAIN_WAITING_MARGIN_S)) if raw is not None else None

    def clear_drain_notes(self) -> None:
        """A drain run starts (or the sensor launches one): neither an earlier attempt's wait nor
        the sensor's pause holds any longer."""
        self.redis.delete(self.keys.drain_waiting, self.keys.drain_paused)

    # --- drain ------------------------------------------------------------------------------
    def remember_link(self, round_trip_s: float, apply_s_per_transaction: float | None,
                      parse_s_per_transaction: float | None = None, round_trips: int | None = None) -> None:
        """What a full batch showed of main (Drain._resize), for the next run's first claims: main's
        round trip, its time per transaction, and where main is far the drain's own time to parse
        a claimed transaction and the round trips a batch took."""
        fields = {"round_trip_s": repr(round_trip_s)}
        for name, value in (("apply_s_per_transaction", apply_s_per_transaction),
                            ("parse_s_per_transaction", parse_s_per_transaction), ("round_trips", round_trips)):
            if value is not None:
                fields[name] = repr(value)
        self.redis.hset(self.keys.link, mapping=fields)

    def last_link(self) -> Link | None:
        """The link as the last run left it (remember_link); None if unknown or unreadable (a
        hand-edited key must not stop the drain: it only sizes claims). A figure a run of an
        earlier version did not leave, or one unreadable, is None."""
        figures = []
        for value in self.redis.hmget(self.keys.link, *Link._fields):
            try:
                number = float(value) if value is not None else None
            except ValueError:
                number = math.nan
            figures.append(number if number is None or 0 <= number < math.inf else math.nan)
        round_trip, cost, parse, trips = figures
        if round_trip is None or math.isnan(round_trip) or (cost is not None and math.isnan(cost)):
            return None
        return Link(round_trip, cost, None if parse is None or math.isnan(parse) else parse,
                    None if trips is None or math.isnan(trips) else int(trips))

    def backlog(self) -> int:
        """Transactions waiting to be claimed (the buffer list)."""
        return self.redis.llen(self.keys.buffer)

    def claim(self, token: str, batch_size: int, after_unacknowledged: bool = False) -> Claim:
        """Up to `batch_size` entries, oldest first, in CLAIM_CHUNK-entry Lua calls, one round
        trip each (one call for a whole batch held Redis long enough to stall ingest; calls sent
        together would run back to back). A processing list left by a drain that did not
        acknowledge comes back whole, first. `after_unacknowledged`: this drain's previous batch
        is still in the processing list (being applied); claim the next one."""
        entries, reclaimed = self._claim_chunk(token, min(batch_size, CLAIM_CHUNK),
                                               "next" if after_unacknowledged else "first")
        last = entries
        while not reclaimed and len(last) == CLAIM_CHUNK and len(entries) < batch_size:  # a full call: more may wait
            last, _ = self._claim_chunk(token, min(CLAIM_CHUNK, batch_size - len(entries)), "extend")
            entries.extend(last)
        return Claim(entries=entries, reclaimed=reclaimed)

    def _claim_chunk(self, token: str, count: int, mode: str) -> tuple[list[str], bool]:
        k = self.keys
        try:
            reclaimed, entries = self._claim(keys=[k.lease, k.processing, k.buffer, k.retry, k.last_claim],
                                             args=[token, count, time.time(), mode, uuid.uuid4().hex])
        except redis.ResponseError as exc:
            if "LEASE_LOST" in str(exc):
                raise LeaseLost(f"the drain lease of site {k.site} is no longer ours") from None
            raise
        # surrogateescape: bytes that are not UTF-8 survive to be dead-lettered, not crash the drain
        entries = [e.decode("utf-8", "surrogateescape") if isinstance(e, bytes) else e for e in entries]
        if reclaimed:  # LRANGE of processing lists newest first
            entries.reverse()
        return entries, bool(reclaimed)

    def timeouts(self) -> tuple[int | None, dict[str, int]]:
        """What the drain keeps after statement timeouts on main (see SiteKeys.timeouts): the
        piece size (None: batches whole) and, per transaction id, its timeouts alone in a row."""
        piece, alone, _ = _timeouts_of(self.redis.hgetall(self.keys.timeouts))
        return piece, alone

    def save_timeouts(self, piece: int | None, alone: dict[str, int], attempts: int | None = None) -> None:
        """Replace what `timeouts` reads; nothing to keep deletes the key. `attempts`, the drain's
        timeout_attempts, is kept beside them for `status` (a Dagster run config may set it)."""
        mapping: dict[str, int] = {f"alone:{tx_id}": count for tx_id, count in alone.items()}
        if piece is not None:
            mapping["piece"] = piece
        if mapping and attempts is not None:
            mapping["attempts"] = attempts
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.timeouts)
            if mapping:
                pipe.hset(self.keys.timeouts, mapping=mapping)
            pipe.execute()

    def set_status(self, transaction_ids: list[str], status: str) -> list[str]:
        """Rewrite statuses in place, STATUS_CHUNK per Lua call so that ingest never waits long
        behind one; returns the ids that have no status key. The calls share one round trip:
        Redis runs back to back those that arrive in one read of the connection (16 kB), then
        serves other clients, and a call of 200 ids is about 10 kB, so ingest waits behind two
        at most. The body travels with each call (EVAL): a restarted Redis never says NOSCRIPT."""
        args = [self.keys.prefix, status, status_slot(status), STATUS_OPENING]
        pipe = self.redis.pipeline(transaction=False)
        for part in range(0, len(transaction_ids), STATUS_CHUNK):
            pipe.eval(scripts.SET_STATUS, 0, *args, *transaction_ids[part:part + STATUS_CHUNK])
        return [m.decode() if isinstance(m, bytes) else m for missing in pipe.execute() for m in missing]

    def mark_processing(self, transaction_ids: list[str], full_json: Callable[[str], str]) -> None:
        """Status "processing": in place where the status key exists, else the full JSON."""
        self.mark_status(transaction_ids, "processing", full_json)

    def mark_status(self, transaction_ids: list[str], status: str, full_json: Callable[[str], str]) -> None:
        """`status` in place where the status key exists, else the full JSON (`full_json` giving
        it with that status): a producer's entry pushed without a status key gets one."""
        missing = self.set_status(transaction_ids, status)
        if missing:
            pipe = self.redis.pipeline(transaction=False)
            for tx_id in missing:
                pipe.set(self.keys.transaction(tx_id), full_json(tx_id))
            pipe.execute()

    def acknowledge(self, token: str, outcome: Outcome) -> None:
        """After main committed: drop the batch from the processing list (its oldest
        `outcome.claimed` entries; a prefetched next batch stays) and record every outcome,
        atomically, but only while this drain still holds the lease (else another drain owns
        the batch). Statuses become "applied" separately (`set_status`), unless the replica
        has replayed the commit already and the cleanup makes them "replicated". What was
        parked behind a holder applied or dead-lettered here comes due in the same MULTI, or
        the first UNPARK_CHUNK of it, the rest right after (finish_unparking)."""
        k = self.keys
        rows = sorted(outcome.dead_marks)
        queued = sorted(outcome.dead_queued)
        with self.redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(*([k.lease, k.held_ids] if rows else [k.lease]), *map(k.waiting, queued))
                held = pipe.get(k.lease)
                if (held.decode() if held else None) != token:
                    raise LeaseLost(f"the drain lease of site {k.site} expired before acknowledgement")
                if outcome.oldest is not None:  # the LTRIM below drops the list's oldest `claimed` entries
                    oldest = pipe.lindex(k.processing, -1)
                    if oldest is None or oldest.decode("utf-8", "surrogateescape") != outcome.oldest:
                        raise ProcessingChanged(f"the processing list of site {k.site} is not the one this drain "
                                                "claimed (Redis lost its last writes?): claiming it again")
                # blocked by a dead transaction that an operator has requeued (or discarded) since:
                # acknowledged, it would stay dead-lettered behind one that applies
                if rows and [v.decode() if v else None for v in pipe.hmget(k.held_ids, rows)] != [
                        outcome.dead_marks[row] for row in rows] or any(
                        pipe.zscore(k.waiting(row), outcome.dead_queued[row]) is None for row in queued):
                    raise HoldsChanged(f"a dead letter of site {k.site} was retried or discarded while main "
                                       "applied transactions it blocks: claiming the batch again")
                pipe.multi()
                pipe.ltrim(k.processing, 0, -outcome.claimed - 1)
                applied_ids = outcome.applied_ids
                for tx_id in outcome.forget:  # (before the statuses: one of them may be another's of the id)
                    pipe.delete(k.transaction(tx_id))
                statuses = [x for pair in outcome.statuses for x in pair]
                for part in range(0, len(statuses), 2 * STATUS_CHUNK):  # never over a committed one
                    pipe.eval(scripts.SET_UNLESS_COMMITTED, 0, k.prefix, *statuses[part:part + 2 * STATUS_CHUNK])
                self.unhold(outcome.release, pipe)
                if outcome.claims:
                    _eval_pairs(pipe, scripts.HOLD, k, outcome.hold_pairs())
                for due, tx_json in outcome.retry:
                    pipe.zadd(k.retry, {tx_json: due})
                for holder, tx_id, rows, tx_json in outcome.park:  # parked before any release of this batch
                    pipe.zadd(k.retry, {tx_json: "+inf"})
                    pipe.rpush(k.parked(holder), json.dumps([tx_json, tx_id, sorted(rows)]))
                for _, failed_json in outcome.dead:
                    pipe.lpush(k.failed, failed_json)
                if outcome.commit_lsn is not None and outcome.cleanup:
                    now = time.time()
                    for part in range(0, len(outcome.cleanup), CLEANUP_CHUNK):
                        chunk = outcome.cleanup[part:part + CLEANUP_CHUNK]
                        # Chunks of one batch share a score, and a sorted set orders equal scores by
                        # the member's bytes: "n" first keeps them in batch order, so a record's
                        # create is never cleaned after an update of it (a reader in between would
                        # see the buffered create without that update).
                        record = {"n": f"{part:09d}"}
                        record.update({key: [x for tx in chunk for x in tx[key]] for key in ("c", "o", "t")})
                        record.update(at=now, lsn=outcome.commit_lsn)
                        if outcome.main_timeline is not None:  # which WAL holds it: see requeue_lost
                            record["tl"] = outcome.main_timeline
                        if outcome.main_cluster is not None:  # ... of which cluster: see chunks_off_timeline
                            record["cl"] = outcome.main_cluster
                        if outcome.main_started is not None:  # ... by which server: see chunks_off_timeline
                            record["st"] = outcome.main_started
                        pipe.zadd(k.awaiting_replication,
                                  {json_codec.dumps(record): outcome.commit_lsn})
                # last_batch_at: every batch a drain ran, for the health report's last_run (a drain whose
                # every transaction was dead-lettered read "last run never")
                at = time.time()
                pipe.hset(k.stats, mapping={"last_batch_at": at, **({"last_applied_at": at} if applied_ids else {})})
                if outcome.commit_lsn is not None and outcome.main_cluster is not None:  # with the chunks it names
                    pipe.hset(k.stats, MAIN_CLUSTER_FIELD, outcome.main_cluster)
                    if outcome.main_timeline is not None:
                        pipe.hset(k.stats, MAIN_TIMELINE_FIELD, outcome.main_timeline)
                if applied_ids:
                    pipe.hincrby(k.stats, "applied_total", len(applied_ids))
                    pipe.publish(k.events, json_codec.dumps({"event": "applied", "transaction_ids": applied_ids}))
                if outcome.dead:
                    pipe.hincrby(k.stats, "dead_lettered_total", len(outcome.dead))
                if outcome.unpark:  # last, its reply last: what it left to make due
                    self._unpark_step(pipe, outcome.unpark)
                replies = pipe.execute()
                unparking = replies[-1] if outcome.unpark else 0
            except redis.WatchError as error:
                lost = lost_while_watching(error)
                if lost is not None:  # as any Redis error of a step: the run ends, and the next claims
                    raise lost from None  # what the processing list holds (the EXEC may have run, or not)
                if (rows or queued) and self.lease_holder() == token:
                    raise HoldsChanged(f"the holds of site {k.site} changed during acknowledgement: "
                                       "claiming the batch again") from None
                raise LeaseLost(f"the drain lease of site {k.site} changed before acknowledgement") from None
        if unparking:
            self.finish_unparking()

    def finish_unparking(self) -> None:
        """Make due, UNPARK_CHUNK per call, what the acknowledgement of its holders left parked
        (scripts.UNPARK; nothing to do costs one call). The drain calls it after each such
        acknowledgement and as a run starts (one that died in between left the rest queued),
        so it is done before the drain decides what its next batch waits behind."""
        while self._unpark_step(self.redis, []):
            pass

    def _unpark_step(self, target: Any, holders: list[str]) -> Any:
        """One UNPARK call on `target` (a pipeline queues it), `holders` queued first."""
        k = self.keys
        return target.eval(scripts.UNPARK, 4, k.retry, k.held_ids, k.unparking, k.unparking_score,
                           k.prefix, time.time(), UNPARK_CHUNK, *holders)

    def clean_replicated(self, replay_lsn: int, replica_lacks: Callable[[list[str]], set[str] | None] | None = None
                         ) -> tuple[list[str], list[tuple[dict[str, Any], bytes]]]:
        """Clean the caches of every committed chunk the replica has replayed (score <= replay
        LSN), in commit and batch order. Each chunk is a MULTI/EXEC of its own, so ingest never
        waits long behind a cleanup; the chunks of one pass share a round trip. `replica_lacks`
        (ReplicaDatabase.missing_among) says which of a pass's ids the replica lacks (None: it
        did not answer): a chunk is cleaned only with none of its own lacking, and none after the
        first with (a replay past a commit's position lacks it where the replica replays another
        server's WAL; the caches are then all the site has of it). Returns the ids that became
        "replicated", and the chunks (record, member) the replica passed without."""
        k = self.keys
        cleaned: list[str] = []
        while True:
            due = self.redis.zrangebyscore(k.awaiting_replication, "-inf", replay_lsn, start=0, num=CLEAN_PASS)
            chunks = [(json_codec.loads(member), member) for member in due]
            unseen: list[tuple[dict[str, Any], bytes]] = []
            if replica_lacks is not None and chunks:
                ids = [tx_id for record, _ in chunks for tx_id in record.get("t") or ()]
                lacking = replica_lacks(ids) if ids else set()
                if lacking is None:
                    return cleaned, []
                unseen = [chunk for chunk in chunks if not lacking.isdisjoint(chunk[0].get("t") or ())]
                if unseen:
                    chunks = chunks[:chunks.index(unseen[0])]
            for (record, _), done in zip(chunks, self._clean_chunks(chunks)):
                if done:
                    cleaned.extend(record["t"])
            if unseen or len(due) < CLEAN_PASS:
                return cleaned, unseen

    def forget(self, cleanup: dict[str, list], pipe: Any) -> None:
        """Queue on `pipe` (in the discard's MULTI) the removal of a discarded transaction's
        caches, own overlays and index entries, the way a replicated chunk is cleaned, without
        its status, counter or event: nothing of it stays visible."""
        for command in self._chunk_commands(cleanup, None):
            pipe.execute_command(*command)

    def _clean_chunks(self, chunks: list[tuple[dict[str, Any], bytes | None]]) -> list[bool]:
        """Clean chunks ({"c": [[model, id]...] created, "o": [[model, id, tx]...] overlaid, "t":
        [tx...], "lsn"}), each in one MULTI/EXEC, all in one round trip. With its record in
        `awaiting_replication` a chunk's statuses become "replicated" and the record goes; without
        (None: a discarded transaction) only its caches go. True per chunk whose record this
        call removed."""
        if not chunks:
            return []
        commands: list[tuple] = []  # MULTI/EXEC per chunk, spelled out
        exec_at = []  # where each chunk's EXEC reply (the list of its commands' replies) will be
        for record, member in chunks:
            commands.append(("MULTI",))
            commands.extend(self._chunk_commands(record, member))
            commands.append(("EXEC",))
            exec_at.append(len(commands) - 1)
        replies = self._send_all(commands)
        done = []
        for (_, member), reply in zip(chunks, (replies[i] for i in exec_at)):
            failed = next((r for r in reply if isinstance(r, Exception)), None)
            if failed is not None:
                raise failed
            done.append(member is not None and reply[-1] == 1)
        return done

    def _chunk_commands(self, record: dict[str, Any], member: bytes | None) -> list[tuple]:
        """The commands of one chunk's cleanup, to run inside a MULTI (see _clean_chunks)."""
        k = self.keys
        commands: list[tuple] = []
        created = record.get("c") or ()
        if created:
            keys = [key for model, rid in created for key in (k.buffered(model, rid), k.cached_id(model, rid))]
            for part in _parts(keys, MAX_COMMAND_ARGS - 1):
                commands.append(("DEL", *part))
            by_model: dict[str, list[str]] = {}
            for model, rid in created:
                by_model.setdefault(model, []).append(rid)
            for model, ids in by_model.items():
                for part in _parts(ids, MAX_COMMAND_ARGS - 2):
                    commands.append(("SREM", k.model_index(model), *part))
        if record.get("o"):
            marks = [part for model, rid, tx_id in record["o"] for part in (model, rid, overlay_mark(tx_id))]
            for part in _parts(marks, (MAX_COMMAND_ARGS - 4) // 3 * 3):  # whole (model, id, mark) triples
                commands.append(("EVAL", scripts.CLEAN_OVERLAYS, 0, k.prefix, *part))
        if member is not None:
            ids = record.get("t") or []
            lsn = int_to_lsn(int(record.get("lsn") or 0))
            commands.extend(("SET", k.transaction(tx_id), replicated_status(tx_id, lsn),
                             "EX", REPLICATED_STATUS_TTL_S) for tx_id in ids)
            event = json_codec.dumps({"event": "replicated", "transaction_ids": ids})
            commands.append(("EVAL", scripts.FINISH_CLEANUP, 3, k.awaiting_replication, k.stats, k.events,
                             member, len(ids), event, f"{int(record.get('lsn') or 0):016X}"))
        return commands

    def _send_all(self, commands: list[tuple]) -> list[Any]:
        """The replies of `commands`, sent in one write packed by hiredis, read in order. redis-py's
        pipeline packs each argument in Python and runs a callback per reply; for the cleanup's
        dozen arguments per transaction that was a sixth of the drain's main thread (py-spy). A
        lost connection goes the pipeline's way, with its reconnect and retry: every command
        sent here may run twice (deletes, SETs of the final status, a FINISH that removes its
        record once)."""
        pool = self.redis.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([b"".join([hiredis.pack_command(c) for c in commands])])
            return [conn.read_response() for _ in commands]
        except (redis.ConnectionError, redis.TimeoutError):
            conn.disconnect()
            pipe = self.redis.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return pipe.execute()
        except BaseException:
            conn.disconnect()  # replies may be left unread on it
            raise
        finally:
            pool.release(conn)

    def main_cluster(self) -> int | None:
        """The system identifier of the main whose commits await the replica, as the last
        acknowledgement of a commit recorded it; None if none did (a drain of an earlier version)."""
        value = self.redis.hget(self.keys.stats, MAIN_CLUSTER_FIELD)
        return int(value) if value is not None else None

    def main_timeline(self) -> int | None:
        """The timeline main wrote the last commit on that an acknowledgement recorded; None if
        none did (a drain of an earlier version)."""
        value = self.redis.hget(self.keys.stats, MAIN_TIMELINE_FIELD)
        return int(value) if value is not None else None

    def chunks_off_timeline(self, timeline: int, cluster: int | None = None,
                            upto: int | None = None, started: int | None = None) -> list[tuple[dict[str, Any], bytes]]:
        """The committed chunks awaiting the replica that were committed on another timeline than
        `timeline`, or (`cluster` given) by another cluster than `cluster` (main replaced by a new
        initdb restored from a dump: its timeline may be the same, its LSNs pass theirs without
        them), or (`started` given) by a server started at another time than main's ("st": two
        standbys of one primary promoted in turn both write timeline 2 of its cluster, the second
        without what the first committed; or main restarted, which loses none of them), as
        (record, member), in commit and batch order. A chunk without "tl" or "cl", acknowledged
        by an earlier version, is on the one `stats` recorded; with none recorded either, its
        cluster is unknown and not compared; nor is its server without "st". `upto`: only those of
        commit LSN up to it (the replica's replay: the health report's, which need not read every
        waiting one)."""
        recorded = self.main_timeline()
        recorded_cluster = self.main_cluster() if cluster is not None else None
        found: list[tuple[dict[str, Any], bytes]] = []
        start = 0
        while True:
            chunks = (self._awaiting_records(start, start + CLEAN_PASS * 10 - 1) if upto is None else
                      [(json_codec.loads(member), member) for member in self.redis.zrangebyscore(
                          self.keys.awaiting_replication, "-inf", upto, start=start, num=CLEAN_PASS * 10)])
            start += len(chunks)
            found.extend(chunk for chunk in chunks if chunk[0].get("tl", recorded) != timeline
                         or cluster is not None and chunk[0].get("cl", recorded_cluster) not in (None, cluster)
                         or started is not None and chunk[0].get("st") not in (None, started))
            if len(chunks) < CLEAN_PASS * 10:
                return found

    def requeue_lost(self, token: str, timeline: int, lost: list[tuple[dict[str, Any], bytes]],
                     kept: list[tuple[dict[str, Any], bytes]],
                     cluster: int | None = None, lsn_of: dict[bytes, int] | None = None,
                     rows_of: Callable[[str], tuple[set[str], set[str]]] | None = None,
                     started: int | None = None) -> tuple[list[str], list[str]]:
        """After main failed over to a timeline (or moved to a `cluster`) that lacks the commits of
        the `lost` chunks: put their transactions back at the oldest end of the processing list, in
        their order (claimed again first, before whatever waits there or in the buffer, as after a
        crash; an id main has applied after all is skipped there), statuses "pending", and drop
        their records without cleaning their caches (reads keep showing them until the new commit
        is replayed). Each goes first in the order of the rows it uses (`rows_of` its status key's
        JSON: the rows it writes, and those it reads; scripts.HOLD_FIRST), ahead of whatever waits
        there now: it was applied before any of them began to wait, and it holds them until it is
        applied (or dead-lettered); those it only reads are recorded in it (LOST_READS). The `kept`
        chunks (main has their ids) are recorded as on `timeline` (and `cluster`, recorded in
        `stats` too, and main's server, `started`), at the LSN `lsn_of` gives a member, if it does
        (one of another cluster's WAL). One MULTI, fenced by the lease, so a crash leaves all or
        nothing of it. Returns (ids requeued, ids whose transaction JSON is gone, which cannot be)."""
        k = self.keys
        ids = list(dict.fromkeys(tx_id for record, _ in lost for tx_id in record.get("t") or ()))
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(k.lease, k.awaiting_replication, *(k.transaction(i) for i in ids))
                    held = pipe.get(k.lease)
                    if (held.decode() if held else None) != token:
                        raise LeaseLost(f"the drain lease of site {k.site} is no longer ours")
                    entries: dict[str, str] = {}  # id -> its entry, in order
                    used: dict[str, set[str]] = {}  # id -> the rows it writes or reads
                    gone = []
                    raws = [raw for part in _parts(ids, MAX_COMMAND_ARGS - 1)
                            for raw in pipe.mget([k.transaction(i) for i in part])] if ids else []
                    for tx_id, raw in zip(ids, raws):
                        written, read = rows_of(raw.decode("utf-8", "surrogateescape")) if rows_of and raw else (
                            set(), None)
                        entry = _pending_entry(raw, f"timeline {timeline}" + (f" of cluster {cluster}"
                                                                               if cluster is not None else ""),
                                               read - written if read is not None else None)
                        if entry is None:
                            gone.append(tx_id)
                        else:
                            entries[tx_id], used[tx_id] = entry, written | (read or set())
                    pipe.multi()
                    for _, member in lost + kept:
                        pipe.zrem(k.awaiting_replication, member)
                    on = {"tl": timeline, **({"cl": cluster} if cluster is not None else {}),
                          **({"st": started} if started is not None else {})}
                    for record, member in kept:
                        lsn = (lsn_of or {}).get(member, record["lsn"])
                        pipe.zadd(k.awaiting_replication, {json_codec.dumps({**record, **on, "lsn": lsn}): lsn})
                    if entries:  # the first of them rightmost: the oldest end
                        pipe.rpush(k.processing, *reversed(entries.values()))
                        if rows_of is not None:  # the newest first: the oldest ends each row's head
                            _eval_pairs(pipe, scripts.HOLD_FIRST, k, _row_pairs({i: used[i] for i in reversed(entries)}))
                        for tx_id, entry in entries.items():
                            pipe.set(k.transaction(tx_id), entry)
                        # counted again when applied again
                        pipe.hincrby(k.stats, "applied_total", -len(entries))
                        pipe.hincrby(k.stats, "lost_in_failover_total", len(entries))
                    pipe.hset(k.stats, MAIN_TIMELINE_FIELD, timeline)
                    if cluster is not None:
                        pipe.hset(k.stats, MAIN_CLUSTER_FIELD, cluster)
                    pipe.execute()
                    return list(entries), gone
                except redis.WatchError as error:
                    lost_link = lost_while_watching(error)
                    if lost_link is not None:
                        raise lost_link from None
                    continue  # a status or a record changed meanwhile: read them again

    def newest_committed_ids(self) -> list[str]:
        """The transaction ids of the newest batch that awaits the replica's replay (its chunks
        share its commit LSN, their score)."""
        k = self.keys
        newest = self.redis.zrange(k.awaiting_replication, -1, -1, withscores=True)
        if not newest:
            return []
        score = newest[0][1]
        return [tx_id for member in self.redis.zrangebyscore(k.awaiting_replication, score, score)
                for tx_id in json_codec.loads(member).get("t") or ()]

    def awaiting_replication(self, after: int | None = None) -> tuple[int, int | None]:
        """(batches not yet replayed, lowest commit LSN among them); `after`: the replica's replay
        LSN, to leave out those it has replayed (they wait only for a drain to clean them)."""
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        if after is None:
            pipe.zcard(k.awaiting_replication)
            pipe.zrange(k.awaiting_replication, 0, 0, withscores=True)
        else:
            pipe.zcount(k.awaiting_replication, f"({after}", "+inf")
            pipe.zrangebyscore(k.awaiting_replication, f"({after}", "+inf", start=0, num=1, withscores=True)
        count, lowest = pipe.execute()
        return count, int(lowest[0][1]) if lowest else None

    # --- health -----------------------------------------------------------------------------
    def depths(self) -> dict[str, Any]:
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(k.buffer)
        pipe.llen(k.processing)
        pipe.llen(k.failed)
        pipe.zcard(k.retry)
        pipe.zcard(k.awaiting_replication)
        pipe.lindex(k.buffer, -1)
        pipe.hgetall(k.stats)
        pipe.zrange(k.retry, 0, 0, withscores=True)
        pipe.hgetall(k.timeouts)
        buffer, processing, failed, retry, awaiting, oldest, stats, first_retry, timeouts = pipe.execute()
        return {
            "buffer": buffer, "processing": processing, "failed": failed, "retry": retry,
            "awaiting_replication": awaiting, "oldest_entry": oldest,
            "first_retry_due": first_retry[0][1] if first_retry else None,  # (epoch seconds)
            "stats": {a.decode(): b.decode() for a, b in stats.items()},
            "timeouts": _timeouts_of(timeouts),  # as `timeouts()` reads it, in this round trip
        }

    def holds_any(self) -> bool:
        return bool(self.redis.hlen(self.keys.held_ids))

    def unhold(self, rows_of: dict[str, set[str]], pipe: Any = None,
               dead_only: bool = False) -> None:
        """Remove these transactions' marks (tx id -> its rows) from held_ids, and only theirs
        (queued on `pipe` if given, to run in its MULTI); `dead_only`: only their dead marks,
        see scripts.UNHOLD_DEAD."""
        _eval_pairs(pipe or self.redis, scripts.UNHOLD_DEAD if dead_only else scripts.UNHOLD, self.keys,
                    _row_pairs(rows_of))

    def hold(self, rows_of: dict[str, set[str]], pipe: Any) -> None:
        """Queue on `pipe`: these transactions (tx id -> its rows) hold the rows nobody else
        holds, see scripts.HOLD."""
        _eval_pairs(pipe, scripts.HOLD, self.keys, _row_pairs(rows_of))

    def rename(self, renamed: list[tuple[str, str, set[str]]], pipe: Any) -> None:
        """Queue on `pipe`: each requeued transaction (new id, old id, rows) takes the places of its
        old id's dead marks on these rows, see scripts.RENAME."""
        _eval_pairs(pipe, scripts.RENAME, self.keys,
                    [x for new, old, rows in renamed for row in sorted(rows) for x in (row, f"{new}:{old}")])

    def revive(self, rows_of: dict[str, set[str]], pipe: Any) -> None:
        """Queue on `pipe`: these requeued transactions' dead marks (tx id -> its rows) become
        live holds again, see scripts.REVIVE."""
        _eval_pairs(pipe, scripts.REVIVE, self.keys, _row_pairs(rows_of))

    def revive_ahead(self, rows_of: dict[str, set[str]], pipe: Any) -> None:
        """Queue on `pipe`: as `revive`, on rows another letter of the id still writes, whose dead
        mark stays right behind the live one, see scripts.REVIVE_AHEAD."""
        _eval_pairs(pipe, scripts.REVIVE_AHEAD, self.keys, _row_pairs(rows_of))

    def waits_to_retry(self, transaction_id: str) -> bool:
        """Whether an entry of this id is in `retry` (waiting to retry, or parked): there once a
        batch claimed its own, it is a copy a producer pushed again. Entries are our JSON, the
        id right after the status slot (Transaction.to_json): a scan matches that prefix."""
        prefix = f'{STATUS_OPENING}{"?" * STATUS_SLOT},"transaction_id":'
        pattern = prefix + _glob_escaped(json_codec.dumps(transaction_id)) + ",*"
        entries = self.redis.zscan_iter(self.keys.retry, match=pattern, count=1000)
        return next(entries, None) is not None

    def behind(self, heads: dict[str, str], most: int, in_batch: Collection[str]) -> tuple[dict[str, list[str]], set[str]]:
        """What waits behind these rows' heads (row -> its head's mark), in one round trip: the
        first `most` in each row's queue (SiteKeys.waiting), in order, and which of the heads
        whose transactions are `in_batch` have others parked behind them."""
        rows = sorted(heads)
        waited = sorted({head for head in heads.values() if head in in_batch})
        pipe = self.redis.pipeline(transaction=False)
        for row in rows:
            pipe.zrange(self.keys.waiting(row), 0, most - 1)
        for head in waited:
            pipe.exists(self.keys.parked(head))
        replies = pipe.execute()
        queues = {row: [v.decode() for v in values] for row, values in zip(rows, replies) if values}
        return queues, {head for head, n in zip(waited, replies[len(rows):]) if n}

    def held_live_by(self, rows: list[str], mark: str) -> set[str]:
        """Those of `rows` whose head (held_ids) is `mark` or whose queue (SiteKeys.waiting) holds
        it, in one round trip."""
        if not rows:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        for part in _parts(rows, MAX_COMMAND_ARGS - 2):
            pipe.hmget(self.keys.held_ids, part)
        for row in rows:
            pipe.zscore(self.keys.waiting(row), mark)
        replies = pipe.execute()
        parts = len(replies) - len(rows)
        heads = [v for part in replies[:parts] for v in part]
        return {row for row, head, score in zip(rows, heads, replies[parts:])
                if head is not None and head.decode() == mark or score is not None}

    def rows_held_live(self, marks: list[str]) -> dict[str, set[str]]:
        """For each of these live marks (transaction ids), the rows whose head (held_ids) or queue
        (SiteKeys.waiting) holds it, found by reading all of held_ids and the queues of its rows (a
        row has a queue only behind a head: redis_scripts.ROW_QUEUES): for transactions whose rows
        cannot be named from their steps (Drain._parse: a model gone from the models file since
        they took them). Rare: once a batch at most."""
        found: dict[str, set[str]] = {mark: set() for mark in marks}
        rows = set()
        for row, head in self.redis.hscan_iter(self.keys.held_ids, count=1000):
            rows.add(row.decode())
            if head.decode() in found:
                found[head.decode()].add(row.decode())
        for part in _parts(sorted(rows), 1000):
            pipe = self.redis.pipeline(transaction=False)
            for row in part:
                pipe.zmscore(self.keys.waiting(row), marks)
            for row, scores in zip(part, pipe.execute()):
                for mark, score in zip(marks, scores or ()):
                    if score is not None:
                        found[mark].add(row)
        return found

    def holders(self, ids: list[str]) -> dict[str, str]:
        """Which of these ids are created by a transaction that is waiting to retry or dead."""
        if not ids:
            return {}
        values = [v for part in _parts(ids, MAX_COMMAND_ARGS - 2) for v in self.redis.hmget(self.keys.held_ids, part)]
        return {i: v.decode() for i, v in zip(ids, values) if v is not None}

    def compact_aof(self) -> bool:
        """Ask Redis to rewrite its append-only file (BGREWRITEAOF) once the file is mostly
        history: at least AOF_COMPACT_MIN_BYTES and AOF_COMPACT_FILE_PER_MEMORY times Redis's data.

        A rewrite forks Redis, and the fork stops it (and every ingest) for a time that grows
        with its memory: 39-90 ms with 1.5 GB buffered, measured. Redis's own trigger fires as
        the file grows, which during an outage is while the backlog is large; the drain calls
        this when it is idle, when the fork costs little (Redis itself should rewrite rarely:
        see the local stack's redis.conf). False if it did not ask: not worth it yet, a rewrite
        or save already running, AOF off, or the command refused."""
        try:
            info = self.redis.info("persistence")
            if (not info.get("aof_enabled") or info.get("aof_rewrite_in_progress")
                    or info.get("aof_rewrite_scheduled") or info.get("rdb_bgsave_in_progress")):
                return False
            size = int(info.get("aof_current_size", 0))
            if (size < AOF_COMPACT_MIN_BYTES
                    or size < AOF_COMPACT_FILE_PER_MEMORY * int(self.redis.info("memory")["used_memory"])):
                return False
            self.redis.bgrewriteaof()
        except redis.ResponseError:  # a managed Redis may not allow it: its own schedule applies
            return False
        return True

    def has_work(self) -> bool:
        """Something to claim now (queued, left in processing, a retry that is due), or committed
        batches waiting for the replica. One round trip; the sensor asks it."""
        return any(self.work().values())

    def has_claimable(self) -> bool:
        """Whether a claim would take something now (entries queued, a retry that is due), in
        one round trip: a drain waiting for the replica stops waiting for it (Drain._work_waits)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(self.keys.buffer)
        pipe.zcount(self.keys.retry, "-inf", time.time())
        return any(pipe.execute())

    def work(self) -> dict[str, int]:
        """What is left for a drain, in one round trip: entries queued and left in processing,
        retries that are due, committed batches waiting for the replica."""
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(k.buffer)
        pipe.llen(k.processing)
        pipe.zcount(k.retry, "-inf", time.time())
        pipe.zcard(k.awaiting_replication)
        return dict(zip(("buffer", "processing", "due_retries", "awaiting_replication"), pipe.execute()))
