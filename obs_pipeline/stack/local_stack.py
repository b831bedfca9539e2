"""LocalStack: main PostgreSQL + streaming replica + Redis (+ optional latency proxy) in one folder.

Everything a laptop or the test-suite needs lives in the state folder: data, logs,
pidfiles and `stack.json` (ports and settings), so stacks in different folders
never clash and `up` after `down` finds its data and ports again.

Layout: stack.json, .stack.lock, logs/{main,replica,redis,proxy,pg_ctl}.log,
postgres/{main,replica}/ (PGDATA), redis/ (AOF, conf, pidfile), proxy.pid.
"""

from __future__ import annotations

import contextlib
import json
import time
import os
import shlex
from pathlib import Path

from .binaries import pg_bin_dir, pg_bin_is_from_wheel
from .errors import StackError
from .proxy_process import proxy_delay_ms, proxy_pid, proxy_route, start_proxy, stop_proxy
from .osutil import (chown, open_prefixes, open_tree, pg_run_user, pick_free_ports, port_holder, port_is_free,
                     write_file)
from .postgres import HOST, PgServer
from .redis_server import APPENDFSYNC_CHOICES, RedisServer

SERVICES = ("main", "replica", "redis", "proxy")
DATABASES = ("obs", "dagster")
SETTINGS = {"main_latency_ms": 0, "redis_appendfsync": "everysec"}  # saved by `up`; a new stack's
# Each way. More is no real link (a geostationary hop is about 300 ms), and the replica, which
# streams through the proxy, could not connect within the wait for it: a larger value was saved
# and every `up` then failed after a minute with 'replica not streaming'.
MAX_MAIN_LATENCY_MS = 5000


def checked_latency(value) -> int:
    """main_latency_ms as an int from 0 to MAX_MAIN_LATENCY_MS, or ValueError in one line
    (True, equal to 1, was taken for 1 ms)."""
    try:
        latency = int(value)
    except (TypeError, ValueError, OverflowError):
        latency = None
    if latency is None or isinstance(value, bool) or latency != value or not 0 <= latency <= MAX_MAIN_LATENCY_MS:
        raise ValueError(f"main latency must be a whole number of milliseconds from 0 to {MAX_MAIN_LATENCY_MS} "
                         f"(each way; 0 removes the proxy), not {value!r}")
    return latency


