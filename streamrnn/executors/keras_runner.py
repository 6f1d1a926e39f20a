"""The Keras executor (:class:`ModelRunner`): packs chunks into one padded batch and runs
the compiled stateful step of a serving clone.

It meets :class:`~streamrnn.engine.interface.Executor` (``name == "keras"``): the reference
executor and the fallback for any layer the others do not map. Its state rows
(``runner.state``, a :class:`~streamrnn.executors.keras_state.StateBank`) are the serving
clone's own state variables.

Each step takes, for some slots, a chunk of ``t <= bucket`` steps, right-pads it into
``x (slots, bucket, D)`` (or ``(slots, bucket)`` token ids) with ``mask (slots, bucket)``,
and runs the serving model once. Masked steps leave a slot's state unchanged, so idle slots
simply carry their state. The step is a ``tf.function`` traced once per bucket size.

Compact steps: when every recurrent layer is fused and a step has chunks for at most a
quarter (or half) of the slots, only those slots' rows are gathered into a batch of a
quarter (half) of the slots, stepped, and their states scattered back, instead of computing
every row (a masked row costs as much as a busy one). Same outputs; at most two more
traces per bucket.

Example::

    runner = ModelRunner(serving, max_bucket=64)
    out = runner.run({0: chunk_a, 5: chunk_b}, bucket=8)   # {slot: (t, output_dim)}
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from streamrnn.executors.buckets import bucket_sizes
from streamrnn.executors.keras_state import StateBank
from streamrnn.executors.models import ServingModel

__all__ = ["ModelRunner", "gpu_available"]


@functools.cache
def gpu_available() -> bool:
    """Whether TensorFlow sees a GPU (asked once per process)."""
    return bool(tf.config.list_physical_devices("GPU"))


class ModelRunner:
    """The Keras executor: owns the padded input buffers and the compiled step of one
    serving model.

    Args:
        serving: the stateful serving clone (batch == slots).
        max_bucket: longest padded step (a power of two).
        jit_compile: compile with XLA; None: on CPU only.
    """

    #: which executor this is (``Executor.name``)
    name = "keras"

    def __init__(
        self, serving: ServingModel, max_bucket: int = 64, jit_compile: bool | None = None
    ):
        if jit_compile is None:
            jit_compile = not gpu_available()
        self.serving = serving
        self.slots = serving.slots
        self.state = StateBank(serving.state_variables())
        self.max_bucket = max_bucket
        self.buckets = bucket_sizes(max_bucket)
        self.jit_compile = jit_compile
        self.trace_count = 0
        self.steps_run = 0
        self.timesteps_run = 0
        dtype = np.int32 if serving.input_kind == "tokens" else np.float32
        feature_shape = () if serving.input_kind == "tokens" else (serving.input_dim,)
        # One reusable buffer pair per bucket: no allocation on the hot path.
        self._buffers = {
            b: (np.zeros((self.slots, b, *feature_shape), dtype), np.zeros((self.slots, b), bool))
            for b in self.buckets
        }

        def step(x: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
            self.trace_count += 1  # Python side effect: runs once per trace, not per call
            return serving.forward(x, mask)

        self._step = tf.function(step, jit_compile=jit_compile)
        # row buckets of the compact steps (empty: every step computes all slots)
        self.row_buckets = [] if serving.compact_reason() else sorted(
            {r for r in (self.slots // 4, self.slots // 2) if r >= 2})
        self.compact_steps_run = 0

        def compact_step(x: tf.Tensor, mask: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
            self.trace_count += 1
            return serving.forward_rows(x, mask, rows)

        self._compact_steps = {r: tf.function(compact_step, jit_compile=jit_compile)
                               for r in self.row_buckets}
        self._concrete: dict[tuple, tf.types.experimental.ConcreteFunction] = {}
        self._compact_buffers = {
            (r, b): (np.zeros((r, b, *feature_shape), dtype), np.zeros((r, b), bool),
                     np.zeros(r, np.int32))
            for r in self.row_buckets for b in self.buckets
        }

    @property
    def device(self) -> str:
        """``"GPU"`` when TensorFlow sees one (it places the step there), else ``"CPU"``."""
        return "GPU" if gpu_available() else "CPU"

    @property
    def kernel(self) -> str:
        """Which recurrent kernel the step runs, in words."""
        names = sorted({type(layer).__name__ for layer in self.serving.rnn_layers})
        where = self.device
        cudnn = [
            layer.name
            for layer in self.serving.rnn_layers
            if getattr(layer, "use_cudnn", False) in ("auto", True)
            and type(layer).__name__ in ("LSTM", "GRU")
        ]
        impl = "cuDNN-eligible" if where == "GPU" and cudnn else "keras loop"
        fused = getattr(self.serving, "fused_layers", {})
        if fused:  # streamrnn.executors.fused fast path for some or all recurrent layers
            n = len(self.serving.rnn_layers)
            impl = "fused" if len(fused) == n else f"fused {len(fused)}/{n} + {impl}"
        xla = ", XLA" if self.jit_compile else ""
        return f"{'+'.join(names)} {impl} on {where}{xla}"

    def run(self, chunks: Mapping[int, np.ndarray], bucket: int) -> dict[int, np.ndarray]:
        """One batched step.

        Args:
            chunks: slot -> validated chunk ``(t, D)`` float32 or ``(t,)`` int32, ``t <= bucket``.
            bucket: padded length, one of ``self.buckets``.

        Returns:
            slot -> outputs ``(t, output_dim)`` float32 (a copy, safe to keep).
        """
        self.steps_run += 1
        self.timesteps_run += sum(len(c) for c in chunks.values())
        rows = next((r for r in self.row_buckets if len(chunks) <= r), None)
        if rows is not None:
            return self._run_compact(chunks, bucket, rows)
        x, mask = self._buffers[bucket]
        mask[:] = False
        for slot, chunk in chunks.items():
            t = len(chunk)
            x[slot, :t] = chunk
            mask[slot, :t] = True
        y = self._compiled(self._step, x, mask)(x, mask).numpy()
        return {slot: y[slot, : len(chunk)].copy() for slot, chunk in chunks.items()}

    def _run_compact(self, chunks: Mapping[int, np.ndarray], bucket: int, rows: int
                     ) -> dict[int, np.ndarray]:
        """The step on ``rows`` gathered slot rows: the chunks' slots, padded with distinct
        slots that have no chunk (all masked, so their state is written back unchanged)."""
        x, mask, index = self._compact_buffers[(rows, bucket)]
        mask[:] = False
        for i, (slot, chunk) in enumerate(chunks.items()):
            x[i, : len(chunk)] = chunk
            mask[i, : len(chunk)] = True
            index[i] = slot
        if len(chunks) < rows:
            spare = (s for s in range(self.slots) if s not in chunks)
            index[len(chunks):] = [next(spare) for _ in range(rows - len(chunks))]
        y = self._compiled(self._compact_steps[rows], x, mask, index)(x, mask, index).numpy()
        self.compact_steps_run += 1
        return {slot: y[i, : len(chunk)].copy() for i, (slot, chunk) in enumerate(chunks.items())}

    def _compiled(self, step: tf.types.experimental.PolymorphicFunction,
                  *buffers: np.ndarray) -> tf.types.experimental.ConcreteFunction:
        """``step``'s concrete function for arguments shaped like ``buffers`` (traced on
        first use). Calling it directly skips the ``tf.function``'s per-call argument
        matching (measured per step at 16 steps: 1.28x at 1 slot, 1.18x at 8, 1.03-1.13x
        at 64)."""
        key = (id(step), *(b.shape for b in buffers))
        concrete = self._concrete.get(key)
        if concrete is None:
            specs = [tf.TensorSpec(b.shape, tf.as_dtype(b.dtype)) for b in buffers]
            concrete = self._concrete[key] = step.get_concrete_function(*specs)
        return concrete

    def warmup(self) -> None:
        """Trace every bucket once (on an all-masked batch, which changes no state).

        Tracing one bucket after another is what this is for, so TensorFlow's "excessive
        retracing" warning is silenced meanwhile.
        """
        tf_logger = logging.getLogger("tensorflow")
        level = tf_logger.level
        tf_logger.setLevel(logging.ERROR)
        try:
            for b in self.buckets:
                x, mask = self._buffers[b]
                mask[:] = False
                self._compiled(self._step, x, mask)(x, mask)
                for r in self.row_buckets:  # all masked: their states are written unchanged
                    x, mask, index = self._compact_buffers[(r, b)]
                    mask[:] = False
                    index[:] = np.arange(r)
                    self._compiled(self._compact_steps[r], x, mask, index)(x, mask, index)
        finally:
            tf_logger.setLevel(level)
