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