class LocalStack:
    """Facade over the services of one state folder; every method re-reads the folder, no cached state."""

    def __init__(self, directory: str | Path, *, redis_appendfsync: str | None = None):
        if redis_appendfsync is not None and redis_appendfsync not in APPENDFSYNC_CHOICES:
            raise ValueError(f"redis_appendfsync must be one of {APPENDFSYNC_CHOICES}, not {redis_appendfsync!r}")
        self.directory = Path(directory).expanduser().absolute()
        self._appendfsync = redis_appendfsync  # None: keep what stack.json says (default everysec)

    def __repr__(self) -> str:
        return f"LocalStack({str(self.directory)!r})"

    # --- files --------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.directory / "stack.json"

    @property
    def logs_dir(self) -> Path:
        return self.directory / "logs"

    def log_path(self, name: str) -> Path:
        """Log file of a service ("main", "replica", "redis", "proxy"); pg_ctl output is in pg_ctl.log."""
        return self.logs_dir / f"{name}.log"

    def _read(self) -> dict | None:
        try:
            return json.loads(self.config_path.read_text())
        except (FileNotFoundError, NotADirectoryError):  # no stack here (the "folder" may be a file)
            return None
        except (OSError, ValueError) as exc:
            raise StackError(f"unreadable {self.config_path}: {exc}") from exc

    def _load(self) -> dict | None:
        """stack.json, checked: the operator edits it (a port another program took is moved
        there), and a port edited wrong failed as "'str' object cannot be interpreted as an
        integer" or "'proxy'", or, one service's given to another, started Redis on main's port
        (main then could not start, and that Redis was no longer found by `down`)."""
        cfg = self._read()
        if cfg is None:
            return None
        ports = cfg.get("ports") if isinstance(cfg, dict) else None
        ports = ports if isinstance(ports, dict) else {}
        owner: dict[int, str] = {}
        for name in SERVICES:
            port = ports.get(name)
            if port is None:
                self._refuse(f"gives {name} no port")
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                self._refuse(f"gives {name} the port {port!r}, not a whole number from 1 to 65535")
            if port in owner:
                self._refuse(f"gives {name} {owner[port]}'s port {port} (each needs its own)")
            owner[port] = name
        latency = cfg.get("main_latency_ms", SETTINGS["main_latency_ms"])
        try:
            checked_latency(latency)
        except ValueError:
            self._refuse(f"gives main_latency_ms {latency!r}, not a whole number from 0 to "
                         f"{MAX_MAIN_LATENCY_MS}")
        appendfsync = cfg.get("redis_appendfsync", SETTINGS["redis_appendfsync"])
        if appendfsync not in APPENDFSYNC_CHOICES:
            self._refuse(f"gives redis_appendfsync {appendfsync!r}, not one of "
                         f"{', '.join(APPENDFSYNC_CHOICES)}")
        return cfg

    def _refuse(self, what: str) -> None:
        raise StackError(f"{self.config_path} {what}: fix it in that file")

    def _save(self, cfg: dict) -> None:
        write_file(self.config_path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    def _require(self) -> dict:
        cfg = self._load()
        if cfg is None:
            raise StackError(f"no local stack in {self.directory}: run `obs-pipeline stack up --dir "
                             f"{shlex.quote(str(self.directory))}` first")
        return cfg

    @contextlib.contextmanager
    def _locked(self):
        """Serialize up/down/start/stop on one folder (e.g. two terminals, or xdist workers)."""
        import fcntl

        with open(self.directory / ".stack.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # --- services -----------------------------------------------------------
    def _pg_user(self, create: bool) -> str | None:
        """Who runs PostgreSQL: ourselves, or (as root) the owner of postgres/ or the obs_pipeline user."""
        if os.geteuid() != 0:
            return None
        pg_dir = self.directory / "postgres"
        if pg_dir.exists() and pg_dir.stat().st_uid != 0:
            import pwd

            return pwd.getpwuid(pg_dir.stat().st_uid).pw_name
        return pg_run_user() if create else None

    def _services(self, cfg: dict, user: str | None) -> tuple[PgServer, PgServer, RedisServer]:
        ports, pg_dir, ctl_log = cfg["ports"], self.directory / "postgres", self.log_path("pg_ctl")
        main = PgServer("main", pg_dir / "main", ports["main"], self.log_path("main"), ctl_log, user)
        replica = PgServer("replica", pg_dir / "replica", ports["replica"], self.log_path("replica"), ctl_log, user)
        redis = RedisServer(self.directory / "redis", ports["redis"], self.log_path("redis"),
                            cfg.get("redis_appendfsync", "everysec"))
        return main, replica, redis

    @property
    def _proxy_pidfile(self) -> Path:
        return self.directory / "proxy.pid"

    def _prepare_dirs(self, user: str | None) -> None:
        """Create the folder tree; as root, let the PostgreSQL user reach its dirs and the binaries."""
        pg_dir = self.directory / "postgres"
        for folder in (self.logs_dir, self.directory / "redis"):
            folder.mkdir(exist_ok=True)
        pg_dir.mkdir(mode=0o700, exist_ok=True)
        if user is None:
            return
        chown(pg_dir, user)
        chown(self.logs_dir, user)
        open_prefixes(self.directory)
        bin_dir = pg_bin_dir()
        open_prefixes(bin_dir, readable=True)
        if pg_bin_is_from_wheel() and not (pg_dir / "main" / "PG_VERSION").exists():
            open_tree(bin_dir.parent)  # once, before initdb: share/ and lib/ must be readable too

    def _check_ports(self, wanted: dict[str, int], grace_s: float = 5.0) -> None:
        """A process that was just killed can hold its port a moment longer: wait a little."""
        for name, port in wanted.items():
            deadline = time.monotonic() + grace_s
            while not port_is_free(port) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not port_is_free(port):  # the folder holds the buffer and main: never suggest deleting it
                holder = port_holder(port) or "another process"
                raise StackError(f"port {port} saved for {name} in {self.config_path} is in use by {holder}: stop "
                                 f"it, or give {name} another free port in that file, then `obs-pipeline stack up "
                                 f"--dir {shlex.quote(str(self.directory))}` again")

    def _upstream_port(self, cfg: dict) -> int:
        """Where the replica (and the drain) reach main: through the proxy when latency is configured."""
        return cfg["ports"]["proxy"] if cfg.get("main_latency_ms") else cfg["ports"]["main"]

    def _ensure_proxy(self, cfg: dict) -> None:
        """The proxy at the latency and on the ports stack.json gives (an operator moves a port there)."""
        latency, pidfile, ports = cfg.get("main_latency_ms") or 0, self._proxy_pidfile, cfg["ports"]
        route = (str(ports["proxy"]), f"127.0.0.1:{ports['main']}")
        if proxy_pid(pidfile) is not None and (proxy_delay_ms(pidfile) != float(latency)
                                               or proxy_route(pidfile) != route):
            stop_proxy(pidfile)
        if latency and proxy_pid(pidfile) is None:
            start_proxy(cfg["ports"]["proxy"], cfg["ports"]["main"], latency, pidfile, self.log_path("proxy"))

    # --- public API ---------------------------------------------------------
    def up(self, main_latency_ms: int | None = None) -> None:
        """Create/start whatever is missing or stopped and wait until all is ready; a no-op if all runs.

        main_latency_ms: None keeps the saved setting, 0 removes the proxy, N > 0 routes the
        drain's main URL and the replica's WAL stream through an N ms (each way) proxy.
        Saved for later ups only if this one succeeds.
        """
        if main_latency_ms is not None:
            main_latency_ms = checked_latency(main_latency_ms)
        unsafe = sorted(set('"$`\\') & set(str(self.directory)))
        if unsafe:  # pg_ctl starts the server through a shell, with the paths in double quotes
            raise StackError(f"the stack folder {self.directory} has {' '.join(unsafe)} in its path, which "
                             "PostgreSQL's pg_ctl cannot pass on: choose another folder (--dir)")
        self.make_folder()
        with self._locked():
            cfg = self._load()
            if cfg is None:
                ports = dict(zip(SERVICES, pick_free_ports(len(SERVICES))))
                cfg = {"version": 1, "ports": ports, **SETTINGS}
            kept = {name: cfg.get(name, default) for name, default in SETTINGS.items()}
            if main_latency_ms is not None:
                cfg["main_latency_ms"] = int(main_latency_ms)
            if self._appendfsync is not None:
                cfg["redis_appendfsync"] = self._appendfsync
            user = self._pg_user(create=True)
            main, replica, redis = self._services(cfg, user)
            stopped = {"main": main, "replica": replica, "redis": redis}
            self._refuse_moved_while_running(stopped)
            wanted = {name: cfg["ports"][name] for name, svc in stopped.items() if not svc.running}
            if cfg["main_latency_ms"] and proxy_pid(self._proxy_pidfile) is None:
                wanted["proxy"] = cfg["ports"]["proxy"]
            self._check_ports(wanted)
            running_proxy = proxy_pid(self._proxy_pidfile) is not None
            proxy_before = proxy_delay_ms(self._proxy_pidfile) if running_proxy else None
            self._save(cfg)
            try:
                self._start(cfg, user, main, replica, redis)
            except BaseException as error:  # the settings as they were: a later plain `up`
                self._save({**cfg, **kept})  # would use a failed one's (a first one's ports stay)
                try:
                    self._set_back({**cfg, **kept}, proxy_before, user)
                except Exception as failed:  # noqa: BLE001 - said in the one line, with what to do
                    folder = shlex.quote(str(self.directory))
                    raise StackError(f"{error}; and what this `up` changed in running services "
                                     f"could not be set back ({failed}): run `obs-pipeline stack "
                                     f"up --dir {folder}` once the cause is fixed") from error
                raise

    def _refuse_moved_while_running(self, services: dict) -> None:
        """A service whose port stack.json moved while it ran, in one line: `up` started a second
        Redis on the same data folder and AOF (which `down` then stopped alone, the first left
        running, its writes lost at the next rewrite), or waited 60 s for main on its new port."""
        for name, service in services.items():
            elsewhere = service.running_elsewhere()
            if elsewhere is not None:
                label = "Redis" if name == "redis" else f"{name} PostgreSQL"
                (pid, port), folder = elsewhere, shlex.quote(str(self.directory))
                raise StackError(f"{label} of this stack runs on port {port} (pid {pid}), and {self.config_path} "
                                 f"now gives {service.port}: put {port} back in that file, stop the stack "
                                 f"(obs-pipeline stack down --dir {folder}), then move the port")

    def _set_back(self, cfg: dict, proxy_before: float | None, user: str | None) -> None:
        """After a failed `up`, running services as the saved settings `cfg` have them: the proxy
        as it ran before (stopped, or at its latency), the replica's upstream, Redis's live
        appendfsync. They kept what the refused command gave them until the next `up`."""
        pidfile = self._proxy_pidfile
        if proxy_pid(pidfile) is not None and proxy_delay_ms(pidfile) != proxy_before:
            stop_proxy(pidfile)
        if proxy_before is not None and proxy_pid(pidfile) is None:
            start_proxy(cfg["ports"]["proxy"], cfg["ports"]["main"], int(proxy_before), pidfile,
                        self.log_path("proxy"))
        main, replica, redis = self._services(cfg, user)
        if replica.initialized:
            replica.set_upstream(self._upstream_port(cfg))
        if redis.running:
            redis.start()  # writes its config and sets appendfsync on the running server

    def _start(self, cfg: dict, user: str | None, main: PgServer, replica: PgServer,
               redis: RedisServer) -> None:
        """What `up` starts, in order, once the ports are known to be free."""
        self._prepare_dirs(user)
        # first: scripts buffer into Redis alone, and a PostgreSQL that cannot start (below)
        # must not keep the site's buffer down with it
        redis.start()

        if not main.initialized:
            main.init_primary()
        ids = (replica.system_identifier, main.system_identifier) if replica.initialized else (None, None)
        if None not in ids and ids[0] != ids[1]:
            folder = shlex.quote(str(self.directory))
            raise StackError(f"the replica in {replica.datadir} is a copy of another main (main's data folder was "
                             f"made anew): stop it (`obs-pipeline stack stop replica --dir {folder}`), move "
                             f"{replica.datadir} away (it holds that main's data), then `obs-pipeline stack up "
                             f"--dir {folder}` clones it afresh")
        main.start()
        main.ensure_databases(list(DATABASES))
        if not replica.initialized:
            replica.clone_from(main)
        self._ensure_proxy(cfg)
        upstream = self._upstream_port(cfg)
        replica.set_upstream(upstream)
        replica.start()
        replica.wait_streaming(upstream, replayed=main.query("SELECT pg_current_wal_flush_lsn()::text")[0])

    def make_folder(self) -> None:
        """The state folder, or StackError in one line (it said '[Errno 17] File exists: ...')."""
        hint = "choose another folder (--dir)"
        if self.directory.exists() and not self.directory.is_dir():
            raise StackError(f"the stack folder {self.directory} is a file, not a folder: {hint}")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StackError(f"cannot create the stack folder {self.directory} ({exc.strerror}): {hint}") from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise StackError(f"the stack folder {self.directory} is not writable: {hint}")

    def down(self) -> None:
        """Fast-stop replica, proxy, main and redis; harmless if already down or never set up."""
        cfg = self._load()
        if cfg is None:
            return
        with self._locked():
            main, replica, redis = self._services(cfg, self._pg_user(create=False))
            errors = []
            for stop in (replica.stop, lambda: stop_proxy(self._proxy_pidfile), main.stop, redis.stop):
                try:
                    stop()
                except StackError as exc:  # keep stopping the rest, report the first failure
                    errors.append(exc)
            if errors:
                raise errors[0]

    def status(self) -> dict:
        """Running/port/pid per service (replica: replay_lsn, proxy: latency_ms, redis: its Unix socket);
        cheap and never raises."""
        try:
            cfg = self._read()  # unchecked: what runs on the ports it gives is still worth a look
        except StackError:
            cfg = None
        cfg = cfg if isinstance(cfg, dict) else None
        ports = (cfg or {}).get("ports") or {}
        out = {name: {"running": False, "port": ports.get(name), "pid": None} for name in SERVICES}
        out["redis"]["socket"] = None
        out["replica"]["replay_lsn"] = None
        out["proxy"]["latency_ms"] = int((cfg or {}).get("main_latency_ms") or 0)
        try:
            main, replica, redis = self._services(cfg, None)
        except (KeyError, TypeError, ValueError):  # hand-edited stack.json: report "not running"
            return out
        for name, pid in (("main", main.pid), ("replica", replica.pid), ("redis", redis.pid),
                          ("proxy", proxy_pid(self._proxy_pidfile))):
            out[name].update(running=pid is not None, pid=pid)
        socket = redis.socket
        out["redis"]["socket"] = str(socket) if socket and out["redis"]["running"] and socket.is_socket() else None
        if out["replica"]["running"]:
            try:
                out["replica"]["replay_lsn"] = replica.replay_lsn()
            except Exception:  # noqa: BLE001 - status must not raise (replica may be starting)
                pass
        return out

    def env(self) -> dict[str, str]:
        """Environment variables the pipeline reads; the main URL goes through the proxy if configured."""
        cfg = self._require()
        ports = cfg["ports"]
        return {
            "OBS_REDIS_URL": f"redis://{HOST}:{ports['redis']}/0",
            "OBS_MAIN_DB_URL": f"postgresql+psycopg2://postgres@{HOST}:{self._upstream_port(cfg)}/obs",
            "OBS_REPLICA_DB_URL": f"postgresql+psycopg2://postgres@{HOST}:{ports['replica']}/obs",
            "OBS_DAGSTER_PG_URL": f"postgresql+psycopg2://postgres@{HOST}:{ports['main']}/dagster",
        }

    @property
    def main_direct_url(self) -> str:
        """SQLAlchemy URL of `obs` on main that bypasses the latency proxy."""
        return f"postgresql+psycopg2://postgres@{HOST}:{self._require()['ports']['main']}/obs"

    def stop_service(self, name: str, *, mode: str = "fast") -> None:
        """Fault injection: stop one service.

        mode "fast" = clean (pg_ctl -m fast, redis SHUTDOWN, proxy SIGTERM);
        "immediate" or "kill" = crash-like (pg_ctl -m immediate, SIGKILL for redis/proxy).
        """
        if name not in SERVICES or mode not in ("fast", "immediate", "kill"):
            raise ValueError(f"stop_service(name in {SERVICES}, mode in fast/immediate/kill), got {name!r}, {mode!r}")
        cfg = self._require()
        with self._locked():
            main, replica, redis = self._services(cfg, self._pg_user(create=False))
            if name == "proxy":
                stop_proxy(self._proxy_pidfile, mode)
            elif name == "redis":
                redis.stop(mode)
            else:
                (main if name == "main" else replica).stop("fast" if mode == "fast" else "immediate")

    def start_service(self, name: str) -> None:
        """Start one stopped service of a set-up stack and wait until ready (and the replica streams)."""
        if name not in SERVICES:
            raise ValueError(f"unknown service {name!r}; expected one of {SERVICES}")
        cfg = self._require()
        if name == "proxy" and not cfg.get("main_latency_ms"):
            raise StackError("no latency proxy configured: run `obs-pipeline stack up --main-latency-ms N --dir "
                             f"{shlex.quote(str(self.directory))}` first")
        with self._locked():
            main, replica, redis = self._services(cfg, self._pg_user(create=True))
            self._refuse_moved_while_running({"main": main, "replica": replica, "redis": redis})
            running = {"main": main.running, "replica": replica.running, "redis": redis.running,
                       "proxy": proxy_pid(self._proxy_pidfile) is not None}
            server = {"main": main, "replica": replica}.get(name)
            if server is not None and not server.running and not server.initialized:
                folder = shlex.quote(str(self.directory))
                raise StackError(f"{name}'s data folder {server.datadir} is gone: " + (
                    f"`obs-pipeline stack up --dir {folder}` clones it afresh from main" if name == "replica" else
                    f"put it back: `obs-pipeline stack up --dir {folder}` would make a new, empty main (the "
                    "replica, a copy of this one, is then refused)"))
            if not running[name]:
                self._check_ports({name: cfg["ports"][name]})
            if name == "redis":
                redis.start()
                return
            if name == "main":
                main.start()
            elif name == "proxy":
                self._ensure_proxy(cfg)
            else:
                replica.set_upstream(self._upstream_port(cfg))
                replica.start()
            proxy_ok = not cfg.get("main_latency_ms") or proxy_pid(self._proxy_pidfile) is not None
            if main.running and replica.running and proxy_ok:
                replica.wait_streaming(self._upstream_port(cfg),
                                       replayed=main.query("SELECT pg_current_wal_flush_lsn()::text")[0])
