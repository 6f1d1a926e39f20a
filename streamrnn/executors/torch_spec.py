"""What the torch executor builds: a plain layer spec (no TensorFlow, no torch here).

A :class:`ModelSpec` is the model's layer chain as data: one :class:`LayerSpec` per
recurrent cell (a stacked ``RNN(StackedRNNCells)`` gives one per cell) or per layer acting on
each timestep (Dense, Embedding, LayerNormalization, BatchNormalization, an activation).
Inference-time identities (Dropout and friends) leave no spec. The weights stay in Keras
layout and order (``model.get_weights()``); :meth:`ModelSpec.weight_shapes` lists them:

- ``lstm``: kernel ``(D, 4U)``, recurrent kernel ``(U, 4U)``, bias ``(4U,)`` (gates i, f, c, o);
- ``gru`` (``reset_after=True`` only): ``(D, 3U)``, ``(U, 3U)``, bias ``(2, 3U)`` (z, r, h);
- ``rnn`` (SimpleRNN): ``(D, U)``, ``(U, U)``, ``(U,)``;
- ``dense``: ``(D, U)``, ``(U,)``; ``embedding``: ``(vocab, U)``;
- ``layer_norm``: gamma, beta ``(D,)``; ``batch_norm``: gamma, beta, moving mean, variance.

Biases, gammas and betas are present only when the spec says so (``use_bias``, ``scale``,
``center``). :func:`spec_from_keras` turns a Keras model into a spec and its weights (Keras
is imported inside it only), or raises :class:`TorchUnsupported` with a human reason.

Example::

    spec = ModelSpec([LayerSpec("lstm", units=256), LayerSpec("dense", units=64)],
                     input_kind="features", input_dim=64)
    shapes = spec.weight_shapes()   # [(64, 1024), (256, 1024), (1024,), (256, 64), (64,)]
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from streamrnn.errors import ExecutorUnsupported, UnsupportedModelError

__all__ = [
    "ACTIVATIONS",
    "LayerSpec",
    "ModelSpec",
    "RECURRENT_KINDS",
    "TorchUnsupported",
    "spec_from_keras",
]

#: Keras activation names the torch executor computes exactly (Dense, Activation layers)
ACTIVATIONS = frozenset({
    "linear", "relu", "relu6", "tanh", "sigmoid", "softmax", "log_softmax", "gelu", "elu",
    "selu", "celu", "softplus", "softsign", "silu", "exponential", "leaky_relu",
    "hard_sigmoid", "hard_silu", "hard_tanh", "mish", "tanh_shrink", "log_sigmoid",
    "soft_shrink", "hard_shrink",
})
RECURRENT_KINDS = ("lstm", "gru", "rnn")
_GATES = {"lstm": 4, "gru": 3, "rnn": 1}

Kind = Literal["lstm", "gru", "rnn", "dense", "embedding", "layer_norm", "batch_norm",
               "activation"]


class TorchUnsupported(ExecutorUnsupported):
    """The model streams, but part of it has no exact torch equivalent here.

    ``kind`` is a short category (``"masking"``, ``"custom cell"``, ``"dtype"``,
    ``"activation"``, ``"gru reset_after=False"``, ``"layer"``, ``"weights"``); ``reason``
    says which layer and why, for the caller to show when it falls back to Keras.
    """


@dataclass(frozen=True)
class LayerSpec:
    """One recurrent cell or one timewise layer.

    Attributes:
        kind: ``lstm``, ``gru``, ``rnn``, ``dense``, ``embedding``, ``layer_norm``,
            ``batch_norm`` or ``activation``.
        units: recurrent units, Dense units, or the Embedding width.
        activation: for ``dense`` / ``activation``: one of :data:`ACTIVATIONS`; for ``rnn``:
            ``"tanh"`` or ``"relu"`` (LSTM and GRU are always tanh / sigmoid).
        alpha: the parameter of ``leaky_relu`` (slope, default 0.2), ``elu`` (default 1.0),
            or ``relu`` (a cap, as ``ReLU(max_value=...)``); None: the default.
        use_bias: whether the cell / Dense has a bias array.
        vocab: Embedding rows (token ids ``0 .. vocab-1``).
        epsilon, scale, center: of a LayerNormalization / BatchNormalization.
        name: the Keras layer (for messages).
    """

    kind: Kind
    units: int = 0
    activation: str = "linear"
    alpha: float | None = None
    use_bias: bool = True
    vocab: int = 0
    epsilon: float = 1e-3
    scale: bool = True
    center: bool = True
    name: str = ""

    def weight_shapes(self, dim: int) -> list[tuple[int, ...]]:
        """Shapes of this layer's Keras weights, given its input width ``dim``."""
        u = self.units
        if self.kind in _GATES:
            g = _GATES[self.kind]
            bias = [(2, g * u) if self.kind == "gru" else (g * u,)] if self.use_bias else []
            return [(dim, g * u), (u, g * u), *bias]
        if self.kind == "dense":
            return [(dim, u)] + ([(u,)] if self.use_bias else [])
        if self.kind == "embedding":
            return [(self.vocab, u)]
        if self.kind == "activation":
            return []
        norms = int(self.scale) + int(self.center) + 2 * (self.kind == "batch_norm")
        return [(dim,)] * norms

    def output_dim(self, dim: int) -> int:
        """Width after this layer, given its input width ``dim``."""
        return self.units if self.kind in (*RECURRENT_KINDS, "dense", "embedding") else dim


