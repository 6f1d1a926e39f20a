"""Free-running training of a Keras RNN decoder on streams, with truncated BPTT.

:class:`FreeRunningTrainer` trains the user's own layers in place. Each step of a chunk runs
in ONE compiled ``tf.while_loop`` (:mod:`streamrnn.training.graph`): within a chunk, after
``warmup`` observed steps, the input at step t+1 is the model's own output at step t (the
feedback rule of :mod:`streamrnn.engine.generate`: the prediction for regression models, a
greedy or sampled token for token and one-hot models, or a user callable). The same graph
runs teacher forcing (never feed back) and scheduled sampling (feed back with a probability
that rises over training, :func:`~streamrnn.training.config.feed_probability`), so the
modes differ only in the input they choose.

Streams: each stream owns one batch row ("slot", as in serving); its recurrent state is
carried across chunks (truncated backpropagation through time: the state is carried, the
gradient stops at the chunk boundary). Without explicit targets a stream trains on next-step
prediction: the target of step t is the observation at t+1 (the last observation of a
chunk is kept and becomes the first input of the next one).

Randomness (scheduled-sampling coin flips, token sampling) is stateless, keyed on
``(seed, step)``, so resuming at step N from a checkpoint
(:mod:`streamrnn.training.checkpoint`) draws exactly what an uninterrupted run draws at
step N.

Gradients: for regression models the gradient flows through the fed-back prediction (the
closed-loop objective; ``feedback_gradient=False`` stops it). For token models the
fed-back id is discrete, so no gradient flows through the sample (it only changes which
embedding row is read); this is the plain "no gradient through the sample" estimator.

Dropout (layer or cell dropout) is not applied while training here: every layer runs with
``training=False`` inside the loop.

Example::

    from streamrnn.training.config import TrainConfig
    from streamrnn.training.trainer import FreeRunningTrainer

    trainer = FreeRunningTrainer(model, slots=16, config=TrainConfig(mode="free", warmup=8))
    for chunk_by_stream in data:                       # {stream: (T, D) float} chunks
        outputs = trainer.train_streams(chunk_by_stream)  # {stream: (T, output_dim)}
    trainer.last_loss                                  # loss of the last optimizer step
    trainer.save_checkpoint("ckpt/trainer.npz")
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import keras
import numpy as np

from streamrnn.engine.generate import Feedback
from streamrnn.engine.slots import SlotTable
from streamrnn.errors import EngineFullError, InvalidInputError
from streamrnn.executors.buckets import bucket_for
from streamrnn.protocol import ErrorCode
from streamrnn.training.chain import TrainingChain
from streamrnn.training.checkpoint import TrainerCheckpoint
from streamrnn.training.config import TrainConfig, feed_probability
from streamrnn.training.graph import FeedbackGraph
from streamrnn.training.inputs import check_batch, check_inputs, check_targets

__all__ = ["FreeRunningTrainer"]


class FreeRunningTrainer:
    """Trains a Keras RNN decoder in place on many streams, one batch row per stream.

    Args:
        model: a built single-input chain whose output can be fed back as its next input
            (features ``(B, T, D)`` with output_dim == D, or token ids ``(B, T)`` starting
            with an Embedding whose vocabulary equals the output size). Its weights are
            trained in place.
        slots: batch rows = streams trained at once.
        config: :class:`~streamrnn.training.config.TrainConfig`.
        optimizer: a Keras optimizer; default Adam(learning_rate, clipnorm).
        feedback: the generation feedback rule
            (see :func:`streamrnn.engine.generate.plan_feedback`):
            None (decided from the model), ``"tokens"``, ``"onehot"``, ``"prediction"`` or a
            callable ``y (B, out) -> next input``.

    Attributes:
        chain: the model as the trainer steps it (input kind, loss, feedback rule).
        graph: the compiled train step and rollout; it owns the state variables.
        table: stream -> row.
        step, version, timesteps, last_loss: optimizer steps taken, published weights
            version, trained (valid) timesteps, loss of the last step.
    """

    def __init__(
        self,
        model: keras.Model,
        slots: int = 16,
        config: TrainConfig | None = None,
        optimizer: keras.optimizers.Optimizer | None = None,
        feedback: Feedback = None,
    ):
        self.config = config or TrainConfig()
        self.config.validate()
        if not model.built or not model.inputs:
            raise ValueError(f"model {model.name!r} is not built; give it an Input")
        self.model = model
        self.slots = slots
        self.table = SlotTable(slots)
        self.chain = chain = TrainingChain.from_model(model, slots, self.config, feedback)
        self.input_kind, self.input_dim, self.output_dim = (
            chain.input_kind, chain.input_dim, chain.output_dim)
        self.feedback, self.loss_name, self.next_step_targets = (
            chain.feedback, chain.loss_name, chain.next_step_targets)
        self.optimizer = optimizer or keras.optimizers.Adam(
            learning_rate=self.config.learning_rate, clipnorm=self.config.clipnorm
        )
        self.graph = FeedbackGraph(chain, self.config, model, self.optimizer, slots)
        self.state_vars = self.graph.state_vars
        self.optimizer.build(self.model.trainable_variables)
        self.step = 0  # optimizer steps taken
        self.version = 0  # published weights version
        self.timesteps = 0  # trained (valid) timesteps
        self.last_loss = float("nan")
        # per stream: the last observation, the first input of its next chunk
        self._pending: dict[str, np.ndarray] = {}

    @property
    def trace_count(self) -> int:
        """How many times the train step was traced (compiled)."""
        return self.graph.trace_count

    # ---- batch API ---------------------------------------------------------------------

    def train_batch(self, x: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None
                    ) -> float:
        """One optimizer step on a full batch of rows (row i = slot i).

        Args:
            x: ``(slots, T, D)`` float32 or ``(slots, T)`` int32 observed inputs.
            target: ``(slots, T, out)`` float32 or ``(slots, T)`` int32 token ids.
            mask: ``(slots, T)`` bool valid steps (right-padded); default all valid. Rows
                with no valid step keep their state.

        Returns:
            the mean loss over valid steps.
        """
        x, target, mask = check_batch(self.chain, self.slots, x, target, mask)
        self._run_batch(x, target, mask)
        return self.last_loss

    def _run_batch(self, x: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
        p = feed_probability(self.config, self.step)
        loss, y = self.graph.train(x, target, mask, p, self.step)
        self.step += 1
        self.timesteps += int(mask.sum())
        self.last_loss = loss
        return y

    def rollout(self, x: np.ndarray, warmup: int, p_own: float = 1.0, step: int = 0
                ) -> np.ndarray:
        """Outputs of the same feedback graph from the initial state, without training.

        With ``p_own=1`` this is closed-loop generation: the first ``warmup`` steps read
        ``x``, later steps read the model's own previous output (``x`` there is ignored).

        Args:
            x: ``(B, T, D)`` float32 or ``(B, T)`` int32.
        Returns:
            ``(B, T, output_dim)`` float32.
        """
        x = self.check_inputs(np.asarray(x), batched=True)
        return self.graph.rollout(x, np.ones(x.shape[:2], bool), warmup, p_own, step)

    def check_inputs(self, x: np.ndarray, batched: bool) -> np.ndarray:
        """Validate inputs (``[B,] T, D`` float or ``[B,] T`` int ids); InvalidInputError."""
        return check_inputs(self.chain, x, batched)

    def check_targets(self, y: np.ndarray, batched: bool) -> np.ndarray:
        """Validate targets (``[B,] T`` int ids or ``[B,] T, out`` float); InvalidInputError."""
        return check_targets(self.chain, y, batched)

    # ---- streams -----------------------------------------------------------------------

    @property
    def streams(self) -> list[str]:
        """Every open training stream, in slot-table order."""
        return list(self.table)

    def prepare(self, stream: str, chunk: Any, target: Any | None = None
                ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
        """Validate one chunk of ``stream`` and pair it with its targets (changes nothing).

        Without ``target`` the pair is next-step prediction over the stream: the inputs are
        ``[kept, chunk[:-1]]`` and the targets ``chunk`` (``kept`` is the stream's last
        observation from its previous chunk; a stream's first chunk has none, so its first
        element is only an input).

        Returns:
            ``(inputs, targets, lead, kept)``: ``lead`` (0 or 1) chunk elements have no
            prediction; ``kept`` is the observation to keep for the next chunk (or None).
        """
        chunk = self.check_inputs(np.asarray(chunk), batched=False)
        if len(chunk) == 0:
            raise InvalidInputError("empty chunk (T = 0)", ErrorCode.EMPTY_CHUNK)
        if target is not None:
            target = self.check_targets(np.asarray(target), batched=False)
            if len(target) != len(chunk):
                raise InvalidInputError(
                    f"target has {len(target)} steps, chunk has {len(chunk)}",
                    ErrorCode.BAD_SHAPE,
                )
            return chunk, target, 0, None
        if not self.next_step_targets:
            raise InvalidInputError(
                f"model {self.model.name!r} outputs {self.output_dim} values per step, which "
                "are not its next input: send explicit targets", ErrorCode.BAD_VALUE,
            )
        pending = self._pending.get(stream)
        seq = chunk if pending is None else np.concatenate([pending[None], chunk])
        lead = 1 if pending is None else 0
        return seq[:-1], seq[1:], lead, seq[-1].copy()

    def train_streams(
        self, chunks: Mapping[str, Any], targets: Mapping[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        """Train on one chunk per stream (streams opened as needed), in shared steps.

        Every chunk is validated before anything changes. Chunks longer than
        ``config.max_chunk`` are split into consecutive windows (one optimizer step each,
        each starting with its own warm-up). The loss is in :attr:`last_loss`.

        Returns:
            stream -> ``(T, output_dim)`` float32: the training pass's output for each chunk
            element (the prediction of ``chunk[i]``, or of ``target[i]``); NaN where there
            is none (the first element of a stream's first chunk without targets).
        """
        targets = targets or {}
        unknown = set(targets) - set(chunks)
        if unknown:
            raise InvalidInputError(f"targets for streams without a chunk: {sorted(unknown)}",
                                    ErrorCode.BAD_VALUE)
        prepared = {s: self.prepare(s, c, targets.get(s)) for s, c in chunks.items()}
        new = [s for s in chunks if s not in self.table]
        if len(new) > self.table.free:
            raise EngineFullError(
                f"{len(new)} new training streams but only {self.table.free} free slots "
                f"(slots={self.slots}); close streams or start the trainer with more slots"
            )
        for s in new:
            self.open(s)
        pieces: dict[str, list[np.ndarray]] = {}
        for s, (_, _, lead, kept) in prepared.items():
            if kept is not None:
                self._pending[s] = kept
            pieces[s] = [np.full((lead, self.output_dim), np.nan, np.float32)]
        cap = self.config.max_chunk
        offset = 0
        longest = max(len(p[0]) for p in prepared.values())
        while offset < longest:
            window = {s: (a[offset: offset + cap], b[offset: offset + cap])
                      for s, (a, b, _, _) in prepared.items() if len(a) > offset}
            for s, out in self._train_window(window).items():
                pieces[s].append(out)
            offset += cap
        return {s: np.concatenate(p) for s, p in pieces.items()}

    def _train_window(self, window: Mapping[str, tuple[np.ndarray, np.ndarray]]
                      ) -> dict[str, np.ndarray]:
        width = max(len(a) for a, _ in window.values())
        bucket = max(bucket_for(width, self.config.max_chunk), 2)
        first_in, first_target = next(iter(window.values()))
        x = np.zeros((self.slots, bucket, *first_in.shape[1:]), first_in.dtype)
        y = np.zeros((self.slots, bucket, *first_target.shape[1:]), first_target.dtype)
        mask = np.zeros((self.slots, bucket), bool)
        rows = {}
        for s, (a, b) in window.items():
            row = rows[s] = self.table.slot_of(s)
            x[row, : len(a)] = a
            y[row, : len(b)] = b
            mask[row, : len(a)] = True
            self.table.touch(s, len(a))
        out = self._run_batch(x, y, mask)
        return {s: out[row, : len(window[s][0])].copy() for s, row in rows.items()}

    def open(self, stream: str) -> int:
        """Give ``stream`` a row in the initial (zero) state."""
        if stream in self.table:
            return self.table.slot_of(stream)
        row = self.table.acquire(stream)
        self.graph.reset_rows([row])
        return row

    def reset(self, stream: str) -> None:
        """Back to the initial state; the kept observation is dropped."""
        self.graph.reset_rows([self.table.slot_of(stream)])
        self._pending.pop(stream, None)

    def close(self, stream: str) -> None:
        """Free the stream's row and drop its kept observation."""
        self.table.release(stream)
        self._pending.pop(stream, None)

    # ---- checkpoints (the trainer's own: streamrnn.training.checkpoint) -------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything needed to resume exactly, as named numpy arrays (the file format of
        :mod:`streamrnn.training.checkpoint`)."""
        return self._snapshot().to_arrays()

    def load_state_dict(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore from :meth:`state_dict` (same model architecture and slots)."""
        self._restore(TrainerCheckpoint.from_arrays(arrays))

    def save_checkpoint(self, path: str | os.PathLike,
                        extra: Mapping[str, Any] | None = None) -> None:
        """Write :meth:`state_dict` atomically (temp file, fsync, rename), with a checksum;
        ``extra``: JSON-able facts stored beside it (see :meth:`snapshot`)."""
        self.snapshot(extra).save(path)

    def load_checkpoint(self, path: str | os.PathLike) -> bool:
        """Resume from ``path`` if it exists; returns whether it did (CheckpointError for a
        truncated or edited file)."""
        checkpoint = TrainerCheckpoint.load(path)
        if checkpoint is None:
            return False
        self.restore(checkpoint)
        return True

    def snapshot(self, extra: Mapping[str, Any] | None = None) -> TrainerCheckpoint:
        """Everything needed to resume exactly, plus ``extra`` (JSON-able, e.g. the online
        trainer's sequence numbers and log position)."""
        checkpoint = self._snapshot()
        checkpoint.extra = dict(extra or {})
        return checkpoint

    def restore(self, checkpoint: TrainerCheckpoint) -> None:
        """Continue from ``checkpoint`` (same model architecture and slots)."""
        self._restore(checkpoint)

    def _snapshot(self) -> TrainerCheckpoint:
        return TrainerCheckpoint(
            weights=[np.asarray(w) for w in self.model.get_weights()],
            optimizer=[np.asarray(v.numpy()) for v in self.optimizer.variables],
            states=[v.numpy() for v in self.state_vars],
            streams=[(s, info.slot, info.steps) for s, info in self.table.items()],
            pending=dict(self._pending),
            step=self.step, version=self.version, timesteps=self.timesteps,
            last_loss=self.last_loss, config=asdict(self.config),
            optimizer_name=type(self.optimizer).__name__,
        )

    def _restore(self, checkpoint: TrainerCheckpoint) -> None:
        opt_vars = self.optimizer.variables
        _check_fits(checkpoint, self.model.get_weights(), [v.numpy() for v in opt_vars],
                    [v.numpy() for v in self.state_vars])
        table = checkpoint.table(self.slots)  # refused before anything changes
        self.model.set_weights(checkpoint.weights)
        for v, value in zip(opt_vars, checkpoint.optimizer, strict=True):
            v.assign(value)
        for v, value in zip(self.state_vars, checkpoint.states, strict=True):
            v.assign(value)
        self.table = table
        self._pending = dict(checkpoint.pending)
        self.step, self.version = checkpoint.step, checkpoint.version
        self.timesteps, self.last_loss = checkpoint.timesteps, checkpoint.last_loss


def _check_fits(checkpoint: TrainerCheckpoint, weights: list[np.ndarray],
                optimizer: list[np.ndarray], states: list[np.ndarray]) -> None:
    """InvalidInputError (BAD_SHAPE) unless the checkpoint's weights, optimizer variables and
    state arrays have the counts and shapes of the trainer's."""
    for what, saved, live, holds in (
            ("weight arrays", checkpoint.weights, weights, "model"),
            ("optimizer variables", checkpoint.optimizer, optimizer, "optimizer"),
            ("state arrays", checkpoint.states, states, "trainer")):
        if len(saved) != len(live):
            raise InvalidInputError(f"checkpoint has {len(saved)} {what}, {holds} has "
                                    f"{len(live)}", ErrorCode.BAD_SHAPE)
        for i, (a, b) in enumerate(zip(saved, live, strict=True)):
            if np.shape(a) != np.shape(b):
                raise InvalidInputError(f"checkpoint {what} {i}: shape {np.shape(a)}, the "
                                        f"trainer's is {np.shape(b)}", ErrorCode.BAD_SHAPE)
