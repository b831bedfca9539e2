"""Site names: one no drain would reach, or whose keys would mix with another site's, is refused
in one line where it is given (ingest, the CLI, the Dagster resource), before anything is
written; one with spaces or letters beyond ASCII goes through like any other."""

from __future__ import annotations

import json

import pytest
from dagster import DagsterEventType

from obs_pipeline.config import ConfigError, Settings
from obs_pipeline.dagster_defs.jobs import drain_buffer
from obs_pipeline.dagster_defs.resources import ObsPipelineResource
from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline.keys import SiteKeys
from obs_pipeline_tests.conftest import site_keys
from obs_pipeline_tests.examples import seed_example
from obs_pipeline_tests.test_cli import cli, one_line_error

SITE_MAX_BYTES = 200  # as the README says: its spool's `{site}.refused.jsonl` fits a file name

REFUSED = [
    ("", "is empty: no drain reads it (an empty OBS_SITE means 'observatory')"),
    (" ", "begins or ends with whitespace"),
    ("north ", "begins or ends with whitespace"),
    ("\tnorth", "begins or ends with whitespace"),
    ("north\ndome", "holds a control, format or line-break character"),
    ("north\x00", "holds a control, format or line-break character"),
    ("north\u200bdome", "holds a control, format or line-break character"),  # zero-width space
    ("north:dome", "holds ':', which ends the site's part of its Redis keys"),
    ("north/dome", "holds '/', which cannot be in its spool's file name"),
    ("Pampa\u0301",  # "Pampá" decomposed (NFD, as macOS spells file names): looks like the NFC one
     "is not in Unicode's composed form (NFC): write it 'Pampá'"),
    ("n" * (SITE_MAX_BYTES + 1), f"is {SITE_MAX_BYTES + 1} bytes long (UTF-8): at most {SITE_MAX_BYTES}"),
]


def _written(redis_client, name: str) -> list[str]:
    """The keys of that site and of the default one, where a refused name could have written:
    the whole database's size, shared with the other tests, moves as their keys expire (a lease's
    PX: one test failed on 457,863 keys before and 457,862 after)."""
    return site_keys(redis_client, name) + site_keys(redis_client, "observatory")


def _assert_one_line(message: str) -> None:
    assert "\n" not in message and len(message) < 400, message
    assert "OBS_SITE" in message, message


@pytest.mark.parametrize("name, why", REFUSED)
def test_a_script_given_a_site_no_drain_reaches_is_refused_before_anything_is_written(settings, redis_client,
                                                                                     tmp_path, name, why):
    """Found by review: `TransactionBuffer(site="")` buffered under `site::...`, which no drain
    reads (to the CLI and Dagster an empty OBS_SITE is `observatory`): applied never, silently."""
    before = _written(redis_client, name)
    spool = tmp_path / "spool_of_refused"
    with pytest.raises(ConfigError) as refused:
        TransactionBuffer(redis_url=settings.redis_url, site=name, replica_url=settings.replica_db_url,
                          spool_dir=str(spool))
    _assert_one_line(str(refused.value))
    assert why in str(refused.value)
    assert _written(redis_client, name) == before
    assert not redis_client.exists(SiteKeys(name).buffer)
    assert not spool.exists() or not any(spool.iterdir())


@pytest.mark.parametrize("name, why", [r for r in REFUSED if r[0] and "\x00" not in r[0]])  # (no NUL in an env)
def test_the_cli_refuses_such_an_obs_site_in_one_line(settings, redis_client, name, why):
    env = {"OBS_SITE": name, "OBS_REDIS_URL": settings.redis_url, "OBS_MAIN_DB_URL": settings.main_db_url,
           "OBS_REPLICA_DB_URL": settings.replica_db_url}
    before = _written(redis_client, name)
    for command in (("status",), ("drain", "--once"), ("failed", "list")):
        line = one_line_error(cli(*command, env=env))
        assert why in line, (command, line)
    assert _written(redis_client, name) == before


@pytest.mark.parametrize("name, why", [r for r in REFUSED if r[0] and "\x00" not in r[0]])
def test_stack_env_refuses_such_an_obs_site_in_one_line_and_prints_no_exports(stack, name, why):
    """`stack env` printed an OBS_SITE from the environment as given, exit 0: once eval'd, every
    command after it refused the site. It refuses it now, in the same line, exporting nothing."""
    result = cli("stack", "env", "--dir", str(stack.directory), env={"OBS_SITE": name})
    line = one_line_error(result)
    assert line.startswith("obs-pipeline: error: site name ") and why in line, line
    _assert_one_line(line)
    assert result.stdout == ""
    for fine in ("", "north dome", "Pampá"):  # an empty one is `observatory`, as to every command
        result = cli("stack", "env", "--dir", str(stack.directory), env={"OBS_SITE": fine})
        assert result.returncode == 0 and "export OBS_SITE=" in result.stdout, result.stderr


def test_an_empty_obs_site_is_observatory_and_a_bad_one_does_not_refuse_a_site_given_instead():
    assert Settings.from_env({"OBS_SITE": ""}).site == "observatory"
    assert Settings.from_env({"OBS_SITE": "north:dome"}, site="north").site == "north"
    assert Settings(site="n" * SITE_MAX_BYTES).site == "n" * SITE_MAX_BYTES


@pytest.mark.usefixtures("clean_db")
def test_a_dagster_resource_given_an_empty_site_fails_the_run_and_claims_nothing(settings, redis_client):
    """The resource's `site=""` is no site: the run fails saying so (it drained `site::...`,
    nothing, and succeeded)."""
    keys = SiteKeys(settings.site)
    redis_client.lpush(keys.buffer, json.dumps(seed_example(settings.site)[0]))
    resource = ObsPipelineResource(site="", redis_url=settings.redis_url, main_db_url=settings.main_db_url,
                                   replica_db_url=settings.replica_db_url)
    result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, raise_on_error=False,
                                             run_config={"ops": {"drain_batches": {"config": {"idle_exit_s": 0}}}})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE)
    assert "site name '' is empty" in failure.event_specific_data.error.message
    assert redis_client.llen(keys.buffer) == 1
    assert not redis_client.exists(SiteKeys("").lease)


@pytest.mark.usefixtures("clean_db")
def test_a_site_name_with_spaces_and_accents_is_buffered_drained_and_read_back(settings, redis_client, main_engine):
    """What is allowed goes through end to end: the key layout is the contract's, `site:{site}:`."""
    import sqlalchemy as sa

    site = f"cerro {settings.site} ñandú"
    buf = TransactionBuffer(redis_url=settings.redis_url, site=site, replica_url=settings.replica_db_url,
                            spool_dir=settings.spool_dir)
    with buf.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z", "status": "running"})
    assert redis_client.exists(f"site:{site}:transaction:{tx.transaction_id}".encode())
    env = {"OBS_SITE": site, "OBS_REDIS_URL": settings.redis_url, "OBS_MAIN_DB_URL": settings.main_db_url,
           "OBS_REPLICA_DB_URL": settings.replica_db_url}
    drained = cli("drain", "--once", env=env)
    assert drained.returncode == 0, drained.stderr
    assert buf.wait(tx.transaction_id, until="replicated", timeout=30.0)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :id"),
                            {"id": obs["id"]}).scalar() == "running"
    assert buf.get("ExecutedObsUnit", obs["id"])["status"] == "running"
