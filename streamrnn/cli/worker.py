"""The stream worker process: ``python -m streamrnn.cli.worker --model M.keras --slots 64 ...``.

Loads the model into an :class:`~streamrnn.Engine` (on the executor ``--executor`` names:
ONNX Runtime on CPU by default, see :mod:`streamrnn.engine.backends`), serves it with a
:class:`~streamrnn.serving.worker.StreamWorker`, logs a ready line with the bound endpoint
(``--bind tcp://127.0.0.1:0`` picks a free port), and on SIGTERM/SIGINT finishes queued
work, sends its replies and exits 0. The same entry point backs ``streamrnn worker``.

Durability: ``--checkpoint-dir`` (one file per worker, single machine) or ``--store
redis://...`` (:class:`~streamrnn.cluster.redis_checkpoints.RedisStreamStore`: a lease
renewed every ``--lease-ttl-ms``/4, per-stream checkpoints fenced by epoch, the endpoint
routers connect to published as ``--advertise``). A worker whose lease lapsed fences
itself and exits with status 3.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamrnn.cli import lifecycle
from streamrnn.cli.keys import add_checkpoint_key_argument
from streamrnn.cli.lifecycle import log_ready, stop_on_signals, wait
from streamrnn.logs import add_logging_arguments, configure_logging
from streamrnn.metrics import add_metrics_argument, metrics_url

if TYPE_CHECKING:
    from streamrnn.serving.store import StreamStore
    from streamrnn.serving.worker import StreamWorker

__all__ = ["READY_MARKER", "add_arguments", "main", "run"]

log = logging.getLogger("streamrnn.worker")

READY_MARKER = "streamrnn worker ready on "


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The worker's command-line options (shared with ``streamrnn worker``)."""
    from streamrnn.engine.interface import EXECUTORS, PRECISIONS
    from streamrnn.serving.config import WorkerConfig

    defaults = WorkerConfig()
    parser.add_argument("--model", required=True, help="trained Keras model (.keras file)")
    parser.add_argument("--slots", type=int, default=64, help="concurrent streams (batch rows)")
    parser.add_argument("--bind", default=defaults.bind,
                        help="ZeroMQ endpoint for the ROUTER socket; port 0 picks a free port "
                             "(the ready line shows the real one)")
    parser.add_argument("--batch-window-us", type=int, default=defaults.batch_window_us,
                        help="wait this long for more requests to batch into one step")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help="requests waiting for compute before the worker answers BUSY")
    parser.add_argument("--idle-timeout-s", type=float, default=defaults.idle_timeout_s,
                        help="expire streams idle this long, answering EXPIRED (0: never; "
                             "default: %(default)s)")
    parser.add_argument("--reply-cache-stream-bytes", type=int,
                        default=defaults.reply_cache_stream_bytes,
                        help="bytes of cached reply arrays kept per stream to answer resent "
                             "requests; a bigger reply is not cached (default: %(default)s)")
    parser.add_argument("--reply-cache-bytes", type=int, default=defaults.reply_cache_bytes,
                        help="bytes of cached reply arrays kept in all, oldest dropped "
                             "first (default: %(default)s)")
    parser.add_argument("--max-generate-steps", type=int, default=defaults.max_generate_steps,
                        help="steps one GENERATE may ask for (more: BAD_VALUE); also the "
                             "GENERATE steps run between two pushes of the other streams "
                             "(default: %(default)s)")
    parser.add_argument("--max-frame-bytes", type=int, default=defaults.max_frame_bytes,
                        help="ZMQ_MAXMSGSIZE: peers sending a bigger frame are disconnected")
    parser.add_argument("--max-bucket", type=int, default=64,
                        help="longest padded step (power of two); longer chunks are split")
    parser.add_argument("--coalesce-steps", type=int, default=None,
                        help="under backlog, run a stream's queued consecutive chunks, up to "
                             "this many timesteps in all, in one step (each chunk still gets "
                             "its own reply); 0: one chunk per stream per step (default: "
                             "--max-bucket)")
    parser.add_argument("--executor", choices=EXECUTORS, default="auto",
                        help="what runs the steps: auto (ONNX Runtime on CPU when it covers "
                             "the model, else Keras; on a GPU torch when installed, else "
                             "Keras), or the one named (refused if it cannot run the model); "
                             "the ready line and STATS name it and why auto fell back")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime intra-op / torch CPU threads (default: all cores; "
                             "the Keras executor ignores it)")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="bf16 runs on the torch executor only (where the CPU has AMX / "
                             "AVX512-BF16, or on CUDA); outputs then differ from float32")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                        help="fused LSTM/GRU/SimpleRNN fast path of the Keras executor and "
                             "of generation, which runs on the Keras clone (default: on for "
                             "CPU, off for GPU where Keras can use cuDNN)")
    parser.add_argument("--xla", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the Keras executor's step and generation loops with "
                             "XLA (default: on for CPU, off for GPU); XLA runs faster but "
                             "takes longer to trace")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="trace every step bucket before announcing ready")
    durable = parser.add_mutually_exclusive_group()
    durable.add_argument("--checkpoint-dir", default=defaults.checkpoint_dir,
                         help="keep stream states durable: write <dir>/<name>.ckpt between "
                              "steps and on shutdown, resume from it on start")
    durable.add_argument("--store", default=None, metavar="URL",
                         help="multi-machine: hold streams by lease and checkpoint each one "
                              "in Redis (redis://, rediss://, redis+sentinel://, "
                              "redis+cluster://; docs/operations.md)")
    parser.add_argument("--checkpoint-every-steps", type=int, default=None,
                        help="write a checkpoint after this many batched steps (0: off; "
                             f"default: {defaults.checkpoint_every_steps} with "
                             "--checkpoint-dir, 0 with --store)")
    parser.add_argument("--checkpoint-every-s", type=float, default=defaults.checkpoint_every_s,
                        help="write a checkpoint when this many seconds passed (0: off); "
                             "with --store, clients keep unacknowledged chunks about this "
                             "long (their replay buffer must cover it)")
    parser.add_argument("--lease-ttl-ms", type=int, default=2000,
                        help="with --store: the worker's lease ttl (renewed every ttl/4); "
                             "a worker that cannot renew in time fences itself, exit 3")
    parser.add_argument("--ignore-bad-checkpoint", action="store_true",
                        help="start empty if the checkpoint is corrupt (the bad file is moved "
                             "aside to <name>.ckpt.bad-<time>); default: refuse to start")
    add_checkpoint_key_argument(parser, "signs the checkpoints and checks the --weights-from "
                                        "files")
    parser.add_argument("--name", default=defaults.name,
                        help="this worker's name (checkpoint file name; with --store unique "
                             "among live workers)")
    parser.add_argument("--advertise", default=None,
                        help="with --store: the endpoint routers connect to (default: the "
                             "bound one; set it when binding 0.0.0.0)")
    parser.add_argument("--curve-secret-key", default=defaults.curve_secret_key, metavar="FILE",
                        help="CURVE: encrypt and authenticate clients with this server key "
                             "(.key_secret from `streamrnn keys curve`)")
    parser.add_argument("--curve-allow", default=defaults.curve_allow, metavar="DIR_OR_FILE",
                        help="CURVE: client public keys (.key files) that may connect")
    parser.add_argument("--curve-routers", default=defaults.curve_routers,
                        metavar="DIR_OR_FILE",
                        help="CURVE: routers' public keys (.key files, e.g. their "
                             "--curve-client-key): they may connect (no need to list them in "
                             "--curve-allow), and the client key they vouch for is a "
                             "request's identity (stream owners, --max-streams-per-identity)")
    parser.add_argument("--max-streams", type=int, default=None,
                        help="live streams in all; those beyond --slots are swapped to host "
                             "memory (LRU) and back (default: --slots)")
    parser.add_argument("--max-streams-per-identity", type=int,
                        default=defaults.max_streams_per_identity, metavar="N",
                        help="open streams one client identity may create (its CURVE key; "
                             "without CURVE its connection), beyond: QUOTA_EXCEEDED (default "
                             "0: no limit but --max-streams)")
    parser.add_argument("--weights-from", default=None,
                        help="follow a trainer's --publish-dir: load each newer weights-v{N} "
                             "between steps (stream states are kept)")
    parser.add_argument("--weights-poll-s", type=float, default=0.5,
                        help="check the --weights-from directory at most this often")
    add_metrics_argument(parser)
    add_logging_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    configure_logging(args.log_level, args.log_format)
    from streamrnn.errors import CheckpointError
    from streamrnn.security import checkpoint_key, checkpoint_key_file

    args.checkpoint_key = checkpoint_key_file(args.checkpoint_key)  # or $STREAMRNN_CHECKPOINT_KEY
    try:
        key = checkpoint_key(args.checkpoint_key)
    except CheckpointError as exc:
        log.error("refusing to start: %s", exc)
        return 2
    if not _precheck(args, key):
        return 2
    from streamrnn.engine.engine import Engine
    from streamrnn.errors import NotSupportedError, UnsupportedModelError
    from streamrnn.serving.worker import StreamWorker, WorkerConfig, freeze_heap

    try:
        engine = Engine.from_keras(args.model, slots=args.slots, max_bucket=args.max_bucket,
                                   jit_compile=args.xla, max_streams=args.max_streams,
                                   fused=args.fused, executor=args.executor,
                                   threads=args.threads, precision=args.precision)
    except (UnsupportedModelError, NotSupportedError) as exc:
        log.error("cannot serve %s: %s", args.model, exc)
        return 2
    executor = engine.executor.name + (
        f" (auto fell back: {engine.executor_fallback})" if engine.executor_fallback else "")
    if args.warmup:
        engine.executor.warmup()
    if args.weights_from:
        from streamrnn.engine.weights import WeightsFollower

        engine = WeightsFollower(engine, args.weights_from, poll_s=args.weights_poll_s, key=key)
    config = WorkerConfig(
        bind=args.bind, batch_window_us=args.batch_window_us, max_queue=args.max_queue,
        coalesce_steps=args.max_bucket if args.coalesce_steps is None else args.coalesce_steps,
        idle_timeout_s=args.idle_timeout_s, max_frame_bytes=args.max_frame_bytes,
        checkpoint_dir=args.checkpoint_dir, model_name=os.path.basename(args.model),
        checkpoint_every_steps=(WorkerConfig.checkpoint_every_steps
                                if args.checkpoint_every_steps is None
                                else args.checkpoint_every_steps),
        checkpoint_every_s=args.checkpoint_every_s, name=args.name,
        curve_secret_key=args.curve_secret_key, curve_allow=args.curve_allow,
        curve_routers=args.curve_routers, checkpoint_key=args.checkpoint_key,
        metrics_port=args.metrics_port, reply_cache_bytes=args.reply_cache_bytes,
        reply_cache_stream_bytes=args.reply_cache_stream_bytes,
        max_generate_steps=args.max_generate_steps,
        max_streams_per_identity=args.max_streams_per_identity,
    )
    if args.store:
        # collect before the lease is taken: a full collection over the model's objects
        # holds the GIL for seconds on a loaded machine, and the lease must be renewed
        freeze_heap()
    box: dict[str, StreamWorker] = {}
    store = _open_store(args, box, key) if args.store else None
    if args.store and store is None:
        return 2
    worker = box["worker"] = StreamWorker(engine, config, store=store)
    if not _restore(worker, args):
        return 2

    stop_on_signals(worker, log, "finishing queued work, then exiting")
    freeze_heap()  # the model and its libraries stay out of every later full collection
    endpoint = worker.start()
    metrics = "" if worker.metrics_port is None else f", metrics={metrics_url(worker.metrics_port)}"
    log_ready(log, READY_MARKER, endpoint, f"(slots={engine.slots}, model={config.model_name}, "
                                           f"executor={executor}, kernel={engine.kernel}"
                                           f"{metrics})")
    wait(worker)
    if worker.fenced:
        log.error("worker %r fenced itself (its lease lapsed): exiting with status 3",
                  args.name)
        return 3
    log.info("worker stopped cleanly")
    return 0