@dataclass(frozen=True)
class ModelSpec:
    """A layer chain to build: ``layers`` in order, fed ``(T, input_dim)`` float32 features
    or ``(T,)`` int token ids (then the first layer is an ``embedding``)."""

    layers: tuple[LayerSpec, ...] | list[LayerSpec]
    input_kind: Literal["features", "tokens"]
    input_dim: int
    name: str = "model"

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        if not any(s.kind in RECURRENT_KINDS for s in layers):
            raise ValueError(f"spec {self.name!r} has no recurrent layer")
        tokens = bool(layers) and layers[0].kind == "embedding"
        if tokens != (self.input_kind == "tokens") or any(
                s.kind == "embedding" for s in layers[1:]):
            raise ValueError("token input needs exactly one embedding, as the first layer")
        for s in layers:
            if s.kind == "rnn" and s.activation not in ("tanh", "relu"):
                raise ValueError(f"rnn activation {s.activation!r} is not tanh or relu")
            if s.kind in ("dense", "activation") and s.activation not in ACTIVATIONS:
                raise ValueError(f"activation {s.activation!r} is not one of {sorted(ACTIVATIONS)}")

    def widths(self) -> list[int]:
        """The input width of each layer (token input: 0 for the embedding)."""
        dim = 0 if self.input_kind == "tokens" else self.input_dim
        out = []
        for s in self.layers:
            out.append(dim)
            dim = s.output_dim(dim)
        return out

    @property
    def output_dim(self) -> int:
        return self.layers[-1].output_dim(self.widths()[-1])

    def weight_shapes(self) -> list[tuple[int, ...]]:
        """Every weight's shape, in Keras ``get_weights()`` order."""
        return [shape for s, d in zip(self.layers, self.widths(), strict=True)
                for shape in s.weight_shapes(d)]

    def state_units(self) -> list[int]:
        """Units of each recurrent state row, in the Keras serving clone's state order
        (h then c per LSTM cell, h per GRU / SimpleRNN cell)."""
        return [s.units for s in self.layers if s.kind in RECURRENT_KINDS
                for _ in range(2 if s.kind == "lstm" else 1)]


# ---- from a Keras model (Keras is imported here only) ------------------------------------

