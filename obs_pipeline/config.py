"""Settings from the environment, read when asked for, never at import time; and how messages
name this installation's `obs-pipeline` when they tell an operator to set them."""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping


class ConfigError(RuntimeError):
    """A setting is missing or wrong; the message says which variable to set."""


DEFAULT_SITE = "observatory"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_MODELS = "obs_pipeline.models:Base"
SITE_MAX_BYTES = 200  # its spool's `{site}.refused.jsonl` must fit a file name's 255 bytes
# In a site name, these would put one site's keys under another's prefix (':'), or name no file
_SITE_REFUSED_CHARACTERS = {":": "':', which ends the site's part of its Redis keys (site:{site}:...): site "
                                 "'a' would hold site 'a:b''s keys under its prefix",
                            "/": "'/', which cannot be in its spool's file name (OBS_SPOOL_DIR/{site}.jsonl)"}


def installed_script(name: str) -> str:
    """A console script of this installation (its venv's bin is often not on PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def own_command() -> str:
    """This installation's `obs-pipeline` as a shell can run it, for the hints printed: one
    naming it bare ran nothing outside the venv (or another installation's)."""
    return shlex.quote(installed_script("obs-pipeline"))


def stack_env_hint() -> str:
    """How to set the OBS_* variables for the local stack, for messages that miss one."""
    return f'`eval "$({own_command()} stack env)"`'


# The most a drain's lease and waits take (DrainConfig, `drain` flags): a finite lease Redis
# takes (SET PX), and its renewals' timestamps in range (1e12 s overflowed one).
DAY_S = 86400.0


@dataclass(frozen=True)
class Settings:
    site: str = DEFAULT_SITE
    redis_url: str = DEFAULT_REDIS_URL
    main_db_url: str | None = None
    replica_db_url: str | None = None
    models: str = DEFAULT_MODELS
    spool_dir: str | None = None

    def __post_init__(self) -> None:
        refuse_site(self.site)
        # A URL naming no driver means psycopg2, the one installed; to SQLAlchemy 2.1 it means psycopg 3
        for name in ("main_db_url", "replica_db_url"):
            url = getattr(self, name)
            if url and url.startswith("postgresql://"):
                object.__setattr__(self, name, "postgresql+psycopg2://" + url.removeprefix("postgresql://"))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """An empty variable is an unset one (OBS_SITE='' is `observatory`); an override None
        too, but one given empty is refused (site='': no drain would reach its keys)."""
        env = os.environ if environ is None else environ
        fields = dict(
            site=env.get("OBS_SITE") or DEFAULT_SITE,
            redis_url=env.get("OBS_REDIS_URL") or DEFAULT_REDIS_URL,
            main_db_url=env.get("OBS_MAIN_DB_URL") or None,
            replica_db_url=env.get("OBS_REPLICA_DB_URL") or None,
            models=env.get("OBS_MODELS") or DEFAULT_MODELS,
            spool_dir=env.get("OBS_SPOOL_DIR") or None,
        )
        # merged before constructing: a bad OBS_SITE must not refuse a site given instead of it
        return cls(**{**fields, **{k: v for k, v in overrides.items() if v is not None}})

    def require_main(self) -> str:
        if not self.main_db_url:
            raise ConfigError(
                "OBS_MAIN_DB_URL is not set: the drain needs the main database "
                f"(e.g. {stack_env_hint()} for the local stack)"
            )
        return postgresql_url("OBS_MAIN_DB_URL", self.main_db_url)

    def require_replica(self) -> str:
        if not self.replica_db_url:
            raise ConfigError(
                "OBS_REPLICA_DB_URL is not set: replication tracking and smart queries need the "
                f"site's read replica (e.g. {stack_env_hint()} for the local stack)"
            )
        return postgresql_url("OBS_REPLICA_DB_URL", self.replica_db_url)

    def require_redis(self) -> str:
        """The Redis URL if redis-py can read it; otherwise one line naming OBS_REDIS_URL and its
        value, with any password hidden. A database that is not a number is refused too:
        redis-py would quietly use database 0, another site's keys perhaps."""
        from urllib.parse import unquote, urlparse

        from redis.connection import parse_url

        example = "e.g. redis://127.0.0.1:6379/0, or unix:///path/to/redis.sock"
        shown = _without_password(self.redis_url)
        try:
            parse_url(self.redis_url)
            parsed = urlparse(self.redis_url)
        except ValueError as error:
            raise ConfigError(f"OBS_REDIS_URL={shown!r} is not a Redis URL ({error}): {example}") from None
        database = unquote(parsed.path).replace("/", "")
        if parsed.scheme != "unix" and database and not database.isdigit():
            raise ConfigError(f"OBS_REDIS_URL={shown!r} names the database {database!r}: Redis databases are "
                              f"numbers ({example})")
        why = _redis_option_refused(self.redis_url, parsed.scheme)
        if why:
            raise ConfigError(f"OBS_REDIS_URL={shown!r} gives {why} ({example})")
        return self.redis_url


def _redis_option_refused(url: str, scheme: str) -> str | None:
    """What is wrong with an option of a Redis URL that redis-py reads but that fails only as
    each connection opens, naming no setting: a timeout not above 0 ("Timeout value out of
    range", or 0: a socket that never waits), an option its connection does not take (a TLS
    one on redis://, a misspelt one: "unexpected keyword argument"), a value it refuses
    ("Invalid SSL Certificate Requirements Flag"), a client name Redis refuses ("Client names
    cannot contain spaces..."), a health check interval below 0, a TLS file that is not there.
    None if there is none. Makes a connection object, never connects."""
    import math
    import re
    from urllib.parse import parse_qs, urlparse

    import redis

    given = {name: values[0] for name, values in parse_qs(urlparse(url).query).items() if values}
    for name in ("socket_timeout", "socket_connect_timeout"):
        if name in given:
            try:
                seconds = float(given[name])
            except ValueError:
                seconds = math.nan
            if not (math.isfinite(seconds) and seconds > 0):
                return f"{name} {given[name]!r}: give a number of seconds above 0, or leave it out"
    if "health_check_interval" in given:  # (below 0: a CLIENT command Redis refuses, naming no setting)
        try:
            seconds = float(given["health_check_interval"])
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds >= 0):
            return (f"health_check_interval {given['health_check_interval']!r}: give a number of seconds, 0 or more, "
                    "or leave it out")
    for name in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs") if scheme == "rediss" else ():
        path = given.get(name)  # (missing: "Redis unreachable (Error 2 ...)", taken for an outage)
        if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            where = "no file on this machine" if not os.path.exists(path) else "not a file this user can read"
            return f"{name} {path!r}, which is {where}: give the path of one this user can read"
    name = given.get("client_name")
    if name is not None and not all("!" <= c <= "~" for c in name):  # as Redis's CLIENT SETNAME checks it
        return (f"client_name {name!r}, which Redis refuses: a client name is printable ASCII without spaces; "
                "correct it or leave it out")
    try:
        redis.ConnectionPool.from_url(url).make_connection()
    except TypeError as error:  # "__init__() got an unexpected keyword argument 'ssl_cert_reqs'"
        option = re.search(r"argument '(\w+)'", str(error))
        option = option.group(1) if option else str(error)
        if option.startswith("ssl_") and scheme != "rediss":
            return f"{option}, an option of TLS: give rediss:// for a Redis that serves TLS, or leave it out"
        return f"an option redis-py does not know ({option!r}): correct or remove it"
    except (ValueError, redis.RedisError) as error:  # "Invalid SSL Certificate Requirements Flag: bogus"
        return f"an option redis-py refuses ({error}): correct or remove it"
    return None


