"""A black-box review against shared/contract.md: only the contract's names are used (the
environment variables, obs_pipeline.ingest, the wire format and Redis keys of section 4, and the
`obs-pipeline` command). Each test names the contract line it holds the project to."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy as sa

import obs_pipeline.models
from obs_pipeline.ingest import InvalidTransaction, TransactionBuffer

pytestmark = pytest.mark.usefixtures("clean_db")

OBS_PIPELINE = str(Path(sys.executable).parent / "obs-pipeline")  # the console script (contract section 6)


@pytest.fixture
def env(settings) -> dict[str, str]:
    return {"OBS_SITE": settings.site, "OBS_REDIS_URL": settings.redis_url, "OBS_MAIN_DB_URL": settings.main_db_url,
            "OBS_REPLICA_DB_URL": settings.replica_db_url, "OBS_SPOOL_DIR": settings.spool_dir}


@pytest.fixture
def buf(env, monkeypatch):
    for name in [k for k in os.environ if k.startswith("OBS_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    buffer = TransactionBuffer.from_env()
    yield buffer
    buffer.close()


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OBS_")}
    return subprocess.run([OBS_PIPELINE, *args], env={**base, **env}, capture_output=True, text=True, timeout=180)


def drain_once(env: dict[str, str]) -> None:
    result = run("drain", "--once", env=env)
    assert result.returncode == 0, result.stderr


def push(redis_client, site: str, doc: dict) -> str:
    """What an existing producer does: LPUSH the transaction JSON, nothing else (contract section 4)."""
    redis_client.lpush(f"site:{site}:transaction_buffer", json.dumps(doc))
    return doc["transaction_id"]


def dead_letters(redis_client, site: str) -> list[dict]:
    return [json.loads(e) for e in redis_client.lrange(f"site:{site}:failed_transactions", 0, -1)]


def snapshot(redis_client, site: str) -> dict[bytes, bytes]:
    """Every key of the site with its serialized value (DUMP): equal snapshots, nothing changed."""
    return {key: redis_client.dump(key) for key in redis_client.scan_iter(match=f"site:{site}:*", count=1000)}


def new_id() -> str:
    return str(uuid.uuid4())


# --- section 4: an existing producer's transactions are drained like any other ------------------

def test_a_producers_steps_sharing_a_step_id_are_applied_in_their_order(env, settings, redis_client, buf):
    """Contract section 4: a producer that only LPUSHes seed-000 transactions "must be drained like
    any other". Seed 000's builder takes a step_id from its caller (`step_id="create_observation"`),
    and its executor applies the steps in their order, so a producer that names each file's step
    `create_file` worked there. Here the transaction was dead-lettered: "step id 'create_file'
    appears twice". Without dependencies naming it, a shared step id is unambiguous."""
    obs, pkg, files = new_id(), new_id(), [new_id(), new_id(), new_id()]
    tx_id = push(redis_client, settings.site, {
        "transaction_id": new_id(), "endpoint": "create_observation_with_files", "site": settings.site,
        "timestamp": "2025-01-01T00:00:00Z", "status": "pending", "retry_count": 0, "steps": [
            {"step_id": "create_observation", "operation": "create", "model_class": "ExecutedObsUnit",
             "data": {"id": obs, "obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z", "status": "running"}},
            {"step_id": "create_package", "operation": "create", "model_class": "RawDataPackage",
             "data": {"id": pkg, "name": "pkg", "executed_obs_unit_id": obs}, "dependencies": ["create_observation"]},
            *({"step_id": "create_file", "operation": "create", "model_class": "RawDataFile",
               "data": {"id": f, "name": f"f{i}.fits", "raw_data_package_id": pkg}, "dependencies": ["create_package"]}
              for i, f in enumerate(files)),
            {"step_id": "create_file", "operation": "update", "model_class": "ExecutedObsUnit",
             "data": {"status": "completed"}, "conditions": {"id": obs}, "dependencies": ["create_observation"]},
        ]})

    drain_once(env)

    assert dead_letters(redis_client, settings.site) == []
    assert buf.status(tx_id) == "replicated"
    assert buf.get("ExecutedObsUnit", obs)["status"] == "completed"
    assert sorted(f["id"] for f in buf.search("RawDataFile", {"raw_data_package_id": pkg})) == sorted(files)


