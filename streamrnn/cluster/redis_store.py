"""RedisStore: worker leases, stream holders with fencing epochs, and checkpoint blobs in Redis.

One store object wraps one redis-py client (``redis.Redis`` for a single server or Sentinel,
``redis.cluster.RedisCluster`` for a Cluster). Every call that changes a lease, a holder or a
checkpoint is one Lua script (:mod:`~streamrnn.cluster.redis_scripts`) on the keys of one
hash tag; calls over many streams go in one pipeline (on a Cluster redis-py splits it by
node). Redis failures raise :class:`~streamrnn.errors.StoreError`.

- A **worker** registers a lease (``register``: its name, an incarnation token, a ttl and its
  info) and renews it (``renew``) well before the ttl; a lease that expired cannot be renewed.
- A **holder** is the worker that claimed a stream: ``claim`` compare-and-sets the holder
  and increments the stream's **epoch** (it only ever grows); ``save`` writes a checkpoint
  only when worker, token and epoch all still match, so a paused worker's late writes are
  refused; ``acquire`` claims a stream that is free, already ours, or held by a dead lease.

Example::

    store = RedisStore.from_url("redis://127.0.0.1:6379/0")
    store.register("w1", token, ttl_ms=2000, info={"endpoint": "tcp://10.0.0.5:5555"})
    got = store.acquire("stream-7", "w1", token)           # Claimed(epoch=1, blob=None)
    store.save("w1", token, [("stream-7", got.epoch, b"...")])   # {'stream-7': True}
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.retry import Retry
from redis.sentinel import Sentinel

from streamrnn.cluster.redis_keys import Keys, check_name, parse_store_url, redact_url
from streamrnn.cluster.redis_records import (
    INFO_FIELDS,
    Claimed,
    Holding,
    WorkerInfo,
    holding,
    info_args,
    text,
    worker_info,
)
from streamrnn.cluster.redis_scripts import SCRIPTS
from streamrnn.cluster.redis_watch import ClaimWatcher
from streamrnn.errors import NameTakenError, StoreError

__all__ = ["ACL_COMMANDS", "Claimed", "Holding", "INFO_FIELDS", "RedisStore", "WorkerInfo"]

#: the commands RedisStore runs (directly or inside its scripts): an ACL user for streamrnn
#: needs them on the keys and channels ``<prefix>:*``, e.g. ``ACL SETUSER app on >pw
#: ~srnn:* &srnn:* +evalsha +script|load +get +set ...`` (the trainer's log needs more)
ACL_COMMANDS = ("del", "evalsha", "get", "hget", "hgetall", "hmget", "hset", "persist",
                "pexpire", "ping", "publish", "script|load", "set", "subscribe", "time", "zadd",
                "zrange", "zrem", "zremrangebyscore")
_PIPELINE_CHUNK = 1000
# connection defaults when the URL and the caller say nothing: a call must fail in about a
# second, not hang or retry for long (a lease's ttl is 2 s): redis-py's own default retries
# a failed connection 10 times with backoff
_DEFAULTS = {"socket_timeout": 5.0, "socket_connect_timeout": 1.0, "health_check_interval": 30}
_RETRIES = 2


def _store_errors(method: Callable) -> Callable:
    """Re-raises redis-py's errors as StoreError (naming the store and the call)."""

    @functools.wraps(method)
    def wrapper(self: RedisStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (RedisError, RedisClusterException) as exc:
            raise StoreError(f"redis store {self.where}: {method.__name__} failed: "
                             f"{type(exc).__name__}: {exc}") from exc

    return wrapper


def _client_for(url: str, redis_kwargs: dict) -> tuple[Any, str]:
    spec = parse_store_url(url)
    kwargs = {**_DEFAULTS, **spec.kwargs, **redis_kwargs, "decode_responses": False}
    kwargs.setdefault("retry", Retry(ExponentialWithJitterBackoff(cap=0.25, base=0.02), _RETRIES))
    if spec.mode == "cluster":
        nodes = [ClusterNode(host, port) for host, port in spec.hosts]
        return RedisCluster(startup_nodes=nodes, **kwargs), spec.prefix
    if spec.mode == "sentinel":
        # the connections to the sentinels: the same timeouts and retries as the master's
        to_sentinels = {**{k: v for k, v in kwargs.items() if k.startswith("socket_")},
                        "retry": kwargs["retry"], **spec.sentinel_kwargs}
        sentinel = Sentinel(list(spec.hosts), sentinel_kwargs=to_sentinels, **kwargs)
        return sentinel.master_for(spec.service_name, redis_class=redis.Redis), spec.prefix
    return redis.Redis(**kwargs), spec.prefix


class RedisStore:
    """Leases, holders, epochs and checkpoints in Redis (module docstring: the model).

    Args:
        client: a redis-py client (``redis.Redis`` or ``redis.cluster.RedisCluster``) made
            with ``decode_responses=False``.
        prefix: the key prefix (``srnn``).
        where: how to name the store in errors and logs (a redacted URL).

    Example::

        store = RedisStore.from_url("redis+cluster://10.0.0.7:7000?prefix=prod")
        store.holder("stream-7")    # Holding(worker='w1', token='5f0c...', epoch=3)
    """

    def __init__(self, client: Any, prefix: str = "srnn", where: str = "") -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.prefix = prefix
        self.where = where or repr(client)
        self._scripts = {name: client.register_script(text) for name, text in SCRIPTS.items()}

    @classmethod
    def from_url(cls, url: str, *, prefix: str | None = None, **redis_kwargs: Any) -> RedisStore:
        """A store on ``url`` (``redis://``, ``rediss://``, ``redis+sentinel://``,
        ``redis+cluster://``; :func:`~streamrnn.cluster.redis_keys.parse_store_url`).

        ``prefix`` overrides the URL's ``?prefix=``; ``redis_kwargs`` go to redis-py as they
        are (e.g. ``ssl_ca_certs``). Connects lazily except on a Cluster (which reads its
        slot map now); :meth:`ping` checks the connection.
        """
        where = redact_url(url)
        try:
            client, url_prefix = _client_for(url, redis_kwargs)
        except (RedisError, RedisClusterException) as exc:
            raise StoreError(f"redis store {where}: cannot connect: {exc}") from exc
        return cls(client, prefix or url_prefix, where=where)

    @_store_errors
    def ping(self) -> None:
        """Raises StoreError unless the server answers."""
        self.client.ping()

    def close(self) -> None:
        """Closes the client's connections."""
        self.client.close()

    # -- scripts -------------------------------------------------------------------------

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self._scripts[name](keys=list(keys), args=list(args))

    def _run_many(self, calls: list[tuple[str, list, list]]) -> list[Any]:
        """Runs ``(script, keys, args)`` calls pipelined (chunks of 1000); loads a script
        the server lost (restart, failover) and runs its calls again."""
        results: list[Any] = []
        for start in range(0, len(calls), _PIPELINE_CHUNK):
            chunk = calls[start:start + _PIPELINE_CHUNK]
            got = self._pipeline(chunk)
            lost = [i for i, r in enumerate(got) if isinstance(r, NoScriptError)]
            if lost:
                for name in {chunk[i][0] for i in lost}:
                    self._scripts[name].sha = self.client.script_load(SCRIPTS[name])
                for i, result in zip(lost, self._pipeline([chunk[i] for i in lost]),
                                     strict=True):
                    got[i] = result
            for result in got:
                if isinstance(result, Exception):
                    raise result
            results += got
        return results

    def _pipeline(self, calls: list[tuple[str, list, list]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for name, keys, args in calls:
            pipe.execute_command("EVALSHA", self._scripts[name].sha, len(keys), *keys, *args)
        return pipe.execute(raise_on_error=False)

    # -- worker leases -------------------------------------------------------------------

    def _lease(self, name: str, token: str, ttl_ms: int, info: dict, register: bool) -> bool:
        check_name("worker name", name)
        keys = [self.keys.lease(name), self.keys.info(name)]
        ok = self._run("renew", keys, [token, int(ttl_ms), "1" if register else "0",
                                       *info_args(info)])
        if ok:
            self._run("touch", [self.keys.workers], [name, int(ttl_ms)])
        return bool(ok)

    @_store_errors
    def register(self, name: str, token: str, ttl_ms: int, info: dict) -> None:
        """Takes the lease of worker ``name`` for incarnation ``token`` for ``ttl_ms``.

        Raises :class:`~streamrnn.errors.NameTakenError` while a live lease of another token
        holds the name. ``info`` holds :data:`INFO_FIELDS` (``describe`` a JSON-able dict).
        """
        if not self._lease(name, token, ttl_ms, info, register=True):
            raise NameTakenError(f"worker name {name!r} is held by a live lease of another "
                                 f"worker process ({self.where})")

    @_store_errors
    def renew(self, name: str, token: str, ttl_ms: int, info: dict) -> bool:
        """Extends the lease by ``ttl_ms`` and refreshes ``info``; False when the lease is
        lost (expired, or another incarnation took the name): the worker must fence."""
        return self._lease(name, token, ttl_ms, info, register=False)

    @_store_errors
    def drop_lease(self, name: str, token: str) -> None:
        """Deletes the lease and info of ``name`` if ``token`` still holds it (clean stop)."""
        if self._run("drop", [self.keys.lease(name), self.keys.info(name)], [token]):
            self.client.zrem(self.keys.workers, name)

    @_store_errors
    def live_workers(self) -> dict[str, WorkerInfo]:
        """The workers whose lease has not expired, by name (pipelined reads)."""
        names = [text(n) for n in self._run("live", [self.keys.workers], [])]
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.keys.info(name))
        out = {}
        for name, raw in zip(names, pipe.execute() if names else [], strict=True):
            info = worker_info(name, raw)
            if info is not None:
                out[name] = info
        return out

    @_store_errors
    def lease_alive(self, name: str, token: str) -> bool:
        """True while worker ``name``'s lease holds ``token``."""
        return text(self.client.get(self.keys.lease(name))) == token

    def _leases_alive(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], bool]:
        pairs = list(dict.fromkeys(pairs))
        if not pairs:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for name, _token in pairs:
            pipe.get(self.keys.lease(name))
        return {pair: text(got) == pair[1]
                for pair, got in zip(pairs, pipe.execute(), strict=True)}

    # -- stream holders ------------------------------------------------------------------

    @_store_errors
    def holder(self, stream: str) -> Holding | None:
        """The stream's holder (``.free`` when released), or None if never claimed."""
        return holding(self.client.hgetall(self.keys.holder(stream)))

    @_store_errors
    def holders(self, streams: Iterable[str]) -> dict[str, Holding | None]:
        """:meth:`holder` of many streams in one pipeline."""
        streams = list(dict.fromkeys(streams))
        if not streams:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for stream in streams:
            pipe.hgetall(self.keys.holder(stream))
        return {s: holding(raw) for s, raw in zip(streams, pipe.execute(), strict=True)}

    def _claim_args(self, stream: str, worker: str, token: str, expected: int) -> tuple:
        return ("claim", [self.keys.holder(stream), self.keys.ckpt(stream)],
                [worker, token, int(expected), self.keys.claims, stream])

    @staticmethod
    def _claimed(reply: list) -> Claimed | None:
        if not reply[0]:
            return None
        return Claimed(int(reply[1]), reply[2] if len(reply) > 2 else None)

    @_store_errors
    def claim(self, stream: str, worker: str, token: str, expected_epoch: int) -> Claimed | None:
        """Makes ``worker`` the holder if the stream's epoch is still ``expected_epoch`` (0:
        never claimed): returns the new epoch and the checkpoint, or None if the epoch moved.
        """
        check_name("worker name", worker)
        name, keys, args = self._claim_args(stream, worker, token, expected_epoch)
        return self._claimed(self._run(name, keys, args))

    @_store_errors
    def acquire(self, stream: str, worker: str, token: str) -> Claimed | Holding:
        """Claims ``stream`` if it is free, already ours, or its holder's lease is dead;
        else returns the live :class:`Holding` (:meth:`acquire_many` for one stream)."""
        return self.acquire_many([stream], worker, token)[stream]

    @_store_errors
    def acquire_many(self, streams: Iterable[str], worker: str,
                     token: str) -> dict[str, Claimed | Holding]:
        """:meth:`acquire` of many streams in three pipelines (holders, leases, claims).

        A claim that loses a race (the epoch moved meanwhile) is tried again from the new
        holder, at most three times; then the stream's current Holding is returned.
        """
        check_name("worker name", worker)
        out: dict[str, Claimed | Holding] = {}
        pending = list(dict.fromkeys(streams))
        for _attempt in range(3):
            if not pending:
                return out
            current = self.holders(pending)
            others = [(h.worker, h.token) for h in current.values()
                      if h is not None and not h.free and (h.worker, h.token) != (worker, token)]
            alive = self._leases_alive(others)
            expected = {}
            for stream, held in current.items():
                if held is not None and alive.get((held.worker, held.token), False):
                    out[stream] = held
                else:
                    expected[stream] = held.epoch if held is not None else 0
            claims = self._run_many([self._claim_args(s, worker, token, e)
                                     for s, e in expected.items()])
            pending = []
            for stream, reply in zip(expected, claims, strict=True):
                got = self._claimed(reply)
                if got is None:
                    pending.append(stream)
                else:
                    out[stream] = got
        for stream, held in self.holders(pending).items():
            out[stream] = held or Holding("", "", 0)
        return out

    @_store_errors
    def save(self, worker: str, token: str,
             items: Iterable[tuple[str, int, bytes | None]]) -> dict[str, bool]:
        """Writes checkpoints ``(stream, epoch, blob)`` in one pipeline, each only if
        ``worker``/``token``/``epoch`` still hold the stream; ``blob`` None = the stream
        closed: its checkpoint is deleted and the stream released. Returns stream -> written.
        """
        items = list(items)
        calls = []
        for stream, epoch, blob in items:
            op, data = ("c", b"") if blob is None else ("w", blob)
            calls.append(("save", [self.keys.holder(stream), self.keys.ckpt(stream)],
                          [worker, token, int(epoch), op, data]))
        results = self._run_many(calls)
        return {item[0]: bool(ok) for item, ok in zip(items, results, strict=True)}

    @_store_errors
    def release(self, stream: str, worker: str, token: str, epoch: int) -> bool:
        """Lets go of ``stream`` (its checkpoint stays) if ``worker``/``token``/``epoch`` still
        hold it; the epoch is kept. Returns whether it did."""
        return bool(self._run("release", [self.keys.holder(stream)], [worker, token, int(epoch)]))

    @_store_errors
    def load(self, stream: str) -> bytes | None:
        """The stream's checkpoint blob, or None."""
        return self.client.get(self.keys.ckpt(stream))

    # -- claim notices -------------------------------------------------------------------

    @_store_errors
    def watch(self, on_claim: Callable[[str, str, int], None],
              poll_s: float = 0.2) -> Callable[[], None]:
        """Calls ``on_claim(stream, worker, epoch)`` from a thread for every claim notice.

        Subscribed when this returns (a claim made afterwards is seen); reconnects after a
        Redis failure (notices sent meanwhile are lost: callers also re-resolve on a
        refusal). Returns a function that stops the thread.
        """
        return ClaimWatcher(self, on_claim, poll_s).start()
