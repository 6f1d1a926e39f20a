"""``streamrnn keys`` (issue 16, item 6): secret keys are created 0600, public ones 0644, the
files are what ZeroMQ and ``--checkpoint-key`` read, and a process that loads a secret key
file others can read warns once."""

from __future__ import annotations

import logging
import os
import stat

import pytest
import zmq
import zmq.auth

from streamrnn.cli.main import main
from streamrnn.errors import CheckpointError
from streamrnn.security import (
    CHECKPOINT_KEY_ENV,
    checkpoint_key,
    curve_client,
    load_hmac_key,
    warn_if_exposed,
)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_keys_curve_writes_a_0600_secret_and_a_0644_public_key(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert main(["keys", "curve", str(tmp_path / "keys"), "server"]) == 0
    finally:
        os.umask(old)
    public, secret = tmp_path / "keys" / "server.key", tmp_path / "keys" / "server.key_secret"
    assert _mode(secret) == 0o600 and _mode(public) == 0o644
    pub, sec = zmq.auth.load_certificate(str(secret))
    assert sec is not None and zmq.curve_public(sec) == pub
    assert zmq.auth.load_certificate(str(public)) == (pub, None)
    assert "server.key_secret" in capsys.readouterr().out
    # an existing key is never overwritten silently
    assert main(["keys", "curve", str(tmp_path / "keys"), "server"]) == 1
    assert zmq.auth.load_certificate(str(secret))[1] == sec
    assert main(["keys", "curve", str(tmp_path / "keys"), "server", "--force"]) == 0
    assert zmq.auth.load_certificate(str(secret))[1] != sec and _mode(secret) == 0o600


def test_keys_hmac_writes_a_0600_key_that_checkpoint_key_reads(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.key"
    assert main(["keys", "hmac", str(path)]) == 0
    assert _mode(path) == 0o600
    key = load_hmac_key(path)
    assert len(key) == 64 and int(key, 16) >= 0
    monkeypatch.setenv(CHECKPOINT_KEY_ENV, str(path))
    assert checkpoint_key() == key and checkpoint_key(None) == key
    monkeypatch.delenv(CHECKPOINT_KEY_ENV)
    assert checkpoint_key() is None
    (tmp_path / "short.key").write_text("tiny")
    with pytest.raises(CheckpointError, match="at least 16"):
        load_hmac_key(tmp_path / "short.key")


def test_a_secret_key_readable_by_others_warns_once(tmp_path, caplog):
    public, secret = zmq.curve_keypair()
    path = tmp_path / "made-the-old-way.key_secret"
    zmq.auth.certs._write_key_file(path, "", public, secret)
    os.chmod(path, 0o644)  # what zmq.auth.create_certificates leaves
    caplog.set_level(logging.WARNING, logger="streamrnn.security")
    ctx = zmq.Context()
    try:
        for _ in range(2):
            sock = ctx.socket(zmq.DEALER)
            curve_client(sock, public, path)
            sock.close(0)
    finally:
        ctx.term()
    warnings = [r.getMessage() for r in caplog.records if r.name == "streamrnn.security"]
    assert len(warnings) == 1 and "readable by other users (mode 0644)" in warnings[0]
    os.chmod(path, 0o600)
    tight = tmp_path / "tight.key_secret"
    tight.write_bytes(path.read_bytes())
    os.chmod(tight, 0o600)
    assert not warn_if_exposed(tight)
