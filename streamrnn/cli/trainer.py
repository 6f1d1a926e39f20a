"""The online trainer process: ``python -m streamrnn.cli.trainer --model M.keras ...``.

Serves an :class:`~streamrnn.training.online.OnlineTrainer` with a
:class:`~streamrnn.serving.worker.StreamWorker`: training streams are published over ZeroMQ like
inference streams (``streamrnn publish``, :class:`streamrnn.Client`). Resumes from
``--checkpoint`` if it exists, checkpoints every ``--checkpoint-every`` steps, publishes
``weights-v{N}.npz`` + ``LATEST`` into ``--publish-dir`` every ``--publish-every`` steps
(workers follow it with ``--weights-from``), shows a live progress line, and on
SIGTERM/SIGINT finishes queued chunks, checkpoints, publishes, writes the loss curve PNG and
exits 0. The same entry point backs ``streamrnn trainer``.

The checkpoint also keeps the sequence numbers of the trainer's streams, so a Client goes on
after a restart. A truncated, edited or foreign checkpoint is refused: exit 2 with the
reason, no traceback.

With ``--store redis://...`` (and ``--checkpoint``) training is durable: an accepted PUSH is
appended to the Redis Stream ``srnn:{train}:log`` and answered (an OUTPUT with an empty
``output``) once it is there (:class:`~streamrnn.training.front.LogFront`); a consumer
thread (:class:`~streamrnn.training.consumer.LogConsumer`, consumer group ``trainers``,
consumer name ``--name``) trains the entries, checkpoints and only then acknowledges them.
A kill -9 loses nothing: the restarted (or a replacement) trainer resumes from its
checkpoint and applies exactly the entries it does not cover. If the consumer fails, the
process exits 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from streamrnn.cli import lifecycle
from streamrnn.cli.keys import add_checkpoint_key_argument
from streamrnn.cli.lifecycle import log_ready, stop_on_signals, wait
from streamrnn.logs import add_logging_arguments, configure_logging
from streamrnn.metrics import Metrics, add_metrics_argument, metrics_url

if TYPE_CHECKING:
    from streamrnn.serving.worker import StreamWorker
    from streamrnn.training.consumer import LogConsumer
    from streamrnn.training.front import LogFront
    from streamrnn.training.online import OnlineTrainer

__all__ = ["READY_MARKER", "add_arguments", "main", "run"]

log = logging.getLogger("streamrnn.trainer")

READY_MARKER = "streamrnn trainer ready on "


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The trainer's command-line options (shared with ``streamrnn trainer``)."""
    parser.add_argument("--model", required=True,
                        help="initial Keras model (.keras); a checkpoint overrides its weights")
    parser.add_argument("--slots", type=int, default=16, help="training streams at once")
    parser.add_argument("--bind", default="tcp://127.0.0.1:5560",
                        help="ZeroMQ endpoint (port 0 picks a free one; see the ready line)")
    parser.add_argument("--mode", choices=("free", "teacher", "scheduled"), default="free",
                        help="feed back own outputs after the warm-up (free), never (teacher) "
                             "or with a rising probability (scheduled)")
    parser.add_argument("--warmup", type=int, default=8,
                        help="observed steps at the start of every chunk")
    parser.add_argument("--schedule", choices=("linear", "exponential", "inverse_sigmoid"),
                        default="inverse_sigmoid", help="scheduled-sampling curve")
    parser.add_argument("--schedule-steps", type=int, default=1000,
                        help="linear schedule: steps until always feeding back")
    parser.add_argument("--schedule-k", type=float, default=100.0,
                        help="exponential base (0..1) or inverse-sigmoid k (>= 1)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--clipnorm", type=float, default=1.0, help="gradient clip norm")
    parser.add_argument("--sample", default="greedy",
                        choices=("greedy", "temperature", "top_k", "sample"),
                        help="how token models pick the fed-back token")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--max-chunk", type=int, default=256,
                        help="longest window per optimizer step (power of two)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--xla", action=argparse.BooleanOptionalAction, default=False,
                        help="compile the train step with XLA (faster steps, slower start)")
    parser.add_argument("--paired", action="store_true",
                        help="chunks carry targets: [T, in+out] floats or [T, 2] token ids")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file (.npz): resumed from if present, written "
                             "atomically every --checkpoint-every steps and on shutdown")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--publish-dir", default=None,
                        help="publish weights-v{N}.npz and LATEST here for live workers")
    parser.add_argument("--publish-every", type=int, default=100)
    add_checkpoint_key_argument(parser, "signs the published weights")
    parser.add_argument("--keep-versions", type=int, default=5,
                        help="published versions kept on disk (0: all)")
    parser.add_argument("--loss-png", default=None,
                        help="write the loss curve here (on publish and on shutdown)")
    parser.add_argument("--batch-window-us", type=int, default=2000,
                        help="wait this long for chunks of more streams to share a step")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="live progress display (default: when stderr is a terminal)")
    parser.add_argument("--store", default=None, metavar="URL",
                        help="durable training log in Redis (redis://host:port/0, rediss://, "
                             "redis+sentinel://, redis+cluster://); needs --checkpoint")
    parser.add_argument("--name", default="trainer",
                        help="this trainer's consumer name in the log's group (--store)")
    parser.add_argument("--claim-idle-ms", type=int, default=10_000,
                        help="--store: take over another trainer's unacknowledged entries "
                             "once idle this long")
    add_metrics_argument(parser)
    add_logging_arguments(parser)
    return parser


