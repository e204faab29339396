#!lua flags=allow-oom
-- Reads the namespace's clear records for a connection's mirror: everything changed since
-- the state the caller knows, or all of it when the caller knows another epoch (or none).
-- A missing record set (never made, evicted, flushed, lost in a restart) is made anew
-- under a fresh epoch: entries of any earlier epoch are dead from then on. Writing under
-- `noeviction` with memory full is allowed: the set is small and correctness needs it.
--
-- KEYS[1]  the record set (sorted set: 'epoch' -> epoch, 'seq' -> invalidation sequence,
--          'floor' -> the floor, 8-byte tag id -> sequence of the tag's last clear)
-- ARGV[1]  the epoch the caller knows (0: none)
-- ARGV[2]  the sequence the caller knows
-- ARGV[3]  the epoch to start with if the set is missing
-- Returns { epoch, 1 if the list is whole (else only what changed), { member, score, ... } }.
local epoch = redis.call('ZSCORE', KEYS[1], 'epoch')
if not epoch then
  redis.call('ZADD', KEYS[1], ARGV[3], 'epoch', 0, 'seq', 0, 'floor')
  return { tonumber(ARGV[3]), 1, { 'seq', '0', 'floor', '0' } }
end
-- Compared and returned as numbers: servers differ in how they print a score.
epoch = tonumber(epoch)
if epoch == tonumber(ARGV[1]) then
  return { epoch, 0, redis.call('ZRANGE', KEYS[1], '(' .. ARGV[2], '+inf', 'BYSCORE', 'WITHSCORES') }
end
return { epoch, 1, redis.call('ZRANGE', KEYS[1], '-inf', '+inf', 'BYSCORE', 'WITHSCORES') }
