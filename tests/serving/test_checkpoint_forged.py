"""Checkpoint files from elsewhere (issue 16, item 5): a forged file whose SHA-256 is right is
held to the wire's limits field by field, and with a checkpoint key only signed files load.

The forged files are written here with the documented header (magic, format 1, length,
SHA-256 of the body), as anyone can, not with streamrnn's own writer.
"""

from __future__ import annotations

import hashlib
import struct

import msgpack
import numpy as np
import pytest

from streamrnn import Engine
from streamrnn.protocol import MAX_SEQ, MAX_STREAM_ID_BYTES, MessageType
from streamrnn.serving.checkpoint import (
    Checkpoint,
    CheckpointError,
    StreamRecord,
    load_checkpoint,
    save_checkpoint,
)
from streamrnn.serving.durability import WorkerCheckpointer
from streamrnn.serving.sequencing import SequenceTable
from streamrnn.serving.worker import StreamWorker, WorkerConfig
from tests.helpers.durable_helpers import SPEC
from tests.helpers.modelzoo import build_model, random_input

LAYOUT = [["float32", [4]], ["float32", [4]]]
KEY = b"k" * 32


def _state() -> list[bytes]:
    return [np.arange(4, dtype="<f4").tobytes() for _ in LAYOUT]


def _reply(seq: int, msg_type: int = int(MessageType.OUTPUT)) -> list:
    out = np.ones((2, 3), "<f4")
    return [seq, msg_type, {"stream": "s", "seq": seq},
            {"output": ["float32", [2, 3], out.tobytes()]}]


def _body(**changes) -> dict:
    record = {"next_seq": 3, "steps": 7, "state": _state(), "replies": [_reply(1), _reply(2)]}
    record.update(changes.pop("record", {}))
    body = {"model": "m", "layout": LAYOUT, "weights_version": 0, "created": 1.0,
            "streams": {"s": record}, "extra": {"closed": {}, "pins": {}, "worker": "w"}}
    body.update(changes)
    return body


def forge(path, body: dict) -> None:
    """Write ``body`` as a format-1 checkpoint with a correct SHA-256, the way a stranger
    with the format in hand would."""
    raw = msgpack.packb(body, use_bin_type=True)
    path.write_bytes(struct.pack("<8sIQ32s", b"SRNNCKPT", 1, len(raw),
                                 hashlib.sha256(raw).digest()) + raw)


def test_a_well_formed_forged_file_loads(tmp_path):
    """The control: the forger's writer is right, so every refusal below is the field's."""
    forge(tmp_path / "c.ckpt", _body())
    ckpt = load_checkpoint(tmp_path / "c.ckpt")
    assert ckpt.streams["s"].next_seq == 3 and len(ckpt.streams["s"].replies) == 2