def _progress_table(p: dict) -> object:
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    for _ in range(7):
        table.add_column(justify="right")
    table.add_row("[bold]step", "[bold]loss", "[bold]steps/s", "[bold]timesteps/s",
                  "[bold]weights", "[bold]streams", "[bold]mode")
    table.add_row(f"{p['step']:,}", f"{p['loss']:.5g}", f"{p['steps_per_s']:.1f}",
                  f"{p['timesteps_per_s']:,.0f}", f"v{p['version']}", str(p["streams"]),
                  p["mode"])
    return table


def run(args: argparse.Namespace) -> int:
    """Train until SIGTERM/SIGINT; returns the exit status."""
    configure_logging(args.log_level, args.log_format)
    from streamrnn.errors import CheckpointError, InvalidInputError, StoreError
    from streamrnn.training.checkpoint import TrainerCheckpoint

    if args.store and not args.checkpoint:
        log.error("--store needs --checkpoint: log entries are acknowledged only once a "
                  "checkpoint covers them")
        return 2
    try:
        if args.checkpoint:  # before TensorFlow loads: a bad file is refused at once
            TrainerCheckpoint.load(args.checkpoint)
        online, metrics = _build(args)
        front, consumer = _durable_log(args, online) if args.store else (None, None)
    except (CheckpointError, InvalidInputError, StoreError) as exc:
        log.error("refusing to start: %s", exc)
        return 2
    from streamrnn.serving.worker import StreamWorker, WorkerConfig
    from streamrnn.training.loss_curve import write_loss_curve

    trainer = online.trainer
    worker = StreamWorker(front or online, WorkerConfig(
        bind=args.bind, batch_window_us=args.batch_window_us,
        coalesce_steps=0,  # one chunk per training step: every chunk trains on its own
        idle_timeout_s=0.0,  # training streams never expire (a serving worker's: 3600 s)
        model_name=os.path.basename(args.model)))
    if front is None:
        online.attach_sequences(worker.sequences)
    else:
        front.attach(worker.sequences)
        consumer.start()
    stop_on_signals(worker, log, "finishing queued chunks, then checkpointing")
    endpoint = worker.start()
    log_ready(log, READY_MARKER, endpoint, f"(slots={args.slots}, mode={args.mode}, "
                                           f"step={trainer.step}, weights v{trainer.version})")
    _follow(args, worker, online, consumer)
    if consumer is None:
        online.shutdown()  # the compute thread has ended: safe to touch the trainer here
    elif not _finish(consumer):
        return 1
    if args.loss_png:
        write_loss_curve(online.loss_history(), args.loss_png,
                         title=f"streamrnn trainer ({args.mode})")
    if metrics is not None:
        metrics.close()
    log.info("trainer stopped cleanly at step %d (weights v%d, %d checkpoints)", trainer.step,
             trainer.version, online.checkpoints_written)
    return 0


def _durable_log(args: argparse.Namespace, online: OnlineTrainer
                 ) -> tuple[LogFront, LogConsumer]:
    """The front and the consumer of the Redis training log (``--store``)."""
    from streamrnn.cluster.redis_keys import redact_url
    from streamrnn.cluster.redis_store import RedisStore
    from streamrnn.cluster.training_log import RedisChunkLog
    from streamrnn.training.consumer import LogConsumer
    from streamrnn.training.front import LogFront

    store = RedisStore.from_url(args.store)
    chunk_log = RedisChunkLog(store.client, prefix=store.prefix, consumer=args.name)
    log.info("training log %s in %s (consumer %r)", chunk_log.key, redact_url(args.store),
             args.name)
    return LogFront(online, chunk_log), LogConsumer(online, chunk_log,
                                                    claim_idle_ms=args.claim_idle_ms)


