"""Applying batches of buffered transactions to main, and reading LSNs.

Fast path, one round trip per batch: BEGIN, the applied-id records, the batch's writes folded
per row into one statement per table and column set (see batch_sql.py), COMMIT, and the
flush LSN read after COMMIT completed, all in one SQL script. A batch holding a transaction
that already committed (reclaimed after a crash) fails on the applied-id key, and a batch
holding bad data fails on it: both take the careful path, which skips what committed and
isolates poison transactions by bisection under savepoints (O(log B) round trips each),
holding back the transactions that use their ids.
Errors are sorted: transient ones (link, timeouts, read-only main) leave the batch to be
retried; permanent ones are charged to the transaction that caused them. A statement or lock
timeout is a StatementTimeout: the drain retries in smaller pieces (see timeout_pieces).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import sqlalchemy as sa
from psycopg2.extensions import TRANSACTION_STATUS_IDLE
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import visitors as sa_visitors

from obs_pipeline.batch_sql import BatchSql
from obs_pipeline.column_values import unicode_lower
from obs_pipeline.config import ConfigError
from obs_pipeline.lsn import (MAIN_STARTED_EXPRESSION, MAIN_TIMELINE_EXPRESSION, REPLAY_TIMELINE_SQL, lsn_to_int,
                              timeline_of_wal_file)
from obs_pipeline.model_registry import ModelRegistry
from obs_pipeline.schema import applied_transactions
from obs_pipeline.wire import RowWrite, Transaction, referenced_ids, row_writes, written_ids

log = logging.getLogger("obs_pipeline.drain")

# SQLSTATE classes/codes that say "try the same thing later", not "this data is wrong".
_TRANSIENT_SQLSTATES = ("08", "53", "57", "58", "40001", "40P01", "25006", "55P03")
# ... of which main cancelled the statement: query_canceled (its statement_timeout, or a
# pg_cancel_backend) and lock_not_available (its lock_timeout). The work itself may be what
# takes too long: retried as it is, it would time out for ever.
_TIMEOUT_SQLSTATES = ("57014", "55P03")
_FLUSH_LSN = b"SELECT pg_current_wal_flush_lsn()::text"
FAR_ROUND_TRIP_S = 0.005  # main's round trip from which it counts as far (a LAN is under it): batches
#                           grow (drain.batch_size_for) and cleanups wait for the next batch's overlap
# Main set to `synchronous_commit = off` (for its database, a role, the server) returns from
# COMMIT before flushing it: the flush LSN read next may come before the commit, the replica
# replays past it without the rows, and the drain would clean caches the reads still need (and
# let go of transactions a crash of main then loses). Each batch's transaction flushes its
# commit locally then (this, just before COMMIT); a stronger setting (`remote_apply`) stays.
_FLUSHED_COMMIT = (b"SELECT set_config('synchronous_commit', 'local', true) "
                   b"WHERE current_setting('synchronous_commit') = 'off'")
# The careful path's check of deferred constraints at the end of each savepoint part, not at
# COMMIT, where a violation could not be pinned on a transaction (the batch would fail for
# ever). Made immediate for the whole transaction instead, they refused a transaction valid in
# its own order (an exposure created before the instrument it names): each part's pending
# checks run as it ends, then the initially deferred constraints are deferred again for the next
# part (SET CONSTRAINTS has no "back to their own mode"; main names them, no round trip more).
# A name that a constraint that cannot be deferred shares in its schema is left out: SET
# CONSTRAINTS sets every constraint of the name, and refuses the lot for that one.
_CHECK_DEFERRED = (b"SET CONSTRAINTS ALL IMMEDIATE",
                   b"DO $obs$ DECLARE names text; BEGIN SELECT string_agg(DISTINCT format('%I.%I', n.nspname, "
                   b"c.conname), ', ') INTO names FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
                   b"WHERE c.condeferred AND NOT EXISTS (SELECT 1 FROM pg_constraint o WHERE o.connamespace = "
                   b"c.connamespace AND o.conname = c.conname AND NOT o.condeferrable); IF names IS NOT NULL THEN "
                   b"EXECUTE 'SET CONSTRAINTS ' || names || ' DEFERRED'; END IF; END $obs$")
# Asked as each session starts (see MainDatabase._time_round_trip): whether obs_pipeline_applied
# has steps_digest (NULL: there is no such table, `db init` never ran on that database), whether
# "main" is a hot standby (the site's replica, or main demoted by a failover), which refuses
# every write (25006) and the flush LSN (55000) for as long as it is one, and main's system
# identifier, which the replica's must be (ReplicaDatabase.replay_lsn), and the timeline main
# writes (a primary's stays until it restarts): a failover or a restore forks one, and a replica
# that replays another timeline of the same cluster has other WAL at the same LSNs. (Its WAL
# file name's first 8 hex digits: pg_control_checkpoint's lags a promotion.) And when main's
# server started (microseconds since the epoch), which tells two standbys promoted to one timeline
# number apart (MAIN_STARTED_EXPRESSION).
_SESSION_SQL = (f"SELECT CASE WHEN to_regclass('{applied_transactions.name}') IS NOT NULL THEN EXISTS ("
                f"SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('{applied_transactions.name}') "
                "AND attname = 'steps_digest' AND NOT attisdropped) END, pg_is_in_recovery(), "
                "(SELECT system_identifier FROM pg_control_system()), " + MAIN_TIMELINE_EXPRESSION + ", "
                + MAIN_STARTED_EXPRESSION).encode()
# ... and which of the models' tables (their names, a text[] bound in) main runs row triggers on
# as rows are inserted or updated, enabled: fold must not merge those rows' writes (see fold).
_TRIGGERED_SQL = (", (SELECT array_agg(n) FROM unnest(%s::text[]) AS n WHERE EXISTS (SELECT 1 FROM pg_trigger "
                  "WHERE tgrelid = to_regclass(n) AND NOT tgisinternal AND tgenabled <> 'D' AND tgtype & 1 = 1 "
                  "AND tgtype & 20 <> 0))")  # (tgtype: 1 a row trigger, 4 on insert, 16 on update)
# ... and the columns of those tables whose values main may refuse though the models do not say
# so (a constraint, a unique index, a domain or enum, a length or precision limit, NOT NULL,
# added on main): [table, column, whether only NULL is refused], for fold's `refusable`. A unique
# index names the columns of its expressions and predicate too (pg_depend), not every column.
_CONSTRAINED_SQL = (", (SELECT json_agg(json_build_array(n, a.attname, NOT r.refused)) FROM unnest(%s::text[]) AS n "
                    "JOIN pg_attribute a ON a.attrelid = to_regclass(n) AND a.attnum > 0 AND NOT a.attisdropped "
                    "JOIN pg_type t ON t.oid = a.atttypid CROSS JOIN LATERAL (SELECT t.typtype IN ('d', 'e') "
                    "OR a.atttypmod <> -1 AND t.typcategory NOT IN ('D', 'T') "  # (a time's precision rounds)
                    "OR EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conrelid = a.attrelid AND c.contype IN "
                    "('c', 'f', 'u', 'x') AND a.attnum = ANY(c.conkey)) OR EXISTS (SELECT 1 FROM pg_index i WHERE "
                    "i.indrelid = a.attrelid AND i.indisunique AND (a.attnum = ANY(i.indkey) OR EXISTS (SELECT 1 "
                    "FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid AND "
                    "d.refobjid = a.attrelid AND d.refobjsubid = a.attnum))) AS refused) AS r "
                    "WHERE a.attnotnull OR r.refused)")
# ... and main's foreign keys between those tables that delete or change the child rows as their
# parent is deleted (ON DELETE CASCADE, SET NULL, SET DEFAULT), declared by the models or not:
# [parent, child, whether the child rows are deleted], for fold's `cascades`.
_CASCADING_SQL = (", (SELECT json_agg(json_build_array(p.n, ch.n, c.confdeltype = 'c')) FROM pg_constraint c "
                  "JOIN unnest(%s::text[]) AS p(n) ON c.confrelid = to_regclass(p.n) JOIN unnest(%s::text[]) AS ch(n) "
                  "ON c.conrelid = to_regclass(ch.n) WHERE c.contype = 'f' AND c.confdeltype IN ('c', 'n', 'd'))")
# The session's questions, with how long main took to answer them (the last column): the round
# trip timed with them is the link's only (_time_round_trip). OFFSET 0 keeps the inner query whole,
# answered before the outer clock is read.
_SERVER_TIMED_SQL = ("SELECT *, extract(epoch FROM clock_timestamp() - statement_timestamp())::float8 "
                     "FROM ({} OFFSET 0) AS asked")
# What building a batch's SQL raises for a value SQL cannot carry (psycopg2 refuses a NUL in a
# string with ValueError, an encoder a lone surrogate), should one pass validation: that
# transaction's error, never the drain's. (Not KeyError or TypeError: those are our bugs.)
_UNWRITABLE = (ValueError, UnicodeError, OverflowError)


def same_steps(recorded_digest: str | None, tx: Transaction) -> bool:
    """Whether an applied-id record is this transaction's: the same steps, or a digest missing
    on either side (a table or a producer from before digests). Otherwise the id was reused."""
    return recorded_digest is None or tx.steps_digest is None or recorded_digest == tx.steps_digest


class TransientError(RuntimeError):
    """Main is unreachable or refuses writes for now; retry the same batch later."""


class StatementTimeout(TransientError):
    """Main cancelled a statement of the batch: its statement_timeout or lock_timeout. A lock
    that goes away, or work too large for the timeout: the drain retries in smaller pieces
    (`piece`: how many transactions timed out together; `alone`: the one, if it was alone)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind  # "statement timeout", "lock timeout" or "statement cancelled"
        self.piece = 0
        self.alone: Transaction | None = None


