-- Take over follow-ups nobody runs: accepted deletions whose job is still pending and that are parked (no
-- follower; scored as stale at once) or whose follower (the record's owner) has no heartbeat any more.
-- Oldest first, so parked work and dead workers' work are taken in the order they were left.
-- KEYS[1]  the following sorted set (members: ledger keys)
-- ARGV[1]  heartbeat key prefix, ARGV[2] owner id of the adopting worker, ARGV[3] most to adopt
-- ARGV[4]  look only at members scored before this (Unix seconds), ARGV[5] now (Unix seconds)
-- Returns a flat list {key, project_id, backup_id, job_id, status, request_id, ...} of adopted records
-- ('' for a missing field). Members already finished, or expired, are dropped; those of live followers
-- are scored now, to be looked at again later.
local out = {}
local adopted = 0
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[4], 'LIMIT', 0, 100)
for _, key in ipairs(members) do
  local f = redis.call('HMGET', key, 'state', 'job_status', 'owner', 'project_id', 'backup_id', 'job_id',
    'status', 'request_id')
  if f[1] ~= 'accepted' or f[2] ~= 'pending' then
    redis.call('ZREM', KEYS[1], key)
  elseif f[3] and f[3] ~= '' and redis.call('EXISTS', ARGV[1] .. f[3]) == 1 then
    redis.call('ZADD', KEYS[1], ARGV[5], key)
  elseif adopted < tonumber(ARGV[3]) then
    adopted = adopted + 1
    redis.call('HSET', key, 'owner', ARGV[2])
    redis.call('ZADD', KEYS[1], ARGV[5], key)
    out[#out + 1] = key
    for i = 4, 8 do
      out[#out + 1] = f[i] or ''
    end
  end
end
return out
