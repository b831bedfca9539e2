"""Parts of the fixed public surface (shared/contract.md) that users reach directly: building a
buffer from the environment or from keywords, statuses of unknown and in-flight transactions,
producers that add fields of their own, the drain's refusal without a replica, and the
configuration defaults, read when asked for and never at import time."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid

import pytest
import sqlalchemy as sa

import obs_pipeline.apply
from obs_pipeline.config import ConfigError, Settings
from obs_pipeline.drain import Drain, DrainConfig
from obs_pipeline.ingest import InvalidTransaction, TransactionBuffer
from obs_pipeline.keys import SiteKeys
from obs_pipeline_tests.conftest import site_keys
from obs_pipeline_tests.examples import seed_example
from obs_pipeline_tests.test_cli import REDIS_OPTIONS_REFUSED, cli, one_line_error
from obs_pipeline_tests.workload import drain_until_settled


def clear_obs_environment(monkeypatch) -> None:
    for name in [k for k in os.environ if k.startswith("OBS_")]:
        monkeypatch.delenv(name)


def buffer_one_observation(buf: TransactionBuffer) -> tuple[str, str]:
    """A start_observation transaction; its id and the observation's id."""
    with buf.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "running"})
    return tx.transaction_id, obs["id"]


def assert_buffered_under_the_site(buf: TransactionBuffer, redis_client, site: str, tx_id: str, obs_id: str) -> None:
    """The transaction's queue entry, status and caches are under `site:{site}:`, and `get` sees it."""
    prefix = f"site:{site}:"
    queued = [json.loads(e) for e in redis_client.lrange(prefix + "transaction_buffer", 0, -1)]
    assert [e["transaction_id"] for e in queued] == [tx_id]
    assert json.loads(redis_client.get(f"{prefix}transaction:{tx_id}"))["status"] == "pending"
    assert redis_client.exists(f"{prefix}buffered:ExecutedObsUnit:{obs_id}",
                               f"{prefix}cache:ids:ExecutedObsUnit:{obs_id}") == 2
    assert all(k.startswith(prefix) for k in site_keys(redis_client, site))
    assert not redis_client.exists(f"site:observatory:transaction:{tx_id}")  # not under the default site
    assert buf.status(tx_id) == "pending"
    record = buf.get("ExecutedObsUnit", obs_id)
    assert record is not None
    assert record["id"] == obs_id and record["obs_unit_id"] == 1 and record["status"] == "running"


# --- 1. building a buffer -------------------------------------------------------------------------

@pytest.mark.usefixtures("clean_db")
def test_transaction_buffer_from_env_reads_site_redis_replica_models_and_spool(
        stack_urls, site, redis_client, tmp_path, monkeypatch):
    """Observing scripts configure the buffer only through OBS_* variables: each one must be
    honoured (the site's key prefix, its Redis, the replica used to check ids, the models)."""
    clear_obs_environment(monkeypatch)
    monkeypatch.setenv("OBS_SITE", site)
    monkeypatch.setenv("OBS_REDIS_URL", stack_urls["OBS_REDIS_URL"])
    monkeypatch.setenv("OBS_REPLICA_DB_URL", stack_urls["OBS_REPLICA_DB_URL"])
    monkeypatch.setenv("OBS_MODELS", "obs_pipeline.models:Base")
    monkeypatch.setenv("OBS_SPOOL_DIR", str(tmp_path / "spool"))

    buf = TransactionBuffer.from_env()
    try:
        assert buf.site == site
        assert buf.settings.redis_url == stack_urls["OBS_REDIS_URL"]
        assert buf.settings.replica_db_url == stack_urls["OBS_REPLICA_DB_URL"]
        assert buf.settings.spool_dir == str(tmp_path / "spool")
        tx_id, obs_id = buffer_one_observation(buf)
        assert_buffered_under_the_site(buf, redis_client, site, tx_id, obs_id)
        # With a replica configured, an update of an id that exists nowhere is refused at once.
        with pytest.raises(InvalidTransaction, match="neither buffered nor on the replica"):
            buf.update("ExecutedObsUnit", str(uuid.uuid4()), {"status": "completed"})
    finally:
        buf.close()

    monkeypatch.setenv("OBS_MODELS", "obs_pipeline.models:NoSuchBase")  # a setting's error, as OBS_REDIS_URL's
    with pytest.raises(ConfigError, match="^OBS_MODELS='obs_pipeline.models:NoSuchBase' cannot be loaded"):
        TransactionBuffer.from_env()


