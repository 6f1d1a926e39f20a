"""Closed-loop generation: feed each output of a stream back in as its next input.

How an output becomes the next input (the *feedback rule*) is decided once per model and
checked before any state changes (:func:`plan_feedback`; the pure rules, and the checks of
the sampling arguments, are in :mod:`streamrnn.engine.sampling`):

- ``"tokens"``: the model takes token ids (starts with an Embedding) and its output has one
  entry per vocabulary id (softmax probabilities or logits). A token is picked (greedy or
  sampled) and fed back as the next id. With ``Embedding(mask_zero=True)`` id 0 is padding
  (a masked step, not an input) and is never picked.
- ``"onehot"``: the model takes float ``(T, V)`` one-hot vectors and ends in a softmax of
  size ``V``. A token is picked and fed back as its one-hot vector.
- ``"prediction"``: a regression model whose output size equals its input size; the
  prediction itself is fed back.
- a callable ``feedback(y) -> x``: anything else. It is traced into the compiled loop, so it
  must use TensorFlow ops: ``y`` is ``(slots, output_dim)`` float32, ``x`` is ``(slots,)``
  int32 ids for token models or ``(slots, input_dim)`` float32.

Any other model is refused with :class:`~streamrnn.UnsupportedModelError`.

**What a stream holds afterwards.** The prompt is pushed through the normal push path; the
output at its last step yields the first generated value, which is then fed in, yielding
the second, and so on. Every generated value is fed in, including the last one, so after
``generate`` the stream has consumed ``prompt + generated`` exactly (when a stream stops at
``end_token``, the end token is the last value returned and consumed). A later ``push(x)``
therefore returns what one offline call on ``concat(history, prompt, generated, x)``
returns, and ``generate`` can be called again to continue.

**Where the loop runs.** The prompt goes through the engine's executor (``push_many``).
With the ONNX Runtime or torch executor and a built-in rule, the loop runs there too
(:class:`~streamrnn.engine.token_loop.ExecutorTokenLoop`): per token, one batched executor
call (``T=1``) for the slots still generating, tokens picked in numpy
(:mod:`streamrnn.engine.token_pick`); the state stays in the executor's rows, a pinned
version steps with its weights as ``push`` does, and no other row is touched. With the Keras
executor, or a feedback callable (TF ops), it runs as compiled steps on the Keras serving
clone: a ``tf.function`` (XLA on CPU) holds a ``tf.while_loop`` over ``serving.forward``
with ``T=1``, masking finished and idle slots (their state is untouched); for a callable on
another executor, ``engine.generation_rows(slots)`` first copies those slots' rows (and the
weights they run with, a pinned version too) into the clone, and their new rows back after.

**Same seed, same tokens.** Sampling is Gumbel-max with a counter-based hash (integer ops,
no RNG state) keyed by ``(seed, stream id, step)``: a stream's samples do not depend on its
slot or its batch. The numpy picker twins the TF one (:mod:`streamrnn.engine.token_ops`):
bit-identical uniforms, the same tokens from the same outputs. Executors can differ only at
a near-tie: their float32 outputs differ by about ``1e-7`` and numpy's and TF's float32
``log`` by an ulp, so two candidates whose (noisy) logits are within about ``1e-6`` may be
ordered differently, and the stream diverges from that token on. ``"prediction"`` values
agree to float32 rounding (a regression fed back to itself may amplify it over many steps).

Example::

    tokens = engine.generate("s", prompt_ids, steps=50, sample="top_k", top_k=5, seed=1)
    outs = engine.generate_many({"a": p1, "b": p2}, steps=50, end_token=0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from streamrnn.engine.sampling import (
    M32,
    SAMPLERS,
    FeedbackPlan,
    SamplingParams,
    choose_feedback,
)
from streamrnn.engine.token_ops import pick_tokens
from streamrnn.errors import InvalidInputError
from streamrnn.executors.buckets import bucket_for
from streamrnn.executors.models import ServingModel
from streamrnn.protocol import ErrorCode

__all__ = [  # SAMPLERS and pick_tokens are re-exported for the trainer
    "Feedback", "Generator", "LOOP_CHUNK", "MAX_CUSTOM_LOOPS", "SAMPLERS",
    "output_activation", "pick_tokens", "plan_feedback",
]

Feedback = str | Callable[[tf.Tensor], tf.Tensor] | None
#: Steps one compiled call runs at most; longer generations call it again (state carries).
LOOP_CHUNK = 256
#: Compiled loops kept for user feedback callables (oldest dropped first).
MAX_CUSTOM_LOOPS = 8


def output_activation(serving: ServingModel) -> str:
    """Name of the final activation of the chain (``"softmax"``, ``"linear"``, ...)."""
    for layer in reversed(serving.layers):
        inner = layer.layer if isinstance(layer, keras.layers.TimeDistributed) else layer
        if isinstance(inner, keras.layers.Softmax):
            return "softmax"
        if isinstance(inner, keras.layers.Dropout | keras.layers.Identity):
            continue
        activation = getattr(inner, "activation", None)
        if activation is None:
            return "linear"
        return getattr(activation, "__name__", str(activation))
    return "linear"


def plan_feedback(serving: ServingModel, feedback: Feedback = None) -> FeedbackPlan:
    """Decide (and check) how ``serving``'s outputs are fed back; see the module docstring.

    Raises UnsupportedModelError when the rule does not fit the model, InvalidInputError for
    an unknown ``feedback`` value.
    """
    first = serving.layers[0]
    return choose_feedback(
        feedback, kind=serving.input_kind, input_dim=serving.input_dim,
        output_dim=serving.output_dim, probs=output_activation(serving) == "softmax",
        no_zero=isinstance(first, keras.layers.Embedding) and bool(first.mask_zero),
        name=serving.name,
    )


class Generator:
    """Compiled closed-loop steps over one serving model (one ``tf.function`` per rule)."""

    def __init__(self, serving: ServingModel, jit_compile: bool = True, chunk: int = LOOP_CHUNK):
        self.serving = serving
        self.jit_compile = jit_compile
        self.chunk = chunk
        self.trace_count = 0
        self._loops: dict[Any, Any] = {}

    def _loop_fn(self, plan: FeedbackPlan) -> Any:
        cache_key = (plan.mode, plan.probs, plan.no_zero, id(plan.fn))
        if cache_key in self._loops:
            return self._loops[cache_key][0]
        fn = tf.function(self._loop(plan), jit_compile=self.jit_compile)
        if plan.fn is not None:  # one compiled loop per callable: pass the same one to reuse it
            custom = [k for k in self._loops if k[3] != id(None)]
            for k in custom[: max(0, len(custom) - MAX_CUSTOM_LOOPS + 1)]:
                del self._loops[k]
        self._loops[cache_key] = (fn, plan.fn)  # keep fn alive so its id() stays unique
        return fn

    def _feed_value(self, plan: FeedbackPlan) -> Callable[..., tf.Tensor]:
        """``feed(y, greedy, inv_t, top_k, key, counter)``: the values fed back, per row."""
        token_input = self.serving.input_kind == "tokens"

        def feed_value(y, greedy, inv_t, top_k, key, counter):
            if plan.mode == "prediction":
                return y
            if plan.mode == "custom":
                x = plan.fn(y)
                return tf.cast(x, tf.int32 if token_input else tf.float32)
            return pick_tokens(y, plan.probs, greedy, inv_t, top_k, key, counter,
                               plan.no_zero)

        return feed_value

    def _loop(self, plan: FeedbackPlan) -> Callable[..., Any]:
        """The Python function traced into the compiled loop for ``plan``."""
        serving = self.serving
        vocab = serving.output_dim
        ids_out = plan.picks_tokens or (plan.mode == "custom" and serving.input_kind == "tokens")
        feed_value = self._feed_value(plan)

        def loop(y0, active0, budget, key, counter0, end, greedy, inv_t, top_k, length_like):
            self.trace_count += 1
            length = length_like.shape[0]
            count0 = tf.zeros_like(budget)
            values0 = tf.TensorArray(tf.int32 if ids_out else tf.float32, size=length)

            def cond(i, y, active, count, ended, values):
                return tf.logical_and(i < length, tf.reduce_any(active))

            def body(i, y, active, count, ended, values):
                counter = counter0 + tf.cast(count, tf.int64)
                v = feed_value(y, greedy, inv_t, top_k, key, counter)
                values = values.write(i, v)
                x = tf.one_hot(v, vocab, dtype=tf.float32) if plan.mode == "onehot" else v
                y_new = serving.forward(x[:, None], active[:, None])[:, 0]
                y = tf.where(active[:, None], y_new, y)
                count = count + tf.cast(active, count.dtype)
                if ids_out:
                    ended = tf.logical_or(ended, tf.logical_and(active, tf.equal(v, end)))
                active = tf.logical_and(tf.logical_and(active, count < budget),
                                        tf.logical_not(ended))
                return i + 1, y, active, count, ended, values

            _, y, _, count, ended, values = tf.while_loop(
                cond, body, (tf.constant(0), y0, active0, count0, tf.zeros_like(active0), values0),
                maximum_iterations=length,
            )
            return values.stack(), count, y, ended

        return loop

    def run(
        self,
        plan: FeedbackPlan,
        params: SamplingParams,
        slots: list[int],
        first_outputs: np.ndarray,
        steps: int,
        keys: list[tuple[int, int]],
    ) -> list[np.ndarray]:
        """Generate for ``slots`` starting from their last outputs.

        Args:
            first_outputs: ``(len(slots), output_dim)``, each slot's output at its last
                consumed step (the prompt's last step).
            keys: per slot, the two key words of its random numbers.

        Returns:
            per slot the values fed back: ``(n,)`` int32 or ``(n, D)`` float32, ``n <= steps``.
        """
        n_slots = self.serving.slots
        idx = np.asarray(slots)
        y = np.zeros((n_slots, self.serving.output_dim), np.float32)
        y[idx] = first_outputs
        active = np.zeros(n_slots, bool)
        active[idx] = True
        key = np.zeros((n_slots, 2), np.int64)
        key[idx] = np.asarray(keys, np.int64).reshape(-1, 2) & M32
        end = np.full(n_slots, params.end_token, np.int32)
        greedy = np.full(n_slots, params.greedy)
        inv_t = np.full(n_slots, 1.0 / params.temperature, np.float32)
        top_k = np.full(n_slots, params.top_k, np.int32)
        done = np.zeros(n_slots, np.int32)
        pieces: list[np.ndarray] = []
        fn = self._loop_fn(plan)
        while active.any():
            remaining = steps - done
            todo = int(min(remaining[active].max(), self.chunk))
            length = bucket_for(todo, max(self.chunk, 1))
            budget = np.where(active, np.minimum(remaining, todo), 0).astype(np.int32)
            values, count, y_t, ended = fn(
                tf.constant(y), tf.constant(active), tf.constant(budget), tf.constant(key),
                tf.constant(done.astype(np.int64)), tf.constant(end), tf.constant(greedy),
                tf.constant(inv_t), tf.constant(top_k), tf.zeros((length,), tf.int8),
            )
            count = count.numpy()
            pieces.append((values.numpy(), count))
            done += count
            y = y_t.numpy()
            active &= ~ended.numpy() & (done < steps)
        out = []
        for s in idx:
            parts = [vals[: c[s], s] for vals, c in pieces if c[s]]
            out.append(np.concatenate(parts) if parts else pieces[0][0][:0, s])
        return out

    def normalise_prompt(self, plan: FeedbackPlan, prompt: Any) -> Any:
        """One-hot models also take token ids as prompts: ids become one-hot rows."""
        arr = np.asarray(prompt)
        dim = self.serving.input_dim
        if plan.mode == "onehot" and arr.ndim == 1 and arr.dtype.kind in "iu" and arr.size:
            if arr.min() < 0 or arr.max() >= dim:
                raise InvalidInputError(
                    f"prompt token ids must be in 0..{dim - 1}", ErrorCode.BAD_VALUE
                )
            return np.eye(dim, dtype=np.float32)[arr]
        return arr

    def check_custom(self, plan: FeedbackPlan) -> None:
        """Run a user's feedback callable once on zeros, so a wrong shape fails before any
        state change (other rules: nothing to check)."""
        if plan.mode != "custom":
            return
        serving = self.serving
        try:
            x = plan.fn(tf.zeros((serving.slots, serving.output_dim), tf.float32))
            x = tf.convert_to_tensor(x)
        except Exception as exc:
            raise InvalidInputError(f"feedback callable failed: {exc}",
                                    ErrorCode.BAD_VALUE) from exc
        want = (serving.slots,) if serving.input_kind == "tokens" else (
            serving.slots, serving.input_dim)
        if tuple(x.shape) != want:
            raise InvalidInputError(
                f"feedback(y) must map y {(serving.slots, serving.output_dim)} to the next "
                f"input {want}, got shape {tuple(x.shape)}",
                ErrorCode.BAD_SHAPE,
            )
        if serving.input_kind == "tokens" and not x.dtype.is_integer:
            raise InvalidInputError(
                f"feedback(y) must return int token ids for this model, got {x.dtype.name}",
                ErrorCode.BAD_DTYPE,
            )
