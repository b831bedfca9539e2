"""Main and the site's replica on diverged timelines of one cluster (same system identifier).

A failover promotes a standby S (a new timeline, forked at F) and OBS_MAIN_DB_URL is pointed at
it, while the site's replica R still follows the old primary M, which goes on taking writes: R's
replay position on the old timeline runs far past F, so past the LSNs of S's commits, which R
never receives. Compared as bare LSNs, the drain took them for replayed and cleaned the caches:
reads at the site lost the records. (And the other way round: the old primary reused as main
while R followed S past F.)"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import uuid

import pytest
import sqlalchemy as sa

from obs_pipeline.drain import Drain, DrainConfig
from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline.keys import SiteKeys
from obs_pipeline.model_registry import ModelRegistry
from obs_pipeline.schema import create_schema
from obs_pipeline_tests.conftest import OBS_UNIT_IDS


def _replayed(url: str, target: str) -> bool:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return bool(conn.execute(sa.text("SELECT pg_last_wal_replay_lsn() >= CAST(:t AS pg_lsn)"),
                                     {"t": target}).scalar())
    finally:
        engine.dispose()


def _primary_with_units(server, url: str, *more_sql: str) -> str:
    """`server` started as a primary with the models' schema, OBS_UNIT_IDS' obs units and
    `more_sql`; its flush LSN after them."""
    server.init_primary()
    server.start()
    server.ensure_databases(["obs"])
    engine = sa.create_engine(url)
    try:
        create_schema(engine, ModelRegistry.from_path("obs_pipeline.models:Base"))
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES " +
                                 ", ".join(f"({i}, 'unit {i}')" for i in OBS_UNIT_IDS)))
            for sql in more_sql:
                conn.execute(sa.text(sql))
            return conn.execute(sa.text("SELECT pg_current_wal_flush_lsn()::text")).scalar()
    finally:
        engine.dispose()


def _servers(stack, *names: str) -> tuple[list, dict, int]:
    """PostgreSQL servers of a test's own in the stack's folder (not started), by name; their
    URLs; and one more free port (a proxy's, or one that nothing listens on)."""
    from obs_pipeline.stack.osutil import pick_free_ports
    from obs_pipeline.stack.postgres import HOST, PgServer

    user = stack._pg_user(create=False)
    folder = stack.directory / "postgres"
    *ports, spare = pick_free_ports(len(names) + 1)
    servers = [PgServer(name, folder / name, port, stack.log_path(name), stack.log_path("pg_ctl"), user)
               for name, port in zip(names, ports)]
    return servers, {x: f"postgresql+psycopg2://postgres@{HOST}:{x.port}/obs" for x in servers}, spare


def _primary_with_two_standbys(primary, first, second, url: dict) -> None:
    """`primary` made (_primary_with_units), `first` a standby of it by its slot and `second` one
    without (pg_basebackup -R: it streams the primary's WAL alone), both started and caught up."""
    from obs_pipeline.stack.osutil import wait_until
    from obs_pipeline.stack.postgres import HOST

    target = _primary_with_units(primary, url[primary], "CREATE TABLE filler (x text)")
    first.clone_from(primary)
    first.set_upstream(primary.port)
    second._tool("pg_basebackup", ["-D", str(second.datadir), "-h", HOST, "-p", str(primary.port), "-U", "postgres",
                                   "-R", "-X", "stream", "--checkpoint=fast"], f"pg_basebackup from {primary.datadir.name}")
    second.set_upstream(primary.port)
    first.start()
    second.start()
    assert wait_until(lambda: _replayed(url[first], target) and _replayed(url[second], target), 60)


@pytest.fixture(scope="module")
def forked(stack):
    """URLs by name: M ("old") with standbys R ("replica", by slot) and S; S promoted ("promoted",
    timeline 2), and T ("follower"), a standby cloned from S. Each test makes the standby it
    drains with replay past main's LSNs (_runs_ahead)."""
    servers, url, _ = _servers(stack, "tl_main", "tl_replica", "tl_standby", "tl_follower")
    m, r, s, t = servers
    try:
        _primary_with_two_standbys(m, r, s, url)
        assert s.query("SELECT pg_promote(true, 60)") == (True,)
        t.clone_from(s)
        t.set_upstream(s.port)
        t.start()
        yield {"old": url[m], "promoted": url[s], "replica": url[r], "follower": url[t]}
    finally:
        for server in reversed(servers):
            server.stop(mode="immediate")


def _runs_ahead(writer: str, reader: str, main: str) -> None:
    """`writer` (the primary `reader` streams from) writes until `reader` has replayed past
    main's position by a megabyte or more: main's next commits are at LSNs it has replayed
    other WAL at."""
    from obs_pipeline.stack.osutil import wait_until

    engines = [sa.create_engine(url) for url in (writer, main)]
    try:
        with engines[1].connect() as conn:
            beyond = conn.execute(sa.text("SELECT pg_current_wal_flush_lsn() + 1048576")).scalar()
        while True:
            with engines[0].begin() as conn:
                conn.execute(sa.text("INSERT INTO filler SELECT repeat('x', 200) FROM generate_series(1, 20000)"))
                target = conn.execute(sa.text("SELECT pg_current_wal_flush_lsn()::text")).scalar()
                if conn.execute(sa.text("SELECT CAST(:t AS pg_lsn) > CAST(:b AS pg_lsn)"),
                                {"t": target, "b": beyond}).scalar():
                    break
        assert wait_until(lambda: _replayed(reader, target), 60)
    finally:
        for engine in engines:
            engine.dispose()


def _buffer_one(settings) -> tuple[TransactionBuffer, str, int]:
    buf = TransactionBuffer(settings=settings)
    with buf.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "running"})
    return buf, tx.transaction_id, obs["id"]


def _assert_kept(buf, redis_client, settings, tx_id, obs_id, summary, caplog) -> None:
    keys = SiteKeys(settings.site)
    got = buf.get("ExecutedObsUnit", obs_id)
    assert got is not None and got["status"] == "running", got  # the site still reads it
    assert buf.status(tx_id) == "applied"
    assert redis_client.exists(keys.buffered("ExecutedObsUnit", obs_id)) == 1
    assert redis_client.zcard(keys.awaiting_replication) == 1
    assert summary.replica_stalled and "timeline" in summary.stopped_because, summary.stopped_because
    said = [r.getMessage() for r in caplog.records if "timeline" in r.getMessage()]
    assert len(said) == 1 and "OBS_REPLICA_DB_URL" in said[0], said


def _run(settings, caplog):
    drain = Drain(settings, DrainConfig(replication_timeout_s=0.5))
    with caplog.at_level(logging.WARNING, logger="obs_pipeline.drain"):
        try:
            return drain.run(until_empty=True, replica_patience_s=1.0, budget_s=30)
        finally:
            drain.close()


def _obs_unit_made_by_hand(url: str, unit_id: int, name: str) -> None:
    """An obs unit made on the server at `url` by hand, not through the buffer."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO obs_unit (id, name) VALUES (:i, :n)"), {"i": unit_id, "n": name})
    finally:
        engine.dispose()


def test_a_replica_left_on_the_old_timeline_after_a_failover_never_has_the_drain_clean_caches(
        settings, forked, redis_client, caplog):
    failed_over = dataclasses.replace(settings, main_db_url=forked["promoted"], replica_db_url=forked["replica"])
    _runs_ahead(forked["old"], forked["replica"], main=forked["promoted"])  # M goes on, R replays it
    buf, tx_id, obs_id = _buffer_one(failed_over)
    summary = _run(failed_over, caplog)
    engine = sa.create_engine(forked["promoted"])
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit")).scalar() == 1
    engine.dispose()
    _assert_kept(buf, redis_client, failed_over, tx_id, obs_id, summary, caplog)
    buf.close()

    following = dataclasses.replace(failed_over, replica_db_url=forked["follower"])  # one that follows main
    buf = TransactionBuffer(settings=following)
    drain = Drain(following, DrainConfig(replication_timeout_s=10))
    try:
        summary = drain.run(until_empty=True, budget_s=30)
    finally:
        drain.close()
    assert summary.replicated == 1 and summary.stopped_because == "buffer empty", summary
    assert buf.status(tx_id) == "replicated"
    assert redis_client.zcard(SiteKeys(settings.site).awaiting_replication) == 0
    assert buf.get("ExecutedObsUnit", obs_id)["status"] == "running"  # from the follower
    buf.close()


def test_the_old_primary_as_main_while_the_replica_follows_the_promoted_one_cleans_no_caches(
        settings, forked, redis_client, caplog):
    reused = dataclasses.replace(settings, main_db_url=forked["old"], replica_db_url=forked["follower"])
    _runs_ahead(forked["promoted"], forked["follower"], main=forked["old"])  # S goes on, T replays it
    buf, tx_id, obs_id = _buffer_one(reused)
    summary = _run(reused, caplog)
    _assert_kept(buf, redis_client, reused, tx_id, obs_id, summary, caplog)
    buf.close()


def test_status_says_the_replica_replays_another_timeline(settings, forked):
    from obs_pipeline_tests.test_cli import cli

    env = {"OBS_SITE": settings.site, "OBS_REDIS_URL": settings.redis_url, "OBS_MAIN_DB_URL": forked["promoted"],
           "OBS_REPLICA_DB_URL": forked["replica"]}
    report = json.loads(cli("status", "--json", env=env).stdout)
    assert report["status"] == "unhealthy", report
    assert len(report["problems"]) == 1 and "replays timeline 1 of main's cluster, main writes timeline 2" in \
        report["problems"][0], report
    env["OBS_REPLICA_DB_URL"] = forked["follower"]
    report = json.loads(cli("status", "--json", env=env).stdout)
    assert report["status"] == "healthy", report


def test_the_sensor_launches_no_run_for_a_replica_on_another_timeline(settings, forked, caplog):
    """Its replay position on the old timeline passed for the replay of the oldest batch: the
    sensor launched a run at each tick, each waiting replication_timeout_s to clean nothing."""
    from dagster import SkipReason, instance_for_test

    failed_over = dataclasses.replace(settings, main_db_url=forked["promoted"], replica_db_url=forked["replica"])
    _runs_ahead(forked["old"], forked["replica"], main=forked["promoted"])
    buf, tx_id, _ = _buffer_one(failed_over)
    _run(failed_over, caplog)
    assert buf.status(tx_id) == "applied"
    buf.close()
    with instance_for_test() as instance:
        skip, _ = _tick(instance, failed_over, None)
    assert isinstance(skip, SkipReason), skip
    assert "replays timeline 1 of main's cluster, main writes timeline 2" in skip.skip_message, skip.skip_message


def _counted_asks_of_main(monkeypatch) -> list:
    """The calls to ObsPipelineResource.main_identity (each a new connection to main), counted."""
    from obs_pipeline.dagster_defs.resources import ObsPipelineResource

    asked = []
    ask = ObsPipelineResource.main_identity

    def counted(resource):
        asked.append(1)
        return ask(resource)

    monkeypatch.setattr(ObsPipelineResource, "main_identity", counted)
    return asked


def _recheck_after(monkeypatch, seconds: float) -> None:
    """The sensor asks main again once `seconds` have passed since it last did."""
    monkeypatch.setattr("obs_pipeline.dagster_defs.sensors.MAIN_TIMELINE_RECHECK_S", seconds)


def _tick(instance, site, cursor: str | None):
    """One evaluation of buffer_sensor as the daemon makes it, given the cursor the tick before
    left: what it returned, and the cursor it leaves for the next."""
    from dagster import build_sensor_context

    from obs_pipeline.dagster_defs.resources import ObsPipelineResource
    from obs_pipeline.dagster_defs.sensors import buffer_sensor

    resource = ObsPipelineResource(site=site.site, redis_url=site.redis_url, main_db_url=site.main_db_url,
                                   replica_db_url=site.replica_db_url)
    context = build_sensor_context(instance=instance, resources={"obs_pipeline": resource}, cursor=cursor)
    return buffer_sensor(context), context.cursor


def test_the_sensor_asks_main_again_only_every_30_s_while_the_replica_stays_on_another_timeline(
        settings, forked, caplog, monkeypatch):
    """A replica left on the old timeline for hours: the sensor asked main which timeline it
    writes at every tick (minimum_interval_seconds=1), a new connection to a far main each. It
    keeps main's answer in its cursor and asks again once MAIN_TIMELINE_RECHECK_S has passed,
    as the drain does."""
    from dagster import SkipReason, instance_for_test

    failed_over = dataclasses.replace(settings, main_db_url=forked["promoted"], replica_db_url=forked["replica"])
    buf, tx_id, _ = _buffer_one(failed_over)
    _run(failed_over, caplog)
    assert buf.status(tx_id) == "applied"
    buf.close()
    asked = _counted_asks_of_main(monkeypatch)
    _recheck_after(monkeypatch, 3600.0)  # (a slow host's ticks stay within it)
    cursor = None
    with instance_for_test() as instance:
        for _ in range(3):
            skip, cursor = _tick(instance, failed_over, cursor)
            assert isinstance(skip, SkipReason), skip
            assert "replays timeline 1 of main's cluster, main writes timeline 2" in skip.skip_message, \
                skip.skip_message
        assert len(asked) == 1, f"main asked {len(asked)} times in 3 ticks"
        _recheck_after(monkeypatch, 0.0)  # as if it had passed since
        skip, cursor = _tick(instance, failed_over, cursor)
    assert "replays timeline 1 of main's cluster, main writes timeline 2" in skip.skip_message, skip.skip_message
    assert len(asked) == 2, f"main asked {len(asked)} times in 4 ticks"


def test_the_sensor_launches_a_run_on_main_s_kept_answer_once_the_replica_replays(
        settings, forked, redis_client, caplog, monkeypatch):
    """Main's answer kept in the cursor counts as main's: a replica on that timeline, which the
    last acknowledgement did not record (a failover since), gets a run once it replays the
    batches, as when main was asked at every tick."""
    from dagster import RunRequest, SkipReason, instance_for_test

    from obs_pipeline.stack.osutil import wait_until
    from obs_pipeline_tests.workload import replay_paused

    site = dataclasses.replace(settings, main_db_url=forked["promoted"], replica_db_url=forked["follower"])
    follower, main = sa.create_engine(forked["follower"]), sa.create_engine(forked["promoted"])
    asked = _counted_asks_of_main(monkeypatch)
    _recheck_after(monkeypatch, 3600.0)  # (a slow host's wait for the replay stays within it)
    try:
        with instance_for_test() as instance:
            with replay_paused(follower):
                buf, tx_id, _ = _buffer_one(site)
                _run(site, caplog)
                assert buf.status(tx_id) == "applied"
                buf.close()
                # as recorded before a failover (main writes timeline 2, the follower replays it)
                redis_client.hset(SiteKeys(site.site).stats, "main_timeline", 1)
                skip, cursor = _tick(instance, site, None)
                assert isinstance(skip, SkipReason), skip
                assert "has replayed up to" in skip.skip_message, skip.skip_message
            with main.connect() as conn:
                committed = conn.execute(sa.text("SELECT pg_current_wal_flush_lsn()::text")).scalar()
            assert wait_until(lambda: _replayed(forked["follower"], committed), 60)
            run, cursor = _tick(instance, site, cursor)
    finally:
        follower.dispose()
        main.dispose()
    assert isinstance(run, RunRequest), run.skip_message
    assert len(asked) == 1, f"main asked {len(asked)} times in 2 ticks"


def test_batches_recorded_on_an_earlier_timeline_are_cleaned_once_main_and_the_replica_share_one(
        settings, main_engine, replica_engine, redis_client, clean_db):
    """A failover with nothing buffered since: the commits awaiting the replica were recorded
    with the old timeline, main and the replica (which followed it) are on the new one. The
    drain asks main which it writes (once a run), not only the recorded one: the recorded one
    held every such batch's caches until new work came, the line blaming the replica."""
    from obs_pipeline_tests.conftest import wait_for_replica
    from obs_pipeline_tests.workload import replay_paused

    keys = SiteKeys(settings.site)
    buf, tx_id, obs_id = _buffer_one(settings)
    with replay_paused(replica_engine):
        drain = Drain(settings, DrainConfig(replication_timeout_s=0.2))
        try:
            drain.run(until_empty=True, replica_patience_s=0.5, budget_s=30)
        finally:
            drain.close()
    assert buf.status(tx_id) == "applied"
    wait_for_replica(main_engine, replica_engine)
    redis_client.hset(keys.stats, "main_timeline", 0)  # as recorded before a failover (main writes 1)
    drain = Drain(settings, DrainConfig(replication_timeout_s=5))
    try:
        summary = drain.run(until_empty=True, replica_patience_s=2, budget_s=30)
    finally:
        drain.close()
    assert summary.replicated == 1 and summary.stopped_because == "buffer empty", summary
    assert buf.status(tx_id) == "replicated"
    assert buf.get("ExecutedObsUnit", obs_id)["status"] == "running"
    buf.close()


