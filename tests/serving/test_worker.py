"""End-to-end: a real worker process on 127.0.0.1, real sockets, a real TF model.

Streaming equals offline through the socket for many client threads; duplicates are never
applied twice; every kind of bad input gets an ERROR with the right code and leaves the
other streams correct; BUSY is answered when the queue is full; SIGTERM exits 0.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

import streamrnn
from streamrnn.cli.process import WorkerProcess
from streamrnn.codec import decode_reply, encode
from streamrnn.protocol import MAX_FRAME_BYTES, ErrorCode, MessageType
from tests.helpers.modelzoo import offline
from tests.helpers.shared_worker import SLOTS, SPEC

TOL = 1e-5


def roundtrip(sock, frames):
    sock.send_multipart(frames)
    return decode_reply(sock.recv_multipart())


def push_frames(stream, seq, chunk, rid=1):
    return encode(MessageType.PUSH, {"rid": rid, "stream": stream, "seq": seq},
                  {"chunk": chunk})


def data(steps, seed):
    return np.random.default_rng(seed).standard_normal((steps, SPEC.features)).astype(
        np.float32)


def _plan_chunks(rng, names, steps):
    """Random cut points per stream (chunks of 1..39 steps), and a mid-stream reset for
    every third stream with more than two chunks: ``(cuts, resets)``."""
    plans, resets = {}, {}
    for name in names:
        cuts = [0]
        while cuts[-1] < steps:
            cuts.append(min(steps, cuts[-1] + int(rng.integers(1, 40))))
        plans[name] = cuts
        if len(cuts) > 3 and int(name.split("-")[1]) % 3 == 0:
            resets[name] = cuts[len(cuts) // 2]
    return plans, resets


def _drive(client, name, x, cuts, reset_at):
    """Push ``x`` as stream ``name`` in the planned chunks, pipelined (with a RESET before
    the chunk that starts at ``reset_at``); returns the outputs in order."""
    futures = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        if reset_at == a:
            client.reset_async(name)
        futures.append(client.push_async(name, x[a:b]))
    return [f.result() for f in futures]


def test_streaming_equals_offline_many_threads(worker):
    """12 streams, 6 threads sharing one client + 6 with their own, random chunks, resets."""
    rng = np.random.default_rng(1)
    steps = 120
    streams = {f"mt-{i}": data(steps, 100 + i) for i in range(12)}
    plans, resets = _plan_chunks(rng, streams, steps)
    results: dict[str, list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def drive(client, name):
        try:
            results[name] = _drive(client, name, streams[name], plans[name], resets.get(name))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with streamrnn.Client(worker.endpoint, timeout=60) as shared:
        clients = [shared if i % 2 == 0 else streamrnn.Client(worker.endpoint, timeout=60)
                   for i in range(len(streams))]
        threads = [threading.Thread(target=drive, args=(c, n))
                   for c, n in zip(clients, streams, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for client in clients:
            if client is not shared:
                client.shutdown()
        for name in streams:  # free the slots for the other tests
            shared.close(name)
    assert not errors, errors
    for name, x in streams.items():
        got = np.concatenate(results[name])
        cut = resets.get(name, 0)
        if cut:
            np.testing.assert_allclose(got[:cut], offline(worker.model, x[:cut]), atol=TOL)
        np.testing.assert_allclose(got[cut:], offline(worker.model, x[cut:]), atol=TOL)


def test_duplicate_is_answered_from_cache_not_applied_twice(worker, dealer):
    x = data(30, 7)
    first = roundtrip(dealer, push_frames("dup", 0, x[:10], rid=10))
    again = roundtrip(dealer, push_frames("dup", 0, x[:10], rid=11))
    assert first.type is again.type is MessageType.OUTPUT
    assert again.header["rid"] == 11 and again.header["seq"] == 0
    np.testing.assert_array_equal(first.arrays["output"], again.arrays["output"])
    nxt = roundtrip(dealer, push_frames("dup", 1, x[10:30], rid=12))
    got = np.concatenate([first.arrays["output"], nxt.arrays["output"]])
    np.testing.assert_allclose(got, offline(worker.model, x), atol=TOL)
    roundtrip(dealer, encode(MessageType.CLOSE, {"rid": 13, "stream": "dup", "seq": 2}))
    retried_close = roundtrip(dealer, encode(MessageType.CLOSE,
                                             {"rid": 14, "stream": "dup", "seq": 2}))
    assert retried_close.type is MessageType.ACK and retried_close.header["rid"] == 14


def _header(**fields):
    return msgpack.packb({"v": 1, "rid": 99, **fields})


X3 = np.zeros((3, SPEC.features), np.float32)
BAD_INPUTS = {
    "random_bytes": ([os.urandom(50)], ErrorCode.MALFORMED),
    "two_random_frames": ([b"\x02", os.urandom(40)], ErrorCode.MALFORMED),
    "truncated_array": ([*push_frames("bad", 0, X3)[:2], b"\0" * 5], ErrorCode.BAD_SHAPE),
    "missing_array_frame": (push_frames("bad", 0, X3)[:2], ErrorCode.MALFORMED),
    "unknown_type": ([b"\x7f", _header(stream="bad", seq=0)], ErrorCode.MALFORMED),
    "bad_msgpack": ([b"\x02", b"\xc1\xc1"], ErrorCode.MALFORMED),
    "header_not_map": ([b"\x02", msgpack.packb([1, 2])], ErrorCode.MALFORMED),
    "bool_seq": ([b"\x03", _header(stream="bad", seq=True)], ErrorCode.MALFORMED),
    "too_many_frames": ([b"\x06", _header()] + [b""] * 8, ErrorCode.TOO_LARGE),
    "header_too_large": ([b"\x06", _header(pad=["x" * 4000] * 20)], ErrorCode.TOO_LARGE),
    "dtype_not_allowed": ([b"\x02", _header(stream="bad", seq=0, arrays={
        "chunk": {"dtype": "complex64", "shape": [1, 5], "frame": 0}}), b"\0" * 40],
        ErrorCode.BAD_DTYPE),
    "int_chunk_for_float_model": (push_frames("bad", 0, np.zeros((3, 5), np.int32)),
                                  ErrorCode.BAD_DTYPE),
    "wrong_width": (push_frames("bad", 0, np.zeros((3, 4), np.float32)), ErrorCode.BAD_SHAPE),
    "three_dims": (push_frames("bad", 0, np.zeros((1, 3, 5), np.float32)),
                   ErrorCode.BAD_SHAPE),
    "nan": (push_frames("bad", 0, np.full((3, 5), np.nan, np.float32)), ErrorCode.NON_FINITE),
    "empty_chunk": (push_frames("bad", 0, np.zeros((0, 5), np.float32)),
                    ErrorCode.EMPTY_CHUNK),
    "unknown_stream_reset": ([b"\x03", _header(stream="nobody", seq=0)],
                             ErrorCode.UNKNOWN_STREAM),
    "unknown_stream_push_seq_5": (push_frames("nobody", 5, X3), ErrorCode.UNKNOWN_STREAM),
    "negative_seq": ([b"\x03", _header(stream="bad", seq=-1)], ErrorCode.BAD_VALUE),
    "seq_too_large": ([b"\x03", _header(stream="bad", seq=2**64 - 1)], ErrorCode.BAD_VALUE),
    "unsupported_version": ([b"\x03", msgpack.packb({"v": 7, "stream": "bad", "seq": 0})],
                            ErrorCode.UNSUPPORTED_VERSION),
}


@pytest.fixture(scope="module")
def healthy_stream(worker):
    """A stream fed before the bad inputs, continued after each one."""
    client = streamrnn.Client(worker.endpoint, timeout=60)
    x = data(200, 3)
    state = {"pos": 10, "outputs": [client.push("healthy", x[:10])]}
    yield client, x, state
    np.testing.assert_allclose(np.concatenate(state["outputs"]),
                               offline(worker.model, x[: state["pos"]]), atol=TOL)
    client.close("healthy")
    client.shutdown()


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_error_and_worker_stays_correct(worker, dealer, healthy_stream, case):
    frames, code = BAD_INPUTS[case]
    reply = roundtrip(dealer, frames)
    assert reply.type is MessageType.ERROR, reply.header
    assert reply.header["code"] == code, reply.header
    assert reply.header["message"]
    client, x, state = healthy_stream
    pos = state["pos"]
    state["outputs"].append(client.push("healthy", x[pos:pos + 7]))
    state["pos"] = pos + 7


def test_seq_gap_names_expected_and_errors_are_counted(worker, dealer):
    roundtrip(dealer, push_frames("gap", 0, X3))
    reply = roundtrip(dealer, push_frames("gap", 4, X3))
    assert reply.header["code"] == ErrorCode.SEQ_GAP and reply.header["expected"] == 1
    assert "expected 1" in reply.header["message"]
    roundtrip(dealer, encode(MessageType.CLOSE, {"stream": "gap", "seq": 1}))
    with streamrnn.Client(worker.endpoint) as client:
        errors = client.stats()["errors"]
    assert errors["SEQ_GAP"] >= 1 and errors["MALFORMED"] >= 1


def test_oversized_frame_disconnects_only_that_peer(worker, dealer):
    big = zmq.Context.instance().socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(worker.endpoint)
    big.send_multipart([b"\x02", _header(stream="big", seq=0), b"\0" * (MAX_FRAME_BYTES + 8)])
    time.sleep(0.5)
    big.close()
    reply = roundtrip(dealer, push_frames("after-big", 0, X3))
    assert reply.type is MessageType.OUTPUT
    roundtrip(dealer, encode(MessageType.CLOSE, {"stream": "after-big", "seq": 1}))


def test_raw_tcp_garbage_does_not_hurt(worker, dealer):
    host, port = worker.endpoint.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(os.urandom(4096))
    assert roundtrip(dealer, encode(MessageType.PING, {"rid": 5})).type is MessageType.PONG


def test_ping_negotiates_version(dealer):
    pong = roundtrip(dealer, encode(MessageType.PING, {"rid": 1, "versions": [1, 2, 3]}))
    assert pong.type is MessageType.PONG and pong.header["version"] == 1
    assert pong.header["worker"]["input_dim"] == SPEC.features
    err = roundtrip(dealer, encode(MessageType.PING, {"rid": 2, "versions": [5]}))
    assert err.header["code"] == ErrorCode.UNSUPPORTED_VERSION and err.header["versions"] == [1]


def test_busy_when_queue_full_is_retried_by_client(worker, dealer):
    streams = [f"busy-{i}" for i in range(SLOTS)]
    for seq in range(4):
        for name in streams:
            dealer.send_multipart(push_frames(name, seq, data(8, seq), rid=seq))
    replies = [decode_reply(dealer.recv_multipart()) for _ in range(4 * SLOTS)]
    kinds = {r.type for r in replies}
    assert MessageType.BUSY in kinds, "a queue of 8 must overflow with 64 requests at once"
    # nothing was applied out of order: every stream's applied seqs are a prefix 0..k-1
    for name in streams:
        applied = sorted(r.header["seq"] for r in replies
                         if r.type is MessageType.OUTPUT and r.header["stream"] == name)
        assert applied == list(range(len(applied)))
    with streamrnn.Client(worker.endpoint) as client:  # the client takes over from next_seq
        for name in streams:
            client.push(name, data(4, 9))
            client.close(name)
        assert client.stats()["counts"]["busy"] > 0


def test_client_skips_bad_chunk_like_the_engine(worker):
    x = data(20, 5)
    with streamrnn.Client(worker.endpoint) as client:
        good1 = client.push_async("skip", x[:8])
        bad = client.push_async("skip", np.zeros((2, 9), np.float32))
        good2 = client.push_async("skip", x[8:20])
        with pytest.raises(streamrnn.InvalidInputError):
            bad.result()
        got = np.concatenate([good1.result(), good2.result()])
        client.close("skip")
        with pytest.raises(streamrnn.UnknownStreamError):
            client.reset("never-opened")
    np.testing.assert_allclose(got, offline(worker.model, x), atol=TOL)


def _thread_cpu_seconds(native_id: int) -> float:
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_idle_client_io_thread_sleeps(worker):
    """After traffic, an idle Client's I/O thread waits in poll instead of spinning (it once
    polled its wake-up socket by object while pyzmq reports it by fd: a core burnt for
    good after the first request)."""
    with streamrnn.Client(worker.endpoint) as client:
        client.push("idle-cpu", data(4, 8))
        time.sleep(0.2)
        before = _thread_cpu_seconds(client._thread.native_id)
        time.sleep(1.0)
        busy = _thread_cpu_seconds(client._thread.native_id) - before
        client.close("idle-cpu")
    assert busy < 0.2, f"idle client I/O thread used {busy:.2f} CPU-s in 1 s"


def test_generate_on_a_feature_model_is_refused_cleanly(worker):
    with streamrnn.Client(worker.endpoint) as client:
        with pytest.raises(streamrnn.RemoteError) as info:
            client.generate("gen", X3, steps=3)
        assert info.value.code in (ErrorCode.NOT_SUPPORTED, ErrorCode.BAD_VALUE)
        client.push("gen", X3)  # the stream is still usable
        client.close("gen")


@pytest.fixture(scope="module")
def own_worker(worker):
    """A second worker (expiring idle streams after 1 s) that the tests stop themselves."""
    process = WorkerProcess.start(worker.model_path, 4, "--no-xla", "--idle-timeout-s", "1")
    yield process
    process.stop()


def test_idle_stream_expires(worker, own_worker):
    with streamrnn.Client(own_worker.endpoint) as client:
        client.push("idle", X3)
        time.sleep(2.5)
        with pytest.raises(streamrnn.StreamExpiredError):
            client.push("idle", X3)
        fresh = client.push("idle", data(5, 1))  # starts over from the initial state
    np.testing.assert_allclose(fresh, offline(worker.model, data(5, 1)), atol=TOL)


def test_sigterm_finishes_in_flight_work_and_exits_zero(worker, own_worker):
    x = data(64, 11)
    client = streamrnn.Client(own_worker.endpoint, timeout=60)
    client.push("last", x[:1])
    futures = [client.push_async("last", x[i:i + 9]) for i in range(1, 64, 9)]
    time.sleep(0.05)
    own_worker.proc.send_signal(15)
    assert own_worker.proc.wait(60) == 0
    outputs = []
    for future in futures:
        try:
            outputs.append(future.result(timeout=2))
        except Exception:  # noqa: BLE001 - not yet received when the signal came
            break
    client.shutdown()
    if outputs:
        got = np.concatenate(outputs)
        np.testing.assert_allclose(got, offline(worker.model, x)[1:1 + len(got)], atol=TOL)
    assert "stopped cleanly" in own_worker.log()
