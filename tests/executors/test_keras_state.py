"""StateBank: per-row reset/read/write/snapshot of real Keras state variables."""

import numpy as np
import pytest

from streamrnn.engine.state import StateBank
from streamrnn.executors.models import build_serving_model
from tests.helpers.modelzoo import ModelSpec, build_model


@pytest.fixture(scope="module")
def bank():
    serving = build_serving_model(build_model(ModelSpec("lstm", layers=2, units=4)), slots=5)
    return StateBank(serving.state_variables())


def test_bank_covers_every_state_variable(bank):
    assert len(bank.variables) == 4  # (h, c) x 2 layers
    assert bank.slots == 5
    assert bank.nbytes_per_slot == 4 * 4 * 4


def test_write_read_roundtrip_touches_only_given_rows(bank):
    rng = np.random.default_rng(0)
    everything = [rng.standard_normal((5, 4)).astype(np.float32) for _ in bank.variables]
    bank.write(range(5), everything)
    new = [rng.standard_normal((2, 4)).astype(np.float32) for _ in bank.variables]
    bank.write([1, 3], new)
    got = bank.read(range(5))
    for full, rows, g in zip(everything, new, got, strict=True):
        np.testing.assert_array_equal(g[[0, 2, 4]], full[[0, 2, 4]])
        np.testing.assert_array_equal(g[[1, 3]], rows)


def test_reset_zeroes_only_the_given_slot(bank):
    rng = np.random.default_rng(1)
    bank.write(range(5), [rng.standard_normal((5, 4)).astype(np.float32) for _ in bank.variables])
    before = bank.read(range(5))
    bank.reset([2])
    after = bank.read(range(5))
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a[2], 0)
        np.testing.assert_array_equal(np.delete(a, 2, 0), np.delete(b, 2, 0))


def test_snapshot_restore_copies_state_between_slots(bank):
    rng = np.random.default_rng(2)
    bank.write(range(5), [rng.standard_normal((5, 4)).astype(np.float32) for _ in bank.variables])
    snap = bank.snapshot(0)
    bank.restore(4, snap)
    for row, var in zip(snap, bank.read([4]), strict=True):
        np.testing.assert_array_equal(var[0], row)


def test_bad_rows_are_refused(bank):
    with pytest.raises(ValueError, match="shape"):
        bank.write([0], [np.zeros((1, 3), np.float32)] * 4)
    with pytest.raises(IndexError):
        bank.reset([5])