def timeout_kind(error: BaseException) -> str | None:
    """What cancelled a statement on main ("statement timeout", ...), None if nothing did."""
    orig = getattr(error, "orig", None) or error
    code = getattr(orig, "pgcode", None)
    if code not in _TIMEOUT_SQLSTATES:
        return None
    if code == "55P03":
        return "lock timeout"
    return "statement timeout" if "statement timeout" in str(orig) else "statement cancelled"


@dataclass
class BatchResult:
    applied: list[Transaction] = field(default_factory=list)
    already_applied: list[Transaction] = field(default_factory=list)
    failed: list[tuple[Transaction, str]] = field(default_factory=list)  # (tx, reason)
    # an id applied already with other steps: a producer reused it; (tx, reason), never applied
    reused_ids: list[tuple[Transaction, str]] = field(default_factory=list)
    # behind one of those, in this batch: (tx, "blocked by <id>"), dead-lettered with it. Not in
    # `failed`: the id may also be the fresh transaction's, ahead in the batch, which may only be
    # retrying, and what waits behind that one is parked, not dead-lettered.
    dead_blocked: list[tuple[Transaction, str]] = field(default_factory=list)
    # timed out on main applied alone, too many times in a row (see timeout_pieces): (tx, reason)
    timed_out: list[tuple[Transaction, str]] = field(default_factory=list)
    commit_lsn: int | None = None
    rows_per_model: dict[str, int] = field(default_factory=dict)
    writes_before_fold: int = 0
    writes_after_fold: int = 0
    round_trips: int = 0
    slow_path: bool = False
    pieces: int = 1  # main transactions it was applied in (more after a statement timeout)
    apply_s: float = 0.0  # from sending the first script to reading the last reply

    def add_rows(self, rows: dict[str, int]) -> None:
        for model, n in rows.items():
            self.rows_per_model[model] = self.rows_per_model.get(model, 0) + n

    def add(self, other: "BatchResult") -> None:
        """`other`, a later piece of the same batch, committed after this one."""
        for name in ("applied", "already_applied", "failed", "reused_ids", "dead_blocked", "timed_out"):
            getattr(self, name).extend(getattr(other, name))
        self.commit_lsn = other.commit_lsn if other.commit_lsn is not None else self.commit_lsn
        self.add_rows(other.rows_per_model)
        self.writes_before_fold += other.writes_before_fold
        self.writes_after_fold += other.writes_after_fold
        self.round_trips += other.round_trips
        self.slow_path = self.slow_path or other.slow_path
        self.apply_s += other.apply_s


# A far-away database: keepalives notice a dead link; a connect attempt gives up in 10 s.
_FAR_CONNECT_ARGS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                     "keepalives_count": 3}


def make_engine(url: str, application_name: str = "obs-pipeline", **kwargs: Any) -> sa.Engine:
    """An engine for a far-away database (no pre-ping round trip); `application_name` shows in
    pg_stat_activity which of our processes holds a session."""
    connect_args = dict(_FAR_CONNECT_ARGS, application_name=application_name)
    if not url.startswith("postgresql"):
        connect_args = {}
    return sa.create_engine(url, connect_args=connect_args, pool_size=2, max_overflow=2, pool_recycle=3600,
                            **kwargs)


def is_transient(error: BaseException) -> bool:
    orig = getattr(error, "orig", None) or error
    code = getattr(orig, "pgcode", None)
    if code:
        return code.startswith(_TRANSIENT_SQLSTATES)
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(orig, (psycopg2.OperationalError, psycopg2.InterfaceError, exc.OperationalError,
                             exc.InterfaceError, exc.TimeoutError, exc.DisconnectionError,
                             ConnectionError, TimeoutError, OSError))


# What main says when it refuses a connection for the URL itself (psycopg2 gives a failed connect
# no SQLSTATE: 28P01, 28000, 3D000). "starting up", "too many clients" and the like stay transient.
_REFUSED_BY_CONFIGURATION = re.compile(r'FATAL:\s+(password authentication failed|role ".*" does not exist'
                                       r'|database ".*" does not exist|no pg_hba\.conf entry)')


# What a standby with `hot_standby = off` answers every connect (57P03, which psycopg2 gives a
# failed connect no SQLSTATE for). The same SQLSTATE's "starting up", "not yet accepting
# connections" (a start, crash recovery, a hot standby not yet consistent) stay transient.
_HOT_STANDBY_OFF = re.compile(r"FATAL:\s+the database system is not accepting connections\s+"
                              r"DETAIL:\s+Hot standby mode is disabled")


_COLD_STANDBY = 'a standby with hot_standby off (it refuses every connection: "Hot standby mode is disabled")'


def _where(url: sa.URL) -> str:
    return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database}"


def main_is_standby(url: sa.URL, hot_standby: bool = True) -> str:
    """Why a main URL naming a standby is refused: no retry fixes it until someone promotes it,
    and the transactions are not at fault. One line, what to do. `hot_standby` False: one that
    refuses every connection instead of every write (see hot_standby_off)."""
    what = "a read-only standby (pg_is_in_recovery)" if hot_standby else _COLD_STANDBY
    return f"main at {_where(url)} is {what}: point OBS_MAIN_DB_URL at the primary"


def replica_hot_standby_off(url: sa.URL) -> str:
    """Why the replica refuses every read: it streams main's WAL but answers no query until
    `hot_standby = on`. It said "replica unreachable ... not accepting connections", which sent
    an operator after a network or a server that was up; no wait fixes it."""
    return (f"the replica at {_where(url)} (OBS_REPLICA_DB_URL) is {_COLD_STANDBY}: set hot_standby = on in its "
            "postgresql.conf and restart it")


