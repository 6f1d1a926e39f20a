"""The records a :class:`~streamrnn.cluster.redis_store.RedisStore` returns, and their
encoding in Redis hashes (pure: no Redis connection).

- :class:`Holding`: a stream's holder ``{worker, token, epoch}`` (worker "" when released);
- :class:`Claimed`: a claim's new epoch and the stream's checkpoint blob;
- :class:`WorkerInfo`: a live worker's published info (endpoint, CURVE key, load).

Values read back from Redis are decoded leniently (a malformed number reads 0, malformed
``describe`` JSON reads ``{}``): what another process wrote never raises here.

Example:

>>> holding({b"worker": b"w1", b"token": b"ab12", b"epoch": b"3"})
Holding(worker='w1', token='ab12', epoch=3)
>>> info_args({"endpoint": "tcp://10.0.0.5:5555", "capacity_left": 12})
['endpoint', 'tcp://10.0.0.5:5555', 'capacity_left', '12']
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Claimed", "Holding", "INFO_FIELDS", "WorkerInfo", "holding", "info_args", "text",
           "worker_info"]

#: the fields of a worker's info hash (``register``/``renew`` take a dict of these)
INFO_FIELDS = ("capacity_left", "curve_public", "describe", "endpoint", "streams")


@dataclass(frozen=True)
class Holding:
    """A stream's holder: ``worker`` and its incarnation ``token`` ("" when released), and the
    stream's ``epoch`` (the number of claims so far)."""

    worker: str
    token: str
    epoch: int

    @property
    def free(self) -> bool:
        """True when released (or closed): no worker holds the stream."""
        return not self.worker


@dataclass(frozen=True)
class Claimed:
    """A successful claim: the stream's new ``epoch`` and its checkpoint ``blob`` (None: none)."""

    epoch: int
    blob: bytes | None


@dataclass(frozen=True)
class WorkerInfo:
    """A live worker as published in its lease's info hash."""

    name: str
    token: str
    endpoint: str = ""
    curve_public: str = ""
    capacity_left: int = 0
    streams: int = 0
    describe: dict = field(default_factory=dict)


def text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(text(value))
    except ValueError:
        return default


def holding(raw: dict) -> Holding | None:
    if not raw:
        return None
    get = {text(k): v for k, v in raw.items()}.get
    return Holding(text(get("worker")), text(get("token")), _int(get("epoch")))


def worker_info(name: str, raw: dict) -> WorkerInfo | None:
    get = {text(k): v for k, v in raw.items()}.get
    if not get("token"):
        return None
    try:
        describe = json.loads(text(get("describe")) or "{}")
    except ValueError:
        describe = {}
    return WorkerInfo(name=name, token=text(get("token")), endpoint=text(get("endpoint")),
                      curve_public=text(get("curve_public")),
                      capacity_left=_int(get("capacity_left")), streams=_int(get("streams")),
                      describe=describe if isinstance(describe, dict) else {})


def info_args(info: dict) -> list[str]:
    unknown = sorted(set(info) - set(INFO_FIELDS))
    if unknown:
        raise ValueError(f"unknown worker info fields {unknown} (known: {list(INFO_FIELDS)})")
    flat: list[str] = []
    for name, value in info.items():
        if name == "describe":
            value = json.dumps(value or {}, sort_keys=True, default=str)
        elif isinstance(value, bytes):
            value = value.decode("ascii")
        flat += [name, "" if value is None else str(value)]
    return flat
