-- Token bucket, compact layout (KeyLayout::Compact), coalesced: several checks in one script
-- call. A single entry is exactly one step of lua/token_bucket_compact.lua; a group entry is
-- exactly one call of lua/token_bucket_compact_multi.lua (all or nothing over its buckets).
-- Entries run in order, so a key repeated in a batch sees the previous entry's write; entries
-- are NOT all-or-nothing with each other: each is decided, and written, on its own.
--
-- KEYS     every entry's keys, in order: one <bucket key>:tb per single entry, one per bucket
--          of a group entry
-- ARGV[1]  the batch, packed (BatchArgs and the batch builder in
--          crates/infrastructure-redis/src/coalesce.rs):
--            struct.pack('<H', rules), then per distinct rule
--            struct.pack('<ddBc0', max_tokens, refill_rate, #ttl, ttl), ttl being the key
--            lifetime in decimal digits, as lua/token_bucket_compact.lua's; then per entry
--            struct.pack('<BBHdd', kind, flags, n, cost, now):
--              kind 0, a single check: n its rule (from 1), cost (+inf above capacity, decided
--                by the caller on the integers);
--              kind 1, a group: n its buckets, flags and cost unused, followed by
--                struct.pack('<BHd', flags, rule, cost) per bucket;
--            a bucket's flags (the caller knows the batch's keys, the script need not find out):
--            1 when its key came earlier in the batch, plus 2 when it comes again later;
--            now < 0 for Redis TIME (read once, first: every such entry is decided at that
--            instant).
--
-- Reply: one element per entry, in order. A single entry: the bare remaining count when
-- allowed, { 0, retry_after, remaining } when denied, where retry_after is the double itself,
-- struct.pack('<d') (+inf: never), rather than decimal text; or { -1, error } when its key
-- holds another type (WRONGTYPE), which fails that entry only and writes nothing for it. A
-- group: an array of its buckets' replies, as a single entry's, or { -1, 'WRONGTYPE bucket
-- <i>: …' } before anything of the group is written.
--
-- Per entry the decisions, writes and key lifetimes are lua/token_bucket_compact.lua's and
-- lua/token_bucket_compact_multi.lua's, operation for operation. Only the way Redis is asked
-- differs, to cost less per check (docs/lua.md, "Coalesced checks"):
-- - one MGET reads every key. MGET answers nil for a key of another type, as for a missing
--   one, so a key read as missing is created with SET … NX: a key of another type refuses it,
--   and the entry fails with nothing written. An entry that writes nothing (cost 0, cost above
--   capacity) or a group's missing bucket is told apart with a GET.
-- - a key written earlier in the batch is read from `written`, not from the MGET, and its
--   writes after the first are deferred to the end of the batch, where it is written once more
--   with its last value (a hot bucket: two writes per batch instead of one per check). Its
--   lifetime ends as the writes one by one would have left it: renewed by the last write that
--   renews it, else kept.
-- - a write that keeps the key's lifetime overwrites the whole 20-byte value in place
--   (SETRANGE at 0: the recorded expiry is rewritten unchanged).

-- Globals read once: each global and field read costs a table lookup per use.
local call, rpcall = redis.call, redis.pcall
local spack, sunpack = struct.pack, struct.unpack
local floor, min = math.floor, math.min

local t = call('TIME')
local clock = tonumber(t[1]) + tonumber(t[2]) / 1000000
local data = ARGV[1]

local count, pos = sunpack('<H', data)
-- Per rule: max_tokens, refill_rate, refill_rate / 60, the future horizon, ttl text, ttl.
local rules = {}
for r = 1, count do
  local max_tokens, refill_rate, ttl
  max_tokens, refill_rate, ttl, pos = sunpack('<ddBc0', data, pos)
  rules[r] = { max_tokens, refill_rate, refill_rate / 60, max_tokens / refill_rate * 60 + 60, ttl,
    tonumber(ttl) }
end

local values = call('MGET', unpack(KEYS))
-- What the batch has written so far, by key. A key's first write is made at once; the writes
-- after it are deferred to the end of the batch: `order` lists those keys, `pending` holds the
-- lifetime to renew each with (false: keep the key's lifetime).
local written = {}
local order, pending
local deferred = 0
local WRONGTYPE = 'WRONGTYPE Operation against a key holding the wrong kind of value'

-- Sized once for every entry (a table grown one element at a time is rebuilt at every power
-- of two); the elements past the last entry are cleared before the reply.
local replies = { unpack(KEYS) }
local n = 0
local i = 0
local size = #data
-- The steps below are lua/token_bucket_compact.lua's, written out for a single entry and again
-- for a group's buckets rather than shared through Lua functions: a closure per batch and a
-- call per step cost Redis more than the arithmetic itself (crates/bench/callgrind/batch.sh).
while pos <= size do
  local kind, flags, count, cost, now
  kind, flags, count, cost, now, pos = sunpack('<BBHdd', data, pos)
  local explicit = now >= 0
  if not explicit then
    now = clock
  end
  n = n + 1
  if kind == 0 then
    i = i + 1
    local rule = rules[count]
    local key = KEYS[i]
    -- Read from the batch's own writes when the key came earlier in the batch (flag 1) and was
    -- written there; otherwise from the MGET.
    local stored
    if flags % 2 == 1 then
      stored = written[key]
    end
    local again = stored ~= nil
    if not again then
      stored = values[i]
    end
    local tokens, last
    local expires = 0
    local size = stored and #stored
    if size == 20 then
      tokens, last, expires = sunpack('<ddI4', stored)
    elseif size == 16 then
      tokens, last = sunpack('<dd', stored)
    end
    local max_tokens = rule[1]
    if not (tokens and tokens >= 0 and tokens <= max_tokens and last >= 0
        and (last <= now or last - now <= rule[4])) then
      tokens = max_tokens
      last = now
      expires = 0
    end
    local elapsed = now - last
    if elapsed < 0 then
      elapsed = 0
    end
    local current = min(max_tokens, tokens + elapsed * rule[2] / 60)
    if now > last then
      last = now
    end
    if cost == 0 or cost > max_tokens then
      -- Nothing written: a key read as missing may hold another type, which GET tells.
      local got = not stored and rpcall('GET', key)
      if type(got) == 'table' then
        replies[n] = { -1, got.err or WRONGTYPE }
      elseif cost == 0 then
        replies[n] = floor(current)
      else
        replies[n] = { 0, spack('<d', math.huge), floor(current) }
      end
    else
      local left = current
      if current >= cost then
        left = current - cost
      end
      local value
      local ok = true
      -- The lifetime to give the key, or false to keep it.
      local renew = false
      if not explicit and expires - last >= (max_tokens - left) / rule[3] + 30 then
        value = spack('<ddI4', left, last, expires)
      else
        expires = 0
        if not explicit then
          expires = min(floor(now + rule[6]), 4294967295)
        end
        value = spack('<ddI4', left, last, expires)
        renew = rule[5]
      end
      if again then
        -- Written earlier in this batch: the write waits for the end of the batch, where a key
        -- written many times (a hot bucket) is written once more.
        if not pending then
          order, pending = {}, {}
        end
        local was = pending[key]
        if was == nil then
          deferred = deferred + 1
          order[deferred] = key
          pending[key] = renew
        elseif renew then
          pending[key] = renew
        end
      elseif not renew then
        call('SETRANGE', key, '0', value)
      elseif stored then
        call('SETEX', key, renew, value)
      else
        ok = call('SET', key, value, 'EX', renew, 'NX')
      end
      if not ok then
        replies[n] = { -1, WRONGTYPE }
      else
        -- Kept for the entries after it on the same key (flag 2), and for the deferred write.
        if again or flags >= 2 then
          written[key] = value
        end
        if current >= cost then
          replies[n] = floor(left)
        else
          replies[n] = { 0, spack('<d', (last - now) + (cost - current) / rule[3]),
            floor(current) }
        end
      end
    end
  else
    -- Phase 1, as lua/token_bucket_compact_multi.lua: every bucket's step, nothing written.
    local buckets = {}
    local all_had = true
    local failed
    for j = 1, count do
      local bucket_flags, r, bucket_cost
      bucket_flags, r, bucket_cost, pos = sunpack('<BHd', data, pos)
      local rule = rules[r]
      local key = KEYS[i + j]
      local stored
      if bucket_flags % 2 == 1 then
        stored = written[key]
      end
      local again = stored ~= nil
      if not again then
        stored = values[i + j]
        if not stored and not failed then
          local got = rpcall('GET', key)
          if type(got) == 'table' then
            failed = 'WRONGTYPE bucket ' .. j .. ': ' .. (got.err or WRONGTYPE)
          end
        end
      end
      local tokens, last
      local expires = 0
      local size = stored and #stored
      if size == 20 then
        tokens, last, expires = sunpack('<ddI4', stored)
      elseif size == 16 then
        tokens, last = sunpack('<dd', stored)
      end
      local max_tokens = rule[1]
      if not (tokens and tokens >= 0 and tokens <= max_tokens and last >= 0
          and (last <= now or last - now <= rule[4])) then
        tokens = max_tokens
        last = now
        expires = 0
      end
      local elapsed = now - last
      if elapsed < 0 then
        elapsed = 0
      end
      local current = min(max_tokens, tokens + elapsed * rule[2] / 60)
      if now > last then
        last = now
      end
      local never = bucket_cost ~= 0 and bucket_cost > max_tokens
      local had = bucket_cost == 0 or (not never and current >= bucket_cost)
      if not had then
        all_had = false
      end
      buckets[j] = { rule, bucket_cost, current, last, expires, again, had, never, key,
        bucket_flags >= 2 }
    end
    if failed then
      replies[n] = { -1, failed }
    else
      -- Phase 2: if every bucket had its cost, each takes it; otherwise only the buckets that
      -- lacked theirs are written (refilled, nothing taken; nothing above capacity).
      local group = {}
      for j = 1, count do
        local b = buckets[j]
        local rule, bucket_cost, current, last, expires = b[1], b[2], b[3], b[4], b[5]
        local left
        if b[7] then
          if all_had and bucket_cost ~= 0 then
            left = current - bucket_cost
            group[j] = floor(left)
          else
            group[j] = floor(current)
          end
        elseif b[8] then
          group[j] = { 0, spack('<d', math.huge), floor(current) }
        else
          left = current
          group[j] = { 0, spack('<d', (last - now) + (bucket_cost - current) / rule[3]),
            floor(current) }
        end
        if left then
          local key = b[9]
          local renew = false
          local value
          if not explicit and expires - last >= (rule[1] - left) / rule[3] + 30 then
            value = spack('<ddI4', left, last, expires)
          else
            expires = 0
            if not explicit then
              expires = min(floor(now + rule[6]), 4294967295)
            end
            value = spack('<ddI4', left, last, expires)
            renew = rule[5]
          end
          if b[6] or b[10] then
            written[key] = value
          end
          if b[6] then
            -- Written earlier in this batch: as for a single entry.
            if not pending then
              order, pending = {}, {}
            end
            local was = pending[key]
            if was == nil then
              deferred = deferred + 1
              order[deferred] = key
              pending[key] = renew
            elseif renew then
              pending[key] = renew
            end
          elseif renew then
            -- A missing key was told apart from one of another type in phase 1.
            call('SETEX', key, renew, value)
          else
            call('SETRANGE', key, '0', value)
          end
        end
      end
      replies[n] = group
    end
    i = i + count
  end
end

-- The deferred writes, one per key written more than once: its last value, with the lifetime of
-- its last renewal after the first write if it had one (as the writes one by one would have left
-- it, to the microsecond of the expiry), else in place.
for d = 1, deferred do
  local key = order[d]
  local renew = pending[key]
  if renew then
    call('SETEX', key, renew, written[key])
  else
    call('SETRANGE', key, '0', written[key])
  end
end

for k = n + 1, #KEYS do
  replies[k] = nil
end
return replies