def test_shared_step_ids_with_children_listed_first_are_drained(env, settings, redis_client, buf):
    """Dependencies naming step ids that several steps share, parents listed after their
    children: drained, every row in place. (The step order itself is checked in
    test_logic_units: a batch's SQL inserts parents' tables first whatever the order.)"""
    obs, pkgs, files = new_id(), [new_id(), new_id()], [new_id(), new_id()]
    tx_id = push(redis_client, settings.site, {
        "transaction_id": new_id(), "endpoint": "e", "site": settings.site, "timestamp": "2025-01-01T00:00:00Z",
        "steps": [
            {"step_id": "file", "operation": "create", "model_class": "RawDataFile",
             "data": {"id": files[0], "name": "a", "raw_data_package_id": pkgs[0]}, "dependencies": ["pkg"]},
            {"step_id": "file", "operation": "create", "model_class": "RawDataFile",
             "data": {"id": files[1], "name": "b", "raw_data_package_id": pkgs[1]}, "dependencies": ["pkg"]},
            {"step_id": "pkg", "operation": "create", "model_class": "RawDataPackage",
             "data": {"id": pkgs[0], "name": "p0", "executed_obs_unit_id": obs}, "dependencies": ["obs"]},
            {"step_id": "pkg", "operation": "create", "model_class": "RawDataPackage",
             "data": {"id": pkgs[1], "name": "p1", "executed_obs_unit_id": obs}, "dependencies": ["obs"]},
            {"step_id": "obs", "operation": "create", "model_class": "ExecutedObsUnit",
             "data": {"id": obs, "obs_unit_id": 2, "start_time": "2025-01-01T00:00:00Z", "status": "running"}},
        ]})

    drain_once(env)

    assert dead_letters(redis_client, settings.site) == []
    assert buf.status(tx_id) == "replicated"
    assert {f["raw_data_package_id"] for f in buf.search("RawDataFile", {"id": files})} == set(pkgs)


def test_a_minimal_producer_transaction_is_drained(env, settings, redis_client, buf):
    """Only transaction_id and steps; no status, retry_count, max_retries, metadata, timestamp;
    steps without step_id, dependencies or conditions, listed children first; a naive datetime
    (pydantic's `datetime.utcnow()`): applied, the datetime read as UTC."""
    obs, pkg, file_ = new_id(), new_id(), new_id()
    tx_id = push(redis_client, settings.site, {"transaction_id": new_id(), "steps": [
        {"operation": "create", "model_class": "RawDataFile", "data": {"id": file_, "name": "f", "raw_data_package_id": pkg}},
        {"operation": "create", "model_class": "RawDataPackage", "data": {"id": pkg, "name": "p", "executed_obs_unit_id": obs}},
        {"operation": "create", "model_class": "ExecutedObsUnit",
         "data": {"id": obs, "obs_unit_id": 3, "start_time": "2025-01-01T00:00:00", "status": "running"}},
    ]})

    drain_once(env)

    assert dead_letters(redis_client, settings.site) == []
    assert buf.status(tx_id) == "replicated"
    assert buf.get("ExecutedObsUnit", obs)["start_time"] == "2025-01-01T00:00:00+00:00"
    assert buf.get("RawDataFile", file_)["raw_data_package_id"] == pkg


# --- section 3: an update that passes back the whole record ---------------------------------------