def spec_from_keras(model: Any) -> tuple[ModelSpec, list[np.ndarray]]:
    """The spec of a built Keras model (or ``.keras`` path) and its weights (Keras order).

    Raises:
        UnsupportedModelError: the model cannot stream at all (the Keras executor's checks).
        TorchUnsupported: it streams, but some part has no exact torch equivalent here.
    """
    from streamrnn.executors.models import (
        _input_facts,
        check_streamable,
        flatten_layers,
        load_model,
    )

    model = load_model(model)
    chain = flatten_layers(model)
    for layer in chain:
        check_streamable(layer)
    input_kind, input_dim = _input_facts(model, chain, tuple(model.inputs[0].shape))
    specs: list[LayerSpec] = []
    weights: list[np.ndarray] = []
    for layer in chain:
        specs.extend(_layer_specs(layer))
        weights.extend(np.asarray(w, np.float32) for w in layer.get_weights())
    recurrent = [layer for layer in chain if hasattr(layer, "cell")]
    if not recurrent:
        raise UnsupportedModelError(f"model {model.name!r} has no recurrent layer to serve")
    if any(not layer.return_sequences for layer in recurrent[:-1]):
        raise UnsupportedModelError(
            f"model {model.name!r} has a recurrent layer with return_sequences=False before "
            "another one; this cannot stream")
    return ModelSpec(specs, input_kind, input_dim, name=model.name), weights


def _check_count(layer: Any, n: int, expected: int) -> None:
    if n != expected:
        raise TorchUnsupported("weights", (
            f"layer {layer.name!r} ({type(layer).__name__}) has {n} weight arrays where the "
            f"torch layers take {expected} (LoRA or quantized layers are not mapped)"))


def _check_float32(layer: Any) -> None:
    policy = getattr(layer, "dtype_policy", None)
    if policy is not None and (policy.compute_dtype, policy.variable_dtype) != (
            "float32", "float32"):
        raise TorchUnsupported("dtype", (
            f"layer {layer.name!r} ({type(layer).__name__}) has dtype policy {policy.name!r}; "
            "the torch executor computes in float32 only"))


def _activation_name(fn: Any) -> str | None:
    """The Keras name of a built-in activation function, or None."""
    import keras

    if fn is None:
        return "linear"
    try:
        name = keras.activations.serialize(fn)
        return name if isinstance(name, str) and keras.activations.get(name) is fn else None
    except (ValueError, TypeError, OSError):  # lambdas and custom functions
        return None


def _activation(layer: Any, fn: Any, allowed: frozenset[str] | tuple[str, ...] = ACTIVATIONS
                ) -> str:
    name = _activation_name(fn)
    if name not in allowed:
        shown = name or getattr(fn, "__name__", repr(fn))
        raise TorchUnsupported("activation", (
            f"layer {layer.name!r} ({type(layer).__name__}) uses activation {shown!r}; the "
            f"torch layer offers {', '.join(sorted(allowed))}"))
    return name


def _layer_specs(layer: Any) -> list[LayerSpec]:
    """The specs of one Keras layer (none for an inference-time identity)."""
    _check_float32(layer)
    if getattr(layer, "mask_zero", False) or type(layer).__name__ == "Masking":
        raise TorchUnsupported("masking", (
            f"layer {layer.name!r} ({type(layer).__name__}) uses masking: masked steps inside "
            "a chunk carry the state, which per-row lengths (right padding) cannot express"))
    if hasattr(layer, "cell"):
        specs = _cell_specs(layer)
    else:
        inner = getattr(layer, "layer", None)  # TimeDistributed
        if inner is not None:
            _check_float32(inner)
        convert = _converters().get(type(inner or layer))
        if convert is None:
            raise TorchUnsupported("layer", (
                f"layer {layer.name!r} ({type(inner or layer).__name__}) has no torch "
                "equivalent here"))
        specs = convert(inner or layer)
    _check_count(layer, len(layer.get_weights()), sum(len(s.weight_shapes(1)) for s in specs))
    return specs


