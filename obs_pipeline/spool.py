"""When Redis does not answer, is full or refuses writes for a while, ingest still succeeds: the transaction goes to a
local spool.

Each spooled transaction is one fsync'd JSON line. The spool is pushed to Redis, in order and
before any newer transaction, by a background thread that retries every second (and survives
any failure), at interpreter exit if Redis takes it within EXIT_PUSH_S, or by `obs-pipeline
spool push` for a spool a script left behind; the next ingest call pushes a slice of it too. A
push holds the spool's lock a slice at a time (PUSH_SLICE_S): a call that finds lines still
spooled after its slice appends its own behind them. After Redis
did not answer in time, calls spool without asking it for REDIS_RETRY_AFTER_S. A crash while pushing can push one line twice, and a push whose reply timed out
may have been buffered after all: the buffer script leaves a transaction that is already in
Redis as it is, and leaves out one an operator discarded since (`failed discard`), so nothing
is doubled or comes back. A line the buffer script cannot take for what it is (see
_buffer_line) would stop every push there for good: it goes to the site's dead-letter list
instead (Spool._set_aside), and the push goes on with the next line.

Every script of a site on one host shares the site's spool file: appending and pushing hold
an exclusive `flock` on `{site}.lock` beside it (and a thread lock within a process), or one
process's push could delete a line another had just appended.

A child forked from a script (multiprocessing's fork start method) gets fresh thread locks and
no flusher of its own until it spools (see obs_pipeline.forks): a lock another thread held at
the fork would otherwise stay held for ever in the child. The `flock` is released explicitly,
not by closing its descriptor: a child forked while it was held has a copy of that descriptor,
which would keep it held for as long as the child lives.
"""

from __future__ import annotations

import atexit
import collections
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import redis

from obs_pipeline import forks
from obs_pipeline.buffer_store import (REPLICATED_STATUS_TTL_S, BufferStore, CacheWrites, KeyTaken,
                                       RedisRefusesWrites, refuse_a_redis_without_tls)
from obs_pipeline.redis_connections import ConnectFailed, sockets_lost
from obs_pipeline.wire import is_storable_id, status_header

RETRY_INTERVAL_S = 1.0
# The flusher's wait after an unexpected failure (Redis refusing the push with NOPERM, say, or the
# spool unreadable) doubles from RETRY_INTERVAL_S up to this.
MAX_RETRY_INTERVAL_S = 30.0
# After Redis did not answer in time (a hang costs a call about 10 s: its connect and reply timeouts),
# calls append to the spool without trying Redis for this long, and reads of what they spooled
# skip it too; the flusher retries Redis meanwhile (a PING, outside the spool's lock, during which
# the wait lasts), and its first push that goes through ends the wait at once. Each failure of
# the flusher starts it anew.
REDIS_RETRY_AFTER_S = 5.0
# At interpreter exit, a script's spool is pushed if Redis takes it within this (see push_at_exit).
EXIT_PUSH_S = 2.0
# A push holds the spool's lock a slice at a time: lines for up to this long (and whatever the
# line under way takes), then it lets the calls waiting for the lock in. Pushed whole under the
# lock, a spool held every call of every script of the site on the host for all of it: about
# 0.4 ms a line, tens of seconds after a long outage.
PUSH_SLICE_S = 0.1
# Between two slices a push waits this long without the lock: neither a thread lock nor a flock
# is fair, and a push taking it back at once could keep a waiting call waiting all the same.
PUSH_PAUSE_S = 0.002
# A spooled line the buffer script cannot take for what it is goes to the dead-letter list as a
# letter of this kind (see Spool._set_aside); one longer than LETTER_LINE_BYTES is kept whole beside
# the spool and the letter quotes its start: the letter must pass the proto-max-bulk-len (at least
# 1 MB) that may have refused the line.
REFUSED_KIND = "refused_spool_line"
LETTER_LINE_BYTES = 256 * 1024
LETTER_EXCERPT_CHARS = 2000
# A line this long is checked against Redis's size limits before it is pushed (the least either
# of proto-max-bulk-len and client-query-buffer-limit can be set to): see _over_a_size_limit.
SIZE_LIMITS_FLOOR = 1024 * 1024
# The offset file `{site}.offset` says how many lines of the spool file pushes got through: a bare
# count, as earlier versions write and read it (`int(text or 0)`: scripts of an earlier version may
# run beside this one on the host during an upgrade, and another format made each of their calls
# raise). `{site}.offset-check` beside it says which content that count counted: "{lines} {end}
# {head}", the byte position where the lines end and a digest of the file's first bytes up to there
# (OFFSET_HEAD_BYTES at most). A count alone counted the lines of a file truncated in place since
# (`: > site.jsonl`, logrotate's copytruncate): the next push took as many of its new lines for
# pushed. The check is written before the count, and used only while its `lines` is the count: a
# crash between the two, or an earlier version's push (which writes the count alone), leaves them
# unequal, and the count is read as earlier versions read it. (A check an earlier version's push left
# behind, removing the count alone, whose `lines` its later count reaches, makes that count look
# stale: its lines are pushed again, harmless, with the warning.)
OFFSET_HEAD_BYTES = 4096
# A spooled line may be a copy of a transaction Redis took: its push lost the connection or timed
# out after Redis ran the buffer script (ingest spools it all the same: Redis may not have it), or
# a push sent it and died before recording it (`{site}.pushing`, made as a push starts and removed
# once every line it sent is recorded, is left behind). Pushed again, the buffer script leaves it alone
# while its status key exists, which is until REPLICATED_STATUS_TTL_S after it was replicated; the
# drain skips it while main's applied-id record stays, until the prune after `older_than_days`.
# Past both (a host switched off for a week with its spool), the copy was buffered and applied
# again: an update set its row back to its older value. Such a line (marked MAYBE_IN_REDIS when it
# was spooled, or the first line a push takes after a push that left `{site}.pushing`)
# older than this, whose status key is gone, cannot be told from a transaction never buffered: it
# goes to the dead-letter list with the line (Spool._set_aside), for an operator to check its rows.
STALE_COPY_AFTER_S = REPLICATED_STATUS_TTL_S
MAYBE_IN_REDIS = "maybe_in_redis"
log = logging.getLogger(__name__)
# Redis cannot take the transaction now: down, too slow, full (`maxmemory` reached under
# `noeviction`, the only policy a buffer can have: Redis refuses the write and keeps nothing),
# or refusing writes for a while (it cannot persist, it is a replica after a failover, or it
# lacks the replicas its `min-replicas-to-write` asks for).
REDIS_CANNOT_TAKE_IT = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError,
                        RedisRefusesWrites)


class _Offset(NamedTuple):
    """The offset (see OFFSET_HEAD_BYTES); `end` and `head` None without a check of its count."""
    lines: int
    end: int | None = None
    head: str | None = None


_NO_OFFSET = _Offset(0)
_UNREADABLE_OFFSET = _Offset(-1)  # an offset file that holds no count (garbage, zeros after a power loss)


