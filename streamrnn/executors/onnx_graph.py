"""An ONNX graph built directly from a Keras model's layer chain (no conversion tool).

:func:`build_onnx_graph` walks the chain (:func:`~streamrnn.executors.models.flatten_layers`)
and emits one ONNX node group per layer: ``Gather`` for an Embedding, ``MatMul``/``Add`` and
the activation for Dense / TimeDistributed(Dense), ``LayerNormalization``, BatchNormalization
in its inference form (a scale and an offset), identities for Dropout-like layers, and one
ONNX ``LSTM`` / ``GRU`` / ``RNN`` node per standard recurrent cell (stacked cells give one
node each). The graph is time-major, inputs and outputs included (ONNX Runtime's CPU kernels
refuse ``layout=1``): the executor packs the chunks time-major as it pads them, instead of
two ``Transpose`` nodes copying the batch in the graph.

Graph inputs:

- ``x``: ``(T, rows, D)`` float32 features, or ``(T, rows)`` int32 token ids;
- ``sequence_lens``: ``(rows,)`` int32, each row's valid steps (right padding; all >= 1:
  ONNX Runtime returns a wrong state for a row of length 0);
- one initial state ``(1, rows, units)`` per recurrent state (h, and c for an LSTM cell),
  in the order of the Keras serving clone's state variables;
- the weights, as inputs too (not initializers), so one graph serves every weight version:
  :meth:`OnnxGraph.convert_weights` maps a Keras ``get_weights()`` list onto them, and
  :meth:`OnnxGraph.baked` turns one version's feeds into initializers (faster: ONNX Runtime
  pre-packs constant weights).

Graph outputs: ``y`` ``(T, rows, output_dim)`` (zeros, or the head applied to zeros, past a
row's length) and each recurrent state's final value ``(1, rows, units)``.

Anything without an exact ONNX equivalent raises :class:`OnnxUnsupported` with the reason
(custom cells, masking, non-float32 dtype policies, activations ONNX lacks, other layers), so
the caller can fall back to the Keras executor and say why.

Example::

    graph = build_onnx_graph(model)
    feeds = graph.convert_weights(model.get_weights())   # {input name: array}
    session = onnxruntime.InferenceSession(graph.proto.SerializeToString())
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import keras
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from streamrnn.errors import UnsupportedModelError
from streamrnn.executors.models import check_streamable, flatten_layers
from streamrnn.executors.onnx_layers import (
    Builder,
    OnnxUnsupported,
    StateSpec,
    check_dtype,
    emit_activation_layer,
    emit_cell,
    emit_timewise,
)

__all__ = ["OPSET", "OnnxGraph", "OnnxUnsupported", "StateSpec", "build_onnx_graph"]

OPSET = 17  # LayerNormalization needs 17; ONNX Runtime 1.16+ runs it


@dataclass
class OnnxGraph:
    """The built graph and what a caller needs to feed it.

    Attributes:
        proto: the ONNX model.
        input_kind: ``"features"`` or ``"tokens"``; input_dim: D, or the vocabulary size.
        output_dim: width of ``y``.
        states: the recurrent states, in the serving clone's state variable order.
        weights: ``(graph input name, shape)`` of every weight input.
        recurrent_ops: the ONNX op of each recurrent node (``"LSTM"``, ``"GRU"``, ``"RNN"``).
    """

    proto: onnx.ModelProto
    input_kind: Literal["features", "tokens"]
    input_dim: int
    output_dim: int
    states: list[StateSpec]
    weights: list[tuple[str, tuple[int, ...]]]
    recurrent_ops: list[str]
    _converters: list[tuple[int, Callable[[list[np.ndarray]], list[np.ndarray]]]] = field(
        default_factory=list, repr=False)

    def convert_weights(self, keras_weights: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Keras weights (``model.get_weights()`` order) -> ``{graph input: float32 array}``.

        Raises ValueError if the count or a shape differs from the model the graph was
        built from.
        """
        keras_weights = list(keras_weights)
        expected = sum(n for n, _ in self._converters)
        if len(keras_weights) != expected:
            raise ValueError(f"expected {expected} weight arrays, got {len(keras_weights)}")
        arrays: list[np.ndarray] = []
        offset = 0
        for n, convert in self._converters:
            arrays.extend(convert([np.asarray(w, np.float32) for w in
                                   keras_weights[offset:offset + n]]))
            offset += n
        out: dict[str, np.ndarray] = {}
        for (name, shape), array in zip(self.weights, arrays, strict=True):
            if array.shape != shape:
                raise ValueError(f"weight {name!r} has shape {array.shape}, expected {shape}")
            out[name] = np.ascontiguousarray(array, np.float32)
        return out

    def baked(self, feeds: Mapping[str, np.ndarray]) -> onnx.ModelProto:
        """A copy of :attr:`proto` with ``feeds`` (from :meth:`convert_weights`) as
        initializers instead of graph inputs: ONNX Runtime then pre-packs the weights once
        per session (measured 1.2x faster at 64 rows x 16 steps, about 2x at 1-16 rows;
        LSTM 256, 2 cores), at the price of a session per weight version."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        inputs = [i for i in proto.graph.input if i.name not in feeds]
        del proto.graph.input[:]
        proto.graph.input.extend(inputs)
        proto.graph.initializer.extend(numpy_helper.from_array(np.asarray(feeds[name]), name)
                                       for name, _ in self.weights)
        return proto


def build_onnx_graph(model: keras.Model) -> OnnxGraph:
    """The ONNX graph of ``model``'s layer chain; see the module docstring.

    Raises:
        UnsupportedModelError: the model cannot stream at all (same checks as the Keras
            serving clone).
        OnnxUnsupported: it streams, but some part has no ONNX equivalent here.
    """
    chain = flatten_layers(model)
    for layer in chain:
        check_streamable(layer)
    rnn_positions = [i for i, layer in enumerate(chain) if isinstance(layer, keras.layers.RNN)]
    if not rnn_positions:
        raise UnsupportedModelError(f"model {model.name!r} has no recurrent layer to serve")
    for i in rnn_positions[:-1]:
        if not chain[i].return_sequences:
            raise UnsupportedModelError(
                f"layer {chain[i].name!r} has return_sequences=False but is followed by "
                "another recurrent layer; this cannot stream")
    input_kind, input_dim = _input_kind(model, chain)
    b = Builder()
    lens = b.graph_input("sequence_lens", TensorProto.INT32, ["rows"])
    if input_kind == "tokens":
        h = b.graph_input("x", TensorProto.INT32, ["steps", "rows"])
    else:
        h = b.graph_input("x", TensorProto.FLOAT, ["steps", "rows", input_dim])
    shape: tuple[int | None, ...] = tuple(model.inputs[0].shape)
    for layer in chain:
        h = _emit_layer(b, layer, h, lens, shape)
        shape = tuple(layer.compute_output_shape(shape))
    output_dim = int(shape[-1])
    _rename(b.nodes, h, "y")
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                             ["steps", "rows", output_dim])]
    outputs += [helper.make_tensor_value_info(s.final, TensorProto.FLOAT, [1, "rows", s.units])
                for s in b.states]
    graph = helper.make_graph(b.nodes, model.name or "model", b.inputs, outputs,
                              initializer=b.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="streamrnn")
    proto.ir_version = 8  # ONNX Runtime 1.14+
    onnx.checker.check_model(proto)
    return OnnxGraph(
        proto=proto, input_kind=input_kind, input_dim=input_dim, output_dim=output_dim,
        states=list(b.states),
        weights=list(b.weights), recurrent_ops=list(b.recurrent_ops),
        _converters=list(b.converters))


def _rename(nodes: list[onnx.NodeProto], old: str, new: str) -> None:
    """Call tensor ``old`` ``new`` wherever ``nodes`` make or use it."""
    for node in nodes:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new


def _input_kind(model: keras.Model, chain: list[keras.layers.Layer]
                ) -> tuple[Literal["features", "tokens"], int]:
    shape = tuple(model.inputs[0].shape)
    if len(shape) == 2 and isinstance(chain[0], keras.layers.Embedding):
        return "tokens", int(chain[0].input_dim)
    if len(shape) == 3 and shape[-1] is not None:
        return "features", int(shape[-1])
    raise UnsupportedModelError(
        f"model {model.name!r} input shape {shape} is not (batch, time, features) or "
        "(batch, time) token ids starting with an Embedding")


def _emit_layer(b: Builder, layer: keras.layers.Layer, h: str, lens: str,
                shape: tuple[int | None, ...]) -> str:
    """Emit ``layer`` on the time-major tensor ``h``; returns the output tensor's name."""
    check_dtype(layer)
    if isinstance(layer, keras.layers.Masking) or getattr(layer, "mask_zero", False):
        raise OnnxUnsupported("masking",
            f"layer {layer.name!r} ({type(layer).__name__}) uses masking: masked steps inside "
            "a chunk carry the state, which sequence lengths (right padding) cannot express")
    if isinstance(layer, keras.layers.RNN):
        return _emit_rnn(b, layer, h, lens)
    if isinstance(layer, keras.layers.TimeDistributed):
        check_dtype(layer.layer)
        inner = layer.layer
        n = len(layer.get_weights())
        return emit_timewise(b, inner, h, shape, n) or emit_activation_layer(b, inner, h)
    out = emit_timewise(b, layer, h, shape, len(layer.get_weights()))
    return out or emit_activation_layer(b, layer, h)


def _emit_rnn(b: Builder, layer: keras.layers.RNN, h: str, lens: str) -> str:
    cell = layer.cell
    cells = cell.cells if isinstance(cell, keras.layers.StackedRNNCells) else [cell]
    for index, c in enumerate(cells):
        name = layer.name if len(cells) == 1 else f"{layer.name}/cell_{index}"
        h = emit_cell(b, layer, c, name, h, lens)
    return h
