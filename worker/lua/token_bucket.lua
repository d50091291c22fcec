-- Shared token bucket on Redis server time, so every worker on every host draws from one budget.
-- KEYS[1]  bucket hash: tokens (float), ts (microseconds), paused_until (microseconds)
-- ARGV[1]  rate, tokens per second (> 0)
-- ARGV[2]  burst, bucket capacity in tokens (>= 1)
-- ARGV[3]  tokens wanted now (>= 1); fewer may be granted, never more than are in the bucket
-- ARGV[4]  pause in seconds to impose on everyone first (0 = none); a 429 sets it
-- Returns {granted, wait_us, level}: tokens granted (integer), microseconds until the next token
-- (0 when granted), and the bucket level after the call as a string (for metrics).
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local wanted = tonumber(ARGV[3])
local pause = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'paused_until')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
local paused_until = tonumber(state[3]) or 0
if pause > 0 then
  paused_until = math.max(paused_until, now + pause * 1000000)
  tokens = 0
end
local granted = 0
local wait = 0
if now < paused_until then
  wait = paused_until - now
  ts = now
else
  tokens = math.min(burst, tokens + math.max(0, now - math.max(ts, paused_until)) * rate / 1000000)
  ts = now
  granted = math.min(wanted, math.floor(tokens))
  tokens = tokens - granted
  if granted == 0 then
    wait = math.ceil((1 - tokens) * 1000000 / rate)
  end
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts), 'paused_until', tostring(paused_until))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 60000)
return {granted, wait, tostring(tokens)}
