"""The durable training log over Redis: a Redis Stream read by the consumer group
``trainers`` (:class:`RedisChunkLog`, a :class:`~streamrnn.training.chunk_log.ChunkLog`).

Keys (both under the hash tag ``{train}``, so a Redis Cluster keeps them in one slot and
one script touches both):

- ``srnn:{train}:log`` STREAM: one entry per training request, fields ``stream``, ``seq``,
  ``kind`` (``push``/``reset``/``close``) and, for a push, ``dtype``, ``shape``
  (``"T,D"``) and ``data`` (the chunk's little-endian C-order bytes);
- ``srnn:{train}:seqs`` HASH: stream -> ``"<next_seq> <k1> <k2> ..."``, the stream's next
  sequence number and the kinds of its last :data:`~streamrnn.protocol.REPLY_CACHE_SIZE`
  records (a push's timesteps; 0 for a reset). A CLOSE deletes the field.

:meth:`RedisChunkLog.append` is one Lua script per call: for each record it compares
``seq`` with the stream's next one, and only if equal does ``XADD`` and move the counter,
atomically; a record already in the log (``seq`` below) is not added again, one above is
refused (:class:`~streamrnn.errors.StoreError`). Once the script returned, the entries are
in Redis (as durable as its ``appendfsync`` setting makes them).

The consumer side: ``XREADGROUP`` (``>`` for new entries, ``0`` for this consumer's own
pending ones), ``XAUTOCLAIM`` for a dead consumer's, ``XACK`` + ``XDEL`` once a checkpoint
covers them. The consumer name is the trainer's name (``streamrnn trainer --name``).

Example::

    store = RedisStore.from_url("redis://127.0.0.1:6379/0")
    log = RedisChunkLog(store.client, prefix=store.prefix, consumer="trainer-1")
    log.append([LogRecord("s1", 0, "push", np.zeros((16, 2), np.float32))])
    entries = log.read(count=256, block_ms=200)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import redis

from streamrnn.cluster.redis_keys import DEFAULT_PREFIX, TRAIN_GROUP, Keys
from streamrnn.errors import StoreError
from streamrnn.protocol import ALLOWED_DTYPES, MAX_CHUNK_STEPS, MAX_NDIM, REPLY_CACHE_SIZE
from streamrnn.training.chunk_log import LogEntry, LogRecord

__all__ = ["APPEND_SCRIPT", "RedisChunkLog", "decode_entry", "encode_record"]

#: KEYS: log stream, seqs hash. ARGV: cache size, then 7 per record: stream, seq, kind,
#: steps, dtype, shape, data. Returns one item per record: the entry id, "" (already in the
#: log) or "gap <next_seq>".
APPEND_SCRIPT = """
local cache = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV, 7 do
  local stream, seq, kind = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local cur = redis.call('HGET', KEYS[2], stream)
  local nxt, ring = 0, {}
  if cur then
    local first = true
    for word in string.gmatch(cur, '%S+') do
      if first then
        nxt, first = tonumber(word), false
      else
        ring[#ring + 1] = word
      end
    end
  end
  if seq < nxt then
    out[#out + 1] = ''
  elseif seq > nxt then
    out[#out + 1] = 'gap ' .. nxt
  else
    local id
    if kind == 'push' then
      id = redis.call('XADD', KEYS[1], '*', 'stream', stream, 'seq', ARGV[i + 1],
                      'kind', kind, 'dtype', ARGV[i + 4], 'shape', ARGV[i + 5],
                      'data', ARGV[i + 6])
    else
      id = redis.call('XADD', KEYS[1], '*', 'stream', stream, 'seq', ARGV[i + 1],
                      'kind', kind)
    end
    if kind == 'close' then
      redis.call('HDEL', KEYS[2], stream)
    else
      ring[#ring + 1] = ARGV[i + 3]
      local first = math.max(1, #ring - cache + 1)
      local kept = {string.format('%d', seq + 1)}
      for j = first, #ring do kept[#kept + 1] = ring[j] end
      redis.call('HSET', KEYS[2], stream, table.concat(kept, ' '))
    end
    out[#out + 1] = id
  end
end
return out
"""


class RedisChunkLog:
    """The training log in Redis (module docstring: keys and commands).

    Args:
        client: a redis-py client (``Redis`` or ``RedisCluster``) with
            ``decode_responses=False`` (chunks are bytes).
        prefix: the key prefix (``srnn``).
        consumer: this reader's name in the group (the trainer's name).
        group: the consumer group (``trainers``).
    """

    def __init__(self, client: Any, *, prefix: str = DEFAULT_PREFIX,
                 consumer: str = "trainer", group: str = TRAIN_GROUP):
        self.client = client
        self.key = Keys(prefix).train_log
        self.seqs_key = f"{prefix}:{{train}}:seqs"
        self.consumer = consumer
        self.group = group
        self._append = client.register_script(APPEND_SCRIPT)
        try:
            client.xgroup_create(self.key, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise StoreError(f"cannot create the training log group: {exc}") from exc
        except redis.RedisError as exc:
            raise StoreError(f"the training log is unreachable: {exc}") from exc

    # ---- the front -----------------------------------------------------------------------

    def append(self, records: Sequence[LogRecord]) -> list[str]:
        """Append ``records`` in one atomic script (see the module docstring)."""
        if not records:
            return []
        args: list[Any] = [REPLY_CACHE_SIZE]
        for record in records:
            args += encode_record(record)
        try:
            result = self._append(keys=[self.key, self.seqs_key], args=args)
        except redis.RedisError as exc:
            raise StoreError(f"appending to the training log failed: {exc}") from exc
        ids = [_text(item) for item in result]
        for record, item in zip(records, ids, strict=True):
            if item.startswith("gap"):
                raise StoreError(f"training log: stream {record.stream!r} is at seq "
                                 f"{item.split()[1]} in Redis, this trainer sent "
                                 f"{record.seq} (is another trainer front appending?)")
        return ids

    def sequences(self) -> dict[str, tuple[int, list[int]]]:
        """stream -> ``(next_seq, kinds of its last records)``."""
        try:
            raw = self.client.hgetall(self.seqs_key)
        except redis.RedisError as exc:
            raise StoreError(f"reading the training log's sequence numbers failed: {exc}") \
                from exc
        out = {}
        for stream, value in raw.items():
            words = [int(w) for w in _text(value).split()]
            out[_text(stream)] = (words[0], words[1:])
        return out

    # ---- the consumer ----------------------------------------------------------------

    def claim_stale(self, min_idle_ms: int) -> int:
        """``XAUTOCLAIM`` every entry idle ``min_idle_ms`` in another consumer's pending
        list; returns how many entries others still hold."""
        start = "0-0"
        while True:
            # (redis-py drops the cursor with justid=True, so the entries come along)
            reply = self.client.xautoclaim(self.key, self.group, self.consumer, min_idle_ms,
                                           start_id=start, count=64)
            start = _text(reply[0])
            if start == "0-0":
                break
        summary = self.client.xpending(self.key, self.group)
        return sum(int(c["pending"]) for c in summary.get("consumers") or []
                   if _text(c["name"]) != self.consumer)

    def pending(self, after: str, count: int) -> list[LogEntry]:
        """This consumer's unacknowledged entries with ids above ``after``."""
        return self._read(after, count, None)

    def read(self, count: int, block_ms: int) -> list[LogEntry]:
        """New entries (``>``), waiting up to ``block_ms`` (0: no wait)."""
        return self._read(">", count, block_ms or None)

    def _read(self, start: str, count: int, block: int | None) -> list[LogEntry]:
        reply = self.client.xreadgroup(self.group, self.consumer, {self.key: start},
                                       count=count, block=block)
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3
            messages = next(iter(reply.values()))[0]
        else:
            messages = reply[0][1]
        return [decode_entry(_text(entry_id), fields) for entry_id, fields in messages]

    def ack(self, ids: Sequence[str]) -> None:
        """``XACK`` and ``XDEL`` ``ids`` (nothing else reads them)."""
        if not ids:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.xack(self.key, self.group, *ids)
        pipe.xdel(self.key, *ids)
        pipe.execute()

    def backlog(self) -> int:
        """Entries in the log now (read or not, not yet acknowledged and dropped)."""
        return int(self.client.xlen(self.key))


def encode_record(record: LogRecord) -> list[Any]:
    """The script's 7 arguments for ``record``: stream, seq, kind, steps, dtype, shape,
    data (empty strings for a reset or close)."""
    if record.chunk is None:
        return [record.stream, record.seq, record.kind, 0, "", "", b""]
    chunk = np.ascontiguousarray(record.chunk)
    dtype = chunk.dtype.newbyteorder("<")
    return [record.stream, record.seq, record.kind, record.steps, dtype.name,
            ",".join(str(d) for d in chunk.shape), chunk.astype(dtype, copy=False).tobytes()]


def decode_entry(entry_id: str, fields: Any) -> LogEntry:
    """A log entry from its Redis fields, checked as strictly as a wire message (a deleted
    or malformed entry comes back with ``record`` None and the reason)."""
    if not fields:
        return LogEntry(entry_id, None, "deleted")
    try:
        got = {_text(k): v for k, v in fields.items()}
        stream, kind = _text(got["stream"]), _text(got["kind"])
        seq = int(_text(got["seq"]))
        if kind not in ("push", "reset", "close") or seq < 0:
            raise ValueError(f"kind {kind!r:.20}, seq {seq}")
        return LogEntry(entry_id, LogRecord(stream, seq, kind, _chunk(got) if kind == "push"
                                            else None))  # type: ignore[arg-type]
    except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
        return LogEntry(entry_id, None, f"malformed: {exc}")


def _chunk(fields: dict[str, Any]) -> np.ndarray:
    dtype = _text(fields["dtype"])
    if dtype not in ALLOWED_DTYPES:
        raise ValueError(f"dtype {dtype!r:.20}")
    shape = tuple(int(d) for d in _text(fields["shape"]).split(","))
    if not 1 <= len(shape) <= MAX_NDIM or not 0 < shape[0] <= MAX_CHUNK_STEPS \
            or any(d < 0 for d in shape):
        raise ValueError(f"shape {shape}")
    data = fields["data"]
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape) \
        .astype(dtype)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
