"""Stop signals as Ctrl-C, for the commands that start servers of their own (`dev`, `bench`, `stack`).

SIGTERM (`kill`, `timeout`, a service manager) and SIGHUP (the terminal closing) would kill such
a command at once, its servers, in sessions of their own, running on. Here the first of SIGINT,
SIGTERM and SIGHUP raises KeyboardInterrupt, so the command's `finally` blocks stop what it
started; the ones after it do nothing. Two at once (systemd's SIGTERM, then SIGHUP with
`SendSIGHUP=yes`) ran the second's handler while the first's KeyboardInterrupt unwound, cutting
that cleanup short.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_on_signals() -> None:
    """From now on the first stop signal raises KeyboardInterrupt (even where SIGINT was
    ignored, as in a shell's background job); the main thread only."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt)


def ignore_stop_signals() -> None:
    """For a cleanup: what it runs inherits them ignored (a second Ctrl-C in the terminal reaches
    the whole process group). A signal that came just before is taken as the stop it asked for."""
    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, signal.SIG_IGN)
        except KeyboardInterrupt:  # (signal.signal runs a pending handler first: _interrupt)
            pass


def _interrupt(signum, frame) -> None:  # noqa: ARG001
    # Not SIG_IGN here: Python prints a traceback ("Signal 15 ignored due to race condition") for
    # one that arrived before it was ignored and is still to be handled.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stopping)
    raise KeyboardInterrupt


def _stopping(signum, frame) -> None:  # noqa: ARG001
    """A stop signal after the first: the command is stopping already."""
