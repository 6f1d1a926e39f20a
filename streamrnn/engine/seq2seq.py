"""Encoder-decoder (seq2seq) inference derived from a teacher-forced training model.

The usual training model has two inputs and one output::

    enc_in -> [Embedding | nothing (one-hot)] -> ... -> RNN(return_state=True) -> states
    dec_in -> [Embedding | nothing (one-hot)] -> RNN(return_sequences=True,
                                                     initial_state=states) -> Dense(V) -> out

:func:`derive_inference_models` finds the encoder RNN (whose states feed the decoder RNN's
``initial_state``), and builds

- the **encoder** ``keras.Model(enc_in, states)``: a sub-graph of the training model, same
  layer objects;
- the **decoder** ``keras.Model([x, *states], [y, *new_states])``: the training model's own
  decoder layers (embedding, Dense, ...) around ``keras.layers.RNN(decoder_rnn.cell,
  return_state=True)``, which wraps the very same cell object.

Nothing is copied: the three models share their variables, so training (or
``set_weights`` on) any of them changes the others. LSTM, GRU and SimpleRNN cells work;
decoder inputs may be token ids (Embedding) or one-hot vectors (character level).

:class:`Seq2SeqEngine` runs a batched greedy decode as one compiled call: encode a batch
of input sequences, then a ``tf.while_loop`` feeds each argmax token back (as its id or
one-hot vector) until every row emitted the end token or ``max_length`` is reached.
Requests are independent (nothing persists between calls), so this is a separate class:
:class:`~streamrnn.Engine` stays the server of one layer chain with per-stream state.

Example::

    s2s = Seq2SeqEngine.from_keras(training_model, start_token=1, end_token=2, max_length=8)
    answers = s2s.decode([[5, 3, 5, 11, 6, 1]])   # list of int32 arrays, end token dropped
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from streamrnn.errors import InvalidInputError, UnsupportedModelError
from streamrnn.executors.keras_runner import gpu_available
from streamrnn.executors.models import load_model
from streamrnn.protocol import ErrorCode

__all__ = ["InferenceModels", "Seq2SeqEngine", "derive_inference_models"]


@dataclass
class InferenceModels:
    """Encoder and one-step decoder derived from a training model (shared variables).

    Attributes:
        encoder: ``enc_x -> [state, ...]``, each state ``(batch, units)``.
        decoder: ``[x (batch, T), *states] -> [y (batch, T, V), *states]`` (or x
            ``(batch, T, D)`` one-hot for character-level decoders).
        decoder_rnn: the training model's decoder RNN layer (whose cell the decoder wraps).
        encoder_rnn: the training model's encoder RNN layer.
        decoder_input_kind: ``"tokens"`` or ``"features"``; decoder_input_dim: vocab or D.
        encoder_input_index: which input of the training model is the encoder's.
    """

    encoder: keras.Model
    decoder: keras.Model
    encoder_rnn: keras.layers.RNN
    decoder_rnn: keras.layers.RNN
    decoder_input_kind: str
    decoder_input_dim: int
    output_dim: int
    encoder_input_index: int


def _producer(tensor: Any) -> tuple[Any, Any]:
    """The (operation, node) that produced a symbolic tensor."""
    op, node_index, _ = tensor._keras_history
    return op, op._inbound_nodes[node_index]


def _chain_back(tensor: Any, stop: Any, model: keras.Model, what: str) -> list[Any]:
    """Layers from ``stop`` (a model input, exclusive) to ``tensor``, in call order.

    Each link must be a single-input layer, so the derived decoder can re-apply them.
    """
    layers: list[Any] = []
    while tensor is not stop:
        op, node = _producer(tensor)
        if isinstance(op, keras.layers.InputLayer) or not node.input_tensors:
            raise UnsupportedModelError(
                f"cannot trace the {what} of model {model.name!r} back to its input"
            )
        if len(node.input_tensors) != 1 or isinstance(op, keras.layers.RNN | keras.Model):
            raise UnsupportedModelError(
                f"layer {op.name!r} on the {what} of model {model.name!r} is not a "
                "single-input per-timestep layer; streamrnn derives decoders for the usual "
                "Embedding/one-hot -> RNN -> Dense shape"
            )
        layers.append(op)
        tensor = node.input_tensors[0]
    return layers[::-1]


def _depends_on(tensor: Any, target: Any) -> bool:
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        if t is target:
            return True
        if id(t) in seen:
            continue
        seen.add(id(t))
        op, node = _producer(t)
        if not isinstance(op, keras.layers.InputLayer):
            stack.extend(node.input_tensors)
    return False


def derive_inference_models(model: keras.Model) -> InferenceModels:
    """Encoder and decoder inference models that share ``model``'s layers and weights.

    Raises UnsupportedModelError (naming what is missing) for other model shapes.
    """
    if len(model.inputs) != 2 or len(model.outputs) != 1:
        raise UnsupportedModelError(
            f"model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} "
            "outputs; a seq2seq training model has [encoder_input, decoder_input] -> output"
        )
    dec_rnn, dec_node = _decoder_rnn(model)
    states = list(keras.tree.flatten(dec_node.arguments.kwargs["initial_state"]))
    enc_rnn = _producer(states[0])[0]
    if not isinstance(enc_rnn, keras.layers.RNN) or not enc_rnn.return_state:
        raise UnsupportedModelError(
            f"the decoder's initial_state in model {model.name!r} does not come from an RNN "
            "with return_state=True"
        )
    if isinstance(dec_rnn, keras.layers.Bidirectional) or dec_rnn.go_backwards:
        raise UnsupportedModelError(f"decoder RNN {dec_rnn.name!r} cannot run forwards")
    enc_i = _encoder_input_index(model, states[0])
    enc_in, dec_in = model.inputs[enc_i], model.inputs[1 - enc_i]
    encoder = keras.Model(enc_in, states, name=f"{model.name}_encoder")
    pre = _chain_back(dec_node.arguments.args[0], dec_in, model, "decoder input path")
    post = _chain_back(model.outputs[0], dec_node.outputs[0], model, "decoder output path")
    decoder = _step_decoder(model, dec_rnn, dec_in, states, pre, post)
    kind, dim, out_dim = _decoder_io(model, dec_in, pre)
    return InferenceModels(encoder, decoder, enc_rnn, dec_rnn, kind, dim, out_dim, enc_i)


def _decoder_rnn(model: keras.Model) -> tuple[Any, Any]:
    """The one recurrent layer called with ``initial_state``, and that call's node."""
    decoders = []
    for layer in model.layers:
        if not isinstance(layer, keras.layers.RNN):
            continue
        for node in layer._inbound_nodes:
            if node.arguments.kwargs.get("initial_state") is not None:
                decoders.append((layer, node))
    if len(decoders) != 1:
        raise UnsupportedModelError(
            f"model {model.name!r} has {len(decoders)} recurrent layers called with "
            "initial_state; expected exactly one decoder RNN taking the encoder's states"
        )
    return decoders[0]


