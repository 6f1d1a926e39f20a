"""The processes of the cluster soak (bench/soak_cluster.py) and what kills them.

:class:`Cluster` runs a real ``redis-server`` (temp dir, free port, append-only), routers and
workers with ``--store redis://...`` and a trainer with ``--store`` (its durable training log
in the same Redis), each logging to a file of its own. :meth:`Cluster.kill` SIGKILLs one
process and starts it again under the same name on the same endpoint. :class:`Chaos` is the
thread that does so at random intervals, one process at a time (a bag of the enabled kinds,
shuffled, so every kind is hit once per round). :class:`TrainingFeed` is the trainer's Client:
it pushes rounds of training chunks (one per training stream, 6..12 steps of a sine) to the
trainer and, at the end, checks the trainer's checkpoint: every chunk applied exactly once.

Example::

    cluster = Cluster(tmp, model_path, args)      # args: workers, routers, slots, ...
    event = cluster.kill("worker", "w2")          # {"kind", "name", "t_kill", "restart_s"}
    statuses = cluster.stop()
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from streamrnn.cli.process import RouterProcess, WorkerProcess
from streamrnn.client import Client
from streamrnn.cluster.redis_store import RedisStore
from tests.helpers.cluster_helpers import router_stats, wait_for
from tests.helpers.durable_helpers import FAST
from tests.helpers.redis_server import free_port, start_server
from tests.helpers.trainer_process import TrainerProcess, sine, small_model

__all__ = ["Chaos", "Cluster", "TrainingFeed"]


class Cluster:
    """Redis, ``args.routers`` routers, ``args.workers`` workers and (``args.trainer``) a
    trainer, all started and ready; logs under ``tmp`` (``<name>-<incarnation>.log``)."""

    def __init__(self, tmp: Path, model_path: Path, args: argparse.Namespace):
        self.tmp, self.model_path, self.args = tmp, model_path, args
        self.redis = start_server(tmp / "redis")
        self.url = f"{self.redis.url}?prefix=soak"
        self.store = RedisStore.from_url(self.url)
        self.incarnations: Counter[str] = Counter()
        self.trainer: TrainerProcess | None = None
        self.trainer_ckpt = tmp / "trainer.npz"
        self.trainer_endpoint = f"tcp://127.0.0.1:{free_port()}"
        names = [f"w{i + 1}" for i in range(args.workers)]
        with ThreadPoolExecutor(len(names) + 1) as pool:  # the start-ups overlap
            trainer = pool.submit(self._start_trainer) if args.trainer else None
            self.workers = dict(zip(names, pool.map(self._start_worker, names), strict=True))
            self.routers = [self._start_router(f"r{i + 1}") for i in range(args.routers)]
            self.trainer = trainer.result() if trainer else None
        for router in self.routers:
            wait_for(lambda r=router: len(router_stats(r.endpoint)["workers"]) == len(names),
                     60, "every worker live at every router")

    @property
    def endpoints(self) -> list[str]:
        return [r.endpoint for r in self.routers]

    def _log(self, name: str) -> Path:
        self.incarnations[name] += 1
        return self.tmp / f"{name}-{self.incarnations[name]}.log"

    def _start_worker(self, name: str, bind: str = "tcp://127.0.0.1:0") -> WorkerProcess:
        return WorkerProcess.start(self.model_path, self.args.slots, *FAST, "--store", self.url,
                                   "--name", name, "--max-streams", str(self.args.max_streams),
                                   "--max-queue", "512", bind=bind, log_path=self._log(name))

    def _start_router(self, name: str, bind: str = "tcp://127.0.0.1:0") -> RouterProcess:
        router = RouterProcess.start("--store", self.url, bind=bind, log_path=self._log(name))
        router.name = name
        return router

    def _start_trainer(self) -> TrainerProcess:
        model = self.tmp / "trainer.keras"
        if not model.exists():
            small_model().save(model)
        return TrainerProcess(
            ["--model", str(model), "--bind", self.trainer_endpoint, "--slots", "4",
             "--warmup", "4", "--checkpoint", str(self.trainer_ckpt), "--checkpoint-every", "4",
             "--store", self.url, "--name", "trainer", "--claim-idle-ms", "1000",
             "--no-progress", "--batch-window-us", "2000"], self._log("trainer"))

    def kill(self, kind: str, name: str, streams: Any = None) -> dict[str, Any]:
        """SIGKILL process ``name`` of ``kind`` (worker, router or trainer) and start it again
        (same name, same endpoint). The event: kind, name, t_kill (monotonic), the killed
        process's exit status, the restart's seconds, and ``streams`` as given."""
        if kind == "worker":
            old = self.workers[name]
            restart = lambda: self._start_worker(name, bind=old.endpoint)  # noqa: E731
        elif kind == "router":
            index = [r.name for r in self.routers].index(name)
            old = self.routers[index]
            restart = lambda: self._start_router(name, bind=old.endpoint)  # noqa: E731
        elif kind == "trainer":
            old, restart = self.trainer, self._start_trainer
        else:
            raise ValueError(f"unknown kind {kind!r}")
        old.proc.kill()
        t_kill = time.monotonic()
        status = old.proc.wait()
        new = restart()
        if kind == "worker":
            self.workers[name] = new
        elif kind == "router":
            self.routers[index] = new
        else:
            self.trainer = new
        return {"kind": kind, "name": name, "t_kill": t_kill, "exit": status,
                "restart_s": round(time.monotonic() - t_kill, 2), "streams": streams}

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every process (the trainer writes its last checkpoint); exit statuses."""
        statuses: dict[str, int | None] = {}
        for router in self.routers:
            statuses[router.name] = router.stop()
        for name, worker in self.workers.items():
            statuses[name] = worker.stop()
        if self.trainer is not None:
            statuses["trainer"] = self.trainer.terminate()
        self.store.client.close()
        self.redis.stop(graceful=True)
        return statuses

    def tracebacks(self) -> list[str]:
        """Log files (every incarnation) that hold a Python traceback."""
        return sorted(p.name for p in self.tmp.glob("*.log")
                      if "Traceback" in p.read_text(errors="replace"))


