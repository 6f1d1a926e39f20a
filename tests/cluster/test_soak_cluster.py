"""The cluster soak (``bench/soak.py --cluster``, bench/soak_cluster.py) run briefly.

A real redis-server, two routers, three workers with ``--store`` and a trainer fed by a
second Client; workers, routers and the trainer are SIGKILLed at random (a shuffled bag:
each kind once in the first three kills) and restarted under the same name and endpoint.
Every stream must equal one offline Keras call, no chunk lost or unanswered, every training
chunk applied exactly once, each kind killed at least once and every orphaned stream served
again. Slow (about 2 minutes on 2 cores): ``pytest -m slow tests/cluster/test_soak_cluster.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cluster_soak_with_random_kills_of_every_kind(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--cluster", "--seconds", "70",
         "--kill-every", "6", "--streams", "12", "--steps", "800", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert out.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in summary.items() if k != "events"}, indent=1))
    assert summary["problems"] == [], summary["problems"]
    assert summary["mismatches"] == 0 and summary["max_abs_diff"] <= 1e-5
    assert summary["chunks_lost"] == 0 and summary["chunks_unanswered"] == 0
    assert summary["chunks_checked"] == summary["chunks_received"] > 0
    assert all(n >= 1 for n in summary["kills"].values()), summary["kills"]
    training = summary["training"]
    assert training["applied"] == training["sent"] == training["answered"] > 0
    for event in summary["events"]:
        assert event["exit"] == -9, event
        if event["kind"] == "worker":
            assert event["not_served_again"] == 0, event
    assert set(summary["exit_status"].values()) == {0}, summary["exit_status"]
    assert result.returncode == 0, result.stdout[-3000:]