class SpoolError(OSError):
    """Redis could not take a transaction and the spool could not either: nothing of it was kept."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def default_spool_dir() -> Path:
    """A relative XDG_STATE_HOME is ignored, as its specification asks (see Spool's folder)."""
    state = os.environ.get("XDG_STATE_HOME")
    if not state or not os.path.isabs(state):
        state = os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "obs-pipeline" / "spool"


class Spool:
    def __init__(self, directory: str | os.PathLike | None, site: str, flush_store: BufferStore):
        """`flush_store`: what the background flusher pushes with. A store on a connection pool,
        never a thread's own connection: that thread may be sending on it at the same time."""
        # fixed now: a relative folder taken against each call's working folder lost the script's
        # spooled lines once it changed folder (its next went to another file, pushed before them)
        self.directory = (Path(directory).expanduser() if directory else default_spool_dir()).absolute()
        self.path = self.directory / f"{site}.jsonl"
        self.offset_path = self.directory / f"{site}.offset"
        self.offset_check_path = self.directory / f"{site}.offset-check"
        self.lock_path = self.directory / f"{site}.lock"
        # there while a push is under way (see STALE_COPY_AFTER_S): one that died left it
        self.pushing_path = self.directory / f"{site}.pushing"
        # shared by every Spool of this file in the process (a signal handler's own TransactionBuffer)
        self._shared = _SHARED.of(self.lock_path)
        self._flusher_lock = threading.RLock()  # guards _flusher_running (never held around a push)
        self._flusher_running = False
        self._redis_failed_at: float | None = None  # monotonic; see REDIS_RETRY_AFTER_S
        self._probing = False  # the flusher's PING of a Redis that did not answer is out
        self._flush_store = flush_store
        self._cursor = _PushCursor()  # where this process's push stopped (used under the lock)
        self._stale_offset_told: _Offset | None = None  # the stale offset last warned of (_offset_in)
        self.set_aside = 0  # lines this process's pushes moved to the dead-letter list (_set_aside)
        self.dropped = 0  # lines this process's pushes dropped: copies of discarded transactions
        forks.renew_in_forked_children(self)

    def _after_fork_in_child(self) -> None:
        """In a forked child (see obs_pipeline.forks): fresh locks (the shared ones renew
        themselves, _SharedLock), no flusher (the parent's thread is not in the child; the next
        spooled line starts one)."""
        self._flusher_lock = threading.RLock()
        self._flusher_running = False
        self._probing = False
        self._cursor.forget()  # a plain descriptor of the spool file: the child's copy is its own

    def buffer(self, store: BufferStore, tx_id: str, tx_json: str, caches: CacheWrites) -> None:
        """Buffer in Redis, or spool if Redis is unreachable; spooled work always goes first
        (_buffer_now). A call made while this thread is inside the spool already (a signal
        handler's: see _inside) is deferred until it leaves it."""
        here = self._shared.here
        if getattr(here, "depth", 0):
            here.deferred.append((store, tx_id, tx_json, caches))
            return
        with self._inside():
            self._buffer_now(store, tx_id, tx_json, caches)

    @contextmanager
    def _inside(self) -> Iterator[None]:
        """Mark this thread inside the spool (a buffer() call, or the lock held) for the block.

        Python runs a signal handler in the main thread, between two steps of whatever it was
        doing: an observing script's SIGTERM handler that buffers "aborted" ran inside the call
        it interrupted. Holding the spool's lock (the flock, every script of the site on the host
        waiting for it), it waited for that lock for ever: the script hung, and every other one
        with it. And a line appended then would land inside the one being written, or a request
        be sent on this thread's connection while that call waits for its reply. So a buffer()
        made inside is kept until the outermost block ends, and made then (its call returned
        before: the handler cannot wait for a call it interrupted); a read made inside reads
        under the lock already held (_locked)."""
        here = self._shared.here
        outermost = not getattr(here, "depth", 0)
        if outermost:
            here.depth = 0
            if getattr(here, "deferred", None) is None:
                # one queue per thread, never replaced: a handler run as a block ends, after its
                # depth is 0 and before the queue is taken, would drop the calls queued in it
                here.deferred, here.draining = collections.deque(), False
        here.depth += 1
        try:
            yield
        finally:
            here.depth -= 1
            if outermost and not here.draining:
                self._buffer_deferred(here)

    def _buffer_deferred(self, here: threading.local) -> None:
        """Buffer the calls deferred inside (see _inside), in order, each deferred meanwhile too
        (in this loop: the blocks of the calls it makes leave the queue to it, or each would
        empty it from within the last, as deep as it is long). Their calls have returned: one
        that fails is logged, as the flusher logs what it cannot push."""
        deferred, here.draining = here.deferred, True
        try:
            while deferred:
                store, tx_id, tx_json, caches = deferred.popleft()
                try:
                    self.buffer(store, tx_id, tx_json, caches)
                except Exception as error:  # noqa: BLE001 -- its call returned: nothing else can say it
                    log.error("transaction %s, buffered by a signal handler while its thread was spooling, was "
                              "not kept: %s", tx_id, _one_line(error))
        finally:
            here.draining = False

    def _buffer_now(self, store: BufferStore, tx_id: str, tx_json: str, caches: CacheWrites) -> None:
        """Buffer in Redis, or spool if Redis is unreachable; spooled work always goes first.

        With nothing spooled, threads buffer concurrently (no lock): a transaction spooled by
        one thread is on disk before its `with` block returns, so anything that uses its ids
        later finds the spool file and queues behind it.

        A spool that cannot take the transaction (its folder cannot be written, the disk is
        full, fsync fails) raises SpoolError, one line, and keeps nothing of it: a line that
        a later push would find is written whole and fsync'd, or not at all."""
        why = "transactions spooled before it go first"
        try:
            if not os.path.exists(self.path) and not self.redis_failed_recently():
                lost = sockets_lost()
                try:
                    store.buffer(tx_id, tx_json, caches)
                    return
                except REDIS_CANNOT_TAKE_IT as error:
                    refuse_a_redis_without_tls(store.redis, error)  # the URL, not an outage: not spooled
                    why = "Redis cannot take it: " + _one_line(error)
                    self.note_redis_failure(error)
                    sent = _may_have_reached_redis(error, lost)
                with self._locked():
                    self._append(tx_id, tx_json, caches, maybe_in_redis=sent)
                return
            if not self.redis_failed_recently():
                self._ask_redis_outside_the_lock(store)
            with self._locked():
                if self.redis_failed_recently():
                    why = "Redis did not answer a moment ago: the spool's flusher retries it"
                    self._append(tx_id, tx_json, caches)
                    return
                if self.path.exists():
                    try:  # one slice: a long push is left to the flusher, which pushes this too
                        _, emptied = self._push_slice_locked(store)
                    except REDIS_CANNOT_TAKE_IT as error:
                        self.note_redis_failure(error)
                        why, emptied = "Redis cannot take the transactions spooled before it", False
                    if not emptied:
                        self._append(tx_id, tx_json, caches)
                        return
                lost = sockets_lost()
                try:
                    store.buffer(tx_id, tx_json, caches)
                except REDIS_CANNOT_TAKE_IT as error:
                    refuse_a_redis_without_tls(store.redis, error)
                    why = "Redis cannot take it: " + _one_line(error)
                    self.note_redis_failure(error)
                    self._append(tx_id, tx_json, caches, maybe_in_redis=_may_have_reached_redis(error, lost))
        except OSError as error:  # the spool's own files: Redis's errors are not OSErrors
            raise SpoolError(f"transaction {tx_id} was not buffered ({why}), and the spool cannot take it: "
                             f"{_one_line(error)} (its folder is OBS_SPOOL_DIR)") from error

    def _ask_redis_outside_the_lock(self, store: BufferStore) -> None:
        """A PING before a call pushes the spool under its lock. Another script of the site may
        have found Redis hung and spool without asking it; this one does not know yet, and a
        push that waited under the lock for the reply timeout held that script's calls as long.
        A timeout here starts this process's wait, and the call then spools at once."""
        try:
            store.redis.ping()
        except (redis.ConnectionError, redis.TimeoutError) as error:
            self.note_redis_failure(error)
        except redis.RedisError:
            pass  # it answered: the push says what it is

    def redis_failed_recently(self) -> bool:
        """Did Redis not answer (its connection or reply timed out) within the last
        REDIS_RETRY_AFTER_S, or since while the flusher's PING still waits for it, with nothing
        pushed since? Calls then spool without trying it. (That PING waits up to its 5 s reply
        timeout, as long as this wait: the wait lapsed before the PING's timeout renewed it, and a
        call then asked the hung Redis itself, holding the spool's lock.)"""
        failed_at = self._redis_failed_at
        return failed_at is not None and (self._probing or time.monotonic() - failed_at < REDIS_RETRY_AFTER_S)

    def note_redis_failure(self, error: BaseException) -> None:
        """Only a timeout counts: it is what costs a call (a refused connection or a full Redis
        answers at once, and a call right after Redis is back should find it)."""
        if isinstance(error, redis.TimeoutError):
            self._redis_failed_at = time.monotonic()

    def unusable(self, scripts_user: bool = False) -> str | None:
        """One line naming OBS_SPOOL_DIR where no script could spool: the folder is a file (or
        lies under one), this user may not write it (or make it: the folder it would be made in),
        or one of the spool's files is a folder. None otherwise (a folder not made yet is fine;
        one this user may not read is spool_unreadable's to say). It showed as healthy, or as
        "[Errno 21] Is a directory", and scripts lost their transactions to a SpoolError at the
        next outage ("[Errno 13] Permission denied", "[Errno 30] Read-only file system").
        `scripts_user`: this process is a script (a TransactionBuffer). Otherwise (`status`, `spool`)
        it may be an operator looking at the scripts' folder: one of another owner that it may not
        write (not for being read-only) may be theirs to write, and is not said."""
        import stat

        why = "scripts could not spool there while Redis cannot take their transactions"
        for folder in (self.directory, *self.directory.parents):
            try:
                mode = folder.stat().st_mode
            except (FileNotFoundError, NotADirectoryError):  # (the latter: under a file, found further up)
                continue
            except OSError:
                return None
            if not stat.S_ISDIR(mode):
                where = "is a file" if folder == self.directory else f"lies under {folder}, a file"
                return (f"the spool folder {self.directory} (OBS_SPOOL_DIR) {where}: {why}; give OBS_SPOOL_DIR a "
                        "folder (made if missing), or move that file aside")
            if not os.access(folder, os.W_OK | os.X_OK):
                read_only = _read_only(folder)
                if not (scripts_user or read_only or folder.stat().st_uid == os.geteuid()):
                    return None
                read_only = " (a read-only file system)" if read_only else ""
                where = ("may not be written by this user" if folder == self.directory else
                         f"cannot be made: {folder} may not be written by this user")
                return (f"the spool folder {self.directory} (OBS_SPOOL_DIR) {where}{read_only}: {why}; give "
                        "OBS_SPOOL_DIR a folder this user may write (made if missing)")
            break
        for path in (self.path, self.lock_path, self.offset_path, self.offset_check_path):
            try:
                mode = path.stat().st_mode
            except OSError:
                continue
            if stat.S_ISDIR(mode):
                return (f"{path} is a folder where the spool keeps a file (OBS_SPOOL_DIR {self.directory}): {why}; "
                        "move that folder aside, or give OBS_SPOOL_DIR another folder")
        return None

    def exists(self) -> bool:
        """Is anything spooled? (A stat: the file is removed once pushed.)"""
        return self.path.exists()

    def holds(self, tx_id: str) -> bool:
        """Is the transaction spooled and not pushed yet? (A pushed one is Redis's to answer for:
        the file keeps pushed lines until all are, and one of them may be replicated by then.)"""
        if not isinstance(tx_id, str):  # spooled ids are strings
            return False
        return any(entry["id"] == tx_id for entry in self.unpushed(json.dumps(tx_id)))

    def unpushed(self, containing: str | None = None) -> list[dict]:
        """The spooled transactions not pushed yet, oldest first, each {"id", "tx", "created",
        "overlays"} as appended (a line that is not one is skipped, see _readable); `containing`:
        only lines holding this text (reads look for a model's or a record's writes here while
        Redis cannot take them). The first is marked MAYBE_IN_REDIS where a push left
        `{site}.pushing` behind, as the next push takes it (see stale_copy)."""
        if not self.path.exists():
            return []
        needle = containing.encode() if containing is not None else None
        with self._locked(shared=True):
            first_maybe_sent = self.pushing_path.exists()
            out = []
            for line in self._unpushed_lines():
                maybe_sent, first_maybe_sent = first_maybe_sent, False
                if needle is None or needle in line:
                    for entry in _readable([line]):
                        out.append({**entry, MAYBE_IN_REDIS: True} if maybe_sent else entry)
            return out

    def pending(self) -> int:
        if not self.path.exists():
            return 0
        with self._locked(shared=True):
            return sum(1 for _ in self._unpushed_lines())

    def flush(self) -> bool:
        """Push everything spooled, a slice at a time; True when the spool is empty."""
        try:
            self._push_in_slices(self._flush_store)
        except REDIS_CANNOT_TAKE_IT as error:
            self.note_redis_failure(error)
            return False
        return True

    def push(self) -> int:
        """Push everything spooled, in order (`obs-pipeline spool push`); how many were pushed.
        Raises what stopped it (Redis not answering, say); what it pushed before stays pushed."""
        if not self.path.exists():  # nothing spooled: no folder or lock file made for it
            return 0
        return self._push_in_slices(self._flush_store)

    def summary(self) -> dict:
        """The spool file, how many transactions wait in it and the oldest one's age (seconds,
        from its transaction's timestamp; None when none waits or it has no readable one)."""
        pending, oldest = 0, None
        if self.path.exists():
            with self._locked(shared=True):
                for line in self._unpushed_lines():
                    if pending == 0:
                        oldest = _age_of(line)
                    pending += 1
        return {"file": str(self.path), "pending": pending,
                "oldest_seconds": round(oldest, 3) if oldest is not None else None}

    def push_when_the_script_exits(self) -> None:
        """Have the spool pushed at interpreter exit (see push_at_exit), whoever spooled it: a
        child forked from the script (multiprocessing) leaves without that push, so what it
        spooled stayed on disk when the script itself had spooled nothing."""
        with self._flusher_lock:
            _push_at_exit(self)

    def push_at_exit(self, within_s: float) -> None:
        """Best effort at interpreter exit: push the spool, waiting at most `within_s` (Redis
        may not answer: a script's exit must not hang on it). What is not pushed stays."""
        if not self.path.exists():
            return
        pusher = threading.Thread(target=self._push_quietly, name="obs-spool-exit-push", daemon=True)
        try:
            pusher.start()
        except RuntimeError:  # no thread may start (Python 3.12.0-3.12.1 at exit, a pids limit)
            self._push_here(within_s)
        else:
            pusher.join(within_s)

    def _tell_what_stays(self) -> None:
        """One warning for what the exit leaves spooled: the script ended as if all were buffered,
        its observations on this host's disk alone until someone pushes them. Counted without the
        lock: a push hung on Redis may hold it, and the exit must not wait for it."""
        try:
            left = sum(1 for _ in self._unpushed_lines())
        except OSError:  # unreadable: `obs-pipeline status` says so
            return
        if left:
            log.warning("%d spooled transaction(s) stay in %s: Redis did not take them before the script exited. They "
                        "are pushed when a script of site %s next runs on this host, or by `obs-pipeline spool push` "
                        "(run as this user, with OBS_SPOOL_DIR=%s)", left, self.path, self.path.stem, self.directory)

    def _push_here(self, within_s: float) -> None:
        """push_at_exit in the exiting thread: slices until `within_s` is spent, on a connection
        of their own whose timeouts are `within_s` (the flush store's wait 5 s for a hung Redis)."""
        deadline = time.monotonic() + within_s
        pool = self._flush_store.redis.connection_pool
        client = redis.Redis(connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class,
            **{**pool.connection_kwargs, "socket_timeout": within_s, "socket_connect_timeout": within_s}))
        store = BufferStore(client, self._flush_store.keys.site)
        try:
            while time.monotonic() < deadline:
                with self._locked():
                    _, emptied = self._push_slice_locked(store)
                if emptied:
                    return
        except REDIS_CANNOT_TAKE_IT:
            pass  # the spool stays for later
        except Exception as error:  # noqa: BLE001 -- at exit: the spool stays for later
            log.warning("the spool %s was not pushed at exit: %s", self.path, _one_line(error))
        finally:
            client.close()

    def _push_quietly(self) -> None:
        try:
            self.flush()
        except Exception as error:  # noqa: BLE001 -- at exit: the spool stays for later
            log.warning("the spool %s was not pushed at exit: %s", self.path, _one_line(error))

    # --- internals ----------------------------------------------------------------------------
    @contextmanager
    def _locked(self, shared: bool = False) -> Iterator[None]:
        """This process's threads (the thread lock), then every process of the site on this host
        (flock on the lock file; released when its descriptor closes, a crash included).

        Entered again by the thread that holds it (a signal handler's read, see _inside), it
        reads under the lock held: another flock of the process waits for its own for ever. A
        handler's push could land in the middle of the slice it interrupted, and is refused."""
        me = threading.get_ident()
        with self._inside():
            common = self._shared
            if common.holder == me:
                if not shared:
                    raise RuntimeError(f"the spool {self.path} cannot be pushed from a signal handler that "
                                       "interrupted its own thread's use of it: the flusher pushes it")
                yield
                return
            with common.lock:
                common.holder = me  # (before the flock: one not taken yet is taken by the handler's own)
                try:
                    if not self.directory.is_dir():
                        _make_durable_folder(self.directory)
                    fd = common.fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
                    pid = os.getpid()
                    try:
                        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
                        yield
                    finally:
                        common.fd = None  # first: a child forked from now on does not close the number
                        try:
                            # explicitly: a child forked meanwhile holds a copy of the descriptor, and
                            # closing this one would not release the lock while that copy is open
                            if os.getpid() == pid:  # (never a parent's lock, from a child)
                                fcntl.flock(fd, fcntl.LOCK_UN)
                        finally:
                            os.close(fd)
                finally:
                    common.holder = None  # last: the flock is released

    def _append(self, tx_id: str, tx_json: str, caches: CacheWrites, maybe_in_redis: bool = False) -> None:
        """One line, written whole (or an error: a full disk must not be taken for spooled) and fsync'd.
        `maybe_in_redis`: its own push failed in a way that may come after Redis ran it (see
        STALE_COPY_AFTER_S)."""
        entry = {"id": tx_id, "tx": tx_json, "created": caches.created, "overlays": caches.overlays}
        if caches.checked:  # (only then: a line as earlier versions write it otherwise; they ignore it)
            entry["checked"] = caches.checked
        if maybe_in_redis:  # (likewise)
            entry[MAYBE_IN_REDIS] = True
        line = (json.dumps(entry) + "\n").encode()
        try:
            fd, created = os.open(self.path, os.O_RDWR | os.O_APPEND), False
        except FileNotFoundError:
            # an offset left behind counts the lines of a spool file moved aside or removed by
            # hand (or pushed whole by a push that died before it removed the offset), not this
            # one's: kept, the next push skipped as many of this spool's lines
            # (and removed it whole if it held fewer); its removal is made durable with the
            # new file's name, by the folder's fsync below
            self._remove_offset()
            fd, created = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600), True
        try:
            torn = _torn_tail(fd)
            if torn is not None:
                self._tell_torn_tail(fd, torn, "it is cut off, and the lines before it are kept")
                os.ftruncate(fd, torn)  # (as _cut_torn_tail does, once said)
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                if created:  # the file's fsync does not make its name durable: its folder's does
                    _fsync_folder(self.directory)
            except BaseException:
                # the call fails: a whole line left behind (fsync failed after the write) would
                # be pushed later all the same, and the script, told it failed, may buffer it again
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)
        self.start_flusher()

    def _unpushed_lines(self) -> Iterator[bytes]:
        """The spooled transactions not pushed yet (after the offset, counted as the push counts
        them; the caller holds the lock), one JSON line each, unparsed: a long outage spools tens
        of thousands, every call looks at the spool, and parsing them all each time made each call
        cost more than the last (0.1 s with 5,000 spooled).

        A last line without its newline is one a crash cut short while it was written: its
        call never returned, so it is not a spooled transaction (and the next append cuts it
        off, see _cut_torn_tail). So is a line with a NUL byte, which JSON never holds: a power
        loss during its fsync left blocks of it unwritten, read back as zeros (it stays, and is
        skipped wherever later lines put it)."""
        try:
            file = open(self.path, "rb")
        except FileNotFoundError:
            return
        with file:
            offset = self._offset_in(file)
            if offset.end is not None:
                yield from (line for line, _ in _counted_lines(file, offset.end))
                return
            for index, (line, _) in enumerate(_counted_lines(file, 0)):  # a bare count
                if index >= offset.lines:
                    yield line

    def _push_in_slices(self, store: BufferStore) -> int:
        """Push the whole spool, taking the lock for one slice at a time; how many were pushed.
        Lines appended between slices are pushed too, behind the others."""
        pushed = 0
        while True:
            with self._locked():
                count, emptied = self._push_slice_locked(store)
            pushed += count
            if emptied:
                return pushed
            time.sleep(PUSH_PAUSE_S)

    def _push_slice_locked(self, store: BufferStore) -> tuple[int, bool]:
        """Push the lines after the offset, in order, for up to PUSH_SLICE_S (the caller holds
        the lock); how many, and whether the spool is all pushed, and then removed. The offset
        is written after each line: a crash pushes one line again at most (harmless: the buffer
        script leaves a transaction already in Redis as it is), and the next push, in any
        process, goes on from there."""
        cursor = self._cursor
        try:
            file = open(self.path, "rb")
        except FileNotFoundError:
            cursor.forget()
            return 0, True
        with file:
            self._find_unpushed(cursor, file)
            # the first line is untried only where no push left `{site}.pushing` behind, whatever this
            # process knows (it recorded the line before, or failed at the connect): another script's
            # push may have sent it since and lost its reply, and taken for untried here, that mark was
            # removed. Within the slice, a line after one this push recorded is untried.
            untried = not self.pushing_path.exists()
            self.pushing_path.touch(mode=0o600)
            deadline, pushed, recorded = time.monotonic() + PUSH_SLICE_S, 0, True
            for line, end in _counted_lines(file, cursor.position):
                # a line this process is not known to send for the first time: a push before may have
                # sent it and lost its reply, or died before recording it (see STALE_COPY_AFTER_S)
                maybe_in_redis, untried = not untried, False
                lost = sockets_lost()
                try:  # only the lines pushed now are parsed
                    if _buffer_line(store, line, maybe_in_redis):
                        pushed += 1
                    else:
                        self.dropped += 1
                except _CannotBePushed as refused:
                    self._set_aside(store, line, str(refused))
                except REDIS_CANNOT_TAKE_IT as error:
                    if recorded and not maybe_in_redis and not _may_have_reached_redis(error, lost):
                        self.pushing_path.unlink(missing_ok=True)  # nothing of this line was sent, by any push
                    raise
                head = cursor.head if cursor.position >= OFFSET_HEAD_BYTES else _head_digest(file, end)
                progress = _Offset(cursor.index + 1, end, head)
                try:
                    self._write_offset(progress)
                    cursor.offset = progress
                except OSError:
                    # a full disk, say: this line is pushed again by the next push that does not
                    # know it (harmless), while stopping here would stop every script until
                    # there is room
                    recorded = False
                cursor.index, cursor.position, cursor.head = progress
                untried = True
                if time.monotonic() >= deadline:
                    if recorded:  # every line sent is recorded: the next push's first is untried
                        self.pushing_path.unlink(missing_ok=True)
                    return pushed, False
            torn = _torn_tail(file.fileno())
            if torn is not None:
                self._tell_torn_tail(file.fileno(), torn,
                                     "it is removed with the spool, and the lines before it were pushed")
        cursor.forget()
        # the spool first: a crash between the two leaves an offset without its spool, which the next
        # spool's first line drops (_append), never a spool whose pushed lines lost their offset: the
        # next push took all but the first for untried, and a week later they were applied again
        self.path.unlink()
        _fsync_folder(self.directory)  # ... durably first, whatever order the file system keeps
        self._remove_offset()
        self.pushing_path.unlink(missing_ok=True)
        self._redis_failed_at = None  # Redis took them all: calls try it again at once
        return pushed, True

    def _tell_torn_tail(self, fd: int, start: int, fate: str) -> None:
        """One warning for a last line cut short, as the append or push that finds it drops it.
        Its call never returned (its script was killed in it, or the host lost power), so it is
        no spooled transaction; dropped silently, nobody knew that an observation the script may
        have taken for recorded was not."""
        size = os.fstat(fd).st_size
        named = re.match(rb'\{"id": "([^"\\]{1,200})"', os.pread(fd, 256, start))
        which = f"transaction {named.group(1).decode('utf-8', 'replace')}" if named else "a transaction"
        log.warning("the spool %s ends in a line cut short (%d bytes of %s): the script spooling it was killed, or the "
                    "host lost power, before that call returned, so it is not spooled: %s. Check that script's last "
                    "observation and buffer it again if it is missing",
                    self.path, size - start, which, fate)

    def _set_aside(self, store: BufferStore, line: bytes, why: str) -> None:
        """Move a line the buffer script cannot take for what it is out of the spool's way: into
        the site's dead-letter list (kind `refused_spool_line`, the line in it; one too large for
        a letter whole in `{site}.refused.jsonl` beside the spool, fsync'd first), so the push goes
        on with the next line. It is not retried: pushed again, it would be refused again."""
        tx_id, endpoint = _id_and_endpoint(line)
        ref = tx_id if tx_id is not None else "#N"
        text = line.decode("utf-8", "surrogateescape").rstrip("\n")
        digest = hashlib.blake2b(line, digest_size=16).hexdigest()  # (names its mark: see SET_ASIDE_SPOOLED)
        doc: dict = {"transaction_id": tx_id, "endpoint": endpoint, "spool_line_digest": digest}
        if len(line) <= LETTER_LINE_BYTES:
            doc["spool_line"] = text
        else:
            doc["spool_line_file"] = str(self._keep_beside(line))
            doc["spool_line_start"] = text[:LETTER_EXCERPT_CHARS]
        doc["failure"] = {
            # it holds no row, as a transaction the drain dead-letters does: a later update of a row
            # it updates is applied without it, and its steps buffered again would overwrite that
            "reason": f"the spooled line cannot be pushed to Redis: {why}; it cannot be retried (it would be refused "
                      f"again), and what was spooled after it went on without it: read it with `obs-pipeline failed "
                      f"show {ref}`, check its rows as they are now, buffer the steps still wanted again, then "
                      f"`obs-pipeline failed discard {ref}`"
                      + (" (#N: its place in `failed list`)" if tx_id is None else ""),
            "kind": REFUSED_KIND, "attempts": 1, "failed_at": time.time()}
        letter = status_header("failed") + json.dumps(doc, separators=(",", ":"))[1:]
        if store.set_aside_spooled(tx_id, letter, digest):
            self.set_aside += 1
            log.warning("a spooled transaction (%s) cannot be pushed to Redis (%s): moved to the dead-letter list of "
                        "site %s; see `obs-pipeline failed show %s`", tx_id or "no usable id", why,
                        store.keys.site, ref)

    def _keep_beside(self, line: bytes) -> Path:
        """Append `line` whole to `{site}.refused.jsonl` beside the spool, fsync'd (its name too)."""
        path = self.directory / f"{self.path.stem}.refused.jsonl"
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            _cut_torn_tail(fd)
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_folder(self.directory)
        return path

    def _find_unpushed(self, cursor: "_PushCursor", file) -> None:
        """Point the cursor at the first line after the offset in `file` (the spool, opened
        under the lock). Where the last slice of this process stopped, if the file and the
        offset are as it left them (and the file was not truncated under it); else where the
        offset says its lines end (another process pushed meanwhile, or this is a new spool),
        or, for a bare count, counted from the start: reading the file from its start at every
        slice made a long push cost the square of its length. A stale offset (_offset_in) is
        removed: the lines now in the file are pushed from the first."""
        offset = self._offset_in(file, remove_if_stale=True)
        if (cursor.fd is not None and cursor.offset == offset
                and _same_file(os.fstat(cursor.fd), os.fstat(file.fileno()))
                and _still_holds(file, cursor.position, cursor.head)):
            return
        cursor.forget()
        cursor.fd = os.dup(file.fileno())
        cursor.offset = offset
        if offset.end is not None:
            cursor.index, cursor.position, cursor.head = offset
            return
        cursor.index, cursor.position = 0, 0
        if offset.lines:
            for _, end in _counted_lines(file, 0):  # counted over every line, as the reads count
                cursor.index, cursor.position = cursor.index + 1, end
                if cursor.index == offset.lines:
                    break
        cursor.head = _head_digest(file, cursor.position)

    def _offset_in(self, file, remove_if_stale: bool = False) -> _Offset:
        """The offset, if it counts lines of `file` (the spool, opened under the lock) as it is
        now; else none, with one warning: the file is shorter than where the counted lines end,
        or begins otherwise (truncated in place since, and maybe spooled to again). Taken as it
        was, it skipped as many of the new lines, and a file holding no more of them was removed
        whole. So an offset file that holds no count (garbage, zeros after a power loss): an
        earlier version raised its ValueError from every call that looked at the spool; a line
        pushed again is harmless. `remove_if_stale` (the push, under the exclusive lock): remove
        it too."""
        offset = self._read_offset()
        if offset != _UNREADABLE_OFFSET and (offset.end is None or _still_holds(file, offset.end, offset.head)):
            return offset
        if offset != self._stale_offset_told:
            self._stale_offset_told = offset
            if offset == _UNREADABLE_OFFSET:
                log.warning("the spool's offset file %s holds no count of pushed lines (damaged: a power loss?): it is "
                            "ignored, and the lines of %s are pushed from its first (one pushed again is harmless)",
                            self.offset_path, self.path)
            else:
                log.warning("the spool %s was truncated in place after %d of its lines were pushed (by hand, or "
                            "logrotate's copytruncate?): its offset file %s counts lines it no longer holds and is "
                            "ignored, the lines in it now are pushed from its first", self.path, offset.lines,
                            self.offset_path)
        if remove_if_stale:
            self._remove_offset()
        return _NO_OFFSET

    def _read_offset(self) -> _Offset:
        """The count, read as earlier versions read it, with where its lines end and how the file
        began if the check file is of this count (see OFFSET_HEAD_BYTES); _UNREADABLE_OFFSET if
        the offset file holds no count."""
        try:
            lines = int(self.offset_path.read_text() or 0)
        except FileNotFoundError:
            return _NO_OFFSET
        except ValueError:  # (UnicodeDecodeError too)
            return _UNREADABLE_OFFSET
        if lines < 0:
            return _UNREADABLE_OFFSET
        try:
            checked, end, head = self.offset_check_path.read_text().split()
            if int(checked) != lines or int(end) < 0:
                return _Offset(lines)
        except (FileNotFoundError, ValueError):  # none, or not a check this version wrote whole
            return _Offset(lines)
        return _Offset(lines, int(end), head)

    def _write_offset(self, offset: _Offset) -> None:
        """The check first, then the count, each replaced whole: a crash between the two leaves
        a check of another count, ignored."""
        _replace_text(self.offset_check_path, f"{offset.lines} {offset.end} {offset.head}",
                      self.directory / f"{self.offset_check_path.name}.tmp")
        _replace_text(self.offset_path, str(offset.lines), self.offset_path.with_suffix(".tmp"))

    def _remove_offset(self) -> None:
        """The check first: a count left alone by a crash is read as earlier versions read it."""
        self.offset_check_path.unlink(missing_ok=True)
        self.offset_path.unlink(missing_ok=True)

    def start_flusher(self) -> None:
        """Make sure the background flusher runs (it stops once the spool is empty). A process
        that may start no more threads gets one warning instead: a call whose line was fsync'd
        must not fail (its script would buffer the observation again, applied twice), nor may
        status() or a new TransactionBuffer; the next call, the exit or `obs-pipeline spool
        push` pushes the spool."""
        with self._flusher_lock:
            if self._flusher_running:
                return
            self._flusher_running = True
            _push_at_exit(self)
        try:
            threading.Thread(target=self._flush_until_empty, name="obs-spool-flusher", daemon=True).start()
        except BaseException as error:
            with self._flusher_lock:
                self._flusher_running = False
            if not isinstance(error, RuntimeError):
                raise
            log.warning("no background flusher for the spool %s (%s): the next call pushes it",
                        self.path, _one_line(error))

    def _flush_until_empty(self) -> None:
        """Push the spool until it is gone. Never dies of a failure: Redis not answering is
        retried every RETRY_INTERVAL_S; anything else (a ResponseError such as NOPERM, an
        OSError reading the spool) is logged once per distinct failure and retried with a
        wait that doubles up to MAX_RETRY_INTERVAL_S. It stops only once the spool is empty,
        checked under the flag that start_flusher sets, so a line appended as it stops
        always has a flusher."""
        stop, delay, last_failure = threading.Event(), RETRY_INTERVAL_S, None
        try:
            while True:
                stop.wait(delay)
                try:
                    # Redis asked first outside the spool's lock: a push that hangs on it holds
                    # the lock, and every call of the script waits for it
                    self._probing = self._redis_failed_at is not None
                    self._flush_store.redis.ping()
                except REDIS_CANNOT_TAKE_IT as error:
                    self.note_redis_failure(error)
                    delay = RETRY_INTERVAL_S
                    if isinstance(error, redis.AuthenticationError) and _one_line(error) != last_failure:
                        # no outage: the script's OBS_REDIS_URL is refused, for as long as it runs
                        last_failure = _one_line(error)
                        log.warning("Redis refuses this script's user or password (OBS_REDIS_URL): %s; its transactions "
                                    "stay spooled in %s, pushed once Redis takes them, or by a script or `obs-pipeline "
                                    "spool push` with the right OBS_REDIS_URL", last_failure.rstrip("."), self.path)
                    continue
                except Exception:  # noqa: BLE001 -- the push below says what it is
                    pass
                finally:
                    self._probing = False
                try:
                    empty = self.flush()
                except Exception as error:  # noqa: BLE001 -- the thread must survive it
                    failure = f"{type(error).__name__}: {_one_line(error)}"
                    if failure != last_failure:
                        log.warning("cannot push the spool %s (retrying): %s", self.path, failure)
                        last_failure = failure
                    delay = min(max(delay, RETRY_INTERVAL_S) * 2, MAX_RETRY_INTERVAL_S)
                    continue
                delay = RETRY_INTERVAL_S
                if empty:
                    if last_failure is not None:
                        log.info("the spool %s is pushed again after: %s", self.path, last_failure)
                        last_failure = None
                    with self._flusher_lock:
                        if not self.path.exists():
                            self._flusher_running = False
                            return
        except BaseException:
            with self._flusher_lock:
                self._flusher_running = False
            raise


