"""The COPY ceiling (`bench.ceiling`) starts every COPY from the table state every drain run
starts from: freshly truncated tables (`BenchContext.phase` truncates before each drain run).

Rows left by an earlier phase, or dead tuples of a DELETE between repeats, slow a COPY down
(heap and unique indexes carry them; autovacuum and the replica's replay of the DELETE compete
for the cores); the published runs' three COPY repeats fell to 0.83x of the first by the third,
which lowered the ceiling and raised the drain's "% of COPY".
"""

from __future__ import annotations

import sqlalchemy as sa

from obs_pipeline.bench import ceiling
from obs_pipeline.bench.context import BenchContext

MODEL_TABLES = ("executed_obs_unit", "raw_data_package", "raw_data_file")


def _heap_bytes(ctx: BenchContext) -> dict[str, int]:
    with ctx.direct.connect() as conn:
        return {t: conn.execute(sa.text(f"SELECT pg_relation_size('{t}')")).scalar_one() for t in MODEL_TABLES}


def test_every_copy_repeat_starts_on_freshly_truncated_tables(stack, tmp_path, monkeypatch):
    ctx = BenchContext(stack, tmp_path)
    try:
        url = stack.env()["OBS_MAIN_DB_URL"]
        ctx.truncate()
        ceiling.copy_once(ctx, url, 300)  # an earlier phase's work on main
        seen = []
        original = ceiling.copy_once

        def probe(ctx_, url_, n):
            seen.append((ctx_.model_rows(), _heap_bytes(ctx_)))
            return original(ctx_, url_, n)

        monkeypatch.setattr(ceiling, "copy_once", probe)
        result = ceiling.measure_ceiling(ctx, url, 300, repeats=3)
        assert len(seen) == 3
        for rows, heap in seen:
            assert rows == 0 and set(heap.values()) == {0}, seen  # empty tables in new files
        assert result["rows"] == 1200 and result["rows_per_s"] > 0
        assert ctx.model_rows() == 0  # and left empty for the next phase
    finally:
        ctx.close()


def test_copy_s_replay_clock_pays_no_round_trip_to_main_after_commit(stack, tmp_path):
    """Behind a latency proxy, COPY's clock to the replica's replay must stop when the replica
    has replayed the commit, as the drain's does (its commit LSN comes back in its batch's one
    round trip). It read the LSN on COPY's own connection, behind the proxy, first: BEGIN, the
    SELECT and COMMIT, three round trips (0.75 s of 4.9 s at 250 ms), and the drain's fraction
    of `COPY` timed to the replay came out 8-9 points too high at 50 and 250 ms."""
    from obs_pipeline.stack.osutil import pick_free_ports
    from obs_pipeline.stack.proxy_process import start_proxy, stop_proxy

    one_way_s = 0.15
    main = sa.engine.make_url(stack.env()["OBS_MAIN_DB_URL"])
    port, pidfile = pick_free_ports(1)[0], tmp_path / "proxy.pid"
    start_proxy(port, main.port, int(one_way_s * 1000), pidfile, tmp_path / "proxy.log")
    ctx = BenchContext(stack, tmp_path)
    try:
        ctx.truncate()
        far_url = main.set(port=port).render_as_string(hide_password=False)
        result = ceiling.copy_once(ctx, far_url, 300)
        assert result["commit_s"] >= 4 * 2 * one_way_s, result  # COPY itself went through the proxy
        # the replica streams from main directly here: it has replayed the commit before COMMIT's
        # answer is back; what is left is polling it, far less than one round trip to main
        assert result["replayed_s"] - result["commit_s"] < 2 * one_way_s, result
    finally:
        ctx.truncate()
        ctx.close()
        stop_proxy(pidfile, "kill")
