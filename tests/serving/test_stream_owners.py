"""Stream owners against real workers (real sockets, CURVE keys made with zmq.auth).

Issue 16: another client identity cannot OPEN, PUSH (nor replay a cached output), RESET,
CLOSE or GENERATE a stream (ERROR FORBIDDEN, nothing about the stream in it); ownership
survives a restart from a checkpoint; a Client raises ForbiddenError; a cached reply
answers only a request of its own type; per-identity limits on open streams.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth

import streamrnn
from streamrnn import Engine
from streamrnn.protocol import ErrorCode, MessageType
from streamrnn.serving.worker import StreamWorker, WorkerConfig
from tests.helpers.modelzoo import ModelSpec, build_model, offline, random_input
from tests.helpers.raw_wire import Raw, assert_forbidden

SPEC = ModelSpec(cell="gru", layers=1, units=8, features=3, out=2)
TOL = 1e-5
NAMES = ("alice", "bob", "carol")


@pytest.fixture(scope="module")
def model():
    return build_model(SPEC, seed=16)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """A server key pair and three allowed client key pairs (secret files 0600)."""
    root = tmp_path_factory.mktemp("keys")
    allowed = root / "allowed"
    allowed.mkdir()
    out: dict[str, Path] = {"allow": allowed}
    for name in ("server", *NAMES):
        public, secret = zmq.auth.create_certificates(root if name == "server" else allowed,
                                                      name)
        os.chmod(secret, 0o600)
        out[name], out[name + "_secret"] = Path(public), Path(secret)
    return out


def start(model, tmp: Path | None = None, restore: bool = False, **config) -> StreamWorker:
    """An in-process worker with its own ZeroMQ context (one ZAP handler per context)."""
    engine = Engine.from_keras(model, slots=4, jit_compile=False)
    worker = StreamWorker(engine, WorkerConfig(
        bind="tcp://127.0.0.1:0", checkpoint_dir=None if tmp is None else str(tmp),
        checkpoint_every_steps=1, **config), context=zmq.Context())
    if restore:
        assert worker.restore_checkpoint() > 0
    worker.start()
    return worker


def stop(worker: StreamWorker) -> None:
    worker.stop()
    assert worker.join(20)
    worker._ctx.destroy(linger=0)


def client(endpoint: str, keys: dict[str, Path] | None = None, who: str = "",
           **kwargs) -> streamrnn.Client:
    curve = {} if keys is None else {"curve_server_key": keys["server"],
                                      "curve_keypair": keys[who + "_secret"]}
    return streamrnn.Client(endpoint, timeout=10, **curve, **kwargs)


# ---- CURVE: the client key owns the stream ---------------------------------------------


@pytest.fixture(scope="module")
def curve_worker(model, keys, tmp_path_factory):
    worker = start(model, tmp_path_factory.mktemp("ckpt"), curve_secret_key=str(
        keys["server_secret"]), curve_allow=str(keys["allow"]), max_streams_per_identity=3)
    yield worker
    if worker.running:
        stop(worker)


def test_another_curve_key_can_do_nothing_to_a_stream(model, keys, curve_worker):
    x = random_input(SPEC, 30, np.random.default_rng(1))
    ep = curve_worker.endpoint
    with client(ep, keys, "alice") as alice:
        ys = [alice.push("a1", x[:10]), alice.push("a1", x[10:20])]
    bob = Raw(ep, keys, "bob")
    try:
        chunk = {"chunk": x[20:25]}
        assert_forbidden(bob.ask(MessageType.OPEN, "a1"))
        assert_forbidden(bob.ask(MessageType.OPEN, "a1", pin_version=None))
        assert_forbidden(bob.ask(MessageType.PUSH, "a1", seq=1, arrays=chunk))  # its cache
        assert_forbidden(bob.ask(MessageType.PUSH, "a1", seq=2, arrays=chunk))
        assert_forbidden(bob.ask(MessageType.PUSH, "a1", seq=9, arrays=chunk))
        assert_forbidden(bob.ask(MessageType.RESET, "a1", seq=2))
        assert_forbidden(bob.ask(MessageType.CLOSE, "a1", seq=2))
        assert_forbidden(bob.ask(MessageType.GENERATE, "a1", seq=2, steps=2,
                                 arrays={"prompt": x[:1]}))
        assert_forbidden(bob.ask(MessageType.PUSH, "a1", seq=0, arrays=chunk))
    finally:
        bob.close()
    with client(ep, keys, "bob") as intruder, pytest.raises(streamrnn.ForbiddenError):
        intruder.push("a1", x[20:25])
    with client(ep, keys, "alice") as alice:  # a new connection of the same key
        assert alice.open("a1")["next_seq"] == 2
        ys.append(alice.push("a1", x[20:]))
        alice.close("a1")
    np.testing.assert_allclose(np.concatenate(ys), offline(model, x), atol=TOL)
    with client(ep, keys, "bob") as bob_client:  # a closed id is free to start over
        np.testing.assert_allclose(bob_client.push("a1", x[:4]), offline(model, x[:4]),
                                   atol=TOL)
        bob_client.close("a1")


def test_quota_per_curve_key(keys, curve_worker):
    x = random_input(SPEC, 4, np.random.default_rng(2))
    ep = curve_worker.endpoint
    with client(ep, keys, "carol") as carol, client(ep, keys, "bob") as bob:
        for i in range(3):
            carol.push(f"c{i}", x)
        with pytest.raises(streamrnn.QuotaExceededError):
            carol.push("c3", x)
        with client(ep, keys, "carol") as again, pytest.raises(streamrnn.QuotaExceededError):
            again.push("c4", x)  # the key counts, whatever its connection
        bob.push("b0", x)  # another key is not affected
        carol.push("c0", x)  # its open streams go on
        carol.close("c1")
        carol.push("c3", x)  # room again
        for stream in ("c0", "c2", "c3"):
            carol.close(stream)
        bob.close("b0")


def test_ownership_survives_a_restart_from_the_checkpoint(model, keys, tmp_path):
    x = random_input(SPEC, 20, np.random.default_rng(3))
    curve = {"curve_secret_key": str(keys["server_secret"]), "curve_allow": str(keys["allow"])}
    worker = start(model, tmp_path, **curve)
    try:
        with client(worker.endpoint, keys, "alice") as alice:
            first = alice.push("r1", x[:12])
            alice.push("gone", x[:2])
            alice.close("gone")  # acknowledged once a checkpoint without it is on disk
        with client(worker.endpoint, keys, "alice", token="tok") as alice_token:
            alice_token.push("r2", x[:3])
    finally:
        stop(worker)
    worker = start(model, tmp_path, restore=True, **curve)
    bob = Raw(worker.endpoint, keys, "bob")
    try:
        assert_forbidden(bob.ask(MessageType.OPEN, "r1"))
        assert_forbidden(bob.ask(MessageType.PUSH, "r1", seq=0, arrays={"chunk": x[:12]}))
        assert_forbidden(bob.ask(MessageType.CLOSE, "gone", seq=1))  # its cached ACK
        assert_forbidden(bob.ask(MessageType.OPEN, "r2", token="tok"))  # key and token
        alice = Raw(worker.endpoint, keys, "alice")
        assert_forbidden(alice.ask(MessageType.OPEN, "r2"))
        assert alice.ask(MessageType.CLOSE, "gone", seq=1).type is MessageType.ACK
        replay = alice.ask(MessageType.PUSH, "r1", seq=0, arrays={"chunk": x[:12]})
        np.testing.assert_array_equal(replay.arrays["output"], first)
        alice.close()
        with client(worker.endpoint, keys, "alice") as alice_client:
            rest = alice_client.push("r1", x[12:])
        np.testing.assert_allclose(np.concatenate([first, rest]), offline(model, x), atol=TOL)
    finally:
        bob.close()
        stop(worker)


# ---- without CURVE: stream tokens --------------------------------------------------------


@pytest.fixture(scope="module")
def plain_worker(model):
    worker = start(model, max_streams_per_identity=2)
    yield worker
    stop(worker)


def test_token_owns_the_stream(model, plain_worker):
    x = random_input(SPEC, 12, np.random.default_rng(4))
    ep = plain_worker.endpoint
    with client(ep, token="s3cret") as owner:
        first = owner.push("t1", x[:6])
    for kwargs in ({}, {"token": "wrong"}):
        with client(ep, **kwargs) as other:
            with pytest.raises(streamrnn.ForbiddenError):
                other.push("t1", x[6:])
            with pytest.raises(streamrnn.ForbiddenError):
                other.open("t1")
    raw = Raw(ep)
    try:
        for token in ({}, {"token": "S3CRET"}):
            assert_forbidden(raw.ask(MessageType.PUSH, "t1", seq=0, arrays={"chunk": x[:6]},
                                     **token))
            assert_forbidden(raw.ask(MessageType.RESET, "t1", seq=1, **token))
            assert_forbidden(raw.ask(MessageType.CLOSE, "t1", seq=1, **token))
        bad = raw.ask(MessageType.OPEN, "t1", token="x" * 257)
        assert (bad.type, bad.header["code"]) == (MessageType.ERROR, ErrorCode.BAD_VALUE)
        same = raw.ask(MessageType.PUSH, "t1", seq=0, arrays={"chunk": x[:6]}, token="s3cret")
        np.testing.assert_array_equal(same.arrays["output"], first)  # the owner's resend
    finally:
        raw.close()
    with client(ep) as anyone:
        anyone.set_token("t1", "s3cret")
        rest = anyone.push("t1", x[6:])
        anyone.close("t1")
    np.testing.assert_allclose(np.concatenate([first, rest]), offline(model, x), atol=TOL)


def test_stream_without_token_stays_open_to_anyone(plain_worker):
    x = random_input(SPEC, 4, np.random.default_rng(5))
    with client(plain_worker.endpoint) as one, client(plain_worker.endpoint) as two:
        one.push("open", x[:2])
        two.push("open", x[2:])  # today's behaviour, documented
        assert one.open("open")["next_seq"] == 2
        two.close("open")


def test_quota_per_connection_without_curve(plain_worker):
    x = random_input(SPEC, 2, np.random.default_rng(6))
    with client(plain_worker.endpoint) as one, client(plain_worker.endpoint) as two:
        one.push("q0", x)
        one.push("q1", x)
        with pytest.raises(streamrnn.QuotaExceededError):
            one.push("q2", x)
        two.push("q2", x)  # another connection: its own count
        for stream in ("q0", "q1"):
            one.close(stream)
        two.close("q2")


def test_cached_reply_answers_only_its_own_request_type(plain_worker):
    x = random_input(SPEC, 3, np.random.default_rng(7))
    raw = Raw(plain_worker.endpoint)
    try:
        assert raw.ask(MessageType.PUSH, "w", seq=0, arrays={"chunk": x}).type is \
            MessageType.OUTPUT
        reset = raw.ask(MessageType.RESET, "w", seq=0)  # not the PUSH's OUTPUT
        assert (reset.type, reset.header["code"], reset.header["expected"]) == (
            MessageType.ERROR, ErrorCode.SEQ_STALE, 1)
        assert raw.ask(MessageType.CLOSE, "w", seq=1).type is MessageType.ACK
        push = raw.ask(MessageType.PUSH, "w", seq=1, arrays={"chunk": x})  # not the ACK
        assert (push.type, push.header["code"], push.header["expected"]) == (
            MessageType.ERROR, ErrorCode.UNKNOWN_STREAM, 0)
        assert raw.ask(MessageType.CLOSE, "w", seq=1).type is MessageType.ACK  # a resend
    finally:
        raw.close()
