"""Batching on the wire: BATCH / BATCH_REPLY envelopes (docs/protocol.md, section 4a).

Codec round trips and refusals (a bad part fails alone, a bad envelope fails whole); a real
worker answering a raw BATCH part by part, with a bad part among good ones; the Client
sending BATCH messages by itself (streaming still equals offline, with the shared worker's
tiny queue answering BUSY to some parts); and a router splitting a BATCH over two workers.
"""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streamrnn
from streamrnn.cli.process import RouterProcess, WorkerProcess
from streamrnn.cluster.router import Router, RouterConfig
from streamrnn.codec import (
    Message,
    batches_of,
    decode_batch,
    decode_reply,
    encode,
    encode_batch,
    is_batch,
)
from streamrnn.errors import ProtocolError
from streamrnn.protocol import MAX_BATCH_PARTS, ErrorCode, MessageType
from tests.helpers.cluster_helpers import fresh_store_url
from tests.helpers.codec_strategies import HEADER_VALUES, STRUCTURED_HEADER, encoded
from tests.helpers.modelzoo import offline
from tests.helpers.wire_helpers import collect_replies, data, push

TOL = 1e-5


# ---- codec ----------------------------------------------------------------------------


def test_envelope_round_trip_keeps_every_part():
    chunks = [data(3, 1), np.arange(5, dtype=np.int32), data(7, 2)[:, :2]]  # last: a view
    frames = encode_batch(MessageType.BATCH, [push(f"s{i}", i, c, 10 + i)
                                              for i, c in enumerate(chunks)]
                          + [(MessageType.RESET, {"rid": 20, "stream": "r", "seq": 4}, None)])
    assert len(frames) == 3 and is_batch(frames)
    _, parts = decode_batch(frames)
    assert [p.type for p in parts] == [MessageType.PUSH] * 3 + [MessageType.RESET]
    for i, chunk in enumerate(chunks):
        assert parts[i].header["stream"] == f"s{i}" and parts[i].header["rid"] == 10 + i
        np.testing.assert_array_equal(parts[i].arrays["chunk"], chunk)
        assert parts[i].arrays["chunk"].dtype == chunk.dtype
    assert parts[3].arrays == {} and parts[3].header["seq"] == 4
    replies = encode_batch(MessageType.BATCH_REPLY, [
        (MessageType.OUTPUT, {"rid": 1, "stream": "a", "seq": 0}, {"output": data(2, 3)}),
        (MessageType.BUSY, {"rid": 2, "retry_after_ms": 5}, None)])
    _, back = decode_batch(replies, replies=True)
    assert [p.type for p in back] == [MessageType.OUTPUT, MessageType.BUSY]
    np.testing.assert_array_equal(back[0].arrays["output"], data(2, 3))
    assert not is_batch(encode(*push("a", 0, data(1, 1), 1)))


def test_a_bad_part_fails_alone():
    frames = encode_batch(MessageType.BATCH, [push("good", 0, data(2, 1), 1),
                                              push("bad", 0, data(2, 1), 2)])
    header = msgpack.unpackb(frames[1])
    header["parts"][1][1]["seq"] = -1  # out of range
    header["parts"][1][1]["arrays"]["chunk"]["dtype"] = "complex64"
    frames[1] = msgpack.packb(header)
    _, parts = decode_batch(frames)
    assert parts[0].header["stream"] == "good"
    assert isinstance(parts[1], ProtocolError) and parts[1].code == ErrorCode.BAD_VALUE
    assert parts[1].context == {"rid": 2, "stream": "bad"}
    # a PING cannot travel in a BATCH, a PUSH cannot travel in a BATCH_REPLY
    frames = encode_batch(MessageType.BATCH, [(MessageType.PING, {"rid": 3}, None)])
    assert isinstance(decode_batch(frames)[1][0], ProtocolError)
    frames = encode_batch(MessageType.BATCH_REPLY, [push("x", 0, data(1, 1), 4)])
    assert isinstance(decode_batch(frames, replies=True)[1][0], ProtocolError)


def _envelope(parts, payload=b"", v=1):
    return [bytes((MessageType.BATCH,)), msgpack.packb({"v": v, "parts": parts}), payload]


PUSH_HEADER = {"v": 1, "stream": "a", "seq": 0,
               "arrays": {"chunk": {"dtype": "float32", "shape": [2], "frame": 0}}}