FORGED = {
    "next_seq 2**64-1": (_body(record={"next_seq": 2**64 - 1}), "'next_seq' must be an int"),
    "next_seq -5": (_body(record={"next_seq": -5}), "'next_seq' must be an int in"),
    "next_seq a float": (_body(record={"next_seq": 3.0}), "'next_seq' must be an int"),
    "steps past MAX_SEQ": (_body(record={"steps": MAX_SEQ + 1}), "'steps' must be an int"),
    "100 kB stream id": (_body(streams={"x" * 100_000: _body()["streams"]["s"]}),
                         f"stream id must be a string of 1..{MAX_STREAM_ID_BYTES}"),
    "empty stream id": (_body(streams={"": _body()["streams"]["s"]}), "stream id must be"),
    "streams as a list": (_body(streams=[1, 2]), "'streams' must be a map"),
    "record as a list": (_body(streams={"s": [1, 2]}), "stream 's' record must be a map"),
    "short state row": (_body(record={"state": [b"\0" * 15, _state()[1]]}),
                        "state row 0 must be 16 bytes"),
    "missing state row": (_body(record={"state": _state()[:1]}), "1 state rows, the layout 2"),
    "layout not a list": (_body(layout={"a": 1}), "'layout' must be a list"),
    "layout dtype object": (_body(layout=[["object", [4]]]), "dtype must be one of"),
    "reply seq not applied yet": (_body(record={"replies": [_reply(3)]}), "reply 0 seq"),
    "reply of a request type": (_body(record={"replies": [_reply(1, int(MessageType.PUSH))]}),
                                "reply 0 type must be a reply type"),
    "reply array of the wrong size": (
        _body(record={"replies": [[1, 0x81, {}, {"output": ["float32", [9], b"\0" * 4]}]]}),
        "must be 36 bytes"),
    "replies out of order": (_body(record={"replies": [_reply(2), _reply(1)]}),
                             "ascending seq order"),
    "more replies than the cache": (_body(record={"next_seq": 100,
                                              "replies": [_reply(i) for i in range(40)]}),
                                    "more than 32"),
    "pin not an int": (_body(extra={"pins": {"s": "v2"}}), "pin of stream 's' must be an int"),
    "pins as a list": (_body(extra={"pins": [1]}), "'pins' must be a map"),
    "closed stream with a bad reply": (_body(extra={"closed": {"t": [1, 2]}}),
                                       "closed stream 't' entry must be"),
    "weights_version negative": (_body(weights_version=-1), "'weights_version' must be"),
    "created not a number": (_body(created="yesterday"), "'created' must be a finite number"),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_every_forged_field_is_refused_with_a_clear_error(tmp_path, case):
    body, message = FORGED[case]
    forge(tmp_path / "c.ckpt", body)
    with pytest.raises(CheckpointError, match="malformed body") as info:
        load_checkpoint(tmp_path / "c.ckpt")
    assert message in str(info.value)
    assert len(str(info.value)) < 600  # a 100 kB id is not echoed whole


def _sample() -> Checkpoint:
    state = [np.arange(4, dtype=np.float32)] * 2
    return Checkpoint("m", [("float32", (4,))] * 2, {"s": StreamRecord(state, 3, 7)})


def test_a_signed_checkpoint_loads_with_its_key_and_without_one(tmp_path):
    save_checkpoint(tmp_path / "c.ckpt", _sample(), key=KEY)
    assert load_checkpoint(tmp_path / "c.ckpt", key=KEY).streams["s"].next_seq == 3
    assert load_checkpoint(tmp_path / "c.ckpt").streams["s"].next_seq == 3


def test_with_a_key_an_unsigned_file_is_refused(tmp_path):
    save_checkpoint(tmp_path / "c.ckpt", _sample())
    with pytest.raises(CheckpointError, match="carries no HMAC .*written without a checkpoint "
                                              "key"):
        load_checkpoint(tmp_path / "c.ckpt", key=KEY)


def test_a_forged_file_passing_sha256_fails_the_hmac(tmp_path):
    """The forger edits a signed file's body and fixes its SHA-256 (not knowing the key)."""
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, _sample(), key=KEY)
    blob = path.read_bytes()
    head = struct.Struct("<8sIQ32s32s")
    magic, version, _, _, mac = head.unpack_from(blob)
    body = msgpack.unpackb(blob[head.size:])
    body["streams"]["s"]["next_seq"] = 5
    raw = msgpack.packb(body, use_bin_type=True)
    path.write_bytes(head.pack(magic, version, len(raw), hashlib.sha256(raw).digest(), mac)
                     + raw)
    assert load_checkpoint(path).streams["s"].next_seq == 5  # SHA-256 alone is satisfied
    with pytest.raises(CheckpointError, match="fails its HMAC check"):
        load_checkpoint(path, key=KEY)
    with pytest.raises(CheckpointError, match="fails its HMAC check"):
        save_checkpoint(path, _sample(), key=KEY)
        load_checkpoint(path, key=b"another key, 32 bytes long......")


def test_a_keyed_worker_signs_its_checkpoints_and_refuses_others(tmp_path):
    """WorkerConfig.checkpoint_key (the worker's --checkpoint-key) reaches the checkpoints: a
    worker restores a file signed with its key, and refuses one signed with another key and
    an unsigned one; a keyed checkpointer writes signed files and will not adopt a forged
    one."""
    model = build_model(SPEC, seed=4)
    engine = Engine.from_keras(model, slots=2, jit_compile=False)
    table = SequenceTable()
    out = engine.push("s", random_input(SPEC, 6, np.random.default_rng(0)))
    table.applied("s", 0, (MessageType.OUTPUT, {"stream": "s", "seq": 0}, {"output": out}))
    WorkerCheckpointer(tmp_path / "ck", key=KEY).save(engine, table)
    assert load_checkpoint(tmp_path / "ck" / "worker.ckpt", key=KEY).streams["s"].next_seq == 1
    keys = {"mine": KEY, "other": b"another key of 32 bytes........!"}
    for name, key in keys.items():
        (tmp_path / name).write_bytes(key)
        (tmp_path / name).chmod(0o600)

    def restore(key_name: str | None) -> int:
        config = WorkerConfig(checkpoint_dir=str(tmp_path / "ck"),
                              checkpoint_key=key_name and str(tmp_path / key_name))
        fresh = Engine.from_keras(model, slots=2, jit_compile=False)
        return StreamWorker(fresh, config).restore_checkpoint()

    assert restore("mine") == 1
    with pytest.raises(CheckpointError, match="fails its HMAC check"):
        restore("other")
    WorkerCheckpointer(tmp_path / "ck").save(engine, table)  # unsigned now
    assert restore(None) == 1
    with pytest.raises(CheckpointError, match="carries no HMAC"):
        restore("mine")
