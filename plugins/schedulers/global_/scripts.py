"""The Lua scripts that keep a queue and its load score in step, atomically.

Each script touches the keys of one instance plus its shard's load table, which share a hash
tag (see :mod:`.keys`), so each runs in one Redis Cluster slot. redis-py sends them with
EVALSHA and falls back to EVAL when a restarted Redis has forgotten them.
"""

from __future__ import annotations

from redis.asyncio import Redis

# KEYS: requests, load.  ARGV: name, ttl, min_load, channel, item...
# The score is set from LLEN rather than incremented, so it cannot drift from the queue.
ENQUEUE = """
local n = redis.call('RPUSH', KEYS[1], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], n, ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
if n >= tonumber(ARGV[3]) then redis.call('PUBLISH', ARGV[4], ARGV[1]) end
return n
"""

# KEYS: requests, load, alive, results (all of the queue's owner).
# ARGV: owner, batch, available_blocks, block_size, reserved_blocks, min_load, thief, ttl,
#       channel.  ``thief`` is empty when the owner takes its own work.
# Returns {1, item...} (items to run) or {0, item...} (items of a dead owner, to drop).
# Items read "<prompt_len> <ticket> <json>", so admission needs no JSON decoding; the rule
# is fdcore.types.Capacity.admissible (a test holds the two equal).
TAKE = """
local owner, ttl, min_load = ARGV[1], ARGV[8], tonumber(ARGV[6])
local thief = ARGV[7]
local n = redis.call('LLEN', KEYS[1])
if n == 0 then
  redis.call('ZREM', KEYS[2], owner)
  return {1}
end
local batch = tonumber(ARGV[2])
local alive = thief == '' or redis.call('EXISTS', KEYS[3]) == 1
if not alive then
  batch = 100
elseif thief ~= '' then
  if n < min_load then return {1} end
  batch = math.min(batch, math.ceil(n / 2))
end
local items = redis.call('LRANGE', KEYS[1], 0, batch - 1)
local taken, tickets = #items, {}
if alive then
  local available, size = tonumber(ARGV[3]), tonumber(ARGV[4])
  local reserved = tonumber(ARGV[5])
  if available <= reserved then return {1} end
  local needed = 0
  taken = 0
  for _, item in ipairs(items) do
    local sp = string.find(item, ' ', 1, true)
    local blocks = math.ceil(tonumber(string.sub(item, 1, sp - 1)) / size)
    needed = needed + blocks + reserved
    if needed > available and not (taken == 0 and blocks <= available) then break end
    taken = taken + 1
    tickets[taken] = string.sub(item, sp + 1, string.find(item, ' ', sp + 1, true) - 1)
  end
  if taken == 0 then return {1} end
end
redis.call('LTRIM', KEYS[1], taken, -1)
local left = n - taken
if left == 0 then
  redis.call('ZREM', KEYS[2], owner)
else
  redis.call('ZADD', KEYS[2], left, owner)
  redis.call('EXPIRE', KEYS[2], ttl)
end
if alive and thief ~= '' then
  redis.call('RPUSH', KEYS[4], cjson.encode({claim = tickets, by = thief}))
  redis.call('EXPIRE', KEYS[4], ttl)
end
if alive and left >= min_load then redis.call('PUBLISH', ARGV[9], owner) end
return {alive and 1 or 0, unpack(items, 1, taken)}
"""

# KEYS: results, alive (of the origin).  ARGV: ttl, message...
# Nothing is pushed for an origin that is gone: nobody would ever read it.
DELIVER = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


class Scripts:
    """The scripts registered on one client, called with keys and arguments."""

    def __init__(self, client: Redis) -> None:
        self.enqueue = client.register_script(ENQUEUE)
        self.take = client.register_script(TAKE)
        self.deliver = client.register_script(DELIVER)
