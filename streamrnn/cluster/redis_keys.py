"""Redis key names and ``--store`` URL parsing (pure: no Redis connection, no TensorFlow).

Every key of one stream shares the hash tag ``{s:<id>}`` (and every key of one worker the tag
``{w:<name>}``), so a Redis Cluster keeps them in one slot and one Lua script may touch them
together. Ids are tag-escaped (:func:`stream_tag`): ``%`` -> ``%25``, ``{`` -> ``%7B``,
``}`` -> ``%7D``.

Key layout (prefix ``srnn``, see :class:`Keys`):

- ``srnn:{w:<name>}:lease`` STRING, the worker incarnation's token, PX ttl;
- ``srnn:{w:<name>}:info`` HASH, the worker's endpoint, CURVE key and load, same ttl;
- ``srnn:workers`` ZSET, worker name -> lease expiry in ms (server clock; an index);
- ``srnn:{s:<id>}:holder`` HASH {worker, token, epoch} and ``srnn:{s:<id>}:ckpt`` STRING;
- channel ``srnn:claims`` and ``srnn:{train}:log`` STREAM (consumer group ``trainers``).

:func:`parse_store_url` turns a ``--store`` URL into the redis-py connection arguments:
``redis://[user:password@]host[:port][/db]``, ``rediss://`` (TLS),
``redis+sentinel://[user:password@]host:port,host:port/service_name[/db]``,
``redis+cluster://host:port,host:port`` or ``redis://host:port?cluster=true``, each with
query options (``prefix=``, ``ssl_ca_certs=``, ``socket_timeout=``, ...; see
:data:`URL_OPTIONS`).

Example:

>>> Keys("srnn").holder("a{b}")
'srnn:{s:a%7Bb%7D}:holder'
>>> spec = parse_store_url("rediss://app:s3cret@cache:6380/2?prefix=prod&ssl_ca_certs=/ca.pem")
>>> spec.mode, spec.prefix, spec.kwargs["host"], spec.kwargs["ssl"], spec.kwargs["db"]
('single', 'prod', 'cache', True, 2)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from streamrnn.errors import StoreError

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_PREFIX",
    "DEFAULT_SENTINEL_PORT",
    "Keys",
    "StoreURL",
    "TRAIN_GROUP",
    "URL_OPTIONS",
    "check_name",
    "parse_store_url",
    "redact_url",
    "stream_tag",
]

DEFAULT_PREFIX = "srnn"
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
TRAIN_GROUP = "trainers"

_TAG_ESCAPES = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D"})


def stream_tag(stream: str) -> str:
    """``stream`` with ``%``, ``{`` and ``}`` percent-escaped, safe inside a ``{...}`` tag.

    The escaping is injective (distinct ids give distinct tags) and leaves every other
    character as it is.

    Example:

    >>> stream_tag("user{7}%")
    'user%7B7%7D%25'
    """
    return stream.translate(_TAG_ESCAPES)


_BAD_NAME = re.compile(r"[\s]")


def check_name(what: str, name: str) -> str:
    """``name`` if it is a usable worker name or prefix, else :class:`StoreError`.

    A name is a non-empty string without whitespace (the claim notice is space-separated)
    and, for a prefix, without ``{`` or ``}`` (the first ``{...}`` of a key is its hash tag).
    """
    if not isinstance(name, str) or not name or _BAD_NAME.search(name):
        raise StoreError(f"{what} must be a non-empty string without whitespace, got {name!r}")
    if what == "prefix" and ("{" in name or "}" in name):
        raise StoreError(f"prefix must not contain '{{' or '}}' (hash tags), got {name!r}")
    return name


@dataclass(frozen=True)
class Keys:
    """The key names under one prefix (module docstring: the layout).

    Example:

    >>> keys = Keys("srnn")
    >>> keys.lease("w1"), keys.workers, keys.claims
    ('srnn:{w:w1}:lease', 'srnn:workers', 'srnn:claims')
    """

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        check_name("prefix", self.prefix)

    def lease(self, worker: str) -> str:
        """The worker's lease STRING (its incarnation token, PX ttl)."""
        return f"{self.prefix}:{{w:{stream_tag(worker)}}}:lease"

    def info(self, worker: str) -> str:
        """The worker's info HASH (endpoint, curve_public, load; same ttl as the lease)."""
        return f"{self.prefix}:{{w:{stream_tag(worker)}}}:info"

    def holder(self, stream: str) -> str:
        """The stream's holder HASH {worker, token, epoch}."""
        return f"{self.prefix}:{{s:{stream_tag(stream)}}}:holder"

    def ckpt(self, stream: str) -> str:
        """The stream's checkpoint blob STRING."""
        return f"{self.prefix}:{{s:{stream_tag(stream)}}}:ckpt"

    @property
    def workers(self) -> str:
        """The ZSET of worker names scored by lease expiry (ms, server clock)."""
        return f"{self.prefix}:workers"

    @property
    def claims(self) -> str:
        """The pub/sub channel of claim notices ``<epoch> <worker> <stream>``."""
        return f"{self.prefix}:claims"

    @property
    def train_log(self) -> str:
        """The training log STREAM (consumer group :data:`TRAIN_GROUP`)."""
        return f"{self.prefix}:{{train}}:log"


