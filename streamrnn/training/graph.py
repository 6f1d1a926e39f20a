"""The trainer's compiled graph: one ``tf.while_loop`` over time that feeds back or observes.

A :class:`FeedbackGraph` runs a :class:`~streamrnn.training.chain.TrainingChain` step by step
inside ONE ``tf.while_loop`` in a compiled ``tf.function``. At every step each row reads
either its observed input or the input made from its own previous output (the feedback rule
of :mod:`streamrnn.engine.generate`: the prediction for regression models, a greedy or
sampled token for token and one-hot models, or a user callable). Which one is decided by
coins drawn before the loop (:meth:`FeedbackGraph.draws`): never during the ``warm``
observed steps, then with probability ``p_own``. Teacher forcing (``p_own=0``), free
running (``p_own=1``) and scheduled sampling are one graph.

The graph owns the recurrent state of every slot (``state_vars``, one ``(slots, ...)``
variable per state, e.g. ``(slots, units)``): a train step starts from them and writes the
final states back with the gradient stopped (truncated backpropagation through time).

Randomness (coins, token sampling) is stateless, keyed on ``(seed, step)``, so a resumed run
draws exactly what an uninterrupted one draws at the same step.

Example::

    graph = FeedbackGraph(chain, config, model, optimizer, slots=16)
    loss, y = graph.train(x, target, mask, p_own=0.5, step=100)   # y (16, T, out)
    y = graph.rollout(x, mask, warm=8, p_own=1.0, step=0)          # from zero state
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from streamrnn.engine.generate import pick_tokens
from streamrnn.training.chain import TrainingChain
from streamrnn.training.config import TrainConfig

__all__ = ["FeedbackGraph"]


class FeedbackGraph:
    """The compiled train step and rollout of a chain (see the module docstring).

    Args:
        chain: the model as a step function.
        config: sampling, seed, warm-up, ``feedback_gradient`` and ``jit_compile``.
        model: the Keras model whose ``trainable_variables`` are trained.
        optimizer: applies the gradients (built by the caller).
        slots: batch rows of the state variables.
    """

    def __init__(self, chain: TrainingChain, config: TrainConfig, model: keras.Model,
                 optimizer: keras.optimizers.Optimizer, slots: int):
        self.chain = chain
        self.config = config
        self.model = model
        self.optimizer = optimizer
        self.state_vars: list[tf.Variable] = [
            tf.Variable(tf.zeros((slots, *shape)), trainable=False, name="train_state")
            for shape in chain.state_shapes
        ]
        self.trace_count = 0
        # autograph off: the only loop over time is the explicit tf.while_loop
        self._train_fn = tf.function(
            self._train_graph, jit_compile=config.jit_compile, autograph=False
        )
        self._rollout_fn = tf.function(self._rollout_graph, autograph=False)

    # ---- calls -------------------------------------------------------------------------

    def train(self, x: np.ndarray, target: np.ndarray, mask: np.ndarray, p_own: float,
              step: int) -> tuple[float, np.ndarray]:
        """One optimizer step over ``(slots, T, ...)`` rows; returns (loss, outputs
        ``(slots, T, output_dim)``). Rows with no valid step keep their state."""
        loss, y = self._train_fn(
            tf.constant(x), tf.constant(target), tf.constant(mask),
            tf.constant(p_own, tf.float32), tf.constant(step, tf.int64),
        )
        return float(loss), y.numpy()

    def rollout(self, x: np.ndarray, mask: np.ndarray, warm: int, p_own: float, step: int
                ) -> np.ndarray:
        """Outputs ``(B, T, output_dim)`` of the same feedback graph from the zero state,
        without training (the state variables are untouched)."""
        return self._rollout_fn(
            tf.constant(x), tf.constant(mask), tf.constant(warm), tf.constant(p_own),
            tf.constant(step, tf.int64),
        ).numpy()

    def reset_rows(self, rows: list[int]) -> None:
        """Zero the state of ``rows``; other rows keep theirs."""
        for v in self.state_vars:
            value = v.numpy()
            value[rows] = 0.0
            v.assign(value)

    # ---- the graph ---------------------------------------------------------------------

    def feedback(self, prev_out: tf.Tensor, t: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        """The next input from the previous output ``(B, out)``: generation's rule."""
        plan = self.chain.feedback
        if plan.mode == "prediction":
            return prev_out if self.config.feedback_gradient else tf.stop_gradient(prev_out)
        if plan.mode == "custom":
            x = plan.fn(prev_out)
            return tf.cast(x, tf.int32 if self.chain.input_kind == "tokens" else tf.float32)
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
            return tf.one_hot(ids, self.chain.input_dim, dtype=tf.float32)
        return ids

    def unroll(
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
        chain = self.chain
        steps = tf.shape(x)[1]
        perm = [1, 0] + list(range(2, len(x.shape)))
        xs = tf.transpose(x, perm)
        owns = tf.transpose(own)
        masks = tf.transpose(mask)
        batch = tf.shape(x)[0]
        prev0 = tf.zeros((batch, chain.output_dim))
        outs = tf.TensorArray(tf.float32, size=steps)

        def body(t, prev, sts, ta):
            observed = xs[t]
            fed = self.feedback(prev, t, step)
            if chain.input_kind == "features":
                inp = tf.where(owns[t][:, None], fed, observed)
            else:
                inp = tf.where(owns[t], fed, observed)
            out, new = chain.step(inp, sts)
            out = tf.cast(out, tf.float32)
            m = masks[t]
            if chain.mask_zero:  # Embedding(mask_zero=True): id 0 leaves the state as it was
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

    def draws(self, shape_bt: tf.Tensor, p_own: tf.Tensor, step: tf.Tensor,
              warm: Any) -> tf.Tensor:
        """Scheduled-sampling coins ``(B, T)``: feed back at t >= warm with probability p."""
        seed = tf.stack([tf.constant(self.config.seed, tf.int64), tf.cast(step, tf.int64)])
        coins = tf.random.stateless_uniform(shape_bt, seed)
        t_idx = tf.range(shape_bt[1])[None, :]
        own = tf.logical_and(coins < p_own, t_idx >= warm)
        return own

    def loss(self, y: tf.Tensor, target: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        """Mean loss over valid steps (``mask`` ``(B, T)``)."""
        name, from_logits = self.chain.loss_name, not self.chain.feedback.probs
        if name == "mse":
            per = tf.reduce_mean(tf.square(y - target), axis=-1)
        elif name == "sparse_ce":
            per = keras.losses.sparse_categorical_crossentropy(
                target, y, from_logits=from_logits
            )
        else:
            per = keras.losses.categorical_crossentropy(target, y, from_logits=from_logits)
        w = tf.cast(mask, tf.float32)
        return tf.reduce_sum(per * w) / tf.maximum(tf.reduce_sum(w), 1.0)

    def _train_graph(self, x, target, mask, p_own, step):
        self.trace_count += 1  # Python side effect: once per trace
        states = [v.read_value() for v in self.state_vars]  # truncated BPTT: no grad in
        own = self.draws(tf.shape(mask), p_own, step, self.config.warmup)
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            y, final = self.unroll(x, own, mask, states, step)
            loss = self.loss(y, target, mask)
        grads = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(grads, variables, strict=True))
        for v, s in zip(self.state_vars, final, strict=True):
            v.assign(tf.stop_gradient(s))
        return loss, y

    def _rollout_graph(self, x, mask, warm, p_own, step):
        batch = tf.shape(mask)[0]
        states = [tf.zeros(tf.concat([[batch], tf.shape(v)[1:]], 0)) for v in self.state_vars]
        own = self.draws(tf.shape(mask), p_own, step, warm)
        y, _ = self.unroll(x, own, mask, states, step)
        return y