@pytest.fixture
def cascaded(stack, tmp_path):
    """A failover to come, on servers of their own: M ("main") the primary, S ("standby") its
    standby, R ("replica") a standby of S, which follows S onto its new timeline once S is
    promoted; and P ("proxy"), a port forwarding to M, then (`fail_over`) to S: the address
    OBS_MAIN_DB_URL names stays the same across the failover, as a DNS name or a VIP does."""
    from obs_pipeline.stack.osutil import wait_until
    from obs_pipeline.stack.postgres import HOST
    from obs_pipeline.stack.proxy_process import start_proxy, stop_proxy

    servers, url, proxy_port = _servers(stack, "fo_main", "fo_standby", "fo_replica")
    m, s, r = servers
    pidfile, log = tmp_path / "proxy.json", tmp_path / "proxy.log"
    try:
        target = _primary_with_units(m, url[m])
        s.clone_from(m)
        s.set_upstream(m.port)
        s.start()
        r.clone_from(s)  # (with a slot on S of its own)
        r.set_upstream(s.port)
        r.start()
        assert wait_until(lambda: _replayed(url[r], target), 60)
        start_proxy(proxy_port, m.port, 0, pidfile, log)

        def fail_over() -> None:
            """M stops (its last commits streamed to S first), S is promoted, P forwards to S."""
            flushed = m.query("SELECT pg_current_wal_flush_lsn()::text")[0]
            assert wait_until(lambda: _replayed(url[s], flushed), 60)
            stop_proxy(pidfile)
            m.stop()
            assert s.query("SELECT pg_promote(true, 60)") == (True,)
            start_proxy(proxy_port, s.port, 0, pidfile, log)

        yield {"main": f"postgresql+psycopg2://postgres@{HOST}:{proxy_port}/obs", "replica": url[r],
               "fail_over": fail_over}
    finally:
        stop_proxy(pidfile)
        for server in reversed(servers):
            server.stop(mode="immediate")
            shutil.rmtree(server.datadir, ignore_errors=True)  # the next test's are made afresh


def test_an_idle_drain_cleans_after_a_failover_of_main_with_no_new_work(settings, cascaded, redis_client, caplog):
    """A long-running `obs-pipeline drain`: a batch committed on main M awaits the replica (its
    replay paused); M fails over to S (same address) with nothing buffered since, and the replica,
    following S, replays the batch on S's new timeline. The drain kept main's timeline as its
    session on M said (1) and took the replica's (2) for another timeline: it kept the caches until
    new work came, the log line blaming the replica. It asks main again now, and cleans."""
    import threading
    import time

    from obs_pipeline.stack.osutil import wait_until

    site = dataclasses.replace(settings, main_db_url=cascaded["main"], replica_db_url=cascaded["replica"])
    replica = sa.create_engine(site.replica_db_url)
    with replica.connect() as conn:
        conn.execute(sa.text("SELECT pg_wal_replay_pause()"))
    buf, tx_id, obs_id = _buffer_one(site)
    drain = Drain(site, DrainConfig(replication_timeout_s=0.5))
    stop = threading.Event()
    summary = []
    worker = threading.Thread(target=lambda: summary.append(drain.run(until_empty=False, should_stop=stop.is_set)))
    try:
        with caplog.at_level(logging.WARNING, logger="obs_pipeline.drain"):
            worker.start()
            assert wait_until(lambda: buf.status(tx_id) == "applied", 30)
            cascaded["fail_over"]()
            with replica.connect() as conn:
                conn.execute(sa.text("SELECT pg_wal_replay_resume()"))
            began = time.monotonic()
            replicated = wait_until(lambda: buf.status(tx_id) == "replicated", 45)
            waited = time.monotonic() - began
    finally:
        stop.set()
        worker.join(60)
        drain.close()
        replica.dispose()
    blamed = [r.getMessage() for r in caplog.records if "timeline" in r.getMessage()]
    assert replicated, f"not cleaned {waited:.0f} s after the failover; the drain said {blamed}"
    assert not blamed  # (main asked again before the replica's other timeline was blamed)
    assert redis_client.zcard(SiteKeys(settings.site).awaiting_replication) == 0
    assert buf.get("ExecutedObsUnit", obs_id)["status"] == "running"  # from the replica now
    assert summary and summary[0].stopped_because == "asked to stop", summary
    buf.close()


def test_the_sensor_launches_a_run_after_a_failover_of_main_with_no_new_work(settings, cascaded, redis_client):
    """The same failover, no drain running: the sensor knew main's timeline only as the last
    acknowledgement recorded it (1), took the replica's (2) for another timeline and launched no
    run, its skip reason blaming the replica, until new work came. It asks main where the two
    differ now: a run is launched, and it cleans."""
    from dagster import RunRequest, instance_for_test

    from obs_pipeline.lsn import REPLAY_TIMELINE_SQL
    from obs_pipeline.stack.osutil import wait_until

    site = dataclasses.replace(settings, main_db_url=cascaded["main"], replica_db_url=cascaded["replica"])
    replica = sa.create_engine(site.replica_db_url)
    with replica.connect() as conn:
        conn.execute(sa.text("SELECT pg_wal_replay_pause()"))
    buf, tx_id, obs_id = _buffer_one(site)
    drain = Drain(site, DrainConfig(replication_timeout_s=0.2))
    try:
        drain.run(until_empty=True, replica_patience_s=0.5, budget_s=30)
    finally:
        drain.close()
    assert buf.status(tx_id) == "applied"
    cascaded["fail_over"]()

    def on_timeline_2() -> bool:
        with replica.connect() as conn:
            return conn.execute(sa.text(REPLAY_TIMELINE_SQL)).one()[2] == 2

    try:
        with replica.connect() as conn:
            conn.execute(sa.text("SELECT pg_wal_replay_resume()"))
        assert wait_until(on_timeline_2, 30)
    finally:
        replica.dispose()
    with instance_for_test() as instance:
        tick, _ = _tick(instance, site, None)
    assert isinstance(tick, RunRequest), tick.skip_message
    drain = Drain(site, DrainConfig(replication_timeout_s=5))
    try:
        summary = drain.run(until_empty=True, replica_patience_s=2, budget_s=30)
    finally:
        drain.close()
    assert summary.replicated == 1 and buf.status(tx_id) == "replicated", summary
    assert buf.get("ExecutedObsUnit", obs_id)["status"] == "running"
    buf.close()


@pytest.fixture
def async_standby(stack):
    """A failover to an asynchronous standby, on servers of their own: M ("main", timeline 1)
    with S ("standby"), an asynchronous standby of it. `fail_over()` stops M, promotes S
    (timeline 2, with what M had sent it) and clones T ("follower") from S, a standby that
    follows it: the site's replica after the failover. Before it the site has no replica to
    speak of ("nowhere", a closed port): the caches of what the drain commits on M stay."""
    from types import SimpleNamespace

    from obs_pipeline.stack.osutil import wait_until
    from obs_pipeline.stack.postgres import HOST

    servers, url, closed = _servers(stack, "af_main", "af_standby", "af_follower")
    m, s, t = servers
    try:
        target = _primary_with_units(m, url[m], "CREATE TABLE filler (x text)")
        s.clone_from(m)
        s.set_upstream(m.port)
        s.start()
        assert wait_until(lambda: _replayed(url[s], target), 60)

        def fail_over() -> None:
            m.stop(mode="immediate")
            if not s.running:
                s.start()
            assert s.query("SELECT pg_promote(true, 60)") == (True,)
            t.clone_from(s)
            t.set_upstream(s.port)
            t.start()

        def fail_over_again() -> None:
            """A second failover: S stops, T (stopped by `stop_follower`, with what S had sent
            it) is promoted (timeline 3)."""
            s.stop(mode="immediate")
            if not t.running:
                t.start()
            assert t.query("SELECT pg_promote(true, 60)") == (True,)

        yield SimpleNamespace(main=url[m], standby=url[s], follower=url[t],
                              nowhere=f"postgresql+psycopg2://postgres@{HOST}:{closed}/obs",
                              stop_standby=lambda: s.stop(mode="immediate"),
                              stop_follower=lambda: t.stop(mode="immediate"), fail_over_again=fail_over_again,
                              standby_has_main_s_wal=lambda: wait_until(lambda: _replayed(
                                  url[s], m.query("SELECT pg_current_wal_flush_lsn()::text")[0]), 30),
                              fail_over=fail_over)
    finally:
        for server in reversed(servers):
            server.stop(mode="immediate")
            shutil.rmtree(server.datadir, ignore_errors=True)  # the next test's are made afresh


def _write_past(writer: str, reader: str, lsn: int) -> None:
    """`writer` (the primary `reader` streams from) writes until its WAL is past `lsn`, and
    `reader` has replayed it: a position on its timeline beyond a commit made on another."""
    from obs_pipeline.lsn import int_to_lsn
    from obs_pipeline.stack.osutil import wait_until

    engine = sa.create_engine(writer)
    try:
        while True:
            with engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO filler SELECT repeat('x', 200) FROM generate_series(1, 5000)"))
                target = conn.execute(sa.text("SELECT pg_current_wal_flush_lsn()::text")).scalar()
                if conn.execute(sa.text("SELECT CAST(:t AS pg_lsn) > CAST(:b AS pg_lsn)"),
                                {"t": target, "b": int_to_lsn(lsn)}).scalar():
                    break
        assert wait_until(lambda: _replayed(reader, target), 60)
    finally:
        engine.dispose()


def _recorded_then_on_main_only(settings, async_standby, caplog) -> tuple:
    """An observation made and drained to M, and on S; S stopped then: what M commits next is
    on M only, lost in the failover. (site, buffer, the create's id, the observation's id.)"""
    site = dataclasses.replace(settings, main_db_url=async_standby.main, replica_db_url=async_standby.nowhere)
    buf, created_id, obs_id = _buffer_one(site)
    _drain_once(site, caplog, replication_timeout_s=0.2)
    assert async_standby.standby_has_main_s_wal()  # the record is on S
    async_standby.stop_standby()
    return site, buf, created_id, obs_id


def _refused_once_lost(settings, async_standby, caplog, status: str = "lost", then: str | None = None) -> tuple:
    """H, committed on M only: an update of the observation (status `status`) that also renames
    obs unit 777, made on M by hand after S stopped, so that the promoted S refuses H until 777
    is made there too; `then`: an update of the observation to that status buffered after H and
    drained with it. (site, buffer, the create's id, the observation's id, H, that update's id.)"""
    site, buf, created_id, obs_id = _recorded_then_on_main_only(settings, async_standby, caplog)
    _obs_unit_made_by_hand(async_standby.main, 777, "by hand")
    with buf.transaction(endpoint="finish") as refused:
        refused.update("ExecutedObsUnit", obs_id, {"status": status})
        refused.update("ObsUnit", 777, {"name": "renamed"})
    then_id = buf.update("ExecutedObsUnit", obs_id, {"status": then}) if then is not None else None
    _drain_once(site, caplog, replication_timeout_s=0.2)
    assert buf.status(refused.transaction_id) == "applied" and (then_id is None or buf.status(then_id) == "applied")
    return site, buf, created_id, obs_id, refused, then_id


def _settled_by_an_idle_step(site, caplog, **config) -> None:
    """One step of a drain with nothing to claim: its cleanup settles the failover (one line
    says what main lost), then it stops, what it buffered again left unclaimed in `processing`."""
    drain = Drain(site, DrainConfig(replication_timeout_s=10, **config))
    try:
        drain.acquire()
        with caplog.at_level(logging.WARNING, logger="obs_pipeline.drain"):
            drain.step()
    finally:
        drain.close()
    assert len(_lost_line(caplog)) == 1, _lost_line(caplog)


