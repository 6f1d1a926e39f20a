"""Durable training through a real Redis Stream, in one process (the fast real path; the
SIGKILL test of real trainer processes is tests/training/test_trainer_kill.py, slow).

A front (StreamWorker serving a LogFront) answers each PUSH once it is in Redis; a first
consumer trains part of the log, checkpoints part of that and "dies" (dropped without
finishing: applied-but-uncheckpointed entries stay pending, others were never read); a
replacement front and consumer take over with the same Client still pushing. Every chunk
sent is applied exactly once: the counts and each stream's trained timesteps say so."""

from __future__ import annotations

import json

import numpy as np
import zmq

from streamrnn.client.client import Client
from streamrnn.cluster.training_log import RedisChunkLog
from streamrnn.codec import decode_reply, encode
from streamrnn.protocol import MessageType
from streamrnn.serving.worker import StreamWorker, WorkerConfig
from streamrnn.training.config import TrainConfig
from streamrnn.training.consumer import LogConsumer
from streamrnn.training.front import LogFront
from streamrnn.training.online import OnlineTrainer
from streamrnn.training.trainer import FreeRunningTrainer
from tests.helpers.redis_server import free_port
from tests.helpers.trainer_process import sine, small_model

STREAMS = 3


def _length(stream: int, round_: int) -> int:
    return 5 + (3 * round_ + stream) % 4  # lengths differ (a doubled chunk shows in sums)


def _round(r: int) -> dict[str, np.ndarray]:
    return {f"s{k}": sine(k, 16 * r, _length(k, r)) for k in range(STREAMS)}


def _serve(endpoint: str, online: OnlineTrainer, log: RedisChunkLog
           ) -> tuple[StreamWorker, int]:
    front = LogFront(online, log)
    worker = StreamWorker(front, WorkerConfig(bind=endpoint, coalesce_steps=0))
    restored = front.attach(worker.sequences)
    worker.start()
    return worker, restored


def _online(ckpt, every: int = 2) -> OnlineTrainer:
    return OnlineTrainer(FreeRunningTrainer(small_model(), slots=4, config=TrainConfig(warmup=4)),
                         checkpoint=ckpt, checkpoint_every=every)


def _resend(endpoint: str, stream: str, seq: int, chunk: np.ndarray) -> MessageType:
    """A raw PUSH with an old seq (a client's retry after a crash): its reply's type."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(encode(MessageType.PUSH, {"rid": 9, "stream": stream, "seq": seq},
                                   {"chunk": chunk}))
        assert sock.poll(10_000)
        reply = decode_reply(sock.recv_multipart())
    finally:
        sock.close()
    assert reply.header["seq"] == seq
    return reply.type, reply


def test_every_chunk_is_trained_exactly_once_across_a_trainer_crash(redis_store, tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ckpt = tmp_path / "t.npz"
    log_a = RedisChunkLog(redis_store.client, prefix=redis_store.prefix, consumer="t1")
    online_a = _online(ckpt, every=3)
    worker, restored = _serve(endpoint, online_a, log_a)
    assert restored == 0
    sent = []
    with Client(endpoint, timeout=30) as client:
        for r in range(6):
            out = client.push_many(_round(r))
            assert {s: o.shape for s, o in out.items()} == {f"s{k}": (0, 1)
                                                            for k in range(STREAMS)}
            sent.append(r)
        # the first trainer trains 12 of the 18 entries (4 steps; its checkpoint every 3
        # steps covers the first 9) and dies before acknowledging any: 9 pending entries
        # are covered, 3 applied but not covered, 6 never read
        consumer_a = LogConsumer(online_a, log_a, claim_idle_ms=0)
        consumer_a.catch_up()
        log_a.ack = lambda ids: None  # the crash comes before the acknowledgement
        consumer_a.apply(log_a.read(count=6, block_ms=0))
        consumer_a.apply(log_a.read(count=6, block_ms=0))
        assert consumer_a.applied == 12 and online_a.trainer.step == 4
        covered = json.loads(bytes(np.load(ckpt)["meta"]).decode())["extra"]["log"]
        assert covered["applied"] == 9
        assert len(log_a.pending("0-0", 100)) == 12
        worker.stop()
        assert worker.join(30)

        # the replacement (another name): its front learns every stream's seq from Redis
        log_b = RedisChunkLog(redis_store.client, prefix=redis_store.prefix, consumer="t2")
        online_b = _online(ckpt)
        assert online_b.trainer.step == covered["applied"] // STREAMS
        worker, restored = _serve(endpoint, online_b, log_b)
        consumer_b = LogConsumer(online_b, log_b, claim_idle_ms=0, idle_checkpoint_s=0.2)
        try:
            assert restored == STREAMS
            # a retry of an appended chunk is answered again, not appended again
            kind, reply = _resend(endpoint, "s1", 5, _round(5)["s1"])
            assert kind == MessageType.OUTPUT and reply.arrays["output"].shape == (0, 1)
            consumer_b.start()
            for r in range(6, 9):
                client.push_many(_round(r))  # the same Client goes on
                sent.append(r)
        finally:
            worker.stop()
            worker.join(30)
            consumer_b.stop()
            consumer_b.join(60)
    assert consumer_b.failed is None
    total = len(sent) * STREAMS
    assert consumer_b.applied == total == 27
    assert consumer_b.counts["duplicates"] == 0 and consumer_b.counts["rejected"] == 0
    assert consumer_b.counts["covered"] == 9  # pending, but in the checkpoint
    trainer = online_b.trainer
    for k in range(STREAMS):  # the first element of a stream has no target
        assert trainer.table.info(f"s{k}").steps == sum(_length(k, r) for r in sent) - 1
    meta = json.loads(bytes(np.load(ckpt)["meta"]).decode())
    assert meta["extra"]["log"]["applied"] == total
    assert meta["extra"]["log"]["streams"] == {f"s{k}": len(sent) for k in range(STREAMS)}
    assert log_b.backlog() == 0 and log_b.pending("0-0", 100) == []
