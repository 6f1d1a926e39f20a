"""Raw-socket helpers shared by the tests that speak the wire protocol to the shared worker."""

from __future__ import annotations

import numpy as np

from streamrnn.codec import decode_batch, decode_reply, is_batch
from streamrnn.protocol import MessageType
from tests.helpers.shared_worker import SPEC


def data(steps: int, seed: int) -> np.ndarray:
    """``(steps, SPEC.features)`` float32 noise for the shared worker's model."""
    return np.random.default_rng(seed).standard_normal((steps, SPEC.features)).astype(
        np.float32)


def push(stream: str, seq: int, chunk: np.ndarray, rid: int):
    """A PUSH part for :func:`streamrnn.codec.encode_batch`."""
    return (MessageType.PUSH, {"rid": rid, "stream": stream, "seq": seq}, {"chunk": chunk})


def collect_replies(sock, count: int) -> dict[int, object]:
    """Every part reply (plain or in BATCH_REPLY envelopes) until ``count`` arrived, by rid."""
    got: dict[int, object] = {}
    while len(got) < count:
        frames = sock.recv_multipart()
        parts = decode_batch(frames, replies=True)[1] if is_batch(frames) else [
            decode_reply(frames)]
        for part in parts:
            got[part.header["rid"]] = part
    return got
