"""ONNX node groups for single Keras layers (used by :mod:`streamrnn.executors.onnx_graph`).

Each ``emit_*`` function appends the nodes of one layer to a :class:`Builder`, acting on a
time-major tensor ``(T, rows, D)`` (or ``(T, rows)`` token ids), declares the layer's
weights as graph inputs together with a converter from the layer's Keras weights to those
inputs, and returns the name of its output tensor. Nothing here approximates: a layer or
setting without an exact ONNX equivalent raises :class:`OnnxUnsupported` with the reason.

Weight layouts (Keras -> ONNX):

- LSTM: kernel ``(D, 4U)`` gates i, f, c, o -> ``W (1, 4U, D)`` gates i, o, f, c; the same
  for the recurrent kernel ``R (1, 4U, U)``; ``B (1, 8U)`` = [input bias, zeros].
- GRU: gates z, r, h in both; ``reset_after=True`` (bias ``(2, 3U)``: input and recurrent)
  is ONNX ``linear_before_reset=1``, ``reset_after=False`` (one bias) is ``0``.
- SimpleRNN: ONNX ``RNN``; ``W (1, U, D)``, ``R (1, U, U)``, ``B (1, 2U)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from streamrnn.errors import ExecutorUnsupported

__all__ = [
    "Builder",
    "OnnxUnsupported",
    "StateSpec",
    "activation_name",
    "check_dtype",
    "emit_activation",
    "emit_activation_layer",
    "emit_cell",
    "emit_timewise",
]

Converter = Callable[[list[np.ndarray]], list[np.ndarray]]
Emit = Callable[["Builder", str], str]


class OnnxUnsupported(ExecutorUnsupported):
    """The model streams, but part of it has no ONNX equivalent here.

    ``kind`` is a short category (``"masking"``, ``"custom cell"``, ``"dtype"``,
    ``"activation"``, ``"layer"``, ``"weights"``); ``reason`` says which layer and why, for
    the caller to show when it falls back to the Keras executor.
    """


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state: its rows are ``(slots, units)``; ``initial`` / ``final`` name
    the graph input and output ``(1, rows, units)``."""

    name: str
    units: int
    initial: str
    final: str


@dataclass
class Builder:
    """Collects nodes, graph inputs, initializers, weight inputs and their converters."""

    nodes: list[Any] = field(default_factory=list)
    inputs: list[Any] = field(default_factory=list)
    initializers: list[Any] = field(default_factory=list)
    weights: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    converters: list[tuple[int, Converter]] = field(default_factory=list)
    states: list[StateSpec] = field(default_factory=list)
    recurrent_ops: list[str] = field(default_factory=list)
    _count: int = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def graph_input(self, name: str, elem_type: int, dims: list[Any]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, dims))
        return name

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        """Append one single-output node; returns its output name."""
        out = out or self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.fresh(op), **attrs))
        return out

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def layer_weights(self, prefix: str, n_keras: int, shapes: list[tuple[str, tuple[int, ...]]],
                      convert: Converter) -> list[str]:
        """Declare weight graph inputs fed by ``convert(the layer's n_keras Keras arrays)``."""
        names = []
        for hint, shape in shapes:
            name = f"{prefix}/{hint}"
            if any(name == w for w, _ in self.weights):
                name = self.fresh(name)
            self.graph_input(name, TensorProto.FLOAT, list(shape))
            self.weights.append((name, tuple(int(d) for d in shape)))
            names.append(name)
        self.converters.append((n_keras, convert))
        return names

    def state(self, name: str, units: int) -> StateSpec:
        io = StateSpec(name, units, f"{name}:initial", f"{name}:final")
        self.graph_input(io.initial, TensorProto.FLOAT, [1, "rows", units])
        self.states.append(io)
        return io


def check_dtype(layer: Any) -> None:
    """Raise OnnxUnsupported unless ``layer`` computes and stores float32."""
    policy = layer.dtype_policy
    if policy.compute_dtype != "float32" or policy.variable_dtype != "float32":
        raise OnnxUnsupported("dtype",
            f"layer {layer.name!r} ({type(layer).__name__}) has dtype policy "
            f"{policy.name!r}; the ONNX graph is float32 only")


def _expect_weights(layer: Any, n: int, expected: int) -> None:
    if n != expected:
        raise OnnxUnsupported("weights",
            f"layer {layer.name!r} ({type(layer).__name__}) has {n} weight arrays, expected "
            f"{expected} (LoRA or quantized layers have no ONNX equivalent here)")