def _a_newer_update_waiting(site, buf: TransactionBuffer, obs_id: str, redis_client, caplog,
                            retry_base_s: float = 60):
    """Q: a newer update of the observation (status "newer") that main refuses for now (it also
    creates an observation of obs unit 999, which main lacks): it waits to retry, holding the row."""
    with buf.transaction(endpoint="finish") as newer:
        newer.update("ExecutedObsUnit", obs_id, {"status": "newer"})
        newer.create("ExecutedObsUnit", {"obs_unit_id": 999, "start_time": "2025-01-03T00:00:00Z",
                                         "status": "running"})
    _drain_once(site, caplog, replication_timeout_s=0.2, retry_base_s=retry_base_s)
    assert redis_client.zcard(SiteKeys(site.site).retry) == 1  # Q waits to retry, holding the row
    return newer


def _fail_over_past_the_last_commit(settings, async_standby, redis_client):
    """M fails, S is promoted; S writes past the last commit the drain made on M, and the
    site's replica (T, following S) replays it: its LSN is passed without its rows. The site's
    settings now (main S, replica T)."""
    async_standby.fail_over()
    _write_past(async_standby.standby, async_standby.follower, int(redis_client.zrange(
        SiteKeys(settings.site).awaiting_replication, -1, -1, withscores=True)[0][1]))
    return dataclasses.replace(settings, main_db_url=async_standby.standby, replica_db_url=async_standby.follower)


def _drain_until_dead_lettered(site, caplog, buf: TransactionBuffer, tx_id: str, **config):
    """Drain, retries 0.05 s apart and more, until `tx_id` is dead-lettered (20 runs at most); the
    last run's summary."""
    import time

    for _ in range(20):
        summary = _drain_once(site, caplog, retry_base_s=0.05, **config)
        if buf.status(tx_id) == "failed":
            break
        time.sleep(0.5)
    return summary


def _operator(site, *args: str) -> None:
    """`obs-pipeline ARGS` as the site's operator runs it (its Redis, main and replica)."""
    from obs_pipeline_tests.test_cli import cli

    env = {"OBS_SITE": site.site, "OBS_REDIS_URL": site.redis_url, "OBS_MAIN_DB_URL": site.main_db_url,
           "OBS_REPLICA_DB_URL": site.replica_db_url}
    result = cli(*args, env=env)
    assert result.returncode == 0, result.stderr


def _assert_settled(async_standby, redis_client, site: str, obs_id: str, tx_ids: list[str], status: str) -> None:
    """On S, the new main: the observation once, each of `tx_ids` applied once, its status
    `status`; in Redis, nothing queued, retrying or holding a row."""
    from obs_pipeline_tests.test_reliability import assert_no_holds, assert_queues_empty

    assert _on_main(async_standby.standby, obs_id, tx_ids) == (1, len(tx_ids), status)
    assert_queues_empty(redis_client, site)
    assert_no_holds(redis_client, SiteKeys(site))


def _a_lost_package_and_a_newer_update_waiting(settings, async_standby, redis_client, caplog) -> tuple:
    """L, a data package of the observation (it reads the observation's row, writes its own),
    committed on M only; Q, a newer update of the observation, waits to retry holding its row;
    then the failover that loses L. (The site's settings now, the buffer, the create's id, the
    observation's id, L, the package, Q.)"""
    site, buf, created_id, obs_id = _recorded_then_on_main_only(settings, async_standby, caplog)
    with buf.transaction(endpoint="package") as lost:
        package = lost.create("RawDataPackage", {"name": "lost package", "executed_obs_unit_id": obs_id})
    _drain_once(site, caplog, replication_timeout_s=0.2)
    assert buf.status(lost.transaction_id) == "applied"
    newer = _a_newer_update_waiting(site, buf, obs_id, redis_client, caplog)
    new = _fail_over_past_the_last_commit(settings, async_standby, redis_client)
    caplog.clear()
    return new, buf, created_id, obs_id, lost, package, newer


def _drain_once(site, caplog, **config):
    drain = Drain(site, DrainConfig(**config))
    with caplog.at_level(logging.WARNING, logger="obs_pipeline.drain"):
        try:
            return drain.run(until_empty=True, replica_patience_s=1.0, budget_s=30)
        finally:
            drain.close()


