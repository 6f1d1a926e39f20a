"""Chunk validation: the checks every chunk passes before it may touch a stream's state.

Pure (numpy only, no TensorFlow). A chunk is ``(T, D)`` float features or ``(T,)`` integer
token ids; it comes back normalised (float32 or int32) or an
:class:`~streamrnn.InvalidInputError` with an :class:`~streamrnn.protocol.ErrorCode` says
what is wrong: ``BAD_SHAPE``, ``BAD_DTYPE``, ``EMPTY_CHUNK``, ``TOO_LARGE``, ``BAD_VALUE``
(a token id outside the vocabulary) or ``NON_FINITE`` (NaN/Inf, unless allowed).

Example::

    x = validate_chunk(chunk, input_kind="features", input_dim=3,
                       max_chunk_steps=1 << 20, allow_nonfinite=False)   # (T, 3) float32
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamrnn.errors import InvalidInputError
from streamrnn.protocol import ErrorCode

__all__ = ["validate_chunk"]


def validate_chunk(
    chunk: Any, *, input_kind: str, input_dim: int, max_chunk_steps: int,
    allow_nonfinite: bool = False,
) -> np.ndarray:
    """Check ``chunk`` and return it normalised: float32 ``(T, D)`` or int32 ``(T,)``.

    Args:
        input_kind: ``"tokens"`` (ids ``(T,)`` in ``0..input_dim-1``) or ``"features"``
            (``(T, input_dim)`` floats).
        max_chunk_steps: the most steps one chunk may have.
        allow_nonfinite: accept NaN/Inf in feature chunks.

    Raises:
        InvalidInputError: with the ErrorCode of the first problem found.
    """
    arr = np.asarray(chunk)
    if input_kind == "tokens":
        _check_token_form(arr)
    else:
        _check_feature_form(arr, input_dim)
    if arr.shape[0] == 0:
        raise InvalidInputError("empty chunk (T = 0)", ErrorCode.EMPTY_CHUNK)
    if arr.shape[0] > max_chunk_steps:
        raise InvalidInputError(
            f"chunk of {arr.shape[0]} steps exceeds the limit of {max_chunk_steps}",
            ErrorCode.TOO_LARGE,
        )
    if input_kind == "tokens":
        return _token_ids(arr, input_dim)
    return _features(arr, allow_nonfinite)


def _check_token_form(arr: np.ndarray) -> None:
    if arr.ndim != 1:
        raise InvalidInputError(
            f"token chunks must be 1-D [T] int ids, got shape {arr.shape}",
            ErrorCode.BAD_SHAPE,
        )
    if arr.dtype.kind not in "iu":
        raise InvalidInputError(
            f"token chunks must have an integer dtype, got {arr.dtype}", ErrorCode.BAD_DTYPE
        )


def _check_feature_form(arr: np.ndarray, input_dim: int) -> None:
    if arr.ndim != 2 or arr.shape[1] != input_dim:
        raise InvalidInputError(
            f"feature chunks must be [T, {input_dim}], got shape {arr.shape}",
            ErrorCode.BAD_SHAPE,
        )
    if arr.dtype.kind != "f":
        raise InvalidInputError(
            f"feature chunks must have a float dtype, got {arr.dtype}", ErrorCode.BAD_DTYPE
        )


def _token_ids(arr: np.ndarray, input_dim: int) -> np.ndarray:
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high >= input_dim:
        raise InvalidInputError(
            f"token ids must be in 0..{input_dim - 1}, got {low}..{high}",
            ErrorCode.BAD_VALUE,
        )
    return arr.astype(np.int32, copy=False)


def _features(arr: np.ndarray, allow_nonfinite: bool) -> np.ndarray:
    arr = arr.astype(np.float32, copy=False)
    if not allow_nonfinite and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise InvalidInputError(
            f"chunk contains NaN or Inf (first at step {bad}); "
            "build the engine with allow_nonfinite=True to accept them",
            ErrorCode.NON_FINITE,
        )
    return arr