@pytest.mark.usefixtures("clean_db")
def test_transaction_buffer_keyword_form_uses_its_arguments_without_any_environment(
        stack_urls, site, redis_client, tmp_path, monkeypatch):
    """`TransactionBuffer(redis_url=..., site=..., replica_url=...)` is the other documented way
    in; it must work on a machine where no OBS_* variable is set."""
    clear_obs_environment(monkeypatch)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # the default spool, kept out of ~

    buf = TransactionBuffer(redis_url=stack_urls["OBS_REDIS_URL"], site=site,
                            replica_url=stack_urls["OBS_REPLICA_DB_URL"])
    try:
        assert buf.site == site
        tx_id, obs_id = buffer_one_observation(buf)
        assert_buffered_under_the_site(buf, redis_client, site, tx_id, obs_id)
        with pytest.raises(InvalidTransaction, match="neither buffered nor on the replica"):
            buf.delete("RawDataFile", str(uuid.uuid4()))
    finally:
        buf.close()


@pytest.mark.parametrize("url, message", [
    ("localhost:6379", r"OBS_REDIS_URL='localhost:6379' is not a Redis URL \(Redis URL must specify one of the "
                       r"following schemes \(redis://, rediss://, unix://\)\)"),
    ("redis://u:secret@127.0.0.1:notaport/0", r"OBS_REDIS_URL='redis://\*\*\*@127\.0\.0\.1:notaport/0' is not a "
                                              r"Redis URL \(Port could not be cast to integer value as 'notaport'\)"),
    ("redis://{host}/obs", r"OBS_REDIS_URL='redis://{host}/obs' names the database 'obs': Redis databases are "
                           r"numbers \("),
] + [(url, re.escape(message).replace(r"\{host\}", "{host}")) for url, message in REDIS_OPTIONS_REFUSED])
def test_a_malformed_redis_url_is_one_line_naming_it_and_buffers_nothing(stack_urls, site, redis_client, tmp_path,
                                                                         monkeypatch, url, message):
    """TransactionBuffer() and from_env() with a malformed OBS_REDIS_URL gave an observing
    script redis-py's bare ValueError ("Port could not be cast to integer value as ...": which
    setting?), and with a database that is not a number (/obs) buffered into database 0, where
    every site's keys are. Now one line names the variable, its value (no password) and the
    form it takes, and nothing is buffered or spooled."""
    host = stack_urls["OBS_REDIS_URL"].removeprefix("redis://").split("/")[0]
    url, message = url.format(host=host), message.format(host=re.escape(host))
    clear_obs_environment(monkeypatch)
    monkeypatch.setenv("OBS_SITE", site)
    monkeypatch.setenv("OBS_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("OBS_REDIS_URL", url)
    for build in (TransactionBuffer.from_env, lambda: TransactionBuffer(redis_url=url, site=site)):
        with pytest.raises(ConfigError, match=rf"^{message}.*e\.g\. redis://127\.0\.0\.1:6379/0, or "
                                              r"unix:///path/to/redis\.sock\)?$") as refused:
            buffer_one_observation(build())
        assert "\n" not in str(refused.value) and "secret" not in str(refused.value)
    assert site_keys(redis_client, site) == [] and not (tmp_path / "spool").exists()


# --- 2. unknown transactions ----------------------------------------------------------------------

def test_status_of_an_unknown_transaction_is_none_and_waiting_for_it_is_false(settings, redis_client):
    """A script asking about an id that was never buffered (a typo, another site) gets None,
    not "pending", and `wait` gives up at its timeout with False instead of raising."""
    buf = TransactionBuffer(settings=settings)
    try:
        unknown = str(uuid.uuid4())
        assert buf.status(unknown) is None
        assert buf.wait(unknown, until="replicated", timeout=0.5) is False
        assert site_keys(redis_client, settings.site) == []  # asking wrote nothing
    finally:
        buf.close()


# --- 3. "processing" during a real drain ----------------------------------------------------------

@pytest.mark.usefixtures("clean_db")
def test_transactions_read_processing_while_main_applies_their_batch(settings, monkeypatch):
    """Between the claim and main's commit, `status` must say "processing" (not "pending", not
    yet "applied"); the batch then ends "replicated"."""
    release = threading.Event()
    entered = threading.Event()
    real_apply = obs_pipeline.apply.MainDatabase.apply_batch

    def held_apply(self, transactions):
        entered.set()
        assert release.wait(120), "the test never released the apply"
        return real_apply(self, transactions)

    monkeypatch.setattr(obs_pipeline.apply.MainDatabase, "apply_batch", held_apply)

    buf = TransactionBuffer(settings=settings)
    first, _ = buffer_one_observation(buf)
    second, second_obs = buffer_one_observation(buf)
    assert buf.status(first) == buf.status(second) == "pending"

    drain = Drain(settings, DrainConfig())
    outcome: dict = {}

    def one_step():
        try:
            outcome["report"] = drain.step()
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            outcome["error"] = error

    seen = set()
    worker = threading.Thread(target=one_step, daemon=True)
    try:
        drain.acquire()
        worker.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "processing" not in seen and worker.is_alive():
            seen.add(buf.status(first))
            time.sleep(0.01)
        # the drain marks the batch "processing" as it hands it to its apply thread, which may
        # not have reached main yet: wait for it
        assert entered.wait(10), f"main's apply was not reached; statuses seen {seen}, {outcome}"
        assert "processing" in seen, f"statuses seen while main applied: {seen}"
        assert buf.status(second) == "processing"
    finally:
        release.set()
        if worker.ident is not None:
            worker.join(120)
        drain.close()
    assert not worker.is_alive()
    assert "error" not in outcome, outcome
    assert outcome["report"].applied == 2

    drain_until_settled(settings)
    assert buf.status(first) == buf.status(second) == "replicated"
    assert buf.get("ExecutedObsUnit", second_obs)["status"] == "running"
    buf.close()


# --- 4. a producer's own fields --------------------------------------------------------------------

@pytest.mark.usefixtures("clean_db")
def test_bare_lpush_with_unknown_extra_fields_is_applied_and_replicated_with_the_fields_ignored(
        settings, redis_client, main_engine, replica_engine):
    """The existing producer may add fields of its own, at the top level and inside steps; the
    contract says they are ignored, so the transaction must be applied like any other, not
    dead-lettered."""
    doc, ids = seed_example(settings.site, obs_unit_id=2)
    doc["priority"] = 5
    doc["producer"] = {"name": "legacy", "version": "0.9"}
    doc["overlaid_creates"] = ["a", "name", "ingest uses in another shape"]
    for step in doc["steps"]:
        step["hint"] = "x"
        step["timeout_ms"] = 250
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, json.dumps(doc))

    drain_until_settled(settings)

    assert redis_client.llen(keys.failed) == 0
    with main_engine.connect() as conn:
        obs = conn.execute(sa.text("SELECT obs_unit_id, status FROM executed_obs_unit WHERE id = :i"),
                           {"i": ids["uuid-1"]}).all()
        packages = conn.execute(sa.text("SELECT name FROM raw_data_package WHERE executed_obs_unit_id = :i"),
                                {"i": ids["uuid-1"]}).scalars().all()
        files = conn.execute(sa.text("SELECT id::text, name FROM raw_data_file WHERE raw_data_package_id = :p "
                                     "ORDER BY name"), {"p": ids["uuid-2"]}).all()
        applied = conn.execute(sa.text("SELECT count(*) FROM obs_pipeline_applied WHERE transaction_id = :t"),
                               {"t": doc["transaction_id"]}).scalar_one()
    assert obs == [(2, "running")]
    assert packages == ["obs_123_package"]
    assert files == [(ids["uuid-3"], "file1.fits"), (ids["uuid-4"], "file2.fits")]
    assert applied == 1
    buf = TransactionBuffer(settings=settings)
    try:
        assert buf.status(doc["transaction_id"]) == "replicated"
        assert buf.get("RawDataFile", ids["uuid-4"])["name"] == "file2.fits"  # from the replica now
    finally:
        buf.close()
    with replica_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM raw_data_file WHERE raw_data_package_id = :p"),
                            {"p": ids["uuid-2"]}).scalar_one() == 2


