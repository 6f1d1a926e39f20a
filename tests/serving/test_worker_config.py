"""One set of worker defaults: an in-process StreamWorker's WorkerConfig() and a worker
process started without options (``streamrnn worker --model M``) behave alike."""

from __future__ import annotations

import argparse
from dataclasses import fields

from streamrnn.cli.worker import add_arguments
from streamrnn.serving.config import WorkerConfig
from streamrnn.serving.worker import WorkerConfig as ExportedConfig

#: WorkerConfig fields the worker CLI has no option of its own for
NOT_FLAGS = {
    "coalesce_steps",  # --coalesce-steps, whose default follows --max-bucket
    "max_batch",
    "busy_retry_after_ms",
    "model_name",  # the --model file's name
}


def _cli_defaults() -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser()).parse_args(["--model", "m.keras"])


def test_worker_config_defaults_are_the_clis():
    args, config = _cli_defaults(), WorkerConfig()
    flagged = [f.name for f in fields(WorkerConfig) if f.name not in NOT_FLAGS]
    assert set(flagged) <= set(vars(args)), "every other field has a CLI option"
    by_backend = {"checkpoint_every_steps"}  # resolved below
    assert {name: getattr(config, name) for name in flagged if name not in by_backend} == {
        name: getattr(args, name) for name in flagged if name not in by_backend}
    # --coalesce-steps defaults to --max-bucket
    assert args.coalesce_steps is None and config.coalesce_steps == args.max_bucket
    # --checkpoint-every-steps defaults per store: unset on the command line, the worker
    # takes WorkerConfig's (100) with --checkpoint-dir and 0 (by time only) with --store
    assert args.checkpoint_every_steps is None and config.checkpoint_every_steps == 100


def test_the_documented_defaults():
    """docs/operations.md's table (the CLI is what it documents)."""
    config = WorkerConfig()
    assert (config.batch_window_us, config.max_queue, config.idle_timeout_s) == (500, 4096, 3600.0)
    assert (config.reply_cache_stream_bytes, config.reply_cache_bytes,
            config.max_generate_steps) == (2 * 1024 * 1024, 64 * 1024 * 1024, 4096)
    assert (config.coalesce_steps, config.max_frame_bytes) == (64, 33554432)
    assert (config.checkpoint_every_steps, config.checkpoint_every_s) == (100, 1.0)
    assert ExportedConfig is WorkerConfig
