"""A worker's compute thread: the only thread that touches the engine (it is not thread-safe).

Each iteration it runs the calls queued with :meth:`ComputeThread.call` (failover
adoption), takes the requests that arrive within the batching window (the requests carried
from the previous round first, without waiting), asks
:func:`~streamrnn.serving.batching.plan_batch` for the round's :class:`Plan`, applies it
(:class:`~streamrnn.serving.applying.Applier`, :class:`~streamrnn.serving.stepping.PushStep`)
and queues the replies in the outbox. Between rounds it expires idle streams, refreshes the
gauges and writes the periodic checkpoint, after which the held CLOSE ACKs go out. On a
graceful stop it finishes every queued request, writes a last checkpoint, and tells the I/O
thread it is done.

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
from streamrnn.errors import NotSupportedError
from streamrnn.protocol import F_STATS, MessageType
from streamrnn.serving.applying import Applier
from streamrnn.serving.batching import Work, plan_batch
from streamrnn.serving.config import WorkerConfig
from streamrnn.serving.durability import WorkerCheckpointer
from streamrnn.serving.outbox import Channels
from streamrnn.serving.replies import Responder
from streamrnn.serving.sequencing import SequenceTable
from streamrnn.serving.stats import Count
from streamrnn.serving.stepping import PushStep

__all__ = ["ComputeThread"]

log = logging.getLogger("streamrnn.worker")

_IDLE_POLL_S = 0.05  # how long an idle compute thread waits for work before looking around
_EXPIRY_EVERY_S = 1.0  # how often idle streams are looked for
_HELD_RETRY_S = 1.0  # after a failed write for held ACKs: wait this long before the next


class ComputeThread(threading.Thread):
    """Takes work, plans each round, applies it to the engine and queues the replies."""

    def __init__(self, engine: EngineLike, caps: Capabilities, config: WorkerConfig,
                 channels: Channels, table: SequenceTable,
                 checkpointer: WorkerCheckpointer | None,
                 describe: Callable[[], dict[str, Any]], report: Callable[[], dict[str, Any]]):
        super().__init__(name="streamrnn-compute", daemon=True)
        self.engine = engine
        self.config = config
        self.table = table
        self.checkpointer = checkpointer
        self._channels = channels
        self._requests = channels.requests
        self._stats = stats = channels.stats
        self._report = report  # the body of a STATS reply
        self._reply = Responder(channels.outbox, stats, checkpointer)
        self._applier = Applier(engine, caps, table, self._reply, stats, checkpointer, describe)
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

    def adopt(self, path: str, streams: list[str] | None) -> list[str]:
        """Take over ``streams`` of another worker's checkpoint file (on this thread)."""
        if self.checkpointer is None:
            raise NotSupportedError("this worker has no --checkpoint-dir")
        adopted = self.checkpointer.adopt(path, streams, self.engine, self.table)
        self._checkpoint()
        log.info("adopted %d streams from %s", len(adopted), path)
        return adopted

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
                # graceful stop: everything applied is kept
                if self.checkpointer is not None and self._checkpoint():
                    self._reply.release()
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
        plan = plan_batch(batch, self.config.coalesce_steps, self._group_generates)
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
        if expired and self.checkpointer is not None:
            self._checkpoint()  # a restart must not bring expired streams back

    def _after_round(self) -> None:
        """Refresh the gauges; periodic checkpoint, then the CLOSE ACKs that waited for one.

        The ACKs are sent only after a successful write: if it fails they stay held and the
        write is retried after the next round (at most once a second while idle).
        """
        self._stats.engine_gauges(self.engine.stats(), self.engine.weights_version)
        ckpt = self.checkpointer
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
        assert self.checkpointer is not None
        try:
            self.checkpointer.save(self.engine, self.table)
        except Exception:
            # a failed write leaves the previous file in place; durable_seq does not advance
            log.exception("writing checkpoint %s failed", self.checkpointer.path)
            self._stats.add(Count.CHECKPOINT_FAILURES)
            return False
        self._stats.add(Count.CHECKPOINTS)
        return True
