"""Many workers behind one endpoint.

Stateless routers (any number, on one Redis): :mod:`~streamrnn.cluster.router` (the loop),
:mod:`~streamrnn.cluster.front` (its client socket),
:mod:`~streamrnn.cluster.worker_links` (one DEALER per live worker, CURVE),
:mod:`~streamrnn.cluster.ownership` (live workers and the stream -> worker cache, from
Redis) and :mod:`~streamrnn.cluster.placement` (holder or least-loaded worker; pure)."""

__all__: list[str] = []
