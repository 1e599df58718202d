-- Token bucket, compact layout: one key per bucket holding both numbers.
--
-- KEYS[1]  <bucket key>:tb       struct.pack('dd', tokens, last): 16 bytes
-- ARGV[1]  struct.pack('<ddd', max_tokens, refill_rate, cost): 24 bytes, the three numbers of
--          lua/token_bucket.lua as little-endian doubles
-- ARGV[2]  now                   as lua/token_bucket.lua's ARGV[4] ("" for Redis TIME)
-- ARGV[3]  ttl                   key lifetime in whole seconds, ceil(max_tokens / refill_rate
--                                * 60) + 60, computed by the caller
--
-- Reply:   allowed  → remaining (integer, floored), a bare integer
--          denied   → { 0, retry_after, remaining }, as lua/token_bucket.lua
--
-- Same arithmetic as lua/token_bucket.lua and ratelimit_domain::token_bucket::step, operation
-- for operation, so every layout reaches bit-identical decisions. What makes it cheaper for
-- Redis (docs/lua.md has the measurements): one GET and one SETEX of a 16-byte binary value
-- instead of two of each with decimal formatting, the numbers passed in binary (one unpack
-- instead of three decimal parses), the lifetime passed in as text rather than computed and
-- formatted here, and a bare integer reply on the common path instead of a table.

local max_tokens, refill_rate, cost = struct.unpack('<ddd', ARGV[1])

local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[2])
end

local tokens, last
local stored = redis.call('GET', KEYS[1])
if stored and #stored == 16 then
  tokens, last = struct.unpack('dd', stored)
else
  -- A missing bucket is a full one, as of now.
  tokens = max_tokens
  last = now
end

local elapsed = now - last
if elapsed < 0 then
  elapsed = 0
end
local current = math.min(max_tokens, tokens + elapsed * refill_rate / 60)
-- The stored time never moves backwards: a caller whose clock is behind earns nothing.
if now > last then
  last = now
end

if cost == 0 then
  return math.floor(current)
end

if current >= cost then
  local left = current - cost
  redis.call('SETEX', KEYS[1], ARGV[3], struct.pack('dd', left, last))
  return math.floor(left)
end

redis.call('SETEX', KEYS[1], ARGV[3], struct.pack('dd', current, last))
if cost > max_tokens then
  return { 0, 'inf', math.floor(current) }
end
return { 0, string.format('%.17g', (cost - current) / (refill_rate / 60)), math.floor(current) }