def test_an_update_with_the_records_own_unchanged_id_is_taken(env, settings, redis_client, buf):
    """Contract section 3: `get` returns "the latest state" as a dict with column names as keys,
    and `update(model, id, values)` sets columns. Passing back what `get` returned, changed,
    is the obvious way to finish an observation; it was refused ("the id of ExecutedObsUnit
    cannot be changed by an update"), though the id is not changed. A producer's update step
    whose `data` repeats the record's id was dead-lettered for the same reason. An update that
    does change the id is still refused."""
    with buf.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "running"})
    record = buf.get("ExecutedObsUnit", obs["id"])
    record.update(status="completed", end_time="2025-01-01T01:00:00Z")
    finish = buf.update("ExecutedObsUnit", obs["id"], record)
    assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "completed"

    before = snapshot(redis_client, settings.site)
    with pytest.raises(InvalidTransaction, match="cannot be changed"):
        buf.update("ExecutedObsUnit", obs["id"], {"id": new_id(), "status": "x"})
    assert snapshot(redis_client, settings.site) == before

    producer = push(redis_client, settings.site, {"transaction_id": new_id(), "steps": [
        {"step_id": "finish", "operation": "update", "model_class": "ExecutedObsUnit",
         "data": {"id": obs["id"].upper(), "status": "archived"}, "conditions": {"id": obs["id"]}}]})

    drain_once(env)

    assert dead_letters(redis_client, settings.site) == []
    assert [buf.status(t) for t in (tx.transaction_id, finish, producer)] == ["replicated"] * 3
    assert buf.get("ExecutedObsUnit", obs["id"]) == {**record, "status": "archived",
                                                    "end_time": "2025-01-01T01:00:00+00:00",
                                                    "start_time": "2025-01-01T00:00:00+00:00"}


# --- section 3: InvalidTransaction changes nothing, also beside buffered records ------------------

@pytest.mark.parametrize("call, message", [
    (lambda b, o: b.update("ExecutedObsUnit", o, {"colour": "red"}), "no column 'colour'"),
    (lambda b, o: b.update("ExecutedObsUnit", o, {"status": 5}), "is not a string"),
    (lambda b, o: b.update("ExecutedObsUnit", o, {"status": None}), "may not be null"),
    (lambda b, o: b.update("ExecutedObsUnit", o, {"end_time": "tomorrow"}), "not an ISO-8601 datetime"),
    (lambda b, o: b.update("Telescope", o, {"status": "x"}), "unknown model 'Telescope'"),
    (lambda b, o: b.update("RawDataPackage", o, {"name": "x"}), "neither buffered nor on the replica"),
    (lambda b, o: b.delete("RawDataFile", o), "neither buffered nor on the replica"),
    (lambda b, o: b.delete("ExecutedObsUnit", 5), "is not a UUID"),
    (lambda b, o: b.update("ObsUnit", 99999, {"name": "x"}), "neither buffered nor on the replica"),
    (lambda b, o: b.transaction(metadata={"seeing": {1.5}}).__enter__(), "not JSON-serialisable"),
    (lambda b, o: b.transaction(metadata=[]).__enter__(), "metadata must be a dict, not list"),  # was taken as {}
], ids=["unknown column", "wrong type", "null in a required column", "bad datetime", "unknown model",
        "another model's id", "delete of another model's id", "id of the wrong type", "unknown integer id",
        "metadata not JSON", "metadata an empty list"])
def test_a_refused_update_or_delete_of_a_buffered_record_changes_no_key(settings, redis_client, buf, call, message):
    """Contract section 3: "InvalidTransaction ... is raised, and nothing is buffered". With a
    record already buffered (its caches, status and queue entry in Redis), a refused call
    leaves every key of the site byte for byte as it was."""
    with buf.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "running"})
    buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
    before = snapshot(redis_client, settings.site)
    with pytest.raises(InvalidTransaction, match=message) as info:
        call(buf, obs["id"])
    assert "\n" not in str(info.value)
    assert snapshot(redis_client, settings.site) == before


