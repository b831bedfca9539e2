"""The Lua scripts the buffer and the drain run inside Redis (see buffer_store, which calls them).

Each runs atomically: where a step must read Redis and write depending on what it read (a
claim fenced by the lease, a status that never goes back, holds on rows), one script is one
round trip and never half done. Plain multi-key commands stay in MULTI/EXEC, which Redis runs
faster than a script that passes every key through Lua.
"""

# Claim: move up to N entries to the processing list (retries that are due first, then the
# oldest of the buffer, from its right end), but only for the lease holder. ARGV[4] says how:
# 'first' returns a non-empty processing list as it is instead (a batch claimed by a drain that
# did not acknowledge it: it crashed or lost its link; retried first, in its original order);
# 'next' claims the following batch while the previous one is still in the processing list
# (the drain prefetches it while main applies that one); 'extend' continues a claim in chunks.
# ARGV[5], this call's own token: a client that retries (a Redis URL's `retry_on_timeout`) sends
# the call again when its reply is lost, and Redis may have run it: run twice, it moved two
# chunks, and the drain knew only the second (the first was trimmed unapplied at acknowledgement,
# or overtaken). KEYS[5] keeps the last call's token and how many it moved, and the same call
# again answers those (the newest of the processing list: only the claim pushes there).
CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('LEASE_LOST') end
local out = {}
local last = redis.call('GET', KEYS[5])
if last then
  local token, moved = string.match(last, '^(%S+) (%d+)$')
  if token == ARGV[5] then
    local newest_first = tonumber(moved) > 0 and redis.call('LRANGE', KEYS[2], 0, tonumber(moved) - 1) or {}
    for i = #newest_first, 1, -1 do out[#out + 1] = newest_first[i] end
    return {0, out}
  end
