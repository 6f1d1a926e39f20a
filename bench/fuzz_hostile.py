"""Bounded hostile fuzz: hostile messages to a real worker (and a router over Redis) while
honest streams run alongside; every reply is checked against docs/protocol.md.

    python bench/fuzz_hostile.py --messages 10000 [--target worker|router|both] [--out f.json]

Three attacker connections (three client identities) send hostile messages one at a time
(bench/fuzz_cases.py, bench/fuzz_streams.py: frame garbage, oversized headers and frames,
bad dtypes/shapes/NaN, duplicate and out-of-order seqs, unknown streams, other identities'
streams, BATCH envelopes of garbage, random headers); each message's replies must be the
ones the document requires (type, error code, echoed ``rid``, nothing told to a stranger).
Meanwhile a Client owning six streams (a token) pushes them (bench/fuzz_honest.py).
Reports per target: messages and parts sent, replies required and received as required,
violations by kind (with examples), crashes (the process died, a traceback in its log, an
INTERNAL reply: must be 0), RSS growth, and the honest streams' max abs difference vs one
offline call. Exit status 1 if any crash, violation, missing reply or honest mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import msgpack  # noqa: E402
import zmq  # noqa: E402

from bench.fuzz_cases import ANY, Context, Step, header_pool  # noqa: E402
from bench.fuzz_honest import HonestTraffic  # noqa: E402
from bench.fuzz_streams import KINDS, make_case  # noqa: E402
from streamrnn.codec import decode_batch, decode_reply, is_batch  # noqa: E402
from streamrnn.protocol import ErrorCode, MessageType  # noqa: E402

FEATURES, OUT_DIM, ATTACKERS = 4, 4, 3
UNDECODABLE = SimpleNamespace(type=None, header={}, arrays={})  # a reply that did not decode
WORKER_FLAGS = ("--no-xla", "--max-bucket", "16", "--max-queue", "64", "--max-streams", "64")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10000, help="hostile messages per target")
    parser.add_argument("--target", choices=["worker", "router", "both"], default="worker")
    parser.add_argument("--honest", type=int, default=6, help="honest streams")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--reply-timeout", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the JSON summary here")
    return parser.parse_args(argv)


def build_model() -> Any:
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((None, FEATURES)),
                             keras.layers.LSTM(16, return_sequences=True),
                             keras.layers.Dense(OUT_DIM)])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Tally:
    """What the replies said, against what the document requires."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.violations: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def bad(self, kind: str, what: str) -> None:
        self.violations[kind] += 1
        self.counts["violations"] += 1
        if len(self.examples[kind]) < 3:
            self.examples[kind].append(what)

    def check(self, kind: str, expect: Any, reply: Any) -> None:
        code = reply.header.get("code") if reply.type == MessageType.ERROR else None
        name = MessageType(reply.type).name + (f" {ErrorCode(code).name}" if code else "")
        self.counts["replies_received"] += 1
        self.counts[f"reply {name}"] += 1
        if code == ErrorCode.INTERNAL:
            self.counts["internal"] += 1
        allowed = expect.allowed
        if allowed is ANY:
            fine = code != ErrorCode.INTERNAL
        else:
            fine = (int(reply.type), code) in allowed
        wanted = "any" if allowed is ANY else sorted(
            f"{MessageType(t).name} {ErrorCode(c).name if c else ''}".strip() for t, c in allowed)
        if not fine:
            self.bad(kind, f"got {name}: {reply.header.get('message', '')!r}; doc: {wanted}")
        elif expect.rid is not None and reply.header.get("rid") != expect.rid:
            self.bad(kind, f"{name} did not echo rid {expect.rid} "
                           f"(got {reply.header.get('rid')!r})")
        else:
            leaked = [f for f in expect.forbid_fields if f in reply.header or (
                f == "arrays" and reply.arrays)] if code == ErrorCode.FORBIDDEN else []
            if leaked:
                self.bad(kind, f"FORBIDDEN told {leaked}")
            else:
                self.counts["replies_as_required"] += 1


