"""Client: publish chunks of many streams to a stream worker and get their outputs.

One DEALER socket, owned by a background I/O thread; the public methods only enqueue
requests and return (or wait on) :class:`concurrent.futures.Future` objects, so a Client is
safe to share between threads.

Per stream, the client numbers its requests (``seq`` from 0) and keeps up to ``window`` of
them in flight (pipelining); outputs come back in order. Lost replies are retried after
``timeout`` (up to ``retries`` times): the worker answers a duplicate from its reply cache
and never applies a chunk twice. BUSY answers are retried with exponential backoff (for at
most ``timeout`` seconds). When a request fails without being applied (bad chunk, engine
full, ...), the requests after it are renumbered and resent, so the stream behaves exactly
like the in-process ``Engine``: the failed chunk is skipped, the next ones apply.

Worker restarts: a checkpointing worker reports in each reply the stream's ``durable_seq``
(everything below it is on disk). The client keeps each applied request at or above it
(``replay_buffer``); when a restarted worker (or a router's survivor) answers ``SEQ_GAP``
/ ``UNKNOWN_STREAM`` with the seq it resumed at, the client resends the buffered requests
from there, then the ones in flight, and drops the replayed outputs it already returned
(docs/protocol.md, section 5a).

Batching on the wire: requests of many streams that are ready in the same turn of the I/O
thread (a :meth:`Client.push_many`, or pushes submitted from the callbacks of one batch of
outputs) travel in one BATCH message, and the worker answers a step's outputs in one
BATCH_REPLY, once the worker has said it takes them (``"batch": true`` in OPEN's ACK). Each
part keeps its own rid, sequence number, retries and errors, so this changes the number of
messages, not the semantics. ``batch=False`` sends every request alone.

Streams live on the worker, not in the client: the first request of a stream in a Client
asks the worker where the stream stands (OPEN) and continues from there. Call
:meth:`Client.reset` to start a stream over, :meth:`Client.close` to free it.

Example::

    with Client("tcp://127.0.0.1:5555") as client:
        y = client.push("sensor-7", chunk)                 # (T, D) -> (T, output_dim)
        ys = client.push_many({"a": c1, "b": c2})          # dict of outputs
        for y in client.push_iter("sensor-7", chunks):     # pipelined, in order
            ...
        client.reset("sensor-7"); client.close("sensor-7")

Outputs are read-only arrays over the received frames (zero-copy); ``.copy()`` them to
write.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import random
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

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
from streamrnn.errors import (
    ProtocolError,
    RequestTimeoutError,
    StreamExpiredError,
    StreamRNNError,
    WorkerBusyError,
    remote_error,
)
from streamrnn.protocol import (
    A_CHUNK,
    A_OUTPUT,
    A_PROMPT,
    BATCH_PART_TYPES,
    F_CODE,
    F_DURABLE_SEQ,
    F_EXPECTED,
    F_MESSAGE,
    F_NEXT_SEQ,
    F_PIN,
    F_REQUEST_ID,
    F_RETRY_AFTER_MS,
    F_SEQ,
    F_STATS,
    F_STEPS,
    F_STREAM,
    F_VERSIONS,
    MAX_STREAM_ID_BYTES,
    PROTOCOL_VERSION,
    REPLY_CACHE_SIZE,
    SEQUENCED_TYPES,
    SUPPORTED_VERSIONS,
    ErrorCode,
    MessageType,
)

log = logging.getLogger("streamrnn.client")

# sent alone: nothing else of the same stream is in flight with them
_BARRIERS = (MessageType.OPEN, MessageType.CLOSE)

_UNSET = object()  # "argument not given" (None is a meaningful value)


@dataclass(eq=False)
class _Request:
    kind: MessageType
    stream: str | None
    fields: dict[str, Any]
    arrays: dict[str, np.ndarray]
    future: Future
    seq: int | None = None
    rid: int = -1
    deadline: float = math.inf
    timeouts: int = 0
    busy_since: float | None = None
    busy_count: int = 0
    busy_resend_at: float | None = None  # control requests: resend after a BUSY backoff
    replay: bool = False  # re-sent from the resend buffer after a worker restart


@dataclass(eq=False)
class _Stream:
    next_seq: int = 0
    inflight: deque[_Request] = field(default_factory=deque)  # sent, in seq order
    waiting: deque[_Request] = field(default_factory=deque)  # not sent yet
    resend_from: int | None = None  # go-back-N: resend in-flight requests from this seq...
    resend_at: float = 0.0  # ...at this time
    # Ask the worker for next_seq (OPEN) before sending: true for a stream this client has
    # not used yet, so that it continues the worker's numbering instead of replaying seq 0.
    needs_sync: bool = True
    # Resend buffer: applied requests at or above the worker's durable point (durable_seq in
    # its replies), in seq order, to replay if the worker restarts from its checkpoint.
    done: deque[_Request] = field(default_factory=deque)
    durable: int = 0


class Client:
    """A thread-safe connection to one stream worker.

    Args:
        endpoint: the worker's ZeroMQ endpoint, e.g. ``"tcp://127.0.0.1:5555"``.
        timeout: seconds to wait for a reply before resending (and the longest time BUSY
            answers are retried).
        retries: resends after a timeout before the request fails with
            :class:`~streamrnn.RequestTimeoutError`.
        window: requests per stream in flight at once (at most the worker's reply cache).
        replay_buffer: applied requests kept per stream beyond the worker's durable point
            (``durable_seq``), to replay after the worker restarts from a checkpoint. Only a
            checkpointing worker makes the client keep anything. When full, the oldest are
            dropped and a replay that would need them fails the stream with an error.
        batch: send the requests that are ready together in one BATCH message (when the
            worker supports it); False: one message per request.
        curve_server_key: the server's CURVE public key (a ``.key`` file or z85 key):
            encrypt and authenticate with ``curve_keypair`` (this client's ``.key_secret``
            file or a (public, secret) z85 pair), see :mod:`streamrnn.security`.
    """

    def __init__(self, endpoint: str, timeout: float = 30.0, retries: int = 3, window: int = 8,
                 *, replay_buffer: int = 4096, batch: bool = True, curve_server_key: Any = None,
                 curve_keypair: Any = None, context: zmq.Context | None = None):
        if not 1 <= window <= REPLY_CACHE_SIZE:
            raise ValueError(f"window must be in 1..{REPLY_CACHE_SIZE}, got {window}")
        if timeout <= 0 or retries < 0:
            raise ValueError("timeout must be > 0 and retries >= 0")
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        self.window = window
        self.replay_buffer = replay_buffer
        self.batch = batch
        self._peer_batches = False  # the worker said it takes BATCH envelopes
        # requests encoded in this turn of the I/O thread, sent together by _flush
        self._outgoing: list[tuple[Part, _Request]] = []
        self.counters: Counter[str] = Counter()  # retries, busy, unmatched replies, ... (I/O)
        self._ctx = context or zmq.Context.instance()
        self._socket = self._ctx.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 100_000)
        self._socket.setsockopt(zmq.RCVHWM, 100_000)
        if curve_server_key is not None:
            from streamrnn.security import curve_client

            if curve_keypair is None:
                raise ValueError("curve_server_key needs curve_keypair (this client's keys)")
            curve_client(self._socket, curve_server_key, curve_keypair)
        self._socket.connect(endpoint)
        self._submissions: queue.SimpleQueue[list[_Request] | None] = queue.SimpleQueue()
        # Requests submitted on the I/O thread itself (from a Future callback): no queue and
        # no wake-up, sent in the same loop turn as the reply that triggered them.
        self._io_ident: int | None = None
        self._local: deque[_Request] = deque()
        self._resend_due = math.inf  # earliest Stream.resend_at of a stream resending
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._rids = itertools.count(1)
        self._streams: dict[str, _Stream] = {}
        self._by_rid: dict[int, _Request] = {}
        self._control: dict[int, _Request] = {}  # PING/STATS by rid
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._io_loop, name="streamrnn-client",
                                        daemon=True)
        self._thread.start()

    # ---- public API --------------------------------------------------------------------

    def push_async(self, stream: str, chunk: Any) -> Future:
        """Queue ``chunk`` (``(T, D)`` float or ``(T,)`` int ids) for ``stream``.

        Returns a Future of the outputs ``(T, output_dim)`` float32.
        """
        return self._submit(MessageType.PUSH, _check_stream(stream), {},
                            {A_CHUNK: _chunk_array(chunk)})

    def push(self, stream: str, chunk: Any) -> np.ndarray:
        """Send one chunk and wait for its outputs ``(T, output_dim)``."""
        return self.push_async(stream, chunk).result()

    def push_many_async(self, chunks: Mapping[str, Any]) -> dict[str, Future]:
        """Queue one chunk for each of several streams, submitted together (so they leave
        in one BATCH message); a Future of the outputs per stream."""
        requests = [_Request(MessageType.PUSH, _check_stream(stream), {},
                             {A_CHUNK: _chunk_array(chunk)}, Future())
                    for stream, chunk in chunks.items()]
        self._submit_requests(requests)
        return {r.stream: r.future for r in requests}

    def push_many(self, chunks: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """One chunk for each of several streams (sent together, batched by the worker)."""
        futures = self.push_many_async(chunks)
        return {stream: future.result() for stream, future in futures.items()}

    def push_iter(self, stream: str, chunks: Iterable[Any]) -> Iterator[np.ndarray]:
        """Pipelined pushes of ``chunks`` to one stream; yields each output in order."""
        pending: deque[Future] = deque()
        for chunk in chunks:
            pending.append(self.push_async(stream, chunk))
            if len(pending) >= 2 * self.window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def reset_async(self, stream: str) -> Future:
        return self._submit(MessageType.RESET, _check_stream(stream), {}, {})

    def reset(self, stream: str) -> None:
        """Put ``stream`` back to its initial state (ordered after its earlier pushes)."""
        self.reset_async(stream).result()

    def close_async(self, stream: str) -> Future:
        return self._submit(MessageType.CLOSE, _check_stream(stream), {}, {})

    def close(self, stream: str) -> None:
        """Close ``stream`` on the worker (frees its slot; the id may be used again).

        To close the client itself use :meth:`shutdown` or a ``with`` block.
        """
        self.close_async(stream).result()

    def open(self, stream: str, pin_version: int | None | object = _UNSET) -> dict[str, Any]:
        """Ask the worker where ``stream`` stands and continue from there.

        Args:
            pin_version: run this stream with that published weights version from now on
                (``None``: unpin, follow the latest); needs a worker with ``--weights-from``.

        Returns the ACK header: ``next_seq`` (the next sequence number the worker expects),
        ``pin_version`` and ``worker`` (slots, input kind and size, output size, limits).
        """
        fields = {} if pin_version is _UNSET else {F_PIN: pin_version}
        return self._submit(MessageType.OPEN, _check_stream(stream), fields, {}).result()

    def generate(self, stream: str, prompt: Any, steps: int, sample: str = "greedy",
                 temperature: float = 1.0, top_k: int | None = None, seed: int | None = 0,
                 end_token: int | None = None) -> np.ndarray:
        """Closed-loop decoding on the worker: feed ``prompt``, then ``steps`` own outputs."""
        fields = {F_STEPS: int(steps), "sample": sample, "temperature": float(temperature),
                  "top_k": top_k, "seed": seed, "end_token": end_token}
        return self._submit(MessageType.GENERATE, _check_stream(stream), fields,
                            {A_PROMPT: np.asarray(prompt)}).result()

    def stats(self) -> dict[str, Any]:
        """The worker's counters and engine stats."""
        return self._submit(MessageType.STATS, None, {}, {}).result()

    def ping(self) -> dict[str, Any]:
        """Round trip to the worker; returns the PONG header (versions, worker facts)."""
        return self._submit(MessageType.PING, None, {F_VERSIONS: list(SUPPORTED_VERSIONS)},
                            {}).result()

    def shutdown(self) -> None:
        """Stop the I/O thread and close the socket; pending requests fail."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._submissions.put(None)
        self._wake()
        self._thread.join()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # ---- submission (any thread) -------------------------------------------------------

    def _submit(self, kind: MessageType, stream: str | None, fields: dict[str, Any],
                arrays: dict[str, np.ndarray]) -> Future:
        request = _Request(kind, stream, fields, arrays, Future())
        self._submit_requests([request])
        return request.future

    def _submit_requests(self, requests: list[_Request]) -> None:
        if self._closed:
            raise StreamRNNError("client is shut down")
        if threading.get_ident() == self._io_ident:
            self._local.extend(requests)
        else:
            self._submissions.put(requests)
            self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already a wake-up byte pending (or closing)

    # ---- I/O thread --------------------------------------------------------------------

    def _io_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        # pyzmq's poll reports a plain socket by its file descriptor, not by the object
        wake_fd = self._wake_r.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        next_check = 0.0
        self._io_ident = threading.get_ident()
        try:
            while True:
                now = time.monotonic()
                if self._local:
                    wait_ms = 0
                else:
                    soonest = min(now + 0.1, self._resend_due)
                    wait_ms = max(0, min(100, int((soonest - now) * 1000) + 1))
                events = dict(poller.poll(wait_ms))
                if wake_fd in events:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                if self._socket in events:
                    self._read_replies()  # callbacks may submit more: sent just below
                if not self._take_submissions():
                    break
                now = time.monotonic()
                if now >= next_check:
                    self._check_timers(now)
                    next_check = now + 0.005
                self._flush()
        except Exception as exc:  # pragma: no cover - a bug; do not leave callers hanging
            log.exception("client I/O thread failed")
            self._fail_everything(StreamRNNError(f"client I/O thread failed: {exc}"))
        finally:
            self._fail_everything(StreamRNNError("client is shut down"))
            self._socket.close(linger=0)
            self._wake_r.close()
            self._wake_w.close()

    def _next_submission(self) -> list[_Request] | None:
        """The next submitted requests (I/O-thread ones first); None: shut down. Raises
        queue.Empty."""
        if self._local:
            requests = list(self._local)
            self._local.clear()
            return requests
        return self._submissions.get_nowait()

    def _take_submissions(self) -> bool:
        touched: dict[str, None] = {}  # insertion-ordered: streams are sent in that order
        while True:
            try:
                requests = self._next_submission()
            except queue.Empty:
                break
            if requests is None:
                return False
            for request in requests:
                if request.stream is None:
                    request.rid = next(self._rids)
                    self._control[request.rid] = request
                    self._send(request)
                else:
                    self._streams.setdefault(request.stream, _Stream()).waiting.append(request)
                    touched[request.stream] = None
        for stream in touched:
            self._pump(self._streams[stream])
        return True

    def _pump(self, st: _Stream) -> None:
        """Send waiting requests of one stream while its window and barriers allow."""
        if st.resend_from is not None:
            return  # resend first, then new requests, to keep the stream's order
        while st.waiting:
            if st.inflight and st.inflight[-1].kind in _BARRIERS:
                return
            if st.needs_sync:
                if st.inflight:
                    return
                st.needs_sync = False
                if st.waiting[0].kind != MessageType.OPEN:
                    st.waiting.appendleft(_Request(MessageType.OPEN, st.waiting[0].stream, {},
                                                   {}, Future()))
            request = st.waiting[0]
            if request.kind in _BARRIERS and st.inflight:
                return
            if len(st.inflight) >= self.window:
                return
            st.waiting.popleft()
            if request.kind in SEQUENCED_TYPES:
                request.seq = st.next_seq
                st.next_seq += 1
            request.rid = next(self._rids)
            self._by_rid[request.rid] = request
            st.inflight.append(request)
            self._send(request)

    def _send(self, request: _Request) -> None:
        header: dict[str, Any] = {"v": PROTOCOL_VERSION, F_REQUEST_ID: request.rid,
                                  **request.fields}
        if request.stream is not None:
            header[F_STREAM] = request.stream
        if request.seq is not None:
            header[F_SEQ] = request.seq
        request.deadline = time.monotonic() + self.timeout
        part: Part = (request.kind, header, request.arrays)
        if self.batch and self._peer_batches and request.kind in BATCH_PART_TYPES:
            self._outgoing.append((part, request))  # sent at the end of this turn
        else:
            self._send_alone(part, request)

    def _send_alone(self, part: Part, request: _Request) -> None:
        try:
            frames = encode(*part)
        except ProtocolError as exc:  # e.g. a dtype that cannot travel: fail just this one
            self._finish(request, exc=exc, not_applied=True)
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
            try:
                if is_batch(frames):
                    _, parts = decode_batch(frames, replies=True)
                else:
                    parts = [decode_reply(frames)]
            except ProtocolError as exc:
                self.counters["bad_replies"] += 1
                log.warning("undecodable reply from worker: %s", exc)
                continue
            for part in parts:
                if isinstance(part, ProtocolError):
                    self.counters["bad_replies"] += 1
                    log.warning("undecodable reply from worker: %s", part)
                else:
                    self._on_reply(part)

    def _on_reply(self, msg: Message) -> None:
        rid = msg.header.get(F_REQUEST_ID)
        request = self._by_rid.get(rid) or self._control.get(rid)
        if request is None:
            self.counters["unmatched_replies"] += 1  # late duplicate or renumbered request
            return
        kind = msg.type
        worker = msg.header.get("worker")  # OPEN's ACK and PONG describe the worker
        if type(worker) is dict and worker.get("batch") is True:
            self._peer_batches = True
        if kind in (MessageType.OUTPUT, MessageType.ACK) and request.stream is not None:
            self._note_durable(request, msg)
        if kind == MessageType.BUSY:
            self._on_busy(request, msg)
        elif kind == MessageType.OUTPUT:
            self._finish(request, result=msg.arrays[A_OUTPUT])
        elif kind == MessageType.ACK:
            if request.kind == MessageType.STATS:
                self._finish(request, result=msg.header.get(F_STATS, {}))
            else:
                self._on_ack(request, msg)
        elif kind == MessageType.PONG:
            self._finish(request, result=msg.header)
        elif kind == MessageType.EXPIRED:
            self.counters["expired"] += 1
            st = self._streams.get(request.stream or "")
            if st is not None:
                st.needs_sync = True  # the worker forgot the stream: learn next_seq again
                st.done.clear()
                st.durable = 0
            self._finish(request, exc=StreamExpiredError(msg.header.get(F_MESSAGE, "expired")))
        elif kind == MessageType.ERROR:
            self._on_error(request, msg)

    def _note_durable(self, request: _Request, msg: Message) -> None:
        st = self._streams.get(request.stream or "")
        if st is None:
            return
        durable = msg.header.get(F_DURABLE_SEQ)
        if request.seq is not None:
            # no durable_seq: the worker keeps no checkpoint, so there is nothing to replay
            limit = request.seq + 1
            durable = limit if durable is None else min(int(durable), limit)
        elif durable is None:
            return
        if durable > st.durable:
            st.durable = int(durable)
            while st.done and st.done[0].seq < st.durable:
                st.done.popleft()

    def _on_ack(self, request: _Request, msg: Message) -> None:
        st = self._streams.get(request.stream or "")
        if st is not None and request.kind == MessageType.OPEN:
            st.next_seq = int(msg.header.get(F_NEXT_SEQ, 0))
            st.done.clear()
            st.durable = min(st.durable, st.next_seq)
        elif st is not None and request.kind == MessageType.CLOSE:
            st.next_seq = 0  # the worker forgot the stream; the id starts over
            st.done.clear()
            st.durable = 0
        self._finish(request, result=msg.header if request.kind == MessageType.OPEN else None)

    def _on_busy(self, request: _Request, msg: Message) -> None:
        self.counters["busy"] += 1
        now = time.monotonic()
        if request.busy_since is None:
            request.busy_since = now
        if now - request.busy_since > self.timeout:
            exc = WorkerBusyError(f"worker answered BUSY for {self.timeout:.1f} s")
            if request.stream is None:
                self._finish(request, exc=exc)
            else:
                self._fail_stream(self._streams[request.stream], exc)
            return
        base = max(msg.header.get(F_RETRY_AFTER_MS, 1), 1) / 1000
        delay = min(0.25, base * 2 ** min(request.busy_count, 8)) * (0.5 + random.random())
        request.busy_count += 1
        if request.seq is None:  # PING/STATS/OPEN: resent alone by the timer
            request.busy_resend_at = now + delay
            return
        self._schedule_resend(self._streams[request.stream], request, now + delay)

    def _on_error(self, request: _Request, msg: Message) -> None:
        code = msg.header.get(F_CODE, ErrorCode.INTERNAL)
        expected = msg.header.get(F_EXPECTED)
        st = self._streams.get(request.stream or "")
        if (st is not None and request.replay and request.seq is not None
                and expected is not None and expected > request.seq):
            # a replayed request the worker already has (e.g. SEQ_STALE): its output was
            # delivered before, so nothing is missing
            self._finish(request, result=None)
            return
        if (st is not None and code in (ErrorCode.SEQ_GAP, ErrorCode.UNKNOWN_STREAM)
                and expected is not None and request.seq is not None
                and expected < request.seq):
            # An earlier request of ours was not applied (BUSY, lost): go back to it.
            target = next((r for r in st.inflight if r.seq == expected), None)
            if target is not None:
                self.counters["go_back"] += 1
                self._schedule_resend(st, target, time.monotonic())
                return
            # The worker restarted from a checkpoint (or a survivor adopted the stream) and
            # lost what it applied after it: replay from the resend buffer.
            if self._replay(st, expected):
                return
        if st is not None and request.replay:
            self._fail_stream(st, StreamRNNError(
                f"stream {request.stream!r}: replaying seq {request.seq} after a worker "
                f"restart failed: {msg.header.get(F_MESSAGE, '')}"))
            return
        exc = remote_error(code, msg.header.get(F_MESSAGE, ""), expected)
        not_applied = request.seq is not None and expected == request.seq
        if st is not None and code in (ErrorCode.SEQ_GAP, ErrorCode.SEQ_STALE,
                                       ErrorCode.UNKNOWN_STREAM):
            st.needs_sync = True  # our numbering and the worker's disagree
        self._finish(request, exc=exc, not_applied=not_applied)

    # ---- completion, renumbering, resends (I/O thread) --------------------------------

    def _finish(self, request: _Request, result: Any = None, exc: BaseException | None = None,
                not_applied: bool = False) -> None:
        self._by_rid.pop(request.rid, None)
        self._control.pop(request.rid, None)
        st = self._streams.get(request.stream) if request.stream is not None else None
        if st is not None:
            try:
                st.inflight.remove(request)
            except ValueError:
                pass
            if not_applied and request.seq is not None:
                self._renumber_after(st, request.seq)
            elif exc is None and request.seq is not None and request.seq >= st.durable:
                self._remember(st, request)
        if not request.future.done():
            if exc is None:
                request.future.set_result(result)
            else:
                request.future.set_exception(exc)
        if st is not None:
            self._pump(st)

    def _remember(self, st: _Stream, request: _Request) -> None:
        """Keep an applied request for replay until the worker reports it durable."""
        if st.done and st.done[-1].seq > request.seq:
            st.done.append(request)
            st.done = deque(sorted(st.done, key=lambda r: r.seq))
        else:
            st.done.append(request)
        while len(st.done) > self.replay_buffer:
            st.done.popleft()
            self.counters["replay_dropped"] += 1

    def _replay(self, st: _Stream, start: int) -> bool:
        """Resend the buffered requests ``start ..`` before the in-flight ones; False if the
        buffer does not hold all of them."""
        first_inflight = min((r.seq for r in st.inflight if r.seq is not None),
                             default=st.next_seq)
        ghosts = [r for r in st.done if start <= r.seq < first_inflight]
        if [r.seq for r in ghosts] != list(range(start, first_inflight)):
            return False
        for request in ghosts:
            st.done.remove(request)
            request.replay = True
            request.timeouts = 0
            request.rid = next(self._rids)
            self._by_rid[request.rid] = request
        st.inflight.extendleft(reversed(ghosts))
        self.counters["replayed"] += len(ghosts)
        log.info("stream %r: worker resumed at seq %d; replaying %d requests", ghosts[0].stream
                 if ghosts else "", start, len(ghosts))
        st.resend_from = None
        self._schedule_resend(st, st.inflight[0], time.monotonic())
        return True

    def _renumber_after(self, st: _Stream, seq: int) -> None:
        """Request ``seq`` failed unapplied: later in-flight ones move down by one."""
        later = [r for r in st.inflight if r.seq is not None and r.seq > seq]
        st.next_seq -= 1
        if st.resend_from is not None and st.resend_from > seq:
            st.resend_from -= 1
        if not later:
            return
        self.counters["renumbered"] += len(later)
        for request in later:
            self._by_rid.pop(request.rid, None)
            request.seq -= 1
            request.rid = next(self._rids)  # replies to the old numbering are ignored
            self._by_rid[request.rid] = request
        self._schedule_resend(st, later[0], time.monotonic())

    def _schedule_resend(self, st: _Stream, first: _Request, at: float) -> None:
        if st.resend_from is None:
            st.resend_from, st.resend_at = first.seq, at
            self._resend_due = min(self._resend_due, at)
        else:
            st.resend_from = min(st.resend_from, first.seq)

    def _resend(self, st: _Stream) -> None:
        start, st.resend_from = st.resend_from, None
        for request in list(st.inflight):
            if request.seq is not None and request.seq >= start:
                self.counters["resent"] += 1
                # a fresh rid: late replies to the earlier send (e.g. SEQ_GAP from before a
                # go-back) are then ignored instead of triggering another go-back
                self._by_rid.pop(request.rid, None)
                request.rid = next(self._rids)
                self._by_rid[request.rid] = request
                self._send(request)
        self._pump(st)

    def _fail_stream(self, st: _Stream, exc: BaseException) -> None:
        """Fail everything queued for a stream; the next request re-syncs with OPEN."""
        requests = list(st.inflight) + list(st.waiting)
        st.inflight.clear()
        st.waiting.clear()
        st.resend_from = None
        st.needs_sync = True
        st.done.clear()
        for request in requests:
            self._by_rid.pop(request.rid, None)
            if not request.future.done():
                request.future.set_exception(exc)

    def _check_timers(self, now: float) -> None:
        for st in list(self._streams.values()):
            if st.resend_from is not None and now >= st.resend_at:
                self._resend(st)
            if st.inflight:
                self._check_deadline(st, st.inflight[0], now)
        for request in list(self._control.values()):
            self._check_deadline(None, request, now)
        self._resend_due = min((st.resend_at for st in self._streams.values()
                                if st.resend_from is not None), default=math.inf)

    def _check_deadline(self, st: _Stream | None, request: _Request, now: float) -> None:
        if request.busy_resend_at is not None:
            if now >= request.busy_resend_at:  # the backoff after a BUSY is over
                request.busy_resend_at = None
                self._send(request)
        elif now > request.deadline:
            self._on_timeout(st, request)

    def _on_timeout(self, st: _Stream | None, request: _Request) -> None:
        request.timeouts += 1
        if request.timeouts > self.retries:
            exc = RequestTimeoutError(
                f"no reply from {self.endpoint} for {request.kind.name} after "
                f"{self.retries + 1} tries of {self.timeout:.1f} s")
            if st is None:
                self._finish(request, exc=exc)
            else:
                self._fail_stream(st, exc)
            return
        self.counters["timeouts_retried"] += 1
        if st is None or request.seq is None:
            self._send(request)
        else:
            st.resend_from = None
            self._schedule_resend(st, request, 0.0)
            self._resend(st)

    def _fail_everything(self, exc: BaseException) -> None:
        for st in self._streams.values():
            self._fail_stream(st, exc)
        for request in list(self._control.values()):
            if not request.future.done():
                request.future.set_exception(exc)
        self._control.clear()
        while True:
            try:
                requests = self._next_submission()
            except queue.Empty:
                break
            for request in requests or ():
                if not request.future.done():
                    request.future.set_exception(exc)


def _chunk_array(chunk: Any) -> np.ndarray:
    array = np.asarray(chunk)
    if array.dtype == np.float64:
        array = array.astype(np.float32)  # the engine computes in float32 anyway
    return array


def _check_stream(stream: str) -> str:
    if not isinstance(stream, str) or not 0 < len(stream.encode()) <= MAX_STREAM_ID_BYTES:
        raise ValueError(f"stream ids are non-empty str of at most {MAX_STREAM_ID_BYTES} "
                         f"UTF-8 bytes, got {stream!r}")
    return stream


__all__ = ["Client"]
