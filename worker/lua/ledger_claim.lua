-- Claim one backup for deletion, atomically, so duplicates and redeliveries are never sent twice.
-- KEYS[1]  the backup's ledger hash
-- ARGV[1]  owner id of the claiming worker
-- ARGV[2]  heartbeat key prefix (an owner is alive while PREFIX..owner exists)
-- ARGV[3]  record TTL, seconds
-- ARGV[4]  producer's request_id ('' when none)
-- ARGV[5]  project_id, ARGV[6] backup_id
-- Returns {verdict, detail}:
--   {'done', state}       already accepted or gone: do not send again
--   {'busy', owner}       in flight in a live worker (this one included): wait, then ask again
--   {'claimed', previous} now in flight here; previous state ('' for a new record)
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'accepted' or state == 'already_gone' then
  return {'done', state}
end
if state == 'in_flight' then
  local owner = redis.call('HGET', KEYS[1], 'owner')
  if owner and owner ~= '' and redis.call('EXISTS', ARGV[2] .. owner) == 1 then
    return {'busy', owner}
  end
end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
redis.call('HSET', KEYS[1], 'state', 'in_flight', 'owner', ARGV[1], 'last_ts', now,
  'project_id', ARGV[5], 'backup_id', ARGV[6])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'request_id', ARGV[4])
end
redis.call('HSETNX', KEYS[1], 'first_ts', now)
redis.call('HINCRBY', KEYS[1], 'claims', 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return {'claimed', state or ''}
