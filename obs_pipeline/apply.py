"""Applying batches of buffered transactions to main, and reading LSNs.

Fast path: the whole batch in one database transaction, writes to one row folded into one,
multi-row statements grouped by table, so the round trips do not grow with the batch.
If that fails for a reason in the data, the slow path applies the batch again one
transaction per savepoint, so a poison transaction is isolated and the others still commit.
Errors are sorted: transient ones (link, timeouts, read-only main) leave the batch to be
retried as it is; permanent ones are charged to the transaction that caused them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc

from obs_pipeline.model_registry import ModelRegistry
from obs_pipeline.schema import applied_transactions
from obs_pipeline.wire import RowWrite, Transaction, referenced_ids, created_ids, row_writes

# SQLSTATE classes/codes that say "try the same thing later", not "this data is wrong".
_TRANSIENT_SQLSTATES = ("08", "53", "57", "58", "40001", "40P01", "25006", "55P03", "HY")


class TransientError(RuntimeError):
    """Main is unreachable or refuses writes for now; retry the same batch later."""


@dataclass
class BatchResult:
    applied: list[Transaction] = field(default_factory=list)
    already_applied: list[Transaction] = field(default_factory=list)
    failed: list[tuple[Transaction, str]] = field(default_factory=list)  # (tx, reason)
    commit_lsn: int | None = None
    rows_per_model: dict[str, int] = field(default_factory=dict)
    writes_before_fold: int = 0
    writes_after_fold: int = 0
    round_trips: int = 0
    slow_path: bool = False


def make_engine(url: str, **kwargs: Any) -> sa.Engine:
    """An engine for a far-away database: keepalives notice a dead link, no pre-ping round trip."""
    connect_args = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10,
                    "keepalives_interval": 5, "keepalives_count": 3}
    if not url.startswith("postgresql"):
        connect_args = {}
    engine = sa.create_engine(
        url, connect_args=connect_args, pool_size=2, max_overflow=2, pool_recycle=3600,
        insertmanyvalues_page_size=10_000, executemany_batch_page_size=10_000, **kwargs,
    )
    return engine


def lsn_to_int(lsn: str) -> int:
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def int_to_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def is_transient(error: BaseException) -> bool:
    if isinstance(error, (exc.OperationalError, exc.InterfaceError, exc.TimeoutError,
                          exc.DisconnectionError, ConnectionError, TimeoutError, OSError)):
        code = getattr(getattr(error, "orig", None), "pgcode", None)
        return code is None or code.startswith(_TRANSIENT_SQLSTATES)
    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated:
            return True
        code = getattr(error.orig, "pgcode", None) or ""
        return code.startswith(_TRANSIENT_SQLSTATES)
    return False


def describe(error: BaseException) -> str:
    """One line an operator can act on."""
    orig = getattr(error, "orig", None) or error
    text = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {text[0] if text else ''}".strip()


class RoundTripCounter:
    """Counts statements sent to the server (each execute is one round trip with psycopg2)."""

    def __init__(self, engine: sa.Engine):
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._on_execute)
        event.listen(engine, "begin", self._on_execute)
        event.listen(engine, "commit", self._on_execute)
        event.listen(engine, "rollback", self._on_execute)

    def _on_execute(self, *args: Any, **kwargs: Any) -> None:
        self.count += 1


class MainDatabase:
    def __init__(self, engine: sa.Engine, registry: ModelRegistry, site: str):
        self.engine = engine
        self.registry = registry
        self.site = site
        self.round_trips = RoundTripCounter(engine)

    def apply_batch(self, transactions: list[Transaction]) -> BatchResult:
        """Commit every transaction of the batch that can be, each whole or not at all."""
        before = self.round_trips.count
        try:
            result = self._apply(transactions)
        except exc.SQLAlchemyError as error:
            if is_transient(error):
                raise TransientError(describe(error)) from error
            raise
        except OSError as error:
            raise TransientError(describe(error)) from error
        result.round_trips = self.round_trips.count - before
        return result

    def _apply(self, transactions: list[Transaction]) -> BatchResult:
        with self.engine.connect() as conn:
            try:
                result = BatchResult()
                with conn.begin():
                    todo = self._skip_applied(conn, transactions, result)
                    writes = [w for tx in todo for w in row_writes(tx, self.registry)]
                    folded = fold(writes)
                    if folded is None:
                        raise _NeedsSlowPath()
                    result.writes_before_fold, result.writes_after_fold = len(writes), len(folded)
                    result.rows_per_model = self._execute_writes(conn, folded)
                    result.applied = todo
                    self._record_applied(conn, result.applied)
            except (exc.DBAPIError, _NeedsSlowPath) as error:
                if isinstance(error, exc.DBAPIError) and is_transient(error):
                    raise
                # The batch rolled back whole; apply it again, one savepoint per transaction.
                result = BatchResult(slow_path=True)
                with conn.begin():
                    todo = self._skip_applied(conn, transactions, result)
                    self._write_one_by_one(conn, todo, result)
                    self._record_applied(conn, result.applied)
            if result.applied or result.already_applied:
                # Read after COMMIT returned: the flush LSN covers our commit record.
                lsn = conn.execute(sa.text("SELECT pg_current_wal_flush_lsn()::text")).scalar_one()
                conn.rollback()
                result.commit_lsn = lsn_to_int(lsn)
        return result

    def _skip_applied(self, conn: sa.Connection, txs: list[Transaction], result: BatchResult) -> list[Transaction]:
        """Drop transactions an earlier attempt already committed (effectively once)."""
        c = applied_transactions.c
        ids = [t.transaction_id for t in txs]
        done = {r[0] for r in conn.execute(sa.select(c.transaction_id).where(c.transaction_id.in_(ids)))}
        result.already_applied = [t for t in txs if t.transaction_id in done]
        return [t for t in txs if t.transaction_id not in done]

    def _record_applied(self, conn: sa.Connection, txs: list[Transaction]) -> None:
        if txs:
            conn.execute(applied_transactions.insert(),
                         [{"transaction_id": t.transaction_id, "site": self.site} for t in txs])

    def _execute_writes(self, conn: sa.Connection, writes: list[RowWrite]) -> dict[str, int]:
        """Multi-row statements per table: inserts parents first, updates, deletes children first."""
        inserts, updates, deletes = defaultdict(list), defaultdict(list), defaultdict(list)
        rows_per_model: dict[str, int] = defaultdict(int)
        for w in writes:
            model = self.registry.model(w.model)
            values = {name: model.columns[name].to_python(v) for name, v in w.values.items()}
            if w.operation == "insert":
                inserts[(model.name, tuple(sorted(values)))].append(values)
            elif w.operation == "update":
                values["_pk"] = model.columns[model.primary_key].to_python(w.record_id)
                updates[(model.name, tuple(sorted(values)))].append(values)
            else:
                deletes[model.name].append(model.columns[model.primary_key].to_python(w.record_id))
            rows_per_model[model.name] += 1
        rank = lambda name: self.registry.table_order.get(self.registry.model(name).table.name, 0)  # noqa: E731
        for (name, _), rows in sorted(inserts.items(), key=lambda kv: rank(kv[0][0])):
            conn.execute(self.registry.model(name).table.insert(), rows)
        for (name, columns), rows in updates.items():
            model = self.registry.model(name)
            table = model.table
            stmt = (table.update()
                    .where(table.c[model.primary_key] == sa.bindparam("_pk"))
                    .values({c: sa.bindparam(c) for c in columns if c != "_pk"}))
            conn.execute(stmt, rows)
        for name, ids in sorted(deletes.items(), key=lambda kv: -rank(kv[0])):
            model = self.registry.model(name)
            conn.execute(model.table.delete().where(model.table.c[model.primary_key].in_(ids)))
        return dict(rows_per_model)

    def _write_one_by_one(self, conn: sa.Connection, txs: list[Transaction], result: BatchResult) -> None:
        """One savepoint per transaction: a failing one is rolled back alone, and every later
        transaction that uses an id it creates is held back with it (never applied before it)."""
        blocked: dict[str, str] = {}  # id -> transaction that failed to create it
        for tx in txs:
            blocker = next((blocked[i] for i in referenced_ids(tx) if i in blocked), None)
            if blocker is not None:
                result.failed.append((tx, f"blocked by {blocker}"))
                blocked.update(dict.fromkeys(created_ids(tx), blocker))
                continue
            try:
                with conn.begin_nested():
                    rows = self._execute_writes(conn, list(row_writes(tx, self.registry)))
                result.applied.append(tx)
                for model, n in rows.items():
                    result.rows_per_model[model] = result.rows_per_model.get(model, 0) + n
            except exc.DBAPIError as error:
                if is_transient(error):
                    raise
                result.failed.append((tx, describe(error)))
                blocked.update(dict.fromkeys(created_ids(tx), tx.transaction_id))
        result.writes_before_fold = result.writes_after_fold = sum(result.rows_per_model.values())


class _NeedsSlowPath(Exception):
    """The batch cannot be folded (a row deleted then re-created): apply it step by step."""


def fold(writes: list[RowWrite]) -> list[RowWrite] | None:
    """Net effect per row, in first-touch order; None if a row is deleted then re-created.

    insert+update -> insert with merged values; update+update -> one update; insert+delete ->
    nothing; update+delete -> delete.
    """
    net: dict[tuple[str, Any], RowWrite | None] = {}
    for w in writes:
        key = (w.model, str(w.record_id))
        prev = net.get(key, ...)
        if prev is ...:
            net[key] = w
        elif prev is None or prev.operation == "delete":
            if w.operation == "insert":
                return None
            net[key] = prev  # update/delete of a deleted row: stays deleted
        elif w.operation == "update":
            net[key] = RowWrite(w.model, prev.operation, w.record_id, {**prev.values, **w.values})
        elif w.operation == "delete":
            net[key] = None if prev.operation == "insert" else w
        else:  # insert of a row already written in this batch: let the database say so
            return None
    return [w for w in net.values() if w is not None]


class ReplicaDatabase:
    """The site's streaming replica: how far it has replayed main's WAL."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine

    def replay_lsn(self) -> int | None:
        with self.engine.connect() as conn:
            lsn = conn.execute(sa.text("SELECT pg_last_wal_replay_lsn()::text")).scalar()
        return lsn_to_int(lsn) if lsn else None

    def wait_for_replay(self, lsn: int, timeout_s: float) -> int | None:
        """Poll until replay passes `lsn` (fast at first, then every 50 ms); the last LSN seen."""
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
            if time.monotonic() >= deadline:
                return seen
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def lag(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(sa.text(
                "SELECT pg_last_wal_replay_lsn()::text, pg_last_wal_receive_lsn()::text,"
                " extract(epoch from now() - pg_last_xact_replay_timestamp())")).one()
        return {"replica_lsn": row[0], "receive_lsn": row[1],
                "seconds_since_last_replayed_commit": float(row[2]) if row[2] is not None else None}
