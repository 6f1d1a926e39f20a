"""Closed-loop generation: feed each output of a stream back in as its next input.

How an output becomes the next input (the *feedback rule*) is decided once per model and
checked before any state changes (:func:`plan_feedback`):

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

**The loop** runs as compiled steps: a ``tf.function`` (XLA on CPU, like the runner) holds a
``tf.while_loop`` over ``serving.forward`` with ``T=1`` and a mask selecting the slots still
generating; finished and idle slots are masked, so their state is untouched. Sampling uses
Gumbel-max with a counter-based hash (pure integer ops, no RNG state) keyed by
``(seed, stream id, step)``, so a stream's samples do not depend on its slot or on which
other streams generate in the same batch.

Example::

    tokens = engine.generate("s", prompt_ids, steps=50, sample="top_k", top_k=5, seed=1)
    outs = engine.generate_many({"a": p1, "b": p2}, steps=50, end_token=0)
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from streamrnn.errors import EngineFullError, InvalidInputError, UnsupportedModelError
from streamrnn.executors.buckets import bucket_for
from streamrnn.executors.models import ServingModel
from streamrnn.protocol import MAX_GENERATE_STEPS, ErrorCode

if TYPE_CHECKING:
    from streamrnn.engine.engine import Engine

Feedback = str | Callable[[tf.Tensor], tf.Tensor] | None
SAMPLERS = ("greedy", "temperature", "top_k", "sample")  # "sample" == "temperature"
#: Steps one compiled call runs at most; longer generations call it again (state carries).
LOOP_CHUNK = 256
#: Compiled loops kept for user feedback callables (oldest dropped first).
MAX_CUSTOM_LOOPS = 8
_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class FeedbackPlan:
    """How outputs become inputs for one serving model.

    Attributes:
        mode: ``"tokens"``, ``"onehot"``, ``"prediction"`` or ``"custom"``.
        probs: the model outputs probabilities (softmax), so logits are ``log(y)``.
        fn: the user's feedback callable (mode ``"custom"``).
    """

    mode: str
    probs: bool
    fn: Callable[[tf.Tensor], tf.Tensor] | None = None
    #: Embedding(mask_zero=True): id 0 is padding (a masked step), never picked.
    no_zero: bool = False

    @property
    def picks_tokens(self) -> bool:
        return self.mode in ("tokens", "onehot")


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
    probs = output_activation(serving) == "softmax"
    kind, din, dout = serving.input_kind, serving.input_dim, serving.output_dim
    if callable(feedback):
        return FeedbackPlan("custom", probs, feedback)
    if feedback is None:
        if kind == "tokens":
            feedback = "tokens"
        elif dout == din:
            feedback = "onehot" if probs else "prediction"
        else:
            raise UnsupportedModelError(
                f"model {serving.name!r} maps {din} input features to {dout} outputs: an output "
                "cannot be fed back as the next input. Token models need an Embedding or "
                "one-hot input and an output of vocabulary size; regression models need "
                "output_dim == input_dim; otherwise pass feedback=callable(y) -> next input"
            )
    if feedback == "tokens":
        if kind != "tokens" or dout != din:
            raise UnsupportedModelError(
                f"feedback='tokens' needs an Embedding input with an output of vocabulary size; "
                f"model {serving.name!r} takes {kind} of size {din} and outputs {dout} values; "
                "pass feedback=callable(y) -> next ids"
            )
    elif feedback in ("onehot", "prediction"):
        if kind != "features" or dout != din:
            raise UnsupportedModelError(
                f"feedback={feedback!r} needs float inputs of the output size; model "
                f"{serving.name!r} takes {kind} of size {din} and outputs {dout} values; "
                "pass feedback=callable(y) -> next input"
            )
    else:
        raise InvalidInputError(
            f"feedback must be None, 'tokens', 'onehot', 'prediction' or a callable, "
            f"got {feedback!r}",
            ErrorCode.BAD_VALUE,
        )
    first = serving.layers[0]
    no_zero = isinstance(first, keras.layers.Embedding) and bool(first.mask_zero)
    return FeedbackPlan(feedback, probs, no_zero=no_zero)


@dataclass(frozen=True)
class SamplingParams:
    """Checked sampling arguments (``top_k == 0`` means no top-k filter)."""

    greedy: bool
    temperature: float
    top_k: int
    end_token: int  # -1: none


def check_params(
    plan: FeedbackPlan,
    serving: ServingModel,
    steps: int,
    sample: str,
    temperature: float,
    top_k: int | None,
    seed: int | Mapping[str, int] | None,
    end_token: int | None,
) -> SamplingParams:
    """Validate generation arguments against the feedback rule; raises InvalidInputError."""
    def bad(message: str) -> InvalidInputError:
        return InvalidInputError(message, ErrorCode.BAD_VALUE)

    if isinstance(steps, bool) or not isinstance(steps, int | np.integer):
        raise bad(f"steps must be an int, got {steps!r}")
    if not 1 <= steps <= MAX_GENERATE_STEPS:
        raise bad(f"steps must be in 1..{MAX_GENERATE_STEPS}, got {steps}")
    if sample not in SAMPLERS:
        raise bad(f"sample must be one of {', '.join(SAMPLERS)}; got {sample!r}")
    if not isinstance(temperature, int | float | np.floating) or not (
        np.isfinite(temperature) and temperature > 0
    ):
        raise bad(f"temperature must be a finite number > 0, got {temperature!r}")
    if seed is not None and not isinstance(seed, Mapping | int | np.integer):
        raise bad(f"seed must be an int (or a mapping stream -> int), got {seed!r}")
    vocab = serving.output_dim
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer):
            raise bad(f"top_k must be an int or None, got {top_k!r}")
        if not 1 <= top_k <= vocab:
            raise bad(f"top_k must be in 1..{vocab} (the vocabulary size), got {top_k}")
    if sample == "top_k" and top_k is None:
        raise bad("sample='top_k' needs top_k=<int>")
    if sample == "greedy" and top_k is not None:
        raise bad("top_k has no effect with sample='greedy'; use sample='top_k'")
    if not plan.picks_tokens:
        if sample != "greedy":
            raise bad(
                f"sample={sample!r} needs a token model; this model feeds back "
                f"{'predictions' if plan.mode == 'prediction' else 'feedback(y)'} "
                "deterministically (use sample='greedy')"
            )
    if end_token is not None:
        if isinstance(end_token, bool) or not isinstance(end_token, int | np.integer):
            raise bad(f"end_token must be an int or None, got {end_token!r}")
        if plan.mode == "prediction":
            raise bad("end_token needs a token model; this model feeds back predictions")
        limit = serving.input_dim if plan.mode == "custom" else vocab
        if plan.mode == "custom" and serving.input_kind != "tokens":
            raise bad("end_token needs token ids; this model's inputs are float features")
        if not 0 <= end_token < limit:
            raise bad(f"end_token must be in 0..{limit - 1}, got {end_token}")
        if plan.no_zero and end_token == 0:
            raise bad("end_token 0 is this model's padding id (Embedding mask_zero=True) and "
                      "is never generated")
    return SamplingParams(
        greedy=sample == "greedy",
        temperature=float(temperature),
        top_k=int(top_k or 0),
        end_token=-1 if end_token is None else int(end_token),
    )


def stream_key(seed: int, stream: str) -> tuple[int, int]:
    """Two 32-bit words keying a stream's random numbers: from ``seed`` and the stream id."""
    s = int(seed) & ((1 << 64) - 1)
    return (s & _M32) ^ zlib.crc32(stream.encode()), (s >> 32) ^ zlib.adler32(stream.encode())


