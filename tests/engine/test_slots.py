"""SlotTable: pure book-keeping, no TensorFlow."""

import pytest

from streamrnn.engine.slots import SlotTable
from streamrnn.errors import EngineFullError, UnknownStreamError


def test_acquire_hands_out_lowest_free_slot_and_is_idempotent():
    table = SlotTable(3)
    assert [table.acquire(s) for s in "abc"] == [0, 1, 2]
    assert table.acquire("b") == 1
    assert table.free == 0 and len(table) == 3


def test_release_returns_slot_to_free_list_without_compacting():
    table = SlotTable(3)
    for s in "abc":
        table.acquire(s)
    assert table.release("a") == 0
    assert table.slot_of("c") == 2  # others keep their rows
    assert table.acquire("d") == 0


def test_full_table_raises_error_naming_the_limit():
    table = SlotTable(2)
    table.acquire("a")
    table.acquire("b")
    with pytest.raises(EngineFullError, match="all 2 slots"):
        table.acquire("c")
    assert "c" not in table


def test_unknown_stream_is_a_clear_error():
    table = SlotTable(1)
    with pytest.raises(UnknownStreamError, match="'nope'"):
        table.release("nope")
    with pytest.raises(UnknownStreamError):
        table.slot_of("nope")


def test_touch_counts_steps():
    table = SlotTable(1)
    table.acquire("a")
    table.touch("a", 5)
    table.touch("a", 2)
    assert table.info("a").steps == 7


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        SlotTable(0)
