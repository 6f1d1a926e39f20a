"""Many workers behind one endpoint.

Stateless routers (any number, on one Redis): :mod:`~streamrnn.cluster.router` (the loop),
:mod:`~streamrnn.cluster.front` (its client socket),
:mod:`~streamrnn.cluster.worker_links` (one DEALER per live worker, CURVE),
:mod:`~streamrnn.cluster.holders` (live workers and the stream -> worker cache, from
Redis) and :mod:`~streamrnn.cluster.placement` (holder or least-loaded worker; pure).

The Redis store: :mod:`~streamrnn.cluster.redis_store` (RedisStore: leases, holders and
fencing epochs, checkpoints, claim notices), :mod:`~streamrnn.cluster.redis_scripts` (its Lua
scripts, one hash tag each), :mod:`~streamrnn.cluster.redis_keys` (key names, ``--store``
URLs; pure), :mod:`~streamrnn.cluster.redis_records` (its records; pure),
:mod:`~streamrnn.cluster.redis_watch` (claim notices) and :mod:`~streamrnn.cluster.lease`
(LeaseKeeper: a worker's lease, renewed from a thread).

The worker's side: :mod:`~streamrnn.cluster.redis_checkpoints` (RedisStreamStore, the
``streamrnn worker --store`` backend of :class:`~streamrnn.serving.store.StreamStore`: claims
streams, fenced per-stream checkpoints of only the streams that changed) and
:mod:`~streamrnn.cluster.stream_blob` (one stream's checksummed checkpoint blob).

The durable training log: :mod:`~streamrnn.cluster.training_log` (RedisChunkLog: a Redis
Stream with the consumer group ``trainers``, for ``streamrnn trainer --store``)."""

__all__: list[str] = []
