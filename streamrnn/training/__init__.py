"""Training without teacher forcing: the free-running trainer and the online trainer.

Modules (import from them; this package imports nothing itself):

- ``config``: :class:`~streamrnn.training.config.TrainConfig` and the scheduled-sampling
  curriculum (:func:`~streamrnn.training.config.feed_probability`).
- ``trainer``: :class:`~streamrnn.training.trainer.FreeRunningTrainer`, many streams
  trained in one batch, one row ("slot") per stream, truncated BPTT.
- ``chain``: the Keras chain as the trainer steps it (one timestep, input kind, loss).
- ``graph``: the compiled ``tf.while_loop`` that feeds back or observes at every step.
- ``inputs``: checks of training chunks and targets.
- ``checkpoint``: the trainer's checkpoint file (not the serving worker's).
- ``online``: :class:`~streamrnn.training.online.OnlineTrainer`, the trainer as an
  EngineLike that a StreamWorker serves.
- ``chunk_log``: what durable training needs (the :class:`~streamrnn.training.chunk_log.
  ChunkLog` protocol, its records; implemented over Redis in
  :mod:`streamrnn.cluster.training_log`).
- ``front``: :class:`~streamrnn.training.front.LogFront`, the EngineLike that appends
  training requests to the log; ``consumer``: :class:`~streamrnn.training.consumer.
  LogConsumer`, which trains them exactly once and acknowledges after checkpoints.
- ``loss_curve``: the loss-vs-step PNG.

Example::

    from streamrnn.training.config import TrainConfig
    from streamrnn.training.trainer import FreeRunningTrainer

    trainer = FreeRunningTrainer(model, slots=16, config=TrainConfig(mode="scheduled"))
"""

from __future__ import annotations

__all__: list[str] = []