class _CannotBePushed(ValueError):
    """A spooled line the buffer script cannot take for what it is, however often it is pushed."""


def _buffer_line(store: BufferStore, line: bytes, maybe_in_redis: bool = False) -> bool:
    """Buffer one spooled line (False: dropped, see below). Raises _CannotBePushed for a line that may be a copy of a
    transaction Redis took and has forgotten since (`maybe_in_redis`, or so marked when spooled;
    older than STALE_COPY_AFTER_S and without a status key), for a line that is not the buffer
    script's arguments (not JSON, another layout: a hand's edit, another version's line), whose text
    cannot be sent (a lone surrogate: refused as it is packed, before anything is sent), or that
    is over Redis's size limits (asked first, see _over_a_size_limit; or, where Redis does not
    say them, "Protocol error: invalid bulk length"), or a create of a key it found free when it
    was spooled that another transaction created since (KeyTaken: the buffer script refuses it
    at every push, as main would). A copy of a transaction an operator discarded since (an earlier
    push reached Redis, its reply lost) is dropped, with a warning: the discard stands, and the copy
    holds nothing the operator did not see in its letter. Whatever Redis refuses for a while (down,
    full, read-only, BUSY, NOPERM, a connection reset...) raises as it is: the push stops there
    and is tried again later, in order."""
    entry = _spooled_entry(line)
    tx_id, tx_json = entry["id"], entry["tx"]
    caches = {name: [tuple(item) for item in entry.get(name, ())] for name in ("created", "overlays", "checked")}
    if len(line) >= SIZE_LIMITS_FLOOR:
        too_large = _over_a_size_limit(store, tx_json, caches)
        if too_large:
            raise _CannotBePushed(too_large)
    try:
        if stale_copy({**entry, MAYBE_IN_REDIS: True} if maybe_in_redis else entry):  # (as reads take it)
            if store.redis.exists(store.keys.transaction(tx_id)):
                return True  # in Redis already: the buffer script would leave it as it is
            if not store.was_discarded(tx_id):  # (if it is, the buffer script drops it)
                raise _CannotBePushed(_stale_copy_reason(_tx_age_s(tx_json)))
        if store.buffer(tx_id, tx_json, CacheWrites(**caches)) is False:  # (only False says so)
            log.warning("spooled transaction %s was not buffered: an operator discarded it (`obs-pipeline failed "
                        "discard`, site %s) after an earlier push of it reached Redis and its reply was lost; this "
                        "copy is dropped with it", tx_id, store.keys.site)
            return False
        return True
    except UnicodeEncodeError as error:
        raise _CannotBePushed(f"it holds text that cannot be sent as UTF-8 ({_one_line(error)})") from None
    except KeyTaken as error:  # nothing of it was buffered
        raise _CannotBePushed(f"{error} (its create's key was free when it was spooled, and another transaction "
                              "created that key before the line was pushed)") from None
    except redis.ResponseError as error:
        if not str(error).startswith("Protocol error"):
            raise
        raise _CannotBePushed(f"Redis refuses it: {_one_line(error)} (larger than its proto-max-bulk-len?)") from None


