"""Packing the busy slots' chunks into one right-padded batch (pure: numpy only).

An executor that gathers only the busy rows (ONNX Runtime, torch) steps the slots whose
chunk has at least one step, padded to the longest chunk, and hands back each slot's own
steps. A chunk of length 0 is never stepped (ONNX Runtime returns a wrong state for a row
of length 0) and gets an empty output.

Example::

    batch = pad_chunks({3: a, 7: b}, bucket=16, feature_shape=(5,), dtype=np.float32)
    y = step(batch.x, batch.lengths, batch.slots)   # y (rows, steps, out)
    outputs = batch.outputs(y, out_dim)             # {3: (len(a), out), 7: (len(b), out)}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["PaddedBatch", "pad_chunks"]


@dataclass(frozen=True)
class PaddedBatch:
    """The busy slots' chunks as one batch.

    Attributes:
        slots: the busy slots, in the order of the batch rows.
        lengths: ``(rows,)`` each row's valid steps (all >= 1).
        x: ``(rows, steps, *feature_shape)``, right-padded with zeros (``steps`` is the
            longest chunk; ``rows`` may be 0); ``(steps, rows, *feature_shape)`` when
            ``time_major``.
        idle: slots whose chunk has no steps.
        time_major: the layout of ``x`` and of the ``y`` that :meth:`outputs` takes.
    """

    slots: list[int]
    lengths: np.ndarray
    x: np.ndarray
    idle: list[int]
    time_major: bool = False

    @property
    def steps(self) -> int:
        """Valid steps in all (the timesteps a run computes)."""
        return int(self.lengths.sum())

    def outputs(self, y: np.ndarray | None, out_dim: int) -> dict[int, np.ndarray]:
        """slot -> its own steps of ``y (rows, steps, out_dim)`` (``(steps, rows, out_dim)``
        when ``time_major``), as contiguous copies (a reply cache counts their bytes); ``(0,
        out_dim)`` for idle slots (``y`` may be None when no slot was busy)."""
        out = {s: np.zeros((0, out_dim), np.float32) for s in self.idle}
        if y is not None:
            rows = enumerate(zip(self.slots, self.lengths.tolist(), strict=True))
            if self.time_major:
                out.update({s: y[:n, i].copy() for i, (s, n) in rows})
            else:
                out.update({s: y[i, :n].copy() for i, (s, n) in rows})
        return out


def pad_chunks(chunks: Mapping[int, np.ndarray], bucket: int, feature_shape: tuple[int, ...],
               dtype: type | np.dtype, length_dtype: type | np.dtype = np.int32,
               time_major: bool = False) -> PaddedBatch:
    """Right-pad the non-empty chunks (``(t, *feature_shape)``, ``t <= bucket``) into one
    batch, batch-major or ``time_major``; ValueError if a chunk is longer than ``bucket``."""
    busy = [(s, c) for s, c in chunks.items() if len(c)]
    counts = [len(c) for _, c in busy]  # Python ints: cheaper than numpy for few rows
    lengths = np.array(counts, length_dtype)
    steps = max(counts, default=0)
    if steps > bucket:
        raise ValueError(f"a chunk of {steps} steps does not fit bucket {bucket}")
    idle = [s for s, c in chunks.items() if not len(c)]
    if time_major and busy and min(counts) == steps:  # all full: one C loop
        x = np.stack([c for _, c in busy], axis=1).astype(dtype, copy=False)
    elif time_major:
        x = np.zeros((steps, len(busy), *feature_shape), dtype)
        for i, (_, chunk) in enumerate(busy):
            x[: len(chunk), i] = chunk
    else:
        x = np.zeros((len(busy), steps, *feature_shape), dtype)
        for i, (_, chunk) in enumerate(busy):
            x[i, : len(chunk)] = chunk
    return PaddedBatch([s for s, _ in busy], lengths, x, idle, time_major)
