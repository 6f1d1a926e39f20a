"""The worker side of Redis (issue 15): leases, claims, fenced per-stream checkpoints.

A real ``redis-server`` (the ``redis_url`` fixture), real in-process StreamWorkers on real
ZeroMQ sockets and a real TF model; the slow test runs real worker processes and pauses
one with SIGSTOP. The contract: a stream that moves from one worker to another (the first
one's lease lapsed) continues exactly: its outputs equal one offline Keras call.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import numpy as np
import pytest
import zmq

import streamrnn
from streamrnn import Engine
from streamrnn.cli.process import WorkerProcess
from streamrnn.cluster.redis_checkpoints import RedisStreamStore, open_worker_store
from streamrnn.cluster.redis_store import RedisStore
from streamrnn.cluster.stream_blob import decode_stream_blob
from streamrnn.codec import decode_reply, encode
from streamrnn.protocol import ErrorCode, MessageType
from streamrnn.serving.sequencing import SequenceTable
from streamrnn.serving.store import StreamStore
from streamrnn.serving.worker import StreamWorker, WorkerConfig
from tests.helpers.durable_helpers import FAST, SPEC, chunked, saved_model
from tests.helpers.modelzoo import offline, random_input

TOL = 1e-5
TTL_MS = 1000  # short leases: a lapse is noticed within a second (not shorter: a loaded
# 2-core machine can stall the renewing thread for a few hundred ms)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return saved_model(tmp_path_factory)


@pytest.fixture
def store_url(redis_url):
    """The session server under a fresh key prefix (keys deleted afterwards)."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    yield f"{redis_url}?prefix={prefix}"
    client = RedisStore.from_url(redis_url).client
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def _store(url: str, name: str, every_s: float = 0.05) -> RedisStreamStore:
    return open_worker_store(url, name, lambda: {"endpoint": ""}, ttl_ms=TTL_MS,
                             model="lstm", every_s=every_s)


def _worker(url: str, name: str, model) -> StreamWorker:
    engine = Engine.from_keras(model, slots=4, jit_compile=False)
    worker = StreamWorker(engine, WorkerConfig(bind="tcp://127.0.0.1:0", name=name),
                          store=_store(url, name))
    worker.start()
    return worker


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _request(endpoint: str, msg_type: MessageType, header: dict, arrays=None):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(encode(msg_type, header, arrays))
        assert sock.poll(30_000), "no reply"
        return decode_reply(sock.recv_multipart())
    finally:
        sock.close()


def _push(engine, table: SequenceTable, stream: str, chunk: np.ndarray) -> np.ndarray:
    """What the compute thread does for one applied PUSH."""
    seq = table.next_seq(stream)
    out = engine.push(stream, chunk)
    table.applied(stream, seq, (MessageType.OUTPUT, {"stream": stream, "seq": seq},
                                {"output": out}))
    return out


# ---- real workers ------------------------------------------------------------------------


def test_stream_continues_exactly_on_a_second_worker_after_the_first_ones_lease_lapses(
        store_url, model_file):
    model, _ = model_file
    rng = np.random.default_rng(3)
    x = random_input(SPEC, 60, rng)
    chunks = chunked(x, rng, most=8)
    half = len(chunks) // 2
    w1, w2 = _worker(store_url, "w1", model), _worker(store_url, "w2", model)
    try:
        assert isinstance(w1.store, StreamStore)
        with streamrnn.Client(w1.endpoint, token="secret-a") as client:  # "a"'s owner
            outs = [client.push("a", c) for c in chunks[:half]]
            # a live holder: the other worker refuses the stream, naming it and the seq
            reply = _request(w2.endpoint, MessageType.PUSH, {"rid": 9, "stream": "a",
                                                             "seq": half},
                             {"chunk": chunks[half]})
            assert reply.type == MessageType.ERROR
            assert reply.header["code"] == ErrorCode.NOT_HOLDER
            assert reply.header["stream"] == "a" and reply.header["seq"] == half
            assert "does not hold stream 'a'" in reply.header["message"]
        _wait(lambda: w1.store.durable.get("a") == half)  # its periodic write
        w1.store.lease.stop(drop=False)  # no more renews, as in a crash or a long pause
        _wait(lambda: w1.fenced, timeout=5)  # it fenced itself: stopped, slots dropped
        assert w1.join(5) and "a" not in w1.engine
        with streamrnn.Client(w2.endpoint, token="secret-a") as client:
            outs += [client.push("a", c) for c in chunks[half:]]
        got = np.concatenate(outs)
        # the stream's owner moved with it: another token is refused on the new holder
        reply = _request(w2.endpoint, MessageType.PUSH, {"rid": 7, "stream": "a",
                                                         "seq": len(chunks), "token": "other"},
                         {"chunk": chunks[0]})
        assert reply.header["code"] == ErrorCode.FORBIDDEN
        assert np.abs(got - offline(model, x)).max() <= TOL
        holder = w2.store.store.holder("a")
        assert (holder.worker, holder.epoch) == ("w2", 2)
        assert w2.stats()["checkpoint"]["backend"] == "redis"
        # a graceful stop writes last and drops the lease: the next worker claims at once
        w2.stop()
        assert w2.join(30)
        redis = w2.store.store
        assert not redis.lease_alive("w2", w2.store.lease.token)
        blob = decode_stream_blob(redis.load("a"), "a", w2.engine.state_layout)
        assert blob.record.next_seq == len(chunks) and blob.epoch == 2
    finally:
        for w in (w1, w2):
            w.stop()
            w.join(30)