def _open_store(args: argparse.Namespace, box: dict[str, StreamWorker],
                key: bytes | None = None) -> StreamStore | None:
    """Connect to ``--store``, take the worker's lease, and return its stream store (None,
    logged, when Redis cannot be reached or a live worker has the name)."""
    from streamrnn.cluster.redis_checkpoints import open_worker_store
    from streamrnn.errors import StoreError

    every_steps = args.checkpoint_every_steps or 0
    try:
        store = open_worker_store(args.store, args.name, _lease_info(args, box),
                                  ttl_ms=args.lease_ttl_ms, model=os.path.basename(args.model),
                                  every_s=args.checkpoint_every_s, every_steps=every_steps,
                                  key=key)
    except StoreError as exc:
        log.error("cannot start: %s", exc)
        return None
    log.info("worker lease held in %s, ttl %d ms", store.where, args.lease_ttl_ms)
    return store


def _lease_info(args: argparse.Namespace, box: dict[str, StreamWorker]
                ) -> Callable[[], dict[str, Any]]:
    """What the worker's lease publishes on every renew: endpoint, CURVE key, load (no
    room and no endpoint until the worker is bound)."""
    curve_public = ""
    if args.curve_secret_key:
        import zmq.auth

        curve_public = zmq.auth.load_certificate(args.curve_secret_key)[0].decode("ascii")

    def info() -> dict[str, Any]:
        worker = box.get("worker")
        if worker is None or worker.endpoint is None:
            return {"endpoint": "", "curve_public": curve_public, "capacity_left": 0,
                    "streams": 0, "describe": {}}
        engine = worker.engine
        left = int(engine.capacity_left)
        return {"endpoint": args.advertise or worker.endpoint, "curve_public": curve_public,
                "capacity_left": left, "streams": int(engine.max_streams - left),
                "describe": worker.describe()}

    return info


