"""Nothing lost, nothing doubled across the time-based expiries: a transaction's status record
(a week after `replicated`), its applied-id record on main (pruned after `older_than_days`),
against a copy of it that reaches Redis only after both are gone."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace

import pytest
import redis
import sqlalchemy as sa

from obs_pipeline.buffer_store import REPLICATED_STATUS_TTL_S, BufferStore
from obs_pipeline.dead_letters import DeadLetters
from obs_pipeline.health import oldest_waiting
from obs_pipeline.ingest import TransactionBuffer
from obs_pipeline.keys import SiteKeys
from obs_pipeline.model_registry import ModelRegistry
from obs_pipeline.prune import ids_that_may_come_back
from obs_pipeline.schema import prune_applied, prune_cutoff
from obs_pipeline.spool import REFUSED_KIND
from obs_pipeline_tests.test_reliability import replicated_observation
from obs_pipeline_tests.workload import drain_until_settled

pytestmark = pytest.mark.usefixtures("clean_db")


def _script_host_whose_reply_is_lost(monkeypatch, buf: TransactionBuffer) -> None:
    """The script's next push reaches Redis but its reply is lost (a timeout: it is spooled),
    and from then on its host reaches no Redis (switched off): its spool stays on its disk."""
    real_buffer, host_stores, lost = BufferStore.buffer, {buf.store, buf._store_of_this_thread()}, []

    def buffer(self, *args):
        if self not in host_stores:
            return real_buffer(self, *args)
        if lost:
            raise redis.ConnectionError("the script's host is off (test)")
        real_buffer(self, *args)
        lost.append(True)
        raise redis.TimeoutError("Timeout reading from socket (test: Redis ran it, its reply was lost)")

    monkeypatch.setattr(BufferStore, "buffer", buffer)


def _aged(line: bytes, days: float) -> bytes:
    """A spooled line as if it had been spooled `days` earlier (its transaction's timestamp)."""
    entry = json.loads(line)
    tx = json.loads(entry["tx"])
    tx["timestamp"] = (dt.datetime.fromisoformat(tx["timestamp"]) - dt.timedelta(days=days)).isoformat()
    entry["tx"] = entry["tx"][:entry["tx"].index('"transaction_id"')] + json.dumps(
        {k: v for k, v in tx.items() if k != "status"})[1:]
    return (json.dumps(entry) + "\n").encode()


def _a_week_passes(buf: TransactionBuffer, settings, main_engine, redis_client, tx_id: str) -> None:
    """What the week does: the spooled line is 8 days old, the transaction's status record (kept
    REPLICATED_STATUS_TTL_S after `replicated`) has expired, and the daily prune has removed its
    applied-id record, as the prune job does."""
    status_key = SiteKeys(settings.site).transaction(tx_id)
    assert 0 < redis_client.ttl(status_key) <= REPLICATED_STATUS_TTL_S
    redis_client.delete(status_key)
    with buf.spool._locked():
        lines = buf.spool.path.read_bytes().splitlines(keepends=True)
        buf.spool.path.write_bytes(b"".join(_aged(line, days=8) for line in lines))
    with main_engine.begin() as conn:
        conn.execute(sa.text("UPDATE obs_pipeline_applied SET applied_at = applied_at - interval '8 days'"))

    store = BufferStore(redis_client, settings.site)
    before, _ = prune_cutoff(7.0, oldest_waiting(store))
    with main_engine.begin() as conn:
        pruned = prune_applied(conn, 7.0, settings.site, ids_that_may_come_back(store), before)
    assert pruned >= 1


def _pushed_a_week_later(buf: TransactionBuffer, settings, main_engine, redis_client, obs: dict,
                         finish: str) -> tuple[TransactionBuffer, list[dict]]:
    """A week passes (_a_week_passes), the host is on again and its next script pushes the spool;
    checks that the row kept the later "aborted" and that the copy `finish` alone was set aside.
    Returns that script's buffer and the letters."""
    _a_week_passes(buf, settings, main_engine, redis_client, finish)
    back = TransactionBuffer(settings=settings)
    assert back.spool.flush() and back.spool.pending() == 0
    drain_until_settled(settings)
    with main_engine.connect() as conn:
        row = conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :i"), {"i": obs["id"]}).scalar_one()
    assert row == "aborted"
    letters = [json.loads(letter) for letter in redis_client.lrange(SiteKeys(settings.site).failed, 0, -1)]
    assert [(letter["transaction_id"], letter["failure"]["kind"]) for letter in letters] == [(finish, REFUSED_KIND)]
    return back, letters


def _overtaken_then_pushed_a_week_later(buf: TransactionBuffer, settings, main_engine, redis_client, obs: dict,
                                       finish: str, tmp_path) -> list[dict]:
    """`finish`, in Redis once, is applied; a later update of its row from another host is applied;
    then a week passes and the host's spool is pushed (_pushed_a_week_later, which checks the row
    kept the later update). Closes the buffers; returns the letters."""
    drain_until_settled(settings)
    other_host = TransactionBuffer(settings=replace(settings, spool_dir=str(tmp_path / "other-host")))
    other_host.update("ExecutedObsUnit", obs["id"], {"status": "aborted"})
    drain_until_settled(settings)
    back, letters = _pushed_a_week_later(buf, settings, main_engine, redis_client, obs, finish)
    for b in (buf, other_host, back):
        b.close()
    return letters


def _read_then_set_aside_by_its_push(back: TransactionBuffer, check, redis_client, finish: str) -> None:
    """`check` the reads with the week-old copy of `finish` in `back`'s spool, push it (the push
    sets it aside as a possible copy, a dead letter), and `check` them again."""
    check()  # the copy not pushed yet
    assert back.spool.flush() and back.spool.pending() == 0  # the push sets it aside
    check()
    letters = [json.loads(letter) for letter in redis_client.lrange(back.store.keys.failed, 0, -1)]
    assert [(letter["transaction_id"], letter["failure"]["kind"]) for letter in letters] == [(finish, REFUSED_KIND)]


def test_a_copy_spooled_after_a_lost_reply_and_pushed_a_week_later_is_not_applied_again(
        settings, redis_client, main_engine, monkeypatch, tmp_path):
    """An update whose push reached Redis but whose reply was lost is spooled (Redis may not have
    it); its host is then off for over a week. Meanwhile the drain applied the update, a later
    update of the row from another host was applied, the status record expired and the prune
    removed the applied-id record. The spool pushed then must not apply the copy again: it did,
    and the row went back to the older value."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)

    _script_host_whose_reply_is_lost(monkeypatch, buf)
    finish = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
    assert buf.spool.pending() == 1 and redis_client.llen(keys.buffer) == 1  # in Redis all the same
    drain_until_settled(settings)
    other_host = TransactionBuffer(settings=replace(settings, spool_dir=str(tmp_path / "other-host")))
    later = other_host.update("ExecutedObsUnit", obs["id"], {"status": "aborted"})
    drain_until_settled(settings)
    assert other_host.status(later) == "replicated"

    back, letters = _pushed_a_week_later(buf, settings, main_engine, redis_client, obs, finish)
    assert "it is 8.0 days old, an earlier push of it may have reached Redis" in letters[0]["failure"]["reason"]
    assert back.get("ExecutedObsUnit", obs["id"])["status"] == "aborted"
    for b in (buf, other_host, back):
        b.close()


def test_a_copy_spooled_after_a_lost_reply_is_not_read_a_week_later(
        settings, redis_client, main_engine, monkeypatch, tmp_path):
    """As above, and the host's next script reads before its spool's flusher pushes (it waits
    spool.RETRY_INTERVAL_S first). The status key had expired, so reads took the week-old copy for
    a line not pushed yet and put it on top: get and search showed its "completed" over the later
    "aborted" main holds, a value the push then sets aside, never to be applied."""
    from obs_pipeline import spool as spool_module

    monkeypatch.setattr(spool_module, "RETRY_INTERVAL_S", 600.0)  # the flushers wait: the reads come first
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    _script_host_whose_reply_is_lost(monkeypatch, buf)
    finish = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
    drain_until_settled(settings)
    other_host = TransactionBuffer(settings=replace(settings, spool_dir=str(tmp_path / "other-host")))
    later = other_host.update("ExecutedObsUnit", obs["id"], {"status": "aborted"})
    drain_until_settled(settings)
    assert other_host.status(later) == "replicated"
    _a_week_passes(buf, settings, main_engine, redis_client, finish)
    back = TransactionBuffer(settings=settings)
    assert back.spool.pending() == 1

    def check() -> None:
        assert back.get("ExecutedObsUnit", obs["id"])["status"] == "aborted"
        assert [r["status"] for r in back.search("ExecutedObsUnit", {"obs_unit_id": 1})] == ["aborted"]
        assert back.search("ExecutedObsUnit", {"status": "completed"}) == []

    _read_then_set_aside_by_its_push(back, check, redis_client, finish)
    for b in (buf, other_host, back):
        b.close()


def test_old_spooled_lines_redis_never_took_or_still_knows_are_pushed_as_before(
        settings, redis_client, main_engine, monkeypatch, tmp_path):
    """The refusal above is for a line that may be a forgotten copy alone: a week-old line whose
    transaction Redis still knows (its status key) is left as it is, as before, and the lines
    spooled behind it without reaching Redis (their host cut off) are pushed and applied, however
    old."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)

    _script_host_whose_reply_is_lost(monkeypatch, buf)
    finish = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
    behind = []
    for n in range(2):
        with buf.transaction(endpoint="start_observation") as tx:
            behind.append(tx.create("ExecutedObsUnit", {"obs_unit_id": 2, "start_time": "2025-01-02T00:00:00Z",
                                                        "status": f"behind {n}"})["id"])
    assert buf.spool.pending() == 3 and redis_client.llen(keys.buffer) == 1
    drain_until_settled(settings)
    other_host = TransactionBuffer(settings=replace(settings, spool_dir=str(tmp_path / "other-host")))
    other_host.update("ExecutedObsUnit", obs["id"], {"status": "aborted"})
    drain_until_settled(settings)

    with buf.spool._locked():  # 8 days pass with the status record kept (a site's longer TTL, say)
        lines = buf.spool.path.read_bytes().splitlines(keepends=True)
        buf.spool.path.write_bytes(b"".join(_aged(line, days=8) for line in lines))
    back = TransactionBuffer(settings=settings)
    assert back.spool.flush() and back.spool.pending() == 0
    drain_until_settled(settings)

    assert redis_client.lrange(keys.failed, 0, -1) == []
    with main_engine.connect() as conn:
        rows = dict(conn.execute(sa.text("SELECT id::text, status FROM executed_obs_unit")).all())
    assert rows == {obs["id"]: "aborted", behind[0]: "behind 0", behind[1]: "behind 1"}
    assert back.status(finish) == "replicated"
    for b in (buf, other_host, back):
        b.close()


def _spooled_as_redis_is_full_then_sent_by_a_push_that_dies(monkeypatch, buf: TransactionBuffer, settings,
                                                            redis_client, obs: dict) -> str:
    """`buf`'s host finds Redis full (its stores only, from now on): its update of `obs` to
    "completed" is spooled, not marked (a full Redis took none of it); another script's push
    sends it and dies before recording it (`{site}.pushing` left behind). The update's id."""
    from obs_pipeline.spool import Spool

    real_buffer, host_stores = BufferStore.buffer, {buf.store, buf._store_of_this_thread()}

    def buffer(self, *args):
        if self in host_stores:
            raise redis.exceptions.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory' (test)")
        return real_buffer(self, *args)

    monkeypatch.setattr(BufferStore, "buffer", buffer)
    finish = buf.update("ExecutedObsUnit", obs["id"], {"status": "completed"})
    assert b"maybe_in_redis" not in buf.spool.path.read_bytes()  # a full Redis took none of it
    real_offset = Spool._write_offset
    monkeypatch.setattr(Spool, "_write_offset", lambda self, value: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError, match="crash"):  # another script's push: sent, then it died
        Spool(settings.spool_dir, settings.site, flush_store=BufferStore(redis_client, settings.site)).flush()
    monkeypatch.setattr(Spool, "_write_offset", real_offset)
    return finish


def test_a_spooled_line_whose_push_died_before_recording_it_and_pushed_a_week_later_is_not_applied_again(
        settings, redis_client, main_engine, monkeypatch, tmp_path):
    """The other way a spooled line becomes a copy: a push sends it, Redis takes it, and the push
    dies before it records that (its offset). The line was spooled as Redis was full (nothing of
    it taken then, so it is not marked); pushed again by the next script over a week later, once
    the status had expired and the prune had taken the applied-id record, it was applied again."""
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    finish = _spooled_as_redis_is_full_then_sent_by_a_push_that_dies(monkeypatch, buf, settings, redis_client, obs)
    assert buf.spool.pending() == 1 and redis_client.llen(keys.buffer) == 1
    drain_until_settled(settings)
    other_host = TransactionBuffer(settings=replace(settings, spool_dir=str(tmp_path / "other-host")))
    other_host.update("ExecutedObsUnit", obs["id"], {"status": "aborted"})
    drain_until_settled(settings)

    back, _ = _pushed_a_week_later(buf, settings, main_engine, redis_client, obs, finish)
    for b in (buf, other_host, back):
        b.close()


def test_a_spooled_line_whose_push_died_before_recording_it_is_not_read_a_week_later(
        settings, redis_client, main_engine, monkeypatch, tmp_path):
    """As above, and the host's next script reads before its spool's flusher pushes. Reads left out
    a week-old line marked as one Redis may hold, but not the first line after a push that died
    (`{site}.pushing` left behind), which the push treats the same: get and search showed its
    "completed" over the later "aborted" main holds, a value the push then sets aside."""
    from obs_pipeline import spool as spool_module

    monkeypatch.setattr(spool_module, "RETRY_INTERVAL_S", 600.0)  # the flushers wait: the reads come first
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    finish = _spooled_as_redis_is_full_then_sent_by_a_push_that_dies(monkeypatch, buf, settings, redis_client, obs)
    monkeypatch.undo()
    monkeypatch.setattr(spool_module, "RETRY_INTERVAL_S", 600.0)
    drain_until_settled(settings)
    other_host = TransactionBuffer(settings=replace(settings, spool_dir=str(tmp_path / "other-host")))
    other_host.update("ExecutedObsUnit", obs["id"], {"status": "aborted"})
    drain_until_settled(settings)
    _a_week_passes(buf, settings, main_engine, redis_client, finish)
    back = TransactionBuffer(settings=settings)
    assert back.spool.pending() == 1 and b"maybe_in_redis" not in back.spool.path.read_bytes()

    def check() -> None:
        assert back.get("ExecutedObsUnit", obs["id"])["status"] == "aborted"
        assert [r["status"] for r in back.search("ExecutedObsUnit", {"obs_unit_id": 1})] == ["aborted"]

    _read_then_set_aside_by_its_push(back, check, redis_client, finish)
    for b in (buf, other_host, back):
        b.close()


def test_a_spool_whose_push_died_as_it_removed_the_pushed_spool_is_not_applied_again_a_week_later(
        settings, redis_client, main_engine, monkeypatch, tmp_path):
    """A push that got every line into Redis removes its progress (the offset) and the spool, with
    the folder's fsync between the two. Killed there (a power loss), it left the spool without its
    offset: the next push took every line of it for untried but the first (`{site}.pushing` marks
    that one alone), and a host that stayed off for a week had them buffered and applied again once
    their statuses had expired and the prune had taken their applied-id records: the row went back
    to the older value."""
    from obs_pipeline import spool as spool_module
    from obs_pipeline.spool import Spool
    from obs_pipeline.stack.osutil import pick_free_ports

    class Killed(BaseException):
        pass

    monkeypatch.setattr(Spool, "start_flusher", lambda self: None)  # the test's pushes alone
    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    down = TransactionBuffer(settings=replace(settings, redis_url=f"redis://127.0.0.1:{pick_free_ports(1)[0]}/0"))
    spooled = [down.update("ObsUnit", 2, {"name": "spooled first"}),
               down.update("ExecutedObsUnit", obs["id"], {"status": "completed"})]  # spooled: Redis refused them
    down.close()
    monkeypatch.setattr(spool_module, "_fsync_folder", lambda folder: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):  # every line pushed; killed between the removals of its offset and of the spool
        buf.spool.flush()
    monkeypatch.undo()
    assert redis_client.llen(keys.buffer) == 2  # Redis took both, once
    drain_until_settled(settings)
    other_host = TransactionBuffer(settings=replace(settings, spool_dir=str(tmp_path / "other-host")))
    other_host.update("ExecutedObsUnit", obs["id"], {"status": "aborted"})
    drain_until_settled(settings)

    redis_client.delete(*(keys.transaction(tx_id) for tx_id in spooled))  # a week passes: statuses expired,
    if buf.spool.path.exists():  # the spooled lines 8 days old,
        with buf.spool._locked():
            lines = buf.spool.path.read_bytes().splitlines(keepends=True)
            buf.spool.path.write_bytes(b"".join(_aged(line, days=8) for line in lines))
    with main_engine.begin() as conn:  # and the prune took the applied-id records
        conn.execute(sa.text("UPDATE obs_pipeline_applied SET applied_at = applied_at - interval '8 days'"))
        before, _ = prune_cutoff(7.0, oldest_waiting(BufferStore(redis_client, settings.site)))
        assert prune_applied(conn, 7.0, settings.site, ids_that_may_come_back(BufferStore(redis_client, settings.site)),
                             before) >= 2
    back = TransactionBuffer(settings=settings)  # the host on again: its next script pushes what its spool holds
    assert back.spool.flush() and back.spool.pending() == 0
    drain_until_settled(settings)
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :i"),
                            {"i": obs["id"]}).scalar_one() == "aborted"
    for b in (buf, other_host, back):
        b.close()


