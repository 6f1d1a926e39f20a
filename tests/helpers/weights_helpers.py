"""Helpers shared by the weights tests (a plain module, not a test module).

A small LSTM+GRU model (``D`` features -> 2) built from a seed, and the offline reference
for a weights swap mid-stream: an explicit-state copy of the model that continues from the
states reached with the old weights.
"""

from __future__ import annotations

import keras
import numpy as np

D = 3


def model_with_seed(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((None, D)), keras.layers.LSTM(8, return_sequences=True),
        keras.layers.GRU(6, return_sequences=True), keras.layers.Dense(2),
    ])


def explicit_state_model(weights: list[np.ndarray]) -> keras.Model:
    """The same architecture with its states as inputs and outputs: (x, h1, c1, h2) ->
    (y, h1, c1, h2), so an offline run can continue from any state with any weights."""
    x = keras.Input((None, D))
    h1, c1, h2 = keras.Input((8,)), keras.Input((8,)), keras.Input((6,))
    seq, h1n, c1n = keras.layers.LSTM(8, return_sequences=True, return_state=True)(
        x, initial_state=[h1, c1])
    seq, h2n = keras.layers.GRU(6, return_sequences=True, return_state=True)(
        seq, initial_state=[h2])
    y = keras.layers.Dense(2)(seq)
    model = keras.Model([x, h1, c1, h2], [y, h1n, c1n, h2n])
    model.set_weights(weights)
    return model


def offline_with_swap(old: list, new: list, seq: np.ndarray, swap_at: int) -> np.ndarray:
    """Old weights on ``seq[:swap_at]`` from the initial state, then new weights from the
    states reached there."""
    zeros = [np.zeros((1, 8), np.float32), np.zeros((1, 8), np.float32),
             np.zeros((1, 6), np.float32)]
    outs = []
    y, *states = explicit_state_model(old)([seq[None, :swap_at], *zeros])
    outs.append(np.asarray(y)[0])
    y, *_ = explicit_state_model(new)([seq[None, swap_at:], *[np.asarray(s) for s in states]])
    outs.append(np.asarray(y)[0])
    return np.concatenate(outs)
