"""Checking training inputs and targets against a :class:`~streamrnn.training.chain.TrainingChain`.

Every check raises :class:`~streamrnn.errors.InvalidInputError` with a wire error code
(BAD_SHAPE, BAD_DTYPE, BAD_VALUE, NON_FINITE) and returns the array in the dtype the
compiled graph takes: inputs ``[B,] T, D`` float32 or ``[B,] T`` int32 token ids; targets
``[B,] T, output_dim`` float32, or ``[B,] T`` int32 ids for a ``sparse_ce`` loss.

Example::

    x = check_inputs(chain, np.zeros((12, 2), np.float64), batched=False)   # float32
    check_inputs(chain, np.zeros((12, 3)), batched=False)   # InvalidInputError BAD_SHAPE
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamrnn.errors import InvalidInputError
from streamrnn.protocol import ErrorCode
from streamrnn.training.chain import TrainingChain

__all__ = ["check_batch", "check_inputs", "check_targets"]


def check_inputs(chain: TrainingChain, x: np.ndarray, batched: bool) -> np.ndarray:
    """Validate inputs (``[B,] T, D`` float or ``[B,] T`` int ids); InvalidInputError."""
    rank = (1 if chain.input_kind == "tokens" else 2) + int(batched)
    if x.ndim != rank or (chain.input_kind == "features" and x.shape[-1] != chain.input_dim):
        want = "[T]" if chain.input_kind == "tokens" else f"[T, {chain.input_dim}]"
        raise InvalidInputError(
            f"inputs must be {'[B, ' + want[1:] if batched else want}, got shape {x.shape}",
            ErrorCode.BAD_SHAPE,
        )
    if chain.input_kind == "tokens":
        if x.dtype.kind not in "iu":
            raise InvalidInputError(f"token inputs need an integer dtype, got {x.dtype}",
                                    ErrorCode.BAD_DTYPE)
        if x.size and (x.min() < 0 or x.max() >= chain.input_dim):
            raise InvalidInputError(
                f"token ids must be in 0..{chain.input_dim - 1}", ErrorCode.BAD_VALUE
            )
        return x.astype(np.int32, copy=False)
    if x.dtype.kind != "f":
        raise InvalidInputError(f"feature inputs need a float dtype, got {x.dtype}",
                                ErrorCode.BAD_DTYPE)
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise InvalidInputError("inputs contain NaN or Inf", ErrorCode.NON_FINITE)
    return x


def check_targets(chain: TrainingChain, y: np.ndarray, batched: bool) -> np.ndarray:
    """Validate targets (``[B,] T`` int ids or ``[B,] T, out`` float); InvalidInputError."""
    if chain.loss_name == "sparse_ce":
        if y.ndim != 1 + int(batched) or y.dtype.kind not in "iu":
            raise InvalidInputError(
                f"targets must be int token ids [{'B, ' if batched else ''}T], got "
                f"{y.dtype} {y.shape}", ErrorCode.BAD_SHAPE,
            )
        if y.size and (y.min() < 0 or y.max() >= chain.output_dim):
            raise InvalidInputError(f"target ids must be in 0..{chain.output_dim - 1}",
                                    ErrorCode.BAD_VALUE)
        return y.astype(np.int32, copy=False)
    if y.ndim != 2 + int(batched) or y.shape[-1] != chain.output_dim or y.dtype.kind != "f":
        raise InvalidInputError(
            f"targets must be float [{'B, ' if batched else ''}T, {chain.output_dim}], got "
            f"{y.dtype} {y.shape}", ErrorCode.BAD_SHAPE,
        )
    if not np.isfinite(y).all():
        raise InvalidInputError("targets contain NaN or Inf", ErrorCode.NON_FINITE)
    return y.astype(np.float32, copy=False)


def check_batch(chain: TrainingChain, slots: int, x: Any, target: Any, mask: Any | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate a full batch (row i = slot i): ``(x, target, mask)`` with the mask
    ``(slots, T)`` bool (all valid when None)."""
    x = check_inputs(chain, np.asarray(x), batched=True)
    target = check_targets(chain, np.asarray(target), batched=True)
    if x.shape[0] != slots:
        raise InvalidInputError(f"batch has {x.shape[0]} rows, trainer has {slots} "
                                "slots", ErrorCode.BAD_SHAPE)
    if target.shape[:2] != x.shape[:2]:
        raise InvalidInputError(f"targets {target.shape} do not match inputs {x.shape}",
                                ErrorCode.BAD_SHAPE)
    mask = np.ones(x.shape[:2], bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != x.shape[:2]:
        raise InvalidInputError(f"mask {mask.shape} does not match inputs {x.shape[:2]}",
                                ErrorCode.BAD_SHAPE)
    return x, target, mask
