"""`obs-pipeline`: the local stack, the schema, the drain, health, dead letters, the simulator.

Exit status 0 on success; otherwise one line on stderr saying what to do.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

from obs_pipeline.config import DAY_S

DEFAULT_STACK_DIR = ".obs-stack"


def _stack(args: argparse.Namespace):
    from obs_pipeline.stack import LocalStack

    return LocalStack(Path(args.dir or os.environ.get("OBS_STACK_DIR") or DEFAULT_STACK_DIR),
                      redis_appendfsync=getattr(args, "redis_appendfsync", None))


def _settings(**overrides: Any):
    from obs_pipeline.config import Settings

    return Settings.from_env(**overrides)


# --- stack ----------------------------------------------------------------------------------

STACK_FLAG_ACTIONS = {"main_latency_ms": "up", "redis_appendfsync": "up", "mode": "stop"}


def cmd_stack(args: argparse.Namespace) -> int:
    for name, action in STACK_FLAG_ACTIONS.items():  # they were ignored: `stack start replica
        # --main-latency-ms 100` started it, exit 0, the latency not applied nor said to be
        if getattr(args, name) is not None and args.action != action:
            flag = "--" + name.replace("_", "-")
            args.usage(f"`stack {args.action}` takes no {flag}: it is for `stack {action}`")
    if args.service and args.action not in ("stop", "start"):  # `stack down replica` took the whole stack down
        args.usage(f"`stack {args.action}` acts on the whole stack and takes no service: "
                   f"`stack stop {args.service}` or `stack start {args.service}` act on one")
    stack = _stack(args)
    if args.action in ("status", "down") and not stack.config_path.is_file():
        # a mistyped --dir, or the wrong working folder (./.obs-stack): `status` reported every service
        # down, and `down` said nothing and exited 0, the real stack still up
        from obs_pipeline.stack.errors import StackError

        raise StackError(f"no local stack in {stack.directory}: " + (
            "nothing stopped; give its folder with --dir (or OBS_STACK_DIR)" if args.action == "down" else
            "give its folder with --dir (or OBS_STACK_DIR), or make one with `obs-pipeline stack up --dir "
            f"{shlex.quote(str(stack.directory))}`"))
    if args.action in ("up", "down", "stop", "start"):
        # `timeout` or a service manager (SIGTERM to this process alone), or a closing terminal: as
        # Ctrl-C, the pg tool it runs stopped with it (a pg_basebackup left cloning the replica held
        # its slot on main, and an `up` run again meanwhile failed: the slot "already exists")
        from obs_pipeline.stop_signals import stop_on_signals

        stop_on_signals()
    if args.action == "up":
        stack.up(main_latency_ms=args.main_latency_ms)
        from obs_pipeline.config import own_command

        print(f"local stack up in {stack.directory}; `eval \"$({own_command()} stack env --dir "
              f"{shlex.quote(str(stack.directory))})\"` to use it", file=sys.stderr)
    elif args.action == "down":
        stack.down()
    elif args.action == "status":
        print(json.dumps(stack.status(), indent=2))
    elif args.action in ("stop", "start"):  # fault drills: stop/start one service
        if not args.service:
            args.usage(f"`stack {args.action}` needs a service: main, replica, redis or proxy")
        if args.action == "stop":
            stack.stop_service(args.service, mode=args.mode or "fast")
        else:
            stack.start_service(args.service)
    elif args.action == "env":
        from obs_pipeline.config import DEFAULT_MODELS, DEFAULT_SITE, refuse_site

        # before anything prints: exports of a site every later command refuses (an empty one is
        # `observatory` to them, as to Settings.from_env), or of models every command that loads
        # them refuses (they were printed as given, exit 0)
        refuse_site(os.environ.get("OBS_SITE") or DEFAULT_SITE)
        from obs_pipeline.model_registry import ModelRegistry

        ModelRegistry.from_path(os.environ.get("OBS_MODELS") or DEFAULT_MODELS)
        env = dict(stack.env())
        stopped = [name for name, s in stack.status().items()
                   if not s["running"] and (name != "proxy" or s["latency_ms"])]
        if stopped:  # the lines still print (for a shell's profile), but what uses them would fail or spool
            print(f"obs-pipeline: note: {', '.join(stopped)} of the local stack in {stack.directory} not running: "
                  f"`obs-pipeline stack up --dir {shlex.quote(str(stack.directory))}`", file=sys.stderr)
        # an empty one is the default to every command (Settings.from_env): exported as the
        # default's name, as an unset one is (it printed `export OBS_SITE=''`)
        env.setdefault("OBS_SITE", os.environ.get("OBS_SITE") or DEFAULT_SITE)
        env.setdefault("OBS_MODELS", os.environ.get("OBS_MODELS") or DEFAULT_MODELS)
        for name, value in env.items():
            print(f"export {name}={shlex.quote(value)}")  # for eval: a site name may hold a space
    return 0


# --- db ---------------------------------------------------------------------------------------

def cmd_db_init(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from obs_pipeline.apply import describe, make_engine, refuse_standby
    from obs_pipeline.model_registry import ModelRegistry
    from obs_pipeline.schema import create_schema, has_demo_obs_units

    settings = _settings()
    registry = ModelRegistry.from_path(settings.models)
    if args.demo_data and not has_demo_obs_units(registry):
        # (the schema was made first, then the INSERT failed on 'relation "obs_unit" does not exist')
        raise RuntimeError(f"--demo-data inserts obs units 1-200 into an obs_unit table (id, name), which the models "
                           f"of OBS_MODELS ({settings.models}) do not have: leave --demo-data out; nothing was written")
    engine = make_engine(settings.require_main())
    try:
        try:
            refuse_standby(engine)  # a standby: one line, as the drain's, before anything is written
        except sa.exc.OperationalError as error:  # the one line must say which server and what to do
            raise RuntimeError(f"main unreachable ({_one_line(error)}); is OBS_MAIN_DB_URL right and the stack "
                               "up (`obs-pipeline stack status`)?") from error
        try:
            create_schema(engine, registry)
            if args.demo_data:
                with engine.begin() as conn:
                    conn.execute(sa.text(
                        "INSERT INTO obs_unit (id, name) SELECT n, 'obs unit ' || n FROM generate_series(1, 200) n "
                        "ON CONFLICT (id) DO NOTHING"))
        except sa.exc.ProgrammingError as error:  # PostgreSQL's line named neither the variable nor what to do
            if getattr(error.orig, "pgcode", None) != "42501":  # insufficient_privilege
                raise
            raise RuntimeError(f"main refuses `db init` the role in OBS_MAIN_DB_URL ({describe(error)}): run it as the "
                               "role that owns the tables and may create tables in their schema (the one that made "
                               "them, or postgres)") from error
    finally:
        engine.dispose()
    print(f"schema ready on main ({len(registry.models)} models)" + (", demo obs units 1-200" if args.demo_data else ""),
          file=sys.stderr)
    for name, why in sorted(registry.refused.items()):  # told now, not at the first write
        print(f"model {name!r} cannot be written through obs-pipeline: {why}", file=sys.stderr)
    return 0


# --- drain ----------------------------------------------------------------------------------

# A running `drain` that lost Redis starts a new run after this wait, doubling up to the most.
REDIS_LOST_WAIT_S, REDIS_LOST_WAIT_MAX_S = 1.0, 30.0


def cmd_drain(args: argparse.Namespace) -> int:
    from obs_pipeline.buffer_store import redis_trouble
    from obs_pipeline.drain import BACKGROUND_NICENESS, Drain, DrainConfig, DrainSummary

    if args.max_batch_size is not None and args.max_batch_size < args.batch_size:  # (each alone is checked by its type)
        args.usage(f"argument --max-batch-size: {args.max_batch_size} is below --batch-size {args.batch_size}: "
                   f"give {args.batch_size} or more, or leave it out")
    settings = _settings()
    settings.require_redis()
    try:
        config = DrainConfig(batch_size=args.batch_size, max_batch_size=args.max_batch_size,
                             lease_ttl_s=args.lease_ttl, replication_timeout_s=args.replication_timeout,
                             niceness=BACKGROUND_NICENESS,
                             aof_check_s=None if args.no_aof_compaction else DrainConfig.aof_check_s)
    except ValueError as error:
        args.usage(str(error))
    # its runs, one after another: a run that lost Redis could not release the lease, and the next
    # waited out its TTL; it takes it back now (Drain's owner)
    owner = f"obs-pipeline-drain-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    drain = Drain(settings, config, owner)
    total = DrainSummary()  # of every run: a running drain starts a new one after Redis was lost

    def on_batch(report) -> None:
        total.count(report)
        if args.verbose:
            print(json.dumps({k: v for k, v in report.metadata().items()}), flush=True)

    # A service manager stops a drain with SIGTERM, a closing terminal with SIGHUP (which killed it
    # at once, the lease held for its TTL): finish the batch in hand, release the lease (the next
    # drain need not wait it out) and exit 0. Ctrl-C stops at once, as before. (Only the main
    # thread may take signals: called from another, the caller's handlers stay.)
    stop = threading.Event()
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set())
                for sig in (signal.SIGTERM, signal.SIGHUP)} if on_main_thread else {}
    lease_wait_s, wait_s = (args.lease_ttl if args.once else 0.0), REDIS_LOST_WAIT_S
    try:
        while True:
            try:
                total.stopped_because = drain.run(
                    until_empty=args.once, lease_wait_s=lease_wait_s, replica_patience_s=args.replication_timeout,
                    should_stop=stop.is_set, on_batch=on_batch).stopped_because
                break
            except Exception as error:
                # Redis lost (down, restarting, loading, full): a running drain rides it out as it does
                # main's outages. It exited 1, and a service manager's restart limit could end it for good.
                trouble = redis_trouble(error)
                if args.once or trouble is None:
                    raise
            drain.close()
            print(f"obs-pipeline: {trouble}; the drain starts again in {wait_s:.0f} s", file=sys.stderr, flush=True)
            if stop.wait(wait_s):
                total.stopped_because = "asked to stop"
                break
            # (the lost run's lease, which it could not release, is taken back: another drain may
            # have taken it since it expired, and is waited for)
            lease_wait_s, wait_s = args.lease_ttl, min(wait_s * 2, REDIS_LOST_WAIT_MAX_S)
            drain = Drain(settings, config, owner)
    except KeyboardInterrupt:
        print("obs-pipeline: interrupted; a batch it had claimed stays in processing for the next drain",
              file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        drain.close()
    print(f"{total.drained_line()}, {total.dead_lettered} dead-lettered ({total.stopped_because})", file=sys.stderr)
    return 0


# --- status ---------------------------------------------------------------------------------

# `status --check` exits by the site's health: 0 healthy, 3 degraded (an operator should look:
# dead letters, an old backlog, a full Redis, a local spool), 4 unhealthy (main, the replica or
# Redis does not answer); `status` exits 0 once it printed the report. 1 is any error that left
# no report (Redis down, without --check), 2 a usage error, as for every command.
STATUS_EXIT = {"healthy": 0, "degraded": 3, "unhealthy": 4}


def _age(value: float | None) -> str:
    """An age for the text report: "none" where there is nothing to age (it printed "None s")."""
    return "none" if value is None else f"{value} s"


def cmd_status(args: argparse.Namespace) -> int:
    import redis

    from obs_pipeline.apply import make_engine
    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.health import health_report, spool_unreadable

    from obs_pipeline.spool import Spool

    settings = _settings()
    store = BufferStore(redis.Redis.from_url(settings.require_redis(), socket_timeout=5), settings.site)
    main = make_engine(settings.require_main()) if settings.main_db_url else None
    replica = make_engine(settings.require_replica()) if settings.replica_db_url else None
    spool = Spool(settings.spool_dir, settings.site, flush_store=store)
    try:
        report = health_report(store, main, replica, spool=spool)
    except (redis.ConnectionError, redis.TimeoutError) as error:  # one line, with what waits in this host's spool
        line = _one_line(error)
        unusable = spool.unusable()
        if unusable:  # (Redis down, and scripts cannot spool: it said Redis alone)
            line += f"; and {unusable}"
        else:
            try:
                pending = spool.pending()
            except OSError as unreadable:
                line += f"; and {spool_unreadable(spool, unreadable)}"
            else:
                line += f" ({pending} transaction(s) wait in the local spool {spool.path})" if pending else ""
        if not args.check:  # no report: an error, exit 1
            raise RuntimeError(line) from error
        # for a monitor, the site's worst state: 1 read as a check that could not run
        print(f"obs-pipeline: site {settings.site} is unhealthy: {line}", file=sys.stderr)
        return STATUS_EXIT["unhealthy"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        buf, proc, lag = report["transaction_buffer"], report["background_processor"], report["replication_lag"]
        print(f"site {report['site']}: {report['status']}" + (f" ({'; '.join(report['problems'])})"
                                                               if report["problems"] else ""))
        print(f"  buffer {buf['size']}, processing {buf['processing']}, retrying {buf['retrying']}, "
              f"failed {buf['failed']}, oldest pending {_age(buf['oldest_pending_seconds'])}")
        print(f"  drain {proc['status']}" + (f" ({proc['waiting']})" if proc["waiting"] else "")
              + f", last run {proc['last_run'] or 'never'}, processed {proc['transactions_processed']}")
        if "drain_timeouts" in report:  # main cancelled the drain's statements: one line, what to check
            print(f"  drain timeouts: {report['drain_timeouts']['note']}\n    {report['drain_timeouts']['check']}")
        print(f"  replication lag {_age(lag.get('seconds'))}, {lag.get('bytes', 'unknown')} bytes "
              f"(main {lag.get('main_lsn') or 'none'}, replica {lag.get('replica_lsn') or 'none'}, "
              f"{lag.get('awaiting_batches')} chunks awaiting replay)")
        local = report["local_spool"]
        print(f"  local spool {local['pending']}, oldest {_age(local['oldest_seconds'])} ({local['file']})"
              if not local.get("error") else f"  local spool: {local['error']}")
    code = STATUS_EXIT[report["status"]]
    if code:  # one line on stderr saying why; the exit status says it only when asked (--check)
        print(f"obs-pipeline: site {report['site']} is {report['status']}: {'; '.join(report['problems'])}",
              file=sys.stderr)
    # The report given is a success (exit 0, as every command's): a script that reads it with
    # `set -e` or check=True stopped at every dead letter. A monitoring check asks for 3 and 4.
    return code if args.check else 0


# --- spool ----------------------------------------------------------------------------------

def cmd_spool(args: argparse.Namespace) -> int:
    """What a script spooled on this host while Redis could not take it (OBS_SPOOL_DIR, OBS_SITE):
    `spool` shows it, `spool push` pushes it to Redis in order (a script that ended during an
    outage leaves it behind)."""
    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.config import ConfigError
    from obs_pipeline.health import spool_unreadable
    from obs_pipeline.redis_connections import redis_from_url
    from obs_pipeline.spool import Spool

    settings = _settings()
    client = redis_from_url(settings.require_redis(), socket_timeout=5, socket_connect_timeout=5)  # (see ingest's)
    spool = Spool(settings.spool_dir, settings.site, flush_store=BufferStore(client, settings.site))
    try:
        unusable = spool.unusable()
        if unusable:  # ("[Errno 21] Is a directory", or "0 transaction(s) waiting" from a file for OBS_SPOOL_DIR)
            raise ConfigError(unusable)
        return _spool_action(args, settings, spool)
    except PermissionError as error:  # another user's spool (0600): it said "[Errno 13] Permission denied: ..."
        raise RuntimeError(spool_unreadable(spool, error, "spool" if args.action == "show" else "spool push")) \
            from None
    finally:
        client.close()


def _spool_action(args: argparse.Namespace, settings: Any, spool: Any) -> int:
    """`spool` or `spool push` (cmd_spool) on the site's spool."""
    if args.action == "show":
        summary = spool.summary()
        oldest = summary["oldest_seconds"]
        print(f"{summary['file']}: {summary['pending']} transaction(s) waiting"
              + (f", the oldest {oldest:.0f} s old" if oldest is not None else ""))
        return 0
    try:
        pushed = spool.push()
    except Exception as error:
        left = spool.pending()
        raise RuntimeError(f"{_one_line(error)} ({left} transaction(s) still wait in the spool {spool.path})") \
            from error
    aside = (f"; {spool.set_aside} line(s) Redis could not take moved to the dead-letter list (`obs-pipeline "
             "failed list`)" if spool.set_aside else "")
    dropped = (f"; {spool.dropped} line(s) dropped: copies of transactions an operator discarded (`obs-pipeline "
               "failed discard`)" if spool.dropped else "")  # (counted as pushed, they were not)
    # the file named: run as another user (sudo) or with another OBS_SPOOL_DIR it looked at its own,
    # and "the spool of site S is empty" was said with the scripts' spool still waiting
    print(f"pushed {pushed} spooled transaction(s) to Redis, in order; the spool of site {settings.site} in "
          f"{spool.path} is empty" + aside + dropped, file=sys.stderr)
    return 0


