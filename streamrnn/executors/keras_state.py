"""StateBank: the Keras executor's state rows, every recurrent state variable of a
serving model, slot by slot.

A serving model holds its recurrent state in variables of shape ``(slots, ...)`` (for an
LSTM: ``h`` and ``c``, each ``(slots, units)``; stacked cells nest them). Slot ``i`` is row
``i`` of every one of them. Keras' own ``reset_state()`` zeroes all rows, so per-slot reset,
read, write, snapshot and restore live here, each as one compiled scatter/gather. It meets
:class:`~streamrnn.engine.interface.StateRows`; the Keras executor
(:class:`~streamrnn.executors.keras_runner.ModelRunner`) owns one as its ``state``.

Example::

    bank = StateBank(serving.state_variables())
    bank.reset([3, 5])              # slots 3 and 5 back to the initial state
    snap = bank.snapshot(3)         # list of numpy rows, one per state variable
    bank.restore(7, snap)           # slot 7 now continues where slot 3 was
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from streamrnn.executors.rows import StateSnapshot, slot_indices

__all__ = ["StateBank"]


class StateBank:
    """Row-wise read/write/reset/snapshot of a list of ``(slots, ...)`` variables.

    The rows live in the serving clone's own state variables.
    """

    def __init__(self, variables: Sequence[tf.Variable]):
        if not variables:
            raise ValueError("StateBank needs at least one state variable")
        self.variables = list(variables)
        self.slots = int(self.variables[0].shape[0])
        for v in self.variables:
            if int(v.shape[0]) != self.slots:
                raise ValueError(f"state variable {v.name} has {v.shape[0]} rows, not {self.slots}")
        # The initial state of a slot: what the variables hold right after build (zeros for
        # the standard cells, whatever get_initial_state() gives for custom ones).
        self.initial_rows: StateSnapshot = [v.numpy()[0].copy() for v in self.variables]
        initial = [tf.constant(r) for r in self.initial_rows]

        @tf.function(reduce_retracing=True)
        def _reset(indices: tf.Tensor) -> None:
            n = tf.shape(indices)[0]
            for var, row in zip(self.variables, initial, strict=True):
                rows = tf.broadcast_to(row, tf.concat([[n], tf.shape(row)], 0))
                var.scatter_nd_update(indices[:, None], rows)

        @tf.function(reduce_retracing=True)
        def _write(indices: tf.Tensor, rows: list[tf.Tensor]) -> None:
            for var, r in zip(self.variables, rows, strict=True):
                var.scatter_nd_update(indices[:, None], r)

        @tf.function(reduce_retracing=True)
        def _read(indices: tf.Tensor) -> list[tf.Tensor]:
            return [tf.gather(var, indices) for var in self.variables]

        self._reset_fn, self._write_fn, self._read_fn = _reset, _write, _read

    @property
    def nbytes_per_slot(self) -> int:
        return sum(r.nbytes for r in self.initial_rows)

    def _indices(self, slots: Sequence[int]) -> tf.Tensor:
        return tf.constant(slot_indices(slots, self.slots))

    def reset(self, slots: Sequence[int]) -> None:
        """Put ``slots`` back to the initial state; every other row is untouched."""
        if len(slots):
            self._reset_fn(self._indices(slots))

    def read(self, slots: Sequence[int]) -> list[np.ndarray]:
        """State rows of ``slots``: one array ``(len(slots), ...)`` per variable."""
        return [t.numpy() for t in self._read_fn(self._indices(slots))]

    def write(self, slots: Sequence[int], rows: Sequence[np.ndarray]) -> None:
        """Overwrite the state rows of ``slots`` (``rows[k]`` is ``(len(slots), ...)``)."""
        if len(rows) != len(self.variables):
            raise ValueError(f"expected {len(self.variables)} state arrays, got {len(rows)}")
        tensors = []
        for var, r in zip(self.variables, rows, strict=True):
            r = np.asarray(r, dtype=var.dtype.as_numpy_dtype)
            if r.shape != (len(slots), *var.shape[1:]):
                raise ValueError(
                    f"state rows for {var.name} have shape {r.shape}, expected "
                    f"{(len(slots), *var.shape[1:])}"
                )
            tensors.append(tf.constant(r))
        if len(slots):
            self._write_fn(self._indices(slots), tensors)

    def snapshot(self, slot: int) -> StateSnapshot:
        """A copy of one slot's state, one numpy row per variable."""
        return [a[0] for a in self.read([slot])]

    def restore(self, slot: int, snapshot: StateSnapshot) -> None:
        """Make ``slot`` continue from ``snapshot`` (taken from any slot of the same model)."""
        self.write([slot], [np.asarray(r)[None] for r in snapshot])
