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
from pathlib import Path
from typing import Any, Callable

DEFAULT_STACK_DIR = ".obs-stack"


def _stack(args: argparse.Namespace):
    from obs_pipeline.stack import LocalStack

    return LocalStack(Path(args.dir or os.environ.get("OBS_STACK_DIR") or DEFAULT_STACK_DIR),
                      redis_appendfsync=getattr(args, "redis_appendfsync", None))


def _settings(**overrides: Any):
    from obs_pipeline.config import Settings

    return Settings.from_env(**overrides)


# --- stack ----------------------------------------------------------------------------------

def cmd_stack(args: argparse.Namespace) -> int:
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
            stack.stop_service(args.service, mode=args.mode)
        else:
            stack.start_service(args.service)
    elif args.action == "env":
        env = dict(stack.env())
        stopped = [name for name, s in stack.status().items()
                   if not s["running"] and (name != "proxy" or s["latency_ms"])]
        if stopped:  # the lines still print (for a shell's profile), but what uses them would fail or spool
            print(f"obs-pipeline: note: {', '.join(stopped)} of the local stack in {stack.directory} not running: "
                  f"`obs-pipeline stack up --dir {shlex.quote(str(stack.directory))}`", file=sys.stderr)
        env.setdefault("OBS_SITE", os.environ.get("OBS_SITE", "observatory"))
        env.setdefault("OBS_MODELS", os.environ.get("OBS_MODELS", "obs_pipeline.models:Base"))
        for name, value in env.items():
            print(f"export {name}={value}")
    return 0


# --- db ---------------------------------------------------------------------------------------

def cmd_db_init(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from obs_pipeline.apply import make_engine
    from obs_pipeline.model_registry import ModelRegistry
    from obs_pipeline.schema import create_schema

    settings = _settings()
    registry = ModelRegistry.from_path(settings.models)
    engine = make_engine(settings.require_main())
    try:
        try:
            engine.connect().close()
        except sa.exc.OperationalError as error:  # the one line must say which server and what to do
            raise RuntimeError(f"main unreachable ({_one_line(error)}); is OBS_MAIN_DB_URL right and the stack "
                               "up (`obs-pipeline stack status`)?") from error
        create_schema(engine, registry)
        if args.demo_data:
            with engine.begin() as conn:
                conn.execute(sa.text(
                    "INSERT INTO obs_unit (id, name) SELECT n, 'obs unit ' || n FROM generate_series(1, 200) n "
                    "ON CONFLICT (id) DO NOTHING"))
    finally:
        engine.dispose()
    print(f"schema ready on main ({len(registry.models)} models)" + (", demo obs units 1-200" if args.demo_data else ""),
          file=sys.stderr)
    for name, why in sorted(registry.refused.items()):  # told now, not at the first write
        print(f"model {name!r} cannot be written through obs-pipeline: {why}", file=sys.stderr)
    return 0


# --- drain ----------------------------------------------------------------------------------

def cmd_drain(args: argparse.Namespace) -> int:
    from obs_pipeline.drain import BACKGROUND_NICENESS, Drain, DrainConfig

    settings = _settings()
    settings.require_redis()
    try:
        config = DrainConfig(batch_size=args.batch_size, max_batch_size=args.max_batch_size,
                             lease_ttl_s=args.lease_ttl, replication_timeout_s=args.replication_timeout,
                             niceness=BACKGROUND_NICENESS,
                             aof_check_s=None if args.no_aof_compaction else DrainConfig.aof_check_s)
    except ValueError as error:
        args.usage(str(error))
    drain = Drain(settings, config)

    def on_batch(report) -> None:
        print(json.dumps({k: v for k, v in report.metadata().items()}), flush=True)

    # A service manager stops a drain with SIGTERM: finish the batch in hand, release the lease
    # (the next drain need not wait it out) and exit 0. Ctrl-C stops at once, as before. (Only
    # the main thread may take signals: called from another, the caller's handlers stay.)
    stop = threading.Event()
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set()) if on_main_thread else None
    try:
        summary = drain.run(until_empty=args.once, lease_wait_s=args.lease_ttl if args.once else 0.0,
                            replica_patience_s=args.replication_timeout, should_stop=stop.is_set,
                            on_batch=on_batch if args.verbose else None)
    except KeyboardInterrupt:
        print("obs-pipeline: interrupted; a batch it had claimed stays in processing for the next drain",
              file=sys.stderr)
        return 130
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
        drain.close()
    print(f"drained {summary.applied} transactions in {summary.batches} batches, "
          f"{summary.dead_lettered} dead-lettered ({summary.stopped_because})", file=sys.stderr)
    return 0


