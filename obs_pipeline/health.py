"""The health report of seed 000's /health example, for `obs-pipeline status` and Dagster."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import sqlalchemy as sa

from obs_pipeline.apply import (RecordedTimeline, ReplicaDatabase, applied_records_refused, first_line,
                                hot_standby_off, main_is_standby, replica_hot_standby_off,
                                replica_of_another_cluster, replica_on_another_timeline)
from obs_pipeline.lsn import MAIN_TIMELINE_EXPRESSION, REPLAY_TIMELINE_SQL, lsn_to_int, timeline_of_wal_file
from obs_pipeline.buffer_store import BufferStore
from obs_pipeline.config import stack_env_hint
from obs_pipeline.dead_letters import not_retryable
from obs_pipeline.drain import DrainConfig
from obs_pipeline.spool import Spool
from obs_pipeline.wire import one_line

REDIS_FULL_WARNING_PERCENT = 90  # of maxmemory: the health report warns from here
REPLICA_STUCK_AFTER_S = 120.0    # a committed batch not replayed for this long: the replica needs a look
# a server not in recovery has no replay position (REPLAY_LSN_SQL): no replay will ever clean a batch
NO_REPLAY_POSITION = "the replica reports no replay position: OBS_REPLICA_DB_URL may name a primary"
# Main's flush LSN, and whether it is a hot standby instead (the flush LSN raises 55000 there), and
# its system identifier, which the replica's must be (replica_of_another_cluster), and the timeline
# it writes, which the replica must replay (replica_on_another_timeline; see apply._SESSION_SQL)
MAIN_LSN_SQL = ("SELECT pg_is_in_recovery(), "
                "CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_flush_lsn()::text END, "
                "(SELECT system_identifier FROM pg_control_system()), " + MAIN_TIMELINE_EXPRESSION)


def health_report(store: BufferStore, main: sa.Engine | None, replica: sa.Engine | None,
                  stale_after_s: float = 300.0, spool: Spool | None = None,
                  timeout_attempts: int = DrainConfig.timeout_attempts) -> dict[str, Any]:
    """`spool`: this host's spool of the site (`obs-pipeline status` passes the one OBS_SPOOL_DIR
    names): transactions waiting there while Redis answers need `obs-pipeline spool push`.
    `timeout_attempts`: the drain's (DrainConfig), for the counts of `drain_timeouts` where the
    drain did not save its own with them (a key written before it did)."""
    depths = store.depths()
    stats = depths["stats"]
    # the processing list's oldest, else the buffer's: one without a readable timestamp (a producer's) does not
    # stand for the whole backlog (it read 'none', healthy, an old transaction waiting behind it)
    ages = [age for age in (_entry_age(store.redis.lindex(store.keys.processing, -1)),
                            _entry_age(depths["oldest_entry"])) if age is not None]
    oldest = max(ages) if ages else None
    # the last batch a drain ran (applied, dead-lettered or retried); last_applied_at where a drain
    # of an earlier version wrote only that
    last_batch = stats.get("last_batch_at", stats.get("last_applied_at"))
    last_run = float(last_batch) if last_batch is not None else None
    lag = replication_lag(store, main, replica)
    problems = []
    if depths["failed"]:
        problems.append(dead_letters_problem(store, depths["failed"]))
    if oldest is not None and oldest > stale_after_s:
        problems.append(f"oldest pending transaction is {oldest:.0f} s old")
    overdue = time.time() - depths["first_retry_due"] if depths["first_retry_due"] is not None else None
    if overdue is not None and overdue > stale_after_s:  # with only retries left, nothing else says the drain is gone
        problems.append(f"{depths['retry']} transaction(s) wait to be retried, the first due {overdue:.0f} s ago: "
                        "no drain has taken it (is `obs-pipeline drain`, or Dagster's daemon with buffer_sensor, "
                        "running?)")
    unset = [name for name, engine in (("OBS_MAIN_DB_URL", main), ("OBS_REPLICA_DB_URL", replica)) if engine is None]
    if unset:  # "healthy" would claim what was not looked at (a monitor run without the site's environment)
        problems.append(f"replication not checked: {' and '.join(unset)} not set "
                        f"({stack_env_hint()} for the local stack)")
    if lag.get("error"):
        problems.append(lag["error"])
    elif lag["seconds"] > REPLICA_STUCK_AFTER_S and lag.get("replica_behind_oldest_batch"):
        problems.append(f"the replica has not replayed a batch committed {lag['seconds']:.0f} s ago "
                        f"({lag['awaiting_batches']} chunk(s) of committed transactions waiting; their caches are "
                        "kept): check its WAL receiver (pg_stat_wal_receiver) and that replay is not paused")
    elif lag.get("replica_lsn") is None and replica is not None:
        problems.append(NO_REPLAY_POSITION)
    elif replica is not None and (refused := cleanup_refusal(replica)):
        problems.append(f"{refused}; until then no drain cleans a batch's caches "
                        f"({store.awaiting_replication()[0]} chunk(s) of committed transactions waiting)")
    if lag.get("unsettled"):
        problems.append(lag["unsettled"])
    memory = redis_memory(store)
    if memory["full_percent"] is not None and memory["full_percent"] >= REDIS_FULL_WARNING_PERCENT:
        how_full = "full" if memory["full_percent"] >= 100 else f"{memory['full_percent']:.0f}% full"
        problems.append(f"Redis is {how_full} (maxmemory {memory['maxmemory_bytes']:,} bytes): "
                        "beyond it ingest spools to disk and the drain cannot claim; raise maxmemory")
    unusable = spool.unusable() if spool is not None else None  # no script could spool: as a database down
    local_spool = _spool_summary(spool) if spool is not None and not unusable else None
    if unusable:
        local_spool = {"file": str(spool.path), "pending": None, "oldest_seconds": None, "error": unusable}
    if local_spool and local_spool.get("error"):
        problems.append(local_spool["error"])
    elif local_spool and local_spool["pending"]:
        spooled_oldest = local_spool["oldest_seconds"]  # the spool's own: `oldest` stays the buffer's
        problems.append(f"{local_spool['pending']} transaction(s) wait in the local spool {local_spool['file']}"
                        + (f" (oldest {spooled_oldest:.0f} s old)" if spooled_oldest is not None else "")
                        + ": run `obs-pipeline spool push` (on this host, with the same OBS_SPOOL_DIR)")
    holder = store.lease_holder()
    waiting = store.drain_waiting() if holder is None else None
    paused = store.drain_paused() if holder is None and waiting is None else None
    report = {
        "status": "healthy" if not problems else ("unhealthy" if lag.get("error") or unusable else "degraded"),
        "problems": problems,
        "site": store.keys.site,
        "transaction_buffer": {
            "size": depths["buffer"],
            "processing": depths["processing"],
            "retrying": depths["retry"],
            "failed": depths["failed"],
            "oldest_pending_seconds": round(oldest, 3) if oldest is not None else None,
            # how long the first retry has been due (0 while none is): a drain takes it within a batch
            "retry_overdue_seconds": round(max(overdue, 0.0), 3) if overdue is not None else None,
        },
        "background_processor": {
            "status": "running" if holder or waiting else "paused" if paused else "idle",
            # a drain run between its op retries (main out of reach) holds no lease: why it waits;
            # or the sensor's pause after a failed run: why, and when the next starts
            "waiting": _waiting_line(waiting, paused),
            "last_run": _iso(last_run),
            "transactions_processed": int(stats.get("applied_total", 0)),
            "transactions_replicated": int(stats.get("replicated_total", 0)),
            "dead_lettered_total": int(stats.get("dead_lettered_total", 0)),
        },
        "replication_lag": lag,
        "redis_memory": memory,
    }
    if local_spool is not None:
        report["local_spool"] = local_spool
    piece, alone, attempts = depths["timeouts"]  # attempts: as the drain that saved them had it
    role = main.url.username if main is not None else None
    timeouts = drain_timeouts(piece, alone, attempts or timeout_attempts, role)
    if timeouts is not None:
        report["drain_timeouts"] = timeouts
    return report


def _waiting_line(waiting: tuple[str, float] | None, paused: tuple[str, float, bool] | None) -> str | None:
    """Why no drain works the site right now, and until when (BufferStore.drain_waiting, drain_paused)."""
    if waiting:
        return f"{waiting[0]}, the next attempt " + (f"in {waiting[1]:.0f} s" if waiting[1] >= 0.5 else
                                                     "due now (Dagster starting it)")
    if paused:
        why, left, until_main_answers = paused
        when = f"in {left:.0f} s" if left >= 0.5 else "due now (the sensor launching it)"
        return f"{why}: the next run {'once main answers, or ' if until_main_answers and left >= 0.5 else ''}{when}"
    return None


def dead_letters_problem(store: BufferStore, failed: int) -> str:
    """What to do about `failed` dead letters, for the kinds listed: `failed retry` refuses a
    spooled line Redis could not take and a letter without a usable id (the advice said to retry
    every one). Read among the newest letters only (dead_letters.not_retryable)."""
    read, refused, idless = not_retryable(store)
    retry = "`failed retry ID` (or `--all`) once the cause is fixed, or `failed discard ID`"
    advice = f"{failed} dead-lettered: see `obs-pipeline failed list` and `failed show ID`"
    if not refused and not idless:
        return f"{advice}, then {retry}"
    among = f" of the newest {read}" if read < failed else ""
    if refused:
        advice += (f"; {refused}{among} {'is a spooled line' if refused == 1 else 'are spooled lines'} Redis could "
                   f"not take (refused_spool_line), which cannot be retried: check {'its' if refused == 1 else 'their'} "
                   "rows as they are now, buffer the steps still wanted again, then `failed discard ID`")
    if idless:
        advice += (f"; {idless}{among} {'has' if idless == 1 else 'have'} no usable transaction id "
                   "(#N@digest in `failed list`) and cannot be retried: `failed discard #N@digest` as listed")
    if failed > refused + idless:
        advice += f"; the others: {retry}"
    return advice


def drain_timeouts(piece: int | None, alone: dict[str, int], attempts: int,
                   role: str | None = None) -> dict[str, Any] | None:
    """What the drain keeps after main cancelled its statements (BufferStore.timeouts), for an
    operator: the piece size, the transactions that timed out alone with their counts of
    `attempts` (the drain's timeout_attempts), and what to check on main (`role`: the drain's,
    from OBS_MAIN_DB_URL); None while batches go whole and nothing is counted. Not a problem of
    the report: the drain goes on by itself (a lock that passes), keeps the piece size while the
    site is idle, and what it cannot get through shows as a dead letter or an old backlog."""
    if piece is None and not alone:
        return None
    if piece is not None:
        note = (f"batches applied in pieces of {piece} transaction{'' if piece == 1 else 's'} after "
                "statement/lock timeouts on main (doubling at each batch that goes through, until whole again)")
    else:
        note = "main cancelled the drain's statements (statement/lock timeouts)"
    if alone:
        shown = sorted(alone.items(), key=lambda item: (-item[1], item[0]))[:5]
        note += ("; timed out alone: " + ", ".join(f"{one_line(tx_id)} {count} of {attempts}" for tx_id, count in shown)
                 + (f" and {len(alone) - len(shown)} more" if len(alone) > len(shown) else "")
                 + f" times in a row (dead-lettered at {attempts})")
    check = ("if it goes on: check main's statement_timeout and lock_timeout for the drain's role "
             f"(ALTER ROLE {role or '<role>'} SET statement_timeout = ...), and pg_stat_activity on main for a "
             "session holding a lock the drain waits for; main's log names a session that cancels the drain's "
             "statements (pg_cancel_backend)")
    return {"piece": piece, "timed_out_alone": dict(alone), "timeout_attempts": attempts, "note": note,
            "check": check}


def _spool_summary(spool: Spool) -> dict[str, Any]:
    """The spool's summary, or why it cannot be read (another user's spool: its files are 0600):
    the rest of the report still stands, and the operator learns what to do."""
    try:
        return spool.summary()
    except OSError as error:
        return {"file": str(spool.path), "pending": None, "oldest_seconds": None,
                "error": spool_unreadable(spool, error)}


def spool_unreadable(spool: Spool, error: OSError, command: str = "status") -> str:
    """One line: which spool file cannot be read, why, and what to do (run `command` as whom)."""
    return (f"the local spool cannot be read ({error.strerror or error}: {error.filename or spool.path}): run "
            f"`obs-pipeline {command}` as the user the observing scripts run as, or set OBS_SPOOL_DIR to their "
            "spool folder, or give this user read and write access to it")


def redis_memory(store: BufferStore) -> dict[str, Any]:
    """Redis's memory against its `maxmemory` (0: no limit, `full_percent` None). A full Redis
    refuses writes: ingest spools them to disk, but the drain's claim is a write too."""
    info = store.redis.info("memory")
    used, limit = int(info["used_memory"]), int(info.get("maxmemory", 0))
    return {"used_bytes": used, "maxmemory_bytes": limit,
            "full_percent": round(100 * used / limit, 1) if limit else None}


