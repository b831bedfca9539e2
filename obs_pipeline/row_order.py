"""The order in which transactions wait to write each row, as the drain sees it for one batch.

Redis keeps it (redis_scripts.ROW_QUEUES): each row's head in `held_ids`, the others behind it
in `waiting:{row}`. The drain reads the part of it a batch can reach, then goes through the
batch in order: a transaction is applied now only if, on every row it uses, each one ahead of
it is applied before it in this batch; else it waits, and joins the queues of the rows it writes.
"""

from __future__ import annotations

from typing import Collection


def owner(mark: str) -> str:
    """The transaction a mark names ("!" + id: dead-lettered)."""
    return mark.removeprefix("!")


class RowOrder:
    """`heads`: row -> its head's mark (the drain's `holders`, shared: it takes free rows in it);
    `queues`: row -> the first marks behind the head, in order (as many as the batch can pass)."""

    def __init__(self, heads: dict[str, str], queues: dict[str, list[str]]) -> None:
        self.heads = heads
        self.queues = {row: list(marks) for row, marks in queues.items()}
        self._read = {row: set(marks) for row, marks in queues.items()}
        self._places = {row: {owner(m): i for i, m in enumerate(marks)} for row, marks in self.queues.items()}
        self._fronts: dict[str, int] = {}  # row -> how many of its queue are passed (in `ahead`)

    def blocker(self, row: str, tx_id: str, ahead: Collection[str], waited_on: Collection[str]) -> str | None:
        """The first mark ahead of `tx_id` on `row` that it must wait for, or None. `ahead`: those
        applied before it in this batch; a head in `waited_on` (others are parked behind it, and go
        first) lets nothing through."""
        head = self.heads.get(row)
        if head is None or owner(head) == tx_id:
            return None
        if head not in ahead or head in waited_on:
            return head
        queue = self.queues.get(row, [])
        mine = self._places.get(row, {}).get(tx_id, len(queue))
        front = self._fronts.get(row, 0)  # `ahead` only grows: each row's queue is walked once a batch
        while front < len(queue) and queue[front] in ahead:
            front += 1
        self._fronts[row] = front
        return queue[front] if front < mine else None

    def join(self, row: str, mark: str) -> None:
        """`mark` waits on `row` behind the others: in the place its transaction has, else last."""
        queue = self.queues.setdefault(row, [])
        places = self._places.setdefault(row, {})
        at = places.setdefault(owner(mark), len(queue))
        if at == len(queue):
            queue.append(mark)
        else:
            queue[at] = mark

    def was_read(self, row: str, mark: str) -> bool:
        """Whether `mark` was in the row's queue in Redis (not put there by this batch)."""
        return mark in self._read.get(row, ())
