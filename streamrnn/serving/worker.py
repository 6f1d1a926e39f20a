"""StreamWorker: an engine behind a ZeroMQ ROUTER socket (the serving loop of a worker).

The facade wires two threads, which share only their
:class:`~streamrnn.serving.outbox.Channels` (the bounded request queue, the
:class:`~streamrnn.serving.outbox.Outbox` of replies, the locked counters, two stop events):

* the **I/O thread** (:class:`~streamrnn.serving.io_thread.IOThread`) owns the ROUTER
  socket: it decodes requests, splits BATCH envelopes, checks chunks, answers PING, BUSY and
  malformed messages, queues the rest, and sends the replies it finds in the outbox;
* the **compute thread** (:class:`~streamrnn.serving.compute.ComputeThread`) owns the
  engine: it takes the work of each batching window, plans the round
  (:func:`~streamrnn.serving.batching.plan_batch`: which PUSHes step together, which
  coalesce, which GENERATEs run in one call), applies it exactly once per sequence number
  (:mod:`streamrnn.serving.sequencing`), writes checkpoints to its store
  (:class:`~streamrnn.serving.store.StreamStore`: the checkpoint directory of
  :mod:`streamrnn.serving.durability`, or one given to the constructor, such as Redis) and
  queues the replies.

What the engine can do beyond :class:`~streamrnn.engine.interface.EngineLike` (generation,
weight-version pins) is decided once, here (:func:`~streamrnn.engine.interface.capabilities_of`).

Example::

    worker = StreamWorker(Engine.from_keras("m.keras", slots=64),
                          WorkerConfig(bind="tcp://127.0.0.1:0"))
    endpoint = worker.start()        # "tcp://127.0.0.1:40123"
    ...
    worker.stop(); worker.join()     # finishes queued work and replies first
"""

from __future__ import annotations

import gc
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import zmq

from streamrnn.engine.interface import EngineLike, capabilities_of
from streamrnn.metrics import Metrics
from streamrnn.protocol import MAX_CHUNK_STEPS, MAX_MESSAGE_BYTES, REPLY_CACHE_SIZE
from streamrnn.security import load_hmac_key, public_keys
from streamrnn.serving.compute import ComputeThread
from streamrnn.serving.config import WorkerConfig
from streamrnn.serving.durability import WorkerCheckpointer
from streamrnn.serving.io_thread import IOThread
from streamrnn.serving.outbox import Channels, Outbox, WorkQueue
from streamrnn.serving.sequencing import SequenceTable
from streamrnn.serving.sockets import bind_client_socket
from streamrnn.serving.stats import WorkerStats
from streamrnn.serving.store import StreamStore

__all__ = ["StreamWorker", "WorkerConfig", "freeze_heap"]


