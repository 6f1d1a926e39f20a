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

Several routers (``Client("tcp://r1:5555,tcp://r2:5555")`` or a list): the client talks
to one at a time and moves to the next when it drops or refuses the connection or a request
times out there, sending every unanswered request again (the workers answer duplicates
from their reply caches, and a stream whose worker died is replayed from the resend buffer
as above). ERROR ``UNAVAILABLE`` (no live worker behind the router) and ``NOT_HOLDER`` are
retried like BUSY, for at most ``timeout``.

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

from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import zmq

from streamrnn.client.requests import Request
from streamrnn.client.streams import Streams
from streamrnn.client.transport import Transport, endpoint_list
from streamrnn.protocol import (
    A_CHUNK,
    A_PROMPT,
    F_PIN,
    F_STEPS,
    F_TOKEN,
    F_VERSIONS,
    MAX_STREAM_ID_BYTES,
    MAX_TOKEN_BYTES,
    REPLY_CACHE_SIZE,
    SUPPORTED_VERSIONS,
    MessageType,
)

_UNSET = object()  # "argument not given" (None is a meaningful value)


class Client:
    """A thread-safe connection to one stream worker (or to one of several routers).

    Args:
        endpoint: the worker's ZeroMQ endpoint, e.g. ``"tcp://127.0.0.1:5555"``; or
            several routers' (a list, or comma-separated): used one at a time, moving on
            when one fails.
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
        token: a secret (1..256 UTF-8 bytes) sent with every request of every stream: a
            stream this client creates belongs to it, and a worker refuses the stream to
            requests without it (:class:`~streamrnn.ForbiddenError`). With CURVE the
            client's key owns the stream too. :meth:`set_token` sets one per stream.
    """

    def __init__(self, endpoint: str | Sequence[str], timeout: float = 30.0, retries: int = 3,
                 window: int = 8, *, replay_buffer: int = 4096, batch: bool = True,
                 curve_server_key: Any = None, curve_keypair: Any = None,
                 context: zmq.Context | None = None, token: str | None = None):
        if not 1 <= window <= REPLY_CACHE_SIZE:
            raise ValueError(f"window must be in 1..{REPLY_CACHE_SIZE}, got {window}")
        if timeout <= 0 or retries < 0:
            raise ValueError("timeout must be > 0 and retries >= 0")
        endpoints = endpoint_list(endpoint)
        self.endpoint = ",".join(endpoints)
        self.timeout = timeout
        self.retries = retries
        self.window = window
        self.replay_buffer = replay_buffer
        self.batch = batch
        self.token = None if token is None else _check_token(token)
        self._tokens: dict[str, str] = {}  # per-stream tokens (set_token)
        self.counters: Counter[str] = Counter()  # retries, busy, unmatched replies, ... (I/O)
        # the per-stream state machine, used only on the transport's I/O thread
        streams = Streams(self.endpoint, timeout, retries, window, replay_buffer, self.counters,
                          batch=batch)
        self._transport = Transport(endpoints, streams, counters=self.counters,
                                    curve_server_key=curve_server_key,
                                    curve_keypair=curve_keypair, context=context)
        self._thread = self._transport.thread

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
        requests = [Request(MessageType.PUSH, _check_stream(stream), self._token_of(stream, {}),
                             {A_CHUNK: _chunk_array(chunk)}, Future())
                    for stream, chunk in chunks.items()]
        self._transport.submit(requests)
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
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # ---- submission (any thread) -------------------------------------------------------

    def _submit(self, kind: MessageType, stream: str | None, fields: dict[str, Any],
                arrays: dict[str, np.ndarray]) -> Future:
        if stream is not None:
            fields = self._token_of(stream, fields)
        request = Request(kind, stream, fields, arrays, Future())
        self._transport.submit([request])
        return request.future

    def set_token(self, stream: str, token: str | None) -> None:
        """Send ``token`` with ``stream``'s requests from now on, instead of the client's
        ``token`` (None: the client's again). A worker checks it against the token that
        created the stream (its owner): see docs/protocol.md, stream owners."""
        if token is None:
            self._tokens.pop(_check_stream(stream), None)
        else:
            self._tokens[_check_stream(stream)] = _check_token(token)

    def _token_of(self, stream: str, fields: dict[str, Any]) -> dict[str, Any]:
        """``fields`` plus the stream's token, if it has one."""
        token = self._tokens.get(stream, self.token)
        return fields if token is None else {**fields, F_TOKEN: token}


def _chunk_array(chunk: Any) -> np.ndarray:
    array = np.asarray(chunk)
    if array.dtype == np.float64:
        array = array.astype(np.float32)  # the engine computes in float32 anyway
    return array


def _check_token(token: str) -> str:
    if not isinstance(token, str) or not 0 < len(token.encode()) <= MAX_TOKEN_BYTES:
        raise ValueError(f"tokens are non-empty str of at most {MAX_TOKEN_BYTES} UTF-8 bytes")
    return token


def _check_stream(stream: str) -> str:
    if not isinstance(stream, str) or not 0 < len(stream.encode()) <= MAX_STREAM_ID_BYTES:
        raise ValueError(f"stream ids are non-empty str of at most {MAX_STREAM_ID_BYTES} "
                         f"UTF-8 bytes, got {stream!r}")
    return stream


__all__ = ["Client"]