# ---- activations -------------------------------------------------------------------------

def activation_name(fn: Any) -> str | None:
    """The Keras name of a built-in activation function (None for anything else)."""
    if fn is None:
        return "linear"
    name = getattr(fn, "__name__", None)
    try:
        return name if name is not None and keras.activations.get(name) is fn else None
    except (ValueError, TypeError):
        return None


def _unary(op: str, **attrs: Any) -> Emit:
    return lambda b, h: b.node(op, [h], **attrs)


def _clip(low: float, high: float) -> Emit:
    return lambda b, h: b.node("Clip", [h, b.const("min", np.float32(low)),
                                        b.const("max", np.float32(high))])


def _times(gate: Emit) -> Emit:
    return lambda b, h: b.node("Mul", [h, gate(b, h)])


def _gelu(b: Builder, h: str) -> str:  # exact: 0.5 x (1 + erf(x / sqrt 2))
    erf = b.node("Erf", [b.node("Mul", [h, b.const("rsqrt2", np.float32(1 / math.sqrt(2)))])])
    one_plus = b.node("Add", [erf, b.const("one", np.float32(1))])
    return b.node("Mul", [b.node("Mul", [h, b.const("half", np.float32(0.5))]), one_plus])


_HARD_SIGMOID = {"alpha": 1 / 6, "beta": 0.5}  # Keras: relu6(x + 3) / 6
_ACTIVATIONS: dict[str, Emit] = {
    "linear": lambda b, h: h,
    "relu": _unary("Relu"),
    "tanh": _unary("Tanh"),
    "sigmoid": _unary("Sigmoid"),
    "softplus": _unary("Softplus"),
    "softsign": _unary("Softsign"),
    "exponential": _unary("Exp"),
    "elu": _unary("Elu", alpha=1.0),
    "celu": _unary("Celu", alpha=1.0),
    "selu": _unary("Selu", alpha=1.6732632423543772, gamma=1.0507009873554805),
    "leaky_relu": _unary("LeakyRelu", alpha=0.2),
    "hard_sigmoid": _unary("HardSigmoid", **_HARD_SIGMOID),
    "softmax": _unary("Softmax", axis=-1),
    "log_softmax": _unary("LogSoftmax", axis=-1),
    "relu6": _clip(0.0, 6.0),
    "hard_tanh": _clip(-1.0, 1.0),
    "silu": _times(_unary("Sigmoid")),
    "hard_silu": _times(_unary("HardSigmoid", **_HARD_SIGMOID)),
    "mish": _times(lambda b, h: b.node("Tanh", [b.node("Softplus", [h])])),
    "tanh_shrink": lambda b, h: b.node("Sub", [h, b.node("Tanh", [h])]),
    "soft_shrink": _unary("Shrink", bias=0.5, lambd=0.5),
    "gelu": _gelu,
}


def emit_activation(b: Builder, fn: Any, h: str, layer: Any) -> str:
    """Apply the built-in Keras activation ``fn`` (of ``layer``) to ``h``."""
    name = activation_name(fn)
    emit = _ACTIVATIONS.get(name) if name is not None else None
    if emit is None:
        shown = name or getattr(fn, "__name__", repr(fn))
        raise OnnxUnsupported("activation",
            f"layer {layer.name!r} ({type(layer).__name__}) uses activation {shown!r}, which "
            "has no ONNX equivalent here")
    return emit(b, h)


def emit_activation_layer(b: Builder, layer: Any, h: str) -> str:
    """Activation, ReLU, LeakyReLU, ELU and Softmax layers (others: OnnxUnsupported)."""
    kind = type(layer)
    if kind is keras.layers.Activation:
        return emit_activation(b, layer.activation, h, layer)
    if kind is keras.layers.LeakyReLU:
        return b.node("LeakyRelu", [h], alpha=float(layer.negative_slope))
    if kind is keras.layers.ELU:
        return b.node("Elu", [h], alpha=float(layer.alpha))
    if kind is keras.layers.Softmax and layer.axis in (-1, 2, [-1], [2]):
        return b.node("Softmax", [h], axis=-1)
    if kind is keras.layers.ReLU and not layer.negative_slope and not layer.threshold:
        h = b.node("Relu", [h])
        return h if layer.max_value is None else _clip(0.0, float(layer.max_value))(b, h)
    raise OnnxUnsupported(
        "layer", f"layer {layer.name!r} ({kind.__name__}) has no ONNX equivalent here")


