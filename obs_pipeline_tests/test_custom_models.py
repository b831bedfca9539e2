"""`OBS_MODELS`: a site's own schema is validated, buffered, drained and read like the built-in one."""

from __future__ import annotations

import dataclasses
import random

import pytest
import sqlalchemy as sa

from obs_pipeline.ingest import InvalidTransaction, TransactionBuffer
from obs_pipeline_tests.test_cli import cli

MODELS = "obs_pipeline_tests.custom_models:Base"


@pytest.fixture
def custom(settings):
    return dataclasses.replace(settings, models=MODELS)


@pytest.mark.parametrize("row, message", [
    ({"settings": {"gain": object()}}, "not JSON-serialisable"),
    ({"settings": {"gain": float("nan")}}, "not JSON-serialisable"),
    ({"settings": [1, {"nested": float("inf")}]}, "not JSON-serialisable"),
])
def test_a_json_column_refuses_what_json_cannot_hold_and_buffers_nothing(custom, redis_client, row, message):
    buf = TransactionBuffer(settings=custom)
    with pytest.raises(InvalidTransaction, match=message):
        with buf.transaction() as tx:
            tx.create("Instrument", {"code": 1, "name": "cam", **row})
    assert not list(redis_client.scan_iter(match=f"site:{custom.site}:*"))
    buf.close()


@pytest.mark.parametrize("column, value, message", [
    ("seconds", float("nan"), "not a finite number"), ("seconds", "1.5", "is not a number"),
    ("ok", "yes", "is not a boolean"), ("instrument_code", 1.0, "is not an integer"),
])
def test_typed_columns_of_a_schema_of_its_own_refuse_wrong_values(custom, column, value, message):
    buf = TransactionBuffer(settings=custom)
    with pytest.raises(InvalidTransaction, match=message):
        with buf.transaction() as tx:
            tx.create("Exposure", {"instrument_code": 1, "started": "2025-01-01T00:00:00Z", "seconds": 1.0,
                                   column: value})
    buf.close()


def test_a_schema_of_its_own_from_db_init_to_the_replica(custom, main_engine, replica_engine):
    """`db init` creates its tables, ingest validates against it, `drain --once` applies it and
    smart queries read it back from the replica, all chosen by OBS_MODELS alone."""
    env = {"OBS_SITE": custom.site, "OBS_REDIS_URL": custom.redis_url, "OBS_MAIN_DB_URL": custom.main_db_url,
           "OBS_REPLICA_DB_URL": custom.replica_db_url, "OBS_MODELS": MODELS}
    init = cli("db", "init", env=env)
    assert init.returncode == 0 and "2 models" in init.stderr, init.stderr
    code = random.randrange(10**6, 10**9)
    buf = TransactionBuffer(settings=custom)
    with buf.transaction() as tx:
        tx.create("Instrument", {"code": code, "name": "cam", "settings": {"gain": 2.5, "modes": ["a", "b"]}})
        exposure = tx.create("Exposure", {"instrument_code": code, "started": "2025-01-01T02:00:00+02:00",
                                          "seconds": 1.5, "ok": True})
    note = buf.update("Exposure", exposure["id"], {"note": "after", "ok": False})
    expected = {"id": exposure["id"], "instrument_code": code, "started": "2025-01-01T00:00:00+00:00",
                "seconds": 1.5, "ok": False, "note": "after"}
    assert buf.get("Exposure", exposure["id"]) == expected  # buffered, with its overlay
    drained = cli("drain", "--once", env=env)
    assert drained.returncode == 0 and "drained 2 transactions" in drained.stderr, drained.stderr
    assert buf.status(tx.transaction_id) == buf.status(note) == "replicated"
    with main_engine.connect() as conn:
        row = conn.execute(sa.text("SELECT i.settings::text, e.seconds, e.ok, e.note FROM custom_exposure e "
                                   "JOIN custom_instrument i ON i.code = e.instrument_code WHERE e.id = :i"),
                           {"i": exposure["id"]}).one()
    assert (row[0].replace(" ", ""), row[1], row[2], row[3]) == ('{"gain":2.5,"modes":["a","b"]}', 1.5, False, "after")
    assert buf.get("Exposure", exposure["id"]) == expected  # now from the replica
    assert buf.get("Instrument", code)["settings"] == {"gain": 2.5, "modes": ["a", "b"]}
    assert [r["id"] for r in buf.search("Exposure", {"instrument_code": code, "ok": False})] == [exposure["id"]]
    buf.close()
