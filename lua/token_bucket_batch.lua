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
--          struct.pack('<BHdd', 0, rule, cost, now) per entry: cost as a double, +inf above
--          capacity (decided by the caller on the integers), now < 0 for Redis TIME; a group
--          entry (kind 1) as there, its buckets' keys two by two.
--
-- Reply: one element per entry, in order: the bare remaining count when allowed (as the
-- compact script answers), { 0, retry_after, remaining } when denied, retry_after being the
-- double itself, struct.pack('<d') (+inf: never), or { -1, error } when the entry's keys could
-- not be read (a key of another type: WRONGTYPE), which fails that entry only. A group: an
-- array of its buckets' replies, or { -1, 'WRONGTYPE bucket <i>: …' } before anything of it
-- is written. Stored values are lua/token_bucket.lua's, so either script reads the other's.

local t = redis.call('TIME')
local clock = tonumber(t[1]) + tonumber(t[2]) / 1000000
local data = ARGV[1]
local count, pos = struct.unpack('<H', data)
-- Per rule: max_tokens, refill_rate, ttl text.
local rules = {}
for r = 1, count do
  local max_tokens, refill_rate, ttl
  max_tokens, refill_rate, ttl, pos = struct.unpack('<ddBc0', data, pos)
  rules[r] = { max_tokens, refill_rate, ttl }
end
local replies = {}
local HUGE = struct.pack('<d', math.huge)

local function decimal(x)
  return string.format('%.17g', x)
end

local n = 0
local b = 0
local size = #data
while pos <= size do
  local kind, count, cost, now
  kind, count, cost, now, pos = struct.unpack('<BHdd', data, pos)
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
    local stored_tokens = redis.pcall('GET', tokens_key)
    local stored_time = redis.pcall('GET', time_key)
    if type(stored_tokens) == 'table' or type(stored_time) == 'table' then
      local failed = type(stored_tokens) == 'table' and stored_tokens or stored_time
      replies[n] = { -1, failed.err or 'unreadable bucket' }
    else
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
      local current = math.min(max_tokens, tokens + elapsed * refill_rate / 60)
      if now > last then
        last = now
      end

      if cost == 0 then
        replies[n] = math.floor(current)
      elseif cost > max_tokens then
        replies[n] = { 0, HUGE, math.floor(current) }
      elseif current >= cost then
        local left = current - cost
        redis.call('SET', tokens_key, decimal(left), 'EX', ttl)
        redis.call('SET', time_key, decimal(last), 'EX', ttl)
        replies[n] = math.floor(left)
      else
        redis.call('SET', tokens_key, decimal(current), 'EX', ttl)
        redis.call('SET', time_key, decimal(last), 'EX', ttl)
        replies[n] = { 0, struct.pack('<d', (last - now) + (cost - current) / (refill_rate / 60)),
          math.floor(current) }
      end
    end
  else
    -- A group, as lua/token_bucket_multi.lua. Phase 1: every bucket's step, nothing written;
    -- a key of another type fails the group before anything is written.
    local buckets = {}
    local all_had = true
    local failed
    for j = 1, count do
      local r, bucket_cost
      r, bucket_cost, pos = struct.unpack('<Hd', data, pos)
      local rule = rules[r]
      local max_tokens, refill_rate = rule[1], rule[2]
      local tokens_key = KEYS[2 * (b + j) - 1]
      local time_key = KEYS[2 * (b + j)]
      local stored_tokens = redis.pcall('GET', tokens_key)
      local stored_time = redis.pcall('GET', time_key)
      for _, got in ipairs({ stored_tokens, stored_time }) do
        if not failed and type(got) == 'table' then
          failed = 'WRONGTYPE bucket ' .. j .. ': ' .. (got.err or 'unreadable bucket')
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
      local current = math.min(max_tokens, tokens + elapsed * refill_rate / 60)
      if now > last then
        last = now
      end
      local never = bucket_cost ~= 0 and bucket_cost > max_tokens
      local had = bucket_cost == 0 or (not never and current >= bucket_cost)
      if not had then
        all_had = false
      end
      buckets[j] = { rule, bucket_cost, current, last, had, never, tokens_key, time_key }
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
            group[j] = math.floor(left)
          else
            group[j] = math.floor(current)
          end
        elseif g[6] then
          group[j] = { 0, HUGE, math.floor(current) }
        else
          left = current
          group[j] = { 0, struct.pack('<d', (last - now) + (bucket_cost - current) / (rule[2] / 60)),
            math.floor(current) }
        end
        if left then
          redis.call('SET', g[7], decimal(left), 'EX', rule[3])
          redis.call('SET', g[8], decimal(last), 'EX', rule[3])
        end
      end
      replies[n] = group
    end
    b = b + count
  end
end

return replies
