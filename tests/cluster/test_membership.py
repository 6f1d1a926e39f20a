"""The router's decisions over plain data (streamrnn.cluster.membership): admission,
liveness, failover planning and adoptions. No sockets, no TensorFlow: milliseconds."""

from __future__ import annotations

import subprocess
import sys

from streamrnn.cluster.membership import HeartbeatVerdict, Membership, Placement
from streamrnn.protocol import ErrorCode


def cluster(*capacities: int, now: float = 0.0) -> Membership:
    """Workers w1, w2, ... with the given room, all heard from at ``now``."""
    m = Membership()
    for i, capacity in enumerate(capacities, 1):
        name = f"w{i}"
        m.join(name, name.encode(), f"tcp://{name}:5555", f"/ckpt/{name}.ckpt", now)
        m.beat(name, {"capacity_left": capacity, "streams": 0, "describe": {"n": i}}, now)
    return m


def test_admission_picks_the_most_room_and_sticks():
    m = cluster(2, 3)
    first = m.place("a")
    assert (first.worker, first.admitted, first.busy, first.refusal) == ("w2", True, False, None)
    assert m.place("b").worker == "w1"  # both have room 2 now: the first wins
    assert m.place("b") == Placement(worker="w1")  # sticky, not admitted again
    assert m.place("a").worker == "w2"
    assert m.assigned == {"a": "w2", "b": "w1"}
    assert [w.room for w in m.members.values()] == [1, 2]


def test_a_heartbeat_replaces_admissions_since_the_last_one():
    m = cluster(1)
    assert m.place("a").worker == "w1"
    assert m.place("b").refusal is not None  # room was 1, one admitted since
    m.beat("w1", {"capacity_left": 1, "streams": 1}, 0.5)  # the worker counts "a" now
    assert m.place("b").worker == "w1"


def test_refusals_say_why():
    code, text = Membership().place("s").refusal
    assert code == ErrorCode.UNAVAILABLE and "no live worker" in text
    m = cluster(0, 0)
    code, text = m.place("s").refusal
    assert code == ErrorCode.ENGINE_FULL and "2 live workers, all full" in text
    assert "s" not in m.assigned


def test_forget_lets_the_next_request_be_admitted_afresh():
    m = cluster(5)
    m.place("s")
    m.forget("s")
    m.forget("never-seen")
    assert m.assigned == {} and m.place("s").admitted


def test_heartbeat_verdicts():
    m = cluster(1)
    assert m.check_heartbeat(b"w1", "w1") is HeartbeatVerdict.BEAT
    assert m.check_heartbeat(b"other", "w2") is HeartbeatVerdict.JOIN
    assert m.check_heartbeat(b"other", "w1") is HeartbeatVerdict.NAME_TAKEN
    m.declare_dead("w1")
    assert m.check_heartbeat(b"w1", "w1") is HeartbeatVerdict.FENCED  # fenced for good
    assert m.check_heartbeat(b"w1", "w9") is HeartbeatVerdict.FENCED
    assert m.check_heartbeat(b"restarted", "w1") is HeartbeatVerdict.REJOIN
    m.join("w1", b"restarted", "tcp://w1:5555", None, 3.0)
    assert m.members["w1"].alive and m.check_heartbeat(b"restarted", "w1") is HeartbeatVerdict.BEAT


def test_silent_workers_at_time_t():
    m = cluster(1, 1, now=0.0)
    m.beat("w2", {"capacity_left": 1}, 0.8)
    assert m.silent(1.0, dead_after_s=1.0) == []  # exactly dead_after_s is not yet silent
    assert [w.name for w in m.silent(1.5, dead_after_s=1.0)] == ["w1"]
    assert [w.name for w in m.silent(2.0, dead_after_s=1.0)] == ["w1", "w2"]
    m.declare_dead("w1")
    assert [w.name for w in m.silent(2.0, dead_after_s=1.0)] == ["w2"]
    assert [w.name for w in m.live()] == ["w2"]


def test_dead_workers_streams_are_busy_until_a_survivor_takes_them():
    m = cluster(4)
    m.place("s")
    m.declare_dead("w1")
    assert m.place("s").busy  # no survivor: waits for its worker
    assert m.place("new").refusal[0] == ErrorCode.UNAVAILABLE
    assert m.orphaned() is None  # no survivor to give them to
    m.join("w2", b"w2", "tcp://w2:5555", None, 1.0)
    m.beat("w2", {"capacity_left": 4}, 1.0)
    assert m.orphaned() == "w1"


def test_failover_plan_splits_checkpointed_streams_among_survivors():
    m = cluster(10, 2, 3)
    for s in ("a", "b", "c", "d", "e"):
        assert m.place(s).worker == "w1"
    m.declare_dead("w1")
    # "x" is in the checkpoint but no longer assigned to w1 (it is taken over too);
    # "e" is not in the checkpoint: it starts over wherever its next request lands
    plan, homeless = m.plan_failover("w1", {"a", "b", "c", "d", "x"})
    assert plan == {"w3": ["a", "c", "x"], "w2": ["b", "d"]}
    assert homeless == []
    assert "e" not in m.assigned
    assert {s: m.assigned[s] for s in "abcdx"} == {"a": "w3", "b": "w2", "c": "w3",
                                                   "d": "w2", "x": "w3"}


def test_failover_without_room_leaves_streams_homeless():
    m = cluster(5, 1)
    m.place("a")
    m.place("b")
    m.declare_dead("w1")
    plan, homeless = m.plan_failover("w1", ["a", "b"])
    assert plan == {"w2": ["a"]} and homeless == ["b"]
    assert "b" not in m.assigned


def test_adoption_lifecycle():
    m = cluster(9, 5)
    for s in ("a", "b"):
        m.place(s)
    m.declare_dead("w1")
    plan, _ = m.plan_failover("w1", {"a", "b"})
    assert plan == {"w2": ["a", "b"]}
    adopt_id = m.start_adoption("w2", ["a", "b"], "w1", now=10.0)
    assert m.place("a").busy and m.moving == {"a": adopt_id, "b": adopt_id}
    assert m.adopting_from("w1") and not m.adopting_from("w2")
    assert m.timed_out(40.0, timeout_s=30.0) == []
    assert m.timed_out(40.5, timeout_s=30.0) == [adopt_id]
    adoption = m.finish_adoption(adopt_id, ["a"])  # "b" could not be adopted
    assert (adoption.worker, adoption.dead, adoption.streams) == ("w2", "w1", ["a", "b"])
    assert m.moving == {} and m.assigned == {"a": "w2"} and not m.adopting_from("w1")
    assert m.finish_adoption(adopt_id, ["a"]) is None  # answered twice: ignored
    assert m.place("a").worker == "w2" and m.place("b").admitted
    assert m.start_adoption("w2", [], "w1", 0.0) == adopt_id + 1  # ids never repeat


def test_stats():
    m = cluster(3, 1)
    m.place("a")
    m.place("b")
    m.declare_dead("w2")
    stats = m.stats()
    assert stats["streams"] == 2 and stats["moving"] == 0
    assert stats["workers"]["w1"] == {"alive": True, "endpoint": "tcp://w1:5555", "streams": 0,
                                      "capacity_left": 3, "assigned": 2}
    assert stats["workers"]["w2"]["alive"] is False
    assert m.members["w1"].describe == {"n": 1}


def test_membership_imports_no_zmq_or_tensorflow():
    code = ("import sys, streamrnn.cluster.membership; "
            "bad = [m for m in ('zmq', 'tensorflow', 'keras') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