def test_a_line_spooled_as_redis_refused_the_connection_is_pushed_however_old(
        settings, redis_client, main_engine, tmp_path):
    """A connect refused (Redis down, the site's Redis switched off for a week) cannot have sent
    anything: such a line is no copy, and is pushed and applied whatever its age. Marked as a
    lost reply's, a week-long Redis outage dead-lettered a line at each attempt to reach it."""
    from obs_pipeline.stack.osutil import pick_free_ports

    keys = SiteKeys(settings.site)
    down = replace(settings, redis_url=f"redis://127.0.0.1:{pick_free_ports(1)[0]}/0")
    buf = TransactionBuffer(settings=down)
    with buf.transaction(endpoint="start_observation") as tx:
        obs = tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                            "status": "spooled as Redis was down"})
    with buf.spool._locked():
        lines = buf.spool.path.read_bytes().splitlines(keepends=True)
        assert len(lines) == 1 and "maybe_in_redis" not in json.loads(lines[0]), lines
        buf.spool.path.write_bytes(b"".join(_aged(line, days=8) for line in lines))
    buf.close()

    back = TransactionBuffer(settings=settings)  # Redis is back, a week later
    assert back.spool.flush() and back.spool.pending() == 0
    drain_until_settled(settings)
    assert redis_client.lrange(keys.failed, 0, -1) == []
    with main_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM executed_obs_unit WHERE id = :i"),
                            {"i": obs["id"]}).scalar_one() == "spooled as Redis was down"
    back.close()


