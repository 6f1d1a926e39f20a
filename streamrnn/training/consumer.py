"""LogConsumer: trains what the durable log holds, exactly once, and acknowledges it late.

The consumer is the only thread that touches the :class:`~streamrnn.training.online.
OnlineTrainer` when training goes through a :class:`~streamrnn.training.chunk_log.ChunkLog`
(``streamrnn trainer --store``). It

1. starts from the trainer's checkpoint, which records the log position it covers
   (``extra["log"]``: ``last_id``, the last entry applied; ``applied``, PUSH chunks trained
   so far; ``streams``, each stream's next sequence number to apply);
2. takes over entries a dead trainer got but never acknowledged
   (:meth:`ChunkLog.claim_stale`, waiting up to ``claim_idle_ms`` for them to go idle), then
   processes its own pending entries in log order, skipping those the checkpoint covers;
3. reads new entries, trains them in batched steps (one chunk per stream per step; a RESET
   or CLOSE, or a second chunk of a stream, starts the next step), checkpoints every
   ``checkpoint_every`` optimizer steps (the OnlineTrainer's rule) and after
   ``idle_checkpoint_s`` without new entries, and only then acknowledges
   (:meth:`ChunkLog.ack`) the entries the checkpoint covers;
4. on :meth:`LogConsumer.stop`: trains what is left in the log, publishes/checkpoints
   (:meth:`OnlineTrainer.shutdown`) and acknowledges everything.

An entry whose id is at or below the checkpoint's ``last_id``, or whose sequence number is
below its stream's next one, was applied before: it is acknowledged, never applied again.
Applied entries are counted in :attr:`LogConsumer.counts` (``applied``, ``covered``,
``duplicates``, ``rejected``, ``acked``). One trainer consumes a log at a time: a second
one would split the streams' chunks between two models.

Example::

    consumer = LogConsumer(online, log, claim_idle_ms=10_000)
    consumer.start()
    ...
    consumer.stop(); consumer.join()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from streamrnn.errors import StreamRNNError
from streamrnn.training.chunk_log import ChunkLog, LogEntry, entry_key
from streamrnn.training.online import OnlineTrainer

__all__ = ["LogConsumer"]

log = logging.getLogger("streamrnn.trainer")

_NONE = "0-0"


class LogConsumer(threading.Thread):
    """Reads ``chunk_log``, trains ``online``, checkpoints, then acknowledges.

    Args:
        online: the trainer (with a checkpoint file: acknowledgements wait for it).
        chunk_log: the durable log.
        batch: entries read at once.
        block_ms: how long one read waits for new entries.
        idle_checkpoint_s: checkpoint (and acknowledge) after this long without new entries.
        claim_idle_ms: take over another reader's unacknowledged entries once idle this long.
    """

    def __init__(self, online: OnlineTrainer, chunk_log: ChunkLog, *, batch: int = 256,
                 block_ms: int = 200, idle_checkpoint_s: float = 1.0,
                 claim_idle_ms: int = 10_000):
        super().__init__(name="streamrnn-log-consumer", daemon=True)
        if online.checkpoint_path is None:
            raise ValueError("a durable training log needs a trainer checkpoint file")
        self.online = online
        self.chunk_log = chunk_log
        self.batch, self.block_ms = batch, block_ms
        self.idle_checkpoint_s = idle_checkpoint_s
        self.claim_idle_ms = claim_idle_ms
        position = online.restored.get("log", {})
        self.last_id: str = position.get("last_id", _NONE)  # all entries up to it applied
        self.applied: int = position.get("applied", 0)  # PUSH chunks trained, all runs
        self.expect: dict[str, int] = dict(position.get("streams", {}))
        self.counts = {"applied": 0, "covered": 0, "duplicates": 0, "rejected": 0,
                       "acked": 0}
        self.failed: BaseException | None = None
        self._covered = _key(self.last_id)
        self._done: list[str] = []  # ids handled, not acknowledged yet
        self._ackable = 0  # how many of _done the newest checkpoint covers
        self._stopping = threading.Event()
        self._last_save = time.monotonic()

    def stop(self) -> None:
        """Finish: train what the log holds, checkpoint, acknowledge, end the thread."""
        self._stopping.set()

    # ---- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.catch_up()
            while not self._stopping.is_set():
                entries = self.chunk_log.read(self.batch, self.block_ms)
                if entries:
                    self.apply(entries)
                elif self._done and time.monotonic() - self._last_save >= self.idle_checkpoint_s:
                    self.checkpoint()
            self.finish()
        except BaseException as exc:  # the process must not go on without its consumer
            log.exception("training log consumer failed")
            self.failed = exc

    def catch_up(self) -> None:
        """Take over a dead reader's entries, then apply this reader's pending ones."""
        deadline = time.monotonic() + self.claim_idle_ms / 1000 + 5.0
        while (held := self.chunk_log.claim_stale(self.claim_idle_ms)) > 0:
            if time.monotonic() > deadline or self._stopping.is_set():
                log.warning("%d log entries are still held by another trainer; going on "
                            "without them (is a second trainer consuming this log?)", held)
                break
            time.sleep(0.2)
        start_id, start_applied = self.last_id, self.applied
        after = _NONE
        while entries := self.chunk_log.pending(after, self.batch):
            self.apply(entries)
            after = entries[-1].id
        log.info("training log: the checkpoint covers entries up to %s (%d chunks); pending "
                 "entries: %d already covered, %d chunks applied now", start_id,
                 start_applied, self.counts["covered"], self.applied - start_applied)

    def finish(self) -> None:
        """Train every entry left, final publish/checkpoint, acknowledge everything."""
        while entries := self.chunk_log.read(self.batch, 0):
            self.apply(entries)
        self.online.log_position = self.position()
        self.online.shutdown()
        self._ack(len(self._done))

    # ---- applying ----------------------------------------------------------------------

    def apply(self, entries: Sequence[LogEntry]) -> None:
        """Apply ``entries`` in log order (skipping those applied before), in batched steps."""
        step: dict[str, LogEntry] = {}
        for entry in sorted(entries, key=lambda e: _key(e.id)):
            record = entry.record
            joins = (record is not None and record.kind == "push" and record.stream not in step
                     and _key(entry.id) > self._covered)
            if not joins:
                self._train(step)
                step = {}
            verdict = self._classify(entry)
            if verdict == "push":
                step[record.stream] = entry  # type: ignore[union-attr]
            elif verdict in ("reset", "close"):
                self._control(entry)
            else:
                self.counts[verdict] += 1
                self._handled(entry)
        self._train(step)
        self._ack(self._ackable)

    def _classify(self, entry: LogEntry) -> str:
        """``push``/``reset``/``close`` to apply, else why not (``covered``: the checkpoint
        has it; ``duplicates``: its seq was applied; ``rejected``: unusable)."""
        if _key(entry.id) <= self._covered:
            return "covered"
        record = entry.record
        if record is None:
            log.error("training log entry %s is unusable (%s): skipped", entry.id,
                      entry.problem)
            return "rejected"
        expected = self.expect.get(record.stream, 0)
        if record.seq < expected:
            return "duplicates"
        if record.seq > expected:
            log.warning("training log: stream %r jumps from seq %d to %d (entry %s)",
                        record.stream, expected, record.seq, entry.id)
        if record.kind == "close":
            self.expect.pop(record.stream, None)
        else:
            self.expect[record.stream] = record.seq + 1
        return record.kind

    def _train(self, step: dict[str, LogEntry]) -> None:
        """One batched step over ``step``'s chunks (a chunk the trainer refuses is skipped
        with a log line; the front checked it, so that is a foreign entry)."""
        chunks: dict[str, np.ndarray] = {}
        for stream, entry in step.items():
            try:
                chunks[stream] = self.online.validate(entry.record.chunk)  # type: ignore[union-attr]
            except StreamRNNError as exc:
                log.error("training log entry %s: %s: skipped", entry.id, exc)
                self.counts["rejected"] += 1
        if not step:
            return
        self.applied += len(chunks)
        self.counts["applied"] += len(chunks)
        latest = max(step.values(), key=lambda e: _key(e.id))
        self._advance(latest.id)
        before = self.online.checkpoints_written
        if chunks:
            self.online.push_many(chunks)  # may checkpoint, with this step's position
        self._done.extend(e.id for e in step.values())
        if self.online.checkpoints_written != before:
            self._saved()

    def _control(self, entry: LogEntry) -> None:
        record = entry.record
        assert record is not None
        if record.stream in self.online:
            if record.kind == "reset":
                self.online.reset(record.stream)
            else:
                self.online.close(record.stream)
        self._handled(entry)

    def _handled(self, entry: LogEntry) -> None:
        self._advance(entry.id)
        self._done.append(entry.id)

    def _advance(self, entry_id: str) -> None:
        """Everything up to ``entry_id`` is handled (the position only moves forward)."""
        if _key(entry_id) > _key(self.last_id):
            self.last_id = entry_id
        self.online.log_position = self.position()

    def position(self) -> dict[str, Any]:
        """What the trainer's state covers (written into its checkpoints)."""
        return {"last_id": self.last_id, "applied": self.applied, "streams": dict(self.expect)}

    # ---- durability --------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Checkpoint now, then acknowledge everything handled so far."""
        self.online.log_position = self.position()
        self.online.checkpoint()
        self._saved()
        self._ack(self._ackable)

    def _saved(self) -> None:
        self._ackable = len(self._done)
        self._last_save = time.monotonic()

    def _ack(self, n: int) -> None:
        if n <= 0:
            return
        ids, self._done = self._done[:n], self._done[n:]
        self._ackable = max(0, self._ackable - n)
        self.chunk_log.ack(ids)
        self.counts["acked"] += len(ids)


_key = entry_key
