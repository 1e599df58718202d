-- Token bucket, compact layout (KeyLayout::Compact), coalesced: several independent checks in
-- one script call. Each entry is exactly one step of lua/token_bucket_compact.lua, run in
-- order, so a key repeated in a batch sees the previous entry's write. Entries are NOT
-- all-or-nothing with each other: each is decided, and written, on its own.
--
-- KEYS[i]  the i-th entry's <bucket key>:tb
-- ARGV[1]  the entries' numbers, one after the other, each struct.pack('<ddddBc0', max_tokens,
--          refill_rate, cost, now, #ttl, ttl): cost as lua/token_bucket_compact.lua's (+inf
--          above capacity, decided by the caller), now < 0 for Redis TIME, ttl the key
--          lifetime as decimal text (BatchArgs, crates/infrastructure-redis/src/coalesce.rs)
--
-- Reply: one element per entry, in order: the single script's reply (the bare remaining count
-- when allowed, { 0, retry_after, remaining } when denied), or { -1, error } when the entry's
-- key could not be read (a key of another type: WRONGTYPE), which fails that entry only.
--
-- TIME is read once, first, as the single script does: every entry on Redis's clock is
-- decided at that instant.

local t = redis.call('TIME')
local clock = tonumber(t[1]) + tonumber(t[2]) / 1000000
local data = ARGV[1]
local pos = 1
local replies = {}

for i = 1, #KEYS do
  local key = KEYS[i]
  local max_tokens, refill_rate, cost, now, ttl
  max_tokens, refill_rate, cost, now, ttl, pos = struct.unpack('<ddddBc0', data, pos)
  local explicit = now >= 0
  if not explicit then
    now = clock
  end

  local stored = redis.pcall('GET', key)
  if type(stored) == 'table' then
    replies[i] = { -1, stored.err or 'unreadable bucket' }
  else
    local tokens, last
    local expires = 0
    local size = stored and #stored
    if size == 20 then
      tokens, last, expires = struct.unpack('<ddI4', stored)
    elseif size == 16 then
      tokens, last = struct.unpack('<dd', stored)
    end
    if not (tokens and tokens >= 0 and tokens <= max_tokens and last >= 0
        and (last <= now or last - now <= max_tokens / refill_rate * 60 + 60)) then
      tokens = max_tokens
      last = now
      expires = 0
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
      replies[i] = { 0, 'inf', math.floor(current) }
    else
      local left = current
      if current >= cost then
        left = current - cost
      end
      if not explicit and expires - last >= (max_tokens - left) / (refill_rate / 60) + 30 then
        redis.call('SETRANGE', key, '0', struct.pack('<dd', left, last))
      else
        expires = 0
        if not explicit then
          expires = math.min(math.floor(now + tonumber(ttl)), 4294967295)
        end
        redis.call('SETEX', key, ttl, struct.pack('<ddI4', left, last, expires))
      end
      if current >= cost then
        replies[i] = math.floor(left)
      else
        replies[i] = { 0, string.format('%.17g', (last - now) + (cost - current) / (refill_rate / 60)),
          math.floor(current) }
      end
    end
  end
end

return replies