@pytest.mark.parametrize("scheme", ["redis", "rediss", "unix"])
def test_a_line_spooled_as_redis_refused_the_connection_is_no_copy_whatever_redis_py_says(
        settings, redis_client, monkeypatch, tmp_path, scheme):
    """The connect refused above, told by what failed (the connect of ingest's own connection), not by
    redis-py's wording: told by its text (" connecting to "), a reworded message made every line a
    script spooled while Redis was down a possible copy, set aside once a week old. So for each
    scheme of OBS_REDIS_URL, on the connection class redis-py picks for it (TLS, a unix socket)."""
    from obs_pipeline.stack.osutil import pick_free_ports

    said = []

    def reworded(where, error) -> str:
        said.append(f"Redis at {where} would not take a connection ({error})")
        return said[-1]

    monkeypatch.setattr(redis.connection, "format_error_message", reworded)
    url = (f"unix://{tmp_path / 'no-redis.sock'}" if scheme == "unix"
           else f"{scheme}://127.0.0.1:{pick_free_ports(1)[0]}/0")
    buf = TransactionBuffer(settings=replace(settings, redis_url=url))
    try:
        picked = {"redis": redis.Connection, "rediss": redis.SSLConnection,
                  "unix": redis.UnixDomainSocketConnection}[scheme]
        assert issubclass(buf.redis.connection_pool.connection_class, picked)
        with buf.transaction(endpoint="start_observation") as tx:
            tx.create("ExecutedObsUnit", {"obs_unit_id": 1, "start_time": "2025-01-01T00:00:00Z",
                                          "status": "spooled as Redis was down"})
        with buf.spool._locked():
            lines = buf.spool.path.read_bytes().splitlines()
        assert len(lines) == 1 and "maybe_in_redis" not in json.loads(lines[0]), lines
        assert said and " connecting to " not in said[-1]  # redis-py's error, reworded
    finally:
        buf.close()
        buf.spool.path.unlink(missing_ok=True)  # (no Redis to push it to: not told of at the suite's exit)


