"""SIGKILL of a real trainer process (``streamrnn trainer --store redis://...``) mid-training,
then a restart, three times: before its first checkpoint, after a checkpoint with a backlog
in the log, and while a Client's request is in flight (the last restart is a replacement
trainer under another name). The same Client keeps pushing throughout. In the end every
training chunk sent was applied exactly once: the count in the trainer's checkpoint equals
the number sent, every stream's next sequence number equals its chunks sent, its trained
timesteps equal the sum of its chunk lengths (chunks have different lengths, so a doubled
and a lost chunk would not cancel), and no trainer skipped a duplicate or rejected an entry.

Slow (four trainer start-ups of ~15-25 s each on 2 cores): ``pytest -m slow``.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import uuid

import numpy as np
import pytest

from streamrnn.client.client import Client
from tests.helpers.redis_server import free_port
from tests.helpers.trainer_process import TrainerProcess, sine, small_model

pytestmark = pytest.mark.slow

STREAMS = 3


def _length(stream: int, round_: int) -> int:
    return 6 + (3 * round_ + stream) % 7


def _meta(path) -> dict:
    return json.loads(bytes(np.load(path)["meta"]).decode()) if path.exists() else {}


def _applied(path) -> int:
    return _meta(path).get("extra", {}).get("log", {}).get("applied", 0)


def test_sigkill_of_the_trainer_loses_and_doubles_nothing(redis_url, tmp_path):
    model = tmp_path / "m.keras"
    small_model().save(model)
    ckpt = tmp_path / "trainer.npz"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    store = f"{redis_url}?prefix=kill{uuid.uuid4().hex[:8]}"

    def args(name: str) -> list[str]:
        return ["--model", str(model), "--bind", endpoint, "--slots", "4", "--warmup", "4",
                "--checkpoint", str(ckpt), "--checkpoint-every", "4", "--store", store,
                "--name", name, "--claim-idle-ms", "1000", "--no-progress",
                "--batch-window-us", "2000"]

    started: list[TrainerProcess] = []
    sent: list[int] = []  # rounds pushed (each: one chunk per stream)
    figures: dict[str, object] = {}
    began = time.monotonic()

    def start(name: str) -> TrainerProcess:
        started.append(TrainerProcess(args(name), tmp_path / f"trainer-{len(started)}.log"))
        return started[-1]

    def kill(trainer: TrainerProcess, label: str) -> None:
        trainer.proc.send_signal(signal.SIGKILL)
        trainer.proc.wait()
        figures[f"{label}: chunks sent / covered by the checkpoint"] = (
            len(sent) * STREAMS, _applied(ckpt))

    def push(client: Client, rounds: int) -> None:
        for _ in range(rounds):
            r = len(sent)
            out = client.push_many({f"s{k}": sine(k, 16 * r, _length(k, r))
                                    for k in range(STREAMS)})
            assert all(o.shape == (0, 1) for o in out.values())
            sent.append(r)

    trainer = start("t1")
    with Client(endpoint, timeout=5, retries=12) as client:
        # 1. killed before its first checkpoint (the first step is still compiling)
        push(client, 5)
        kill(trainer, "kill 1")

        # 2. killed after a checkpoint, with a backlog in the log
        trainer = start("t1")
        push(client, 12)
        deadline = time.monotonic() + 120
        while _applied(ckpt) < 9 * STREAMS:
            assert time.monotonic() < deadline, trainer.log()[-3000:]
            time.sleep(0.05)
        push(client, 6)
        kill(trainer, "kill 2")

        # 3. killed while the Client's requests are in flight; a replacement takes over
        trainer = start("t2")
        at = len(sent) + 8

        def kill_and_replace() -> None:
            while len(sent) < at:
                time.sleep(0.01)
            kill(started[-1], "kill 3")
            start("t3")

        killer = threading.Thread(target=kill_and_replace)
        killer.start()
        push(client, 40)  # goes on through the kill: the Client resends after a timeout
        killer.join()
        trainer = started[-1]
        push(client, 3)
        stats = client.stats()
    assert trainer.terminate() == 0, trainer.log()[-3000:]
    log = trainer.log()
    assert [t.proc.returncode for t in started] == [-signal.SIGKILL] * 3 + [0]
    total = len(sent) * STREAMS
    meta = _meta(ckpt)
    summary = re.findall(r"this run: (\d+) applied, (\d+) already covered, (\d+) duplicates,"
                         r" (\d+) rejected", log)
    figures.update(sent=total, applied=meta["extra"]["log"]["applied"], last_run=summary,
                   seconds=round(time.monotonic() - began, 1), catch_up=[
                       re.findall(r"pending entries: .*", t.log()) for t in started])
    print("trainer kill figures:", figures)
    assert meta["extra"]["log"]["applied"] == total
    assert meta["extra"]["log"]["streams"] == {f"s{k}": len(sent) for k in range(STREAMS)}
    steps = {s: n for s, _, n in meta["streams"]}
    for k in range(STREAMS):  # the first element of a stream has no target
        assert steps[f"s{k}"] == sum(_length(k, r) for r in sent) - 1
    assert len(summary) == 1 and summary[0][2:] == ("0", "0"), log[-3000:]
    assert not any("Traceback" in t.log() for t in started)
    assert stats["engine"]["kernel"] == "trainer (durable log)"