def _may_have_reached_redis(error: BaseException, lost_before: int) -> bool:
    """A connection lost or a reply timed out may come after Redis ran the buffer script; a full
    Redis, one refusing writes or the script's password refuses it before anything is written,
    and so does a connect that failed (ConnectFailed: said by ingest's own connections, not read
    from redis-py's wording, which a release may change), unless a connected socket of ours was
    lost in the same call (`lost_before`: sockets_lost() as it began): redis-py may have sent the
    script on it, lost the reply, and ended with its reconnect's failure, or its resend's refusal
    (the password changed meanwhile; READONLY, Redis a replica by then: taken for refused before
    anything was sent, such a line was pushed again a week later and applied again). Marked, a
    Redis down for a week had a line dead-lettered at each of a script's attempts to reach it. (A
    client not of obs_pipeline.redis_connections says no connect failure: its errors count as lost
    replies.)"""
    if sockets_lost() != lost_before:
        return True
    if not isinstance(error, (redis.ConnectionError, redis.TimeoutError)) or isinstance(error, redis.AuthenticationError):
        return False
    return not isinstance(error, ConnectFailed)


def stale_copy(entry: dict) -> bool:
    """A spooled line (as `Spool.unpushed` gives it) that its push (_buffer_line, which asks this)
    never buffers as a transaction not pushed yet: marked as one an earlier push may have sent (Spool.unpushed marks the first line
    after a push that left `{site}.pushing`, as the push takes it), and older than STALE_COPY_AFTER_S.
    Redis knows its id (left as it is), or it was discarded (dropped), or it is set aside (see
    _buffer_line); reads leave it out (they showed its writes, the status key expired, over newer
    ones that main holds)."""
    if entry.get(MAYBE_IN_REDIS) is not True:
        return False
    age_s = _tx_age_s(entry["tx"])  # (ingest stamps every transaction: a line without is a hand's)
    return age_s is not None and age_s >= STALE_COPY_AFTER_S


