-- Token bucket, two-key layout (KeyLayout::TwoKeys, the default; the original service's keys):
-- one atomic check-and-consume step.
--
-- KEYS[1]  <bucket key>:tokens   tokens in the bucket (decimal string)
-- KEYS[2]  <bucket key>:time     when the bucket was last updated (seconds, decimal string)
-- ARGV[1]  max_tokens            bucket capacity (integer, decimal digits, at most 2^53)
-- ARGV[2]  refill_rate           tokens added per minute (decimal)
-- ARGV[3]  cost                  tokens to take (integer, decimal digits); 0 only reads
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
-- A missing (or half-missing) bucket is a full one, as of now. So is one that no step could have
-- written: tokens outside 0..max_tokens, or a time that is NaN (which fails every comparison),
-- before the epoch, or further ahead of now than the refill time plus 60 s (docs/lua.md).
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
-- The stored time never moves backwards: a caller whose clock is behind earns nothing.
if now > last then
  last = now
end

if cost == 0 then
  return { 1, '0', math.floor(current) }
end
-- A cost above capacity waits for ever and takes nothing, so nothing is written. Decided exactly:
-- the doubles of two integers at most 2^53 apart compare like the integers, except that a cost
-- above 2^53 may round to max_tokens = 2^53; the digits tell those apart.
if cost > max_tokens or (cost == max_tokens and ARGV[3] ~= ARGV[1]) then
  return { 0, 'inf', math.floor(current) }
end

-- %.17g keeps every bit of a double, so the stored value reads back exactly.
local function decimal(x)
  return string.format('%.17g', x)
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
-- Nothing refills until now reaches last (0 unless a clock went back), then the refill.
return { 0, decimal((last - now) + (cost - current) / (refill_rate / 60)), math.floor(current) }
