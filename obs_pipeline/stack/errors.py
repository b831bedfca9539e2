"""The one exception the local stack raises, so callers (CLI, tests) can catch it narrowly."""

from __future__ import annotations

from pathlib import Path


class StackError(RuntimeError):
    """A local service could not be set up, started, stopped or reached."""


# Lines PostgreSQL and its tools write after the reason, as they go down or clean up.
EPILOGUES = ("database system is shut down", "removing data directory", "removing contents of data directory")
REASONS = ("FATAL:", "PANIC:", ": error:")


def log_tail(path: Path, limit: int = 200) -> str:
    """Last non-empty line of a log, so a one-line error still says *why* something failed; where
    that line is PostgreSQL's epilogue ('database system is shut down'), the reason before it."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 8192))
            raw = [ln for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    # a message's first line: libpq's run over several, the later ones indented ('no COPY in progress')
    lines = [ln.strip() for ln in raw if not ln[:1].isspace()] or [ln.strip() for ln in raw]
    if not lines:
        return ""
    if any(epilogue in lines[-1] for epilogue in EPILOGUES):
        run = []  # this run's lines: since pg_ctl.log's last command, or the server's last stop
        for line in reversed(lines[:-1]):
            if line.startswith("$ ") or any(epilogue in line for epilogue in EPILOGUES):
                break
            run.append(line)
        if not any("shutdown request" in line for line in run):  # a stop asked for: its FATALs are clients
            reasons = [line for line in run if any(reason in line for reason in REASONS)]
            if reasons:
                return reasons[0][:limit]  # the last one logged
    return lines[-1][:limit]


def service_error(what: str, log: Path) -> StackError:
    """Build the one-line `StackError` we use everywhere: what failed, last log line, log path."""
    tail = log_tail(log)
    detail = f": {tail}" if tail else ""
    return StackError(f"{what}{detail} (log: {log})")
