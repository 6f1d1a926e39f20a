"""Helpers for the router tests (a plain module, not a test module): a store URL under a
fresh key prefix, CURVE key sets made with zmq.auth, polling, router STATS, the TCP ports a
process listens on, and starting workers that hold their streams in Redis.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import zmq.auth

import streamrnn
from streamrnn.cli.process import WorkerProcess
from tests.helpers.durable_helpers import FAST

__all__ = ["curve_keys", "fresh_store_url", "listening_ports", "router_stats", "start_workers",
           "wait_for"]


def fresh_store_url(redis_url: str) -> str:
    """``redis_url`` under a key prefix of its own (tests sharing the server stay apart)."""
    return f"{redis_url}?prefix=t{uuid.uuid4().hex[:12]}"


def curve_keys(root: Path) -> dict[str, Any]:
    """Key pairs for a CURVE cluster under ``root``: the workers' and the router front's
    server keys, the router's client key (toward the workers), two clients' (``client``,
    ``other``) and a stranger's; ``workers_allow`` and ``front_allow`` list the two clients
    (the workers admit the router through ``--curve-routers keys["router"]``)."""
    keys: dict[str, Any] = {}
    for name in ("worker", "front", "router", "client", "other", "stranger"):
        folder = root / name
        folder.mkdir(parents=True)
        public, secret = zmq.auth.create_certificates(folder, name)
        keys[name] = public
        keys[f"{name}_secret"] = secret
    for allow, names in (("workers_allow", ("client", "other")),
                         ("front_allow", ("client", "other"))):
        folder = root / allow
        folder.mkdir()
        for name in names:
            os.link(keys[name], folder / f"{name}.key")
        keys[allow] = folder
    return keys


def wait_for(predicate, timeout: float = 60.0, what: str = "condition", every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def router_stats(endpoint: str, **client_kwargs: Any) -> dict:
    with streamrnn.Client(endpoint, timeout=5, **client_kwargs) as client:
        return client.stats()["router"]


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (Linux: its socket inodes in /proc/net)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def start_workers(model_path: Path, store_url: str, names: list[str], *extra: str,
                  slots: int = 4) -> dict[str, WorkerProcess]:
    """Worker processes holding their streams in ``store_url`` (default lease ttl, 2 s)."""
    return {name: WorkerProcess.start(model_path, slots, *FAST, "--store", store_url,
                                      "--name", name, *extra)
            for name in names}