# --- failed ---------------------------------------------------------------------------------

LEFT_NAMED = 10  # letters `failed retry --all` names of those it leaves (a producer's garbage may be thousands)


def cmd_failed(args: argparse.Namespace) -> int:
    import redis

    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.dead_letters import DeadLetters, blocked_by
    from obs_pipeline.model_registry import ModelRegistry
    from obs_pipeline.wire import one_line

    # the line first: a usage error is said before any setting is read or Redis asked
    if args.action == "list" and (args.id or args.all):  # (an id was ignored: the whole list printed)
        args.usage("`failed list` lists them all: `failed show ID` shows one")
    if args.action == "retry" and args.all == bool(args.id):
        args.usage("give one transaction id or --all")
    ref = _one_id(args) if args.action in ("show", "discard") else None
    settings = _settings()
    client = redis.Redis.from_url(settings.require_redis(), socket_timeout=5)
    letters = DeadLetters(BufferStore(client, settings.site), ModelRegistry.from_path(settings.models))
    if args.action == "list":  # an entry without a usable id is named by its place and digest: #N@digest
        # page by page as read, keeping only the ids seen (every letter was held, parsed, first: 1.27 GB for
        # 200,000); a blocker not among them (newer, or gone) is still listed if its status is `failed`
        seen: set[str | None] = set()
        place = 0
        for page in letters.pages():
            seen.update(letter.transaction_id for letter in page)
            blockers = {blocked_by(letter) for letter in page} - seen - {None}
            gone = blockers - letters.dead(blockers)
            for letter in page:
                place += 1
                s = letter.summary()
                blocker = blocked_by(letter)
                hint = f" ({blocker} is no longer dead-lettered: retry or discard this one)" if blocker in gone else ""
                # one line each, printable: the fields are a producer's text
                name = s["transaction_id"] or f"#{place}@{letter.handle}"
                print("\t".join(one_line(field) for field in (name, s["endpoint"], s["kind"], s["reason"] + hint)))
    elif args.action == "show":
        print(json.dumps(letters.get(ref).doc, indent=2))
    elif args.action == "retry":
        ids, left, reused = letters.requeue(None if args.all else [args.id])  # as its own reading found them
        renamed = [one["transaction_id"] for one in reused]
        # (they were left listed unsaid: "requeued 0 transaction(s)", and status still degraded; then
        # counted from a read before the retry's, which a drain dead-lettering in between made wrong;
        # so were the new ids: such a letter, requeued under its own id, was said to be renamed)
        named = [f"{kept['letter']}: {kept['why']}" for kept in left[:LEFT_NAMED]]
        print(f"requeued {len(ids)} transaction(s)" + (f"; under new ids, as a producer had reused theirs: "
                                                       f"{', '.join(renamed)}" if renamed else "")
              + (f"; {len(left)} dead letter(s) stay listed, as they cannot be retried: " + "; ".join(named)
                 if left else "")
              + (f"; and {len(left) - len(named)} more (`obs-pipeline failed list` shows them)"
                 if len(left) > len(named) else ""),
              file=sys.stderr)
    elif args.action == "discard":
        (removed,), blocked = letters.discard([ref])  # said, as retry says what it requeued (it was silent)
        print(f"discarded {ref}" + (f" ({removed} letters: copies of one push)" if removed > 1 else "")
              + _blocked_left(blocked, "it"), file=sys.stderr)
    return 0


