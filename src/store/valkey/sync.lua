#!lua flags=allow-oom
-- Reads the namespace's clear records for a connection's mirror: everything changed since
-- the state the caller knows, or all of it when the caller knows another epoch (or none).
-- A missing record set (never made, evicted, flushed, lost in a restart) is made anew
-- under a new epoch: entries of any earlier epoch are dead from then on. So is one that is
-- older than the newest state the caller has seen (an older epoch, or the same epoch with a
-- lower sequence): a restart from an older snapshot, or a failover to a replica that missed
-- the last clears, lost clears that entries may depend on. Epochs only grow, and never
-- repeat: a new one is the server's clock in microseconds, or the newest the caller has
-- seen if that is later, moved up by a random nonce (two callers with the same view make
-- different epochs). Writing under `noeviction` with memory full is allowed: the set is small
-- and correctness needs it.
--
-- KEYS[1]  the record set (sorted set: 'epoch' -> epoch, 'seq' -> invalidation sequence,
--          'floor' -> the floor, 8-byte tag id -> sequence of the tag's last clear)
-- ARGV[1], ARGV[2]  the newest epoch and sequence the caller has seen
-- ARGV[3], ARGV[4]  the epoch (0: none) and sequence the caller's mirror holds
-- ARGV[5]  a random nonce below 2^20, for a new epoch
-- ARGV[6]  which copy of the records this is (0 on a single server; on a cluster, one of
--          the copies): a new epoch is this modulo 64, so two copies never share one
-- Returns { epoch, what, { member, score, ... } }: `what` is 0 when the list holds what
-- changed since the caller's state, 1 when it is the whole (new) set, and 2 when the caller
-- knows another epoch and must read the whole set itself with a plain ZRANGE: converting
-- thousands of members to a script's reply would hold the server several milliseconds.
-- Epochs are compared and returned as numbers: servers differ in how they print a score.
local high_epoch, high_seq = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('ZMSCORE', KEYS[1], 'epoch', 'seq')
local epoch = tonumber(state[1])
if epoch and (epoch < high_epoch or epoch == high_epoch and (tonumber(state[2]) or 0) < high_seq) then
  redis.call('DEL', KEYS[1])
  epoch = nil
end
if not epoch then
  local now = redis.call('TIME')
  local base = math.max(tonumber(now[1]) * 1000000 + tonumber(now[2]), high_epoch)
  epoch = (math.floor(base / 64) + 1 + tonumber(ARGV[5])) * 64 + tonumber(ARGV[6])
  redis.call('ZADD', KEYS[1], epoch, 'epoch', 0, 'seq', 0, 'floor')
  return { epoch, 1, { 'seq', '0', 'floor', '0' } }
end
if epoch == tonumber(ARGV[3]) then
  return { epoch, 0, redis.call('ZRANGE', KEYS[1], '(' .. ARGV[4], '+inf', 'BYSCORE', 'WITHSCORES') }
end
return { epoch, 2, {} }