def _flag(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _cert_reqs(text: str) -> str:
    if text not in ("none", "optional", "required"):
        raise ValueError("one of none, optional, required")
    return text


#: Query options passed through to redis-py (name -> parser). ``ssl_*`` need ``rediss``.
URL_OPTIONS: dict[str, Any] = {
    "db": int,
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "socket_keepalive": _flag,
    "health_check_interval": int,
    "client_name": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_password": str,
    "ssl_ca_certs": str,
    "ssl_ca_path": str,
    "ssl_cert_reqs": _cert_reqs,
    "ssl_check_hostname": _flag,
}
# streamrnn's own options (not redis-py's)
_OWN_OPTIONS = ("prefix", "cluster", "sentinel_username", "sentinel_password")

_SCHEMES = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}


@dataclass(frozen=True)
class StoreURL:
    """A parsed ``--store`` URL (:func:`parse_store_url`).

    ``mode`` is ``"single"``, ``"sentinel"`` or ``"cluster"``; ``hosts`` the ``(host, port)``
    pairs (the server, the sentinels or the cluster's startup nodes); ``kwargs`` the redis-py
    connection arguments (``host``/``port`` included in single mode only); ``service_name``
    and ``sentinel_kwargs`` are for Sentinel.
    """

    mode: str
    hosts: tuple[tuple[str, int], ...]
    prefix: str = DEFAULT_PREFIX
    kwargs: dict[str, Any] = field(default_factory=dict)
    service_name: str = ""
    sentinel_kwargs: dict[str, Any] = field(default_factory=dict)


