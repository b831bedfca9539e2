"""A daemonized redis-server with AOF on, bound to 127.0.0.1, all files in the state folder.

AOF (not RDB snapshots) is what makes buffered writes survive `down`/`up` and crashes,
so snapshots are off and `appendfsync` is configurable (everysec by default).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .binaries import redis_server_path
from .errors import service_error
from .osutil import clean_env, pid_alive, process_args, read_pid, wait_until, works_in

HOST = "127.0.0.1"
APPENDFSYNC_CHOICES = ("always", "everysec", "no")
# Redis rewrites its AOF by forking, and the fork stops it for a time that grows with its
# memory (118 and 177 ms with 4-5 GB buffered, measured), and its child's copy-on-write slows every
# write for the minute it runs (commands of up to 450 ms during a 1,000,000 drain). By default
# that happens each time the file doubles: five times while 1,000,000 transactions pile up, and
# once more while they drain. Here Redis rewrites on its own only when the file has grown 11x
# since its last rewrite (and is 1 GB at least), a backstop for the disk; the drain asks for
# the rewrite when the buffer is small and the fork is cheap (BufferStore.compact_aof).
AOF_REWRITE = {"auto-aof-rewrite-percentage": "1000", "auto-aof-rewrite-min-size": str(2**30)}
READY_TIMEOUT = 60
SOCKET_PATH_MAX = 100  # bytes; the kernel's limit for a Unix socket path is 107


def _quote(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


class RedisServer:
    """Redis whose data, pidfile and config live in `folder`; log goes to `log`."""

    def __init__(self, folder: Path, port: int, log: Path, appendfsync: str = "everysec"):
        if appendfsync not in APPENDFSYNC_CHOICES:
            raise ValueError(f"redis appendfsync must be one of {APPENDFSYNC_CHOICES}, not {appendfsync!r}")
        self.folder, self.port, self.log, self.appendfsync = folder, port, log, appendfsync
        self.conf = folder / "redis.conf"
        self.pidfile = folder / "redis.pid"
        socket = folder / "redis.sock"  # scripts on this host may use it: OBS_REDIS_URL=unix://...
        self.socket = socket if len(str(socket).encode()) <= SOCKET_PATH_MAX else None

    def client(self, timeout: float = 2) -> redis.Redis:
        """Control connection without redis-py's retries (they would stall SHUTDOWN and readiness polls)."""
        return redis.Redis(host=HOST, port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout,
                           retry=Retry(NoBackoff(), 0))

    @property
    def pid(self) -> int | None:
        pid = read_pid(self.pidfile)
        return pid if pid_alive(pid, self._title) else self._pid_as_said()

    def _pid_as_said(self) -> int | None:
        """The pid the Redis on its port gives, if that Redis runs on this folder's config: its
        pidfile deleted while it ran (by hand, a cleanup script), `down` stopped nothing and
        said nothing, and `status` said it was not running."""
        try:
            with self.client(timeout=0.5) as conn:
                info = conn.info("server")
        except (redis.RedisError, OSError, ValueError, TypeError):  # (a port edited wrong in stack.json)
            return None
        pid = info.get("process_id")
        ours = info.get("config_file") == str(self.conf) and isinstance(pid, int)
        return pid if ours and pid_alive(pid, self._title) else None

    @property
    def _title(self) -> str:
        """What this server's process title holds, whatever its binary is called (redis-server,
        valkey-server ...): the address it listens on. A stale pid now naming another process,
        or another stack's Redis, does not."""
        return f"{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.pid is not None

    def running_elsewhere(self) -> tuple[int, int] | None:
        """(pid, port) where this folder's Redis (its pidfile's, working in the folder) runs on
        another port than stack.json now gives (the file edited while it ran): `up` took it for
        stopped and started a second Redis on the same data folder and AOF."""
        pid = read_pid(self.pidfile)
        if pid is None or not pid_alive(pid, f"{HOST}:") or not works_in(pid, self.folder):
            return None
        title = " ".join(process_args(pid) or [])
        found = re.search(re.escape(HOST) + r":(\d+)", title)
        port = int(found.group(1)) if found else None
        return (pid, port) if port is not None and port != self.port else None

    def _write_conf(self) -> None:
        self.conf.write_text("\n".join([
            f"bind {HOST}",
            f"port {self.port}",
            "protected-mode yes",
            "daemonize yes",
            f"pidfile {_quote(self.pidfile)}",
            f"logfile {_quote(self.log)}",
            f"dir {_quote(self.folder)}",
            *([f"unixsocket {_quote(self.socket)}", "unixsocketperm 700"] if self.socket else []),
            "appendonly yes",
            'appendfilename "appendonly.aof"',
            f"appendfsync {self.appendfsync}",
            *(f"{name} {value}" for name, value in AOF_REWRITE.items()),
            'save ""',
            "",
        ]))

    def _ping(self) -> bool:
        with self.client() as conn:
            return bool(conn.ping())

    def start(self) -> None:
        """Start (if stopped) and wait for PING; a running server gets appendfsync and the AOF
        rewrite settings updated."""
        self._write_conf()
        if self.running:
            self._wait_ready()  # it may be loading its AOF still (a `stack up` right after another)
            with self.client() as conn:
                for name, value in {"appendfsync": self.appendfsync, **AOF_REWRITE}.items():
                    if conn.config_get(name).get(name) != value:
                        conn.config_set(name, value)
            return
        self.pidfile.unlink(missing_ok=True)  # stale: a pid in it from now on is this server's
        with open(self.log, "ab") as out:
            proc = subprocess.run([str(redis_server_path()), str(self.conf)], stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=out, cwd=self.folder, env=clean_env(), timeout=30, check=False)
        if proc.returncode != 0:
            raise service_error(f"redis-server failed to start on {HOST}:{self.port} (exit {proc.returncode})",
                                self.log)
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until PING is answered. A Redis loading its AOF answers LOADING meanwhile, for as long as
        the file takes (a backlog of 1,000,000 transactions is GBs): that is waited out while it
        lives; READY_TIMEOUT is for a server that does not answer at all."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                if self._ping():
                    return
            except redis.BusyLoadingError:
                if self.pid is None:
                    raise service_error(f"redis on {HOST}:{self.port} exited while loading its AOF", self.log) from None
                deadline = time.monotonic() + READY_TIMEOUT
            except (redis.RedisError, OSError):
                if self._exited():
                    raise service_error(f"redis exited as it started on {HOST}:{self.port}", self.log) from None
            if time.monotonic() >= deadline:
                raise service_error(f"redis not answering PING on {HOST}:{self.port} after {READY_TIMEOUT}s", self.log)
            time.sleep(0.05)

    def _exited(self) -> bool:
        """Its pidfile names a process that is gone: Redis exits at once on an AOF it cannot read
        (it writes the file before it loads its data, and keeps it as it exits so). Without a
        pidfile, no process is this server: one whose port was taken exits before it writes the
        file (`up` waited READY_TIMEOUT for it). Unknown without /proc (macOS): not exited."""
        pid = read_pid(self.pidfile)
        if pid is not None:
            return not pid_alive(pid, self._title)
        if not Path("/proc/self").is_dir():
            return False
        # its command line names its config until it has listened, then its address (its title)
        return not any(pid_alive(int(entry.name), self._title) or pid_alive(int(entry.name), str(self.conf))
                       for entry in Path("/proc").iterdir() if entry.name.isdigit())

    def stop(self, mode: str = "fast") -> None:
        """"fast": SHUTDOWN (AOF is flushed, no data lost); "kill"/"immediate": SIGKILL, crash-like."""
        if mode not in ("fast", "kill", "immediate"):
            raise ValueError(f"redis stop mode must be fast, kill or immediate, not {mode!r}")
        pid = self.pid
        if pid is None:
            return
        if mode == "fast":
            try:
                with self.client() as conn:
                    conn.execute_command("SHUTDOWN")
            except redis.ConnectionError:
                pass  # expected: the server closes the connection as it exits
            except redis.RedisError:
                os.kill(pid, signal.SIGTERM)  # SIGTERM is also a graceful, AOF-flushing shutdown
        else:
            os.kill(pid, signal.SIGKILL)
        if not wait_until(lambda: not pid_alive(pid, self._title), READY_TIMEOUT, 0.05):
            raise service_error(f"redis (pid {pid}) did not stop within {READY_TIMEOUT}s", self.log)
