"""From results to table rows, comparisons and chart points (targets beside the figures)."""

from __future__ import annotations

from typing import Any

from obs_pipeline.bench.report import row


def _ok(section: Any) -> bool:
    return isinstance(section, dict) and "error" not in section


def _ge(value: Any, target: float) -> bool | None:
    return None if value is None else value >= target


def _batches(drain: dict) -> str:
    """"batch 2000", "batch fixed at 2000", or "batches 2000 growing to 10000" as claimed."""
    least, largest = drain["batch_size"], drain.get("largest_batch_claimed", drain["batch_size"])
    if drain.get("max_batch_size") == least:
        return f"batch fixed at {least}"
    if drain.get("first_run"):  # the site's second run: its first claims sized by the first's link
        return f"batches sized by the last run, up to {largest}"
    return f"batches {least} growing to {largest}" if largest > least else f"batch {least}"


def _split(drain: dict) -> str:
    """Where a drain run's time went: apply_batch on main; claim, mark, holders, acknowledge and
    clean on Redis; polling the replica; the rest is the drain's own Python (parse, validate, JSON)."""
    spent = drain["time_split_s"]
    main, wait = spent.get("apply_batch", 0.0), spent.get("wait_for_replay", 0.0)
    redis = sum(v for k, v in spent.items() if k not in ("apply_batch", "wait_for_replay"))
    rest = drain["elapsed_s"] - main - wait - redis
    return " / ".join(f"{v:.2f}" for v in (main, redis, wait, rest, drain["elapsed_s"]))


def _cpu_rows(label: str, cpu: dict) -> list[dict]:
    """Where the cores went during a drain run: CPU per transaction of each process, and the machine."""
    us = cpu["us_per_tx"]
    names = [n for n in ("drain", "redis", "main", "replica", "proxy") if us.get(n) is not None]
    return [row(label, f"CPU per transaction: {' / '.join(names)} / sum",
                " / ".join(f"{us[n]:.0f}" for n in names) + f" / {cpu['us_per_tx_all']:.0f} us", ""),
            row(label, f"cores busy / stolen by the host (of {cpu['cores']})",
                f"{cpu['machine_busy_cores']:.2f} / {cpu['machine_steal_cores']:.2f}", "")]


def _main_cpu_rows(label: str, ceiling: dict, drain: dict | None) -> list[dict]:
    """Main's CPU per transaction under COPY and under the drain: what main pays for the same rows."""
    copy_us = (ceiling.get("cpu") or {}).get("us_per_tx", {}).get("main")
    drain_us = ((drain or {}).get("cpu") or {}).get("us_per_tx", {}).get("main") if _ok(drain) else None
    if copy_us is None:
        return []
    drain_text = "-" if drain_us is None else f"{drain_us:.0f}"
    return [row(label, "main's CPU per transaction: COPY / drain", f"{copy_us:.0f} / {drain_text} us", "")]


