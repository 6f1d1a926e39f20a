"""A worker's compute thread: the only thread that touches the engine (it is not thread-safe).

Each iteration it runs the calls queued with :meth:`ComputeThread.call`, takes the requests
that arrive within the batching window (the requests carried from the previous round first,
without waiting), makes sure the worker holds the round's streams
(:class:`~streamrnn.serving.store.StreamStore`: the streams not held are acquired in one
call, the requests of those not acquired answered ERROR ``NOT_HOLDER``), asks
:func:`~streamrnn.serving.batching.plan_batch` for the round's :class:`Plan`, applies it
(:class:`~streamrnn.serving.applying.Applier`, :class:`~streamrnn.serving.stepping.PushStep`)
and queues the replies in the outbox. Between rounds it expires idle streams, refreshes the
gauges and writes the periodic checkpoint, after which the held CLOSE ACKs go out. On a
graceful stop it finishes every queued request, writes a last checkpoint, lets the store's
streams go (:meth:`StreamStore.close`), and tells the I/O thread it is done.

A store whose lease lapsed (``lease_valid()`` False, before a round or a reply) *fences*
the worker: it logs an error, answers nothing more, drops every slot, stops without
writing, and sets :attr:`ComputeThread.fenced` (``streamrnn worker`` then exits with 3).

Example::

    compute = ComputeThread(engine, capabilities_of(engine), config, channels, table,
                            None, describe, report)
    compute.start()
    compute.call(lambda: engine.stats()).result()
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from streamrnn.engine.interface import Capabilities, EngineLike
from streamrnn.protocol import F_STATS, ErrorCode, MessageType
from streamrnn.serving.applying import Applier
from streamrnn.serving.batching import Work, plan_batch
from streamrnn.serving.config import WorkerConfig
from streamrnn.serving.outbox import Channels
from streamrnn.serving.quotas import limit_generates
from streamrnn.serving.replies import Responder
from streamrnn.serving.sequencing import SequenceTable
from streamrnn.serving.stats import Count
from streamrnn.serving.stepping import PushStep
from streamrnn.serving.store import StreamStore

__all__ = ["ComputeThread"]

log = logging.getLogger("streamrnn.worker")

_IDLE_POLL_S = 0.05  # how long an idle compute thread waits for work before looking around
_EXPIRY_EVERY_S = 1.0  # how often idle streams are looked for
_HELD_RETRY_S = 1.0  # after a failed write for held ACKs: wait this long before the next


class ComputeThread(threading.Thread):
    """Takes work, plans each round, applies it to the engine and queues the replies."""

    def __init__(self, engine: EngineLike, caps: Capabilities, config: WorkerConfig,
                 channels: Channels, table: SequenceTable,
                 store: StreamStore | None,
                 describe: Callable[[], dict[str, Any]], report: Callable[[], dict[str, Any]]):
        super().__init__(name="streamrnn-compute", daemon=True)
        self.engine = engine
        self.config = config
        self.table = table
        self.store = store
        #: set once the store's lease lapsed and this worker fenced itself
        self.fenced = threading.Event()
        self._channels = channels
        self._requests = channels.requests
        self._stats = stats = channels.stats
        self._report = report  # the body of a STATS reply
        self._reply = Responder(channels.outbox, stats, store)
        self._applier = Applier(engine, caps, table, self._reply, stats, store, describe)
        self._push_step = PushStep(self._applier)
        self._group_generates = caps.generation
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        # requests taken but left for the next round (a stream's second chunk, and everything
        # of that stream after it), so every step can be filled with fresh streams
        self._carry: list[Work] = []
        self._held_retry_at = 0.0  # after a failed write: when to write again for held ACKs

    # ---- calls from other threads ------------------------------------------------------

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on this thread between rounds; its Future gives the result."""
        future: Future = Future()
        self._calls.put((fn, future))
        return future

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

    # ---- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        next_expiry = time.monotonic() + _EXPIRY_EVERY_S
        try:
            while True:
                self._run_calls()
                if not self._lease_valid():
                    self._fence()
                    break
                if self._carry:
                    batch, self._carry = self._carry, []
                    self._process(self._take_batch(batch, 0.0))
                    self._after_round()
                    continue
                if not self._wait_and_process():
                    break
                if self.config.idle_timeout_s > 0 and time.monotonic() >= next_expiry:
                    self._expire_idle()
                    next_expiry = time.monotonic() + _EXPIRY_EVERY_S
                self._after_round()
        except Exception:  # pragma: no cover - a bug; still let the I/O thread finish
            log.exception("compute thread failed")
        finally:
            self._channels.outbox.finish()

    def _wait_and_process(self) -> bool:
        """Process the next batch once a request comes; False when stopped and drained."""
        first = self._requests.take(self.config.max_batch, _IDLE_POLL_S)
        if not first:
            if self._channels.reading_stopped.is_set() and self._requests.empty():
                # graceful stop: everything applied is kept, then the streams are let go
                if self.store is not None:
                    if self._checkpoint():
                        self._reply.release()
                    self.store.close()
                return False
            return True
        self._process(self._take_batch(first, self.config.batch_window_us / 1e6))
        return True

    def _take_batch(self, batch: list[Work], window: float) -> list[Work]:
        """``batch`` plus what arrives within ``window`` seconds (at most ``max_batch``)."""
        deadline = time.monotonic() + window
        while len(batch) < self.config.max_batch:
            more = self._requests.take(self.config.max_batch - len(batch))
            if not more:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                more = self._requests.take(self.config.max_batch - len(batch), remaining)
                if not more:
                    break
            batch += more
        return batch

    def _process(self, batch: list[Work]) -> None:
        if self.store is not None:
            batch = self._held_only(batch)
        plan = limit_generates(  # long GENERATEs take turns with the other streams' pushes
            plan_batch(batch, self.config.coalesce_steps, self._group_generates),
            self.config.max_generate_steps)
        for work in plan.stats:
            self._reply.send(work, MessageType.ACK, {F_STATS: self._report()})
        self._applier.before(plan.before)
        put_back = self._push_step.run(plan.runs)
        self._carry = plan.carry(put_back)

    # ---- between rounds ----------------------------------------------------------------

    def _expire_idle(self) -> None:
        expired = self.table.expire_idle(self.config.idle_timeout_s)
        for stream in expired:
            where = "never held"
            if stream in self.engine:
                where = "resident" if self.engine.is_resident(stream) else "swapped out"
                self.engine.close(stream)  # frees its slot or its host-memory copy
            self._stats.add(Count.EXPIRED_STREAMS)
            log.info("stream %r (%s) expired after %.1f s idle", stream, where,
                     self.config.idle_timeout_s)
        if expired and self.store is not None:
            self._checkpoint()  # a restart must not bring expired streams back

    def _after_round(self) -> None:
        """Refresh the gauges; periodic checkpoint, then the CLOSE ACKs that waited for one.

        The ACKs are sent only after a successful write: if it fails they stay held and the
        write is retried after the next round (at most once a second while idle).
        """
        self._stats.engine_gauges(self.engine.stats(), self.engine.weights_version)
        ckpt = self.store
        if ckpt is None:
            return
        holding = self._reply.holding
        if holding and time.monotonic() < self._held_retry_at:
            return
        if (holding or ckpt.due()) and not self._checkpoint():
            self._held_retry_at = time.monotonic() + _HELD_RETRY_S
            return
        self._reply.release()

    def _checkpoint(self) -> bool:
        assert self.store is not None
        try:
            self.store.save(self.engine, self.table)
        except Exception:
            # a failed write leaves the previous file in place; durable_seq does not advance
            log.exception("writing checkpoint %s failed", self.store.where)
            self._stats.add(Count.CHECKPOINT_FAILURES)
            return False
        self._stats.add(Count.CHECKPOINTS)
        return True

    # ---- holding and fencing -----------------------------------------------------------

    def _held_only(self, batch: list[Work]) -> list[Work]:
        """The requests of ``batch`` whose streams this worker holds (acquiring the others
        in one call); the rest are answered ERROR NOT_HOLDER (UNAVAILABLE when the store
        cannot be reached)."""
        assert self.store is not None
        store = self.store
        wanted = {w.stream for w in batch if w.type != MessageType.STATS}
        missing = [s for s in wanted if not store.holds(s)]
        if not missing:
            return batch
        code = ErrorCode.NOT_HOLDER
        try:
            refused = set(missing) - store.acquire(missing, self.engine, self.table)
        except Exception as exc:
            log.exception("acquiring %d streams failed", len(missing))
            refused, code = set(missing), ErrorCode.UNAVAILABLE
            reason = f"cannot claim the stream now ({type(exc).__name__}); retry later"
        else:
            reason = "another worker holds its lease; ask the router again"
        if not refused:
            return batch
        for work in batch:
            if work.type != MessageType.STATS and work.stream in refused:
                self._reply.error(work, code, f"worker {self.config.name!r} does not hold "
                                              f"stream {work.stream!r}: {reason}")
        return [w for w in batch if w.type == MessageType.STATS or w.stream not in refused]

    def _lease_valid(self) -> bool:
        store = self.store
        return store is None or (not self._reply.fenced and store.lease_valid())

    def _fence(self) -> None:
        """The lease lapsed: answer nothing more, drop every slot, stop (without a write)."""
        streams = list(self.engine.streams)
        log.error("lease of worker %r lapsed (not renewed in time): fencing: no more replies, "
                  "dropping %d streams, stopping; another worker takes them over from their "
                  "checkpoints", self.config.name, len(streams))
        self._reply.fence()
        for stream in streams:
            self.engine.close(stream)
        self.fenced.set()
        self._channels.stop_requested.set()