def _finish(consumer: LogConsumer) -> bool:
    """After the front stopped: let the consumer train what is left and checkpoint; False
    (and a log line) if it failed."""
    consumer.stop()
    consumer.join()
    if consumer.failed is not None:
        log.error("the training log consumer failed (%s): exiting 1; a restart resumes "
                  "from the checkpoint and the log", consumer.failed)
        return False
    c = consumer.counts
    log.info("training log: %d chunks applied in all (this run: %d applied, %d already "
             "covered, %d duplicates, %d rejected, %d acknowledged)", consumer.applied,
             c["applied"], c["covered"], c["duplicates"], c["rejected"], c["acked"])
    return True


def _build(args: argparse.Namespace) -> tuple[OnlineTrainer, Metrics | None]:
    """The online trainer (resumed from ``--checkpoint`` if it exists) and its metrics."""
    from streamrnn.executors.models import load_model
    from streamrnn.security import checkpoint_key
    from streamrnn.training.config import TrainConfig
    from streamrnn.training.online import OnlineTrainer
    from streamrnn.training.trainer import FreeRunningTrainer

    config = TrainConfig(
        mode=args.mode, warmup=args.warmup, schedule=args.schedule,
        schedule_steps=args.schedule_steps, schedule_k=args.schedule_k,
        learning_rate=args.lr, clipnorm=args.clipnorm or None, sample=args.sample,
        temperature=args.temperature, top_k=args.top_k, seed=args.seed,
        max_chunk=args.max_chunk, jit_compile=args.xla,
    )
    trainer = FreeRunningTrainer(load_model(args.model), slots=args.slots, config=config)
    metrics = None
    if args.metrics_port is not None:
        metrics = Metrics(role="trainer")
        log.info("metrics on %s", metrics_url(metrics.serve(args.metrics_port)))
    online = OnlineTrainer(
        trainer, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
        publish_dir=args.publish_dir, publish_every=args.publish_every,
        keep_versions=args.keep_versions, paired=args.paired, metrics=metrics,
        publish_key=checkpoint_key(args.checkpoint_key),
    )
    if online.resumed:
        log.info("resumed from %s at step %d (weights v%d, %d streams)", args.checkpoint,
                 trainer.step, trainer.version, len(trainer.table))
    return online, metrics


def _follow(args: argparse.Namespace, worker: StreamWorker, online: OnlineTrainer,
            consumer: LogConsumer | None) -> None:
    """Until the worker stops: show progress (a live table on a terminal, else a log line
    every 10 s) and rewrite the loss curve PNG after new weight versions. A log consumer
    that died stops the worker (the process then exits 1)."""
    from streamrnn.training.loss_curve import write_loss_curve

    trainer = online.trainer
    last_png = time.monotonic()
    last_version = trainer.version

    def tick() -> None:
        nonlocal last_png, last_version
        if consumer is not None and not consumer.is_alive():
            worker.stop()
        if args.loss_png and trainer.version != last_version and time.monotonic() - last_png > 5:
            write_loss_curve(online.loss_history(), args.loss_png)
            last_png, last_version = time.monotonic(), trainer.version

    show = sys.stderr.isatty() if args.progress is None else args.progress
    if show:
        from rich.console import Console
        from rich.live import Live

        with Live(_progress_table(online.progress()), console=Console(stderr=True),
                  refresh_per_second=4, transient=False) as live:

            def update() -> None:
                live.update(_progress_table(online.progress()))
                tick()

            wait(worker, update, every_s=0.25)
            live.update(_progress_table(online.progress()))
        return
    next_log = time.monotonic() + 10

    def log_progress() -> None:
        nonlocal next_log
        tick()
        if time.monotonic() >= next_log:
            p = online.progress()
            log.info("step %d loss %.5g steps/s %.1f timesteps/s %.0f weights v%d",
                     p["step"], p["loss"], p["steps_per_s"], p["timesteps_per_s"],
                     p["version"])
            next_log = time.monotonic() + 10

    wait(worker, log_progress)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m streamrnn.cli.trainer``; returns the exit status."""
    return lifecycle.main(argv, "trainer", "streamrnn online trainer", add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
