"""Serving clones: any trained Keras RNN model rebuilt as a stateful model with batch == slots.

:func:`build_serving_model` walks a model's layer chain, checks that every layer can stream
(works one timestep at a time without seeing the future), and clones each layer with the
same weights. Recurrent layers become ``stateful=True, return_sequences=True`` at batch size
``slots``, so row ``i`` of every state variable is slot ``i``. A final RNN with
``return_sequences=False`` is served with ``return_sequences=True``: the output at step t
is what the original model returns for the sequence ending at t.

Example::

    serving = build_serving_model(model, slots=64)
    y = serving.forward(x, mask)   # x (64, T, D), mask (64, T) bool -> y (64, T, out_dim)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import keras
import tensorflow as tf

from streamrnn.errors import UnsupportedModelError
from streamrnn.executors.fused import FusedRNN, fuse_layers
from streamrnn.executors.masking import carries_first_state, carry_leading, data_inputs, first_state

__all__ = [
    "ServingModel",
    "build_serving_model",
    "check_streamable",
    "check_timewise_axis",
    "flatten_layers",
    "load_model",
]

# Layers that act on each timestep independently at inference time (so they stream).
_TIMEWISE_LAYERS: tuple[type, ...] = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Embedding,
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
    keras.layers.ActivityRegularization,
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.PReLU,
    keras.layers.ELU,
    keras.layers.Softmax,
    keras.layers.Identity,
    keras.layers.LayerNormalization,
    keras.layers.BatchNormalization,
    keras.layers.TimeDistributed,
    keras.layers.Masking,
)
_RNN_LAYERS = (keras.layers.RNN,)  # LSTM, GRU, SimpleRNN and RNN(cell) all subclass RNN


def load_model(model_or_path: keras.Model | str | os.PathLike) -> keras.Model:
    """A ``keras.Model`` as given, or loaded (uncompiled) from a ``.keras`` file."""
    if isinstance(model_or_path, keras.Model):
        return model_or_path
    path = os.fspath(model_or_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model file at {path!r}")
    return keras.saving.load_model(path, compile=False)


def flatten_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's layers as one linear chain (nested models inlined), input layers dropped.

    Raises UnsupportedModelError for graphs that are not a single-input, single-output chain.
    """
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedModelError(
            f"model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} "
            "outputs; streamrnn serves single-input, single-output layer chains"
        )
    chain: list[keras.layers.Layer] = []
    previous = None
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if not isinstance(model, keras.Sequential):
            _check_chain_link(model, layer, previous)
        previous = layer
        if isinstance(layer, keras.Model):
            chain.extend(flatten_layers(layer))
        else:
            chain.append(layer)
    return chain


def _check_chain_link(model: keras.Model, layer: keras.layers.Layer, previous: Any) -> None:
    nodes = [n for n in layer._inbound_nodes if n.operation is layer]
    inputs = data_inputs(nodes[0]) if len(nodes) == 1 else []
    if len(inputs) != 1:
        raise UnsupportedModelError(
            f"layer {layer.name!r} in model {model.name!r} is shared or has several inputs; "
            "streamrnn serves single-input, single-output layer chains"
        )
    source = inputs[0]._keras_history.operation
    if previous is not None and source is not previous:
        raise UnsupportedModelError(
            f"layer {layer.name!r} in model {model.name!r} does not take the output of the "
            f"layer before it ({previous.name!r}); streamrnn serves layer chains only"
        )