# ---- sampling ops (traced into the loop) -------------------------------------------------


def _mix32(x: tf.Tensor) -> tf.Tensor:
    """A 32-bit integer finaliser (lowbias32) on int64 tensors holding values < 2**32."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = tf.bitwise.bitwise_and(x * 0x7FEB352D, _M32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = tf.bitwise.bitwise_and(x * 0x846CA68B, _M32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def hash_uniform(key: tf.Tensor, counter: tf.Tensor, width: int) -> tf.Tensor:
    """Uniform numbers in (0, 1), a pure function of (key, counter, column).

    Args:
        key: ``(n, 2)`` int64 (two 32-bit words per row).
        counter: ``(n,)`` int64 step index per row.
        width: number of columns.

    Returns:
        ``(n, width)`` float32.
    """
    col = tf.range(width, dtype=tf.int64)[None, :]
    k0, k1 = key[:, 0:1], key[:, 1:2]
    h = _mix32(tf.bitwise.bitwise_xor(k0, _mix32(tf.bitwise.bitwise_and(counter[:, None], _M32))))
    h = _mix32(tf.bitwise.bitwise_xor(h + k1, _mix32(col + 0x9E3779B9)))
    h = _mix32(tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(counter[:, None], 32)))
    return (tf.cast(tf.bitwise.right_shift(h, 8), tf.float32) + 0.5) / float(1 << 24)


def pick_tokens(
    y: tf.Tensor,
    probs: bool,
    greedy: tf.Tensor,
    inv_temperature: tf.Tensor,
    top_k: tf.Tensor,
    key: tf.Tensor,
    counter: tf.Tensor,
    no_zero: bool = False,
) -> tf.Tensor:
    """One token per row: argmax, or a sample of softmax(logits / T) limited to the top k.

    Args:
        y: ``(n, V)`` model outputs (probabilities if ``probs`` else logits).
        greedy: ``(n,)`` bool; inv_temperature ``(n,)`` float32; top_k ``(n,)`` int32
            (0 = all); key ``(n, 2)`` int64; counter ``(n,)`` int64.

    Returns:
        ``(n,)`` int32 token ids.
    """
    vocab = y.shape[-1]
    logits = tf.math.log(tf.maximum(y, 1e-30)) if probs else y
    if no_zero:
        logits = tf.concat([tf.fill([tf.shape(logits)[0], 1], -np.inf), logits[:, 1:]], -1)
    best = tf.argmax(logits, axis=-1, output_type=tf.int32)

    def drawn() -> tf.Tensor:
        scaled = logits * inv_temperature[:, None]

        def keep_top_k() -> tf.Tensor:
            ordered = tf.sort(scaled, axis=-1, direction="DESCENDING")
            k = tf.where(top_k > 0, top_k, vocab)
            kth = tf.gather(ordered, k - 1, axis=1, batch_dims=1)
            return tf.where(scaled >= kth[:, None], scaled, -np.inf)

        scaled = tf.cond(tf.reduce_any(top_k > 0), keep_top_k, lambda: scaled)
        gumbel = -tf.math.log(-tf.math.log(hash_uniform(key, counter, vocab)))
        return tf.where(greedy, best, tf.argmax(scaled + gumbel, axis=-1, output_type=tf.int32))

    # all-greedy batches skip the sort and the noise
    return tf.cond(tf.reduce_all(greedy), lambda: best, drawn)


# ---- the compiled loop ---------------------------------------------------------------------


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
        serving = self.serving
        token_input = serving.input_kind == "tokens"
        vocab = serving.output_dim
        ids_out = plan.picks_tokens or (plan.mode == "custom" and token_input)

        def feed_value(y, greedy, inv_t, top_k, key, counter):
            if plan.mode == "prediction":
                return y
            if plan.mode == "custom":
                x = plan.fn(y)
                return tf.cast(x, tf.int32 if token_input else tf.float32)
            return pick_tokens(y, plan.probs, greedy, inv_t, top_k, key, counter,
                               plan.no_zero)

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

        fn = tf.function(loop, jit_compile=self.jit_compile)
        if plan.fn is not None:  # one compiled loop per callable: pass the same one to reuse it
            custom = [k for k in self._loops if k[3] != id(None)]
            for k in custom[: max(0, len(custom) - MAX_CUSTOM_LOOPS + 1)]:
                del self._loops[k]
        self._loops[cache_key] = (fn, plan.fn)  # keep fn alive so its id() stays unique
        return fn

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
        key[idx] = np.asarray(keys, np.int64).reshape(-1, 2) & _M32
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


def _normalise_prompt(engine: Engine, plan: FeedbackPlan, prompt: Any) -> Any:
    arr = np.asarray(prompt)
    if plan.mode == "onehot" and arr.ndim == 1 and arr.dtype.kind in "iu" and arr.size:
        if arr.min() < 0 or arr.max() >= engine.input_dim:
            raise InvalidInputError(
                f"prompt token ids must be in 0..{engine.input_dim - 1}", ErrorCode.BAD_VALUE
            )
        return np.eye(engine.input_dim, dtype=np.float32)[arr]
    return arr


def _check_custom(engine: Engine, plan: FeedbackPlan) -> None:
    """Run the user's feedback once on zeros so a wrong shape fails before any state change."""
    serving = engine.serving
    try:
        x = plan.fn(tf.zeros((serving.slots, serving.output_dim), tf.float32))
        x = tf.convert_to_tensor(x)
    except Exception as exc:
        raise InvalidInputError(f"feedback callable failed: {exc}", ErrorCode.BAD_VALUE) from exc
    want = (serving.slots,) if serving.input_kind == "tokens" else (
        serving.slots, serving.input_dim)
    if tuple(x.shape) != want:
        raise InvalidInputError(
            f"feedback(y) must map y {(serving.slots, serving.output_dim)} to the next input "
            f"{want}, got shape {tuple(x.shape)}",
            ErrorCode.BAD_SHAPE,
        )
    if serving.input_kind == "tokens" and not x.dtype.is_integer:
        raise InvalidInputError(
            f"feedback(y) must return int token ids for this model, got {x.dtype.name}",
            ErrorCode.BAD_DTYPE,
        )


