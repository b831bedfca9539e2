"""The drain as plain functions: claim -> apply -> acknowledge -> await replay -> clean.

Used by the Dagster job and by `obs-pipeline drain`. One drain per site holds the lease;
a claimed batch stays in the processing list until main has committed it, so a drain that
dies leaves it to the next one, which skips what already committed.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import redis

from obs_pipeline import discarded_copies, json_codec
from obs_pipeline.apply import (FAR_ROUND_TRIP_S, BatchResult, MainDatabase, RecordedTimeline, ReplicaDatabase,
                                StatementTimeout, TransientError, applied_records_refused, first_line,
                                make_engine)
from obs_pipeline.buffer_store import (LOST_IN_FAILOVER, LOST_READS, BufferStore, HoldsChanged, LeaseLost, Outcome,
                                        ProcessingChanged)
from obs_pipeline.column_values import seconds, whole_number
from obs_pipeline.config import DAY_S, ConfigError, Settings
from obs_pipeline.lsn import int_to_lsn
from obs_pipeline.model_registry import InvalidTransaction, ModelRegistry
from obs_pipeline.row_order import RowOrder
from obs_pipeline.timeout_pieces import TimeoutPieces
from obs_pipeline.wire import (Transaction, cache_footprint, claim_rows, is_storable_id, one_line,
                               referenced_ids, validate, written_ids)

log = logging.getLogger("obs_pipeline.drain")
# The cyclic collector's first threshold while draining. A parsed transaction keeps 25 objects
# alive until it is acknowledged (measured), and two batches of 2,000 are alive at once (one
# applying, one parsed behind it): at 50,000 the collector ran about once a batch, scanning them
# with the GIL held (0.09-0.19 s of a 2 s drain of 20,000 at 0 ms); at this it did not run once.
# They are freed by reference counting and make no cycles (a drain of 60,000 left none). Fixed,
# not grown with far main's larger batches (where the drain waits on the link, not the CPU): it
# also bounds what cyclic garbage (a caught error's frames) can pile up before a collection.
GC_THRESHOLD = 200_000
DRAIN_APPLICATION_NAME = "obs-pipeline drain"  # its sessions on main and the replica
BACKGROUND_NICENESS = 10  # what the CLI and Dagster run the drain at: behind the scripts, Redis and the replica
ROUND_TRIP_SHARE = 0.2    # a far main's round trip may take at most this share of a batch's apply
FAR_BATCH_SIZE = 10_000   # how far batches may grow by default: the drain's peak RSS 226 MiB there (bench)
# While the replica replays another timeline than main's session said, main is asked again at
# most this often (a failover since that session; a new one costs main a connection)
MAIN_TIMELINE_RECHECK_S = 30.0
REPLICA_ASK_TIMEOUT_S = 10.0  # a replica that takes longer to say how far it replayed is taken for down


def replica_ask_timeout_s(lease_ttl_s: float) -> float:
    """How long the drain waits for one answer of the replica: the lease is renewed around the
    asks (_lease_kept), so at most a third of it, as the parts between renewals; but a second at
    least (a busy replica's first connect), whatever a short lease says."""
    return max(1.0, min(REPLICA_ASK_TIMEOUT_S, lease_ttl_s / 3))

@dataclass(frozen=True)
class DrainConfig:
    batch_size: int = 2000                # transactions per batch; the size where main is near
    max_batch_size: int | None = None     # where main is far, batches grow up to this (batch_size_for);
    #                                       None: FAR_BATCH_SIZE, or batch_size if that is larger
    lease_ttl_s: float = 60.0
    replication_timeout_s: float = 10.0   # per batch; on timeout caches stay, a later pass cleans
    idle_poll_s: float = 0.2
    backoff_initial_s: float = 0.5        # transient errors: pause, retry the same batch
    backoff_max_s: float = 30.0
    retry_base_s: float = 5.0             # permanent errors: 5 s, 10 s, 20 s ... (+ jitter)
    niceness: int | None = None           # run's CPU priority (the CLI and Dagster: 10), so scripts
    #                                       buffering on the same machine come first; None: unchanged
    aof_check_s: float | None = 30.0      # how often, when idle, to see whether Redis's AOF is worth
    #                                       compacting (BufferStore.compact_aof); None: leave it to Redis
    timeout_attempts: int = 5             # a transaction that main cancels (statement or lock timeout)
    #                                       this many times in a row, applied alone, is dead-lettered

    def __post_init__(self) -> None:
        """Counts and seconds as int and float: np.int64 (a value from a DataFrame or an array)
        is no `int` to isinstance and was refused; True was taken for 1. Anything else is
        refused here in one line, not by the run (a negative pause raised from time.sleep
        mid-run, the lease held)."""
        self._set("batch_size", whole_number(self.batch_size, "batch_size must be a whole number of transactions >= 1",
                                             least=1))
        if self.max_batch_size is not None:
            self._set("max_batch_size", whole_number(
                self.max_batch_size, f"max_batch_size must be a whole number >= batch_size ({self.batch_size})",
                least=self.batch_size))
        self._set("timeout_attempts", whole_number(self.timeout_attempts, "timeout_attempts must be a whole number >= 1",
                                                   least=1))
        if self.niceness is not None:
            self._set("niceness", whole_number(self.niceness, "niceness must be a whole number from -20 to 19",
                                               least=-20, most=19))
        # SET PX takes whole milliseconds, at least 1
        self._set("lease_ttl_s", seconds(self.lease_ttl_s, f"lease_ttl_s must be 0.001 to {DAY_S:.0f} s "
                                                           "(the lease's Redis expiry)", least=0.001, most=DAY_S))
        for name in ("replication_timeout_s", "retry_base_s", "idle_poll_s", "backoff_initial_s", "backoff_max_s"):
            # (NaN too; inf would wait for ever)
            self._set(name, seconds(getattr(self, name), f"{name} must be 0 or more seconds, and finite",
                                    least=0.0, finite=True))
        if self.aof_check_s is not None:
            self._set("aof_check_s", seconds(self.aof_check_s, "aof_check_s must be 0 or more seconds, and "
                                                               "finite, or None", least=0.0, finite=True))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # (frozen)

    @property
    def largest_batch(self) -> int:
        return self.max_batch_size if self.max_batch_size is not None else max(FAR_BATCH_SIZE, self.batch_size)


def batch_size_for(round_trip_s: float | None, apply_s: float, transactions: int, least: int, most: int) -> int:
    """The batch size at which main's round trip is at most ROUND_TRIP_SHARE of a batch's apply,
    from the last full batch (`transactions` applied in `apply_s`). A batch costs one round trip
    plus a time per transaction, so where main is far, larger batches make the link cheap; where
    it is near (under FAR_ROUND_TRIP_S), `least` already does. Rounded up to hundreds, within
    [least, most]."""
    if round_trip_s is None or round_trip_s < FAR_ROUND_TRIP_S or transactions <= 0:
        return least
    return batch_size_for_link(round_trip_s, (apply_s - round_trip_s) / transactions, least, most)


def batch_size_for_link(round_trip_s: float, per_transaction: float | None, least: int, most: int) -> int:
    """batch_size_for, from main's round trip and its apply time per transaction."""
    if round_trip_s < FAR_ROUND_TRIP_S or per_transaction is None:
        return least
    if per_transaction <= 0:  # the batch cost no more than the round trip: as large as allowed
        return most
    wanted = round_trip_s * (1 - ROUND_TRIP_SHARE) / (ROUND_TRIP_SHARE * per_transaction)
    return max(least, min(most, math.ceil(round(wanted) / 100) * 100))


def first_claim_size(size: int, least: int, round_trip_s: float, round_trips: int | None,
                     parse_s_per_transaction: float | None, backlog: int) -> int:
    """A run's first claim, where later ones are `size` and `backlog` transactions wait. It is
    parsed before main has anything to do (later claims are parsed while main applies the one
    before): a first claim of `least` starts main sooner by (size - least) parses, worth it
    where a full claim's parse outlasts a batch's round trips, but only if it adds no batch for
    the backlog (its last batch is short anyway). Measured (the notes, alternated pairs): 10,000
    at 50 ms starting at 2,000 faster in 6 of 8 pairs, median +10 %; 50,000 at 250 ms, 6 batches
    against 5, 6-13 % slower in 3. Without the figures (a link of an earlier version), `size`."""
    if size <= least or backlog <= least or round_trips is None or parse_s_per_transaction is None:
        return size
    adds_a_batch = 1 + math.ceil((backlog - least) / size) > math.ceil(backlog / size)
    return least if not adds_a_batch and size * parse_s_per_transaction > round_trips * round_trip_s else size


FIRST_CLAIM_TIMED = 100  # claims this large or larger time the parse (first_claim_size)
RETRY_DELAY_MAX_S = 3600.0  # a producer's own retry_count/max_retries may be large: an hour at most


def retry_delay(base_s: float, attempt: int) -> float:
    """Exponential backoff with jitter for the `attempt`-th retry (1, 2, ...): base, 2x, 4x ...,
    at most RETRY_DELAY_MAX_S."""
    return min(base_s * 2.0 ** min(attempt - 1, 64), RETRY_DELAY_MAX_S) * random.uniform(0.8, 1.2)


@dataclass
class BatchReport:
    transactions: int = 0
    applied: int = 0
    already_applied: int = 0
    retried: int = 0
    held: int = 0
    dead_lettered: list[dict[str, Any]] = field(default_factory=list)
    reclaimed: bool = False
    rows_per_model: dict[str, int] = field(default_factory=dict)
    writes_before_fold: int = 0
    writes_after_fold: int = 0
    round_trips: int = 0
    batch_size: int = 0        # what was claimed for: grows from batch_size where main is far
    pieces: int = 1            # main transactions it was applied in: more after a statement timeout
    main_round_trip_ms: float | None = None
    commit_lsn: str | None = None
    replay_lsn: str | None = None
    replicated: int = 0
    replication_wait_s: float = 0.0
    duration_s: float = 0.0

    def metadata(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "dead_lettered"} | {
            "dead_lettered": len(self.dead_lettered)}


@dataclass
class DrainSummary:
    batches: int = 0
    applied: int = 0
    already_applied: int = 0  # found committed on main already: an acknowledgement lost, or pushed twice
    dead_lettered: int = 0
    replicated: int = 0
    transient_errors: int = 0
    aof_compactions: int = 0
    stopped_because: str = ""
    replica_stalled: bool = False  # stopped with committed batches the replica has not replayed
    lease_lost: str = ""  # how another drain took the lease mid-run ("another drain took the lease")

    def count(self, report: BatchReport) -> None:
        """One more batch done (the run's loop; `drain`'s total over the runs it starts)."""
        self.batches += 1
        self.applied += report.applied
        self.already_applied += report.already_applied
        self.dead_lettered += len(report.dead_lettered)
        self.replicated += report.replicated

    def drained_line(self) -> str:
        """What the run applied, for its last log line (the CLI's, the Dagster op's). What it found
        committed already is said: counted as applied alone, a run that took a batch whose
        acknowledgement was lost said "drained 0 transactions" of it."""
        already = (f", and found {self.already_applied} applied already (committed before their acknowledgement "
                   "was lost, or pushed twice)" if self.already_applied else "")
        return f"drained {self.applied} transactions in {self.batches} batches{already}"


class DrainBusy(RuntimeError):
    """Another drain holds the site's lease."""


class FailoverRequeued(RuntimeError):
    """Transactions that a failover of main lost were put back in the processing list (see
    Drain._settle_failover): the batch claimed waits there behind them, claimed again at once."""


@dataclass
class _Batch:
    """A claimed batch, parsed: what is left to do with it, and what to report."""
    report: BatchReport
    outcome: Outcome
    size: int = 0  # entries asked for: a claim this full means more wait
    transactions: list[Transaction] = field(default_factory=list)
    # (tx id, steps digest) -> its cache keys: a producer may reuse an id for other steps, and
    # both may be in one batch (keyed by id alone, the second's replaced the first's)
    footprints: dict[tuple[str, str | None], dict[str, list]] = field(default_factory=dict)


class MainIdentity:
    """Which cluster main is and which timeline it writes, as the drain knows them: the replica's
    replay counts only where it replays that WAL (ReplicaDatabase.main_cluster, .main_timeline)."""

    def __init__(self, main: MainDatabase, store: BufferStore, replica_timeline: Callable[[], int | None],
                 replica_cluster: Callable[[], int | None] = lambda: None):
        self.main = main
        self.store = store
        self.replica_timeline = replica_timeline  # the timeline the replica replayed, as its last ask said
        self.replica_cluster = replica_cluster  # ... and its system identifier
        self.applying: Any = None  # the worker's apply in flight (its future), if any: see cluster()
        self._cluster: int | None = None  # see cluster()
        self._timeline: int | None = None  # as the last acknowledgement recorded it: see timeline()
        self._asked_timeline = False  # whether this run asked main for it (timeline())
        self._timeline_rechecked_at = -math.inf  # when main was last asked again for it (timeline())

    def acknowledged(self, outcome: Outcome) -> None:
        """After acknowledge: main's cluster as it recorded it, for the commit it names."""
        if outcome.commit_lsn is not None and outcome.main_cluster is not None:
            self._cluster = outcome.main_cluster

    def settled(self, cluster: int) -> None:
        """After Drain._settle_failover: every waiting chunk is of main's cluster now (those of
        another were asked for on it), so its replica's replay counts, before a commit records it."""
        self._cluster = cluster

    def main_idle(self) -> bool:
        """Whether main's session may be used here: not while the worker thread has it."""
        return self.applying is None or self.applying.done()

    def cluster(self) -> int | None:
        """The system identifier of the main whose commits await the replica, which the
        replica's must be for its replay to count (ReplicaDatabase.main_cluster): as the
        acknowledgement of the last commit recorded it, so a drain cleans while main is down.
        Batches no acknowledgement named (a drain of an earlier version) need main's own, asked
        only while no apply is in flight (the worker thread has the session); None while main
        does not answer."""
        if self._cluster is None:
            self._cluster = self.store.main_cluster()
        if self._cluster is None and self.main_idle():
            try:
                self._cluster = self.main.identify()
            except (TransientError, ConfigError):  # said where main applies a batch; caches stay meanwhile
                pass
        return self._cluster

    def timeline(self) -> int | None:
        """The timeline main writes, which the replica must replay for its position to count
        (ReplicaDatabase.main_timeline): as main's session says, asked once per Drain if no batch
        opened one (a failover since the last commit moves it; the commits before the fork are
        on the new timeline too, and the recorded timeline held their caches until new work came),
        else as the acknowledgement of the last commit recorded it (main down); None if neither.
        Asked again in a new session, at most every MAIN_TIMELINE_RECHECK_S, while the replica
        replays another timeline than the session said: main failed over since (an idle drain's
        session predates it), and the commits before the fork are on the new timeline too (the
        old held their caches until new work came, the log line blaming the replica). So while it
        is a standby of another cluster than the session said: main moved to another cluster
        behind the same address, the replica rebuilt from it (the batches a restore lost stayed
        `applied`, on neither server, until new work came)."""
        idle = self.main_idle()
        recheck = (self.main.timeline is not None
                   and (self.replica_timeline() not in (None, self.main.timeline)
                        or self.replica_cluster() not in (None, self.main.system_identifier))
                   and time.monotonic() - self._timeline_rechecked_at >= MAIN_TIMELINE_RECHECK_S)
        if idle and recheck:
            self._timeline_rechecked_at = time.monotonic()
            self.main.close()  # a new session says the timeline main writes now
        if idle and (recheck or self.main.timeline is None and not self._asked_timeline):
            self._asked_timeline = True
            try:
                self.main.identify()
            except (TransientError, ConfigError):  # said where main applies a batch; caches stay meanwhile
                pass
        if self.main.timeline is not None:
            return self.main.timeline
        if self._timeline is None:
            self._timeline = self.store.main_timeline()
        return RecordedTimeline(self._timeline) if self._timeline is not None else None


class Drain:
    def __init__(self, settings: Settings, config: DrainConfig = DrainConfig(), owner: str = ""):
        """`owner`: who runs this drain and the ones before it, one after another (a Dagster run,
        an `obs-pipeline drain` process): it takes back a lease one of them left (see acquire_lease)."""
        self.settings = settings
        self.config = config
        self.owner = owner
        self._should_stop: Callable[[], bool] = lambda: False  # run()'s: a wait for the replica ends for it too
        self.registry = ModelRegistry.from_path(settings.models)
        self.redis = redis.Redis.from_url(settings.require_redis(), socket_timeout=30, socket_connect_timeout=5)
        self.store = BufferStore(self.redis, settings.site)
        self.main = MainDatabase(settings.require_main(), self.registry, settings.site, DRAIN_APPLICATION_NAME)
        self.main_identity = MainIdentity(self.main, self.store, replica_timeline=lambda: self.replica.timeline,
                                          replica_cluster=lambda: self.replica.cluster)
        self.replica = ReplicaDatabase(make_engine(settings.require_replica(), DRAIN_APPLICATION_NAME),
                                       main_cluster=self.main_identity.cluster,
                                       main_timeline=self.main_identity.timeline,
                                       ask_timeout_s=replica_ask_timeout_s(config.lease_ttl_s))
        self.token: str | None = None
        self.batch_size = config.batch_size  # the next claim's; see _resize
        self.timeouts = TimeoutPieces(self.store, self.main, self.registry, config.timeout_attempts)
        self._prefetched: _Batch | None = None
        # a far full batch's ids, marked "applied" in the next step's overlap if not cleaned by then
        self._unmarked: list[str] = []
        self._remembered_link: tuple | None = None  # as last written (_resize)
        self._first_claim: int | None = None  # this run's first claim's size, if not batch_size (_size_by_last_run)
        self._parse_s_per_transaction: float | None = None  # of the last full claim (_claim)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="obs-drain-apply")
        self._replica_refusal_logged: str | None = None  # see _log_replica_refusal
        self._unseen_logged: bytes | None = None  # the first chunk _replica_passed last logged as kept
        self._replica_error_logged: str | None = None  # see _lacking_on_replica
        # (main's cluster, its timeline, its server's start): every waiting chunk is known on them
        # (_settle_failover)
        self._settled: tuple[int | None, int | None, int | None] | None = None
        # the step's batch once Redis took its acknowledgement: done, whatever fails after (see run)
        self._acknowledged: BatchReport | None = None

    def close(self) -> None:
        """Release the lease and close every connection. A lease that cannot be released (Redis
        gone) expires by its TTL: the rest is closed anyway (a Dagster op retry makes a new
        Drain in the same process; each such failure left a connection to main open), and the
        error that ended the run, if one did, is not replaced by this one."""
        self._prefetched = None
        try:
            self._mark_applied_now()
            self._release_lease()
        finally:
            self._worker.shutdown(wait=True)
            self.main.close()
            self.replica.engine.dispose()
            self.redis.close()

    def _release_lease(self) -> None:
        """At the end of a run and at close. With Redis gone the lease expires by its TTL: said,
        not raised, so that the error that ended the run, if one did, is the one reported."""
        try:
            if self.token:
                self.store.release_lease(self.token)
        except redis.RedisError as exc:
            log.warning("could not release the drain lease of site %s (%s); it expires within %.0f s%s",
                        self.settings.site, one_line(exc), self.config.lease_ttl_s,
                        f" (the next drain of {self.owner} takes it back at once)" if self.owner else "")
        finally:
            self.token = None

    # --- the loop -----------------------------------------------------------------------------
    def run(self, *, until_empty: bool = True, idle_exit_s: float = 0.0, budget_s: float | None = None,
            lease_wait_s: float = 0.0, replica_patience_s: float | None = None,
            on_batch: Callable[[BatchReport], None] | None = None,
            on_transient: Callable[[str, float], None] | None = None,
            on_timeout: Callable[[str, float], None] | None = None,
            should_stop: Callable[[], bool] = lambda: False) -> DrainSummary:
        """Drain until the buffer has been empty for `idle_exit_s` (`until_empty`), the budget is
        spent, or asked to stop. The idle grace keeps one run draining under sustained load.

        Empty means applied, replicated and cleaned; with `replica_patience_s`, also applied
        with only the replica's replay missing, once it has made no progress for that long (a
        replica that is down would otherwise hold `drain --once` for ever). Its caches stay
        until a later drain sees the replay.

        `on_transient(error, backoff)`: main unreachable, the same batch retried after `backoff`
        s. `on_timeout(line, backoff)`: main cancelled a statement (its statement or lock
        timeout), the batch retried in smaller pieces; this loop does that itself, so a caller
        that retries on its own for `on_transient` (Dagster's op retries) only reports it. Left
        out, timeouts go to `on_transient`."""
        summary = DrainSummary()
        if self.config.niceness is not None:
            # this thread's priority; the apply worker, started by this thread later, inherits it
            os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), self.config.niceness))
        start = aof_checked = time.monotonic()
        idle_since: float | None = None
        self.store.require_redis()
        self._should_stop = should_stop
        if not self.acquire(lease_wait_s, should_stop):
            summary.stopped_because = "asked to stop"
            return summary
        self._mark_left_applied()
        self.store.finish_unparking()  # left by a drain that died while it made them due
        self._size_by_last_run()
        backoff = self.config.backoff_initial_s
        gc_thresholds = gc.get_threshold()
        gc.set_threshold(max(GC_THRESHOLD, gc_thresholds[0]), *gc_thresholds[1:])
        try:
            while True:
                if should_stop():
                    summary.stopped_because = "asked to stop"
                    break
                if budget_s is not None and time.monotonic() - start >= budget_s:
                    summary.stopped_because = "time budget spent"
                    break
                try:
                    try:
                        report = self.step()
                    except BaseException:
                        self._count_acknowledged(summary, on_batch)
                        raise
                except LeaseLost as lost:  # another drain works the site now: leave it to that one
                    log.warning("%s; stopping", lost)
                    summary.stopped_because, summary.lease_lost = "another drain took the lease", str(lost)
                    self.token = None
                    break
                except HoldsChanged as changed:  # the batch waits in processing: claimed again at once
                    log.info("%s", changed)
                    continue
                except FailoverRequeued:  # (said as it was done) so do the lost ones, ahead of it
                    continue
                except ProcessingChanged as changed:  # so does what Redis kept of the list
                    log.warning("%s", changed)
                    continue
                except StatementTimeout as timeout:  # main is there: it cancelled the batch's statement
                    summary.transient_errors += 1
                    line = self.timeouts.retry_line(timeout, backoff)  # (step() halved the pieces)
                    log.warning("%s", line)
                    if on_timeout:
                        on_timeout(line, backoff)
                    elif on_transient:
                        on_transient(str(timeout), backoff)
                    self._back_off(backoff)
                    backoff = min(backoff * 2, self.config.backoff_max_s)
                    continue
                except TransientError as error:
                    summary.transient_errors += 1
                    log.warning("main unreachable (%s); retrying the same batch in %.1f s", error, backoff)
                    if on_transient:
                        on_transient(str(error), backoff)
                    self._back_off(backoff)
                    backoff = min(backoff * 2, self.config.backoff_max_s)
                    continue
                backoff = self.config.backoff_initial_s
                if report is None:  # idle: the moment for a rewrite, with no deletes to copy on write
                    if self.config.aof_check_s is not None and time.monotonic() - aof_checked >= self.config.aof_check_s:
                        aof_checked = time.monotonic()
                        summary.aof_compactions += self._compact_aof()
                    if until_empty:
                        idle_since = idle_since or time.monotonic()
                        stopped = self._stop_reason(time.monotonic() - idle_since, idle_exit_s, replica_patience_s)
                        if stopped:
                            summary.stopped_because = stopped
                            summary.replica_stalled = stopped != "buffer empty"
                            if self.config.aof_check_s is not None:
                                summary.aof_compactions += self._compact_aof()
                            break
                    time.sleep(self.config.idle_poll_s)
                    continue
                idle_since = None
                summary.count(report)
                if on_batch:
                    on_batch(report)
        finally:
            gc.set_threshold(*gc_thresholds)
            self._prefetched = None  # left in the processing list for the next run
            self._mark_applied_now()
            self._release_lease()
        return summary

    def _count_acknowledged(self, summary: DrainSummary, on_batch: Callable[[BatchReport], None] | None) -> None:
        """A step that failed after Redis took its batch's acknowledgement (Redis lost as the
        drain marked it applied or cleaned it): main committed the batch and no drain takes it
        again, so it is counted and reported here. It was not: a Dagster op retry found nothing
        of it, and the run said "drained 0 transactions", no event of what main committed."""
        report, self._acknowledged = self._acknowledged, None
        if report is not None:
            summary.count(report)
            if on_batch:
                on_batch(report)

    def _back_off(self, seconds: float) -> None:
        """Wait before trying main again, the lease kept (_lease_kept): with a lease shorter than
        the back-off (`drain --lease-ttl 10`, backoff_max_s 30) it lapsed, and another drain took
        the site beside this one."""
        for part in self._lease_kept(seconds):
            time.sleep(part)

    def _lease_kept(self, seconds: float) -> Iterator[float]:
        """The parts of a wait of `seconds`, each at most lease_ttl_s / 3, the lease renewed before
        each, the first included: the step before may have taken most of the lease (main
        blackholed: 10 s to its connect_timeout), and a first renewal a part later came after it
        had lapsed (`--lease-ttl 12`). Ends where the lease was taken meanwhile (the next step
        stops on it); Redis's errors are the next step's to say; not renewed at the end (the next
        step renews it)."""
        deadline = time.monotonic() + seconds
        while True:
            if self.token:
                with contextlib.suppress(redis.RedisError):
                    if not self.store.renew_lease(self.token, self.config.lease_ttl_s):
                        return
            yield max(0.0, min(deadline - time.monotonic(), self.config.lease_ttl_s / 3))
            if time.monotonic() >= deadline:
                return

    def acquire(self, wait_s: float = 0.0, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Take the site's lease, waiting up to `wait_s` for another drain's; False where
        `should_stop` said so meanwhile (SIGTERM to `drain --once` waited out the whole wait,
        then exited 1 saying another drain held the lease)."""
        deadline = time.monotonic() + wait_s
        while True:
            self.token = self.store.acquire_lease(self.config.lease_ttl_s, self.owner)
            if self.token:
                return True
            if should_stop():
                return False
            if time.monotonic() >= deadline:
                left_s = self.store.lease_left_s()  # that drain's TTL, not ours
                if left_s is None:  # released since: take it
                    continue
                raise DrainBusy(f"another drain holds the lease of site {self.settings.site!r} "
                                f"(key {self.store.keys.lease}); it expires in {left_s:.0f} s "
                                "unless that drain renews it: let it drain the site, or stop it (`obs-pipeline "
                                "dev`, another `obs-pipeline drain`, Dagster's buffer_sensor) and run this again")
            time.sleep(0.5)

    def _stop_reason(self, idle_s: float, idle_exit_s: float, replica_patience_s: float | None) -> str:
        """Why an idle drain that runs until empty may stop now ("" if it may not): nothing is
        left, or all that is left waits for a replica that has not replayed anything for
        `replica_patience_s`."""
        if idle_s < idle_exit_s:
            return ""
        work = self.store.work()
        if not any(work.values()):
            return "buffer empty"
        claimable = work["buffer"] or work["processing"] or work["due_retries"]
        if claimable or replica_patience_s is None or idle_s < replica_patience_s:
            return ""
        return (f"buffer empty; {work['awaiting_replication']} chunk(s) of committed transactions still await the "
                f"replica, which replayed nothing for {idle_s:.0f} s: their caches stay until a later drain sees "
                "the replay" + "".join(f"; {said}" for said in (self.replica.refusal, self._replica_error_logged) if said))

    # --- one batch ----------------------------------------------------------------------------
    def step(self) -> BatchReport | None:
        """One cycle; None when there was nothing to claim and nothing to clean.

        While main applies a full batch (in a worker thread: the driver releases the GIL while
        it waits), this thread claims and parses the next one and cleans what the replica has
        replayed, so Python, Redis and PostgreSQL work at the same time. The prefetched batch
        waits in the processing list behind this one; if anything fails it is forgotten here
        and the next claim takes both back from the processing list, as after a crash."""
        if not self.store.renew_lease(self.token, self.config.lease_ttl_s):
            self.token = None
            self._prefetched = None
            try:
                self.acquire()
            except DrainBusy as busy:  # it expired and another drain took it: that one works the site
                raise LeaseLost(str(busy)) from None
        self._acknowledged = None
        self.timeouts.load()
        began = time.monotonic()
        batch, self._prefetched = self._prefetched or self._claim(after_unacknowledged=False), None
        if not batch.outcome.claimed:  # nothing new: clean what waits for the replica, waiting a little for it
            cleaned = self._clean(wait_for=0, timeout_s=self.config.idle_poll_s)
            self._mark_applied(cleaned[1])
            if not cleaned[1]:
                return None
            return BatchReport(replay_lsn=cleaned[0], replicated=len(cleaned[1]),
                               duration_s=time.monotonic() - began)
        report, outcome = batch.report, batch.outcome
        if batch.transactions:  # main's session before anything applies on it: which timeline it writes
            try:
                self.main.identify()
                requeued = self._settle_failover()
            except (ConfigError, TransientError):  # as when main refuses or does not answer the apply (below)
                with contextlib.suppress(redis.RedisError):  # (the error that stopped it is main's)
                    # not a copy of a discarded one, dropped at the next attempt: it got a status key
                    # here, and status() said "pending" for ever for what the operator discarded
                    self._back_to_pending(discarded_copies.split_off(self.store, self.registry, batch.transactions)[0])
                raise
            if requeued:  # (nothing prefetched yet)
                raise FailoverRequeued()
        full = batch.outcome.claimed >= batch.size
        txs = self._hold_dependents(self._without_discarded_copies(batch.transactions, outcome), outcome, report)
        applying = self._worker.submit(self.timeouts.apply, txs) if txs else None  # garbage only: main not needed
        self.main_identity.applying = applying
        try:
            if txs:  # while main applies (statuses are read, never waited on: no order to keep with main)
                by_id: dict[str, Transaction] = {}  # the first of an id: the one main applies (_parse)
                for t in txs:
                    by_id.setdefault(t.transaction_id, t)
                self.store.mark_processing(list(by_id), lambda tx_id: _status_json(by_id[tx_id], "processing"))
            if full and not batch.report.reclaimed:  # (a reclaimed batch may hold a prefetched one:
                # claiming more behind it at every failed attempt would grow it without bound)
                self._prefetched = self._claim(after_unacknowledged=True)
                cleaned = self._clean(wait_for=None)[1]  # earlier batches
                report.replicated += len(cleaned)
            else:
                cleaned = []
            self._mark_applied(cleaned)
        except BaseException:
            if applying:
                self._let_main_finish(applying)  # the next claim sorts out what committed
            self._prefetched = None  # its entries stay in the processing list
            raise
        try:
            result = self._await_apply(applying) if applying else BatchResult()
            if full and not result.slow_path and self.timeouts.piece is None:  # (pieces say nothing of the link)
                self._resize(result)
            self._record_result(result, outcome, report, batch.footprints)
            self.store.acknowledge(self.token, outcome)
            self._acknowledged = report
            self.main_identity.acknowledged(outcome)
        except BaseException as error:
            if applying:  # interrupted while main applies (Ctrl-C, Dagster ending the run)
                self._let_main_finish(applying)
            self._prefetched = None  # reclaimed from the processing list together with this batch
            if isinstance(error, StatementTimeout):
                self.timeouts.timed_out(error)
            elif isinstance(error, (ConfigError, TransientError)) and txs:
                self._back_to_pending(txs)
            raise
        if txs and self.timeouts.in_effect:
            self.timeouts.passed(self.batch_size)
        if outcome.commit_lsn is not None:
            # A full claim means more work is waiting: where main is near and the replica has
            # replayed this commit already, clean it now, skipping "applied" (the drain is short
            # of CPU there, not of time); otherwise mark it applied and go on - the next batch's
            # overlap cleans it. Where main is far, cleaning now would hold back the next batch's
            # round trip (a cleanup of 8,000 transactions takes about 0.4 s), and so would marking
            # it applied (0.07-0.1 s): the next batch's overlap does that, for those its cleanup
            # has not made replicated. A last batch is marked applied, then waits for its replay.
            wait_began = time.monotonic()
            marked, deferred = not full, full and self._main_is_far()
            if marked:  # main has committed them: "applied" now, not once the wait below ends (up
                # to replication_timeout_s with a replica that lags or is down)
                self.store.set_status(outcome.applied_ids, "applied")
                replay, ids = self._clean(wait_for=outcome.commit_lsn)
            elif deferred:  # to the next step's overlap (_mark_applied)
                replay, ids, self._unmarked = None, [], outcome.applied_ids
            elif (replayed := self._replay_lsn()) is not None and replayed >= outcome.commit_lsn:
                replay, ids = self._clean(wait_for=None, replayed=replayed)
            else:
                replay, ids = None, []
            report.replication_wait_s = time.monotonic() - wait_began
            report.replay_lsn = replay
            report.replicated += len(ids)
            if not marked and not deferred:
                cleaned = set(ids)
                self.store.set_status([i for i in outcome.applied_ids if i not in cleaned], "applied")
        report.duration_s = time.monotonic() - began
        self._acknowledged = None  # (counted by run as the step's answer)
        return report

    def _mark_applied(self, cleaned: list[str]) -> None:
        """The last far batch's "applied", for those of its ids not in `cleaned` (replicated)."""
        if self._unmarked:
            done = set(cleaned)
            left, self._unmarked = [i for i in self._unmarked if i not in done], []
            if left:
                self.store.set_status(left, "applied")

    def _mark_left_applied(self) -> None:
        """As a run starts: a far drain killed (kill -9, its machine lost) before it marked its
        last full batch "applied" (left to the next step's overlap) left those statuses at
        "processing" for as long as the replica had not replayed them (a replica down: hours).
        Only that batch can be left so, the newest committed (earlier ones were marked in the
        overlap before it was acknowledged); a status "applied" already, or "replicated", stays
        as it is (SET_STATUS)."""
        left = self.store.newest_committed_ids()
        if left:
            self.store.set_status(left, "applied")

    def _mark_applied_now(self) -> None:
        """As the run ends, however it ends: a status left at "processing" would say a drain is
        applying what main has committed (a replicated one stays replicated: SET_STATUS)."""
        try:
            self._mark_applied([])
        except redis.RedisError as error:
            self._unmarked = []
            log.warning("could not mark the last batch applied (%s); the cleanup makes it replicated", one_line(error))

    def _main_is_far(self) -> bool:
        return (self.main.round_trip_s or 0.0) >= FAR_ROUND_TRIP_S

    def _await_apply(self, applying) -> BatchResult:
        """Main's answer, renewing the lease while it takes long: a batch bisected over a far
        link (many poison transactions, 250 ms a round trip) can outlast the lease, and another
        drain would take the site while this one still applies."""
        while not wait([applying], timeout=self.config.lease_ttl_s / 3).done:
            if not self.store.renew_lease(self.token, self.config.lease_ttl_s):
                raise LeaseLost(f"the drain lease of site {self.settings.site} was taken while main applied a batch")
        return applying.result()

    def _let_main_finish(self, applying) -> None:
        """Before an error or an interrupt leaves step(), and run() lets go of the lease: main's
        answer to the batch in flight, the lease renewed meanwhile. Let go at once, another drain
        (the sensor's next run) claimed that batch and applied it beside this one, held off only by
        the applied-ids key. A second Ctrl-C ends the wait."""
        while not wait([applying], timeout=self.config.lease_ttl_s / 3).done:
            with contextlib.suppress(redis.RedisError):
                if self.token:
                    self.store.renew_lease(self.token, self.config.lease_ttl_s)

    def _resize(self, result: BatchResult) -> None:
        """Size the next claims by the last full batch, applied on the fast path (a bisected one
        says nothing of the link), and remember the link for the next run (_size_by_last_run)."""
        size = batch_size_for(self.main.round_trip_s, result.apply_s, len(result.applied),
                              self.config.batch_size, self.config.largest_batch)
        if self.main.round_trip_s is not None and result.applied:
            far = self._main_is_far()  # (near, the cost does not size batches: one write per session)
            link = (self.main.round_trip_s, (result.apply_s - self.main.round_trip_s) / len(result.applied)
                    if far else None) + ((self._parse_s_per_transaction, result.round_trips) if far else ())
            if far or link != self._remembered_link:
                self.store.remember_link(*link)
                self._remembered_link = link
        if size != self.batch_size:
            log.info("batch size %d -> %d (main's round trip %.1f ms, the last batch applied in %.0f ms)",
                     self.batch_size, size, (self.main.round_trip_s or 0) * 1000, result.apply_s * 1000)
            self.batch_size = size

    def _size_by_last_run(self) -> None:
        """Where main is far, batches grow once a full one shows the link, and a run's first two
        claims (the second is claimed while main applies the first) were made at batch_size:
        two round trips more per run (at 250 ms, 50,000 transactions took 5 % longer: the
        notes). The last run's link sizes them instead; the first full batch corrects a stale
        one (main moved nearer, or a first run at the site)."""
        link = self.store.last_link()
        if link is not None:
            self.main.last_run_round_trip_s = link.round_trip_s  # a first reply that agrees with it is enough
            size = batch_size_for_link(link.round_trip_s, link.apply_s_per_transaction, self.config.batch_size,
                                       self.config.largest_batch)
            if size != self.batch_size:
                log.info("batch size %d -> %d (the last run's link: main's round trip %.1f ms)",
                         self.batch_size, size, link.round_trip_s * 1000)
                self.batch_size = size
            first = first_claim_size(size, self.config.batch_size, link.round_trip_s, link.round_trips,
                                     link.parse_s_per_transaction, self.store.backlog())
            self._first_claim = first if first != size else None

    def _claim(self, after_unacknowledged: bool) -> "_Batch":
        size, self._first_claim = self._first_claim or self.batch_size, None
        claim = self.store.claim(self.token, size, after_unacknowledged)
        began = time.perf_counter()
        batch = _Batch(report=BatchReport(transactions=len(claim.entries), reclaimed=claim.reclaimed,
                                          batch_size=size),
                       outcome=Outcome(claimed=len(claim.entries), oldest=claim.entries[0] if claim.entries else None),
                       size=size)
        batch.transactions = self._parse(claim.entries, batch.outcome, batch.report)
        # worked out now, while main applies the previous batch, not after this one commits
        batch.footprints = {_one_of_batch(tx): cache_footprint(tx, self.registry)
                            for tx in batch.transactions}
        if len(claim.entries) >= size and size >= FIRST_CLAIM_TIMED:  # a full claim: what a run's first would cost
            self._parse_s_per_transaction = (time.perf_counter() - began) / size
        return batch

    def _parse(self, entries: list[str], outcome: Outcome, report: BatchReport) -> list[Transaction]:
        """The buffer is a trust boundary: anything malformed is dead-lettered with the reason."""
        txs, seen = [], set()
        unnamed: list[str] = []  # invalid ones holding rows their steps no longer name (_holds_unnamed_rows)
        for place, raw in enumerate(entries):
            try:
                tx = validate(Transaction.from_json(raw), self.registry)
            except Exception as error:  # noqa: BLE001 - whatever the payload does, it must not stop the drain
                # one printable line: it may quote a producer's text (a step id with a newline, a lone surrogate)
                reason = one_line(error) if isinstance(error, InvalidTransaction) else f"unreadable: {error!r}"
                tx_id = _guess_id(raw)
                if tx_id and discarded_copies.is_invalid_copy(self.store, self.registry, tx_id, raw):
                    discarded_copies.say_dropped(tx_id, self.settings.site)  # (listed again: the discard undone)
                    continue
                entry = _failed_entry(raw, reason, kind="invalid")
                outcome.dead.append((tx_id, entry))
                if tx_id:
                    outcome.places.setdefault(tx_id, place)
                    rows = _rows_written_by(raw, self.registry)
                    # another entry of the id that waits to retry (a producer reused the id) keeps
                    # its status and live holds, as in _dead_letter: status() said "failed" for it
                    copy_holds = self._held_by_copy(tx_id, rows)
                    if not (copy_holds or self._status_says_waiting(tx_id) and self.store.waits_to_retry(tx_id)):
                        outcome.statuses.append((tx_id, entry))
                    # what it would have written is dead too: a later update of a row it creates
                    # is blocked with it, not applied to no row (and lost once it is fixed)
                    outcome.claim(rows - copy_holds, "!" + tx_id)
                    # one a failover lost: the rows it only reads, held for its order, go
                    if reads := _rows_only_read_if_lost(raw, self.registry, rows):
                        outcome.release.setdefault(tx_id, set()).update(reads)
                    if _holds_unnamed_rows(raw, self.registry):  # its other live marks are found in Redis
                        unnamed.append(tx_id)
                    # a requeued dead letter that is still invalid: those parked behind it (its live
                    # holds again, see DeadLetters.retry) come due, to be blocked with it
                    outcome.unpark.append(tx_id)
                report.dead_lettered.append({"transaction_id": tx_id, "reason": reason})
                continue
            if _one_of_batch(tx) in seen:  # pushed twice: applied once
                if _waited(tx):  # (the first of them, a copy claimed ahead of it, lets go of its rows)
                    outcome.waited.add(tx.transaction_id)
                continue
            seen.add(_one_of_batch(tx))  # (one id with other steps: see MainDatabase)
            outcome.places.setdefault(tx.transaction_id, place)
            txs.append(tx)
        if unnamed:
            self._kill_unnamed_holds(unnamed, outcome)
        return txs

    def _kill_unnamed_holds(self, tx_ids: list[str], outcome: Outcome) -> None:
        """Invalid entries that waited (to retry, or parked) and name a model the models file no
        longer has (revised since they took their rows): their rows, worked out from their steps,
        left those of that model out, and their marks there stayed live, held by a transaction no
        drain would ever apply or dead-letter again (discarded, every later write of its rows
        waited behind it for ever). Their live marks are found in Redis instead and turned dead,
        but a copy's that waits to retry (as _held_by_copy), and those of rows a failover's lost one
        only reads, which it lets go of (_parse): dead, every newer write of them was blocked by it."""
        held = self.store.rows_held_live(sorted(set(tx_ids)))
        for tx_id, rows in held.items():
            rows -= outcome.release.get(tx_id, set())
            outcome.claim(rows - self._held_by_copy(tx_id, rows), "!" + tx_id)

    def _without_discarded_copies(self, txs: list[Transaction], outcome: Outcome) -> list[Transaction]:
        """Leave out the copies of transactions an operator discarded that a producer pushed
        since (discarded_copies): dropped with a warning, given no status (the id's stays None, as
        after the discard), acknowledged with the batch. Looked up just before the batch goes to
        main: a discard that lands between this and the batch's `processing` mark (_owned_elsewhere
        then keeps the status) does not stop the copy: failing, it waits to retry, holding its
        rows, and is dropped then. One dropped after it waited (to retry, or parked behind another)
        lets go of its rows and of what was parked behind it, as an applied one does, and its
        status goes (unless another entry of the id waits): left, every later write of its rows
        was parked behind it for ever."""
        kept, copies = discarded_copies.split_off(self.store, self.registry, txs)
        for tx in copies:
            discarded_copies.say_dropped(tx.transaction_id, self.settings.site)
            if _waited(tx) or tx.transaction_id in outcome.waited:  # (as _record_result)
                outcome.release.setdefault(tx.transaction_id, set()).update(self._rows_held(tx))
                outcome.unpark.append(tx.transaction_id)
                if not self.store.waits_to_retry(tx.transaction_id):
                    outcome.forget.append(tx.transaction_id)
        return kept

    def _hold_dependents(self, txs: list[Transaction], outcome: Outcome, report: BatchReport) -> list[Transaction]:
        """A transaction that uses a row written by one waiting to retry, or behind such a one
        in the row's queue (SiteKeys.waiting), is parked behind the first of them, unless those
        are in this batch ahead of it with nothing parked behind them (the batch keeps their
        order); behind a dead-lettered one it is dead-lettered too, as blocked (at once, if any of
        its rows is behind a dead one: parked first, it was listed after a newer transaction
        blocked by the same one, and `failed retry` applies the list in its order). It takes its
        place in the queue of each row it writes that another holds."""
        if not outcome.hold and not self.store.holds_any():  # the usual case: nothing waits or is dead
            return txs
        # by id and steps: a producer's reuse of an id in the batch uses other rows
        refs_of = {_one_of_batch(t): referenced_ids(t, self.registry) for t in txs}
        refs = sorted(set().union(*refs_of.values()))
        holders = self.store.holders(refs)
        in_redis = dict(holders)  # what acknowledge checks again: an operator may requeue a dead holder
        for row in refs:  # rows this batch's own invalid entries would have written
            if row in outcome.hold and row not in holders:
                holders[row] = outcome.hold[row]
        if not holders:
            return txs
        # behind each head, those waiting after it: this batch may pass all of them, and one more;
        # a holder in this batch with others parked behind it lets nothing through, not even from
        # behind it in the batch: those parked go first
        queues, waited_on = self.store.behind(in_redis, len(txs) + 1, {t.transaction_id for t in txs})
        order = RowOrder(holders, queues)
        ready, ahead = [], set()
        for tx in txs:
            blocked = [(row, mark) for row in sorted(refs_of[_one_of_batch(tx)])
                       if (mark := order.blocker(row, tx.transaction_id, ahead, waited_on))]
            if not blocked:
                ready.append(tx)
                ahead.add(tx.transaction_id)
                continue
            row, holder = next(((r, m) for r, m in blocked if m.startswith("!")), blocked[0])
            if holder.startswith("!") and in_redis.get(row) == holder:
                outcome.dead_marks[row] = holder
            elif holder.startswith("!") and order.was_read(row, holder):
                outcome.dead_queued[row] = holder
            written = written_ids(tx, self.registry)
            # rows a copy of it waiting to retry holds stay that one's, for the rest of this batch
            # too: what uses them waits behind it (see _held_by_copy)
            copy_holds = self._held_by_copy(tx.transaction_id, written) if holder.startswith("!") else set()
            written -= copy_holds
            # Its marks go only on rows nobody holds: a row held by another stays that one's in
            # this batch's outcome too, or its holder, failing later in the batch, could not mark
            # it dead there (claim_rows keeps the first mark) and this one would wait for ever. On
            # the others it waits in the row's queue, after those already there.
            value = ("!" if holder.startswith("!") else "") + tx.transaction_id
            claim_rows(holders, written, value)
            behind = {row for row in written if holders.get(row) != value}
            for row in behind:
                order.join(row, value)
            outcome.claim(behind, value, head=False)
            written -= behind
            if holder.startswith("!"):
                self._dead_letter(tx, f"blocked by {holder[1:]}", outcome, report, kind="blocked",
                                  rows=written, copy_holds=copy_holds)
            else:
                self._park(tx, holder, written, outcome)
                waited_on.add(holder)
                report.held += 1
        return ready

    def _status_says_waiting(self, tx_id: str) -> bool:
        """Whether the id's status key is that of a transaction that waits (pending, having
        failed or been parked): only then may an entry of it be in `retry`, whose look-up
        (store.waits_to_retry) scans the whole set, 300,000 parked ones for each invalid entry."""
        doc = self._status_doc(tx_id)
        if doc.get("status") != "pending":
            return False
        metadata = doc.get("metadata")
        return bool(doc.get("retry_count")) or isinstance(metadata, dict) and (
            "held_by" in metadata or "last_error" in metadata)

    def _status_doc(self, tx_id: str) -> dict:
        """The id's status key as a dict; {} if it has none or it is not one (a producer may
        have written anything there)."""
        raw = self.store.status_json(tx_id)
        try:
            doc = json_codec.loads(raw) if raw else None
        except (ValueError, RecursionError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _record_result(self, result, outcome: Outcome, report: BatchReport,
                       footprints: dict[tuple[str, str | None], dict[str, list]]) -> None:
        done = result.applied + result.already_applied
        # an id a producer reused in this batch: its status key is the applied one's whole JSON, from
        # which requeue_lost buffers it again should a failover lose it (it may hold the other's)
        reused = {tx.transaction_id for tx, _ in result.reused_ids} | {tx_id for _, tx_id, _, _ in outcome.park}
        for tx in result.applied:
            if tx.transaction_id in reused:
                outcome.statuses.append((tx.transaction_id, _status_json(tx, "processing")))
        for tx in done:
            outcome.applied_ids.append(tx.transaction_id)
            if _waited(tx) or tx.transaction_id in outcome.waited:
                # only these ever put rows in held_ids, or have others parked behind them
                outcome.release[tx.transaction_id] = self._rows_held(tx)
                outcome.unpark.append(tx.transaction_id)
            outcome.cleanup.append(footprints[_one_of_batch(tx)])
        outcome.commit_lsn = result.commit_lsn
        outcome.main_cluster, outcome.main_timeline, outcome.main_started = self._main_server()
        for tx, reason in result.timed_out:  # alone, timeout_attempts times in a row: the rest drains
            self._dead_letter(tx, reason, outcome, report, kind="timeout", attempts=self.config.timeout_attempts)
        not_applied = result.failed + result.timed_out + result.dead_blocked
        unapplied = {tx.transaction_id for tx, _ in not_applied}
        for tx, reason in result.reused_ids:  # no retry makes it right; its status is the applied one's
            self._dead_letter(tx, reason, outcome, report, kind="reused_id", status=False)
            if tx.transaction_id not in unapplied:
                # Its id is applied (before, or by this batch): nothing of it ever will be under
                # that id, so its caches go once the replica has the applied one, as that one's do
                # (ingest buffered it, waiting to retry, and a producer's reuse was applied first:
                # its overlays stayed for good). Not if the first of the id in this batch was not
                # applied: the id's caches may be that one's, which may still be retried.
                outcome.cleanup.append({**footprints[_one_of_batch(tx)], "t": []})
        for tx, reason in result.dead_blocked:
            self._dead_letter(tx, reason, outcome, report, kind="blocked")
        dead_now: set[str] = set()  # ids dead-lettered by failing (not a reused id: that may name one retrying)
        for tx, reason in result.failed:
            blocker = reason.removeprefix("blocked by ") if reason.startswith("blocked by ") else None
            if blocker and blocker in dead_now or (not blocker and tx.retry_count >= tx.max_retries):
                kind = "blocked" if blocker else "permanent"
                if not self._dead_letter(tx, reason, outcome, report, kind=kind):  # (else a copy
                    dead_now.add(tx.transaction_id)  # holds its rows: what uses them waits)
                continue
            tx.metadata = {**tx.metadata, "last_error": reason}
            outcome.statuses.append((tx.transaction_id, _status_json(tx, "pending")))
            report.retried += 1
            if blocker:  # parked behind its blocker, without spending a retry, with what it holds back
                self._park(tx, blocker, written_ids(tx, self.registry), outcome)
                continue
            tx.retry_count += 1
            outcome.retry.append((time.time() + retry_delay(self.config.retry_base_s, tx.retry_count), tx.to_json()))
            outcome.claim(written_ids(tx, self.registry), tx.transaction_id)
        report.applied = len(result.applied)
        report.already_applied = len(result.already_applied)
        report.rows_per_model = result.rows_per_model
        report.writes_before_fold, report.writes_after_fold = result.writes_before_fold, result.writes_after_fold
        report.round_trips = result.round_trips
        report.pieces = result.pieces
        if self.main.round_trip_s is not None:
            report.main_round_trip_ms = round(self.main.round_trip_s * 1000, 2)
        report.commit_lsn = int_to_lsn(result.commit_lsn) if result.commit_lsn is not None else None

    def _park(self, tx: Transaction, holder: str, claim: set[str], outcome: Outcome) -> None:
        """Wait behind `holder` until it is applied or dead-lettered, then come due with the others
        parked behind it, in the order they were parked, taking the marks of the rows it writes
        (see redis_scripts.UNPARK): rechecked each on its own schedule, a newer one could come
        due first and overtake an older one. `claim`: the rows it marks now."""
        tx.metadata = {**tx.metadata, "held_by": holder}
        outcome.park.append((holder, tx.transaction_id, written_ids(tx, self.registry), tx.to_json()))
        outcome.claim(claim, tx.transaction_id)

    def _dead_letter(self, tx: Transaction, reason: str, outcome: Outcome, report: BatchReport, kind: str,
                     rows: set[str] | None = None, status: bool = True, attempts: int | None = None,
                     copy_holds: set[str] | None = None) -> bool:
        """`status` False for an id that names another transaction too (reused): its status stays
        that one's. `attempts`: how many times it was tried (by default, its retries and one).
        `copy_holds`: the rows a copy of it waiting to retry holds (None: _held_by_copy). Returns
        whether one does: its holds and status stay its own."""
        entry = _failed_entry(tx.to_dict(), reason, kind=kind, attempts=attempts)
        outcome.dead.append((tx.transaction_id, entry))
        rows = written_ids(tx, self.registry) if rows is None else rows
        copy_holds = self._held_by_copy(tx.transaction_id, rows) if copy_holds is None else copy_holds
        if status:  # while a copy waits, the id's status is its "pending" (this one may have been
            # marked "processing" in this batch)
            current = _status_json(tx, "pending") if copy_holds else entry
            outcome.statuses.append((tx.transaction_id, current))
        outcome.claim(rows - copy_holds, "!" + tx.transaction_id)
        if LOST_IN_FAILOVER in tx.metadata:  # the rows it only reads, held for its order, go
            outcome.release.setdefault(tx.transaction_id, set()).update(_only_read(
                tx.metadata, lambda: self._rows_held(tx) - written_ids(tx, self.registry)))
        outcome.unpark.append(tx.transaction_id)  # those parked behind it come due, to be blocked too
        report.dead_lettered.append({"transaction_id": tx.transaction_id, "reason": reason})
        return bool(copy_holds)

    def _rows_held(self, tx: Transaction) -> set[str]:
        """The rows whose marks it holds while it waits: those it writes; one a failover lost, every
        row it writes or reads (BufferStore.requeue_lost put it first in their order, and recorded
        those it reads as the models named them then)."""
        written = written_ids(tx, self.registry)
        if LOST_IN_FAILOVER not in tx.metadata:
            return written
        return written | referenced_ids(tx, self.registry) | _only_read(tx.metadata, set)

    def _held_by_copy(self, tx_id: str, rows: set[str]) -> set[str]:
        """Those of `rows` held live by a copy of `tx_id` that waits to retry or is parked: a producer
        pushed it again (and the copy failed too, or this one was pushed while that one waited).
        Marks and statuses are kept by id: dead-lettering this one turned that one's holds into
        dead marks (what uses its rows was dead-lettered as blocked by a transaction still to be
        applied) and its "pending" into "failed". Scans `retry` only where the id holds a live
        mark of these rows (usually this one's own: it waited to retry too). A live mark is the
        row's head or a place in its queue (parked behind another row's holder, it waits in this
        one's queue): only heads were looked at, and a newer update claimed with the row's head
        was dead-lettered as blocked by the copy still to be applied."""
        live = self.store.held_live_by(sorted(rows), tx_id)
        return live if live and self.store.waits_to_retry(tx_id) else set()

    def _compact_aof(self) -> int:
        try:
            asked = self.store.compact_aof()
        except redis.RedisError as error:  # never a reason to stop draining
            log.warning("could not check Redis's AOF (%s)", error)
            return 0
        if asked:
            log.info("asked Redis to compact its append-only file (BGREWRITEAOF): it is mostly history now")
        return int(asked)

    def _replay_lsn(self) -> int | None:
        try:
            replayed = self.replica.replay_lsn()
        except Exception as error:  # noqa: BLE001 - replica down: caches stay, a later pass cleans
            if not self._log_replica_refusal():
                log.warning("replica unreachable (%s); caches kept", error)
            return None
        self._log_replica_refusal()  # (a standby of another cluster)
        return replayed

    def _log_replica_refusal(self) -> bool:
        """Log the replica's refusal (ReplicaDatabase.refusal: hot_standby off) once while it
        lasts, not at each idle poll; whether it refuses so. Batches still commit, unreplicated."""
        refusal = self.replica.refusal
        if refusal and refusal != self._replica_refusal_logged:
            log.warning("%s; committed batches wait for its replay, their caches kept", refusal)
        self._replica_refusal_logged = refusal
        return refusal is not None

    def _back_to_pending(self, transactions: list[Transaction]) -> None:
        """Main refused the login (until the URL is fixed and a drain runs) or did not answer:
        nothing applies them meanwhile (a retry marks them again). "pending", not "processing",
        which said a drain did after the Dagster run that gave up on main had failed; a producer's
        entry pushed without a status key gets one (its status read None, as if never buffered)."""
        by_id = {t.transaction_id: t for t in transactions}
        with contextlib.suppress(redis.RedisError):  # the error that stopped it is main's
            self.store.mark_status(list(by_id), "pending", lambda tx_id: _status_json(by_id[tx_id], "pending"))

    def _clean(self, wait_for: int | None, timeout_s: float | None = None,
               replayed: int | None = None) -> tuple[str | None, list[str]]:
        """Wait (bounded) for the replica to replay `wait_for` (0: the oldest commit still
        awaiting it), then clean what it has replayed (`replayed`: just read, no need to ask)
        and shows (BufferStore.clean_replicated; what it passed without: _replica_passed)."""
        count, lowest = self.store.awaiting_replication()
        if not count:
            return None, []
        # main's timeline, asked once per Drain if nothing else did: the replica's replay asks it,
        # and a batch to apply, but not a run with none while the replica is down, which then left
        # what a failover lost `applied` on neither server (_failover_settled buffers it again)
        self.main_identity.timeline()
        if wait_for is not None:
            timeout_s = self.config.replication_timeout_s if timeout_s is None else timeout_s  # (0: one look)
            replay = self._wait_for_replay(wait_for or lowest, timeout_s)
            self._log_replica_refusal()
        else:
            replay = replayed if replayed is not None else self._replay_lsn()
        if not self._failover_settled() or replay is None or replay < lowest:
            return (int_to_lsn(replay) if replay is not None else None), []
        cleaned, unseen = self.store.clean_replicated(replay, self._lacking_on_replica)
        if unseen:
            self._replica_passed(unseen)
        return int_to_lsn(replay), cleaned

    def _lacking_on_replica(self, ids: list[str]) -> set[str] | None:
        """Which of these ids the replica lacks (ReplicaDatabase.missing_among); None where it
        does not answer (caches stay, a later pass cleans), said once while the same error lasts
        (not at each idle poll)."""
        try:
            lacking = self.replica.missing_among(ids)
        except Exception as error:  # noqa: BLE001 - as _replay_lsn
            line = applied_records_refused(error) or (
                f"the site's replica did not say which committed transactions it shows ({first_line(error)})")
            if line != self._replica_error_logged:
                log.warning("%s; caches kept", line)
            self._replica_error_logged = line
            return None
        self._replica_error_logged = None
        return lacking

    def _replica_passed(self, unseen: list[tuple[dict[str, Any], bytes]]) -> None:
        """Chunks the replica replayed past without (BufferStore.clean_replicated): it replays
        another server's WAL at those positions (another standby of main's old primary promoted
        to the same timeline; the old primary still up behind main's address), so the position
        told nothing. Main is asked for them (_buffer_again_if_lost) once its session is free
        and it answers; their caches, and those of every later chunk, stay meanwhile."""
        if self.main.timeline is not None and self.main_identity.main_idle():
            try:
                if self._buffer_again_if_lost(unseen, self._main_server(), replica_passed=True) is not None:
                    return
            except (TransientError, ConfigError):  # said where main applies a batch
                pass
        if unseen[0][1] != self._unseen_logged:  # once per chunk first kept so, not at each idle poll
            self._unseen_logged = unseen[0][1]
            log.warning("the site's replica replayed past the commits of %d batch(es) without them; their caches "
                        "kept until main says which it has", len({r.get("lsn") for r, _ in unseen}))

    def _wait_for_replay(self, lsn: int, timeout_s: float) -> int | None:
        """The replica's wait_for_replay (0: one look), ended once work waits to be claimed
        (_work_waits) or the run is asked to stop (SIGTERM to `drain` waited out all of
        --replication-timeout first), the lease kept (_lease_kept): a
        replication_timeout_s longer than lease_ttl_s let it lapse while the last batch waited,
        and another drain took the site beside this one (`obs-pipeline drain`; or past 75 s the
        sensor took the run, quiet with the lease free, for dead, and launched the next)."""
        seen, gave_up = None, False

        def work_waits() -> bool:
            nonlocal gave_up
            gave_up = self._should_stop() or self._work_waits()
            return gave_up

        for part in self._lease_kept(timeout_s):
            seen = self.replica.wait_for_replay(lsn, part, give_up=work_waits)
            if seen is not None and seen >= lsn or gave_up:
                break
        return seen

    def _work_waits(self) -> bool:
        """Whether something waits to be claimed: a wait for the replica ends for it. A replica
        down or lagging held what was buffered meanwhile up to replication_timeout_s (10 s) per
        batch from main, for as long as it lasted; what the wait was for is cleaned by a later
        step. Redis's errors are the next step's to say."""
        try:
            return self.store.has_claimable()
        except redis.RedisError:
            return False

    def _failover_settled(self) -> bool:
        """Whether chunks may be cleaned by a replay of main's timeline: each waiting one is known
        to be on it and of main's cluster (_settle_failover), or no session of main said one (main
        down: the recorded one counts, as every chunk's). Settled here only while main's session
        is free."""
        if self.main.timeline is None or self._main_server() == self._settled:
            return True
        if not self.main_identity.main_idle():
            return False
        try:
            self._settle_failover()
        except (TransientError, ConfigError):  # said where main applies a batch; caches stay meanwhile
            return False
        return self._settled == self._main_server()

    def _main_server(self) -> tuple[int | None, int | None, int | None]:
        """Main's cluster, the timeline it writes and when its server started, as its last session
        said: a chunk committed under others may not be on main (_settle_failover)."""
        return self.main.system_identifier, self.main.timeline, self.main.started

    def _settle_failover(self) -> int:
        """Before anything applies on main's session, or is cleaned by its timeline: the chunks
        awaiting the replica that were committed on another timeline (main failed over since, or
        was restored), or by another cluster (main replaced by a new initdb restored from a dump,
        on timeline 1 again, say), or by another server than main's (another standby of the old
        primary promoted to the same timeline number, say; or main restarted), are asked for on
        main (_buffer_again_if_lost). A failover to an asynchronous standby loses what main had
        not sent it, a dump taken before them lacks them, and the new WAL's LSNs pass those
        commits' without them: their caches were cleaned, and the rows were on neither server.
        Returns how many were buffered again; main's errors raise."""
        server = cluster, timeline, started = self._main_server()
        if timeline is None or server == self._settled:
            return 0
        chunks = self.store.chunks_off_timeline(timeline, cluster, started=started)
        requeued = self._buffer_again_if_lost(chunks, server) if chunks else []
        if requeued is None:  # a new session in between (main failed over, or moved, again)
            return 0
        self._settled = server
        if cluster is not None:
            self.main_identity.settled(cluster)
        return len(requeued)

    def _buffer_again_if_lost(self, chunks: list[tuple[dict[str, Any], bytes]],
                              server: tuple[int | None, int | None, int | None],
                              replica_passed: bool = False) -> list[str] | None:
        """Ask main for the ids of `chunks`, committed on a server main may not be now (or, with
        `replica_passed`, that the site's replica replayed past without: Drain._clean). Ids main
        has applied made it across (a batch commits whole): those chunks count as on main's
        timeline, cluster and server. The rest are buffered again, to apply first
        (BufferStore.requeue_lost). Returns the ids buffered again; None where main's session
        changed meanwhile (asked again by the next _settle_failover). Main's errors raise."""
        cluster, timeline, started = server
        ids = sorted({tx_id for record, _ in chunks for tx_id in record.get("t") or ()})
        present = self.main.applied_among(ids) if ids else set()
        if self._main_server() != server:
            return None
        lost, kept = [], []
        for chunk in chunks:  # (a chunk is part of one batch: a batch commits whole, but for pieces)
            (lost if any(i not in present for i in chunk[0].get("t") or ()) else kept).append(chunk)
        recorded = self.store.main_cluster()  # (a chunk without "cl" is of it)
        recorded_timeline = self.store.main_timeline()  # (... without "tl", on it)
        # A kept chunk of another cluster: its LSN is of that cluster's WAL, and a replica of
        # main's that replayed past it may still lack the restore that brought its rows (its
        # caches were cleaned, the site read nothing until it caught up). It waits for main's
        # position now, read after main showed them. So does one the replica passed without:
        # main has it, the replica replays other WAL at those positions (another server's).
        waits = [m for r, m in kept if replica_passed or cluster is not None and r.get("cl", recorded) not in (None, cluster)]
        lsn_of = dict.fromkeys(waits, self.main.wal_position()) if waits else {}
        if self._main_server() != server:
            return None
        requeued, gone = self.store.requeue_lost(self.token, timeline, lost, kept, cluster, lsn_of,
                                                 rows_of=lambda raw: _rows_written_and_read(raw, self.registry),
                                                 started=started)
        if lost:
            missing = {i for r, _ in lost for i in r.get("t") or () if i not in present}
            moved = bool({r.get("cl", recorded) for r, _ in lost} - {None, cluster})
            # else the same timeline's number on another server: another standby of the old primary
            forked = any(r.get("tl", recorded_timeline) != timeline for r, _ in lost)
            now, cause = ((f"main is now another cluster (system identifier {cluster}, timeline {timeline})",
                           "a restore from before their commits lost them") if moved else
                          (f"main now writes timeline {timeline}", "an asynchronous failover lost them") if forked
                          else ("the site's replica replayed past their commits without them, and main lacks them",
                                "a failover to a server that had not received them lost them") if replica_passed
                          else (f"main is now another server on timeline {timeline} than the one that committed "
                                "them", "a failover to a standby that had not followed that one lost them"))
            log.warning("%s: %d committed transaction(s) of %d batch(es) were not on it (%s); buffered again, to "
                        "apply first, their caches kept meanwhile%s", now, len(missing),
                        len({r.get("lsn") for r, _ in lost}), cause,
                        f"; {len(gone)} could not be, their transaction JSON gone from Redis (their caches stay: "
                        f"{', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''})" if gone else "")
        if kept and replica_passed:
            log.warning("the site's replica replayed past the commits of %d batch(es) main has, without them (it "
                        "replays another server's WAL: point OBS_REPLICA_DB_URL at a replica of main); their caches "
                        "kept until it replays main's position now", len({r.get("lsn") for r, _ in kept}))
        if requeued:
            done = set(requeued)
            self._unmarked = [i for i in self._unmarked if i not in done]  # "pending" now, not "applied"
            # a batch claimed before (settled after a commit, its next claimed meanwhile) waits
            # in `processing` behind them, claimed again with them: applied first, it went to
            # main ahead of older transactions, and one of them, applied after, undid a newer
            # update of its row
            self._prefetched = None
        return requeued


def _one_of_batch(tx: Transaction) -> tuple[str, str | None]:
    """What tells a batch's transactions apart: its id, and its steps (_parse keeps one of each)."""
    return tx.transaction_id, tx.steps_digest


def _waited(tx: Transaction) -> bool:
    """Whether it waited to retry or was parked (or is a requeued dead letter, or one a failover
    lost, first in its rows' order): only such a transaction ever put rows in held_ids, or has
    others parked behind it."""
    return bool(tx.retry_count or "held_by" in tx.metadata or "last_error" in tx.metadata
                or LOST_IN_FAILOVER in tx.metadata)


def _status_json(tx: Transaction, status: str) -> str:
    tx.status = status
    return tx.to_json()


def _failed_entry(tx: dict[str, Any] | str, reason: str, kind: str, attempts: int | None = None) -> str:
    """The dead letter: the transaction as it was (the raw text only if it is no JSON object)
    plus `failure`, so `obs-pipeline failed show ID` finds it and an operator can fix it."""
    now = time.time()
    if isinstance(tx, str):
        try:
            parsed = json.loads(tx)
        except (ValueError, RecursionError):  # kept as the raw text
            parsed = None
        tx = parsed if isinstance(parsed, dict) else {"raw": tx}
    doc = dict(tx)
    doc["status"] = "failed"
    if attempts is None:
        attempts = doc.get("retry_count", 0) + 1 if isinstance(doc.get("retry_count"), int) else 1
    doc["failure"] = {"reason": reason, "kind": kind, "attempts": attempts,
                      "failed_at": now, "first_failed_at": doc.get("metadata", {}).get("first_failed_at", now)
                      if isinstance(doc.get("metadata"), dict) else now}
    return json.dumps(doc, separators=(",", ":"), default=str)


def _rows_written_by(raw: str, registry: ModelRegistry) -> set[str]:
    """The rows an entry that failed validation would have written, as far as it can be read."""
    try:
        return written_ids(Transaction.from_json(raw), registry)
    except Exception:  # noqa: BLE001 - unreadable: nothing to name
        return set()


def _rows_written_and_read(raw: str, registry: ModelRegistry) -> tuple[set[str], set[str]]:
    """(wire.written_ids, wire.referenced_ids) of an entry, as far as it can be read: named as
    the drain names them once it is validated (a key canonical, a UUID in lower case), where it
    validates. A producer that writes its own status key (seed 000's) keeps its steps as pushed
    there, and a failover's lost transaction buffered again from it held rows named so, which
    the claim (validated) neither waited behind nor let go of."""
    try:
        try:
            tx = validate(Transaction.from_json(raw), registry)
        except Exception:  # noqa: BLE001 - invalid: named as pushed, as _parse names its rows
            tx = Transaction.from_json(raw)
        return written_ids(tx, registry), referenced_ids(tx, registry)
    except Exception:  # noqa: BLE001 - unreadable: nothing to name
        return set(), set()


def _rows_only_read_if_lost(raw: str, registry: ModelRegistry, written: set[str]) -> set[str]:
    """For an entry that failed validation and is marked LOST_IN_FAILOVER: the rows it only reads
    (_only_read; `written`, those it writes as named now); none for another."""
    try:
        metadata = json.loads(raw).get("metadata")
    except (ValueError, AttributeError, RecursionError):
        return set()
    if not isinstance(metadata, dict) or LOST_IN_FAILOVER not in metadata:
        return set()
    return _only_read(metadata, lambda: set().union(*_rows_written_and_read(raw, registry))) - written


def _only_read(metadata: dict[str, Any], named_now: Callable[[], set[str]]) -> set[str]:
    """The rows a failover's lost transaction only reads, of those it holds: as requeue_lost
    recorded them (LOST_READS), named under the models of then; `named_now()` for one an earlier
    version buffered again. Named now, under a models file revised since, a step of a model gone
    names none: its reads were held dead with its rows, every newer write of them blocked by it."""
    recorded = metadata.get(LOST_READS)
    if isinstance(recorded, list):
        return {row for row in recorded if isinstance(row, str)}
    return named_now()


def _holds_unnamed_rows(raw: str, registry: ModelRegistry) -> bool:
    """Whether an entry that failed validation waited (it holds rows) and has a step of a model
    the registry lacks, whose rows _rows_written_by cannot name."""
    try:
        tx = Transaction.from_json(raw)
    except Exception:  # noqa: BLE001 - unreadable: it never waited
        return False
    return _waited(tx) and any(not isinstance(step.model_class, str) or step.model_class not in registry.models
                               for step in tx.steps)


def _guess_id(raw: str) -> str | None:
    try:
        tx_id = json.loads(raw).get("transaction_id")
    except (ValueError, AttributeError, RecursionError):
        return None
    return tx_id if is_storable_id(tx_id) else None
