"""Small seeded Keras RNN models and offline references for the streaming contract tests."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

CELLS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU, "simple": keras.layers.SimpleRNN}


@dataclass(frozen=True)
class ModelSpec:
    cell: str = "lstm"
    layers: int = 1
    units: int = 8
    tokens: bool = False  # Embedding input (int ids) instead of float features
    features: int = 5  # D for features, vocabulary size for tokens
    out: int = 3
    return_sequences: bool = True  # of the last RNN layer
    generic_cell: bool = False  # keras.layers.RNN(XCell) instead of the fused layer class


def build_model(spec: ModelSpec, seed: int = 0) -> keras.Model:
    """A trained-looking model (random weights, unit-scale outputs) for ``spec``."""
    keras.utils.set_random_seed(seed)
    if spec.tokens:
        layers = [keras.Input((None,), dtype="int32"), keras.layers.Embedding(spec.features, 6)]
    else:
        layers = [keras.Input((None, spec.features))]
    for i in range(spec.layers):
        last = i == spec.layers - 1
        rs = spec.return_sequences if last else True
        if spec.generic_cell:
            cell_cls = {"lstm": keras.layers.LSTMCell, "gru": keras.layers.GRUCell,
                        "simple": keras.layers.SimpleRNNCell}[spec.cell]
            layers.append(keras.layers.RNN(cell_cls(spec.units), return_sequences=rs))
        else:
            layers.append(CELLS[spec.cell](spec.units, return_sequences=rs))
    layers.append(keras.layers.Dense(spec.out))
    return keras.Sequential(layers)


def random_input(spec: ModelSpec, steps: int, rng: np.random.Generator) -> np.ndarray:
    """One stream's full sequence: ``(steps, D)`` float32 or ``(steps,)`` int32 ids."""
    if spec.tokens:
        return rng.integers(0, spec.features, size=steps).astype(np.int32)
    return rng.standard_normal((steps, spec.features)).astype(np.float32)


def offline(model: keras.Model, seq: np.ndarray, return_sequences: bool = True) -> np.ndarray:
    """The original model applied to the whole sequence in one call, from the initial state.

    For a model whose last RNN has ``return_sequences=False`` the per-step reference is the
    model's output on every prefix (one call per prefix), which is what streaming promises.
    """
    if return_sequences:
        return np.asarray(model(seq[None]))[0]
    return np.stack([np.asarray(model(seq[None, : t + 1]))[0] for t in range(len(seq))])
