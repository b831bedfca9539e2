"""Run the latency proxy as a background daemon of the stack: start, stop, find its pid.

Kept apart from latency_proxy.py so the package never imports the module it runs
with `python -m` (which would make runpy warn and execute it twice).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .errors import service_error
from .osutil import pid_alive


def proxy_pid(pidfile: Path) -> int | None:
    """Pid of the live proxy recorded in `pidfile`, else None."""
    recorded = _recorded(pidfile)
    return recorded[0] if recorded and pid_alive(*recorded) else None


def _recorded(pidfile: Path) -> tuple[int, str] | None:
    """(pid, command-line title) the pidfile records, read once: the proxy removes it as it exits."""
    try:
        info = json.loads(pidfile.read_text())
        return int(info["pid"]), _title(info["listen"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _title(listen: str) -> str:
    """This proxy's command line, not another stack's proxy that a stale pid may name now."""
    return f"latency_proxy --listen {listen} "


def proxy_delay_ms(pidfile: Path) -> float | None:
    """Delay the running proxy was started with (to know whether it must be restarted)."""
    try:
        return float(json.loads(pidfile.read_text())["delay_ms"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def proxy_route(pidfile: Path) -> tuple[str, str] | None:
    """(listen, target) the running proxy was started with: stack.json's ports may have moved since."""
    try:
        info = json.loads(pidfile.read_text())
        return str(info["listen"]), str(info["target"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def start_proxy(listen_port: int, target_port: int, delay_ms: int, pidfile: Path, log: Path) -> int:
    """Launch the proxy daemon; returns its pid once it is listening."""
    package_root = str(Path(__file__).resolve().parents[2])  # so `-m` works without an installed package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    pidfile.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "obs_pipeline.stack.latency_proxy", "--listen", str(listen_port),
           "--target", f"127.0.0.1:{target_port}", "--delay-ms", str(delay_ms), "--daemonize",
           "--pidfile", str(pidfile)]
    with open(log, "ab") as out:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                              cwd=pidfile.parent, timeout=30, check=False)
    deadline = time.monotonic() + 10
    while proc.returncode == 0 and proxy_pid(pidfile) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = proxy_pid(pidfile)
    if proc.returncode != 0 or pid is None:
        raise service_error(f"latency proxy failed to start on 127.0.0.1:{listen_port}", log)
    return pid


def stop_proxy(pidfile: Path, mode: str = "fast") -> None:
    """SIGTERM (or SIGKILL for "kill"/"immediate") the proxy and wait until it is gone; one that
    exits meanwhile is no error (it raised FileNotFoundError or ProcessLookupError)."""
    recorded = _recorded(pidfile)
    if recorded is not None and pid_alive(*recorded):
        pid, title = recorded
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM if mode == "fast" else signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(pid, title) and time.monotonic() < deadline:
            time.sleep(0.02)
        if pid_alive(pid, title):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