# ---- layers acting on each timestep ------------------------------------------------------

_IDENTITY = (
    keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.GaussianNoise,
    keras.layers.GaussianDropout, keras.layers.AlphaDropout,
    keras.layers.ActivityRegularization, keras.layers.Identity,
)


def emit_timewise(b: Builder, layer: Any, h: str, shape: tuple[int | None, ...],
                  n: int) -> str | None:
    """Dense, Embedding, LayerNormalization, BatchNormalization and the inference-time
    identities; None for any other layer. ``shape``: the layer's input shape (batch-major);
    ``n``: how many Keras weight arrays it has."""
    kind = type(layer)
    if kind in _IDENTITY:
        _expect_weights(layer, n, 0)
        return h
    emit = {keras.layers.Dense: _dense, keras.layers.Embedding: _embedding,
            keras.layers.LayerNormalization: _layer_norm,
            keras.layers.BatchNormalization: _batch_norm}.get(kind)
    return None if emit is None else emit(b, layer, h, int(shape[-1] or 0), n)


def _dense(b: Builder, layer: Any, h: str, dim: int, n: int) -> str:
    _expect_weights(layer, n, 1 + bool(layer.use_bias))
    units = int(layer.units)
    shapes = [("kernel", (dim, units))] + ([("bias", (units,))] if layer.use_bias else [])
    names = b.layer_weights(layer.name, n, shapes, lambda w: w)
    h = b.node("MatMul", [h, names[0]])
    if layer.use_bias:
        h = b.node("Add", [h, names[1]])
    return emit_activation(b, layer.activation, h, layer)


def _embedding(b: Builder, layer: Any, h: str, dim: int, n: int) -> str:
    _expect_weights(layer, n, 1)
    (table,) = b.layer_weights(layer.name, n, [
        ("embeddings", (int(layer.input_dim), int(layer.output_dim)))], lambda w: w)
    return b.node("Gather", [table, h], axis=0)


def _layer_norm(b: Builder, layer: Any, h: str, dim: int, n: int) -> str:
    if layer.rms_scaling:
        raise OnnxUnsupported("layer", f"layer {layer.name!r} (LayerNormalization) uses "
                              "rms_scaling, which has no ONNX equivalent here")
    _expect_weights(layer, n, bool(layer.scale) + bool(layer.center))

    def convert(w: list[np.ndarray]) -> list[np.ndarray]:
        w = list(w)
        gamma = w.pop(0) if layer.scale else np.ones(dim, np.float32)
        beta = w.pop(0) if layer.center else np.zeros(dim, np.float32)
        return [gamma, beta]

    scale, bias = b.layer_weights(layer.name, n, [("gamma", (dim,)), ("beta", (dim,))], convert)
    return b.node("LayerNormalization", [h, scale, bias], axis=-1,
                  epsilon=float(layer.epsilon))


def _batch_norm(b: Builder, layer: Any, h: str, dim: int, n: int) -> str:
    _expect_weights(layer, n, bool(layer.scale) + bool(layer.center) + 2)

    def convert(w: list[np.ndarray]) -> list[np.ndarray]:
        w = list(w)
        gamma = w.pop(0) if layer.scale else np.ones(dim, np.float32)
        beta = w.pop(0) if layer.center else np.zeros(dim, np.float32)
        mean, variance = w
        scale = gamma / np.sqrt(variance + np.float32(layer.epsilon))
        return [scale, beta - mean * scale]

    scale, offset = b.layer_weights(layer.name, n, [("scale", (dim,)), ("offset", (dim,))],
                                    convert)
    return b.node("Add", [b.node("Mul", [h, scale]), offset])


# ---- recurrent cells ---------------------------------------------------------------------

# Keras activation -> (ONNX RNN activation, alpha, beta); the ones ONNX RNN ops take.
_RNN_ACTIVATIONS: dict[str, tuple[str, float | None, float | None]] = {
    "sigmoid": ("Sigmoid", None, None),
    "tanh": ("Tanh", None, None),
    "relu": ("Relu", None, None),
    "linear": ("Affine", 1.0, 0.0),
    "hard_sigmoid": ("HardSigmoid", 1 / 6, 0.5),
    "softsign": ("Softsign", None, None),
    "softplus": ("Softplus", None, None),
    "elu": ("Elu", 1.0, None),
    "leaky_relu": ("LeakyRelu", 0.2, None),
}

