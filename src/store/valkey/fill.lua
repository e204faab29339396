-- Stores an entry unless an invalidation made it stale since the fill's fence, and indexes
-- it under each of its tags. Atomic, so no clear can slip between the check and the write.
--
-- KEYS[1]     the entry key
-- KEYS[2]     the namespace's purge record (the sequence of the last purge)
-- KEYS[3..]   pairs: a tag's index (sorted set: entry key -> expiry ms), the tag's clear record
-- ARGV[1]     the encoded entry
-- ARGV[2]     TTL in milliseconds
-- ARGV[3]     the fence: the invalidation sequence the lookup saw before the origin was called
-- Returns 1 when stored, 0 when refused by the fence.
local fence = tonumber(ARGV[3])
local ttl = tonumber(ARGV[2])

if (tonumber(redis.call('GET', KEYS[2]) or '0') or 0) > fence then
  return 0
end
for i = 3, #KEYS, 2 do
  if (tonumber(redis.call('GET', KEYS[i + 1]) or '0') or 0) > fence then
    return 0
  end
end

redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
for i = 3, #KEYS, 2 do
  -- Members whose entries expired leave the index here, so it never outgrows the live entries.
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now_ms)
  redis.call('ZADD', KEYS[i], now_ms + ttl, KEYS[1])
  -- The index lives as long as its longest-lived member.
  if redis.call('PTTL', KEYS[i]) < ttl then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return 1
