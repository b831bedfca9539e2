"""`obs-pipeline bench`: one command, one run, on a local stack that is always downed after.

Order: everything at 0 ms round trip first (ingest, drain, fold, COPY ceiling, baseline,
Dagster burst, long outage), then the same drain / ceiling / baseline behind the latency
proxy at each further round trip. A section that fails is recorded with its error and the
others still run; the exit status is then 1.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from obs_pipeline.bench.context import BenchContext
from obs_pipeline.bench.table import build_rows, chart_points
from obs_pipeline.stack import LocalStack
from obs_pipeline.stop_signals import ignore_stop_signals, stop_on_signals

DEFAULT_BATCH = 2000  # DrainConfig's and the Dagster job's default


@dataclass(frozen=True)
class Sizes:
    ingest_n: int = 5_000
    repeats: int = 3
    drain_n: int = 20_000
    fold_observations: int = 3_000
    rtts_ms: tuple[int, ...] = (50, 250)          # besides 0; the last is the "far" one
    far_n: dict[int, int] = field(default_factory=lambda: {50: 10_000, 250: 50_000})
    fixed_batch_at_far: bool = True               # the far drain again with batches that may not grow
    baseline_n: dict[int, int] = field(default_factory=lambda: {0: 300, 50: 50, 250: 20})
    dagster_n: int = 10_000


FULL = Sizes()
QUICK = Sizes(ingest_n=300, repeats=1, drain_n=1_000, fold_observations=100, rtts_ms=(40,), far_n={40: 1_000},
              fixed_batch_at_far=False, baseline_n={0: 20, 40: 5}, dagster_n=200)


def command_line(args: Any) -> str:
    parts = ["obs-pipeline", "bench", "--out", str(args.out)]
    if args.quick:
        parts.append("--quick")
    if args.dir:
        parts += ["--dir", str(args.dir)]
    for flag, name in (("--batch-size", "batch_size"), ("--backlog", "backlog")):
        if getattr(args, name, None):
            parts += [flag, str(getattr(args, name))]
    for flag, name in (("--profile", "profile"), ("--skip-dagster", "skip_dagster")):
        if getattr(args, name, False):
            parts.append(flag)
    return shlex.join(parts)


def run_bench(args: Any) -> int:
    sizes = QUICK if args.quick else FULL
    batch = getattr(args, "batch_size", None) or DEFAULT_BATCH
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="obs-bench-"))
    stack = LocalStack(Path(args.dir) if args.dir else work / "stack")
    original_latency = stack.status()["proxy"]["latency_ms"] if args.dir else 0
    results: dict[str, Any] = {"command": command_line(args), "quick": bool(args.quick), "batch_size": batch,
                               "sizes": asdict(sizes), "drain": {}, "ceiling": {}, "baseline": {}}
    errors: list[str] = []
    began = time.monotonic()
    print(f"[bench] {results['command']}  (work folder {work})", flush=True)
    stop_on_signals()  # `timeout`, a service manager, a closing terminal: its stack and Dagster stopped, as by Ctrl-C
    try:
        try:
            stack.up(main_latency_ms=0)
            ctx = BenchContext(stack, work, quick=bool(args.quick))
            try:
                results["settle_s"] = ctx.settle()
                results["machine"] = _machine(ctx)
                _measure_all(ctx, sizes, batch, args, results, errors, out)
            finally:
                ctx.close()
        finally:
            ignore_stop_signals()
            try:
                if args.dir and original_latency:
                    stack.up(main_latency_ms=original_latency)
            finally:
                stack.down()
    except KeyboardInterrupt:  # stopped: nothing in it is wanted (a whole stack's data: 160 MB)
        shutil.rmtree(work, ignore_errors=True)
        raise
    except BaseException:
        print(f"[bench] stopped by an error; work folder kept for its logs: {work}", flush=True)
        raise
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    return _report(results, errors, out, work)


def _machine(ctx: BenchContext) -> dict:
    from obs_pipeline.bench.report import machine_facts

    return machine_facts(ctx)


def _section(ctx: BenchContext, errors: list[str], name: str, fn: Callable[[], Any]) -> Any:
    ctx.say(f"{name} ...")
    t0 = time.monotonic()
    try:
        value = fn()
    except Exception as error:  # noqa: BLE001 - one broken section must not lose the others
        traceback.print_exc()
        errors.append(name)
        value = {"error": f"{type(error).__name__}: {error}"}
    ctx.say(f"{name} done in {time.monotonic() - t0:.1f} s")
    return value


def _measure_all(ctx: BenchContext, sizes: Sizes, batch: int, args: Any, results: dict, errors: list[str],
                 out: Path) -> None:
    from obs_pipeline.bench import phases
    from obs_pipeline.bench.ceiling import measure_ceiling
    from obs_pipeline.bench.dagster_burst import measure_dagster_burst
    from obs_pipeline.bench.outage import measure_outage

    profile = ctx.work_dir / "drain.prof" if getattr(args, "profile", False) else None
    results["ingest"] = _section(ctx, errors, "ingest", lambda: phases.ingest_phase(ctx, sizes.ingest_n, sizes.repeats))
    results["ingest_fsync_always"] = _section(ctx, errors, "ingest with appendfsync always", lambda: (
        phases.ingest_fsync_always_phase(ctx, sizes.ingest_n)))
    results["drain"]["0"] = _section(ctx, errors, "drain at 0 ms", lambda: phases.drain_phase(
        ctx, sizes.drain_n, batch, sizes.repeats, "drain0", profile=profile))
    if profile and profile.exists():
        phases.profile_summary(profile, out / "drain_profile_0ms.txt")
    results["fold"] = _section(ctx, errors, "fold", lambda: phases.fold_phase(ctx, sizes.fold_observations, batch))
    main_url = ctx.stack.env()["OBS_MAIN_DB_URL"]
    results["ceiling"]["0"] = _section(ctx, errors, "COPY ceiling at 0 ms", lambda: measure_ceiling(
        ctx, main_url, sizes.drain_n, sizes.repeats))
    results["baseline"]["0"] = _section(ctx, errors, "seed 000 loop at 0 ms", lambda: phases.baseline_phase(
        ctx, sizes.baseline_n[0]))
    if not getattr(args, "skip_dagster", False):
        results["dagster_burst"] = _section(ctx, errors, "Dagster burst", lambda: measure_dagster_burst(
            ctx, sizes.dagster_n))
    if getattr(args, "backlog", 0):
        results["outage"] = _section(ctx, errors, f"long outage ({args.backlog:,})", lambda: measure_outage(
            ctx, args.backlog, batch))
    for rtt in sizes.rtts_ms:
        ctx.set_rtt(rtt)
        key = str(rtt)
        far_profile = ctx.work_dir / f"drain_{rtt}.prof" if profile and rtt == sizes.rtts_ms[-1] else None
        results["drain"][key] = _section(ctx, errors, f"drain at {rtt} ms", lambda: phases.drain_phase(
            ctx, sizes.far_n[rtt], batch, 1, f"drain{rtt}", profile=far_profile, later_run=True))
        if far_profile and far_profile.exists():
            phases.profile_summary(far_profile, out / f"drain_profile_{rtt}ms.txt")
        if rtt == sizes.rtts_ms[-1] and sizes.fixed_batch_at_far:
            results["drain"][f"{key}_fixed_batch"] = _section(
                ctx, errors, f"drain at {rtt} ms, batch fixed at {batch}", lambda: phases.drain_phase(
                    ctx, sizes.far_n[rtt], batch, 1, f"drain{rtt}f", max_batch_size=batch))
        results["ceiling"][key] = _section(ctx, errors, f"COPY ceiling at {rtt} ms", lambda: measure_ceiling(
            ctx, ctx.stack.env()["OBS_MAIN_DB_URL"], sizes.far_n[rtt], 1))
        results["baseline"][key] = _section(ctx, errors, f"seed 000 loop at {rtt} ms", lambda: phases.baseline_phase(
            ctx, sizes.baseline_n[rtt]))
    results["far_rtt_ms"] = sizes.rtts_ms[-1]


def _report(results: dict, errors: list[str], out: Path, work: Path) -> int:
    from obs_pipeline.bench.report import memory_chart, render_table, throughput_chart, write_json

    rows, comparison = build_rows(results)
    results["comparison"] = comparison
    results["table"] = rows
    results["errors"] = errors
    table = render_table(rows, results.get("machine", {}), results["command"]) if "machine" in results else ""
    points, notes = chart_points(results)
    machine = results.get("machine", {})
    title = (f"obs-pipeline drain vs seed 000's loop: seed example transaction (4 rows), batch "
             f"{results['batch_size']}\n{machine.get('nproc')} cores, {machine.get('cpu_model', '')}")
    throughput_chart(out / "throughput_vs_rtt.png", points, title, notes)
    outage = results.get("outage") or {}
    if outage.get("samples_t_rss_redis_mb"):
        memory_chart(out / "backlog_memory.png", outage["samples_t_rss_redis_mb"],
                     f"long outage: draining a backlog of {outage['backlog']:,} transactions")
    write_json(out / "results.json", results)
    (out / "table.txt").write_text(table + "\n")
    print("\n" + table + "\n", flush=True)
    print(f"[bench] {results['elapsed_s']} s; wrote {out / 'results.json'}, {out / 'throughput_vs_rtt.png'}", flush=True)
    if errors:
        print(f"[bench] sections that failed: {', '.join(errors)}; work folder kept: {work}", flush=True)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0
