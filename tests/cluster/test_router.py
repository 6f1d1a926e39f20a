"""Router on Redis: holders from the workers' leases, NOT_HOLDER re-forwarding, explicit
refusals, CURVE on every link (client -> router -> worker), the client key the router
vouches for (stream owners behind a router), and the outside review's findings about the
old heartbeat link made impossible.

The real-path tests share one module fixture: a real redis-server (session fixture), two
real worker processes with ``--store``, CURVE and ``--curve-routers``, and an in-process
router. Multi-process kill scenarios are in test_failover.py (slow).
"""

from __future__ import annotations

import json
import signal

import msgpack
import numpy as np
import pytest
import zmq
import zmq.auth

import streamrnn
from streamrnn.cli import router as router_cli
from streamrnn.cluster.redis_store import RedisStore
from streamrnn.cluster.router import Router, RouterConfig
from streamrnn.protocol import F_CLIENT_KEY, ErrorCode, MessageType
from tests.helpers.cluster_helpers import (
    curve_keys,
    fresh_store_url,
    start_workers,
    wait_for,
)
from tests.helpers.durable_helpers import SPEC, saved_model
from tests.helpers.modelzoo import offline, random_input
from tests.helpers.raw_wire import Raw, assert_forbidden

TOL = 1e-5


def started(config: RouterConfig) -> Router:
    router = Router(config)
    router.start()
    return router


def stopped(router: Router) -> None:
    router.stop()
    assert router.join(10)


# ---- no worker, bad input, crashes ------------------------------------------------------------


def test_router_requires_a_store(monkeypatch, capfd):
    with pytest.raises(ValueError, match="--store redis://"):
        Router(RouterConfig(bind="tcp://127.0.0.1:0"))
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    assert router_cli.main(["--bind", "tcp://127.0.0.1:0"]) == 2
    assert "needs --store" in capfd.readouterr().err


def test_router_without_workers_refuses_explicitly(redis_url):
    router = started(RouterConfig(bind="tcp://127.0.0.1:0", store=fresh_store_url(redis_url)))
    try:
        with streamrnn.Client(router.endpoint, timeout=0.5) as client:
            with pytest.raises(streamrnn.RemoteError) as info:  # retried for 0.5 s, then raised
                client.push("lonely", np.zeros((2, SPEC.features), np.float32))
            assert info.value.code == ErrorCode.UNAVAILABLE
            assert "no live worker" in str(info.value)
            assert client.ping()["worker"]["router"]["workers"] == 0
            assert client.counters["retried_unavailable"] >= 1
    finally:
        stopped(router)


# The review's messages for the old worker endpoint (which no longer exists): sent to the
# router's only endpoint, each is one malformed client message, answered or dropped.
REVIEW_MESSAGES = [
    [b"HB", msgpack.packb({})],
    [b"HB", msgpack.packb([1, 2, 3])],
    [b"HB", msgpack.packb({"name": "evil", "endpoint": "nonsense", "capacity_left": 10**6})],
    [b"HB", msgpack.packb({"name": "evil", "endpoint": "tcp://127.0.0.1:1",
                           "capacity_left": "x"})],
    [b"ADOPTED", msgpack.packb({"id": "x"})],
]


def test_review_messages_neither_crash_the_router_nor_touch_files(redis_url, tmp_path):
    important = tmp_path / "important.txt"
    important.write_text("keep me")
    router = started(RouterConfig(bind="tcp://127.0.0.1:0", store=fresh_store_url(redis_url)))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(router.endpoint)
    try:
        heartbeat = {"name": "evil", "endpoint": "tcp://127.0.0.1:1",
                     "checkpoint": str(important), "capacity_left": 1000}
        for frames in [*REVIEW_MESSAGES, [b"HB", msgpack.packb(heartbeat)]] * 20:
            sock.send_multipart(frames)
        with streamrnn.Client(router.endpoint, timeout=5) as client:
            wait_for(lambda: client.stats()["router"]["counts"].get("malformed", 0) >= 120,
                     10, "the messages to be read")
            stats = client.stats()["router"]
            assert client.ping()["worker"]["router"]["workers"] == 0  # no "worker" joined
        assert stats["workers"] == {} and not router.failed
        assert router._thread.is_alive()
    finally:
        sock.close()
        stopped(router)
    assert important.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["important.txt"]


