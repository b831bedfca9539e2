"""All Redis operations of the buffer and the drain, each one round trip and atomic.

Ingest: queue entry, status, id cache, buffered record and overlays in one Lua call.
Drain: claim into a processing list under a lease (never pop-and-pray), acknowledge with a
write fenced by that lease, remember committed batches by commit LSN until the replica has
replayed them, then clean their caches in one Lua call.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import redis

from obs_pipeline.config import ConfigError
from obs_pipeline.keys import SiteKeys
from obs_pipeline.lsn import int_to_lsn

MINIMUM_REDIS = (6, 2)
REPLICATED_STATUS_TTL_S = 7 * 24 * 3600  # `status()` answers "replicated" for a week
CLEANUP_CHUNK = 50  # transactions per cleanup record: one Lua call holds Redis for a few ms at most
STATUS_CHUNK = 200  # statuses rewritten per Lua call, for the same reason
CLAIM_CHUNK = 250   # entries moved to the processing list per Lua call, for the same reason

# Claim: move up to N entries to the processing list (retries that are due first, then the
# oldest of the buffer, from its right end), but only for the lease holder. ARGV[4] says how:
# 'first' returns a non-empty processing list as it is instead (a batch claimed by a drain that
# did not acknowledge it: it crashed or lost its link; retried first, in its original order);
# 'next' claims the following batch while the previous one is still in the processing list
# (the drain prefetches it while main applies that one); 'extend' continues a claim in chunks.
_CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('LEASE_LOST') end
local out = {}
local want = tonumber(ARGV[2])
if ARGV[4] == 'first' then
  local held = redis.call('LRANGE', KEYS[2], 0, -1)
  if #held > 0 then return {1, held} end
end
if ARGV[4] ~= 'extend' then
  local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[3], 'LIMIT', 0, want)
  if #due > 0 then
    redis.call('ZREM', KEYS[4], unpack(due))
    redis.call('LPUSH', KEYS[2], unpack(due))
    out = due
  end
end
local n = want - #out
if n > 0 then
  -- the n oldest entries sit at the right end; LRANGE lists them newest first
  local taken = redis.call('LRANGE', KEYS[3], -n, -1)
  if #taken > 0 then
    redis.call('LTRIM', KEYS[3], 0, -#taken - 1)
    local oldest_first = {}
    for i = #taken, 1, -1 do oldest_first[#oldest_first + 1] = taken[i] end
    redis.call('LPUSH', KEYS[2], unpack(oldest_first))
    for _, v in ipairs(oldest_first) do out[#out + 1] = v end
  end
end
return {0, out}
"""

# Set the status of transactions whose status key exists, in place: our status JSON (and the
# existing system's) carries the transaction-level "status" before "steps", so the first match
# is the right one, and no transaction is re-serialised. "replicated" is final: never turned
# back. Returns the ids that have no key yet (pushed by a producer that writes only the queue entry).
_SET_STATUS = """
local keys = {}
for i = 3, #ARGV do keys[#keys + 1] = ARGV[1] .. 'transaction:' .. ARGV[i] end
local values = redis.call('MGET', unpack(keys))
local writes, missing = {}, {}
for i, v in ipairs(values) do
  if v then
    local first, last, current = string.find(v, '"status":"(%a+)"')
    if first and current ~= 'replicated' then
      writes[#writes + 1] = keys[i]
      writes[#writes + 1] = string.sub(v, 1, first - 1) .. '"status":"' .. ARGV[2] .. '"' .. string.sub(v, last + 1)
    end
  else
    missing[#missing + 1] = ARGV[i + 2]
  end
end
if #writes > 0 then redis.call('MSET', unpack(writes)) end
return missing
"""

# Prepended to the scripts that may pass thousands of values to one command (a large
# bulk_create): Lua's unpack() takes a few thousand values at most. Returns the replies of
# the parts, concatenated when they are lists; no call for an empty list.
_IN_PARTS = """
local function call_in_parts(command, key, values)
  local replies = {}
  for from = 1, #values, 1000 do
    local part = {unpack(values, from, math.min(from + 999, #values))}
    local reply
    if key then reply = redis.call(command, key, unpack(part)) else reply = redis.call(command, unpack(part)) end
    if type(reply) == 'table' then for _, r in ipairs(reply) do replies[#replies + 1] = r end end
  end
  return replies
end
"""

