"""The worker process's engine wrapper: :class:`~streamrnn.serving.worker.StreamWorker` and
its rooms.

* ``worker``: the facade (:class:`StreamWorker`), ``config``: :class:`WorkerConfig`;
* ``io_thread``: the I/O thread (the ROUTER socket), ``compute``: the compute thread (the
  engine), ``outbox``: what the two share (:class:`Channels`: the :class:`WorkQueue` of
  requests, the :class:`Outbox` of replies);
* ``batching``: the pure round planner (a :class:`Plan` per batch), ``applying`` and
  ``stepping``: applying a plan to the engine, ``replies``: the compute side of replying;
* ``sequencing``: exactly-once sequence numbers, ``store``: :class:`StreamStore`, what a
  worker keeps durable and which streams it may serve (checkpoint files: ``durability`` /
  ``checkpoint``; Redis: :mod:`streamrnn.cluster.redis_checkpoints`), ``stats``: typed
  counters, ``sockets``: the hardened client-facing ROUTER.
"""

__all__: list[str] = []
