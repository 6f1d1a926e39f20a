"""RedisStore against a real ``redis-server`` (the session's, tests/helpers/redis_server.py):
leases (register, renew, expiry, name taken), claims (compare-and-set, epochs), fencing
(a zombie's late save refused), pipelined saves, release, claim notices, the LeaseKeeper,
ACL users, and one 3-master Redis Cluster proving the hash-tag rule."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from streamrnn.cluster.lease import LeaseKeeper
from streamrnn.cluster.redis_scripts import CLOSED_TTL_MS
from streamrnn.cluster.redis_store import Claimed, Holding, RedisStore, WorkerInfo
from streamrnn.errors import NameTakenError, StoreError

# short leases (ms), long enough that a loaded 2-core machine does not lose one by a stall
TTL = 500
PAST_TTL = TTL / 1000 + 0.15
INFO = {"endpoint": "tcp://10.0.0.5:5555", "curve_public": "", "capacity_left": 12,
        "streams": 3, "describe": {"model": "lstm", "units": 8}}


def _token() -> str:
    return uuid.uuid4().hex


def _wait(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# -- worker leases -----------------------------------------------------------------------


def test_register_publishes_the_worker_and_renew_refreshes_its_info(redis_store):
    token = _token()
    redis_store.register("w1", token, 2000, INFO)
    live = redis_store.live_workers()
    assert live == {"w1": WorkerInfo("w1", token, "tcp://10.0.0.5:5555", "", 12, 3,
                                     {"model": "lstm", "units": 8})}
    assert redis_store.lease_alive("w1", token)
    assert not redis_store.lease_alive("w1", _token())
    assert redis_store.renew("w1", token, 2000, {**INFO, "capacity_left": 7})
    assert redis_store.live_workers()["w1"].capacity_left == 7


def test_a_lease_expires_and_cannot_be_renewed_afterwards(redis_store):
    token = _token()
    redis_store.register("w1", token, TTL, INFO)
    assert redis_store.renew("w1", token, TTL, INFO)
    assert "w1" in redis_store.live_workers()
    time.sleep(PAST_TTL)
    assert redis_store.live_workers() == {}
    assert not redis_store.lease_alive("w1", token)
    assert not redis_store.renew("w1", token, TTL, INFO)  # expired: the worker must fence


def test_a_live_name_is_taken_until_its_lease_expires_or_is_dropped(redis_store):
    first, second = _token(), _token()
    redis_store.register("w1", first, 2000, INFO)
    with pytest.raises(NameTakenError, match="w1"):
        redis_store.register("w1", second, 2000, INFO)
    assert not redis_store.renew("w1", second, 2000, INFO)
    redis_store.register("w1", first, 2000, INFO)  # the same incarnation may register again
    redis_store.drop_lease("w1", second)           # not ours: nothing happens
    assert redis_store.lease_alive("w1", first)
    redis_store.drop_lease("w1", first)
    assert redis_store.live_workers() == {}
    redis_store.register("w1", second, 2000, INFO)
    assert redis_store.live_workers()["w1"].token == second


def test_bad_worker_names_and_info_fields_are_refused(redis_store):
    for bad in ("", "two words", "tab\there"):
        with pytest.raises(StoreError, match="worker name"):
            redis_store.register(bad, _token(), 2000, INFO)
    with pytest.raises(ValueError, match="unknown worker info fields"):
        redis_store.register("w1", _token(), 2000, {"checkpoint": "/etc/passwd"})


def test_malformed_info_in_redis_reads_leniently(redis_store):
    token = _token()
    redis_store.register("w1", token, 2000, INFO)
    redis_store.client.hset(redis_store.keys.info("w1"),
                            mapping={"capacity_left": "x", "describe": "[not json"})
    info = redis_store.live_workers()["w1"]
    assert (info.capacity_left, info.describe, info.endpoint) == (0, {}, INFO["endpoint"])


# -- claims, epochs and fencing ------------------------------------------------------------


def test_claim_compare_and_sets_the_holder_and_increments_the_epoch(redis_store):
    a, b = _token(), _token()
    assert redis_store.holder("s1") is None
    assert redis_store.claim("s1", "wa", a, 0) == Claimed(1, None)
    assert redis_store.holder("s1") == Holding("wa", a, 1)
    assert redis_store.claim("s1", "wb", b, 0) is None          # the epoch moved: refused
    assert redis_store.holder("s1") == Holding("wa", a, 1)
    assert redis_store.save("wa", a, [("s1", 1, b"state-1")]) == {"s1": True}
    assert redis_store.claim("s1", "wb", b, 1) == Claimed(2, b"state-1")
    assert redis_store.holder("s1") == Holding("wb", b, 2)


def test_acquire_takes_a_free_stream_and_one_whose_holder_lease_died(redis_store):
    a, b = _token(), _token()
    redis_store.register("wa", a, TTL, INFO)
    assert redis_store.acquire("s1", "wa", a) == Claimed(1, None)
    redis_store.save("wa", a, [("s1", 1, b"rows")])
    # wa is alive: wb gets the live Holding, not the stream
    assert redis_store.acquire("s1", "wb", b) == Holding("wa", a, 1)
    time.sleep(PAST_TTL)                                        # wa's lease expires
    assert redis_store.acquire("s1", "wb", b) == Claimed(2, b"rows")
    assert redis_store.holder("s1") == Holding("wb", b, 2)


def test_racing_acquires_give_each_stream_to_exactly_one_worker(redis_store):
    tokens = {"wa": _token(), "wb": _token()}
    for name, token in tokens.items():
        redis_store.register(name, token, 5000, INFO)
    streams = [f"s{i}" for i in range(200)]
    results: dict[str, dict] = {}
    start = threading.Barrier(2)

    def run(name: str) -> None:
        start.wait()
        results[name] = redis_store.acquire_many(streams, name, tokens[name])

    threads = [threading.Thread(target=run, args=(name,)) for name in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for stream in streams:
        got = {name: results[name][stream] for name in tokens}
        winners = [name for name, g in got.items() if isinstance(g, Claimed)]
        assert len(winners) == 1, (stream, got)
        loser = "wb" if winners == ["wa"] else "wa"
        assert got[winners[0]] == Claimed(1, None)
        assert got[loser] == Holding(winners[0], tokens[winners[0]], 1)


def test_a_zombie_save_with_an_old_epoch_is_refused(redis_store):
    zombie, adopter = _token(), _token()
    redis_store.claim("s1", "wz", zombie, 0)
    assert redis_store.save("wz", zombie, [("s1", 1, b"good")]) == {"s1": True}
    redis_store.claim("s1", "wn", adopter, 1)                   # adopted while wz was paused
    assert redis_store.save("wz", zombie, [("s1", 1, b"late")]) == {"s1": False}
    assert redis_store.save("wz", zombie, [("s1", 2, b"late")]) == {"s1": False}
    assert redis_store.save("wn", adopter, [("s1", 1, b"late")]) == {"s1": False}
    assert redis_store.load("s1") == b"good"
    assert not redis_store.release("s1", "wz", zombie, 1)
    assert redis_store.holder("s1") == Holding("wn", adopter, 2)


def test_pipelined_save_of_100_streams_and_close(redis_store):
    token = _token()
    streams = [f"stream-{i}" for i in range(100)]
    got = redis_store.acquire_many(streams, "w1", token)
    assert got == {s: Claimed(1, None) for s in streams}
    blobs = {s: s.encode() * 50 for s in streams}
    assert redis_store.save("w1", token, [(s, 1, blobs[s]) for s in streams]) == \
        dict.fromkeys(streams, True)
    assert all(redis_store.load(s) == blobs[s] for s in streams)
    # closed streams (blob None): checkpoint deleted and the stream released, epoch kept
    assert redis_store.save("w1", token, [(s, 1, None) for s in streams[:10]]) == \
        dict.fromkeys(streams[:10], True)
    assert redis_store.load(streams[0]) is None
    assert redis_store.holders(streams[:2]) == dict.fromkeys(streams[:2], Holding("", "", 1))
    assert redis_store.holders(streams[10:12])[streams[10]] == Holding("w1", token, 1)
    # a closed stream's holder record expires (bounded memory at churn); a claim keeps it again
    keys = redis_store.keys
    assert 0 < redis_store.client.pttl(keys.holder(streams[0])) <= CLOSED_TTL_MS
    assert redis_store.client.pttl(keys.holder(streams[10])) == -1
    assert redis_store.acquire(streams[0], "w2", _token()) == Claimed(2, None)
    assert redis_store.client.pttl(keys.holder(streams[0])) == -1


def test_release_keeps_the_epoch_and_the_checkpoint(redis_store):
    a, b = _token(), _token()
    redis_store.claim("s1", "wa", a, 0)
    redis_store.save("wa", a, [("s1", 1, b"rows")])
    assert redis_store.release("s1", "wa", a, 1)
    held = redis_store.holder("s1")
    assert held == Holding("", "", 1) and held.free
    assert redis_store.acquire("s1", "wb", b) == Claimed(2, b"rows")


def test_stream_ids_with_braces_and_percent_stay_apart(redis_store):
    token = _token()
    ids = ["a{b}", "a%7Bb%7D", "{}", "%", "x y", "é"]
    assert redis_store.acquire_many(ids, "w1", token) == dict.fromkeys(ids, Claimed(1, None))
    redis_store.save("w1", token, [(s, 1, s.encode()) for s in ids])
    assert [redis_store.load(s) for s in ids] == [s.encode() for s in ids]


def test_scripts_flushed_on_the_server_are_loaded_again(redis_store):
    token = _token()
    redis_store.acquire_many(["s1", "s2"], "w1", token)
    redis_store.client.script_flush()
    assert redis_store.save("w1", token, [("s1", 1, b"x"), ("s2", 1, b"y")]) == \
        {"s1": True, "s2": True}
    redis_store.client.script_flush()
    assert redis_store.claim("s3", "w1", token, 0) == Claimed(1, None)


def test_watch_sees_every_claim_notice(redis_store):
    seen: list[tuple[str, str, int]] = []
    stop = redis_store.watch(lambda *notice: seen.append(notice))
    try:
        redis_store.acquire_many(["s1", "two words", "s{3}"], "w1", _token())
        redis_store.claim("s1", "w2", _token(), 1)
        assert _wait(lambda: len(seen) == 4), seen
        assert sorted(seen) == sorted([("s1", "w1", 1), ("two words", "w1", 1),
                                       ("s{3}", "w1", 1), ("s1", "w2", 2)])
    finally:
        stop()


# -- the lease keeper ----------------------------------------------------------------------


def test_lease_keeper_renews_and_drops_its_lease(redis_store):
    keeper = LeaseKeeper(redis_store, "w1", lambda: INFO, ttl_ms=TTL).start()
    try:
        assert keeper.valid()
        time.sleep(PAST_TTL)                    # > ttl: only renews keep it alive
        assert keeper.valid() and keeper.renewals >= 2
        assert redis_store.live_workers()["w1"].token == keeper.token
    finally:
        keeper.stop()
    assert not redis_store.lease_alive("w1", keeper.token)
    assert redis_store.live_workers() == {}


def test_lease_keeper_reports_a_lost_lease(redis_store):
    lost = threading.Event()
    keeper = LeaseKeeper(redis_store, "w1", lambda: INFO, ttl_ms=TTL,
                         on_lost=lambda reason: lost.set()).start()
    try:
        redis_store.client.delete(redis_store.keys.lease("w1"))   # e.g. expired while paused
        assert lost.wait(2.0)
        assert not keeper.valid() and "refused" in keeper.lost
    finally:
        keeper.stop()


def test_lease_keeper_waits_for_a_dead_incarnations_lease(redis_store):
    redis_store.register("w1", _token(), 300, INFO)           # the previous process, killed
    keeper = LeaseKeeper(redis_store, "w1", lambda: INFO, ttl_ms=300).start()
    keeper.stop()
    redis_store.register("w1", _token(), 2000, INFO)           # a live one: name taken
    with pytest.raises(NameTakenError):
        LeaseKeeper(redis_store, "w1", lambda: INFO, ttl_ms=300, register_wait_s=0.2).start()



# -- Redis Cluster ---------------------------------------------------------------------------


def test_on_a_3_master_cluster_each_streams_keys_share_a_slot_and_scripts_run(tmp_path):
    from tests.helpers.redis_server import start_cluster

    cluster = start_cluster(tmp_path, masters=3)
    store = RedisStore.from_url(cluster.url + "?prefix=c")
    try:
        client = store.client
        streams = [f"stream-{i}" for i in range(60)] + ["a{b}", "{}", "x y"]
        for stream in streams:
            slot = client.keyslot(store.keys.holder(stream))
            assert client.cluster_keyslot(store.keys.holder(stream)) == slot  # server agrees
            assert client.cluster_keyslot(store.keys.ckpt(stream)) == slot
        nodes = {client.get_node_from_key(store.keys.holder(s)).name for s in streams}
        assert len(nodes) == 3, nodes                                     # spread on masters
        seen: list[tuple[str, str, int]] = []
        stop = store.watch(lambda *notice: seen.append(notice))
        token, other = _token(), _token()
        try:
            store.register("w1", token, 2000, INFO)
            assert set(store.live_workers()) == {"w1"}
            assert store.acquire_many(streams, "w1", token) == dict.fromkeys(streams,
                                                                              Claimed(1, None))
            assert store.save("w1", token, [(s, 1, s.encode()) for s in streams]) == \
                dict.fromkeys(streams, True)
            assert store.acquire_many(streams, "w2", other) == dict.fromkeys(
                streams, Holding("w1", token, 1))                          # w1 is alive
            store.drop_lease("w1", token)
            assert store.acquire_many(streams, "w2", other) == {
                s: Claimed(2, s.encode()) for s in streams}                # adopted
            assert store.save("w1", token, [(s, 1, b"late") for s in streams]) == \
                dict.fromkeys(streams, False)                              # fenced
            assert store.release(streams[0], "w2", other, 2)
            assert _wait(lambda: len(seen) == 2 * len(streams))
        finally:
            stop()
    finally:
        store.close()
        cluster.stop()


def test_lease_keeper_fences_when_the_server_goes_away(tmp_path):
    from tests.helpers.redis_server import start_server

    server = start_server(tmp_path / "redis")
    store = RedisStore.from_url(server.url)
    lost = threading.Event()
    keeper = LeaseKeeper(store, "w1", lambda: INFO, ttl_ms=TTL,
                         on_lost=lambda reason: lost.set()).start()
    try:
        assert keeper.valid()
        server.stop()
        killed = time.monotonic()
        assert _wait(lambda: not keeper.valid(), timeout=2.0)
        assert keeper.valid_until <= killed + TTL / 1000       # invalid locally by the ttl
        assert lost.wait(5.0) and "expired" in keeper.lost
    finally:
        keeper.stop()
        store.close()


def test_after_a_redis_restart_data_scripts_and_notices_come_back(tmp_path):
    from tests.helpers.redis_server import start_server

    server = start_server(tmp_path / "redis")
    store = RedisStore.from_url(server.url)
    seen: list[tuple[str, str, int]] = []
    stop = store.watch(lambda *notice: seen.append(notice))
    token = _token()
    try:
        store.acquire_many(["s1", "s2"], "w1", token)
        store.save("w1", token, [("s1", 1, b"rows")])
        server.restart()                       # append-only: holders and checkpoints stay
        assert store.holder("s1") == Holding("w1", token, 1)
        assert store.load("s1") == b"rows"
        assert store.save("w1", token, [("s2", 1, b"x")]) == {"s2": True}  # scripts reloaded
        assert _wait(lambda: len(seen) == 2)
        # the watcher subscribes again: later claims are seen (poll until it is back)
        epoch = 1
        while not _wait(lambda: any(s == "s1" and e > 1 for s, _w, e in seen), 0.2):
            assert epoch < 50, seen
            assert store.claim("s1", "w2", _token(), epoch) is not None
            epoch += 1
    finally:
        stop()
        store.close()
        server.stop()