# --- section 2: the built-in schema, on main and on the replica ------------------------------------

CONTRACT_SCHEMA = {  # contract section 2: class -> (table, {column: (type, nullable)}, {fk column: table})
    "ObsUnit": ("obs_unit", {"id": ("integer", False), "name": ("text", False)}, {}),
    "ExecutedObsUnit": ("executed_obs_unit", {
        "id": ("uuid", False), "obs_unit_id": ("integer", False),
        "start_time": ("timestamp with time zone", False), "end_time": ("timestamp with time zone", True),
        "status": ("text", False)}, {"obs_unit_id": "obs_unit"}),
    "RawDataPackage": ("raw_data_package", {
        "id": ("uuid", False), "name": ("text", False), "executed_obs_unit_id": ("uuid", False)},
        {"executed_obs_unit_id": "executed_obs_unit"}),
    "RawDataFile": ("raw_data_file", {
        "id": ("uuid", False), "name": ("text", False), "raw_data_package_id": ("uuid", False)},
        {"raw_data_package_id": "raw_data_package"}),
}


def table_shape(engine, table: str) -> tuple[dict, list, dict]:
    """A table's columns (type, nullable), primary key columns and foreign keys, as PostgreSQL has them."""
    with engine.connect() as conn:
        columns = {name: (kind, nullable == "YES") for name, kind, nullable in conn.execute(sa.text(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name = :t"), {"t": table})}
        keys = conn.execute(sa.text(
            "SELECT a.attname, c.contype, c.confrelid::regclass::text FROM pg_constraint c "
            "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey) "
            "WHERE c.conrelid = CAST(:t AS regclass) AND c.contype IN ('p', 'f')"), {"t": table}).all()
    return (columns, sorted(name for name, kind, _ in keys if kind == "p"),
            {name: target for name, kind, target in keys if kind == "f"})


@pytest.mark.parametrize("model", sorted(CONTRACT_SCHEMA))
def test_the_built_in_schema_has_the_contracts_classes_tables_columns_and_keys(main_engine, replica_engine, model):
    """Contract section 2: each class of obs_pipeline.models maps to its table, and `db init`'s
    schema (create_schema, as the fixtures make it) has the contract's columns, types,
    nullability, `id` primary key and foreign keys, on main and, by replication, on the replica.
    More columns may be added."""
    table, columns, foreign_keys = CONTRACT_SCHEMA[model]
    assert getattr(obs_pipeline.models, model).__tablename__ == table
    assert issubclass(getattr(obs_pipeline.models, model), obs_pipeline.models.Base)
    for engine in (main_engine, replica_engine):
        found, primary_key, found_foreign_keys = table_shape(engine, table)
        assert {name: found.get(name) for name in columns} == columns, engine.url
        assert primary_key == ["id"], engine.url
        assert {name: found_foreign_keys.get(name) for name in foreign_keys} == foreign_keys, engine.url


# --- section 3: what the ingest API's calls return ------------------------------------------------

def test_the_ingest_calls_return_what_the_contract_says(env, buf):
    """Contract section 3, its return values taken literally: InvalidTransaction is a ValueError
    (a script's `except ValueError` catches it); `tx.transaction_id`, an update's and a delete's
    transaction ids are strings that `status` knows; a created record's "id" is a UUID string
    usable at once; `get` of an unknown id is None; rows have the columns as keys, uuids and
    datetimes as ISO strings, buffered and once replicated."""
    assert issubclass(InvalidTransaction, ValueError)
    with buf.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 123, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "running"})
        pkg = tx.create("RawDataPackage", {"name": "obs_123_package", "executed_obs_unit_id": obs["id"]})
        files = tx.bulk_create("RawDataFile", [{"name": "file1.fits", "raw_data_package_id": pkg["id"]},
                                               {"name": "file2.fits", "raw_data_package_id": pkg["id"]}])
    assert isinstance(tx.transaction_id, str) and buf.status(tx.transaction_id) == "pending"
    for record in (obs, pkg, *files):
        assert isinstance(record["id"], str) and str(uuid.UUID(record["id"])) == record["id"]
    finish = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed", "end_time": "2025-01-01T01:00:00Z"})
    gone = buf.delete("RawDataFile", files[1]["id"])
    assert all(isinstance(t, str) and buf.status(t) == "pending" for t in (finish, gone))
    assert buf.get("ExecutedObsUnit", new_id()) is None

    expected = {"id": obs["id"], "obs_unit_id": 123, "start_time": "2025-01-01T00:00:00+00:00",
                "end_time": "2025-01-01T01:00:00+00:00", "status": "completed"}
    for _ in ("buffered", "replicated"):
        assert buf.get("ExecutedObsUnit", obs["id"]) == expected
        assert buf.search("ExecutedObsUnit", {"obs_unit_id": 123}) == [expected]
        assert buf.search("RawDataFile", {"raw_data_package_id": pkg["id"]}) == [
            {"id": files[0]["id"], "name": "file1.fits", "raw_data_package_id": pkg["id"]}]
        assert buf.get("RawDataFile", files[1]["id"]) is None
        drain_once(env)
    assert [buf.status(t) for t in (tx.transaction_id, finish, gone)] == ["replicated"] * 3
    assert buf.wait(gone, until="replicated", timeout=1.0) is True


# --- section 4: the wire format ingest writes -----------------------------------------------------

SEED_TRANSACTION_FIELDS = {"transaction_id", "endpoint", "site", "timestamp", "status", "retry_count", "max_retries",
                           "steps", "metadata"}
SEED_STEP_FIELDS = {"step_id", "operation", "model_class", "data", "conditions", "dependencies", "expected_result"}


def test_ingest_writes_seed_000s_transaction_json_to_the_buffer_and_the_status_key(settings, redis_client, buf):
    """Contract section 4: what ingest LPUSHes and stores under `transaction:{id}` is seed 000's
    transaction JSON, every field of it, so that the existing system's readers take it: ids as
    UUID strings, datetimes as ISO-8601 strings, `data` a list for bulk_create, `conditions`
    `{"id": ...}` for update and delete, dependencies as step ids."""
    with buf.transaction(endpoint="start_observation", metadata={"night": "first"}) as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 123, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "running"})
        pkg = tx.create("RawDataPackage", {"name": "obs_123_package", "executed_obs_unit_id": obs["id"]})
        files = tx.bulk_create("RawDataFile", [{"name": "file1.fits", "raw_data_package_id": pkg["id"]},
                                               {"name": "file2.fits", "raw_data_package_id": pkg["id"]}])
        tx.update("ExecutedObsUnit", obs["id"], {"end_time": "2025-01-01T01:00:00Z"})
        tx.delete("RawDataFile", files[1]["id"])
    prefix = f"site:{settings.site}:"
    queued = [json.loads(e) for e in redis_client.lrange(prefix + "transaction_buffer", 0, -1)]
    assert redis_client.type(prefix + f"transaction:{tx.transaction_id}") == b"string"
    stored = json.loads(redis_client.get(prefix + f"transaction:{tx.transaction_id}"))
    assert len(queued) == 1
    for doc in (queued[0], stored):
        assert SEED_TRANSACTION_FIELDS <= set(doc), doc
        assert (doc["transaction_id"], doc["endpoint"], doc["site"], doc["status"], doc["retry_count"],
                doc["metadata"]) == (tx.transaction_id, "start_observation", settings.site, "pending", 0,
                                     {"night": "first"})
        assert isinstance(doc["max_retries"], int)
        datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00"))
        steps = doc["steps"]
        assert all(SEED_STEP_FIELDS <= set(step) for step in steps), steps
        assert [(s["operation"], s["model_class"]) for s in steps] == [
            ("create", "ExecutedObsUnit"), ("create", "RawDataPackage"), ("bulk_create", "RawDataFile"),
            ("update", "ExecutedObsUnit"), ("delete", "RawDataFile")]
        assert len({s["step_id"] for s in steps}) == 5
        assert all(set(s["dependencies"]) <= {t["step_id"] for t in steps} for s in steps)
        assert steps[0]["data"]["id"] == obs["id"] and steps[1]["data"]["executed_obs_unit_id"] == obs["id"]
        assert [row["id"] for row in steps[2]["data"]] == [f["id"] for f in files]
        assert datetime.fromisoformat(steps[0]["data"]["start_time"].replace("Z", "+00:00")) == \
            datetime(2025, 1, 1, tzinfo=timezone.utc)
        assert steps[3]["conditions"] == {"id": obs["id"]} and steps[4]["conditions"] == {"id": files[1]["id"]}
        assert datetime.fromisoformat(steps[3]["data"]["end_time"].replace("Z", "+00:00")) == \
            datetime(2025, 1, 1, 1, tzinfo=timezone.utc)


