"""`obs-pipeline dev`: the whole system on one machine, stopped by Ctrl-C.

Stack up, schema and demo obs units on main, then the Dagster webserver and daemon (the
daemon runs `buffer_sensor`, which launches `drain_buffer` runs) with DAGSTER_HOME in the
stack folder and Dagster's storage in the `dagster` database on main.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from obs_pipeline.config import Settings, installed_script, own_command
from obs_pipeline.model_registry import ModelRegistry
from obs_pipeline.schema import cannot_simulate, has_demo_obs_units
from obs_pipeline.stack.errors import StackError
from obs_pipeline.stack.local_stack import SERVICES
from obs_pipeline.stack.osutil import pid_alive, port_holder, port_is_free, signal_group
from obs_pipeline.stop_signals import ignore_stop_signals, stop_on_signals

DAGSTER_YAML = Path(__file__).parent / "dagster_defs" / "dagster.yaml"
RECORD = "dev.json"  # in the stack folder: what the running `dev` started, for the next if it is killed


def dagster_environment(stack, home: Path | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Dagster processes: stack URLs, OBS_* defaults, DAGSTER_HOME."""
    env = dict(os.environ if base is None else base)
    env.update(stack.env())
    env.setdefault("OBS_SITE", "observatory")
    home = home or Path(stack.directory) / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DAGSTER_YAML, home / "dagster.yaml")
    env["DAGSTER_HOME"] = str(home)
    return env