# ---- the store alone (the compute thread's calls, made directly) -------------------------


def test_zombie_writes_are_refused_and_only_changed_streams_are_written(store_url, model_file):
    model, _ = model_file
    rng = np.random.default_rng(5)
    engine = Engine.from_keras(model, slots=4, jit_compile=False)
    table = SequenceTable()
    store = _store(store_url, "z1")
    try:
        names = ["p", "q", "r", "s"]
        assert store.acquire(names, engine, table) == set(names)
        for s in names:
            _push(engine, table, s, random_input(SPEC, 5, rng))
        store.save(engine, table)
        assert store.last_streams == 4 and store.durable == dict.fromkeys(names, 1)
        redis = store.store
        before = {s: redis.load(s) for s in names}

        _push(engine, table, "p", random_input(SPEC, 3, rng))
        store.save(engine, table)
        assert store.last_streams == 1  # only "p" moved
        after = {s: redis.load(s) for s in names}
        assert [s for s in names if after[s] != before[s]] == ["p"]
        assert decode_stream_blob(after["p"], "p", engine.state_layout).record.next_seq == 2
        store.save(engine, table)
        assert store.last_streams == 0  # nothing changed: nothing written

        engine.close("q")  # a CLOSE: checkpoint deleted, stream released
        table.closed("q", 1, (MessageType.ACK, {"stream": "q"}, {}))
        store.save(engine, table)
        assert store.last_streams == 1 and redis.load("q") is None
        assert redis.holder("q").free and not store.holds("q")

        # the lease lapses (a paused process); another worker takes "r" over
        store.lease.stop(drop=False)
        _wait(lambda: not store.lease_valid(), timeout=5)
        other = _store(store_url, "z2")
        try:
            assert other.acquire(["r"], Engine.from_keras(model, slots=2, jit_compile=False),
                                 SequenceTable()) == {"r"}
            # the zombie's late write of "r" is refused; "r" is dropped here
            _push(engine, table, "r", random_input(SPEC, 2, rng))
            store.save(engine, table)
            assert store.refused == 1 and store.report()["refused_writes"] == 1
            assert "r" not in engine and "r" not in table and not store.holds("r")
            kept = decode_stream_blob(redis.load("r"), "r", engine.state_layout)
            assert (kept.epoch, kept.record.next_seq) == (1, 1)  # the zombie's is not there
        finally:
            other.close()
    finally:
        store.store.close()


# ---- slow: real processes, SIGSTOP/SIGCONT ----------------------------------------------


@pytest.mark.slow
def test_paused_worker_is_fenced_exits_3_and_the_stream_stays_exact(store_url, model_file,
                                                                     tmp_path):
    model, path = model_file
    rng = np.random.default_rng(11)
    x = random_input(SPEC, 60, rng)
    chunks = chunked(x, rng, most=8)
    half = len(chunks) // 2
    args = ("--store", store_url, "--checkpoint-every-s", "0.05", *FAST)  # 2 s leases
    w1 = WorkerProcess.start(path, 4, *args, "--name", "w1", log_path=tmp_path / "w1.log")
    w2 = WorkerProcess.start(path, 4, *args, "--name", "w2", log_path=tmp_path / "w2.log")
    try:
        with streamrnn.Client(w1.endpoint) as client:
            outs = [client.push("a", c) for c in chunks[:half]]
        time.sleep(0.3)  # its periodic write
        os.kill(w1.proc.pid, signal.SIGSTOP)
        time.sleep(2.5)  # past its lease
        with streamrnn.Client(w2.endpoint) as client:
            outs += [client.push("a", c) for c in chunks[half:]]
        redis = RedisStore.from_url(store_url)
        epoch = redis.holder("a").epoch
        os.kill(w1.proc.pid, signal.SIGCONT)
        assert w1.proc.wait(30) == 3, w1.log()[-3000:]
        assert "fenced itself" in w1.log()
        holder = redis.holder("a")
        assert (holder.worker, holder.epoch) == ("w2", epoch)  # the zombie changed nothing
        assert decode_stream_blob(redis.load("a"), "a", _layout(model)).epoch == epoch
        assert np.abs(np.concatenate(outs) - offline(model, x)).max() <= TOL
        assert w2.stop() == 0
    finally:
        for w in (w1, w2):
            if w.proc.poll() is None:
                os.kill(w.proc.pid, signal.SIGCONT)
            w.stop()


def _layout(model) -> list:
    return Engine.from_keras(model, slots=1, jit_compile=False).state_layout
