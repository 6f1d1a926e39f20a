"""The Lua scripts behind :class:`~streamrnn.cluster.redis_store.RedisStore`.

Each script touches only keys of ONE hash tag (a worker's ``{w:<name>}``, a stream's
``{s:<id>}``, or the workers index alone), so it runs unchanged on a single server and on
Redis Cluster. Scripts are atomic: a claim's compare-and-set of the holder and a save's
fencing check cannot interleave with another client's call.

- :data:`RENEW` ``(lease, info; token, ttl_ms, register, field, value, ...)``: sets the lease
  (PX ttl) and the info hash when the lease holds ``token`` (or, with ``register`` = 1, when
  it is absent) -> 1, else 0 (lease lost, or the name is taken by another incarnation).
- :data:`TOUCH` ``(workers; name, ttl_ms)``: scores ``name`` in the workers ZSET with its
  lease expiry on the server clock.
- :data:`LIVE` ``(workers; )``: prunes expired names, returns the others.
- :data:`DROP` ``(lease, info; token)``: deletes both when the lease holds ``token``.
- :data:`CLAIM` ``(holder, ckpt; worker, token, expected_epoch, channel, stream)``: if the
  stored epoch (0 when never claimed) equals ``expected_epoch``, sets the holder with epoch+1,
  publishes ``<epoch> <worker> <stream>`` on ``channel`` and returns ``{1, epoch, blob?}``,
  else ``{0, epoch}``.
- :data:`SAVE` ``(holder, ckpt; worker, token, epoch, op, blob)``: only when worker, token
  and epoch all match the holder: ``op`` ``"w"`` writes the blob, ``"c"`` (closed) deletes
  it, releases and lets the holder record expire after :data:`CLOSED_TTL_MS` (a claim makes
  it persistent again) -> 1, else 0 (a zombie's late write is refused).
- :data:`RELEASE` ``(holder; worker, token, epoch)``: empties worker and token (the epoch
  stays: it only ever grows) when they match -> 1, else 0.

Example (what the store does; ``client`` a redis-py client)::

    claim = client.register_script(CLAIM)
    claim(keys=[holder_key, ckpt_key], args=["w1", token, 0, "srnn:claims", "s1"])  # [1, 1]
"""

from __future__ import annotations

__all__ = ["CLAIM", "CLOSED_TTL_MS", "DROP", "LIVE", "RELEASE", "RENEW", "SAVE", "SCRIPTS", "TOUCH"]

RENEW = """
local cur = redis.call('GET', KEYS[1])
if ARGV[3] == '1' then
  if cur and cur ~= ARGV[1] then return 0 end
elseif cur ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[3] == '1' then redis.call('DEL', KEYS[2]) end
if #ARGV > 3 then redis.call('HSET', KEYS[2], unpack(ARGV, 4)) end
redis.call('HSET', KEYS[2], 'token', ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

TOUCH = _NOW_MS + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return now
"""

LIVE = _NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

DROP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""

CLAIM = """
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if epoch ~= tonumber(ARGV[3]) then return {0, epoch} end
epoch = epoch + 1
local text = string.format('%d', epoch)
redis.call('HSET', KEYS[1], 'worker', ARGV[1], 'token', ARGV[2], 'epoch', text)
redis.call('PERSIST', KEYS[1])
redis.call('PUBLISH', ARGV[4], text .. ' ' .. ARGV[1] .. ' ' .. ARGV[5])
local blob = redis.call('GET', KEYS[2])
if blob then return {1, epoch, blob} end
return {1, epoch}
"""

#: how long a closed stream's holder record (its epoch) is kept: a worker that still thinks
#: it holds the stream is fenced by its token anyway, so the epoch may start over after this
CLOSED_TTL_MS = 24 * 3600 * 1000

_FENCE = """
local h = redis.call('HMGET', KEYS[1], 'worker', 'token', 'epoch')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] or h[3] ~= ARGV[3] then return 0 end
"""

SAVE = _FENCE + f"""
if ARGV[4] == 'c' then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'worker', '', 'token', '')
  redis.call('PEXPIRE', KEYS[1], {CLOSED_TTL_MS})
else
  redis.call('SET', KEYS[2], ARGV[5])
end
return 1
"""

RELEASE = _FENCE + """
redis.call('HSET', KEYS[1], 'worker', '', 'token', '')
return 1
"""

#: name -> script text (the store registers each on its client)
SCRIPTS: dict[str, str] = {
    "claim": CLAIM,
    "drop": DROP,
    "live": LIVE,
    "release": RELEASE,
    "renew": RENEW,
    "save": SAVE,
    "touch": TOUCH,
}