class Attack:
    """Attacker connections to one endpoint, sending cases and checking their replies."""

    def __init__(self, endpoint: str, honest: list[str], args: argparse.Namespace,
                 generate: bool):
        self.endpoint, self.timeout = endpoint, args.reply_timeout
        self.zctx = zmq.Context.instance()
        rng = np.random.default_rng(args.seed)
        pool = header_pool(300, args.seed)
        self.contexts = [Context(np.random.default_rng(args.seed * 10 + i), FEATURES, honest,
                                 generate, rid=1 + i * 10**12, pool=pool)
                         for i in range(ATTACKERS)]
        self.sockets = [self._socket() for _ in range(ATTACKERS)]
        self.rng = rng
        self.kinds, weights = list(KINDS), np.array(list(KINDS.values()))
        self.weights = weights / weights.sum()
        self.tally = Tally()
        self.late: list[set[int]] = [set() for _ in range(ATTACKERS)]  # rids that timed out

    def _socket(self) -> zmq.Socket:
        sock = self.zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock

    def one_case(self, i: int) -> int:
        """Send one drawn case on attacker ``i % ATTACKERS``; the number of messages sent."""
        kind = str(self.rng.choice(self.kinds, p=self.weights))
        who = i % ATTACKERS
        case = make_case(kind, self.contexts[who])
        self.tally.kinds[kind] += 1
        sent = 0
        for step in case.steps:
            sent += 1
            if self._send(kind, step, who) == "stop":
                break
        return sent

    def _send(self, kind: str, step: Step, who: int) -> str | None:
        sock = self._socket() if step.fresh_socket else self.sockets[who]
        self.tally.counts["parts_sent"] += max(1, len(step.expects))
        self.tally.counts["replies_required"] += len(step.expects)
        late = self.late[who]
        self._drain(sock, late)
        sock.send_multipart(step.frames, copy=False)
        replies = self._collect(sock, len(step.expects), kind,
                                0.5 if not step.expects else self.timeout, late)
        if step.fresh_socket:
            sock.close(linger=0)
        pending = list(step.expects)
        verdict = None
        for reply in replies:
            if reply is UNDECODABLE:  # received (and counted as a violation), not as required
                self.tally.counts["replies_received"] += 1
                if pending:
                    pending.pop(0)
                continue
            expect = self._match(pending, reply)
            if expect is None:
                self.tally.counts["replies_unrequired"] += 1
                self.tally.bad(kind, f"a reply no message required: "
                                     f"{MessageType(reply.type).name} {reply.header}")
                continue
            self.tally.check(kind, expect, reply)
            if step.effect is not None and len(step.expects) == 1:
                verdict = step.effect(reply)
                if verdict not in (None, "stop"):
                    self.tally.bad(kind, verdict)
        if pending:
            late.update(e.rid for e in pending if e.rid is not None)
            self.tally.counts["replies_missing"] += len(pending)
            came = [MessageType(r.type).name + f" {r.header.get('code', '')}" for r in replies]
            self.tally.bad(kind, f"{len(pending)} required replies never came (came: {came})")
            return "stop"
        return "stop" if verdict == "stop" else None

    @staticmethod
    def _match(pending: list, reply: Any) -> Any:
        rid = reply.header.get("rid")
        for j, expect in enumerate(pending):
            if expect.rid is not None and expect.rid == rid:
                return pending.pop(j)
        for j, expect in enumerate(pending):  # no rid to match: the first without one,
            if expect.rid is None:
                return pending.pop(j)
        return pending.pop(0) if pending else None  # else a rid-required one (not echoed)

    def _drain(self, sock: zmq.Socket, late: set[int]) -> None:
        """Replies still queued from earlier steps (those that timed out): counted apart."""
        while sock.poll(0):
            for reply in self._decode(sock.recv_multipart(copy=False), "stray"):
                rid = reply.header.get("rid")
                if reply is UNDECODABLE:
                    continue
                if rid in late:
                    late.discard(rid)
                    self.tally.counts["replies_late"] += 1
                else:
                    self.tally.bad("stray", f"{MessageType(reply.type).name} {reply.header}")

    def _decode(self, frames: list, kind: str) -> list:
        try:
            if not is_batch(frames):
                return [decode_reply(frames)]
            parts = decode_batch(frames, replies=True)[1]
        except Exception as exc:  # noqa: BLE001 - a reply that does not decode is a finding
            self.tally.counts["replies_undecodable"] += 1
            self.tally.bad(kind, f"undecodable reply ({exc}): {_lenient(frames)}")
            return [UNDECODABLE]
        for part in parts:
            if isinstance(part, Exception):
                self.tally.bad(kind, f"undecodable reply part: {part}")
        return [part for part in parts if not isinstance(part, Exception)]

    def _collect(self, sock: zmq.Socket, wanted: int, kind: str, wait: float,
                 late: set[int]) -> list:
        replies: list = []
        deadline = time.monotonic() + wait
        while (len(replies) < wanted or not wanted) and (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                break
            for reply in self._decode(sock.recv_multipart(copy=False), kind):
                if reply.header.get("rid") in late:
                    late.discard(reply.header.get("rid"))
                    self.tally.counts["replies_late"] += 1
                else:
                    replies.append(reply)
        return replies

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)


