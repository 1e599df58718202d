-- Token buckets, compact layout: one all-or-nothing check over several buckets (the limits of
-- one request), as ratelimit_domain::token_bucket::step_all.
--
-- KEYS[i]     <bucket i key>:tb   as lua/token_bucket_compact.lua's KEYS[1]
-- ARGV[1]     now, as lua/token_bucket_multi.lua's ARGV[1]: "" for Redis TIME; one clock for
--             every bucket
-- ARGV[i+1]   bucket i's packed numbers and key lifetime, as lua/token_bucket_compact.lua's
--             ARGV[1] (CompactArgs; a cost above max_tokens arrives as +inf)
--
-- Reply: a flat array of three items per bucket, in order, as lua/token_bucket_multi.lua:
--          had (1|0), retry_after ("0", a %.17g decimal, or "inf"), remaining (floored)
--        or, when a bucket's key holds another type, the error "WRONGTYPE bucket <i> …" before
--        anything is written.
--
-- Phase 1 reads every bucket and steps it exactly as lua/token_bucket_compact.lua does. Phase 2
-- writes: if every bucket had its cost, each takes it; otherwise only the buckets that lacked
-- their cost are written (refilled, nothing taken; nothing for a cost above capacity). Each write
-- keeps or renews the key's lifetime exactly as the single script does. See docs/lua.md
-- ("Several limits in one check").

-- As lua/token_bucket_compact.lua (which says why each is exact), each global is read once and
-- neither math.floor, math.min nor tonumber on Redis's clock is called (a C call costs Redis a
-- few hundred instructions): a remaining count (>= 0) is replied as the number itself, which
-- Redis truncates to an integer, that is floors; math.min(a, b) is b if b < a, else a; the
-- floor of a finite x >= 0 is x - x % 1.
local call, rpcall = redis.call, redis.pcall
local struct = struct
local keys, argv = KEYS, ARGV
local n = #keys

local now
local clock = argv[1]
local explicit = clock and clock ~= ''
if explicit then
  now = tonumber(clock)
else
  local t = call('TIME')
  now = t[1] + t[2] / 1000000
end

-- Phase 1: every bucket's step, nothing written yet.
local buckets = {}
local all_had = true
for i = 1, n do
  local args = argv[i + 1]
  local max_tokens, refill_rate, cost = struct.unpack('<ddd', args)

  local tokens, last
  local expires = 0
  local stored = rpcall('GET', keys[i])
  if type(stored) == 'table' and stored.err then
    return redis.error_reply('WRONGTYPE bucket ' .. i .. ': ' .. stored.err)
  end
  local size = stored and #stored
  if size == 20 then
    tokens, last, expires = struct.unpack('<ddI4', stored)
  elseif size == 16 then
    tokens, last = struct.unpack('<dd', stored)
  end
  -- As lua/token_bucket_compact.lua: a missing, odd-sized or unusable bucket is full, as of now.
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
  local current = tokens + elapsed * refill_rate / 60
  if not (current < max_tokens) then
    current = max_tokens
  end
  if now > last then
    last = now
  end

  local never = cost ~= 0 and cost > max_tokens
  local had = cost == 0 or (not never and current >= cost)
  if not had then
    all_had = false
  end
  buckets[i] = { args = args, max_tokens = max_tokens, refill_rate = refill_rate, cost = cost,
    current = current, last = last, expires = expires, had = had, never = never }
end

-- Writes `left` tokens to bucket i, keeping the key's lifetime while it covers the moment the
-- bucket is full again with 30 s to spare, as lua/token_bucket_compact.lua.
local function write(i, b, left)
  if not explicit and b.expires - b.last >= (b.max_tokens - left) / (b.refill_rate / 60) + 30 then
    call('SETRANGE', keys[i], '0', struct.pack('<dd', left, b.last))
  else
    local ttl = string.sub(b.args, 25)
    local expires = 0
    if not explicit then
      expires = now + ttl
      expires = expires - expires % 1
      if 4294967295 < expires then
        expires = 4294967295
      end
    end
    call('SETEX', keys[i], ttl, struct.pack('<ddI4', left, b.last, expires))
  end
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
      reply[at], reply[at + 1], reply[at + 2] = 1, '0', left
    else
      -- A read, or had its cost while another bucket lacked its own: nothing taken or written.
      reply[at], reply[at + 1], reply[at + 2] = 1, '0', b.current
    end
  elseif b.never then
    reply[at], reply[at + 1], reply[at + 2] = 0, 'inf', b.current
  else
    write(i, b, b.current)
    -- Nothing refills until now reaches last (0 unless a clock went back), then the refill.
    reply[at] = 0
    reply[at + 1] = string.format('%.17g',
      (b.last - now) + (b.cost - b.current) / (b.refill_rate / 60))
    reply[at + 2] = b.current
  end
end
return reply