def test_a_push_whose_reply_is_lost_once_connected_is_still_marked_a_possible_copy(
        settings, redis_client, monkeypatch):
    """The other side of the test above: a push sent on a connection that was up, run by Redis, whose
    connection is then cut before its reply comes (killed on Redis's side) may have reached Redis, and
    its line is marked so."""
    import select
    import time

    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    buf.update("ObsUnit", 1, {"name": "connected first"})  # this thread's connection is up
    real_await, cut = BufferStore._await_reply, []

    def await_reply(self, conn):
        if not cut:
            cut.append(True)
            deadline = time.monotonic() + 5
            while redis_client.llen(keys.buffer) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)  # until Redis has run the script
            select.select([conn._sock], [], [], 5)
            conn._sock.recv(65536)  # its reply, lost on the way
            host, port = conn._sock.getsockname()[:2]
            redis_client.client_kill(f"{host}:{port}")  # and the connection cut
        return real_await(self, conn)

    monkeypatch.setattr(BufferStore, "_await_reply", await_reply)
    try:
        tx_id = buf.update("ObsUnit", 1, {"name": "its reply lost"})
        assert cut and redis_client.llen(keys.buffer) == 2  # Redis took it
        with buf.spool._locked():
            lines = buf.spool.path.read_bytes().splitlines()
        assert [(json.loads(line)["id"], json.loads(line).get("maybe_in_redis")) for line in lines] == [(tx_id, True)]
    finally:
        monkeypatch.undo()
        buf.close()


