"""Smart queries: the replica merged with what is still buffered (read your writes).

Caches are read first, then the replica: a record cleaned from the caches was already
replayed by the replica, so the later replica read has it (no flicker). Buffered creates
come from `buffered:*`, pending updates and deletes from the per-record read buffer,
applied in the order they were buffered.
"""

from __future__ import annotations

import json
import operator
from typing import Any, Callable

import sqlalchemy as sa

from obs_pipeline.buffer_store import BufferStore
from obs_pipeline.model_registry import InvalidTransaction, ModelRegistry, ModelSpec

_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}
_DELETED = object()


class SmartQuery:
    def __init__(self, store: BufferStore, registry: ModelRegistry, replica_url: str | None):
        self.store = store
        self.registry = registry
        self.replica_url = replica_url
        self._engine: sa.Engine | None = None

    @property
    def engine(self) -> sa.Engine | None:
        if self._engine is None and self.replica_url:
            self._engine = sa.create_engine(self.replica_url, pool_size=2, max_overflow=2,
                                            connect_args={"options": "-c timezone=UTC", "connect_timeout": 5})
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    # --- public -------------------------------------------------------------------------------
    def get(self, model: str, record_id: Any) -> dict[str, Any] | None:
        spec = self.registry.model(model)
        rid = str(spec.columns[spec.primary_key].check(record_id)) if record_id is not None else None
        buffered = self._buffered_states(spec, [rid])
        state = buffered.get(rid)
        if state is _DELETED:
            return None
        if state is not None and state[0] is not None:
            return state[0]
        base = self._replica_rows(spec, [rid]).get(rid)
        if base is None:
            return None
        return _overlay(base, state[1]) if state else base

    def search(self, model: str, filters: dict[str, Any]) -> list[dict[str, Any]]:
        spec = self.registry.model(model)
        predicates = _predicates(spec, filters)
        ids = [m.decode() for m in self.store.redis.smembers(self.store.keys.model_index(spec.name))]
        buffered = self._buffered_states(spec, ids)
        overlaid_only = [i for i, s in buffered.items() if s is not _DELETED and s[0] is None]
        rows = self._replica_search(spec, filters)
        rows.update(self._replica_rows(spec, [i for i in overlaid_only if i not in rows]))
        for rid, state in buffered.items():
            if state is _DELETED:
                rows.pop(rid, None)
            elif state[0] is not None:
                rows[rid] = state[0]
            elif rid in rows:
                rows[rid] = _overlay(rows[rid], state[1])
        return [row for row in rows.values() if all(p(row) for p in predicates)]

    def search_frame(self, model: str, filters: dict[str, Any]):
        import pandas as pd

        spec = self.registry.model(model)
        frame = pd.DataFrame(self.search(model, filters), columns=list(spec.columns))
        for name, column in spec.columns.items():
            if column.kind == "datetime":
                frame[name] = pd.to_datetime(frame[name], utc=True, format="ISO8601")
            elif column.kind in ("uuid", "str"):
                frame[name] = frame[name].astype("string")
            elif column.kind == "int" and column.required:
                frame[name] = frame[name].astype("Int64")
        return frame

    # --- internals ----------------------------------------------------------------------------
    def _buffered_states(self, spec: ModelSpec, ids: list[str]) -> dict[str, Any]:
        """id -> _DELETED, or (buffered record with overlays applied | None, overlays)."""
        if not ids:
            return {}
        keys = self.store.keys
        pipe = self.store.redis.pipeline(transaction=False)
        for rid in ids:
            pipe.get(keys.buffered(spec.name, rid))
            pipe.lrange(keys.read_buffer(spec.name, rid), 0, -1)
        replies = pipe.execute()
        states: dict[str, Any] = {}
        for index, rid in enumerate(ids):
            raw, overlays = replies[2 * index], [json.loads(o) for o in replies[2 * index + 1]]
            if raw is None and not overlays:
                continue  # cleaned meanwhile: the replica has it
            if any(o["op"] == "delete" for o in overlays):
                states[rid] = _DELETED
                continue
            record = _overlay(json.loads(raw), overlays) if raw is not None else None
            states[rid] = (record, overlays)
        return states

    def _replica_rows(self, spec: ModelSpec, ids: list[str]) -> dict[str, dict[str, Any]]:
        if not ids or self.engine is None:
            return {}
        pk = spec.table.c[spec.primary_key]
        values = [spec.columns[spec.primary_key].to_python(i) for i in ids]
        return self._select(spec, sa.select(spec.table).where(pk.in_(values)))

    def _replica_search(self, spec: ModelSpec, filters: dict[str, Any]) -> dict[str, dict[str, Any]]:
        if self.engine is None:
            return {}
        stmt = sa.select(spec.table)
        for name, condition in filters.items():
            column, col = spec.table.c[name], spec.columns[name]
            if isinstance(condition, dict):
                for op, value in condition.items():
                    stmt = stmt.where(_COMPARISONS[op](column, col.to_python(col.check(value))))
            elif isinstance(condition, (list, tuple, set)):
                stmt = stmt.where(column.in_([col.to_python(col.check(v)) for v in condition]))
            elif condition is None:
                stmt = stmt.where(column.is_(None))
            else:
                stmt = stmt.where(column == col.to_python(col.check(condition)))
        return self._select(spec, stmt)

    def _select(self, spec: ModelSpec, stmt: sa.Select) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
        out = {}
        for row in rows:
            record = {name: spec.columns[name].check(row[spec.table.c[name].name]) if row[spec.table.c[name].name]
                      is not None else None for name in spec.columns}
            out[str(record[spec.primary_key])] = record
        return out


def _overlay(record: dict[str, Any], overlays: list[dict[str, Any]]) -> dict[str, Any]:
    merged = dict(record)
    for entry in overlays:
        if entry["op"] == "update":
            merged.update(entry["data"])
    return merged


def _predicates(spec: ModelSpec, filters: dict[str, Any]) -> list[Callable[[dict[str, Any]], bool]]:
    """Check filters (unknown columns and operators are errors) and build Python predicates
    that agree with the SQL the replica runs."""
    if not isinstance(filters, dict):
        raise InvalidTransaction("search filters must be a dict of column -> value")
    predicates = []
    for name, condition in filters.items():
        col = spec.column(name)

        def value_of(row: dict[str, Any], col=col) -> Any:
            v = row.get(col.name)
            return None if v is None else col.to_python(v)

        try:
            if isinstance(condition, dict):
                for op, v in condition.items():
                    if op not in _COMPARISONS:
                        raise InvalidTransaction(f"search on {spec.name}.{name}: unknown operator {op!r} "
                                                 f"(use one of {', '.join(_COMPARISONS)})")
                    target, compare = col.to_python(col.check(v)), _COMPARISONS[op]
                    predicates.append(lambda row, f=value_of, t=target, c=compare: f(row) is not None and c(f(row), t))
            elif isinstance(condition, (list, tuple, set)):
                targets = {col.to_python(col.check(v)) for v in condition}
                predicates.append(lambda row, f=value_of, t=targets: f(row) in t)
            elif condition is None:
                predicates.append(lambda row, f=value_of: f(row) is None)
            else:
                target = col.to_python(col.check(condition))
                predicates.append(lambda row, f=value_of, t=target: f(row) == t)
        except ValueError as exc:
            raise InvalidTransaction(f"search on {spec.name}.{name}: {exc}") from None
    return predicates
