"""Free-running training of a Keras RNN decoder on streams, with truncated BPTT.

The trainer steps the user's own layers (the cells of its RNN layers, the timewise layers
around them) inside ONE ``tf.while_loop`` in a compiled ``tf.function``: within a chunk,
after ``warmup`` observed steps, the input at step t+1 is the model's own output at step t
(the feedback rule of :mod:`streamrnn.engine.generate`: the prediction for regression models, a
greedy or sampled token for token and one-hot models, or a user callable). The
same graph runs teacher forcing (never feed back) and scheduled sampling (feed back with a
probability that rises over training), so the modes differ only in the input they choose.

Streams: each stream owns one batch row ("slot", as in serving); its recurrent state is
carried across chunks (truncated backpropagation through time: the state is carried, the
gradient stops at the chunk boundary). Without explicit targets a stream trains on next-step
prediction: the target of step t is the observation at t+1 (the last observation of a
chunk is kept and becomes the first input of the next one).

Randomness (scheduled-sampling coin flips, token sampling) is stateless, keyed on
``(seed, step)``, so resuming at step N from a checkpoint draws exactly what an
uninterrupted run draws at step N.

Gradients: for regression models the gradient flows through the fed-back prediction (the
closed-loop objective; ``feedback_gradient=False`` stops it). For token models the
fed-back id is discrete, so no gradient flows through the sample (it only changes which
embedding row is read); this is the plain "no gradient through the sample" estimator.

Dropout (layer or cell dropout) is not applied while training here: every layer runs with
``training=False`` inside the loop.

Example::

    trainer = FreeRunningTrainer(model, slots=16, config=TrainConfig(mode="free", warmup=8))
    for chunk_by_stream in data:                       # {stream: (T, D) float} chunks
        loss = trainer.train_streams(chunk_by_stream)  # one optimizer step per bucketed step
    trainer.save_checkpoint("ckpt/trainer.npz")
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf

from streamrnn.atomic import atomic_write
from streamrnn.engine.generate import SAMPLERS, Feedback, pick_tokens, plan_feedback
from streamrnn.engine.slots import SlotTable
from streamrnn.errors import EngineFullError, InvalidInputError, UnsupportedModelError
from streamrnn.executors.buckets import bucket_for
from streamrnn.executors.models import ServingModel, check_streamable, flatten_layers
from streamrnn.protocol import ErrorCode

Mode = Literal["free", "teacher", "scheduled"]
Schedule = Literal["linear", "exponential", "inverse_sigmoid"]
MODES: tuple[str, ...] = ("free", "teacher", "scheduled")
SCHEDULES: tuple[str, ...] = ("linear", "exponential", "inverse_sigmoid")
CHECKPOINT_FORMAT = 1


# ---- configuration ---------------------------------------------------------------------


@dataclass
class TrainConfig:
    """How the trainer feeds inputs and optimizes.

    Attributes:
        mode: ``"free"`` (after the warm-up always feed back), ``"teacher"`` (never) or
            ``"scheduled"`` (feed back with probability :func:`feed_probability`).
        warmup: observed (teacher-forced) steps at the start of every chunk (>= 1); they
            re-synchronise the state with the data before the model runs on its own.
        schedule, schedule_steps, schedule_k: the scheduled-sampling curriculum.
        learning_rate, clipnorm: Adam settings (used when no optimizer is given).
        loss: ``"auto"`` (sparse cross-entropy for token ids, cross-entropy for one-hot
            models, mse otherwise), ``"mse"``, ``"sparse_ce"``, ``"ce"``.
        sample: how a token is picked (token/one-hot models), as in generation:
            ``"greedy"``, ``"temperature"`` (== ``"sample"``) or ``"top_k"``.
        temperature, top_k: for the sampling pickers.
        feedback_gradient: regression only: let the gradient flow through the fed-back
            prediction (True) or stop it.
        seed: keys every random draw (with the step counter).
        max_chunk: longest window trained in one step (a power of two); longer chunks are
            split into consecutive windows, each starting with its own warm-up.
        jit_compile: compile the train step with XLA.
    """

    mode: Mode = "free"
    warmup: int = 8
    schedule: Schedule = "inverse_sigmoid"
    schedule_steps: int = 1000
    schedule_k: float = 100.0
    learning_rate: float = 1e-3
    clipnorm: float | None = 1.0
    loss: Literal["auto", "mse", "sparse_ce", "ce"] = "auto"
    sample: Literal["greedy", "temperature", "top_k", "sample"] = "greedy"
    temperature: float = 1.0
    top_k: int | None = None
    feedback_gradient: bool = True
    seed: int = 0
    max_chunk: int = 256
    jit_compile: bool = False

    def validate(self) -> None:
        """Raise InvalidInputError (BAD_VALUE) for an unusable setting."""
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup < 1:
            problems.append(f"warmup must be >= 1 observed step, got {self.warmup}")
        if self.schedule_steps < 1:
            problems.append(f"schedule_steps must be >= 1, got {self.schedule_steps}")
        if self.schedule == "exponential" and not 0 < self.schedule_k < 1:
            problems.append(f"exponential schedule needs 0 < schedule_k < 1, got {self.schedule_k}")
        if self.schedule == "inverse_sigmoid" and self.schedule_k < 1:
            problems.append(f"inverse_sigmoid schedule needs schedule_k >= 1, got "
                            f"{self.schedule_k}")
        if self.loss not in ("auto", "mse", "sparse_ce", "ce"):
            problems.append(f"loss must be auto, mse, sparse_ce or ce, got {self.loss!r}")
        if self.sample not in SAMPLERS:
            problems.append(f"sample must be one of {SAMPLERS}, got {self.sample!r}")
        if self.sample == "top_k" and self.top_k is None:
            problems.append("sample='top_k' needs top_k")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.max_chunk < 2 or self.max_chunk & (self.max_chunk - 1):
            problems.append(f"max_chunk must be a power of two >= 2, got {self.max_chunk}")
        if self.learning_rate <= 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if problems:
            raise InvalidInputError("; ".join(problems), ErrorCode.BAD_VALUE)


def feed_probability(config: TrainConfig, step: int) -> float:
    """Probability of feeding the model's own output (after the warm-up) at ``step``.

    ``free`` -> 1, ``teacher`` -> 0; ``scheduled`` rises from 0 towards 1 (Bengio et al.
    2015, with epsilon = the teacher-forcing probability, so this is ``1 - epsilon``):

    - linear: ``min(1, step / schedule_steps)``
    - exponential: ``1 - k**step`` (``0 < k < 1``)
    - inverse_sigmoid: ``1 - k / (k + exp(step / k))`` (``k >= 1``)
    """
    if config.mode == "free":
        return 1.0
    if config.mode == "teacher":
        return 0.0
    if config.schedule == "linear":
        return min(1.0, step / config.schedule_steps)
    k = config.schedule_k
    if config.schedule == "exponential":
        return 1.0 - k**step
    z = step / k
    if z > 700:  # exp overflow; the limit is 1
        return 1.0
    return 1.0 - k / (k + math.exp(z))


# ---- the model as a step function ------------------------------------------------------


@dataclass
class _StepLayer:
    layer: keras.layers.Layer
    cell: Any = None  # the RNN cell, for recurrent layers
    state_shapes: list[tuple[int, ...]] = field(default_factory=list)


def _state_shapes(cell: Any) -> list[tuple[int, ...]]:
    sizes = cell.state_size
    flat = sizes if isinstance(sizes, list | tuple) else [sizes]
    out = []
    for s in flat:
        out.append(tuple(s) if isinstance(s, list | tuple) else (int(s),))
    return out


class FreeRunningTrainer:
    """Trains a Keras RNN decoder in place on many streams, one batch row per stream.

    Args:
        model: a built single-input chain whose output can be fed back as its next input
            (features ``(B, T, D)`` with output_dim == D, or token ids ``(B, T)`` starting
            with an Embedding whose vocabulary equals the output size). Its weights are
            trained in place.
        slots: batch rows = streams trained at once.
        config: :class:`TrainConfig`.
        optimizer: a Keras optimizer; default Adam(learning_rate, clipnorm).
        feedback: the generation feedback rule
            (see :func:`streamrnn.engine.generate.plan_feedback`):
            None (decided from the model), ``"tokens"``, ``"onehot"``, ``"prediction"`` or a
            callable ``y (B, out) -> next input``.
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
        chain = flatten_layers(model)
        self._layers: list[_StepLayer] = []
        for layer in chain:
            check_streamable(layer)
            if isinstance(layer, keras.layers.Masking):
                raise UnsupportedModelError(
                    f"layer {layer.name!r} (Masking) is not supported by the trainer; "
                    "send only real steps"
                )
            if isinstance(layer, keras.layers.RNN):
                self._layers.append(_StepLayer(layer, layer.cell, _state_shapes(layer.cell)))
            elif isinstance(layer, keras.layers.TimeDistributed):
                self._layers.append(_StepLayer(layer.layer))
            else:
                self._layers.append(_StepLayer(layer))
        if not any(s.cell is not None for s in self._layers):
            raise UnsupportedModelError(f"model {model.name!r} has no recurrent layer to train")

        in_shape = tuple(model.inputs[0].shape)
        self.output_dim = int(model.outputs[0].shape[-1])
        if len(in_shape) == 2 and isinstance(chain[0], keras.layers.Embedding):
            self.input_kind = "tokens"
            self.input_dim = int(chain[0].input_dim)
            self._mask_zero = bool(chain[0].mask_zero)
        elif len(in_shape) == 3 and in_shape[-1] is not None:
            self.input_kind = "features"
            self.input_dim = int(in_shape[-1])
            self._mask_zero = False
        else:
            raise UnsupportedModelError(
                f"model {model.name!r} input shape {in_shape} is not (batch, time, features) "
                "or (batch, time) token ids starting with an Embedding"
            )
        # The generation feedback rule, decided on a weight-sharing view of the chain (a
        # ServingModel record over the model's own layers; its forward() is never called).
        view = ServingModel(
            slots=slots, layers=chain, rnn_layers=[s.layer for s in self._layers if s.cell],
            source_layers=chain, input_kind=self.input_kind, input_dim=self.input_dim,
            output_dim=self.output_dim, name=model.name,
        )
        self.feedback = plan_feedback(view, feedback)
        if not self.feedback.picks_tokens and self.config.sample != "greedy":
            raise InvalidInputError(
                f"sample={self.config.sample!r} needs a token model; this model feeds back "
                "its prediction", ErrorCode.BAD_VALUE,
            )
        loss = self.config.loss
        if loss == "auto":
            loss = {"tokens": "sparse_ce", "onehot": "ce"}.get(self.feedback.mode, "mse")
        if loss == "sparse_ce" and self.input_kind != "tokens":
            raise InvalidInputError("sparse_ce loss needs a token model", ErrorCode.BAD_VALUE)
        self.loss_name = loss
        # Without explicit targets a stream trains on predicting its own next observation.
        self.next_step_targets = (
            (self.input_kind == "tokens" and loss == "sparse_ce")
            or (self.input_kind == "features" and self.output_dim == self.input_dim
                and loss != "sparse_ce")
        )

        self.state_vars: list[tf.Variable] = []
        for s in self._layers:
            for shape in s.state_shapes:
                self.state_vars.append(
                    tf.Variable(tf.zeros((slots, *shape)), trainable=False, name="train_state")
                )
        self.optimizer = optimizer or keras.optimizers.Adam(
            learning_rate=self.config.learning_rate, clipnorm=self.config.clipnorm
        )
        self.optimizer.build(self.model.trainable_variables)
        self.step = 0  # optimizer steps taken
        self.version = 0  # published weights version
        self.timesteps = 0  # trained (valid) timesteps
        self.trace_count = 0
        self.last_loss = float("nan")
        # per stream: the last observation, the first input of its next chunk
        self._pending: dict[str, np.ndarray] = {}
        # autograph off: the only loop over time is the explicit tf.while_loop
        self._train_fn = tf.function(
            self._train_graph, jit_compile=self.config.jit_compile, autograph=False
        )
        self._rollout_fn = tf.function(self._rollout_graph, autograph=False)

    # ---- the compiled graph ------------------------------------------------------------

    def _step_model(self, inp: tf.Tensor, states: list[tf.Tensor]) -> tuple[tf.Tensor, list]:
        """One timestep of the whole chain: inp (B, D) or (B,) ids -> (B, out), new states."""
        h = inp
        new_states: list[tf.Tensor] = []
        k = 0
        for s in self._layers:
            if s.cell is None:
                h = s.layer(h, training=False)
                continue
            n = len(s.state_shapes)
            h, st = s.cell(h, list(states[k: k + n]), training=False)
            new_states.extend(st if isinstance(st, list | tuple) else [st])
            k += n
        return h, new_states

    def _feedback(self, prev_out: tf.Tensor, t: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        """The next input from the previous output ``(B, out)``: generation's rule."""
        plan = self.feedback
        if plan.mode == "prediction":
            return prev_out if self.config.feedback_gradient else tf.stop_gradient(prev_out)
        if plan.mode == "custom":
            x = plan.fn(prev_out)
            return tf.cast(x, tf.int32 if self.input_kind == "tokens" else tf.float32)
        batch = tf.shape(prev_out)[0]
        cfg = self.config
        # per-row counter-based randomness keyed on (seed, step, row) and counted by t
        rows = tf.range(batch, dtype=tf.int64)
        key = tf.stack([tf.fill([batch], tf.constant(cfg.seed & 0xFFFFFFFF, tf.int64)),
                        (tf.cast(step, tf.int64) * 65_537 + rows) & 0xFFFFFFFF], axis=1)
        ids = pick_tokens(
            tf.stop_gradient(prev_out), plan.probs,
            tf.fill([batch], cfg.sample == "greedy"),
            tf.fill([batch], tf.constant(1.0 / cfg.temperature, tf.float32)),
            tf.fill([batch], tf.constant(cfg.top_k or 0, tf.int32)),
            key, tf.fill([batch], tf.cast(t, tf.int64)),
        )
        if plan.mode == "onehot":
            return tf.one_hot(ids, self.input_dim, dtype=tf.float32)
        return ids

    def _unroll(
        self, x: tf.Tensor, own: tf.Tensor, mask: tf.Tensor, states: list[tf.Tensor],
        step: tf.Tensor,
    ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """Run the chain over a window, choosing observed or fed-back input per step.

        Args:
            x: observed inputs ``(B, T, D)`` float32 or ``(B, T)`` int32.
            own: ``(B, T)`` bool, feed the previous output instead of ``x`` at this step.
            mask: ``(B, T)`` bool, valid steps (a right-padded prefix per row).
            states: initial recurrent states, each ``(B, ...)``.
            step: the optimizer step (keys token sampling).

        Returns:
            outputs ``(B, T, out)`` and the final states (taken at each row's last valid step).
        """
        steps = tf.shape(x)[1]
        perm = [1, 0] + list(range(2, len(x.shape)))
        xs = tf.transpose(x, perm)
        owns = tf.transpose(own)
        masks = tf.transpose(mask)
        batch = tf.shape(x)[0]
        prev0 = tf.zeros((batch, self.output_dim))
        outs = tf.TensorArray(tf.float32, size=steps)

        def body(t, prev, sts, ta):
            observed = xs[t]
            fed = self._feedback(prev, t, step)
            if self.input_kind == "features":
                inp = tf.where(owns[t][:, None], fed, observed)
            else:
                inp = tf.where(owns[t], fed, observed)
            out, new = self._step_model(inp, sts)
            out = tf.cast(out, tf.float32)
            m = masks[t]
            if self._mask_zero:  # Embedding(mask_zero=True): id 0 leaves the state as it was
                m = tf.logical_and(m, tf.not_equal(inp, 0))
            new = [tf.where(tf.reshape(m, [-1] + [1] * (len(n.shape) - 1)), n, o)
                   for n, o in zip(new, sts, strict=True)]
            prev = tf.where(masks[t][:, None], out, prev)
            return t + 1, prev, new, ta.write(t, out)

        _, _, final, outs = tf.while_loop(
            lambda t, *_: t < steps, body, (tf.constant(0), prev0, list(states), outs),
            maximum_iterations=steps,
        )
        y = tf.transpose(outs.stack(), [1, 0, 2])
        return y, final

    def _draws(self, shape_bt: tf.Tensor, p_own: tf.Tensor, step: tf.Tensor,
               warm: tf.Tensor) -> tf.Tensor:
        """Scheduled-sampling coins ``(B, T)``: feed back at t >= warm with probability p."""
        seed = tf.stack([tf.constant(self.config.seed, tf.int64), tf.cast(step, tf.int64)])
        coins = tf.random.stateless_uniform(shape_bt, seed)
        t_idx = tf.range(shape_bt[1])[None, :]
        own = tf.logical_and(coins < p_own, t_idx >= warm)
        return own

    def _loss(self, y: tf.Tensor, target: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        if self.loss_name == "mse":
            per = tf.reduce_mean(tf.square(y - target), axis=-1)
        elif self.loss_name == "sparse_ce":
            per = keras.losses.sparse_categorical_crossentropy(
                target, y, from_logits=not self.feedback.probs
            )
        else:
            per = keras.losses.categorical_crossentropy(
                target, y, from_logits=not self.feedback.probs
            )
        w = tf.cast(mask, tf.float32)
        return tf.reduce_sum(per * w) / tf.maximum(tf.reduce_sum(w), 1.0)

    def _train_graph(self, x, target, mask, p_own, step):
        self.trace_count += 1  # Python side effect: once per trace
        states = [v.read_value() for v in self.state_vars]  # truncated BPTT: no grad in
        own = self._draws(tf.shape(mask), p_own, step, self.config.warmup)
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            y, final = self._unroll(x, own, mask, states, step)
            loss = self._loss(y, target, mask)
        grads = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(grads, variables, strict=True))
        for v, s in zip(self.state_vars, final, strict=True):
            v.assign(tf.stop_gradient(s))
        return loss, y

    def _rollout_graph(self, x, mask, warm, p_own, step):
        batch = tf.shape(mask)[0]
        states = [tf.zeros(tf.concat([[batch], tf.shape(v)[1:]], 0)) for v in self.state_vars]
        own = self._draws(tf.shape(mask), p_own, step, warm)
        y, _ = self._unroll(x, own, mask, states, step)
        return y

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
        x, target, mask = self._check_batch(x, target, mask)
        self._run_batch(x, target, mask)
        return self.last_loss

    def _run_batch(self, x: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
        p = feed_probability(self.config, self.step)
        loss, y = self._train_fn(
            tf.constant(x), tf.constant(target), tf.constant(mask),
            tf.constant(p, tf.float32), tf.constant(self.step, tf.int64),
        )
        self.step += 1
        self.timesteps += int(mask.sum())
        self.last_loss = float(loss)
        return y.numpy()

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
        mask = np.ones(x.shape[:2], bool)
        return self._rollout_fn(
            tf.constant(x), tf.constant(mask), tf.constant(warmup), tf.constant(p_own),
            tf.constant(step, tf.int64),
        ).numpy()

    def check_inputs(self, x: np.ndarray, batched: bool) -> np.ndarray:
        """Validate inputs (``[B,] T, D`` float or ``[B,] T`` int ids); InvalidInputError."""
        rank = (1 if self.input_kind == "tokens" else 2) + int(batched)
        if x.ndim != rank or (self.input_kind == "features" and x.shape[-1] != self.input_dim):
            want = "[T]" if self.input_kind == "tokens" else f"[T, {self.input_dim}]"
            raise InvalidInputError(
                f"inputs must be {'[B, ' + want[1:] if batched else want}, got shape {x.shape}",
                ErrorCode.BAD_SHAPE,
            )
        if self.input_kind == "tokens":
            if x.dtype.kind not in "iu":
                raise InvalidInputError(f"token inputs need an integer dtype, got {x.dtype}",
                                        ErrorCode.BAD_DTYPE)
            if x.size and (x.min() < 0 or x.max() >= self.input_dim):
                raise InvalidInputError(
                    f"token ids must be in 0..{self.input_dim - 1}", ErrorCode.BAD_VALUE
                )
            return x.astype(np.int32, copy=False)
        if x.dtype.kind != "f":
            raise InvalidInputError(f"feature inputs need a float dtype, got {x.dtype}",
                                    ErrorCode.BAD_DTYPE)
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise InvalidInputError("inputs contain NaN or Inf", ErrorCode.NON_FINITE)
        return x

    def check_targets(self, y: np.ndarray, batched: bool) -> np.ndarray:
        """Validate targets (``[B,] T`` int ids or ``[B,] T, out`` float); InvalidInputError."""
        if self.loss_name == "sparse_ce":
            if y.ndim != 1 + int(batched) or y.dtype.kind not in "iu":
                raise InvalidInputError(
                    f"targets must be int token ids [{'B, ' if batched else ''}T], got "
                    f"{y.dtype} {y.shape}", ErrorCode.BAD_SHAPE,
                )
            if y.size and (y.min() < 0 or y.max() >= self.output_dim):
                raise InvalidInputError(f"target ids must be in 0..{self.output_dim - 1}",
                                        ErrorCode.BAD_VALUE)
            return y.astype(np.int32, copy=False)
        if y.ndim != 2 + int(batched) or y.shape[-1] != self.output_dim or y.dtype.kind != "f":
            raise InvalidInputError(
                f"targets must be float [{'B, ' if batched else ''}T, {self.output_dim}], got "
                f"{y.dtype} {y.shape}", ErrorCode.BAD_SHAPE,
            )
        if not np.isfinite(y).all():
            raise InvalidInputError("targets contain NaN or Inf", ErrorCode.NON_FINITE)
        return y.astype(np.float32, copy=False)

    def _check_batch(self, x, target, mask):
        x = self.check_inputs(np.asarray(x), batched=True)
        target = self.check_targets(np.asarray(target), batched=True)
        if x.shape[0] != self.slots:
            raise InvalidInputError(f"batch has {x.shape[0]} rows, trainer has {self.slots} "
                                    "slots", ErrorCode.BAD_SHAPE)
        if target.shape[:2] != x.shape[:2]:
            raise InvalidInputError(f"targets {target.shape} do not match inputs {x.shape}",
                                    ErrorCode.BAD_SHAPE)
        mask = np.ones(x.shape[:2], bool) if mask is None else np.asarray(mask, bool)
        if mask.shape != x.shape[:2]:
            raise InvalidInputError(f"mask {mask.shape} does not match inputs {x.shape[:2]}",
                                    ErrorCode.BAD_SHAPE)
        return x, target, mask

    # ---- streams -----------------------------------------------------------------------

    @property
    def streams(self) -> list[str]:
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
        self._reset_rows([row])
        return row

    def reset(self, stream: str) -> None:
        """Back to the initial state; the kept observation is dropped."""
        self._reset_rows([self.table.slot_of(stream)])
        self._pending.pop(stream, None)

    def close(self, stream: str) -> None:
        self.table.release(stream)
        self._pending.pop(stream, None)

    def _reset_rows(self, rows: list[int]) -> None:
        for v in self.state_vars:
            value = v.numpy()
            value[rows] = 0.0
            v.assign(value)

    # ---- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything needed to resume exactly, as named numpy arrays."""
        arrays: dict[str, np.ndarray] = {}
        for i, w in enumerate(self.model.get_weights()):
            arrays[f"weight/{i}"] = np.asarray(w)
        for i, v in enumerate(self.optimizer.variables):
            arrays[f"optimizer/{i}"] = np.asarray(v.numpy())
        for i, v in enumerate(self.state_vars):
            arrays[f"state/{i}"] = v.numpy()
        streams = self.table.items()
        for i, (s, _) in enumerate(streams):
            if s in self._pending:
                arrays[f"pending/{i}"] = self._pending[s]
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "version": self.version,
            "timesteps": self.timesteps,
            "last_loss": self.last_loss,
            "config": asdict(self.config),
            "streams": [[s, info.slot, info.steps] for s, info in streams],
            "optimizer": type(self.optimizer).__name__,
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        return arrays

    def load_state_dict(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore from :meth:`state_dict` (same model architecture and slots)."""
        meta = json.loads(bytes(np.asarray(arrays["meta"], np.uint8)).decode())
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise InvalidInputError(f"unknown checkpoint format {meta.get('format')}",
                                    ErrorCode.NOT_SUPPORTED)
        n_w = sum(1 for k in arrays if k.startswith("weight/"))
        weights = [arrays[f"weight/{i}"] for i in range(n_w)]
        if len(weights) != len(self.model.get_weights()):
            raise InvalidInputError(
                f"checkpoint has {len(weights)} weight arrays, model has "
                f"{len(self.model.get_weights())}", ErrorCode.BAD_SHAPE,
            )
        self.model.set_weights(weights)
        opt_vars = self.optimizer.variables
        n_o = sum(1 for k in arrays if k.startswith("optimizer/"))
        if n_o != len(opt_vars):
            raise InvalidInputError(
                f"checkpoint has {n_o} optimizer variables, optimizer has {len(opt_vars)}",
                ErrorCode.BAD_SHAPE,
            )
        for i, v in enumerate(opt_vars):
            v.assign(arrays[f"optimizer/{i}"])
        for i, v in enumerate(self.state_vars):
            v.assign(arrays[f"state/{i}"])
        self.table = _table_from(self.slots, meta["streams"])
        self._pending = {}
        for i, (s, _slot, _steps) in enumerate(meta["streams"]):
            if f"pending/{i}" in arrays:
                self._pending[s] = np.asarray(arrays[f"pending/{i}"])
        self.step = int(meta["step"])
        self.version = int(meta["version"])
        self.timesteps = int(meta["timesteps"])
        self.last_loss = float(meta["last_loss"])

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` atomically (temp file, fsync, rename)."""
        atomic_savez(path, self.state_dict())

    def load_checkpoint(self, path: str | os.PathLike) -> bool:
        """Resume from ``path`` if it exists; returns whether it did."""
        if not os.path.exists(path):
            return False
        with np.load(path, allow_pickle=False) as data:
            self.load_state_dict({k: data[k] for k in data.files})
        return True


def _table_from(capacity: int, streams: list) -> SlotTable:
    """A SlotTable in which each ``[stream, slot, steps]`` holds exactly that slot."""
    by_slot = {int(slot): (str(s), int(steps)) for s, slot, steps in streams}
    if len(by_slot) != len(streams) or any(not 0 <= k < capacity for k in by_slot):
        raise InvalidInputError("checkpoint stream table does not fit the slots",
                                ErrorCode.BAD_VALUE)
    table = SlotTable(capacity)
    filler = [f"\0free-{k}" for k in range(capacity)]
    for k in range(capacity):  # the free list hands out the lowest slot first
        table.acquire(by_slot[k][0] if k in by_slot else filler[k])
    for k in range(capacity):
        if k in by_slot:
            table.info(by_slot[k][0]).steps = by_slot[k][1]
        else:
            table.release(filler[k])
    return table


def atomic_savez(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` to a temp file in the same directory, fsync, then rename over ``path``.

    A reader (or a restart after kill -9) sees either the old file or the new one, whole.
    """
    atomic_write(path, lambda f: np.savez(f, **arrays))
