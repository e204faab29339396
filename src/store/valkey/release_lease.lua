-- Releases a fetch lease if it is still ours (another instance may hold it since ours
-- expired).
--
-- KEYS[1]  the lease key
-- ARGV[1]  our token
-- Returns 1 when released, 0 when the lease was not ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