def generate_many(
    engine: Engine,
    prompts: Mapping[str, Any],
    steps: int = 100,
    sample: str = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | Mapping[str, int] | None = 0,
    end_token: int | None = None,
    feedback: Feedback = None,
) -> dict[str, np.ndarray]:
    """Prime each stream with its prompt, then generate for all of them in shared steps.

    See :meth:`streamrnn.Engine.generate_many`. Arguments are checked, and every prompt is
    validated, before any state changes.
    """
    serving = engine.serving
    plan = plan_feedback(serving, feedback)
    params = check_params(plan, serving, steps, sample, temperature, top_k, seed, end_token)
    if plan.mode == "custom":
        _check_custom(engine, plan)
    if not prompts:
        return {}
    for stream in prompts:
        if not isinstance(stream, str):
            raise InvalidInputError(f"stream ids are strings, got {stream!r}", ErrorCode.BAD_VALUE)
    ready = {s: engine.validate(_normalise_prompt(engine, plan, p)) for s, p in prompts.items()}
    new = [s for s in ready if s not in engine]
    room = getattr(engine, "capacity_left", engine.free_slots)
    if len(new) > room:
        raise EngineFullError(
            f"{len(new)} new streams but room for only {room} (slots={engine.slots}); "
            "close streams or build the engine with more slots"
        )
    generator = engine.__dict__.get("_generator")
    if generator is None:
        generator = Generator(serving, jit_compile=engine.runner.jit_compile)
        engine.__dict__["_generator"] = generator
    result: dict[str, np.ndarray] = {}
    names = list(ready)
    # At most `slots` streams are resident at once: generate in waves, like push_many.
    for start in range(0, len(names), engine.slots):
        wave = names[start : start + engine.slots]
        primed = engine.push_many({s: ready[s] for s in wave})  # leaves the wave resident
        slots = [engine.table.slot_of(s) for s in wave]
        first = np.stack([primed[s][-1] for s in wave])
        keys = []
        for s in wave:
            stream_seed = seed.get(s, 0) if isinstance(seed, Mapping) else (seed or 0)
            keys.append(stream_key(int(stream_seed), s))
        values = generator.run(plan, params, slots, first, int(steps), keys)
        for s, v in zip(wave, values, strict=True):
            engine.table.touch(s, len(v))
            result[s] = v
    return result