def first_line(error: BaseException) -> str:
    """A database error's first line (SQLAlchemy's wraps the driver's in `orig`): its text, not
    SQLAlchemy's page."""
    lines = str(getattr(error, "orig", None) or error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def applied_records_refused(error: BaseException) -> str | None:
    """Why the drain may not check that the replica has a batch's ids (ReplicaDatabase.missing_among):
    a readers' role made without deploy/main-setup.sql's GRANT; None for another error."""
    first = first_line(error)
    if not first.startswith("permission denied for "):
        return None
    return (f"the site's replica refuses the role of OBS_REPLICA_DB_URL ({first}): grant it SELECT on "
            f"{applied_transactions.name} on main (deploy/main-setup.sql); the replica replays the grant")


def replica_of_another_cluster(url: sa.URL, cluster: int, main: int | None) -> str:
    """Why the replica's replay cannot be compared with main's commits: it is of another
    cluster's WAL (its system identifier is not main's), or main, down, cannot say whose."""
    where = f"the replica at {_where(url)} (OBS_REPLICA_DB_URL)"
    if main is None:
        return f"cannot tell whether {where} replays main's WAL until main answers"
    return (f"{where} is a standby of another cluster (system identifier {cluster}, main's is {main}): point "
            "OBS_REPLICA_DB_URL at the site's replica of main, or clone it afresh from main (pg_basebackup)")


class RecordedTimeline(int):
    """Main's timeline as the acknowledgement of its last commit here recorded it, where main
    did not answer: a replica on another may have followed main's failover since, not been
    left behind (replica_on_another_timeline says which to find out)."""


def replica_on_another_timeline(url: sa.URL, replica: int, main: int | None) -> str:
    """Why the replica's replay cannot be compared with main's commits: it replays another
    timeline of main's cluster (a failover or a restore forked them; past the fork the same LSNs
    are other WAL), or main, down, cannot say which it writes."""
    where = f"the replica at {_where(url)} (OBS_REPLICA_DB_URL)"
    if main is None:
        return f"cannot tell whether {where} replays the timeline main writes until main answers"
    if isinstance(main, RecordedTimeline):  # (it said "point OBS_REPLICA_DB_URL at ..." of a replica that was right)
        return (f"{where} replays timeline {replica} of main's cluster; main did not answer (OBS_MAIN_DB_URL) and "
                f"wrote timeline {main} at its last commit here: if main failed over since, the drain settles that "
                "once it reaches main; if not, point OBS_REPLICA_DB_URL at a standby that follows main")
    return (f"{where} replays timeline {replica} of main's cluster, main writes timeline {main} (a failover or a "
            "restore forked them): point OBS_REPLICA_DB_URL at a standby that follows main "
            "(recovery_target_timeline = 'latest'), or clone it afresh from main (pg_basebackup)")


def hot_standby_off(error: BaseException) -> bool:
    """A connect refused by a standby with `hot_standby = off`: a standby until promoted, which
    no retry fixes (it said "main unreachable" for ever)."""
    orig = getattr(error, "orig", None) or error
    return (isinstance(orig, psycopg2.OperationalError) and not getattr(orig, "pgcode", None)
            and _HOT_STANDBY_OFF.search(str(orig)) is not None)


def main_without_schema(url: sa.URL) -> str:
    """Why a main URL naming a database without obs_pipeline_applied is refused (the server's
    `postgres`, one `db init` never ran on): every batch, every prune, failed on a traceback."""
    return (f"main at {_where(url)} has no {applied_transactions.name} table: OBS_MAIN_DB_URL names another "
            "database than the pipeline's, or `obs-pipeline db init` was not run on it")


def refuse_standby(engine: sa.Engine, schema: bool = False) -> None:
    """ConfigError in main_is_standby's line where `engine` names a standby, asked before a
    command writes to main (`db init`, the prune job): a hot one failed the first write with
    "cannot execute ALTER TABLE in a read-only transaction", one with hot_standby off said main
    was unreachable; with `schema`, in main_without_schema's where it lacks obs_pipeline_applied
    (the prune job: `db init` makes it). Any other connect error is raised as it is."""
    try:
        with engine.connect() as conn:
            in_recovery, has_schema = conn.execute(sa.text(
                f"SELECT pg_is_in_recovery(), to_regclass('{applied_transactions.name}') IS NOT NULL")).one()
    except exc.OperationalError as error:
        if hot_standby_off(error):
            raise ConfigError(main_is_standby(engine.url, hot_standby=False)) from error
        raise
    if in_recovery:
        raise ConfigError(main_is_standby(engine.url))
    if schema and not has_schema:
        raise ConfigError(main_without_schema(engine.url))


def main_setup_refusal(error: BaseException) -> str | None:
    """What main's refusal says is wrong with the drain's role or main's schema, not with a
    batch's data, as one line saying what to do; None for anything else. A missing GRANT (42501
    "permission denied for table ...", a sequence, a schema), a model's table or column main
    lacks (42P01, 42703: a model added to OBS_MODELS, `db init` not run since): no retry fixes
    them and no transaction is at fault (each was charged with it, retried, and the backlog
    dead-lettered). A row-level security policy's refusal has 42501 too ("new row violates
    row-level security policy"): that is the row's own, and stays so."""
    orig = getattr(error, "orig", None) or error
    code = getattr(orig, "pgcode", None)
    if code == "42501" and str(orig).startswith("permission denied for "):
        return (f"main refuses the drain's role ({describe(error)}): grant the role in OBS_MAIN_DB_URL SELECT, "
                "INSERT, UPDATE and DELETE on the models' tables and obs_pipeline_applied (USAGE on their sequences)")
    if code == "42P01":
        return (f"main has no table of a model of OBS_MODELS ({describe(error)}): run `obs-pipeline db init` with "
                "this OBS_MODELS, which creates it")
    if code == "42703":
        return (f"main lacks a column OBS_MODELS maps ({describe(error)}): add the column to the table on main "
                "(`db init` creates missing tables, not columns), or drop it from the model")
    return None


def refused_by_configuration(error: BaseException) -> bool:
    """A connect that main refused for its role, password or database, or that libpq refused
    before asking main, for an option's value (refused_by_libpq): a wrong URL, which no retry
    fixes."""
    orig = getattr(error, "orig", None) or error
    return (isinstance(orig, psycopg2.OperationalError) and not getattr(orig, "pgcode", None)
            and (_REFUSED_BY_CONFIGURATION.search(str(orig)) is not None or refused_by_libpq(orig)))


# What libpq says of a connection option's value it cannot use, before it sends anything (its
# connectOptions2): `?sslmode=bogus`, a port out of range, a hostaddr that is no address
_REFUSED_BY_LIBPQ = re.compile(r'invalid "?\w+"? value: |invalid port number: |invalid integer value .* for connection '
                               r'option |could not match \d+ (host names|port numbers) to |could not parse network '
                               r'address |invalid value .* for (minimum|maximum) SSL protocol version|invalid SSL '
                               r'protocol version range|weak sslmode ')


def refused_by_libpq(error: BaseException) -> bool:
    """A connect libpq refused for a connection option's value, never having asked the server:
    main or the replica may be up; it said "main unreachable" and the drain retried for ever."""
    orig = getattr(error, "orig", None) or error
    return (isinstance(orig, psycopg2.OperationalError) and not getattr(orig, "pgcode", None)
            and _REFUSED_BY_LIBPQ.match(str(orig)) is not None)


# how main words the failed cast of batch_sql's "exists" check: the message is the reason
_MISSING_ROW = re.compile(r'invalid input syntax for type integer: "(no .* row .* to update)"')


def describe(error: BaseException) -> str:
    """One line an operator can act on."""
    orig = getattr(error, "orig", None) or error
    text = str(orig).strip().splitlines()
    first = text[0] if text else ""
    missing = _MISSING_ROW.fullmatch(first)
    if missing:
        return missing.group(1)
    return f"{type(orig).__name__}: {first}".strip()


class MainDatabase:
    """The drain's one session on main, kept across batches.

    A plain psycopg2 connection, not an SQLAlchemy pool: the pool's first connect initialises
    the dialect with about ten queries (2.8 s at 250 ms round trip, once per drain run), and a
    batch needs none of it. SQLAlchemy still shapes every statement (`BatchSql`); its URL
    gives the connect arguments."""

    def __init__(self, url: str, registry: ModelRegistry, site: str, application_name: str = "obs-pipeline"):
        self.url = sa.engine.make_url(url)
        self.dialect = self.url.get_dialect()()  # compiles statements; never connects
        self.registry = registry
        self.site = site
        self.application_name = application_name
        self.sql = BatchSql(registry, self.dialect)
        self._declared_refusable = refusable_columns(registry)  # what fold must not hide from main
        self.refusable = self._declared_refusable  # ... and what main's own constraints add (asked per session)
        # models whose updates fold must keep apart from the row's insert (ModelSpec.main_onupdate)
        self.kept_updates = frozenset(m.name for m in registry.models.values() if m.main_onupdate) or None
        self.cascades = cascading_deletes(registry) or None  # what a delete changes on main beyond its row (and
        #                                                       what main's own foreign keys add: asked per session)
        # models whose key main compares without case (CITEXT): 'abc' and 'ABC' are one row (fold's `case_folded`)
        self.case_folded = frozenset(m.name for m in registry.models.values()
                                     if m.columns[m.primary_key].case_insensitive) or None
        # models each update of whose rows must reach main (fold's `unmerged`): those with an
        # onupdate that reads the row, and those whose rows main runs triggers on (asked per session)
        self._row_onupdates = frozenset(m.name for m in registry.models.values() if _onupdate_reads_row(m.table))
        self._tables = {self.dialect.identifier_preparer.format_table(m.table): m.name for m in registry.models.values()}
        self.unmerged: frozenset[str] | None = self._row_onupdates or None
        self.round_trips = 0  # scripts sent to main; each is one round trip
        self.round_trip_s: float | None = None  # the link's, measured once per session (see _connection)
        self.last_run_round_trip_s: float | None = None  # as the last drain run measured it (_time_round_trip)
        self._carry: list[bytes] = []  # a savepoint rollback sent with the next script
        # the careful path's claims on rows (see _claim): the place in the batch of the transaction
        # that made each, and each transaction's place
        self._claimed_at: dict[str, int] = {}
        self._place: dict[int, int] = {}
        self._ahead: Collection[str] = ()  # the ids of earlier pieces of the batch (see apply_batch)
        self._conn: Any = None
        self.records_digest: bool | None = True  # main's obs_pipeline_applied has steps_digest (see _connection)
        self.system_identifier: int | None = None  # main's cluster, as its last session said (identify)
        self.timeline: int | None = None  # the timeline main writes, as its last session said (identify)
        self.started: int | None = None  # when main's server started, as its last session said (identify)
        self._warned_no_digest = False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            args, kwargs = self.dialect.create_connect_args(self.url)
            kwargs.update(_FAR_CONNECT_ARGS, application_name=self.application_name)
            self._conn = psycopg2.connect(*args, **kwargs)
            self._conn.autocommit = True  # the scripts carry their own BEGIN/COMMIT
            (self.round_trip_s, self.records_digest, standby, triggered, self.system_identifier, self.timeline,
             constrained, cascading, self.started) = self._time_round_trip(
                self._conn, last_run_s=self.last_run_round_trip_s, tables=list(self._tables))
            self.unmerged = frozenset(self._tables[name] for name in triggered or ()) | self._row_onupdates or None
            self.refusable = self._with_mains_constraints(constrained or ())
            self.cascades = cascading_deletes(self.registry, [(self._tables[parent], self._tables[child], deleted)
                                                              for parent, child, deleted in cascading or ()]) or None
            if standby:  # every batch would fail as "read-only" (transient): retried for ever
                self.close()
                raise ConfigError(f"{main_is_standby(self.url)}; "
                                  "the transactions stay buffered until then")
            if self.records_digest is None:  # every batch would fail on it, a traceback (op retries in Dagster)
                self.close()
                raise ConfigError(f"{main_without_schema(self.url)}; the transactions stay buffered until then")
            if not self.records_digest and not self._warned_no_digest:
                self._warned_no_digest = True
                log.warning("main's %s has no steps_digest column (made by an earlier version): a transaction id "
                            "a producer reuses for other steps cannot be told from a reclaimed one and is skipped "
                            "as applied; run `obs-pipeline db init` to add the column", applied_transactions.name)
        return self._conn

    def _with_mains_constraints(self, constrained: Any) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
        """refusable_columns' sets, with the columns main's own constraints name (_CONSTRAINED_SQL):
        a value main refuses by a constraint only it has, overwritten by a later transaction of
        the batch, was folded away and both reported applied."""
        added: dict[str, tuple[set[str], set[str]]] = {}
        for table, column, null_only in constrained:
            spec = self.registry.model(self._tables[table])
            key = next((k for k, c in spec.sql_columns.items() if c.name == column), None)
            if key is not None:
                added.setdefault(spec.name, (set(), set()))[1 if null_only else 0].add(key)
        out = dict(self._declared_refusable)
        for model, (values, nulls) in added.items():
            declared, not_null = out.get(model, (frozenset(), frozenset()))
            out[model] = (declared | values, not_null | nulls)
        return out

    @staticmethod
    def _time_round_trip(conn: Any, samples: int = 3, last_run_s: float | None = None,
                         tables: list[str] | None = None) -> tuple[float, bool | None, bool, list[str] | None,
                                                                   int | None, int | None, list | None, list | None,
                                                                   int | None]:
        """A near-empty query's round trip, the least of up to `samples`: what each batch pays
        for the link whatever its size (the drain sizes far batches by it). Once per session.
        The least, because one slow reply on a busy machine would make a near main look far; so
        a reply under FAR_ROUND_TRIP_S ends the sampling (the least can only be nearer), and two
        far replies within 10 % of each other do too (a hiccup is not that regular): at 250 ms,
        0.5 s per drain run, where three samples took 0.75. The query asks the catalog whether
        obs_pipeline_applied records the steps' digest (a table made before it does not, until
        `obs-pipeline db init` adds the column; until then ids are recorded alone, as then; None
        where there is no such table): a question each session needs answered, asked in a round
        trip it makes anyway; and so is whether main is a hot standby (the third value).
        `last_run_s`, the round trip the last drain run measured (the key `link`), counts as a
        far reply taken before: a first reply within 10 % of it ends the sampling, one round trip
        (0.25 s at 250 ms) less per run.
        Of `tables` (the models'), it asks which main runs row triggers on (the fourth value); the
        fifth is main's system identifier, the sixth its timeline (None on a standby), the seventh
        the columns of `tables` main may refuse values of (_CONSTRAINED_SQL), the eighth its foreign
        keys between them that cascade a delete (_CASCADING_SQL), the ninth when main's server
        started (MAIN_STARTED_EXPRESSION)."""
        taken: list[float] = []
        present = standby = False
        triggered = system_identifier = timeline = constrained = cascading = started = None
        with conn.cursor() as cur:
            sql = (cur.mogrify(_SERVER_TIMED_SQL.format(_SESSION_SQL.decode() + _TRIGGERED_SQL + _CONSTRAINED_SQL
                                                        + _CASCADING_SQL), (tables,) * 4) if tables else _SESSION_SQL)
            while len(taken) < samples:
                began = time.perf_counter()
                cur.execute(sql)
                elapsed = time.perf_counter() - began
                row = cur.fetchone()
                # the link's share: without main's own time on the catalog queries (about 1 ms
                # with 4 models, more with a site's dozens): counted, a near main read as far
                taken.append(max(elapsed - float(row[8]), 0.0) if len(row) > 8 and row[8] is not None else elapsed)
                present, standby = None if row[0] is None else bool(row[0]), bool(row[1])
                system_identifier = row[2] if len(row) > 2 else None
                timeline = timeline_of_wal_file(row[3]) if len(row) > 3 else None
                started = row[4] if len(row) > 4 else None
                triggered = row[5] if len(row) > 5 else None
                constrained = row[6] if len(row) > 6 else None
                cascading = row[7] if len(row) > 7 else None
                best = min(taken)
                agreeing = taken[-2:] if len(taken) >= 2 else [taken[0], last_run_s] if last_run_s else []
                if best < FAR_ROUND_TRIP_S or (agreeing and max(agreeing) <= 1.1 * min(agreeing)):
                    break
        return min(taken), present, standby, triggered, system_identifier, timeline, constrained, cascading, started

    def identify(self) -> int | None:
        """Main's system identifier, starting a session if none is open (main's errors as a
        batch's: TransientError, ConfigError)."""
        with self._session():
            pass
        return self.system_identifier

    def apply_batch(self, transactions: list[Transaction], blocked: dict[str, str] | None = None,
                    ahead: Collection[str] = ()) -> BatchResult:
        """Commit every transaction of the batch that can be, each whole or not at all.
        `blocked`: rows written by transactions of earlier pieces of the batch that failed
        (row -> holder, "!" + id if dead), as the careful path keeps them; those that use
        them are held back, and the dict gains this piece's. `ahead`: the ids of the
        transactions of those earlier pieces: one used again here (with other steps: the drain
        keeps one of each id and steps) is a reused id, as in one batch, also where the first
        did not commit (it failed, or timed out alone) and the applied record does not have it:
        the second was applied under the id, its status "applied" over the first's."""
        before = self.round_trips
        self._carry = []
        self._ahead = ahead
        with self._session() as conn:
            began = time.perf_counter()
            with conn.cursor() as cur:
                result = self._apply(cur, transactions, blocked)
            result.apply_s = time.perf_counter() - began
        result.round_trips = self.round_trips - before
        return result

    def applied_already(self, transactions: list[Transaction]) -> BatchResult:
        """Those of `transactions` that main has applied already (the same id with the same
        steps, as the careful path tells them), with main's flush LSN, in one round trip: a
        batch claimed again after a piece of it timed out skips what committed without trying
        each piece again (three round trips each, minutes for a far main's batch)."""
        result = BatchResult()
        self._carry = []
        with self._session() as conn, conn.cursor() as cur:  # (records_digest is known once connected)
            self._run(cur, [self._records_of(cur, transactions, "pg_current_wal_flush_lsn()::text")])
            rows = cur.fetchall()
        recorded = {row[0]: row[1] for row in rows}
        for tx in transactions:
            if tx.transaction_id in recorded and same_steps(recorded[tx.transaction_id], tx):
                result.already_applied.append(tx)
        if result.already_applied:
            result.commit_lsn = max(lsn_to_int(row[2]) for row in rows)
        result.round_trips = 1
        return result

    def applied_among(self, transaction_ids: list[str], part: int = 10_000) -> set[str]:
        """Which of these ids main's obs_pipeline_applied records, `part` per query: after a
        failover, those of batches committed on the old timeline that reached the new one (an id
        commits with its rows, a batch whole). Main's errors as a batch's."""
        found: set[str] = set()
        with self._session() as conn, conn.cursor() as cur:
            for start in range(0, len(transaction_ids), part):
                self.round_trips += 1
                cur.execute(f"SELECT transaction_id FROM {applied_transactions.name} WHERE transaction_id = ANY(%s)",
                            (transaction_ids[start:start + part],))
                found.update(row[0] for row in cur.fetchall())
        return found

    def wal_position(self) -> int:
        """Main's WAL insert position now: past the commit of every row it shows, flushed or not
        (synchronous_commit = off), so a replica that has replayed it has them. Main's errors as a
        batch's."""
        with self._session() as conn, conn.cursor() as cur:
            self.round_trips += 1
            cur.execute("SELECT pg_current_wal_insert_lsn()::text")
            return lsn_to_int(cur.fetchone()[0])

    def _records_of(self, cur: Any, txs: list[Transaction], also: str) -> bytes:
        """The query for the applied-id records of `txs`: (transaction_id, steps_digest, `also`)."""
        digest = "steps_digest" if self.records_digest else "NULL"
        return cur.mogrify(f"SELECT transaction_id, {digest}, {also} FROM {applied_transactions.name} "
                           "WHERE transaction_id = ANY(%s)", ([t.transaction_id for t in txs],))

    @contextlib.contextmanager
    def _session(self) -> Iterator[Any]:
        """The connection, with main's errors sorted: transient ones close it and raise
        TransientError (StatementTimeout for a timeout), a refused connect a ConfigError."""
        try:
            conn = self._connection()
            yield conn
        except psycopg2.Error as error:
            if refused_by_configuration(error):  # at connect: not an outage, retrying would never end
                self.close()
                who = "libpq refuses an option of" if refused_by_libpq(error) else "main refuses"
                raise ConfigError(f"{who} the drain's connection ({describe(error)}): "
                                  "check OBS_MAIN_DB_URL") from error
            if hot_standby_off(error):  # at connect, as a hot standby is refused once connected
                self.close()
                raise ConfigError(f"{main_is_standby(self.url, hot_standby=False)}; "
                                  "the transactions stay buffered until then") from error
            refusal = main_setup_refusal(error)
            if refusal:
                self.close()
                raise ConfigError(f"{refusal}; the transactions stay buffered until then") from error
            if is_transient(error):
                self.close()  # a new session next time
                kind = timeout_kind(error)
                if kind is not None:
                    raise StatementTimeout(describe(error), kind) from error
                raise TransientError(describe(error)) from error
            raise
        except BaseException:
            self.close()  # cut short (an interrupt, a bug): never reuse a session in an unknown state
            raise
        if conn.get_transaction_status() != TRANSACTION_STATUS_IDLE:
            self.close()

    def _run(self, cur: Any, parts: list[bytes]) -> None:
        parts, self._carry = self._carry + parts, []
        self.round_trips += 1
        cur.execute(b";\n".join(parts))

    def _rollback(self, cur: Any, parts: list[bytes]) -> None:
        try:
            self._run(cur, parts)
        except psycopg2.Error as error:
            if is_transient(error):
                raise
            raise RuntimeError(f"could not roll back on main: {describe(error)}") from error

    def _apply(self, cur: Any, txs: list[Transaction], blocked: dict[str, str] | None = None) -> BatchResult:
        result = BatchResult()
        if blocked and any(i in blocked for tx in txs for i in referenced_ids(tx, self.registry)):
            return self._apply_carefully(cur, txs, blocked)  # it holds back those that use them
        if self._ahead and any(tx.transaction_id in self._ahead for tx in txs):
            return self._apply_carefully(cur, txs, blocked)  # it tells the reused ids
        writes = [w for tx in txs for w in row_writes(tx, self.registry)]
        folded = fold(writes, self.refusable, self.kept_updates, self.cascades, self.unmerged, self.case_folded)
        if folded is None:
            return self._apply_carefully(cur, txs, blocked)
        try:
            statements, rows = self.sql.writes(cur, folded)
            applied = self.sql.record_applied(cur, txs, self.site, self.records_digest)
        except _UNWRITABLE:  # a value SQL cannot carry: the careful path finds whose it is
            return self._apply_carefully(cur, txs, blocked)
        try:
            self._run(cur, [b"BEGIN", applied, *statements, _FLUSHED_COMMIT, b"COMMIT", _FLUSH_LSN])
        except psycopg2.Error as error:
            if is_transient(error) or main_setup_refusal(error):  # (_session says which)
                raise
            self._rollback(cur, [b"ROLLBACK"])
            return self._apply_carefully(cur, txs, blocked)
        result.applied, result.rows_per_model = txs, rows
        result.writes_before_fold, result.writes_after_fold = len(writes), len(folded)
        result.commit_lsn = lsn_to_int(cur.fetchone()[0])
        return result

    def _apply_carefully(self, cur: Any, txs: list[Transaction], blocked: dict[str, str] | None = None) -> BatchResult:
        result = BatchResult(slow_path=True)
        self._claimed_at, self._place = {}, {id(tx): at for at, tx in enumerate(txs)}
        self._run(cur, [b"BEGIN", self._records_of(cur, txs, "applied_at")])
        done = {r[0]: r[1:] for r in cur.fetchall()}
        blocked = {} if blocked is None else blocked
        fresh: dict[str, Transaction] = {}  # the first of each id not applied before
        for tx in txs:
            tx_id = tx.transaction_id
            if tx_id in done:
                recorded, applied_at = done[tx_id]
                if same_steps(recorded, tx):
                    result.already_applied.append(tx)  # the same transaction, claimed again
                    continue
                reason = reused_id_reason(applied_at)
            elif tx_id in fresh or tx_id in self._ahead:  # (the drain keeps one of each id and steps)
                reason = reused_id_reason(None)
            else:
                fresh[tx_id] = tx
                continue
            # never applied: those using the rows it writes wait with it, as behind any failed one
            result.reused_ids.append((tx, reason))
            self._claim(blocked, tx, "!" + tx_id)  # ("!": dead, as in held_ids)
        self._bisect(cur, list(fresh.values()), result, blocked)
        # in the batch's order, as the drain marks their rows (the first keeps one): a transaction
        # held back is listed when checked, which may be before one ahead of it fails
        for listed in (result.failed, result.dead_blocked):
            listed.sort(key=lambda failure: self._place[id(failure[0])])
        tail = [_FLUSHED_COMMIT, b"COMMIT", _FLUSH_LSN]
        if result.applied:
            tail.insert(0, self.sql.record_applied(cur, result.applied, self.site, self.records_digest))
        self._run(cur, tail)
        lsn = cur.fetchone()[0]
        # (a reused id's caches are cleaned once the replica has what applied the id: up to here)
        if result.applied or result.already_applied or result.reused_ids:
            result.commit_lsn = lsn_to_int(lsn)
        return result

    def _bisect(self, cur: Any, txs: list[Transaction], result: BatchResult, blocked: dict[str, str]) -> None:
        """Apply `txs` in order under a savepoint; on a data error split in halves until the
        poison transactions are alone. A transaction that uses a row written by a failed one is
        held back with it ("blocked by ..."), never applied before it; behind a reused id's
        transaction ("!" + id in `blocked`), dead-lettered with it."""
        ready = []
        for tx in txs:
            at = self._place.get(id(tx), 0)
            blocker = next((blocked[i] for i in referenced_ids(tx, self.registry)  # (not by an id reused in the batch)
                            if i in blocked and blocked[i].removeprefix("!") != tx.transaction_id
                            and self._claimed_at.get(i, -1) < at), None)
            if blocker is None:
                ready.append(tx)
                continue
            if blocker.startswith("!"):
                result.dead_blocked.append((tx, f"blocked by {blocker[1:]}"))
            else:
                result.failed.append((tx, f"blocked by {blocker}"))
            self._claim(blocked, tx, blocker)
        if not ready:
            return
        writes = [w for tx in ready for w in row_writes(tx, self.registry)]
        alone = len(ready) == 1
        # Several transactions go folded (or split if they cannot be); one alone goes in its own
        # step order: folding puts a table's inserts before its deletes, which a unique key or a
        # self-referencing foreign key may refuse.
        folded = None if alone else fold(writes, self.refusable, self.kept_updates, self.cascades, self.unmerged,
                                         self.case_folded)
        if alone or folded is not None:
            try:
                statements, rows = (self.sql.writes_in_order(cur, writes) if alone else self.sql.writes(cur, folded))
            except _UNWRITABLE as unwritable:
                if alone:
                    return self._fail(ready[0], f"cannot be written as SQL: {unwritable!r}", result, blocked)
            else:
                failure = self._in_savepoint(cur, statements)
                if failure is None:
                    return self._count_applied(result, ready, rows, writes, len(writes) if alone else len(folded))
                if alone:
                    if self._applied_in_the_batch_order(cur, ready[0], writes, result):
                        return
                    return self._fail(ready[0], describe(failure), result, blocked)
        middle = len(ready) // 2
        self._bisect(cur, ready[:middle], result, blocked)
        self._bisect(cur, ready[middle:], result, blocked)


    def _applied_in_the_batch_order(self, cur: Any, tx: Transaction, writes: list[RowWrite],
                                    result: BatchResult) -> bool:
        """A transaction main refused in its own step order, tried once more in the order a batch
        sends (fold: parents' inserts first, children's deletes first), as it went in a batch that
        main took whole. One that deletes a row, then a row referencing it, was applied so, and
        dead-lettered where something else in its batch failed (its fate hung on its batch)."""
        folded = fold(writes, self.refusable, self.kept_updates, self.cascades, self.unmerged, self.case_folded)
        if folded is None:
            return False
        try:
            statements, rows = self.sql.writes(cur, folded)
        except _UNWRITABLE:
            return False
        if self._in_savepoint(cur, statements) is not None:
            return False
        self._count_applied(result, [tx], rows, writes, len(folded))
        return True

    def _in_savepoint(self, cur: Any, statements: list[bytes]) -> psycopg2.Error | None:
        """Run a part of the batch under a savepoint: main's refusal of its data, rolled back with
        the next script; None once it is applied. Main unreachable, or refusing the drain itself,
        is raised (_session says which)."""
        try:
            self._run(cur, [b"SAVEPOINT obs_part", *statements, *_CHECK_DEFERRED, b"RELEASE SAVEPOINT obs_part"])
        except psycopg2.Error as failure:
            if is_transient(failure) or main_setup_refusal(failure):
                raise
            self._carry = [b"ROLLBACK TO SAVEPOINT obs_part", b"RELEASE SAVEPOINT obs_part"]
            return failure
        return None

    @staticmethod
    def _count_applied(result: BatchResult, txs: list[Transaction], rows: dict[str, int], writes: list[RowWrite],
                       sent: int) -> None:
        result.applied.extend(txs)
        result.add_rows(rows)
        result.writes_before_fold += len(writes)
        result.writes_after_fold += sent

    def _fail(self, tx: Transaction, reason: str, result: BatchResult, blocked: dict[str, str]) -> None:
        """A transaction that failed alone: the rows it writes block those that use them."""
        result.failed.append((tx, reason))
        self._claim(blocked, tx, tx.transaction_id)

    def _claim(self, blocked: dict[str, str], tx: Transaction, value: str) -> None:
        """The rows `tx` writes, held by `value` (wire.claim_rows), for the transactions after it
        in the batch: the first in the batch's order keeps a row. A transaction held back claims
        its rows before those ahead of it are applied (a split checks them again): it held them
        back too, behind a transaction they do not use. (A row held before this batch, or its
        piece, was claimed ahead of all of it.)"""
        at = self._place.get(id(tx), 0)
        owner = value.removeprefix("!")
        for row in written_ids(tx, self.registry):
            held = blocked.get(row)
            if held is None or self._claimed_at.get(row, -1) > at:
                blocked[row] = value
                self._claimed_at[row] = at
            elif held.removeprefix("!") == owner:  # (its own again, from a transaction after it: at its place)
                blocked[row] = value


def reused_id_reason(applied_at: Any) -> str:
    """Why a transaction whose id names another with other steps is dead-lettered (`applied_at`:
    when that one was applied; None: it is ahead in the same batch): what happened, what to do."""
    other = (f"was applied already at {applied_at:%Y-%m-%d %H:%M:%S %Z}".rstrip() if applied_at is not None
             else "names another transaction ahead of it in the same batch")
    return (f"its transaction_id {other} with other steps: a producer reused the id. Nothing of this one was "
            "applied; `obs-pipeline failed retry` requeues it under a new transaction_id")


def fold(writes: list[RowWrite], refusable: dict[str, tuple[frozenset[str], frozenset[str]]] | None = None,
         kept_updates: frozenset[str] | None = None,
         cascades: dict[str, frozenset[str]] | None = None,
         unmerged: frozenset[str] | None = None,
         case_folded: frozenset[str] | None = None) -> list[RowWrite] | None:
    """Net effect per row, in first-touch order (a row deleted after its insert or update: the
    delete at the end); None where folding would hide from main a write it may refuse, so the
    batch goes the careful way (each transaction under its own savepoint when need be).

    insert+update -> insert with merged values; update+update -> one update; insert or
    update+delete -> both, the delete after every insert and update (the batch SQL runs a
    table's deletes last): main must still see the write, which it may refuse (a key that
    exists already, a foreign key, a row to update that is not there), or a refused write would
    be reported applied. None for: a row written again after its delete (re-created, or updated:
    no row), an insert of a row already written, and an update by another transaction that
    changes a value main may refuse (`refusable`, see refusable_columns) - merged, main would
    never see the earlier value, and the transaction that wrote it would be applied, its other
    writes with it, though main refuses it.

    `kept_updates`: models with an onupdate main evaluates (an SQL expression, in an UPDATE
    only): a row's updates stay an update after its insert (merged with one another).

    `cascades` (see cascading_deletes): None for an insert or update of a model whose rows a
    delete earlier in the batch may delete or change on main (ON DELETE CASCADE, SET NULL): sent
    before that delete, it would be taken, then undone by it (a reading of an instrument deleted
    before it, which main refuses in order, reported applied and gone).

    `unmerged`: models whose tables main runs row triggers on as rows are inserted or updated
    (an audit trail, a revision count), or with an onupdate main evaluates from the row
    (`revision + 1`): each update of their rows stays a statement of its own,
    after the row's insert or earlier update, in order (BatchSql.writes keeps the updates'
    order), so the triggers see every write a transaction made, as it made it.

    `case_folded`: models whose key main compares without case (CITEXT). None for a row written
    under two texts of its key ('abc', 'ABC'): taken for two rows, a delete of 'abc' went after
    an update of 'ABC' that main refuses in their order. (Folded as record_key folds: more than
    a C-locale main does, which at worst sends a batch the careful way.)
    """
    net: dict[tuple[str, Any], RowWrite] = {}
    deleted_after: dict[tuple[str, Any], RowWrite] = {}
    updated_after: dict[tuple[str, Any], RowWrite] = {}
    kept: list[RowWrite] = []  # updates of unmerged models' rows after the row's first write, in order
    changed_by_delete: set[str] = set()  # models a delete earlier in the batch changes rows of
    for w in writes:
        if w.operation == "delete":
            if cascades and w.model in cascades:
                changed_by_delete |= cascades[w.model]
        elif w.model in changed_by_delete:
            return None
        key = (w.model, str(w.record_id))
        if case_folded and w.model in case_folded:
            key = (w.model, unicode_lower(key[1]))
            seen = net.get(key)
            if seen is not None and str(seen.record_id) != str(w.record_id):
                return None
        prev = net.get(key)
        if prev is None:
            net[key] = w
        elif prev.operation == "delete" or key in deleted_after:
            if w.operation != "delete":
                return None
            # a delete of a deleted row: stays deleted
        elif w.operation == "update" and unmerged and w.model in unmerged:
            kept.append(w)
        elif w.operation == "update" and kept_updates and prev.operation == "insert" and w.model in kept_updates:
            later = updated_after.get(key)
            merged = w if later is None else _merged(later, w, refusable)
            if merged is None:
                return None
            updated_after[key] = merged
        elif w.operation == "update":
            merged = _merged(prev, w, refusable)
            if merged is None:
                return None
            net[key] = merged
        elif w.operation == "delete":
            deleted_after[key] = w
        else:  # insert of a row already written in this batch: let the database say so
            return None
    return [*net.values(), *updated_after.values(), *kept, *deleted_after.values()]


def _merged(prev: RowWrite, update: RowWrite,
            refusable: dict[str, tuple[frozenset[str], frozenset[str]]] | None) -> RowWrite | None:
    """`update` merged into the earlier write of its row; None when that would hide from main a
    value of another transaction that main may refuse (see fold)."""
    if update.tx != prev.tx and refusable and _overwrites_refusable(prev.values, update.values,
                                                                    refusable.get(update.model)):
        return None
    return RowWrite(update.model, prev.operation, update.record_id, {**prev.values, **update.values},
                    prev.tx if prev.tx == update.tx else None)


def _overwrites_refusable(before: dict[str, Any], after: dict[str, Any],
                          refusable: tuple[frozenset[str], frozenset[str]] | None) -> bool:
    """Whether `after` changes a value of `before` main may refuse, or sets another constrained
    column beside one `before` set: a constraint over both (a CHECK of two columns, a unique key
    or foreign key of several) may refuse `before` alone and take the two merged. ("completed"
    without an end time, then the end time: folded, both were reported applied.)"""
    if refusable is None:
        return False
    constrained, not_null = refusable
    sets_constrained = None  # whether `before` sets a constrained column: asked once, if needed
    for column, value in after.items():
        if column in before:
            old = before[column]
            if old != value and (column in constrained or old is None and column in not_null):
                return True
        elif column in constrained:
            if sets_constrained is None:
                sets_constrained = any(c in constrained for c in before)
            if sets_constrained:
                return True
    return False


def _onupdate_reads_row(table: sa.Table) -> bool:
    """Whether an onupdate main evaluates may read the row it updates (a column of it, or SQL
    text, which cannot be looked into): each UPDATE changes the value again (`revision + 1`), so
    two updates merged into one would count one. (func.now() reads none: merged, as before.)"""
    for column in table.columns:
        onupdate = column.onupdate
        if onupdate is None or onupdate.is_scalar or onupdate.is_callable:
            continue
        arg = getattr(onupdate, "arg", None)
        if isinstance(arg, sa.TextClause) or any(isinstance(e, sa.ColumnClause) for e in sa_visitors.iterate(arg)):
            return True
    return False


def cascading_deletes(registry: ModelRegistry,
                      on_main: Iterable[tuple[str, str, bool]] = ()) -> dict[str, frozenset[str]]:
    """Per model: the models whose rows main deletes or changes when one of its rows is deleted
    (a foreign key ON DELETE CASCADE, SET NULL or SET DEFAULT; through the cascades' own).
    `on_main`: main's own such foreign keys, (parent, child, whether its rows are deleted), which
    the models may not declare (see _CASCADING_SQL)."""
    by_table = {spec.table: spec.name for spec in registry.models.values()}
    direct: dict[str, list[tuple[str, bool]]] = {}  # parent -> (child, whether its rows are deleted)
    for spec in registry.models.values():
        for constraint in spec.table.foreign_key_constraints:
            action = (constraint.ondelete or "").upper()
            parent = by_table.get(constraint.referred_table)
            if parent is not None and action in ("CASCADE", "SET NULL", "SET DEFAULT"):
                direct.setdefault(parent, []).append((spec.name, action == "CASCADE"))
    for parent, child, deleted in on_main:
        direct.setdefault(parent, []).append((child, deleted))
    out = {}
    for model in direct:
        reached: set[str] = set()
        todo = [model]
        while todo:
            for child, deleted in direct.get(todo.pop(), ()):
                if child not in reached:
                    reached.add(child)
                    if deleted:
                        todo.append(child)
        out[model] = frozenset(reached)
    return out


def refusable_columns(registry: ModelRegistry) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """Per model: the columns whose valid values main may still refuse (a foreign key, a unique
    or check constraint, a length or precision limit, a type this project does not know), and
    the NOT NULL ones (a column with a default may be given a null, which main refuses)."""
    out = {}
    for spec in registry.models.values():
        table = spec.table
        checked = any(isinstance(c, sa.CheckConstraint) for c in table.constraints)
        unique = {col for c in table.constraints if isinstance(c, sa.UniqueConstraint) for col in c.columns}
        unique |= {col for i in table.indexes if i.unique for col in i.columns}
        constrained = set()
        for key, column in spec.sql_columns.items():  # (values are keyed by attribute)
            type_ = column.type
            if (checked or column.foreign_keys or column.unique or column in unique
                    or spec.columns[key].kind in ("any", "array") or isinstance(type_, sa.Enum)
                    or isinstance(type_, sa.String) and type_.length is not None
                    or isinstance(type_, sa.Numeric) and not isinstance(type_, sa.Float) and type_.precision is not None
                    or isinstance(type_, sa.REAL)):
                constrained.add(key)
        out[spec.name] = (frozenset(constrained), frozenset(k for k, c in spec.sql_columns.items() if not c.nullable))
    return out


class ReplicaDatabase:
    """The site's streaming replica: how far it has replayed main's WAL."""

    def __init__(self, engine: sa.Engine, main_cluster: Callable[[], int | None] | None = None,
                 main_timeline: Callable[[], int | None] | None = None, ask_timeout_s: float | None = None):
        self.engine = engine
        # how long one ask may take (None: as long as it takes): a hung replica (its machine
        # stalled, the kernel still taking the query) held a pooled session's query, and the
        # drain's wait for the replay with it, for as long as it hung (see _ask)
        self.ask_timeout_s = ask_timeout_s
        self._asking: threading.Thread | None = None  # the last ask's thread, which may hang
        self.refusal: str | None = None  # replica_hot_standby_off's line while the last ask was refused so
        # main's system identifier (None: main unknown), for a caller that compares the replay with
        # main's commits: a standby of another cluster replays other WAL, whose positions, larger,
        # passed for the replay of every commit (the drain cleaned caches that reads still needed)
        self.main_cluster = main_cluster
        # ... and the timeline main writes (None: unknown): so does a standby left on another
        # timeline of main's cluster by a failover or a restore, past their fork
        self.main_timeline = main_timeline
        self.timeline: int | None = None  # the timeline it replayed, as the last ask said (replay_lsn)
        self.cluster: int | None = None  # ... and its system identifier

    def replay_lsn(self) -> int | None:
        """The replay position; None where there is none, or (with `main_cluster`, `main_timeline`)
        where it is not of main's WAL, `refusal` saying why."""
        try:
            lsn, cluster, timeline = self._ask()
            self.timeline, self.cluster = timeline, cluster
        except exc.SQLAlchemyError as error:
            self.refusal = replica_hot_standby_off(self.engine.url) if hot_standby_off(error) else None
            raise
        self.refusal = None
        if lsn and self.main_cluster is not None:
            main = self.main_cluster()
            if main != cluster:
                self.refusal = replica_of_another_cluster(self.engine.url, cluster, main)
                return None
        if lsn and self.main_timeline is not None:
            main = self.main_timeline()
            if main != timeline:
                self.refusal = replica_on_another_timeline(self.engine.url, timeline, main)
                return None
        return lsn_to_int(lsn) if lsn else None

    def missing_among(self, transaction_ids: list[str]) -> set[str]:
        """Which of these ids the replica's obs_pipeline_applied lacks, in one query (within
        ask_timeout_s): a commit whose position the replica has replayed is there only where the
        replica replays the WAL of the server that committed it (see Drain._clean). The answer
        is usually empty: the drain checks thousands of ids per batch, and reading them all back
        cost it 6–8 % of its throughput at 0 ms (an A/B bench, README)."""
        ids = sa.func.unnest(sa.bindparam("ids", type_=postgresql.ARRAY(sa.Text))).column_valued("id")
        query = sa.select(ids).where(~sa.exists().where(applied_transactions.c.transaction_id == ids))

        def missing() -> set[str]:
            with self.engine.connect() as conn:
                return set(conn.execute(query, {"ids": transaction_ids}).scalars())

        return self._ask(missing)

    def _query(self) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(REPLAY_TIMELINE_SQL)).one()

    def _ask(self, query: Callable[[], Any] | None = None) -> Any:
        """`query`'s answer (REPLAY_TIMELINE_SQL's row by default), within ask_timeout_s: asked
        on a daemon thread, left to hang where the replica does (no process waits for it at exit),
        each later ask failing at once while it hangs (sqlalchemy's TimeoutError: the replica as
        one that does not answer)."""
        query = query or self._query
        if self.ask_timeout_s is None:
            return query()
        if self._asking is not None and self._asking.is_alive():
            raise exc.TimeoutError(f"the replica has not answered an ask for over {self.ask_timeout_s:g} s (hung?)")
        answer: dict[str, Any] = {}

        def ask() -> None:
            try:
                answer["row"] = query()
            except BaseException as error:  # noqa: BLE001 - raised on the asking thread
                answer["error"] = error

        self._asking = threading.Thread(target=ask, name="obs-replica-ask", daemon=True)
        self._asking.start()
        self._asking.join(self.ask_timeout_s)
        if self._asking.is_alive():
            raise exc.TimeoutError(f"the replica did not answer in {self.ask_timeout_s:g} s (hung?)")
        if "error" in answer:
            raise answer["error"]
        return answer["row"]

    def wait_for_replay(self, lsn: int, timeout_s: float, give_up: Callable[[], bool] | None = None) -> int | None:
        """Poll until replay passes `lsn` (fast at first, then every 50 ms), or `give_up()` says
        to stop waiting; the last LSN seen."""
        deadline = time.monotonic() + timeout_s
        delay = 0.002
        seen = None
        while True:
            try:
                seen = self.replay_lsn()
            except exc.SQLAlchemyError:
                seen = None
            if seen is not None and seen >= lsn:
                return seen
            if time.monotonic() >= deadline or give_up is not None and give_up():
                return seen
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