class Chaos(threading.Thread):
    """Every ``mean_gap * U(0.5, 1.5)`` s: :meth:`Cluster.kill` of the next kind in a
    shuffled bag of ``kinds``, the process that ``pick(kind, rng)`` names (it returns the
    name and the event's ``streams``); one kill and restart at a time. ``events`` and
    ``failures`` (a restart that did not come up) are read after :meth:`stop`."""

    def __init__(self, cluster: Cluster, kinds: list[str], mean_gap: float,
                 rng: np.random.Generator,
                 pick: Callable[[str, np.random.Generator], tuple[str, Any]]):
        super().__init__(name="soak-chaos", daemon=True)
        self.cluster, self.kinds, self.mean_gap = cluster, kinds, mean_gap
        self.rng, self.pick = rng, pick
        self.events: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.began = time.monotonic()
        self._stopping = threading.Event()

    def run(self) -> None:
        bag: list[str] = []
        while not self._stopping.wait(self.mean_gap * self.rng.uniform(0.5, 1.5)):
            if not bag:
                bag = [str(k) for k in self.rng.permutation(self.kinds)]
            kind = bag.pop()
            try:
                event = self.cluster.kill(kind, *self.pick(kind, self.rng))
            except Exception as exc:  # noqa: BLE001 - a restart that failed: reported
                self.failures.append(f"{kind}: {exc}"[:2000])
                print(f"RESTART FAILED ({kind}): {exc}", flush=True)
                return
            self.events.append(event)
            print(f"[{event['t_kill'] - self.began:6.1f} s] {kind} {event['name']} SIGKILLed "
                  f"(exit {event['exit']}), back after {event['restart_s']:.1f} s", flush=True)

    def stop(self) -> None:
        """No more kills (a restart under way finishes first: :meth:`join`)."""
        self._stopping.set()


