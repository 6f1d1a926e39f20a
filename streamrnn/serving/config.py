"""The settings of one stream worker (:class:`WorkerConfig`).

The defaults are the worker CLI's (``streamrnn worker``, docs/operations.md): its options
take their ``default=`` from here, so an in-process worker and a worker process started
without options behave alike. ``coalesce_steps`` defaults to 64, the default
``--max-bucket`` (the CLI's ``--coalesce-steps`` follows ``--max-bucket``).

Example::

    config = WorkerConfig(bind="tcp://127.0.0.1:0", checkpoint_dir="/var/lib/streamrnn")
"""

from __future__ import annotations

from dataclasses import dataclass

from streamrnn.protocol import MAX_FRAME_BYTES
from streamrnn.serving.reply_budget import (
    DEFAULT_REPLY_CACHE_BYTES,
    DEFAULT_REPLY_CACHE_STREAM_BYTES,
)

__all__ = ["WorkerConfig"]


@dataclass
class WorkerConfig:
    """Settings of one stream worker."""

    bind: str = "tcp://127.0.0.1:5555"
    batch_window_us: int = 500  # how long the compute loop waits to fill a batch
    coalesce_steps: int = 64  # run a stream's queued consecutive PUSHes, up to this many
    # timesteps in all, in one step (0: one PUSH per stream per step; see batching.coalesce)
    max_queue: int = 4096  # requests waiting for the compute thread; beyond -> BUSY
    max_batch: int = 4096  # requests taken per compute iteration
    # expire streams idle this long (0: never): fresh ids must not hold slots for ever
    idle_timeout_s: float = 3600.0
    max_frame_bytes: int = MAX_FRAME_BYTES  # ZMQ_MAXMSGSIZE on the ROUTER
    busy_retry_after_ms: int = 5
    # bytes of cached reply arrays (answers to resent requests) per stream and in all
    reply_cache_stream_bytes: int = DEFAULT_REPLY_CACHE_STREAM_BYTES
    reply_cache_bytes: int = DEFAULT_REPLY_CACHE_BYTES
    # steps one GENERATE may ask for (more: BAD_VALUE), and GENERATE steps run per round
    # before the round's pushes (at least one GENERATE call runs per round)
    max_generate_steps: int = 4096
    # open streams one client identity may create (its CURVE key, else its connection;
    # serving.owners); beyond -> QUOTA_EXCEEDED. 0: no limit but the engine's max streams
    max_streams_per_identity: int = 0
    metrics_port: int | None = None  # serve Prometheus /metrics here (0: any free port)
    checkpoint_dir: str | None = None  # write/restore checkpoints here (None: not durable)
    checkpoint_every_steps: int = 100  # write after this many batched steps (0: not by count)
    checkpoint_every_s: float = 1.0  # write when this much time passed (0: not by time)
    # HMAC key file: sign checkpoints (and check the weights followed) with it; None: SHA-256
    checkpoint_key: str | None = None
    name: str = "worker"  # this worker's name: its checkpoint is <checkpoint_dir>/<name>.ckpt
    curve_secret_key: str | None = None  # CURVE server key file (.key_secret); None: plain
    curve_allow: str | None = None  # allowed client public keys: a .key file or a directory
    # routers' public keys (a .key file or a directory): they may connect, and the client key
    # they vouch for (the client_key field) is a request's identity (serving.owners)
    curve_routers: str | None = None
    model_name: str = ""
