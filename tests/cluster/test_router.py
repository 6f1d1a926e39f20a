"""Router: sticky admission over registered workers, failover after kill -9, explicit
refusals; CURVE authentication on worker and router.

The failover test runs a real router and two real worker processes sharing a checkpoint
directory, kills one with SIGKILL in the middle of many streams, and checks that every
stream's output still equals the offline model (the survivor adopts the dead worker's
streams from its checkpoint file; clients replay what came after it).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq.auth

import streamrnn
from streamrnn import Engine
from streamrnn.cli.process import RouterProcess, WorkerProcess
from streamrnn.cluster.router import Router, RouterConfig
from streamrnn.protocol import ErrorCode
from streamrnn.serving.worker import StreamWorker, WorkerConfig
from tests.helpers.durable_helpers import FAST, SPEC, Driver, chunked, saved_model
from tests.helpers.modelzoo import offline, random_input

TOL = 1e-5


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return saved_model(tmp_path_factory)


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def router_stats(endpoint: str) -> dict:
    with streamrnn.Client(endpoint, timeout=5) as client:
        return client.stats()["router"]


def test_router_failover_after_kill9_keeps_every_stream_exact(model_file, tmp_path):
    model, path = model_file
    rng = np.random.default_rng(21)
    seqs = {f"r{i}": random_input(SPEC, int(rng.integers(120, 200)), rng) for i in range(10)}
    streams = {s: chunked(x, rng) for s, x in seqs.items()}
    shared = tmp_path / "ckpt"
    with RouterProcess.start("--dead-after-s", "1.0") as router:
        workers = {
            name: WorkerProcess.start(
                path, 4, *FAST, "--max-streams", "16", "--checkpoint-dir", str(shared),
                "--checkpoint-every-steps", "5", "--checkpoint-every-s", "0.5", "--name", name,
                "--register", router.workers_endpoint, "--heartbeat-s", "0.2")
            for name in ("w1", "w2")}
        try:
            wait_for(lambda: len(router_stats(router.endpoint)["workers"]) == 2,
                     what="two registered workers")
            driver = Driver(router.endpoint, streams, 4, timeout=1.0, retries=120)
            total = sum(len(c) for c in streams.values())
            wait_for(lambda: driver.received >= total // 3 or driver.errors, 120, "progress")
            spread = router_stats(router.endpoint)["workers"]
            assert spread["w1"]["assigned"] > 0 and spread["w2"]["assigned"] > 0, spread
            wait_for(lambda: (shared / "w1.ckpt").exists(), what="w1 checkpoint")
            workers["w1"].proc.kill()
            assert workers["w1"].proc.wait(30) == -9
            driver.join(240)
            stats = router_stats(router.endpoint)
        finally:
            for proc in workers.values():
                proc.stop()
        log = router.log()
    assert "w1" in log and "declared dead" in log, log[-3000:]
    assert stats["counts"].get("failovers", 0) >= 1
    assert stats["counts"].get("streams_adopted", 0) > 0, stats
    assert list(shared.glob("w1.ckpt.adopted-*"))  # a restarted w1 will not resurrect them
    for s, x in seqs.items():
        got = np.concatenate(driver.outputs[s])
        assert got.shape[0] == len(x), s
        np.testing.assert_allclose(got, offline(model, x), atol=TOL, err_msg=s)
    print("client counters:", dict(driver.counters), "router:", stats["counts"])


def test_router_without_workers_refuses_explicitly():
    router = Router(RouterConfig(bind="tcp://127.0.0.1:0", workers_bind="tcp://127.0.0.1:0"))
    endpoint, _ = router.start()
    try:
        with streamrnn.Client(endpoint, timeout=5) as client:
            with pytest.raises(streamrnn.RemoteError) as info:
                client.push("lonely", np.zeros((2, SPEC.features), np.float32))
            assert info.value.code == ErrorCode.UNAVAILABLE
            assert "no live worker" in str(info.value)
            assert client.ping()["worker"]["router"]["workers"] == 0
    finally:
        router.stop()
        router.join(5)


# ---- CURVE --------------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path):
    server_dir, allowed_dir, other_dir = (tmp_path / d for d in ("server", "allowed", "other"))
    for d in (server_dir, allowed_dir, other_dir):
        d.mkdir()
    server_pub, server_secret = zmq.auth.create_certificates(server_dir, "server")
    client_pub, client_secret = zmq.auth.create_certificates(allowed_dir, "client")
    _, stranger_secret = zmq.auth.create_certificates(other_dir, "stranger")
    return {"server_pub": server_pub, "server_secret": server_secret,
            "allow": allowed_dir, "client_secret": client_secret,
            "stranger_secret": stranger_secret}


def test_curve_worker_serves_authorised_client_and_ignores_others(model_file, keys):
    model, _ = model_file
    engine = Engine.from_keras(model, slots=2, jit_compile=False)
    worker = StreamWorker(engine, WorkerConfig(
        bind="tcp://127.0.0.1:0", curve_secret_key=str(keys["server_secret"]),
        curve_allow=str(keys["allow"])))
    endpoint = worker.start()
    x = random_input(SPEC, 12, np.random.default_rng(2))
    try:
        with streamrnn.Client(endpoint, timeout=10, curve_server_key=keys["server_pub"],
                              curve_keypair=keys["client_secret"]) as client:
            got = np.concatenate([client.push("sec", x[:5]), client.push("sec", x[5:])])
        np.testing.assert_allclose(got, offline(model, x), atol=TOL)
        for kwargs in ({"curve_server_key": keys["server_pub"],
                        "curve_keypair": keys["stranger_secret"]}, {}):
            with streamrnn.Client(endpoint, timeout=0.5, retries=1, **kwargs) as intruder:
                with pytest.raises(streamrnn.RequestTimeoutError):
                    intruder.push("sec", x[:3])
                with pytest.raises(streamrnn.RequestTimeoutError):
                    intruder.ping()
        assert worker.stats()["counts"].get("requests_push", 0) == 2  # intruders: nothing
    finally:
        worker.stop()
        worker.join(10)


def test_curve_router_refuses_unknown_keys(keys):
    router = Router(RouterConfig(bind="tcp://127.0.0.1:0", workers_bind="tcp://127.0.0.1:0",
                                 curve_secret_key=str(keys["server_secret"]),
                                 curve_allow=str(keys["allow"] / "client.key")))
    endpoint, _ = router.start()
    try:
        with streamrnn.Client(endpoint, timeout=5, curve_server_key=keys["server_pub"],
                              curve_keypair=keys["client_secret"]) as client:
            assert client.ping()["version"] == 1
        with streamrnn.Client(endpoint, timeout=0.5, retries=1,
                              curve_server_key=keys["server_pub"],
                              curve_keypair=keys["stranger_secret"]) as intruder:
            with pytest.raises(streamrnn.RequestTimeoutError):
                intruder.ping()
    finally:
        router.stop()
        router.join(5)