def _stale_copy_reason(age_s: float) -> str:
    """Why a line that may be a forgotten copy (see STALE_COPY_AFTER_S) is not pushed, in one line."""
    return (f"it is {age_s / 86400:.1f} days old, an earlier push of it may have reached Redis (its reply was lost, "
            f"or the push was cut short), and Redis no longer knows its id (a status is kept "
            f"{STALE_COPY_AFTER_S / 86400:g} days after replication, main's applied-id record until the prune's "
            "`older_than_days`, 7 by default): if it was applied, pushed now it would be applied again")


def _spooled_entry(line: bytes) -> dict:
    """The line as appended, {"id", "tx", "created", "overlays"} and perhaps "checked" (see
    CacheWrites); _CannotBePushed, saying why, for
    one that is not (not JSON, another layout: a hand's edit, another version's line)."""
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError) as error:
        raise _CannotBePushed(f"it is not JSON ({_one_line(error)})") from None
    if not isinstance(entry, dict):
        raise _CannotBePushed("it is not a JSON object")
    if not isinstance(entry.get("id"), str) or not isinstance(entry.get("tx"), str):
        raise _CannotBePushed('its "id" and "tx" are not both text (not a line this version spools)')
    for name in ("created", "overlays"):
        items = entry.get(name)
        if not isinstance(items, list) or not all(
                isinstance(item, list) and len(item) == 3 and all(isinstance(part, str) for part in item)
                for item in items):
            raise _CannotBePushed(f'its "{name}" is not a list of [model, id, JSON] (not a line this version spools)')
    checked = entry.get("checked", [])  # (absent from a line of an earlier version, or without such keys)
    if not isinstance(checked, list) or not all(
            isinstance(item, list) and len(item) == 2 and all(isinstance(part, str) for part in item)
            for item in checked):
        raise _CannotBePushed('its "checked" is not a list of [model, id] (not a line this version spools)')
    return entry