def check_streamable(layer: keras.layers.Layer) -> None:
    """Raise UnsupportedModelError naming ``layer`` if it cannot run one step at a time."""
    if isinstance(layer, keras.layers.Bidirectional):
        raise UnsupportedModelError(
            f"layer {layer.name!r} (Bidirectional) reads the sequence backwards and cannot "
            "stream; serve a unidirectional model"
        )
    if isinstance(layer, _RNN_LAYERS):
        if layer.go_backwards:
            raise UnsupportedModelError(
                f"layer {layer.name!r} ({type(layer).__name__}) has go_backwards=True and "
                "cannot stream"
            )
        return
    if isinstance(layer, keras.layers.TimeDistributed):
        check_timewise_axis(layer.layer)
        return
    if isinstance(layer, _TIMEWISE_LAYERS):
        check_timewise_axis(layer)
        return
    raise UnsupportedModelError(
        f"layer {layer.name!r} ({type(layer).__name__}) is not known to act on each timestep "
        "independently (attention, pooling, convolution, reshaping and Lambda layers see "
        "several timesteps), so it cannot stream"
    )


def check_timewise_axis(layer: keras.layers.Layer) -> None:
    axis = getattr(layer, "axis", -1)
    axes = axis if isinstance(axis, list | tuple) else [axis]
    if any(a not in (-1, 2) for a in axes):
        raise UnsupportedModelError(
            f"layer {layer.name!r} ({type(layer).__name__}) normalises over axis {axis}, "
            "which mixes timesteps; only the feature axis (-1) streams"
        )