BAD_ENVELOPES = {
    "no parts": (_envelope([]), ErrorCode.MALFORMED),
    "too many parts": (_envelope([[0x06, {"v": 1}, []]] * (MAX_BATCH_PARTS + 1)),
                       ErrorCode.TOO_LARGE),
    "region past the payload": (_envelope([[0x02, PUSH_HEADER, [[4, 8]]]], b"\0" * 8),
                                ErrorCode.MALFORMED),
    "negative offset": (_envelope([[0x02, PUSH_HEADER, [[-1, 8]]]], b"\0" * 8),
                        ErrorCode.MALFORMED),
    "part not a triple": (_envelope([[0x02, PUSH_HEADER]]), ErrorCode.MALFORMED),
    "parts not a list": (_envelope({"a": 1}), ErrorCode.MALFORMED),
    "missing payload": (_envelope([[0x03, {"v": 1, "stream": "a", "seq": 0}, []]])[:2],
                        ErrorCode.MALFORMED),
    "bad version": (_envelope([[0x03, {"v": 1, "stream": "a", "seq": 0}, []]], v=99),
                    ErrorCode.UNSUPPORTED_VERSION),
    "bad msgpack": ([bytes((MessageType.BATCH,)), b"\xc1\xc1", b""], ErrorCode.MALFORMED),
}


@pytest.mark.parametrize("case", sorted(BAD_ENVELOPES))
def test_a_bad_envelope_is_refused_whole(case):
    frames, code = BAD_ENVELOPES[case]
    with pytest.raises(ProtocolError) as info:
        decode_batch(frames)
    assert info.value.code == code, info.value


def test_batches_of_splits_by_count_and_bytes():
    parts = [push(f"s{i}", 0, np.zeros(100, np.float32), i) for i in range(10)]
    assert [len(g) for g in batches_of(parts, max_parts=4)] == [4, 4, 2]
    assert [len(g) for g in batches_of(parts, max_bytes=1000)] == [2] * 5
    big = [push("big", 0, np.zeros(1000, np.float32), 99)]
    assert [len(g) for g in batches_of(big + parts[:1], max_bytes=1000)] == [1, 1]


REGIONS = st.lists(st.lists(st.integers(-2, 80), min_size=2, max_size=2), max_size=5)
PART = st.tuples(st.sampled_from([0x01, 0x02, 0x03, 0x07, 0x08, 0x81, 0x87, 300]),
                 STRUCTURED_HEADER, REGIONS | HEADER_VALUES).map(list)
ENVELOPES = st.tuples(
    st.sampled_from([bytes((MessageType.BATCH,)), bytes((MessageType.BATCH_REPLY,)), b"\x02"]),
    st.fixed_dictionaries({"v": st.sampled_from([1, 2]),
                           "parts": st.lists(PART | HEADER_VALUES, max_size=4) | HEADER_VALUES}),
    st.lists(st.binary(max_size=64), max_size=2),
).map(lambda t: [t[0], encoded(t[1]), *t[2]])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ENVELOPES)
def test_fuzz_envelopes_give_parts_or_a_clean_error(frames):
    for replies in (False, True):
        try:
            header, parts = decode_batch(frames, replies=replies)
        except ProtocolError as exc:
            assert isinstance(exc.code, ErrorCode) and isinstance(exc.context, dict)
            continue
        assert len(parts) == len(header["parts"]) >= 1
        for part in parts:
            assert isinstance(part, Message | ProtocolError)
            if isinstance(part, Message):
                assert all(isinstance(a, np.ndarray) for a in part.arrays.values())


# ---- a real worker --------------------------------------------------------------------


def test_worker_answers_each_part_and_a_bad_one_alone(worker, dealer):
    x = {s: data(12, i) for i, s in enumerate(("ba", "bb", "bc"))}
    nan = data(4, 9)
    nan[1, 2] = np.nan
    # the shared worker's queue holds 8: keep the envelope below it (no BUSY here)
    dealer.send_multipart(encode_batch(MessageType.BATCH, [
        push("ba", 0, x["ba"][:5], 1), push("bb", 0, x["bb"][:5], 2),
        push("bc", 0, nan, 3), push("ba", 1, x["ba"][5:], 4)]))
    got = collect_replies(dealer, 4)
    assert got[3].type is MessageType.ERROR and got[3].header["code"] == ErrorCode.NON_FINITE
    assert got[3].header["expected"] == 0  # nothing of "bc" was applied
    assert got[1].type is got[2].type is got[4].type is MessageType.OUTPUT
    # the next envelope: "bc" goes on from seq 0, "bb" from seq 1
    dealer.send_multipart(encode_batch(MessageType.BATCH, [
        push("bc", 0, x["bc"], 5), push("bb", 1, x["bb"][5:], 6)]))
    more = collect_replies(dealer, 2)
    np.testing.assert_allclose(np.concatenate([got[1].arrays["output"], got[4].arrays["output"]]),
                               offline(worker.model, x["ba"]), atol=TOL)
    np.testing.assert_allclose(np.concatenate([got[2].arrays["output"], more[6].arrays["output"]]),
                               offline(worker.model, x["bb"]), atol=TOL)
    np.testing.assert_allclose(more[5].arrays["output"], offline(worker.model, x["bc"]),
                               atol=TOL)
    # a broken envelope: one ERROR, and the worker keeps serving
    dealer.send_multipart(BAD_ENVELOPES["region past the payload"][0])
    error = decode_reply(dealer.recv_multipart())
    assert error.type is MessageType.ERROR and error.header["code"] == ErrorCode.MALFORMED
    dealer.send_multipart(encode(*push("bd", 0, data(2, 5), 7)))
    assert collect_replies(dealer, 1)[7].type is MessageType.OUTPUT
    dealer.send_multipart(encode_batch(MessageType.BATCH, [
        (MessageType.CLOSE, {"rid": 8 + i, "stream": s, "seq": seq}, None)
        for i, (s, seq) in enumerate((("ba", 2), ("bb", 2), ("bc", 1), ("bd", 1)))]))
    assert {p.type for p in collect_replies(dealer, 4).values()} == {MessageType.ACK}


