-- Token bucket, compact layout: one key per bucket holding both numbers.
--
-- KEYS[1]  <bucket key>:tb       struct.pack('dd', tokens, last): 16 bytes
-- ARGV[1..4] and the reply: exactly as lua/token_bucket.lua (see docs/lua.md).
--
-- Same arithmetic as lua/token_bucket.lua and ratelimit_domain::token_bucket::step, operation
-- for operation, so every layout reaches bit-identical decisions; only the storage differs:
-- one GET and one SET of a binary value instead of two of each plus decimal formatting.

local max_tokens = tonumber(ARGV[1])
local refill_rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])

local now
if ARGV[4] == nil or ARGV[4] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[4])
end

local tokens, last
local stored = redis.call('GET', KEYS[1])
if stored and #stored == 16 then
  tokens, last = struct.unpack('dd', stored)
else
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
  return { 1, '0', math.floor(current) }
end

local ttl = math.ceil(max_tokens / refill_rate * 60) + 60

if current >= cost then
  local left = current - cost
  redis.call('SET', KEYS[1], struct.pack('dd', left, last), 'EX', ttl)
  return { 1, '0', math.floor(left) }
end

redis.call('SET', KEYS[1], struct.pack('dd', current, last), 'EX', ttl)
if cost > max_tokens then
  return { 0, 'inf', math.floor(current) }
end
return { 0, string.format('%.17g', (cost - current) / (refill_rate / 60)), math.floor(current) }