def _pushed_with_its_reply_lost(monkeypatch, retrying: TransactionBuffer, finish: str, refuse) -> None:
    """`retrying`'s spool pushed (a Redis URL asking redis-py to retry): Redis runs the buffer script
    for `finish`, its reply is lost, and `refuse(connection)` has redis-py's attempt to send it
    again refused; the push fails. Closes `retrying`."""
    send_and_read, lost = redis.Redis._send_command_parse_response, []

    def reply_lost_then_refused(client, conn, command_name, *args, **options):
        reply = send_and_read(client, conn, command_name, *args, **options)
        if command_name == "EVALSHA" and finish in args and not lost:
            lost.append(True)  # Redis ran it
            refuse(conn)
            raise redis.TimeoutError("Timeout reading from socket")
        return reply

    monkeypatch.setattr(redis.Redis, "_send_command_parse_response", reply_lost_then_refused)
    try:
        assert not retrying.spool.flush()
    finally:
        monkeypatch.setattr(redis.Redis, "_send_command_parse_response", send_and_read)
        retrying.close()
    assert lost


def test_a_push_redis_py_sent_again_after_a_lost_reply_whose_reconnect_was_refused_is_not_applied_again(
        settings, redis_client, main_engine, monkeypatch, tmp_path):
    """With a Redis URL asking redis-py to retry, a spooled line's push is sent, Redis runs it and its
    reply is lost; redis-py reconnects to send it again, and that connect is refused. The error the
    push ends with is the refused connect's, but the line was sent once: taken for never sent, it was
    pushed again a week later, applied again, and its row went back to the older value."""
    from obs_pipeline.spool import Spool
    from obs_pipeline.stack.osutil import pick_free_ports

    monkeypatch.setattr(Spool, "start_flusher", lambda self: None)  # the test's pushes alone
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    dead_port = pick_free_ports(1)[0]
    down = TransactionBuffer(settings=replace(settings, redis_url=f"redis://127.0.0.1:{dead_port}/0"))
    finish = down.update("ExecutedObsUnit", obs["id"], {"status": "completed"})  # spooled: Redis refused it
    down.close()
    assert b"maybe_in_redis" not in buf.spool.path.read_bytes()

    retrying = TransactionBuffer(settings=replace(settings, redis_url=settings.redis_url + "?retry_on_timeout=yes"))

    def refused(conn) -> None:
        conn.port = dead_port  # redis-py's reconnect to send it again is refused

    _pushed_with_its_reply_lost(monkeypatch, retrying, finish, refused)
    assert redis_client.llen(SiteKeys(settings.site).buffer) == 1  # Redis took it, once
    letters = _overtaken_then_pushed_a_week_later(buf, settings, main_engine, redis_client, obs, finish, tmp_path)
    assert "an earlier push of it may have reached Redis" in letters[0]["failure"]["reason"]


@pytest.mark.parametrize("refusal", ["password", "readonly"])
def test_a_push_redis_py_sent_again_after_a_lost_reply_whose_resend_redis_refused_is_not_applied_again(
        settings, redis_client, main_engine, monkeypatch, tmp_path, refusal):
    """As above, but redis-py's reconnect after the lost reply is refused otherwise: its AUTH (the
    user's password changed meanwhile: AuthenticationError), or the script it sent again (Redis made a
    replica meanwhile, as by a failover: READONLY). Either was taken for a refusal before anything was
    sent, whatever socket was lost: the line was pushed again a week later, applied again, and its row
    went back to the older value. A line spooled as Redis refused the script's password from the start
    is still no copy."""
    import contextlib

    from obs_pipeline.spool import Spool
    from obs_pipeline_tests.test_reliability import redis_refusing_writes

    monkeypatch.setattr(Spool, "start_flusher", lambda self: None)  # the test's pushes alone
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    user, host_port = f"script_{settings.site}", settings.redis_url.split("//", 1)[1]
    redis_client.acl_setuser(user, enabled=True, passwords=["+first"], keys=["*"], channels=["*"], commands=["+@all"])
    refusing = contextlib.ExitStack()
    refusing.callback(redis_client.acl_deluser, user)
    wrong = TransactionBuffer(settings=replace(settings, redis_url=f"redis://{user}:wrong@{host_port}"))
    finish = wrong.update("ExecutedObsUnit", obs["id"], {"status": "completed"})  # spooled: its password refused
    wrong.close()
    assert b"maybe_in_redis" not in buf.spool.path.read_bytes()

    retrying = TransactionBuffer(settings=replace(
        settings, redis_url=f"redis://{user}:first@{host_port}?retry_on_timeout=yes"))

    def refused(conn) -> None:  # redis-py's reconnect to send it again is refused
        if refusal == "password":
            redis_client.acl_setuser(user, enabled=True, reset_passwords=True, passwords=["+second"])
        else:
            refusing.enter_context(redis_refusing_writes(redis_client, "readonly", tmp_path))

    with refusing:
        _pushed_with_its_reply_lost(monkeypatch, retrying, finish, refused)
    assert redis_client.llen(SiteKeys(settings.site).buffer) == 1  # Redis took it, once
    letters = _overtaken_then_pushed_a_week_later(buf, settings, main_engine, redis_client, obs, finish, tmp_path)
    assert "an earlier push of it may have reached Redis" in letters[0]["failure"]["reason"]


