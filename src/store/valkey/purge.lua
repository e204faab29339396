#!lua flags=allow-oom
-- Purges the namespace in O(1): raises the floor to a new sequence, so every entry filled
-- before it is dead (each store compares an entry's fence with the floor on read); the dead
-- entries are left to expire or be evicted. Allowed with memory full, like a clear.
--
-- KEYS[1]  the record set (see sync.lua)
-- ARGV[1]  the pub/sub channel
-- ARGV[2]  the epoch to start with if the set is missing
-- Returns { the records' epoch, the purge's sequence }.
local set = KEYS[1]
local epoch = redis.call('ZSCORE', set, 'epoch')
if not epoch then
  redis.call('ZADD', set, ARGV[2], 'epoch', 0, 'seq', 0, 'floor')
  epoch = ARGV[2]
end
epoch = tonumber(epoch)
local seq = tonumber(redis.call('ZINCRBY', set, 1, 'seq'))
redis.call('ZADD', set, seq, 'floor')
redis.call('PUBLISH', ARGV[1], string.format('v2 %d %d purge', epoch, seq))
return { epoch, seq }