def test_a_failed_routing_thread_exits_nonzero(redis_url, monkeypatch):
    def broken(self):
        raise RuntimeError("bug in the loop")

    monkeypatch.setattr(Router, "_sync", broken)
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    assert router_cli.main(["--bind", "tcp://127.0.0.1:0",
                            "--store", fresh_store_url(redis_url)]) == 1


def test_an_exception_in_one_message_is_counted_and_the_router_goes_on(redis_url):
    router = started(RouterConfig(bind="tcp://127.0.0.1:0", store=fresh_store_url(redis_url)))
    original = router._on_message

    def explode(*args):
        router._on_message = original  # only the first message
        raise KeyError("a bug")

    router._on_message = explode
    try:
        with streamrnn.Client(router.endpoint, timeout=0.3, retries=0) as client:
            with pytest.raises(streamrnn.RequestTimeoutError):
                client.ping()  # its handler raised: no reply
            assert client.ping()["worker"]["router"]["workers"] == 0
        assert router.stats()["counts"]["handler_errors"] == 1
        assert router._thread.is_alive() and router.failed is None
    finally:
        stopped(router)


def test_pending_requests_of_a_vanished_worker_get_busy_and_late_replies_are_counted(
        redis_url, redis_store):
    """A worker (here a bare socket holding a real lease) takes a request and never answers;
    when its lease disappears the router answers BUSY; a reply for a forgotten rid is
    dropped and counted."""
    url = f"{redis_url}?prefix={redis_store.prefix}"
    silent = zmq.Context.instance().socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    silent.setsockopt(zmq.RCVTIMEO, 5000)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    redis_store.register("quiet", "t1", 60_000, {
        "endpoint": f"tcp://127.0.0.1:{port}", "curve_public": "", "capacity_left": 4,
        "streams": 0, "describe": "{}"})
    router = started(RouterConfig(bind="tcp://127.0.0.1:0", store=url))
    try:
        wait_for(lambda: "quiet" in router.holders.live, 10, "the worker's lease")
        with streamrnn.Client(router.endpoint, timeout=2.0, retries=0) as client:
            future = client.push_async("orphan", np.zeros((1, SPEC.features), np.float32))
            forwarded = silent.recv_multipart()  # its OPEN reached the "worker"
            redis_store.drop_lease("quiet", "t1")
            wait_for(lambda: router.stats()["counts"].get("workers_left", 0) == 1, 10,
                     "the lease to be seen gone")
            with pytest.raises(streamrnn.RemoteError) as info:  # BUSY, then UNAVAILABLE
                future.result(10)
            assert info.value.code == ErrorCode.UNAVAILABLE
        counts = router.stats()["counts"]
        assert counts.get("busy", 0) >= 1, counts  # the pending OPEN was answered BUSY
        assert len(forwarded) >= 3 and router.stats()["pending"] == 0
        late = [zmq.Frame(bytes((MessageType.ACK,))), zmq.Frame(msgpack.packb({"rid": 10**6}))]
        router._on_worker_reply(late)
        assert router.stats()["counts"]["late_worker_replies"] == 1
    finally:
        silent.close()
        stopped(router)


# ---- real path: redis-server, two CURVE workers with --store, an in-process router ----------


@pytest.fixture(scope="module")
def cluster(redis_url, tmp_path_factory):
    model, path = saved_model(tmp_path_factory)
    keys = curve_keys(tmp_path_factory.mktemp("keys"))
    url = fresh_store_url(redis_url)
    workers = start_workers(path, url, ["w1", "w2"], "--max-streams", "32", "--curve-secret-key",
                            str(keys["worker_secret"]), "--curve-allow",
                            str(keys["workers_allow"]), "--curve-routers", str(keys["router"]))
    router = started(RouterConfig(
        bind="tcp://127.0.0.1:0", store=url, curve_secret_key=str(keys["front_secret"]),
        curve_allow=str(keys["front_allow"]), curve_client_key=str(keys["router_secret"])))
    try:
        wait_for(lambda: len(router.holders.live) == 2, 30, "two live workers")
        yield {"model": model, "url": url, "keys": keys, "workers": workers,
               "router": router}
    finally:
        stopped(router)
        for worker in workers.values():
            worker.stop()


def client_of(cluster, endpoint=None, who="client", **kwargs):
    keys = cluster["keys"]
    server = keys["worker"] if endpoint else keys["front"]
    return streamrnn.Client(endpoint or cluster["router"].endpoint, curve_server_key=server,
                            curve_keypair=keys[f"{who}_secret"], **kwargs)


