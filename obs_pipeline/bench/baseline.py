"""Seed 000's background processor, re-implemented as the design to beat.

Faithful to seed 000 "Phase 3: Background Processing", "Phase 4: LSN Tracking" and
"Phase 5: Cache Cleanup", in the order and granularity the seed shows:

- loop: `LLEN` the buffer (sleep 0.1 s when empty), check main is reachable (the seed's
  `check_database_connectivity()`, whose body it does not show: here a `SELECT 1` on a pooled
  connection), then `RPOP` ONE transaction (pop and pray: a crash loses it);
- one ORM `Session` per transaction: `session.add(Model(**step.data))` per created record
  with the mapped classes of `obs_pipeline.models` (the unit of work sends one INSERT per
  table, the two RawDataFile rows in one statement, flushed step by step because the built-in
  models declare no relationship() for the unit of work to order by), `session.commit()`;
- `SELECT pg_current_wal_lsn()` on the same session after the commit (a new transaction, then
  closed: a rollback);
- poll the replica's `pg_last_wal_replay_lsn()` in a fresh session, sleeping 0.1 s between
  polls, until it has passed that LSN (timeout 30 s: then the caches' TTLs are extended);
- cleanup: `GET` the transaction, then `DEL` of `cache:ids`, `buffered` and `read_buffer` for
  every record, one key per command, and `DEL` of the transaction status.

Deliberate differences, none of which makes it slower: it is synchronous (the seed's asyncio
loop awaits every call in sequence anyway); LSNs are compared as numbers (the seed compares
`replica_lsn >= target_lsn` on the text, which is wrong for e.g. "0/9" vs "0/10"); a
bulk_create deletes the caches of each of its records (the seed's `step.data['id']` fails on a
list); failures are re-queued up to max_retries without the seed's backoff sleeps (none
happen in the benchmark).
"""

from __future__ import annotations

import json
import time

import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session

from obs_pipeline import models
from obs_pipeline.lsn import lsn_to_int
from obs_pipeline.config import Settings
from obs_pipeline.keys import SiteKeys
from obs_pipeline.model_registry import ModelRegistry


