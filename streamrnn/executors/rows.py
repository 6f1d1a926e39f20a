"""What every executor's state rows share: the snapshot type and the slot-index check.

Pure (numpy only). Each executor keeps its streams' recurrent state as rows of
``(slots, ...)`` arrays (Keras variables, host numpy arrays, device tensors) behind the
:class:`~streamrnn.engine.interface.StateRows` protocol; a :data:`StateSnapshot` is one
slot's rows, one numpy array per state variable (for an LSTM of ``units``:
``[h (units,), c (units,)]``), so a snapshot moves between slots and between executors.

Example::

    idx = slot_indices([3, 5], count=8)        # int32 array([3, 5]); IndexError if out of range
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["StateSnapshot", "slot_indices"]

StateSnapshot = list[np.ndarray]
"""One slot's state: one numpy row per state variable (variable shape without the slot axis)."""


def slot_indices(slots: Sequence[int], count: int, dtype: type = np.int32) -> np.ndarray:
    """``slots`` as a 1-D index array, each checked to be in ``0 .. count-1`` (IndexError)."""
    idx = np.asarray(slots, dtype=dtype).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= count):
        raise IndexError(f"slot index out of range 0..{count - 1}: {slots}")
    return idx
