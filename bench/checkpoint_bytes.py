"""Checkpoint bytes written to Redis per second per 1,000 active streams (issue 15).

    python bench/checkpoint_bytes.py                       # starts a redis-server of its own
    python bench/checkpoint_bytes.py --store redis://127.0.0.1:6379/0 --units 128 --out 16

A worker's Redis store (:class:`~streamrnn.cluster.redis_checkpoints.RedisStreamStore`)
writes, once per ``--checkpoint-every-s`` (1 s by default), every stream whose ``next_seq``
moved since its last write. Here ``--streams`` streams each apply ``--chunks-per-s`` chunks
of ``--steps`` timesteps per interval (an "active" stream), after their reply caches were
filled (a steady state: every blob has its full reply cache), and the store saves once per
interval; what one save writes is then the bytes per second. Idle streams write nothing.
Prints one JSON line: blob size, bytes per save, bytes/s per 1,000 active streams, the
save's wall time, and (``--idle``) a save where only 1 in 10 streams moved.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from streamrnn import Engine  # noqa: E402
from streamrnn.cluster.redis_checkpoints import open_worker_store  # noqa: E402
from streamrnn.protocol import REPLY_CACHE_SIZE, MessageType  # noqa: E402
from streamrnn.serving.sequencing import SequenceTable  # noqa: E402


def _model(features: int, units: int, layers: int, out: int) -> keras.Model:
    inputs = keras.Input((None, features))
    x = inputs
    for _ in range(layers):
        x = keras.layers.LSTM(units, return_sequences=True)(x)
    return keras.Model(inputs, keras.layers.Dense(out)(x))


def _apply_round(engine, table: SequenceTable, streams: list[str], chunk: np.ndarray) -> None:
    """One chunk per stream, as the compute thread applies it (state + reply cache)."""
    outputs = engine.push_many(dict.fromkeys(streams, chunk))
    for stream, out in outputs.items():
        seq = table.next_seq(stream)
        table.applied(stream, seq, (MessageType.OUTPUT, {"stream": stream, "seq": seq,
                                                         "steps": len(chunk)},
                                    {"output": out}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="Redis URL (default: start one)")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=16, help="timesteps per chunk")
    parser.add_argument("--chunks-per-s", type=int, default=1)
    parser.add_argument("--features", type=int, default=5)
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", type=int, default=3)
    parser.add_argument("--saves", type=int, default=5, help="measured saves")
    args = parser.parse_args()

    server = None
    url = args.store
    if url is None:
        from tests.helpers.redis_server import start_server

        server = start_server(Path(tempfile.mkdtemp(prefix="ckpt-bytes-")))
        url = server.url
    url = f"{url}{'&' if '?' in url else '?'}prefix=bench{uuid.uuid4().hex[:8]}"
    engine = Engine.from_keras(_model(args.features, args.units, args.layers, args.out),
                               slots=args.streams, jit_compile=False)
    gc.collect()
    gc.freeze()  # as a worker process does once its model is loaded (freeze_heap)
    table = SequenceTable()
    store = open_worker_store(url, "bench", lambda: {"endpoint": ""}, ttl_ms=60_000,
                              every_s=1.0)
    streams = [f"stream-{i}" for i in range(args.streams)]
    chunk = np.random.default_rng(0).standard_normal((args.steps, args.features)) \
        .astype(np.float32)
    try:
        assert store.acquire(streams, engine, table) == set(streams)
        for _ in range(REPLY_CACHE_SIZE):  # full reply caches: the steady state
            _apply_round(engine, table, streams, chunk)
        store.save(engine, table)
        sizes, seconds = [], []
        for _ in range(args.saves):
            for _ in range(args.chunks_per_s):
                _apply_round(engine, table, streams, chunk)
            began = time.perf_counter()
            store.save(engine, table)
            seconds.append(time.perf_counter() - began)
            sizes.append(store.last_bytes)
            assert store.last_streams == len(streams)
        tenth = streams[::10]
        _apply_round(engine, table, tenth, chunk)
        store.save(engine, table)
        idle_bytes, idle_streams = store.last_bytes, store.last_streams
        per_save = float(np.mean(sizes))
        print(json.dumps({
            "streams": args.streams, "steps_per_chunk": args.steps,
            "chunks_per_stream_per_s": args.chunks_per_s,
            "model": f"{args.layers}x LSTM({args.units}) -> Dense({args.out})",
            "reply_cache": REPLY_CACHE_SIZE, "checkpoint_every_s": 1.0,
            "blob_bytes": round(per_save / args.streams),
            "bytes_per_s": round(per_save),
            "bytes_per_s_per_1000_active": round(per_save * 1000 / args.streams),
            "save_seconds_median": round(float(np.median(seconds)), 4),
            "tenth_active": {"streams_written": idle_streams, "bytes": idle_bytes},
        }))
    finally:
        store.close()
        store.store.close()
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
