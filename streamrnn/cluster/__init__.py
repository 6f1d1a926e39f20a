"""Many workers behind one endpoint.

:mod:`~streamrnn.cluster.router` (the client side and the loop),
:mod:`~streamrnn.cluster.backend` (its sockets toward the workers, failover),
:mod:`~streamrnn.cluster.membership` (admission, liveness and failover decisions; pure),
:mod:`~streamrnn.cluster.link` (the worker-link message kinds) and
:mod:`~streamrnn.cluster.registration` (the worker's side: heartbeats, adoption)."""

__all__: list[str] = []
