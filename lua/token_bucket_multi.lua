-- Token buckets, two-key layout: one all-or-nothing check over several buckets (the limits of
-- one request), as ratelimit_domain::token_bucket::step_all.
--
-- KEYS[2i-1]  <bucket i key>:tokens  as lua/token_bucket.lua's KEYS[1]
-- KEYS[2i]    <bucket i key>:time    as lua/token_bucket.lua's KEYS[2]
-- ARGV[1]     now                    seconds since the Unix epoch (decimal), or "" for Redis TIME;
--                                    one clock for every bucket
-- ARGV[3i-1]  max_tokens of bucket i (integer, decimal digits, at most 2^53)
-- ARGV[3i]    refill_rate of bucket i (tokens per minute, decimal)
-- ARGV[3i+1]  cost of bucket i (integer, decimal digits); 0 only reads
--
-- Reply: a flat array of three items per bucket, in order:
--          had (1 when the bucket held its cost, else 0), retry_after (decimal string of seconds,
--          "0" when it had its cost, "inf" when cost > max_tokens), remaining (integer, floored)
--        or, when a bucket's key holds another type, the error "WRONGTYPE bucket <i> …" before
--        anything is written.
--
-- Phase 1 reads every bucket and steps it exactly as lua/token_bucket.lua does, operation for
-- operation. Phase 2 writes: if every bucket had its cost, each takes it, as the single script's
-- allowed step; otherwise only the buckets that lacked their cost are written, as the single
-- script's denial (refilled, nothing taken; nothing for a cost above capacity), and the others
-- are left untouched. See docs/lua.md ("Several limits in one check").

local n = #KEYS / 2

local now
if ARGV[1] == nil or ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end

-- Reads a key, turning a key of another type into an error that names the bucket.
local function get(i, key)
  local value = redis.pcall('GET', key)
  if type(value) == 'table' and value.err then
    return nil, redis.error_reply('WRONGTYPE bucket ' .. i .. ': ' .. value.err)
  end
  return value
end

-- Phase 1: every bucket's step, nothing written yet.
local buckets = {}
local all_had = true
for i = 1, n do
  local max_tokens = tonumber(ARGV[3 * i - 1])
  local refill_rate = tonumber(ARGV[3 * i])
  local cost = tonumber(ARGV[3 * i + 1])

  local raw_tokens, err = get(i, KEYS[2 * i - 1])
  if err then
    return err
  end
  local raw_last
  raw_last, err = get(i, KEYS[2 * i])
  if err then
    return err
  end
  local tokens = tonumber(raw_tokens)
  local last = tonumber(raw_last)
  -- As lua/token_bucket.lua: a missing, half-missing or unusable bucket is full, as of now.
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

  -- never: a cost above capacity, decided exactly as lua/token_bucket.lua does.
  local never = cost ~= 0
    and (cost > max_tokens or (cost == max_tokens and ARGV[3 * i + 1] ~= ARGV[3 * i - 1]))
  local had = cost == 0 or (not never and current >= cost)
  if not had then
    all_had = false
  end
  buckets[i] = { max_tokens = max_tokens, refill_rate = refill_rate, cost = cost,
    current = current, last = last, had = had, never = never }
end

-- %.17g keeps every bit of a double, so the stored value reads back exactly.
local function decimal(x)
  return string.format('%.17g', x)
end

local function write(i, b, tokens)
  local ttl = math.ceil(b.max_tokens / b.refill_rate * 60) + 60
  redis.call('SET', KEYS[2 * i - 1], decimal(tokens), 'EX', ttl)
  redis.call('SET', KEYS[2 * i], decimal(b.last), 'EX', ttl)
end

-- Phase 2.
local reply = {}
for i = 1, n do
  local b = buckets[i]
  local at = 3 * i - 2
  if b.had then
    if all_had and b.cost ~= 0 then
      local left = b.current - b.cost
      write(i, b, left)
      reply[at], reply[at + 1], reply[at + 2] = 1, '0', math.floor(left)
    else
      -- A read, or had its cost while another bucket lacked its own: nothing taken or written.
      reply[at], reply[at + 1], reply[at + 2] = 1, '0', math.floor(b.current)
    end
  elseif b.never then
    reply[at], reply[at + 1], reply[at + 2] = 0, 'inf', math.floor(b.current)
  else
    write(i, b, b.current)
    -- Nothing refills until now reaches last (0 unless a clock went back), then the refill.
    reply[at] = 0
    reply[at + 1] = decimal((b.last - now) + (b.cost - b.current) / (b.refill_rate / 60))
    reply[at + 2] = math.floor(b.current)
  end
end
return reply
