"""Durable streams: checkpoints, SIGKILL + restart, swapping under load, refused bad files.

Real worker processes, real sockets, a real TF model. The contract: every stream's outputs,
concatenated as the client received them, equal one offline call over the whole sequence,
even when the worker is killed with SIGKILL in the middle and restarted from its checkpoint
(so no chunk is lost and none is applied twice).
"""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest
import zmq

import streamrnn
from streamrnn import Engine
from streamrnn.cli.process import WorkerProcess
from streamrnn.codec import decode_reply, encode
from streamrnn.engine.weights import publish_weights
from streamrnn.protocol import MessageType
from streamrnn.serving.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from streamrnn.serving.durability import WorkerCheckpointer
from streamrnn.serving.sequencing import SequenceTable
from streamrnn.serving.worker import StreamWorker, WorkerConfig
from tests.helpers.durable_helpers import FAST, SPEC, Driver, chunked, saved_model
from tests.helpers.modelzoo import build_model, offline, random_input
from tests.helpers.weights_helpers import D, model_with_seed, offline_with_swap

TOL = 1e-5


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return saved_model(tmp_path_factory)


# ---- in-process: the checkpointer itself --------------------------------------------------


def test_checkpointer_restores_states_seqs_and_reply_cache(tmp_path):
    model = build_model(SPEC, seed=4)
    rng = np.random.default_rng(0)
    xs = {f"s{i}": random_input(SPEC, 30, rng) for i in range(5)}
    engine = Engine.from_keras(model, slots=2, max_streams=5, jit_compile=False)
    table = SequenceTable()
    head = {}
    for s, x in xs.items():
        head[s] = engine.push(s, x[:12])
        table.applied(s, 0, (MessageType.OUTPUT, {"stream": s, "seq": 0}, {"output": head[s]}))
    ckpt = WorkerCheckpointer(tmp_path, name="w1", every_steps=1)
    durable = ckpt.save(engine, table)
    assert durable == {s: 1 for s in xs} and engine.stats()["swapped_streams"] == 3

    engine2 = Engine.from_keras(model, slots=2, max_streams=5, jit_compile=False)
    table2 = SequenceTable()
    assert WorkerCheckpointer(tmp_path, name="w1").restore(engine2, table2) == 5
    for s, x in xs.items():
        assert table2.next_seq(s) == 1
        cached = table2.check(s, 0, MessageType.PUSH).reply  # a resend after the restart
        np.testing.assert_array_equal(cached[2]["output"], head[s])
        got = np.concatenate([head[s], engine2.push(s, x[12:])])
        np.testing.assert_allclose(got, offline(model, x), atol=TOL)


def test_checkpoint_with_more_streams_than_room_is_refused(tmp_path):
    model = build_model(SPEC, seed=4)
    engine = Engine.from_keras(model, slots=3, jit_compile=False)
    table = SequenceTable()
    for s in "abc":
        engine.push(s, np.zeros((2, SPEC.features), np.float32))
        table.applied(s, 0, (MessageType.OUTPUT, {}, {}))
    WorkerCheckpointer(tmp_path).save(engine, table)
    small = Engine.from_keras(model, slots=2, jit_compile=False)
    with pytest.raises(CheckpointError, match="room for 2"):
        WorkerCheckpointer(tmp_path).restore(small, SequenceTable())


def test_idle_expiry_frees_swapped_streams_and_tells_the_client(tmp_path):
    model = build_model(SPEC, seed=4)
    engine = Engine.from_keras(model, slots=1, max_streams=3, jit_compile=False)
    worker = StreamWorker(engine, WorkerConfig(
        bind="tcp://127.0.0.1:0", idle_timeout_s=0.5, checkpoint_dir=str(tmp_path),
        checkpoint_every_steps=1))
    x = random_input(SPEC, 6, np.random.default_rng(5))
    try:
        with streamrnn.Client(worker.start(), timeout=10) as client:
            for s in "abc":
                client.push(s, x)
            assert client.stats()["engine"]["swapped_streams"] == 2
            deadline = time.monotonic() + 10
            while client.stats()["engine"]["streams"] and time.monotonic() < deadline:
                time.sleep(0.1)
            engine_stats = client.stats()["engine"]
            assert engine_stats["streams"] == 0 and engine_stats["swapped_streams"] == 0
            with pytest.raises(streamrnn.StreamExpiredError, match="expired after being idle"):
                client.push("b", x)
            np.testing.assert_allclose(client.push("b", x), offline(model, x), atol=TOL)
    finally:
        worker.stop()
        worker.join(10)
    assert set(load_checkpoint(tmp_path / "worker.ckpt").streams) == {"b"}


