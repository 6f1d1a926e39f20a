"""Token picking in TensorFlow ops: traced into the generation loop and the trainer's graph.

Sampling uses Gumbel-max with a counter-based hash (pure integer ops, no RNG state): the
noise of row ``i`` at step ``n`` is a pure function of ``(key[i], n, column)``, so a
stream's samples do not depend on its slot or on the other rows of the batch. The keys come
from :func:`streamrnn.engine.sampling.stream_key`.

Example::

    u = hash_uniform(key, counter, vocab)          # (n, vocab) float32 in (0, 1)
    ids = pick_tokens(y, probs=True, greedy=g, inv_temperature=inv_t, top_k=k,
                      key=key, counter=counter)    # (n,) int32
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from streamrnn.engine.sampling import M32

__all__ = ["hash_uniform", "pick_tokens"]


def _mix32(x: tf.Tensor) -> tf.Tensor:
    """A 32-bit integer finaliser (lowbias32) on int64 tensors holding values < 2**32."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = tf.bitwise.bitwise_and(x * 0x7FEB352D, M32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = tf.bitwise.bitwise_and(x * 0x846CA68B, M32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def hash_uniform(key: tf.Tensor, counter: tf.Tensor, width: int) -> tf.Tensor:
    """Uniform numbers in (0, 1), a pure function of (key, counter, column).

    Args:
        key: ``(n, 2)`` int64 (two 32-bit words per row).
        counter: ``(n,)`` int64 step index per row.
        width: number of columns.

    Returns:
        ``(n, width)`` float32.
    """
    col = tf.range(width, dtype=tf.int64)[None, :]
    k0, k1 = key[:, 0:1], key[:, 1:2]
    h = _mix32(tf.bitwise.bitwise_xor(k0, _mix32(tf.bitwise.bitwise_and(counter[:, None], M32))))
    h = _mix32(tf.bitwise.bitwise_xor(h + k1, _mix32(col + 0x9E3779B9)))
    h = _mix32(tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(counter[:, None], 32)))
    return (tf.cast(tf.bitwise.right_shift(h, 8), tf.float32) + 0.5) / float(1 << 24)


def pick_tokens(
    y: tf.Tensor,
    probs: bool,
    greedy: tf.Tensor,
    inv_temperature: tf.Tensor,
    top_k: tf.Tensor,
    key: tf.Tensor,
    counter: tf.Tensor,
    no_zero: bool = False,
) -> tf.Tensor:
    """One token per row: argmax, or a sample of softmax(logits / T) limited to the top k.

    Args:
        y: ``(n, V)`` model outputs (probabilities if ``probs`` else logits).
        greedy: ``(n,)`` bool; inv_temperature ``(n,)`` float32; top_k ``(n,)`` int32
            (0 = all); key ``(n, 2)`` int64; counter ``(n,)`` int64.

    Returns:
        ``(n,)`` int32 token ids.
    """
    vocab = y.shape[-1]
    logits = tf.math.log(tf.maximum(y, 1e-30)) if probs else y
    if no_zero:
        logits = tf.concat([tf.fill([tf.shape(logits)[0], 1], -np.inf), logits[:, 1:]], -1)
    best = tf.argmax(logits, axis=-1, output_type=tf.int32)

    def drawn() -> tf.Tensor:
        scaled = logits * inv_temperature[:, None]

        def keep_top_k() -> tf.Tensor:
            ordered = tf.sort(scaled, axis=-1, direction="DESCENDING")
            k = tf.where(top_k > 0, top_k, vocab)
            kth = tf.gather(ordered, k - 1, axis=1, batch_dims=1)
            return tf.where(scaled >= kth[:, None], scaled, -np.inf)

        scaled = tf.cond(tf.reduce_any(top_k > 0), keep_top_k, lambda: scaled)
        gumbel = -tf.math.log(-tf.math.log(hash_uniform(key, counter, vocab)))
        return tf.where(greedy, best, tf.argmax(scaled + gumbel, axis=-1, output_type=tf.int32))

    # all-greedy batches skip the sort and the noise
    return tf.cond(tf.reduce_all(greedy), lambda: best, drawn)