# Ingest: ARGV = prefix, transaction id, transaction JSON, number of creates, then (model, id,
# record JSON) per create and (model, id, overlay entry) per update/delete.
_BUFFER = _IN_PARTS + """
local p = ARGV[1]
redis.call('LPUSH', p .. 'transaction_buffer', ARGV[3])
local sets = {p .. 'transaction:' .. ARGV[2], ARGV[3]}
local index, overlaid = {}, {}
local function add(t, m, id)
  if not t[m] then t[m] = {} end
  t[m][#t[m] + 1] = id
end
local i = 5
for _ = 1, tonumber(ARGV[4]) do
  local m, id = ARGV[i], ARGV[i + 1]
  sets[#sets + 1] = p .. 'cache:ids:' .. m .. ':' .. id
  sets[#sets + 1] = ARGV[i + 2]
  sets[#sets + 1] = p .. 'buffered:' .. m .. ':' .. id
  sets[#sets + 1] = ARGV[i + 2]
  add(index, m, id)
  i = i + 3
end
while i <= #ARGV do
  local m, id = ARGV[i], ARGV[i + 1]
  redis.call('RPUSH', p .. 'read_buffer:' .. m .. ':' .. id, ARGV[i + 2])
  add(index, m, id)
  add(overlaid, m, id)
  i = i + 3
end
call_in_parts('MSET', nil, sets)
for m, ids in pairs(index) do call_in_parts('SADD', p .. 'index:' .. m, ids) end
for m, ids in pairs(overlaid) do call_in_parts('SADD', p .. 'overlaid:' .. m, ids) end
return 1
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Clean every committed batch whose commit LSN the replica has replayed (score <= ARGV[2]).
# Each record of a batch: {"c": [[model, id], ...] created, "o": [[model, id, tx], ...]
# overlaid, "t": [tx_id, ...], "lsn_text": commit LSN}. Only the batch's own contributions are
# removed: another pending transaction's overlay of the same record stays, and so does the
# index entry of a record that still has one. Statuses become a short "replicated" record
# (the transaction itself is on the replica now). Commands take many keys at once: in
# Redis's Lua every redis.call costs more than the work of a small command.
_CLEAN_REPLICATED = _IN_PARTS + """
local prefix = ARGV[1]
local done = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
local ids = {}
for _, raw in ipairs(done) do
  local batch = cjson.decode(raw)
  local touched = {}  -- model -> ids whose index entry may go
  local function touch(m, id)
    if not touched[m] then touched[m] = {} end
    touched[m][#touched[m] + 1] = id
  end
  local dels = {}
  for _, r in ipairs(batch.c) do
    dels[#dels + 1] = prefix .. 'buffered:' .. r[1] .. ':' .. r[2]
    dels[#dels + 1] = prefix .. 'cache:ids:' .. r[1] .. ':' .. r[2]
    touch(r[1], r[2])
  end
  call_in_parts('DEL', nil, dels)
  for _, r in ipairs(batch.o) do
    local key = prefix .. 'read_buffer:' .. r[1] .. ':' .. r[2]
    local mark = '{"tx":' .. cjson.encode(r[3]) .. ','
    for _, v in ipairs(redis.call('LRANGE', key, 0, -1)) do
      if string.sub(v, 1, #mark) == mark then redis.call('LREM', key, 0, v) end
    end
    if redis.call('EXISTS', key) == 0 then redis.call('SREM', prefix .. 'overlaid:' .. r[1], r[2]) end
    touch(r[1], r[2])
  end
  for m, list in pairs(touched) do
    local still = call_in_parts('SMISMEMBER', prefix .. 'overlaid:' .. m, list)
    local gone = {}
    for j, id in ipairs(list) do
      -- a record stays indexed while it is still buffered (created again) or overlaid
      if still[j] == 0 and (batch.o[1] == nil or redis.call('EXISTS', prefix .. 'buffered:' .. m .. ':' .. id) == 0) then
        gone[#gone + 1] = id
      end
    end
    call_in_parts('SREM', prefix .. 'index:' .. m, gone)
  end
  if ARGV[5] ~= 'discard' then
    local lsn = string.match(batch.lsn_text or '', '^%x+/%x+$') or ''  -- written as is: cjson would escape the '/'
    local tail = ',"status":"replicated","commit_lsn":"' .. lsn .. '"}'
    for _, tx in ipairs(batch.t) do
      redis.call('SET', prefix .. 'transaction:' .. tx, '{"transaction_id":' .. cjson.encode(tx) .. tail, 'EX', ARGV[3])
      ids[#ids + 1] = tx
    end
  end
  redis.call('ZREM', KEYS[1], raw)
end
if #ids > 0 then
  redis.call('HINCRBY', KEYS[2], 'replicated_total', #ids)
  redis.call('PUBLISH', KEYS[3], cjson.encode({event = 'replicated', transaction_ids = ids}))
end
return {#done, ids}
"""


class LeaseLost(RuntimeError):
    """Another drain owns the site now; this one must stop touching the processing list."""


@dataclass
class CacheWrites:
    """What ingest writes beside the queue entry, built by the ingest module."""
    created: list[tuple[str, str, str]] = field(default_factory=list)   # (model, id, record JSON)
    overlays: list[tuple[str, str, str]] = field(default_factory=list)  # (model, id, overlay JSON)


@dataclass
class Claim:
    entries: list[str]   # raw JSON, oldest first
    reclaimed: bool      # left over by a drain that did not acknowledge it


@dataclass
class Outcome:
    """What the drain decided for a claimed batch, written at acknowledgement."""
    statuses: list[tuple[str, str]] = field(default_factory=list)       # (tx_id, status JSON)
    applied_ids: list[str] = field(default_factory=list)
    retry: list[tuple[float, str]] = field(default_factory=list)         # (due epoch, tx JSON)
    dead: list[tuple[str | None, str]] = field(default_factory=list)     # (tx_id, failed JSON)
    hold: dict[str, str] = field(default_factory=dict)    # created id -> holder tx ("!" + tx if dead)
    release: list[str] = field(default_factory=list)      # created ids no longer held
    cleanup: list[dict[str, list]] = field(default_factory=list)  # per transaction: {"c", "o", "t"}
    commit_lsn: int | None = None
    claimed: int = 0  # entries of the batch in the processing list (the oldest there)


def overlay_entry(transaction_id: str, operation: str, data: dict[str, Any], step_id: str) -> str:
    """A read-buffer list entry; starts with the transaction id so cleanup can find its own."""
    return '{"tx":' + json.dumps(transaction_id) + ',' + json.dumps(
        {"op": operation, "data": data, "step": step_id}, separators=(",", ":"))[1:]


class BufferStore:
    def __init__(self, client: redis.Redis, site: str):
        self.redis = client
        self.keys = SiteKeys(site)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._clean = client.register_script(_CLEAN_REPLICATED)
        self._set_status = client.register_script(_SET_STATUS)
        self._buffer = client.register_script(_BUFFER)

    # --- ingest -----------------------------------------------------------------------------
    def buffer(self, transaction_id: str, tx_json: str, caches: CacheWrites) -> None:
        """Queue entry, status and caches in one Lua call: atomic, one round trip, one command
        to pack and parse (a 16-command MULTI/EXEC cost redis-py twice the time)."""
        args = [self.keys.prefix, transaction_id, tx_json, len(caches.created)]
        for triple in caches.created:
            args.extend(triple)
        for triple in caches.overlays:
            args.extend(triple)
        self._buffer(args=args)

    def status_json(self, transaction_id: str) -> str | None:
        raw = self.redis.get(self.keys.transaction(transaction_id))
        return raw.decode() if isinstance(raw, bytes) else raw

    def require_redis(self, at_least: tuple[int, int] = MINIMUM_REDIS) -> None:
        """Refuse an old Redis with one clear line, not a Lua error in the middle of a batch."""
        version = str(self.redis.info("server").get("redis_version", "0"))
        found = tuple(int(part) for part in (version.split(".") + ["0", "0"])[:2] if part.isdigit())
        if found < at_least:
            raise ConfigError(f"the site's Redis is {version}; obs-pipeline needs Redis "
                              f"{at_least[0]}.{at_least[1]} or newer (its scripts use SMISMEMBER)")

    # --- lease ------------------------------------------------------------------------------
    def acquire_lease(self, ttl_s: float) -> str | None:
        token = uuid.uuid4().hex
        ok = self.redis.set(self.keys.lease, token, nx=True, px=int(ttl_s * 1000))
        return token if ok else None

    def renew_lease(self, token: str, ttl_s: float) -> bool:
        return bool(self._renew(keys=[self.keys.lease], args=[token, int(ttl_s * 1000)]))

    def release_lease(self, token: str) -> None:
        self._release(keys=[self.keys.lease], args=[token])

    def lease_holder(self) -> str | None:
        raw = self.redis.get(self.keys.lease)
        return raw.decode() if raw else None

    # --- drain ------------------------------------------------------------------------------
    def claim(self, token: str, batch_size: int, after_unacknowledged: bool = False) -> Claim:
        """Up to `batch_size` entries, oldest first, in CLAIM_CHUNK-entry Lua calls (one call for
        a whole batch held Redis long enough to stall ingest). A processing list left by a drain
        that did not acknowledge comes back whole, first. `after_unacknowledged`: this drain's
        previous batch is still in the processing list (being applied); claim the next one."""
        entries, reclaimed = self._claim_chunk(token, min(batch_size, CLAIM_CHUNK),
                                               "next" if after_unacknowledged else "first")
        while not reclaimed and len(entries) < batch_size and len(entries) % CLAIM_CHUNK == 0 and entries:
            more, _ = self._claim_chunk(token, min(CLAIM_CHUNK, batch_size - len(entries)), "extend")
            entries.extend(more)
            if not more:
                break
        return Claim(entries=entries, reclaimed=reclaimed)

    def _claim_chunk(self, token: str, count: int, mode: str) -> tuple[list[str], bool]:
        k = self.keys
        try:
            reclaimed, entries = self._claim(keys=[k.lease, k.processing, k.buffer, k.retry],
                                             args=[token, count, time.time(), mode])
        except redis.ResponseError as exc:
            if "LEASE_LOST" in str(exc):
                raise LeaseLost(f"the drain lease of site {k.site} is no longer ours") from None
            raise
        # surrogateescape: bytes that are not UTF-8 survive to be dead-lettered, not crash the drain
        entries = [e.decode("utf-8", "surrogateescape") if isinstance(e, bytes) else e for e in entries]
        if reclaimed:  # LRANGE of processing lists newest first
            entries.reverse()
        return entries, bool(reclaimed)

    def set_status(self, transaction_ids: list[str], status: str) -> list[str]:
        """Rewrite statuses in place, STATUS_CHUNK per Lua call so that ingest never waits long
        behind it; returns the ids that have no status key."""
        missing: list[str] = []
        for part in range(0, len(transaction_ids), STATUS_CHUNK):
            chunk = transaction_ids[part:part + STATUS_CHUNK]
            missing.extend(m.decode() if isinstance(m, bytes) else m
                           for m in self._set_status(args=[self.keys.prefix, status, *chunk]))
        return missing

    def mark_processing(self, transaction_ids: list[str], full_json: Callable[[str], str]) -> None:
        """Status "processing": in place where the status key exists, else the full JSON."""
        missing = self.set_status(transaction_ids, "processing")
        if missing:
            pipe = self.redis.pipeline(transaction=False)
            for tx_id in missing:
                pipe.set(self.keys.transaction(tx_id), full_json(tx_id))
            pipe.execute()

    def acknowledge(self, token: str, outcome: Outcome) -> None:
        """After main committed: drop the batch from the processing list (its oldest
        `outcome.claimed` entries; a prefetched next batch stays) and record every outcome,
        atomically, but only while this drain still holds the lease (else another drain owns
        the batch). Statuses become "applied" separately (`set_status`), unless the replica
        has replayed the commit already and the cleanup makes them "replicated"."""
        k = self.keys
        with self.redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(k.lease)
                held = pipe.get(k.lease)
                if (held.decode() if held else None) != token:
                    raise LeaseLost(f"the drain lease of site {k.site} expired before acknowledgement")
                pipe.multi()
                pipe.ltrim(k.processing, 0, -outcome.claimed - 1)
                applied_ids = outcome.applied_ids
                for tx_id, status_json in outcome.statuses:
                    pipe.set(k.transaction(tx_id), status_json)
                if outcome.release:
                    pipe.hdel(k.held_ids, *outcome.release)
                if outcome.hold:
                    pipe.hset(k.held_ids, mapping=outcome.hold)
                for due, tx_json in outcome.retry:
                    pipe.zadd(k.retry, {tx_json: due})
                for _, failed_json in outcome.dead:
                    pipe.lpush(k.failed, failed_json)
                if outcome.commit_lsn is not None and outcome.cleanup:
                    now = time.time()
                    for part in range(0, len(outcome.cleanup), CLEANUP_CHUNK):
                        chunk = outcome.cleanup[part:part + CLEANUP_CHUNK]
                        # Chunks of one batch share a score, and a sorted set orders equal scores by
                        # the member's bytes: "n" first keeps them in batch order, so a record's
                        # create is never cleaned after an update of it (a reader in between would
                        # see the buffered create without that update).
                        record = {"n": f"{part:09d}"}
                        record.update({key: [x for tx in chunk for x in tx[key]] for key in ("c", "o", "t")})
                        record.update(at=now, lsn=outcome.commit_lsn, lsn_text=int_to_lsn(outcome.commit_lsn))
                        pipe.zadd(k.awaiting_replication,
                                  {json.dumps(record, separators=(",", ":")): outcome.commit_lsn})
                if applied_ids:
                    pipe.hincrby(k.stats, "applied_total", len(applied_ids))
                    pipe.hset(k.stats, "last_applied_at", time.time())
                    pipe.publish(k.events, json.dumps({"event": "applied", "transaction_ids": applied_ids}))
                if outcome.dead:
                    pipe.hincrby(k.stats, "dead_lettered_total", len(outcome.dead))
                pipe.execute()
            except redis.WatchError:
                raise LeaseLost(f"the drain lease of site {k.site} changed before acknowledgement") from None

    def clean_replicated(self, replay_lsn: int) -> list[str]:
        """Clean caches of every committed batch the replica has replayed; returns their tx ids."""
        k = self.keys
        cleaned: list[str] = []
        while True:  # one chunk per call, so ingest never waits long behind a cleanup
            count, ids = self._clean(keys=[k.awaiting_replication, k.stats, k.events],
                                     args=[k.prefix, replay_lsn, REPLICATED_STATUS_TTL_S, 1, "replicated"])
            cleaned.extend(i.decode() if isinstance(i, bytes) else i for i in ids)
            if not count:
                return cleaned

    def forget(self, cleanup: dict[str, list]) -> None:
        """Remove a discarded transaction's caches, own overlays and index entries with the same
        script that cleans replicated ones (no event, no counter): nothing of it stays visible."""
        k = self.keys
        scratch = f"{k.prefix}discarding:{uuid.uuid4().hex}"
        self.redis.zadd(scratch, {json.dumps(dict(cleanup, at=time.time(), lsn=0)): 0})
        try:
            self._clean(keys=[scratch, k.stats, k.events], args=[k.prefix, 0, REPLICATED_STATUS_TTL_S, 1, "discard"])
        finally:
            self.redis.delete(scratch)

    def awaiting_replication(self) -> tuple[int, int | None]:
        """(batches not yet replayed, lowest commit LSN among them)."""
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(k.awaiting_replication)
        pipe.zrange(k.awaiting_replication, 0, 0, withscores=True)
        count, lowest = pipe.execute()
        return count, int(lowest[0][1]) if lowest else None

    # --- health -----------------------------------------------------------------------------
    def depths(self) -> dict[str, Any]:
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(k.buffer)
        pipe.llen(k.processing)
        pipe.llen(k.failed)
        pipe.zcard(k.retry)
        pipe.zcard(k.awaiting_replication)
        pipe.lindex(k.buffer, -1)
        pipe.hgetall(k.stats)
        buffer, processing, failed, retry, awaiting, oldest, stats = pipe.execute()
        return {
            "buffer": buffer, "processing": processing, "failed": failed, "retry": retry,
            "awaiting_replication": awaiting, "oldest_entry": oldest,
            "stats": {a.decode(): b.decode() for a, b in stats.items()},
        }

    def holds_any(self) -> bool:
        return bool(self.redis.hlen(self.keys.held_ids))

    def holders(self, ids: list[str]) -> dict[str, str]:
        """Which of these ids are created by a transaction that is waiting to retry or dead."""
        if not ids:
            return {}
        values = self.redis.hmget(self.keys.held_ids, ids)
        return {i: v.decode() for i, v in zip(ids, values) if v is not None}

    def has_work(self) -> bool:
        """Something to claim now (queued, left in processing, a retry that is due), or committed
        batches waiting for the replica. One round trip; the sensor and the drain ask it."""
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(k.buffer)
        pipe.llen(k.processing)
        pipe.zcard(k.awaiting_replication)
        pipe.zcount(k.retry, "-inf", time.time())
        return any(pipe.execute())
