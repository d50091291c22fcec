-- Pop up to ARGV[1] messages from a queue, and at most half of those queued (so that a worker that is
-- consuming too gets its share), and record each as unacknowledged, in one atomic step (kombu's own
-- delivery pops one message, then records it in a second round trip).
-- KEYS[1]  the queue list, KEYS[2] kombu's unacked hash, KEYS[3] kombu's unacked index (sorted set)
-- ARGV[1]  most messages to pop, ARGV[2] now, Unix seconds (the index score kombu's restore compares)
-- Returns a flat list {item, tag, item, tag, ...}: tag is '' for an item that is not a readable envelope
-- (not recorded; the worker refuses it).
local out = {}
local count = math.min(tonumber(ARGV[1]), math.floor(redis.call('LLEN', KEYS[1]) / 2))
for _ = 1, count do
  local item = redis.call('RPOP', KEYS[1])
  if not item then
    break
  end
  local tag = ''
  local ok, message = pcall(cjson.decode, item)
  if ok and type(message) == 'table' and type(message.properties) == 'table' then
    local properties = message.properties
    local info = properties.delivery_info
    if type(properties.delivery_tag) == 'string' and type(info) == 'table'
        and type(info.exchange) == 'string' and type(info.routing_key) == 'string' then
      tag = properties.delivery_tag
      -- kombu's format [message, exchange, routing_key], with the message kept verbatim
      redis.call('HSET', KEYS[2], tag,
        '[' .. item .. ',' .. cjson.encode(info.exchange) .. ',' .. cjson.encode(info.routing_key) .. ']')
      redis.call('ZADD', KEYS[3], ARGV[2], tag)
    end
  end
  out[#out + 1] = item
  out[#out + 1] = tag
end
return out
