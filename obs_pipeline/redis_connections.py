"""Redis connections that say so when their connect fails: nothing was sent on them then.

A push of the spool that failed after it may have reached Redis (its reply lost) leaves a line
marked as a possible copy, and one whose connect failed does not (spool._may_have_reached_redis).
redis-py raises both as its ConnectionError or TimeoutError: told apart by its wording ("Error 111
connecting to ...", "Timeout connecting to server"), a redis-py that worded it otherwise had every
line a script spooled while Redis was down for a week set aside as a possible stale copy. These
connections (one class for each scheme of OBS_REDIS_URL) raise a failure of their connect, the
socket's or the handshake's (AUTH, HELLO, SELECT...), as one of redis-py's classes that is also
ConnectFailed, its message and cause as redis-py made them.

redis-py may send a command again after a lost reply (a URL asking it to retry): the error it then
ends with can be the refused reconnect's, after a first send. So a connect failure counts as
nothing sent only where no connection of ours lost a connected socket in the same call
(sockets_lost, read before it: no round trip, nothing on a connected connection's path), and
then whatever the call ends with (the reconnect's AUTH refused, READONLY from the resend). A
handshake that fails closes a socket that was connected, and so counts as lost: cautious; but a
refused AUTH does not (that socket carried the AUTH alone), or a script whose password Redis
refuses would mark every line it spools.
"""

from __future__ import annotations

import threading
from typing import Any

import redis
from redis.connection import parse_url


class ConnectFailed(Exception):
    """Marks redis-py's error as raised by a connect of ours, before anything was sent on it."""


class ConnectionErrorAtConnect(redis.ConnectionError, ConnectFailed):
    pass


class TimeoutAtConnect(redis.TimeoutError, ConnectFailed):
    pass


class LoadingAtConnect(redis.BusyLoadingError, ConnectFailed):
    pass


_AT_CONNECT = {redis.ConnectionError: ConnectionErrorAtConnect, redis.TimeoutError: TimeoutAtConnect,
               redis.BusyLoadingError: LoadingAtConnect}


class _Lost(threading.local):
    count = 0  # connected sockets our connections closed in this thread (a default: no getattr's miss, 0.3 us)


_lost = _Lost()


def sockets_lost() -> int:
    """How many connected sockets connections of ours have closed in this thread: a push that sees
    this grow may have sent on one of them, whatever error it ends with."""
    return _lost.count


class _SaysWhenConnectFails:
    """A mixin before redis-py's connection class (see the module's docstring). Neither method runs
    for a command on a connected connection: redis-py connects only where it has no socket."""

    _sock: Any

    def connect_check_health(self, *args: Any, **kwargs: Any) -> Any:
        lost = _lost.count
        try:
            return super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
        except (redis.ConnectionError, redis.TimeoutError) as error:
            marked = _AT_CONNECT.get(type(error))  # (another subclass keeps its type: AuthenticationError, say)
            if marked is None:
                if isinstance(error, redis.AuthenticationError):
                    _lost.count = lost  # its socket carried the refused AUTH alone: no lost reply of a script's
                raise
            failure = marked(*error.args).with_traceback(error.__traceback__)
            if error.__cause__ is not None:  # the socket's OSError, as redis-py gave it: its retry checks read it
                raise failure from error.__cause__
            raise failure  # (its context: redis-py's error, and what that was raised handling)

    def disconnect(self, *args: Any, **kwargs: Any) -> Any:
        if self._sock is not None:
            _lost.count += 1
        return super().disconnect(*args, **kwargs)  # type: ignore[misc]


class Connection(_SaysWhenConnectFails, redis.Connection):
    pass


class SSLConnection(_SaysWhenConnectFails, redis.SSLConnection):
    pass


class UnixDomainSocketConnection(_SaysWhenConnectFails, redis.UnixDomainSocketConnection):
    pass


_OURS = {redis.Connection: Connection, redis.SSLConnection: SSLConnection,
         redis.UnixDomainSocketConnection: UnixDomainSocketConnection}


def redis_from_url(url: str, **options: Any) -> redis.Redis:
    """redis.Redis.from_url, on connections of ours of the class the URL's scheme picks. (A
    `connection_class` given to from_url replaces that class: a rediss:// URL got a plain TCP
    connection, a unix:// one a TCP connection refusing its `path`.)"""
    picked = parse_url(url).get("connection_class", redis.Connection)
    ours = _OURS.get(picked)
    return redis.Redis.from_url(url, **options, **({"connection_class": ours} if ours else {}))