def _blocked_left(blocked: list[str], by: str) -> str:
    """What a discard says of the letters blocked by what it dropped: they stay listed (it said
    only `discarded ID`, and they were left there), the first LEFT_NAMED named."""
    if not blocked:
        return ""
    more = len(blocked) - LEFT_NAMED
    return (f"; {len(blocked)} dead letter(s) blocked by {by} stay listed, to retry or discard on their own: "
            + ", ".join(blocked[:LEFT_NAMED])
            + (f"; and {more} more (`obs-pipeline failed list` shows them)" if more > 0 else ""))


def _one_id(args: argparse.Namespace) -> str:
    if not args.id or args.all:  # (--all was ignored: `discard ID --all` acted on one letter)
        args.usage(f"`failed {args.action}` takes one transaction id")
    return args.id


# --- simulate / dev ---------------------------------------------------------------------------

def cmd_simulate(args: argparse.Namespace) -> int:
    from obs_pipeline.ingest import TransactionBuffer
    from obs_pipeline.model_registry import ModelRegistry
    from obs_pipeline.schema import cannot_simulate
    from obs_pipeline.simulate import SimulationResult, simulate

    settings = _settings()
    refusal = cannot_simulate(ModelRegistry.from_path(settings.models), settings.models, "simulate")
    if refusal:  # before anything connects (it failed at the first block: "unknown model 'ExecutedObsUnit'")
        raise RuntimeError(f"{refusal}: unset OBS_MODELS to simulate the built-in models (`obs-pipeline db init "
                           "--demo-data` makes their schema)")
    settings.require_redis()
    settings.require_replica()  # it picks its obs units there (without it: "no ObsUnit rows on the replica")
    buffer = TransactionBuffer.from_env()
    result = SimulationResult()
    try:
        simulate(buffer, rate=args.rate, count=args.count, duration_s=args.duration, files=args.files,
                 seed=args.seed, echo=lambda m: print(m, file=sys.stderr, flush=True), result=result)
    except KeyboardInterrupt:  # (it exited 0 saying nothing: how much was buffered went unsaid)
        print(f"obs-pipeline: stopped by Ctrl-C after buffering {result.observations} observations "
              f"({result.transactions} transactions); the one in progress may be left unfinished", file=sys.stderr)
        return 130
    finally:
        buffer.close()
    print(f"buffered {result.observations} observations ({result.transactions} transactions)", file=sys.stderr)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from obs_pipeline.dev import run_dev

    return run_dev(_stack(args), port=args.port, simulate_rate=args.rate if args.simulate else None,
                   main_latency_ms=args.main_latency_ms)


