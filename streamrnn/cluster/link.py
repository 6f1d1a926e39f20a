"""The worker-router link's message kinds (the first frame of each message on the router's
worker endpoint; the second is a msgpack map). Shared by the router and the worker side
(:mod:`streamrnn.cluster.registration`).
"""

__all__ = ["ADOPT", "ADOPTED", "FENCED", "HEARTBEAT"]

HEARTBEAT = b"HB"  # worker -> router: {name, endpoint, checkpoint, capacity_left, streams, ...}
ADOPT = b"ADOPT"  # router -> worker: {id, path, streams}
ADOPTED = b"ADOPTED"  # worker -> router: {id, streams, error}
FENCED = b"FENCED"  # router -> worker: you were declared dead; exit without checkpointing
