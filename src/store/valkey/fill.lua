-- Stores a batch of entries, each unless an invalidation made it stale since its fill's
-- fence, and indexes each under its tags. Atomic, so no clear can slip between a check and
-- its write.
--
-- KEYS[1]     the namespace's purge record (the sequence of the last purge)
-- then, per entry: its key, then pairs for each of its tags: the tag's index (sorted set:
--             entry key -> expiry ms) and the tag's clear record
-- ARGV        per entry, four values: the encoded entry, TTL in milliseconds, the fence (the
--             invalidation sequence its lookup saw before the origin was called), its number
--             of tags
-- Returns one number per entry: 1 when stored, 0 when refused by the fence.
--
-- Every redis.call costs about a microsecond of Lua bridging on top of the command, and
-- fills run on every miss: one MGET reads every record the batch depends on, a new index is
-- touched twice (ZADD, PEXPIRE NX), an existing one four times. Needs Valkey 7.2+ or
-- Redis 7.0+ (PEXPIRE NX/GT).
local entries = #ARGV / 4

local records = { KEYS[1] }
local k = 2
for e = 0, entries - 1 do
  local tags = tonumber(ARGV[e * 4 + 4])
  for t = 0, tags - 1 do
    records[#records + 1] = KEYS[k + 2 + t * 2]
  end
  k = k + 1 + tags * 2
end
local seqs = redis.call('MGET', unpack(records))
local purged = tonumber(seqs[1]) or 0

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

local stored = {}
k = 2
local r = 2
for e = 0, entries - 1 do
  local ttl = tonumber(ARGV[e * 4 + 2])
  local fence = tonumber(ARGV[e * 4 + 3])
  local tags = tonumber(ARGV[e * 4 + 4])
  local entry = KEYS[k]
  local fresh = purged <= fence
  for t = 0, tags - 1 do
    if (tonumber(seqs[r + t]) or 0) > fence then
      fresh = false
    end
  end
  if fresh then
    redis.call('SET', entry, ARGV[e * 4 + 1], 'PX', ttl)
    for t = 0, tags - 1 do
      local index = KEYS[k + 1 + t * 2]
      redis.call('ZADD', index, now_ms + ttl, entry)
      -- A new index gets the entry's lifetime. One that already existed lives as long as
      -- its longest-lived member, and drops the members whose entries expired, so it never
      -- outgrows the live entries.
      if redis.call('PEXPIRE', index, ttl, 'NX') == 0 then
        redis.call('PEXPIRE', index, ttl, 'GT')
        redis.call('ZREMRANGEBYSCORE', index, '-inf', now_ms)
      end
    end
    stored[e + 1] = 1
  else
    stored[e + 1] = 0
  end
  r = r + tags
  k = k + 1 + tags * 2
end
return stored