def test_a_line_another_process_sent_between_two_clean_failures_of_this_ones_stays_a_possible_copy(
        settings, redis_client, main_engine, monkeypatch, tmp_path):
    """Two scripts on one host push one spool. A's push of a line fails at the connect (nothing sent:
    the next line is untried, for A); B's push of it then reaches Redis and loses its reply, leaving
    `{site}.pushing`; A's next push, failing at the connect again, took the line for untried on its
    own word and removed that mark. The host then off for a week, the line was pushed as no copy, and
    applied again (the row went back to the older value)."""
    from obs_pipeline.redis_connections import redis_from_url
    from obs_pipeline.spool import Spool
    from obs_pipeline.stack.osutil import pick_free_ports

    monkeypatch.setattr(Spool, "start_flusher", lambda self: None)  # the test's pushes alone
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    dead_url = f"redis://127.0.0.1:{pick_free_ports(1)[0]}/0"
    down = TransactionBuffer(settings=replace(settings, redis_url=dead_url))
    finish = down.update("ExecutedObsUnit", obs["id"], {"status": "completed"})  # spooled: Redis refused it
    down.close()

    a_client = redis_from_url(dead_url, socket_connect_timeout=2)  # A's Redis: unreachable from A just now
    script_a = Spool(settings.spool_dir, settings.site, flush_store=BufferStore(a_client, settings.site))
    b_store = BufferStore(redis_from_url(settings.redis_url), settings.site)
    script_b = Spool(settings.spool_dir, settings.site, flush_store=b_store)
    real_buffer = BufferStore.buffer

    def reply_lost(self, *args):
        real_buffer(self, *args)
        if self is b_store:
            raise redis.TimeoutError("Timeout reading from socket (test: Redis ran it, its reply was lost)")

    monkeypatch.setattr(BufferStore, "buffer", reply_lost)
    assert not script_a.flush()  # refused at the connect: nothing sent
    assert not script_b.flush()  # sent, run by Redis, its reply lost
    assert not script_a.flush()  # refused at the connect again
    monkeypatch.setattr(BufferStore, "buffer", real_buffer)
    assert redis_client.llen(SiteKeys(settings.site).buffer) == 1  # Redis took it, once
    a_client.close()
    b_store.redis.close()
    letters = _overtaken_then_pushed_a_week_later(buf, settings, main_engine, redis_client, obs, finish, tmp_path)
    assert "an earlier push of it may have reached Redis" in letters[0]["failure"]["reason"]


MISSING_UNIT = 31337  # an obs unit main lacks until _the_missing_unit_is_created


def _producers_update_to_the_missing_unit(tx_id: str, obs_id: str, status: str, **fields) -> str:
    """A producer's entry (pushed with LPUSH, no status key) moving an observation to an obs unit
    main lacks: it fails on main until the unit is created."""
    return json.dumps({"transaction_id": tx_id, "endpoint": "fix_unit", **fields, "steps": [
        {"step_id": "s1", "operation": "update", "model_class": "ExecutedObsUnit",
         "conditions": {"id": obs_id}, "data": {"obs_unit_id": MISSING_UNIT, "status": status}}]})


def _the_missing_unit_is_created(main_engine) -> None:
    with main_engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO obs_unit (id, name) VALUES ({MISSING_UNIT}, 'late unit')"))


