"""What every benchmark phase shares: the stack, a fresh site per phase, clean tables.

Each phase gets its own site name (its own Redis keys) and empty tables on main, with obs
units 1..200 for the foreign keys, and waits until the replica has replayed that setup, so
no phase pays for the previous one's leftovers. Setup goes to main directly (past the
latency proxy): only the measured work pays the round-trip time.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis
import sqlalchemy as sa

from obs_pipeline.lsn import lsn_to_int
from obs_pipeline.config import Settings
from obs_pipeline.model_registry import ModelRegistry
from obs_pipeline.schema import applied_transactions, create_schema

OBS_UNITS = 200
MODELS = "obs_pipeline.models:Base"


@dataclass
class BenchContext:
    stack: object                      # obs_pipeline.stack.LocalStack
    work_dir: Path                     # scratch: spool, Dagster home, logs
    quick: bool = False
    rtt_ms: int = 0                    # the round trip the stack is set to now
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.registry = ModelRegistry.from_path(MODELS)
        self.direct = sa.create_engine(self.stack.main_direct_url)
        self.replica = sa.create_engine(self.stack.env()["OBS_REPLICA_DB_URL"])
        self.redis = redis.Redis.from_url(self.stack.env()["OBS_REDIS_URL"], socket_timeout=60)
        create_schema(self.direct, self.registry)

    def close(self) -> None:
        self.direct.dispose()
        self.replica.dispose()
        self.redis.close()

    def settle(self) -> float:
        """Let a stack that has just been made stop writing before anything is timed: flush the
        kernel's dirty pages (initdb's, pg_basebackup's), so that Redis's AOF fsyncs do not queue
        behind them, and checkpoint main. Returns the seconds it took (0.03-0.04 s in this
        session's runs: the stack had little left to write by then)."""
        began = time.monotonic()
        os.sync()
        with self.direct.connect() as conn:
            conn.execute(sa.text("CHECKPOINT"))  # fsyncs what it writes
        self.wait_replica()
        return round(time.monotonic() - began, 2)

    def say(self, message: str) -> None:
        """Progress on stderr-like output: a full run takes minutes, the operator should see it move."""
        line = f"[bench {time.strftime('%H:%M:%S')}] {message}"
        self.log.append(line)
        print(line, flush=True)

    def set_rtt(self, rtt_ms: int) -> None:
        """Route main (drain and WAL stream) through a proxy delaying each direction by rtt/2."""
        if rtt_ms == self.rtt_ms:
            return
        self.say(f"stack: main latency {rtt_ms // 2} ms each way ({rtt_ms} ms round trip)")
        self.stack.up(main_latency_ms=rtt_ms // 2)
        self.rtt_ms = rtt_ms
        self.replica.dispose()
        self.wait_replica()

    def phase(self, name: str) -> Settings:
        """A fresh site and empty tables (with obs units 1..200) for one measurement."""
        self.truncate()
        env = self.stack.env()
        site = f"bench_{name}_{uuid.uuid4().hex[:8]}"
        spool = self.work_dir / "spool"
        return Settings(site=site, redis_url=env["OBS_REDIS_URL"], main_db_url=env["OBS_MAIN_DB_URL"],
                        replica_db_url=env["OBS_REPLICA_DB_URL"], models=MODELS, spool_dir=str(spool))

    def truncate(self) -> None:
        tables = ", ".join([t.name for t in self.registry.metadata.sorted_tables] + [applied_transactions.name])
        with self.direct.begin() as conn:
            conn.execute(sa.text(f"TRUNCATE {tables} CASCADE"))
            conn.execute(sa.text(f"INSERT INTO obs_unit (id, name) SELECT n, 'obs unit ' || n "
                                 f"FROM generate_series(1, {OBS_UNITS}) n"))
        self.wait_replica()

    def wait_replica(self, timeout: float = 120.0) -> None:
        with self.direct.connect() as conn:
            target = lsn_to_int(conn.execute(sa.text("SELECT pg_current_wal_flush_lsn()::text")).scalar_one())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with self.replica.connect() as conn:
                    replay = conn.execute(sa.text("SELECT pg_last_wal_replay_lsn()::text")).scalar()
                if replay and lsn_to_int(replay) >= target:
                    return
            except sa.exc.OperationalError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"the replica did not replay main's LSN within {timeout:.0f} s")

    def forget_site(self, site: str) -> None:
        """Drop a finished phase's Redis keys so Redis memory figures of later phases stay clean."""
        batch = []
        for key in self.redis.scan_iter(match=f"site:{site}:*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                self.redis.unlink(*batch)
                batch = []
        if batch:
            self.redis.unlink(*batch)

    def start_redis_watch(self, threshold_ms: int = 20) -> None:
        """Have Redis log every event (command, fork, AOF write or fsync) slower than threshold_ms."""
        self.redis.config_set("latency-monitor-threshold", threshold_ms)
        self.redis.execute_command("LATENCY", "RESET")
        slowlog_was = self.redis.config_get("slowlog-log-slower-than")["slowlog-log-slower-than"]
        self.redis.config_set("slowlog-log-slower-than", threshold_ms * 1000 // 4)
        self.redis.slowlog_reset()
        self._watch = (threshold_ms, slowlog_was, self.redis.info("stats"))

    def redis_watch(self) -> dict:
        """What Redis saw since start_redis_watch: its slow events and AOF rewrites, which tell
        whether an ingest stall was Redis busy with a command, a fork or the disk."""
        threshold_ms, slowlog_was, before = self._watch
        events = {}
        for name, _at, latest_ms, max_ms in self.redis.execute_command("LATENCY", "LATEST"):
            name = name.decode() if isinstance(name, bytes) else name
            history = self.redis.execute_command("LATENCY", "HISTORY", name)  # one sample per second
            events[name] = {"seconds_with_event": len(history), "max_ms": max_ms,
                            "sum_of_per_second_max_ms": sum(int(ms) for _t, ms in history)}
        self.redis.config_set("latency-monitor-threshold", 0)
        slow: dict[str, list[float]] = {}
        for entry in self.redis.slowlog_get(128):
            command = entry["command"].decode(errors="replace") if isinstance(entry["command"], bytes) else entry["command"]
            words = command.split(" ")
            name = " ".join(words[:2]) if words[0].upper() in ("EVALSHA", "EVAL") else words[0]
            slow.setdefault(name[:60], []).append(entry["duration"] / 1000)
        self.redis.config_set("slowlog-log-slower-than", slowlog_was)
        info = {**self.redis.info("persistence"), **self.redis.info("stats")}
        return {"threshold_ms": threshold_ms, "latency_events": events,
                "slowlog_ms_by_command (last 128, over threshold/4)": {
                    name: {"count": len(ms), "max_ms": max(ms), "median_ms": median(ms)} for name, ms in slow.items()},
                "forks": int(info["total_forks"]) - int(before["total_forks"]),
                "latest_fork_ms": int(info["latest_fork_usec"]) / 1000,
                "aof_size_mb": int(info["aof_current_size"]) / 2**20,
                "aof_last_rewrite_s": int(info["aof_last_rewrite_time_sec"]),
                "aof_last_cow_mb": int(info["aof_last_cow_size"]) / 2**20,
                "aof_delayed_fsync": int(info["aof_delayed_fsync"])}

    def used_memory(self) -> int:
        return int(self.redis.info("memory")["used_memory"])

    def model_rows(self) -> int:
        """Rows in the model tables on main (obs units excluded): what a phase actually wrote."""
        names = [t.name for t in self.registry.metadata.sorted_tables if t.name != "obs_unit"]
        with self.direct.connect() as conn:
            return sum(conn.execute(sa.text(f"SELECT count(*) FROM {n}")).scalar_one() for n in names)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 1,000 samples is the 990th)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