def _encoder_input_index(model: keras.Model, state: Any) -> int:
    """Which of the model's inputs the encoder state ``state`` is computed from."""
    enc_index = [i for i, inp in enumerate(model.inputs) if _depends_on(state, inp)]
    if len(enc_index) != 1:
        raise UnsupportedModelError(
            f"the encoder states of model {model.name!r} depend on {len(enc_index)} inputs; "
            "expected exactly one encoder input"
        )
    return enc_index[0]


def _step_decoder(model: keras.Model, dec_rnn: keras.layers.RNN, dec_in: Any,
                  states: list[Any], pre: list[Any], post: list[Any]) -> keras.Model:
    """``[x, *states] -> [y, *new_states]`` over the training model's own decoder layers
    and a ``keras.layers.RNN`` around the decoder RNN's very cell."""
    dec_shape = tuple(dec_in.shape[2:])
    x = keras.Input((None, *dec_shape), dtype=dec_in.dtype, name="decoder_step_input")
    state_inputs = [
        keras.Input(tuple(s.shape[1:]), dtype=s.dtype, name=f"decoder_state_{k}")
        for k, s in enumerate(states)
    ]
    h = x
    for layer in pre:
        h = layer(h)
    step_rnn = keras.layers.RNN(
        dec_rnn.cell, return_sequences=True, return_state=True, name=f"{dec_rnn.name}_step"
    )
    h, *new_states = step_rnn(h, initial_state=state_inputs)
    for layer in post:
        h = layer(h)
    return keras.Model([x, *state_inputs], [h, *new_states], name=f"{model.name}_decoder")