def _readable(lines: Iterator[bytes]) -> Iterator[dict]:
    """The lines that are spooled transactions, parsed; one that is not is skipped (the push sets
    it aside, see Spool._set_aside): a read that raised its error failed until it was pushed."""
    for line in lines:
        try:
            yield _spooled_entry(line)
        except _CannotBePushed:
            continue


def _over_a_size_limit(store: BufferStore, tx_json: str, caches: dict) -> str | None:
    """Why Redis would refuse this line for its size, asked before it is sent: sent, a command
    with an argument over `proto-max-bulk-len`, or that with its CRLF is over
    `client-query-buffer-limit`, has its connection reset while it is written, which reads as
    Redis gone away, and the push stopped there for good. Both are of one argument: the query
    buffer holds one large argument at a time (6.2 and 7.0 take two of 700 kB under a limit of
    1 MB), and a line measured whole was dead-lettered though Redis takes it. None if it fits,
    or if Redis does not say its limits (CONFIG not allowed)."""
    largest = max([len(tx_json.encode("utf-8", "surrogatepass"))] + [
        len(part.encode("utf-8", "surrogatepass")) for items in caches.values() for item in items for part in item])
    for setting, size in (("proto-max-bulk-len", largest), ("client-query-buffer-limit", largest + 2)):
        try:
            limit = int(store.redis.config_get(setting).get(setting) or 0)
        except redis.ResponseError:  # a managed Redis may not allow CONFIG
            return None
        if limit and size > limit:
            return (f"an argument of {largest} bytes" + (" and its CRLF" if size != largest else "")
                    + f", over Redis's {setting} of {limit}")
    return None