end
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
-- the oldest entries sit at the right end; each LMOVE goes to the AOF as the command alone,
-- where LRANGE + LTRIM + LPUSH wrote every entry (1.2 kB each) into it once more
for _ = #out + 1, want do
  local entry = redis.call('LMOVE', KEYS[3], KEYS[2], 'RIGHT', 'LEFT')
  if not entry then break end
  out[#out + 1] = entry
end
redis.call('SET', KEYS[5], ARGV[5] .. ' ' .. #out)
return {0, out}
"""

# Set the status of transactions whose status key exists, in place. Our transaction JSON starts
# with a fixed-width status slot (wire.STATUS_SLOT): one GETRANGE checks that header and one
# SETRANGE writes the slot, a few bytes, where rewriting the whole transaction copied it four
# times (into Lua, back, into the key, into the AOF). Any other layout (the existing system's,
# a dead letter) is rewritten whole; its first "status" is the transaction's own, which comes
# before "steps". "replicated" is final: never turned back. ARGV = prefix, status, its slot,
# the header's opening; then the ids. Returns the ids that have no status key yet (pushed by a
# producer that writes only the queue entry).
SET_STATUS = """
local prefix, status, slot, opening = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local width = #opening + #slot + 1
local missing = {}
-- a status never goes back: a copy of a transaction pushed twice passes through a later batch
-- after the first was committed ("applied") or cleaned ("replicated"), and a drain that main
-- refused puts that batch's "processing" back to "pending"
local function kept(current)
  return current == 'replicated' or (current == 'applied' and (status == 'processing' or status == 'pending'))
end
for i = 5, #ARGV do
  local key = prefix .. 'transaction:' .. ARGV[i]
  local head = redis.pcall('GETRANGE', key, 0, width - 1)
  if type(head) ~= 'string' then
    -- not a string key: leave it alone
  elseif #head == width and string.sub(head, 1, #opening) == opening and string.sub(head, width) == ',' then
    if not kept(string.match(head, '^(%a+)"', #opening + 1)) then
      redis.call('SETRANGE', key, #opening, slot)
    end
  elseif head == '' and redis.call('EXISTS', key) == 0 then
    missing[#missing + 1] = ARGV[i]
  else
    local v = redis.call('GET', key)
    local first, last, current = string.find(v, '"status"%s*:%s*"(%a+)"')
    if first and not kept(current) then
      redis.call('SET', key, string.sub(v, 1, first - 1) .. '"status":"' .. status .. '"' .. string.sub(v, last + 1))
    end
  end
end
return missing
"""

# The acknowledgement's whole statuses (a retry's "pending", a dead letter's "failed"): not over one
# main has committed ("applied", "replicated"). A transaction pushed twice whose second copy is
# dead-lettered as blocked (by a dead transaction that writes a row it uses) turned the first
# copy's "replicated" into "failed". ARGV = prefix, then (id, status JSON) pairs.
SET_UNLESS_COMMITTED = """
local p = ARGV[1]
for i = 2, #ARGV, 2 do
  local key = p .. 'transaction:' .. ARGV[i]
  local v = redis.pcall('GET', key)
  local current = type(v) == 'string' and string.match(v, '"status"%s*:%s*"(%a+)"')
  if current ~= 'applied' and current ~= 'replicated' then redis.call('SET', key, ARGV[i + 1]) end
end
return 1
"""

# Prepended to the scripts that may pass thousands of values to one command (a large
# bulk_create): Lua's unpack() takes a few thousand values at most. Returns the replies of
# the parts, concatenated when they are lists; no call for an empty list.
IN_PARTS = """
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

# Ingest: ARGV = prefix, transaction id, transaction JSON, number of creates, number of checked
# keys, then (model, id) per checked key, (model, id, record JSON) per create and (model, id,
# overlay entry) per update/delete. A transaction whose status key exists is there already (a
# push retried after a reply that timed out, a spool line pushed again after a crash): it is
# left as it is, or it would be queued twice and its caches, perhaps cleaned since, written back.
# Checked keys: the creates with a key of the caller's that ingest found free (neither buffered
# nor on the replica); between that check and this call another script may have buffered a
# create of the same key, and this one's caches would overwrite it (reads showed the second,
# the drain dead-lettered it hours later). So each must still be free as reads see it (the
# last create or delete of its read buffer is a delete; without one, no record is buffered),
# or nothing is written. (The replica's part of the check is not made again: only a create
# buffered here adds the row there, and one buffered, applied, replayed and cleaned between the
# check and this call, all of it, is left to the drain, as before.) An id whose letter `failed
# discard` dropped with its status key (its `discarded` key, see SiteKeys.discarded) is a copy of
# that transaction: ingest makes a new id for each, so only a spooled line whose push's reply was
# lost, pushed again, has it; taken for new, it was applied after the discard. Returns 1 if
# buffered, 0 if it was there already, 2 if its id was discarded (nothing written), {model, id}
# of a checked key that is taken.
BUFFER = IN_PARTS + """
local p = ARGV[1]
local status = p .. 'transaction:' .. ARGV[2]
if redis.call('EXISTS', p .. 'discarded:' .. ARGV[2]) == 1 and redis.call('EXISTS', status) == 0 then return 2 end
local i = 6
local checked = tonumber(ARGV[5])
if checked > 0 then
  if redis.call('EXISTS', status) == 1 then return 0 end  -- its own first push took the keys
  local function taken(m, id)
    local entries = redis.call('LRANGE', p .. 'read_buffer:' .. m .. ':' .. id, 0, -1)
    for j = #entries, 1, -1 do
      -- ingest's entries start {"tx":"...","op":"..."; another writer's are decoded
      local op = string.match(entries[j], '^{"tx":"[^"]*","op":"(%a+)"')
      if not op then
        local ok, entry = pcall(cjson.decode, entries[j])
        op = ok and type(entry) == 'table' and entry.op or nil
      end
      if op == 'delete' then return false end
      if op == 'create' then return true end
    end
    return redis.call('EXISTS', p .. 'buffered:' .. m .. ':' .. id) == 1
  end
  for _ = 1, checked do
    if taken(ARGV[i], ARGV[i + 1]) then return {ARGV[i], ARGV[i + 1]} end
    i = i + 2
  end
end
if not redis.call('SET', status, ARGV[3], 'NX') then return 0 end
redis.call('LPUSH', p .. 'transaction_buffer', ARGV[3])
local sets = {}
local index, overlaid = {}, {}
local function add(t, m, id)
  if not t[m] then t[m] = {} end
  t[m][#t[m] + 1] = id
end
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
  add(overlaid, m, id)
  i = i + 3
end
call_in_parts('MSET', nil, sets)
for m, ids in pairs(index) do call_in_parts('SADD', p .. 'index:' .. m, ids) end
for m, ids in pairs(overlaid) do call_in_parts('SADD', p .. 'overlaid:' .. m, ids) end
return 1
"""

# A spooled line the buffer script cannot take for what it is (spool.py) goes to the dead-letter
# list instead, with its status "failed" where its id is usable and has no status yet. A push that
# crashed before recording its progress sets the line aside again: its mark (set_aside:{digest},
# deleted with the letter by `failed discard`) says it was, and nothing is listed twice (a status
# said so only where there was none before: a line without a usable id, or whose id another
# transaction has, was listed at every crash). The same call sent again (a client that retries
# after a lost reply) finds its own letter, the same bytes (its failed_at), at the head of the
# list: it answers as the first did. ARGV = prefix, the id or '', the letter, the line's digest.
# Returns 1 if listed (by this call), 0 if it was already.
SET_ASIDE_SPOOLED = """
local p, id, letter = ARGV[1], ARGV[2], ARGV[3]
if redis.call('LINDEX', p .. 'failed_transactions', 0) == letter then return 1 end
if not redis.call('SET', p .. 'set_aside:' .. ARGV[4], '1', 'NX') then return 0 end
if id ~= '' then
  local key = p .. 'transaction:' .. id
  local current = redis.pcall('GET', key)
  if type(current) == 'string' and string.find(current, '"kind":"refused_spool_line"', 1, true) then return 0 end
  if not current then redis.call('SET', key, letter) end
end
redis.call('LPUSH', p .. 'failed_transactions', letter)
redis.call('HINCRBY', p .. 'stats', 'dead_lettered_total', 1)
return 1
"""

# The newest ARGV[1] dead letters of KEYS[1], for the health report's advice (dead_letters.
# not_retryable), without sending it a bulk_create's letter of megabytes: each is {'W', letter}
# if at most ARGV[2] bytes, else {'R', ''} where a refused spooled line's kind is in it or
# {'L', ''}; it stops once ARGV[3] bytes were looked at (Redis waits meanwhile).
NEWEST_LETTERS = """
local most, whole, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out, seen = {}, 0
while #out < most and seen < budget do
  local chunk = redis.call('LRANGE', KEYS[1], #out, math.min(#out + 99, most - 1))
  if #chunk == 0 then break end
  for _, letter in ipairs(chunk) do
    seen = seen + #letter
    if #letter <= whole then
      out[#out + 1] = {'W', letter}
    elseif string.find(letter, '"kind":"refused_spool_line"', 1, true) then
      out[#out + 1] = {'R', ''}
    else
      out[#out + 1] = {'L', ''}
    end
    if seen >= budget then break end
  end
end
return out
"""

# The drain lease: free, ours (a SET sent again after a lost reply), or left by one of our own
# drains that has ended (ARGV[3], the owner's prefix: a Dagster run's earlier attempt, which could
# not release it with Redis down) is taken; another drain's is not.
ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] and (ARGV[3] == '' or string.sub(held, 1, string.len(ARGV[3])) ~= ARGV[3]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# A chunk's cleanup is one MULTI/EXEC of native multi-key commands (DEL, SREM, SET), built in
# Python from its record in `awaiting_replication`: a Lua script paid for each key twice (as a
# Lua string, then as a Redis argument) and cost twice the Redis time. Only two small parts
# need logic inside Redis, as scripts queued in the same MULTI:
#
# The chunk's own overlays: only entries tagged with its transactions leave a read buffer (an
# update buffered later by another transaction stays); an emptied read buffer leaves the
# overlay index (and the model index, which held overlaid ids too before it held only creates,
# unless the record is buffered). ARGV = prefix, then (model, id, the overlay_mark of its
# transaction) per overlay.
CLEAN_OVERLAYS = """
local p = ARGV[1]
for i = 2, #ARGV, 3 do
  local m, id, mark = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local key = p .. 'read_buffer:' .. m .. ':' .. id
  for _, v in ipairs(redis.call('LRANGE', key, 0, -1)) do
    if string.sub(v, 1, #mark) == mark then redis.call('LREM', key, 0, v) end
  end
  if redis.call('EXISTS', key) == 0 then
    redis.call('SREM', p .. 'overlaid:' .. m, id)
    if redis.call('EXISTS', p .. 'buffered:' .. m .. ':' .. id) == 0 then redis.call('SREM', p .. 'index:' .. m, id) end
  end
end
return 1
"""

# The chunk's last command: drop its record; only the cleaner that removed it counts its
# transactions and announces them (a drain that lost its lease may clean the same chunk: the
# rest is idempotent). First, `cleaned_lsn` in stats keeps the highest commit LSN whose caches
# are gone, as "<main's system identifier>:<16 hex digits>" (so that text compares as the LSN;
# another cluster's starts it again): reads need a replica that has replayed that far (a
# restarted replica replays its WAL again from its last restartpoint, its queries open before:
# a record cleaned here read None). KEYS = awaiting_replication, stats, events; ARGV = record,
# count, event, the chunk's LSN as 16 hex digits.
FINISH_CLEANUP = """
local cluster = redis.call('HGET', KEYS[2], 'main_system_identifier') or ''
local was = redis.call('HGET', KEYS[2], 'cleaned_lsn')
local was_cluster, was_lsn = string.match(was or '', '^(%d*):(%x+)$')
if was_cluster ~= cluster or was_lsn < ARGV[4] then redis.call('HSET', KEYS[2], 'cleaned_lsn', cluster .. ':' .. ARGV[4]) end
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if tonumber(ARGV[2]) > 0 then
  redis.call('HINCRBY', KEYS[2], 'replicated_total', ARGV[2])
  redis.call('PUBLISH', KEYS[3], ARGV[3])
end
return 1
"""


# held_ids: row -> the first of the transactions waiting to retry (or parked) that write it, the
# row's head ("!" + id once dead); site:waiting:{row} (SiteKeys.waiting): the others, in the order
# they came (a sorted set scored from the site's counter `waiting_seq`: a place is found, kept
# and left in O(log n), where a list's LPOS made 300,000 parked behind one holder quadratic).
# One holder a row was not enough: a transaction writing two rows held by two others waited
# behind one of them, and a newer update of its other row, waiting behind that row's holder
# only, went first and was then overwritten.
# ARGV[1] = the key prefix, then (row, value) pairs. HOLD gives each row its head where it has none
# or the head is the same transaction (a live mark turned dead, or back), else puts the value in
# the row's queue: in the place the transaction already has there, or last (wire.claim_rows is
# the rule for heads). UNHOLD: the transaction leaves its rows (applied, dropped): where it is the
# head, the next in the queue becomes the head; else it leaves the queue. UNHOLD_DEAD: its dead
# marks only (a discarded dead letter: a live mark of the same id is another transaction's, waiting
# to retry, a copy pushed again or the first of an id a producer reused). REVIVE: its dead marks
# become live ones (a requeued dead letter: what uses its rows waits behind it again, in its place).
# REVIVE_AHEAD: as REVIVE, on a row that another letter of the id (a producer reused it) still
# writes and keeps dead: the live mark takes the dead one's place and the dead one stays right
# behind it (a head's is put first in the queue, as HOLD_FIRST puts it), so that once the requeued
# one is applied the row is still that letter's (revived, the one mark was the requeued one's: its
# release freed the row, a newer write was applied, and the listed letter's retry undid it).
# RENAME (values "new:old"): a dead letter requeued under a new id takes its dead marks' places.
# HOLD_FIRST: the transaction goes first in each row's order, its head, the head it finds put first
# in the queue (BufferStore.requeue_lost: buffered again after a failover lost its commit, it was
# applied once before any that waits now began to wait; pairs are given newest first, so the
# oldest ends the head). Queued last, one that main now refuses waited behind a newer update that
# was applied first, and was then applied over it. A dead mark of its id is another letter's (it
# was applied since any of its own: a producer's reuse of the id, or a copy pushed again,
# dead-lettered after it): displaced or left in the queue like any other, not taken for its own
# (taken, the letter's hold went with its release: a newer write applied, and the letter's retry
# undid it). Dead-lettered in turn, the lost one's head becomes "!" + id, the one dead mark of the
# id on the row (HOLD drops the other letter's from the queue, as its head was always shared):
# left in the queue too, it became the head again once both letters were discarded, for good.
ROW_QUEUES = """
local function strip(mark) return (string.gsub(mark, '^!', '')) end
local function queue(row) return ARGV[1] .. 'waiting:' .. row end
local function replace(q, old, value)  -- `old`'s place in q now `value`'s; false if it has none
  local score = redis.call('ZSCORE', q, old)
  if not score then return false end
  if old ~= value then
    redis.call('ZREM', q, old)
    redis.call('ZADD', q, score, value)
  end
  return true
end
local function hold(row, value)
  local owner, head = strip(value), redis.call('HGET', KEYS[1], row)
  if not head or strip(head) == owner then
    redis.call('HSET', KEYS[1], row, value)
    if head and value ~= owner then redis.call('ZREM', queue(row), value) end  -- one dead mark of an id
    return
  end
  local q = queue(row)
  if not (replace(q, owner, value) or replace(q, '!' .. owner, value)) then
    redis.call('ZADD', q, redis.call('INCR', ARGV[1] .. 'waiting_seq'), value)
  end
end
local function first(row, value)
  local head, q = redis.call('HGET', KEYS[1], row), queue(row)
  redis.call('ZREM', q, value)
  if head and head ~= value then  -- '!' .. value too: another letter's of the id, see HOLD_FIRST
    local front = redis.call('ZRANGE', q, 0, 0, 'WITHSCORES')
    local score = front[2] and math.min(tonumber(front[2]), 1) - 1 or 0
    redis.call('ZADD', q, string.format('%d', score), head)
  end
  redis.call('HSET', KEYS[1], row, value)
end
local function leave(row, owner, dead_only)
  local head = redis.call('HGET', KEYS[1], row)
  if head == '!' .. owner or (not dead_only and head == owner) then
    local next = redis.call('ZPOPMIN', queue(row))
    if next[1] then redis.call('HSET', KEYS[1], row, next[1]) else redis.call('HDEL', KEYS[1], row) end
  elseif head then
    redis.call('ZREM', queue(row), '!' .. owner)
    if not dead_only then redis.call('ZREM', queue(row), owner) end
  end
end
local function revive(row, owner)
  if redis.call('HGET', KEYS[1], row) == '!' .. owner then redis.call('HSET', KEYS[1], row, owner) return end
  replace(queue(row), '!' .. owner, owner)
end
local function revive_ahead(row, owner)
  local dead, q = '!' .. owner, queue(row)
  if redis.call('HGET', KEYS[1], row) == dead then first(row, owner) return end
  local score = redis.call('ZSCORE', q, dead)
  if not score then return end
  local before = redis.call('ZREVRANGEBYSCORE', q, '(' .. score, '-inf', 'WITHSCORES', 'LIMIT', 0, 1)
  local at = before[2] and (tonumber(before[2]) + tonumber(score)) / 2 or tonumber(score) - 1
  redis.call('ZADD', q, string.format('%.17g', at), owner)
end
local function rename(row, new, old)
  if redis.call('HGET', KEYS[1], row) == '!' .. old then redis.call('HSET', KEYS[1], row, new) return end
  if not replace(queue(row), '!' .. old, new) then hold(row, new) end
end
"""
HOLD = ROW_QUEUES + """
for i = 2, #ARGV, 2 do hold(ARGV[i], ARGV[i + 1]) end
return 1
"""
HOLD_FIRST = ROW_QUEUES + """
for i = 2, #ARGV, 2 do first(ARGV[i], ARGV[i + 1]) end
return 1
"""
UNHOLD = ROW_QUEUES + """
for i = 2, #ARGV, 2 do leave(ARGV[i], ARGV[i + 1], false) end
return 1
"""
UNHOLD_DEAD = ROW_QUEUES + """
for i = 2, #ARGV, 2 do leave(ARGV[i], ARGV[i + 1], true) end
return 1
"""
REVIVE = ROW_QUEUES + """
for i = 2, #ARGV, 2 do revive(ARGV[i], ARGV[i + 1]) end
return 1
"""
REVIVE_AHEAD = ROW_QUEUES + """
for i = 2, #ARGV, 2 do revive_ahead(ARGV[i], ARGV[i + 1]) end
return 1
"""
RENAME = ROW_QUEUES + """
for i = 2, #ARGV, 2 do
  local new, old = string.match(ARGV[i + 1], '^([^:]*):(.*)$')
  rename(ARGV[i], new, old)
end
return 1
"""

# A transaction held behind another waits in the retry zset at +inf, and at the end of
# parked:{holder} as [its member, its id, the rows it writes]. UNPARK makes those of each holder
# in the `unparking` list due, holder after holder, in the order they were held, and each takes
# the marks of its rows that are free (the HOLD rule): the next waiter for a row holds it, so a
# transaction claimed meanwhile (the batch prefetched while the holder was applied) waits behind
# it instead of overtaking it. ZADD XX: only members still there.
# At most ARGV[3] entries per call: one call for 300,000 parked behind one holder held Redis for
# 7 s, and every other client was answered BUSY after 5 s (lua-time-limit).
# Each call drops from its lists what it made due, in the same call, and keeps the next score in
# KEYS[4] (the next call's entries come after this one's), so calls one after the other do what
# one did, and a drain that dies between them leaves the rest queued for the next one.
# Their scores start a second before `now`, a microsecond apart (counted in whole microseconds
# and written as their decimal text: Lua writes a number with 14 digits, 0.1 ms at today's
# epoch, and 1e-6 added to it is a few ulps, which rounded two scores alike), so a claim takes
# them all, in order, before anything buffered since. Only the first waiter for a row holds its mark, and gives it up
# once applied: made due 1 ms apart from `now` on, a claim a moment later took the first waiters,
# then a newer write of the row from the buffer, applied before the waiters behind them (main
# went back to an older value, and kept it).
# KEYS = retry, held_ids, unparking, its next score; ARGV = key prefix, now, the most entries
# to make due, then holders to queue first (in order). Returns the holders still queued.
UNPARK = """
local retry, held, queue, next_score = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
for i = 4, #ARGV do  -- (most have nothing parked behind them)
  if redis.call('EXISTS', ARGV[1] .. 'parked:' .. ARGV[i]) == 1 then
    redis.call('RPUSH', queue, ARGV[i])
  end
end
local us = math.max(math.floor(tonumber(ARGV[2]) * 1e6) - 1e6,
                   math.floor(tonumber(redis.call('GET', next_score) or 0) * 1e6 + 0.5))
local function score() return string.format('%d.%06d', math.floor(us / 1e6), us % 1e6) end
local budget = tonumber(ARGV[3])
while budget > 0 do
  local holder = redis.call('LINDEX', queue, 0)
  if not holder then break end
  local parked = ARGV[1] .. 'parked:' .. holder
  local items = redis.call('LRANGE', parked, 0, budget - 1)
  for _, item in ipairs(items) do
    local entry = cjson.decode(item)
    if redis.call('ZSCORE', retry, entry[1]) then
      redis.call('ZADD', retry, 'XX', score(), entry[1])
      us = us + 1
      for _, row in ipairs(entry[3]) do
        local current = redis.call('HGET', held, row)
        if not current or string.gsub(current, '^!', '') == entry[2] then
          redis.call('HSET', held, row, entry[2])
        end
      end
    end
  end
  budget = budget - #items
  if #items > 0 then redis.call('LTRIM', parked, #items, -1) end
  if redis.call('EXISTS', parked) == 0 then redis.call('LPOP', queue) end
end
local left = redis.call('LLEN', queue)
if left > 0 then redis.call('SET', next_score, score()) else redis.call('DEL', next_score) end
return left
"""