def fuzz(endpoint: str, pids: dict[str, int], logs: list[Path], model: Any,
         args: argparse.Namespace) -> dict[str, Any]:
    """Attack ``endpoint`` with ``args.messages`` messages while honest streams run."""
    from streamrnn.client import Client

    with Client(endpoint, timeout=30) as probe:
        generate = bool(probe.ping().get("worker", {}).get("generate", False))
    honest = HonestTraffic(endpoint, model, args.honest, 300, args.seed, FEATURES)
    honest.start_streams()
    honest.start()
    attack = Attack(endpoint, honest.names, args, generate)
    sent = 0
    rss: dict[str, list[float]] = {name: [] for name in pids}
    started = time.monotonic()
    i = 0
    while sent < args.messages:
        sent += attack.one_case(i)
        i += 1
        if i == 200 or i % 500 == 0:  # after a warm-up, then every 500 cases
            for name, pid in pids.items():
                rss[name].append(rss_mib(pid))
            c = attack.tally.counts
            print(f"[{time.monotonic() - started:7.1f} s] {sent} messages, "
                  f"{c['replies_as_required']}/{c['replies_required']} replies as required, "
                  f"{c['violations']} violations, honest {honest.counts['chunks']} chunks, "
                  f"RSS {', '.join(f'{k} {v[-1]:.0f} MiB' for k, v in rss.items())}",
                  flush=True)
        if any(_dead(pid) for pid in pids.values()):
            break
    seconds = time.monotonic() - started
    for name, pid in pids.items():
        rss[name].append(rss_mib(pid))
    attack.close()
    honest_summary = honest.stop()
    tracebacks = sum(path.read_text(errors="replace").count("Traceback") for path in logs)
    dead = [name for name, pid in pids.items() if _dead(pid)]
    t = attack.tally
    return {
        "messages_sent": sent, "cases": sum(t.kinds.values()), "seconds": round(seconds, 1),
        "kinds": len(t.kinds), **dict(sorted(t.counts.items())),
        "crashes": len(dead) + tracebacks + t.counts["internal"],
        "dead_processes": dead, "log_tracebacks": tracebacks,
        # first sample after 200 cases; "after_warmup" after 1,000 (the first GENERATE has
        # traced the decoding loop, every bucket has run); growth from there to the end
        "rss_mib": {name: {"first": round(v[0], 1), "after_warmup": round(v[min(2, len(v) - 1)], 1),
                           "end": round(v[-1], 1), "max": round(max(v), 1),
                           "growth": round(v[-1] - v[min(2, len(v) - 1)], 1),
                           "growth_from_first": round(v[-1] - v[0], 1)}
                    for name, v in rss.items()},
        "violations_by_kind": dict(t.violations), "examples": dict(t.examples),
        "honest": honest_summary,
    }


def _lenient(frames: list) -> str:
    """A reply that does not decode, as far as msgpack reads it (for the report)."""
    try:
        header = msgpack.unpackb(bytes(frames[1]), strict_map_key=False)
        return f"type 0x{bytes(frames[0])[0]:02x} header {header}"
    except Exception:  # noqa: BLE001
        return f"{len(frames)} frames"


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") >= 0
    except FileNotFoundError:
        return True


def run_worker(tmp: Path, model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from streamrnn.cli.process import WorkerProcess

    tmp.mkdir(parents=True)
    worker = WorkerProcess.start(tmp.parent / "m.keras", args.slots, *WORKER_FLAGS,
                                 "--max-streams-per-identity", "8",
                                 log_path=tmp / "worker.log")
    try:
        summary = fuzz(worker.endpoint, {"worker": worker.proc.pid}, [tmp / "worker.log"],
                       model, args)
    finally:
        summary_exit = worker.stop()
    summary["exit_status"] = {"worker": summary_exit}
    return summary


def run_router(tmp: Path, model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from streamrnn.cli.process import RouterProcess, WorkerProcess
    from tests.helpers.redis_server import start_server

    (tmp / "redis").mkdir(parents=True)
    server = start_server(tmp / "redis")
    url = f"{server.url}?prefix=fuzz{args.seed}"
    worker = router = None
    try:
        worker = WorkerProcess.start(tmp.parent / "m.keras", args.slots, *WORKER_FLAGS, "--store",
                                     url, "--name", "w1", log_path=tmp / "w1.log")
        router = RouterProcess.start("--store", url, log_path=tmp / "router.log")
        time.sleep(1.0)  # the router sees the worker's lease
        summary = fuzz(router.endpoint, {"router": router.proc.pid,
                                         "worker": worker.proc.pid},
                       [tmp / "router.log", tmp / "w1.log"], model, args)
    finally:
        status = {name: proc.stop() for name, proc in (("router", router), ("worker", worker))
                  if proc is not None}
        server.stop()
    summary["exit_status"] = status
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    tmp = Path(tempfile.mkdtemp(prefix="streamrnn-fuzz-"))
    model = build_model()
    model.save(tmp / "m.keras")
    targets = ["worker", "router"] if args.target == "both" else [args.target]
    summary = {"command": " ".join(["python bench/fuzz_hostile.py", *(argv or sys.argv[1:])])}
    for target in targets:
        print(f"fuzz: {args.messages} hostile messages to a {target}", flush=True)
        summary[target] = (run_worker if target == "worker" else run_router)(
            tmp / target, model, args)
        print(json.dumps(summary[target], indent=2, sort_keys=True, default=str), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 1 if any(_failed(summary[t]) for t in targets) else 0


def _failed(s: dict[str, Any]) -> bool:
    return bool(s["crashes"] or s.get("violations") or s.get("replies_missing")
                or s["honest"].get("mismatches") or s["dead_processes"])


if __name__ == "__main__":
    sys.exit(main())
