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
-- - a key written earlier in the batch is read from what the batch wrote, not from the MGET, and
--   its writes after the first are deferred to the end of the batch, where it is written once
--   more with its last value (a hot bucket: two writes per batch instead of one per check). Its
--   lifetime ends as the writes one by one would have left it: renewed by the last write that
--   renews it, else kept. What the batch wrote is kept as the three numbers rather than the
--   packed value: unpacking struct.pack('<ddI4', tokens, last, expires) gives back exactly those
--   numbers (the doubles are copied bit for bit; expires is a whole number below 2^32), so a
--   repeated key is read without a struct.unpack, and packed only for a write Redis sees.
-- - a write that keeps the key's lifetime overwrites the whole 20-byte value in place
--   (SETRANGE at 0: the recorded expiry is rewritten unchanged).

-- Globals read once: each global and field read costs a table lookup per use.
local call, rpcall = redis.call, redis.pcall
local spack, sunpack = struct.pack, struct.unpack
local keys = KEYS

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

local values = call('MGET', unpack(keys))
-- What the batch has written so far, by key: the tokens, last and expires of the key's last
-- value (the flags say which keys to keep). A key's first write is made at once; the writes
-- after it are deferred to the end of the batch: `order` lists those keys, `pending` holds the
-- lifetime to renew each with (false: keep the key's lifetime).
local w_tokens, w_last, w_expires = {}, {}, {}
local order, pending
local deferred = 0
local WRONGTYPE = 'WRONGTYPE Operation against a key holding the wrong kind of value'

-- Sized once for every entry (a table grown one element at a time is rebuilt at every power
-- of two); the elements past the last entry are cleared before the reply.
local replies = { unpack(keys) }
local n = 0
local i = 0
local size = #data
-- The steps below are lua/token_bucket_compact.lua's, written out for a single entry and again
-- for a group's buckets rather than shared through Lua functions: a closure per batch and a
-- call per step cost Redis more than the arithmetic itself (crates/bench/callgrind/batch.sh).
-- For the same reason no math.floor or math.min is called per entry (each call of a C function
-- costs Redis a few hundred instructions; these are a handful of bytecodes):
-- - a remaining count is replied as the number itself: Redis turns a Lua number into an integer
--   reply by a C cast, which truncates, and truncating a number >= 0 is flooring it (every
--   remaining count is >= 0: max_tokens >= 1, refill_rate > 0, stored tokens >= 0);
-- - math.min(a, b) returns b if b < a, else a: written out as that comparison;
-- - math.floor(x) of a finite x >= 0 is x - x % 1: Lua 5.1 computes a % b as a - floor(a / b) * b,
--   so x % 1 is x - floor(x), exact in doubles (floor(x) is 0 or within a factor 2 of x), and
--   subtracting it from x leaves floor(x) exactly.
-- The single entry's rule numbers are kept in locals while consecutive entries share a rule.
local rule_no = 0
local rule, max_tokens, refill_rate, per_second
while pos <= size do
  -- Unpacked into fresh locals: assigning a call's results to existing ones costs a move each.
  local kind, flags, count, cost, now, after = sunpack('<BBHdd', data, pos)
  pos = after
  local explicit = false
  if now >= 0 then
    explicit = true
  else
    now = clock
  end
  n = n + 1
  if kind == 0 then
    i = i + 1
    if count ~= rule_no then
      rule_no = count
      rule = rules[count]
      max_tokens, refill_rate, per_second = rule[1], rule[2], rule[3]
    end
    local key = keys[i]
    -- Read from the batch's own writes when the key came earlier in the batch (flag 1) and was
    -- written there (`again`: its `last`, a number, else false or nil); otherwise from the MGET.
    local again = flags % 2 == 1 and w_last[key]
    local stored, tokens, last
    local expires = 0
    if again then
      tokens, last, expires = w_tokens[key], again, w_expires[key]
    else
      stored = values[i]
      local size = stored and #stored
      if size == 20 then
        tokens, last, expires = sunpack('<ddI4', stored)
      elseif size == 16 then
        tokens, last = sunpack('<dd', stored)
      end
    end
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
    local current = tokens + elapsed * refill_rate / 60
    if not (current < max_tokens) then
      current = max_tokens
    end
    if now > last then
      last = now
    end
    if cost == 0 or cost > max_tokens then
      -- Nothing written: a key read as missing may hold another type, which GET tells.
      local got = not (again or stored) and rpcall('GET', key)
      if type(got) == 'table' then
        replies[n] = { -1, got.err or WRONGTYPE }
      elseif cost == 0 then
        replies[n] = current
      else
        replies[n] = { 0, spack('<d', math.huge), current }
      end
    else
      local left = current
      if current >= cost then
        left = current - cost
      end
      local ok = true
      -- The lifetime to give the key, or false to keep it.
      local renew = false
      if explicit or not (expires - last >= (max_tokens - left) / per_second + 30) then
        expires = 0
        if not explicit then
          expires = now + rule[6]
          expires = expires - expires % 1
          if 4294967295 < expires then
            expires = 4294967295
          end
        end
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
        call('SETRANGE', key, '0', spack('<ddI4', left, last, expires))
      elseif stored then
        call('SETEX', key, renew, spack('<ddI4', left, last, expires))
      else
        ok = call('SET', key, spack('<ddI4', left, last, expires), 'EX', renew, 'NX')
      end
      if not ok then
        replies[n] = { -1, WRONGTYPE }
      else
        -- Kept for the entries after it on the same key (flag 2), and for the deferred write.
        if again or flags >= 2 then
          w_tokens[key], w_last[key], w_expires[key] = left, last, expires
        end
        if current >= cost then
          replies[n] = left
        else
          replies[n] = { 0, spack('<d', (last - now) + (cost - current) / per_second), current }
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
      local key = keys[i + j]
      local again = bucket_flags % 2 == 1 and w_last[key]
      local tokens, last
      local expires = 0
      if again then
        tokens, last, expires = w_tokens[key], again, w_expires[key]
      else
        local stored = values[i + j]
        if not stored and not failed then
          local got = rpcall('GET', key)
          if type(got) == 'table' then
            failed = 'WRONGTYPE bucket ' .. j .. ': ' .. (got.err or WRONGTYPE)
          end
        end
        local size = stored and #stored
        if size == 20 then
          tokens, last, expires = sunpack('<ddI4', stored)
        elseif size == 16 then
          tokens, last = sunpack('<dd', stored)
        end
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
      local current = tokens + elapsed * rule[2] / 60
      if not (current < max_tokens) then
        current = max_tokens
      end
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
            group[j] = left
          else
            group[j] = current
          end
        elseif b[8] then
          group[j] = { 0, spack('<d', math.huge), current }
        else
          left = current
          group[j] = { 0, spack('<d', (last - now) + (bucket_cost - current) / rule[3]), current }
        end
        if left then
          local key = b[9]
          local renew = false
          if explicit or not (expires - last >= (rule[1] - left) / rule[3] + 30) then
            expires = 0
            if not explicit then
              expires = now + rule[6]
              expires = expires - expires % 1
              if 4294967295 < expires then
                expires = 4294967295
              end
            end
            renew = rule[5]
          end
          if b[6] or b[10] then
            w_tokens[key], w_last[key], w_expires[key] = left, last, expires
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
            call('SETEX', key, renew, spack('<ddI4', left, last, expires))
          else
            call('SETRANGE', key, '0', spack('<ddI4', left, last, expires))
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
  local value = spack('<ddI4', w_tokens[key], w_last[key], w_expires[key])
  if renew then
    call('SETEX', key, renew, value)
  else
    call('SETRANGE', key, '0', value)
  end
end

for k = n + 1, #keys do
  replies[k] = nil
end
return replies
