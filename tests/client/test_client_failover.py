"""The client with several endpoints (replicated routers) and the errors it retries like
BUSY: UNAVAILABLE and NOT_HOLDER (state machine alone), moving on when an endpoint refuses,
drops the connection or stops answering (real sockets and the shared real worker)."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
import zmq

import streamrnn
from streamrnn.client.transport import endpoint_list
from streamrnn.errors import RemoteError
from streamrnn.protocol import F_REQUEST_ID, ErrorCode
from tests.helpers.client_wire import Wire, kinds, started
from tests.helpers.modelzoo import offline

TOL = 1e-5


# ---- state machine: UNAVAILABLE / NOT_HOLDER retried like BUSY --------------------------


@pytest.mark.parametrize("code", [ErrorCode.UNAVAILABLE, ErrorCode.NOT_HOLDER])
def test_unavailable_and_not_holder_are_resent_after_a_backoff(code):
    wire = Wire(timeout=1.0)
    (request,) = started(wire, 1)
    wire.error(wire.take()[0], code)
    assert not request.future.done() and wire.sent == []
    wire.tick(0.3)  # the backoff (at most 0.25 s) is over: the same seq again
    (again,) = wire.take()
    assert kinds([again]) == [("PUSH", 0)]
    wire.output(again)
    assert request.future.result().shape == (1, 1)
    assert wire.counters[f"retried_{code.name.lower()}"] == 1


def test_unavailable_for_longer_than_timeout_raises_the_remote_error():
    wire = Wire(timeout=1.0)
    (request,) = started(wire, 1)
    for _ in range(12):
        sends = wire.take()
        if not sends:
            break
        wire.error(sends[0], ErrorCode.UNAVAILABLE)
        wire.tick(0.3)
    with pytest.raises(RemoteError) as info:
        request.future.result(0)
    assert info.value.code == ErrorCode.UNAVAILABLE


def test_resend_all_renumbers_every_request_in_flight_and_keeps_deadlines():
    wire = Wire(window=3, timeout=1.0)
    requests = started(wire, 3)
    first = wire.take()
    deadlines = [r.deadline for r in requests]
    wire.now = 0.5
    wire.run(wire.streams.resend_all(wire.now))
    again = wire.take()
    assert kinds(again) == [("PUSH", 0), ("PUSH", 1), ("PUSH", 2)]
    assert {s.part[1][F_REQUEST_ID] for s in again}.isdisjoint(
        {s.part[1][F_REQUEST_ID] for s in first})
    assert [r.deadline for r in requests] == deadlines
    wire.output(first[0])  # a reply to the old numbering is ignored
    assert wire.counters["unmatched_replies"] == 1 and not requests[0].future.done()


def test_endpoint_lists():
    assert endpoint_list("tcp://a:1, tcp://b:2") == ["tcp://a:1", "tcp://b:2"]
    assert endpoint_list(["tcp://a:1"]) == ["tcp://a:1"]
    with pytest.raises(ValueError):
        endpoint_list(" , ")


# ---- real sockets -----------------------------------------------------------------------


def free_endpoint() -> str:
    """A loopback endpoint nobody listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def data(t: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(t, 5)).astype(np.float32)


def test_client_moves_on_from_a_refused_endpoint(worker):
    x = data(9, 1)
    with streamrnn.Client([free_endpoint(), worker.endpoint], timeout=5) as client:
        got = np.concatenate([client.push("fo-refused", x[:4]), client.push("fo-refused", x[4:])])
        client.close("fo-refused")
        assert client.counters["endpoint_switches"] >= 1
    np.testing.assert_allclose(got, offline(worker.model, x), atol=TOL)


def test_client_moves_on_when_its_endpoint_drops_the_connection(worker):
    """A peer that takes requests and then dies (its socket closes): the client moves to
    the next endpoint and sends the unanswered requests there; the stream stays exact."""
    ctx = zmq.Context.instance()
    fake = ctx.socket(zmq.ROUTER)
    fake.setsockopt(zmq.LINGER, 0)
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    got_one = threading.Event()

    def swallow_then_die():
        fake.setsockopt(zmq.RCVTIMEO, 10_000)
        try:
            fake.recv_multipart()  # the OPEN: never answered
            got_one.set()
        finally:
            fake.close(linger=0)

    thread = threading.Thread(target=swallow_then_die, daemon=True)
    thread.start()
    x = data(7, 2)
    with streamrnn.Client(f"tcp://127.0.0.1:{port},{worker.endpoint}", timeout=20) as client:
        y = client.push("fo-dropped", x)
        client.close("fo-dropped")
        assert got_one.is_set() and client.counters["endpoint_switches"] >= 1
    thread.join(5)
    np.testing.assert_allclose(y, offline(worker.model, x), atol=TOL)


def test_client_moves_on_when_its_endpoint_stops_answering(worker):
    """A peer that accepts the connection but never answers (a hung router): after one
    timeout the client moves on."""
    silent = zmq.Context.instance().socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        x = data(5, 3)
        with streamrnn.Client([f"tcp://127.0.0.1:{port}", worker.endpoint], timeout=0.5,
                              retries=3) as client:
            y = client.push("fo-silent", x)
            client.close("fo-silent")
            assert client.counters["endpoint_switches"] >= 1
        np.testing.assert_allclose(y, offline(worker.model, x), atol=TOL)
    finally:
        silent.close(linger=0)
