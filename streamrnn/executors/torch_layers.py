"""The torch module chain of a :class:`~streamrnn.executors.torch_spec.ModelSpec`.

:class:`TorchChain` holds one module per spec: a one-layer ``nn.LSTM`` / ``nn.GRU`` /
``nn.RNN`` (batch first) per recurrent cell, and a small functional layer per timewise layer
(Dense, Embedding, LayerNormalization, BatchNormalization in inference form, activations).
Its forward takes the gathered rows ``x (k, T, ...)``, their lengths and states; when the
lengths differ it packs the batch (``pack_padded_sequence``, unsorted), so every recurrent
layer returns each row's state at its own last valid step, and the timewise layers run on
the packed rows (the valid steps only).

Precision: ``TorchChain(spec, dtype=torch.bfloat16)`` keeps the weights of the recurrent
cells, Dense and Embedding in bf16 and runs their GEMMs in bf16; normalization layers and
activations keep float32 parameters and compute in float32 on upcast inputs (torch.autocast's
policy: they are cheap, and LayerNormalization / softmax lose most to bf16 rounding). Every
layer casts its input to its own dtype, so the chain takes float32 (or int ids) and states in
float32 and returns float32 outputs and states, whatever runs inside. The default (float32)
casts nothing.

Weight mapping (Keras -> torch): LSTM gates i, f, c, o are torch's i, f, g, o (kernels
transposed; Keras' one bias goes to ``bias_ih``, zeros to ``bias_hh``); GRU gates z, r, h
become r, z, n, and the two biases of ``reset_after=True`` are ``bias_ih`` / ``bias_hh``;
SimpleRNN: ``bias_ih`` = bias, ``bias_hh`` = zeros.

Example::

    chain = TorchChain(spec)                    # or TorchChain(spec, dtype=torch.bfloat16)
    chain.load(keras_weights)                   # copied in place (cast to each weight's dtype)
    y, states = chain(x, lengths, states)       # x (k, T, D); states [(k, units), ...]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

# libgomp reads its wait policy once, when torch loads (streamrnn.executors.torch_rnn: Threads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from streamrnn.executors.torch_spec import RECURRENT_KINDS, LayerSpec, ModelSpec

__all__ = ["ACTIVATION_FUNCTIONS", "TorchChain"]


def _cap_relu(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return F.relu(x) if cap is None else x.clamp(0.0, cap)


#: Keras activation name -> f(x, alpha) (the keys are torch_spec.ACTIVATIONS)
ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor, Any], torch.Tensor]] = {
    "linear": lambda x, a: x,
    "relu": _cap_relu,
    "relu6": lambda x, a: F.relu6(x),
    "tanh": lambda x, a: torch.tanh(x),
    "sigmoid": lambda x, a: torch.sigmoid(x),
    "softmax": lambda x, a: F.softmax(x, dim=-1),
    "log_softmax": lambda x, a: F.log_softmax(x, dim=-1),
    "gelu": lambda x, a: F.gelu(x),
    "elu": lambda x, a: F.elu(x, 1.0 if a is None else a),
    "selu": lambda x, a: F.selu(x),
    "celu": lambda x, a: F.celu(x),
    "softplus": lambda x, a: F.softplus(x),
    "softsign": lambda x, a: F.softsign(x),
    "silu": lambda x, a: F.silu(x),
    "exponential": lambda x, a: torch.exp(x),
    "leaky_relu": lambda x, a: F.leaky_relu(x, 0.2 if a is None else a),
    "hard_sigmoid": lambda x, a: F.hardsigmoid(x),
    "hard_silu": lambda x, a: F.hardswish(x),
    "hard_tanh": lambda x, a: F.hardtanh(x),
    "mish": lambda x, a: F.mish(x),
    "tanh_shrink": lambda x, a: F.tanhshrink(x),
    "log_sigmoid": lambda x, a: F.logsigmoid(x),
    "soft_shrink": lambda x, a: F.softshrink(x, 0.5),
    "hard_shrink": lambda x, a: F.hardshrink(x, 0.5),
}


#: timewise kinds whose weights take the chain's dtype (the GEMMs); the others stay float32
_GEMM_KINDS = ("dense", "embedding")


class _Timewise(nn.Module):
    """One layer acting on each timestep, applied to rows ``(N, dim)`` (or ``(N,)`` ids).

    Dense runs in its weights' dtype; norms and activations in float32 (a no-op cast when
    everything is float32)."""

    def __init__(self, spec: LayerSpec, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        shapes = spec.weight_shapes(dim)
        dtype = dtype if spec.kind in _GEMM_KINDS else torch.float32
        self.params = nn.ParameterList(
            [nn.Parameter(torch.zeros(s, dtype=dtype), requires_grad=False) for s in shapes])

    def convert(self, arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """This layer's Keras arrays -> ``{parameter name: array}`` (the same layout)."""
        return {f"params.{i}": a for i, a in enumerate(arrays)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, w = self.spec, list(self.params)
        if s.kind == "embedding":
            return F.embedding(x, w[0])
        if s.kind == "dense":
            x = F.linear(x.to(w[0].dtype), w[0].T, w[1] if s.use_bias else None)
        x = x.float()
        if s.kind in ("layer_norm", "batch_norm"):
            return self._norm(x, w)
        return ACTIVATION_FUNCTIONS[s.activation](x, s.alpha)

    def _norm(self, x: torch.Tensor, w: list[torch.Tensor]) -> torch.Tensor:
        s = self.spec
        gamma = w.pop(0) if s.scale else None
        beta = w.pop(0) if s.center else None
        if s.kind == "layer_norm":
            return F.layer_norm(x, (x.shape[-1],), gamma, beta, s.epsilon)
        return F.batch_norm(x, w[0], w[1], gamma, beta, False, 0.0, s.epsilon)


def _swap_zr(m: np.ndarray) -> np.ndarray:
    """GRU gate blocks on the last axis from Keras z, r, h to torch r, z, n."""
    z, r, h = np.split(m, 3, axis=-1)
    return np.concatenate([r, z, h], axis=-1)


class _Recurrent(nn.Module):
    """One recurrent cell as a one-layer ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` in ``dtype``
    (inputs and float32 states are cast to it; the states come back in float32)."""

    def __init__(self, spec: LayerSpec, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        self.dtype = dtype
        self.n_states = 2 if spec.kind == "lstm" else 1
        extra = {"nonlinearity": spec.activation} if spec.kind == "rnn" else {}
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[spec.kind]
        self.rnn = cls(dim, spec.units, batch_first=True, bias=spec.use_bias, dtype=dtype,
                       **extra)
        self.rnn.requires_grad_(False)

    def convert(self, arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Keras kernel, recurrent kernel (, bias) -> ``{parameter name: array}``."""
        w = list(arrays)
        order = _swap_zr if self.spec.kind == "gru" else (lambda m: m)
        torch_arrays = [order(w[0]).T, order(w[1]).T]
        if self.spec.use_bias:
            if self.spec.kind == "gru":  # (2, 3U): input and recurrent biases
                torch_arrays += [order(w[2][0]), order(w[2][1])]
            else:
                torch_arrays += [w[2], np.zeros_like(w[2])]
        names = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
        return {f"rnn.{n}": a for n, a in zip(names, torch_arrays, strict=False)}

    def forward(self, h: torch.Tensor | PackedSequence, states: list[torch.Tensor]
                ) -> tuple[torch.Tensor | PackedSequence, list[torch.Tensor]]:
        h = h.to(self.dtype)
        s = [t[None].to(self.dtype) for t in states]
        if self.n_states == 2:
            y, (hn, cn) = self.rnn(h, (s[0], s[1]))
            return y, [hn[0].float(), cn[0].float()]
        y, hn = self.rnn(h, s[0])
        return y, [hn[0].float()]


def _rowwise(layer: nn.Module, h: torch.Tensor | PackedSequence
             ) -> torch.Tensor | PackedSequence:
    """Apply a timewise layer to every step of a padded ``(k, T, ...)`` batch or a pack."""
    if isinstance(h, PackedSequence):
        return PackedSequence(layer(h.data), h.batch_sizes, h.sorted_indices,
                              h.unsorted_indices)
    k, t = h.shape[:2]
    return layer(h.reshape(k * t, *h.shape[2:])).reshape(k, t, -1)


class TorchChain(nn.Module):
    """The module chain of a :class:`ModelSpec` (weights from :meth:`load`); ``dtype``
    is the recurrent cells' and Dense / Embedding weights' (float32 or bfloat16)."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        self.dtype = dtype
        self.steps = nn.ModuleList(
            (_Recurrent if s.kind in RECURRENT_KINDS else _Timewise)(s, d, dtype)
            for s, d in zip(spec.layers, spec.widths(), strict=True))

    def convert(self, weights: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Keras-order ``weights`` -> ``{parameter name: float32 array}`` in torch layout.

        Raises ValueError if the count or a shape differs from the spec."""
        shapes = self.spec.weight_shapes()
        weights = [np.asarray(w, np.float32) for w in weights]
        if len(weights) != len(shapes):
            raise ValueError(f"expected {len(shapes)} weight arrays, got {len(weights)}")
        for i, (w, shape) in enumerate(zip(weights, shapes, strict=True)):
            if w.shape != shape:
                raise ValueError(f"weight {i} has shape {w.shape}, expected {shape}")
        out: dict[str, np.ndarray] = {}
        offset = 0
        for i, (step, s, d) in enumerate(zip(self.steps, self.spec.layers, self.spec.widths(),
                                             strict=True)):
            n = len(s.weight_shapes(d))
            out.update({f"steps.{i}.{name}": np.ascontiguousarray(a)
                        for name, a in step.convert(weights[offset:offset + n]).items()})
            offset += n
        return out

    @torch.no_grad()
    def load(self, weights: Sequence[np.ndarray]) -> None:
        """Copy Keras-order ``weights`` into the parameters (in place, on their device)."""
        for name, a in self.convert(weights).items():
            self.get_parameter(name).copy_(torch.from_numpy(a))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None,
                states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``x (k, T, ...)`` right-padded, ``lengths (k,)`` on the CPU (None: all ``T``),
        one float32 ``(k, units)`` per state -> float32 ``y (k, T, output_dim)`` and the
        states at each row's last valid step."""
        h: torch.Tensor | PackedSequence = x
        if lengths is not None:
            h = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        new: list[torch.Tensor] = []
        for step in self.steps:
            if isinstance(step, _Recurrent):
                h, out = step(h, states[len(new):len(new) + step.n_states])
                new += out
            else:
                h = _rowwise(step, h)
        if isinstance(h, PackedSequence):
            h = pad_packed_sequence(h, batch_first=True)[0]
        return h.float(), new