def test_the_record_caches_are_strings_of_the_records_json(settings, redis_client, buf):
    """Contract section 4: `cache:ids:{model}:{id}` and `buffered:{model}:{id}` are strings
    holding the created record's JSON (the existing system reads both); an update of a
    buffered record goes to `read_buffer:{model}:{id}`, not into them."""
    with buf.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 123, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "running"})
        pkg = tx.create("RawDataPackage", {"name": "obs_123_package", "executed_obs_unit_id": obs["id"]})
        files = tx.bulk_create("RawDataFile", [{"name": "file1.fits", "raw_data_package_id": pkg["id"]}])
    buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
    prefix = f"site:{settings.site}:"
    for model, record in (("ExecutedObsUnit", obs), ("RawDataFile", files[0])):
        for kind in ("cache:ids", "buffered"):
            key = f"{prefix}{kind}:{model}:{record['id']}"
            assert redis_client.type(key) == b"string", key
            stored = json.loads(redis_client.get(key))
            assert stored["id"] == record["id"], key
            assert {name: stored[name] for name in record if name != "start_time"} == \
                {name: value for name, value in record.items() if name != "start_time"}, key
    assert json.loads(redis_client.get(f"{prefix}buffered:ExecutedObsUnit:{obs['id']}"))["status"] == "running"
    assert redis_client.exists(f"{prefix}read_buffer:ExecutedObsUnit:{obs['id']}") == 1


