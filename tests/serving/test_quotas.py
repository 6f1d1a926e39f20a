"""Hostile input against a worker's shared resources: the BUSY latch, the reply cache's
bytes, and the compute time of long GENERATEs (issue 16, items 2 and 3).

Pure parts (:mod:`streamrnn.serving.busy`, :mod:`streamrnn.serving.reply_budget`,
:mod:`streamrnn.serving.quotas`) are checked with plain objects; the real paths with the
suite's shared worker (queue of 8) and one generating worker process of this module
(4 features -> 4 outputs, so outputs feed back; small reply-cache bounds).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

import streamrnn
from streamrnn.cli.process import WorkerProcess
from streamrnn.codec import Message, decode_batch, decode_reply, encode, encode_batch, is_batch
from streamrnn.protocol import MAX_CHUNK_STEPS, ErrorCode, MessageType
from streamrnn.serving.batching import GenerateGroup, Work, plan_batch
from streamrnn.serving.busy import BusyLatch
from streamrnn.serving.quotas import limit_generates, over_limits
from streamrnn.serving.sequencing import SequenceTable, Verdict
from tests.helpers.modelzoo import ModelSpec, build_model
from tests.helpers.shared_worker import shared_worker
from tests.helpers.wire_helpers import collect_replies, data

# ---- pure parts -----------------------------------------------------------------------


def test_busy_latch_drops_entries_once_the_queue_drained_past_them():
    latch = BusyLatch(capacity=4)
    latch.set("victim", 0, queued=10)
    assert latch.get("victim", taken=9) == 0
    assert latch.get("victim", taken=10) is None
    assert len(latch) == 0


def test_busy_latch_is_bounded_whatever_the_ids():
    latch = BusyLatch(capacity=100)
    for i in range(10_000):
        latch.set(f"id-{i}", 0, queued=10**9)  # the queue never drains
    assert len(latch) == 100
    assert latch.get("id-9999", taken=0) == 0 and latch.get("id-0", taken=0) is None


def _output(steps: int, width: int = 4):
    out = np.zeros((steps, width), np.float32)
    return MessageType.OUTPUT, {"steps": steps}, {"output": out}


def test_reply_cache_is_bounded_in_bytes_per_stream_and_in_all():
    table = SequenceTable(stream_bytes=1000, total_bytes=2500)
    table.applied("a", 0, _output(100))  # 1600 bytes: answered, never cached
    stale = table.check("a", 0, MessageType.PUSH)
    assert stale.verdict is Verdict.ERROR and stale.code == ErrorCode.SEQ_STALE
    assert stale.expected == 1
    for seq in range(1, 5):  # 4 x 320 bytes: the stream keeps the newest 3
        table.applied("a", seq, _output(20))
    assert table.budget.total == 960
    assert table.check("a", 1, MessageType.PUSH).verdict is Verdict.ERROR
    assert table.check("a", 4, MessageType.PUSH).verdict is Verdict.REPLAY
    for stream in "bcdefg":  # 6 streams more: the worker keeps 2500 bytes at most
        for seq in range(3):
            table.applied(stream, seq, _output(20))
    assert table.budget.total <= 2500
    assert table.check("g", 2, MessageType.PUSH).verdict is Verdict.REPLAY
    assert table.check("a", 4, MessageType.PUSH).verdict is Verdict.ERROR  # oldest out
    for stream in "abcdefg":
        table.closed(stream, 9, (MessageType.ACK, {}, {}))
    assert table.budget.total == 0


def _work(msg_type: MessageType, stream: str, seq: int, steps: int = 4) -> Work:
    header = {"v": 1, "stream": stream, "seq": seq}
    arrays = {}
    if msg_type == MessageType.GENERATE:
        header["steps"] = steps
        arrays["prompt"] = np.zeros((1, 4), np.float32)
    work = Work(b"id", Message(msg_type, header, arrays), 0.0)
    if msg_type == MessageType.PUSH:
        work.chunk = np.zeros((3, 4), np.float32)
    return work


def test_one_round_runs_at_most_the_generate_budget_and_the_pushes_go_between():
    gens = [_work(MessageType.GENERATE, f"g{i}", 0, steps=1000 - i) for i in range(4)]
    honest = _work(MessageType.PUSH, "honest", 5)
    after = _work(MessageType.PUSH, "g2", 1)  # waits for its stream's GENERATE
    batch = [*gens, honest, after]
    plan = limit_generates(plan_batch(batch, 0, group_generates=True), budget=1000)
    assert [g.works[0].stream for g in plan.before if isinstance(g, GenerateGroup)] == ["g0"]
    assert [run[0].stream for run in plan.runs] == ["honest"]
    assert plan.carry() == [*gens[1:], after]
    # small GENERATEs share a round; without a budget nothing changes
    small = [_work(MessageType.GENERATE, f"s{i}", 0, steps=10 + i) for i in range(4)]
    assert len(limit_generates(plan_batch(small, 0), budget=1000).before) == 4
    assert limit_generates(plan, budget=0) is plan


def test_over_limits_names_the_code():
    push = Message(MessageType.PUSH, {"stream": "a", "seq": 0},
                   {"chunk": np.zeros((MAX_CHUNK_STEPS + 1, 1), np.float32)})
    assert over_limits(push, 100).code == ErrorCode.TOO_LARGE
    gen = _work(MessageType.GENERATE, "a", 0, steps=101).msg
    assert over_limits(gen, 100).code == ErrorCode.BAD_VALUE
    assert over_limits(gen, 101) is None


# ---- the busy latch on a live worker ---------------------------------------------------


def _dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 30000)
    sock.connect(endpoint)
    return sock


def _resets(prefix: str, count: int, last: str | None = None, base: int = 0) -> list:
    parts = [(MessageType.RESET, {"rid": base + i, "stream": f"{prefix}-{i}", "seq": 0}, None)
             for i in range(count)]
    if last is not None:
        parts[-1] = (MessageType.RESET, {"rid": count - 1, "stream": last, "seq": 0}, None)
    return parts


def test_a_poisoned_busy_latch_clears_when_the_queue_drains():
    worker = shared_worker()  # its queue holds 8: a BATCH of 256 parts overflows it
    victim = "latch-victim"
    attacker = _dealer(worker.endpoint)
    try:
        with streamrnn.Client(worker.endpoint, timeout=8.0) as client:
            client.push(victim, data(3, 0))
            client.push(victim, data(3, 1))
            attacker.send_multipart(encode_batch(MessageType.BATCH,
                                                 _resets("latch-x", 256, last=victim)))
            replies = collect_replies(attacker, 256)
            assert replies[255].type == MessageType.BUSY  # the victim is latched at seq 0
            client.push(victim, data(3, 2))  # seq 2: served once the 8 queued were taken
        with streamrnn.Client(worker.endpoint, timeout=8.0) as fresh:
            assert fresh.open(victim)["next_seq"] == 3
            fresh.push(victim, data(3, 3))
            # many unique ids latched at once: freed as the queue drains
            for n in range(12):
                attacker.send_multipart(encode_batch(MessageType.BATCH,
                                                     _resets(f"latch-{n}", 256, base=256 * n)))
            collect_replies(attacker, 12 * 256)
            fresh.push(victim, data(3, 4))
            assert fresh.stats()["busy_latched"] < 256
            fresh.close(victim)
    finally:
        attacker.close()


# ---- a generating worker with small reply-cache bounds ---------------------------------

GEN_SPEC = ModelSpec(cell="lstm", layers=1, units=8, features=4, out=4)
MAX_GENERATE = 1000


@pytest.fixture(scope="module")
def gen_worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen-worker")
    path = tmp / "gen.keras"
    build_model(GEN_SPEC).save(path)
    process = WorkerProcess.start(
        path, 8, "--no-xla", "--max-generate-steps", str(MAX_GENERATE),
        "--reply-cache-stream-bytes", "4096", "--reply-cache-bytes", "16384",
        log_path=tmp / "worker.log")
    yield process
    process.stop()


def _prompt(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, GEN_SPEC.features)).astype(
        np.float32)


def _ask(sock: zmq.Socket, frames: list):
    sock.send_multipart(frames)
    return decode_reply(sock.recv_multipart())


def test_generate_beyond_the_worker_limit_is_refused_at_once(gen_worker):
    sock = _dealer(gen_worker.endpoint)
    try:
        pong = _ask(sock, encode(MessageType.PING, {"rid": 1}))
        assert pong.header["worker"]["generate"] is True
        assert pong.header["worker"]["max_generate_steps"] == MAX_GENERATE
        began = time.monotonic()
        reply = _ask(sock, encode(MessageType.GENERATE, {
            "rid": 2, "stream": "gen-huge", "seq": 0, "steps": 65536},
            {"prompt": _prompt(0)}))
        assert reply.type == MessageType.ERROR and reply.header["code"] == ErrorCode.BAD_VALUE
        assert reply.header["expected"] == 0
        assert time.monotonic() - began < 5.0
    finally:
        sock.close()


def _arrivals(socks: dict[str, zmq.Socket], wanted: int) -> list[tuple[str, object]]:
    """``(socket name, reply part)`` in arrival order until ``wanted`` parts came."""
    poller = zmq.Poller()
    for sock in socks.values():
        poller.register(sock, zmq.POLLIN)
    got: list[tuple[str, object]] = []
    deadline = time.monotonic() + 120
    while len(got) < wanted and time.monotonic() < deadline:
        for sock, _ in poller.poll(1000):
            name = next(n for n, s in socks.items() if s is sock)
            frames = sock.recv_multipart()
            parts = decode_batch(frames, replies=True)[1] if is_batch(frames) else [
                decode_reply(frames)]
            got += [(name, part) for part in parts]
    return got


def test_long_generates_take_turns_with_other_streams_pushes(gen_worker):
    attacker, honest = _dealer(gen_worker.endpoint), _dealer(gen_worker.endpoint)
    try:
        # distinct steps: four separate GENERATE calls, each of up to MAX_GENERATE steps
        parts = [(MessageType.GENERATE, {"rid": i, "stream": f"turns-{i}", "seq": 0,
                                         "steps": MAX_GENERATE - i}, {"prompt": _prompt(i)})
                 for i in range(4)]
        attacker.send_multipart(encode_batch(MessageType.BATCH, parts))
        honest.send_multipart(encode(MessageType.PUSH, {"rid": 9, "stream": "turns-honest",
                                                        "seq": 0}, {"chunk": _prompt(9)}))
        got = _arrivals({"attacker": attacker, "honest": honest}, 5)
        order = [(name, part.type) for name, part in got]
        assert order.count(("attacker", MessageType.OUTPUT)) == 4, order
        push_at = order.index(("honest", MessageType.OUTPUT))
        assert push_at < 4, f"the honest push waited for every GENERATE: {order}"
    finally:
        attacker.close()
        honest.close()


def test_replies_too_big_for_the_cache_are_answered_but_not_kept(gen_worker):
    sock = _dealer(gen_worker.endpoint)
    try:
        big = np.zeros((300, GEN_SPEC.features), np.float32)  # output 4800 bytes > 4096
        frames = encode(MessageType.PUSH, {"rid": 1, "stream": "cache-big", "seq": 0},
                        {"chunk": big})
        assert _ask(sock, frames).type == MessageType.OUTPUT
        again = _ask(sock, frames)
        assert again.type == MessageType.ERROR and again.header["code"] == ErrorCode.SEQ_STALE
        assert again.header["expected"] == 1
        small = encode(MessageType.PUSH, {"rid": 2, "stream": "cache-small", "seq": 0},
                       {"chunk": big[:10]})
        first, second = _ask(sock, small), _ask(sock, small)
        assert second.type == MessageType.OUTPUT
        np.testing.assert_array_equal(first.arrays["output"], second.arrays["output"])
        for i in range(20):  # 20 x 3200 bytes: the worker keeps 16384 at most
            _ask(sock, encode(MessageType.PUSH, {"rid": 10 + i, "stream": f"cache-{i}",
                                                 "seq": 0}, {"chunk": big[:200]}))
        stats = _ask(sock, encode(MessageType.STATS, {"rid": 99})).header["stats"]
        assert 0 < stats["reply_cache_bytes"] <= 16384
    finally:
        sock.close()