@pytest.mark.parametrize("producer", ["spool", "lpush"])
def test_a_copy_pushed_after_its_transaction_was_discarded_is_not_applied(
        settings, redis_client, main_engine, monkeypatch, tmp_path, caplog, producer):
    """A transaction's push reaches Redis and its reply is lost: the script spools it, and its
    host reaches no Redis for a while (`spool`); or a producer that only LPUSHes pushes it again
    once its reply was lost (`lpush`). The one in Redis fails on main and is dead-lettered, and
    the operator discards it; its cause goes away later (the obs unit is created). Then the copy
    is pushed: the discard had deleted the id's status key, so the buffer script took the copy for
    a new transaction (the drain too, for a producer's entry), and it was applied after all."""
    import subprocess
    import sys

    from obs_pipeline_tests.test_reliability import _obs_unit_and_status, assert_queues_empty, cli_env

    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    if producer == "spool":
        _script_host_whose_reply_is_lost(monkeypatch, buf)
        tx_id = buf.update("ExecutedObsUnit", obs["id"], {"obs_unit_id": MISSING_UNIT, "status": "discarded"})
        assert buf.spool.pending() == 1 and redis_client.llen(keys.buffer) == 1  # in Redis all the same
    else:
        tx_id = "producer-tx-0001"
        pushed = _producers_update_to_the_missing_unit(tx_id, obs["id"], "discarded")
        redis_client.lpush(keys.buffer, pushed)
    drain_until_settled(settings, retry_base_s=0.05)  # its retries spent: dead-lettered
    assert [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.failed, 0, -1)] == [tx_id]
    subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "discard", tx_id],
                   env=cli_env(settings), check=True)
    retried = subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "failed", "retry", tx_id],
                             env=cli_env(settings), capture_output=True, text=True)
    assert retried.returncode == 1 and retried.stderr.splitlines() == [
        f"obs-pipeline: error: transaction {tx_id!r} of site {settings.site} was discarded (`obs-pipeline failed "
        "discard`) within the last 7 days: no letter of it is left; buffer its steps again if they are still "
        "wanted"], retried.stderr
    _the_missing_unit_is_created(main_engine)  # later, for other reasons

    caplog.set_level("WARNING")
    seen = len(caplog.records)
    if producer == "spool":  # the host is on again: its operator pushes the spool
        pushed_now = subprocess.run([sys.executable, "-m", "obs_pipeline.cli", "spool", "push"],
                                    env={**cli_env(settings), "OBS_SPOOL_DIR": settings.spool_dir},
                                    capture_output=True, text=True)
        assert pushed_now.returncode == 0 and pushed_now.stderr.splitlines()[-1] == (
            f"pushed 0 spooled transaction(s) to Redis, in order; the spool of site {settings.site} in "
            f"{buf.spool.path} is empty; 1 line(s) dropped: copies of transactions an operator discarded "
            "(`obs-pipeline failed discard`)"), pushed_now.stderr  # (it said "pushed 1")
        assert buf.spool.pending() == 0
    else:  # all the producer knew was that its push's reply was lost
        redis_client.lpush(keys.buffer, pushed)
    buffered_again = redis_client.llen(keys.buffer) if producer == "spool" else 0
    drain_until_settled(settings, retry_base_s=0.05)

    assert _obs_unit_and_status(main_engine, obs["id"]) == (1, "running")
    assert buffered_again == 0
    assert_queues_empty(redis_client, settings.site)  # not dead-lettered again either
    assert redis_client.get(keys.transaction(tx_id)) is None
    reader = TransactionBuffer(settings=replace(settings, spool_dir=str(tmp_path / "reader")))
    assert reader.status(tx_id) is None  # as after any discard
    assert reader.get("ExecutedObsUnit", obs["id"])["status"] == "running"
    told = pushed_now.stderr.splitlines() if producer == "spool" else [r.getMessage() for r in caplog.records[seen:]]
    said = [line for line in told if tx_id in line and "discarded" in line]
    assert len(said) == 1, told  # dropped, saying so once
    if producer == "lpush":  # the producer reuses the id for other steps: no copy, applied as before
        redis_client.lpush(keys.buffer, json.dumps({"transaction_id": tx_id, "steps": [
            {"step_id": "s1", "operation": "update", "model_class": "ExecutedObsUnit",
             "conditions": {"id": obs["id"]}, "data": {"status": "reused id"}}]}))
        drain_until_settled(settings)
        assert _obs_unit_and_status(main_engine, obs["id"]) == (1, "reused id")
        assert reader.status(tx_id) == "replicated"
    for b in (buf, reader):
        b.close()


def _discard_lands_as_its_copy_is_claimed(settings, redis_client, monkeypatch, tx_id: str, pushed: str,
                                          **drain) -> DeadLetters:
    """The producer pushes `pushed` (the listed letter `tx_id`'s copy: its push's reply was lost)
    again, and the operator's discard of the letter lands just after the drain looked for
    `discarded:{id}` (the window `_without_discarded_copies` names); drained until settled, with
    `drain` (drain_until_settled's options). Returns the DeadLetters the discard used."""

    keys = SiteKeys(settings.site)
    letters = DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models))
    real = BufferStore.discarded_steps

    def discarded_just_after(self, ids):
        found = real(self, ids)
        if tx_id in ids and redis_client.llen(keys.failed):  # the operator's discard lands now
            letters.discard([tx_id])
        return found

    monkeypatch.setattr(BufferStore, "discarded_steps", discarded_just_after)
    redis_client.lpush(keys.buffer, pushed)
    drain_until_settled(settings, **drain)
    monkeypatch.setattr(BufferStore, "discarded_steps", real)
    return letters


def test_a_copy_dropped_after_a_discard_leaves_no_hold_behind(settings, redis_client, main_engine, monkeypatch):
    """A producer's copy of a dead-lettered update is claimed just as the operator discards the
    letter: the drain looked for `discarded:{id}` before the discard, and sends the copy to main
    (the window `_without_discarded_copies` names). It fails (no such obs unit), waits to retry
    holding its row, and at its retry the drain drops it, as the discard's copy. Its hold on the
    row stayed in `held_ids`, and every later update of the row was parked behind it for ever."""
    from obs_pipeline_tests.test_reliability import _obs_unit_and_status, assert_queues_empty

    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    tx_id = "producer-tx-0002"
    pushed = _producers_update_to_the_missing_unit(tx_id, obs["id"], "discarded")
    redis_client.lpush(keys.buffer, pushed)
    drain_until_settled(settings, retry_base_s=0.05)  # its retries spent: dead-lettered
    assert [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.failed, 0, -1)] == [tx_id]

    _discard_lands_as_its_copy_is_claimed(settings, redis_client, monkeypatch, tx_id, pushed, retry_base_s=0.05)
    later = buf.update("ExecutedObsUnit", obs["id"], {"status": "later"})
    drain_until_settled(settings, timeout_s=15, retry_base_s=0.05)
    assert _obs_unit_and_status(main_engine, obs["id"]) == (1, "later")
    assert buf.status(later) == "replicated"
    assert redis_client.hgetall(keys.held_ids) == {}
    assert redis_client.get(keys.transaction(tx_id)) is None  # as after the discard
    assert_queues_empty(redis_client, settings.site)
    buf.close()