@dataclass
class ServingModel:
    """The serving clone: a chain of cloned layers whose RNNs are stateful at batch=slots.

    Attributes:
        layers: the cloned layer chain, in order.
        rnn_layers: the stateful recurrent clones (their ``states`` are the slot rows).
        source_layers: for each clone, the layer of the user's model it copies weights from.
        input_kind: ``"tokens"`` (int ids ``[T]``, model starts with Embedding) or
            ``"features"`` (float ``[T, D]``).
        input_dim: D for features, vocabulary size for tokens.
        output_dim: size of the last axis of the model output.
        source: the user's model the clone was built from (the ONNX Runtime and torch
            executors build their graphs from it; its weights may have changed since, the
            clone's are the served ones). None for a clone made some other way.
    """

    slots: int
    layers: list[keras.layers.Layer]
    rnn_layers: list[keras.layers.RNN]
    source_layers: list[keras.layers.Layer]
    input_kind: Literal["features", "tokens"]
    input_dim: int
    output_dim: int
    name: str = "model"
    final_rnn_returned_sequences: bool = True
    _mask_layers: set[int] = field(default_factory=set)
    # chain index -> fused fast path for that recurrent layer (streamrnn.executors.fused);
    # the others run as Keras layers.
    fused_layers: dict[int, FusedRNN] = field(default_factory=dict)
    source: keras.Model | None = None

    def forward(self, x: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        """One stateful step over every slot.

        Args:
            x: ``(slots, T, D)`` float32, or ``(slots, T)`` int32 token ids.
            mask: ``(slots, T)`` bool; False steps leave a slot's state unchanged.

        Returns:
            ``(slots, T, output_dim)``; rows/steps where mask is False hold garbage.
        """
        def recur(i: int, layer: keras.layers.RNN, h: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
            fused = self.fused_layers.get(i)
            if fused is not None:
                return fused(h, mask)
            if not (self._mask_layers and carries_first_state(layer)):
                return layer(h, mask=mask, training=False)
            h0 = first_state(layer)  # Keras starts the carried output at zeros, not h
            return carry_leading(layer(h, mask=mask, training=False), mask, h0)

        return self._chain(x, mask, recur)

    def _chain(self, x: tf.Tensor, mask: tf.Tensor,
               recur: Callable[[int, keras.layers.RNN, tf.Tensor, tf.Tensor], tf.Tensor]
               ) -> tf.Tensor:
        """Run the layer chain on ``x``; ``recur(index, layer, h, mask)`` runs each
        recurrent layer (the others are applied as they are)."""
        h, base = x, mask
        for i, layer in enumerate(self.layers):
            if i in self._mask_layers:  # Embedding(mask_zero=True) / Masking narrow the mask
                extra = layer.compute_mask(h)
                if extra is not None:
                    mask = tf.logical_and(mask, extra)
            if isinstance(layer, keras.layers.RNN):
                h = recur(i, layer, h, mask)
            else:
                h = layer(h, training=False)
                if not layer.supports_masking:  # Keras drops the mask here (EinsumDense)
                    mask = base
        return h

    def compact_reason(self) -> str | None:
        """None if a step can run on a gathered subset of the slots (every recurrent layer
        fused), else why not."""
        missing = [layer.name for i, layer in enumerate(self.layers)
                   if isinstance(layer, keras.layers.RNN) and i not in self.fused_layers]
        if missing:
            return f"recurrent layer(s) {missing} run as Keras layers, not fused"
        return None

    def forward_rows(self, x: tf.Tensor, mask: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
        """One stateful step for the slots ``rows`` only (needs :meth:`compact_reason` None).

        Their state rows are gathered, stepped and scattered back; no other slot is read or
        written. Every layer but the fused recurrences works row by row.

        Args:
            x: ``(k, T, D)`` float32 or ``(k, T)`` int32, row i belonging to slot ``rows[i]``.
            mask: ``(k, T)`` bool. rows: ``(k,)`` int32 distinct slot indices.

        Returns:
            ``(k, T, output_dim)``.
        """
        def recur(i: int, layer: keras.layers.RNN, h: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
            fused = self.fused_layers[i]
            states = [tf.gather(v, rows) for v in fused.state_vars]
            h, states = fused.forward(h, mask, states)
            for var, value in zip(fused.state_vars, states, strict=True):
                var.scatter_update(tf.IndexedSlices(value, rows))
            return h

        return self._chain(x, mask, recur)

    def state_variables(self) -> list[tf.Variable]:
        """Every recurrent state variable, each ``(slots, ...)``: the rows StateBank manages."""
        out: list[tf.Variable] = []
        for rnn in self.rnn_layers:
            out.extend(keras.tree.flatten(rnn.states))
        return [v.value if hasattr(v, "value") and isinstance(v.value, tf.Variable) else v
                for v in out]

    def set_weights_from(self, source: keras.Model | list[Any]) -> None:
        """Copy weights from a model with the same architecture (or its ``get_weights()``)."""
        if isinstance(source, keras.Model):
            layers = flatten_layers(source)
            if len(layers) != len(self.layers):
                raise UnsupportedModelError(
                    f"weights source has {len(layers)} layers, serving model has "
                    f"{len(self.layers)}; it is not the same architecture"
                )
            for clone, src in zip(self.layers, layers, strict=True):
                clone.set_weights(src.get_weights())
            return
        weights = list(source)
        for clone in self.layers:
            n = len(clone.get_weights())
            clone.set_weights(weights[:n])
            weights = weights[n:]

    def get_weights(self) -> list[Any]:
        """All weights of the clone chain, in the order of the source model's get_weights()."""
        out: list[Any] = []
        for clone in self.layers:
            out.extend(clone.get_weights())
        return out


def _clone_layer(layer: keras.layers.Layer, overrides: dict[str, Any]) -> keras.layers.Layer:
    config = layer.get_config()
    config.update(overrides)
    try:
        return type(layer).from_config(config)
    except Exception as exc:  # custom classes that do not round-trip their config
        raise UnsupportedModelError(
            f"layer {layer.name!r} ({type(layer).__name__}) cannot be cloned from its config "
            f"({exc}); register custom layers/cells with keras.saving.register_keras_serializable"
        ) from exc


def _input_facts(model: keras.Model, chain: list[keras.layers.Layer],
                 input_shape: tuple[Any, ...]) -> tuple[Literal["features", "tokens"], int]:
    """(input kind, D or vocabulary size) from the model's input shape and first layer."""
    if len(input_shape) == 2:
        if not isinstance(chain[0], keras.layers.Embedding):
            raise UnsupportedModelError(
                f"model {model.name!r} takes rank-2 input {input_shape} but does not start with "
                "an Embedding; feature inputs must be (batch, time, features)"
            )
        return "tokens", int(chain[0].input_dim)
    if len(input_shape) == 3 and input_shape[-1] is not None:
        return "features", int(input_shape[-1])
    raise UnsupportedModelError(
        f"model {model.name!r} input shape {input_shape} is not (batch, time, features) or "
        "(batch, time) token ids"
    )


def _rnn_overrides(layer: keras.layers.RNN, use_cudnn: bool | str, last: bool
                   ) -> dict[str, Any]:
    """Config changes that make a recurrent layer's clone a stateful serving layer."""
    overrides: dict[str, Any] = {
        "stateful": True, "return_sequences": True, "return_state": False}
    if "use_cudnn" in layer.get_config():
        overrides["use_cudnn"] = use_cudnn
    if not last and not layer.return_sequences:
        raise UnsupportedModelError(
            f"layer {layer.name!r} has return_sequences=False but is followed by "
            "another recurrent layer; this cannot stream"
        )
    return overrides


def build_serving_model(
    model: keras.Model, slots: int, use_cudnn: bool | str = "auto", fused: bool = False
) -> ServingModel:
    """Clone ``model`` as a stateful serving chain with batch size ``slots``.

    Args:
        model: a built keras.Model (Sequential or functional chain), any batch size,
            stateful or not.
        slots: batch size of the clone (one row per concurrent stream).
        use_cudnn: passed to LSTM/GRU clones (Keras does not save it).
        fused: run standard LSTM/GRU/SimpleRNN layers through :mod:`streamrnn.executors.fused` (same
            weights and state variables, hoisted input projection). Off by default: on the
            2-core CPU it measured level with the Keras layer under XLA (0.83-1.06x,
            bench/test_bench_kernel.py), not faster.
    """
    if not model.built or not model.inputs:
        raise ValueError(f"model {model.name!r} is not built; call it once or give it an Input")
    chain = flatten_layers(model)
    for layer in chain:
        check_streamable(layer)
    rnn_positions = [i for i, layer in enumerate(chain) if isinstance(layer, _RNN_LAYERS)]
    if not rnn_positions:
        raise UnsupportedModelError(f"model {model.name!r} has no recurrent layer to serve")
    input_shape = tuple(model.inputs[0].shape)
    input_kind, input_dim = _input_facts(model, chain, input_shape)
    clones: list[keras.layers.Layer] = []
    rnns: list[keras.layers.RNN] = []
    mask_layers: set[int] = set()
    final_rs = True
    shape: tuple[int | None, ...] = (slots, None) + tuple(input_shape[2:])
    for i, layer in enumerate(chain):
        overrides: dict[str, Any] = {}
        if isinstance(layer, _RNN_LAYERS):
            overrides = _rnn_overrides(layer, use_cudnn, last=i == rnn_positions[-1])
            if i == rnn_positions[-1]:
                final_rs = bool(layer.return_sequences)
        clone = _clone_layer(layer, overrides)
        clone.build(shape)
        clone.set_weights(layer.get_weights())
        if isinstance(clone, keras.layers.RNN):
            rnns.append(clone)
        if isinstance(clone, keras.layers.Masking) or (
            isinstance(clone, keras.layers.Embedding) and clone.mask_zero
        ):
            mask_layers.add(i)
        clones.append(clone)
        shape = tuple(clone.compute_output_shape(shape))
    output_dim = int(shape[-1])
    fused_layers: dict[int, FusedRNN] = {}
    if fused:
        fused_layers = fuse_layers(clones)
    return ServingModel(
        slots=slots,
        layers=clones,
        rnn_layers=rnns,
        source_layers=chain,
        input_kind=input_kind,
        input_dim=input_dim,
        output_dim=output_dim,
        name=model.name,
        final_rnn_returned_sequences=final_rs,
        _mask_layers=mask_layers,
        fused_layers=fused_layers,
        source=model,
    )
