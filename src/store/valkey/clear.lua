#!lua flags=allow-oom
-- Clears tags, or purges the namespace, in O(tags): bumps the invalidation sequence and
-- records it as each tag's last clear (a purge raises the floor to it instead). Entries are
-- not searched for: every store checks an entry against these records when it is read.
-- Then publishes the change for near caches. Touches one key (the record set), so it runs
-- on one node of a cluster; allowed with memory full, since a clear that does not land
-- would leave stale entries served.
--
-- KEYS[1]  the record set (see sync.lua)
-- ARGV[1], ARGV[2]  the newest epoch and sequence the caller has seen (see sync.lua: a
--          set older than that lost clears, and starts over under a newer epoch)
-- ARGV[3]  the pub/sub channel ('' for none: a cluster's other copies of the records)
-- ARGV[4]  the most tag records kept: beyond it the oldest go and the floor rises to them
-- ARGV[5]  a random nonce below 2^20, for a new epoch
-- ARGV[6]  which copy of the records this is (see sync.lua)
-- ARGV[7]  n, the number of tags; -1 for a purge
-- ARGV[8 .. 7+n]      the tags' ids (8 bytes each)
-- ARGV[8+n .. 7+2n]   the tags, for the message
-- Returns { the records' epoch, the clear's sequence }.
local set = KEYS[1]
local high_epoch, high_seq = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('ZMSCORE', set, 'epoch', 'seq')
local epoch = tonumber(state[1])
if epoch and (epoch < high_epoch or epoch == high_epoch and (tonumber(state[2]) or 0) < high_seq) then
  redis.call('DEL', set)
  epoch = nil
end
if not epoch then
  local now = redis.call('TIME')
  local base = math.max(tonumber(now[1]) * 1000000 + tonumber(now[2]), high_epoch)
  epoch = (math.floor(base / 64) + 1 + tonumber(ARGV[5])) * 64 + tonumber(ARGV[6])
  redis.call('ZADD', set, epoch, 'epoch', 0, 'seq', 0, 'floor')
end
local seq = tonumber(redis.call('ZINCRBY', set, 1, 'seq'))
local n = tonumber(ARGV[7])
-- Printed as integers: Lua would print large numbers in exponent form.
local head = string.format('v2 %d %d ', epoch, seq)
if n < 0 then
  redis.call('ZADD', set, seq, 'floor')
  if ARGV[3] ~= '' then
    redis.call('PUBLISH', ARGV[3], head .. 'purge')
  end
  return { epoch, seq }
end
-- ZADD in slices: Lua's unpack has a stack limit.
for first = 1, n, 500 do
  local args = {}
  for i = first, math.min(first + 499, n) do
    args[#args + 1] = seq
    args[#args + 1] = ARGV[7 + i]
  end
  redis.call('ZADD', set, unpack(args))
end
local excess = redis.call('ZCARD', set) - 3 - tonumber(ARGV[4])
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
if ARGV[3] ~= '' then
  local tags = {}
  for i = 8 + n, 7 + 2 * n do
    tags[#tags + 1] = ARGV[i]
  end
  redis.call('PUBLISH', ARGV[3], head .. 'tags ' .. table.concat(tags, ' '))
end
return { epoch, seq }