class RawSocket:
    """A DEALER socket speaking the wire protocol directly, so two requests can be sent
    back to back (a client's resend arriving in the same batch as the original)."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, msg_type: MessageType, header: dict, arrays: dict | None = None) -> None:
        self.sock.send_multipart(encode(msg_type, header, arrays))

    def recv(self, timeout_s: float):
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return decode_reply(self.sock.recv_multipart())

    def close(self) -> None:
        self.sock.close()


def _durable_worker(tmp_path, model) -> StreamWorker:
    engine = Engine.from_keras(model, slots=2, jit_compile=False)
    return StreamWorker(engine, WorkerConfig(
        bind="tcp://127.0.0.1:0", batch_window_us=300_000, checkpoint_dir=str(tmp_path),
        checkpoint_every_steps=1))


def _closed_on_disk(path, stream: str) -> bool:
    ckpt = load_checkpoint(path)
    return stream not in ckpt.streams and stream in ckpt.extra["closed"]


def test_resent_close_in_the_same_batch_waits_for_the_checkpoint(tmp_path):
    model = build_model(SPEC, seed=4)
    worker = _durable_worker(tmp_path, model)
    raw = RawSocket(worker.start())
    save = worker.checkpointer.save

    def slow_save(*args):  # the write takes a while: an early ACK would be seen
        time.sleep(0.5)
        return save(*args)

    try:
        x = random_input(SPEC, 4, np.random.default_rng(1))
        raw.send(MessageType.PUSH, {"rid": 1, "stream": "a", "seq": 0}, {"chunk": x})
        assert raw.recv(60).type == MessageType.OUTPUT
        deadline = time.monotonic() + 10  # written right after the step's replies
        while worker.checkpointer.written == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "a" in load_checkpoint(worker.checkpointer.path).streams
        worker.checkpointer.save = slow_save
        for rid in (2, 3):  # the CLOSE and its resend, within one batching window
            raw.send(MessageType.CLOSE, {"rid": rid, "stream": "a", "seq": 1})
        acked = []
        for _ in range(2):
            reply = raw.recv(30)
            assert reply is not None and reply.type == MessageType.ACK, reply
            assert _closed_on_disk(worker.checkpointer.path, "a"), \
                f"CLOSE (rid {reply.header['rid']}) acknowledged before it was on disk"
            acked.append(reply.header["rid"])
        assert sorted(acked) == [2, 3]
        assert worker.stats()["counts"]["duplicates_replayed"] == 1
    finally:
        raw.close()
        worker.stop()
        worker.join(10)


def test_close_is_not_acked_while_the_checkpoint_write_fails(tmp_path):
    model = build_model(SPEC, seed=4)
    worker = _durable_worker(tmp_path, model)
    raw = RawSocket(worker.start())
    save = worker.checkpointer.save
    failing = threading.Event()

    def flaky_save(*args):
        if failing.is_set():
            raise OSError("disk full")
        return save(*args)

    worker.checkpointer.save = flaky_save
    try:
        x = random_input(SPEC, 4, np.random.default_rng(1))
        raw.send(MessageType.PUSH, {"rid": 1, "stream": "a", "seq": 0}, {"chunk": x})
        assert raw.recv(60).type == MessageType.OUTPUT
        failing.set()
        raw.send(MessageType.CLOSE, {"rid": 2, "stream": "a", "seq": 1})
        assert raw.recv(1.5) is None  # not on disk: no ACK
        raw.send(MessageType.CLOSE, {"rid": 3, "stream": "a", "seq": 1})  # a client resend
        assert raw.recv(1.5) is None
        assert worker.stats()["counts"]["checkpoint_failures"] >= 2
        failing.clear()
        acked = set()
        for _ in range(2):
            reply = raw.recv(10)
            assert reply is not None and reply.type == MessageType.ACK, reply
            assert _closed_on_disk(worker.checkpointer.path, "a")
            acked.add(reply.header["rid"])
        assert acked == {2, 3}
    finally:
        raw.close()
        worker.stop()
        worker.join(10)


# ---- real processes ----------------------------------------------------------------------


def test_sigkill_mid_stream_restart_resumes_every_stream_exactly(model_file, tmp_path):
    model, path = model_file
    rng = np.random.default_rng(7)
    seqs = {f"k{i}": random_input(SPEC, int(rng.integers(150, 260)), rng) for i in range(12)}
    streams = {s: chunked(x, rng) for s, x in seqs.items()}
    args = (*FAST, "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every-steps", "5",
            "--checkpoint-every-s", "0", "--max-streams", "16")
    first = WorkerProcess.start(path, 4, *args)  # 12 streams on 4 slots: swapping too
    driver = Driver(first.endpoint, streams, 4, timeout=1.0, retries=120)
    total = sum(len(c) for c in streams.values())
    ckpt_file = tmp_path / "ckpt" / "worker.ckpt"
    while (driver.received < total // 3 or not ckpt_file.exists()) and not driver.errors:
        time.sleep(0.01)
    first.proc.kill()  # SIGKILL: no shutdown checkpoint, replies in flight are lost
    assert first.proc.wait(30) == -9
    second = WorkerProcess.start(path, 4, *args, bind=first.endpoint)
    try:
        driver.join(240)
        restored = re.search(r"restored (\d+) streams", second.log())
        assert restored and int(restored.group(1)) > 0, second.log()[-3000:]
        with streamrnn.Client(second.endpoint) as client:
            stats = client.stats()
    finally:
        assert second.stop() == 0
    assert driver.counters["timeouts_retried"] > 0  # the kill hit requests in flight
    for s, x in seqs.items():
        got = np.concatenate(driver.outputs[s])
        assert got.shape[0] == len(x), s
        np.testing.assert_allclose(got, offline(model, x), atol=TOL, err_msg=s)
    assert stats["engine"]["swaps_out"] > 0
    # the graceful stop wrote a final checkpoint holding every stream at its last seq
    final = load_checkpoint(ckpt_file)
    assert {s: r.next_seq for s, r in final.streams.items()} == {
        s: len(c) for s, c in streams.items()}
    print("client counters:", dict(driver.counters))


def test_many_more_streams_than_slots_random_arrival(model_file):
    model, path = model_file
    rng = np.random.default_rng(11)
    seqs = {f"m{i}": random_input(SPEC, int(rng.integers(20, 60)), rng) for i in range(40)}
    streams = {s: chunked(x, rng, most=9) for s, x in seqs.items()}
    with WorkerProcess.start(path, 4, *FAST, "--max-streams", "48") as worker:
        driver = Driver(worker.endpoint, streams, 5, timeout=30)
        driver.join(180)
        with streamrnn.Client(worker.endpoint) as client:
            engine = client.stats()["engine"]
            with pytest.raises(streamrnn.EngineFullError, match="worker is full"):
                for i in range(9):  # 40 live + 9 > max_streams 48
                    client.push(f"extra{i}", seqs["m0"][:2])
    assert engine["swaps_in"] > 0 and engine["swaps_out"] > 0 and engine["streams"] == 40
    for s, x in seqs.items():
        np.testing.assert_allclose(np.concatenate(driver.outputs[s]), offline(model, x), atol=TOL,
                                   err_msg=s)


def test_corrupt_checkpoint_is_refused_by_the_worker(model_file, tmp_path):
    _, path = model_file
    ckpt_dir = tmp_path / "bad"
    file = ckpt_dir / "worker.ckpt"
    save_checkpoint(file, Checkpoint("lstm.keras", [("float32", (16,))] * 4, {}))
    blob = bytearray(file.read_bytes())
    blob[-3] ^= 0x55
    file.write_bytes(bytes(blob))
    with pytest.raises(RuntimeError, match=r"refusing to start: .*corrupted") as info:
        WorkerProcess.start(path, 2, *FAST, "--no-warmup", "--checkpoint-dir", str(ckpt_dir),
                            ready_timeout=120)
    assert "exit 2" in str(info.value)
    assert file.read_bytes() == bytes(blob)  # left untouched for the operator
    with WorkerProcess.start(path, 2, *FAST, "--no-warmup", "--checkpoint-dir", str(ckpt_dir),
                             "--ignore-bad-checkpoint") as worker:
        assert "ignoring bad checkpoint" in worker.log()
        with streamrnn.Client(worker.endpoint) as client:
            assert client.open("anything")["next_seq"] == 0
    assert list(ckpt_dir.glob("worker.ckpt.bad-*"))


def test_pin_set_over_the_wire_survives_a_worker_restart(tmp_path):
    """OPEN pin_version=0, publish v1, stop and restart the worker from its checkpoint: the
    pinned stream still runs on the model file's weights, the other one on v1."""
    model_path = tmp_path / "m.keras"
    model_with_seed(0).save(model_path)
    w0, w1 = model_with_seed(0).get_weights(), model_with_seed(1).get_weights()
    pub = tmp_path / "pub"
    x = np.random.default_rng(0).standard_normal((20, D)).astype(np.float32)
    args = ("--weights-from", str(pub), "--weights-poll-s", "0", "--no-xla", "--no-warmup",
            "--checkpoint-dir", str(tmp_path / "ckpt"))
    with WorkerProcess.start(model_path, 2, *args) as worker:
        with streamrnn.Client(worker.endpoint, timeout=60) as client:
            assert client.open("pinned", pin_version=0)["pin_version"] == 0
            head = {s: client.push(s, x[:8]) for s in ("pinned", "free")}
            publish_weights(pub, w1, 1)
    assert "pinned" in load_checkpoint(tmp_path / "ckpt" / "worker.ckpt").extra["pins"]
    with WorkerProcess.start(model_path, 2, *args) as worker:
        with streamrnn.Client(worker.endpoint, timeout=60) as client:
            assert client.open("pinned")["pin_version"] == 0
            assert client.open("free")["pin_version"] is None
            tail = {s: client.push(s, x[8:]) for s in ("pinned", "free")}
    got = {s: np.concatenate([head[s], tail[s]]) for s in head}
    assert np.abs(got["pinned"] - offline_with_swap(w0, w0, x, 8)).max() <= 1e-5
    assert np.abs(got["free"] - offline_with_swap(w0, w1, x, 8)).max() <= 1e-5
