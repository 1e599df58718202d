-- Token buckets, compact layout: gives back what an earlier allowed check took, on a Redis
-- Cluster where the limits of one request live in several slots and another slot refused
-- (docs/lua.md, "Several limits in one check"). Not used on a single Redis.
--
-- KEYS[i]     <bucket i key>:tb
-- ARGV[i]     bucket i's packed numbers, as lua/token_bucket_compact.lua's ARGV[1] (CompactArgs),
--             whose cost is the tokens to give back
--
-- Reply: a flat array, per bucket, of the whole tokens (floored) it holds afterwards.
--
-- Each bucket gets min(max_tokens, tokens + cost) written in place (SETRANGE): its time and
-- recorded expiry are left as they are. More tokens make the bucket full again sooner, so the
-- key's lifetime still covers it. A missing bucket, or one that no step could have written,
-- reads as full anyway: it is left alone and reported as max_tokens.

local reply = {}
for i = 1, #KEYS do
  local max_tokens, _, cost = struct.unpack('<ddd', ARGV[i])
  local stored = redis.call('GET', KEYS[i])
  local size = stored and #stored
  local tokens, last
  if size == 20 or size == 16 then
    tokens, last = struct.unpack('<dd', stored)
  end
  if tokens and tokens >= 0 and tokens <= max_tokens and last >= 0 then
    tokens = math.min(max_tokens, tokens + cost)
    redis.call('SETRANGE', KEYS[i], '0', struct.pack('<d', tokens))
    reply[i] = math.floor(tokens)
  else
    reply[i] = math.floor(max_tokens)
  end
end
return reply