def build_rows(results: dict) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    comparison: dict[str, dict] = {}
    far = str(results.get("far_rtt_ms", 250))
    far_is_250 = far == "250"
    ingest = results.get("ingest")
    if _ok(ingest):
        rows += [row("ingest", "latency p50", ingest["p50_ms"], "ms"),
                 row("ingest", "latency p99", ingest["p99_ms"], "ms", "<= 1 ms", ingest["p99_ms"] <= 1.0),
                 row("ingest", "throughput, one process, one thread", ingest["throughput_tx_s"], "tx/s", ">= 5,000",
                     _ge(ingest["throughput_tx_s"], 5000))]
        threaded = ingest.get("threaded")
        if threaded:
            label = f"ingest, one process, {threaded['threads']} threads"
            rows += [row(label, "throughput", threaded["throughput_tx_s"], "tx/s", ">= 5,000",
                         _ge(threaded["throughput_tx_s"], 5000)),
                     row(label, "latency p50 / p99 per transaction",
                         f"{threaded['p50_ms']:.2f} / {threaded['p99_ms']:.2f} ms", "")]
    always = results.get("ingest_fsync_always")
    if _ok(always):
        rows += [row("ingest, appendfsync always", "latency p50", always["p50_ms"], "ms"),
                 row("ingest, appendfsync always", "latency p99", always["p99_ms"], "ms"),
                 row("ingest, appendfsync always", "throughput, one process", always["throughput_tx_s"], "tx/s")]
    for key, drain in results.get("drain", {}).items():
        if not _ok(drain):
            continue
        rtt = key.split("_")[0]
        way = "no proxy" if rtt == "0" else f"proxy {int(rtt) / 2:g} ms each way"
        label = f"drain @{rtt} ms RTT ({way}), {_batches(drain)}"
        target, met = "", None
        if key == "0":
            target, met = ">= 5,000", _ge(drain["tx_per_s"], 5000)
        elif rtt == far and far_is_250:
            target, met = ">= 1,000", _ge(drain["tx_per_s"], 1000)
        first = drain.get("first_run")
        rows += [row(label, f"transactions/s (n={drain['transactions']:,}"
                            + (f", median of {drain['repeats']})" if drain.get("repeats", 1) > 1 else ")")
                            + (", the site's second run" if first else ""),
                     drain["tx_per_s"], "tx/s", target, met)]
        if first:
            rows.append(row(label, f"transactions/s of the site's first run (batches {drain['batch_size']} "
                                   f"growing to {first['largest_batch_claimed']}, {first['batches']} batches)",
                            first["tx_per_s"], "tx/s"))
        rows += [
                 row(label, "rows/s", drain["rows_per_s"], "rows/s"),
                 row(label, "round trips to main per batch (median / max)",
                     f"{drain['round_trips_per_batch_median']:g} / {drain['round_trips_per_batch_max']}",
                     target="constant in batch size"),
                 row(label, "time: main / Redis / replica wait / rest / total", _split(drain), "s"),
                 row(label, "peak RSS of the drain process (VmHWM)", drain["peak_rss_mb"], "MiB")]
        if drain.get("main_round_trip_ms") is not None:
            rows.append(row(label, "main's round trip as the drain measured it (least of 1-3 catalog queries at connect)",
                            drain["main_round_trip_ms"], "ms"))
        if drain.get("cpu"):
            rows += _cpu_rows(label, drain["cpu"])
        if not drain["complete"]:
            rows.append(row(label, "all rows on main and replicated", False))
    drain0 = results.get("drain", {}).get("0")
    if _ok(drain0):
        rows.append(row("redis", "INFO used_memory delta / N, per buffered tx", drain0["redis_bytes_per_tx"], "bytes"))
        rows.append(row("redis", "queue entry (transaction JSON)", drain0["queue_entry_bytes"], "bytes"))
    fold = results.get("fold")
    if _ok(fold):
        rows += [row("fold (start+files+finish)", "fold ratio writes before/after", fold["fold_ratio"], "x",
                     "> 1"), row("fold (start+files+finish)", "transactions/s @0 ms", fold["tx_per_s"], "tx/s")]
    for key, ceiling in results.get("ceiling", {}).items():
        if not _ok(ceiling):
            continue
        drain = results.get("drain", {}).get(key)
        fraction = drain["rows_per_s"] / ceiling["rows_per_s"] if _ok(drain) else None
        comparison.setdefault(key, {})["fraction_of_copy"] = fraction
        label = f"COPY ceiling @{key} ms"
        rows += [row(label, "rows/s, one transaction (same rows)", ceiling["rows_per_s"], "rows/s"),
                 row(label, "= transactions/s equivalent", ceiling["tx_equivalent_per_s"], "tx/s"),
                 *_main_cpu_rows(label, ceiling, drain),
                 row(label, "drain as fraction of COPY", None if fraction is None else 100 * fraction, "%",
                     ">= 50%" if key == "0" else "", None if fraction is None or key != "0" else fraction >= 0.5)]
        if _ok(drain) and drain.get("first_run"):
            rows.append(row(label, "the site's first drain run as fraction of COPY",
                            100 * drain["first_run"]["tx_per_s"] / ceiling["tx_equivalent_per_s"], "%"))
    for key, base in results.get("baseline", {}).items():
        if not _ok(base):
            continue
        drain = results.get("drain", {}).get(key)
        ratio = drain["tx_per_s"] / base["tx_per_s"] if _ok(drain) and base["tx_per_s"] else None
        comparison.setdefault(key, {}).update(ours_tx_s=drain["tx_per_s"] if _ok(drain) else None,
                                              baseline_tx_s=base["tx_per_s"], ratio=ratio)
        target = ">= 100x" if key == "0" else ">= 1,000x" if key == "250" else ""
        met = None if ratio is None or not target else ratio >= (100 if key == "0" else 1000)
        label = f"seed 000 loop @{key} ms"
        rows += [row(label, f"transactions/s (n={base['transactions']})", base["tx_per_s"], "tx/s"),
                 row(label, "ours / baseline", ratio, "x", target, met)]
        if not base["complete"]:
            rows.append(row(label, "all rows on main", False))
    burst = results.get("dagster_burst")
    if _ok(burst):
        label = f"Dagster burst @{burst['rtt_ms']} ms"
        rows += [row(label, "replicated", f"{burst['replicated']:,} / {burst['transactions']:,}"),
                 row(label, "buffering to replicated p50", burst["p50_s"], "s"),
                 row(label, "buffering to replicated p99", burst["p99_s"], "s"),
                 row(label, "first buffered to last replicated", burst["last_s"], "s", "<= 60 s",
                     None if burst["last_s"] is None else burst["complete"] and burst["last_s"] <= 60),
                 row(label, "burst start to first picked up (sensor + queue + launch)", burst["picked_up_s"], "s"),
                 row(label, "daemon cold start to first replicated", burst["cold_start_s"], "s")]
    outage = results.get("outage")
    if _ok(outage):
        label = f"long outage, backlog {outage['backlog']:,}"
        rss = outage["drain_rss_mb_first_last_max"] or [None, None, None]
        rows += [row(label, "Redis used_memory with the backlog", outage["redis_used_memory_backlog_mb"], "MiB"),
                 row(label, "Redis bytes per buffered transaction", outage["redis_bytes_per_tx"], "bytes"),
                 row(label, "drain transactions/s", outage["drain"]["tx_per_s"], "tx/s"),
                 row(label, "drain RSS first / last / max sample", f"{rss[0]} / {rss[1]} / {rss[2]}", "MiB",
                     "flat"),
                 row(label, "ingest p99 while draining", outage["ingest_while_draining"].get("p99_ms"), "ms",
                     "<= 1 ms"),
                 row(label, "ingest max while buffering / while draining",
                     f"{outage['buffering_ingest_ms']['max']:.0f} / {outage['ingest_while_draining'].get('max_ms'):.0f}",
                     "ms")]
        for phase in ("buffering", "draining"):
            seen = outage[f"redis_while_{phase}"]
            events = ", ".join(f"{name} {e['max_ms']} ms" for name, e in sorted(seen["latency_events"].items()))
            rows.append(row(label, f"Redis while {phase}: forks; worst events over {seen['threshold_ms']} ms",
                            f"{seen['forks']}; {events or 'none'}", ""))
        rows.append(row(label, "backlog drained and replicated", outage["drain"]["complete"]))
    return rows, comparison


