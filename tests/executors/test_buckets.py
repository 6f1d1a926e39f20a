"""Step planning: buckets and splitting of long chunks (pure logic)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamrnn.executors.buckets import bucket_for, bucket_sizes, plan_steps


def test_bucket_sizes_are_powers_of_two():
    assert bucket_sizes(16) == [1, 2, 4, 8, 16]
    with pytest.raises(ValueError):
        bucket_sizes(12)


def test_bucket_for_rounds_up():
    assert [bucket_for(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError):
        bucket_for(9, 8)


def test_long_chunk_split_in_order():
    plans = plan_steps({"a": 5, "b": 300}, max_bucket=128)
    assert [p.bucket for p in plans] == [128, 128, 64]
    assert plans[0].slices == {"a": (0, 5), "b": (0, 128)}
    assert plans[2].slices == {"b": (256, 300)}


@given(st.dictionaries(st.text(min_size=1, max_size=3), st.integers(1, 200), max_size=8),
       st.sampled_from([1, 4, 16, 64]))
def test_plan_covers_every_step_exactly_once(lengths, max_bucket):
    covered = {s: [] for s in lengths}
    for plan in plan_steps(lengths, max_bucket):
        for s, (a, b) in plan.slices.items():
            assert 1 <= b - a <= plan.bucket <= max_bucket
            covered[s].extend(range(a, b))
    assert covered == {s: list(range(n)) for s, n in lengths.items()}