def _id_and_endpoint(line: bytes) -> tuple[str | None, str | None]:
    """A refused line's transaction id, if it has one a status key can be named by, and its
    transaction's endpoint, if that reads (`failed list` shows both)."""
    try:
        entry = json.loads(line)
        tx_id = entry.get("id")
    except (ValueError, RecursionError, AttributeError):
        return None, None
    try:
        tx = entry.get("tx")
        endpoint = (json.loads(tx) if isinstance(tx, str) else tx).get("endpoint")
    except (ValueError, RecursionError, AttributeError):
        endpoint = None
    return (tx_id if is_storable_id(tx_id) else None), (endpoint if isinstance(endpoint, str) else None)


class _PushCursor:
    """Where this process's push stopped: after `index` lines, at byte `position` of the spool
    file (`head` the digest of its first bytes up to there, see OFFSET_HEAD_BYTES), whose offset
    it left at `offset`. `fd` keeps that file open, so that no new spool file can have its inode
    (and be taken for it) while the cursor points into it."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.offset = _NO_OFFSET
        self.index = self.position = 0
        self.head = ""

    def forget(self) -> None:
        fd, self.fd = self.fd, None
        _close_quietly(fd)


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _close_quietly(fd: int | None) -> None:
    """Close a descriptor this process may still hold (a forked child's copy, say), if any."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _counted_lines(file, position: int) -> Iterator[tuple[bytes, int]]:
    """The spooled transactions of `file` from byte `position` on, each with the position after
    it, as Spool._unpushed_lines says: a last line without its newline ends them, and blank lines
    and lines with a NUL byte are skipped (not counted)."""
    file.seek(position)
    for line in file:
        position += len(line)
        if not line.endswith(b"\n"):
            return
        if line.strip() and b"\0" not in line:
            yield line, position


def _replace_text(path: Path, text: str, tmp: Path) -> None:
    """Write `path` anew through `tmp`: a reader finds the old text or the new, whole."""
    tmp.write_text(text)
    os.replace(tmp, path)


def _head_digest(file, end: int) -> str:
    """The digest of the file's first bytes up to `end` (OFFSET_HEAD_BYTES at most)."""
    return hashlib.blake2b(os.pread(file.fileno(), min(end, OFFSET_HEAD_BYTES), 0), digest_size=16).hexdigest()


def _still_holds(file, end: int, head: str) -> bool:
    """Does the file still hold the lines counted up to `end`, which began as `head` says? (A
    file truncated in place keeps its inode: shorter now, or spooled to again from its start.)"""
    return os.fstat(file.fileno()).st_size >= end and _head_digest(file, end) == head


def _same_file(one: os.stat_result, other: os.stat_result) -> bool:
    return (one.st_dev, one.st_ino) == (other.st_dev, other.st_ino)


class _SharedLock:
    """What every Spool of one spool file in this process shares: the thread lock, the thread
    inside (holding it and the flock), each thread's depth inside and the calls it deferred
    (Spool._inside), and the lock file's descriptor. Kept per Spool, a signal handler that
    buffered through a TransactionBuffer of its own (made in it, or a library's) while its thread
    held the script's flock took a flock of its own on the file, and waited for it for ever: the
    script hung, and every script of the site on the host with it."""

    def __init__(self) -> None:
        # re-entrant: a signal handler that buffers runs in the thread it interrupted
        self.lock = threading.RLock()
        self.holder: int | None = None  # the thread inside Spool._locked (holding `lock` and the flock)
        self.here = threading.local()  # per thread: depth inside the spool, calls deferred
        self.fd: int | None = None  # the lock file's descriptor while Spool._locked holds it
        forks.renew_in_forked_children(self)

    def _after_fork_in_child(self) -> None:
        """Fresh locks, and the parent's copy of the lock file's descriptor closed, never
        unlocked (the lock is the parent's)."""
        self.lock, self.holder, self.here = threading.RLock(), None, threading.local()
        fd, self.fd = self.fd, None
        _close_quietly(fd)


class _SharedLocks:
    """The _SharedLock of each spool file in use in this process, by its real path."""

    def __init__(self) -> None:
        self._guard = threading.RLock()  # (re-entrant: a handler may make a buffer while one is made)
        self._by_path: "weakref.WeakValueDictionary[str, _SharedLock]" = weakref.WeakValueDictionary()

    def of(self, lock_path: Path) -> _SharedLock:
        forks.renew_in_forked_children(self)
        key = os.path.realpath(lock_path)
        with self._guard:
            shared = self._by_path.get(key)
            if shared is None:
                shared = self._by_path[key] = _SharedLock()
            return shared

    def _after_fork_in_child(self) -> None:
        self._guard = threading.RLock()


_SHARED = _SharedLocks()
_AT_EXIT: "weakref.WeakSet[Spool]" = weakref.WeakSet()


def _push_at_exit(spool: Spool) -> None:
    """Have `spool` pushed at interpreter exit, if anything is spooled then (a TransactionBuffer's
    from the start; any other once its flusher has been started)."""
    if not _AT_EXIT:
        atexit.unregister(_push_all_at_exit)
        atexit.register(_push_all_at_exit)
    _AT_EXIT.add(spool)


def _push_all_at_exit() -> None:
    """One budget of EXIT_PUSH_S for every spool of the process: a script's exit never waits
    longer than that for a Redis that does not answer. Then what stays is said once per spool
    file (two buffers of a site share one), pushed or not within the budget."""
    deadline = time.monotonic() + EXIT_PUSH_S
    spools = list(_AT_EXIT)
    for spool in spools:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        spool.push_at_exit(left)
    for spool in {spool.path: spool for spool in spools}.values():
        spool._tell_what_stays()


def _age_of(line: bytes) -> float | None:
    """Seconds since a spooled transaction's timestamp (ISO-8601, UTC when it has no offset)."""
    try:
        return _tx_age_s(json.loads(line)["tx"])
    except (ValueError, KeyError, TypeError):
        return None


def _tx_age_s(tx_json: str) -> float | None:
    """Seconds since the timestamp of a transaction's JSON; None if it has none readable."""
    try:
        stamp = dt.datetime.fromisoformat(json.loads(tx_json)["timestamp"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.timezone.utc)
    return max(0.0, (dt.datetime.now(dt.timezone.utc) - stamp).total_seconds())


def _torn_tail(fd: int) -> int | None:
    """Where the file's last line starts if it has no newline (a crash cut it short while it was
    written: see Spool._unpushed_lines), else None."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return None
    block, end = 65536, size
    while end > 0:
        start = max(0, end - block)
        found = os.pread(fd, end - start, start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


def _cut_torn_tail(fd: int) -> None:
    """Truncate the file after its last newline: a line a crash cut short must not have the
    next one appended to it (both would then be unreadable, the next one's call returned)."""
    start = _torn_tail(fd)
    if start is not None:
        os.ftruncate(fd, start)


def _fsync_folder(folder: Path) -> None:
    """Make the creation or removal of a name in `folder` durable: a file's own fsync does not
    cover its directory entry (POSIX; PostgreSQL and SQLite fsync the folder too), so after a
    power loss a spool whose line was fsync'd could be missing as a whole."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_durable_folder(folder: Path) -> None:
    """mkdir -p, each folder it creates made durable in its parent."""
    missing = []
    while not folder.exists():  # (a file in the way stops it: mkdir then says "Not a directory")
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        _fsync_folder(new.parent)