# --- status ---------------------------------------------------------------------------------

# `status --check` exits by the site's health: 0 healthy, 3 degraded (an operator should look:
# dead letters, an old backlog, a full Redis, a local spool), 4 unhealthy (main or the replica does
# not answer); `status` exits 0 once it printed the report. 1 is any error that left no report
# (Redis down), 2 a usage error, as for every command.
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
        try:
            pending = spool.pending()
        except OSError as unreadable:
            raise RuntimeError(f"{_one_line(error)}; and {spool_unreadable(spool, unreadable)}") from error
        if not pending:
            raise
        raise RuntimeError(f"{_one_line(error)} ({pending} transaction(s) wait in the local spool {spool.path})") \
            from error
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        buf, proc, lag = report["transaction_buffer"], report["background_processor"], report["replication_lag"]
        print(f"site {report['site']}: {report['status']}" + (f" ({'; '.join(report['problems'])})"
                                                               if report["problems"] else ""))
        print(f"  buffer {buf['size']}, processing {buf['processing']}, retrying {buf['retrying']}, "
              f"failed {buf['failed']}, oldest pending {_age(buf['oldest_pending_seconds'])}")
        print(f"  drain {proc['status']}, last run {proc['last_run'] or 'never'}, processed {proc['transactions_processed']}")
        print(f"  replication lag {_age(lag.get('seconds'))}, {lag.get('bytes', 'unknown')} bytes "
              f"(main {lag.get('main_lsn') or 'none'}, replica {lag.get('replica_lsn') or 'none'}, "
              f"{lag.get('awaiting_batches')} batches awaiting)")
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
    import redis

    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.spool import Spool

    settings = _settings()
    client = redis.Redis.from_url(settings.require_redis(), socket_timeout=5, socket_connect_timeout=5)
    spool = Spool(settings.spool_dir, settings.site, flush_store=BufferStore(client, settings.site))
    try:
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
        print(f"pushed {pushed} spooled transaction(s) to Redis, in order; the spool of site {settings.site} is empty",
              file=sys.stderr)
        return 0
    finally:
        client.close()


# --- failed ---------------------------------------------------------------------------------

def cmd_failed(args: argparse.Namespace) -> int:
    import redis

    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.dead_letters import DeadLetters
    from obs_pipeline.model_registry import ModelRegistry
    from obs_pipeline.wire import one_line

    settings = _settings()
    client = redis.Redis.from_url(settings.require_redis(), socket_timeout=5)
    letters = DeadLetters(BufferStore(client, settings.site), ModelRegistry.from_path(settings.models))
    if args.action == "list":  # an entry without a usable id is named by its place: #N
        if args.id or args.all:  # (an id was ignored: the whole list printed, as if it were that letter)
            args.usage("`failed list` lists them all: `failed show ID` shows one")
        listed = letters.list()
        ids = {letter.transaction_id for letter in listed}
        for place, letter in enumerate(listed, start=1):
            s = letter.summary()
            blocker = s["reason"].removeprefix("blocked by ") if s["reason"].startswith("blocked by ") else None
            hint = (f" ({blocker} is no longer dead-lettered: retry or discard this one)"
                    if blocker is not None and blocker not in ids else "")
            # one line each, printable: the fields are a producer's text
            print("\t".join(one_line(field) for field in (s["transaction_id"] or f"#{place}", s["endpoint"], s["kind"],
                                                          s["reason"] + hint)))
    elif args.action == "show":
        print(json.dumps(letters.get(_one_id(args)).doc, indent=2))
    elif args.action == "retry":
        if args.all == bool(args.id):
            args.usage("give one transaction id or --all")
        listed = {letter.transaction_id for letter in letters.list()}
        ids = letters.retry(None if args.all else [args.id])
        renamed = [tx_id for tx_id in ids if tx_id not in listed]  # (dead_letters: a reused id)
        print(f"requeued {len(ids)} transaction(s)" + (f"; under new ids, as a producer had reused theirs: "
                                                       f"{', '.join(renamed)}" if renamed else ""), file=sys.stderr)
    elif args.action == "discard":
        ref = _one_id(args)
        removed = letters.discard(ref)  # said, as retry says what it requeued (it was silent)
        print(f"discarded {ref}" + (f" ({removed} letters: copies of one push)" if removed > 1 else ""),
              file=sys.stderr)
    return 0