def replication_lag(store: BufferStore, main: sa.Engine | None, replica: sa.Engine | None) -> dict[str, Any]:
    """Lag of our own data: bytes between main's flush LSN and the replica's replay LSN, and the
    age of the oldest committed batch the replica has not replayed yet (0 when none waits), with
    how many chunks wait so; where its position is unknown, of every batch awaiting cleanup (one
    replayed, waiting only for a drain to clean it, was counted as lag, the replica at main's LSN)."""
    out: dict[str, Any] = {}
    errors = []  # each database on its own: one that is down must not hide the other, nor be unnamed
    main_lsn = replica_lsn = main_cluster = replica_cluster = main_wal = replica_timeline = recorded_timeline = None
    try:
        standby, main_lsn, main_cluster, main_wal = (_row(main, MAIN_LSN_SQL) if main is not None
                                                     else (False, None, None, None))
    except sa.exc.SQLAlchemyError as error:  # (a standby with hot_standby off refuses the connect)
        errors.append(main_is_standby(main.url, hot_standby=False) if hot_standby_off(error)
                      else f"main unreachable (OBS_MAIN_DB_URL): {first_line(error)}")
        # main's as the last acknowledgement recorded them, which the drain compares with too: without them a
        # replay of another timeline passed for main's WAL, and a batch a failover lost for replayed
        main_cluster, recorded_timeline = store.main_cluster(), store.main_timeline()
    else:
        if standby:
            errors.append(main_is_standby(main.url))
    try:
        replica_lsn, replica_cluster, replica_timeline = (_row(replica, REPLAY_TIMELINE_SQL) if replica is not None
                                                          else (None, None, None))
    except sa.exc.SQLAlchemyError as error:  # (one with hot_standby off is up: it refuses every connect)
        errors.append(replica_hot_standby_off(replica.url) if hot_standby_off(error)
                      else f"replica unreachable (OBS_REPLICA_DB_URL): {first_line(error)}")
    foreign = None not in (replica_lsn, main_cluster) and replica_cluster != main_cluster
    if foreign:  # its replay is of other WAL: it replays none of our batches (the drain cleans none)
        errors.append(replica_of_another_cluster(replica.url, replica_cluster, main_cluster))
    main_timeline = timeline_of_wal_file(main_wal)
    if main_timeline is None and recorded_timeline is not None:
        main_timeline = RecordedTimeline(recorded_timeline)
    if not foreign and None not in (replica_lsn, main_timeline) and replica_timeline != main_timeline:
        foreign = True  # past their fork its replay is of other WAL too
        errors.append(replica_on_another_timeline(replica.url, replica_timeline, main_timeline))
    replayed = lsn_to_int(replica_lsn) if replica_lsn and not foreign else None
    behind, lowest = store.awaiting_replication(after=replayed)
    count, seconds = behind, oldest_batch_age_s(store, after=replayed)
    if main_wal is not None and replayed is not None:  # main answered: see unsettled_line
        # (those above the replay are counted already; one of no known timeline, of an earlier
        # version with none recorded, is not compared)
        recorded = store.main_timeline()
        unsettled = [r for r, _ in store.chunks_off_timeline(main_timeline, main_cluster, upto=replayed)
                     if r.get("tl", recorded) is not None]
        if unsettled:  # awaiting, though not the replica's to replay: a drain's to settle
            count += len(unsettled)
            seconds = max([seconds] + [time.time() - float(r.get("at") or time.time()) for r in unsettled])
            out["unsettled"] = unsettled_line(store, unsettled, main_timeline, main_cluster)
    out["seconds"], out["awaiting_batches"] = round(max(seconds, 0.0), 3), count
    out["main_lsn"], out["replica_lsn"] = main_lsn, replica_lsn
    if errors:
        out["error"] = "; ".join(errors)
        return out
    if main_lsn and replica_lsn:
        out["bytes"] = max(0, lsn_to_int(main_lsn) - lsn_to_int(replica_lsn))
    out["replica_behind_oldest_batch"] = replica_behind(behind, lowest, replayed)
    return out