# --- 5. the drain without a replica --------------------------------------------------------------

def test_drain_once_without_replica_url_refuses_with_one_line_and_leaves_the_buffer(settings, redis_client):
    """Without the replica the drain could never know when to clean the caches: it must refuse
    to start, say which variable to set, and touch nothing."""
    buf = TransactionBuffer(settings=settings)
    tx_id, _ = buffer_one_observation(buf)
    keys = SiteKeys(settings.site)
    queued = redis_client.lrange(keys.buffer, 0, -1)
    before = site_keys(redis_client, settings.site)
    env = {"OBS_SITE": settings.site, "OBS_REDIS_URL": settings.redis_url, "OBS_MAIN_DB_URL": settings.main_db_url}

    line = one_line_error(cli("drain", "--once", env=env))

    assert "OBS_REPLICA_DB_URL" in line, line
    assert redis_client.lrange(keys.buffer, 0, -1) == queued
    assert site_keys(redis_client, settings.site) == before
    assert not redis_client.exists(keys.processing, keys.lease)
    assert buf.status(tx_id) == "pending"
    buf.close()


# --- 6. configuration ----------------------------------------------------------------------------

def test_settings_defaults_when_no_obs_variable_is_set(monkeypatch):
    """The documented defaults: a site script with nothing configured talks to the local Redis
    as site "observatory" with the built-in models, and has no databases."""
    clear_obs_environment(monkeypatch)
    settings = Settings.from_env()
    assert settings.site == "observatory"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.models == "obs_pipeline.models:Base"
    assert settings.main_db_url is None
    assert settings.replica_db_url is None


