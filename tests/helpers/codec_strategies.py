"""Hypothesis strategies for fuzzing the codec (shared by test_codec and test_batch)."""

from __future__ import annotations

import msgpack
from hypothesis import strategies as st

HEADER_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                               max_size=4),
    max_leaves=12,
)
FIELD_NAMES = st.sampled_from(["v", "rid", "stream", "seq", "arrays", "steps", "versions",
                               "sample", "top_k", "dtype", "shape", "frame", "chunk"])
DESCRIPTOR = st.fixed_dictionaries({
    "dtype": st.sampled_from(["float32", "int32", "float64", "uint8", "complex64", "x"])
    | HEADER_VALUES,
    "shape": st.lists(st.integers(-2, 6), max_size=5) | HEADER_VALUES,
    "frame": st.integers(-1, 3) | HEADER_VALUES,
})
STRUCTURED_HEADER = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 2, True, "1"]), "stream": st.sampled_from(["s", "", 5]),
     "seq": st.sampled_from([0, 1, -1, 2**63, None])},
    optional={"rid": st.integers(-1, 2**64), "steps": st.integers(-1, 10),
              "arrays": st.dictionaries(st.sampled_from(["chunk", "prompt", "x"]), DESCRIPTOR,
                                        max_size=3)},
).flatmap(lambda h: st.dictionaries(FIELD_NAMES, HEADER_VALUES, max_size=3).map(
    lambda extra: {**extra, **h}))


def encoded(header: dict) -> bytes:
    """msgpack of ``header``, or an invalid byte when msgpack cannot pack it."""
    try:
        return msgpack.packb(header, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return b"\xc1"
