"""A PostgreSQL primary or streaming replica driven through pg_ctl on a loopback TCP port.

The port and listen address go on the pg_ctl command line (not only postgresql.conf)
because the replica's conf is a byte copy of the primary's while ports live in
stack.json; unix sockets are off because state-dir paths can exceed the 107-byte
socket-path limit.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psycopg2

from .binaries import pg_bin_dir
from .errors import StackError, service_error
from .osutil import argument_of, chown, clean_env, process_args, read_pid, serves_folder, signal_group, user_kwargs, wait_until

HOST = "127.0.0.1"
SLOT = "obs_replica"
READY_TIMEOUT = 60
SHUT_DOWN_STATES = (1, 2)  # pg_control's DB_SHUTDOWNED, DB_SHUTDOWNED_IN_RECOVERY (a standby)

# Appended to the primary's postgresql.conf; the replica inherits it via pg_basebackup.
SERVER_CONF = """
# --- obs_pipeline local stack ---
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = '256MB'
hot_standby = on
hot_standby_feedback = on
wal_retrieve_retry_interval = '1s'
fsync = on
shared_buffers = '64MB'
max_connections = 200
log_line_prefix = '%m [%p] %q%a '
"""
HBA_REPLICATION = "host    replication     all             127.0.0.1/32            trust\n"


class PgServer:
    """One data directory (`role` "main" or "replica") plus its log, port and run-as user."""

    def __init__(self, role: str, datadir: Path, port: int, log: Path, ctl_log: Path, run_user: str | None):
        self.role, self.datadir, self.port = role, datadir, port
        self.log, self.ctl_log, self.run_user = log, ctl_log, run_user

    # --- running pg tools -------------------------------------------------
    def _tool(self, name: str, args: list[str], what: str, timeout: float = 120, log: Path | None = None) -> None:
        """Run a pg tool as the run user; output goes to ctl_log (pipes can hang on pg_ctl's daemon).

        `log` is the file whose last line explains a failure (the server log for start).
        """
        cmd = [str(pg_bin_dir() / name), *args]
        with open(self.ctl_log, "ab") as out:
            out.write(f"\n$ {' '.join(cmd)}\n".encode())
            out.flush()
            # in a group of its own, stopped whole with the command: pg_basebackup streams WAL from
            # a forked child, which outlived a killed parent by up to its status interval (10 s),
            # holding the replica's slot on main (an `up` run again meanwhile failed on it)
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=clean_env(),
                                    cwd=self.datadir.parent, start_new_session=True, **user_kwargs(self.run_user))
            try:
                returncode = proc.wait(timeout=timeout)
            except BaseException as error:  # its timeout, or a stop signal (stop_signals: KeyboardInterrupt)
                signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
                if isinstance(error, subprocess.TimeoutExpired):
                    raise service_error(f"{self.role} PostgreSQL: {what} timed out after {timeout:.0f}s",
                                        log or self.ctl_log) from None
                raise
        if returncode != 0:
            raise service_error(f"{self.role} PostgreSQL: {what} failed (exit {returncode})", log or self.ctl_log)

    def _options(self) -> str:
        return f"-p {self.port} -c listen_addresses={HOST} -c unix_socket_directories=''"

    # --- state --------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").is_file()

    @property
    def system_identifier(self) -> int | None:
        """The cluster's identity, set by initdb and kept by its copies: the first 8 bytes of
        global/pg_control (native byte order); None if unreadable."""
        try:
            with open(self.datadir / "global" / "pg_control", "rb") as fh:
                return int.from_bytes(fh.read(8), sys.byteorder)
        except OSError:
            return None

    @property
    def pid(self) -> int | None:
        pid = read_pid(self.datadir / "postmaster.pid")
        # this data directory's postmaster ("postgres -D <dir>"), not any postgres a stale pid may name now
        return pid if serves_folder(pid, "-D", self.datadir) else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def running_elsewhere(self) -> tuple[int, int] | None:
        """(pid, port) where this folder's server runs on another port than stack.json now gives
        (the file edited while it ran): `up` waited 60 s for it on the new one."""
        pid = self.pid
        port = argument_of(process_args(pid) or [], "-p") if pid is not None else None
        return (pid, int(port)) if port is not None and port.isdigit() and int(port) != self.port else None

    def connect(self, dbname: str = "postgres", timeout: int = 3):
        """A control connection. Its options are all given: libpq would fill the rest from the
        user's PG* variables (PGSSLMODE=require, PGTARGETSESSIONATTRS=read-write ...), set for
        another server, and the stack would wait for ever on a server that refuses them."""
        return psycopg2.connect(host=HOST, port=self.port, user="postgres", dbname=dbname, connect_timeout=timeout,
                                sslmode="disable", gssencmode="disable", target_session_attrs="any",
                                channel_binding="disable", options="")

    def query(self, sql: str, dbname: str = "postgres", timeout: int = 3):
        """First row of `sql` (autocommit), for the small control queries the stack needs."""
        conn = self.connect(dbname, timeout)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchone() if cur.description else None
        finally:
            conn.close()

    # --- lifecycle ----------------------------------------------------------
    def init_primary(self) -> None:
        """initdb with trust auth and our replication-friendly settings, into a temp dir renamed
        when complete: initdb writes PG_VERSION early, and a first `up` cut short (a reboot, a
        kill) left a directory taken for initialized, or one without our settings."""
        tmp = self.datadir.with_name(self.datadir.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        if self.datadir.exists():
            if any(self.datadir.iterdir()):
                raise StackError(f"{self.datadir} holds no complete PostgreSQL data directory (no PG_VERSION): "
                                 "move it away, then `obs-pipeline stack up` again")
            self.datadir.rmdir()
        self._tool("initdb", ["-D", str(tmp), "--auth=trust", "-U", "postgres", "--encoding=UTF8",
                              "--no-locale"], "initdb")
        with open(tmp / "postgresql.conf", "a") as conf:
            conf.write(SERVER_CONF)
        hba = tmp / "pg_hba.conf"
        if not any(line.split()[:2] == ["host", "replication"] and "127.0.0.1/32" in line and "trust" in line
                   for line in hba.read_text().splitlines()):
            with open(hba, "a") as fh:
                fh.write(HBA_REPLICATION)
        tmp.rename(self.datadir)

    def clone_from(self, primary: "PgServer") -> None:
        """pg_basebackup a hot standby with its own slot, into a temp dir renamed when complete.

        The rename makes 'replica dir exists' mean 'replica is whole': an interrupted
        backup leaves only the temp dir, which the next `up` wipes and redoes.
        """
        tmp = self.datadir.with_name(self.datadir.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        primary.query(f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                      f"WHERE slot_name = '{SLOT}' AND NOT active")
        self._tool("pg_basebackup", ["-D", str(tmp), "-h", HOST, "-p", str(primary.port), "-U", "postgres",
                                     "-R", "-X", "stream", "-C", "-S", SLOT, "--checkpoint=fast"],
                   "pg_basebackup from main", timeout=600)
        tmp.rename(self.datadir)

    def set_upstream(self, port: int) -> bool:
        """Point primary_conninfo at 127.0.0.1:port (main or the latency proxy); True if it changed."""
        auto = self.datadir / "postgresql.auto.conf"
        lines = auto.read_text().splitlines(keepends=True)
        wanted = f"primary_conninfo = 'host={HOST} port={port} user=postgres application_name={SLOT}'\n"
        kept = [ln for ln in lines if not ln.lstrip().startswith("primary_conninfo")]
        if len(kept) == len(lines) - 1 and wanted in lines:
            return False
        with open(auto, "w") as fh:  # rewrite in place: keeps the run user's ownership
            fh.writelines([*kept, wanted])
        if self.running:
            self._tool("pg_ctl", ["-D", str(self.datadir), "reload"], "reload")
        return True

    def start(self) -> None:
        """Start (if stopped) and wait until it accepts TCP connections."""
        if not self.running:
            self._set_aside_stale_lock()
            self.log.touch(exist_ok=True)
            chown(self.log, self.run_user)
            self._tool("pg_ctl", ["-D", str(self.datadir), "-w", "-t", str(READY_TIMEOUT), "-l", str(self.log),
                                  "-o", self._options(), "start"], f"start on {HOST}:{self.port}",
                       timeout=READY_TIMEOUT + 30, log=self.log)

        def ready_or_gone() -> bool:
            """pg_ctl says a standby that exits during startup shut down "because of recovery
            target settings", and exits 0: its line came READY_TIMEOUT later, unless looked for."""
            return not self.running or self.query("SELECT 1") == (1,)

        address = f"{HOST}:{self.port}"
        if not wait_until(ready_or_gone, READY_TIMEOUT, 0.1):
            raise service_error(f"{self.role} PostgreSQL not accepting connections on {address} "
                                f"after {READY_TIMEOUT}s", self.log)
        if not self.running:
            raise service_error(f"{self.role} PostgreSQL exited as it started on {address}",
                                self.log)

    def _set_aside_stale_lock(self) -> None:
        """Move aside a postmaster.pid whose pid is not this folder's postmaster yet answers kill(0):
        a killed server not reaped yet (a zombie: PID 1 in a container may never reap it), or a
        reused pid (after a reboot). PostgreSQL takes either for a server running on the folder
        and refuses to start ('Is another postmaster (PID N) running ...?'). Its own interlock on
        the shared memory still refuses a second server if one does run here."""
        lock = self.datadir / "postmaster.pid"
        pid = read_pid(lock)
        if pid is None or serves_folder(pid, "-D", self.datadir):
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return  # a dead pid: PostgreSQL itself takes the file for stale
        except PermissionError:
            return  # another user's process: so does PostgreSQL
        lock.replace(lock.with_name("postmaster.pid.stale"))

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop -m fast|smart|immediate; harmless if already stopped."""
        if mode not in ("fast", "smart", "immediate"):
            raise ValueError(f"postgres stop mode must be fast, smart or immediate, not {mode!r}")
        if not self.running:
            return
        try:
            self._tool("pg_ctl", ["-D", str(self.datadir), "-w", "-t", str(READY_TIMEOUT), "-m", mode, "stop"],
                       f"stop -m {mode}", timeout=READY_TIMEOUT + 30)
        except StackError:
            if self.running:
                raise
        if mode != "immediate" and self._cluster_state() not in (None, *SHUT_DOWN_STATES):
            raise StackError(f"{self.role} PostgreSQL crashed as it stopped (no shutdown checkpoint; a full disk?): "
                             f"it is stopped, and recovers from its WAL at its next start (log: {self.log})")

    def _cluster_state(self) -> int | None:
        """pg_control's DBState (4 bytes after the identifier and two versions), None if unreadable.
        pg_ctl says 'server stopped' and exits 0 for a server that crashed during its shutdown
        checkpoint (a full disk): `stack down` said nothing."""
        try:
            with open(self.datadir / "global" / "pg_control", "rb") as fh:
                fh.seek(16)
                return int.from_bytes(fh.read(4), sys.byteorder)
        except OSError:
            return None

    def ensure_databases(self, names: list[str]) -> None:
        for name in names:
            if self.query(f"SELECT 1 FROM pg_database WHERE datname = '{name}'") is None:
                self.query(f'CREATE DATABASE "{name}"')

    # --- replica ------------------------------------------------------------
    def streaming_port(self) -> int | None:
        """Port the WAL receiver streams from, or None when it is not streaming."""
        row = self.query("SELECT status, sender_port FROM pg_stat_wal_receiver")
        return row[1] if row and row[0] == "streaming" else None

    def replay_paused_at(self) -> str | None:
        """The LSN a standby's replay is paused at (it waits there for ever), else None.
        pg_is_wal_replay_paused, not PostgreSQL 14's pause state: OBS_PG_BIN may be an older build."""
        row = self.query("SELECT pg_is_wal_replay_paused(), pg_last_wal_replay_lsn()::text")
        return row[1] if row and row[0] else None

    def wait_streaming(self, upstream_port: int, timeout: float = READY_TIMEOUT, replayed: str = "0/0") -> None:
        """Until it streams from upstream_port and has replayed up to `replayed` (main's flush LSN).
        A replica that paused its replay (main runs with a max_connections above its own, say) is
        said at once: it restarts no stream and replays nothing more, and it was 'up'."""
        def done() -> bool:
            if self.replay_paused_at() is not None:
                return True
            caught_up = self.query(f"SELECT pg_last_wal_replay_lsn() >= '{replayed}'::pg_lsn")
            return self.streaming_port() == upstream_port and bool(caught_up and caught_up[0])

        wait_until(done, timeout, 0.1)
        paused_at = self.replay_paused_at()
        if paused_at is not None:
            raise StackError(f"replica PostgreSQL paused its replay at {paused_at}: {self._pause_reason()} "
                             f"(log: {self.log})")
        if self.streaming_port() != upstream_port:
            raise service_error(f"replica not streaming from {HOST}:{upstream_port} after {timeout:.0f}s", self.log)

    def _pause_reason(self) -> str:
        """What its log says main has more of, and what to do; or how to resume a pause asked for."""
        try:
            with open(self.log, "rb") as fh:
                fh.seek(0, 2)
                fh.seek(max(0, fh.tell() - 65536))
                lines = fh.read().decode(errors="replace").splitlines()
        except OSError:
            lines = []
        lower = [ln.split("DETAIL:", 1)[-1].strip().rstrip(".") for ln in lines
                 if "is a lower setting than on the primary" in ln]
        if lower:
            folder = shlex.quote(str(self.datadir.parent.parent))  # the stack's: <folder>/postgres/replica
            return (f"{lower[-1]}: set it at least that high in {self.datadir / 'postgresql.conf'}, then restart "
                    f"the replica (`obs-pipeline stack stop replica --dir {folder}`, then `stack start replica`)")
        return "SELECT pg_wal_replay_resume() on it resumes it"

    def replay_lsn(self) -> str | None:
        row = self.query("SELECT pg_last_wal_replay_lsn()::text", timeout=2)
        return row[0] if row else None
