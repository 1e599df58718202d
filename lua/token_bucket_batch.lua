-- Token bucket, two-key layout (KeyLayout::TwoKeys), coalesced: several independent checks in
-- one script call. Each entry is exactly one step of lua/token_bucket.lua, run in order, so a
-- bucket repeated in a batch sees the previous entry's write. Entries are NOT all-or-nothing
-- with each other: each is decided, and written, on its own.
--
-- KEYS[2i-1], KEYS[2i]  the i-th entry's <bucket key>:tokens and <bucket key>:time
-- ARGV[1]  the batch, packed as for lua/token_bucket_compact_batch.lua (its header has the
--          layout): each distinct rule once, struct.pack('<ddBc0', max_tokens, refill_rate,
--          #ttl, ttl) with ttl = ceil(max_tokens / refill_rate * 60) + 60 as decimal text, then
--          struct.pack('<BHdd', 0, rule, cost, now) per entry: cost as a double, +inf above
--          capacity (decided by the caller on the integers), now < 0 for Redis TIME. Only
--          single entries (kind 0) here.
--
-- Reply: one element per entry, in order: the bare remaining count when allowed (as the
-- compact script answers), { 0, retry_after, remaining } when denied, retry_after being the
-- double itself, struct.pack('<d') (+inf: never), or { -1, error } when the entry's keys could
-- not be read (a key of another type: WRONGTYPE), which fails that entry only. Stored values
-- are lua/token_bucket.lua's, so either script reads the other's.

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

for i = 1, #KEYS / 2 do
  local tokens_key = KEYS[2 * i - 1]
  local time_key = KEYS[2 * i]
  local _, r, cost, now
  _, r, cost, now, pos = struct.unpack('<BHdd', data, pos)
  local rule = rules[r]
  local max_tokens, refill_rate, ttl = rule[1], rule[2], rule[3]
  if now < 0 then
    now = clock
  end

  local stored_tokens = redis.pcall('GET', tokens_key)
  local stored_time = redis.pcall('GET', time_key)
  if type(stored_tokens) == 'table' or type(stored_time) == 'table' then
    local failed = type(stored_tokens) == 'table' and stored_tokens or stored_time
    replies[i] = { -1, failed.err or 'unreadable bucket' }
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
      replies[i] = math.floor(current)
    elseif cost > max_tokens then
      replies[i] = { 0, HUGE, math.floor(current) }
    elseif current >= cost then
      local left = current - cost
      redis.call('SET', tokens_key, decimal(left), 'EX', ttl)
      redis.call('SET', time_key, decimal(last), 'EX', ttl)
      replies[i] = math.floor(left)
    else
      redis.call('SET', tokens_key, decimal(current), 'EX', ttl)
      redis.call('SET', time_key, decimal(last), 'EX', ttl)
      replies[i] = { 0, struct.pack('<d', (last - now) + (cost - current) / (refill_rate / 60)),
        math.floor(current) }
    end
  end
end

return replies
