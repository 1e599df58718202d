-- Token bucket, two-key layout (KeyLayout::TwoKeys), coalesced: several checks in one script
-- call. A single entry is exactly one step of lua/token_bucket.lua; a group entry is exactly
-- one call of lua/token_bucket_multi.lua (all or nothing over its buckets). Entries run in
-- order, so a bucket repeated in a batch sees the previous entry's write; entries are NOT
-- all-or-nothing with each other: each is decided, and written, on its own.
--
-- KEYS[2i-1], KEYS[2i]  the i-th entry's <bucket key>:tokens and <bucket key>:time
-- ARGV[1]  the batch, packed as for lua/token_bucket_compact_batch.lua (its header has the
--          layout): each distinct rule once, struct.pack('<ddBc0', max_tokens, refill_rate,
--          #ttl, ttl) with ttl = ceil(max_tokens / refill_rate * 60) + 60 as decimal text, then
--          struct.pack('<BBHdd', 0, flags, rule, cost, now) per entry: cost as a double, +inf
--          above capacity (decided by the caller on the integers), now < 0 for Redis TIME; a
--          group entry (kind 1) and the flags as there, a group's buckets' keys two by two.
--
-- Reply: one element per entry, in order: the bare remaining count when allowed (as the
-- compact script answers), { 0, retry_after, remaining } when denied, retry_after being the
-- double itself, struct.pack('<d') (+inf: never), or { -1, error } when the entry's keys could
-- not be read (a key of another type: WRONGTYPE), which fails that entry only. A group: an
-- array of its buckets' replies, or { -1, 'WRONGTYPE bucket <i>: …' } before anything of it
-- is written. Stored values are lua/token_bucket.lua's, so either script reads the other's.
--
-- Per entry the decisions, writes and key lifetimes are lua/token_bucket.lua's and
-- lua/token_bucket_multi.lua's, operation for operation; Redis is asked as by
-- lua/token_bucket_compact_batch.lua (its header has why): one MGET reads every key (nil for a
-- key of another type, as for a missing one); keys read as missing are created with SET … NX
-- before anything else of the entry is written (a refusal deletes what the entry had just
-- created and fails it with nothing written); an entry that writes nothing, and a group's key
-- read as missing, are told apart with a GET; a key written earlier in the batch is read from
-- the batch's own writes and written again once, at the end.

local call, rpcall = redis.call, redis.pcall
local sunpack, spack = struct.unpack, struct.pack
local floor, min, format = math.floor, math.min, string.format

local t = call('TIME')
local clock = tonumber(t[1]) + tonumber(t[2]) / 1000000
local data = ARGV[1]
local count, pos = sunpack('<H', data)
-- Per rule: max_tokens, refill_rate, ttl text.
local rules = {}
for r = 1, count do
  local max_tokens, refill_rate, ttl
  max_tokens, refill_rate, ttl, pos = sunpack('<ddBc0', data, pos)
  rules[r] = { max_tokens, refill_rate, ttl }
end
local values = call('MGET', unpack(KEYS))
-- What the batch has written, by key (the number itself); the buckets written again, whose
-- last write waits for the end of the batch: their tokens keys in order, and the lifetime.
local written = {}
local order, pending
local deferred = 0
local WRONGTYPE = 'WRONGTYPE Operation against a key holding the wrong kind of value'
local replies = {}

-- %.17g keeps every bit of a double, so the stored value reads back exactly.
local n = 0
local b = 0
local size = #data
while pos <= size do
  local kind, flags, count, cost, now
  kind, flags, count, cost, now, pos = sunpack('<BBHdd', data, pos)
  if now < 0 then
    now = clock
  end
  n = n + 1
  if kind == 0 then
    b = b + 1
    local tokens_key = KEYS[2 * b - 1]
    local time_key = KEYS[2 * b]
    local rule = rules[count]
    local max_tokens, refill_rate, ttl = rule[1], rule[2], rule[3]
    local stored_tokens
    if flags % 2 == 1 then
      stored_tokens = written[tokens_key]
    end
    local again = stored_tokens ~= nil
    local stored_time
    if again then
      stored_time = written[time_key]
    else
      stored_tokens = values[2 * b - 1]
      stored_time = values[2 * b]
    end
    local tokens = tonumber(stored_tokens)
    local last = tonumber(stored_time)
    if not (tokens and last and tokens >= 0 and tokens <= max_tokens and last >= 0
        and (last <= now or last - now <= max_tokens / refill_rate * 60 + 60)) then
      tokens = max_tokens
      last = now
    end

    local elapsed = now - last
    if elapsed < 0 then
      elapsed = 0
    end
    local current = min(max_tokens, tokens + elapsed * refill_rate / 60)
    if now > last then
      last = now
    end

    if cost == 0 or cost > max_tokens then
      -- Nothing written: a key read as missing may hold another type, which GET tells.
      local failed
      for k, stored in ipairs({ stored_tokens, stored_time }) do
        if not stored and not failed then
          local got = rpcall('GET', KEYS[2 * b - 2 + k])
          if type(got) == 'table' then
            failed = got.err or WRONGTYPE
          end
        end
      end
      if failed then
        replies[n] = { -1, failed }
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
      local ok = true
      if again then
        if not pending then
          order, pending = {}, {}
        end
        if pending[tokens_key] == nil then
          deferred = deferred + 1
          order[deferred] = b
        end
        pending[tokens_key] = ttl
      elseif stored_tokens and stored_time then
        call('SET', tokens_key, format('%.17g', left), 'EX', ttl)
        call('SET', time_key, format('%.17g', last), 'EX', ttl)
      else
        -- The keys read as missing first, with NX: one of another type refuses, and what the
        -- entry created is deleted again.
        local created
        if not stored_tokens then
          ok = call('SET', tokens_key, format('%.17g', left), 'EX', ttl, 'NX')
          created = ok
        end
        if ok and not stored_time then
          ok = call('SET', time_key, format('%.17g', last), 'EX', ttl, 'NX')
          if not ok and created then
            call('DEL', tokens_key)
          end
        end
        if ok then
          if stored_tokens then
            call('SET', tokens_key, format('%.17g', left), 'EX', ttl)
          end
          if stored_time then
            call('SET', time_key, format('%.17g', last), 'EX', ttl)
          end
        end
      end
      if not ok then
        replies[n] = { -1, WRONGTYPE }
      else
        if again or flags >= 2 then
          written[tokens_key] = left
          written[time_key] = last
        end
        if current >= cost then
          replies[n] = floor(left)
        else
          replies[n] = { 0, spack('<d', (last - now) + (cost - current) / (refill_rate / 60)),
            floor(current) }
        end
      end
    end
  else
    -- A group, as lua/token_bucket_multi.lua. Phase 1: every bucket's step, nothing written;
    -- a key of another type fails the group before anything is written.
    local buckets = {}
    local all_had = true
    local failed
    for j = 1, count do
      local bucket_flags, r, bucket_cost
      bucket_flags, r, bucket_cost, pos = sunpack('<BHd', data, pos)
      local rule = rules[r]
      local max_tokens, refill_rate = rule[1], rule[2]
      local at = 2 * (b + j)
      local tokens_key = KEYS[at - 1]
      local time_key = KEYS[at]
      local stored_tokens
      if bucket_flags % 2 == 1 then
        stored_tokens = written[tokens_key]
      end
      local again = stored_tokens ~= nil
      local stored_time
      if again then
        stored_time = written[time_key]
      else
        stored_tokens = values[at - 1]
        stored_time = values[at]
        for k, stored in ipairs({ stored_tokens, stored_time }) do
          if not stored and not failed then
            local got = rpcall('GET', KEYS[at - 2 + k])
            if type(got) == 'table' then
              failed = 'WRONGTYPE bucket ' .. j .. ': ' .. (got.err or WRONGTYPE)
            end
          end
        end
      end
      local tokens = tonumber(stored_tokens)
      local last = tonumber(stored_time)
      if not (tokens and last and tokens >= 0 and tokens <= max_tokens and last >= 0
          and (last <= now or last - now <= max_tokens / refill_rate * 60 + 60)) then
        tokens = max_tokens
        last = now
      end
      local elapsed = now - last
      if elapsed < 0 then
        elapsed = 0
      end
      local current = min(max_tokens, tokens + elapsed * refill_rate / 60)
      if now > last then
        last = now
      end
      local never = bucket_cost ~= 0 and bucket_cost > max_tokens
      local had = bucket_cost == 0 or (not never and current >= bucket_cost)
      if not had then
        all_had = false
      end
      buckets[j] = { rule, bucket_cost, current, last, had, never, tokens_key, time_key, again,
        bucket_flags >= 2 }
    end
    if failed then
      replies[n] = { -1, failed }
    else
      -- Phase 2: if every bucket had its cost, each takes it; otherwise only the buckets that
      -- lacked theirs are written (refilled, nothing taken; nothing above capacity).
      local group = {}
      for j = 1, count do
        local g = buckets[j]
        local rule, bucket_cost, current, last = g[1], g[2], g[3], g[4]
        local left
        if g[5] then
          if all_had and bucket_cost ~= 0 then
            left = current - bucket_cost
            group[j] = floor(left)
          else
            group[j] = floor(current)
          end
        elseif g[6] then
          group[j] = { 0, spack('<d', math.huge), floor(current) }
        else
          left = current
          group[j] = { 0, spack('<d', (last - now) + (bucket_cost - current) / (rule[2] / 60)),
            floor(current) }
        end
        if left then
          local tokens_key = g[7]
          if g[9] then
            if not pending then
              order, pending = {}, {}
            end
            if pending[tokens_key] == nil then
              deferred = deferred + 1
              order[deferred] = b + j
            end
            pending[tokens_key] = rule[3]
          else
            call('SET', tokens_key, format('%.17g', left), 'EX', rule[3])
            call('SET', g[8], format('%.17g', last), 'EX', rule[3])
          end
          if g[9] or g[10] then
            written[tokens_key] = left
            written[g[8]] = last
          end
        end
      end
      replies[n] = group
    end
    b = b + count
  end
end

-- The buckets written again: their last values, once, with the lifetime of their last write.
for d = 1, deferred do
  local at = 2 * order[d]
  local tokens_key, time_key = KEYS[at - 1], KEYS[at]
  local ttl = pending[tokens_key]
  call('SET', tokens_key, format('%.17g', written[tokens_key]), 'EX', ttl)
  call('SET', time_key, format('%.17g', written[time_key]), 'EX', ttl)
end

return replies