_CELLS: dict[type, tuple[str, int]] = {  # cell -> (ONNX op, gates)
    keras.layers.LSTMCell: ("LSTM", 4),
    keras.layers.GRUCell: ("GRU", 3),
    keras.layers.SimpleRNNCell: ("RNN", 1),
}


def _rnn_activation_attrs(layer: Any, cell: Any, op: str) -> dict[str, Any]:
    fns = [cell.activation] if op == "RNN" else [cell.recurrent_activation, cell.activation]
    if op == "LSTM":
        fns.append(cell.activation)
    names, alphas, betas = [], [], []
    for fn in fns:
        found = _RNN_ACTIVATIONS.get(activation_name(fn) or "")
        if found is None:
            raise OnnxUnsupported("activation",
                f"layer {layer.name!r} ({type(layer).__name__}) uses activation "
                f"{activation_name(fn) or fn!r}, which the ONNX {op} op does not offer")
        names.append(found[0])
        # ONNX Runtime consumes alphas (betas) only for the activations that take one
        alphas += [found[1]] if found[1] is not None else []
        betas += [found[2]] if found[2] is not None else []
    attrs: dict[str, Any] = {"activations": names}
    if alphas:
        attrs["activation_alpha"] = alphas
    if betas:
        attrs["activation_beta"] = betas
    return attrs


def _reorder_lstm(m: np.ndarray) -> np.ndarray:
    """Gate blocks on the last axis from Keras i, f, c, o to ONNX i, o, f, c."""
    i, f, c, o = np.split(m, 4, axis=-1)
    return np.concatenate([i, o, f, c], axis=-1)


def _cell_converter(cell: Any, op: str, gates: int) -> Converter:
    units = int(cell.units)
    reorder = _reorder_lstm if op == "LSTM" else (lambda m: m)

    def convert(w: list[np.ndarray]) -> list[np.ndarray]:
        kernel, recurrent = reorder(w[0]).T[None], reorder(w[1]).T[None]
        zeros = np.zeros(gates * units, np.float32)
        if len(w) < 3:
            bias = np.concatenate([zeros, zeros])
        elif w[2].ndim == 2:  # GRU reset_after: (2, 3U) input and recurrent biases
            bias = w[2].reshape(-1)
        else:
            bias = np.concatenate([reorder(w[2]), zeros])
        return [kernel, recurrent, bias[None]]

    return convert


def emit_cell(b: Builder, layer: Any, cell: Any, name: str, h: str, lens: str) -> str:
    """One ONNX LSTM/GRU/RNN node for a standard Keras cell of ``layer``; its states
    become graph inputs ``name/h`` (and ``name/c``) and outputs."""
    found = _CELLS.get(type(cell))  # exact type: a subclass may override call()
    if found is None:
        raise OnnxUnsupported("custom cell",
            f"layer {layer.name!r} ({type(layer).__name__} with custom cell "
            f"{type(cell).__name__}) has no ONNX equivalent")
    check_dtype(cell)
    op, gates = found
    units, dim = int(cell.units), int(cell.kernel.shape[0])
    attrs = _rnn_activation_attrs(layer, cell, op)
    if op == "GRU":
        attrs["linear_before_reset"] = int(bool(cell.reset_after))
    n = len(cell.get_weights())
    _expect_weights(cell, n, 2 + bool(cell.use_bias))
    w, r, bias = b.layer_weights(name, n, [
        ("W", (1, gates * units, dim)), ("R", (1, gates * units, units)),
        ("B", (1, 2 * gates * units))], _cell_converter(cell, op, gates))
    states = [b.state(f"{name}/h", units)] + ([b.state(f"{name}/c", units)] if op == "LSTM"
                                              else [])
    y = b.fresh(f"{op.lower()}_y")
    b.nodes.append(helper.make_node(
        op, [h, w, r, bias, lens, *(s.initial for s in states)],
        [y, *(s.final for s in states)], name=b.fresh(op), hidden_size=units, **attrs))
    b.recurrent_ops.append(op)
    return b.node("Squeeze", [y, b.const("axes", np.array([1], np.int64))])