def cleanup_refusal(replica: sa.Engine) -> str | None:
    """Why no drain can clean a batch the replica replayed (apply.applied_records_refused: its
    role may not read obs_pipeline_applied, where the drain checks that it has the batch's ids),
    or None. `status` said healthy while every batch's caches stayed."""
    try:
        ReplicaDatabase(replica).missing_among([])
    except sa.exc.SQLAlchemyError as error:
        return applied_records_refused(error)
    return None


def unsettled_line(store: BufferStore, chunks: list[dict[str, Any]], timeline: int, cluster: int | None) -> str:
    """The problem of chunks committed on another timeline or cluster than main's now, which the
    replica's replay has passed: past a failover's fork (or of another cluster's WAL) that says
    nothing of their rows, which the failover may have lost, until a drain asks main which it
    holds and buffers the rest again (Drain._settle_failover). Counted as replayed, `status` said
    healthy with their rows on neither server."""
    recorded_timeline, recorded_cluster = store.main_timeline(), store.main_cluster()
    moved = cluster is not None and any(r.get("cl", recorded_cluster) not in (None, cluster) for r in chunks)
    where = ("by another cluster than main's now" if moved else "on timeline " + ", ".join(
        str(t) for t in sorted({r.get("tl", recorded_timeline) for r in chunks}, key=str)))
    return (f"{len(chunks)} chunk(s) of committed transactions were committed {where}, main writes timeline "
            f"{timeline}: the replica's replay says nothing of them, and main may lack them, until a drain "
            "settles them (it asks main which it holds, and buffers the rest again): is a drain running?")


