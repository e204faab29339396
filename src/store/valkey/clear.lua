#!lua flags=allow-oom
-- Clears tags, or purges the namespace, in O(tags): bumps the invalidation sequence and
-- records it as each tag's last clear (a purge raises the floor to it instead). Entries are
-- not searched for: every store checks an entry against these records when it is read.
-- Then publishes the change for near caches. Touches one key (the record set), so it runs
-- on one node of a cluster; allowed with memory full, since a clear that does not land
-- would leave stale entries served.
--
-- KEYS[1]  the record set (see sync.lua)
-- ARGV[1]  the epoch to start with if the set is missing or rolled back
-- ARGV[2], ARGV[3]  the highest epoch and sequence the caller has seen (see sync.lua)
-- ARGV[4]  the pub/sub channel
-- ARGV[5]  the most tag records kept: beyond it the oldest go and the floor rises to them
-- ARGV[6]  n, the number of tags; -1 for a purge
-- ARGV[7 .. 6+n]      the tags' ids (8 bytes each)
-- ARGV[7+n .. 6+2n]   the tags, for the message
-- Returns { the records' epoch, the clear's sequence }.
local set = KEYS[1]
local state = redis.call('ZMSCORE', set, 'epoch', 'seq')
local epoch = tonumber(state[1])
-- Same epoch, lower sequence: a snapshot or a lagging replica lost clears. Start over.
if epoch and epoch == tonumber(ARGV[2]) and (tonumber(state[2]) or 0) < tonumber(ARGV[3]) then
  redis.call('DEL', set)
  epoch = nil
end
if not epoch then
  epoch = tonumber(ARGV[1])
  redis.call('ZADD', set, epoch, 'epoch', 0, 'seq', 0, 'floor')
end
local seq = tonumber(redis.call('ZINCRBY', set, 1, 'seq'))
local n = tonumber(ARGV[6])
-- Printed as integers: Lua would print large numbers in exponent form.
local head = string.format('v2 %d %d ', epoch, seq)
if n < 0 then
  redis.call('ZADD', set, seq, 'floor')
  redis.call('PUBLISH', ARGV[4], head .. 'purge')
  return { epoch, seq }
end
-- ZADD in slices: Lua's unpack has a stack limit.
for first = 1, n, 500 do
  local args = {}
  for i = first, math.min(first + 499, n) do
    args[#args + 1] = seq
    args[#args + 1] = ARGV[6 + i]
  end
  redis.call('ZADD', set, unpack(args))
end
local excess = redis.call('ZCARD', set) - 3 - tonumber(ARGV[5])
if excess > 0 then
  -- The lowest scores: the oldest records, and maybe 'floor' (skipped by its length).
  local low = redis.call('ZRANGE', set, 0, excess + 1, 'WITHSCORES')
  local floor = tonumber(redis.call('ZSCORE', set, 'floor')) or 0
  local gone = {}
  for i = 1, #low, 2 do
    if #gone < excess and #low[i] == 8 then
      gone[#gone + 1] = low[i]
      floor = math.max(floor, tonumber(low[i + 1]))
    end
  end
  if #gone > 0 then
    redis.call('ZREM', set, unpack(gone))
    redis.call('ZADD', set, floor, 'floor')
  end
end
local tags = {}
for i = 7 + n, 6 + 2 * n do
  tags[#tags + 1] = ARGV[i]
end
redis.call('PUBLISH', ARGV[4], head .. 'tags ' .. table.concat(tags, ' '))
return { epoch, seq }
