"""Prometheus metrics for workers, routers and trainers (exposed over HTTP).

Each process builds one :class:`Metrics` with its own registry (so tests can run several in
one interpreter) and calls :meth:`Metrics.serve` for ``--metrics-port``. Names follow the
Prometheus conventions (``_total`` counters, ``_seconds`` histograms).

Example::

    metrics = Metrics(role="worker")
    port = metrics.serve(9100)                 # http://127.0.0.1:9100/metrics
    metrics.steps.inc(); metrics.step_latency.observe(0.002)
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = [
    "Metrics",
    "RouterMetrics",
    "add_metrics_argument",
    "metrics_address",
    "metrics_url",
]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_FILL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def metrics_address() -> str:
    """Where /metrics listens: ``$STREAMRNN_METRICS_ADDR``, else loopback only."""
    return os.environ.get("STREAMRNN_METRICS_ADDR", "127.0.0.1")


def add_metrics_argument(parser: argparse.ArgumentParser) -> None:
    """``--metrics-port``, the same for worker, router and trainer."""
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics at /metrics on this port (0 picks a free "
                             "port; the ready line shows the URL); listens on "
                             "$STREAMRNN_METRICS_ADDR, default 127.0.0.1")


def metrics_url(port: int) -> str:
    return f"http://{metrics_address()}:{port}/metrics"


class Metrics:
    """The metric families of one streamrnn process."""

    def __init__(self, role: str = "worker"):
        self.role = role
        self.registry = CollectorRegistry()
        r = self.registry
        self.streams = Gauge("streamrnn_streams", "Live streams (resident or swapped)",
                             registry=r)
        self.slots_in_use = Gauge("streamrnn_slots_in_use", "Slots holding a stream", registry=r)
        self.slots_total = Gauge("streamrnn_slots", "Slots of the serving model", registry=r)
        self.steps = Counter("streamrnn_steps", "Batched model steps run", registry=r)
        self.timesteps = Counter("streamrnn_timesteps", "Stream timesteps processed",
                                 registry=r)
        self.timesteps_per_second = Gauge(
            "streamrnn_timesteps_per_second", "Timesteps/s over the last 10 s", registry=r)
        self.batch_fill = Histogram("streamrnn_batch_fill_ratio",
                                    "Fraction of slots with work in a batched step",
                                    buckets=_FILL_BUCKETS, registry=r)
        self.step_latency = Histogram("streamrnn_step_latency_seconds",
                                      "Duration of one batched engine call",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.chunk_latency = Histogram("streamrnn_chunk_latency_seconds",
                                       "Receive-to-reply time of a chunk in the worker",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("streamrnn_requests", "Requests received by type",
                                ["type"], registry=r)
        self.errors = Counter("streamrnn_errors", "ERROR replies by code", ["code"], registry=r)
        self.busy = Counter("streamrnn_busy", "BUSY replies (backpressure)", registry=r)
        self.swaps = Counter("streamrnn_swaps", "Stream states swapped between slots and host",
                             ["direction"], registry=r)
        self.expiries = Counter("streamrnn_expiries", "Streams expired after idling",
                                registry=r)
        self.weights_version = Gauge("streamrnn_weights_version", "Weights version in use",
                                     registry=r)
        self.checkpoints = Counter("streamrnn_checkpoints", "Checkpoints written", registry=r)
        self.train_loss = Gauge("streamrnn_train_loss", "Latest training loss", registry=r)
        self.train_steps = Counter("streamrnn_train_steps", "Optimizer steps", registry=r)
        self._window: deque[tuple[float, int]] = deque()
        self._window_total = 0
        self._lock = threading.Lock()

    def record_timesteps(self, n: int) -> None:
        """Count ``n`` timesteps and refresh the 10-second timesteps/s gauge."""
        self.timesteps.inc(n)
        now = time.monotonic()
        with self._lock:
            self._window.append((now, n))
            self._window_total += n  # the window's sum, kept (summing it was O(window))
            while self._window and now - self._window[0][0] > 10.0:
                self._window_total -= self._window.popleft()[1]
            span = max(now - self._window[0][0], 1.0)
            self.timesteps_per_second.set(self._window_total / span)

    def serve(self, port: int, addr: str | None = None) -> int:
        """Expose ``/metrics`` over HTTP on ``addr:port`` (0 = any free port); returns port.

        ``addr`` defaults to ``$STREAMRNN_METRICS_ADDR`` or 127.0.0.1 (containers set
        0.0.0.0 so the port can be published).
        """
        addr = addr or metrics_address()
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._http_server = server
        return int(server.server_address[1])

    def close(self) -> None:
        server = getattr(self, "_http_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()


class RouterMetrics:
    """Router metrics, read from :meth:`streamrnn.cluster.router.Router.stats` at scrape time.

    The router's counters live in its single routing thread; reading them when Prometheus
    scrapes keeps the hot path free of metric calls.
    """

    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self) -> Iterator[Any]:
        for _ in range(3):  # the routing thread may resize a dict while we copy it
            try:
                stats = self._stats()
                break
            except RuntimeError:
                continue
        else:
            return
        counts = stats.get("counts", {})
        requests = CounterMetricFamily("streamrnn_router_requests", "Client requests by type",
                                       labels=["type"])
        events = CounterMetricFamily("streamrnn_router_events",
                                     "Router events (forwarded, busy, refusals, failovers, ...)",
                                     labels=["event"])
        for key, value in counts.items():
            if key.startswith("requests_"):
                requests.add_metric([key.removeprefix("requests_")], value)
            else:
                events.add_metric([key], value)
        yield requests
        yield events
        yield GaugeMetricFamily("streamrnn_router_streams", "Streams assigned to workers",
                                value=stats.get("streams", 0))
        workers = stats.get("workers", {})
        yield GaugeMetricFamily("streamrnn_router_workers_alive", "Registered workers alive",
                                value=sum(1 for w in workers.values() if w["alive"]))
        per_worker = GaugeMetricFamily("streamrnn_router_worker_streams",
                                       "Streams assigned per worker", labels=["worker"])
        for name, w in workers.items():
            per_worker.add_metric([name], w["assigned"])
        yield per_worker

    def serve(self, port: int, addr: str | None = None) -> int:
        server, _thread = start_http_server(port, addr=addr or metrics_address(),
                                            registry=self.registry)
        self._http_server = server
        return int(server.server_address[1])
