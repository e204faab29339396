-- Clears tags: bumps the namespace's invalidation sequence, records it as each tag's last
-- clear (so fills fenced before it are refused), deletes every entry the tag indexes, and
-- publishes the clear so every instance (and its near cache) drops the tags too.
--
-- KEYS[1]     the invalidation sequence
-- KEYS[2..]   pairs: a tag's index, the tag's clear record
-- ARGV[1]     the pub/sub channel
-- ARGV[2]     how long clear records live, in milliseconds (the fence window)
-- ARGV[3..]   the tags, in the order of KEYS (for the message)
-- Returns { sequence, entries removed }.
local seq = redis.call('INCR', KEYS[1])
local removed = 0
for i = 2, #KEYS, 2 do
  redis.call('SET', KEYS[i + 1], seq, 'PX', tonumber(ARGV[2]))
  local members = redis.call('ZRANGE', KEYS[i], 0, -1)
  -- DEL in slices: Lua's unpack has a stack limit.
  for j = 1, #members, 500 do
    removed = removed + redis.call('DEL', unpack(members, j, math.min(j + 499, #members)))
  end
  redis.call('DEL', KEYS[i])
end
local message = { 'v1', seq, 'tags' }
for i = 3, #ARGV do
  message[#message + 1] = ARGV[i]
end
redis.call('PUBLISH', ARGV[1], table.concat(message, ' '))
return { seq, removed }
