"""RedisStore.from_url against real servers: an ACL user, TLS with client certificates,
Sentinel, and the failures (unreachable, wrong password, no client certificate, a missing
``redis-server``)."""

from __future__ import annotations

import time
import uuid

import pytest
from redis.backoff import NoBackoff
from redis.exceptions import NoPermissionError
from redis.retry import Retry

from streamrnn.cluster.redis_store import ACL_COMMANDS, Claimed, RedisStore
from streamrnn.errors import StoreError
from tests.helpers.redis_server import (
    free_port,
    make_tls_files,
    redis_binary,
    start_sentinel,
    start_server,
)

INFO = {"endpoint": "tcp://10.0.0.5:5555"}


def _round_trip(store: RedisStore) -> None:
    """register, claim with a notice, fenced save, load: the calls every role makes."""
    token = uuid.uuid4().hex
    seen = []
    stop = store.watch(lambda *notice: seen.append(notice))
    try:
        store.register("w1", token, 2000, INFO)
        assert set(store.live_workers()) == {"w1"}
        assert store.acquire("s1", "w1", token) == Claimed(1, None)
        assert store.save("w1", token, [("s1", 1, b"rows")]) == {"s1": True}
        assert store.load("s1") == b"rows"
        store.drop_lease("w1", token)
    finally:
        stop()


def test_an_acl_user_limited_to_its_prefix_works_and_a_wrong_password_fails(redis_server):
    prefix, user, password = f"a{uuid.uuid4().hex[:8]}", f"u{uuid.uuid4().hex[:8]}", "pw-1"
    admin = redis_server.client()
    # only its own keys and channels, and only the commands the store says it uses
    admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=[f"{prefix}:*"],
                      channels=[f"{prefix}:*"],
                      commands=[f"+{command}" for command in ACL_COMMANDS])
    url = f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/0?prefix={prefix}"
    store = RedisStore.from_url(url)
    try:
        _round_trip(store)
        with pytest.raises(NoPermissionError):
            store.client.get("elsewhere:key")
        wrong = RedisStore.from_url(url.replace(password, "nope"))
        with pytest.raises(StoreError, match="WRONGPASS|Authentication|invalid"):
            wrong.ping()
        assert "nope" not in wrong.where and password not in store.where
    finally:
        store.close()
        admin.acl_deluser(user)
        admin.close()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("redis-tls")
    files = make_tls_files(base / "certs")
    tls_port = free_port()
    server = start_server(base / "server", "--tls-port", str(tls_port),
                          "--tls-cert-file", str(files["server_cert"]),
                          "--tls-key-file", str(files["server_key"]),
                          "--tls-ca-cert-file", str(files["ca"]), "--tls-auth-clients", "yes")
    yield tls_port, files
    server.stop()


def test_tls_with_client_certificates_from_the_url(tls_server):
    port, files = tls_server
    url = (f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={files['ca']}"
           f"&ssl_certfile={files['client_cert']}&ssl_keyfile={files['client_key']}")
    store = RedisStore.from_url(url)
    try:
        _round_trip(store)
    finally:
        store.close()
    # the same options given as keyword arguments (what a CLI flag passes through)
    store = RedisStore.from_url(f"rediss://127.0.0.1:{port}/0", ssl_ca_certs=str(files["ca"]),
                                ssl_certfile=str(files["client_cert"]),
                                ssl_keyfile=str(files["client_key"]))
    try:
        store.ping()
    finally:
        store.close()


def test_tls_without_a_client_certificate_or_the_ca_is_refused(tls_server):
    port, files = tls_server
    for url in (f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={files['ca']}",  # no client cert
                f"rediss://127.0.0.1:{port}/0?ssl_certfile={files['client_cert']}"
                f"&ssl_keyfile={files['client_key']}"):                    # server unverified
        with pytest.raises(StoreError):  # (no retries: a refusal is final; keeps this fast)
            RedisStore.from_url(url, retry=Retry(NoBackoff(), 0)).ping()


def test_sentinel_url_finds_the_master(redis_server, tmp_path):
    sentinel = start_sentinel(tmp_path / "sentinel", redis_server.port, "mymaster")
    try:
        store = RedisStore.from_url(f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0"
                                    f"?prefix=s{uuid.uuid4().hex[:8]}")
        try:
            _round_trip(store)
        finally:
            store.close()
        with pytest.raises(StoreError):
            RedisStore.from_url(f"redis+sentinel://127.0.0.1:{sentinel.port}/nosuch").ping()
    finally:
        sentinel.stop()


def test_an_unreachable_store_raises_store_error_quickly():
    store = RedisStore.from_url("redis://127.0.0.1:1/0?socket_connect_timeout=0.5")
    with pytest.raises(StoreError, match="127.0.0.1:1"):
        store.holder("s1")
    for url in ("redis://127.0.0.1:1/0", "redis+sentinel://127.0.0.1:1/mymaster",
                "redis+cluster://127.0.0.1:1"):
        began = time.monotonic()
        with pytest.raises(StoreError, match="127.0.0.1:1"):
            RedisStore.from_url(url).ping()
        assert time.monotonic() - began < 5, url  # redis-py's default retries took 12 s


def test_a_missing_redis_server_is_an_error_that_says_how_to_install_it():
    with pytest.raises(RuntimeError, match="apt-get install -y redis-server"):
        redis_binary("redis-server-that-does-not-exist")
    assert redis_binary().endswith("redis-server")