def _checkpoint_usable(path: Path, args: argparse.Namespace,
                       check: Callable[[], object]) -> bool:
    """Run ``check`` (which may raise CheckpointError); on a bad file refuse to start
    (False), or with --ignore-bad-checkpoint move it aside and go on empty (True)."""
    from streamrnn.errors import CheckpointError

    try:
        check()
    except CheckpointError as exc:
        if not args.ignore_bad_checkpoint:
            log.error("refusing to start: %s. Move the file away, or pass "
                      "--ignore-bad-checkpoint to start without its streams.", exc)
            return False
        aside = path.with_name(f"{path.name}.bad-{int(time.time())}")
        os.replace(path, aside)
        log.warning("ignoring bad checkpoint (%s); moved it to %s and starting empty", exc,
                    aside)
    return True


def _precheck(args: argparse.Namespace, key: bytes | None) -> bool:
    """Before loading TensorFlow: do the CURVE options fit together, and is the checkpoint
    file (if any) intact (and signed with ``key``, if given)?"""
    from streamrnn.serving.checkpoint import load_checkpoint
    from streamrnn.serving.durability import checkpoint_path

    if args.curve_routers and not args.curve_secret_key:
        log.error("refusing to start: --curve-routers needs --curve-secret-key")
        return False
    if not args.checkpoint_dir:
        return True
    path = checkpoint_path(args.checkpoint_dir, args.name)
    if not path.exists():
        return True
    return _checkpoint_usable(path, args, lambda: load_checkpoint(path, key=key))


def _restore(worker: StreamWorker, args: argparse.Namespace) -> bool:
    """Resume the worker's checkpoint (its states must fit this model and --max-streams)."""
    if worker.store is None or not args.checkpoint_dir:
        return True  # a Redis store restores each stream when it claims it
    path = Path(worker.store.where)
    restored: list[int] = []
    if not _checkpoint_usable(path, args, lambda: restored.append(worker.restore_checkpoint())):
        return False
    if restored and restored[0]:
        log.info("restored %d streams from %s", restored[0], path)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m streamrnn.cli.worker``; returns the exit status."""
    return lifecycle.main(argv, "worker", "streamrnn stream worker", add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