def refuse_site(site: object) -> None:
    """ConfigError, in one line, for a site name whose keys nothing would drain or that would
    mix with another site's: an empty one (to every CLI and Dagster drain an empty OBS_SITE is
    `observatory`, so keys `site::...` were buffered for ever), whitespace at either end or a
    control character (invisible: a script's site and the drain's differ), letters decomposed
    (NFD, as macOS spells file names: they look like the composed ones), ':', '/', or one
    too long for its spool's file name. Spaces within a name, and glob characters (the code
    never makes a pattern of it: test_smart_query's odd site), are fine."""
    import unicodedata

    if not isinstance(site, str):
        raise ConfigError(f"the site name must be text (OBS_SITE, or site=), not {type(site).__name__}")
    shown = repr(site) if len(site) <= 60 else repr(site[:60]) + f"... ({len(site)} characters)"
    why = None
    if not site:
        why = ("is empty: no drain reads it (an empty OBS_SITE means 'observatory'); give the site's name, "
               "or leave it out to use OBS_SITE")
    elif site != site.strip():
        why = "begins or ends with whitespace: the drain's OBS_SITE would name another site"
    elif any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in site):
        why = "holds a control, format or line-break character (shown escaped): the drain's OBS_SITE would differ"
    elif any(c in _SITE_REFUSED_CHARACTERS for c in site):
        why = "holds " + next(_SITE_REFUSED_CHARACTERS[c] for c in site if c in _SITE_REFUSED_CHARACTERS)
    elif unicodedata.normalize("NFC", site) != site:
        why = (f"is not in Unicode's composed form (NFC): write it {unicodedata.normalize('NFC', site)!r}, "
               "as the drain's OBS_SITE most likely is (the two look alike but name different sites)")
    elif len(site.encode()) > SITE_MAX_BYTES:
        why = (f"is {len(site.encode())} bytes long (UTF-8): at most {SITE_MAX_BYTES}, for its spool's file "
               "name ({site}.refused.jsonl)")
    if why:
        raise ConfigError(f"site name {shown} {why} (OBS_SITE, or site= of TransactionBuffer or the Dagster "
                          "resource)")