def cmd_bench(args: argparse.Namespace) -> int:
    from obs_pipeline.bench import run_bench

    return run_bench(args)


# --- parser -----------------------------------------------------------------------------------

# Numeric options are checked where they are parsed: a bad value is one usage line naming the
# option and what it takes (exit 2), before anything starts or any server is asked. Unchecked,
# `drain --replication-timeout inf` waited for the replica for ever, `--rate nan` broke the pacing,
# `--count -1` buffered nothing and exited 0, `--port 0` served on a random port, `bench
# --batch-size 0` quietly benchmarked 2000.

# the files of an observation are one transaction: at most buffer_store.MAX_TRANSACTION_WRITES rows (not
# imported: the parser imports no Redis client); more was refused after its start had been buffered
MAX_FILES = 100_000


def _checked(convert: Callable[[str], Any], allowed: Callable[[Any], bool], give: str) -> Callable[[str], Any]:
    """An argparse type: the text through `convert` (int or float), refused unless `allowed`
    (a comparison, so NaN is refused too), the error saying what to `give`."""
    def parse(text: str):
        try:
            value = convert(text)
        except (ValueError, OverflowError):
            value = None
        if value is None or not allowed(value):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: give {give}")
        return value
    return parse


def _whole(what: str, least: int, most: int | None = None) -> Callable[[str], int]:
    """A whole number of `least` or more (and at most `most`)."""
    if most is None:
        return _checked(int, lambda n: n >= least, f"{what}, a whole number of {least} or more")
    return _checked(int, lambda n: least <= n <= most, f"{what}, a whole number from {least} to {most}")


