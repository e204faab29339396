#!lua flags=allow-oom
-- Clears tags in O(tags): bumps the invalidation sequence and records it as each tag's last
-- clear. Entries are not searched for: every store checks an entry's tags against these
-- records when it is read. Then publishes the clear for near caches.
-- Touches one key (the record set), so it runs on one node of a cluster; allowed with
-- memory full, since a clear that does not land would leave stale entries served.
--
-- KEYS[1]  the record set (see sync.lua)
-- ARGV[1]  the pub/sub channel
-- ARGV[2]  the epoch to start with if the set is missing
-- ARGV[3]  the most tag records kept: beyond it the oldest go and the floor rises to them
-- ARGV[4]  n, the number of tags
-- ARGV[5 .. 4+n]      the tags' ids (8 bytes each)
-- ARGV[5+n .. 4+2n]   the tags, for the message
-- Returns { the records' epoch, the clear's sequence }.
local set = KEYS[1]
local epoch = redis.call('ZSCORE', set, 'epoch')
if not epoch then
  redis.call('ZADD', set, ARGV[2], 'epoch', 0, 'seq', 0, 'floor')
  epoch = ARGV[2]
end
epoch = tonumber(epoch)
local seq = tonumber(redis.call('ZINCRBY', set, 1, 'seq'))
local n = tonumber(ARGV[4])
-- ZADD in slices: Lua's unpack has a stack limit.
for first = 1, n, 500 do
  local args = {}
  for i = first, math.min(first + 499, n) do
    args[#args + 1] = seq
    args[#args + 1] = ARGV[4 + i]
  end
  redis.call('ZADD', set, unpack(args))
end
local excess = redis.call('ZCARD', set) - 3 - tonumber(ARGV[3])
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
-- Printed as integers: Lua would print large numbers in exponent form.
local message = { 'v2', string.format('%d', epoch), string.format('%d', seq), 'tags' }
for i = 5 + n, 4 + 2 * n do
  message[#message + 1] = ARGV[i]
end
redis.call('PUBLISH', ARGV[1], table.concat(message, ' '))
return { epoch, seq }
