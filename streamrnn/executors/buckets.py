"""Pure step planning: which slice of which chunk goes into each batched step.

No TensorFlow. Chunk lengths are padded up to a bucket (a power of two up to
``max_bucket``) so the compiled step sees a handful of shapes; chunks longer than
``max_bucket`` are split across consecutive steps, in order.

Example::

    plan_steps({"a": 5, "b": 300}, max_bucket=128)
    # -> 3 steps: T=128 {a: 0..5, b: 0..128}, T=128 {b: 128..256}, T=64 {b: 256..300}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["StepPlan", "bucket_for", "bucket_sizes", "plan_steps"]


def bucket_sizes(max_bucket: int) -> list[int]:
    """Powers of two ``1, 2, 4, ...`` up to and including ``max_bucket`` (itself a power of 2)."""
    if max_bucket < 1 or max_bucket & (max_bucket - 1):
        raise ValueError(f"max_bucket must be a power of two >= 1, got {max_bucket}")
    return [1 << k for k in range(max_bucket.bit_length())]


def bucket_for(length: int, max_bucket: int) -> int:
    """Smallest power of two >= ``length`` (``length`` must be <= ``max_bucket``)."""
    if not 1 <= length <= max_bucket:
        raise ValueError(f"length {length} outside 1..{max_bucket}")
    return 1 << (length - 1).bit_length()


@dataclass(frozen=True)
class StepPlan:
    """One batched step: padded length ``bucket`` and each stream's ``[start, stop)`` slice."""

    bucket: int
    slices: dict[str, tuple[int, int]]


def plan_steps(lengths: Mapping[str, int], max_bucket: int) -> list[StepPlan]:
    """Split chunks of the given lengths into batched steps of at most ``max_bucket`` steps."""
    plans: list[StepPlan] = []
    offset = 0
    longest = max(lengths.values(), default=0)
    while offset < longest:
        slices = {
            s: (offset, min(n, offset + max_bucket)) for s, n in lengths.items() if n > offset
        }
        widest = max(stop - start for start, stop in slices.values())
        plans.append(StepPlan(bucket_for(widest, max_bucket), slices))
        offset += max_bucket
    return plans
