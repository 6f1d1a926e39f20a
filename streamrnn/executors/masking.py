"""How the serving clone reproduces Keras masking (``Embedding(mask_zero=True)``, ``Masking``).

Keras 3 hands a layer's mask to the next layers as a second input node (the ``mask=``
argument), drops it after a layer that does not support masking (e.g. ``EinsumDense``), and
in a recurrent layer carries the state *and the previous output* through a masked step
(``zero_output_for_mask=True``: zeros instead). A stateful clone run chunk by chunk starts
each chunk's carried output at zeros; for the standard cells the carried output is the
layer's first state ``h``, so :func:`carry_leading` puts ``h`` on a chunk's leading masked
steps and a chunk that starts on a masked step returns what one offline call returns.

Example::

    data = data_inputs(node)                      # the node's inputs less a propagated mask
    y = carry_leading(layer(x, mask=mask), mask, h0)   # y (slots, T, units), h0 (slots, units)
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

__all__ = ["carries_first_state", "carry_leading", "data_inputs", "first_state"]

_CELLS = (keras.layers.LSTMCell, keras.layers.GRUCell, keras.layers.SimpleRNNCell)


def data_inputs(node: Any) -> list[Any]:
    """A functional node's input tensors, less the mask Keras propagated to it.

    The ``mask=`` argument is dropped only when it is the propagated mask of the node's one
    positional input (``input._keras_mask``); a mask computed from another tensor stays an
    input of its own (such a graph is not a layer chain).
    """
    tensors = list(node.input_tensors)
    mask = node.arguments.kwargs.get("mask")
    args = keras.tree.flatten(node.arguments.args)
    if mask is None or len(args) != 1 or getattr(args[0], "_keras_mask", None) is not mask:
        return tensors
    return [t for t in tensors if t is not mask]


def carries_first_state(layer: keras.layers.Layer) -> bool:
    """True if on a masked step ``layer`` returns its carried output, which is its first
    state ``h`` (standard LSTM/GRU/SimpleRNN cells, ``zero_output_for_mask=False``)."""
    return (isinstance(layer, keras.layers.RNN) and type(layer.cell) in _CELLS
            and not layer.zero_output_for_mask)


def first_state(layer: keras.layers.RNN) -> tf.Tensor:
    """The current value of a stateful layer's first state variable, ``(slots, units)``."""
    var = keras.tree.flatten(layer.states)[0]
    return tf.convert_to_tensor(getattr(var, "value", var))


def carry_leading(y: tf.Tensor, mask: tf.Tensor, h0: tf.Tensor) -> tf.Tensor:
    """``y`` with ``h0`` on each row's steps before its first unmasked step.

    Args:
        y: ``(rows, T, units)`` the layer's outputs (zeros on those steps).
        mask: ``(rows, T)`` bool.
        h0: ``(rows, units)`` the layer's first state before the step.
    """
    leading = tf.equal(tf.cumsum(tf.cast(mask, tf.int32), axis=1), 0)
    return tf.where(leading[:, :, None], h0[:, None, :], y)
