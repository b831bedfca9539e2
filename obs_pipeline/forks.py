"""Forked children (multiprocessing's fork start method) get their own connections and locks.

A child forked from a script inherits its objects as they were at that moment: a thread's own
Redis connection (the same socket as the parent's: the two processes' replies would cross),
the replica's pooled connections, and thread locks that another thread of the parent held then
(held for ever in the child, whose only thread is the one that forked). An object that holds
such things registers here; in each child forked after that, its `_after_fork_in_child()` is
called first thing (os.register_at_fork), before the child runs anything else. It only drops
what it inherited and makes fresh locks: the parent's sockets are never closed or shut down by
the child (redis-py and psycopg2 leave a socket of another process alone when they let go of
it). The hook is registered at the first registration, not at import, and objects are held
weakly (they are collected as usual).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any

log = logging.getLogger(__name__)

_RENEWED: "weakref.WeakSet[Any]" = weakref.WeakSet()
_registered = False
_registering = threading.Lock()


def renew_in_forked_children(obj: Any) -> None:
    """Have `obj._after_fork_in_child()` called in every child forked from now on."""
    global _registered
    if not _registered:
        with _registering:
            if not _registered:
                os.register_at_fork(after_in_child=_renew_all)
                _registered = True
    _RENEWED.add(obj)


def _renew_all() -> None:
    global _registering
    _registering = threading.Lock()  # (a thread of the parent may have held it)
    for obj in list(_RENEWED):
        try:
            obj._after_fork_in_child()
        except Exception as error:  # noqa: BLE001 -- the others are renewed all the same
            log.warning("after a fork, %s could not be renewed in the child: %s", type(obj).__name__, error)
