"""The one exception the local stack raises, so callers (CLI, tests) can catch it narrowly."""

from __future__ import annotations

from pathlib import Path


class StackError(RuntimeError):
    """A local service could not be set up, started, stopped or reached."""


def log_tail(path: Path, limit: int = 200) -> str:
    """Last non-empty line of a log, so a one-line error still says *why* something failed."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 8192))
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:limit] if lines else ""


def service_error(what: str, log: Path) -> StackError:
    """Build the one-line `StackError` we use everywhere: what failed, last log line, log path."""
    tail = log_tail(log)
    detail = f": {tail}" if tail else ""
    return StackError(f"{what}{detail} (log: {log})")
