"""What the drain does when main cancels a batch's statement (its statement_timeout or
lock_timeout, an administrator's cancel): a batch too large for the timeout, or waiting on a
lock, must not stall the site's queue behind it.

The batch is applied again in pieces, each its own main transaction, in order; after each
timeout the pieces are half as large, down to one transaction, and after a batch that goes
through they double back until batches are applied whole. A transaction that times out alone
`attempts` times in a row is given up (dead-lettered by the drain, with what uses its rows) and
the rest goes on. The state is kept in Redis (BufferStore.timeouts): a Dagster op retry, or the
next run, makes a new Drain.
"""

from __future__ import annotations

import logging

from obs_pipeline.apply import BatchResult, MainDatabase, StatementTimeout
from obs_pipeline.buffer_store import BufferStore
from obs_pipeline.model_registry import ModelRegistry
from obs_pipeline.wire import Transaction, claim_rows, written_ids

log = logging.getLogger("obs_pipeline.drain")


class TimeoutPieces:
    def __init__(self, store: BufferStore, main: MainDatabase, registry: ModelRegistry, attempts: int):
        self.store, self.main, self.registry, self.attempts = store, main, registry, attempts
        self.piece: int | None = None  # transactions per main transaction; None: the batch whole
        self.alone: dict[str, int] = {}  # per transaction, its timeouts alone in a row
        self._read = False

    @property
    def in_effect(self) -> bool:
        return self.piece is not None or bool(self.alone)

    def load(self) -> None:
        """What an earlier Drain of the site left, read once."""
        if not self._read:
            self.piece, self.alone = self.store.timeouts()
            self._read = True

    def apply(self, txs: list[Transaction]) -> BatchResult:
        """Main's answer for the batch (in the drain's worker thread): whole, or in pieces of
        `piece` transactions. What a failed transaction of a piece writes holds back those of
        later pieces that use it, as in one batch; an id of an earlier piece used again in a
        later one (a producer reused it) is dead-lettered there as reused, as in one batch,
        whether or not the first committed. A piece that times out raises
        StatementTimeout, saying its size (then `timed_out` halves the pieces); the batch is
        claimed again from the processing list, and what committed is skipped (applied_already).
        A transaction given up is in the result's `timed_out`."""
        piece = self.piece or len(txs)
        if piece >= len(txs):  # the batch whole, as ever (a bench or test that wraps apply_batch sees that call)
            try:
                return self.main.apply_batch(txs)
            except StatementTimeout as timeout:
                if not self._given_up(timeout, txs):
                    raise
                return BatchResult(timed_out=[(txs[0], self._reason(timeout, txs[0]))], pieces=0)
        merged = self.main.applied_already(txs)  # claimed again after a piece timed out
        merged.pieces = 0
        done = {id(tx) for tx in merged.already_applied}
        txs = [tx for tx in txs if id(tx) not in done]
        blocked: dict[str, str] = {}
        ahead: set[str] = set()  # the ids of the earlier pieces' transactions
        for start in range(0, len(txs), piece):
            part = txs[start:start + piece]
            trial = dict(blocked)  # kept only if the piece commits
            try:
                merged.add(self.main.apply_batch(part, trial, ahead))
                merged.pieces += 1
            except StatementTimeout as timeout:
                if not self._given_up(timeout, part):
                    raise
                merged.timed_out.append((part[0], self._reason(timeout, part[0])))
                claim_rows(trial, written_ids(part[0], self.registry), "!" + part[0].transaction_id)
            blocked = trial
            ahead.update(tx.transaction_id for tx in part)
        return merged

    def timed_out(self, timeout: StatementTimeout) -> None:
        """After a piece timed out: half as many transactions per piece from now on, down to
        one; one that timed out alone counts it."""
        if timeout.piece:
            self.piece = max(1, timeout.piece // 2)
        if timeout.alone is not None:
            tx_id = timeout.alone.transaction_id
            self.alone[tx_id] = self.alone.get(tx_id, 0) + 1
        self.store.save_timeouts(self.piece, self.alone, self.attempts)

    def passed(self, batch_size: int) -> None:
        """A batch went through while pieces were in effect: pieces twice as large next time,
        the batch whole once they reach `batch_size`; every count of timeouts in a row ends."""
        piece = self.piece * 2 if self.piece is not None else None
        self.piece = piece if piece is not None and piece < batch_size else None
        self.alone = {}
        self.store.save_timeouts(self.piece, self.alone, self.attempts)
        log.info("main applied the batch after statement timeouts; %s", "batches are applied whole again"
                 if self.piece is None else f"next in pieces of {self.piece} transactions")

    def retry_line(self, timeout: StatementTimeout, backoff_s: float) -> str:
        """The warning for a timeout the drain retries (after `timed_out`)."""
        alone = timeout.alone
        return (f"{timeout.kind} on main ({timeout}); retrying the batch in pieces of {self.piece or 1} "
                f"transaction(s) in {backoff_s:.1f} s" + ("" if alone is None else
                f"; {alone.transaction_id} timed out alone ({self.alone.get(alone.transaction_id)} of "
                f"{self.attempts} times in a row before it is dead-lettered)"))

    def _given_up(self, timeout: StatementTimeout, part: list[Transaction]) -> bool:
        """Whether the piece that timed out is one transaction that has now timed out alone
        `attempts` times in a row; says the piece on the error for `timed_out`."""
        timeout.piece = len(part)
        timeout.alone = tx = part[0] if len(part) == 1 else None
        return tx is not None and self.alone.get(tx.transaction_id, 0) + 1 >= self.attempts

    def _reason(self, timeout: StatementTimeout, tx: Transaction) -> str:
        """Why `tx`, which timed out alone, is dead-lettered: one line, what to do."""
        role = self.main.url.username or "<the drain's role>"
        if timeout.kind == "lock timeout":
            fix = (f"a session on main holds a lock it needs: end it (pg_stat_activity, pg_locks) or raise "
                   f"lock_timeout for the drain's role (ALTER ROLE {role} SET lock_timeout = ...)")
        elif timeout.kind == "statement cancelled":  # no timeout: someone, or a tool, cancels the drain's session
            fix = ("something on main cancels the drain's statements (pg_cancel_backend: an administrator, a "
                   "watchdog that ends long queries; main's log names it): stop it for the drain's role")
        else:
            fix = (f"it takes longer than main allows the drain's role: raise statement_timeout (ALTER ROLE {role} "
                   "SET statement_timeout = ...), or end the session on main holding a lock it waits for "
                   "(pg_stat_activity)")
        return (f"{timeout.kind} on main {self.attempts} times in a row, applied alone ({timeout}): "
                f"{fix}, then `obs-pipeline failed retry {tx.transaction_id}`")
