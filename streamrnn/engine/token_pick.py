"""Token picking in numpy: the twin of :mod:`streamrnn.engine.token_ops` (no TensorFlow).

The executor's generation loop (:mod:`streamrnn.engine.token_loop`) picks its tokens here,
so generation needs no TensorFlow when the engine's executor is ONNX Runtime or torch. The
rules are those of :func:`streamrnn.engine.token_ops.pick_tokens`:

- probabilities become logits as ``log(max(y, 1e-30))`` (float32);
- ``no_zero`` (``Embedding(mask_zero=True)``): id 0 is never picked;
- greedy rows take the argmax of the logits (the first maximum on ties, as ``tf.argmax``);
- sampled rows scale the logits by ``inv_temperature``, keep those ``>=`` the k-th largest
  when ``top_k > 0``, add Gumbel noise ``-log(-log(u))`` and take the argmax.

The noise comes from :func:`hash_uniform`, bit-identical to the TensorFlow one (the same
integer hash on uint64 words masked to 32 bits), so a seed gives the same uniforms in both.
The float steps (``log``, the scaling, the sum) are float32 in both; numpy's and
TensorFlow's ``log`` may differ by an ulp, so two logits within about ``1e-7`` of each other
(a near-tie) may be ordered differently. Away from near-ties the tokens are equal.

Example::

    u = hash_uniform(key, counter, vocab)          # (n, vocab) float32 in (0, 1)
    ids = pick_tokens(y, probs=True, greedy=g, inv_temperature=inv_t, top_k=k,
                      key=key, counter=counter)    # (n,) int32
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from streamrnn.engine.sampling import M32

__all__ = ["hash_uniform", "pick_tokens"]

_M32 = np.uint64(M32)
_S8, _S15, _S16, _S32 = (np.uint64(n) for n in (8, 15, 16, 32))
_C1, _C2 = np.uint64(0x7FEB352D), np.uint64(0x846CA68B)


def _mix32(x: np.ndarray) -> np.ndarray:
    """lowbias32 on uint64 arrays (only the low 32 bits of each product are kept, as in TF,
    where int64 products wrap to the same low bits)."""
    x = x ^ (x >> _S16)
    x = (x * _C1) & _M32
    x = x ^ (x >> _S15)
    x = (x * _C2) & _M32
    return x ^ (x >> _S16)


@lru_cache(maxsize=16)
def _column_hash(width: int) -> np.ndarray:
    """``_mix32(column + 0x9E3779B9)`` for columns ``0 .. width-1``: ``(1, width)``, the
    same for every row and step, so computed once per width."""
    col = np.arange(width, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        out = _mix32(col + np.uint64(0x9E3779B9))
    out.flags.writeable = False
    return out


def hash_uniform(key: np.ndarray, counter: np.ndarray, width: int) -> np.ndarray:
    """Uniform numbers in (0, 1), a pure function of (key, counter, column).

    Args:
        key: ``(n, 2)`` integers (two 32-bit words per row).
        counter: ``(n,)`` non-negative integers, the step index per row.
        width: number of columns.

    Returns:
        ``(n, width)`` float32, bit-identical to :func:`streamrnn.engine.token_ops.hash_uniform`.
    """
    key = np.asarray(key, np.int64).astype(np.uint64)
    counter = np.asarray(counter, np.int64).astype(np.uint64)[:, None]
    k0, k1 = key[:, 0:1], key[:, 1:2]
    with np.errstate(over="ignore"):
        h = _mix32(k0 ^ _mix32(counter & _M32))
        h = _mix32((h + k1) ^ _column_hash(width))
        h = _mix32(h ^ (counter >> _S32))
    return ((h >> _S8).astype(np.float32) + np.float32(0.5)) / np.float32(1 << 24)


def _logits(y: np.ndarray, probs: bool, no_zero: bool) -> np.ndarray:
    y = np.asarray(y, np.float32)
    logits = np.log(np.maximum(y, np.float32(1e-30))) if probs else y.copy()
    if no_zero:
        logits[:, 0] = -np.inf
    return logits


def _keep_top_k(scaled: np.ndarray, top_k: np.ndarray) -> np.ndarray:
    """Entries ``>=`` each row's k-th largest (``k = 0``: all), the rest ``-inf``."""
    vocab = scaled.shape[-1]
    ordered = -np.sort(-scaled, axis=-1)
    k = np.where(top_k > 0, top_k, vocab).astype(np.int64)
    kth = np.take_along_axis(ordered, (k - 1)[:, None], axis=1)
    return np.where(scaled >= kth, scaled, np.float32(-np.inf))


def pick_tokens(
    y: np.ndarray,
    probs: bool,
    greedy: np.ndarray,
    inv_temperature: np.ndarray,
    top_k: np.ndarray,
    key: np.ndarray,
    counter: np.ndarray,
    no_zero: bool = False,
) -> np.ndarray:
    """One token per row: argmax, or a sample of softmax(logits / T) limited to the top k.

    Args:
        y: ``(n, V)`` model outputs (probabilities if ``probs`` else logits).
        greedy: ``(n,)`` bool; inv_temperature ``(n,)`` float32; top_k ``(n,)`` int
            (0 = all); key ``(n, 2)`` int; counter ``(n,)`` int.

    Returns:
        ``(n,)`` int32 token ids.
    """
    logits = _logits(y, probs, no_zero)
    best = np.argmax(logits, axis=-1).astype(np.int32)
    greedy = np.asarray(greedy, bool)
    if greedy.all():  # all-greedy batches skip the sort and the noise
        return best
    scaled = logits * np.asarray(inv_temperature, np.float32)[:, None]
    top_k = np.asarray(top_k)
    if (top_k > 0).any():
        scaled = _keep_top_k(scaled, top_k)
    with np.errstate(divide="ignore"):
        gumbel = -np.log(-np.log(hash_uniform(key, counter, logits.shape[-1])))
    drawn = np.argmax(scaled + gumbel, axis=-1).astype(np.int32)
    return np.where(greedy, best, drawn)