def chart_points(results: dict) -> tuple[dict[str, dict[int, float]], list[str]]:
    fixed = f"ours, batch fixed at {results['batch_size']}"
    points: dict[str, dict[int, float]] = {"ours": {}, fixed: {}, "seed 000 loop (baseline)": {}, "COPY ceiling": {}}
    for key, drain in results.get("drain", {}).items():
        if _ok(drain):
            name = fixed if key.endswith("_fixed_batch") else "ours"
            points[name][int(key.split("_")[0])] = drain["tx_per_s"]
    if not points[fixed]:
        del points[fixed]
    for key, base in results.get("baseline", {}).items():
        if _ok(base):
            points["seed 000 loop (baseline)"][int(key)] = base["tx_per_s"]
    for key, ceiling in results.get("ceiling", {}).items():
        if _ok(ceiling):
            points["COPY ceiling"][int(key)] = ceiling["tx_equivalent_per_s"]
    notes = [f"{k} ms RTT: ours {v['ratio']:,.0f}x the seed 000 loop" for k, v in
             sorted(results.get("comparison", {}).items(), key=lambda kv: int(kv[0])) if v.get("ratio")]
    notes.append(f"batches of {results['batch_size']}, growing where main is far, unless said; RTT = 2 x the proxy's one-way delay; "
                 "COPY ceiling = same rows in one COPY transaction")
    return points, notes