# --- section 6: the dead-letter commands' exit status -------------------------------------------

@pytest.mark.parametrize("command", [["failed", "show"], ["failed", "retry"], ["failed", "discard"]])
def test_a_dead_letter_command_given_an_unknown_id_exits_non_zero_in_one_line(env, settings, redis_client, command):
    """Contract section 6: "Exit status 0 on success, non-zero with a one-line reason on stderr
    otherwise". An id that is not in the dead-letter list (a typo, another site's) is not a
    success: an operator's `failed retry ID && echo retried` must not say it was retried."""
    unknown = new_id()
    before = snapshot(redis_client, settings.site)
    result = run(*command, unknown, env=env)
    assert result.returncode != 0, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and unknown in lines[0], result.stderr
    assert snapshot(redis_client, settings.site) == before


def test_lpushed_transactions_are_applied_oldest_first(env, settings, redis_client, buf):
    """Contract section 4: producers LPUSH, the drain consumes from the right, so a producer's
    transactions are applied in the order pushed: a create, then updates of it, then its
    delete and its creation again under the same id, each its own transaction."""
    obs = new_id()
    create = {"step_id": "s", "operation": "create", "model_class": "ExecutedObsUnit",
              "data": {"id": obs, "obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z", "status": "running"}}
    pushed = [push(redis_client, settings.site, {"transaction_id": new_id(), "steps": [step]}) for step in (
        create,
        {"step_id": "s", "operation": "update", "model_class": "ExecutedObsUnit", "data": {"status": "exposing"},
         "conditions": {"id": obs}},
        {"step_id": "s", "operation": "update", "model_class": "ExecutedObsUnit", "data": {"status": "completed"},
         "conditions": {"id": obs}},
        {"step_id": "s", "operation": "delete", "model_class": "ExecutedObsUnit", "data": {}, "conditions": {"id": obs}},
        {**create, "data": {**create["data"], "status": "again"}},
    )]

    drain_once(env)

    assert dead_letters(redis_client, settings.site) == []
    assert [buf.status(t) for t in pushed] == ["replicated"] * len(pushed)
    assert buf.get("ExecutedObsUnit", obs)["status"] == "again"


