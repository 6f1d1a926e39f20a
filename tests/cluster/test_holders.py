"""A router's view of Redis (streamrnn.cluster.holders) over a store played by plain data:
cache fill from holders and placement, claim notices, workers leaving, NOT_HOLDER forget,
the cache bound. The real store is exercised in test_router.py."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest

from streamrnn.cluster.holders import HolderView, Unroutable
from streamrnn.protocol import ErrorCode


@dataclass(frozen=True)
class Info:
    name: str
    token: str
    capacity_left: int = 4
    streams: int = 0
    endpoint: str = "tcp://127.0.0.1:1"
    curve_public: str = ""
    describe: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Holding:
    worker: str
    token: str
    epoch: int


class Store:
    def __init__(self):
        self.live = {"w1": Info("w1", "a", capacity_left=2), "w2": Info("w2", "b")}
        self.held: dict[str, Holding] = {}
        self.reads = 0
        self.on_claim = None

    def live_workers(self):
        return dict(self.live)

    def holder(self, stream):
        self.reads += 1
        return self.held.get(stream)

    def holders(self, streams):
        self.reads += 1
        return {s: self.held.get(s) for s in streams}

    def watch(self, on_claim):
        self.on_claim = on_claim
        return lambda: None


@pytest.fixture
def own():
    store = Store()
    holders = HolderView(store, Counter(), refresh_s=60)
    holders.start()
    yield holders
    holders.stop()


def test_a_miss_reads_the_holder_once_then_the_cache_answers(own):
    own.store.held["s"] = Holding("w1", "a", 3)
    assert own.route("s") == "w1" and own.route("s") == "w1"
    assert own.store.reads == 1 and own.assigned_to("w1") == 1
    assert own.route("new") == "w2"  # no holder: the most room
    assert own.counts["placed"] == 1


def test_claim_notice_moves_a_stream_and_a_left_worker_drops_its_streams(own):
    own.store.held["s"] = Holding("w1", "a", 3)
    own.route("s")
    own.store.on_claim("s", "w2", 4)
    assert own.poll() == [] and own.route("s") == "w2"
    del own.store.live["w2"]
    own._read_live()
    assert own.poll() == ["w2"] and own.cached == 0
    own.store.held["s"] = Holding("w2", "b", 4)  # its holder's lease is gone: re-placed
    assert own.route("s") == "w1"


def test_forget_and_prefetch_and_no_live_worker(own):
    own.store.held.update(a=Holding("w1", "a", 1), b=Holding("w2", "b", 1))
    own.prefetch(["a", "b", "a"])
    assert own.store.reads == 1 and own.cached == 2
    own.forget("a")
    assert own.cached == 1
    own.store.live.clear()
    own._read_live()
    own.poll()
    with pytest.raises(Unroutable) as info:
        own.route("c")
    assert info.value.code == ErrorCode.UNAVAILABLE


def test_the_cache_is_bounded():
    store = Store()
    own = HolderView(store, Counter(), refresh_s=60, max_cached=3)
    own.start()
    try:
        for i in range(4):
            own.route(f"s{i}")
        assert own.cached == 1 and own.counts["cache_cleared"] == 1
    finally:
        own.stop()