class StreamWorker:
    """Serves ``engine`` on ``config.bind`` until :meth:`stop`.

    Args:
        engine: what serves the streams (the compute thread is its only user).
        config: the worker's settings.
        context: the ZeroMQ context (default: the process's shared one).
        store: where streams are kept durable and which ones this worker may serve
            (:class:`~streamrnn.serving.store.StreamStore`); default: the checkpoint
            directory ``config.checkpoint_dir`` if set, else none (not durable).
    """

    def __init__(self, engine: EngineLike, config: WorkerConfig,
                 context: zmq.Context | None = None, store: StreamStore | None = None):
        self.engine = engine
        self.config = config
        self.capabilities = capabilities_of(engine)
        self.endpoint: str | None = None
        self.metrics = Metrics("worker")
        self.metrics.slots_total.set(engine.slots)
        self.metrics_port: int | None = None
        if store is not None and config.checkpoint_dir:
            raise ValueError("give a store or a checkpoint_dir, not both")
        if store is None and config.checkpoint_dir:
            store = WorkerCheckpointer(
                config.checkpoint_dir, config.name, config.model_name,
                config.checkpoint_every_steps, config.checkpoint_every_s,
                key=load_hmac_key(config.checkpoint_key) if config.checkpoint_key else None)
        self.store = store
        self._ctx = context or zmq.Context.instance()
        self._table = SequenceTable(stream_bytes=config.reply_cache_stream_bytes,
                                    total_bytes=config.reply_cache_bytes,
                                    per_identity=config.max_streams_per_identity)
        self._generates = self.capabilities.generation and _can_generate(engine)
        self._channels = Channels(WorkQueue(config.max_queue), Outbox(),
                                  WorkerStats(self.metrics))
        self._compute = ComputeThread(engine, self.capabilities, config, self._channels,
                                      self._table, store, self.describe, self.stats)
        self._threads: list[threading.Thread] = []

    # ---- durability --------------------------------------------------------------------

    @property
    def checkpointer(self) -> StreamStore | None:
        """The worker's store (its older name)."""
        return self.store

    @property
    def fenced(self) -> bool:
        """True once the store's lease lapsed and the worker fenced itself (and stopped)."""
        return self._compute.fenced.is_set()

    @property
    def sequences(self) -> SequenceTable:
        """The per-stream sequence numbers and reply caches (the compute thread's: touch
        them before :meth:`start`, or from the engine's calls)."""
        return self._table

    def restore_checkpoint(self) -> int:
        """Before :meth:`start`: resume the streams of this worker's checkpoint file.

        Returns how many streams were restored (0 without a file). A corrupt, truncated or
        foreign file raises :class:`~streamrnn.errors.CheckpointError`; nothing loads.
        """
        if self.store is None:
            return 0
        return self.store.restore(self.engine, self._table)

    def call_in_compute(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the compute thread between steps (it owns the engine)."""
        return self._compute.call(fn)

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> str:
        """Bind, start the I/O and compute threads, and return the bound endpoint."""
        config = self.config
        routers = _router_keys(config)
        router, auth = bind_client_socket(
            self._ctx, config.bind, config.max_frame_bytes, linger_ms=2000,
            curve_secret_key=config.curve_secret_key, curve_allow=config.curve_allow,
            curve_also_allow=routers)
        self.endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        if config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(config.metrics_port)
        self._channels.outbox.open(self._ctx)
        io = IOThread(router, self._channels, self.engine.validate, self.describe,
                      config.busy_retry_after_ms, auth,
                      max_generate_steps=config.max_generate_steps,
                      routers=frozenset(k.decode("ascii") for k in routers))
        self._threads = [io, self._compute]
        for thread in self._threads:
            thread.start()
        return self.endpoint

    def stop(self) -> None:
        """Stop reading new requests; queued work is finished and answered, then threads end."""
        self._channels.stop_requested.set()

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

    # ---- facts and counters ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters of the worker plus the engine's stats (the STATS reply's ``stats``)."""
        counts, errors = self._channels.stats.snapshot()
        ckpt = self.store
        return {
            "uptime_s": round(time.monotonic() - self._channels.stats.started, 3),
            "queue_depth": self._channels.requests.qsize(),
            "queue_capacity": self.config.max_queue,
            "batch_window_us": self.config.batch_window_us,
            "sequenced_streams": len(self._table),
            "reply_cache_bytes": self._table.budget.total,
            "busy_latched": len(self._channels.busy),
            "counts": counts,
            "errors": errors,
            "engine": _plain(self.engine.stats()),
            "checkpoint_dir": self.config.checkpoint_dir,
            "checkpoint": None if ckpt is None else {
                "path": ckpt.where, "written": ckpt.written, "bytes": ckpt.last_bytes,
                "seconds": round(ckpt.last_seconds, 6), "streams": len(ckpt.durable),
                **ckpt.report()},
        }

    def describe(self) -> dict[str, Any]:
        """Facts a client needs (sent in PONG and OPEN's ACK)."""
        engine = self.engine
        return {
            "slots": engine.slots,
            "input_kind": engine.input_kind,
            "input_dim": engine.input_dim,
            "output_dim": engine.output_dim,
            "model": self.config.model_name,
            "reply_cache": REPLY_CACHE_SIZE,
            "reply_cache_stream_bytes": self.config.reply_cache_stream_bytes,
            "max_chunk_steps": MAX_CHUNK_STEPS,
            "max_frame_bytes": self.config.max_frame_bytes,
            "max_message_bytes": MAX_MESSAGE_BYTES,
            "generate": self._generates,  # GENERATE can work on this model
            "max_generate_steps": self.config.max_generate_steps,
            "batch": True,  # takes BATCH envelopes (docs/protocol.md)
            "kernel": getattr(engine, "kernel", None),  # what runs the steps (trainer: None)
        }


def _router_keys(config: WorkerConfig) -> list[bytes]:
    """The z85 public keys of ``config.curve_routers`` (none without it); ValueError when
    they are given without CURVE (``curve_secret_key``): nothing would authenticate them."""
    if not config.curve_routers:
        return []
    if not config.curve_secret_key:
        raise ValueError("--curve-routers needs --curve-secret-key (a router is trusted by "
                         "the CURVE key it connects with)")
    return public_keys(config.curve_routers)


def _can_generate(engine: Any) -> bool:
    """Whether a feedback rule fits the engine's model (GENERATE answers NOT_SUPPORTED
    otherwise): asked with no prompts, which checks the model and changes nothing."""
    try:
        engine.generate_many({}, steps=1)
    except Exception:  # UnsupportedModelError (NOT_SUPPORTED), or any other refusal
        return False
    return True


def freeze_heap() -> None:
    """Collect, then move every object alive now out of the cycle collector's view
    (``gc.freeze``): for a process that serves one model, after loading it.

    A worker holds TensorFlow, Keras and the model: hundreds of thousands of long-lived
    objects that every full collection walks (0.3-0.6 s each, measured with 2 cores), and
    the reply caches make full collections come every few ten thousand chunks, on the
    serving threads (measured: 19 us of worker CPU per 16-step chunk on average, and a
    0.3 s pause each time). Frozen objects are still freed when their count drops to zero;
    only cycles among them are never collected.
    """
    gc.collect()
    gc.freeze()


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