def test_streams_spread_over_workers_equal_offline_and_stats_hide_endpoints(cluster):
    rng = np.random.default_rng(5)
    x = {f"rp{i}": random_input(SPEC, 24, rng) for i in range(8)}
    with client_of(cluster, timeout=10) as client:
        first = client.push_many({s: v[:10] for s, v in x.items()})
        second = client.push_many({s: v[10:] for s, v in x.items()})
        stats = client.stats()["router"]
    for s, v in x.items():
        np.testing.assert_allclose(np.concatenate([first[s], second[s]]),
                                   offline(cluster["model"], v), atol=TOL, err_msg=s)
    assert all(w["assigned"] > 0 for w in stats["workers"].values()), stats
    assert sorted(stats["workers"]) == ["w1", "w2"]
    assert "tcp://" not in json.dumps(stats) and "endpoint" not in json.dumps(stats)
    holders = RedisStore.from_url(cluster["url"]).holders(list(x))
    assert {h.worker for h in holders.values()} == {"w1", "w2"}


def test_behind_the_router_each_client_key_owns_its_streams(cluster):
    """Issue 16 item 1 behind a router: the router vouches for each client's CURVE key
    (``client_key``), so a second client of the same router can do nothing to the first's
    stream, even claiming its key itself (a router drops the claim, also one without CURVE
    toward its clients; a worker ignores it from a peer that is not a trusted router); the
    owner goes on, equal to offline."""
    keys, router = cluster["keys"], cluster["router"]
    key_a = zmq.auth.load_certificate(keys["client"])[0].decode("ascii")
    x = random_input(SPEC, 20, np.random.default_rng(9))
    batches = router.stats()["counts"].get("requests_batch", 0)
    with client_of(cluster, timeout=10) as a:  # the second push_many is one BATCH
        ys = [a.push_many(dict.fromkeys(("owned", "owned-too"), x[:4]))["owned"],
              a.push_many(dict.fromkeys(("owned", "owned-too"), x[4:8]))["owned"]]
    assert router.stats()["counts"].get("requests_batch", 0) > batches  # parts vouched for
    with client_of(cluster, who="other", timeout=10) as b:
        for stream in ("owned", "owned-too"):
            for touch in (b.open, b.reset, b.close, lambda s: b.push(s, x[8:12])):
                with pytest.raises(streamrnn.ForbiddenError):
                    touch(stream)
    holder = RedisStore.from_url(cluster["url"]).holder("owned").worker
    chunk, claim = {"chunk": x[8:12]}, {F_CLIENT_KEY: key_a}
    plain_front = started(RouterConfig(bind="tcp://127.0.0.1:0", store=cluster["url"],
                                       curve_client_key=str(keys["router_secret"])))
    try:
        wait_for(lambda: len(plain_front.holders.live) == 2, 10, "the workers in Redis")
        for endpoint, server in ((router.endpoint, "front"), (plain_front.endpoint, None),
                                 (router.holders.live[holder].endpoint, "worker")):
            b = Raw(endpoint, server and {**keys, "server": keys[server]}, "other")
            try:
                assert_forbidden(b.ask(MessageType.OPEN, "owned", **claim))
                for seq in (1, 2):  # its cached output, and its next chunk
                    assert_forbidden(b.ask(MessageType.PUSH, "owned", seq=seq, arrays=chunk,
                                           **claim))
                assert_forbidden(b.ask(MessageType.RESET, "owned", seq=2, **claim))
                assert_forbidden(b.ask(MessageType.CLOSE, "owned", seq=2, **claim))
            finally:
                b.close()
    finally:
        stopped(plain_front)
    with client_of(cluster, timeout=10) as a:  # a new connection of the same key
        assert a.open("owned")["next_seq"] == 2
        ys.append(a.push("owned", x[8:]))
        a.close("owned")
        a.open("owned-too")
        a.close("owned-too")
    np.testing.assert_allclose(np.concatenate(ys), offline(cluster["model"], x), atol=TOL)


