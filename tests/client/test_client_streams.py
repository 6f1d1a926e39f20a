"""The client's stream state machine (streamrnn.client.streams) with no socket and no worker:
windows, order, errors, renumbering, go-back-N, BUSY backoff, timeouts (replay after a
worker restart: test_client_replay.py). The worker is played through tests/helpers/client_wire.py.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import Future

import numpy as np
import pytest

from streamrnn.client.requests import Request, Resolve, StreamState
from streamrnn.client.streams import busy_delay
from streamrnn.codec import decode_request
from streamrnn.errors import (
    ProtocolError,
    RemoteError,
    RemoteInvalidInputError,
    RequestTimeoutError,
    StreamRNNError,
    WorkerBusyError,
)
from streamrnn.protocol import (
    A_CHUNK,
    F_REQUEST_ID,
    F_RETRY_AFTER_MS,
    F_SEQ,
    F_STATS,
    F_STREAM,
    ErrorCode,
    MessageType,
)
from tests.helpers.client_wire import Wire, kinds, push, started

CLOSE, PUSH = MessageType.CLOSE, MessageType.PUSH


# ---- window and order ------------------------------------------------------------------


def test_first_request_of_a_stream_asks_for_next_seq_with_open_alone():
    wire = Wire()
    requests = [push() for _ in range(3)]
    wire.submit(*requests)
    assert kinds(wire.sent) == [("OPEN", None)]  # a barrier: nothing else until its ACK
    wire.open("s", next_seq=7)
    assert kinds(wire.take()) == [("PUSH", 7), ("PUSH", 8), ("PUSH", 9)]
    assert [r.seq for r in requests] == [7, 8, 9]


def test_window_limits_requests_in_flight_and_outputs_complete_in_order():
    wire = Wire(window=2)
    requests = started(wire, 5)
    first = wire.take()
    assert kinds(first) == [("PUSH", 0), ("PUSH", 1)]
    y0 = wire.output(first[0])
    assert requests[0].future.result() is y0
    assert not requests[1].future.done()
    assert kinds(wire.take()) == [("PUSH", 2)]  # one slot freed, one more sent
    wire.output(first[1])
    assert [r.future.done() for r in requests] == [True, True, False, False, False]
    assert wire.streams.stream("s").next_seq == 4


def test_each_send_has_its_own_rid_and_header():
    wire = Wire()
    started(wire, 2)
    a, b = wire.take()
    assert a.part[1][F_REQUEST_ID] != b.part[1][F_REQUEST_ID]
    assert a.part[1]["v"] == 1 and a.part[1][F_STREAM] == "s"
    assert a.part[2][A_CHUNK].shape == (1, 2)
    assert a.request.deadline == wire.now + 1.0
    message = decode_request(a.frames)  # encoded here: it travels alone
    assert message.type == PUSH and message.header[F_SEQ] == 0


def test_streams_are_independent_and_sent_in_order_of_submission():
    wire = Wire(window=1)
    wire.submit(push("b"), push("a"), push("b"))
    assert [s.part[1][F_STREAM] for s in wire.take()] == ["b", "a"]


def test_control_requests_go_at_once_and_resolve_with_their_reply():
    wire = Wire()
    ping = Request(MessageType.PING, None, {}, {}, Future())
    stats = Request(MessageType.STATS, None, {}, {}, Future())
    wire.submit(ping, stats)
    p, s = wire.take()
    assert (p.part[0], s.part[0]) == (MessageType.PING, MessageType.STATS)
    wire.answer(p, MessageType.PONG, worker={"batch": True})
    wire.answer(s, MessageType.ACK, **{F_STATS: {"steps": 3}})
    assert ping.future.result()["worker"] == {"batch": True}
    assert stats.future.result() == {"steps": 3}
    assert wire.streams.peer_batches


def test_late_or_duplicate_reply_is_counted_and_ignored():
    wire = Wire()
    (request,) = started(wire, 1)
    (send,) = wire.take()
    wire.output(send)
    wire.output(send)  # a duplicate: its rid is no longer in flight
    assert wire.counters["unmatched_replies"] == 1
    assert request.future.result()[0, 0] == 0.0


def test_close_is_a_barrier_and_starts_the_numbering_over():
    wire = Wire()
    requests = started(wire, 2, next_seq=4)
    close = Request(CLOSE, "s", {}, {}, Future())
    wire.submit(close)
    a, b = wire.take()
    assert kinds([a, b]) == [("PUSH", 4), ("PUSH", 5)]  # CLOSE waits for them
    wire.output(a)
    assert wire.take() == []
    wire.output(b)
    (c,) = wire.take()
    assert kinds([c]) == [("CLOSE", 6)]
    wire.answer(c, MessageType.ACK)
    assert close.future.result() is None and requests[1].future.done()
    assert wire.streams.stream("s").next_seq == 0
    wire.submit(push())
    assert kinds(wire.take()) == [("PUSH", 0)]  # no new OPEN: the worker forgot it


# ---- errors, renumbering and go-back-N --------------------------------------------------


def test_failed_unapplied_request_is_skipped_and_later_ones_renumbered():
    wire = Wire()
    requests = started(wire, 3)
    first = wire.take()
    old_rid = first[1].part[1][F_REQUEST_ID]
    wire.error(first[0], ErrorCode.BAD_SHAPE, expected=0)
    with pytest.raises(RemoteInvalidInputError):
        requests[0].future.result()
    assert [r.seq for r in requests[1:]] == [0, 1]
    assert first[1].request.rid != first[1].part[1][F_REQUEST_ID]
    assert wire.counters["renumbered"] == 2
    assert wire.take() == []  # resent on the next tick, in order
    wire.tick()
    resent = wire.take()
    assert kinds(resent) == [("PUSH", 0), ("PUSH", 1)]
    assert resent[0].part[1][F_REQUEST_ID] != old_rid
    wire.output(first[1])  # a reply to the old numbering
    assert wire.counters["unmatched_replies"] == 1 and not requests[1].future.done()
    wire.output(resent[0])
    wire.output(resent[1])
    assert requests[2].future.result()[0, 0] == 1.0
    assert wire.streams.stream("s").next_seq == 2


def test_sequence_gap_naming_an_earlier_seq_goes_back_to_it():
    wire = Wire()
    requests = started(wire, 4)
    first = wire.take()
    # seq 0 was lost on the way: the worker expects it still and refuses seq 2
    wire.error(first[2], ErrorCode.SEQ_GAP, expected=0)
    assert wire.counters["go_back"] == 1 and not requests[2].future.done()
    wire.tick()
    resent = wire.take()
    assert kinds(resent) == [("PUSH", 0), ("PUSH", 1), ("PUSH", 2), ("PUSH", 3)]
    assert wire.counters["resent"] == 4
    wire.error(first[3], ErrorCode.SEQ_GAP, expected=0)  # late: ignored, no second go-back
    assert wire.counters["go_back"] == 1
    for send in resent:
        wire.output(send)
    assert all(r.future.done() and r.future.exception() is None for r in requests)


def test_sequence_error_without_a_way_back_fails_and_resyncs_with_open():
    wire = Wire()
    requests = started(wire, 1)
    (send,) = wire.take()
    wire.error(send, ErrorCode.SEQ_STALE, expected=5)
    with pytest.raises(RemoteError) as info:
        requests[0].future.result()
    assert info.value.expected_seq == 5
    wire.submit(push())
    assert kinds(wire.take()) == [("OPEN", None)]


def test_gap_with_nothing_kept_to_replay_fails_the_request():
    wire = Wire()
    requests = started(wire, 1, next_seq=3)
    (send,) = wire.take()
    wire.error(send, ErrorCode.SEQ_GAP, expected=1)  # 1 and 2 are in no buffer
    with pytest.raises(RemoteError) as info:
        requests[0].future.result()
    assert info.value.code == ErrorCode.SEQ_GAP and info.value.expected_seq == 1
    assert wire.streams.stream("s").needs_sync


def test_request_that_cannot_be_encoded_fails_at_once_and_the_next_takes_its_seq():
    wire = Wire()
    bad = Request(PUSH, "s", {}, {A_CHUNK: np.zeros((1, 2), np.complex64)}, Future())
    requests = [push(), bad, push()]
    wire.submit(*requests)
    wire.open("s")
    assert kinds(wire.take()) == [("PUSH", 0), ("PUSH", 1)]
    assert isinstance(bad.future.exception(), ProtocolError)
    assert requests[2].seq == 1 and wire.counters["renumbered"] == 0


def test_batch_part_that_cannot_be_encoded_fails_and_the_later_ones_renumber():
    wire = Wire(batch=True)
    ping = Request(MessageType.PING, None, {}, {}, Future())
    wire.submit(ping)
    (send,) = wire.take()
    assert send.frames is not None  # PING never travels in a BATCH
    wire.answer(send, MessageType.PONG, worker={"batch": True})
    assert wire.streams.peer_batches
    requests = started(wire, 2)
    a, b = wire.take()
    assert a.frames is None and b.frames is None  # left for the transport to gather
    old_rid = b.request.rid
    exc = StreamRNNError("cannot travel")
    wire.run(wire.streams.on_unsendable(a.request, exc, wire.now))
    assert requests[0].future.exception() is exc
    assert requests[1].seq == 0 and requests[1].rid != old_rid
    assert wire.counters["renumbered"] == 1
    wire.tick()
    assert kinds(wire.take()) == [("PUSH", 0)]


# ---- BUSY and timeouts -------------------------------------------------------------------


def test_busy_delay_doubles_per_busy_and_is_capped():
    assert busy_delay(10, 0, 0.5) == pytest.approx(0.010)
    assert busy_delay(10, 3, 0.5) == pytest.approx(0.080)
    assert busy_delay(10, 20, 0.5) == pytest.approx(0.25)
    assert busy_delay(0, 0, 0.0) == pytest.approx(0.0005)  # at least 1 ms, half jitter


def test_busy_request_is_resent_after_its_backoff():
    wire = Wire()
    requests = started(wire, 2)
    a, b = wire.take()
    wire.answer(a, MessageType.BUSY, **{F_RETRY_AFTER_MS: 20})
    assert wire.counters["busy"] == 1
    assert wire.streams.resend_due == pytest.approx(0.020)
    wire.tick(0.010)
    assert wire.take() == []
    wire.tick(0.011)
    resent = wire.take()
    assert kinds(resent) == [("PUSH", 0), ("PUSH", 1)]  # go-back-N: b follows a again
    assert wire.streams.resend_due == float("inf")
    wire.answer(resent[0], MessageType.BUSY, **{F_RETRY_AFTER_MS: 20})
    assert wire.streams.resend_due == pytest.approx(wire.now + 0.040)  # doubled
    assert not requests[0].future.done()


def test_busy_for_longer_than_timeout_fails_the_stream():
    wire = Wire(timeout=1.0)
    requests = started(wire, 2)
    a, _ = wire.take()
    wire.answer(a, MessageType.BUSY)
    wire.tick(1.5)
    send = next(s for s in wire.take() if s.request is requests[0])
    wire.answer(send, MessageType.BUSY)
    for request in requests:
        with pytest.raises(WorkerBusyError):
            request.future.result()
    wire.submit(push())
    assert kinds(wire.take()) == [("OPEN", None)]


def test_busy_control_request_is_resent_alone_by_the_timer():
    wire = Wire()
    ping = Request(MessageType.PING, None, {}, {}, Future())
    wire.submit(ping)
    (send,) = wire.take()
    wire.answer(send, MessageType.BUSY, **{F_RETRY_AFTER_MS: 10})
    wire.tick(0.005)
    assert wire.take() == []
    wire.tick(0.006)
    (again,) = wire.take()
    assert again.part[1][F_REQUEST_ID] == send.part[1][F_REQUEST_ID]
    wire.answer(again, MessageType.PONG)
    assert ping.future.done()


def test_lost_reply_is_resent_after_timeout_then_fails_the_stream():
    wire = Wire(window=2, timeout=1.0, retries=2)
    requests = started(wire, 2)
    assert kinds(wire.take()) == [("PUSH", 0), ("PUSH", 1)]
    queued = push()
    wire.submit(queued)  # the window is full: it waits
    wire.tick(0.9)
    assert wire.take() == []
    wire.tick(0.2)  # past the first deadline: resend from the oldest
    assert kinds(wire.take()) == [("PUSH", 0), ("PUSH", 1)]
    wire.tick(1.1)
    assert kinds(wire.take()) == [("PUSH", 0), ("PUSH", 1)]
    assert wire.counters["timeouts_retried"] == 2
    wire.tick(1.1)  # retries spent
    for request in [*requests, queued]:
        with pytest.raises(RequestTimeoutError, match="tcp://worker:1 for PUSH after 3 tries"):
            request.future.result()
    assert wire.take() == []
    wire.submit(push())
    assert kinds(wire.take()) == [("OPEN", None)]


def test_control_request_timeout_fails_only_it():
    wire = Wire(timeout=1.0, retries=0)
    requests = started(wire, 1)
    (send,) = wire.take()
    ping = Request(MessageType.PING, None, {}, {}, Future())
    wire.submit(ping)
    wire.take()
    wire.tick(0.5)
    wire.output(send)
    wire.tick(0.6)
    with pytest.raises(RequestTimeoutError, match="for PING after 1 tries"):
        ping.future.result()
    assert requests[0].future.exception() is None


def test_fail_all_fails_every_stream_and_control_request():
    wire = Wire(window=1)
    requests = started(wire, 2)
    ping = Request(MessageType.PING, None, {}, {}, Future())
    wire.submit(ping)
    exc = StreamRNNError("client is shut down")
    wire.run(wire.streams.fail_all(exc))
    assert all(r.future.exception() is exc for r in [*requests, ping])


# ---- the records ---------------------------------------------------------------------------


def test_resolve_leaves_a_done_future_alone():
    future: Future = Future()
    Resolve(future, result=1).apply()
    Resolve(future, error=StreamRNNError("late")).apply()
    assert future.result() == 1
    cancelled: Future = Future()
    cancelled.cancel()
    Resolve(cancelled, result=2).apply()
    assert cancelled.cancelled()


def test_stream_state_remember_keeps_seq_order():
    st = StreamState()
    for seq in (3, 1, 2):
        request = push()
        request.seq = seq
        st.remember(request, limit=8)
    assert [r.seq for r in st.done] == [1, 2, 3]
    st.note_durable(2)
    assert [r.seq for r in st.done] == [2, 3]


def test_pure_rooms_import_no_zmq_and_no_tensorflow():
    code = ("import sys; import streamrnn.client.streams, streamrnn.client.windows, "
            "streamrnn.client.requests; "
            "print(sorted(m for m in ('zmq', 'tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