def _decoder_io(model: keras.Model, dec_in: Any, pre: list[Any]) -> tuple[str, int, int]:
    """(decoder input kind, its vocabulary or width, output classes), checked."""
    dec_shape = tuple(dec_in.shape[2:])
    if dec_shape:
        kind, dim = "features", int(dec_shape[-1])
    elif pre and isinstance(pre[0], keras.layers.Embedding):
        kind, dim = "tokens", int(pre[0].input_dim)
    else:
        raise UnsupportedModelError(
            f"decoder input of model {model.name!r} is neither token ids into an Embedding nor "
            "(time, features) vectors"
        )
    out_dim = int(model.outputs[0].shape[-1])
    if kind == "features" and dim != out_dim:
        raise UnsupportedModelError(
            f"decoder of model {model.name!r} takes {dim}-dim vectors but outputs {out_dim} "
            "classes; a one-hot decoder needs input size == output size to feed tokens back"
        )
    return kind, dim, out_dim


class Seq2SeqEngine:
    """Batched greedy decoding with the encoder/decoder derived from a training model."""

    def __init__(
        self,
        models: InferenceModels,
        start_token: int,
        end_token: int,
        max_length: int = 32,
        pad_token: int | None = None,
        jit_compile: bool | None = None,
    ):
        vocab = models.output_dim
        for name, tok in (("start_token", start_token), ("end_token", end_token)):
            if not 0 <= tok < vocab:
                raise InvalidInputError(f"{name} must be in 0..{vocab - 1}, got {tok}")
        if max_length < 1:
            raise InvalidInputError(f"max_length must be >= 1, got {max_length}")
        self.models = models
        self.start_token = int(start_token)
        self.end_token = int(end_token)
        self.max_length = int(max_length)
        self.pad_token = pad_token
        enc_shape = models.encoder.inputs[0].shape
        self.encoder_input_kind = "tokens" if len(enc_shape) == 2 else "features"
        self.encoder_input_dim = int(enc_shape[-1]) if len(enc_shape) == 3 else None
        if jit_compile is None:
            jit_compile = not gpu_available()
        self.jit_compile = jit_compile
        self.trace_count = 0
        self._decode = tf.function(self._decode_loop, jit_compile=jit_compile)

    @classmethod
    def from_keras(
        cls,
        model_or_path: keras.Model | str | os.PathLike,
        start_token: int,
        end_token: int,
        max_length: int = 32,
        pad_token: int | None = None,
        jit_compile: bool | None = None,
    ) -> Seq2SeqEngine:
        """Derive encoder/decoder from a teacher-forced training model (or ``.keras`` path).

        Args:
            start_token: the id the decoder input starts with in training.
            end_token: the id that ends an answer.
            max_length: most tokens generated per input (end token included).
            pad_token: right-pads encoder inputs of different lengths in one batch (use the
                padding the model was trained with); None requires equal lengths.
        """
        models = derive_inference_models(load_model(model_or_path))
        return cls(models, start_token, end_token, max_length, pad_token, jit_compile)

    def _decode_loop(self, enc_x: tf.Tensor, limit: tf.Tensor, length_like: tf.Tensor):
        self.trace_count += 1
        m = self.models
        length = length_like.shape[0]  # static bound (a power of two) for the TensorArray
        states = m.encoder(enc_x, training=False)
        states = list(states) if isinstance(states, list | tuple) else [states]
        batch = tf.shape(enc_x)[0]
        tok = tf.fill([batch], tf.constant(self.start_token, tf.int32))
        out = tf.TensorArray(tf.int32, size=length)
        done = tf.zeros([batch], tf.bool)

        def cond(i, tok, done, out, *states):
            return tf.logical_and(i < limit, tf.logical_not(tf.reduce_all(done)))

        def body(i, tok, done, out, *states):
            if m.decoder_input_kind == "tokens":
                x = tok[:, None]
            else:
                x = tf.one_hot(tok, m.decoder_input_dim, dtype=tf.float32)[:, None, :]
            y, *new_states = m.decoder([x, *states], training=False)
            nxt = tf.argmax(y[:, 0], axis=-1, output_type=tf.int32)
            nxt = tf.where(done, self.end_token, nxt)
            out = out.write(i, nxt)
            done = tf.logical_or(done, tf.equal(nxt, self.end_token))
            return (i + 1, nxt, done, out, *new_states)

        result = tf.while_loop(
            cond, body, (tf.constant(0), tok, done, out, *states), maximum_iterations=length
        )
        steps, out = result[0], result[3]
        return out.stack()[:steps]

    def _batch(self, inputs: Sequence[Any]) -> np.ndarray:
        arrays = [np.asarray(a) for a in inputs]
        if not arrays:
            raise InvalidInputError("no inputs to decode", ErrorCode.EMPTY_CHUNK)
        want_ndim = 1 if self.encoder_input_kind == "tokens" else 2
        form = "[T] ids" if want_ndim == 1 else "[T, D]"
        for a in arrays:
            if a.ndim != want_ndim or a.shape[0] == 0:
                raise InvalidInputError(
                    f"each encoder input must be a non-empty {form} array, got shape {a.shape}",
                    ErrorCode.BAD_SHAPE,
                )
            if want_ndim == 2 and a.shape[1] != self.encoder_input_dim:
                raise InvalidInputError(
                    f"encoder inputs must be [T, {self.encoder_input_dim}], got {a.shape}",
                    ErrorCode.BAD_SHAPE,
                )
            if want_ndim == 1 and a.dtype.kind not in "iu":
                raise InvalidInputError(
                    f"encoder token ids must be integers, got {a.dtype}", ErrorCode.BAD_DTYPE
                )
        longest = max(len(a) for a in arrays)
        if any(len(a) != longest for a in arrays):
            if self.pad_token is None:
                raise InvalidInputError(
                    "encoder inputs of different lengths need pad_token (the padding the "
                    "model was trained with)",
                    ErrorCode.BAD_SHAPE,
                )
            pad = self.pad_token
            if want_ndim == 2:
                width = self.encoder_input_dim
                arrays = [
                    np.concatenate([a, np.tile(np.eye(width)[pad], (longest - len(a), 1))])
                    for a in arrays
                ]
            else:
                arrays = [np.pad(a, (0, longest - len(a)), constant_values=pad) for a in arrays]
        dtype = np.int32 if want_ndim == 1 else np.float32
        return np.stack(arrays).astype(dtype)

    def decode(self, inputs: Sequence[Any], max_length: int | None = None) -> list[np.ndarray]:
        """Greedy answers for a batch of encoder inputs, in one compiled call.

        Args:
            inputs: encoder inputs, each ``(T,)`` ids or ``(T, D)`` vectors.
            max_length: override of the engine's limit for this call.

        Returns:
            per input, the generated ids ``(n,)`` int32 without the end token.
        """
        limit = self.max_length if max_length is None else int(max_length)
        if limit < 1:
            raise InvalidInputError(f"max_length must be >= 1, got {limit}")
        x = self._batch(inputs)
        n = len(x)
        # pad the batch to a power of two (repeating row 0) so the loop compiles a few times
        rows = 1 << (n - 1).bit_length()
        if rows > n:
            x = np.concatenate([x, np.repeat(x[:1], rows - n, axis=0)])
        length = 1 << (limit - 1).bit_length()
        tokens = self._decode(
            tf.constant(x), tf.constant(limit, tf.int32), tf.zeros((length,), tf.int8)
        ).numpy()
        out = []
        for r in range(n):
            col = tokens[:, r]
            stop = np.flatnonzero(col == self.end_token)
            out.append(col[: stop[0]] if stop.size else col)
        return out

    def decode_many(
        self, inputs: Mapping[str, Any], max_length: int | None = None
    ) -> dict[str, np.ndarray]:
        """:meth:`decode` keyed by stream id (one batched call for all of them)."""
        keys = list(inputs)
        return dict(zip(keys, self.decode([inputs[k] for k in keys], max_length), strict=True))
