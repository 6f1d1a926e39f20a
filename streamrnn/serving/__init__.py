"""The worker process's engine wrapper: :class:`~streamrnn.serving.worker.StreamWorker` and
its rooms (sockets, sequencing, checkpoints)."""