def test_no_module_reads_the_environment_at_import_time(tmp_path):
    """A variable changed after import (a script that sets OBS_SITE itself, Dagster loading
    `defs` before a run's environment exists) must be the one used."""
    code = """
import os
import obs_pipeline.ingest, obs_pipeline.config, obs_pipeline.drain, obs_pipeline.definitions
from obs_pipeline.config import ConfigError, Settings
from obs_pipeline.dagster_defs.resources import ObsPipelineResource
from obs_pipeline.ingest import TransactionBuffer
os.environ["OBS_SITE"] = "changed_after_import"
os.environ["OBS_MODELS"] = "obs_pipeline.models:Base"
print(Settings.from_env().site)
print(ObsPipelineResource().settings().site)
buf = TransactionBuffer.from_env()
print(buf.site)
buf.close()
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OBS_")}
    env.update(OBS_SITE="from_env_at_import", OBS_MODELS="obs_pipeline.models:NoSuchBase",
               OBS_SPOOL_DIR=str(tmp_path / "spool"), OBS_REDIS_URL="redis://127.0.0.1:1/0")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["changed_after_import"] * 3


@pytest.mark.usefixtures("clean_db")
def test_a_unix_socket_redis_url_buffers_drains_and_reads(stack, settings, redis_client):
    """OBS_REDIS_URL may be `unix://`: a script on Redis's own host skips TCP. The local stack's
    Redis listens on a socket in its folder too; ingest, the drain and reads all work through it."""
    import dataclasses

    socket = stack.status()["redis"]["socket"]
    assert socket and os.path.exists(socket), stack.status()["redis"]
    local = dataclasses.replace(settings, redis_url=f"unix://{socket}")
    buf = TransactionBuffer(settings=local)
    tx_id, obs_id = buffer_one_observation(buf)
    assert redis_client.exists(SiteKeys(settings.site).transaction(tx_id)) == 1  # the same Redis
    drain_until_settled(local)
    assert buf.status(tx_id) == "replicated"
    assert buf.get("ExecutedObsUnit", obs_id)["status"] == "running"
    buf.close()