def test_a_copy_of_a_discarded_transaction_claimed_while_main_is_down_gets_no_status(
        settings, redis_client, main_engine, monkeypatch):
    """A producer's copy of a discarded transaction is claimed while main does not answer: the
    batch goes back to `pending` (a producer's entry gets a status key then) before the drain
    drops the copy. It wrote `pending` for the copy too, and once main was back and the copy
    dropped, status() said `pending` for ever, for a transaction the operator had discarded."""
    from obs_pipeline.apply import MainDatabase, TransientError
    from obs_pipeline_tests.test_reliability import _obs_unit_and_status, assert_queues_empty

    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    tx_id = "producer-tx-0003"
    pushed = _producers_update_to_the_missing_unit(tx_id, obs["id"], "discarded")
    redis_client.lpush(keys.buffer, pushed)
    drain_until_settled(settings, retry_base_s=0.05)  # its retries spent: dead-lettered
    DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models)).discard([tx_id])
    _the_missing_unit_is_created(main_engine)
    redis_client.lpush(keys.buffer, pushed)  # the producer's copy: its push's reply was lost
    real, down = MainDatabase.identify, [True]

    def unreachable_once(self):
        if down.pop() if down else False:
            raise TransientError("test: main does not answer")
        return real(self)

    monkeypatch.setattr(MainDatabase, "identify", unreachable_once)
    drain_until_settled(settings, retry_base_s=0.05, backoff_initial_s=0.05)
    assert not down  # main did not answer once
    assert _obs_unit_and_status(main_engine, obs["id"]) == (1, "running")
    assert redis_client.get(keys.transaction(tx_id)) is None  # as after the discard
    assert buf.status(tx_id) is None
    assert_queues_empty(redis_client, settings.site)
    buf.close()


def test_an_invalid_copy_of_a_discarded_transaction_is_not_listed_again(settings, redis_client, caplog):
    """A producer's entry the drain cannot take (a column the model lacks) is dead-lettered and
    the operator discards it; the producer pushes it again after its push's reply was lost. The
    drain checked it before it looked for `discarded:{id}`, and listed it again, its status
    `failed` again: the discard undone, for the operator to make again."""
    from obs_pipeline_tests.test_reliability import assert_queues_empty

    keys = SiteKeys(settings.site)
    tx_id = "producer-tx-0004"
    pushed = json.dumps({"transaction_id": tx_id, "endpoint": "fix_unit", "steps": [
        {"step_id": "s1", "operation": "update", "model_class": "ExecutedObsUnit",
         "conditions": {"id": "0b6c4a1e-4f3c-4d59-9a43-3f1f5f0c2b11"}, "data": {"no_such_column": 1}}]})
    redis_client.lpush(keys.buffer, pushed)
    drain_until_settled(settings)
    assert [json.loads(e)["failure"]["kind"] for e in redis_client.lrange(keys.failed, 0, -1)] == ["invalid"]
    DeadLetters(BufferStore(redis_client, settings.site), ModelRegistry.from_path(settings.models)).discard([tx_id])
    caplog.set_level("WARNING")
    redis_client.lpush(keys.buffer, pushed)  # the producer's copy: its push's reply was lost
    drain_until_settled(settings)
    assert_queues_empty(redis_client, settings.site)
    assert redis_client.get(keys.transaction(tx_id)) is None  # as after the discard
    said = [r.getMessage() for r in caplog.records if tx_id in r.getMessage() and "discarded" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]


def test_a_retried_letter_of_a_discarded_transaction_is_applied(settings, redis_client, main_engine, monkeypatch):
    """A producer's copy of a dead-lettered update is claimed just as the operator discards the
    letter (the window `_without_discarded_copies` names) and is dead-lettered in turn (its
    max_retries 0). The operator, seeing it listed again, fixes its cause and runs `failed retry`:
    it said `requeued 1 transaction(s)`, and the drain dropped the requeued one as a copy of the
    discarded one (`discarded:{id}`), with a warning in its log only: the retry was lost."""
    from obs_pipeline_tests.test_reliability import _obs_unit_and_status, assert_queues_empty

    keys = SiteKeys(settings.site)
    buf = TransactionBuffer(settings=settings)
    obs = replicated_observation(settings, buf)
    tx_id = "producer-tx-0005"
    pushed = _producers_update_to_the_missing_unit(tx_id, obs["id"], "wanted", max_retries=0)
    redis_client.lpush(keys.buffer, pushed)
    drain_until_settled(settings)
    letters = _discard_lands_as_its_copy_is_claimed(settings, redis_client, monkeypatch, tx_id, pushed)
    assert [json.loads(e)["transaction_id"] for e in redis_client.lrange(keys.failed, 0, -1)] == [tx_id]
    _the_missing_unit_is_created(main_engine)  # the operator fixes its cause, and retries it
    assert letters.retry([tx_id]) == [tx_id]
    drain_until_settled(settings)
    assert _obs_unit_and_status(main_engine, obs["id"]) == (MISSING_UNIT, "wanted")
    assert buf.status(tx_id) == "replicated"
    assert_queues_empty(redis_client, settings.site)
    buf.close()
