"""The benchmark's output: machine facts, a table with targets, results.json and the charts.

Targets are printed beside the figures, never asserted: these machines have 2 noisy cores,
and a benchmark that fails on a slow day teaches nothing. "met" says how a figure compares.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa


def machine_facts(ctx) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    with ctx.direct.connect() as conn:
        pg = conn.execute(sa.text("SHOW server_version")).scalar()
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "postgresql": pg,
        "redis": ctx.redis.info("server")["redis_version"],
        "os": f"{platform.system()} {platform.release()}",
        "calibration": calibration(ctx.redis),
    }


def calibration(redis_client, pings: int = 2000, loop: int = 1_000_000) -> dict[str, float]:
    """Two readings that make runs on different machines comparable: a loopback Redis PING
    (what every ingest and every drain call pays on top of its work: the VM's wake-ups) and a
    pure-Python loop (the interpreter's speed). Hosts of one kind have differed 4x in the first."""
    times = []
    for _ in range(pings):
        t0 = time.perf_counter()
        redis_client.ping()
        times.append(time.perf_counter() - t0)
    times.sort()
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        total = 0
        for i in range(loop):
            total += i
        best = min(best, time.perf_counter() - t0)
    return {"redis_ping_p50_us": round(times[len(times) // 2] * 1e6, 1),
            "redis_ping_p99_us": round(times[int(len(times) * 0.99)] * 1e6, 1),
            "python_loop_ns_per_iteration": round(best / loop * 1e9, 1)}


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}" if abs(value) >= 1 else f"{value:.3f}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def row(section: str, metric: str, value: Any, unit: str = "", target: str = "", met: bool | None = None) -> dict:
    return {"section": section, "metric": metric, "value": value, "unit": unit, "shown": _fmt(value, unit),
            "target": target, "met": met}


def render_table(rows: list[dict], machine: dict, command: str) -> str:
    lines = [f"obs-pipeline bench: {command}",
             f"machine: {machine['nproc']} cores ({machine['cpu_model']}), {machine['memory_gib']} GiB, "
             f"{machine['os']}; Python {machine['python']}, PostgreSQL {machine['postgresql']}, "
             f"Redis {machine['redis']}"]
    cal = machine.get("calibration")
    if cal:
        lines.append(f"calibration: loopback Redis PING p50 {cal['redis_ping_p50_us']:.0f} us, "
                     f"p99 {cal['redis_ping_p99_us']:.0f} us; Python loop {cal['python_loop_ns_per_iteration']:.0f} ns "
                     "per iteration")
    lines.append("")
    widths = [max(len(r[k]) for r in rows + [{"section": "section", "metric": "metric", "shown": "value",
                                                "target": "target"}]) for k in ("section", "metric", "shown", "target")]
    header = ("section", "metric", "value", "target", "met")
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths + [3])))
    lines.append("  ".join("-" * w for w in widths + [3]))
    for r in rows:
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append("  ".join([r["section"].ljust(widths[0]), r["metric"].ljust(widths[1]),
                                r["shown"].rjust(widths[2]), r["target"].ljust(widths[3]), met]).rstrip())
    return "\n".join(lines)


def write_json(path: Path, results: dict) -> None:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(results), indent=2) + "\n")


def throughput_chart(path: Path, points: dict[str, dict[int, float]], title: str, notes: list[str]) -> None:
    """Transactions/s against round-trip time, one line per design, log scale (they differ 100x+)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"ours": ("tab:blue", "o", "-"), "ours, batch fixed": ("tab:cyan", "s", "-"),
              "seed 000 loop (baseline)": ("tab:red", "v", "-"), "COPY ceiling": ("tab:gray", "", "--")}
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=110)
    for name, series in points.items():
        if not series:
            continue
        xs = sorted(series)
        ys = [max(series[x], 1e-3) for x in xs]
        color, marker, line = styles.get(name) or (styles["ours, batch fixed"] if name.startswith("ours, batch")
                                                   else ("black", "x", ":"))
        ax.plot(xs, ys, line, marker=marker, color=color, label=name)
        if name != "COPY ceiling":
            for x, y in zip(xs, ys):
                below = name.startswith("ours, batch")  # a point beside "ours": its label goes under it
                ax.annotate(f"{y:.2f}" if y < 1 else f"{y:,.1f}" if y < 10 else f"{y:,.0f}", (x, y),
                            textcoords="offset points",
                            xytext=(6, -12 if below else 6), fontsize=8, color=color)
    ax.set_yscale("log")
    ax.set_xlabel("round-trip time to main (ms)")
    ax.set_ylabel("drain throughput (transactions/s, log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center", bbox_to_anchor=(0.55, 0.36), fontsize=8)  # between the two designs
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, va="bottom")
        fig.subplots_adjust(bottom=0.1 + 0.03 * len(notes))
    fig.savefig(path)
    plt.close(fig)


def memory_chart(path: Path, samples: list, title: str) -> None:
    """Long-outage mode: the drain's RSS (flat: one batch at a time) and Redis shrinking."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ts = [s[0] for s in samples]
    ax.plot(ts, [s[1] for s in samples], color="tab:blue", label="drain process RSS (MiB)")
    ax.set_xlabel("seconds since the drain started")
    ax.set_ylabel("drain RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(ts, [s[2] for s in samples], color="tab:red", label="Redis used_memory (MiB)")
    ax2.set_ylabel("Redis used_memory (MiB)")
    ax2.set_ylim(bottom=0)
    fig.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
