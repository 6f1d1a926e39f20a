"""StreamWorker: an Engine behind a ZeroMQ ROUTER socket (the serving loop of a worker).

Threads (zmq sockets are not thread-safe, so each socket has one owner):

* **I/O thread** owns the ROUTER socket. It receives and decodes requests (a BATCH
  envelope into its parts, each then treated as a request of its own), checks PUSH chunks
  (``engine.validate``), answers PING and malformed messages itself, puts work on a bounded
  queue (full -> BUSY), and encodes and sends every reply the compute thread puts in its
  outbox (woken by a frame on an inproc PUSH/PULL pair); the replies to BATCH parts leave
  in one BATCH_REPLY per client and drain. Its work overlaps with the compiled step, which
  runs without the GIL.
* **compute thread** owns the Engine (which is not thread-safe). It takes all work that
  arrives within the batching window, checks sequence numbers (exactly-once, see
  :mod:`streamrnn.serving.sequencing`), groups PUSHes of distinct streams into one
  ``engine.push_many`` call per round (and GENERATEs of distinct streams with the same
  options into one ``engine.generate_many`` call), and hands the replies to the outbox.

Within one batch the requests of a stream keep their order: its n-th PUSH goes into the
n-th round, and its RESET/CLOSE/OPEN/GENERATE run before the PUSHes of the round that
follows its previous PUSH. Only the first round runs; later rounds are carried into the
next batch (ahead of newly arrived requests), so each step is filled with as many distinct
streams as possible. With ``WorkerConfig.coalesce_steps`` (the worker CLI's default), a
stream's PUSHes of the later rounds that directly follow its first one join it in the
step as one longer slice (see ``StreamWorker._coalesce``); each still gets its own reply.

Example::

    worker = StreamWorker(Engine.from_keras("m.keras", slots=64),
                          WorkerConfig(bind="tcp://127.0.0.1:0"))
    endpoint = worker.start()        # "tcp://127.0.0.1:40123"
    ...
    worker.stop(); worker.join()     # finishes queued work and replies first
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
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
    decode_request,
    encode,
    encode_batch,
    is_batch,
)
from streamrnn.errors import (
    InvalidInputError,
    NotSupportedError,
    ProtocolError,
    StreamRNNError,
)
from streamrnn.metrics import Metrics
from streamrnn.protocol import (
    A_CHUNK,
    A_OUTPUT,
    A_PROMPT,
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
    GENERATE_OPTIONS,
    MAX_CHUNK_STEPS,
    MAX_FRAME_BYTES,
    MAX_MESSAGE_BYTES,
    REPLY_CACHE_SIZE,
    SEQUENCED_TYPES,
    SUPPORTED_VERSIONS,
    ErrorCode,
    MessageType,
    error_code_name,
    negotiate_version,
)
from streamrnn.serving.durability import WorkerCheckpointer
from streamrnn.serving.sequencing import CachedReply, SequenceTable, Verdict
from streamrnn.serving.sockets import bind_client_socket

log = logging.getLogger("streamrnn.worker")

_worker_ids = itertools.count()
# One-frame messages on the pipe from the compute thread to the I/O thread:
_STOP_FRAME = b""  # the compute thread is done (after its last replies)
_WAKE_FRAME = b"r"  # replies are waiting in the outbox
_DURABLE_REPLIES = (MessageType.OUTPUT, MessageType.ACK)  # carry durable_seq when durable


@dataclass
class WorkerConfig:
    """Settings of one stream worker."""

    bind: str = "tcp://127.0.0.1:5555"
    batch_window_us: int = 500  # how long the compute loop waits to fill a batch
    coalesce_steps: int = 0  # run a stream's queued consecutive PUSHes, up to this many
    # timesteps in all, in one step (0: one PUSH per stream per step; see _coalesce)
    max_queue: int = 4096  # requests waiting for the compute thread; beyond -> BUSY
    max_batch: int = 4096  # requests taken per compute iteration
    idle_timeout_s: float = 0.0  # expire streams idle this long (0: never)
    max_frame_bytes: int = MAX_FRAME_BYTES  # ZMQ_MAXMSGSIZE on the ROUTER
    busy_retry_after_ms: int = 5
    metrics_port: int | None = None  # serve Prometheus /metrics here (0: any free port)
    checkpoint_dir: str | None = None  # write/restore checkpoints here (None: not durable)
    checkpoint_every_steps: int = 0  # write after this many batched steps (0: not by count)
    checkpoint_every_s: float = 0.0  # write when this much time passed (0: not by time)
    name: str = "worker"  # this worker's name: its checkpoint is <checkpoint_dir>/<name>.ckpt
    curve_secret_key: str | None = None  # CURVE server key file (.key_secret); None: plain
    curve_allow: str | None = None  # allowed client public keys: a .key file or a directory
    model_name: str = ""


@dataclass(slots=True)
class _Work:
    identity: bytes
    msg: Message
    received: float
    chunk: np.ndarray | None = None  # validated PUSH chunk
    invalid: StreamRNNError | None = None  # why the chunk is unusable
    batched: bool = False  # came in a BATCH envelope: its reply goes in a BATCH_REPLY

    @property
    def stream(self) -> str:
        return self.msg.header[F_STREAM]

    @property
    def seq(self) -> int:
        return self.msg.header[F_SEQ]

    @property
    def rid(self) -> int | None:
        return self.msg.header.get(F_REQUEST_ID)


@dataclass
class _Round:
    before: list[_Work] = field(default_factory=list)  # RESET/CLOSE/OPEN/GENERATE, in order
    pushes: list[_Work] = field(default_factory=list)  # at most one per stream


class StreamWorker:
    """Serves ``engine`` on ``config.bind`` until :meth:`stop`."""

    def __init__(self, engine: Any, config: WorkerConfig, context: zmq.Context | None = None):
        self.engine = engine
        self.config = config
        self._ctx = context or zmq.Context.instance()
        self._queue: queue.Queue[_Work] = queue.Queue(maxsize=config.max_queue)
        self._seq = SequenceTable()
        self._stop_requested = threading.Event()
        self._reading_stopped = threading.Event()
        self._busy_latch: dict[str, int] = {}  # stream -> lowest seq answered BUSY (I/O thread)
        self._stats_lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._started = time.monotonic()
        self._threads: list[threading.Thread] = []
        self.endpoint: str | None = None
        self._pipe_address = f"inproc://streamrnn-replies-{next(_worker_ids)}"
        # requests taken but left for the next step (a stream's second chunk, and everything
        # of that stream after it), so every step can be filled with fresh streams
        self._carry: list[_Work] = []
        self.metrics = Metrics("worker")
        self.metrics.slots_total.set(engine.slots)
        self.metrics_port: int | None = None
        self._engine_swaps = {"in": 0, "out": 0}
        self.checkpointer: WorkerCheckpointer | None = None
        if config.checkpoint_dir:
            self.checkpointer = WorkerCheckpointer(
                config.checkpoint_dir, config.name, config.model_name,
                config.checkpoint_every_steps, config.checkpoint_every_s)
        self._held: list[tuple[_Work, CachedReply]] = []  # CLOSE ACKs waiting for a checkpoint
        self._held_retry_at = 0.0  # after a failed write: when to write again for them
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        # Replies go from the compute thread to the I/O thread through this outbox, with at
        # most one wake-up frame on the pipe per drain: the I/O thread encodes and sends them
        # while the compute thread runs the next step.
        self._outbox: deque[tuple[bytes, MessageType, dict[str, Any], dict | None, bool]] = (
            deque())
        self._outbox_signalled = False
        self._auth: Any = None  # the ZAP authenticator thread when CURVE is on

    # ---- durability --------------------------------------------------------------------

    def restore_checkpoint(self) -> int:
        """Before :meth:`start`: resume the streams of this worker's checkpoint file.

        Returns how many streams were restored (0 without a file). A corrupt, truncated or
        foreign file raises :class:`~streamrnn.serving.checkpoint.CheckpointError`; nothing loads.
        """
        if self.checkpointer is None:
            return 0
        return self.checkpointer.restore(self.engine, self._seq)

    def call_in_compute(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the compute thread between steps (it owns the engine)."""
        future: Future = Future()
        self._calls.put((fn, future))
        return future

    def adopt(self, path: str, streams: list[str] | None = None) -> Future:
        """Take over ``streams`` of another worker's checkpoint file (failover); the Future
        gives the adopted ids once they are in this worker's own checkpoint."""
        def run() -> list[str]:
            if self.checkpointer is None:
                raise NotSupportedError("this worker has no --checkpoint-dir")
            adopted = self.checkpointer.adopt(path, streams, self.engine, self._seq)
            self._checkpoint()
            log.info("adopted %d streams from %s", len(adopted), path)
            return adopted
        return self.call_in_compute(run)

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except Exception as exc:  # reported to the caller
                future.set_exception(exc)

    def _checkpoint(self) -> bool:
        assert self.checkpointer is not None
        try:
            self.checkpointer.save(self.engine, self._seq)
        except Exception:
            # a failed write leaves the previous file in place; durable_seq does not advance
            log.exception("writing checkpoint %s failed", self.checkpointer.path)
            self._count("checkpoint_failures")
            return False
        self._count("checkpoints")
        return True

    def _after_batch(self) -> None:
        """Refresh the gauges; periodic checkpoint, then the CLOSE ACKs that waited for one.

        The ACKs are sent only after a successful write: if it fails they stay held and the
        write is retried after the next batch (at most once a second while idle).
        """
        self._update_gauges()  # after every batch: pushes, resets, closes and expiries
        ckpt = self.checkpointer
        if ckpt is None:
            return
        if self._held and time.monotonic() < self._held_retry_at:
            return
        if (self._held or ckpt.due()) and not self._checkpoint():
            self._held_retry_at = time.monotonic() + 1.0
            return
        self._send_held()

    def _send_held(self) -> None:
        held, self._held = self._held, []
        for work, reply in held:
            self._send(work, *reply)

    def _close_pending(self, stream: str) -> bool:
        """True while ``stream``'s CLOSE is applied but not yet in a checkpoint."""
        return any(w.stream == stream and w.msg.type == MessageType.CLOSE for w, _ in self._held)

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> str:
        """Bind, start the I/O and compute threads, and return the bound endpoint."""
        router, self._auth = bind_client_socket(
            self._ctx, self.config.bind, self.config.max_frame_bytes, linger_ms=2000,
            curve_secret_key=self.config.curve_secret_key, curve_allow=self.config.curve_allow)
        self.endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port)
        pull = self._ctx.socket(zmq.PULL)
        pull.bind(self._pipe_address)
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)  # never block or drop between our own threads
        push.connect(self._pipe_address)
        self._threads = [
            threading.Thread(target=self._io_loop, args=(router, pull), name="streamrnn-io",
                             daemon=True),
            threading.Thread(target=self._compute_loop, args=(push,), name="streamrnn-compute",
                             daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self.endpoint

    def stop(self) -> None:
        """Stop reading new requests; queued work is finished and answered, then threads end."""
        self._stop_requested.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for both threads; True if they ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        return not any(t.is_alive() for t in self._threads)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    # ---- stats -------------------------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._counts[key] += n
        metrics = self.metrics
        if key.startswith("requests_"):
            metrics.requests.labels(type=key.removeprefix("requests_")).inc(n)
        elif key == "busy":
            metrics.busy.inc(n)
        elif key == "expired_streams":
            metrics.expiries.inc(n)
        elif key == "checkpoints":
            metrics.checkpoints.inc(n)
        elif key == "batches":
            metrics.steps.inc(n)
        elif key == "timesteps":
            metrics.record_timesteps(n)

    def _count_error(self, code: ErrorCode | int) -> None:
        name = error_code_name(int(code))
        with self._stats_lock:
            self._errors[name] += 1
        self.metrics.errors.labels(code=name).inc()

    def _update_gauges(self) -> None:
        """Refresh stream/slot/swap/weights metrics from the engine (compute thread)."""
        stats = self.engine.stats()
        self.metrics.streams.set(stats["streams"])
        self.metrics.slots_in_use.set(stats["slots"] - stats["free_slots"])
        for direction in ("in", "out"):
            total = stats.get(f"swaps_{direction}", 0)
            self.metrics.swaps.labels(direction=direction).inc(
                total - self._engine_swaps[direction])
            self._engine_swaps[direction] = total
        version = getattr(self.engine, "weights_version", None)
        if isinstance(version, int):
            self.metrics.weights_version.set(version)

    def stats(self) -> dict[str, Any]:
        """Counters of the worker plus the engine's stats (compute thread only)."""
        with self._stats_lock:
            counts, errors = dict(self._counts), dict(self._errors)
        return {
            "uptime_s": round(time.monotonic() - self._started, 3),
            "queue_depth": self._queue.qsize(),
            "queue_capacity": self.config.max_queue,
            "batch_window_us": self.config.batch_window_us,
            "sequenced_streams": len(self._seq),
            "counts": counts,
            "errors": errors,
            "engine": _plain(self.engine.stats()),
            "checkpoint_dir": self.config.checkpoint_dir,
            "checkpoint": None if self.checkpointer is None else {
                "path": str(self.checkpointer.path), "written": self.checkpointer.written,
                "bytes": self.checkpointer.last_bytes,
                "seconds": round(self.checkpointer.last_seconds, 6),
                "streams": len(self.checkpointer.durable)},
        }

    def describe(self) -> dict[str, Any]:
        """Facts a client needs (sent in PONG and OPEN's ACK)."""
        return {
            "slots": self.engine.slots,
            "input_kind": self.engine.input_kind,
            "input_dim": self.engine.input_dim,
            "output_dim": self.engine.output_dim,
            "model": self.config.model_name,
            "reply_cache": REPLY_CACHE_SIZE,
            "max_chunk_steps": MAX_CHUNK_STEPS,
            "max_frame_bytes": self.config.max_frame_bytes,
            "max_message_bytes": MAX_MESSAGE_BYTES,
            "generate": hasattr(self.engine, "generate"),
            "batch": True,  # takes BATCH envelopes (docs/protocol.md)
        }

    # ---- I/O thread --------------------------------------------------------------------

    def _io_loop(self, router: zmq.Socket, pull: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        reading = True
        try:
            while True:
                if reading and self._stop_requested.is_set():
                    poller.unregister(router)
                    reading = False
                    self._reading_stopped.set()
                events = dict(poller.poll(50))
                if pull in events and self._forward_replies(router, pull):
                    break
                if reading and router in events:
                    for _ in range(1000):  # bounded so replies are not starved
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_request(router, frames)
        except Exception:  # pragma: no cover - a bug; keep the process from hanging
            log.exception("I/O thread failed")
            self._reading_stopped.set()
            raise
        finally:
            router.close()
            pull.close()
            if self._auth is not None:
                self._auth.stop()

    def _forward_replies(self, router: zmq.Socket, pull: zmq.Socket) -> bool:
        """Encode and send every reply in the outbox; True when the compute thread is done."""
        done = False
        while True:
            try:
                frame = pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            done = done or frame == _STOP_FRAME
        self._outbox_signalled = False  # before draining: a reply added later wakes us again
        # replies to requests that came in envelopes leave in one BATCH_REPLY per client
        batched: dict[bytes, list[Part]] = {}
        while True:
            try:
                identity, msg_type, header, arrays, in_batch = self._outbox.popleft()
            except IndexError:
                break
            if in_batch:
                batched.setdefault(identity, []).append((msg_type, header, arrays))
            else:
                self._route(router, [identity, *encode(msg_type, header, arrays)])
        for identity, parts in batched.items():
            self._reply_batch(router, identity, parts)
        return done

    def _reply_batch(self, router: zmq.Socket, identity: bytes, parts: list[Part]) -> None:
        for group in batches_of(parts):
            if len(group) == 1:
                self._route(router, [identity, *encode(*group[0])])
            else:
                self._route(router, [identity, *encode_batch(MessageType.BATCH_REPLY, group)])

    def _route(self, router: zmq.Socket, frames: list) -> None:
        try:
            router.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            # ROUTER_MANDATORY: the peer is gone (EHOSTUNREACH) or its pipe is full
            # (EAGAIN). The client retries and gets the reply from the cache.
            key = "replies_unroutable" if exc.errno == errno.EHOSTUNREACH else "replies_dropped"
            self._count(key)
            log.debug("reply not sent (%s): %s", key, exc)

    def _reply_now(self, router: zmq.Socket, identity: bytes, msg_type: MessageType,
                   header: dict[str, Any]) -> None:
        self._route(router, [identity, *encode(msg_type, header)])

    def _on_request(self, router: zmq.Socket, frames: list) -> None:
        received = time.monotonic()
        identity = frames[0].bytes
        body = frames[1:]
        if is_batch(body):
            self._on_batch(router, identity, body, received)
            return
        try:
            msg = decode_request(body)
        except ProtocolError as exc:
            self._reply_now(router, identity, MessageType.ERROR, self._malformed(exc))
            return
        self._count(f"requests_{msg.type.name.lower()}")
        if msg.type == MessageType.PING:
            self._on_ping(router, identity, msg)
            return
        busy = self._enqueue(_Work(identity, msg, received))
        if busy is not None:
            self._reply_now(router, identity, MessageType.BUSY, busy)

    def _on_batch(self, router: zmq.Socket, identity: bytes, body: list,
                  received: float) -> None:
        """A BATCH envelope: each part is queued like a request of its own; the parts
        answered here (malformed, BUSY) go back together in one BATCH_REPLY."""
        try:
            _, parts = decode_batch(body)
        except ProtocolError as exc:
            self._reply_now(router, identity, MessageType.ERROR, self._malformed(exc))
            return
        counts: Counter[str] = Counter({"requests_batch": 1})
        replies: list[Part] = []
        for part in parts:
            if isinstance(part, ProtocolError):
                replies.append((MessageType.ERROR, self._malformed(part), None))
                continue
            counts[f"requests_{part.type.name.lower()}"] += 1
            busy = self._enqueue(_Work(identity, part, received, batched=True))
            if busy is not None:
                replies.append((MessageType.BUSY, busy, None))
        for key, n in counts.items():
            self._count(key, n)
        if replies:
            self._reply_batch(router, identity, replies)

    def _malformed(self, exc: ProtocolError) -> dict[str, Any]:
        """Count a request that could not be decoded; the header of its ERROR reply."""
        self._count("malformed")
        self._count_error(exc.code)
        log.debug("malformed request: %s", exc)
        header = {**exc.context, F_CODE: int(exc.code), F_MESSAGE: str(exc)}
        if exc.code == ErrorCode.UNSUPPORTED_VERSION:
            header[F_VERSIONS] = list(SUPPORTED_VERSIONS)
        return header

    def _enqueue(self, work: _Work) -> dict[str, Any] | None:
        """Queue a decoded request for the compute thread; the header of a BUSY reply if the
        queue is full (or the stream is latched busy), else None."""
        msg = work.msg
        sequenced = msg.type in SEQUENCED_TYPES
        stream = msg.header.get(F_STREAM)
        latched = self._busy_latch.get(stream) if sequenced else None
        # Once a request of a stream was answered BUSY, later ones of that stream are too
        # until the client resends from the first, so that nothing is applied out of order.
        if latched is None or msg.header[F_SEQ] <= latched:
            if msg.type == MessageType.PUSH:
                # here, not on the compute thread: it overlaps with the running step
                self._validate_chunk(work)
            try:
                self._queue.put_nowait(work)
            except queue.Full:
                pass
            else:
                if latched is not None:
                    del self._busy_latch[stream]
                return None
            if sequenced:
                self._busy_latch[stream] = msg.header[F_SEQ]
        self._count("busy")
        header = _echo(msg)
        header[F_RETRY_AFTER_MS] = self.config.busy_retry_after_ms
        return header

    def _validate_chunk(self, work: _Work) -> None:
        """Check a PUSH's chunk (engine.validate reads only fixed engine facts, so any
        thread may call it): sets ``work.chunk`` or ``work.invalid``."""
        try:
            work.chunk = self.engine.validate(work.msg.arrays[A_CHUNK])
        except InvalidInputError as exc:
            work.invalid = exc
        except Exception as exc:  # a bug in a check: answer this request, keep serving
            log.exception("checking the chunk of stream %r failed", work.stream)
            work.invalid = InvalidInputError(f"chunk could not be checked: "
                                             f"{type(exc).__name__}: {exc}", ErrorCode.INTERNAL)

    def _on_ping(self, router: zmq.Socket, identity: bytes, msg: Message) -> None:
        offered = msg.header.get(F_VERSIONS) or [msg.header["v"]]
        chosen = negotiate_version(offered)
        if chosen is None:
            self._count_error(ErrorCode.UNSUPPORTED_VERSION)
            self._reply_now(router, identity, MessageType.ERROR, {
                **_echo(msg), F_CODE: int(ErrorCode.UNSUPPORTED_VERSION),
                F_MESSAGE: f"no common protocol version: offered {offered}, supported "
                           f"{list(SUPPORTED_VERSIONS)}",
                F_VERSIONS: list(SUPPORTED_VERSIONS),
            })
            return
        self._reply_now(router, identity, MessageType.PONG, {
            **_echo(msg), F_VERSIONS: list(SUPPORTED_VERSIONS), "version": chosen,
            "worker": self.describe(),
        })

    # ---- compute thread ----------------------------------------------------------------

    def _compute_loop(self, pipe: zmq.Socket) -> None:
        self._pipe = pipe
        window = self.config.batch_window_us / 1e6
        next_expiry = time.monotonic() + 1.0
        try:
            while True:
                self._run_calls()
                if self._carry:
                    batch, self._carry = self._carry, []
                    self._process(self._take_batch(batch, 0.0))
                    self._after_batch()
                    continue
                try:
                    first = self._queue.get(timeout=0.05)
                except queue.Empty:
                    if self._reading_stopped.is_set() and self._queue.empty():
                        # graceful stop: everything applied is kept
                        if self.checkpointer is not None and self._checkpoint():
                            self._send_held()
                        break
                else:
                    self._process(self._take_batch([first], window))
                if self.config.idle_timeout_s > 0 and time.monotonic() >= next_expiry:
                    self._expire_idle()
                    next_expiry = time.monotonic() + 1.0
                self._after_batch()
        except Exception:  # pragma: no cover - a bug; still let the I/O thread finish
            log.exception("compute thread failed")
        finally:
            pipe.send(_STOP_FRAME)
            pipe.close(linger=-1)

    def _take_batch(self, batch: list[_Work], window: float) -> list[_Work]:
        deadline = time.monotonic() + window
        while len(batch) < self.config.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _expire_idle(self) -> None:
        expired = self._seq.expire_idle(self.config.idle_timeout_s)
        for stream in expired:
            where = "never held"
            if stream in self.engine:
                where = "resident" if stream in self.engine.table else "swapped out"
                self.engine.close(stream)  # frees its slot or its host-memory copy
            self._count("expired_streams")
            log.info("stream %r (%s) expired after %.1f s idle", stream, where,
                     self.config.idle_timeout_s)
        if expired and self.checkpointer is not None:
            self._checkpoint()  # a restart must not bring expired streams back

    def _process(self, batch: list[_Work]) -> None:
        rounds: list[_Round] = []
        next_round: dict[str, int] = {}
        for work in batch:
            if work.msg.type == MessageType.STATS:
                self._send(work, MessageType.ACK, {F_STATS: self.stats()})
                continue
            stream = work.stream
            index = next_round.get(stream, 0)
            while len(rounds) <= index:
                rounds.append(_Round())
            if work.msg.type == MessageType.PUSH:
                rounds[index].pushes.append(work)
                next_round[stream] = index + 1
            else:
                rounds[index].before.append(work)
        if not rounds:
            return
        self._apply_before(rounds[0].before)
        runs = self._coalesce(rounds)
        taken = {id(w) for run in runs for w in run}
        put_back = {id(w) for w in self._apply_pushes(runs)}
        later = {id(w) for r in rounds[1:] for w in (*r.before, *r.pushes)}
        carry = (later - taken) | put_back
        if carry:
            self._carry = [w for w in batch if id(w) in carry]

    def _coalesce(self, rounds: list[_Round]) -> list[list[_Work]]:
        """The PUSH runs of this step: each round-0 PUSH, followed by the same stream's
        PUSHes of the next rounds when they can share its step.

        A queued PUSH joins its stream's run when it is valid, its seq follows the run's
        last, no RESET/CLOSE/OPEN/GENERATE of the stream comes between them, and the run
        stays within ``config.coalesce_steps`` timesteps. The step then carries a longer
        slice of each stream for the same per-step cost (dispatch, packing, replies): under
        backlog, throughput moves toward that of long chunks, and each chunk still gets its
        own reply. Runs are cut to the padded length ``B`` (a power of two) that the chunks
        fill best, the longest among equals, so coalescing never adds masked timesteps.
        """
        runs = [[work] for work in rounds[0].pushes]
        limit = self.config.coalesce_steps
        if limit <= 0 or len(rounds) == 1:
            return runs
        blocked = [{w.stream for w in r.before} for r in rounds]
        pushes = [{w.stream: w for w in r.pushes} for r in rounds]
        valid = [run for run in runs if run[0].invalid is None]  # a PUSH has chunk xor invalid
        for run in valid:
            stream, total = run[0].stream, len(run[0].chunk)
            for i in range(1, len(rounds)):
                follower = pushes[i].get(stream)
                if (stream in blocked[i] or follower is None or follower.invalid is not None
                        or follower.seq != run[-1].seq + 1
                        or total + len(follower.chunk) > limit):
                    break
                run.append(follower)
                total += len(follower.chunk)
        if not any(len(run) > 1 for run in valid):
            return runs
        longest_first = max(len(run[0].chunk) for run in valid)
        best_fill, best_length = 0.0, longest_first
        length = 1
        while length <= limit:
            if length >= longest_first:
                used = sum(_prefix(run, length)[1] for run in valid)
                fill = used / (length * len(valid))
                if fill >= best_fill:
                    best_fill, best_length = fill, length
            length *= 2
        for run in valid:
            del run[_prefix(run, best_length)[0]:]
        return runs

    # ---- applying requests (compute thread) -------------------------------------------

    def _admit(self, work: _Work) -> int | None:
        """Sequence check; answers duplicates/errors itself. Returns the expected seq or None."""
        decision = self._seq.check(work.stream, work.seq, work.msg.type)
        if decision.verdict is Verdict.APPLY:
            return decision.expected
        if decision.verdict is Verdict.REPLAY:
            self._count("duplicates_replayed")
            assert decision.reply is not None
            msg_type, header, arrays = decision.reply
            if work.msg.type == MessageType.CLOSE and self._close_pending(work.stream):
                # a resent CLOSE (same batch as the first, or the write failed): its ACK
                # too must wait until the close is on disk
                self._held.append((work, decision.reply))
            else:
                self._send(work, msg_type, header, arrays)
        elif decision.verdict is Verdict.EXPIRED:
            self._count("expired_replies")
            self._send(work, MessageType.EXPIRED, {
                F_STREAM: work.stream, F_SEQ: work.seq, F_EXPECTED: decision.expected,
                F_MESSAGE: decision.message})
        else:
            assert decision.code is not None
            self._send_error(work, decision.code, decision.message, decision.expected)
        return None

    def _set_pin(self, stream: str, version: int | None) -> None:
        """Pin ``stream`` to a published weights version (None: follow the latest)."""
        if not hasattr(self.engine, "pin"):
            raise NotSupportedError("weights version pins need a worker that follows published "
                                    "weights (streamrnn worker --weights-from DIR)")
        if version is None:
            self.engine.unpin(stream)
            return
        try:
            self.engine.pin(stream, version)
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidInputError(f"cannot pin {stream!r} to weights version {version}: {exc}",
                                    ErrorCode.BAD_VALUE) from exc

    def _apply_before(self, works: list[_Work]) -> None:
        """RESET/CLOSE/OPEN/GENERATE of a round, in order per stream; the GENERATEs of
        distinct streams with the same options run in one ``engine.generate_many`` call."""
        if not hasattr(self.engine, "generate_many"):
            for work in works:
                self._apply_single(work)
            return
        groups: dict[tuple, dict[str, _Work]] = {}
        # streams pinned to different weights versions go in different calls, so each call
        # is one engine.generate_many that refuses bad input before changing any state
        pinned = getattr(self.engine, "pinned", lambda stream: None)

        def flush() -> None:
            for options, group in groups.items():
                self._apply_generates(options, group)
            groups.clear()

        for work in works:
            if any(work.stream in group for group in groups.values()):
                flush()  # this stream's earlier GENERATE must be applied first
            if work.msg.type != MessageType.GENERATE:
                self._apply_single(work)
            elif self._admit(work) is not None:
                key = (_generate_options(work.msg.header), pinned(work.stream))
                groups.setdefault(key, {})[work.stream] = work
        flush()

    def _apply_generates(self, key: tuple, group: dict[str, _Work]) -> None:
        """Run admitted GENERATEs of distinct streams sharing options and pin in one call."""
        if len(group) == 1:
            (work,) = group.values()
            self._apply_admitted(work, work.seq)
            return
        (steps, rest), _ = key
        kwargs = dict(rest)
        seeds = {s: int(w.msg.header.get("seed") or 0) for s, w in group.items()}
        prompts = {s: w.msg.arrays[A_PROMPT] for s, w in group.items()}
        try:
            outputs = self.engine.generate_many(prompts, steps=steps, seed=seeds, **kwargs)
        except (StreamRNNError, ValueError):
            # refused before any state changed (a bad prompt, no room for all): run each
            # alone, so every request gets its own answer
            for work in group.values():
                self._apply_admitted(work, work.seq)
            return
        except Exception as exc:
            log.exception("batched GENERATE of %d streams failed", len(group))
            for work in group.values():
                self._send_error(work, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}",
                                 work.seq)
            return
        self._count("generate_calls")
        self._count("applied_generate", len(group))
        for stream, work in group.items():
            reply = _generate_reply(work, outputs[stream])
            self._seq.applied(stream, work.seq, reply)
            self._send(work, *reply)

    def _apply_single(self, work: _Work) -> None:
        msg_type = work.msg.type
        stream = work.stream
        if msg_type == MessageType.OPEN:
            if F_PIN in work.msg.header:
                try:
                    self._set_pin(stream, work.msg.header[F_PIN])
                except StreamRNNError as exc:
                    self._send_error(work, exc.code, str(exc))
                    return
            next_seq = self._seq.next_seq(stream)
            pinned = getattr(self.engine, "pinned", None)
            self._send(work, MessageType.ACK, {F_STREAM: stream, F_NEXT_SEQ: next_seq,
                                               F_PIN: pinned(stream) if pinned else None,
                                               "worker": self.describe()})
            return
        expected = self._admit(work)
        if expected is not None:
            self._apply_admitted(work, expected)

    def _apply_admitted(self, work: _Work, expected: int) -> None:
        """Apply a sequenced RESET/CLOSE/GENERATE that passed the sequence check."""
        msg_type = work.msg.type
        stream = work.stream
        seq = work.seq
        try:
            if msg_type == MessageType.RESET:
                if stream in self.engine:  # a stream without a slot is in its initial state
                    self.engine.reset(stream)
                reply: CachedReply = (MessageType.ACK,
                                      {F_STREAM: stream, F_SEQ: seq, F_NEXT_SEQ: seq + 1}, {})
                self._seq.applied(stream, seq, reply)
            elif msg_type == MessageType.CLOSE:
                if stream in self.engine:
                    self.engine.close(stream)
                reply = (MessageType.ACK, {F_STREAM: stream, F_SEQ: seq, F_NEXT_SEQ: 0}, {})
                self._seq.closed(stream, seq, reply)
                if self.checkpointer is not None:
                    # ACK only once the close is on disk: a restart must not resurrect
                    # the stream under an id the client may already reuse from seq 0
                    self._count("applied_close")
                    self._held.append((work, reply))
                    return
            else:
                reply = self._generate(work)
                self._seq.applied(stream, seq, reply)
        except StreamRNNError as exc:
            self._send_error(work, exc.code, str(exc), expected)
            return
        except ValueError as exc:
            self._send_error(work, ErrorCode.BAD_VALUE, str(exc), expected)
            return
        except Exception as exc:
            log.exception("%s of stream %r failed", msg_type.name, stream)
            self._send_error(work, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", expected)
            return
        self._count(f"applied_{msg_type.name.lower()}")
        self._send(work, *reply)

    def _generate(self, work: _Work) -> CachedReply:
        generate = getattr(self.engine, "generate", None)
        if generate is None:
            raise NotSupportedError("this worker's engine does not support GENERATE yet")
        header = work.msg.header
        options = {k: header[k] for k in GENERATE_OPTIONS if k in header}
        out = generate(work.stream, work.msg.arrays[A_PROMPT], steps=header[F_STEPS], **options)
        self._count("generate_calls")
        return _generate_reply(work, out)

    def _apply_pushes(self, runs: list[list[_Work]]) -> list[_Work]:
        """Run one batched step over the streams' PUSH runs (see :meth:`_coalesce`) and
        reply to each PUSH. Returns the PUSHes to carry into the next batch: the rest of a
        run whose first PUSH was not applied (answered, then handled like any later PUSH)."""
        ready: dict[str, list[_Work]] = {}
        carry: list[_Work] = []
        for run in runs:
            work = run[0]
            expected = self._admit(work)
            if expected is None:
                carry += run[1:]
                continue
            if work.invalid is not None:
                self._send_error(work, work.invalid.code, str(work.invalid), expected)
                continue
            ready[work.stream] = run
        if not ready:
            return carry
        new_streams = [s for s in ready if s not in self.engine]
        room = self.engine.capacity_left  # free slots plus host-memory swap room
        for stream in new_streams[room:]:
            work, *rest = ready.pop(stream)
            carry += rest
            self._send_error(work, ErrorCode.ENGINE_FULL,
                             f"worker is full: {len(self.engine.streams)} streams live "
                             f"(slots={self.engine.slots}, max_streams="
                             f"{getattr(self.engine, 'max_streams', self.engine.slots)}); "
                             "close a stream or retry later", work.seq)
        if not ready:
            return carry
        chunks = {stream: run[0].chunk if len(run) == 1
                  else np.concatenate([w.chunk for w in run]) for stream, run in ready.items()}
        began = time.monotonic()
        try:
            outputs = self.engine.push_many(chunks, validated=True)
        except Exception:
            log.exception("batched push failed; retrying the %d streams one by one", len(ready))
            outputs = {}
            for stream, run in ready.items():
                try:
                    outputs[stream] = self.engine.push(stream, chunks[stream])
                    continue
                except StreamRNNError as exc:
                    code, message = exc.code, str(exc)
                except Exception as exc:
                    log.exception("push of stream %r failed", stream)
                    code, message = ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"
                self._send_error(run[0], code, message, run[0].seq)
                carry += run[1:]
        self.metrics.step_latency.observe(time.monotonic() - began)
        self.metrics.batch_fill.observe(len(ready) / self.engine.slots)
        self._count("batches")
        if self.checkpointer is not None:
            self.checkpointer.count_step()
        applied = [run for stream, run in ready.items() if stream in outputs]
        self._count("applied_push", sum(len(run) for run in applied))
        self._count("coalesced_push", sum(len(run) - 1 for run in applied))
        self._count("timesteps", sum(len(o) for o in outputs.values()))
        for stream, out in outputs.items():
            start = 0
            for work in ready[stream]:
                steps = len(work.chunk)
                reply: CachedReply = (MessageType.OUTPUT,
                                      {F_STREAM: stream, F_SEQ: work.seq, F_STEPS: steps},
                                      {A_OUTPUT: out[start:start + steps]})
                start += steps
                self._seq.applied(stream, work.seq, reply)
                self._send(work, *reply)
                self.metrics.chunk_latency.observe(time.monotonic() - work.received)
        return carry

    # ---- replies (compute thread) -----------------------------------------------------

    def _send(self, work: _Work, msg_type: MessageType, header: dict[str, Any],
              arrays: dict[str, np.ndarray] | None = None) -> None:
        if work.rid is not None:
            header = {**header, F_REQUEST_ID: work.rid}
        if self.checkpointer is not None and msg_type in _DURABLE_REPLIES and F_STREAM in header:
            header = {**header,
                      F_DURABLE_SEQ: self.checkpointer.durable.get(header[F_STREAM], 0)}
        self._outbox.append((work.identity, msg_type, header, arrays, work.batched))
        if not self._outbox_signalled:
            self._outbox_signalled = True
            self._pipe.send(_WAKE_FRAME)

    def _send_error(self, work: _Work, code: ErrorCode | int, message: str,
                    expected: int | None = None) -> None:
        self._count_error(code)
        header = _echo(work.msg)
        header.update({F_CODE: int(code), F_MESSAGE: message})
        if expected is not None:
            header[F_EXPECTED] = expected
        self._send(work, MessageType.ERROR, header)


_GENERATE_DEFAULTS = {"sample": "greedy", "temperature": 1.0, "top_k": None,
                      "end_token": None}  # Engine.generate's; "seed" may differ per stream


def _prefix(run: list[_Work], length: int) -> tuple[int, int]:
    """``(PUSHes, timesteps)`` of the longest prefix of ``run`` within ``length`` timesteps
    (the first PUSH always counts)."""
    count, total = 1, len(run[0].chunk)
    for work in run[1:]:
        if total + len(work.chunk) > length:
            break
        count, total = count + 1, total + len(work.chunk)
    return count, total


def _generate_options(header: dict[str, Any]) -> tuple:
    """The options GENERATE requests must share to run in one batched call (hashable)."""
    return header[F_STEPS], tuple((k, header.get(k, v)) for k, v in _GENERATE_DEFAULTS.items())


def _generate_reply(work: _Work, out: Any) -> CachedReply:
    out = np.asarray(out)
    return (MessageType.OUTPUT, {F_STREAM: work.stream, F_SEQ: work.seq,
                                 F_STEPS: int(out.shape[0]) if out.ndim else 0},
            {A_OUTPUT: out})


def _echo(msg: Message) -> dict[str, Any]:
    """The matching fields of a request, to copy into its reply."""
    return {k: msg.header[k] for k in (F_REQUEST_ID, F_STREAM, F_SEQ) if k in msg.header}


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars/arrays turned into msgpack-friendly Python objects."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


__all__ = ["StreamWorker", "WorkerConfig"]
