"""`obs-pipeline bench --quick`: the whole benchmark, small, on its own fresh stack.

Checks the shape and sanity of what it writes, never a speed: these machines are 2 noisy
cores, so the figures are reported against targets, not asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@pytest.mark.slow
def test_quick_bench_writes_every_section(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "bench", "--quick", "--backlog", "2000",
                           "--out", str(out)], capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["errors"] == []
    assert results["quick"] is True and "bench --out" in results["command"]

    machine = results["machine"]
    assert machine["nproc"] >= 1 and machine["cpu_model"] and machine["postgresql"] and machine["redis"]
    cal = machine["calibration"]
    assert 0 < cal["redis_ping_p50_us"] <= cal["redis_ping_p99_us"] and _positive(cal["python_loop_ns_per_iteration"])

    ingest = results["ingest"]
    assert 0 < ingest["p50_ms"] <= ingest["p99_ms"]
    assert _positive(ingest["throughput_tx_s"])

    far = str(results["far_rtt_ms"])
    assert int(far) > 0
    for rtt in ("0", far):
        drain = results["drain"][rtt]
        assert drain["complete"], drain
        assert _positive(drain["tx_per_s"]) and _positive(drain["rows_per_s"])
        assert drain["rows"] == 4 * drain["transactions"]
        assert _positive(drain["round_trips_per_batch_median"])
        assert _positive(drain["peak_rss_mb"])
        cpu = drain["cpu"]["us_per_tx"]  # the drain, Redis and main all worked during the run
        assert all(_positive(cpu[name]) for name in ("drain", "redis", "main")), drain["cpu"]
        assert 0 < drain["cpu"]["machine_busy_cores"] <= drain["cpu"]["cores"]
        assert _positive(results["ceiling"][rtt]["rows_per_s"])
        assert _positive(results["ceiling"][rtt]["cpu"]["us_per_tx"]["main"])
        baseline = results["baseline"][rtt]
        assert baseline["complete"], baseline
        assert _positive(baseline["tx_per_s"])
        assert _positive(results["comparison"][rtt]["ratio"])
        assert _positive(results["comparison"][rtt]["fraction_of_copy"])
    assert results["drain"]["0"]["batch_size"] == results["batch_size"]
    first = results["drain"][far]["first_run"]  # the far drain is timed as the site's second run, beside its first
    assert first["complete"] and _positive(first["tx_per_s"]) and "first_run" not in results["drain"]["0"]
    assert any("the site's first run" in r["metric"] for r in results["table"])
    assert _positive(results["drain"]["0"]["redis_bytes_per_tx"])

    fold = results["fold"]
    assert fold["complete"] and fold["fold_ratio"] > 1.0  # finishes folded into their starts

    burst = results["dagster_burst"]
    assert burst["complete"] and burst["replicated"] == burst["transactions"] > 0
    assert 0 < burst["p50_s"] <= burst["p99_s"] and _positive(burst["last_s"])

    outage = results["outage"]
    assert outage["backlog"] == 2000 and outage["drain"]["complete"]
    assert _positive(outage["redis_bytes_per_tx"]) and outage["samples_t_rss_redis_mb"]
    assert _positive(outage["ingest_while_draining"]["p99_ms"])
    assert _positive(outage["buffering_ingest_ms"]["p99"])
    for phase in ("buffering", "draining"):  # what Redis itself saw, read back from the server
        seen = outage[f"redis_while_{phase}"]
        assert seen["threshold_ms"] == 20 and seen["forks"] >= 0 and _positive(seen["aof_size_mb"])
        assert all(e["max_ms"] >= 20 for e in seen["latency_events"].values())

    assert results["table"] and all(r["shown"] for r in results["table"])
    for chart in ("throughput_vs_rtt.png", "backlog_memory.png"):
        assert (out / chart).read_bytes()[:8] == PNG_MAGIC
    assert "ingest" in proc.stdout and "seed 000 loop" in proc.stdout  # the table was printed


def _processes_of(temp, mark: str) -> set[int]:
    """The live processes a bench run started: with `mark` in their environment, or working or
    named under its temporary folder (Redis is started with an environment of its own)."""
    from obs_pipeline_tests.stack_fixtures import live_processes

    return live_processes(lambda entry: (
        f"OBS_BENCH_TEST_MARK={mark}".encode() in (entry / "environ").read_bytes().split(b"\0")
        or os.readlink(entry / "cwd").startswith(str(temp))
        or str(temp).encode() in (entry / "cmdline").read_bytes()))


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP", "SIGTERM, then SIGHUP at once"])
def test_a_bench_stopped_by_a_signal_stops_its_stack_and_removes_its_work_folder(tmp_path, stop):
    """`timeout` and service managers stop a command with SIGTERM, a closing terminal with SIGHUP.
    Either killed the bench at once: its own stack (Redis, main, the replica) and Dagster daemon
    ran on, and its work folder (160 MB) stayed in the temporary folder, unsaid. Ctrl-C already
    cleaned up; now the others do as it does (exit 130)."""
    from obs_pipeline_tests.test_cli_operations import tail, until

    temp = tmp_path / "tmp"
    temp.mkdir()
    mark = str(uuid.uuid4())  # in the environment of the processes the bench starts but Redis
    log = tmp_path / "bench.log"
    env = {**os.environ, "TMPDIR": str(temp), "OBS_BENCH_TEST_MARK": mark}
    bench = subprocess.Popen([sys.executable, "-m", "obs_pipeline.cli", "bench", "--quick", "--out",
                              str(tmp_path / "out")], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        assert until(lambda: "Dagster burst ..." in log.read_text(), 170, 0.2, alive=bench, log=log), tail(log)
        assert until(lambda: len(_processes_of(temp, mark) - {bench.pid}) >= 4, 30), \
            _processes_of(temp, mark)  # Redis, main, the replica, the daemon
        for sig in stop.split(", then "):
            bench.send_signal(getattr(signal, sig.removesuffix(" at once")))
        assert bench.wait(timeout=120) == 130, tail(log)
        assert until(lambda: not _processes_of(temp, mark), 30), _processes_of(temp, mark)
        assert list(temp.iterdir()) == [], tail(log)
        assert "Traceback" not in log.read_text(), tail(log)
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
        for pid in _processes_of(temp, mark):
            os.kill(pid, signal.SIGKILL)