def _split_hosts(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    hosts = []
    for part in netloc.split(","):
        part = part.strip()
        if part.startswith("["):  # [ipv6]:port
            host, _, rest = part[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_text = part.rpartition(":") if ":" in part else (part, "", "")
        if not host:
            raise StoreError(f"store URL: empty host in {netloc!r}")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise StoreError(f"store URL: bad port in {part!r}") from None
        if not 0 < port < 65536:
            raise StoreError(f"store URL: port out of range in {part!r}")
        hosts.append((unquote(host), port))
    return tuple(hosts)


def _parse_options(query: str) -> tuple[dict[str, Any], dict[str, str]]:
    kwargs: dict[str, Any] = {}
    own: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if name in _OWN_OPTIONS:
            own[name] = value
            continue
        parser = URL_OPTIONS.get(name)
        if parser is None:
            known = ", ".join(sorted([*URL_OPTIONS, *_OWN_OPTIONS]))
            raise StoreError(f"store URL: unknown option {name!r} (known: {known})")
        try:
            kwargs[name] = parser(value)
        except ValueError as exc:
            raise StoreError(f"store URL: bad value for {name}: {value!r} ({exc})") from None
    return kwargs, own


def _db_from(text: str) -> int:
    try:
        db = int(text)
    except ValueError:
        raise StoreError(f"store URL: the database must be a number, got {text!r}") from None
    if db < 0:
        raise StoreError(f"store URL: negative database {db}")
    return db


def _path_parts(path: str) -> list[str]:
    return [unquote(p) for p in path.strip("/").split("/") if p]


def _apply_path(mode: str, path: str, kwargs: dict[str, Any]) -> str:
    """Reads the db (and the Sentinel service name) from the URL path; returns the service."""
    parts = _path_parts(path)
    service = ""
    if mode == "sentinel":
        if not parts:
            raise StoreError("store URL: redis+sentinel:// needs /service_name after the hosts")
        service, parts = parts[0], parts[1:]
    if len(parts) > 1:
        raise StoreError(f"store URL: unexpected path {path!r}")
    if parts:
        kwargs.setdefault("db", _db_from(parts[0]))
    if mode == "cluster" and kwargs.pop("db", 0) != 0:
        raise StoreError("store URL: Redis Cluster has only database 0")
    return service


def _mode_of(scheme: str, own: dict[str, str]) -> tuple[str, bool]:
    if scheme not in _SCHEMES:
        raise StoreError(f"store URL: unknown scheme {scheme!r} "
                         f"(use one of {', '.join(sorted(_SCHEMES))})")
    mode, tls = _SCHEMES[scheme]
    if "cluster" in own:
        try:
            wants_cluster = _flag(own["cluster"])
        except ValueError:
            raise StoreError(f"store URL: bad value for cluster: {own['cluster']!r}") from None
        if wants_cluster and mode == "sentinel":
            raise StoreError("store URL: cluster=true does not go with Sentinel")
        if wants_cluster:
            mode = "cluster"
    return mode, tls


def parse_store_url(url: str) -> StoreURL:
    """Parses a ``--store`` URL into a :class:`StoreURL` (module docstring: the forms).

    User and password in the URL are the ACL credentials (percent-decoded); ``rediss``
    turns TLS on and the ``ssl_*`` options are passed to redis-py as they are. Raises
    :class:`~streamrnn.errors.StoreError` on anything it cannot use.

    Example:

    >>> spec = parse_store_url("redis+sentinel://s1:26379,s2/mymaster/1")
    >>> spec.mode, spec.hosts, spec.service_name, spec.kwargs
    ('sentinel', (('s1', 26379), ('s2', 26379)), 'mymaster', {'db': 1})
    """
    if not isinstance(url, str) or "://" not in url:
        raise StoreError(f"store URL must look like redis://host:port/0, got {url!r}")
    parts = urlsplit(url)
    kwargs, own = _parse_options(parts.query)
    mode, tls = _mode_of(parts.scheme.lower(), own)
    creds, _, netloc = parts.netloc.rpartition("@")
    if not netloc:
        raise StoreError(f"store URL: no host in {redact_url(url)!r}")
    default_port = DEFAULT_SENTINEL_PORT if mode == "sentinel" else DEFAULT_PORT
    hosts = _split_hosts(netloc, default_port)
    if mode == "single" and len(hosts) > 1:
        raise StoreError("store URL: several hosts need redis+sentinel:// or redis+cluster://")
    if creds:
        user, has_password, password = creds.partition(":")
        if user:
            kwargs["username"] = unquote(user)
        if has_password:
            kwargs["password"] = unquote(password)
    if tls:
        kwargs["ssl"] = True
    elif any(name.startswith("ssl_") for name in kwargs):
        raise StoreError("store URL: ssl_* options need TLS (rediss://...)")
    service = _apply_path(mode, parts.path, kwargs)
    if mode == "single":
        kwargs["host"], kwargs["port"] = hosts[0]
    return StoreURL(mode=mode, hosts=hosts, prefix=check_name("prefix", own.get("prefix",
                    DEFAULT_PREFIX)), kwargs=kwargs, service_name=service,
                    sentinel_kwargs=_sentinel_kwargs(mode, kwargs, own))


def _sentinel_kwargs(mode: str, kwargs: dict[str, Any], own: dict[str, str]) -> dict[str, Any]:
    """The arguments for the connections to the sentinels themselves (TLS and timeouts as
    for the master; their own ACL user from ``sentinel_username``/``sentinel_password``)."""
    if mode != "sentinel":
        if "sentinel_username" in own or "sentinel_password" in own:
            raise StoreError("store URL: sentinel_* options need redis+sentinel://")
        return {}
    out = {k: v for k, v in kwargs.items()
           if k.startswith(("ssl", "socket_")) or k == "health_check_interval"}
    if "sentinel_username" in own:
        out["username"] = own["sentinel_username"]
    if "sentinel_password" in own:
        out["password"] = own["sentinel_password"]
    return out


def redact_url(url: str) -> str:
    """``url`` with its password (and any ``*password=`` option) replaced by ``***``, for logs.

    Example:

    >>> redact_url("redis://app:s3cret@cache:6379/0?ssl_password=x")
    'redis://app:***@cache:6379/0?ssl_password=***'
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    creds, at, hosts = netloc.rpartition("@")
    if at and ":" in creds:
        netloc = f"{creds.partition(':')[0]}:***@{hosts}"
    query = "&".join(
        f"{quote(k, safe='_')}={'***' if k.endswith('password') else quote(v, safe='/:,.-_')}"
        for k, v in parse_qsl(parts.query, keep_blank_values=True))
    out = f"{parts.scheme}://{netloc}{parts.path}"
    return f"{out}?{query}" if query else out
