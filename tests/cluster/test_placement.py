"""Placement over plain data (streamrnn.cluster.placement): a live holder keeps its stream,
anything else goes to the least-loaded live worker; no live worker is UNAVAILABLE."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

from streamrnn.cluster.placement import Load, Placement, holding_alive
from streamrnn.protocol import ErrorCode


@dataclass(frozen=True)
class Holding:  # the shape of cluster.redis_store.Holding
    worker: str
    token: str
    epoch: int


LIVE = {"w1": Load("t1", capacity_left=4, streams=4),
        "w2": Load("t2", capacity_left=6, streams=2),
        "w3": Load("t3", capacity_left=6, streams=1)}


def test_a_live_holder_keeps_its_stream_even_when_it_is_the_fullest():
    d = Placement().decide("s", Holding("w1", "t1", 7), LIVE, now=0.0)
    assert (d.worker, d.placed, d.refusal) == ("w1", False, None)


def test_new_stream_goes_to_most_room_then_fewest_streams():
    d = Placement().decide("s", None, LIVE, now=0.0)
    assert (d.worker, d.placed) == ("w3", True)  # w2 and w3 both have 6: w3 has fewer streams


def test_dead_or_reincarnated_holder_is_replaced():
    p = Placement()
    assert p.decide("s", Holding("gone", "t9", 3), LIVE, now=0.0).worker == "w3"
    # w1 restarted under the same name: its new token means the old claim is dead
    stale = Holding("w1", "old-token", 3)
    assert not holding_alive(stale, LIVE)
    assert p.decide("s", stale, LIVE, now=0.0).placed
    released = Holding("", "", 4)  # a release empties worker and token, keeps the epoch
    assert p.decide("s", released, LIVE, now=0.0).placed


def test_a_burst_is_spread_until_the_workers_publish_their_load():
    p = Placement(horizon_s=1.0)
    picks = [p.decide(f"s{i}", None, LIVE, now=0.1 * i).worker for i in range(6)]
    # w3 and w2 start with 6 of room, w1 with 4: the burst alternates between those two
    assert picks == ["w3", "w2", "w3", "w2", "w3", "w2"], picks
    assert p.decide("s6", None, LIVE, now=0.6).worker == "w1"  # now w1 has the most room
    assert p.recent("w3", now=0.5) == 3  # placed at 0.0, 0.2 and 0.4
    assert p.recent("w3", now=1.3) == 1  # the first two are past the 1 s horizon
    assert p.recent("w3", now=5.0) == 0  # past the horizon the published load counts again


def test_no_live_worker_is_unavailable_and_a_left_worker_is_forgotten():
    p = Placement()
    d = p.decide("lonely", None, {}, now=0.0)
    assert d.worker is None and d.refusal[0] == ErrorCode.UNAVAILABLE
    assert "no live worker" in d.refusal[1] and "'lonely'" in d.refusal[1]
    p.decide("s", None, LIVE, now=0.0)
    p.forget_worker("w3")
    assert p.recent("w3", now=0.0) == 0


def test_full_workers_still_get_the_request_and_answer_for_themselves():
    full = {"w1": Load("t1", 0, 8), "w2": Load("t2", 0, 9)}
    assert Placement().decide("s", None, full, now=0.0).worker == "w1"


def test_placement_imports_no_zmq_or_tensorflow():
    code = ("import sys, streamrnn.cluster.placement, streamrnn.cluster.holders; "
            "bad = {'zmq', 'tensorflow', 'keras'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