def _cell_specs(layer: Any) -> list[LayerSpec]:
    import keras

    kinds = {keras.layers.LSTMCell: "lstm", keras.layers.GRUCell: "gru",
             keras.layers.SimpleRNNCell: "rnn"}
    cell = layer.cell
    cells = cell.cells if type(cell) is keras.layers.StackedRNNCells else [cell]
    specs = []
    for c in cells:
        kind = kinds.get(type(c))  # the exact type: a subclass may override call()
        if kind is None:
            raise TorchUnsupported("custom cell", (
                f"layer {layer.name!r} ({type(layer).__name__}) has cell {type(c).__name__}; "
                "torch has LSTM, GRU and SimpleRNN cells only"))
        _check_float32(c)
        if kind == "gru" and not c.reset_after:
            raise TorchUnsupported("gru reset_after=False", (
                f"layer {layer.name!r} is a GRU with reset_after=False; torch's GRU applies "
                "the reset gate after the recurrent product (reset_after=True) only"))
        activation = _activation(layer, c.activation,
                                 ("tanh", "relu") if kind == "rnn" else ("tanh",))
        if kind != "rnn":
            _activation(layer, c.recurrent_activation, ("sigmoid",))
        specs.append(LayerSpec(kind, units=int(c.units), activation=activation,
                               use_bias=bool(c.use_bias), name=layer.name))
    return specs


def _relu_spec(layer: Any) -> list[LayerSpec]:
    if layer.negative_slope or layer.threshold:
        raise TorchUnsupported("layer", (
            f"layer {layer.name!r} (ReLU) has negative_slope or threshold set; not mapped"))
    cap = None if layer.max_value is None else float(layer.max_value)
    return [LayerSpec("activation", activation="relu", alpha=cap, name=layer.name)]


@functools.cache
def _converters() -> dict[type, Callable[[Any], list[LayerSpec]]]:
    """Keras timewise layer type -> its specs (built on first use: imports Keras)."""
    import keras

    L = keras.layers

    def identity(layer: Any) -> list[LayerSpec]:
        return []

    def norm(kind: Kind) -> Callable[[Any], list[LayerSpec]]:
        return lambda layer: [LayerSpec(kind, epsilon=float(layer.epsilon),
                                        scale=bool(layer.scale), center=bool(layer.center),
                                        name=layer.name)]

    def layer_norm(layer: Any) -> list[LayerSpec]:
        if layer.rms_scaling:
            raise TorchUnsupported("layer", (
                f"layer {layer.name!r} (LayerNormalization) uses rms_scaling; not mapped"))
        return norm("layer_norm")(layer)

    def act(name: str, alpha: Callable[[Any], float] | None = None
            ) -> Callable[[Any], list[LayerSpec]]:
        return lambda layer: [LayerSpec("activation", activation=name, name=layer.name,
                                        alpha=None if alpha is None else float(alpha(layer)))]

    return {
        L.Dense: lambda layer: [LayerSpec(
            "dense", units=int(layer.units), activation=_activation(layer, layer.activation),
            use_bias=bool(layer.use_bias), name=layer.name)],
        L.Embedding: lambda layer: [LayerSpec(
            "embedding", units=int(layer.output_dim), vocab=int(layer.input_dim),
            name=layer.name)],
        L.LayerNormalization: layer_norm,
        L.BatchNormalization: norm("batch_norm"),
        L.Activation: lambda layer: act(_activation(layer, layer.activation))(layer),
        L.ReLU: _relu_spec,
        L.LeakyReLU: act("leaky_relu", lambda layer: layer.negative_slope),
        L.ELU: act("elu", lambda layer: layer.alpha),
        L.Softmax: act("softmax"),
        **{t: identity for t in (L.Dropout, L.SpatialDropout1D, L.GaussianNoise,
                                 L.GaussianDropout, L.AlphaDropout,
                                 L.ActivityRegularization, L.Identity)},
    }
