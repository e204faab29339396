-- Purges the whole namespace in O(1): every entry filled before this sequence is dead (the
-- lookup compares the entry's fence with the purge record) and is left to expire.
--
-- KEYS[1]  the invalidation sequence
-- KEYS[2]  the namespace's purge record
-- ARGV[1]  the pub/sub channel
-- Returns the sequence of the purge.
local seq = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2], seq)
redis.call('PUBLISH', ARGV[1], 'v1 ' .. seq .. ' purge')
return seq