class SeedBaseline:
    def __init__(self, settings: Settings, poll_s: float = 0.1, replication_timeout_s: float = 30.0):
        self.keys = SiteKeys(settings.site)
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.main = sa.create_engine(settings.require_main())
        self.replica = sa.create_engine(settings.require_replica())
        self.registry = ModelRegistry.from_path("obs_pipeline.models:Base")
        self.classes = {m.class_.__name__: m.class_ for m in models.Base.registry.mappers}
        self.poll_s = poll_s
        self.replication_timeout_s = replication_timeout_s
        self.processed = self.failed = self.not_replicated = 0

    def close(self) -> None:
        self.main.dispose()
        self.replica.dispose()
        self.redis.close()

    # --- Phase 3 ----------------------------------------------------------------------------
    def run(self, until_empty: bool = True) -> dict:
        began = time.perf_counter()
        while True:
            if self.redis.llen(self.keys.buffer) == 0:
                if until_empty:
                    break
                time.sleep(0.1)
                continue
            if not self.check_database_connectivity():
                time.sleep(10)
                continue
            raw = self.redis.rpop(self.keys.buffer)
            if raw is None:
                continue
            transaction = json.loads(raw)
            try:
                self.process_single_transaction(transaction)
                self.processed += 1
            except Exception as error:  # noqa: BLE001 - the seed's handle_failure catches all
                self.handle_failure(transaction, error)
        return {"processed": self.processed, "failed": self.failed, "not_replicated": self.not_replicated,
                "elapsed_s": time.perf_counter() - began}

    def check_database_connectivity(self) -> bool:
        try:
            with self.main.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except sa.exc.SQLAlchemyError:
            return False

    def process_single_transaction(self, transaction: dict) -> None:
        with Session(self.main) as session:
            for step in transaction["steps"]:
                cls = self.classes[step["model_class"]]
                if step["operation"] in ("create", "bulk_create"):
                    rows = step["data"] if isinstance(step["data"], list) else [step["data"]]
                    for row in rows:
                        session.add(cls(**self._python(step["model_class"], row)))
                elif step["operation"] == "update":
                    record = session.get(cls, self._pk(step))
                    for name, value in self._python(step["model_class"], step["data"]).items():
                        setattr(record, name, value)
                elif step["operation"] == "delete":
                    session.delete(session.get(cls, self._pk(step)))
                session.flush()  # steps in order: the models declare no relationship() to sort by
            session.commit()
            lsn = session.execute(sa.text("SELECT pg_current_wal_lsn()::text")).scalar()
        self.wait_for_replication(lsn, transaction["transaction_id"])

    def handle_failure(self, transaction: dict, error: Exception) -> None:
        self.failed += 1
        transaction["retry_count"] = transaction.get("retry_count", 0) + 1
        transaction["last_error"] = str(error)
        target = self.keys.buffer if transaction["retry_count"] <= transaction.get("max_retries", 3) \
            else self.keys.failed
        self.redis.lpush(target, json.dumps(transaction, default=str))

    # --- Phase 4 ----------------------------------------------------------------------------
    def wait_for_replication(self, target_lsn: str, transaction_id: str) -> bool:
        start = time.time()
        while time.time() - start < self.replication_timeout_s:
            with Session(self.replica) as session:
                replica_lsn = session.execute(sa.text("SELECT pg_last_wal_replay_lsn()::text")).scalar()
            if replica_lsn and lsn_to_int(replica_lsn) >= lsn_to_int(target_lsn):
                self.cleanup_caches(transaction_id)
                return True
            time.sleep(self.poll_s)
        self.not_replicated += 1
        self.extend_cache_ttl(transaction_id)
        return False

    # --- Phase 5 ----------------------------------------------------------------------------
    def cleanup_caches(self, transaction_id: str) -> None:
        raw = self.redis.get(self.keys.transaction(transaction_id))
        if raw is None:
            return
        for model, rid in self._records(json.loads(raw)):
            self.redis.delete(self.keys.cached_id(model, rid))
            self.redis.delete(self.keys.buffered(model, rid))
            self.redis.delete(self.keys.read_buffer(model, rid))
        self.redis.delete(self.keys.transaction(transaction_id))

    def extend_cache_ttl(self, transaction_id: str) -> None:
        raw = self.redis.get(self.keys.transaction(transaction_id))
        if raw is None:
            return
        for model, rid in self._records(json.loads(raw)):
            self.redis.expire(self.keys.cached_id(model, rid), 3600)
            self.redis.expire(self.keys.buffered(model, rid), 3600)
        self.redis.expire(self.keys.transaction(transaction_id), 3600)

    # --- helpers ----------------------------------------------------------------------------
    def _python(self, model: str, values: dict) -> dict:
        spec = self.registry.model(model)
        return {k: spec.columns[k].to_python(v) for k, v in values.items()}

    def _pk(self, step: dict):
        spec = self.registry.model(step["model_class"])
        return spec.columns[spec.primary_key].to_python(step["conditions"][spec.primary_key])

    @staticmethod
    def _records(transaction: dict) -> list[tuple[str, str]]:
        out = []
        for step in transaction.get("steps", []):
            rows = step["data"] if isinstance(step.get("data"), list) else [step.get("data") or {}]
            for row in rows:
                rid = row.get("id") or (step.get("conditions") or {}).get("id")
                if rid is not None:
                    out.append((step["model_class"], str(rid)))
        return out


def measure_baseline(settings: Settings, poll_s: float = 0.1) -> dict:
    """Drain the site's buffer with the seed's loop; transactions/s until the buffer is empty."""
    baseline = SeedBaseline(settings, poll_s=poll_s)
    try:
        result = baseline.run(until_empty=True)
    finally:
        baseline.close()
    result["tx_per_s"] = result["processed"] / result["elapsed_s"] if result["elapsed_s"] else 0.0
    return result
