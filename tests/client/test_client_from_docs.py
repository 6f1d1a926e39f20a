"""A client written only from docs/protocol.md, with plain pyzmq + msgpack + numpy.

``DocClient`` below imports nothing from streamrnn: if it can push chunks and get outputs
equal to the offline model, the document is complete enough to write a client from.
"""

from __future__ import annotations

import itertools

import msgpack
import numpy as np
import pytest
import zmq

from tests.helpers.modelzoo import offline
from tests.helpers.shared_worker import SPEC, shared_worker

# ---- the client: only docs/protocol.md was read to write this ----------------------------

PUSH, RESET, CLOSE, OPEN, PING = 0x02, 0x03, 0x04, 0x01, 0x07
OUTPUT, ACK, ERROR, BUSY, PONG = 0x81, 0x82, 0x83, 0x84, 0x86


class DocClient:
    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 60_000)
        self.sock.connect(endpoint)
        self.rids = itertools.count(1)
        self.seqs: dict[str, int] = {}
        self.version = 1

    def request(self, msg_type: int, header: dict, arrays: dict | None = None):
        header = {"v": self.version, "rid": next(self.rids), **header}
        frames = []
        if arrays:
            header["arrays"] = {}
            for index, (name, array) in enumerate(arrays.items()):
                array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
                header["arrays"][name] = {"dtype": array.dtype.name,
                                          "shape": list(array.shape), "frame": index}
                frames.append(array.tobytes())
        while True:
            self.sock.send_multipart([bytes([msg_type]), msgpack.packb(header), *frames])
            reply = self.sock.recv_multipart()
            reply_type, reply_header = reply[0][0], msgpack.unpackb(reply[1])
            if reply_header.get("rid") != header["rid"]:
                continue  # a late reply to something else
            if reply_type == BUSY:
                continue  # resend; the worker never applies a seq twice
            out = {}
            for name, desc in reply_header.get("arrays", {}).items():
                dtype = np.dtype(desc["dtype"]).newbyteorder("<")
                out[name] = np.frombuffer(reply[2 + desc["frame"]], dtype).reshape(desc["shape"])
            return reply_type, reply_header, out

    def ping(self) -> dict:
        kind, header, _ = self.request(PING, {"versions": [1]})
        assert kind == PONG
        self.version = header["version"]
        return header

    def open(self, stream: str) -> None:
        kind, header, _ = self.request(OPEN, {"stream": stream})
        assert kind == ACK
        self.seqs[stream] = header["next_seq"]

    def _sequenced(self, msg_type: int, stream: str, arrays: dict | None = None):
        seq = self.seqs.setdefault(stream, 0)
        kind, header, out = self.request(msg_type, {"stream": stream, "seq": seq}, arrays)
        if kind == ERROR:
            raise RuntimeError(f"error {header['code']}: {header['message']}")
        self.seqs[stream] = seq + 1
        return out

    def push(self, stream: str, chunk: np.ndarray) -> np.ndarray:
        return self._sequenced(PUSH, stream, {"chunk": chunk.astype("<f4")})["output"]

    def reset(self, stream: str) -> None:
        self._sequenced(RESET, stream)

    def close(self, stream: str) -> None:
        self._sequenced(CLOSE, stream)
        self.seqs[stream] = 0


# ---- the test ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker():
    return shared_worker()


def test_doc_client_streams_equal_offline(worker):
    client = DocClient(worker.endpoint)
    info = client.ping()["worker"]
    assert info["input_dim"] == SPEC.features and info["output_dim"] == SPEC.out
    rng = np.random.default_rng(42)
    x = {s: rng.standard_normal((50, SPEC.features)).astype(np.float32) for s in ("d1", "d2")}
    outputs: dict[str, list[np.ndarray]] = {"d1": [], "d2": []}
    for stream in x:
        client.open(stream)
    for start in range(0, 50, 10):  # interleave the two streams
        for stream in x:
            outputs[stream].append(client.push(stream, x[stream][start:start + 10]))
    for stream in x:
        np.testing.assert_allclose(np.concatenate(outputs[stream]),
                                   offline(worker.model, x[stream]), atol=1e-5)
    client.reset("d1")
    np.testing.assert_allclose(client.push("d1", x["d1"][:7]), offline(worker.model, x["d1"][:7]),
                               atol=1e-5)
    client.seqs["d2"] += 3
    with pytest.raises(RuntimeError, match="error 9: .*expected 5"):  # a gap names the seq
        client.push("d2", x["d2"][:2])
    client.seqs["d2"] -= 3
    for stream in x:
        client.close(stream)
    with pytest.raises(RuntimeError, match="error 8"):  # closed: unknown unless seq 0
        client.seqs["d1"] = 3
        client.push("d1", x["d1"][:2])
