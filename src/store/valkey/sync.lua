#!lua flags=allow-oom
-- Reads the namespace's clear records for a connection's mirror: everything changed since
-- the state the caller knows, or all of it when the caller knows another epoch (or none).
-- A missing record set (never made, evicted, flushed, lost in a restart) is made anew
-- under a fresh epoch: entries of any earlier epoch are dead from then on. So is one whose
-- sequence is below the highest the caller has seen in the same epoch: a restart from an
-- older snapshot, or a failover to a replica that missed the last clears, lost clears that
-- entries may depend on. Writing under `noeviction` with memory full is allowed: the set is
-- small and correctness needs it.
--
-- KEYS[1]  the record set (sorted set: 'epoch' -> epoch, 'seq' -> invalidation sequence,
--          'floor' -> the floor, 8-byte tag id -> sequence of the tag's last clear)
-- ARGV[1]  the epoch to start with if the set is missing or rolled back
-- ARGV[2], ARGV[3]  the highest epoch and sequence the caller has seen
-- ARGV[4], ARGV[5]  the epoch (0: none) and sequence the caller's mirror holds
-- Returns { epoch, what, { member, score, ... } }: `what` is 0 when the list holds what
-- changed since the caller's state, 1 when it is the whole (new) set, and 2 when the caller
-- knows another epoch and must read the whole set itself with a plain ZRANGE: converting
-- thousands of members to a script's reply would hold the server several milliseconds.
-- Epochs are compared and returned as numbers: servers differ in how they print a score.
local state = redis.call('ZMSCORE', KEYS[1], 'epoch', 'seq')
local epoch = tonumber(state[1])
if epoch and epoch == tonumber(ARGV[2]) and (tonumber(state[2]) or 0) < tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
  epoch = nil
end
if not epoch then
  redis.call('ZADD', KEYS[1], ARGV[1], 'epoch', 0, 'seq', 0, 'floor')
  return { tonumber(ARGV[1]), 1, { 'seq', '0', 'floor', '0' } }
end
if epoch == tonumber(ARGV[4]) then
  return { epoch, 0, redis.call('ZRANGE', KEYS[1], '(' .. ARGV[5], '+inf', 'BYSCORE', 'WITHSCORES') }
end
return { epoch, 2, {} }
