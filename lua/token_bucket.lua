-- Token bucket: one atomic check-and-consume step.
--
-- KEYS[1]  <bucket key>:tokens   tokens in the bucket (decimal string)
-- KEYS[2]  <bucket key>:time     when the bucket was last updated (seconds, decimal string)
-- ARGV[1]  max_tokens            bucket capacity (integer)
-- ARGV[2]  refill_rate           tokens added per minute (decimal)
-- ARGV[3]  cost                  tokens to take; 0 only reads
-- ARGV[4]  now                   seconds since the Unix epoch (decimal), or "" for Redis TIME
--
-- Reply: { allowed (0|1), retry_after (decimal string of seconds, "0" when allowed,
--          "inf" when cost > max_tokens), remaining (integer, floored) }
--
-- The arithmetic mirrors ratelimit_domain::token_bucket::step operation for operation, so
-- that the Redis and memory stores reach bit-identical decisions. See docs/lua.md.

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

local tokens = tonumber(redis.call('GET', KEYS[1]))
local last = tonumber(redis.call('GET', KEYS[2]))
if tokens == nil or last == nil then
  -- A missing (or half-missing) bucket is a full one, as of now.
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

-- %.17g keeps every bit of a double, so the stored value reads back exactly.
local function decimal(x)
  return string.format('%.17g', x)
end

if cost == 0 then
  return { 1, '0', math.floor(current) }
end

local ttl = math.ceil(max_tokens / refill_rate * 60) + 60

if current >= cost then
  local left = current - cost
  redis.call('SET', KEYS[1], decimal(left), 'EX', ttl)
  redis.call('SET', KEYS[2], decimal(last), 'EX', ttl)
  return { 1, '0', math.floor(left) }
end

redis.call('SET', KEYS[1], decimal(current), 'EX', ttl)
redis.call('SET', KEYS[2], decimal(last), 'EX', ttl)
if cost > max_tokens then
  return { 0, 'inf', math.floor(current) }
end
return { 0, decimal((cost - current) / (refill_rate / 60)), math.floor(current) }
