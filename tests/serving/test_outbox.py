"""What the worker's two threads share: the WorkQueue of requests (pure logic, plus one real
producer/consumer pair of threads) and freeze_heap."""

from __future__ import annotations

import gc
import sys
import threading
import time

from streamrnn.serving.outbox import WorkQueue
from streamrnn.serving.worker import freeze_heap


def test_room_put_many_and_take_keep_order_and_bound():
    q = WorkQueue(maxsize=5)
    assert (q.room(), q.qsize(), q.empty()) == (5, 0, True)
    q.put_many(["a", "b", "c"])  # WorkQueue holds anything; the worker puts Work
    assert (q.room(), q.qsize(), q.empty()) == (2, 3, False)
    assert q.take(2) == ["a", "b"]
    assert q.room() == 4
    q.put_many([])  # nothing to add: no wake-up either
    assert q.take(10) == ["c"]
    assert q.take(10) == [] and q.room() == 5


def test_take_waits_for_the_first_request_or_the_timeout():
    q = WorkQueue(maxsize=5)
    start = time.monotonic()
    assert q.take(3, timeout=0.05) == []
    assert time.monotonic() - start >= 0.04
    threading.Timer(0.05, q.put_many, [["x", "y"]]).start()
    assert q.take(3, timeout=5.0) == ["x", "y"]  # woken by put_many, not by the timeout


def test_unbounded_when_maxsize_is_not_positive():
    assert WorkQueue(0).room() == WorkQueue(-1).room() == sys.maxsize


def test_one_producer_one_consumer_get_everything_in_order():
    q = WorkQueue(maxsize=64)
    items = list(range(5000))
    got: list[int] = []

    def consume() -> None:
        while len(got) < len(items):
            got.extend(q.take(17, timeout=1.0))

    consumer = threading.Thread(target=consume)
    consumer.start()
    sent = 0
    while sent < len(items):  # as the I/O thread does: never more than the room
        n = min(q.room(), 7, len(items) - sent)
        q.put_many(items[sent:sent + n])
        sent += n
        assert q.qsize() <= 64
    consumer.join(10)
    assert got == items


def test_freeze_heap_moves_the_live_objects_out_of_the_collectors_view():
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
