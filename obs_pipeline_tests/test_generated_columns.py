"""`OBS_MODELS` with columns main fills itself (generated_models.py): a GENERATED ALWAYS AS
(...) STORED column (sa.Computed) and identity keys. Main refuses any value but DEFAULT for a
generated column ("cannot insert a non-DEFAULT value into column"): such a value is refused at
ingest in one line, creates that leave it out are applied, reads say None until replicated."""

from __future__ import annotations

import dataclasses
import json
import uuid

import pytest
import sqlalchemy as sa

from obs_pipeline.ingest import InvalidTransaction, TransactionBuffer
from obs_pipeline.keys import SiteKeys
from obs_pipeline_tests.workload import drain_until_settled

MODELS = "obs_pipeline_tests.generated_models:Base"


@pytest.fixture
def generated(settings, main_engine, replica_engine):
    from obs_pipeline.model_registry import ModelRegistry
    from obs_pipeline.schema import create_schema
    from obs_pipeline_tests.conftest import wait_for_replica

    create_schema(main_engine, ModelRegistry.from_path(MODELS))
    wait_for_replica(main_engine, replica_engine)
    return dataclasses.replace(settings, models=MODELS)


def _doubled_on_main(main_engine, ids: list[str]) -> dict[str, tuple]:
    with main_engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id::text, a, doubled FROM gen_computed WHERE id::text = ANY(:i)"),
                            {"i": ids}).all()
    return {r[0]: (r[1], r[2]) for r in rows}


def test_a_value_for_a_column_main_computes_is_refused_at_ingest(generated, redis_client):
    buf = TransactionBuffer(settings=generated)
    for column, value in (("doubled", 4), ("doubled", None), ("seq", 7)):
        with pytest.raises(InvalidTransaction, match=rf"^[^\n]*Doubled\.{column}: [^\n]*main computes[^\n]*$"):
            with buf.transaction() as tx:
                tx.create("Doubled", {"a": 2, column: value})
    with buf.transaction() as tx:
        row = tx.create("Doubled", {"a": 2})
    before = {k: redis_client.dump(k) for k in redis_client.scan_iter(match=f"site:{generated.site}:*")}
    passed_back = {**buf.get("Doubled", row["id"]), "a": 3}  # the record as get gave it, changed
    for values in ({"doubled": 4}, passed_back):
        with pytest.raises(InvalidTransaction, match=r"^update of Doubled [^\n]*Doubled\.doubled: main computes this "
                                                     r"column \(GENERATED ALWAYS\): leave it out \(of a record from "
                                                     r"get passed back to update too\)$"):
            with buf.transaction() as tx:
                tx.update("Doubled", row["id"], values)
    assert {k: redis_client.dump(k) for k in redis_client.scan_iter(match=f"site:{generated.site}:*")} == before
    buf.close()


def test_creates_and_updates_leaving_a_computed_column_out_are_applied(generated, main_engine):
    """Main computes the column for each row; the buffered record reads it None until then."""
    buf = TransactionBuffer(settings=generated)
    with buf.transaction() as tx:
        one = tx.create("Doubled", {"a": 1})
        two = tx.create("Doubled", {"a": 2})
    with buf.transaction() as later:
        later.update("Doubled", two["id"], {"a": 5})
    assert {k: buf.get("Doubled", one["id"])[k] for k in ("doubled", "seq")} == {"doubled": None, "seq": None}
    assert buf.search("Doubled", {"id": [one["id"], two["id"]], "doubled": 2}) == []
    drain_until_settled(generated)
    assert buf.status(tx.transaction_id) == "replicated" and buf.status(later.transaction_id) == "replicated"
    assert _doubled_on_main(main_engine, [one["id"], two["id"]]) == {one["id"]: (1, 2), two["id"]: (5, 10)}
    assert buf.get("Doubled", two["id"])["doubled"] == 10 and buf.get("Doubled", two["id"])["seq"] is not None
    assert [r["id"] for r in buf.search("Doubled", {"id": [one["id"], two["id"]], "doubled": 2})] == [one["id"]]
    buf.close()


def test_a_producers_value_for_a_computed_column_is_dead_lettered_in_one_line(generated, redis_client,
                                                                               main_engine):
    """An existing producer's entry skips ingest's check: the drain's own check refuses it, and
    the rest of the batch is applied."""
    bad, good = str(uuid.uuid4()), str(uuid.uuid4())
    ids = {}
    for tx_id, values in ((bad, {"a": 3, "doubled": 6}), (good, {"a": 3})):
        ids[tx_id] = str(uuid.uuid4())
        redis_client.lpush(SiteKeys(generated.site).buffer, json.dumps({
            "transaction_id": tx_id, "endpoint": "producer", "site": generated.site, "steps": [
                {"step_id": "s", "operation": "create", "model_class": "Doubled",
                 "data": {"id": ids[tx_id], **values}}]}))
    drain_until_settled(generated)
    failed = {f["transaction_id"]: f["failure"]["reason"]
              for f in map(json.loads, redis_client.lrange(SiteKeys(generated.site).failed, 0, -1))}
    assert list(failed) == [bad] and "Doubled.doubled" in failed[bad] and "\n" not in failed[bad], failed
    assert _doubled_on_main(main_engine, list(ids.values())) == {ids[good]: (3, 6)}


def test_a_key_main_numbers_always_is_refused_at_model_load(generated, redis_client):
    buf = TransactionBuffer(settings=generated)
    with pytest.raises(InvalidTransaction, match=r"^model 'AlwaysNumbered' cannot be written through obs-pipeline: "
                                                 r"its primary key 'n' is GENERATED ALWAYS AS IDENTITY[^\n]*$"):
        with buf.transaction() as tx:
            tx.create("AlwaysNumbered", {"n": 1, "label": "x"})
    assert not list(redis_client.scan_iter(match=f"site:{generated.site}:*"))
    buf.close()


def test_a_key_numbered_by_default_is_taken_as_given(generated, main_engine):
    """GENERATED BY DEFAULT AS IDENTITY takes a given key, as a SERIAL does; one is required."""
    import random

    buf = TransactionBuffer(settings=generated)
    with pytest.raises(InvalidTransaction, match=r"Numbered is missing required column\(s\) n"):
        with buf.transaction() as tx:
            tx.create("Numbered", {"label": "x"})
    n = random.randrange(10**6, 10**9)
    with buf.transaction() as tx:
        tx.create("Numbered", {"n": n, "label": "x"})
    drain_until_settled(generated)
    assert buf.status(tx.transaction_id) == "replicated"
    assert buf.get("Numbered", n)["label"] == "x"
    buf.close()
