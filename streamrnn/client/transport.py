"""The client's DEALER socket and the I/O thread that owns it.

:class:`Transport` runs one background thread around one ZeroMQ DEALER socket. Given
several endpoints (replicated routers), it talks to one at a time and moves to the next
when the current one drops the connection or refuses it (a ZeroMQ socket monitor) or a
request times out there; every request in flight is then sent again to the new one
(:meth:`Streams.resend_all <streamrnn.client.streams.Streams.resend_all>`), keeping its
deadline, and the workers' reply caches and replay keep each stream exact. Any thread
may :meth:`Transport.submit` requests (a queue plus a wake-up byte on a socket pair); the
I/O thread feeds them, the replies it reads and the passing time to the pure state machine
(:class:`~streamrnn.client.streams.Streams`) and carries out the actions it answers:
sends (gathered per loop turn into BATCH envelopes when the worker takes them) and future
completions. Requests submitted from a future's callback (which runs on the I/O thread)
skip the queue and leave in the same turn as the reply that triggered them.

Example::

    streams = Streams(endpoint, timeout=30.0, retries=3, window=8, replay_buffer=4096,
                      batch=True)
    transport = Transport([endpoint, second_endpoint], streams)
    transport.submit([Request(MessageType.PING, None, {}, {}, future)])
    future.result(); transport.close()
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from streamrnn.client.requests import Action, Request, Resolve, Send
from streamrnn.client.streams import Streams
from streamrnn.codec import (
    Message,
    Part,
    batches_of,
    decode_batch,
    decode_reply,
    encode,
    encode_batch,
    is_batch,
)
from streamrnn.errors import ProtocolError, StreamRNNError
from streamrnn.protocol import MessageType

log = logging.getLogger("streamrnn.client")


# Socket monitor events that make a transport with several endpoints move on: the peer
# dropped the connection, or refused it (a retry after a failed connect).
_MOVE_ON = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
_MIN_SWITCH_S = 0.1  # at most one move per this long (all peers down: no busy loop)


def endpoint_list(endpoints: str | Iterable[str]) -> list[str]:
    """``"tcp://a:1,tcp://b:2"`` or a list of endpoints -> a non-empty list."""
    if isinstance(endpoints, str):
        endpoints = endpoints.split(",")
    found = [e.strip() for e in endpoints if e and e.strip()]
    if not found:
        raise ValueError("no endpoint given")
    return found


class Transport:
    """One DEALER socket connected to one of ``endpoints``, driven by a daemon I/O thread.

    Args:
        endpoints: the worker's (or routers') ZeroMQ endpoints: one string, a
            comma-separated string, or a list; with several, the transport moves on to the
            next when the current one fails (see the module docs).
        streams: the state machine the I/O thread feeds (used only on that thread); the
            parts it leaves unencoded leave together in BATCH envelopes at the end of
            each loop turn.
        counters: incremented by name (``batches_sent``, ``bad_replies``, ...).
        curve_server_key, curve_keypair: CURVE encryption, see :mod:`streamrnn.security`.
        context: the ZeroMQ context (default: the process-wide one).
    """

    def __init__(self, endpoints: str | Iterable[str], streams: Streams, *,
                 counters: Counter[str] | None = None, curve_server_key: Any = None,
                 curve_keypair: Any = None, context: zmq.Context | None = None):
        self.counters: Counter[str] = Counter() if counters is None else counters
        self._streams = streams
        # requests encoded in this turn of the I/O thread, sent together by _flush
        self._outgoing: list[tuple[Part, Request]] = []
        self._ctx = context or zmq.Context.instance()
        if curve_server_key is not None and curve_keypair is None:
            raise ValueError("curve_server_key needs curve_keypair (this client's keys)")
        self._curve = (curve_server_key, curve_keypair)
        self.endpoints = endpoint_list(endpoints)
        self.current = 0  # index of the endpoint in use
        self._switched_at = 0.0
        self._poller = zmq.Poller()
        self._monitor: zmq.Socket | None = None
        self._socket = self._open(self.endpoints[0])
        self._submissions: queue.SimpleQueue[list[Request] | None] = queue.SimpleQueue()
        # Requests submitted on the I/O thread itself (from a Future callback): no queue and
        # no wake-up, sent in the same loop turn as the reply that triggered them.
        self._io_ident: int | None = None
        self._local: deque[Request] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._closed = False
        self._close_lock = threading.Lock()
        self.thread = threading.Thread(target=self._io_loop, name="streamrnn-client",
                                       daemon=True)
        self.thread.start()

    # ---- any thread --------------------------------------------------------------------

    def submit(self, requests: list[Request]) -> None:
        """Hand requests to the I/O thread (raises StreamRNNError once closed)."""
        if self._closed:
            raise StreamRNNError("client is shut down")
        if threading.get_ident() == self._io_ident:
            self._local.extend(requests)
        else:
            self._submissions.put(requests)
            self._wake()

    def close(self) -> None:
        """Stop the I/O thread and close the socket; pending requests fail."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._submissions.put(None)
        self._wake()
        self.thread.join()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already a wake-up byte pending (or closing)

    # ---- sockets -----------------------------------------------------------------------

    def _open(self, endpoint: str) -> zmq.Socket:
        """A DEALER connected to ``endpoint`` (monitored when there are several), in the
        poller."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        server_key, keypair = self._curve
        if server_key is not None:
            from streamrnn.security import curve_client

            curve_client(sock, server_key, keypair)
        if len(self.endpoints) > 1:
            self._monitor = sock.get_monitor_socket(_MOVE_ON)
            self._poller.register(self._monitor, zmq.POLLIN)
        sock.connect(endpoint)
        self._poller.register(sock, zmq.POLLIN)
        return sock

    def _close_socket(self) -> None:
        self._poller.unregister(self._socket)
        if self._monitor is not None:
            self._poller.unregister(self._monitor)
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        self._socket.close(linger=0)

    def _move_on(self, now: float, why: str) -> bool:
        """Use the next endpoint (several given, and not moved in the last 0.1 s): a new
        socket, and every request in flight sent again there. False: stayed."""
        if len(self.endpoints) < 2 or now - self._switched_at < _MIN_SWITCH_S:
            return False
        old = self.endpoints[self.current]
        self._close_socket()
        self.current = (self.current + 1) % len(self.endpoints)
        self._switched_at = now
        self._socket = self._open(self.endpoints[self.current])
        self.counters["endpoint_switches"] += 1
        log.info("moving from %s to %s (%s)", old, self.endpoints[self.current], why)
        self._outgoing.clear()  # resend_all sends them again
        self._execute(self._streams.resend_all(now))
        return True

    def _read_monitor(self) -> None:
        """Monitor events of the current socket: move on when the peer is gone."""
        while self._monitor is not None:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] & _MOVE_ON:
                why = ("connection lost" if event["event"] == zmq.EVENT_DISCONNECTED
                       else "connection refused")
                self._move_on(time.monotonic(), why)
                return  # a new socket (and monitor); its events come next turn

    def _tick(self, now: float) -> None:
        """Deadlines and resends; after a timeout with several endpoints, move on (the
        resends of this tick then go to the new endpoint, with everything else)."""
        actions = self._streams.tick(now)
        if self._streams.take_timeouts() and self._move_on(now, "request timed out"):
            actions = [a for a in actions if isinstance(a, Resolve)]
        self._execute(actions)

    # ---- I/O thread --------------------------------------------------------------------

    def _io_loop(self) -> None:
        poller = self._poller
        # pyzmq's poll reports a plain socket by its file descriptor, not by the object
        wake_fd = self._wake_r.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        next_check = 0.0
        self._io_ident = threading.get_ident()
        try:
            while True:
                events = dict(poller.poll(self._wait_ms()))
                if wake_fd in events:
                    self._drain_wake()
                if self._monitor is not None and self._monitor in events:
                    self._read_monitor()
                if self._socket in events:
                    self._read_replies()  # callbacks may submit more: sent just below
                if not self._take_submissions():
                    break
                now = time.monotonic()
                if now >= next_check:
                    self._tick(now)
                    next_check = now + 0.005
                self._flush()
        except Exception as exc:  # pragma: no cover - a bug; do not leave callers hanging
            log.exception("client I/O thread failed")
            self._fail_everything(StreamRNNError(f"client I/O thread failed: {exc}"))
        finally:
            self._fail_everything(StreamRNNError("client is shut down"))
            self._close_socket()
            self._wake_r.close()
            self._wake_w.close()

    def _wait_ms(self) -> int:
        """How long the next poll may wait: until the next resend is due, at most 0.1 s,
        not at all while requests submitted on this thread wait."""
        if self._local:
            return 0
        now = time.monotonic()
        soonest = min(now + 0.1, self._streams.resend_due)
        return max(0, min(100, int((soonest - now) * 1000) + 1))

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _next_submission(self) -> list[Request] | None:
        """The next submitted requests (I/O-thread ones first); None: shut down. Raises
        queue.Empty."""
        if self._local:
            requests = list(self._local)
            self._local.clear()
            return requests
        return self._submissions.get_nowait()

    def _take_submissions(self) -> bool:
        """Hand everything submitted so far to the state machine; False: shut down."""
        requests: list[Request] = []
        while True:
            try:
                submitted = self._next_submission()
            except queue.Empty:
                break
            if submitted is None:
                self._local.extend(requests)  # never started: failed with the rest
                return False
            requests.extend(submitted)
        if requests:
            self._execute(self._streams.submit(requests, time.monotonic()))
        return True

    def _execute(self, actions: Iterable[Action]) -> None:
        for action in actions:
            if not isinstance(action, Send):
                action.apply()  # may run callbacks that submit more (to self._local)
            elif action.frames is not None:
                self._send_frames(action.frames)
            else:
                self._outgoing.append((action.part, action.request))  # sent by _flush

    def _send_alone(self, part: Part, request: Request) -> None:
        """One part of a BATCH that could not go together (alone in its group, or the
        envelope could not be encoded)."""
        try:
            frames = encode(*part)
        except ProtocolError as exc:  # e.g. a dtype that cannot travel: fail just this one
            self._execute(self._streams.on_unsendable(request, exc, time.monotonic()))
            return
        self._send_frames(frames)

    def _send_frames(self, frames: list) -> None:
        try:
            self._socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.counters["send_would_block"] += 1  # retried on timeout

    def _flush(self) -> None:
        """Send the requests of this turn: together in BATCH envelopes when there are
        several. (Failing one can release more of its stream: those go out too.)"""
        while self._outgoing:
            outgoing, self._outgoing = self._outgoing, []
            start = 0  # batches_of keeps the order: group k holds the next len(group) parts
            for group in batches_of([part for part, _ in outgoing]):
                owners = [request for _, request in outgoing[start:start + len(group)]]
                start += len(group)
                if len(group) == 1:
                    self._send_alone(group[0], owners[0])
                    continue
                try:
                    frames = encode_batch(MessageType.BATCH, group)
                except ProtocolError:  # an array that cannot travel: fail only that request
                    for part, request in zip(group, owners, strict=True):
                        self._send_alone(part, request)
                    continue
                self.counters["batches_sent"] += 1
                self._send_frames(frames)

    def _read_replies(self) -> None:
        for _ in range(10_000):
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            now = time.monotonic()  # one reading for all the replies of one message
            for part in _decode(frames):
                if isinstance(part, ProtocolError):
                    self.counters["bad_replies"] += 1
                    log.warning("undecodable reply from worker: %s", part)
                else:
                    self._execute(self._streams.on_reply(part, now))

    def _fail_everything(self, exc: BaseException) -> None:
        self._execute(self._streams.fail_all(exc))
        while True:
            try:
                requests = self._next_submission()
            except queue.Empty:
                break
            for request in requests or ():
                if not request.future.done():
                    request.future.set_exception(exc)


def _decode(frames: list) -> list[Message | ProtocolError]:
    """The replies in one message (a BATCH_REPLY holds several); an undecodable one is the
    ProtocolError that says why."""
    try:
        if is_batch(frames):
            return list(decode_batch(frames, replies=True)[1])
        return [decode_reply(frames)]
    except ProtocolError as exc:
        return [exc]


__all__ = ["Transport", "endpoint_list"]
