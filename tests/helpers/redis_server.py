"""Real ``redis-server`` processes for the tests: one server, or a Redis Cluster.

The servers listen on free loopback ports, keep their files in a temporary directory
(append-only on, no RDB snapshots), log to a file there (nothing reaches the test output) and
are killed when the test run ends, even when it fails or is interrupted (a finalizer, an
``atexit`` hook, and on Linux a parent-death signal). A missing ``redis-server`` is an error
that says how to install it, never a skip.

Example::

    server = start_server(tmp_path)                 # server.url: redis://127.0.0.1:40123/0
    cluster = start_cluster(tmp_path, masters=3)
    cluster.url             # redis+cluster://127.0.0.1:40200,127.0.0.1:40201,127.0.0.1:40202
    cluster.stop(); server.stop()
"""

from __future__ import annotations

import atexit
import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

__all__ = ["INSTALL_HINT", "RedisCluster", "RedisServer", "free_port", "make_tls_files",
           "redis_binary", "start_cluster", "start_sentinel", "start_server"]

INSTALL_HINT = ("redis-server is not installed (the Redis tests need a real server): "
                "install it with `apt-get install -y redis-server` (Debian/Ubuntu; the "
                "README's test command does this), or put a redis-server 7 binary on PATH")


def redis_binary(name: str = "redis-server") -> str:
    """The path of ``redis-server`` (or ``redis-cli``); RuntimeError with INSTALL_HINT."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists()
                                   else None)
    if found is None:
        raise RuntimeError(INSTALL_HINT if name == "redis-server" else
                           f"{name} is not installed: {INSTALL_HINT}")
    return found


def free_port(also_free: int = 0) -> int:
    """A free TCP port on 127.0.0.1 (and ``port + also_free`` free too, when non-zero: a
    cluster node also listens on port + 10000)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not also_free:
            return port
        if port + also_free < 65536:
            try:
                with socket.socket() as other:
                    other.bind(("127.0.0.1", port + also_free))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair found")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class RedisServer:
    """One running ``redis-server``: ``port``, ``dir`` (its files and ``redis.log``) and
    ``url``; :meth:`stop` kills it (idempotent), :meth:`restart` starts it again on the same
    port and files (the append-only file brings its data back)."""

    port: int
    dir: Path
    process: subprocess.Popen = field(repr=False)
    args: list[str] = field(default_factory=list, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def log_tail(self, lines: int = 20) -> str:
        path = self.dir / "redis.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) \
            if path.exists() else ""

    def stop(self, graceful: bool = False) -> None:
        """Kills the server (``graceful``: SIGTERM, it flushes its append-only file first)."""
        if self.process.poll() is None:
            self.process.terminate() if graceful else self.process.kill()
            self.process.wait(timeout=10)

    def restart(self, graceful: bool = True, timeout: float = 10.0) -> None:
        """Stops the server and starts it again with the same arguments; waits for PING."""
        self.stop(graceful)
        self.process = _popen(self.args)
        if not _wait_ready(self, timeout):
            raise RuntimeError(f"redis-server did not restart on {self.port}:\n"
                               f"{self.log_tail()}")


def _popen(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([redis_binary(), *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent)


def _spawn(directory: Path, port: int, args: list[str]) -> RedisServer:
    server = RedisServer(port=port, dir=directory, process=_popen(args), args=args)
    atexit.register(server.stop)  # looks the process up when it runs: restarts included
    return server


def _launch(directory: Path, port: int, extra: list[str]) -> RedisServer:
    directory.mkdir(parents=True, exist_ok=True)
    return _spawn(directory, port, [
        "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
        "--appendonly", "yes", "--save", "", "--daemonize", "no",
        "--logfile", str(directory / "redis.log"), *extra])


def _wait_ready(server: RedisServer, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=1,
                         socket_connect_timeout=1)
    try:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                return False
            try:
                if client.ping():
                    return True
            except redis.RedisError:
                time.sleep(0.02)
        return False
    finally:
        client.close()


def start_server(directory: Path, *extra: str, cluster_bus: bool = False,
                 sentinel: bool = False) -> RedisServer:
    """Starts ``redis-server`` in ``directory`` on a free port and waits for PING (a port
    taken meanwhile: tries another, three times). ``extra`` are more server arguments;
    ``sentinel`` starts a Sentinel (``extra`` then begins with its config file)."""
    for _ in range(3):
        port = free_port(10000 if cluster_bus else 0)
        server = (_launch_sentinel(directory, port, list(extra)) if sentinel
                  else _launch(directory, port, list(extra)))
        if _wait_ready(server):
            return server
        server.stop()
    raise RuntimeError(f"redis-server did not start in {directory}:\n{server.log_tail()}")


def _launch_sentinel(directory: Path, port: int, extra: list[str]) -> RedisServer:
    directory.mkdir(parents=True, exist_ok=True)
    config, *rest = extra
    conf = directory / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                    f"logfile {directory / 'redis.log'}\n{config}\n")
    return _spawn(directory, port, [str(conf), "--sentinel", *rest])


def start_sentinel(directory: Path, master_port: int, service: str = "mymaster") -> RedisServer:
    """Starts a Redis Sentinel on a free port that monitors ``127.0.0.1:master_port`` as
    ``service`` (quorum 1)."""
    return start_server(directory, f"sentinel monitor {service} 127.0.0.1 {master_port} 1",
                        sentinel=True)


def make_tls_files(directory: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate (EC keys,
    made with the ``openssl`` command): paths by name (``ca``, ``server_cert``,
    ``server_key``, ``client_cert``, ``client_key``)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the TLS test needs the openssl command (apt-get install openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / f"{name}.pem" for name in
             ("ca", "ca_key", "server_cert", "server_key", "client_cert", "client_key")}

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=30)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", str(paths["ca_key"]), "-out", str(paths["ca"]),
        "-days", "2", "-subj", "/CN=streamrnn test CA")
    ext = directory / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who in ("server", "client"):
        csr = directory / f"{who}.csr"
        run("req", *ec, "-keyout", str(paths[f"{who}_key"]), "-out", str(csr),
            "-subj", f"/CN={who}")
        run("x509", "-req", "-in", str(csr), "-CA", str(paths["ca"]), "-CAkey",
            str(paths["ca_key"]), "-CAcreateserial", "-out", str(paths[f"{who}_cert"]),
            "-days", "2", "-extfile", str(ext))
    return paths


@dataclass
class RedisCluster:
    """A running Redis Cluster of ``nodes`` (masters only); ``url`` is its store URL."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _cluster_ok(nodes: list[RedisServer]) -> bool:
    for node in nodes:
        client = node.client()
        try:
            if client.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                return False
        finally:
            client.close()
    return True


def start_cluster(tmp_path: Path, masters: int = 3, timeout: float = 20.0) -> RedisCluster:
    """Starts ``masters`` cluster-enabled servers under ``tmp_path``, joins them with
    ``redis-cli --cluster create --cluster-replicas 0`` and waits for ``cluster_state:ok``
    on every node. The caller stops it (:meth:`RedisCluster.stop`)."""
    nodes = []
    try:
        for i in range(masters):
            nodes.append(start_server(Path(tmp_path) / f"node{i}", "--cluster-enabled", "yes",
                                      "--cluster-config-file", "nodes.conf",
                                      "--cluster-node-timeout", "5000", cluster_bus=True))
        subprocess.run([redis_binary("redis-cli"), "--cluster", "create",
                        *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=timeout)
        deadline = time.monotonic() + timeout
        while not _cluster_ok(nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.05)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return RedisCluster(nodes)