def _real(what: str, *, above: float | None = None, least: float | None = None,
          most: float = math.inf) -> Callable[[str], float]:
    """A finite number above `above` (or of `least` or more), at most `most`."""
    if most < math.inf:
        give = f"{what}, a number " + (f"above {above:g} and at most {most:g}" if above is not None
                                       else f"from {least:g} to {most:g}")
    else:
        give = f"{what}, a finite number " + (f"above {above:g}" if above is not None else f"of {least:g} or more")
    return _checked(float, lambda x: math.isfinite(x) and x <= most
                    and (x > above if above is not None else x >= least), give)


_port = _whole("a TCP port", 1, 65535)  # 0 would give the server a random one, not the address printed
_rate = _real("observations per second", above=0)
_lease_s = _real("seconds", least=0.001, most=DAY_S)  # SET PX takes whole milliseconds, at least 1
_wait_s = _real("seconds", least=0, most=DAY_S)


def _latency_ms(text: str) -> int:
    """--main-latency-ms, refused as the stack refuses it (checked_latency), as a usage error."""
    from obs_pipeline.stack.local_stack import checked_latency

    try:
        value: int | str = int(text)
    except ValueError:
        value = text  # refused below, quoted as given
    try:
        return checked_latency(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, like every other error (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} -h`)\n")


def build_parser() -> argparse.ArgumentParser:
    """Every option says what it does and its default (a test walks the parser for it); every
    numeric one has a checked type above."""
    parser = _Parser(prog="obs-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="on error, the traceback instead of one line; log at INFO")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:  # the summary also heads its -h
        return sub.add_parser(name, help=summary, description=summary)

    stack_dir = f"the stack's state folder (default $OBS_STACK_DIR, else ./{DEFAULT_STACK_DIR})"
    latency = ("put main behind a proxy delaying each direction by N ms, 0 to 5000 (0 removes it; "
               "saved for later ups; default: as saved, first 0)")

    stack = command("stack", "the local stack: PostgreSQL main + streaming replica + Redis")
    stack.add_argument("action", choices=["up", "down", "status", "env", "stop", "start"],
                       help="up: start it (set it up the first time); down: stop it, data kept; status: JSON of "
                            "its services; env: export lines for it; stop/start: one service (fault drills)")
    stack.add_argument("service", nargs="?", choices=["main", "replica", "redis", "proxy"],
                       help="for stop/start: the one service")
    stack.add_argument("--redis-appendfsync", choices=["everysec", "always"], default=None,
                       help="for up: Redis AOF fsync policy, saved for later ups (default: as saved, first everysec; "
                            "always: no buffered write lost on power loss, each ingest waits for a disk fsync)")
    stack.add_argument("--mode", default=None, choices=["fast", "immediate", "kill"],
                       help="for stop: fast, a clean shutdown (default); immediate or kill, a crash "
                            "(PostgreSQL -m immediate, SIGKILL for Redis and the proxy)")
    stack.add_argument("--dir", help=stack_dir)
    stack.add_argument("--main-latency-ms", type=_latency_ms, default=None, metavar="N", help="for up: " + latency)
    stack.set_defaults(func=cmd_stack)

    db = command("db", "the schema on main")
    db.add_argument("action", choices=["init"],
                    help="init: create the models' tables and obs_pipeline_applied on main (the replica gets them "
                         "by replication); safe to run again, and due after an upgrade")
    db.add_argument("--demo-data", action="store_true", help="also insert obs units 1-200")
    db.set_defaults(func=cmd_db_init)

    dev = command("dev", "stack up, db init, Dagster webserver + daemon with the sensor on; "
                         "Ctrl-C stops what it started")
    dev.add_argument("--dir", help=stack_dir)
    dev.add_argument("--port", type=_port, default=3000, metavar="P",
                     help="the Dagster UI's port on 127.0.0.1, 1 to 65535 (default 3000)")
    dev.add_argument("--simulate", action="store_true", help="also run `obs-pipeline simulate`")
    dev.add_argument("--rate", type=_rate, default=1.0, metavar="R",
                     help="for --simulate: observations per second, above 0 (default 1)")
    dev.add_argument("--main-latency-ms", type=_latency_ms, default=None, metavar="N", help=latency)
    dev.set_defaults(func=cmd_dev)

    drain = command("drain", "drain the buffer into main (what the Dagster job runs); runs until SIGTERM or Ctrl-C")
    drain.add_argument("--once", action="store_true",
                       help="return when the buffer is empty and replicated (or the replica has replayed "
                            "nothing for --replication-timeout: a later drain cleans those caches); waits up to "
                            "--lease-ttl for another drain's lease")
    drain.add_argument("--batch-size", type=_whole("transactions per batch", 1), default=2000, metavar="N",
                       help="transactions per batch, 1 or more (default 2000)")
    drain.add_argument("--max-batch-size", type=_whole("transactions per batch", 1), default=None, metavar="N",
                       help="where main is far, batches grow up to this, at least --batch-size "
                            "(default 10000, or --batch-size if larger)")
    drain.add_argument("--lease-ttl", type=_lease_s, default=60.0, metavar="S",
                       help="seconds the drain's lease outlives a drain that stopped renewing it, "
                            f"0.001 to {DAY_S:g} (default 60)")
    drain.add_argument("--replication-timeout", type=_wait_s, default=10.0, metavar="S",
                       help=f"seconds a batch waits for the replica to replay it, 0 to {DAY_S:g} (default 10); "
                            "later passes retry")
    drain.add_argument("--no-aof-compaction", action="store_true",
                       help="never ask Redis to rewrite its AOF when idle (default: ask, at most every 30 s, once "
                            "the file is 64 MB and 8 times the data)")
    drain.set_defaults(func=cmd_drain)

    status = command("status", "the site's health report; exit 0 once printed (see --check)")
    status.add_argument("--json", action="store_true", help="the report as JSON (default: a few lines of text)")
    status.add_argument("--check", action="store_true",
                        help="exit 3 for a degraded site, 4 for an unhealthy one (for a monitoring check)")
    status.set_defaults(func=cmd_status)

    spool = command("spool", "what scripts on this host spooled while Redis could not take it ($OBS_SPOOL_DIR)")
    spool.add_argument("action", nargs="?", default="show", choices=["show", "push"],
                       help="show (default): the spool file, how many wait, the oldest one's age; "
                            "push: push them to Redis in order")
    spool.set_defaults(func=cmd_spool)

    failed = command("failed", "the dead-letter list")
    failed.add_argument("action", choices=["list", "show", "retry", "discard"],
                        help="list: one line per letter; show ID: one letter's JSON; retry ID or --all: requeue, "
                             "with what it blocked; discard ID: drop it")
    failed.add_argument("id", nargs="?",
                        help="a transaction id, or #N@digest as `failed list` shows an entry without one")
    failed.add_argument("--all", action="store_true", help="for retry: every letter")
    failed.set_defaults(func=cmd_failed)

    sim = command("simulate", "an observing script buffering observations; without --count or --duration it runs "
                              "until Ctrl-C")
    sim.add_argument("--rate", type=_rate, default=1.0, metavar="R",
                     help="observations per second, above 0 (default 1)")
    sim.add_argument("--count", type=_whole("observations", 1), default=None, metavar="N",
                     help="stop after N observations, 1 or more (default: no limit)")
    sim.add_argument("--duration", type=_real("seconds", above=0), default=None, metavar="S",
                     help="stop after S seconds, above 0 (default: no limit)")
    sim.add_argument("--files", type=_whole("files per observation", 1, MAX_FILES), default=3, metavar="F",
                     help=f"files per observation, 1 to {MAX_FILES} (default 3)")
    sim.add_argument("--seed", type=int, default=None, metavar="S",
                     help="seed of the random choices, any whole number, to repeat a run (default: a new one each run)")
    sim.set_defaults(func=cmd_simulate)

    bench = command("bench", "benchmarks on a local stack (see README, Performance)")
    bench.add_argument("--dir", help="stack folder for the benchmark, taken down at the end, its model tables "
                                     "emptied: not a stack whose data you keep (default: a fresh temporary one)")
    bench.add_argument("--out", default="bench-results", metavar="DIR",
                       help="folder for results.json and the chart (default ./bench-results)")
    bench.add_argument("--quick", action="store_true", help="a small smoke run (about a minute, for the test suite)")
    bench.add_argument("--batch-size", type=_whole("transactions per batch", 1), default=None, metavar="N",
                       help="drain batch size, 1 or more (default 2000, the drain's)")
    bench.add_argument("--backlog", type=_whole("transactions", 0), default=0, metavar="N",
                       help="also the long-outage mode: buffer N transactions with nothing draining, then drain "
                            "(default 0: not run)")
    bench.add_argument("--profile", action="store_true",
                       help="cProfile one extra drain run at 0 ms and at the far round trip (not counted); "
                            "top functions in <out>/drain_profile_<rtt>ms.txt")
    bench.add_argument("--skip-dagster", action="store_true", help="skip the burst through the Dagster daemon")
    bench.set_defaults(func=cmd_bench)
    for command_parser in sub.choices.values():  # also after the command, where one adds it to a line that failed
        command_parser.set_defaults(usage=command_parser.error)  # for checks made after parsing: one line, exit 2
        command_parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                    help="on error, the traceback instead of one line; log at INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    # A terminal that is not UTF-8 (PYTHONIOENCODING=ascii, a Latin-1 locale): a producer's text it
    # cannot show is escaped, as stderr's is; `failed list` stopped at the first such letter with
    # "'ascii' codec can't encode character", the letters after it unseen
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `obs-pipeline failed list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush of stdout would fail)
        return 141  # as a shell reports a tool that SIGPIPE stopped
    except SystemExit:
        raise
    except Exception as error:  # one line for the operator; -v for the traceback
        if args.verbose:
            raise
        print(f"obs-pipeline: error: {_one_line(error)}", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    if isinstance(error, ImportError):  # every dependency is required: one missing, or not loading (a compiled
        # one after the venv's Python changed), is the installation's; importing it again here to word the error
        # (buffer_store's hiredis, redis) printed two tracebacks
        return (f"{_first_line(error)}: a package obs-pipeline needs is missing or does not load in this Python "
                f"({sys.executable}): reinstall obs-pipeline and its dependencies there")
    import redis

    from obs_pipeline.buffer_store import redis_trouble

    trouble = redis_trouble(error)
    if trouble:
        return trouble
    if isinstance(error, redis.exceptions.NoPermissionError):  # (Redis's line named neither Redis nor the setting)
        return (f"Redis refuses the user of OBS_REDIS_URL a command obs-pipeline needs ({_first_line(error)}): "
                "give that user read and write on the site's keys and scripting (ACL SETUSER), or give OBS_REDIS_URL "
                "a user that has them")
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip().splitlines()
    return text[0] if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