def oldest_batch_age_s(store: BufferStore, after: int | None = None) -> float:
    """Age of the oldest committed batch still awaiting the replica (0 when none waits); `after`:
    the replica's replay LSN, to leave out the batches it has replayed."""
    key = store.keys.awaiting_replication
    oldest = (store.redis.zrange(key, 0, 0) if after is None
              else store.redis.zrangebyscore(key, f"({after}", "+inf", start=0, num=1))
    return max(0.0, time.time() - json.loads(oldest[0])["at"]) if oldest else 0.0


def replica_behind(count: int, lowest: int, replayed: int | None) -> bool:
    """The replica itself is late only if it has not reached the oldest waiting commit; if it
    has, the batch merely waits for a drain to clean it."""
    return bool(count) and (replayed is None or replayed < lowest)


def _row(engine: sa.Engine, sql: str) -> tuple:
    with engine.connect() as conn:
        return tuple(conn.execute(sa.text(sql)).one())


def oldest_waiting(store: BufferStore) -> dict[str, dt.datetime | None]:
    """The timestamps of the oldest entries still waiting, as the health report reads them: the
    processing list's and the buffer's (the consuming end of each), by list name; a list that is
    empty is left out, an entry without a readable timestamp is None. Two LINDEX, whatever the
    backlog: reading every entry of a million costs a gigabyte."""
    pipe = store.redis.pipeline(transaction=False)
    pipe.lindex(store.keys.processing, -1)
    pipe.lindex(store.keys.buffer, -1)
    return {where: entry_timestamp(raw) for where, raw in zip(("processing", "buffer"), pipe.execute())
            if raw is not None}


def entry_timestamp(raw: bytes | str | None) -> dt.datetime | None:
    """A buffer entry's `timestamp` (UTC where it has no offset), or None if it has none readable."""
    if raw is None:
        return None
    try:
        stamp = dt.datetime.fromisoformat(json.loads(raw)["timestamp"])
    except (ValueError, KeyError, TypeError, RecursionError):  # a producer's entry nested too deeply, too
        return None
    return stamp.replace(tzinfo=dt.timezone.utc) if stamp.tzinfo is None else stamp


def _entry_age(raw: bytes | None) -> float | None:
    stamp = entry_timestamp(raw)
    if stamp is None:
        return None
    return max(0.0, (dt.datetime.now(dt.timezone.utc) - stamp).total_seconds())


def _iso(epoch: float | None) -> str | None:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat() if epoch else None