def _one_id(args: argparse.Namespace) -> str:
    if not args.id or args.all:  # (--all was ignored: `discard ID --all` acted on one letter)
        args.usage(f"`failed {args.action}` takes one transaction id")
    return args.id


# --- simulate / dev ---------------------------------------------------------------------------

def cmd_simulate(args: argparse.Namespace) -> int:
    from obs_pipeline.ingest import TransactionBuffer
    from obs_pipeline.simulate import SimulationResult, simulate

    settings = _settings()
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

def _port(text: str) -> int:
    """A TCP port a server can listen on: 0 would give it a random one, not the address printed."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: give a whole number from 1 to 65535") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {port}: give a whole number from 1 to 65535")
    return port


def _whole(least: int, what: str) -> Callable[[str], int]:
    """A whole number of at least `least` (--count -1 buffered nothing and exited 0; --files -1
    said only that a bulk_create needs a list of rows)."""
    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            number = least - 1
        if number < least:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}: give {what}, a whole number of {least} or more")
        return number
    return parse


def _above_0(what: str, give: str) -> Callable[[str], float]:
    """A finite number above 0: a rate (inf and nan broke the pacing after the first observation
    was buffered; 0 and below buffered flat out), a duration (-1 buffered nothing and exited 0)."""
    def parse(text: str) -> float:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not (0 < number < math.inf):
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: give {give}")
        return number
    return parse


_rate = _above_0("rate", "observations per second, a finite number above 0 (e.g. 0.2 or 50)")
_seconds = _above_0("duration", "seconds, a finite number above 0")


def _latency_ms(text: str) -> int:
    """--main-latency-ms, refused as a usage error (5001 exited 1, "abc" 2)."""
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
    parser = _Parser(prog="obs-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    stack = sub.add_parser("stack", help="local PostgreSQL main + streaming replica + Redis")
    stack.add_argument("action", choices=["up", "down", "status", "env", "stop", "start"])
    stack.add_argument("service", nargs="?", choices=["main", "replica", "redis", "proxy"],
                       help="for stop/start: one service (fault drills)")
    stack.add_argument("--redis-appendfsync", choices=["everysec", "always"], default=None,
                       help="Redis AOF fsync policy (default everysec; always: no buffered write lost on power loss)")
    stack.add_argument("--mode", default="fast", choices=["fast", "immediate", "kill"], help="for stop")
    stack.add_argument("--dir", help=f"state folder (default $OBS_STACK_DIR or ./{DEFAULT_STACK_DIR})")
    stack.add_argument("--main-latency-ms", type=_latency_ms, default=None,
                       help="put main behind a proxy delaying each direction by N ms (0 removes it)")
    stack.set_defaults(func=cmd_stack)

    db = sub.add_parser("db", help="schema on main")
    db.add_argument("action", choices=["init"])
    db.add_argument("--demo-data", action="store_true", help="also insert obs units 1-200")
    db.set_defaults(func=cmd_db_init)

    dev = sub.add_parser("dev", help="stack up, db init, Dagster webserver + daemon with the sensor on")
    dev.add_argument("--dir")
    dev.add_argument("--port", type=_port, default=3000)
    dev.add_argument("--simulate", action="store_true", help="also run `obs-pipeline simulate`")
    dev.add_argument("--rate", type=_rate, default=1.0, help="observations per second for --simulate")
    dev.add_argument("--main-latency-ms", type=_latency_ms, default=None)
    dev.set_defaults(func=cmd_dev)

    drain = sub.add_parser("drain", help="drain the buffer into main (what the Dagster job runs)")
    drain.add_argument("--once", action="store_true",
                       help="return when the buffer is empty and replicated (or the replica has replayed "
                            "nothing for --replication-timeout: a later drain cleans those caches)")
    drain.add_argument("--batch-size", type=int, default=2000, help="transactions per batch (default 2000)")
    drain.add_argument("--max-batch-size", type=int, default=None,
                       help="where main is far, batches grow up to this (default 10000, or --batch-size if larger)")
    drain.add_argument("--lease-ttl", type=float, default=60.0)
    drain.add_argument("--replication-timeout", type=float, default=10.0)
    drain.add_argument("--no-aof-compaction", action="store_true",
                       help="never ask Redis to rewrite its AOF when idle (leave it to Redis's own schedule)")
    drain.set_defaults(func=cmd_drain)

    status = sub.add_parser("status", help="health report")
    status.add_argument("--json", action="store_true")
    status.add_argument("--check", action="store_true",
                        help="exit 3 for a degraded site, 4 for an unhealthy one (for a monitoring check)")
    status.set_defaults(func=cmd_status)

    spool = sub.add_parser("spool", help="what scripts on this host spooled while Redis could not take it")
    spool.add_argument("action", nargs="?", default="show", choices=["show", "push"],
                       help="show (default): the spool file, how many wait, the oldest one's age; "
                            "push: push them to Redis in order")
    spool.set_defaults(func=cmd_spool)

    failed = sub.add_parser("failed", help="the dead-letter list")
    failed.add_argument("action", choices=["list", "show", "retry", "discard"])
    failed.add_argument("id", nargs="?", help="a transaction id, or #N from `failed list` for an entry without one")
    failed.add_argument("--all", action="store_true")
    failed.set_defaults(func=cmd_failed)

    sim = sub.add_parser("simulate", help="an observing script buffering observations")
    sim.add_argument("--rate", type=_rate, default=1.0, help="observations per second")
    sim.add_argument("--count", type=_whole(1, "observations"), default=None)
    sim.add_argument("--duration", type=_seconds, default=None, help="seconds")
    sim.add_argument("--files", type=_whole(1, "files per observation"), default=3, help="files per observation")
    sim.add_argument("--seed", type=int, default=None)
    sim.set_defaults(func=cmd_simulate)

    bench = sub.add_parser("bench", help="benchmarks on the local stack")
    bench.add_argument("--dir", help="stack folder for the benchmark (default: a fresh temporary one)")
    bench.add_argument("--out", default="bench-results", help="folder for results.json and the chart")
    bench.add_argument("--quick", action="store_true", help="a small smoke run (about a minute, for the test suite)")
    bench.add_argument("--batch-size", type=int, default=None, help="drain batch size (default 2000, the drain's)")
    bench.add_argument("--backlog", type=int, default=0, metavar="N",
                       help="also the long-outage mode: buffer N transactions with nothing draining, then drain")
    bench.add_argument("--profile", action="store_true",
                       help="cProfile one extra drain run at 0 ms and at the far round trip (not counted); "
                            "top functions in <out>/drain_profile_<rtt>ms.txt")
    bench.add_argument("--skip-dagster", action="store_true", help="skip the burst through the Dagster daemon")
    bench.set_defaults(func=cmd_bench)
    for command in sub.choices.values():  # also after the command, where one adds it to a line that failed
        command.set_defaults(usage=command.error)  # for checks made after parsing: one line, exit 2
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="on error, the traceback instead of one line")
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
    from obs_pipeline.buffer_store import redis_trouble

    trouble = redis_trouble(error)
    if trouble:
        return trouble
    text = str(getattr(error, "orig", None) or error).strip().splitlines()
    return text[0] if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