def _on_main(url: str, obs_id, tx_ids: list[str]) -> tuple[int, int, str | None]:
    """(rows of the observation, applied-id records of `tx_ids`, its status) on `url`."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT count(*), max(status) FROM executed_obs_unit WHERE id = :i"),
                                {"i": obs_id}).one()
            recorded = conn.execute(sa.text("SELECT count(*) FROM obs_pipeline_applied "
                                            "WHERE transaction_id = ANY(:ids)"), {"ids": tx_ids}).scalar()
    finally:
        engine.dispose()
    return rows[0], recorded, rows[1]


def _committed_on_m(settings, async_standby, caplog) -> tuple[TransactionBuffer, str, object, int]:
    """One create buffered and committed on M, its caches kept (the site's replica unreachable):
    (the buffer, its id, the record's id, its commit LSN)."""
    site = dataclasses.replace(settings, main_db_url=async_standby.main, replica_db_url=async_standby.nowhere)
    buf, tx_id, obs_id = _buffer_one(site)
    _drain_once(site, caplog, replication_timeout_s=0.2)
    assert buf.status(tx_id) == "applied"
    keys = SiteKeys(settings.site)
    (_, lsn), = buf.store.redis.zrange(keys.awaiting_replication, 0, -1, withscores=True)
    return buf, tx_id, obs_id, int(lsn)


def _read(site, obs_id):
    """The record as the site reads it (its replica now the follower)."""
    reader = TransactionBuffer(settings=site)
    try:
        return reader.get("ExecutedObsUnit", obs_id)
    finally:
        reader.close()


def _lost_line(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "not on it" in r.getMessage()]


def _status_without_main(site, nowhere: str) -> dict:
    """`obs-pipeline status --json` of `site` with main out of reach (`nowhere`)."""
    from obs_pipeline_tests.test_cli import cli

    return json.loads(cli("status", "--json", env={"OBS_SITE": site.site, "OBS_REDIS_URL": site.redis_url,
                                                   "OBS_MAIN_DB_URL": nowhere,
                                                   "OBS_REPLICA_DB_URL": site.replica_db_url}).stdout)


def _drain_on_the_new_main(settings, async_standby, caplog, lsn: int):
    """After the failover: S written past the batch's LSN and replayed so by its follower T,
    one drain with OBS_MAIN_DB_URL at S and the replica at T. Its settings and summary."""
    _write_past(async_standby.standby, async_standby.follower, lsn)
    site = dataclasses.replace(settings, main_db_url=async_standby.standby, replica_db_url=async_standby.follower)
    caplog.clear()
    return site, _drain_once(site, caplog, replication_timeout_s=10)


def test_a_batch_an_asynchronous_failover_lost_is_applied_again_on_the_new_main(
        settings, async_standby, redis_client, caplog):
    """M commits a batch that its asynchronous standby S never received (S is down); M fails, S
    is promoted. The batch's commit LSN on timeline 1 is judged by timeline 2: once the site's
    replica (following S) passed it, the drain cleaned its caches, and its rows were on neither
    server (a read at the site said None). The drain asks the new main which of its ids it has
    applied, and buffers the rest again, to apply first."""
    async_standby.stop_standby()
    buf, tx_id, obs_id, lsn = _committed_on_m(settings, async_standby, caplog)
    async_standby.fail_over()
    _write_past(async_standby.standby, async_standby.follower, lsn)
    blind = _status_without_main(dataclasses.replace(settings, replica_db_url=async_standby.follower),
                                 async_standby.nowhere)  # (it took the replay past the lost batch for main's)
    assert blind["replication_lag"]["awaiting_batches"] == 1, blind["replication_lag"]
    assert any("main did not answer" in p for p in blind["problems"]), blind["problems"]
    site, summary = _drain_on_the_new_main(settings, async_standby, caplog, lsn)
    assert _on_main(async_standby.standby, obs_id, [tx_id]) == (1, 1, "running")
    assert summary.applied == 1 and summary.stopped_because == "buffer empty", summary
    assert buf.status(tx_id) == "replicated"
    keys = SiteKeys(settings.site)
    assert redis_client.zcard(keys.awaiting_replication) == 0
    assert redis_client.exists(keys.buffered("ExecutedObsUnit", obs_id)) == 0
    assert _read(site, obs_id)["status"] == "running"  # from the follower
    said = _lost_line(caplog)
    assert len(said) == 1 and "main now writes timeline 2: 1 committed transaction(s) of 1 batch(es)" in said[0], said
    stats = redis_client.hgetall(keys.stats)
    assert int(stats[b"applied_total"]) == 1 and int(stats[b"lost_in_failover_total"]) == 1, stats
    buf.close()


def test_a_later_update_of_a_record_a_failover_lost_applies_after_its_create(
        settings, async_standby, redis_client, caplog):
    """The same, and an update of the lost record buffered after it, which a drain claimed while
    main was down (the failover broke its session; the update waits in `processing`): it applies
    after the create buffered again, not before it on no row (dead-lettered in the end)."""
    async_standby.stop_standby()
    buf, tx_id, obs_id, lsn = _committed_on_m(settings, async_standby, caplog)
    update_id = buf.update("ExecutedObsUnit", obs_id, {"status": "done"})
    async_standby.fail_over()  # (M is down: the drain's claim of the update fails to reach it)
    down = dataclasses.replace(settings, main_db_url=async_standby.main, replica_db_url=async_standby.nowhere)
    drain = Drain(down, DrainConfig(backoff_initial_s=0.2))
    try:
        drain.run(until_empty=True, budget_s=1.0)
    finally:
        drain.close()
    keys = SiteKeys(settings.site)
    assert redis_client.llen(keys.processing) == 1 and buf.status(update_id) == "pending"
    site, summary = _drain_on_the_new_main(settings, async_standby, caplog, lsn)
    assert _on_main(async_standby.standby, obs_id, [tx_id, update_id]) == (1, 2, "done")
    assert summary.dead_lettered == 0 and redis_client.llen(keys.failed) == 0, summary
    assert summary.applied == 2 and summary.stopped_because == "buffer empty", summary
    assert buf.status(tx_id) == "replicated" and buf.status(update_id) == "replicated"
    assert redis_client.zcard(keys.awaiting_replication) == 0
    assert _read(site, obs_id)["status"] == "done"  # from the follower
    assert len(_lost_line(caplog)) == 1, _lost_line(caplog)
    buf.close()


def test_a_batch_that_reached_the_standby_before_the_failover_is_not_applied_again(
        settings, async_standby, redis_client, caplog):
    """The batch reached S before M failed: its ids are in S's obs_pipeline_applied. Nothing is
    buffered again, nothing doubled, no warning: its caches are cleaned once the follower has it."""
    buf, tx_id, obs_id, lsn = _committed_on_m(settings, async_standby, caplog)
    assert async_standby.standby_has_main_s_wal()
    async_standby.fail_over()
    _, summary = _drain_on_the_new_main(settings, async_standby, caplog, lsn)
    assert _on_main(async_standby.standby, obs_id, [tx_id]) == (1, 1, "running")
    assert summary.applied == 0 and summary.replicated == 1 and summary.stopped_because == "buffer empty", summary
    assert buf.status(tx_id) == "replicated"
    assert redis_client.zcard(SiteKeys(settings.site).awaiting_replication) == 0
    assert not _lost_line(caplog)
    assert int(redis_client.hget(SiteKeys(settings.site).stats, "applied_total")) == 1
    buf.close()


def test_the_sensor_launches_a_run_for_a_batch_a_failover_lost_while_the_new_main_is_idle(
        settings, async_standby, redis_client, caplog, monkeypatch):
    """M wrote on for long after its asynchronous standby S stopped, then committed a batch; S is
    promoted, the site's replica T follows it, and nothing new is written. T's position on the
    new timeline stays below the lost batch's LSN (S forked well before it): the sensor asked main
    its timeline, took the batch for one the replica had not replayed yet and launched no run
    ("await the replica"), so nothing asked main for its ids, and the batch read `applied`,
    on neither server, until new work came. Main writing another timeline than the last
    acknowledgement recorded is a failover the drain must settle: a run is launched. Where that
    run ends with it unsettled (main out of the run's reach: failed, its op retries spent, or
    done with nothing it could settle), the next, after a pause, has a run key of its own: under
    the same key the daemon dropped it as a repeat, and nothing settled the failover until new
    work came. A run out of main's reach (run here) ends in SUCCESS with the batch as it was;
    it and the sensor told the operator to point the replica, which follows the new main, at
    another standby or clone it afresh: main had not answered, its timeline was the recorded one."""
    from dagster import DagsterRunStatus, RunRequest, SkipReason, instance_for_test

    from obs_pipeline.dagster_defs import sensors
    from obs_pipeline.dagster_defs.jobs import drain_buffer

    from obs_pipeline.stack.osutil import wait_until

    async_standby.stop_standby()
    engine = sa.create_engine(async_standby.main)
    try:
        for _ in range(8):  # WAL that S never has, the batch's commit after it: 8 segments on
            with engine.begin() as conn:  # (a promotion and a clone from S each start a new one)
                conn.execute(sa.text("INSERT INTO filler VALUES ('x')"))
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_switch_wal()"))
    finally:
        engine.dispose()
    buf, tx_id, obs_id, lsn = _committed_on_m(settings, async_standby, caplog)
    async_standby.fail_over()
    replica = sa.create_engine(async_standby.follower)

    def replayed() -> int | None:
        try:
            with replica.connect() as conn:
                return conn.execute(sa.text("SELECT pg_last_wal_replay_lsn() - '0/0'::pg_lsn")).scalar()
        except sa.exc.OperationalError:  # (T still starting)
            return None

    try:
        assert wait_until(lambda: replayed() is not None, 60)
        assert int(replayed()) < lsn  # the premise: the lost batch's LSN is ahead of T
    finally:
        replica.dispose()
    site = dataclasses.replace(settings, main_db_url=async_standby.standby, replica_db_url=async_standby.follower)
    with instance_for_test() as instance:
        tick, cursor = _tick(instance, site, None)
        assert isinstance(tick, RunRequest), tick.skip_message
        assert tick.run_key == f"{site.site}:failover:1:2"  # (one run per failover, unless it fails)
        keys = [tick.run_key]
        for ended in (DagsterRunStatus.FAILURE, DagsterRunStatus.SUCCESS):
            with monkeypatch.context() as patch:  # (each pause over for this round only)
                if ended == DagsterRunStatus.FAILURE:
                    run = instance.create_run_for_job(drain_buffer, status=DagsterRunStatus.STARTED,
                                                      tags={**tick.tags, "dagster/run_key": tick.run_key})
                    instance.report_run_failed(run)
                    patch.setattr(sensors, "FAILED_RUN_PAUSE_S", 0.0)  # (that pause over)
                else:  # a run that cannot reach main: done, with the lost batch as it was
                    caplog.clear()
                    run = _drain_run_without_main(instance, site, async_standby.nowhere, tick, caplog)
                    assert run.status == ended, run.status
                    assert buf.status(tx_id) == "applied" and _on_main(async_standby.standby, obs_id, [tx_id])[0] == 0
                    (chunk,) = [json.loads(m) for m in redis_client.zrange(SiteKeys(settings.site).awaiting_replication,
                                                                          0, -1)]
                    assert chunk["tl"] == 1 and chunk["t"] == [tx_id], chunk
                    said = [r.getMessage() for r in caplog.records if "replays timeline 2" in r.getMessage()]
                    assert said and all("main did not answer" in line and "timeline 1 at its last commit here" in line
                                        for line in said), said  # (it told the operator to move the replica)
                    blind, _ = _tick(instance, dataclasses.replace(site, main_db_url=async_standby.nowhere), None)
                    assert isinstance(blind, SkipReason) and "main did not answer" in blind.skip_message, blind
                    report = _status_without_main(site, async_standby.nowhere)
                    assert any("main did not answer" in p for p in report["problems"]), report["problems"]
                    assert report["replication_lag"]["awaiting_batches"] == 1, report["replication_lag"]
                held, _ = _tick(instance, site, cursor)
                assert isinstance(held, SkipReason), held
                assert (f"drain run {run.run_id} ended ({ended.value}) with main's failover from timeline 1 to 2 "
                        "unsettled (main out of its reach? see its log); the next in") in held.skip_message, held
                patch.setattr(sensors, "FAILOVER_RUN_PAUSE_S", 0.0)  # the pause over
                tick, _ = _tick(instance, site, cursor)
                assert isinstance(tick, RunRequest), tick.skip_message
                assert tick.run_key not in keys, tick.run_key  # (the daemon drops a key it has launched a run for)
                keys.append(tick.run_key)
    assert buf.status(tx_id) == "applied"  # (until the run)
    caplog.clear()
    summary = _drain_once(site, caplog, replication_timeout_s=10)
    assert _on_main(async_standby.standby, obs_id, [tx_id]) == (1, 1, "running")
    assert summary.applied == 1 and buf.status(tx_id) == "replicated", summary
    assert len(_lost_line(caplog)) == 1, _lost_line(caplog)
    assert redis_client.zcard(SiteKeys(settings.site).awaiting_replication) == 0
    buf.close()


def _drain_run_without_main(instance, site, nowhere: str, request, caplog):
    """One drain_buffer run as the daemon launches `request`, main out of its reach (`nowhere`):
    the run's record."""
    from obs_pipeline.dagster_defs.jobs import drain_buffer
    from obs_pipeline.dagster_defs.resources import ObsPipelineResource

    resource = ObsPipelineResource(site=site.site, redis_url=site.redis_url, main_db_url=nowhere,
                                   replica_db_url=site.replica_db_url)
    config = {"idle_exit_s": 0, "replication_timeout_s": 1}
    with caplog.at_level(logging.WARNING, logger="obs_pipeline.drain"):
        result = drain_buffer.execute_in_process(resources={"obs_pipeline": resource}, instance=instance,
                                                 tags={**request.tags, "dagster/run_key": request.run_key},
                                                 run_config={"ops": {"drain_batches": {"config": config}}},
                                                 raise_on_error=False)
    return instance.get_run_by_id(result.run_id)


def test_a_run_settles_a_failover_that_lost_a_batch_while_the_site_s_replica_does_not_answer(
        settings, async_standby, redis_client, caplog):
    """The same lost batch, the site's replica down after the failover. The drain learnt main's
    timeline only through the replica's replay (ReplicaDatabase.main_timeline) or a batch to
    apply: a run with nothing to claim never asked main, left the lost batch `applied` and on
    neither server, and the sensor's next run did the same. It asks main where batches await."""
    from dagster import RunRequest, instance_for_test

    async_standby.stop_standby()
    buf, tx_id, obs_id, lsn = _committed_on_m(settings, async_standby, caplog)
    async_standby.fail_over()
    site = dataclasses.replace(settings, main_db_url=async_standby.standby, replica_db_url=async_standby.nowhere)
    with instance_for_test() as instance:
        tick, _ = _tick(instance, site, None)
    assert isinstance(tick, RunRequest), tick.skip_message
    caplog.clear()
    summary = _drain_once(site, caplog, replication_timeout_s=0.2)
    assert _on_main(async_standby.standby, obs_id, [tx_id]) == (1, 1, "running")
    assert summary.applied == 1 and buf.status(tx_id) == "applied", summary  # (on S now, awaiting a replica)
    assert len(_lost_line(caplog)) == 1, _lost_line(caplog)
    (record,) = [json.loads(m) for m in redis_client.zrange(SiteKeys(settings.site).awaiting_replication, 0, -1)]
    assert record["tl"] == 2 and record["t"] == [tx_id], record
    buf.close()


def test_requeue_lost_puts_the_lost_first_in_order_and_records_the_rest_on_the_new_timeline(settings, redis_client):
    """Redis alone (BufferStore.requeue_lost): the lost chunks' transactions at the oldest end of
    `processing`, in their order, ahead of what waits there; statuses "pending", the steps as
    they were (another producer's layout too), marked lost_in_failover; a status key gone is named, not requeued; the
    kept chunk recorded on the new timeline; nothing cleaned."""
    from obs_pipeline import json_codec
    from obs_pipeline.buffer_store import BufferStore

    store = BufferStore(redis_client, settings.site)
    keys = store.keys
    token = store.acquire_lease(30)
    ours = '{"status":"applied"   ,"transaction_id":"a","steps":[{"op":1}]}'
    theirs = '{"transaction_id": "b", "steps": [{"op": 2}], "status": "applied"}'
    redis_client.set(keys.transaction("a"), ours)
    redis_client.set(keys.transaction("b"), theirs)
    redis_client.set(keys.buffered("M", "1"), "{}")
    redis_client.lpush(keys.processing, '{"transaction_id":"claimed after them"}')
    lost = [({"n": "000000000", "c": [["M", "1"]], "o": [], "t": ["a", "b"], "at": 0, "lsn": 7, "tl": 1}, None),
            ({"n": "000000000", "c": [], "o": [], "t": ["gone"], "at": 0, "lsn": 9, "tl": 1}, None)]
    kept = [({"n": "000000000", "c": [], "o": [], "t": ["k"], "at": 0, "lsn": 5, "tl": 1}, None)]
    for record, _ in lost + kept:
        redis_client.zadd(keys.awaiting_replication, {json_codec.dumps(record): record["lsn"]})
    lost = [(r, json_codec.dumps(r).encode()) for r, _ in lost]
    kept = [(r, json_codec.dumps(r).encode()) for r, _ in kept]
    assert store.requeue_lost(token, 2, lost, kept) == (["a", "b"], ["gone"])
    claimed = store.claim(token, 10)
    assert claimed.reclaimed and [json.loads(e)["transaction_id"] for e in claimed.entries] == [
        "a", "b", "claimed after them"]
    lost_mark = {"metadata": {"lost_in_failover": "timeline 2"}}  # (it waits behind no newer holder)
    assert claimed.entries[0].startswith('{"status":"pending"   ,"transaction_id":"a",')  # (the slot kept)
    assert json.loads(claimed.entries[0]) == {**json.loads(ours), "status": "pending", **lost_mark}
    assert json.loads(claimed.entries[1]) == {**json.loads(theirs), "status": "pending", **lost_mark}
    assert store.status_json("a") == claimed.entries[0]
    assert [json_codec.loads(m) for m in redis_client.zrange(keys.awaiting_replication, 0, -1)] == [
        {**kept[0][0], "tl": 2}]
    assert redis_client.exists(keys.buffered("M", "1")) == 1
    assert store.main_timeline() == 2


def test_requeue_lost_puts_the_lost_first_in_the_order_of_every_row_they_use(settings, redis_client):
    """Redis alone: a row held by a newer update (Q, waiting to retry) with another behind it
    (P), and one held dead (!D): the lost transactions, applied once before any of them began to
    wait, become the heads, the oldest first, the one they found first in the queue, and the
    others keep their order behind them. (Queued last, one that main now refuses waited behind a
    newer update, which was applied first: the lost one undid it.)"""
    from obs_pipeline import json_codec
    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.row_order import RowOrder

    store = BufferStore(redis_client, settings.site)
    keys = store.keys
    token = store.acquire_lease(30)
    for tx_id in ("a", "b"):
        redis_client.set(keys.transaction(tx_id), json.dumps({"transaction_id": tx_id, "steps": [], "status": "applied"}))
    redis_client.hset(keys.held_ids, mapping={"r1": "Q", "r2": "!D"})
    redis_client.zadd(keys.waiting("r1"), {"P": 1})
    record = {"n": "000000000", "c": [], "o": [], "t": ["a", "b"], "at": 0, "lsn": 7, "tl": 1}
    redis_client.zadd(keys.awaiting_replication, {json_codec.dumps(record): 7})
    uses = {"a": {"r1", "r2", "r3"}, "b": {"r1", "r3"}}
    assert store.requeue_lost(token, 2, [(record, json_codec.dumps(record).encode())], [],
                              rows_of=lambda raw: (uses[json.loads(raw)["transaction_id"]], set())) == (["a", "b"], [])
    queue = {row: [m.decode() for m in redis_client.zrange(keys.waiting(row), 0, -1)] for row in ("r1", "r2", "r3")}
    assert redis_client.hgetall(keys.held_ids) == {b"r1": b"a", b"r2": b"a", b"r3": b"a"}
    assert queue == {"r1": ["b", "Q", "P"], "r2": ["!D"], "r3": ["b"]}
    order = RowOrder(store.holders(["r1"]), store.behind({"r1": "a"}, 10, set())[0])
    assert order.blocker("r1", "Q", ahead=set(), waited_on=set()) == "a"  # the newer waits for both
    assert order.blocker("r1", "Q", ahead={"a"}, waited_on=set()) == "b"
    assert order.blocker("r1", "b", ahead={"a"}, waited_on=set()) is None


@pytest.fixture
def other_cluster(stack):
    """Main moved to another cluster: Y ("main"), a primary of its own initdb (timeline 1, as
    the stack's main writes) with the schema and obs units, none of the stack main's rows (a
    restore of a dump taken before them), and R ("replica"), a standby cloned from it: the
    site's replica rebuilt from the new main."""
    from types import SimpleNamespace

    from obs_pipeline.stack.osutil import wait_until

    servers, url, _ = _servers(stack, "cm_main", "cm_replica")
    y, r = servers
    try:
        target = _primary_with_units(y, url[y], "CREATE TABLE filler (x text)")
        r.clone_from(y)
        r.set_upstream(y.port)
        r.start()
        assert wait_until(lambda: _replayed(url[r], target), 60)
        yield SimpleNamespace(main=url[y], replica=url[r])
    finally:
        for server in reversed(servers):
            server.stop(mode="immediate")
            shutil.rmtree(server.datadir, ignore_errors=True)


@pytest.mark.parametrize("restore", ["before", "before, chunk of an earlier version", "after"])
def test_a_batch_awaiting_the_replica_when_main_moves_to_another_cluster_is_applied_on_it(
        settings, other_cluster, main_engine, replica_engine, redis_client, clean_db, caplog, restore):
    """A batch committed on main X waits for the replica's replay; main is then replaced by
    another cluster Y (its own initdb, restored from a dump taken before that commit, on
    timeline 1 again) and the site's replica rebuilt from Y. The chunk's timeline is Y's, so
    nothing settled it: the next commit on Y recorded Y as the cluster to compare the replica
    with, and once Y's replay passed the old commit's LSN (of X's WAL) its caches were cleaned,
    status "replicated", its rows on neither server. A chunk of another cluster is settled as
    one of another timeline: Y is asked for its ids and what it lacks is buffered again (a
    chunk an earlier version recorded without its cluster is of the one `stats` recorded); a
    dump taken after the commit has it: nothing applied twice."""
    from obs_pipeline import json_codec
    from obs_pipeline_tests.workload import replay_paused

    keys = SiteKeys(settings.site)
    buf, tx_id, obs_id = _buffer_one(settings)
    with replay_paused(replica_engine):
        _drain_once(settings, caplog, replication_timeout_s=0.2)
    assert buf.status(tx_id) == "applied"
    (member,) = redis_client.zrange(keys.awaiting_replication, 0, -1)
    chunk = json.loads(member)
    assert chunk["t"] == [tx_id] and chunk["tl"] == 1, chunk
    if "earlier version" in restore:
        redis_client.zrem(keys.awaiting_replication, member)
        chunk.pop("cl", None)
        redis_client.zadd(keys.awaiting_replication, {json_codec.dumps(chunk): chunk["lsn"]})
    if restore == "after":  # the dump has the batch's rows and its applied-id record
        with main_engine.connect() as conn:
            row = conn.execute(sa.text("SELECT * FROM executed_obs_unit WHERE id = :i"), {"i": obs_id}).mappings().one()
            record = conn.execute(sa.text("SELECT * FROM obs_pipeline_applied WHERE transaction_id = :t"),
                                  {"t": tx_id}).mappings().one()
        engine = sa.create_engine(other_cluster.main)
        with engine.begin() as conn:
            for table, values in (("executed_obs_unit", row), ("obs_pipeline_applied", record)):
                conn.execute(sa.text(f"INSERT INTO {table} ({', '.join(values)}) "
                                     f"VALUES ({', '.join(':' + c for c in values)})"), dict(values))
        engine.dispose()
    buf.close()
    moved = dataclasses.replace(settings, main_db_url=other_cluster.main, replica_db_url=other_cluster.replica)
    buf = TransactionBuffer(settings=moved)
    with buf.transaction(endpoint="start_observation") as tx:
        later = tx.create("ExecutedObsUnit", {"obs_unit_id": 2, "start_time": "2025-01-02T00:00:00Z",
                                              "status": "running"})
    _drain_once(moved, caplog, replication_timeout_s=0.2)  # the new one applied on Y ...
    assert _on_main(other_cluster.main, later["id"], [tx.transaction_id]) == (1, 1, "running")
    said = _lost_line(caplog)
    assert len(said) == (restore != "after") and all(
        line.startswith("main is now another cluster") and "timeline 1): 1 committed transaction(s)" in line
        for line in said), said
    _write_past(other_cluster.main, other_cluster.replica, int(chunk["lsn"]))  # ... and Y written past X's commit
    caplog.clear()
    summary = _drain_once(moved, caplog, replication_timeout_s=10)
    assert _on_main(other_cluster.main, obs_id, [tx_id]) == (1, 1, "running")  # not lost
    assert _on_main(other_cluster.main, later["id"], [tx.transaction_id]) == (1, 1, "running")  # not doubled
    assert summary.stopped_because == "buffer empty", summary
    assert buf.status(tx_id) == "replicated" and buf.status(tx.transaction_id) == "replicated"
    assert redis_client.zcard(keys.awaiting_replication) == 0
    assert buf.get("ExecutedObsUnit", obs_id)["status"] == "running"  # from Y's standby
    stats = redis_client.hgetall(keys.stats)
    assert int(stats[b"applied_total"]) == 2, stats
    assert int(stats.get(b"lost_in_failover_total", 0)) == (restore != "after"), stats
    with main_engine.connect() as conn:  # (X has it once, as it had)
        assert conn.execute(sa.text("SELECT count(*) FROM executed_obs_unit WHERE id = :i"),
                            {"i": obs_id}).scalar() == 1
    buf.close()


def test_a_batch_a_restore_on_another_cluster_kept_is_not_cleaned_before_its_replica_replays_the_restore(
        settings, other_cluster, main_engine, replica_engine, redis_client, clean_db, caplog):
    """A batch committed on main X waits for the replica; main is replaced by Y, restored from
    a dump taken after that commit (Y has it: the chunk is kept, re-recorded as Y's), while the
    site's replica R already streams from Y and lags behind the restore. The chunk's LSN is of
    X's WAL: R's replay passing it says nothing of the restore's rows. Cleaned then, the caches
    went while R lacked the rows, and the site read nothing until R caught up."""
    from obs_pipeline_tests.workload import replay_paused

    keys = SiteKeys(settings.site)
    buf, tx_id, obs_id = _buffer_one(settings)
    with replay_paused(replica_engine):
        _drain_once(settings, caplog, replication_timeout_s=0.2)
    assert buf.status(tx_id) == "applied"
    (member, lsn), = redis_client.zrange(keys.awaiting_replication, 0, -1, withscores=True)
    with main_engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM executed_obs_unit WHERE id = :i"), {"i": obs_id}).mappings().one()
        record = conn.execute(sa.text("SELECT * FROM obs_pipeline_applied WHERE transaction_id = :t"),
                              {"t": tx_id}).mappings().one()
    _write_past(other_cluster.main, other_cluster.replica, int(lsn))  # R replays past X's commit's LSN ...
    moved = dataclasses.replace(settings, main_db_url=other_cluster.main, replica_db_url=other_cluster.replica)
    r_engine = sa.create_engine(other_cluster.replica)
    try:
        with replay_paused(r_engine):  # ... and then lags behind the restore
            engine = sa.create_engine(other_cluster.main)
            with engine.begin() as conn:  # the dump, with the batch's rows and its applied-id record
                for table, values in (("executed_obs_unit", row), ("obs_pipeline_applied", record)):
                    conn.execute(sa.text(f"INSERT INTO {table} ({', '.join(values)}) "
                                         f"VALUES ({', '.join(':' + c for c in values)})"), dict(values))
            engine.dispose()
            summary = _drain_once(moved, caplog, replication_timeout_s=0.2)
            assert not _lost_line(caplog)  # Y has it: nothing buffered again
            assert _read(moved, obs_id) is not None, "the caches were cleaned while R lacked the restored rows"
            assert buf.status(tx_id) == "applied", summary
            assert redis_client.zcard(keys.awaiting_replication) == 1
        summary = _drain_once(moved, caplog, replication_timeout_s=10)  # R replays the restore: cleaned
    finally:
        r_engine.dispose()
    assert summary.stopped_because == "buffer empty", summary
    assert buf.status(tx_id) == "replicated"
    assert _read(moved, obs_id)["status"] == "running"  # from R
    assert _on_main(other_cluster.main, obs_id, [tx_id]) == (1, 1, "running")  # not doubled
    buf.close()


def test_status_with_main_answering_does_not_count_a_batch_a_failover_lost_as_replayed(
        settings, async_standby, redis_client, caplog):
    """The lost batch of the asynchronous failover, main (S, timeline 2) answering, the site's
    replica following it past the batch's LSN, no drain run since. `status` compared the
    replica's replay with main's timeline and took the batch committed on timeline 1 for
    replayed: healthy, nothing awaiting, while its rows were on neither server (with main out
    of reach it said a batch awaited). It counts as awaiting, and says a drain must settle it."""
    from obs_pipeline.buffer_store import BufferStore
    from obs_pipeline.health import health_report

    async_standby.stop_standby()
    buf, tx_id, obs_id, lsn = _committed_on_m(settings, async_standby, caplog)
    async_standby.fail_over()
    _write_past(async_standby.standby, async_standby.follower, lsn)
    main, replica = sa.create_engine(async_standby.standby), sa.create_engine(async_standby.follower)
    try:
        report = health_report(BufferStore(redis_client, settings.site), main, replica)
        assert report["replication_lag"]["awaiting_batches"] == 1, report["replication_lag"]
        assert report["status"] != "healthy" and any(
            "committed on timeline 1" in p and "main writes timeline 2" in p for p in report["problems"]), report
        site, summary = _drain_on_the_new_main(settings, async_standby, caplog, lsn)  # it settles: applied again
        assert summary.applied == 1 and buf.status(tx_id) == "replicated", summary
        report = health_report(BufferStore(redis_client, settings.site), main, replica)
        assert report["status"] == "healthy" and report["replication_lag"]["awaiting_batches"] == 0, report
    finally:
        main.dispose()
        replica.dispose()
    buf.close()


def test_a_lost_update_applies_before_a_newer_update_of_its_row_that_waits_to_retry(
        settings, async_standby, redis_client, caplog):
    """The record reached S; an update of it (L, status "lost") committed on M only, S down; a
    newer update of it (Q, status "newer") failed on M (it also creates an observation of obs
    unit 999, which M lacks) and waits to retry, holding the row. M fails, S is promoted, obs
    unit 999 is made there. L, buffered again, is older than Q: it must apply first, and the
    row end as Q left it. Parked behind Q's hold, it applied after Q and undid Q's update."""
    import time

    site, buf, created_id, obs_id = _recorded_then_on_main_only(settings, async_standby, caplog)
    lost_id = buf.update("ExecutedObsUnit", obs_id, {"status": "lost"})
    _drain_once(site, caplog, replication_timeout_s=0.2)
    assert buf.status(lost_id) == "applied"
    tx = _a_newer_update_waiting(site, buf, obs_id, redis_client, caplog, retry_base_s=4.0)
    keys = SiteKeys(settings.site)
    (_, due), = redis_client.zrange(keys.retry, 0, -1, withscores=True)
    new = _fail_over_past_the_last_commit(settings, async_standby, redis_client)
    _obs_unit_made_by_hand(async_standby.standby, 999, "made after the failover")
    time.sleep(max(0.0, due - time.time()) + 0.2)  # Q due again
    caplog.clear()
    summary = _drain_once(new, caplog, replication_timeout_s=10, retry_base_s=0.2)
    assert summary.dead_lettered == 0 and redis_client.llen(keys.failed) == 0, summary
    assert _on_main(async_standby.standby, obs_id, [created_id, lost_id, tx.transaction_id]) == (1, 3, "newer")
    assert len(_lost_line(caplog)) == 1, _lost_line(caplog)
    buf.close()


def test_a_lost_update_a_producer_keyed_in_capitals_still_applies_before_a_newer_update_of_its_row(
        settings, async_standby, redis_client, caplog):
    """As above, but L comes from a producer that writes its own status key (seed 000's existing
    system): its update names the observation by its UUID in capitals, which the drain makes
    canonical when it validates L. Buffered again from that status key, L must go first in the
    order of the row as the drain names it (its canonical UUID), and let go of it once applied.
    Its rows worked out from the entry as pushed named another row (`executed_obs_unit:<UUID in
    capitals>`): Q kept the observation's head, L was parked behind it and undid it, and the mark
    on the other row stayed for good."""
    import time


    site, buf, created_id, obs_id = _recorded_then_on_main_only(settings, async_standby, caplog)
    keys = SiteKeys(settings.site)
    lost_id = str(uuid.uuid4())
    entry = json.dumps({"status": "pending", "transaction_id": lost_id, "endpoint": "finish", "site": site.site,
                        "timestamp": "2025-01-02T00:00:00Z", "retry_count": 0,
                        "steps": [{"step_id": "s0", "operation": "update", "model_class": "ExecutedObsUnit",
                                   "conditions": {"id": obs_id.upper()}, "data": {"status": "lost"}}]})
    redis_client.set(keys.transaction(lost_id), entry)  # as the existing system's producer writes it
    redis_client.lpush(keys.buffer, entry)
    _drain_once(site, caplog, replication_timeout_s=0.2)
    assert buf.status(lost_id) == "applied"
    newer = _a_newer_update_waiting(site, buf, obs_id, redis_client, caplog, retry_base_s=4.0)
    (_, due), = redis_client.zrange(keys.retry, 0, -1, withscores=True)
    new = _fail_over_past_the_last_commit(settings, async_standby, redis_client)
    _obs_unit_made_by_hand(async_standby.standby, 999, "made after the failover")
    time.sleep(max(0.0, due - time.time()) + 0.2)  # Q due again
    caplog.clear()
    summary = _drain_once(new, caplog, replication_timeout_s=10, retry_base_s=0.2)
    assert len(_lost_line(caplog)) == 1, _lost_line(caplog)
    assert summary.dead_lettered == 0, summary
    _assert_settled(async_standby, redis_client, settings.site, obs_id,
                    [created_id, lost_id, newer.transaction_id], "newer")
    buf.close()


def test_two_lost_updates_of_a_row_and_a_newer_one_waiting_apply_oldest_first_once_main_takes_the_oldest(
        settings, async_standby, redis_client, caplog):
    """Two updates of the record lost in the failover (H older, also renaming obs unit 777, made
    on M by hand after S stopped; L newer) and a newer update (Q) that waits to retry, holding
    the row. Buffered again, H heads the row, L and Q wait behind it in that order: S refuses H
    (L parked behind it), Q, due, waits behind H too; once 777 is made on S and H is due, H, L
    and Q apply in that order, the row ends as Q left it and nothing holds a row."""
    from obs_pipeline_tests.test_reliability import due_now

    site, buf, created_id, obs_id, older, lost_id = _refused_once_lost(settings, async_standby, caplog, "older", then="lost")
    newer = _a_newer_update_waiting(site, buf, obs_id, redis_client, caplog)
    keys = SiteKeys(settings.site)
    new = _fail_over_past_the_last_commit(settings, async_standby, redis_client)
    _obs_unit_made_by_hand(async_standby.standby, 999, "made after the failover")  # Q can apply now; H cannot
    caplog.clear()
    _drain_once(new, caplog, replication_timeout_s=10, retry_base_s=60)
    assert len(_lost_line(caplog)) == 1, _lost_line(caplog)
    assert redis_client.hget(keys.held_ids, obs_id) == older.transaction_id.encode()
    assert [m.decode() for m in redis_client.zrange(keys.waiting(obs_id), 0, -1)] == [
        lost_id, newer.transaction_id]
    due_now(redis_client, keys, newer.transaction_id)  # Q due first: it waits behind H
    _drain_once(new, caplog, replication_timeout_s=10, retry_base_s=60)
    assert buf.status(newer.transaction_id) == "pending" and buf.status(lost_id) == "pending"
    _obs_unit_made_by_hand(async_standby.standby, 777, "made again")  # H's cause fixed
    due_now(redis_client, keys, older.transaction_id)
    summary = _drain_once(new, caplog, replication_timeout_s=10, retry_base_s=60)
    assert summary.dead_lettered == 0, summary
    _assert_settled(async_standby, redis_client, settings.site, obs_id,
                    [created_id, older.transaction_id, lost_id, newer.transaction_id], "newer")
    buf.close()


def test_a_dead_letter_a_lost_update_displaced_from_its_rows_head_retried_while_the_lost_one_waits_applies_after_it(
        settings, async_standby, redis_client, caplog):
    """A newer update of the record (D, also making an observation of obs unit 888, which M
    lacks) is dead-lettered on M, holding the row dead; an older update (L, also renaming obs
    unit 777, made on M by hand after S stopped) was lost in the failover. Buffered again, L
    heads the row, D's dead mark first behind it; S refuses L, which waits to retry. The
    operator makes 888 and retries D meanwhile: D waits behind L (parked), and once 777 is made
    on S, L applies, then D: the row ends as D left it, nothing holds a row."""

    from obs_pipeline_tests.test_reliability import due_now

    site, buf, created_id, obs_id, lost, _ = _refused_once_lost(settings, async_standby, caplog)
    with buf.transaction(endpoint="finish") as dead:
        dead.update("ExecutedObsUnit", obs_id, {"status": "newer"})
        dead.create("ExecutedObsUnit", {"obs_unit_id": 888, "start_time": "2025-01-03T00:00:00Z",
                                        "status": "running"})
    _drain_until_dead_lettered(site, caplog, buf, dead.transaction_id, replication_timeout_s=0.2)  # (D's retries)
    assert buf.status(dead.transaction_id) == "failed"
    keys = SiteKeys(settings.site)
    assert redis_client.hget(keys.held_ids, obs_id) == b"!" + dead.transaction_id.encode()
    new = _fail_over_past_the_last_commit(settings, async_standby, redis_client)
    caplog.clear()
    _drain_once(new, caplog, replication_timeout_s=10, retry_base_s=60)
    assert len(_lost_line(caplog)) == 1, _lost_line(caplog)
    assert buf.status(lost.transaction_id) == "pending" and redis_client.zcard(keys.retry) == 1  # S refuses L
    assert redis_client.hget(keys.held_ids, obs_id) == lost.transaction_id.encode()
    assert redis_client.zrange(keys.waiting(obs_id), 0, -1) == [b"!" + dead.transaction_id.encode()]
    _obs_unit_made_by_hand(async_standby.standby, 888, "made by the operator")
    _operator(new, "failed", "retry", dead.transaction_id)
    _drain_once(new, caplog, replication_timeout_s=10, retry_base_s=60)
    assert buf.status(dead.transaction_id) == "pending" and buf.status(lost.transaction_id) == "pending"  # D behind L
    _obs_unit_made_by_hand(async_standby.standby, 777, "made again")  # L's cause fixed
    due_now(redis_client, keys, lost.transaction_id)
    summary = _drain_once(new, caplog, replication_timeout_s=10, retry_base_s=60)
    assert summary.dead_lettered == 0, summary
    _assert_settled(async_standby, redis_client, settings.site, obs_id,
                    [created_id, lost.transaction_id, dead.transaction_id], "newer")
    buf.close()


def test_a_lost_update_whose_id_a_producer_reused_leaves_the_reused_letter_s_dead_mark_on_its_row(
        settings, async_standby, redis_client, caplog):
    """An update of the record (L) committed on M only, S down; a raw producer then reused L's id
    for another update of the record (R, "reused"), dead-lettered on M as a reused id: its dead
    mark ("!" + the id) holds the row, and a newer update waits for R's retry. M fails, S is
    promoted: L, buffered again, goes first in the row's order and applies; R's letter is still
    listed, so its mark must stay: a newer update (N) is dead-lettered as blocked by it, and
    `failed retry --all` applies R (under a new id), then N. L's HOLD_FIRST took the row's head
    "!" + id for its own, and its release then freed the row: N applied at once, and R, retried,
    undid it."""
    from obs_pipeline_tests.workload import push_raw

    site, buf, created_id, obs_id = _recorded_then_on_main_only(settings, async_standby, caplog)
    lost_id = buf.update("ExecutedObsUnit", obs_id, {"status": "lost"})
    _drain_once(site, caplog, replication_timeout_s=0.2)
    assert buf.status(lost_id) == "applied"
    keys = SiteKeys(settings.site)
    push_raw(redis_client, site.site, lost_id, {"operation": "update", "model_class": "ExecutedObsUnit",
                                                "conditions": {"id": obs_id}, "data": {"status": "reused"}})
    summary = _drain_once(site, caplog, replication_timeout_s=0.2)
    assert summary.dead_lettered == 1 and json.loads(redis_client.lindex(keys.failed, 0))["failure"]["kind"] == (
        "reused_id"), summary
    assert redis_client.hget(keys.held_ids, obs_id) == b"!" + lost_id.encode()
    new = _fail_over_past_the_last_commit(settings, async_standby, redis_client)
    caplog.clear()
    _drain_once(new, caplog, replication_timeout_s=10)
    assert len(_lost_line(caplog)) == 1, _lost_line(caplog)
    assert buf.status(lost_id) == "replicated"
    assert redis_client.hget(keys.held_ids, obs_id) == b"!" + lost_id.encode()  # R's letter still holds the row
    newer_id = buf.update("ExecutedObsUnit", obs_id, {"status": "newer"})
    summary = _drain_once(new, caplog, replication_timeout_s=10)
    assert buf.status(newer_id) == "failed", summary  # blocked by R's letter
    _operator(new, "failed", "retry", "--all")
    _drain_once(new, caplog, replication_timeout_s=10)
    _assert_settled(async_standby, redis_client, settings.site, obs_id, [created_id, lost_id, newer_id], "newer")
    buf.close()


def test_a_lost_update_whose_id_a_producer_reused_dead_lettered_on_the_new_main_leaves_one_dead_mark_of_the_id(
        settings, async_standby, redis_client, caplog):
    """As above (R, a reused id of the lost L, dead-lettered on M), but L also renames obs unit
    777, made on M by hand after S stopped: S refuses it until it is dead-lettered too. Both
    letters of the id now hold the row dead, under one mark ("!" + the id, as the letters of a
    reused id always did); discarded one after the other, they leave the row free, and a newer
    update applies."""

    from obs_pipeline_tests.workload import push_raw

    site, buf, created_id, obs_id, lost, _ = _refused_once_lost(settings, async_standby, caplog)
    keys = SiteKeys(settings.site)
    push_raw(redis_client, site.site, lost.transaction_id, {
        "operation": "update", "model_class": "ExecutedObsUnit", "conditions": {"id": obs_id},
        "data": {"status": "reused"}})
    summary = _drain_once(site, caplog, replication_timeout_s=0.2)
    assert summary.dead_lettered == 1, summary  # R, as a reused id: the first letter listed
    new = _fail_over_past_the_last_commit(settings, async_standby, redis_client)
    caplog.clear()
    _drain_until_dead_lettered(new, caplog, buf, lost.transaction_id, replication_timeout_s=1)  # (L's retries)
    assert buf.status(lost.transaction_id) == "failed" and redis_client.llen(keys.failed) == 2
    _operator(new, "failed", "discard", "#2")  # L's letter
    assert redis_client.hget(keys.held_ids, obs_id) == b"!" + lost.transaction_id.encode()  # R's, still listed
    _operator(new, "failed", "discard", lost.transaction_id)  # R's, the id's only letter now
    newer_id = buf.update("ExecutedObsUnit", obs_id, {"status": "newer"})
    summary = _drain_once(new, caplog, replication_timeout_s=10)
    assert summary.dead_lettered == 0 and buf.status(newer_id) == "replicated", summary
    _assert_settled(async_standby, redis_client, settings.site, obs_id, [created_id, newer_id], "newer")
    buf.close()


def test_a_lost_update_lost_again_in_a_second_failover_still_applies_before_a_newer_update_of_its_row(
        settings, async_standby, redis_client, caplog):
    """L (an update of the record) committed on M only; Q, newer, waits to retry holding the
    row. M fails over to S: L, buffered again, goes first and applies on S, while T (S's
    standby, the site's replica) is down; S fails over to T (timeline 3), which lacks L again.
    Buffered a second time, L again goes first, ahead of Q: the row ends as Q left it, and
    nothing holds a row."""
    from obs_pipeline_tests.test_reliability import assert_no_holds, due_now

    site, buf, created_id, obs_id = _recorded_then_on_main_only(settings, async_standby, caplog)
    lost_id = buf.update("ExecutedObsUnit", obs_id, {"status": "lost"})
    _drain_once(site, caplog, replication_timeout_s=0.2)
    assert buf.status(lost_id) == "applied"
    newer = _a_newer_update_waiting(site, buf, obs_id, redis_client, caplog)
    keys = SiteKeys(settings.site)
    new = _fail_over_past_the_last_commit(settings, async_standby, redis_client)
    async_standby.stop_follower()  # what S commits next is on S only
    caplog.clear()
    _drain_once(new, caplog, replication_timeout_s=0.2, retry_base_s=60)
    assert len(_lost_line(caplog)) == 1, _lost_line(caplog)
    assert buf.status(lost_id) == "applied" and buf.status(newer.transaction_id) == "pending"
    assert redis_client.hget(keys.held_ids, obs_id) == newer.transaction_id.encode()  # L let go of it
    async_standby.fail_over_again()
    third = dataclasses.replace(settings, main_db_url=async_standby.follower, replica_db_url=async_standby.nowhere)
    _obs_unit_made_by_hand(async_standby.follower, 999, "made after the second failover")
    due_now(redis_client, keys, newer.transaction_id)
    caplog.clear()
    summary = _drain_once(third, caplog, replication_timeout_s=0.2, retry_base_s=60)
    assert len(_lost_line(caplog)) == 1 and "timeline 3" in _lost_line(caplog)[0], _lost_line(caplog)
    assert summary.dead_lettered == 0, summary
    assert _on_main(async_standby.follower, obs_id, [created_id, lost_id, newer.transaction_id]) == (1, 3, "newer")
    for queue in (keys.buffer, keys.processing, keys.failed):
        assert redis_client.llen(queue) == 0
    assert redis_client.zcard(keys.retry) == 0
    assert_no_holds(redis_client, keys)
    buf.close()


def test_a_lost_transaction_that_reads_a_row_a_newer_update_holds_applies_at_once_and_lets_go_of_it(
        settings, async_standby, redis_client, caplog):
    """As above, but the lost transaction (L) makes a data package of the observation: it reads
    the row the newer update (Q) holds, and writes another. Buffered again, it goes first in the
    order of both rows (BufferStore.requeue_lost), so it is applied at once, ahead of Q, which
    still waits; applied, it lets go of both, and the row is Q's alone again."""
    from obs_pipeline_tests.test_reliability import due_now

    new, buf, created_id, obs_id, lost, package, newer = _a_lost_package_and_a_newer_update_waiting(
        settings, async_standby, redis_client, caplog)
    keys = SiteKeys(settings.site)
    _drain_once(new, caplog, replication_timeout_s=10, retry_base_s=60)
    assert len(_lost_line(caplog)) == 1, _lost_line(caplog)
    assert buf.status(lost.transaction_id) == "replicated" and buf.status(newer.transaction_id) == "pending"
    engine = sa.create_engine(async_standby.standby)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT name FROM raw_data_package WHERE id = :i"),
                                {"i": package["id"]}).scalar() == "lost package"
    finally:
        engine.dispose()
    assert set(redis_client.hvals(keys.held_ids)) == {newer.transaction_id.encode()}  # Q's rows only
    assert list(redis_client.scan_iter(keys.waiting("*"))) == []
    _obs_unit_made_by_hand(async_standby.standby, 999, "made after the failover")
    due_now(redis_client, keys, newer.transaction_id)
    _drain_once(new, caplog, replication_timeout_s=10, retry_base_s=60)
    _assert_settled(async_standby, redis_client, settings.site, obs_id,
                    [created_id, lost.transaction_id, newer.transaction_id], "newer")
    buf.close()


def test_a_drain_stopped_between_buffering_a_lost_transaction_again_and_claiming_it_leaves_its_order_to_the_next(
        settings, async_standby, redis_client, caplog):
    """As above (L, lost, makes a data package of the observation; Q, newer, waits to retry
    holding its row), but the drain that settles the failover stops right after it: L is back
    in `processing`, first in the order of both rows, and no drain has claimed it. The next
    drain claims it again with Q (due): L applies first, then Q, and nothing holds a row."""
    from obs_pipeline_tests.test_reliability import assert_no_holds, assert_queues_empty, due_now

    new, buf, created_id, obs_id, lost, package, newer = _a_lost_package_and_a_newer_update_waiting(
        settings, async_standby, redis_client, caplog)
    keys = SiteKeys(settings.site)
    _settled_by_an_idle_step(new, caplog, retry_base_s=60)
    assert redis_client.llen(keys.processing) == 1 and buf.status(lost.transaction_id) == "pending"
    assert redis_client.hget(keys.held_ids, obs_id) == redis_client.hget(keys.held_ids, package["id"]) == (
        lost.transaction_id.encode())
    assert redis_client.zrange(keys.waiting(obs_id), 0, -1) == [newer.transaction_id.encode()]
    _obs_unit_made_by_hand(async_standby.standby, 999, "made after the failover")
    due_now(redis_client, keys, newer.transaction_id)
    summary = _drain_once(new, caplog, replication_timeout_s=10, retry_base_s=60)
    assert summary.dead_lettered == 0 and summary.applied == 2, summary
    assert _on_main(async_standby.standby, obs_id, [created_id, lost.transaction_id, newer.transaction_id]) == (
        1, 3, "newer")
    assert len(_lost_line(caplog)) == 1, _lost_line(caplog)  # settled once
    assert_queues_empty(redis_client, settings.site)
    assert_no_holds(redis_client, keys)
    buf.close()


def test_a_lost_transaction_dead_lettered_on_the_new_main_lets_go_of_the_rows_it_only_reads(
        settings, async_standby, redis_client, caplog):
    """The lost transaction (L) makes a data package of the observation and renames obs unit 777,
    made on M by hand after S stopped: S refuses it until it is dead-lettered. It held the
    observation's row (it reads it) as well as the package's: dead, it keeps the package's row
    (dead: what writes it waits for its retry) and lets go of the observation's, so a later
    update of the observation is applied at once, not blocked by it."""

    from obs_pipeline_tests.test_reliability import assert_no_holds

    site, buf, created_id, obs_id = _recorded_then_on_main_only(settings, async_standby, caplog)
    _obs_unit_made_by_hand(async_standby.main, 777, "by hand")
    with buf.transaction(endpoint="package") as lost:
        package = lost.create("RawDataPackage", {"name": "lost package", "executed_obs_unit_id": obs_id})
        lost.update("ObsUnit", 777, {"name": "renamed"})
    _drain_once(site, caplog, replication_timeout_s=0.2)
    assert buf.status(lost.transaction_id) == "applied"
    keys = SiteKeys(settings.site)
    new = _fail_over_past_the_last_commit(settings, async_standby, redis_client)
    caplog.clear()
    _drain_until_dead_lettered(new, caplog, buf, lost.transaction_id, replication_timeout_s=1)  # (L's retries)
    assert len(_lost_line(caplog)) == 1, _lost_line(caplog)
    assert buf.status(lost.transaction_id) == "failed"
    held = redis_client.hgetall(keys.held_ids)  # the package's rows and obs unit 777's, dead; not the observation's
    assert package["id"].encode() in held and obs_id.encode() not in held, held
    assert set(held.values()) == {b"!" + lost.transaction_id.encode()}, held
    later = buf.update("ExecutedObsUnit", obs_id, {"status": "later"})
    summary = _drain_once(new, caplog, replication_timeout_s=10)
    assert summary.dead_lettered == 0 and buf.status(later) == "replicated", summary
    assert _on_main(async_standby.standby, obs_id, [created_id, later]) == (1, 2, "later")
    _obs_unit_made_by_hand(async_standby.standby, 777, "made again")
    _operator(new, "failed", "retry", "--all")
    _drain_once(new, caplog, replication_timeout_s=10)
    assert buf.status(lost.transaction_id) == "replicated"
    assert_no_holds(redis_client, keys)
    buf.close()


def test_a_lost_transaction_whose_model_the_models_file_lost_since_lets_go_of_the_rows_it_only_reads(
        settings, async_standby, redis_client, caplog):
    """The lost transaction (L) makes a data package of the observation. Buffered again by the
    drain that settles the failover, which stops then, it holds the package's rows and the
    observation's (it reads it). The operator revises the models file before the next drain claims
    it (obs_pipeline_tests.revised_models:ModelRenamed has no RawDataPackage): L is dead-lettered as
    invalid, and its live marks, found in Redis as its steps name none of its rows, were all turned
    dead, the observation's too: a later update of the observation, the models file restored, was
    dead-lettered as blocked by it. Its reads, recorded when it was buffered again, are let go of,
    as by a lost transaction dead-lettered for any other reason; its own rows stay dead."""
    from obs_pipeline_tests.test_reliability import assert_no_holds

    site, buf, created_id, obs_id = _recorded_then_on_main_only(settings, async_standby, caplog)
    with buf.transaction(endpoint="package") as lost:
        package = lost.create("RawDataPackage", {"name": "lost package", "executed_obs_unit_id": obs_id})
    _drain_once(site, caplog, replication_timeout_s=0.2)
    assert buf.status(lost.transaction_id) == "applied"
    keys = SiteKeys(settings.site)
    new = _fail_over_past_the_last_commit(settings, async_standby, redis_client)
    caplog.clear()
    _settled_by_an_idle_step(new, caplog)
    assert redis_client.hget(keys.held_ids, obs_id) == lost.transaction_id.encode()
    revised = dataclasses.replace(new, models="obs_pipeline_tests.revised_models:ModelRenamed")
    summary = _drain_once(revised, caplog, replication_timeout_s=10)
    assert summary.dead_lettered == 1 and buf.status(lost.transaction_id) == "failed", summary
    held = redis_client.hgetall(keys.held_ids)  # the package's rows, dead; not the observation's
    assert package["id"].encode() in held and obs_id.encode() not in held, held
    assert set(held.values()) == {b"!" + lost.transaction_id.encode()}, held
    later = buf.update("ExecutedObsUnit", obs_id, {"status": "later"})  # the models file restored
    summary = _drain_once(new, caplog, replication_timeout_s=10)
    assert summary.dead_lettered == 0 and buf.status(later) == "replicated", summary
    assert _on_main(async_standby.standby, obs_id, [created_id, later]) == (1, 2, "later")
    _operator(new, "failed", "retry", "--all")
    _drain_once(new, caplog, replication_timeout_s=10)
    assert buf.status(lost.transaction_id) == "replicated"
    assert _on_main(async_standby.standby, obs_id, [created_id, lost.transaction_id, later]) == (1, 3, "later")
    assert_no_holds(redis_client, keys)
    buf.close()


def test_a_reused_id_in_a_batch_a_failover_lost_is_buffered_again_as_the_transaction_that_was_applied(
        settings, async_standby, redis_client, caplog):
    """A raw producer (no status key) pushes obs-9 (make unit 921) and obs-9 again with other
    steps (make unit 922), drained in one batch on M only: the first applied, the second
    dead-lettered as reused. M fails, S is promoted without the batch. What the failover lost is
    buffered again from the id's status key, which the drain had written from the last entry of
    the id in the batch, the second: S got unit 922 under obs-9 and never unit 921 (lost), and
    the second's letter, retried, would make 922 twice. The status key is the applied one's."""
    from obs_pipeline_tests.workload import create_unit, push_raw

    site, buf, _, _ = _recorded_then_on_main_only(settings, async_standby, caplog)
    push_raw(redis_client, site.site, "obs-9", create_unit(921, "first"))
    push_raw(redis_client, site.site, "obs-9", create_unit(922, "second, the id reused"))
    _drain_once(site, caplog, replication_timeout_s=0.2)
    keys = SiteKeys(settings.site)
    letters = [(f["transaction_id"], f["failure"]["kind"], f["steps"][0]["data"]["id"])
               for f in map(json.loads, redis_client.lrange(keys.failed, 0, -1))]
    assert letters == [("obs-9", "reused_id", 922)] and buf.status("obs-9") == "applied"
    new = _fail_over_past_the_last_commit(settings, async_standby, redis_client)
    caplog.clear()
    _drain_once(new, caplog, replication_timeout_s=10)
    assert len(_lost_line(caplog)) == 1, _lost_line(caplog)
    engine = sa.create_engine(async_standby.standby)
    try:
        with engine.connect() as conn:
            units = dict(conn.execute(sa.text("SELECT id, name FROM obs_unit WHERE id IN (921, 922)")).all())
    finally:
        engine.dispose()
    assert units == {921: "first"}, units
    assert buf.status("obs-9") == "replicated" and redis_client.llen(keys.failed) == 1
    buf.close()


def test_a_reused_id_applied_while_the_first_of_it_waits_is_buffered_again_after_a_failover_as_itself(
        settings, async_standby, redis_client, caplog):
    """An older update (Q) of the observation waits to retry, holding its row; T, a newer update
    of it from ingest (its status key the whole JSON), and a raw producer's reuse of T's id (make
    unit 922), in one batch on M only: T waits behind Q, the reuse is applied under the id. M
    fails, S is promoted without that batch. Buffered again from the id's status key, which was
    T's: T's update went first on the row, ahead of the older Q (the row ended as Q left it), and
    unit 922 was never made again (lost). Once Q applies, T is dead-lettered as reused, and
    `failed retry` applies it last."""
    from obs_pipeline_tests.test_reliability import assert_no_holds, due_now
    from obs_pipeline_tests.workload import create_unit, push_raw

    site, buf, created_id, obs_id = _recorded_then_on_main_only(settings, async_standby, caplog)
    older = _a_newer_update_waiting(site, buf, obs_id, redis_client, caplog)  # (older than T)
    keys = SiteKeys(settings.site)
    t_id = buf.update("ExecutedObsUnit", obs_id, {"status": "T"})
    push_raw(redis_client, site.site, t_id, create_unit(922, "the id reused"))
    _drain_once(site, caplog, replication_timeout_s=0.2, retry_base_s=60)
    assert buf.status(t_id) == "applied" and redis_client.zcard(keys.retry) == 2  # Q, and T behind it
    new = _fail_over_past_the_last_commit(settings, async_standby, redis_client)
    _obs_unit_made_by_hand(async_standby.standby, 999, "made after the failover")
    caplog.clear()
    _drain_once(new, caplog, replication_timeout_s=10, retry_base_s=60)
    assert len(_lost_line(caplog)) == 1, _lost_line(caplog)
    due_now(redis_client, keys, older.transaction_id)
    _drain_once(new, caplog, replication_timeout_s=10, retry_base_s=0.05)
    letters = [(f["transaction_id"], f["failure"]["kind"]) for f in map(json.loads, redis_client.lrange(keys.failed, 0, -1))]
    assert letters == [(t_id, "reused_id")], letters
    _operator(new, "failed", "retry", "--all")
    _drain_once(new, caplog, replication_timeout_s=10)
    engine = sa.create_engine(async_standby.standby)
    try:
        with engine.connect() as conn:
            units = dict(conn.execute(sa.text("SELECT id, name FROM obs_unit WHERE id = 922")).all())
    finally:
        engine.dispose()
    assert units == {922: "the id reused"}, units
    assert _on_main(async_standby.standby, obs_id, [created_id, older.transaction_id])[::2] == (1, "T")
    assert_no_holds(redis_client, keys)
    buf.close()


@contextlib.contextmanager
def _a_drain_running_behind_proxies(settings, tmp_path, caplog, main_url: str, replica_url: str, **config):
    """A long-running `obs-pipeline drain` (a Drain.run thread, its warnings in caplog) behind
    addresses that stay the same, as a DNS name or a VIP: main and the site's replica behind
    proxies, forwarding at first to `main_url` and `replica_url`. Yields (the site's settings,
    forward(name, url)), which moves "main" or "replica" to another server. `config`: the
    DrainConfig's (replication_timeout_s 0.5 unless given)."""
    import threading

    from obs_pipeline.stack.osutil import pick_free_ports
    from obs_pipeline.stack.postgres import HOST
    from obs_pipeline.stack.proxy_process import start_proxy, stop_proxy

    ports = dict(zip(("main", "replica"), pick_free_ports(2)))
    proxies = {name: (tmp_path / f"{name}.json", tmp_path / f"{name}.log") for name in ports}

    def forward(name: str, url: str) -> None:
        stop_proxy(proxies[name][0])
        start_proxy(ports[name], sa.engine.make_url(url).port, 0, *proxies[name])

    site = dataclasses.replace(settings, main_db_url=f"postgresql+psycopg2://postgres@{HOST}:{ports['main']}/obs",
                               replica_db_url=f"postgresql+psycopg2://postgres@{HOST}:{ports['replica']}/obs")
    stop = threading.Event()
    drain = worker = None
    try:
        forward("main", main_url)
        forward("replica", replica_url)
        drain = Drain(site, DrainConfig(**{"replication_timeout_s": 0.5, **config}))
        worker = threading.Thread(target=lambda: drain.run(until_empty=False, should_stop=stop.is_set))
        with caplog.at_level(logging.WARNING, logger="obs_pipeline.drain"):
            worker.start()
            yield site, forward
    finally:
        stop.set()
        if worker is not None and worker.ident is not None:
            worker.join(60)
        if drain is not None:
            drain.close()
        for pidfile, _ in proxies.values():
            stop_proxy(pidfile)


def test_a_running_drain_settles_main_s_move_to_another_cluster_with_no_new_work(
        settings, other_cluster, main_engine, replica_engine, redis_client, clean_db, tmp_path, caplog):
    """A long-running `obs-pipeline drain` behind addresses that stay the same (a DNS name or a
    VIP for main, another for the site's replica): a batch committed on main X awaits the
    replica (its replay paused); main is then replaced by another cluster Y (restored from a
    dump taken before the batch) and the site's replica by Y's standby, with nothing buffered
    since. The drain kept main's cluster as its session on X said, and a replica of Y's for one
    of another cluster: it blamed the replica and left the batch `applied`, on neither server,
    until new work came. It asks main again, as for another timeline, and settles the move."""
    from obs_pipeline.stack.osutil import wait_until
    from obs_pipeline_tests.workload import replay_paused

    with replay_paused(replica_engine), _a_drain_running_behind_proxies(
            settings, tmp_path, caplog, settings.main_db_url, settings.replica_db_url) as (site, forward):
        buf, tx_id, obs_id = _buffer_one(site)
        assert wait_until(lambda: buf.status(tx_id) == "applied", 30)
        forward("main", other_cluster.main)  # main is Y now, the site's replica Y's standby
        forward("replica", other_cluster.replica)
        settled = wait_until(lambda: _on_main(other_cluster.main, obs_id, [tx_id])[:2] == (1, 1), 45)
        blamed = [r.getMessage() for r in caplog.records if "another cluster" in r.getMessage()]
        assert settled, f"the batch is not on the new main; the drain said {blamed}"
        assert wait_until(lambda: buf.status(tx_id) == "replicated", 30)
        assert buf.get("ExecutedObsUnit", obs_id)["status"] == "running"  # from Y's standby
    assert len(_lost_line(caplog)) == 1 and _lost_line(caplog)[0].startswith("main is now another cluster")
    buf.close()


def test_the_sensor_launches_a_run_when_main_moved_to_another_cluster_with_no_new_work(
        settings, other_cluster, replica_engine, redis_client, clean_db, caplog):
    """A batch committed on main X awaits the replica (its replay paused); main is then replaced
    by another cluster Y (restored from a dump taken before the batch, on timeline 1 as X was)
    and the site's replica by Y's standby, with nothing buffered since. The sensor asked main
    only which timeline it writes: 1, as recorded, so it saw no move and launched no run, its
    skip reason blaming the replica (a standby of another cluster), and the batch stayed
    `applied`, on neither server, until new work came. It asks main's cluster too: a run is
    launched, and it settles the move."""
    from dagster import RunRequest, instance_for_test

    from obs_pipeline_tests.workload import replay_paused

    buf, tx_id, obs_id = _buffer_one(settings)
    with replay_paused(replica_engine):
        _drain_once(settings, caplog, replication_timeout_s=0.2)
    assert buf.status(tx_id) == "applied"
    moved = dataclasses.replace(settings, main_db_url=other_cluster.main, replica_db_url=other_cluster.replica)
    with instance_for_test() as instance:
        tick, _ = _tick(instance, moved, None)
    assert isinstance(tick, RunRequest), tick.skip_message
    caplog.clear()
    _drain_once(moved, caplog, replication_timeout_s=10)
    assert len(_lost_line(caplog)) == 1 and _lost_line(caplog)[0].startswith("main is now another cluster")
    assert _on_main(other_cluster.main, obs_id, [tx_id]) == (1, 1, "running")
    assert buf.status(tx_id) == "replicated"
    assert redis_client.zcard(SiteKeys(settings.site).awaiting_replication) == 0
    buf.close()

def test_a_batch_claimed_before_a_failover_is_settled_waits_behind_what_it_buffered_again(
        settings, forked, redis_client, caplog):
    """Main's address moves to the promoted S while the old primary M still serves the drain's
    open session (a VIP moved, M not fenced yet); the site's replica follows S. The drain applies
    a full batch on M and claims the next behind it; its ask of the replica after the commit
    asks main again (another timeline), and the settlement buffers the batch again, lost on S,
    at the oldest end of `processing`. The next batch, claimed before and kept in memory, was
    applied on S ahead of it: an older update of a row, applied again after a newer one,
    undid it. It waits in `processing` behind what the settlement buffered again."""
    site = dataclasses.replace(settings, main_db_url=forked["old"], replica_db_url=forked["follower"])
    _runs_ahead(forked["promoted"], forked["follower"], main=forked["old"])  # the replica past M's commits
    buf = TransactionBuffer(settings=site)
    ids = [buf.update("ObsUnit", 1, {"name": "older"}), buf.update("ObsUnit", 2, {"name": "older"}),
           buf.update("ObsUnit", 1, {"name": "newer"}), buf.update("ObsUnit", 3, {"name": "newer"})]
    drain = Drain(site, DrainConfig(batch_size=2, replication_timeout_s=0.5))
    try:
        drain.main.identify()  # its session on M ...
        drain.main.url = sa.engine.make_url(forked["promoted"])  # ... the address names S for the next
        with caplog.at_level(logging.WARNING, logger="obs_pipeline.drain"):
            summary = drain.run(until_empty=True, replica_patience_s=1.0, budget_s=30)
    finally:
        drain.close()
    assert len(_lost_line(caplog)) == 1, (_lost_line(caplog), summary)
    engine = sa.create_engine(forked["promoted"])
    try:
        with engine.connect() as conn:
            names = dict(conn.execute(sa.text("SELECT id, name FROM obs_unit WHERE id IN (1, 2, 3)")).all())
            recorded = conn.execute(sa.text("SELECT count(*) FROM obs_pipeline_applied "
                                            "WHERE transaction_id = ANY(:ids)"), {"ids": ids}).scalar()
    finally:
        engine.dispose()
    assert names == {1: "newer", 2: "older", 3: "newer"}, names
    assert recorded == 4 and summary.dead_lettered == 0, (recorded, summary)
    buf.close()


def test_a_lost_update_waits_behind_an_older_one_lost_with_it_that_main_now_refuses(
        settings, async_standby, redis_client, caplog):
    """Two updates of a record (H older, L newer) committed on M only, S down; H also renames obs
    unit 777, made on M by hand after S stopped. M fails, S is promoted: both are buffered again,
    H first; S refuses H (no obs unit 777), which is dead-lettered, L behind it as blocked. Once
    777 is made on S, `failed retry --all` applies H, then L: the record ends as L left it. (A
    transaction buffered again waits behind no holder that was not buffered again with it: one
    that was is older.)"""

    site, buf, _, obs_id, older, newer_id = _refused_once_lost(settings, async_standby, caplog, "older", then="newer")
    new = _fail_over_past_the_last_commit(settings, async_standby, redis_client)
    caplog.clear()
    summary = _drain_until_dead_lettered(new, caplog, buf, older.transaction_id, replication_timeout_s=1)  # (H's retries)
    assert len(_lost_line(caplog)) == 1, _lost_line(caplog)
    assert buf.status(older.transaction_id) == "failed" and buf.status(newer_id) == "failed", summary
    _obs_unit_made_by_hand(async_standby.standby, 777, "made again")
    _operator(new, "failed", "retry", "--all")
    _drain_once(new, caplog, replication_timeout_s=10)
    assert _on_main(async_standby.standby, obs_id, [older.transaction_id, newer_id]) == (1, 2, "newer")
    buf.close()


def test_a_lost_update_that_main_now_refuses_still_applies_before_a_newer_update_of_its_row_that_waits_to_retry(
        settings, async_standby, redis_client, caplog):
    """As above (Q, newer, waits to retry holding the row; L, lost, buffered again, is older),
    but L also renames obs unit 777, made on M by hand after S stopped: S refuses it, and it
    waits to retry too. It joined the row's queue behind Q, which is newer: Q, due first, was
    applied, and L after it undid Q's update (main kept "lost"). L stays ahead of Q."""
    from obs_pipeline_tests.test_reliability import due_now

    site, buf, created_id, obs_id, lost, _ = _refused_once_lost(settings, async_standby, caplog)
    newer = _a_newer_update_waiting(site, buf, obs_id, redis_client, caplog)
    keys = SiteKeys(settings.site)
    new = _fail_over_past_the_last_commit(settings, async_standby, redis_client)
    _obs_unit_made_by_hand(async_standby.standby, 999, "made after the failover")  # Q can apply now; L cannot
    caplog.clear()
    _drain_once(new, caplog, replication_timeout_s=10, retry_base_s=60)
    assert len(_lost_line(caplog)) == 1, _lost_line(caplog)
    assert redis_client.zcard(keys.retry) == 2 and buf.status(lost.transaction_id) == "pending"  # L waits too
    due_now(redis_client, keys, newer.transaction_id)  # Q due first
    _drain_once(new, caplog, replication_timeout_s=10, retry_base_s=60)
    _obs_unit_made_by_hand(async_standby.standby, 777, "made again")  # L's cause fixed
    due_now(redis_client, keys, lost.transaction_id)
    _drain_once(new, caplog, replication_timeout_s=10, retry_base_s=0.05)
    _assert_settled(async_standby, redis_client, settings.site, obs_id,
                    [created_id, lost.transaction_id, newer.transaction_id], "newer")
    buf.close()


@pytest.fixture
def twin_standbys(stack):
    """Two standbys of one primary promoted in turn, each to timeline 2: P ("main", timeline 1)
    with A ("first") and B ("second"), asynchronous standbys of it that stream its WAL alone.
    `promote_first()` stops P and promotes A (timeline 2); `promote_second()` stops A and
    promotes B, which never followed A: timeline 2 too, of the same cluster, another history past
    the fork. It clones R ("follower") from B: the site's replica after it."""
    from types import SimpleNamespace

    from obs_pipeline.stack.postgres import HOST

    servers, url, closed = _servers(stack, "tw_main", "tw_first", "tw_second", "tw_follower")
    p, a, b, r = servers
    try:
        _primary_with_two_standbys(p, a, b, url)

        def promote_first() -> None:
            p.stop(mode="immediate")
            assert a.query("SELECT pg_promote(true, 60)") == (True,)

        def promote_second() -> None:
            a.stop(mode="immediate")
            assert b.query("SELECT pg_promote(true, 60)") == (True,)
            r.clone_from(b)
            r.set_upstream(b.port)
            r.start()

        yield SimpleNamespace(main=url[p], first=url[a], second=url[b], follower=url[r],
                              nowhere=f"postgresql+psycopg2://postgres@{HOST}:{closed}/obs",
                              promote_first=promote_first, promote_second=promote_second)
    finally:
        for server in reversed(servers):
            server.stop(mode="immediate")
            shutil.rmtree(server.datadir, ignore_errors=True)


def _timeline_and_cluster(url: str) -> tuple[int, int]:
    """The timeline the primary at `url` writes, and its system identifier."""
    from obs_pipeline.lsn import MAIN_TIMELINE_EXPRESSION, timeline_of_wal_file

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            wal_file, cluster = conn.execute(sa.text(
                f"SELECT {MAIN_TIMELINE_EXPRESSION}, (SELECT system_identifier FROM pg_control_system())")).one()
    finally:
        engine.dispose()
    return timeline_of_wal_file(wal_file), cluster


def test_a_batch_committed_on_a_promoted_standby_lost_when_another_is_promoted_to_the_same_timeline_is_applied_again(
        settings, twin_standbys, redis_client, caplog):
    """P fails, its standby A is promoted (timeline 2) and the drain commits a batch on A (its
    chunk recorded on timeline 2), the site's replica out of reach. A fails, and P's other standby
    B, which never followed A, is promoted: timeline 2 as well, of the same cluster, without the
    batch. B writes past the batch's LSN and the site's replica R (following B) replays it. Main's
    timeline and cluster were those recorded, so nothing asked B for the batch's ids: its caches
    were cleaned as replicated, and its rows were on neither server. Main is another server than
    the one that committed it: the drain asks it for the ids, and buffers the batch again."""
    twin_standbys.promote_first()
    on_a = dataclasses.replace(settings, main_db_url=twin_standbys.first, replica_db_url=twin_standbys.nowhere)
    buf, tx_id, obs_id = _buffer_one(on_a)
    _drain_once(on_a, caplog, replication_timeout_s=0.2)
    assert buf.status(tx_id) == "applied"
    keys = SiteKeys(settings.site)
    (member, lsn), = redis_client.zrange(keys.awaiting_replication, 0, -1, withscores=True)
    twin_standbys.promote_second()
    recorded = json.loads(member)
    assert _timeline_and_cluster(twin_standbys.second) == (recorded["tl"], recorded["cl"]) == (
        2, recorded["cl"])  # B: the timeline and cluster the batch's chunk recorded
    _write_past(twin_standbys.second, twin_standbys.follower, int(lsn))
    site = dataclasses.replace(settings, main_db_url=twin_standbys.second, replica_db_url=twin_standbys.follower)
    caplog.clear()
    summary = _drain_once(site, caplog, replication_timeout_s=10)
    assert _on_main(twin_standbys.second, obs_id, [tx_id]) == (1, 1, "running")
    assert summary.applied == 1 and summary.stopped_because == "buffer empty", summary
    assert buf.status(tx_id) == "replicated"
    assert redis_client.zcard(keys.awaiting_replication) == 0
    assert _read(site, obs_id)["status"] == "running"  # from the follower
    said = _lost_line(caplog)
    assert len(said) == 1 and said[0].startswith(
        "main is now another server on timeline 2 than the one that committed them: 1 committed transaction(s) of 1 "
        "batch(es)"), said
    stats = redis_client.hgetall(keys.stats)
    assert int(stats[b"applied_total"]) == 1 and int(stats[b"lost_in_failover_total"]) == 1, stats
    buf.close()


def test_a_batch_awaiting_the_replica_when_main_restarts_is_asked_for_once_and_kept(
        settings, stack, redis_client, clean_db, caplog, monkeypatch):
    """Main (the stack's) restarts with a batch awaiting the replica (out of reach: its caches
    kept): its server's start is not the one the batch's chunk recorded, so the next drain asks
    main for its ids, once (a restart loses no flushed commit: main has them), and records the
    chunk as of main's server now. Nothing is buffered again or doubled, no warning; cleaned once
    the replica answers."""
    from obs_pipeline.apply import MainDatabase
    from obs_pipeline.stack.osutil import pick_free_ports
    from obs_pipeline.stack.postgres import HOST

    asked, applied_among = [], MainDatabase.applied_among
    monkeypatch.setattr(MainDatabase, "applied_among", lambda self, ids, **kw: asked.append(list(ids))
                        or applied_among(self, ids, **kw))
    keys = SiteKeys(settings.site)
    unreplicated = dataclasses.replace(
        settings, replica_db_url=f"postgresql+psycopg2://postgres@{HOST}:{pick_free_ports(1)[0]}/obs")
    buf, tx_id, obs_id = _buffer_one(settings)
    _drain_once(unreplicated, caplog, replication_timeout_s=0.2)
    (before, _), = redis_client.zrange(keys.awaiting_replication, 0, -1, withscores=True)
    stack.stop_service("main", mode="fast")
    stack.start_service("main")
    caplog.clear()
    _drain_once(unreplicated, caplog, replication_timeout_s=0.2)
    (after, _), = redis_client.zrange(keys.awaiting_replication, 0, -1, withscores=True)
    assert asked == [[tx_id]], asked
    assert json.loads(after)["st"] != json.loads(before)["st"] and buf.status(tx_id) == "applied"
    summary = _drain_once(settings, caplog, replication_timeout_s=10)
    assert asked == [[tx_id]] and summary.replicated == 1 and buf.status(tx_id) == "replicated", (asked, summary)
    assert _on_main(settings.main_db_url, obs_id, [tx_id]) == (1, 1, "running")
    assert not _lost_line(caplog) and redis_client.zcard(keys.awaiting_replication) == 0
    assert int(redis_client.hget(keys.stats, "applied_total")) == 1
    buf.close()


@pytest.mark.parametrize("replication_timeout_s", [0.5, 300], ids=["idle", "waiting for the replay of its commit"])
def test_a_running_drain_across_two_promotions_to_one_timeline_number_applies_the_lost_batch_again(
        settings, twin_standbys, redis_client, tmp_path, caplog, replication_timeout_s):
    """As above, under a long-running `obs-pipeline drain` behind addresses that stay the same:
    it commits the batch on A, the site's replica out of reach, and then idles (or, with a long
    replication_timeout_s, still waits for the replay of that commit). A fails, B is promoted to
    timeline 2 too, the addresses move to B and its standby R, and R replays past the batch's
    LSN. The drain's session, opened on A, said the timeline and cluster that R replays, by the
    server that recorded the batch: the position counted, and the batch was cleaned, on neither
    server (an idle drain's new session on main every 30 s, before it cleaned, caught the idle
    case only). R does not show the batch's id, so its caches stay and main is asked for it: the
    session on A fails, the next is B's, and the failover is settled."""
    from obs_pipeline.stack.osutil import wait_until

    keys = SiteKeys(settings.site)
    twin_standbys.promote_first()
    with _a_drain_running_behind_proxies(settings, tmp_path, caplog, twin_standbys.first, twin_standbys.nowhere,
                                         replication_timeout_s=replication_timeout_s) as (site, forward):
        buf, tx_id, obs_id = _buffer_one(site)
        assert wait_until(lambda: redis_client.zcard(keys.awaiting_replication) == 1, 30)
        (_, lsn), = redis_client.zrange(keys.awaiting_replication, 0, -1, withscores=True)
        twin_standbys.promote_second()
        forward("main", twin_standbys.second)  # main is B now, the site's replica B's standby
        _write_past(twin_standbys.second, twin_standbys.follower, int(lsn))
        forward("replica", twin_standbys.follower)
        assert wait_until(lambda: buf.status(tx_id) == "replicated"
                          or _on_main(twin_standbys.second, obs_id, [tx_id])[:2] == (1, 1), 45)
        assert _on_main(twin_standbys.second, obs_id, [tx_id]) == (1, 1, "running"), buf.status(tx_id)
        assert wait_until(lambda: buf.status(tx_id) == "replicated", 30)
        assert buf.get("ExecutedObsUnit", obs_id)["status"] == "running"  # from B's standby
    said = _lost_line(caplog)
    assert len(said) == 1 and said[0].startswith("main is now another server on timeline 2"), said
    assert int(redis_client.hget(keys.stats, "lost_in_failover_total")) == 1
    buf.close()
