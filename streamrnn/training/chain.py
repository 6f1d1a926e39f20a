"""The trainer's view of a Keras chain: one timestep of its layers, and the facts around it.

:meth:`TrainingChain.from_model` reads a built single-input Keras chain once and decides what
the trainer needs to know about it: its layers as a step function (the cells of its RNN
layers, the timewise layers around them), what it takes as input (``(B, T, D)`` features or
``(B, T)`` token ids behind an Embedding), how its output is fed back as its next input
(generation's rule, :func:`streamrnn.engine.generate.plan_feedback`), which loss it trains
with, and whether a stream can train on next-step prediction without explicit targets.

The chain shares the model's layers (and so its weights); it copies nothing.

Example::

    chain = TrainingChain.from_model(model, slots=16, config=TrainConfig())
    chain.input_kind, chain.loss_name        # "features", "mse"
    chain.state_shapes                       # [(units,), (units,)] for one LSTM
    out, states = chain.step(x_t, states)    # (B, D) -> (B, output_dim), new states
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from streamrnn.engine.generate import Feedback, plan_feedback
from streamrnn.errors import InvalidInputError, UnsupportedModelError
from streamrnn.executors.models import ServingModel, check_streamable, flatten_layers
from streamrnn.protocol import ErrorCode
from streamrnn.training.config import TrainConfig

if TYPE_CHECKING:
    from streamrnn.engine.generate import FeedbackPlan

__all__ = ["StepLayer", "TrainingChain", "state_shapes"]


@dataclass
class StepLayer:
    """One layer of the chain as a per-timestep callable.

    ``cell`` is the RNN cell of a recurrent layer (None otherwise); ``state_shapes`` its
    state row shapes (e.g. ``[(units,), (units,)]`` for an LSTM). A TimeDistributed layer
    is represented by the layer it wraps.
    """

    layer: keras.layers.Layer
    cell: Any = None
    state_shapes: list[tuple[int, ...]] = field(default_factory=list)


def state_shapes(cell: Any) -> list[tuple[int, ...]]:
    """The row shape of each state of an RNN cell (from ``cell.state_size``)."""
    sizes = cell.state_size
    flat = sizes if isinstance(sizes, list | tuple) else [sizes]
    return [tuple(s) if isinstance(s, list | tuple) else (int(s),) for s in flat]


@dataclass(frozen=True)
class TrainingChain:
    """A Keras chain as the trainer steps it (see the module docstring).

    Attributes:
        name: the model's name, for messages.
        layers: the chain as :class:`StepLayer` s, in order.
        input_kind: ``"features"`` or ``"tokens"``.
        input_dim: ``D`` for features; the vocabulary size for token ids.
        output_dim: width of each output step.
        mask_zero: the chain starts with ``Embedding(mask_zero=True)`` (id 0 is a
            masked step that leaves the state as it was).
        feedback: how an output becomes the next input.
        loss_name: ``"mse"``, ``"sparse_ce"`` or ``"ce"`` (``"auto"`` resolved).
        next_step_targets: without explicit targets a stream trains on predicting its own
            next observation (the output is the next input's kind and width).
    """

    name: str
    layers: list[StepLayer]
    input_kind: str
    input_dim: int
    output_dim: int
    mask_zero: bool
    feedback: FeedbackPlan
    loss_name: str
    next_step_targets: bool

    @classmethod
    def from_model(cls, model: keras.Model, slots: int, config: TrainConfig,
                   feedback: Feedback = None) -> TrainingChain:
        """Read ``model`` (built, single input); UnsupportedModelError or
        InvalidInputError (BAD_VALUE) if the trainer cannot train it with ``config``."""
        chain = flatten_layers(model)
        layers = _step_layers(chain, model.name)
        in_shape = tuple(model.inputs[0].shape)
        output_dim = int(model.outputs[0].shape[-1])
        input_kind, input_dim, mask_zero = _input_facts(chain[0], in_shape, model.name)
        # The generation feedback rule, decided on a weight-sharing view of the chain (a
        # ServingModel record over the model's own layers; its forward() is never called).
        view = ServingModel(
            slots=slots, layers=chain, rnn_layers=[s.layer for s in layers if s.cell],
            source_layers=chain, input_kind=input_kind, input_dim=input_dim,
            output_dim=output_dim, name=model.name,
        )
        plan = plan_feedback(view, feedback)
        if not plan.picks_tokens and config.sample != "greedy":
            raise InvalidInputError(
                f"sample={config.sample!r} needs a token model; this model feeds back "
                "its prediction", ErrorCode.BAD_VALUE,
            )
        loss = _loss_name(config.loss, plan.mode, input_kind)
        next_step = (
            (input_kind == "tokens" and loss == "sparse_ce")
            or (input_kind == "features" and output_dim == input_dim and loss != "sparse_ce")
        )
        return cls(name=model.name, layers=layers, input_kind=input_kind,
                   input_dim=input_dim, output_dim=output_dim, mask_zero=mask_zero,
                   feedback=plan, loss_name=loss, next_step_targets=next_step)

    @property
    def state_shapes(self) -> list[tuple[int, ...]]:
        """Row shape of every recurrent state, layer by layer."""
        return [shape for s in self.layers for shape in s.state_shapes]

    def step(self, inp: tf.Tensor, states: list[tf.Tensor]) -> tuple[tf.Tensor, list]:
        """One timestep of the whole chain: inp ``(B, D)`` or ``(B,)`` ids -> ``(B, out)``,
        and the new states (one ``(B, ...)`` tensor per entry of :attr:`state_shapes`)."""
        h = inp
        new_states: list[tf.Tensor] = []
        k = 0
        for s in self.layers:
            if s.cell is None:
                h = s.layer(h, training=False)
                continue
            n = len(s.state_shapes)
            h, st = s.cell(h, list(states[k: k + n]), training=False)
            new_states.extend(st if isinstance(st, list | tuple) else [st])
            k += n
        return h, new_states


def _step_layers(chain: list[keras.layers.Layer], name: str) -> list[StepLayer]:
    """The chain as step layers; UnsupportedModelError without a recurrent layer."""
    layers: list[StepLayer] = []
    for layer in chain:
        check_streamable(layer)
        if isinstance(layer, keras.layers.Masking):
            raise UnsupportedModelError(
                f"layer {layer.name!r} (Masking) is not supported by the trainer; "
                "send only real steps"
            )
        if isinstance(layer, keras.layers.RNN):
            layers.append(StepLayer(layer, layer.cell, state_shapes(layer.cell)))
        elif isinstance(layer, keras.layers.TimeDistributed):
            layers.append(StepLayer(layer.layer))
        else:
            layers.append(StepLayer(layer))
    if not any(s.cell is not None for s in layers):
        raise UnsupportedModelError(f"model {name!r} has no recurrent layer to train")
    return layers


def _input_facts(first: keras.layers.Layer, in_shape: tuple, name: str
                 ) -> tuple[str, int, bool]:
    """``(input_kind, input_dim, mask_zero)`` from the input shape and the first layer."""
    if len(in_shape) == 2 and isinstance(first, keras.layers.Embedding):
        return "tokens", int(first.input_dim), bool(first.mask_zero)
    if len(in_shape) == 3 and in_shape[-1] is not None:
        return "features", int(in_shape[-1]), False
    raise UnsupportedModelError(
        f"model {name!r} input shape {in_shape} is not (batch, time, features) "
        "or (batch, time) token ids starting with an Embedding"
    )


def _loss_name(loss: str, feedback_mode: str, input_kind: str) -> str:
    """Resolve ``"auto"`` (by the feedback rule) and check the loss fits the input."""
    if loss == "auto":
        loss = {"tokens": "sparse_ce", "onehot": "ce"}.get(feedback_mode, "mse")
    if loss == "sparse_ce" and input_kind != "tokens":
        raise InvalidInputError("sparse_ce loss needs a token model", ErrorCode.BAD_VALUE)
    return loss
