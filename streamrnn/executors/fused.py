"""Fused fast path for the standard recurrent cells of a serving clone.

Keras runs a stateful ``LSTM`` / ``GRU`` / ``SimpleRNN`` step as a generic loop that calls
the cell once per timestep, each call multiplying the input by the input kernel. A
:class:`FusedRNN` computes exactly the same math on the same variables, but:

- the input projection ``x @ kernel + bias`` is hoisted out of the time loop: one GEMM of
  ``(slots * T, D) x (D, gates * units)`` for the whole chunk;
- the time loop is unrolled at trace time (T is the runner's static bucket length) when the
  step runs as a plain TF graph, so each step is a handful of ops with no loop machinery.
  Under XLA it stays a ``tf.while_loop``: XLA:CPU fuses an unrolled LSTM's cell-state chain
  into every later step (quadratic recompute: 60 s to compile and half the speed at T=64);
  inside a loop body it cannot, and the body still fuses the gate math into a few kernels;
- masked steps carry a row's state with ``tf.where`` exactly as Keras does;
- an LSTM with the default activations evaluates its four gates with one ``tanh`` over the
  whole ``(slots, 4 * units)`` pre-activation, using ``sigmoid(z) = 0.5 * tanh(z / 2) + 0.5``:
  the halving is folded into the input and recurrent kernels' i/f/o columns once per call
  (exact in floating point), so a step runs one transcendental pass instead of three
  sigmoids and a tanh (about 10% faster under XLA on CPU; same values within 1e-6).

The weights are read from the cloned layer's own ``cell`` variables at every call (so
``set_weights`` / weight-version swaps carry over) and the state lives in the layer's own
``layer.states`` variables (so :class:`~streamrnn.executors.keras_state.StateBank` rows,
snapshots and resets keep working unchanged). Cells it does not know (custom cells, stacked
cells, non-float32 dtype policies) are left to the Keras layer: :func:`fusable` says why.

Example::

    fused = FusedRNN(serving.rnn_layers[0])
    y = fused(x, mask)   # x (slots, T, D) float32, mask (slots, T) bool -> (slots, T, units)
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

__all__ = ["FusedRNN", "MAX_UNROLL", "fusable", "fuse_layers"]

# Longest bucket unrolled into straight-line code outside XLA; longer ones use a while loop
# (whose graph, and so compile time, does not grow with T).
MAX_UNROLL = 32

_CELLS = (keras.layers.LSTMCell, keras.layers.GRUCell, keras.layers.SimpleRNNCell)


def fusable(layer: keras.layers.Layer) -> str | None:
    """None if ``layer`` can run fused, else the reason (in words) it falls back to Keras."""
    if not isinstance(layer, keras.layers.RNN):
        return f"{type(layer).__name__} is not a recurrent layer"
    cell = layer.cell
    if type(cell) not in _CELLS:  # exact type: a subclass may override call()
        return f"cell {type(cell).__name__} is not a standard LSTM/GRU/SimpleRNN cell"
    if layer.go_backwards:
        return "go_backwards=True"
    if layer.zero_output_for_mask:
        return "zero_output_for_mask=True (the fused loop carries the output on masked steps)"
    if cell.compute_dtype != "float32" or cell.variable_dtype != "float32":
        return f"dtype policy {cell.dtype_policy.name!r} (fused path is float32 only)"
    if not layer.stateful:
        return "not stateful (serving clones are)"
    if not cell.built:
        return "cell is not built"
    return None


def _tf(v: object) -> tf.Variable:
    """The tf.Variable under a Keras variable (reads it at call time, never a constant)."""
    value = getattr(v, "value", v)
    return value if isinstance(value, tf.Variable) else v


def _in_xla() -> bool:
    """True while tracing a ``tf.function(jit_compile=True)`` (or inside any XLA context)."""
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def _activation(fn: Callable | None) -> Callable[[tf.Tensor], tf.Tensor]:
    return fn if fn is not None else (lambda z: z)


class FusedRNN:
    """Hoisted-projection, unrolled recurrence over one stateful Keras RNN layer's variables.

    Args:
        layer: a built, stateful Keras ``LSTM``/``GRU``/``SimpleRNN`` (or ``RNN(cell)`` with
            one of their cells) whose ``states`` hold one row per slot.
        max_unroll: buckets up to this length are unrolled; longer ones use a while loop.
    """

    def __init__(self, layer: keras.layers.RNN, max_unroll: int = MAX_UNROLL):
        reason = fusable(layer)
        if reason is not None:
            raise ValueError(f"layer {layer.name!r} cannot run fused: {reason}")
        self.layer = layer
        self.cell = layer.cell
        self.units = int(self.cell.units)
        self.max_unroll = max_unroll
        self.kind = {
            keras.layers.LSTMCell: "lstm",
            keras.layers.GRUCell: "gru",
            keras.layers.SimpleRNNCell: "simple",
        }[type(self.cell)]
        self.state_vars = [_tf(v) for v in keras.tree.flatten(layer.states)]
        expected = 2 if self.kind == "lstm" else 1
        if len(self.state_vars) != expected:
            raise ValueError(
                f"layer {layer.name!r} has {len(self.state_vars)} state variables, "
                f"expected {expected}"
            )
        self.act = _activation(self.cell.activation)
        self.rec_act = _activation(getattr(self.cell, "recurrent_activation", None))

    def __repr__(self) -> str:
        return f"FusedRNN({self.layer.name!r}, {self.kind}, units={self.units})"

    # ---- weights, read per call --------------------------------------------------------

    def _input_bias(self) -> tf.Tensor | None:
        cell = self.cell
        if not cell.use_bias:
            return None
        bias = _tf(cell.bias)
        if self.kind == "gru" and cell.reset_after:
            return bias[0]  # (2, 3U): row 0 is the input bias, row 1 the recurrent bias
        return bias

    def _tanh_gates(self) -> bool:
        """True for an LSTM whose gates can all be one tanh (the default activations)."""
        return (
            self.kind == "lstm"
            and self.cell.recurrent_activation is keras.activations.sigmoid
            and self.cell.activation is keras.activations.tanh
        )

    def _gate_scale(self) -> tf.Tensor:
        """``(4 * units,)``: 0.5 on the i, f, o columns, 1 on the candidate (c) columns."""
        half, one = tf.fill([self.units], 0.5), tf.ones([self.units])
        return tf.concat([half, half, one, half], axis=0)

    def _project(self, x: tf.Tensor) -> tf.Tensor:
        """``(slots, T, D) -> (T, slots, G)``: the input projection of every step at once."""
        slots, steps, dim = x.shape[0], x.shape[1], x.shape[2]
        xt = tf.transpose(x, [1, 0, 2])
        xw = tf.matmul(tf.reshape(xt, [-1, dim]), _tf(self.cell.kernel))
        bias = self._input_bias()
        if bias is not None:
            xw = xw + bias
        if self._tanh_gates():
            xw = xw * self._gate_scale()
        return tf.reshape(xw, [steps, slots, -1])

    # ---- one step: same math as the Keras cells (implementation=2) ---------------------

    def _step_fn(self) -> Callable[[tf.Tensor, list[tf.Tensor]], list[tf.Tensor]]:
        """``step(xw, states) -> new states`` for this cell (weights read once per call)."""
        rk = _tf(self.cell.recurrent_kernel)
        if self._tanh_gates():
            return self._lstm_tanh_step(rk)
        build = {"lstm": self._lstm_step, "simple": self._simple_step, "gru": self._gru_step}
        return build[self.kind](rk)

    def _lstm_tanh_step(self, rk: tf.Tensor) -> Callable:
        rk_scaled = rk * self._gate_scale()  # once per call, outside the time loop

        def lstm_tanh(xw: tf.Tensor, states: list[tf.Tensor]) -> list[tf.Tensor]:
            h, c = states
            s = tf.tanh(xw + tf.matmul(h, rk_scaled))  # xw is pre-scaled too
            si, sf, g, so = tf.split(s, 4, axis=1)
            c = (0.5 * sf + 0.5) * c + (0.5 * si + 0.5) * g
            h = (0.5 * so + 0.5) * tf.tanh(c)
            return [h, c]

        return lstm_tanh

    def _lstm_step(self, rk: tf.Tensor) -> Callable:
        act, rec_act = self.act, self.rec_act

        def lstm(xw: tf.Tensor, states: list[tf.Tensor]) -> list[tf.Tensor]:
            h, c = states
            z = xw + tf.matmul(h, rk)
            zi, zf, zc, zo = tf.split(z, 4, axis=1)
            c = rec_act(zf) * c + rec_act(zi) * act(zc)
            h = rec_act(zo) * act(c)
            return [h, c]

        return lstm

    def _simple_step(self, rk: tf.Tensor) -> Callable:
        act = self.act

        def simple(xw: tf.Tensor, states: list[tf.Tensor]) -> list[tf.Tensor]:
            return [act(xw + tf.matmul(states[0], rk))]

        return simple

    def _gru_step(self, rk: tf.Tensor) -> Callable:
        cell, units = self.cell, self.units
        act, rec_act = self.act, self.rec_act
        if cell.reset_after:
            rbias = _tf(cell.bias)[1] if cell.use_bias else None

            def gru_after(xw: tf.Tensor, states: list[tf.Tensor]) -> list[tf.Tensor]:
                h = states[0]
                inner = tf.matmul(h, rk)
                if rbias is not None:
                    inner = inner + rbias
                xz, xr, xh = tf.split(xw, 3, axis=1)
                rz, rr, rh = tf.split(inner, 3, axis=1)
                z = rec_act(xz + rz)
                r = rec_act(xr + rr)
                hh = act(xh + r * rh)
                return [z * h + (1 - z) * hh]

            return gru_after
        rk_zr, rk_h = rk[:, : 2 * units], rk[:, 2 * units :]

        def gru_before(xw: tf.Tensor, states: list[tf.Tensor]) -> list[tf.Tensor]:
            h = states[0]
            inner = tf.matmul(h, rk_zr)
            xz, xr, xh = tf.split(xw, 3, axis=1)
            z = rec_act(xz + inner[:, :units])
            r = rec_act(xr + inner[:, units:])
            hh = act(xh + tf.matmul(r * h, rk_h))
            return [z * h + (1 - z) * hh]

        return gru_before

    # ---- the layer ---------------------------------------------------------------------

    def __call__(self, x: tf.Tensor, mask: tf.Tensor | None = None) -> tf.Tensor:
        """One stateful step over every slot (reads and updates the layer's state).

        Args:
            x: ``(slots, T, D)`` float32 (T static: the runner's bucket).
            mask: ``(slots, T)`` bool or None; a False step leaves that row's state as it was.

        Returns:
            ``(slots, T, units)``. Where mask is False the row holds its carried output
            (Keras holds the previous output there too; the runner ignores those steps).
        """
        states = [v.read_value() for v in self.state_vars]
        y, states = self.forward(x, mask, states)
        for var, value in zip(self.state_vars, states, strict=True):
            var.assign(value)
        return y

    def forward(self, x: tf.Tensor, mask: tf.Tensor | None, states: list[tf.Tensor]
                ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """The same step as a pure function of the state (touches no variable).

        Args:
            x: ``(rows, T, D)`` float32; mask: ``(rows, T)`` bool or None.
            states: ``[h]`` or ``[h, c]`` (LSTM), each ``(rows, units)``.

        Returns:
            ``(y (rows, T, units), new states)``.
        """
        x = tf.convert_to_tensor(x, tf.float32)
        steps = x.shape[1]
        if steps is None:
            raise ValueError("FusedRNN needs a static time length (the runner's bucket)")
        xw = self._project(x)
        step = self._step_fn()
        keep = None if mask is None else tf.transpose(tf.cast(mask, tf.bool))[:, :, None]
        if steps <= self.max_unroll and not _in_xla():
            outs = []
            for t in range(steps):
                new = step(xw[t], states)
                if keep is not None:
                    new = [tf.where(keep[t], n, s) for n, s in zip(new, states, strict=True)]
                states = new
                outs.append(states[0])
            return tf.stack(outs, axis=1), states
        return self._loop(xw, keep, states, step, steps)

    def _loop(self, xw: tf.Tensor, keep: tf.Tensor | None, states: list[tf.Tensor],
              step: Callable, steps: int) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """The time loop as a ``tf.while_loop`` (long buckets, and always under XLA)."""
        if keep is None:
            keep = tf.ones(tf.concat([tf.shape(xw)[:2], [1]], 0), tf.bool)
        out = tf.TensorArray(tf.float32, size=steps, element_shape=states[0].shape)

        def body(t, out, *states):
            states = list(states)
            new = step(xw[t], states)
            new = [tf.where(keep[t], n, s) for n, s in zip(new, states, strict=True)]
            return (t + 1, out.write(t, new[0]), *new)

        _, out, *states = tf.while_loop(
            lambda t, *_: t < steps, body, (tf.constant(0), out, *states)
        )
        return tf.transpose(out.stack(), [1, 0, 2]), list(states)


def fuse_layers(
    layers: list[keras.layers.Layer], prefer_cudnn: bool = False
) -> dict[int, FusedRNN]:
    """A :class:`FusedRNN` for each recurrent layer that can run fused, keyed by its index.

    Args:
        layers: the serving clone's layer chain (non-recurrent layers are skipped).
        prefer_cudnn: leave LSTM/GRU layers whose ``use_cudnn`` allows cuDNN to Keras
            (on a GPU, cuDNN beats the unrolled loop).
    """
    fused: dict[int, FusedRNN] = {}
    for i, layer in enumerate(layers):
        if fusable(layer) is not None:
            continue
        if (
            prefer_cudnn
            and isinstance(layer, keras.layers.LSTM | keras.layers.GRU)
            and getattr(layer, "use_cudnn", False) in ("auto", True)
        ):
            continue
        fused[i] = FusedRNN(layer)
    return fused
