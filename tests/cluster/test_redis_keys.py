"""Key names, hash tags and ``--store`` URL parsing (pure: no server)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamrnn.cluster.redis_keys import (
    Keys,
    parse_store_url,
    redact_url,
    stream_tag,
)
from streamrnn.cluster.redis_records import holding, info_args, worker_info
from streamrnn.cluster.redis_watch import parse_notice
from streamrnn.errors import StoreError


def _tag(key: str) -> str:
    """The hash tag Redis Cluster hashes for ``key`` (its first non-empty ``{...}``)."""
    start = key.index("{")
    end = key.index("}", start + 1)
    assert end > start + 1
    return key[start + 1:end]


def test_every_key_of_one_stream_shares_one_hash_tag():
    keys = Keys("srnn")
    assert keys.holder("a{b}") == "srnn:{s:a%7Bb%7D}:holder"
    assert keys.ckpt("a{b}") == "srnn:{s:a%7Bb%7D}:ckpt"
    assert _tag(keys.lease("w1")) == _tag(keys.info("w1")) == "w:w1"
    assert (keys.workers, keys.claims, keys.train_log) == ("srnn:workers", "srnn:claims",
                                                           "srnn:{train}:log")


@given(st.text(max_size=40), st.text(max_size=40))
def test_stream_tags_are_injective_and_brace_free(a, b):
    assert "{" not in stream_tag(a) and "}" not in stream_tag(a)
    assert (stream_tag(a) == stream_tag(b)) == (a == b)
    keys = Keys("p")
    assert _tag(keys.holder(a)) == _tag(keys.ckpt(a)) == f"s:{stream_tag(a)}"


def test_a_prefix_with_braces_or_spaces_is_refused():
    for bad in ("a{b", "a}b", "", "a b"):
        with pytest.raises(StoreError, match="prefix"):
            Keys(bad)
    with pytest.raises(StoreError, match="prefix"):
        parse_store_url("redis://h?prefix=%7Bx%7D")


def test_single_server_url_with_acl_user_db_and_prefix():
    spec = parse_store_url("redis://app%40svc:p%3Ass@cache.local:6380/3?prefix=prod")
    assert spec.mode == "single" and spec.prefix == "prod"
    assert spec.hosts == (("cache.local", 6380),)
    assert spec.kwargs == {"host": "cache.local", "port": 6380, "db": 3,
                           "username": "app@svc", "password": "p:ss"}
    bare = parse_store_url("redis://localhost")
    assert bare.kwargs == {"host": "localhost", "port": 6379} and bare.prefix == "srnn"
    assert parse_store_url("redis://:secret@h").kwargs["password"] == "secret"
    assert "username" not in parse_store_url("redis://:secret@h").kwargs


def test_tls_options_pass_through_to_redis_py():
    spec = parse_store_url(
        "rediss://u:p@h:6390/0?ssl_ca_certs=/etc/ca.pem&ssl_certfile=/c.pem"
        "&ssl_keyfile=/k.pem&ssl_cert_reqs=required&ssl_check_hostname=false"
        "&socket_timeout=2.5&client_name=w1")
    assert spec.kwargs == {"host": "h", "port": 6390, "db": 0, "username": "u", "password": "p",
                           "ssl": True, "ssl_ca_certs": "/etc/ca.pem",
                           "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem",
                           "ssl_cert_reqs": "required", "ssl_check_hostname": False,
                           "socket_timeout": 2.5, "client_name": "w1"}
    with pytest.raises(StoreError, match="rediss"):
        parse_store_url("redis://h?ssl_ca_certs=/ca.pem")
    with pytest.raises(StoreError, match="ssl_cert_reqs"):
        parse_store_url("rediss://h?ssl_cert_reqs=maybe")


def test_sentinel_url():
    spec = parse_store_url("redis+sentinel://u:p@s1:26380,s2,[::1]:26381/mymaster/2"
                           "?sentinel_password=sp&socket_timeout=1")
    assert spec.mode == "sentinel" and spec.service_name == "mymaster"
    assert spec.hosts == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert spec.kwargs == {"db": 2, "username": "u", "password": "p", "socket_timeout": 1.0}
    assert spec.sentinel_kwargs == {"password": "sp", "socket_timeout": 1.0}
    tls = parse_store_url("rediss+sentinel://s1/m?ssl_ca_certs=/ca.pem")
    assert tls.sentinel_kwargs == {"ssl": True, "ssl_ca_certs": "/ca.pem"}
    with pytest.raises(StoreError, match="service_name"):
        parse_store_url("redis+sentinel://s1:26379")


def test_cluster_urls():
    spec = parse_store_url("redis+cluster://u:p@n1:7000,n2:7001?prefix=c")
    assert spec.mode == "cluster" and spec.prefix == "c"
    assert spec.hosts == (("n1", 7000), ("n2", 7001))
    assert spec.kwargs == {"username": "u", "password": "p"}
    assert parse_store_url("redis://n1:7000?cluster=true").mode == "cluster"
    assert parse_store_url("rediss://n1:7000/0?cluster=yes").kwargs == {"ssl": True}
    assert parse_store_url("redis://n1?cluster=false").mode == "single"
    with pytest.raises(StoreError, match="database 0"):
        parse_store_url("redis+cluster://n1/2")


@pytest.mark.parametrize("url, match", [
    ("n1:6379", "redis://"),
    ("http://h", "unknown scheme"),
    ("redis://h?bogus=1", "unknown option 'bogus'"),
    ("redis://h?db=x", "bad value for db"),
    ("redis://h/x", "number"),
    ("redis://h:99999", "port"),
    ("redis://h:abc", "bad port"),
    ("redis://a,b", "several hosts"),
    ("redis://h/1/2", "unexpected path"),
    ("redis://h?cluster=maybe", "cluster"),
    ("redis+sentinel://s/m?cluster=true", "Sentinel"),
    ("redis://h?sentinel_password=x", "sentinel"),
    ("redis://", "no host"),
])
def test_unusable_urls_raise_store_error(url, match):
    with pytest.raises(StoreError, match=match):
        parse_store_url(url)


def test_redact_url_hides_passwords():
    assert redact_url("redis://u:secret@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("rediss://h?ssl_password=k&sentinel_password=s&prefix=p") == \
        "rediss://h?ssl_password=***&sentinel_password=***&prefix=p"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    assert "secret" not in redact_url("redis+sentinel://:secret@s1,s2/m")


def test_records_encode_and_decode_leniently():
    assert holding({}) is None
    assert holding({b"worker": b"", b"token": b"", b"epoch": b"4"}).free
    assert holding({b"epoch": b"x"}).epoch == 0
    assert info_args({"describe": {"b": 1}, "curve_public": b"abc", "streams": None}) == \
        ["describe", '{"b": 1}', "curve_public", "abc", "streams", ""]
    assert worker_info("w", {b"endpoint": b"e"}) is None  # no token: not a lease's info
    info = worker_info("w", {b"token": b"t", b"describe": b"[1]", b"streams": b"2"})
    assert (info.describe, info.streams, info.capacity_left) == ({}, 2, 0)


def test_claim_notices_parse():
    assert parse_notice(b"12 w1 a b c") == ("a b c", "w1", 12)
    for bad in (b"", b"x w1 s", b"1 w1", b"-1 w s", b"1  s"):
        assert parse_notice(bad) is None