def test_client_batches_and_streaming_still_equals_offline(worker):
    """12 streams, push_many rounds with uneven chunks and a reset: the client sends BATCH
    messages (more parts than the worker's queue of 8, so some parts are answered BUSY and
    resent), and every stream equals the offline model."""
    rng = np.random.default_rng(5)
    x = {f"cb{i}": data(40, 50 + i) for i in range(12)}
    cuts = {s: np.sort(rng.choice(np.arange(1, 40), 3, replace=False)) for s in x}
    outs: dict[str, list[np.ndarray]] = {s: [] for s in x}
    with streamrnn.Client(worker.endpoint, timeout=5, retries=20) as client:
        before = client.stats()["counts"]
        for r in range(4):
            chunks = {s: np.split(v, cuts[s])[r] for s, v in x.items()}
            for s, y in client.push_many(chunks).items():
                outs[s].append(y)
            if r == 1:
                client.reset("cb3")
                outs["cb3"].clear()
        after = client.stats()["counts"]
        assert client.counters["batches_sent"] >= 4, client.counters
        print("client counters:", dict(client.counters))
        for s in x:
            client.close(s)
    assert after.get("requests_batch", 0) - before.get("requests_batch", 0) >= 4
    for s, v in x.items():
        expected = offline(worker.model, v[cuts[s][1]:] if s == "cb3" else v)
        np.testing.assert_allclose(np.concatenate(outs[s]), expected, atol=TOL, err_msg=s)


def test_client_with_batch_off_sends_single_messages(worker):
    with streamrnn.Client(worker.endpoint, timeout=5, retries=20, batch=False) as client:
        outs = client.push_many({f"nb{i}": data(3, i) for i in range(4)})
        assert client.counters["batches_sent"] == 0
        for i in range(4):
            client.close(f"nb{i}")
    for i in range(4):
        np.testing.assert_allclose(outs[f"nb{i}"], offline(worker.model, data(3, i)),
                                   atol=TOL)


def test_router_answers_each_part_and_refuses_a_broken_envelope(redis_url):
    """No workers behind the router: each part of a BATCH gets its own ERROR UNAVAILABLE
    (matched by its rid); a broken envelope gets one ERROR MALFORMED."""
    router = Router(RouterConfig(bind="tcp://127.0.0.1:0", store=fresh_store_url(redis_url)))
    endpoint = router.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(endpoint)
    try:
        sock.send_multipart(BAD_ENVELOPES["negative offset"][0])
        error = decode_reply(sock.recv_multipart())
        assert error.type is MessageType.ERROR and error.header["code"] == ErrorCode.MALFORMED
        sock.send_multipart(encode_batch(MessageType.BATCH, [
            push("ra", 0, data(2, 1), 31), push("rb", 0, data(3, 2), 32)]))
        got = collect_replies(sock, 2)
        assert {rid: (m.type, m.header["code"], m.header["stream"]) for rid, m in got.items()} == {
            31: (MessageType.ERROR, ErrorCode.UNAVAILABLE, "ra"),
            32: (MessageType.ERROR, ErrorCode.UNAVAILABLE, "rb")}
    finally:
        sock.close()
        router.stop()
        router.join(5)


def test_router_splits_a_batch_over_its_workers(worker, tmp_path, redis_url):
    x = {f"rb{i}": data(20, 80 + i) for i in range(8)}
    url = fresh_store_url(redis_url)
    with RouterProcess.start("--store", url) as router:
        workers = [WorkerProcess.start(worker.model_path, 4, "--no-xla", "--max-bucket", "16",
                                       "--name", f"w{i}", "--store", url)
                   for i in range(2)]
        try:
            with streamrnn.Client(router.endpoint, timeout=5, retries=20) as client:
                deadline = time.monotonic() + 60
                while len(client.stats()["router"]["workers"]) < 2:
                    assert time.monotonic() < deadline, "workers did not take their leases"
                    time.sleep(0.05)
                first = client.push_many({s: v[:8] for s, v in x.items()})
                second = client.push_many({s: v[8:] for s, v in x.items()})
                stats = client.stats()["router"]
                assert client.counters["batches_sent"] >= 2
        finally:
            for process in workers:
                process.stop()
    assert stats["counts"].get("requests_batch", 0) >= 2, stats
    assert all(w["assigned"] > 0 for w in stats["workers"].values()), stats
    for s, v in x.items():
        np.testing.assert_allclose(np.concatenate([first[s], second[s]]),
                                   offline(worker.model, v), atol=TOL, err_msg=s)
