"""Cluster soak: many streams through two routers and three workers on a real redis-server,
with workers, routers and the trainer SIGKILLed at random and restarted, for a bounded time.

    python bench/soak.py --cluster --seconds 120 [--out soak.json]

One ``redis-server`` (temp dir, free port), ``--routers`` routers and ``--workers`` workers
with ``--store redis://...`` (bench/soak_chaos.py), two Clients given every router endpoint,
``--streams`` live streams of random chunk sizes (1..32 steps), ``--window`` chunks in
flight each; a finished stream is checked, closed and replaced. With ``--trainer`` (default)
a trainer with ``--store`` gets rounds of training chunks from a Client of its own. Every
``--kill-every`` s on average one process of the ``--kill`` kinds is SIGKILLed and started
again under the same name on the same endpoint (one at a time).

At the end every stream's outputs must equal one offline Keras call (max abs <= 1e-5), every
chunk sent must be answered exactly once (``chunks_lost``, ``chunks_unanswered``: 0) and the
trainer's checkpoint must count every training chunk sent exactly once (and each training
stream's timesteps). Reports streams, chunks, kills of each kind, mismatches, and the time
from each worker kill until the streams it held were served again (the end of the longest
pause in their outputs after the kill; max and median; the same for router kills over the
live streams whose Client used that router: two Clients take the routers in opposite
orders). Any problem, listed in ``problems``, makes the exit status 1.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.soak import SoakStream, StreamSoak
from bench.soak_chaos import Chaos, Cluster, TrainingFeed

if TYPE_CHECKING:
    from streamrnn.client import Client

__all__ = ["ClusterSoak", "served_again"]


def served_again(arrivals: list[float], t0: float, t1: float) -> float | None:
    """Seconds from ``t0`` to the end of the longest pause in ``arrivals`` (output times)
    within ``(t0, t1]`` (replies already under way at ``t0`` do not end it); None if none."""
    points = [t0, *sorted(t for t in arrivals if t0 < t <= t1)]
    if len(points) < 2:
        return None
    gaps = np.diff(points)
    return float(points[int(np.argmax(gaps)) + 1] - t0)


def _spread(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": round(float(np.median(values)), 2),
            "max": round(max(values), 2), "min": round(min(values), 2)}


class ClusterSoak(StreamSoak):
    """One cluster soak run (module docstring); :meth:`run` returns the summary."""

    def __init__(self, args: argparse.Namespace):
        from streamrnn.client import Client

        super().__init__(args, "streamrnn-soak-cluster-")
        print("starting redis-server, routers, workers" + (", trainer" if args.trainer else "")
              + f" (logs in {self.tmp})", flush=True)
        began = time.monotonic()
        self.cluster = Cluster(self.tmp, self.model_path, args)
        self.startup_s = round(time.monotonic() - began, 1)
        # two Clients given the routers in opposite orders: a router kill hits half the
        # streams (those of the Client using it), which move to another router
        orders = [self.cluster.endpoints, self.cluster.endpoints[::-1]]
        self.clients = [(Client(order, timeout=3.0, retries=30, window=args.window), order)
                        for order in orders]
        self.client = self.clients[0][0]
        self.arrivals: dict[str, list[float]] = defaultdict(list)  # stream -> output times
        self.problems: list[str] = []
        self.feed = (TrainingFeed(self.cluster.trainer_endpoint, args.train_streams,
                                  args.train_every, np.random.default_rng(args.seed + 1))
                     if args.trainer else None)
        kinds = [k for k in args.kill.split(",") if k and (k != "trainer" or args.trainer)]
        self.chaos = Chaos(self.cluster, kinds, args.kill_every,
                           np.random.default_rng(args.seed + 2), self._pick)

    def client_of(self, stream: SoakStream) -> Client:
        return self.clients[int(stream.name.rsplit("-", 1)[1]) % 2][0]

    def _router_of(self, stream: SoakStream) -> str:
        """The router endpoint ``stream``'s Client uses now (it moves on one at a time)."""
        client, order = self.clients[int(stream.name.rsplit("-", 1)[1]) % 2]
        return order[client.counters["endpoint_switches"] % len(order)]

    def submit(self, stream: SoakStream, i: int) -> Future:
        future = super().submit(stream, i)
        times = self.arrivals[stream.name]
        future.add_done_callback(lambda _f: times.append(time.monotonic()))
        return future

    def failed(self, stream: SoakStream, exc: Exception) -> None:
        """The Client gave up on a chunk: a real failure. The stream ends at what was sent
        (its unanswered chunks are counted as lost by :meth:`verify`)."""
        self.problems.append(f"{stream.name}: a chunk failed: {type(exc).__name__}: {exc}")
        print(f"CHUNK FAILED {stream.name}: {exc}", flush=True)
        stream.pending.clear()
        stream.cuts = stream.cuts[:stream.pos + 1]

    def _pick(self, kind: str, rng: np.random.Generator) -> tuple[str, list[str] | None]:
        """Whom to kill, and the live streams that concerns: a random worker among those
        holding live streams (their streams), a random router among those the Clients use
        (the live streams whose Client uses it), or the trainer (None)."""
        if kind == "trainer":
            return "trainer", None
        live = [s for s in list(self.live)  # with chunks to send or to be answered
                if s.pos < s.chunks or any(not f.done() for f in list(s.pending.values()))]
        if kind == "router":
            used = {self._router_of(s) for s in live}
            pool = [r for r in self.cluster.routers if r.endpoint in used] \
                or self.cluster.routers
            router = pool[int(rng.integers(len(pool)))]
            return router.name, [s.name for s in live if self._router_of(s) == router.endpoint]
        live = [s.name for s in live]
        held: dict[str, list[str]] = defaultdict(list)
        for stream, holding in self.cluster.store.holders(live).items():
            if holding is not None and holding.worker in self.cluster.workers:
                held[holding.worker].append(stream)
        print(f"live streams by holder: { {w: len(v) for w, v in sorted(held.items())} }",
              flush=True)
        name = str(rng.choice(sorted(held) or sorted(self.cluster.workers)))
        return name, held.get(name, [])

    def run(self) -> dict[str, Any]:
        args = self.args
        print(f"cluster soak: {args.seconds:.0f} s, {args.streams} streams x {args.steps} "
              f"steps, {args.workers} workers x {args.slots} slots, {args.routers} routers, "
              f"trainer {'on' if args.trainer else 'off'}, kills of {args.kill} every "
              f"~{args.kill_every:.0f} s (start-up took {self.startup_s} s)", flush=True)
        start = time.monotonic()
        self.chaos.began = start
        self.chaos.start()
        while (now := time.monotonic()) - start < args.seconds and self.chaos.is_alive():
            self._turn(now)
        self.chaos.stop()
        while self.chaos.is_alive():  # a restart under way: the streams go on meanwhile
            self._turn(time.monotonic())
        print(f"[{time.monotonic() - start:6.1f} s] no more kills; draining", flush=True)
        self.draining = True
        deadline = time.monotonic() + 180
        while any(s.pending for s in self.live) and time.monotonic() < deadline:
            self._turn(time.monotonic())
        return self.finish(start, time.monotonic())

    def _turn(self, now: float) -> None:
        progressed = [self.pump(k) for k in range(len(self.live))]
        if self.feed is not None and not self.draining:
            self.feed.tick(now)
        if not any(progressed):
            time.sleep(0.002)

    def finish(self, start: float, end: float) -> dict[str, Any]:
        """Check the partly done streams, stop everything and summarise."""
        unanswered = sum(len(s.pending) for s in self.live)
        for stream in self.live:
            stream.pending.clear()
            self.verify(stream)
            self.counts["streams_completed"] -= 1
            self.counts["streams_partial"] += 1
        for client, _ in self.clients:
            self.client_counters.update(client.counters)
            client.shutdown()
        if self.feed is not None:
            self.feed.drain(180)
        statuses = self.cluster.stop()
        training = None
        if self.feed is not None:
            training, problems = self.feed.check(self.cluster.trainer_ckpt,
                                                 self.cluster.trainer.log())
            self.problems += problems
        events = self._events(end)
        self._problems(unanswered, statuses)
        kills = {k: sum(e["kind"] == k for e in events) for k in ("worker", "router", "trainer")}
        return {"seconds": self.args.seconds, "soak_s": round(end - start, 1),
                "startup_s": self.startup_s,
                "streams_total": self.counts["streams_completed"]
                + self.counts["streams_partial"], **self.counts,
                "mismatches": self.counts["mismatches"],
                "chunks_lost": self.counts["unreceived"] - unanswered,
                "chunks_unanswered": unanswered, "max_abs_diff": self.max_diff,
                "kills": kills, "worker_served_again_s": _spread(
                    [t for e in events if e["kind"] == "worker" for t in e["served_again"]]),
                "router_served_again_s": _spread(
                    [t for e in events if e["kind"] == "router" for t in e["served_again"]]),
                "events": events, "training": training, "exit_status": statuses,
                "tracebacks": self.cluster.tracebacks(), "logs": str(self.tmp),
                "client": dict(self.client_counters), "problems": self.problems}

    def _events(self, end: float) -> list[dict[str, Any]]:
        """The kills, each with its streams' served-again times (until the next kill)."""
        events = self.chaos.events
        out = []
        for k, event in enumerate(events):
            t1 = events[k + 1]["t_kill"] if k + 1 < len(events) else end
            streams = event.pop("streams") or []
            times = [served_again(self.arrivals.get(s, []), event["t_kill"], t1)
                     for s in streams]
            again = sorted(t for t in times if t is not None)
            at = round(event.pop("t_kill") - self.chaos.began, 1)
            out.append({**event, "at_s": at, "streams": len(streams),
                        "not_served_again": len(streams) - len(again),
                        "served_again": [round(t, 2) for t in again]})
        return out

    def _problems(self, unanswered: int, statuses: dict[str, int | None]) -> None:
        c = self.counts
        if c["mismatches"]:
            self.problems.append(f"{c['mismatches']} chunks differ from the offline call")
        if c["unreceived"]:
            self.problems.append(f"{c['unreceived']} chunks sent were never answered "
                                 f"({unanswered} still pending at the end)")
        self.problems += [f"restart failed: {f}" for f in self.chaos.failures]
        self.problems += [f"{name} exited with status {status} when stopped"
                          for name, status in statuses.items() if status != 0]
        self.problems += [f"traceback in {log}" for log in self.cluster.tracebacks()]