def test_stale_cache_gets_not_holder_and_the_router_forwards_again(cluster):
    router = cluster["router"]
    x = random_input(SPEC, 12, np.random.default_rng(6))
    with client_of(cluster, timeout=10) as client:
        a = client.push("stale", x[:5])
        holder = RedisStore.from_url(cluster["url"]).holder("stale").worker
        other = "w2" if holder == "w1" else "w1"
        before = router.stats()["counts"].get("not_holder", 0)
        # a stale entry, as after a missed claim notice: the wrong worker refuses the chunk
        router.holders._drop("stale")
        router.holders._cache("stale", other)
        b = client.push("stale", x[5:])
    np.testing.assert_allclose(np.concatenate([a, b]), offline(cluster["model"], x), atol=TOL)
    counts = router.stats()["counts"]
    assert counts.get("not_holder", 0) == before + 1 and counts.get("reforwarded", 0) >= 1


def test_plaintext_or_unlisted_peers_get_nothing_from_curve_workers_and_router(cluster):
    keys, router = cluster["keys"], cluster["router"]
    x = np.zeros((2, SPEC.features), np.float32)
    worker_endpoint = next(iter(router.holders.live.values())).endpoint
    def pushes_seen() -> dict[str, int]:  # each worker's own count, asked over CURVE
        seen = {}
        for name, info in router.holders.live.items():
            with client_of(cluster, info.endpoint, timeout=5) as direct:
                seen[name] = direct.stats()["counts"].get("requests_push", 0)
        return seen

    with client_of(cluster, timeout=10) as client:
        client.push("legit", x)
    served = pushes_seen()
    assert sum(served.values()) >= 1  # the count is real: the legit push is in it
    for endpoint in (worker_endpoint, router.endpoint):
        server = keys["worker"] if endpoint == worker_endpoint else keys["front"]
        for kwargs in ({}, {"curve_server_key": server, "curve_keypair": keys["stranger_secret"]}):
            with streamrnn.Client(endpoint, timeout=0.4, retries=0, **kwargs) as intruder:
                with pytest.raises(streamrnn.RequestTimeoutError):
                    intruder.push("intruded", x)
                with pytest.raises(streamrnn.RequestTimeoutError):
                    intruder.ping()
    # a router without CURVE keys ignores CURVE workers; one whose key the workers do not
    # list gets no answer from them
    plain = started(RouterConfig(bind="tcp://127.0.0.1:0", store=cluster["url"]))
    unlisted = started(RouterConfig(bind="tcp://127.0.0.1:0", store=cluster["url"],
                                    curve_client_key=str(keys["stranger_secret"])))
    try:
        with streamrnn.Client(plain.endpoint, timeout=0.4) as client:
            with pytest.raises(streamrnn.RemoteError) as info:
                client.push("intruded", x)
            assert info.value.code == ErrorCode.UNAVAILABLE
        wait_for(lambda: len(unlisted.holders.live) == 2, 10, "the workers in Redis")
        with streamrnn.Client(unlisted.endpoint, timeout=0.5, retries=0) as client:
            # the handshake fails: requests wait unanswered, or find no connection (BUSY)
            with pytest.raises((streamrnn.RequestTimeoutError, streamrnn.WorkerBusyError)):
                client.push("intruded", x)
    finally:
        stopped(plain)
        stopped(unlisted)
    assert RedisStore.from_url(cluster["url"]).holder("intruded") is None  # nobody claimed it
    assert pushes_seen() == served  # no intruder's push reached a worker


def test_a_plaintext_worker_with_a_lease_gets_nothing_from_a_curve_router(cluster):
    """Even registered in Redis (which takes the store's credentials) with a huge room, a
    worker without a CURVE key is ignored by a CURVE router: streams go to the CURVE
    workers, and the fake's socket receives nothing."""
    fake = zmq.Context.instance().socket(zmq.ROUTER)
    fake.setsockopt(zmq.LINGER, 0)
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    store = RedisStore.from_url(cluster["url"])
    store.register("evil", "e1", 60_000, {
        "endpoint": f"tcp://127.0.0.1:{port}", "curve_public": "", "capacity_left": 10**6,
        "streams": 0, "describe": "{}"})
    try:
        wait_for(lambda: "evil" in store.live_workers(), 5, "the fake lease")
        x = random_input(SPEC, 6, np.random.default_rng(8))
        with client_of(cluster, timeout=10) as client:
            y = client.push("not-for-evil", x)
            stats = client.stats()["router"]
        np.testing.assert_allclose(y, offline(cluster["model"], x), atol=TOL)
        assert "evil" not in stats["workers"] and "evil" not in cluster["router"].holders.live
        assert store.holder("not-for-evil").worker in ("w1", "w2")
        assert fake.poll(300) == 0  # nothing ever reached it
    finally:
        store.drop_lease("evil", "e1")
        fake.close()