class TrainingFeed:
    """The trainer's Client: a round of training chunks (one per stream) every ``every`` s
    while each stream has fewer than ``window`` chunks unanswered, from the main loop's
    :meth:`tick`. Counts sent and answered chunks and each stream's chunk lengths."""

    def __init__(self, endpoint: str, streams: int, every: float, rng: np.random.Generator,
                 window: int = 4):
        self.client = Client(endpoint, timeout=5.0, retries=60, window=window)
        self.every, self.rng, self.window = every, rng, window
        self.lengths: dict[str, list[int]] = {f"train-{k}": [] for k in range(streams)}
        self.pending: dict[str, list] = {s: [] for s in self.lengths}
        self.counts: Counter[str] = Counter()
        self.next_at = 0.0

    @property
    def sent(self) -> int:
        return sum(map(len, self.lengths.values()))

    def tick(self, now: float) -> None:
        """Collect answered chunks; send the next round when it is due and there is room."""
        self.collect()
        if now < self.next_at or any(len(f) >= self.window for f in self.pending.values()):
            return
        for k, stream in enumerate(self.lengths):
            n = int(self.rng.integers(6, 13))  # different lengths: lost + doubled != 0
            chunk = sine(k, sum(self.lengths[stream]), n)
            self.pending[stream].append(self.client.push_async(stream, chunk))
            self.lengths[stream].append(n)
        self.next_at = now + self.every

    def collect(self) -> None:
        """Count the answered chunks (in order per stream)."""
        for futures in self.pending.values():
            while futures and futures[0].done():
                try:
                    out = futures.pop(0).result()
                    self.counts["answered" if out.shape == (0, 1) else "bad_shape"] += 1
                except Exception as exc:  # noqa: BLE001 - counted, reported as lost
                    self.counts[f"failed_{type(exc).__name__}"] += 1

    def drain(self, timeout: float) -> None:
        """Wait for every sent chunk's answer (at most ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while any(self.pending.values()) and time.monotonic() < deadline:
            self.collect()
            time.sleep(0.05)
        self.counts["unanswered"] = sum(map(len, self.pending.values()))
        self.client.shutdown()

    def check(self, ckpt: Path, trainer_log: str) -> tuple[dict[str, Any], list[str]]:
        """The trainer's final checkpoint against what was sent: figures and problems."""
        meta = json.loads(bytes(np.load(ckpt)["meta"]).decode()) if ckpt.exists() else {}
        log = meta.get("extra", {}).get("log", {})
        steps = {s: n for s, _, n in meta.get("streams", [])}
        problems = []
        if log.get("applied") != self.sent:
            problems.append(f"trainer applied {log.get('applied')} chunks, {self.sent} sent")
        for stream, lengths in self.lengths.items():
            if log.get("streams", {}).get(stream) != len(lengths):
                problems.append(f"{stream}: {log.get('streams', {}).get(stream)} chunks "
                                f"applied, {len(lengths)} sent")
            if lengths and steps.get(stream) != sum(lengths) - 1:  # the first has no target
                problems.append(f"{stream}: {steps.get(stream)} steps trained, "
                                f"{sum(lengths) - 1} sent")
        last_run = re.findall(r"this run: (\d+) applied, (\d+) already covered, "
                              r"(\d+) duplicates, (\d+) rejected", trainer_log)
        if last_run and last_run[-1][2:] != ("0", "0"):
            problems.append(f"trainer skipped duplicates or rejected entries: {last_run[-1]}")
        problems += [f"training chunk {k}: {n}" for k, n in self.counts.items()
                     if n and k not in ("answered",)]
        return {"sent": self.sent, "applied": log.get("applied"),
                "per_stream": {s: len(v) for s, v in self.lengths.items()},
                "last_run": last_run[-1] if last_run else None, **self.counts}, problems
