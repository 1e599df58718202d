-- Token bucket, compact layout (KeyLayout::Compact): one key per bucket holding both numbers
-- and its own expiry.
--
-- KEYS[1]  <bucket key>:tb   struct.pack('<ddI4', tokens, last, expires): 20 bytes, where
--                            expires is when Redis drops the key, in whole seconds (floored) of
--                            Redis's clock, or 0 when unknown
-- ARGV[1]  struct.pack('<ddd', max_tokens, refill_rate, cost) followed by the key lifetime as
--          decimal text: ceil(max_tokens / refill_rate * 60) + 60 seconds, computed by the
--          caller (CompactArgs, crates/infrastructure-redis/src/script.rs). A cost above
--          max_tokens is decided by the caller on the integers and sent as +inf, so that
--          rounding never blurs it.
-- ARGV[2]  now, optional, as lua/token_bucket.lua's ARGV[4]; absent or "" for Redis TIME
--
-- Reply:   allowed  → remaining (integer, floored), a bare integer
--          denied   → { 0, retry_after, remaining }, as lua/token_bucket.lua
--
-- Same arithmetic as lua/token_bucket.lua and ratelimit_domain::token_bucket::step, operation
-- for operation, so every layout reaches bit-identical decisions.
--
-- The key's lifetime is only renewed when it must be. A bucket that has refilled to full is
-- the same as a missing one (a missing bucket reads as full, as of now), so the key only has to
-- outlive the moment its bucket is full again: `last` plus the refill time. While the recorded
-- expiry covers that with 30 s to spare, a write overwrites the two numbers in place (SETRANGE)
-- and keeps the expiry; otherwise it rewrites the whole value with a fresh lifetime (SETEX). An
-- explicit `now` is another clock than the one Redis expires keys by, so with one the lifetime
-- is always renewed and no expiry is recorded. docs/lua.md has the limits, docs/performance.md
-- ("Compact script") what each choice here saves.

-- Every call of a C function (redis.call, struct.*, math.*, tonumber) costs Redis a few hundred
-- instructions besides its work, and every read of a global a table lookup, so the step below
-- reads each global at most once and calls neither math.floor nor math.min, nor tonumber on
-- Redis's clock:
-- - a remaining count is replied as the number itself: Redis turns a Lua number into an integer
--   reply by a C cast, which truncates, and truncating a number >= 0 is flooring it (every
--   remaining count is >= 0: max_tokens >= 1, refill_rate > 0, stored tokens >= 0);
-- - math.min(a, b) returns b if b < a, else a: written out as that comparison;
-- - math.floor(x) of a finite x >= 0 is x - x % 1: Lua 5.1 computes a % b as a - floor(a / b) * b,
--   so x % 1 is x - floor(x), exact in doubles (floor(x) is 0 or within a factor 2 of x), and
--   subtracting it from x leaves floor(x) exactly;
-- - arithmetic on a numeric string converts it as tonumber does (the same C conversion).
local call = redis.call
local struct = struct
local key = KEYS[1]
local args = ARGV[1]
local max_tokens, refill_rate, cost = struct.unpack('<ddd', args)

local now
local clock = ARGV[2]
local explicit = clock and clock ~= ''
if explicit then
  now = tonumber(clock)
else
  local t = call('TIME')
  now = t[1] + t[2] / 1000000
end

local tokens, last
-- 0: no expiry recorded, so the next write renews it.
local expires = 0
local stored = call('GET', key)
local size = stored and #stored
if size == 20 then
  tokens, last, expires = struct.unpack('<ddI4', stored)
elseif size == 16 then
  -- The earlier 16-byte value, without a recorded expiry: still read, so upgrading needs no
  -- migration; the next write adds the expiry.
  tokens, last = struct.unpack('<dd', stored)
end
-- A missing bucket is a full one, as of now. So is a value of another size, and one that no step
-- could have written (junk bytes read as doubles): as lua/token_bucket.lua, and its expiry is
-- renewed by the next write.
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
-- The stored time never moves backwards: a caller whose clock is behind earns nothing.
if now > last then
  last = now
end

if cost == 0 then
  return current
end
-- A cost above capacity (+inf from the caller) waits for ever and takes nothing: no write.
if cost > max_tokens then
  return { 0, 'inf', current }
end

local left = current
if current >= cost then
  left = current - cost
end

-- The bucket is full again (and the key may go) `refill time` seconds after `last`, which is
-- never before now.
if not explicit and expires - last >= (max_tokens - left) / (refill_rate / 60) + 30 then
  call('SETRANGE', key, '0', struct.pack('<dd', left, last))
else
  local ttl = string.sub(args, 25)
  expires = 0
  if not explicit then
    expires = now + ttl
    expires = expires - expires % 1
    if 4294967295 < expires then
      expires = 4294967295
    end
  end
  call('SETEX', key, ttl, struct.pack('<ddI4', left, last, expires))
end

if current >= cost then
  return left
end
-- Nothing refills until now reaches last (0 unless a clock went back), then the refill.
return { 0, string.format('%.17g', (last - now) + (cost - current) / (refill_rate / 60)), current }