# --- section 1: a password in OBS_REDIS_URL -------------------------------------------------------

def test_a_redis_url_with_user_and_password_buffers_drains_and_reads(env, settings, redis_client, monkeypatch):
    """Contract section 1: OBS_REDIS_URL carries the password. A Redis user of its own with a
    password (special characters percent-encoded, as a URL takes them) is used by
    TransactionBuffer.from_env() and by `drain --once`: buffered, drained, read replicated."""
    user, password = f"script-{settings.site}", "p@ss:w/rd %x"
    redis_client.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    try:
        url = settings.redis_url.replace("redis://", f"redis://{quote(user, safe='')}:{quote(password, safe='')}@", 1)
        with_password = {**env, "OBS_REDIS_URL": url}
        for name in [k for k in os.environ if k.startswith("OBS_")]:
            monkeypatch.delenv(name)
        for name, value in with_password.items():
            monkeypatch.setenv(name, value)
        buf = TransactionBuffer.from_env()
        try:
            with buf.transaction(endpoint="start_observation") as tx:
                obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                                    "status": "running"})
            assert redis_client.exists(f"site:{settings.site}:transaction:{tx.transaction_id}") == 1
            assert user in {client["user"] for client in redis_client.client_list()}  # not the default user
            drain_once(with_password)
            assert buf.status(tx.transaction_id) == "replicated"
            assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "running"
        finally:
            buf.close()
    finally:
        redis_client.execute_command("ACL", "DELUSER", user)


def test_every_key_a_cycle_writes_is_under_the_sites_prefix(env, settings, redis_client, buf):
    """Contract section 1: "every Redis key starts with `site:{OBS_SITE}:`". Through a whole
    cycle (buffering, a read, a drain that applies one transaction and dead-letters another,
    `status`, `failed list`, a retry and its drain) no key outside the site's prefix appears."""
    outside = {key for key in redis_client.scan_iter(count=1000) if not key.startswith(f"site:{settings.site}:".encode())}
    with buf.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "running"})
    buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
    buf.search("ExecutedObsUnit", {"obs_unit_id": 1})
    refused = push(redis_client, settings.site, {"transaction_id": new_id(), "max_retries": 0, "steps": [
        {"step_id": "s", "operation": "create", "model_class": "ExecutedObsUnit",
         "data": {"id": new_id(), "obs_unit_id": 999_999, "start_time": "2025-01-01T00:00:00Z", "status": "x"}}]})
    drain_once(env)
    assert buf.status(refused) == "failed" and buf.status(tx.transaction_id) == "replicated"
    for command in (["status", "--json"], ["failed", "list"], ["failed", "retry", refused]):
        assert run(*command, env=env).returncode == 0, command
    drain_once(env)
    new = {key for key in redis_client.scan_iter(count=1000)
           if not key.startswith(f"site:{settings.site}:".encode())} - outside
    # (another test's site, such as a thread it left behind might still write, is not this cycle's)
    assert {key for key in new if not re.match(rb"site:t[0-9a-f]{10}:", key)} == set()
