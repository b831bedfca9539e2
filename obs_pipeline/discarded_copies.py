"""Copies of transactions an operator discarded (`obs-pipeline failed discard`), pushed since.

A producer whose push's reply was lost pushes again (the spool's line, an LPUSH producer's
retry): after a discard, which deleted the id's status key, that copy looked like a new
transaction and was applied. The discard leaves `discarded:{id}` (SiteKeys.discarded: the
digests of the steps it dropped, for a week); the buffer script and the spool refuse such a copy
as it is pushed, and the drain drops one that reached the buffer anyway. This module is the
drain's side: which of a batch's entries are such copies, said with one warning."""

from __future__ import annotations

import json
import logging

from obs_pipeline import json_codec
from obs_pipeline.buffer_store import BufferStore
from obs_pipeline.model_registry import InvalidTransaction, ModelRegistry
from obs_pipeline.wire import Transaction, listed_steps_digest, one_line

log = logging.getLogger("obs_pipeline.drain")


def split_off(store: BufferStore, registry: ModelRegistry,
              txs: list[Transaction]) -> tuple[list[Transaction], list[Transaction]]:
    """(those to go on with, the copies of discarded ones among them), each in the batch's
    order. Only the steps the discard dropped count: other steps under a discarded id (a producer
    reused it) go on. One EXISTS where no discard was made for a week (BufferStore.discarded_steps)."""
    discarded = store.discarded_steps([tx.transaction_id for tx in txs])
    if not discarded:
        return txs, []
    kept, copies = [], []
    for tx in txs:
        is_copy = (tx.transaction_id in discarded
                   and listed_steps_digest(tx, registry) in discarded[tx.transaction_id])
        (copies if is_copy else kept).append(tx)
    return kept, copies


def is_invalid_copy(store: BufferStore, registry: ModelRegistry, tx_id: str, raw: str) -> bool:
    """Whether an entry that fails validation is a copy of one `failed discard` dropped: its
    steps digested as the discard digested its letter's, which holds them as pushed (as
    DeadLetters does for a letter it cannot read as a transaction). Dead-lettered, it was listed
    again, its status `failed` again: the discard undone."""
    discarded = store.discarded_steps([tx_id]).get(tx_id)
    if not discarded:
        return False
    try:
        doc = json.loads(raw)
        try:
            steps = listed_steps_digest(Transaction.from_dict(doc), registry)
        except (InvalidTransaction, TypeError, ValueError):
            steps = json_codec.digest(doc.get("steps"))
    except (ValueError, TypeError, AttributeError, RecursionError):
        return False
    return steps in discarded


def say_dropped(tx_id: str, site: str) -> None:
    log.warning("transaction %s of site %s was discarded (`obs-pipeline failed discard`); a copy of it "
                "pushed since (its producer's reply was lost?) is dropped, not applied", one_line(tx_id), site)
