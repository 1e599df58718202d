-- Token buckets, two-key layout: gives back what an earlier allowed check took, on a Redis
-- Cluster where the limits of one request live in several slots and another slot refused
-- (docs/lua.md, "Several limits in one check"). Not used on a single Redis.
--
-- KEYS[2i-1]  <bucket i key>:tokens
-- KEYS[2i]    <bucket i key>:time
-- ARGV[3i-2]  max_tokens of bucket i (integer, decimal digits)
-- ARGV[3i-1]  refill_rate of bucket i (tokens per minute, decimal)
-- ARGV[3i]    tokens to give back (the cost taken; integer, decimal digits)
--
-- Reply: a flat array, per bucket, of the whole tokens (floored) it holds afterwards.
--
-- Each bucket gets min(max_tokens, tokens + cost); its time is left as it is, so the refill goes
-- on from where it was. A missing bucket, or one that no step could have written, reads as full
-- anyway: it is left alone and reported as max_tokens. A key of another type is an error.

local reply = {}
for i = 1, #KEYS / 2 do
  local max_tokens = tonumber(ARGV[3 * i - 2])
  local refill_rate = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local tokens = tonumber(redis.call('GET', KEYS[2 * i - 1]))
  local last = tonumber(redis.call('GET', KEYS[2 * i]))
  if tokens and last and tokens >= 0 and tokens <= max_tokens and last >= 0 then
    tokens = math.min(max_tokens, tokens + cost)
    local ttl = math.ceil(max_tokens / refill_rate * 60) + 60
    redis.call('SET', KEYS[2 * i - 1], string.format('%.17g', tokens), 'EX', ttl)
    reply[i] = math.floor(tokens)
  else
    reply[i] = math.floor(max_tokens)
  end
end
return reply
