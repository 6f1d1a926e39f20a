"""The client's stream state machine after a worker restart, with no socket and no worker:
what it keeps beyond ``durable_seq`` and how it replays it (docs/protocol.md, section 5a).
"""

from __future__ import annotations

import pytest

from streamrnn.errors import StreamExpiredError, StreamRNNError
from streamrnn.protocol import F_DURABLE_SEQ, F_MESSAGE, ErrorCode, MessageType
from tests.helpers.client_wire import Wire, kinds, push, restarted, started


def test_applied_requests_are_kept_only_beyond_durable_seq():
    wire = Wire()
    started(wire, 3)
    sends = wire.take()
    for send in sends:
        wire.output(send, **{F_DURABLE_SEQ: 1})
    st = wire.streams.stream("s")
    assert [r.seq for r in st.done] == [1, 2] and st.durable == 1
    wire.submit(push())
    wire.output(wire.take()[0], **{F_DURABLE_SEQ: 3})
    assert [r.seq for r in st.done] == [3]


def test_without_durable_seq_nothing_is_kept():
    wire = Wire()
    started(wire, 2)
    for send in wire.take():
        wire.output(send)
    assert not wire.streams.stream("s").done


def test_replay_after_worker_restart_resends_kept_requests_then_in_flight_ones():
    wire = Wire()
    # the worker restarted from its checkpoint at seq 1: it lost 1 and 2
    requests, late = restarted(wire, 3, durable=1)
    delivered = [r.future.result() for r in requests]
    assert wire.counters["replayed"] == 2 and not late.future.done()
    wire.tick()
    replay = wire.take()
    assert kinds(replay) == [("PUSH", 1), ("PUSH", 2), ("PUSH", 3)]
    assert [s.request.replay for s in replay] == [True, True, False]
    for send in replay:
        wire.output(send, **{F_DURABLE_SEQ: 1})
    # the replayed outputs were delivered before: the futures keep their first result
    assert [r.future.result() for r in requests] == delivered
    assert late.future.result()[0, 0] == 3.0


def test_unknown_stream_after_restart_replays_from_seq_zero():
    wire = Wire()
    restarted(wire, 2, durable=0, code=ErrorCode.UNKNOWN_STREAM)
    wire.tick()
    assert kinds(wire.take()) == [("PUSH", 0), ("PUSH", 1), ("PUSH", 2)]


def test_replayed_request_the_worker_already_has_is_dropped_quietly():
    wire = Wire()
    _, late = restarted(wire, 2, durable=0)
    wire.tick()
    r0, r1, r2 = wire.take()
    wire.error(r0, ErrorCode.SEQ_STALE, expected=2)
    assert wire.streams.stream("s").inflight[0] is r1.request
    wire.output(r1)
    wire.output(r2)
    assert late.future.result()[0, 0] == 2.0


def test_replay_that_fails_fails_the_stream():
    wire = Wire()
    _, late = restarted(wire, 1, durable=0)
    queued = push()
    wire.tick()
    replayed, _ = wire.take()
    wire.submit(queued)
    wire.error(replayed, ErrorCode.INTERNAL)
    for request in (late, queued):
        with pytest.raises(StreamRNNError, match="replaying seq 0 after a worker restart"):
            request.future.result()
    assert wire.streams.stream("s").needs_sync


def test_replay_buffer_keeps_the_newest_and_counts_the_dropped():
    wire = Wire(replay_buffer=2)
    started(wire, 4)
    for send in wire.take():
        wire.output(send, **{F_DURABLE_SEQ: 0})
    assert [r.seq for r in wire.streams.stream("s").done] == [2, 3]
    assert wire.counters["replay_dropped"] == 2
    wire.submit(push())
    wire.error(wire.take()[0], ErrorCode.SEQ_GAP, expected=0)  # 0 and 1 are gone
    assert wire.counters["replayed"] == 0


def test_open_ack_and_expiry_reset_what_is_kept():
    wire = Wire()
    requests = started(wire, 2)
    for send in wire.take():
        wire.output(send, **{F_DURABLE_SEQ: 0})
    wire.submit(push())
    (send,) = wire.take()
    wire.answer(send, MessageType.EXPIRED, **{F_MESSAGE: "idle"})
    with pytest.raises(StreamExpiredError, match="idle"):
        send.request.future.result()
    st = wire.streams.stream("s")
    assert not st.done and st.durable == 0 and st.needs_sync
    assert all(r.future.exception() is None for r in requests)
    wire.submit(push())
    wire.open("s", next_seq=0)
    assert kinds(wire.take()) == [("PUSH", 0)]