def _without_password(url: str) -> str:
    """`url` fit to print: what comes before its host's @ (user and password) and a
    `password=` parameter are replaced by ***."""
    import re

    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return scheme + separator + re.sub(r"(?i)(password=)[^&]*", r"\1***", rest)


def postgresql_url(name: str, url: str) -> str:
    """The URL if SQLAlchemy can read it, it names PostgreSQL through psycopg2, and psycopg2's
    libpq knows its options; otherwise one line naming the variable (never the URL: it may hold
    a password). Main's batches are quoted by psycopg2's mogrify in the dialect's paramstyle and
    the replica's rows read as psycopg2 gives them: another driver (psycopg 3, asyncpg, pg8000)
    failed mid-run on a traceback (`No module named 'psycopg'`, `dict is not a sequence` with a
    batch claimed). The rest said "invalid literal for int() with base 10" or 'invalid dsn:
    invalid connection option "sslmod"', naming no variable, some only once the drain had
    claimed a batch. An option's value libpq judges only as it connects (see
    apply.refused_by_configuration)."""
    import re

    from psycopg2 import ProgrammingError
    from psycopg2.extensions import make_dsn
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # (ValueError: a port that is no number)
        raise ConfigError(f"{name} is not a database URL (e.g. postgresql+psycopg2://user@host:5432/obs)") from None
    backend = parsed.get_backend_name()
    if backend != "postgresql":
        raise ConfigError(f"{name} must name PostgreSQL (postgresql+psycopg2://...), not {backend}")
    driver = parsed.drivername.partition("+")[2]  # none: psycopg2 (Settings says so)
    if driver not in ("", "psycopg2"):
        raise ConfigError(f"{name} names the driver {driver}: obs-pipeline talks to PostgreSQL through psycopg2 "
                          "(postgresql+psycopg2://... or postgresql://...)")
    try:  # the drain's session is libpq's, given these arguments
        make_dsn(**parsed.get_dialect()().create_connect_args(parsed)[1])
    except ProgrammingError as error:  # 'invalid dsn: invalid connection option "sslmod"'
        option = re.search(r'option (".*")', str(error))  # (the rest of libpq's text may quote a password)
        raise ConfigError(f"{name} gives libpq an option it does not know"
                          + (f" ({option.group(1)})" if option else "") + ": correct or remove it") from None
    return url