def start_dagster(env: dict[str, str], port: int, log_dir: Path, started: list[subprocess.Popen]) -> None:
    """Start the daemon, then the webserver, each appended to `started` as soon as it runs: a
    Ctrl-C while the second starts must still find the first to stop."""
    log_dir.mkdir(parents=True, exist_ok=True)
    common = ["-m", "obs_pipeline.definitions"]
    started.append(subprocess.Popen([installed_script("dagster-daemon"), "run", *common], env=env,
                                    stdout=open(log_dir / "dagster-daemon.log", "ab"), stderr=subprocess.STDOUT,
                                    start_new_session=True))
    started.append(subprocess.Popen([installed_script("dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                                     *common], env=env, stdout=open(log_dir / "dagster-webserver.log", "ab"),
                                    stderr=subprocess.STDOUT, start_new_session=True))


def stop_processes(processes: list[subprocess.Popen], timeout: float = 20.0) -> None:
    """SIGTERM each process group and wait, up to `timeout`, until each group is empty, then
    SIGKILL whatever is left: a group holds children too (Dagster's code servers, and the run
    worker of a drain, which needs the time to finish its batch and record how its run ended;
    killed at once, the run stays STARTED until the next daemon's sensor finds its lease free and
    the run quiet for 75 s, and marks it failed)."""
    for proc in processes:
        signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in processes:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    _wait_groups_then_kill([proc.pid for proc in processes], deadline)
    for proc in processes:
        proc.wait()


def _wait_groups_then_kill(pgids: list[int], deadline: float) -> None:
    while time.monotonic() < deadline and any(_group_alive(pgid) for pgid in pgids):
        time.sleep(0.1)
    for pgid in pgids:
        signal_group(pgid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. A zombie does not: the leftovers of a killed
    `dev` are no children of ours, and where nothing reaps orphans (PID 1 in some containers
    and VMs) a group of zombies would be waited on for the whole timeout."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc/self").is_dir():  # macOS: kill(0) is all we have
        return True
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            if int(pgrp) == pgid and state not in ("Z", "X"):
                return True
    return False


def _say(line: str) -> None:
    """A line on stderr, unless the terminal is gone (hung up: EIO), which must not stop the cleanup."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def hold_dev_lock(stack):
    """One `dev` per stack folder: a second would start a second Dagster daemon on the same
    DAGSTER_HOME (two sensors launching runs), and the first, stopped, would take the stack
    down under it. An flock held as long as this process lives (a `kill -9` leaves no stale
    lock; what that `dev` started, in sessions of their own, lives on: see stop_leftovers), with
    the holder's pid in the file for the message."""
    stack.make_folder()  # a folder that cannot be one is said as `stack up` says it
    directory = Path(stack.directory)
    lock = open(directory / "dev.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        raise StackError(f"another `obs-pipeline dev` runs on {directory}" + (f" (pid {holder})" if holder else "")
                         + ": stop it (Ctrl-C in its terminal), or give this one another --dir") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def write_record(directory: Path, processes: list[subprocess.Popen], services: set[str]) -> None:
    """Say in the stack folder what this `dev` started (its processes' groups, the stack's
    services it brought up), for the next `dev` to stop if this one is killed (SIGKILL: no
    cleanup). Written whole or not at all."""
    record = {"pid": os.getpid(), "services": sorted(services),
              "processes": [{"pid": p.pid, "command": _what(p)} for p in processes]}
    temporary = directory / f".{RECORD}.{os.getpid()}"
    temporary.write_text(json.dumps(record))
    os.replace(temporary, directory / RECORD)


def _what(proc: subprocess.Popen) -> str:
    """What names the process in its command line: the script (dagster-daemon, ...), or `simulate`."""
    args = [str(a) for a in proc.args]
    return "obs_pipeline.cli simulate" if "simulate" in args else Path(args[0]).name


def _command_line(pid: int) -> str:
    if Path("/proc/self").is_dir():
        return (Path(f"/proc/{pid}") / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True).stdout


def _still_running(pid, command) -> bool:
    """Whether the group a killed `dev` recorded still runs and is still that one: its leader
    still that command (a pid can be reused, after a reboot say), or gone while the group's
    other processes (a code server, a run worker) run on (a pid is not reused while a group
    bears it)."""
    if not isinstance(pid, int) or pid <= 1 or not isinstance(command, str) or not command:
        return False
    if not _group_alive(pid):
        return False
    try:
        return not pid_alive(pid) or (os.getpgid(pid) == pid and command in _command_line(pid))
    except OSError:  # the leader ended meanwhile: the group's others, if any, are its own
        return _group_alive(pid)


def stop_leftovers(directory: Path) -> set[str]:
    """What a `dev` killed with SIGKILL left: its record names the Dagster daemon, webserver and
    simulator it started (each in a session of its own, they run on; a new daemon beside them
    was a second sensor on one DAGSTER_HOME) and the services it brought up. Stops those
    processes that still run, saying so in one line, and returns the services: this `dev`
    takes them down on Ctrl-C, as the killed one would have. Called with the lock held, so the
    record's `dev` is gone."""
    path = directory / RECORD
    try:
        record = json.loads(path.read_text())
        processes, services = record["processes"], set(record["services"]) & set(SERVICES)
        left = [(p["pid"], p["command"]) for p in processes if _still_running(p["pid"], p["command"])]
        killed = record["pid"]
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, TypeError, KeyError) as error:  # not ours to act on: say so, and go on
        _say(f"obs-pipeline dev: ignoring {path}, unreadable ({error}): stop anything it started by hand")
        return set()
    if left:
        _say(f"obs-pipeline dev: stopping what an earlier `obs-pipeline dev` (pid {killed}) on {directory} left "
             "running when it ended without cleaning up (kill -9?): "
             + ", ".join(f"{command} (pid {pid})" for pid, command in left))
        for pid, _command in left:
            signal_group(pid, signal.SIGTERM)
        _wait_groups_then_kill([pid for pid, _command in left], time.monotonic() + 20.0)
    path.unlink()
    return services


def run_dev(stack, *, port: int, simulate_rate: float | None, main_latency_ms: int | None) -> int:
    # OBS_MODELS, which `db init` loads, before anything changes: one that did not load was refused
    # once the stack was up (made, in a new folder) and a new --main-latency-ms saved
    models = Settings.from_env().models
    registry = ModelRegistry.from_path(models)
    refusal = cannot_simulate(registry, models, "--simulate") if simulate_rate else None
    if refusal:  # (the simulator failed once everything was up)
        raise StackError(f"{refusal}: leave --simulate out")
    lock = hold_dev_lock(stack)  # held until everything is stopped
    directory = Path(stack.directory)
    adopted = stop_leftovers(directory)  # before the port check: the killed one's webserver holds its port
    if not port_is_free(port):  # before anything starts: the webserver would exit with 3 after the stack came up
        holder = port_holder(port) or "another process"
        raise StackError(f"port {port} for the Dagster UI is in use by {holder} (another `obs-pipeline dev`?): "
                         "stop it, or choose another port with --port")
    # Ctrl-C, `kill` from a service manager, and the terminal closing (SIGHUP: its processes
    # are in sessions of their own and would outlive it) stop everything
    stop_on_signals()
    # what runs already is the operator's (a stack up, scripts using its Redis): dev stops only what it starts
    before = stack.status() if (Path(stack.directory) / "stack.json").exists() else {}
    ran_before = {name for name, s in before.items() if s.get("running")} - adopted
    if "replica" in ran_before and main_latency_ms not in (None, before["proxy"]["latency_ms"]):
        # a new latency (saved) moves the operator's replica, which stays up, behind the proxy: that stays
        # too (stopped, the replica streamed from nowhere, replication stopped until the next `stack up`)
        ran_before.add("proxy")
    logs = directory / "logs"
    processes: list[subprocess.Popen] = []
    started_services = set(SERVICES) - ran_before
    try:  # from the first step on: a Ctrl-C while the stack starts still takes it down
        write_record(directory, processes, started_services)
        stack.up(main_latency_ms=main_latency_ms)
        env = dagster_environment(stack)
        # the demo's obs units where the models have their table: a site's own models failed here
        # ('relation "obs_unit" does not exist') and dev with them
        demo = ["--demo-data"] if has_demo_obs_units(registry) else []
        if subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "db", "init", *demo], env=env).returncode:
            return 1  # it said why, in one line
        try:
            start_dagster(env, port, logs, processes)
        finally:  # what started, even if a Ctrl-C came between the two
            write_record(directory, processes, started_services)
        if simulate_rate:
            processes.append(subprocess.Popen([sys.executable, "-m", "obs_pipeline.cli", "simulate", "--rate",
                                               str(simulate_rate)], env=env, start_new_session=True))
            write_record(directory, processes, started_services)
        print(f"Dagster UI: http://127.0.0.1:{port}  (sensor buffer_sensor is on; logs in {logs})", flush=True)
        print(f"In another shell: eval \"$({own_command()} stack env --dir {shlex.quote(str(stack.directory))})\"; "
              "Ctrl-C stops everything.", flush=True)
        while all(p.poll() is None for p in processes[:2]):
            time.sleep(1)
        failed = next(p for p in processes[:2] if p.poll() is not None)
        print(f"obs-pipeline: error: {failed.args[0]} exited with {failed.returncode}; see {logs}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        ignore_stop_signals()  # a second Ctrl-C must not cut the cleanup short and leave processes behind
        _say("stopping (up to 20 s: a drain run finishes its batch) ...")
        stop_processes(processes)
        if not ran_before:
            stack.down()
        else:
            for name in ("replica", "proxy", "main", "redis"):  # down's order
                if name not in ran_before and stack.status()[name]["running"]:
                    stack.stop_service(name)
        (directory / RECORD).unlink(missing_ok=True)  # all it names is stopped
        lock.close()
