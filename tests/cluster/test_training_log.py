"""The durable training log on a real redis-server: appends are idempotent per (stream, seq),
the sequence numbers and reply kinds live beside the entries, readers get, claim and
acknowledge entries, and a malformed entry comes back as such (never a crash)."""

from __future__ import annotations

import numpy as np
import pytest

from streamrnn.cluster.training_log import RedisChunkLog, decode_entry
from streamrnn.errors import StoreError
from streamrnn.protocol import REPLY_CACHE_SIZE
from streamrnn.training.chunk_log import ChunkLog, LogRecord, entry_key


def _chunk(n: int, value: float = 0.0) -> np.ndarray:
    return np.full((n, 2), value, np.float32) + np.arange(n, dtype=np.float32)[:, None]


def _log(store, consumer: str = "t1") -> RedisChunkLog:
    return RedisChunkLog(store.client, prefix=store.prefix, consumer=consumer)


def test_append_is_idempotent_and_keeps_sequence_numbers(redis_store):
    log = _log(redis_store)
    assert isinstance(log, ChunkLog)
    ids = log.append([LogRecord("a", 0, "push", _chunk(3)), LogRecord("b", 0, "push",
                                                                       _chunk(5))])
    assert all(ids) and entry_key(ids[0]) < entry_key(ids[1])
    assert log.append([LogRecord("a", 1, "reset")])[0]
    # a resent record (seq below the stream's next one) is not appended again
    assert log.append([LogRecord("a", 0, "push", _chunk(3)), LogRecord("a", 1, "reset")]) \
        == ["", ""]
    with pytest.raises(StoreError, match="is at seq 2 in Redis"):
        log.append([LogRecord("a", 5, "push", _chunk(1))])
    assert log.sequences() == {"a": (2, [3, 0]), "b": (1, [5])}
    log.append([LogRecord("b", 1, "close")])
    assert log.sequences() == {"a": (2, [3, 0])}  # a closed stream starts over at 0
    assert log.append([LogRecord("b", 0, "push", _chunk(2))])[0]
    assert redis_store.client.xlen(log.key) == 5
    # only the last REPLY_CACHE_SIZE kinds are kept
    log.append([LogRecord("a", 2 + i, "push", _chunk(1 + i % 4)) for i in range(40)])
    next_seq, kinds = log.sequences()["a"]
    assert next_seq == 42 and len(kinds) == REPLY_CACHE_SIZE
    assert kinds == [1 + i % 4 for i in range(40)][-REPLY_CACHE_SIZE:]


def test_readers_read_claim_and_acknowledge(redis_store):
    first, second = _log(redis_store, "t1"), _log(redis_store, "t2")
    chunks = [_chunk(4, k) for k in range(3)]
    first.append([LogRecord("s", k, "push", c) for k, c in enumerate(chunks)])
    got = first.read(count=10, block_ms=0)
    assert [(e.record.stream, e.record.seq, e.record.kind) for e in got] == \
        [("s", 0, "push"), ("s", 1, "push"), ("s", 2, "push")]
    for entry, chunk in zip(got, chunks, strict=True):
        assert entry.record.chunk.dtype == np.float32
        assert np.array_equal(entry.record.chunk, chunk)
    assert first.read(count=10, block_ms=0) == []  # delivered already
    assert [e.id for e in first.pending("0-0", 10)] == [e.id for e in got]
    assert [e.id for e in first.pending(got[0].id, 10)] == [e.id for e in got[1:]]
    # t1 dies: t2 waits for its entries to go idle, then takes them over
    assert second.claim_stale(60_000) == 3
    assert second.pending("0-0", 10) == []
    assert second.claim_stale(0) == 0
    assert [e.id for e in second.pending("0-0", 10)] == [e.id for e in got]
    assert first.pending("0-0", 10) == []
    second.ack([e.id for e in got[:2]])
    assert [e.id for e in second.pending("0-0", 10)] == [got[2].id]
    assert second.backlog() == 1  # acknowledged entries are dropped from the stream


def test_malformed_entries_come_back_unusable():
    good = {b"stream": b"s", b"seq": b"3", b"kind": b"push", b"dtype": b"float32",
            b"shape": b"2,1", b"data": np.zeros(2, np.float32).tobytes()}
    entry = decode_entry("1-0", good)
    assert entry.record is not None and entry.record.chunk.shape == (2, 1)
    bad = [None, {}, {**good, b"kind": b"explode"}, {**good, b"seq": b"-1"},
           {**good, b"dtype": b"object"}, {**good, b"shape": b"3,1"},
           {**good, b"shape": b"0,1"}, {**good, b"shape": b"1,1,1,1,1"},
           {**good, b"data": b"\x00"}, {k: v for k, v in good.items() if k != b"stream"},
           {**good, b"stream": b"\xff\xfe"}]
    for fields in bad:
        entry = decode_entry("1-0", fields)
        assert entry.record is None and entry.problem, fields


def test_the_log_works_on_a_3_master_redis_cluster(tmp_path):
    """Both keys share the {train} tag: the append script and the group commands run on a
    Redis Cluster as on one server."""
    from streamrnn.cluster.redis_store import RedisStore
    from tests.helpers.redis_server import start_cluster

    cluster = start_cluster(tmp_path, masters=3)
    store = RedisStore.from_url(cluster.url + "?prefix=c")
    try:
        client = store.client
        log = _log(store)
        assert client.cluster_keyslot(log.key) == client.cluster_keyslot(log.seqs_key)
        ids = log.append([LogRecord(f"s{k}", 0, "push", _chunk(2 + k)) for k in range(5)])
        assert all(ids) and log.append([LogRecord("s0", 0, "push", _chunk(2))]) == [""]
        assert log.sequences() == {f"s{k}": (1, [2 + k]) for k in range(5)}
        got = log.read(count=10, block_ms=100)
        assert [e.id for e in got] == ids
        other = _log(store, "t2")
        assert other.claim_stale(0) == 0 and len(other.pending("0-0", 10)) == 5
        other.ack(ids)
        assert other.backlog() == 0
    finally:
        store.close()
        cluster.stop()
