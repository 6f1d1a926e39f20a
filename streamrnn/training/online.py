"""OnlineTrainer: a FreeRunningTrainer that plays "engine", so a StreamWorker serves it.

:class:`OnlineTrainer` implements :class:`~streamrnn.engine.interface.EngineLike` (and none
of the optional capabilities: it does not generate, pin weight versions or export state
snapshots; the trainer's own checkpoint, :mod:`streamrnn.training.checkpoint`, keeps its
streams' states). ``streamrnn trainer`` (:mod:`streamrnn.cli.trainer`) serves one with a
:class:`~streamrnn.serving.worker.StreamWorker`.

Training streams are published exactly like inference streams (same client, same wire
format, same exactly-once sequence numbers): each PUSH is one training chunk of a stream,
trained in a shared step with the chunks of other streams that arrived in the same
batching window, and answered with the training pass's outputs for that chunk
(``(T, output_dim)`` float32). Every training stream holds a slot (``max_streams ==
slots``: nothing is swapped out). Between steps the trainer checkpoints (weights,
optimizer, step counter, stream states) every ``checkpoint_every`` steps and publishes a
new weights version every ``publish_every`` steps (checkpointing first, so a restart never
re-issues a published version number).

Sequence numbers: with a :class:`~streamrnn.training.chunk_log.SequenceBook` attached
(:meth:`OnlineTrainer.attach_sequences`, the serving worker's sequence table), each
checkpoint also keeps every stream's next sequence number, and a restart puts them back, so
a Client continues its streams after a graceful restart (without them it got
UNKNOWN_STREAM). With a durable training log (:mod:`streamrnn.training.consumer`) the
checkpoint keeps the log position instead (:attr:`OnlineTrainer.log_position`).

Targets: by default a stream trains on next-step prediction of its own observations. With
``paired=True`` each chunk carries explicit targets next to the inputs, in one array (the
wire format has one chunk array per PUSH): feature models send ``[T, input_dim +
output_dim]`` float (inputs, then targets), token models ``[T, 2]`` int ids (input, target).

Example::

    online = OnlineTrainer(FreeRunningTrainer(model, slots=16), checkpoint="ck/t.npz",
                           publish_dir="pub", checkpoint_every=100, publish_every=50)
    worker = StreamWorker(online, WorkerConfig(bind="tcp://127.0.0.1:5560"))
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from streamrnn.engine.interface import EngineLike
from streamrnn.engine.weights import publish_weights
from streamrnn.errors import InvalidInputError
from streamrnn.protocol import ErrorCode
from streamrnn.training.checkpoint import TrainerCheckpoint
from streamrnn.training.chunk_log import SequenceBook
from streamrnn.training.trainer import FreeRunningTrainer

__all__ = ["OnlineTrainer"]


class OnlineTrainer(EngineLike):
    """The engine face of a :class:`~streamrnn.training.trainer.FreeRunningTrainer`.

    Driven by one thread (a worker's compute thread), like every EngineLike.

    Args:
        trainer: the trainer to drive (resumed from ``checkpoint`` if that file exists).
        checkpoint: the trainer's checkpoint file, or None for none.
        checkpoint_every: optimizer steps between checkpoints.
        publish_dir: where weights versions are published, or None.
        publish_every: optimizer steps between published versions.
        keep_versions: published versions kept in ``publish_dir``.
        publish_key: sign the published weights with this HMAC key (``--checkpoint-key``).
        paired: chunks carry explicit targets (see the module docstring).
        metrics: the worker's metrics (``train_steps``, ``train_loss``, ...), or None.
    """

    def __init__(
        self,
        trainer: FreeRunningTrainer,
        *,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 100,
        publish_dir: str | os.PathLike | None = None,
        publish_every: int = 100,
        keep_versions: int = 5,
        publish_key: bytes | None = None,
        paired: bool = False,
        metrics: Any = None,
    ):
        if checkpoint_every < 1 or publish_every < 1:
            raise InvalidInputError("checkpoint_every and publish_every must be >= 1",
                                    ErrorCode.BAD_VALUE)
        self.trainer = trainer
        self.checkpoint_path = Path(checkpoint) if checkpoint else None
        self.checkpoint_every = checkpoint_every
        self.publish_dir = Path(publish_dir) if publish_dir else None
        self.publish_every = publish_every
        self.keep_versions = keep_versions
        self.publish_key = publish_key
        self.paired = paired
        self.metrics = metrics
        self.resumed = False
        #: the loaded checkpoint's extra facts (sequence numbers, log position)
        self.restored: dict[str, Any] = {}
        #: the serving front's sequence numbers, kept in checkpoints (attach_sequences)
        self.sequence_book: SequenceBook | None = None
        #: the durable log position the trainer's state covers (set by a LogConsumer)
        self.log_position: dict[str, Any] | None = None
        self._pushing: Collection[str] = ()  # streams of the push_many under way
        if self.checkpoint_path is not None:
            loaded = TrainerCheckpoint.load(self.checkpoint_path)
            if loaded is not None:
                trainer.restore(loaded)
                self.resumed, self.restored = True, loaded.extra
        self._last_checkpoint = trainer.step
        self._last_publish = trainer.step
        self.checkpoints_written = 0
        # (step, loss) history for the progress display and the loss curve
        self.history: list[tuple[int, float]] = []
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self._start_step = trainer.step
        self._start_timesteps = trainer.timesteps

    # ---- EngineLike: facts (every training stream holds a slot; none is swapped out) ----

    @property
    def slots(self) -> int:
        return self.trainer.slots

    @property
    def max_streams(self) -> int:
        return self.trainer.slots

    @property
    def capacity_left(self) -> int:
        return self.trainer.table.free

    @property
    def streams(self) -> list[str]:
        return self.trainer.streams

    @property
    def input_kind(self) -> str:
        return self.trainer.input_kind

    @property
    def input_dim(self) -> int:
        return self.trainer.input_dim

    @property
    def output_dim(self) -> int:
        return self.trainer.output_dim

    @property
    def weights_version(self) -> int:
        return self.trainer.version

    def __contains__(self, stream: object) -> bool:
        return stream in self.trainer.table

    def is_resident(self, stream: str) -> bool:
        return stream in self.trainer.table

    def progress(self) -> dict[str, Any]:
        """Counters for the progress display (safe to read from another thread)."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        t = self.trainer
        return {
            "step": t.step, "loss": t.last_loss, "version": t.version,
            "timesteps": t.timesteps, "streams": len(t.table),
            "steps_per_s": (t.step - self._start_step) / elapsed,
            "timesteps_per_s": (t.timesteps - self._start_timesteps) / elapsed,
            "checkpoints": self.checkpoints_written, "resumed": self.resumed,
            "mode": t.config.mode,
        }

    def stats(self) -> dict[str, Any]:
        """The Engine.stats() keys (the worker reads them) plus the training counters."""
        p = self.progress()
        return {**p, "loss": None if math.isnan(p["loss"]) else p["loss"],
                "slots": self.slots, "free_slots": self.capacity_left, "swapped_streams": 0,
                "swaps_in": 0, "swaps_out": 0, "steps": p["step"],
                "weights_version": self.trainer.version, "traces": self.trainer.trace_count,
                "kernel": "trainer (tf.while_loop)"}

    # ---- EngineLike: chunks ------------------------------------------------------------

    def _split(self, chunk: Any) -> tuple[np.ndarray, np.ndarray | None]:
        arr = np.asarray(chunk)
        if not self.paired:
            return arr, None
        t = self.trainer
        if t.input_kind == "tokens":
            if arr.ndim != 2 or arr.shape[1] != 2:
                raise InvalidInputError(
                    f"paired token chunks are [T, 2] (input id, target id), got {arr.shape}",
                    ErrorCode.BAD_SHAPE)
            return arr[:, 0], arr[:, 1]
        width = t.input_dim + t.output_dim
        if arr.ndim != 2 or arr.shape[1] != width:
            raise InvalidInputError(
                f"paired chunks are [T, {t.input_dim} inputs + {t.output_dim} targets], got "
                f"{arr.shape}", ErrorCode.BAD_SHAPE)
        return arr[:, : t.input_dim], arr[:, t.input_dim:]

    def validate(self, chunk: Any) -> np.ndarray:
        """Check a training chunk (raises InvalidInputError); returns it unchanged."""
        inputs, targets = self._split(chunk)
        x = self.trainer.check_inputs(np.asarray(inputs), batched=False)
        if len(x) == 0:
            raise InvalidInputError("empty chunk (T = 0)", ErrorCode.EMPTY_CHUNK)
        if targets is not None:
            self.trainer.check_targets(np.ascontiguousarray(targets), batched=False)
        return np.asarray(chunk)

    def push(self, stream: str, chunk: Any) -> np.ndarray:
        """Train on one chunk of ``stream``; returns its training outputs."""
        return self.push_many({stream: chunk})[stream]

    def push_many(
        self, chunks: Mapping[str, Any], *, validated: bool = False
    ) -> dict[str, np.ndarray]:
        """Train on one chunk per stream; returns each chunk's training outputs.

        ``validated`` is accepted for the worker's sake; the chunks are split into inputs
        and targets here either way.
        """
        if not chunks:
            return {}
        inputs: dict[str, np.ndarray] = {}
        targets: dict[str, np.ndarray] = {}
        for stream, chunk in chunks.items():
            x, y = self._split(chunk)
            inputs[stream] = np.ascontiguousarray(x)
            if y is not None:
                targets[stream] = np.ascontiguousarray(y)
        before = self.trainer.step
        out = self.trainer.train_streams(inputs, targets or None)
        if self.trainer.step > before:
            with self._lock:
                self.history.append((self.trainer.step, self.trainer.last_loss))
            if self.metrics is not None:
                self.metrics.train_steps.inc(self.trainer.step - before)
                self.metrics.train_loss.set(self.trainer.last_loss)
                self.metrics.record_timesteps(sum(len(c) for c in inputs.values()))
        self._pushing = inputs.keys()  # applied, not yet in the worker's sequence table
        try:
            self.maybe_save()
        finally:
            self._pushing = ()
        return out

    def reset(self, stream: str) -> None:
        """Back to the initial state; the stream's kept observation is dropped."""
        self.trainer.reset(stream)

    def close(self, stream: str) -> None:
        """Free the stream's slot."""
        self.trainer.close(stream)

    # ---- durability --------------------------------------------------------------------

    def maybe_save(self) -> None:
        """Publish / checkpoint when their step intervals have been crossed."""
        step = self.trainer.step
        if self.publish_dir is not None and step - self._last_publish >= self.publish_every:
            self.publish()
        elif (self.checkpoint_path is not None
              and step - self._last_checkpoint >= self.checkpoint_every):
            self.checkpoint()

    def checkpoint(self) -> None:
        """Write the checkpoint now (atomic)."""
        if self.checkpoint_path is None:
            return
        self.trainer.save_checkpoint(self.checkpoint_path, self._extra())
        self._last_checkpoint = self.trainer.step
        self.checkpoints_written += 1
        if self.metrics is not None:
            self.metrics.checkpoints.inc()

    def attach_sequences(self, book: SequenceBook) -> int:
        """Keep ``book``'s next sequence numbers in every checkpoint from now on, and put
        back those of the loaded checkpoint (call before serving). Returns how many."""
        self.sequence_book = book
        restored = self.restored.get("sequences", {})
        for stream, next_seq in restored.items():
            book.restore(stream, next_seq)
        return len(restored)

    def _extra(self) -> dict[str, Any]:
        """The checkpoint's extra facts: the front's next seqs, the log position."""
        extra: dict[str, Any] = {}
        book = self.sequence_book
        if book is not None:
            # inside push_many the worker has not recorded this round's PUSHes yet (one per
            # stream: the trainer's worker does not coalesce), so count them here
            seqs = {s: n for s, (n, _) in book.export().items()}
            seqs.update({s: book.next_seq(s) + 1 for s in self._pushing})
            extra["sequences"] = seqs
        if self.log_position is not None:
            extra["log"] = dict(self.log_position)
        return extra

    def publish(self) -> int:
        """Publish the current weights as the next version (checkpointing it first)."""
        if self.publish_dir is None:
            return self.trainer.version
        self.trainer.version += 1
        self.checkpoint()
        publish_weights(
            self.publish_dir, self.trainer.model.get_weights(), self.trainer.version,
            {"step": self.trainer.step, "loss": _finite(self.trainer.last_loss),
             "mode": self.trainer.config.mode}, keep=self.keep_versions, key=self.publish_key,
        )
        self._last_publish = self.trainer.step
        if self.metrics is not None:
            self.metrics.weights_version.set(self.trainer.version)
        return self.trainer.version

    def shutdown(self) -> None:
        """Final publish (if anything was trained since the last one) and checkpoint."""
        if self.publish_dir is not None and self.trainer.step > self._last_publish:
            self.publish()
        else:
            self.checkpoint()

    def loss_history(self) -> list[tuple[int, float]]:
        """``(step, loss)`` per optimizer step so far (a copy; safe from another thread)."""
        with self._lock:
            return list(self.history)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
