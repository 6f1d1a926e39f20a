"""The engine's pure parts in milliseconds: feedback and sampling rules, chunk validation,
and residency (slots + host-memory swap) over numpy state rows.

The real paths (a TF serving clone behind them) are covered by test_engine.py,
test_generate.py and test_validation.py; these pin the rules themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from streamrnn.engine.interface import StateRows, StateSnapshot
from streamrnn.engine.residency import Residency
from streamrnn.engine.sampling import (
    check_params,
    choose_feedback,
    seed_of,
    stream_key,
)
from streamrnn.engine.slots import SlotTable
from streamrnn.engine.validation import validate_chunk
from streamrnn.errors import InvalidInputError, UnknownStreamError, UnsupportedModelError
from streamrnn.protocol import MAX_GENERATE_STEPS, ErrorCode


@dataclass
class Dims:
    input_kind: str
    input_dim: int
    output_dim: int


TOKENS = Dims("tokens", 13, 13)
REGRESSION = Dims("features", 3, 3)


def test_default_feedback_rules():
    assert choose_feedback(None, kind="tokens", input_dim=13, output_dim=13,
                           probs=True).mode == "tokens"
    assert choose_feedback(None, kind="features", input_dim=5, output_dim=5,
                           probs=True).mode == "onehot"
    assert choose_feedback(None, kind="features", input_dim=5, output_dim=5,
                           probs=False).mode == "prediction"
    plan = choose_feedback(None, kind="tokens", input_dim=9, output_dim=9, probs=False,
                           no_zero=True)
    assert plan.picks_tokens and plan.no_zero and not plan.probs
    custom = choose_feedback(abs, kind="features", input_dim=2, output_dim=7, probs=False)
    assert custom.mode == "custom" and custom.fn is abs and not custom.picks_tokens


@pytest.mark.parametrize("feedback, kind, din, dout, error", [
    (None, "features", 4, 2, UnsupportedModelError),
    ("tokens", "features", 4, 4, UnsupportedModelError),
    ("onehot", "tokens", 4, 4, UnsupportedModelError),
    ("prediction", "features", 4, 3, UnsupportedModelError),
    ("bogus", "features", 4, 4, InvalidInputError),
])
def test_feedback_rules_that_do_not_fit_are_refused(feedback, kind, din, dout, error):
    with pytest.raises(error):
        choose_feedback(feedback, kind=kind, input_dim=din, output_dim=dout, probs=False,
                        name="m")


def _params(plan_dims=TOKENS, no_zero=False, **overrides):
    plan = choose_feedback(None, kind=plan_dims.input_kind, input_dim=plan_dims.input_dim,
                           output_dim=plan_dims.output_dim,
                           probs=plan_dims.input_kind == "tokens", no_zero=no_zero)
    args = {"steps": 10, "sample": "greedy", "temperature": 1.0, "top_k": None, "seed": 0,
            "end_token": None, **overrides}
    return check_params(plan, plan_dims, **args)


def test_check_params_normalises_good_arguments():
    params = _params(sample="top_k", top_k=np.int64(3), temperature=2, end_token=12)
    assert (params.greedy, params.temperature, params.top_k, params.end_token) == (
        False, 2.0, 3, 12)
    assert _params().end_token == -1 and _params().top_k == 0 and _params().greedy


@pytest.mark.parametrize("overrides, fragment", [
    ({"steps": True}, "steps must be an int"),
    ({"steps": 0}, f"steps must be in 1..{MAX_GENERATE_STEPS}"),
    ({"sample": "beam"}, "sample must be one of"),
    ({"temperature": 0.0}, "temperature must be a finite number > 0"),
    ({"temperature": float("nan")}, "temperature must be a finite number > 0"),
    ({"seed": "x"}, "seed must be an int"),
    ({"sample": "top_k", "top_k": 1.5}, "top_k must be an int or None"),
    ({"sample": "top_k", "top_k": 14}, "top_k must be in 1..13"),
    ({"sample": "top_k"}, "sample='top_k' needs top_k"),
    ({"top_k": 2}, "top_k has no effect with sample='greedy'"),
    ({"end_token": False}, "end_token must be an int or None"),
    ({"end_token": 13}, "end_token must be in 0..12"),
])
def test_check_params_refuses_bad_arguments_with_bad_value(overrides, fragment):
    with pytest.raises(InvalidInputError) as info:
        _params(**overrides)
    assert info.value.code == ErrorCode.BAD_VALUE
    assert fragment in str(info.value)


def test_check_params_rules_of_non_token_models_and_padding_ids():
    with pytest.raises(InvalidInputError, match="needs a token model"):
        _params(REGRESSION, sample="temperature")
    with pytest.raises(InvalidInputError, match="feeds back predictions"):
        _params(REGRESSION, end_token=1)
    with pytest.raises(InvalidInputError, match="padding id"):
        _params(no_zero=True, end_token=0)


def test_seeds_and_stream_keys_are_pure_functions():
    assert seed_of({"a": 7}, "a") == 7 and seed_of({"a": 7}, "b") == 0
    assert seed_of(None, "a") == 0 and seed_of(5, "a") == 5
    assert stream_key(1, "s") == stream_key(1, "s")
    assert stream_key(1, "s") != stream_key(1, "t") != stream_key(2, "t")
    assert all(0 <= w < 1 << 32 for w in stream_key(-1, "s"))


@pytest.mark.parametrize("chunk, kind, code", [
    (np.zeros((3, 2), np.int32), "tokens", ErrorCode.BAD_SHAPE),
    (np.zeros(3, np.float32), "tokens", ErrorCode.BAD_DTYPE),
    (np.zeros(0, np.int32), "tokens", ErrorCode.EMPTY_CHUNK),
    (np.array([0, 4]), "tokens", ErrorCode.BAD_VALUE),
    (np.zeros((3, 5), np.float32), "features", ErrorCode.BAD_SHAPE),
    (np.zeros((3, 4), np.int32), "features", ErrorCode.BAD_DTYPE),
    (np.zeros((9, 4), np.float32), "features", ErrorCode.TOO_LARGE),
    (np.array([[0, np.nan, 0, 0]]), "features", ErrorCode.NON_FINITE),
])
def test_validate_chunk_codes(chunk, kind, code):
    with pytest.raises(InvalidInputError) as info:
        validate_chunk(chunk, input_kind=kind, input_dim=4, max_chunk_steps=8)
    assert info.value.code == code


def test_validate_chunk_normalises():
    ids = validate_chunk(np.array([0, 3], np.int64), input_kind="tokens", input_dim=4,
                         max_chunk_steps=8)
    assert ids.dtype == np.int32
    x = validate_chunk(np.array([[np.inf, 0, 0, 0]]), input_kind="features", input_dim=4,
                       max_chunk_steps=8, allow_nonfinite=True)
    assert x.dtype == np.float32 and np.isinf(x[0, 0])


class HostRows:
    """StateRows over one numpy array ``(slots, 2)`` (initial rows: ones)."""

    def __init__(self, slots: int):
        self.slots = slots
        self.initial_rows: StateSnapshot = [np.ones(2, np.float32)]
        self.rows = np.ones((slots, 2), np.float32)

    def reset(self, slots: Sequence[int]) -> None:
        self.rows[list(slots)] = self.initial_rows[0]

    def read(self, slots: Sequence[int]) -> list[np.ndarray]:
        return [self.rows[list(slots)].copy()]

    def write(self, slots: Sequence[int], rows: Sequence[np.ndarray]) -> None:
        self.rows[list(slots)] = rows[0]

    def snapshot(self, slot: int) -> StateSnapshot:
        return [self.rows[slot].copy()]

    def restore(self, slot: int, snapshot: StateSnapshot) -> None:
        self.rows[slot] = snapshot[0]


def test_residency_swaps_least_recently_used_and_back_with_the_same_rows():
    rows = HostRows(2)
    assert isinstance(rows, StateRows)
    homes = Residency(SlotTable(2), rows, max_streams=3)
    homes.make_resident(["a", "b"])
    rows.rows[homes.table.slot_of("a")] = [1, 10]
    rows.rows[homes.table.slot_of("b")] = [2, 20]
    homes.table.touch("b", 5)  # "a" is now the least recently used
    homes.make_resident(["c"])
    assert homes.streams == ["b", "c", "a"] and homes.swaps_out == 1
    assert homes.capacity_left == 0 and len(homes) == 3
    np.testing.assert_array_equal(homes.snapshot("a")[0], [1, 10])
    np.testing.assert_array_equal(homes.snapshot("c")[0], [1, 1])  # new: initial rows
    homes.make_resident(["a"])  # swaps "b" out (idle since its touch), "a" back in
    assert homes.swaps_in == 1 and "b" not in homes.table
    np.testing.assert_array_equal(rows.rows[homes.table.slot_of("a")], [1, 10])
    states = homes.export_states()
    assert states["b"][1] == 5 and list(states["b"][0][0]) == [2, 20]
    homes.reset("b")
    assert homes.export_states()["b"][1] == 0
    homes.close("b")
    homes.close("c")
    assert homes.streams == ["a"]
    with pytest.raises(UnknownStreamError):
        homes.snapshot("b")
    with pytest.raises(ValueError, match="max_streams"):
        Residency(SlotTable(2), rows, max_streams=1)


def test_residency_imports_into_free_slots_then_parks():
    homes = Residency(SlotTable(1), HostRows(1), max_streams=3)
    homes.import_states({"a": ([np.array([3, 3], np.float32)], 4),
                         "b": ([np.array([4, 4], np.float32)], 6)})
    assert "a" in homes.table and "b" in homes.parked
    assert homes.export_states()["b"][1] == 6
    np.testing.assert_array_equal(homes.snapshot("a")[0], [3, 3])
