import json, time, sys
from pathlib import Path
from obs_pipeline.stack import LocalStack
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from obs_pipeline.dagster_defs.jobs import drain_buffer
from obs_pipeline.dev import dagster_environment
import os
st = LocalStack("/tmp/ret_scratch/stack")
st.up(main_latency_ms=250)
try:
    cfg = json.loads(Path("/tmp/ret_scratch/stack/stack.json").read_text()) if Path("/tmp/ret_scratch/stack/stack.json").exists() else None
    env = dagster_environment(st, home=Path("/tmp/ret_scratch/home"))
    direct = env["OBS_DAGSTER_PG_URL"]
    ports = st._require()["ports"]
    far = direct.replace(str(ports["main"]), str(ports["proxy"]))
    os.environ["OBS_DAGSTER_PG_URL"] = direct
    inst = DagsterInstance.from_config("/tmp/ret_scratch/home")
    ids = [inst.create_run_for_job(drain_buffer, status=DagsterRunStatus.SUCCESS).run_id for _ in range(20)]
    for i in ids: inst.report_engine_event("x", inst.get_run_by_id(i))
    inst.dispose()
    os.environ["OBS_DAGSTER_PG_URL"] = far
    inst = DagsterInstance.from_config("/tmp/ret_scratch/home")
    inst.get_run_records(limit=1); t = time.monotonic(); recs = inst.get_run_records(RunsFilter(job_name="drain_buffer", statuses=[DagsterRunStatus.SUCCESS]), limit=100); print("get_run_records (%d records): %.1f s" % (len(recs), time.monotonic() - t))
    t = time.monotonic()
    for i in ids: inst.delete_run(i)
    print("delete_run x%d: %.1f s each" % (len(ids), (time.monotonic() - t) / len(ids)))
    inst.dispose()
finally:
    st.down()
